//! Per-token routing inside one LoRA-wrapped linear layer (METHOD.md
//! section 2): score every token against per-expert prototypes, keep the
//! top-k, softmax over the kept logits, and mix the chosen experts.
//!
//! Three implementations of the same function, selected by [`RoutePath`]:
//!
//! * [`RoutePath::Reference`]: computes every expert's output for every
//!   token and weights them with PEFT's dense formulation (non-chosen
//!   logits set to `-inf`, softmax over all experts). Obviously correct,
//!   cost grows with the library.
//! * [`RoutePath::Grouped`]: route first, then, per expert, gather the
//!   tokens routed to it, one matmul pair, scatter-add back. Candle ops
//!   only, so it runs on any device.
//! * [`RoutePath::Fast`] (default): on the CPU the same grouping as plain
//!   loops over f32 slices (AVX2/FMA where available), one block of
//!   tokens per thread of candle's pool (LoRA ranks are tiny, so candle's
//!   per-op overhead would dominate); elsewhere [`RoutePath::Grouped`].
//!
//! Only the prototype scores grow with the library size (`n x in x E`
//! multiply-adds); applying experts costs `k` experts per token, plus
//! reading the chosen experts' factors once per call.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::kernels::routing::Kernels;
use crate::lora::LinearAdapter;
use crate::ops::{cpu_f32_slice, matmul_t};

/// How the chosen experts are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MixMode {
    /// `sum_e w_e s_e B_e A_e x`: PEFT's `create_arrow_model` (and mttl's
    /// `lora_merge_after`, used by its Phatgoose selector). The default:
    /// it is what the released Arrow implementation users compare against
    /// computes, and it is a convex mix of the experts' actual outputs.
    #[default]
    Output,
    /// `(sum_e w_e s_e B_e)(sum_e w_e A_e) x`: mttl's default for Arrow
    /// (mix the factors, then apply one LoRA per token).
    Factor,
}

impl std::str::FromStr for MixMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "output" => Ok(MixMode::Output),
            "factor" => Ok(MixMode::Factor),
            _ => Err(Error::InvalidArgument(format!(
                "unknown mixing mode `{s}`: expected `output` or `factor`"
            ))),
        }
    }
}

/// Which implementation of the routed forward runs (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RoutePath {
    #[default]
    Fast,
    Grouped,
    Reference,
}

/// How a token is scored against an expert's prototype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SelectorKind {
    /// `|<x, v_e>| / T`: singular vectors have no sign.
    Arrow,
    /// `<x, mu_e> / T` (mean hidden states; `T = sqrt(d)` by default).
    Mu,
    /// `<std(x), std(g_e)> / T` with `std` = zero mean, unit variance over
    /// the `d` features (mttl's `norm_d`); `T = sqrt(d)` by default.
    Phatgoose,
}

/// `LayerNorm` without affine parameters, mttl's `norm_d` (eps 1e-5).
pub(crate) fn standardize(xs: &Tensor) -> candle_core::Result<Tensor> {
    let mean = xs.mean_keepdim(candle_core::D::Minus1)?;
    let centered = xs.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
    centered.broadcast_div(&(var + 1e-5)?.sqrt()?)
}

/// Scores tokens against prototypes and picks the top-k.
#[derive(Debug, Clone)]
pub struct Selector {
    kind: SelectorKind,
    /// `(E, in)` f32 on the model's device (standardised for Phatgoose).
    prototypes: Tensor,
    temperature: f64,
    top_k: usize,
}

impl Selector {
    /// # Shapes
    /// * `prototypes`: `(n_experts, in)`.
    pub fn new(
        kind: SelectorKind,
        prototypes: &Tensor,
        temperature: f64,
        top_k: usize,
        device: &Device,
    ) -> Result<Self> {
        let (e, _) = prototypes.dims2()?;
        check_top_k(top_k, e)?;
        check_temperature(temperature)?;
        let mut p = prototypes.to_dtype(DType::F32)?.to_device(device)?;
        if kind == SelectorKind::Phatgoose {
            p = standardize(&p)?;
        }
        Ok(Self {
            kind,
            prototypes: p,
            temperature,
            top_k,
        })
    }

    pub fn n_experts(&self) -> usize {
        self.prototypes.dims()[0]
    }

    pub fn top_k(&self) -> usize {
        self.top_k
    }

    /// Router logits, row-major `(n, E)`.
    ///
    /// # Shapes
    /// * `x2`: `(n, in)`.
    pub fn logits(&self, x2: &Tensor) -> candle_core::Result<Vec<f32>> {
        let raw = self.raw_logits(x2)?.flatten_all()?.to_vec1::<f32>()?;
        let mut l = vec![0f32; raw.len()];
        self.finish_logits(&raw, &mut l);
        Ok(l)
    }

