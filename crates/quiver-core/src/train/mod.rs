//! Training LoRA experts on task data (METHOD.md section 1): frozen base,
//! only LoRA parameters trained, AdamW with warmup and linear decay,
//! gradient accumulation, loss on target tokens only, seeded, and
//! checkpoints so an interrupted run resumes where it stopped.
//!
//! Determinism: the examples of every micro-batch and every dropout mask
//! are functions of (seed, step), so a resumed run replays exactly what an
//! uninterrupted one would have done.

pub mod optim;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::data::Example;
use crate::error::{candle_msg, Error, Result};
use crate::expert::{Expert, LoraWeights};
use crate::lora::{AdapterBackward, AdapterTerm, HandGrad, LinearAdapter, LoraConfig};
use crate::models::weights::load_safetensors;
use crate::models::Llama;
use crate::ops::{self, matmul_t};
use crate::score::encode_pair;
use crate::tokenizer::Tokenizer;

use optim::{linear_schedule, AdamW};

/// Everything that decides what a training run computes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub steps: usize,
    pub lr: f64,
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimiser step (effective batch = batch_size x grad_accum).
    pub grad_accum: usize,
    /// Inputs are truncated on the left to this many tokens.
    pub max_input_len: usize,
    /// Targets are truncated on the right to this many tokens.
    pub max_target_len: usize,
    pub seed: u64,
    /// Seed of the LoRA initialisation (`None`: `seed`). Each module's `A`
    /// is drawn from its own generator, seeded from this and the module's
    /// name ([`lora_init_a`]), so the initialisation can be recomputed from
    /// the expert's metadata (MBC's `delta` embedding subtracts it).
    /// `quiver train` gives every expert its own (`--init per-expert`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_seed: Option<u64>,
    /// Validation loss every N steps (0: only before and after training).
    pub eval_every: usize,
    /// At most this many validation examples are scored.
    pub max_eval_examples: usize,
    /// Write a resumable checkpoint every N steps (0: never).
    pub checkpoint_every: usize,
    pub lora: LoraConfig,
}

impl Default for TrainConfig {
    /// The paper's settings (lr 1e-4, 6% warmup, no weight decay, effective
    /// batch 16, targets 64 tokens) with a CPU-sized input length.
    fn default() -> Self {
        Self {
            steps: 100,
            lr: 1e-4,
            warmup_ratio: 0.06,
            weight_decay: 0.0,
            batch_size: 4,
            grad_accum: 4,
            max_input_len: 512,
            max_target_len: 64,
            seed: 42,
            init_seed: None,
            eval_every: 0,
            max_eval_examples: 200,
            checkpoint_every: 25,
            lora: LoraConfig::default(),
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::invalid(m));
        if self.steps == 0 {
            return bad("--steps must be at least 1".into());
        }
        if self.batch_size == 0 || self.grad_accum == 0 {
            return bad("--batch-size and --grad-accum must be at least 1".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("--lr must be a positive number, got {}", self.lr));
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            return bad(format!(
                "--warmup-ratio must be in [0, 1], got {}",
                self.warmup_ratio
            ));
        }
        if self.max_input_len == 0 || self.max_target_len == 0 {
            return bad("--max-input-len and --max-target-len must be at least 1".into());
        }
        self.lora.validate().map_err(Error::invalid)
    }

    fn warmup_steps(&self) -> usize {
        (self.warmup_ratio * self.steps as f64).ceil() as usize
    }
}

/// The initial `A` (`rank x in`, row-major) of the LoRA on `module`:
/// PEFT's Kaiming-uniform (bound `1/sqrt(in)`), from a generator seeded
/// with `init_seed ^ stable_hash(module)`.
pub fn lora_init_a(init_seed: u64, module: &str, rank: usize, inp: usize) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(init_seed ^ crate::data::stable_hash(module));
    let bound = 1.0 / (inp as f32).sqrt();
    (0..rank * inp)
        .map(|_| rng.random_range(-bound..bound))
        .collect()
}

