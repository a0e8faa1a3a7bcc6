//! Llama-family decoder (Llama, Mistral, Qwen2-style biases, SmolLM).
//!
//! Our own model code rather than candle-transformers': every projection is
//! a [`LoraLinear`], the ops switch between fused and differentiable forms
//! by themselves (`crate::ops`), and the KV cache can be cloned (or
//! repeated along the batch) so that one context is encoded once and reused
//! for several continuations.

use candle_core::{DType, Device, Module, Tensor};

use super::config::LlamaConfig;
use super::weights::WeightMap;
use crate::error::{Error, Result};
use crate::lora::{AdapterBackward, LoraLinear};
use crate::ops;

/// Per-layer cached keys and values.
///
/// Each layer keeps buffers with room to spare and writes new positions in
/// place: decoding token by token appends one position per layer and step
/// instead of copying the whole cache (which `Tensor::cat` did, a cost that
/// grew with the length). A clone copies the filled part, so the original
/// and the clone can each be extended on their own.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
}

/// One layer's keys and values: buffers `(b_sz, n_kv_head, capacity,
/// head_dim)` whose first `len` positions are filled.
#[derive(Debug)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
    len: usize,
}

/// Positions a layer's buffers hold at least: growth doubles from here.
const KV_MIN_CAPACITY: usize = 64;

impl LayerKv {
    /// Buffers of `capacity` positions holding `k` and `v` (`(b, n_kv,
    /// len, hd)`, `len <= capacity`).
    fn with(k: &Tensor, v: &Tensor, capacity: usize) -> candle_core::Result<Self> {
        let (b, nkv, len, hd) = k.dims4()?;
        let kb = Tensor::zeros((b, nkv, capacity, hd), k.dtype(), k.device())?;
        let vb = Tensor::zeros((b, nkv, capacity, hd), v.dtype(), v.device())?;
        kb.slice_set(&k.contiguous()?, 2, 0)?;
        vb.slice_set(&v.contiguous()?, 2, 0)?;
        Ok(Self { k: kb, v: vb, len })
    }

    /// The filled part, as views into the buffers.
    fn filled(&self) -> candle_core::Result<(Tensor, Tensor)> {
        Ok((
            self.k.narrow(2, 0, self.len)?,
            self.v.narrow(2, 0, self.len)?,
        ))
    }

    /// One query per head against the whole cache on the CPU in f32
    /// ([`crate::kernels::attend_one_query`]): `q` is `(b, heads, 1, hd)`,
    /// the result `(b, 1, heads * hd)`. `None` where that does not apply
    /// (another device or dtype, several queries, a gradient to track).
    fn attend_one(&self, q: &Tensor, scale: f32) -> candle_core::Result<Option<Tensor>> {
        let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
        if !f32_cpu(q) || !f32_cpu(&self.k) || q.dim(2)? != 1 || q.track_op() {
            return Ok(None);
        }
        let (b, heads, _, hd) = q.dims4()?;
        let (_, nkv, cap, _) = self.k.dims4()?;
        let q = q.contiguous()?;
        let mut out = vec![0f32; b * heads * hd];
        {
            let (qs, ql) = q.storage_and_layout();
            let (ks, kl) = self.k.storage_and_layout();
            let (vs, vl) = self.v.storage_and_layout();
            let (qd, kd, vd) = (
                ops::cpu_f32_slice(&qs, ql)?,
                ops::cpu_f32_slice(&ks, kl)?,
                ops::cpu_f32_slice(&vs, vl)?,
            );
            let per_q = heads * hd;
            let per_kv = nkv * cap * hd;
            for (i, o) in out.chunks_exact_mut(per_q).enumerate() {
                crate::kernels::attend_one_query(
                    &qd[i * per_q..(i + 1) * per_q],
                    &kd[i * per_kv..(i + 1) * per_kv],
                    &vd[i * per_kv..(i + 1) * per_kv],
                    o,
                    heads,
                    nkv,
                    hd,
                    cap,
                    self.len,
                    scale,
                );
            }
        }
        Ok(Some(Tensor::from_vec(out, (b, 1, heads * hd), q.device())?))
    }

    /// Appends `k` and `v` (`(b, n_kv, s, hd)`) to the layer's cache and
    /// returns all cached keys and values.
    fn append(
        slot: &mut Option<LayerKv>,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let s = k.dim(2)?;
        let capacity = |n: usize| n.next_power_of_two().max(KV_MIN_CAPACITY);
        let Some(l) = slot.as_mut() else {
            let l = slot.insert(Self::with(k, v, capacity(s))?);
            return l.filled();
        };
        if l.len + s > l.k.dims()[2] {
            let (ok, ov) = l.filled()?;
            *l = Self::with(&ok, &ov, capacity(l.len + s))?;
        }
        // Positions len.. are past every view handed out so far.
        l.k.slice_set(&k.contiguous()?, 2, l.len)?;
        l.v.slice_set(&v.contiguous()?, 2, l.len)?;
        l.len += s;
        l.filled()
    }
}