    /// The prototype products before [`Selector::finish_logits`]: `(n, E)`,
    /// f32, contiguous.
    fn raw_logits(&self, x2: &Tensor) -> candle_core::Result<Tensor> {
        let x = x2.to_dtype(DType::F32)?;
        let x = match self.kind {
            SelectorKind::Phatgoose => standardize(&x)?,
            _ => x,
        };
        matmul_t(&x, &self.prototypes)?.contiguous()
    }

    /// Raw products to logits: `|p| / T` for Arrow, `p / T` otherwise.
    fn finish_logits(&self, raw: &[f32], out: &mut [f32]) {
        let inv_t = (1.0 / self.temperature) as f32;
        let pairs = out.iter_mut().zip(raw);
        match self.kind {
            SelectorKind::Arrow => pairs.for_each(|(o, v)| *o = v.abs() * inv_t),
            _ => pairs.for_each(|(o, v)| *o = v * inv_t),
        }
    }
}

/// One sentence for a bad `top_k`.
pub fn check_top_k(top_k: usize, n_experts: usize) -> Result<()> {
    if top_k == 0 || top_k > n_experts {
        return Err(Error::InvalidArgument(format!(
            "top-k is {top_k}, but it must be between 1 and the number of experts in the library ({n_experts})"
        )));
    }
    Ok(())
}

/// One sentence for a bad temperature.
pub fn check_temperature(t: f64) -> Result<()> {
    if !(t.is_finite() && t > 0.0) {
        return Err(Error::InvalidArgument(format!(
            "the router temperature must be a positive number, got {t}"
        )));
    }
    Ok(())
}

/// The experts chosen for each of `n` tokens and their mixing weights.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    pub k: usize,
    /// `n * k` expert indices, best first for each token.
    pub experts: Vec<u32>,
    /// `n * k` weights (softmax over the kept logits).
    pub weights: Vec<f32>,
}

/// Strict total order: higher logit first, then lower index.
#[inline]
fn better(l: &[f32], i: usize, j: usize) -> bool {
    match l[i].total_cmp(&l[j]) {
        std::cmp::Ordering::Greater => true,
        std::cmp::Ordering::Less => false,
        std::cmp::Ordering::Equal => i < j,
    }
}

/// Top-k per row of `logits` (`n x e`) and the softmax over the kept ones.
pub fn select_top_k(logits: &[f32], n: usize, e: usize, k: usize) -> Selection {
    let mut experts = Vec::with_capacity(n * k);
    let mut weights = Vec::with_capacity(n * k);
    let mut top: Vec<usize> = Vec::with_capacity(k + 1);
    for t in 0..n {
        let row = &logits[t * e..(t + 1) * e];
        top.clear();
        // The k-th best logit so far: most experts lose to it in one
        // plain comparison (ties and NaN go through `better`).
        let mut kth = f32::NEG_INFINITY;
        for (i, &v) in row.iter().enumerate() {
            if top.len() == k && (v < kth || !better(row, i, top[k - 1])) {
                continue;
            }
            // Insertion into a short sorted list: k is small.
            let pos = top
                .iter()
                .position(|&j| better(row, i, j))
                .unwrap_or(top.len());
            top.insert(pos, i);
            top.truncate(k);
            if top.len() == k {
                kth = row[top[k - 1]];
            }
        }
        let max = row[top[0]];
        let mut sum = 0.0f32;
        let start = weights.len();
        for &i in &top {
            let w = (row[i] - max).exp();
            sum += w;
            experts.push(i as u32);
            weights.push(w);
        }
        weights[start..].iter_mut().for_each(|w| *w /= sum);
    }
    Selection {
        k,
        experts,
        weights,
    }
}

/// Token lists per expert: `tokens[offsets[e]..offsets[e + 1]]` were routed
/// to expert `e` with `weights[..]` (counting sort, O(n k + E)).
struct Groups {
    offsets: Vec<usize>,
    tokens: Vec<u32>,
    weights: Vec<f32>,
}

fn group_by_expert(sel: &Selection, n_experts: usize) -> Groups {
    group_range(sel, n_experts, 0, sel.experts.len() / sel.k.max(1))
}