/// Dropout masks drawn from a generator re-seeded at every micro-batch.
#[derive(Debug)]
struct DropoutState {
    training: bool,
    rng: rand::rngs::SmallRng,
}

/// Summed `(dL/dA, dL/dB)` of one trainable LoRA from the hand-written
/// backward pass, until the trainer takes them.
type GradSlot = Arc<Mutex<Option<(Tensor, Tensor)>>>;

/// The LoRA adapter used while training: trainable `A`, `B` and dropout on
/// the layer input (PEFT: `B(A(dropout(x))) * scale`).
#[derive(Debug)]
struct TrainableLora {
    a: Var,
    b: Var,
    scale: f64,
    dropout: f32,
    state: Arc<Mutex<DropoutState>>,
    grads: GradSlot,
}

/// `(dL/dx plus the gradient passed in, dL/dA, dL/dB)` from `dL/dy`.
type LoraGrads = candle_core::Result<(Option<Tensor>, Tensor, Tensor)>;

/// [`TrainableLora::forward_parts`]'s backward.
type LoraBackward = Box<dyn Fn(&Tensor, Option<Tensor>) -> LoraGrads + Send + Sync>;

impl TrainableLora {
    /// The seed of this call's dropout mask ([`ops::dropout`]), or `None`
    /// outside training or without dropout. Seeds come from the generator
    /// re-seeded at every micro-batch, in the order the layers run.
    fn draw_seed(&self) -> Option<u32> {
        if self.dropout <= 0.0 {
            return None;
        }
        let mut st = self.state.lock().expect("dropout state");
        st.training.then(|| st.rng.random::<u32>())
    }

    /// `z = A dropout(x)` for a detached `x` (the term is `scale * B z`),
    /// and the backward of the term, which sums the input's gradient into
    /// the one it is given (`None`: no input gradient wanted). The backward
    /// keeps `x` (alive anyway) and the rank-r projection, and recomputes
    /// the dropout mask from its seed ([`ops::lora_down`]), where a
    /// composition of candle ops would keep the mask, the dropped input and
    /// two full-width products for every adapted layer.
    fn forward_parts(&self, x: &Tensor) -> candle_core::Result<(Tensor, LoraBackward)> {
        let (seed, p, scale) = (self.draw_seed(), self.dropout, self.scale);
        let (a, b) = (self.a.as_tensor().detach(), self.b.as_tensor().detach());
        let z = ops::lora_down(x, &a, seed, p)?;
        let x = x.clone();
        let z_out = z.clone();
        let bwd = Box::new(move |g: &Tensor, dx: Option<Tensor>| -> LoraGrads {
            let r = a.dims2()?.0;
            let out = b.dims()[0];
            let rows = g.elem_count() / out;
            let g2 = g.reshape((rows, out))?;
            // dB = s g^T z, dz = s g B, then dA and dx from dz.
            let db = (g2.t()?.matmul(&z.reshape((rows, r))?)? * scale)?;
            let dz = (g2.matmul(&b)? * scale)?;
            let (da, dx) = ops::lora_down_backward(&x, &a, &dz, seed, p, dx)?;
            Ok((dx, da, db))
        });
        Ok((z_out, bwd))
    }
}

impl LinearAdapter for TrainableLora {
    /// One graph node with the hand-written backward of
    /// [`TrainableLora::forward_parts`].
    fn delta(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (z, bwd) = self.forward_parts(&xs.detach())?;
        let ys = (matmul_t(&z, &self.b.as_tensor().detach())? * self.scale)?;
        let need_dx = xs.track_op();
        let shape = xs.shape().clone();
        crate::ops::attach_grad3((xs, self.a.as_tensor(), self.b.as_tensor()), ys, move |g| {
            let acc = if need_dx {
                Some(Tensor::zeros(&shape, g.dtype(), g.device())?)
            } else {
                None
            };
            let (dx, da, db) = bwd(g, acc)?;
            Ok((dx, Some(da), Some(db)))
        })
    }

    fn hand_grad(&self) -> Option<&dyn HandGrad> {
        Some(self)
    }
}