impl Clone for KvCache {
    fn clone(&self) -> Self {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                l.as_ref().map(|l| {
                    let (k, v) = l.filled().expect("narrow within the buffer");
                    LayerKv::with(&k, &v, l.k.dims()[2]).expect("copy of a cached layer")
                })
            })
            .collect();
        Self { layers }
    }
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| None).collect(),
        }
    }

    /// Number of positions already cached.
    pub fn seq_len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map(|l| l.len)
            .unwrap_or(0)
    }

    /// Batch size of the cached sequences, if any.
    pub fn batch_size(&self) -> Option<usize> {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map(|l| l.k.dims()[0])
    }

    /// Row `b` of a batched cache, its first `len` positions, as a batch-1
    /// cache: a right-padded batch's sequence without its padding.
    pub fn row(&self, b: usize, len: usize) -> Result<Self> {
        self.map_layers(|k, v, _| {
            let (k, v) = (
                k.narrow(0, b, 1)?.narrow(2, 0, len)?,
                v.narrow(0, b, 1)?.narrow(2, 0, len)?,
            );
            LayerKv::with(&k, &v, len)
        })
    }

    /// Repeats a batch-1 cache `n` times along the batch dimension.
    pub fn expand_batch(&self, n: usize) -> Result<Self> {
        self.map_layers(|k, v, len| {
            let (k, v) = (k.repeat((n, 1, 1, 1))?, v.repeat((n, 1, 1, 1))?);
            Ok(LayerKv { k, v, len })
        })
    }

    /// A new cache from every filled layer's cached keys, values and length.
    fn map_layers(
        &self,
        f: impl Fn(&Tensor, &Tensor, usize) -> candle_core::Result<LayerKv>,
    ) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|l| match l {
                None => Ok(None),
                Some(l) => {
                    let (k, v) = l.filled()?;
                    Ok(Some(f(&k, &v, l.len)?))
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: LoraLinear,
    k_proj: LoraLinear,
    v_proj: LoraLinear,
    o_proj: LoraLinear,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &LlamaConfig, w: &WeightMap, prefix: &str) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim());
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_kv_heads());
        let qkv_bias = cfg.qkv_bias();
        Ok(Self {
            q_proj: linear(w, &format!("{prefix}.q_proj"), nh * hd, h, qkv_bias)?,
            k_proj: linear(w, &format!("{prefix}.k_proj"), nkv * hd, h, qkv_bias)?,
            v_proj: linear(w, &format!("{prefix}.v_proj"), nkv * hd, h, qkv_bias)?,
            o_proj: linear(w, &format!("{prefix}.o_proj"), h, nh * hd, cfg.o_bias())?,
            n_head: nh,
            n_kv_head: nkv,
            head_dim: hd,
        })
    }

    /// The projections `(b_sz, seq_len, heads * head_dim)` split into heads,
    /// `(b_sz, heads, seq_len, head_dim)`, with RoPE on the queries and keys
    /// and the values contiguous.
    fn heads(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b_sz, seq_len, _) = q.dims3()?;
        let (nh, nkv, hd) = (self.n_head, self.n_kv_head, self.head_dim);
        let q = q.reshape((b_sz, seq_len, nh, hd))?.transpose(1, 2)?;
        let k = k.reshape((b_sz, seq_len, nkv, hd))?.transpose(1, 2)?;
        let v = v
            .reshape((b_sz, seq_len, nkv, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        Ok((ops::rope(&q, cos, sin)?, ops::rope(&k, cos, sin)?, v))
    }

    /// # Shapes
    /// * `xs`: `(b_sz, seq_len, hidden)`; `cos`, `sin`: `(seq_len, head_dim / 2)`.
    ///
    /// Attention is causal: query `i` sees the cached keys and keys `0..=i`.
    fn forward(
        &self,
        xs: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        cache: Option<&mut Option<LayerKv>>,
    ) -> Result<Tensor> {
        let ys = self.attend(
            &self.q_proj.forward(xs)?,
            &self.k_proj.forward(xs)?,
            &self.v_proj.forward(xs)?,
            cos,
            sin,
            cache,
        )?;
        Ok(self.o_proj.forward(&ys)?)
    }

    /// Attention from the projections (`(b_sz, seq_len, heads * head_dim)`
    /// each) to the output projection's input, `(b_sz, seq_len, n_head *
    /// head_dim)`; new keys and values are appended to `cache`.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        cache: Option<&mut Option<LayerKv>>,
    ) -> Result<Tensor> {
        let (b_sz, seq_len, _) = q.dims3()?;
        let (nh, nkv, hd) = (self.n_head, self.n_kv_head, self.head_dim);
        let (q, k, v) = self.heads(q, k, v, cos, sin)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let (k, v) = match cache {
            None => (k, v),
            Some(slot) => {
                let kv = LayerKv::append(slot, &k, &v)?;
                if seq_len == 1 {
                    let layer = slot.as_ref().expect("appended above");
                    if let Some(ys) = layer.attend_one(&q, scale as f32)? {
                        return Ok(ys);
                    }
                }
                kv
            }
        };
        let kv_len = k.dims()[2];
        // Grouped-query attention without copying K/V: fold the query heads
        // that share a KV head into the sequence dimension.
        let rep = nh / nkv;
        let q = q.contiguous()?.reshape((b_sz, nkv, rep * seq_len, hd))?;
        let att = q.matmul(&k.t()?)?.reshape((b_sz, nh, seq_len, kv_len))?;
        let att = ops::causal_softmax(&att, scale)?;
        let att = att.reshape((b_sz, nkv, rep * seq_len, kv_len))?;
        let ys = att.matmul(&v)?; // (b, nkv, rep * seq, hd)
        Ok(ys
            .reshape((b_sz, nh, seq_len, hd))?
            .transpose(1, 2)?
            .reshape((b_sz, seq_len, nh * hd))?)
    }

    /// [`Attention::forward`] over packed sequences: the projections run
    /// once over every token of every sequence, attention per sequence
    /// against its own cache.
    ///
    /// # Shapes
    /// * `xs`: `(1, total, hidden)`, sequence `i` in rows `spans[i].0 ..
    ///   spans[i].0 + spans[i].1`; `cos`, `sin`: the whole tables.
    fn forward_packed(
        &self,
        xs: &Tensor,
        spans: &[(usize, usize)],
        cos: &Tensor,
        sin: &Tensor,
        slots: &mut [&mut Option<LayerKv>],
    ) -> Result<Tensor> {
        let (q, k, v) = (
            self.q_proj.forward(xs)?,
            self.k_proj.forward(xs)?,
            self.v_proj.forward(xs)?,
        );
        let mut parts = Vec::with_capacity(spans.len());
        for (&(start, len), slot) in spans.iter().zip(slots.iter_mut()) {
            let offset = slot.as_ref().map_or(0, |l| l.len);
            parts.push(self.attend(
                &q.narrow(1, start, len)?,
                &k.narrow(1, start, len)?,
                &v.narrow(1, start, len)?,
                &cos.narrow(0, offset, len)?,
                &sin.narrow(0, offset, len)?,
                Some(&mut **slot),
            )?);
        }
        let ys = Tensor::cat(&parts, 1)?;
        Ok(self.o_proj.forward(&ys)?)
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: LoraLinear,
    up_proj: LoraLinear,
    down_proj: LoraLinear,
}