/// [`group_by_expert`] for tokens `t0..t1` only; token ids stay global.
fn group_range(sel: &Selection, n_experts: usize, t0: usize, t1: usize) -> Groups {
    let (experts, ws) = (
        &sel.experts[t0 * sel.k..t1 * sel.k],
        &sel.weights[t0 * sel.k..t1 * sel.k],
    );
    let mut offsets = vec![0usize; n_experts + 1];
    for &e in experts {
        offsets[e as usize + 1] += 1;
    }
    for e in 0..n_experts {
        offsets[e + 1] += offsets[e];
    }
    let mut fill = offsets.clone();
    let mut tokens = vec![0u32; experts.len()];
    let mut weights = vec![0f32; experts.len()];
    for (slot, (&e, &w)) in experts.iter().zip(ws).enumerate() {
        let p = &mut fill[e as usize];
        tokens[*p] = (t0 + slot / sel.k) as u32;
        weights[*p] = w;
        *p += 1;
    }
    Groups {
        offsets,
        tokens,
        weights,
    }
}

/// What the router chose in one call of one layer.
#[derive(Debug)]
pub struct RouteDecision<'a> {
    /// Module name, e.g. `model.layers.0.self_attn.q_proj`.
    pub layer: &'a str,
    /// Expert names; `selection.experts` indexes them.
    pub names: &'a [String],
    pub b_sz: usize,
    pub seq_len: usize,
    /// Row `b * seq_len + s` of the selection is batch row `b`, position `s`.
    pub selection: &'a Selection,
}

