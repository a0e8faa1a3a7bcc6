//! Per-sequence adapters for continuous batching: the sequences packed into
//! one forward pass ([`crate::models::Llama::forward_packed`]) may each use
//! a different expert or route, as Punica and S-LoRA do on GPUs. The base
//! layers run once over every row; each sequence's adapter term is computed
//! on its own rows only.
//!
//! A [`RowLayout`], shared by every layer, says which rows belong to which
//! sequence and which adapter set ("slot") each sequence uses; it changes
//! at every step. A [`SegmentAdapter`] on a linear layer holds that layer's
//! adapter for every slot and applies each to its sequences' rows; it
//! changes only when the set of slots does.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{Result, Tensor};

use crate::lora::{LinearAdapter, LoraLinear};
use crate::models::Llama;

/// The rows of one packed forward pass: for each sequence, in packing
/// order, its number of new tokens and its slot.
#[derive(Debug, Default)]
pub struct RowLayout {
    segments: Mutex<Vec<(usize, usize)>>,
    /// The sequences whose rows an adapter is computing now (see
    /// [`RowLayout::current`]).
    current: AtomicUsize,
    current_end: AtomicUsize,
}

impl RowLayout {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Sets the next pass's sequences: `(new tokens, slot)` each.
    pub fn set(&self, segments: Vec<(usize, usize)>) {
        *self.segments.lock().expect("row layout") = segments;
    }

    pub fn segments(&self) -> Vec<(usize, usize)> {
        self.segments.lock().expect("row layout").clone()
    }

    /// Which sequences (indices into [`RowLayout::set`]'s list) the
    /// adapter term being computed belongs to: consecutive sequences of one
    /// slot are computed in one call, their rows one after the other. What
    /// an observer of routing decisions ([`crate::routing::RouteObserver`])
    /// reads to tell the sequences of one batch apart. Before any batched
    /// call (an adapter installed alone), every sequence.
    pub fn current(&self) -> std::ops::Range<usize> {
        let end = self.current_end.load(Ordering::Relaxed);
        if end == 0 {
            return 0..self.segments.lock().expect("row layout").len();
        }
        self.current.load(Ordering::Relaxed)..end
    }
}

/// A linear layer's adapters for a batch: `slots[s]` for the sequences in
/// slot `s` (`None`: the base layer alone).
#[derive(Debug)]
pub struct SegmentAdapter {
    layout: Arc<RowLayout>,
    slots: Vec<Option<Arc<dyn LinearAdapter>>>,
    /// The layer's output size: a pass whose sequences all use slots
    /// without an adapter here adds zeros.
    out: usize,
}

impl SegmentAdapter {
    pub fn new(
        layout: Arc<RowLayout>,
        slots: Vec<Option<Arc<dyn LinearAdapter>>>,
        out: usize,
    ) -> Self {
        Self { layout, slots, out }
    }
}

impl LinearAdapter for SegmentAdapter {
    /// # Shapes
    /// * `xs`: `(.., in)` whose rows are either every new token of the
    ///   layout's sequences or one row per sequence (the output layer,
    ///   which sees only each sequence's last token); returns `(.., out)`.
    fn delta(&self, xs: &Tensor) -> Result<Tensor> {
        let dims = xs.dims().to_vec();
        let inp = *dims.last().expect("rank >= 1");
        let rows = xs.elem_count() / inp.max(1);
        let segments = self.layout.segments();
        let tokens: usize = segments.iter().map(|s| s.0).sum();
        let per_row = rows == tokens;
        if !per_row && rows != segments.len() {
            candle_core::bail!(
                "a batched adapter got {rows} rows but the batch has {tokens} tokens in {} sequences",
                segments.len()
            )
        }
        let x2 = xs.reshape((rows, inp))?;
        // Runs of consecutive sequences in one slot: one call each, so a
        // slot's router and experts are read once per pass, not once per
        // sequence.
        let mut parts = Vec::with_capacity(segments.len());
        let (mut start, mut i) = (0, 0);
        while i < segments.len() {
            let slot = segments[i].1;
            let mut j = i;
            let mut len = 0;
            while j < segments.len() && segments[j].1 == slot {
                len += if per_row { segments[j].0 } else { 1 };
                j += 1;
            }
            let adapter = self.slots.get(slot).ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "sequence {i} uses adapter slot {slot} but the layer has {}",
                    self.slots.len()
                ))
            })?;
            parts.push((
                len,
                match adapter {
                    Some(a) => {
                        self.layout.current.store(i, Ordering::Relaxed);
                        self.layout.current_end.store(j, Ordering::Relaxed);
                        let d = a.delta(&x2.narrow(0, start, len)?.unsqueeze(0)?)?;
                        Some(d.squeeze(0)?)
                    }
                    None => None,
                },
            ));
            start += len;
            i = j;
        }
        let out = self.out;
        let parts = parts
            .into_iter()
            .map(|(len, p)| match p {
                Some(p) => Ok(p),
                None => Tensor::zeros((len, out), xs.dtype(), xs.device()),
            })
            .collect::<Result<Vec<_>>>()?;
        let mut out_dims = dims;
        *out_dims.last_mut().expect("rank >= 1") = out;
        Tensor::cat(&parts, 0)?.reshape(out_dims)
    }
}