impl HandGrad for TrainableLora {
    /// The backward adds `dA`, `dB` to the adapter's gradient slot.
    fn forward_train(&self, xs: &Tensor) -> candle_core::Result<(AdapterTerm, AdapterBackward)> {
        let (z, bwd) = self.forward_parts(xs)?;
        let term = AdapterTerm::LowRank {
            z,
            b: self.b.as_tensor().detach(),
            scale: self.scale,
        };
        let slot = self.grads.clone();
        Ok((
            term,
            Box::new(move |g: &Tensor, dx: Tensor| {
                let (dx, da, db) = bwd(g, Some(dx))?;
                let mut s = slot
                    .lock()
                    .map_err(|_| candle_core::Error::Msg("LoRA gradient slot poisoned".into()))?;
                *s = Some(match s.take() {
                    Some((a0, b0)) => ((a0 + da)?, (b0 + db)?),
                    None => (da, db),
                });
                dx.ok_or_else(|| candle_core::Error::Msg("LoRA backward gave no dx".into()))
            }),
        ))
    }
}

/// One tokenised example: input ids then target ids.
#[derive(Debug, Clone)]
pub struct Tokenized {
    pub input: Vec<u32>,
    pub target: Vec<u32>,
}

/// Tokenises (source, target) as the scorer does (so training and
/// evaluation agree on token boundaries), appends end-of-sequence to the
/// target, truncates the input on the left and the target on the right.
pub fn tokenize_example(
    tok: &Tokenizer,
    ex: &Example,
    max_input_len: usize,
    max_target_len: usize,
) -> Result<Tokenized> {
    let sep = if ex.source.is_empty()
        || ex.source.ends_with(char::is_whitespace)
        || ex.target.starts_with(char::is_whitespace)
    {
        ""
    } else {
        " "
    };
    let (mut input, mut target) = encode_pair(tok, &ex.source, &format!("{sep}{}", ex.target))?;
    if let Some(&eos) = tok.eos_ids().first() {
        target.push(eos);
    }
    if input.len() > max_input_len {
        input.drain(..input.len() - max_input_len);
    }
    target.truncate(max_target_len);
    Ok(Tokenized { input, target })
}

/// A right-padded batch and where its target tokens are.
pub struct Batch {
    /// `(b_sz, seq_len)`
    ids: Tensor,
    /// Flat positions (`row * seq_len + pos`) whose output predicts a target token.
    positions: Tensor,
    /// The target token at each position.
    targets: Tensor,
    pub n_targets: usize,
    pub n_tokens: usize,
}

impl Batch {
    /// Right-pads `items` into one batch on `device`.
    pub fn new(items: &[&Tokenized], device: &Device) -> Result<Self> {
        make_batch(items, device)
    }
}

fn make_batch(items: &[&Tokenized], device: &Device) -> Result<Batch> {
    let seq_len = items
        .iter()
        .map(|t| t.input.len() + t.target.len() - 1)
        .max()
        .unwrap_or(1);
    let mut ids = Vec::with_capacity(items.len() * seq_len);
    let mut positions = Vec::new();
    let mut targets = Vec::new();
    let mut n_tokens = 0;
    for (row, t) in items.iter().enumerate() {
        let mut seq: Vec<u32> = t.input.iter().chain(t.target.iter()).copied().collect();
        seq.pop(); // the last target token is never an input
        n_tokens += seq.len();
        for (i, &tgt) in t.target.iter().enumerate() {
            positions.push((row * seq_len + t.input.len() - 1 + i) as u32);
            targets.push(tgt);
        }
        seq.resize(seq_len, 0);
        ids.extend(seq);
    }
    let n_targets = targets.len();
    Ok(Batch {
        ids: Tensor::from_vec(ids, (items.len(), seq_len), device)?,
        positions: Tensor::from_vec(positions, n_targets, device)?,
        targets: Tensor::from_vec(targets, n_targets, device)?,
        n_targets,
        n_tokens,
    })
}

