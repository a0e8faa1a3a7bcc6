//! Static baselines of zero-shot reuse (METHOD.md section 2): the uniform
//! merge of factors (mttl), the uniform merge of updates `dW`, TIES
//! merging, and GenKnowSub's subtraction of general-knowledge experts.
//!
//! These give one adapter per layer that is the same for every token.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::expert::Expert;
use crate::lora::{LinearAdapter, Lora};
use crate::ops::matmul_t;

/// mttl's uniform merge: `A = mean_e A_e`, `B = mean_e s_e B_e` (scale 1;
/// with one shared scale this is `s * mean(B) mean(A)`).
pub fn uniform_factors(experts: &[Expert]) -> Result<BTreeMap<String, Lora>> {
    super::check_compatible(experts)?;
    let n = experts.len() as f64;
    let mut out = BTreeMap::new();
    for module in experts[0].weights.keys() {
        let mut sa: Option<Tensor> = None;
        let mut sb: Option<Tensor> = None;
        for e in experts {
            let (a, b) = &e.weights[module];
            let b = (b.to_dtype(DType::F32)? * e.config.scale())?;
            let a = a.to_dtype(DType::F32)?;
            sa = Some(match sa {
                None => a,
                Some(s) => (s + a)?,
            });
            sb = Some(match sb {
                None => b,
                Some(s) => (s + b)?,
            });
        }
        let (a, b) = (sa.expect("experts") / n, sb.expect("experts") / n);
        out.insert(module.clone(), Lora::new(a?, b?, 1.0)?);
    }
    Ok(out)
}

/// The mean of the experts' updates, `mean_e s_e B_e A_e x`, without a
/// dense `dW`: one LoRA of rank `N r` whose factors are the experts'
/// stacked (`[A_1; ..; A_N]`, `[s_1 B_1, .., s_N B_N] / N`), which
/// computes exactly the sum of the experts' deltas divided by `N`.
pub fn uniform_updates(experts: &[Expert]) -> Result<BTreeMap<String, Lora>> {
    super::check_compatible(experts)?;
    let n = experts.len() as f64;
    let mut out = BTreeMap::new();
    for module in experts[0].weights.keys() {
        let mut a_parts = Vec::with_capacity(experts.len());
        let mut b_parts = Vec::with_capacity(experts.len());
        for e in experts {
            let (a, b) = &e.weights[module];
            a_parts.push(a.to_dtype(DType::F32)?);
            b_parts.push((b.to_dtype(DType::F32)? * (e.config.scale() / n))?);
        }
        let a = Tensor::cat(&a_parts, 0)?;
        let b = Tensor::cat(&b_parts, 1)?;
        out.insert(module.clone(), Lora::new(a, b, 1.0)?);
    }
    Ok(out)
}

/// A dense update `dW` (`out x in`) added to a layer: `x dW^T`.
#[derive(Debug, Clone)]
pub struct DenseDelta {
    /// `(out, in)`
    pub dw: Tensor,
}

impl LinearAdapter for DenseDelta {
    fn delta(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        matmul_t(&xs.to_dtype(self.dw.dtype())?, &self.dw)?.to_dtype(xs.dtype())
    }
}

/// `q`-quantile of `values` with linear interpolation (numpy's default).
fn quantile(values: &[f32], q: f64) -> f32 {
    let mut v: Vec<f32> = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let pos = q * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(v.len() - 1);
    let frac = (pos - lo as f64) as f32;
    v[lo] + frac * (v[hi] - v[lo])
}