/// Every linear layer's adapter, in [`Llama::linears`] order: what a route
/// installed on the model, kept so that it can serve as one slot of a
/// batch.
pub type AdapterSet = Vec<Option<Arc<dyn LinearAdapter>>>;

/// The adapters now on `model`'s layers.
pub fn adapters_of(model: &Llama) -> AdapterSet {
    model
        .linears()
        .iter()
        .map(|l| l.adapter().cloned())
        .collect()
}

/// Puts a batch's slots on `model`: on each layer a [`SegmentAdapter`]
/// over the slots' adapters for that layer, or nothing where no slot
/// adapts it. A layer whose slots all share one adapter gets it directly.
pub fn install_slots(model: &mut Llama, layout: &Arc<RowLayout>, slots: &[&AdapterSet]) {
    for (i, layer) in model.linears_mut().into_iter().enumerate() {
        let per_slot: Vec<Option<Arc<dyn LinearAdapter>>> =
            slots.iter().map(|s| s.get(i).cloned().flatten()).collect();
        set_layer(layer, layout, per_slot);
    }
}

fn set_layer(
    layer: &mut LoraLinear,
    layout: &Arc<RowLayout>,
    per_slot: Vec<Option<Arc<dyn LinearAdapter>>>,
) {
    let adapter: Option<Arc<dyn LinearAdapter>> = if per_slot.iter().all(|a| a.is_none()) {
        None
    } else {
        let out = layer.out_features();
        Some(Arc::new(SegmentAdapter::new(layout.clone(), per_slot, out)))
    };
    layer.set_adapter(adapter);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::Lora;
    use crate::models::weights::{tiny_config, WeightMap};
    use crate::models::PackedSeq;
    use crate::testutil::max_abs_diff;
    use candle_core::Device;

    /// A LoRA on every linear layer of `model`, from `seed`.
    fn lora_set(model: &Llama, seed: u64) -> AdapterSet {
        let dev = Device::Cpu;
        model
            .linears()
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let (o, n) = (l.out_features(), l.in_features());
                let v = |k: usize, s: u64| crate::testutil::uniform_values(k, s);
                let a = Tensor::from_vec(v(2 * n, seed * 1000 + i as u64), (2, n), &dev).unwrap();
                let b = Tensor::from_vec(v(o * 2, seed * 7000 + i as u64), (o, 2), &dev).unwrap();
                Some(Arc::new(Lora::new(a, b, 0.5).unwrap()) as Arc<dyn LinearAdapter>)
            })
            .collect()
    }

    fn install_set(model: &mut Llama, set: &AdapterSet) {
        for (i, l) in model.linears_mut().into_iter().enumerate() {
            l.set_adapter(set.get(i).cloned().flatten());
        }
    }

    /// Three sequences, one with no adapter and two with different LoRAs,
    /// prefilled in chunks of different lengths and decoded together in
    /// one packed pass per step, give the logits each gives alone.
    #[test]
    fn packed_sequences_with_their_own_adapters_equal_each_alone() {
        let cfg = tiny_config();
        let w = WeightMap::random(&cfg, 3, &Device::Cpu).unwrap();
        let mut model = Llama::new(&cfg, &w, &Device::Cpu).unwrap();
        let sets = [Vec::new(), lora_set(&model, 1), lora_set(&model, 2)];
        let prompts: [Vec<u32>; 3] = [vec![1, 5, 9, 2, 7], vec![3, 4], vec![8, 8, 1, 6, 2, 2, 5]];
        let steps = [[3usize, 2, 4], [2, 1, 3], [1, 1, 1], [1, 1, 1]];
        // Alone: each sequence's own adapters, fed in the same chunks.
        let mut alone = Vec::new();
        for (s, set) in sets.iter().enumerate() {
            install_set(&mut model, set);
            let mut cache = model.new_cache();
            let mut fed = 0;
            let mut out = Vec::new();
            let mut tail = prompts[s].clone();
            for (t, step) in steps.iter().enumerate() {
                let n = step[s].min(tail.len() - fed);
                let ids = Tensor::new(&tail[fed..fed + n], &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap();
                fed += n;
                let logits = model.forward_last(&ids, Some(&mut cache)).unwrap();
                out.push(logits.squeeze(0).unwrap());
                if fed == tail.len() {
                    tail.push(10 + t as u32); // a "decoded" token
                }
            }
            alone.push(out);
        }
        // Together.
        let layout = RowLayout::new();
        let refs: Vec<&AdapterSet> = sets.iter().collect();
        install_slots(&mut model, &layout, &refs);
        let mut caches: Vec<_> = (0..3).map(|_| model.new_cache()).collect();
        let mut fed = [0usize; 3];
        let mut tails = prompts.clone();
        for (t, step) in steps.iter().enumerate() {
            let chunks: Vec<Vec<u32>> = (0..3)
                .map(|s| {
                    let n = step[s].min(tails[s].len() - fed[s]);
                    tails[s][fed[s]..fed[s] + n].to_vec()
                })
                .collect();
            layout.set((0..3).map(|s| (chunks[s].len(), s)).collect());
            let mut packed: Vec<PackedSeq> = caches
                .iter_mut()
                .zip(&chunks)
                .map(|(cache, c)| PackedSeq { tokens: c, cache })
                .collect();
            let logits = model.forward_packed(&mut packed).unwrap();
            for s in 0..3 {
                let d = max_abs_diff(&logits.get(s).unwrap(), &alone[s][t]);
                assert!(d < 1e-4, "sequence {s}, step {t}: {d}");
                fed[s] += chunks[s].len();
                if fed[s] == tails[s].len() {
                    tails[s].push(10 + t as u32);
                }
            }
        }
        // The adapters differ, so the sequences' logits would differ with
        // another sequence's adapter: the check above is not vacuous.
        install_set(&mut model, &sets[2]);
        let ids = Tensor::new(prompts[1].as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let other = model.forward_last(&ids, None).unwrap().squeeze(0).unwrap();
        assert!(max_abs_diff(&other, &alone[1][1]) > 1e-3);
    }

    #[test]
    fn a_layout_that_does_not_match_the_rows_is_an_error() {
        let layout = RowLayout::new();
        let dev = Device::Cpu;
        let lora = Lora::new(
            Tensor::ones((2, 4), candle_core::DType::F32, &dev).unwrap(),
            Tensor::ones((3, 2), candle_core::DType::F32, &dev).unwrap(),
            1.0,
        )
        .unwrap();
        let a = SegmentAdapter::new(layout.clone(), vec![Some(Arc::new(lora)), None], 3);
        layout.set(vec![(2, 0), (3, 1)]);
        let xs = Tensor::ones((1, 4, 4), candle_core::DType::F32, &dev).unwrap();
        assert!(a.delta(&xs).is_err());
        let xs = Tensor::ones((1, 5, 4), candle_core::DType::F32, &dev).unwrap();
        let d = a.delta(&xs).unwrap();
        assert_eq!(d.dims(), &[1, 5, 3]);
        // Slot 1 has no adapter: its rows get nothing; slot 0's get B A x.
        let v: Vec<Vec<f32>> = d.squeeze(0).unwrap().to_vec2().unwrap();
        assert_eq!(v[0], vec![8.0; 3]);
        assert_eq!(v[4], vec![0.0; 3]);
        // One row per sequence (the output layer).
        let xs = Tensor::ones((1, 2, 4), candle_core::DType::F32, &dev).unwrap();
        assert_eq!(a.delta(&xs).unwrap().dims(), &[1, 2, 3]);
        // A pass with only sequences of the slot without an adapter (the
        // other slot's sequences wait): zeros, not an error.
        layout.set(vec![(2, 1)]);
        let xs = Tensor::ones((1, 2, 4), candle_core::DType::F32, &dev).unwrap();
        let d = a.delta(&xs).unwrap();
        assert_eq!(d.dims(), &[1, 2, 3]);
        assert_eq!(d.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }
}