/// Sum of target-token negative log-likelihoods of a batch (a scalar).
fn batch_nll_sum(model: &Llama, batch: &Batch) -> Result<Tensor> {
    let hidden = model.forward_hidden(&batch.ids, None)?;
    let (b, s, h) = hidden.dims3()?;
    let picked = hidden
        .reshape((b * s, h))?
        .index_select(&batch.positions, 0)?;
    let logits = model.logits(&picked)?.to_dtype(DType::F32)?;
    Ok(ops::cross_entropy_sum(&logits, &batch.targets)?)
}

/// One micro-batch through the model's hand-written training pass: the
/// summed target-token loss; the gradients of `loss * norm` are left in
/// the adapters' slots.
fn hand_pass(model: &Llama, batch: &Batch, norm: f64) -> Result<f64> {
    let (hidden, tape) = model.forward_train(&batch.ids)?;
    let (b, s, h) = hidden.dims3()?;
    let picked = hidden
        .reshape((b * s, h))?
        .index_select(&batch.positions, 0)?;
    drop(hidden);
    let head = model.lm_head();
    let (logits, head_bwd) = head.forward_train(&picked)?;
    let (nll, dlogits) =
        ops::cross_entropy_sum_and_grad(&logits.to_dtype(DType::F32)?, &batch.targets, norm)?;
    drop(logits);
    let d_picked = head.backward_train(&dlogits.to_dtype(picked.dtype())?, head_bwd, None)?;
    drop(dlogits);
    let d_hidden = Tensor::zeros((b * s, h), d_picked.dtype(), d_picked.device())?
        .index_add(&batch.positions, &d_picked, 0)?
        .reshape((b, s, h))?;
    model.backward_train(tape, &d_hidden)?;
    Ok(nll)
}

/// Mean target-token loss over `data` (no dropout, no gradient).
pub fn mean_loss(model: &Llama, data: &[Tokenized], batch_size: usize) -> Result<f64> {
    if data.is_empty() {
        return Err(Error::invalid("no examples to compute a loss on"));
    }
    let (mut total, mut count) = (0.0f64, 0usize);
    let refs: Vec<&Tokenized> = data.iter().collect();
    for chunk in refs.chunks(batch_size.max(1)) {
        let batch = make_batch(chunk, model.device())?;
        total += batch_nll_sum(model, &batch)?.detach().to_scalar::<f32>()? as f64;
        count += batch.n_targets;
    }
    Ok(total / count.max(1) as f64)
}

/// What a step reports to the caller (for progress bars and logs).
#[derive(Debug, Clone, Serialize)]
pub struct StepStats {
    pub step: usize,
    pub steps: usize,
    pub loss: f64,
    pub lr: f64,
    pub tokens_per_second: f64,
    pub val_loss: Option<f64>,
}

pub trait TrainObserver {
    fn on_step(&mut self, stats: &StepStats);
    fn on_message(&mut self, _msg: &str) {}
    /// Checked after every step; `true` stops the run with
    /// [`Error::Interrupted`] (the last checkpoint stays for resuming).
    fn interrupted(&self) -> bool {
        false
    }
}

pub struct NoObserver;
impl TrainObserver for NoObserver {
    fn on_step(&mut self, _: &StepStats) {}
}

/// What a finished run produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainReport {
    pub steps: usize,
    pub base_val_loss: Option<f64>,
    pub val_loss: Option<f64>,
    pub final_train_loss: f64,
    pub tokens_seen: u64,
    pub wall_time_s: f64,
    pub resumed_from_step: usize,
}

#[derive(Debug, Serialize, Deserialize)]
struct CheckpointMeta {
    step: usize,
    config: TrainConfig,
    modules: Vec<String>,
    tokens_seen: u64,
    wall_time_s: f64,
    base_val_loss: Option<f64>,
    last_loss: f64,
}

const CKPT_META: &str = "checkpoint.json";
const CKPT_TENSORS: &str = "checkpoint.safetensors";