/// Receives every routing decision (for `--explain`).
pub trait RouteObserver: Send + Sync + std::fmt::Debug {
    fn on_route(&self, decision: &RouteDecision<'_>);
}

/// How often each expert was chosen: shared by every routed layer of a
/// model, so an evaluation can report expert usage over a data set. Every
/// row a layer sees counts, padding of batched scoring included; score
/// one sequence at a time (or subtract) for exact per-token shares.
#[derive(Debug)]
pub struct Usage {
    names: Vec<String>,
    counts: Mutex<UsageCounts>,
}

#[derive(Debug, Default, Clone)]
struct UsageCounts {
    chosen: Vec<u64>,
    weight: Vec<f64>,
    decisions: u64,
}

/// A snapshot of [`Usage`].
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct UsageReport {
    /// (token, layer) routing decisions counted.
    pub decisions: u64,
    pub experts: Vec<ExpertUsage>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ExpertUsage {
    pub name: String,
    /// Decisions in which the expert was among the top-k.
    pub chosen: u64,
    /// `chosen / decisions`.
    pub share: f64,
    /// Mean routing weight over all decisions (the weights of one
    /// decision sum to 1, so these sum to 1 over the experts).
    pub mean_weight: f64,
}

impl Usage {
    pub fn new(names: Vec<String>) -> Self {
        let n = names.len();
        Self {
            names,
            counts: Mutex::new(UsageCounts {
                chosen: vec![0; n],
                weight: vec![0.0; n],
                decisions: 0,
            }),
        }
    }

    fn record(&self, sel: &Selection) {
        let mut c = self.counts.lock().expect("usage counter");
        for (&e, &w) in sel.experts.iter().zip(&sel.weights) {
            c.chosen[e as usize] += 1;
            c.weight[e as usize] += w as f64;
        }
        c.decisions += (sel.experts.len() / sel.k.max(1)) as u64;
    }

    pub fn reset(&self) {
        let mut c = self.counts.lock().expect("usage counter");
        c.chosen.iter_mut().for_each(|v| *v = 0);
        c.weight.iter_mut().for_each(|v| *v = 0.0);
        c.decisions = 0;
    }

    pub fn report(&self) -> UsageReport {
        let c = self.counts.lock().expect("usage counter").clone();
        let d = c.decisions.max(1) as f64;
        UsageReport {
            decisions: c.decisions,
            experts: self
                .names
                .iter()
                .enumerate()
                .map(|(i, name)| ExpertUsage {
                    name: name.clone(),
                    chosen: c.chosen[i],
                    share: c.chosen[i] as f64 / d,
                    mean_weight: c.weight[i] / d,
                })
                .collect(),
        }
    }
}

impl UsageReport {
    /// A human-readable table, most used expert first.
    pub fn summary(&self) -> String {
        let mut rows: Vec<&ExpertUsage> = self.experts.iter().collect();
        rows.sort_by(|a, b| b.chosen.cmp(&a.chosen).then(a.name.cmp(&b.name)));
        let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(6).max(6);
        let mut s = format!(
            "expert usage over {} (token, layer) routing decisions:\n{:<width$}  {:>10}  {:>7}  {:>11}\n",
            self.decisions, "expert", "chosen", "share", "mean weight"
        );
        for r in rows {
            s.push_str(&format!(
                "{:<width$}  {:>10}  {:>6.1}%  {:>11.4}\n",
                r.name,
                r.chosen,
                100.0 * r.share,
                r.mean_weight
            ));
        }
        s
    }
}

/// One expert's factors on one layer, f32 and contiguous, for the CPU loop.
#[derive(Debug)]
struct CpuFactors {
    /// `E * r * in`: `A_e` row-major.
    a: Vec<f32>,
    /// `E * r * out`: `B_e^T` row-major, so applying `B` is `r` axpys.
    bt: Vec<f32>,
}

/// A LoRA layer that routes every token between a library's experts.
///
/// # Shapes
/// * `a`: `E` tensors `(r, in)`; `b`: `E` tensors `(out, r)`.
#[derive(Debug)]
pub struct RoutedLora {
    layer: String,
    names: Arc<Vec<String>>,
    selector: Selector,
    a: Vec<Tensor>,
    b: Vec<Tensor>,
    scales: Vec<f32>,
    r: usize,
    inp: usize,
    out: usize,
    cpu: Option<CpuFactors>,
    mix: MixMode,
    path: RoutePath,
    usage: Option<Arc<Usage>>,
    observer: Option<Arc<dyn RouteObserver>>,
}

/// The per-expert factors of one layer: `(A (r, in), B (out, r), scale)`.
pub type LayerFactors = Vec<(Tensor, Tensor, f64)>;

impl RoutedLora {
    pub fn new(
        layer: impl Into<String>,
        names: Arc<Vec<String>>,
        factors: LayerFactors,
        selector: Selector,
        mix: MixMode,
        path: RoutePath,
        device: &Device,
    ) -> Result<Self> {
        let layer = layer.into();
        if factors.len() != names.len() || factors.len() != selector.n_experts() {
            return Err(Error::InvalidArgument(format!(
                "layer `{layer}`: {} experts' factors, {} names and {} prototypes",
                factors.len(),
                names.len(),
                selector.n_experts()
            )));
        }
        let (r, inp) = factors[0].0.dims2()?;
        let (out, _) = factors[0].1.dims2()?;
        let mut a = Vec::with_capacity(factors.len());
        let mut b = Vec::with_capacity(factors.len());
        let mut scales = Vec::with_capacity(factors.len());
        for (i, (ta, tb, s)) in factors.into_iter().enumerate() {
            if ta.dims() != [r, inp] || tb.dims() != [out, r] {
                return Err(Error::InvalidArgument(format!(
                    "layer `{layer}`: expert `{}` has A {:?} and B {:?}, but expert `{}` has A [{r}, {inp}] and B [{out}, {r}]",
                    names[i],
                    ta.dims(),
                    tb.dims(),
                    names[0]
                )));
            }
            a.push(ta.to_dtype(DType::F32)?.to_device(device)?.contiguous()?);
            b.push(tb.to_dtype(DType::F32)?.to_device(device)?.contiguous()?);
            scales.push(s as f32);
        }
        let cpu = if device.is_cpu() {
            let mut fa = Vec::with_capacity(a.len() * r * inp);
            let mut fbt = Vec::with_capacity(a.len() * r * out);
            for (ta, tb) in a.iter().zip(&b) {
                fa.extend(ta.flatten_all()?.to_vec1::<f32>()?);
                fbt.extend(tb.t()?.contiguous()?.flatten_all()?.to_vec1::<f32>()?);
            }
            Some(CpuFactors { a: fa, bt: fbt })
        } else {
            None
        };
        Ok(Self {
            layer,
            names,
            selector,
            a,
            b,
            scales,
            r,
            inp,
            out,
            cpu,
            mix,
            path,
            usage: None,
            observer: None,
        })
    }

    pub fn with_usage(mut self, usage: Arc<Usage>) -> Self {
        self.usage = Some(usage);
        self
    }

    pub fn with_observer(mut self, observer: Option<Arc<dyn RouteObserver>>) -> Self {
        self.observer = observer;
        self
    }

    pub fn layer(&self) -> &str {
        &self.layer
    }

    fn n_experts(&self) -> usize {
        self.a.len()
    }

    /// Every expert on every token, PEFT's dense weights.
    fn reference(&self, x2: &Tensor, logits: &[f32]) -> candle_core::Result<Tensor> {
        let (n, e, k) = (x2.dims()[0], self.n_experts(), self.selector.top_k);
        let mut masked = vec![f32::NEG_INFINITY; n * e];
        for t in 0..n {
            let row = &logits[t * e..(t + 1) * e];
            let mut order: Vec<usize> = (0..e).collect();
            order.sort_by(|&i, &j| row[j].total_cmp(&row[i]).then(i.cmp(&j)));
            for &i in &order[..k] {
                masked[t * e + i] = row[i];
            }
        }
        let w = Tensor::from_vec(masked, (n, e), x2.device())?;
        let w = candle_nn::ops::softmax_last_dim(&w)?;
        let x = x2.to_dtype(DType::F32)?;
        let col = |i: usize| w.narrow(1, i, 1);
        let mut out = Tensor::zeros((n, self.out), DType::F32, x2.device())?;
        match self.mix {
            MixMode::Output => {
                for i in 0..e {
                    let y = (matmul_t(&matmul_t(&x, &self.a[i])?, &self.b[i])?
                        * self.scales[i] as f64)?;
                    out = (out + y.broadcast_mul(&col(i)?)?)?;
                }
            }
            MixMode::Factor => {
                let mut z = Tensor::zeros((n, self.r), DType::F32, x2.device())?;
                for i in 0..e {
                    z = (z + matmul_t(&x, &self.a[i])?.broadcast_mul(&col(i)?)?)?;
                }
                for i in 0..e {
                    let y = (matmul_t(&z, &self.b[i])? * self.scales[i] as f64)?;
                    out = (out + y.broadcast_mul(&col(i)?)?)?;
                }
            }
        }
        Ok(out)
    }

    /// Route first, then one gather / matmul pair / scatter-add per expert.
    fn grouped(&self, x2: &Tensor, sel: &Selection) -> candle_core::Result<Tensor> {
        let n = x2.dims()[0];
        let dev = x2.device();
        let g = group_by_expert(sel, self.n_experts());
        let x = x2.to_dtype(DType::F32)?;
        let mut out = Tensor::zeros((n, self.out), DType::F32, dev)?;
        let chunk = |i: usize, scale: f32| -> candle_core::Result<Option<(Tensor, Tensor)>> {
            let (lo, hi) = (g.offsets[i], g.offsets[i + 1]);
            if lo == hi {
                return Ok(None);
            }
            let idx = Tensor::from_slice(&g.tokens[lo..hi], hi - lo, dev)?;
            let w: Vec<f32> = g.weights[lo..hi].iter().map(|w| w * scale).collect();
            let w = Tensor::from_vec(w, (hi - lo, 1), dev)?;
            Ok(Some((idx, w)))
        };
        match self.mix {
            MixMode::Output => {
                for i in 0..self.n_experts() {
                    let Some((idx, w)) = chunk(i, self.scales[i])? else {
                        continue;
                    };
                    let xe = x.index_select(&idx, 0)?;
                    let y = matmul_t(&matmul_t(&xe, &self.a[i])?, &self.b[i])?.broadcast_mul(&w)?;
                    out = out.index_add(&idx, &y, 0)?;
                }
            }
            MixMode::Factor => {
                let mut z = Tensor::zeros((n, self.r), DType::F32, dev)?;
                for i in 0..self.n_experts() {
                    let Some((idx, w)) = chunk(i, 1.0)? else {
                        continue;
                    };
                    let ze = matmul_t(&x.index_select(&idx, 0)?, &self.a[i])?.broadcast_mul(&w)?;
                    z = z.index_add(&idx, &ze, 0)?;
                }
                for i in 0..self.n_experts() {
                    let Some((idx, w)) = chunk(i, self.scales[i])? else {
                        continue;
                    };
                    let y = matmul_t(&z.index_select(&idx, 0)?, &self.b[i])?.broadcast_mul(&w)?;
                    out = out.index_add(&idx, &y, 0)?;
                }
            }
        }
        Ok(out)
    }

    /// The fast CPU path: logits, top-k selection and
    /// [`RoutedLora::grouped`]'s computation as plain loops over f32 slices,
    /// one block of tokens per thread of candle's pool (LoRA ranks are tiny,
    /// so candle's per-op overhead would dominate the work). The router's
    /// products are read in place from `scores`; with
    /// [`Scores::WithBase`] each token's output starts from the base
    /// output beside them (plus bias) and the result is the layer's whole
    /// output, otherwise the adapter's term alone.
    fn cpu_fast(
        &self,
        x2: &Tensor,
        scores: Scores<'_>,
    ) -> candle_core::Result<(Selection, Tensor)> {
        let (n, inp, out) = (x2.dims()[0], self.inp, self.out);
        let (e, k) = (self.n_experts(), self.selector.top_k);
        let x = x2.to_dtype(DType::F32)?.contiguous()?;
        let (raw, base, bias) = match scores {
            Scores::Alone(raw) => (raw.contiguous()?, 0, None),
            Scores::WithBase { fused, bias } => {
                let bias = bias
                    .map(|b| b.to_dtype(DType::F32)?.contiguous())
                    .transpose()?;
                (fused.contiguous()?, out, bias)
            }
        };
        let stride = base + e;
        if raw.elem_count() != n * stride {
            candle_core::bail!(
                "layer `{}`: router products of shape {:?} for {n} tokens and {e} experts",
                self.layer,
                raw.dims()
            )
        }
        let mut y = vec![0f32; n * out];
        let mut experts = vec![0u32; n * k];
        let mut weights = vec![0f32; n * k];
        {
            let (storage, layout) = x.storage_and_layout();
            let data = cpu_f32_slice(&storage, layout)?;
            let (raw_storage, raw_layout) = raw.storage_and_layout();
            let raw = cpu_f32_slice(&raw_storage, raw_layout)?;
            let bias_guard = bias.as_ref().map(|b| b.storage_and_layout());
            let bias = match &bias_guard {
                Some((s, l)) => Some(cpu_f32_slice(s, l)?),
                None => None,
            };
            // Blocks of at least 64 (token, expert) pairs, at most one per
            // thread: each block reads its experts' factors once.
            let pool = candle_core::utils::barrier_pool();
            let blocks = (pool.n_workers() + 1).min(n * k / 64).max(1);
            let per = n.div_ceil(blocks);
            type Part<'a> = (&'a mut [f32], &'a mut [u32], &'a mut [f32]);
            let parts: Vec<Mutex<Part<'_>>> = y
                .chunks_mut(per * out)
                .zip(experts.chunks_mut(per * k))
                .zip(weights.chunks_mut(per * k))
                .map(|((y, ex), w)| Mutex::new((y, ex, w)))
                .collect();
            let run = |b: usize| {
                let (t0, t1) = (b * per, ((b + 1) * per).min(n));
                let mut logits = vec![0f32; (t1 - t0) * e];
                for (t, l) in (t0..t1).zip(logits.chunks_exact_mut(e)) {
                    let row = &raw[t * stride..(t + 1) * stride];
                    self.selector.finish_logits(&row[base..], l);
                }
                let sel = select_top_k(&logits, t1 - t0, e, k);
                let mut part = parts[b].lock().expect("one thread per block");
                part.1.copy_from_slice(&sel.experts);
                part.2.copy_from_slice(&sel.weights);
                if base > 0 {
                    for (t, yt) in (t0..t1).zip(part.0.chunks_exact_mut(out)) {
                        yt.copy_from_slice(&raw[t * stride..t * stride + out]);
                        if let Some(bias) = bias {
                            yt.iter_mut().zip(bias).for_each(|(y, b)| *y += b);
                        }
                    }
                }
                self.cpu_range(&data[t0 * inp..t1 * inp], &sel, 0, t1 - t0, part.0);
            };
            if parts.len() == 1 {
                run(0);
            } else {
                pool.execute_chunked(parts.len(), |range| range.for_each(run));
            }
        }
        let sel = Selection {
            k,
            experts,
            weights,
        };
        Ok((sel, Tensor::from_vec(y, (n, out), &Device::Cpu)?))
    }

    /// Tokens `t0..t1` of [`RoutedLora::cpu_fast`], expert by expert; `y`
    /// holds their outputs.
    fn cpu_range(&self, data: &[f32], sel: &Selection, t0: usize, t1: usize, y: &mut [f32]) {
        let k = Kernels::detect();
        let f = self.cpu.as_ref().expect("CPU factors on a CPU layer");
        let (r, inp, out) = (self.r, self.inp, self.out);
        let g = group_range(sel, self.n_experts(), t0, t1);
        let a_of = |e: usize| &f.a[e * r * inp..(e + 1) * r * inp];
        let bt_of = |e: usize| &f.bt[e * r * out..(e + 1) * r * out];
        match self.mix {
            MixMode::Output => {
                let mut z = vec![0f32; r];
                for e in 0..self.n_experts() {
                    let (a_e, bt_e) = (a_of(e), bt_of(e));
                    for p in g.offsets[e]..g.offsets[e + 1] {
                        let t = g.tokens[p] as usize;
                        let xt = &data[t * inp..(t + 1) * inp];
                        let c = g.weights[p] * self.scales[e];
                        (k.project)(a_e, inp, xt, &mut z);
                        z.iter_mut().for_each(|v| *v *= c);
                        (k.lift)(&z, bt_e, out, &mut y[(t - t0) * out..(t - t0 + 1) * out]);
                    }
                }
            }
            MixMode::Factor => {
                // z_t = sum_e w_e A_e x_t first, then y_t = sum_e w_e s_e B_e z_t.
                let mut zs = vec![0f32; (t1 - t0) * r];
                let mut z = vec![0f32; r];
                for e in 0..self.n_experts() {
                    let a_e = a_of(e);
                    for p in g.offsets[e]..g.offsets[e + 1] {
                        let t = g.tokens[p] as usize;
                        (k.project)(a_e, inp, &data[t * inp..(t + 1) * inp], &mut z);
                        let w = g.weights[p];
                        let zt = &mut zs[(t - t0) * r..(t - t0 + 1) * r];
                        zt.iter_mut().zip(&z).for_each(|(a, b)| *a += w * b);
                    }
                }
                for e in 0..self.n_experts() {
                    let bt_e = bt_of(e);
                    for p in g.offsets[e]..g.offsets[e + 1] {
                        let t = g.tokens[p] as usize;
                        let c = g.weights[p] * self.scales[e];
                        z.iter_mut()
                            .zip(&zs[(t - t0) * r..(t - t0 + 1) * r])
                            .for_each(|(a, b)| *a = c * b);
                        (k.lift)(&z, bt_e, out, &mut y[(t - t0) * out..(t - t0 + 1) * out]);
                    }
                }
            }
        }
    }
}

/// Where [`RoutedLora::cpu_fast`] reads the router's products.
enum Scores<'a> {
    /// [`Selector::raw_logits`]: `(n, E)`.
    Alone(&'a Tensor),
    /// The layer's fused matmul (`(n, out + E)`, see
    /// [`LinearAdapter::fused_rows`]) and its bias.
    WithBase {
        fused: &'a Tensor,
        bias: Option<&'a Tensor>,
    },
}

impl RoutedLora {
    /// Reports the decision, then gives `y` (`(n, out)`) the input's
    /// leading dimensions and dtype (`dims`: the input's shape).
    fn finish(
        &self,
        mut dims: Vec<usize>,
        sel: &Selection,
        y: Tensor,
        dtype: DType,
    ) -> candle_core::Result<Tensor> {
        self.report(&dims, sel);
        *dims.last_mut().expect("rank >= 1") = self.out;
        y.reshape(dims)?.to_dtype(dtype)
    }