impl Mlp {
    fn new(cfg: &LlamaConfig, w: &WeightMap, prefix: &str) -> Result<Self> {
        let (h, i, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Self {
            gate_proj: linear(w, &format!("{prefix}.gate_proj"), i, h, bias)?,
            up_proj: linear(w, &format!("{prefix}.up_proj"), i, h, bias)?,
            down_proj: linear(w, &format!("{prefix}.down_proj"), h, i, bias)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let gate = self.gate_proj.forward(xs)?;
        let up = self.up_proj.forward(xs)?;
        self.down_proj.forward(&ops::silu_mul(&gate, &up)?)
    }
}

#[derive(Debug, Clone)]
struct Block {
    input_layernorm: Tensor,
    self_attn: Attention,
    post_attention_layernorm: Tensor,
    mlp: Mlp,
    eps: f64,
}

impl Block {
    fn new(cfg: &LlamaConfig, w: &WeightMap, i: usize) -> Result<Self> {
        let p = format!("model.layers.{i}");
        let h = cfg.hidden_size;
        Ok(Self {
            input_layernorm: w.get(&format!("{p}.input_layernorm.weight"), &[h])?,
            self_attn: Attention::new(cfg, w, &format!("{p}.self_attn"))?,
            post_attention_layernorm: w
                .get(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
            mlp: Mlp::new(cfg, w, &format!("{p}.mlp"))?,
            eps: cfg.rms_norm_eps,
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        cache: Option<&mut Option<LayerKv>>,
    ) -> Result<Tensor> {
        self.around(xs, |h| self.self_attn.forward(h, cos, sin, cache))
    }

    /// [`Block::forward`] over packed sequences ([`Attention::forward_packed`]).
    fn forward_packed(
        &self,
        xs: &Tensor,
        spans: &[(usize, usize)],
        cos: &Tensor,
        sin: &Tensor,
        slots: &mut [&mut Option<LayerKv>],
    ) -> Result<Tensor> {
        self.around(xs, |h| {
            self.self_attn.forward_packed(h, spans, cos, sin, slots)
        })
    }

    /// The block around its attention: norm, attention, residual, norm,
    /// MLP, residual.
    fn around(
        &self,
        xs: &Tensor,
        attention: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let h = ops::rms_norm(xs, &self.input_layernorm, self.eps)?;
        let xs = (xs + attention(&h)?)?;
        let h = ops::rms_norm(&xs, &self.post_attention_layernorm, self.eps)?;
        Ok((&xs + self.mlp.forward(&h)?)?)
    }
}

/// What a block's hand-written backward needs from its forward
/// ([`Block::forward_train`]); dropped block by block as the backward
/// pass goes down the model.
struct BlockTape {
    /// The block's input and its normalised copy.
    x: Tensor,
    /// `(b_sz, n_kv_head, rep * seq_len, head_dim)`: queries after RoPE,
    /// grouped by the KV head they share.
    q: Tensor,
    /// `(b_sz, n_kv_head, seq_len, head_dim)`, keys after RoPE.
    k: Tensor,
    v: Tensor,
    /// Attention weights, `(b_sz, n_kv_head, rep * seq_len, seq_len)`.
    p: Tensor,
    /// The residual stream after attention.
    x1: Tensor,
    gate: Tensor,
    up: Tensor,
    /// The adapters' backward passes: q, k, v, o, gate, up, down.
    adapters: [Option<AdapterBackward>; 7],
}

impl Block {
    /// The whole-model training fast path's forward of one block, on a
    /// detached input: the output, and what [`Block::backward_train`]
    /// needs. No KV cache; attention is causal over the input.
    fn forward_train(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<(Tensor, BlockTape)> {
        let (a, m) = (&self.self_attn, &self.mlp);
        let (b_sz, seq_len, _) = x.dims3()?;
        let (nh, nkv, hd) = (a.n_head, a.n_kv_head, a.head_dim);
        let rep = nh / nkv;
        let h1 = ops::rms_norm(x, &self.input_layernorm, self.eps)?;
        let (q, bq) = a.q_proj.forward_train(&h1)?;
        let (k, bk) = a.k_proj.forward_train(&h1)?;
        let (v, bv) = a.v_proj.forward_train(&h1)?;
        let (q, k, v) = a.heads(&q, &k, &v, cos, sin)?;
        let q = q.contiguous()?.reshape((b_sz, nkv, rep * seq_len, hd))?;
        let k = k.contiguous()?;
        let scale = 1.0 / (hd as f64).sqrt();
        let att = q.matmul(&k.t()?)?.reshape((b_sz, nh, seq_len, seq_len))?;
        let p = ops::causal_softmax(&att, scale)?.reshape((b_sz, nkv, rep * seq_len, seq_len))?;
        let o = p
            .matmul(&v)?
            .reshape((b_sz, nh, seq_len, hd))?
            .transpose(1, 2)?
            .reshape((b_sz, seq_len, nh * hd))?;
        let (attn, bo) = a.o_proj.forward_train(&o)?;
        let x1 = ops::add_into(attn, x)?;
        let h2 = ops::rms_norm(&x1, &self.post_attention_layernorm, self.eps)?;
        let (gate, bg) = m.gate_proj.forward_train(&h2)?;
        let (up, bu) = m.up_proj.forward_train(&h2)?;
        let (down, bd) = m.down_proj.forward_train(&ops::silu_mul(&gate, &up)?)?;
        let y = ops::add_into(down, &x1)?;
        let tape = BlockTape {
            x: x.clone(),
            q,
            k,
            v,
            p,
            x1,
            gate,
            up,
            adapters: [bq, bk, bv, bo, bg, bu, bd],
        };
        Ok((y, tape))
    }

    /// `dL/dx` of the block from `dL/dy`, by hand (every op's backward in
    /// reverse order, see [`crate::ops`]); the adapters record their
    /// parameter gradients on the way. `neg_sin` is `-sin`.
    fn backward_train(
        &self,
        t: BlockTape,
        gy: &Tensor,
        cos: &Tensor,
        neg_sin: &Tensor,
    ) -> Result<Tensor> {
        let (a, m) = (&self.self_attn, &self.mlp);
        let (b_sz, seq_len, _) = gy.dims3()?;
        let (nh, nkv, hd) = (a.n_head, a.n_kv_head, a.head_dim);
        let rep = nh / nkv;
        let [bq, bk, bv, bo, bg, bu, bd] = t.adapters;
        // MLP and its residual.
        let gact = m.down_proj.backward_train(gy, bd, None)?;
        let (ggate, gup) = ops::silu_mul_backward(&t.gate, &t.up, &gact)?;
        drop((t.gate, t.up, gact));
        let gh2 = m.gate_proj.backward_train(&ggate, bg, None)?;
        let gh2 = m.up_proj.backward_train(&gup, bu, Some(gh2))?;
        let h2_grad =
            ops::rms_norm_backward(&t.x1, &self.post_attention_layernorm, &gh2, self.eps)?;
        let gx1 = ops::add_into(h2_grad, gy)?;
        // Attention and its residual.
        let go = a
            .o_proj
            .backward_train(&gx1, bo, None)?
            .reshape((b_sz, seq_len, nh, hd))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b_sz, nkv, rep * seq_len, hd))?;
        let gp = go.matmul(&t.v.t()?)?;
        let gv = t.p.t()?.matmul(&go)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let gatt = ops::causal_softmax_backward(&t.p, &gp, scale)?;
        let gq = gatt.matmul(&t.k)?.reshape((b_sz, nh, seq_len, hd))?;
        let gk = gatt.t()?.matmul(&t.q)?;
        let gq = ops::rope_backward(&gq, cos, neg_sin)?;
        let gk = ops::rope_backward(&gk, cos, neg_sin)?;
        let flat =
            |g: &Tensor, heads: usize| g.transpose(1, 2)?.reshape((b_sz, seq_len, heads * hd));
        let gh1 = a.q_proj.backward_train(&flat(&gq, nh)?, bq, None)?;
        let gh1 = a.k_proj.backward_train(&flat(&gk, nkv)?, bk, Some(gh1))?;
        let gh1 = a.v_proj.backward_train(&flat(&gv, nkv)?, bv, Some(gh1))?;
        let h1_grad = ops::rms_norm_backward(&t.x, &self.input_layernorm, &gh1, self.eps)?;
        Ok(ops::add_into(h1_grad, &gx1)?)
    }
}

/// What [`Llama::backward_train`] needs from [`Llama::forward_train`].
pub struct ModelTape {
    blocks: Vec<BlockTape>,
    /// The last block's output (the final norm's input).
    last: Tensor,
    seq_len: usize,
}

fn linear(w: &WeightMap, name: &str, out: usize, inp: usize, bias: bool) -> Result<LoraLinear> {
    let weight = w.get(&format!("{name}.weight"), &[out, inp])?;
    let bias = if bias {
        Some(w.get(&format!("{name}.bias"), &[out])?)
    } else {
        w.get_opt(&format!("{name}.bias"), &[out])?
    };
    Ok(LoraLinear::new(name, weight, bias))
}

/// One sequence of [`Llama::forward_packed`]: its new tokens and its cache.
pub struct PackedSeq<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
}

/// A Llama-family causal language model.
#[derive(Debug, Clone)]
pub struct Llama {
    cfg: LlamaConfig,
    embed_tokens: Tensor,
    layers: Vec<Block>,
    norm: Tensor,
    lm_head: LoraLinear,
    /// `(max_position_embeddings, head_dim / 2)`
    cos: Tensor,
    sin: Tensor,
    device: Device,
    dtype: DType,
}

impl Llama {
    /// Builds the model from Hugging Face-named weights.
    pub fn new(cfg: &LlamaConfig, w: &WeightMap, device: &Device) -> Result<Self> {
        cfg.validate().map_err(|msg| Error::Config {
            path: w.source.clone(),
            msg,
        })?;
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let embed_tokens = w.get("model.embed_tokens.weight", &[v, h])?;
        let dtype = embed_tokens.dtype();
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Block::new(cfg, w, i))
            .collect::<Result<Vec<_>>>()?;
        let norm = w.get("model.norm.weight", &[h])?;
        let lm_head = match w.get_opt("lm_head.weight", &[v, h])? {
            Some(t) if !cfg.tie_word_embeddings => LoraLinear::new("lm_head", t, None),
            _ => LoraLinear::new("lm_head", embed_tokens.clone(), None),
        };
        let inv_freq = cfg.inv_freq();
        let half = inv_freq.len();
        let max_pos = cfg.max_position_embeddings;
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
        let t = Tensor::arange(0u32, max_pos as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((max_pos, 1))?;
        let freqs = t.broadcast_mul(&inv_freq)?;
        Ok(Self {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            cos: freqs.cos()?.to_dtype(dtype)?,
            sin: freqs.sin()?.to_dtype(dtype)?,
            device: device.clone(),
            dtype,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    /// Every linear layer of the model, with its Hugging Face module name:
    /// the injection points for adapters.
    pub fn linears(&self) -> Vec<&LoraLinear> {
        let mut out = Vec::with_capacity(self.layers.len() * 7 + 1);
        for b in &self.layers {
            let a = &b.self_attn;
            out.extend([&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj]);
            let m = &b.mlp;
            out.extend([&m.gate_proj, &m.up_proj, &m.down_proj]);
        }
        out.push(&self.lm_head);
        out
    }

    /// Quantizes every linear layer's weight for small-batch inference
    /// ([`LoraLinear::quantize`]); returns how many layers took it.
    pub fn quantize(&mut self, dtype: candle_core::quantized::GgmlDType) -> Result<usize> {
        let mut n = 0;
        for l in self.linears_mut() {
            n += l.quantize(dtype)? as usize;
        }
        Ok(n)
    }

    /// [`LoraLinear::set_quantized_max_rows`] on every layer.
    pub fn set_quantized_max_rows(&mut self, rows: usize) {
        for l in self.linears_mut() {
            l.set_quantized_max_rows(rows);
        }
    }

    pub fn linears_mut(&mut self) -> Vec<&mut LoraLinear> {
        let mut out = Vec::with_capacity(self.layers.len() * 7 + 1);
        for b in &mut self.layers {
            let a = &mut b.self_attn;
            out.extend([&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj]);
            let m = &mut b.mlp;
            out.extend([&mut m.gate_proj, &mut m.up_proj, &mut m.down_proj]);
        }
        out.push(&mut self.lm_head);
        out
    }

    /// Every tensor of the base model by Hugging Face name, as a checkpoint
    /// would store it (the tied `lm_head` is left out when tied).
    pub fn named_weights(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            self.embed_tokens.clone(),
        )];
        for (i, b) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((
                format!("{p}.input_layernorm.weight"),
                b.input_layernorm.clone(),
            ));
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                b.post_attention_layernorm.clone(),
            ));
        }
        out.push(("model.norm.weight".to_string(), self.norm.clone()));
        for lin in self.linears() {
            if lin.name() == "lm_head" && self.cfg.tie_word_embeddings {
                continue;
            }
            out.push((format!("{}.weight", lin.name()), lin.weight().clone()));
            if let Some(b) = lin.bias() {
                out.push((format!("{}.bias", lin.name()), b.clone()));
            }
        }
        out
    }

    /// Final hidden states (after the last norm).
    ///
    /// # Shapes
    /// * `input_ids`: `(b_sz, seq_len)` u32; returns `(b_sz, seq_len, hidden)`.
    ///
    /// With a cache, positions continue after the cached ones and the new
    /// keys and values are appended. Sequences in a batch are aligned on the
    /// left: pad on the right, and ignore the padded positions' outputs.
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b_sz, seq_len) = input_ids.dims2()?;
        let offset = cache.as_ref().map(|c| c.seq_len()).unwrap_or(0);
        let max = self.cfg.max_position_embeddings;
        if offset + seq_len > max {
            return Err(Error::ContextTooLong {
                tokens: offset + seq_len,
                max,
            });
        }
        if let Some(cb) = cache.as_ref().and_then(|c| c.batch_size()) {
            if cb != b_sz {
                return Err(Error::invalid(format!(
                    "the KV cache holds {cb} sequences but the input has {b_sz}"
                )));
            }
        }
        let mut xs = self.embed(input_ids)?;
        let cos = self.cos.narrow(0, offset, seq_len)?;
        let sin = self.sin.narrow(0, offset, seq_len)?;
        match cache {
            None => {
                for block in &self.layers {
                    xs = block.forward(&xs, &cos, &sin, None)?;
                }
            }
            Some(cache) => {
                for (block, slot) in self.layers.iter().zip(cache.layers.iter_mut()) {
                    xs = block.forward(&xs, &cos, &sin, Some(slot))?;
                }
            }
        }
        Ok(ops::rms_norm(&xs, &self.norm, self.cfg.rms_norm_eps)?)
    }

    /// The token embeddings of `input_ids` (`(b_sz, seq_len)` u32), with
    /// every id checked against the vocabulary.
    fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b_sz, seq_len) = input_ids.dims2()?;
        let vocab = self.cfg.vocab_size as u32;
        let ids = input_ids.flatten_all()?.to_vec1::<u32>()?;
        if let Some(bad) = ids.iter().find(|&&t| t >= vocab) {
            return Err(Error::invalid(format!(
                "token id {bad} is outside the vocabulary ({vocab} tokens)"
            )));
        }
        Ok(self
            .embed_tokens
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((b_sz, seq_len, self.cfg.hidden_size))?)
    }

    /// Whether [`Llama::forward_train`] applies: frozen norms and weights,
    /// and adapters that all have a hand-written backward
    /// ([`crate::lora::HandGrad`]), as LoRA training installs.
    pub fn hand_backward_ready(&self) -> bool {
        !self.norm.track_op()
            && self
                .layers
                .iter()
                .all(|b| !b.input_layernorm.track_op() && !b.post_attention_layernorm.track_op())
            && self.linears().iter().all(|l| l.hand_backward_ready())
    }

    /// Training without candle's autograd graph: the final hidden states
    /// (as [`Llama::forward_hidden`] without a cache) and the tape that
    /// [`Llama::backward_train`] consumes. Every op of a block is
    /// differentiated by hand, so the backward pass allocates no
    /// zero-filled gradient per graph node and sums no gradients one node
    /// at a time (candle's autograd does both, which cost about a quarter
    /// of a CPU training step here).
    ///
    /// # Shapes
    /// * `input_ids`: `(b_sz, seq_len)`; returns `(b_sz, seq_len, hidden)`.
    pub fn forward_train(&self, input_ids: &Tensor) -> Result<(Tensor, ModelTape)> {
        if !self.hand_backward_ready() {
            return Err(Error::invalid(
                "the hand-written training pass needs frozen weights and adapters with a hand-written backward",
            ));
        }
        let seq_len = input_ids.dims2()?.1;
        let max = self.cfg.max_position_embeddings;
        if seq_len > max {
            return Err(Error::ContextTooLong {
                tokens: seq_len,
                max,
            });
        }
        let mut xs = self.embed(input_ids)?;
        let cos = self.cos.narrow(0, 0, seq_len)?;
        let sin = self.sin.narrow(0, 0, seq_len)?;
        let mut blocks = Vec::with_capacity(self.layers.len());
        for block in &self.layers {
            let (ys, tape) = block.forward_train(&xs, &cos, &sin)?;
            blocks.push(tape);
            xs = ys;
        }
        let hidden = ops::rms_norm(&xs, &self.norm, self.cfg.rms_norm_eps)?;
        Ok((
            hidden,
            ModelTape {
                blocks,
                last: xs,
                seq_len,
            },
        ))
    }

    /// The backward pass of [`Llama::forward_train`] from `dL/d(hidden)`:
    /// the adapters record their parameter gradients (the embeddings are
    /// frozen, so nothing is returned).
    pub fn backward_train(&self, tape: ModelTape, d_hidden: &Tensor) -> Result<()> {
        let eps = self.cfg.rms_norm_eps;
        let mut g = ops::rms_norm_backward(&tape.last, &self.norm, d_hidden, eps)?;
        drop(tape.last);
        let cos = self.cos.narrow(0, 0, tape.seq_len)?;
        let neg_sin = self.sin.narrow(0, 0, tape.seq_len)?.neg()?;
        for (block, t) in self.layers.iter().zip(tape.blocks).rev() {
            g = block.backward_train(t, &g, &cos, &neg_sin)?;
        }
        Ok(())
    }

    /// The output layer (the embeddings when they are tied).
    pub fn lm_head(&self) -> &LoraLinear {
        &self.lm_head
    }

    /// Logits from hidden states.
    ///
    /// # Shapes
    /// * `hidden`: `(.., hidden)`; returns `(.., vocab)`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.lm_head.forward(hidden)?)
    }

    /// Logits for every position.
    ///
    /// # Shapes
    /// * `input_ids`: `(b_sz, seq_len)`; returns `(b_sz, seq_len, vocab)`.
    pub fn forward(&self, input_ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let hidden = self.forward_hidden(input_ids, cache)?;
        self.logits(&hidden)
    }

    /// Continuous batching's forward: several sequences, each with its own
    /// batch-1 cache and its own number of new tokens (a chunk of a prompt
    /// or one decoded token), packed into one pass. Every linear layer runs
    /// once over all the new tokens (row `r` of its input is token `r` of
    /// the packing, sequences one after the other, as
    /// [`crate::batch::RowLayout`] describes them to per-sequence
    /// adapters); attention runs per sequence against its own cache.
    /// Returns the logits of each sequence's last new token, `(n_seqs,
    /// vocab)`, the same (to rounding) as running each sequence alone.
    pub fn forward_packed(&self, seqs: &mut [PackedSeq<'_>]) -> Result<Tensor> {
        if seqs.is_empty() || seqs.iter().any(|s| s.tokens.is_empty()) {
            return Err(Error::invalid(
                "a packed forward needs at least one sequence, each with at least one token",
            ));
        }
        let max = self.cfg.max_position_embeddings;
        let mut spans = Vec::with_capacity(seqs.len());
        let mut ids = Vec::new();
        for s in seqs.iter() {
            if s.cache.batch_size().is_some_and(|b| b != 1) {
                return Err(Error::invalid(
                    "a packed sequence's KV cache must hold one sequence",
                ));
            }
            let tokens = s.cache.seq_len() + s.tokens.len();
            if tokens > max {
                return Err(Error::ContextTooLong { tokens, max });
            }
            spans.push((ids.len(), s.tokens.len()));
            ids.extend_from_slice(s.tokens);
        }
        let total = ids.len();
        let mut xs = self.embed(&Tensor::from_vec(ids, (1, total), &self.device)?)?;
        for (i, block) in self.layers.iter().enumerate() {
            let mut slots: Vec<&mut Option<LayerKv>> =
                seqs.iter_mut().map(|s| &mut s.cache.layers[i]).collect();
            xs = block.forward_packed(&xs, &spans, &self.cos, &self.sin, &mut slots)?;
        }
        let last: Vec<u32> = spans.iter().map(|&(s, l)| (s + l - 1) as u32).collect();
        let n = last.len();
        let last = Tensor::from_vec(last, n, &self.device)?;
        let hidden = xs.squeeze(0)?.index_select(&last, 0)?.unsqueeze(0)?;
        let hidden = ops::rms_norm(&hidden, &self.norm, self.cfg.rms_norm_eps)?;
        Ok(self.logits(&hidden)?.squeeze(0)?)
    }

    /// Logits of the last position only, `(b_sz, vocab)`: what generation needs.
    pub fn forward_last(&self, input_ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let hidden = self.forward_hidden(input_ids, cache)?;
        let seq_len = hidden.dim(1)?;
        let last = hidden.narrow(1, seq_len - 1, 1)?.squeeze(1)?;
        self.logits(&last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::weights::tiny_config;
    use crate::testutil::max_abs_diff as max_diff;

    /// Token-by-token decoding through the in-place cache, past its first
    /// capacity (so it grows twice), equals one forward over the whole
    /// sequence; a clone and a batch expansion continue on their own.
    #[test]
    fn cached_decoding_equals_the_full_forward() {
        let mut cfg = tiny_config();
        cfg.max_position_embeddings = 4 * KV_MIN_CAPACITY;
        let w = WeightMap::random(&cfg, 5, &Device::Cpu).unwrap();
        let model = Llama::new(&cfg, &w, &Device::Cpu).unwrap();
        let n = 2 * KV_MIN_CAPACITY + 9;
        let ids: Vec<u32> = (0..n as u32)
            .map(|i| (i * 7 + 3) % cfg.vocab_size as u32)
            .collect();
        let row = |ids: &[u32]| {
            Tensor::new(ids, &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap()
        };
        let full = model.forward(&row(&ids), None).unwrap();
        let mut cache = model.new_cache();
        let prefix = 5;
        let mut parts = vec![model
            .forward(&row(&ids[..prefix]), Some(&mut cache))
            .unwrap()];
        let mut fork = None;
        for t in prefix..n {
            if t == KV_MIN_CAPACITY - 1 {
                fork = Some((cache.clone(), cache.expand_batch(2).unwrap()));
            }
            parts.push(
                model
                    .forward(&row(&ids[t..t + 1]), Some(&mut cache))
                    .unwrap(),
            );
        }
        assert_eq!(cache.seq_len(), n);
        let stitched = Tensor::cat(&parts, 1).unwrap();
        let d = max_diff(&full, &stitched);
        assert!(
            d < 1e-4,
            "cached decoding differs from the full forward by {d}"
        );

        // The clone and the expanded copy go on from position 63 with a
        // different continuation; the main cache is not disturbed by them,
        // and they agree with a full forward of their own sequence.
        let (mut clone, mut batch) = fork.unwrap();
        let t0 = KV_MIN_CAPACITY - 1;
        let other: Vec<u32> = ids[..t0].iter().copied().chain([11, 12, 13]).collect();
        let want = model
            .forward(&row(&other), None)
            .unwrap()
            .narrow(1, t0, 3)
            .unwrap();
        let got = model.forward(&row(&other[t0..]), Some(&mut clone)).unwrap();
        assert!(max_diff(&want, &got) < 1e-4);
        let pair = Tensor::cat(&[row(&other[t0..]), row(&other[t0..])], 0).unwrap();
        let got2 = model.forward(&pair, Some(&mut batch)).unwrap();
        assert_eq!(batch.batch_size(), Some(2));
        for b in 0..2 {
            assert!(max_diff(&want, &got2.narrow(0, b, 1).unwrap()) < 1e-4);
        }
        // One more token for both rows of the batch (one query per row).
        let next = Tensor::new(&[[9u32], [9]], &Device::Cpu).unwrap();
        let got3 = model.forward(&next, Some(&mut batch)).unwrap();
        let longer: Vec<u32> = other.iter().copied().chain([9]).collect();
        let want3 = model
            .forward(&row(&longer), None)
            .unwrap()
            .narrow(1, t0 + 3, 1)
            .unwrap();
        for b in 0..2 {
            assert!(max_diff(&want3, &got3.narrow(0, b, 1).unwrap()) < 1e-4);
        }
        let again = model
            .forward(&row(&ids[n - 1..]), Some(&mut cache.clone()))
            .unwrap();
        let last = model
            .forward(&row(&[ids.as_slice(), &ids[n - 1..]].concat()), None)
            .unwrap()
            .narrow(1, n, 1)
            .unwrap();
        assert!(max_diff(&last, &again) < 1e-4);
    }

    #[test]
    fn model_is_send_and_sync() {
        fn is<T: Send + Sync>() {}
        is::<super::Llama>();
    }
}