/// LoRA parameters attached to a model for training, and their optimiser.
pub struct LoraTrainer {
    /// Wrapped module names, in model order.
    pub modules: Vec<String>,
    /// `[A_0, B_0, A_1, B_1, ...]`, matching `modules`.
    vars: Vec<Var>,
    /// Each module's gradient slot (the hand-written backward's output).
    slots: Vec<GradSlot>,
    opt: AdamW,
    dropout: Arc<Mutex<DropoutState>>,
}

impl LoraTrainer {
    /// Puts freshly initialised, trainable LoRAs on every linear layer
    /// `cfg.lora.target_modules` matches. PEFT's initialisation: `A`
    /// Kaiming-uniform (bound `1/sqrt(in)`), `B` zero, from `cfg.seed`.
    pub fn attach(model: &mut Llama, cfg: &TrainConfig) -> Result<Self> {
        let device = model.device().clone();
        let dtype = model.dtype();
        let init_seed = cfg.init_seed.unwrap_or(cfg.seed);
        let dropout = Arc::new(Mutex::new(DropoutState {
            training: false,
            rng: rand::rngs::SmallRng::seed_from_u64(0),
        }));
        let mut modules = Vec::new();
        let mut vars: Vec<Var> = Vec::new();
        let mut slots = Vec::new();
        for lin in model.linears_mut() {
            if !cfg.lora.target_modules.matches(lin.name()) {
                continue;
            }
            let (out, inp) = (lin.out_features(), lin.in_features());
            let a = lora_init_a(init_seed, lin.name(), cfg.lora.rank, inp);
            let a = Var::from_tensor(
                &Tensor::from_vec(a, (cfg.lora.rank, inp), &device)?.to_dtype(dtype)?,
            )?;
            let b = Var::from_tensor(&Tensor::zeros((out, cfg.lora.rank), dtype, &device)?)?;
            let slot = GradSlot::default();
            lin.set_adapter(Some(Arc::new(TrainableLora {
                a: a.clone(),
                b: b.clone(),
                scale: cfg.lora.scale(),
                dropout: cfg.lora.dropout as f32,
                state: dropout.clone(),
                grads: slot.clone(),
            })));
            slots.push(slot);
            modules.push(lin.name().to_string());
            vars.push(a);
            vars.push(b);
        }
        if modules.is_empty() {
            return Err(Error::invalid(format!(
                "target_modules {:?} matches no linear layer of this model",
                cfg.lora.target_modules
            )));
        }
        let opt = AdamW::new(vars.clone(), cfg.weight_decay)?;
        Ok(Self {
            modules,
            vars,
            slots,
            opt,
            dropout,
        })
    }

    /// One optimiser step over `micro` batches (each with its dropout
    /// seed): gradients are summed over micro-batches and normalised by the
    /// step's number of target tokens. Returns the mean target-token loss.
    pub fn step(&mut self, model: &Llama, micro: &[(Batch, u64)], lr: f64) -> Result<f64> {
        let hand = model.hand_backward_ready();
        let (loss, grads) = self.gradients(model, micro, hand)?;
        self.opt.step(&grads, lr)?;
        Ok(loss)
    }