    /// Counts the decision and shows it to the observer.
    fn report(&self, dims: &[usize], sel: &Selection) {
        if let Some(u) = &self.usage {
            u.record(sel);
        }
        if let Some(obs) = &self.observer {
            let n = sel.experts.len() / sel.k.max(1);
            let (b_sz, seq_len) = match dims.len() {
                3 => (dims[0], dims[1]),
                _ => (1, n),
            };
            obs.on_route(&RouteDecision {
                layer: &self.layer,
                names: &self.names,
                b_sz,
                seq_len,
                selection: sel,
            });
        }
    }
}

impl LinearAdapter for RoutedLora {
    /// The prototypes, for the CPU fast path of a selector that scores the
    /// input as it is (Arrow, mu; not PHATGOOSE, which standardises it).
    fn fused_rows(&self) -> Option<&Tensor> {
        let plain = self.selector.kind != SelectorKind::Phatgoose;
        (plain && self.path == RoutePath::Fast && self.cpu.is_some())
            .then_some(&self.selector.prototypes)
    }

    fn forward_fused(
        &self,
        xs: &Tensor,
        fused: &Tensor,
        bias: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let dims = xs.dims().to_vec();
        let inp = *dims.last().expect("rank >= 1");
        let n = xs.elem_count() / inp.max(1);
        let fused = fused.reshape((n, ()))?;
        let (sel, y) = self.cpu_fast(
            &xs.reshape((n, inp))?,
            Scores::WithBase {
                fused: &fused,
                bias,
            },
        )?;
        self.finish(dims, &sel, y, xs.dtype())
    }