/// TIES merging of dense updates (Yadav et al. 2023, as mttl's
/// `TiesMerge`): per expert keep the `density` fraction of entries of
/// largest magnitude (`|v| >= quantile(|dW_e|, 1 - density)`), elect each
/// entry's sign as the sign of the sum of the kept values, and average the
/// kept values that agree with it (the "disjoint mean").
///
/// mttl thresholds each expert over all its parameters at once; we
/// threshold each layer's `dW_e` on its own, which needs only one layer's
/// dense updates in memory at a time.
pub fn ties_merge(experts: &[Expert], density: f64) -> Result<BTreeMap<String, DenseDelta>> {
    super::check_compatible(experts)?;
    if !(density > 0.0 && density <= 1.0) {
        return Err(Error::InvalidArgument(format!(
            "the TIES density must be in (0, 1], got {density}"
        )));
    }
    let mut out = BTreeMap::new();
    for module in experts[0].weights.keys() {
        let mut kept: Vec<Vec<f32>> = Vec::with_capacity(experts.len());
        let mut shape = (0, 0);
        for e in experts {
            let (a, b) = &e.weights[module];
            let dw =
                (b.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)? * e.config.scale())?;
            shape = dw.dims2()?;
            let mut v = dw.flatten_all()?.to_vec1::<f32>()?;
            let abs: Vec<f32> = v.iter().map(|x| x.abs()).collect();
            let th = quantile(&abs, 1.0 - density);
            v.iter_mut().for_each(|x| {
                if x.abs() < th {
                    *x = 0.0
                }
            });
            kept.push(v);
        }
        let len = shape.0 * shape.1;
        let mut merged = vec![0f32; len];
        for (i, m) in merged.iter_mut().enumerate() {
            let total: f32 = kept.iter().map(|v| v[i]).sum();
            if total == 0.0 {
                continue;
            }
            let (mut sum, mut count) = (0f32, 0u32);
            for v in &kept {
                if v[i] != 0.0 && (v[i] > 0.0) == (total > 0.0) {
                    sum += v[i];
                    count += 1;
                }
            }
            *m = sum / count.max(1) as f32;
        }
        let dw = Tensor::from_vec(merged, shape, experts[0].weights[module].0.device())?;
        out.insert(module.clone(), DenseDelta { dw });
    }
    Ok(out)
}

/// GenKnowSub (PEFT's `use_gks`): subtract the mean `A` and the mean `B`
/// of the `general` experts from every other expert's `A` and `B`, and
/// drop the general experts from the set that is routed.
pub fn gen_know_sub(experts: &[Expert], general: &[String]) -> Result<Vec<Expert>> {
    if general.is_empty() {
        return Ok(experts.to_vec());
    }
    super::check_compatible(experts)?;
    let mut gen = Vec::new();
    for name in general {
        let e = experts.iter().find(|e| &e.name == name).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "GenKnowSub: the library has no expert `{name}` (known: {})",
                names_list(experts)
            ))
        })?;
        gen.push(e);
    }
    let tasks: Vec<&Expert> = experts
        .iter()
        .filter(|e| !general.contains(&e.name))
        .collect();
    if tasks.is_empty() {
        return Err(Error::InvalidArgument(
            "GenKnowSub: every expert of the library is a general expert; none is left to route to"
                .into(),
        ));
    }
    let k = gen.len() as f64;
    let mut mean: BTreeMap<&String, (Tensor, Tensor)> = BTreeMap::new();
    for module in experts[0].weights.keys() {
        let mut sa = gen[0].weights[module].0.to_dtype(DType::F32)?;
        let mut sb = gen[0].weights[module].1.to_dtype(DType::F32)?;
        for g in &gen[1..] {
            sa = (sa + g.weights[module].0.to_dtype(DType::F32)?)?;
            sb = (sb + g.weights[module].1.to_dtype(DType::F32)?)?;
        }
        mean.insert(module, ((sa / k)?, (sb / k)?));
    }
    tasks
        .into_iter()
        .map(|e| {
            let mut e = e.clone();
            for (module, (a, b)) in e.weights.iter_mut() {
                let (ma, mb) = &mean[module];
                let dt = a.dtype();
                *a = (a.to_dtype(DType::F32)? - ma)?.to_dtype(dt)?;
                *b = (b.to_dtype(DType::F32)? - mb)?.to_dtype(dt)?;
            }
            Ok(e)
        })
        .collect()
}

pub(crate) fn names_list(experts: &[Expert]) -> String {
    let names: Vec<&str> = experts.iter().take(8).map(|e| e.name.as_str()).collect();
    let more = if experts.len() > 8 {
        format!(", ... ({} in all)", experts.len())
    } else {
        String::new()
    };
    format!("{}{more}", names.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_interpolates_like_numpy() {
        // numpy.quantile([1, 2, 3, 4, 5], 0.8) == 4.2
        assert!((quantile(&[5.0, 1.0, 4.0, 2.0, 3.0], 0.8) - 4.2).abs() < 1e-6);
        assert_eq!(quantile(&[3.0], 0.5), 3.0);
    }
}