    /// The mean target-token loss over `micro` and the gradients of
    /// `vars`, either by the model's hand-written backward
    /// ([`Llama::forward_train`], what [`LoraTrainer::step`] uses whenever
    /// it applies) or by candle's autograd (the reference).
    fn gradients(
        &mut self,
        model: &Llama,
        micro: &[(Batch, u64)],
        hand: bool,
    ) -> Result<(f64, Vec<Option<Tensor>>)> {
        let target_count: usize = micro.iter().map(|(b, _)| b.n_targets).sum();
        let norm = 1.0 / target_count.max(1) as f64;
        let mut grads: Vec<Option<Tensor>> = vec![None; self.vars.len()];
        let mut add = |i: usize, g: Tensor| -> Result<()> {
            grads[i] = Some(match grads[i].take() {
                Some(acc) => (acc + g)?,
                None => g,
            });
            Ok(())
        };
        let mut loss_sum = 0.0;
        for (batch, seed) in micro {
            {
                let mut st = self.dropout.lock().expect("dropout state");
                st.training = true;
                st.rng = rand::rngs::SmallRng::seed_from_u64(*seed);
            }
            for slot in &self.slots {
                slot.lock().expect("gradient slot").take();
            }
            let pass = if hand {
                hand_pass(model, batch, norm).map(|loss| (loss, None))
            } else {
                batch_nll_sum(model, batch).and_then(|nll| {
                    let loss = nll.to_scalar::<f32>()? as f64;
                    Ok((loss, Some((nll * norm)?.backward()?)))
                })
            };
            self.dropout.lock().expect("dropout state").training = false;
            let (loss, store) = pass?;
            loss_sum += loss;
            if let Some(g) = store {
                for (i, v) in self.vars.iter().enumerate() {
                    if let Some(gi) = g.get(v.as_tensor()) {
                        add(i, gi.clone())?;
                    }
                }
            } else {
                for (m, slot) in self.slots.iter().enumerate() {
                    if let Some((da, db)) = slot.lock().expect("gradient slot").take() {
                        add(2 * m, da)?;
                        add(2 * m + 1, db)?;
                    }
                }
            }
        }
        Ok((loss_sum * norm, grads))
    }

    /// The current LoRA factors, detached from the graph.
    pub fn weights(&self) -> LoraWeights {
        self.modules
            .iter()
            .enumerate()
            .map(|(i, m)| {
                (
                    m.clone(),
                    (
                        self.vars[2 * i].as_tensor().detach(),
                        self.vars[2 * i + 1].as_tensor().detach(),
                    ),
                )
            })
            .collect()
    }
}