    fn delta(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let dims = xs.dims().to_vec();
        let inp = *dims.last().expect("rank >= 1");
        let n = xs.elem_count() / inp.max(1);
        let x2 = xs.reshape((n, inp))?;
        let (sel, y) = match self.path {
            RoutePath::Fast if self.cpu.is_some() && xs.device().is_cpu() => {
                self.cpu_fast(&x2, Scores::Alone(&self.selector.raw_logits(&x2)?))?
            }
            path => {
                let logits = self.selector.logits(&x2)?;
                let sel = select_top_k(&logits, n, self.n_experts(), self.selector.top_k);
                let y = match path {
                    RoutePath::Reference => self.reference(&x2, &logits)?,
                    _ => self.grouped(&x2, &sel)?,
                };
                (sel, y)
            }
        };
        self.finish(dims, &sel, y, xs.dtype())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A routed layer with a bias, fused ([`LinearAdapter::fused_rows`])
    /// and not: the same output for every selector that fuses, and the
    /// base layer unchanged once the adapter is removed.
    #[test]
    fn fused_layer_equals_unfused_layer() -> candle_core::Result<()> {
        use crate::lora::LoraLinear;
        use candle_core::Module;
        let dev = Device::Cpu;
        let (e, r, inp, out) = (6, 3, 16, 12);
        let w = Tensor::randn(0f32, 1.0, (out, inp), &dev)?;
        let bias = Tensor::randn(0f32, 1.0, out, &dev)?;
        let protos = Tensor::randn(0f32, 1.0, (e, inp), &dev)?;
        let names = Arc::new((0..e).map(|i| format!("e{i}")).collect::<Vec<_>>());
        let factors = || -> candle_core::Result<LayerFactors> {
            (0..e)
                .map(|i| {
                    Ok((
                        Tensor::randn(0f32, 1.0, (r, inp), &dev)?,
                        Tensor::randn(0f32, 1.0, (out, r), &dev)?,
                        0.5 + i as f64,
                    ))
                })
                .collect()
        };
        let x = Tensor::randn(0f32, 1.0, (2, 9, inp), &dev)?;
        let plain = LoraLinear::new("q", w.clone(), Some(bias.clone()));
        let before = plain.forward(&x)?;
        for (kind, mix) in [
            (SelectorKind::Arrow, MixMode::Output),
            (SelectorKind::Arrow, MixMode::Factor),
            (SelectorKind::Mu, MixMode::Output),
        ] {
            let f = factors()?;
            let layer = |path: RoutePath| -> crate::Result<LoraLinear> {
                let sel = Selector::new(kind, &protos, 2.0, 2, &dev)?;
                let routed = RoutedLora::new("q", names.clone(), f.clone(), sel, mix, path, &dev)?;
                let mut lin = plain.clone();
                lin.set_adapter(Some(Arc::new(routed)));
                Ok(lin)
            };
            let fused = layer(RoutePath::Fast).expect("layer");
            let unfused = layer(RoutePath::Grouped).expect("layer");
            assert!(fused.is_fused() && !unfused.is_fused());
            let d = crate::testutil::max_abs_diff(&fused.forward(&x)?, &unfused.forward(&x)?);
            assert!(d < 1e-4, "{kind:?} {mix:?}: {d}");
            let mut removed = fused.clone();
            removed.set_adapter(None);
            assert!(!removed.is_fused());
            assert_eq!(removed.weight().dims(), [out, inp]);
            let d = crate::testutil::max_abs_diff(&removed.forward(&x)?, &before);
            assert_eq!(d, 0.0);
        }
        Ok(())
    }

    #[test]
    fn top_k_is_sorted_and_softmaxed_with_stable_ties() {
        let l = [0.5f32, 2.0, 2.0, -1.0, 1.0, 3.0];
        let s = select_top_k(&l, 2, 3, 2);
        assert_eq!(s.experts, vec![1, 2, 2, 1]);
        // Row 0 ties (2, 2): both kept, lower index first, equal weights.
        assert!((s.weights[0] - 0.5).abs() < 1e-6 && (s.weights[1] - 0.5).abs() < 1e-6);
        // Row 1 keeps logits 3 and 1: softmax gives e^2 / (e^2 + 1).
        let e2 = 2.0f32.exp();
        assert!(
            (s.weights[2] - e2 / (e2 + 1.0)).abs() < 1e-6,
            "{:?}",
            s.weights
        );
        let all = select_top_k(&l[..3], 1, 3, 3);
        assert_eq!(all.experts, vec![1, 2, 0]);
        assert!((all.weights.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn groups_invert_the_selection() {
        let s = Selection {
            k: 2,
            experts: vec![2, 0, 2, 1, 0, 2],
            weights: vec![0.6, 0.4, 0.7, 0.3, 0.9, 0.1],
        };
        let g = group_by_expert(&s, 3);
        assert_eq!(g.offsets, vec![0, 2, 3, 6]);
        assert_eq!(g.tokens, vec![0, 2, 1, 0, 1, 2]);
        assert_eq!(g.weights, vec![0.4, 0.9, 0.3, 0.6, 0.7, 0.1]);
    }

    #[test]
    fn bad_top_k_and_temperature_are_one_sentence() {
        let e = check_top_k(0, 4).unwrap_err().to_string();
        assert!(e.contains("between 1 and") && e.contains("(4)"), "{e}");
        assert!(check_top_k(5, 4).is_err());
        assert!(check_top_k(4, 4).is_ok());
        assert!(check_temperature(0.0).is_err());
        assert!(check_temperature(f64::NAN).is_err());
    }

    #[test]
    fn usage_counts_decisions_and_weights() {
        let u = Usage::new(vec!["a".into(), "b".into(), "c".into()]);
        u.record(&select_top_k(&[1.0, 0.0, 2.0, 0.0, 3.0, 1.0], 2, 3, 2));
        let r = u.report();
        assert_eq!(r.decisions, 2);
        assert_eq!(r.experts[0].chosen, 1);
        assert_eq!(r.experts[1].chosen, 1);
        assert_eq!(r.experts[2].chosen, 2);
        let total: f64 = r.experts.iter().map(|e| e.mean_weight).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!(r.summary().contains("over 2 (token, layer)"));
        u.reset();
        assert_eq!(u.report().decisions, 0);
    }
}