/// Trains one LoRA on `train` and returns its weights.
///
/// The model's adapters are replaced during training and removed at the
/// end. With `checkpoint_dir`, a checkpoint is written there every
/// `checkpoint_every` steps and picked up by the next call with the same
/// configuration and data.
pub fn train_lora(
    model: &mut Llama,
    tok: &Tokenizer,
    train: &[Example],
    val: &[Example],
    cfg: &TrainConfig,
    checkpoint_dir: Option<&Path>,
    observer: &mut dyn TrainObserver,
) -> Result<(LoraWeights, TrainReport)> {
    cfg.validate()?;
    if train.is_empty() {
        return Err(Error::invalid("no training examples"));
    }
    let tok_all = |exs: &[Example]| -> Result<Vec<Tokenized>> {
        exs.iter()
            .map(|e| tokenize_example(tok, e, cfg.max_input_len, cfg.max_target_len))
            .collect()
    };
    let train_t = tok_all(train)?;
    let val_t = tok_all(&val[..val.len().min(cfg.max_eval_examples)])?;
    let max_pos = model.config().max_position_embeddings;
    if let Some(t) = train_t
        .iter()
        .find(|t| t.input.len() + t.target.len() > max_pos)
    {
        return Err(Error::ContextTooLong {
            tokens: t.input.len() + t.target.len(),
            max: max_pos,
        });
    }

    let mut trainer = LoraTrainer::attach(model, cfg)?;

    let mut start_step = 0;
    let mut tokens_seen = 0u64;
    let mut prior_wall = 0.0;
    let mut base_val_loss = None;
    let mut last_loss = f64::NAN;
    if let Some(dir) = checkpoint_dir {
        if let Some(meta) = load_checkpoint(dir, cfg, &trainer.modules, &mut trainer.opt)? {
            observer.on_message(&format!("resuming from step {}", meta.step));
            start_step = meta.step;
            tokens_seen = meta.tokens_seen;
            prior_wall = meta.wall_time_s;
            base_val_loss = meta.base_val_loss;
            last_loss = meta.last_loss;
        }
    }
    if start_step == 0 && !val_t.is_empty() {
        base_val_loss = Some(mean_loss(model, &val_t, cfg.batch_size)?);
    }

    let started = Instant::now();
    let device = model.device().clone();
    let warmup = cfg.warmup_steps();
    let n = train_t.len();
    let mut perm_cache: HashMap<u64, Vec<usize>> = HashMap::new();
    for step in start_step..cfg.steps {
        let t0 = Instant::now();
        let lr = linear_schedule(cfg.lr, step, warmup, cfg.steps);
        let mut micro: Vec<(Batch, u64)> = Vec::with_capacity(cfg.grad_accum);
        for k in 0..cfg.grad_accum {
            let items: Vec<&Tokenized> = (0..cfg.batch_size)
                .map(|j| {
                    let c = ((step * cfg.grad_accum + k) * cfg.batch_size + j) as u64;
                    let epoch = c / n as u64;
                    let perm = perm_cache.entry(epoch).or_insert_with(|| {
                        let mut p: Vec<usize> = (0..n).collect();
                        p.shuffle(&mut rand::rngs::StdRng::seed_from_u64(
                            cfg.seed.wrapping_mul(0x9E37_79B9).wrapping_add(epoch),
                        ));
                        p
                    });
                    &train_t[perm[(c % n as u64) as usize]]
                })
                .collect();
            let batch = make_batch(&items, &device)?;
            let mseed =
                cfg.seed ^ ((step * cfg.grad_accum + k) as u64).wrapping_mul(0x2545_F491_4F6C_DD1D);
            micro.push((batch, mseed));
        }
        perm_cache
            .retain(|&e, _| e + 1 >= ((step + 1) * cfg.grad_accum * cfg.batch_size / n) as u64);
        let step_tokens: usize = micro.iter().map(|(b, _)| b.n_tokens).sum();
        let loss = trainer.step(model, &micro, lr)?;
        last_loss = loss;
        if !last_loss.is_finite() {
            detach_adapters(model);
            return Err(Error::invalid(format!(
                "the training loss became {last_loss} at step {}; lower --lr",
                step + 1
            )));
        }
        tokens_seen += step_tokens as u64;
        let done = step + 1;
        let val_loss = if cfg.eval_every > 0
            && done % cfg.eval_every == 0
            && done < cfg.steps
            && !val_t.is_empty()
        {
            Some(mean_loss(model, &val_t, cfg.batch_size)?)
        } else {
            None
        };
        observer.on_step(&StepStats {
            step: done,
            steps: cfg.steps,
            loss: last_loss,
            lr,
            tokens_per_second: step_tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9),
            val_loss,
        });
        if let Some(dir) = checkpoint_dir {
            if cfg.checkpoint_every > 0 && done % cfg.checkpoint_every == 0 && done < cfg.steps {
                save_checkpoint(
                    dir,
                    &CheckpointMeta {
                        step: done,
                        config: cfg.clone(),
                        modules: trainer.modules.clone(),
                        tokens_seen,
                        wall_time_s: prior_wall + started.elapsed().as_secs_f64(),
                        base_val_loss,
                        last_loss,
                    },
                    &trainer.opt,
                )?;
            }
        }
        if observer.interrupted() && done < cfg.steps {
            detach_adapters(model);
            return Err(Error::Interrupted { step: done });
        }
    }
    let val_loss = if val_t.is_empty() {
        None
    } else {
        Some(mean_loss(model, &val_t, cfg.batch_size)?)
    };
    let weights = trainer.weights();
    detach_adapters(model);
    let report = TrainReport {
        steps: cfg.steps,
        base_val_loss,
        val_loss,
        final_train_loss: last_loss,
        tokens_seen,
        wall_time_s: prior_wall + started.elapsed().as_secs_f64(),
        resumed_from_step: start_step,
    };
    Ok((weights, report))
}

fn detach_adapters(model: &mut Llama) {
    for lin in model.linears_mut() {
        lin.set_adapter(None);
    }
}

fn save_checkpoint(dir: &Path, meta: &CheckpointMeta, opt: &AdamW) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut tensors = HashMap::new();
    for (i, v) in opt.vars.iter().enumerate() {
        tensors.insert(format!("p.{i}"), v.as_tensor().to_device(&Device::Cpu)?);
        tensors.insert(format!("m.{i}"), opt.m[i].to_device(&Device::Cpu)?);
        tensors.insert(format!("v.{i}"), opt.v[i].to_device(&Device::Cpu)?);
    }
    // Tensors first, metadata last: a checkpoint is only trusted when its
    // metadata names the step, and each file is replaced atomically.
    let tmp = dir.join(format!("{CKPT_TENSORS}.tmp"));
    candle_core::safetensors::save(&tensors, &tmp).map_err(|e| Error::Safetensors {
        path: tmp.clone(),
        msg: candle_msg(e),
    })?;
    std::fs::rename(&tmp, dir.join(CKPT_TENSORS)).map_err(|e| Error::io(dir, e))?;
    let tmp = dir.join(format!("{CKPT_META}.tmp"));
    let mut meta_json = serde_json::to_value(meta).expect("json");
    meta_json["adam_t"] = serde_json::json!(opt.t);
    std::fs::write(
        &tmp,
        serde_json::to_string_pretty(&meta_json).expect("json"),
    )
    .map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, dir.join(CKPT_META)).map_err(|e| Error::io(dir, e))?;
    Ok(())
}

fn load_checkpoint(
    dir: &Path,
    cfg: &TrainConfig,
    modules: &[String],
    opt: &mut AdamW,
) -> Result<Option<CheckpointMeta>> {
    let meta_path = dir.join(CKPT_META);
    if !meta_path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&meta_path).map_err(|e| Error::io(&meta_path, e))?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Json {
        path: meta_path.clone(),
        source: e,
    })?;
    let meta: CheckpointMeta = serde_json::from_value(value.clone()).map_err(|e| Error::Json {
        path: meta_path.clone(),
        source: e,
    })?;
    if meta.config != *cfg || meta.modules != modules {
        tracing::warn!(
            "{}: checkpoint was made with another configuration; starting over",
            meta_path.display()
        );
        return Ok(None);
    }
    let tensors = load_safetensors(&dir.join(CKPT_TENSORS), &Device::Cpu)?;
    let get = |k: String| -> Result<Tensor> {
        tensors
            .get(&k)
            .cloned()
            .ok_or_else(|| Error::MissingWeight {
                path: dir.join(CKPT_TENSORS),
                name: k,
            })
    };
    for i in 0..opt.vars.len() {
        let dev = opt.vars[i].device().clone();
        let dt = opt.vars[i].dtype();
        opt.vars[i].set(&get(format!("p.{i}"))?.to_device(&dev)?.to_dtype(dt)?)?;
        opt.m[i] = get(format!("m.{i}"))?.to_device(&dev)?;
        opt.v[i] = get(format!("v.{i}"))?.to_device(&dev)?;
    }
    opt.t = value["adam_t"].as_u64().unwrap_or(meta.step as u64) as usize;
    Ok(Some(meta))
}

/// Builds an [`Expert`] from trained weights.
pub fn make_expert(
    name: &str,
    tasks: Vec<String>,
    weights: LoraWeights,
    cfg: &TrainConfig,
    report: &TrainReport,
    base: crate::expert::BaseModelId,
) -> Expert {
    let mut metrics = BTreeMap::new();
    if let Some(v) = report.val_loss {
        metrics.insert("val_loss".to_string(), v);
    }
    if let Some(v) = report.base_val_loss {
        metrics.insert("base_val_loss".to_string(), v);
    }
    metrics.insert("final_train_loss".into(), report.final_train_loss);
    metrics.insert("tokens_seen".into(), report.tokens_seen as f64);
    metrics.insert("wall_time_s".into(), report.wall_time_s);
    let mut config = cfg.lora.clone();
    config.base_model_name_or_path = Some(base.id.clone());
    Expert {
        name: name.to_string(),
        config,
        weights,
        info: Some(crate::expert::ExpertInfo {
            name: name.to_string(),
            tasks,
            base_model: base,
            training: serde_json::to_value(cfg).expect("json"),
            metrics,
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }),
    }
}

#[cfg(test)]
mod tests;
