//! The model thread: a continuous-batching scheduler. It owns the loaded
//! model and the libraries, admits queued jobs into the running batch as
//! KV-cache budget and batch room allow, and runs one packed forward pass
//! per step ([`quiver_core::models::Llama::forward_packed`]): every
//! decoding sequence adds its one new token, prompts are prefilled in
//! chunks with what is left of the step's token budget (so a long prompt
//! does not stall the others), and sequences leave the batch the moment
//! they finish or their client goes away.
//!
//! Each sequence has its own target (base, one expert, or a route over a
//! library). A target's adapters are built once through the core's one
//! door (`routing::install_route`) and kept; in a batch, each layer
//! applies every sequence's adapter to that sequence's rows only
//! ([`quiver_core::batch`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use quiver_core::batch::{adapters_of, install_slots, AdapterSet, RowLayout};
use quiver_core::generate::{Sampler, SamplingParams, StopReason};
use quiver_core::library::ExpertLibrary;
use quiver_core::models::{KvCache, PackedSeq};
use quiver_core::routing::{install_route, RouteObserver, RouteSpec};
use quiver_core::LoadedModel;
use tokio::sync::mpsc::UnboundedSender;

use crate::explain::{ExplainMode, Recorder};
use crate::metrics::Metrics;

/// Which library and route a job runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// Index into the server's libraries (`None`: the base model).
    pub library: Option<usize>,
    pub spec: RouteSpec,
    /// The library's listing this target was resolved against: an expert
    /// imported since gives a new version, so routes over the library are
    /// built again rather than served from the old set.
    pub version: u64,
}

/// One generation.
#[derive(Debug)]
pub struct Job {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub stop: Vec<String>,
    pub target: Target,
    /// `quiver_explain`: per-token expert weights (per-token routes only).
    pub explain: Option<ExplainMode>,
    /// `logprobs`: `Some(n)` sends each generated token's log-probability
    /// and the `n` most likely tokens'.
    pub logprobs: Option<usize>,
    /// Generate past the end-of-sequence token.
    pub ignore_eos: bool,
    /// `logit_bias`: added to these tokens' logits before sampling.
    pub logit_bias: Vec<(u32, f32)>,
    /// Subtracted from a generated token's logit: once, and per time.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub events: UnboundedSender<Event>,
    /// When the job was submitted (latency and time-to-first-token metrics).
    pub submitted: Instant,
}

/// A generated token's log-probability and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
    pub top: Vec<(String, Vec<u8>, f32)>,
}

/// What a job sends back, in order: text pieces, then one `Done` or `Error`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Text(String),
    /// The experts behind the next generated token (`quiver_explain`),
    /// sent before that token's text.
    Explain(serde_json::Value),
    /// The next generated token's log-probability (`logprobs`).
    Logprob(TokenLogprob),
    Done {
        reason: StopReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    /// The job failed: `server` when the fault is the server's or its
    /// library's (500), not the request's (400).
    Error {
        message: String,
        server: bool,
    },
}

/// The scheduler's limits.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Sequences in one forward pass at most.
    pub max_batch: usize,
    /// New tokens in one forward pass at most (decoding tokens first, then
    /// prompt chunks).
    pub max_batch_tokens: usize,
    /// KV-cache memory for all running sequences, in bytes. A job reserves
    /// room for its prompt and `max_tokens` when it is admitted and waits
    /// until that room is free.
    pub kv_budget_bytes: usize,
    /// Built routes kept for reuse (least recently used dropped first).
    pub route_cache: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch: 16,
            max_batch_tokens: 64,
            kv_budget_bytes: 1 << 30,
            route_cache: 16,
        }
    }
}

/// Jobs submitted and not yet admitted into the batch, shared with the
/// HTTP side (its bound on the queue).
#[derive(Debug, Default)]
pub struct Queue {
    pub waiting: AtomicUsize,
}

/// The model thread's handle: where jobs go.
pub struct Engine {
    pub jobs: mpsc::Sender<Job>,
    pub queue: Arc<Queue>,
}

/// Starts the model thread.
pub fn start(
    lm: LoadedModel,
    libraries: Vec<Arc<ExpertLibrary>>,
    metrics: Arc<Metrics>,
    cfg: EngineConfig,
) -> Engine {
    let (tx, rx) = mpsc::channel::<Job>();
    let queue = Arc::new(Queue::default());
    let q = queue.clone();
    std::thread::Builder::new()
        .name("quiver-model".into())
        .spawn(move || Scheduler::new(lm, libraries, metrics, cfg, q).run(rx))
        .expect("the model thread starts");
    Engine { jobs: tx, queue }
}

/// Bytes of keys and values one position of one sequence holds.
fn kv_bytes_per_token(lm: &LoadedModel) -> usize {
    let c = lm.model.config();
    c.num_hidden_layers * 2 * c.num_kv_heads() * c.head_dim() * lm.model.dtype().size_in_bytes()
}

/// Positions a sequence's cache may grow to: its buffers double from 64
/// ([`KvCache`]), so room for `n` positions is the next power of two.
fn reserved_positions(n: usize) -> usize {
    n.next_power_of_two().max(64)
}

/// A sequence in the batch.
struct Seq {
    job: Job,
    slot: usize,
    cache: KvCache,
    /// Prompt tokens already in the cache.
    fed: usize,
    /// The token sampled last, to be fed at the next step.
    next: Option<u32>,
    out: Vec<u32>,
    sampler: Sampler,
    text: TextStream,
    reserved: usize,
    done: bool,
}

/// A built target: its adapters on every layer.
struct Built {
    target: Target,
    adapters: AdapterSet,
    last_used: u64,
}

struct Scheduler {
    lm: LoadedModel,
    libraries: Vec<Arc<ExpertLibrary>>,
    metrics: Arc<Metrics>,
    cfg: EngineConfig,
    queue: Arc<Queue>,
    layout: Arc<RowLayout>,
    recorder: Arc<Recorder>,
    built: Vec<Built>,
    /// The slots now installed on the model (indices into `built`).
    installed: Option<Vec<usize>>,
    waiting: VecDeque<Job>,
    running: Vec<Seq>,
    reserved: usize,
    clock: u64,
    max_context: usize,
    /// KV-cache bytes per position of one sequence.
    kv_per_token: usize,
}

impl Scheduler {
    fn new(
        lm: LoadedModel,
        libraries: Vec<Arc<ExpertLibrary>>,
        metrics: Arc<Metrics>,
        cfg: EngineConfig,
        queue: Arc<Queue>,
    ) -> Self {
        let layout = RowLayout::new();
        let recorder = Arc::new(Recorder::new(metrics.clone(), layout.clone()));
        let max_context = lm.model.config().max_position_embeddings;
        let kv_per_token = kv_bytes_per_token(&lm);
        Self {
            lm,
            libraries,
            metrics,
            cfg,
            queue,
            layout,
            recorder,
            built: Vec::new(),
            installed: None,
            waiting: VecDeque::new(),
            running: Vec::new(),
            reserved: 0,
            clock: 0,
            max_context,
            kv_per_token,
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Job>) {
        loop {
            // Idle: wait for work; busy: take whatever arrived.
            if self.running.is_empty() && self.waiting.is_empty() {
                match rx.recv() {
                    Ok(job) => self.waiting.push_back(job),
                    Err(_) => return, // the server is gone
                }
            }
            while let Ok(job) = rx.try_recv() {
                self.waiting.push_back(job);
            }
            self.admit();
            if self.running.is_empty() {
                continue;
            }
            // A failed pass (an error, or a panic in a kernel) fails the
            // sequences in it, never the server.
            let failure =
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step())) {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(e.to_string()),
                    Err(panic) => {
                        // The adapters on the model may be half installed.
                        self.installed = None;
                        Some(format!(
                            "internal error in the forward pass: {}",
                            panic_message(&panic)
                        ))
                    }
                };
            if let Some(message) = failure {
                tracing::warn!("forward pass failed: {message}");
                for s in &mut self.running {
                    let _ = s.job.events.send(Event::Error {
                        message: message.clone(),
                        server: true,
                    });
                    s.done = true;
                }
            }
            self.retire();
        }
    }

    /// Moves waiting jobs into the batch while there is room in it and in
    /// the KV budget, in arrival order.
    fn admit(&mut self) {
        // Clients that left while waiting free their place in the queue now.
        let (queue, metrics) = (&self.queue, &self.metrics);
        self.waiting.retain(|j| {
            let gone = j.events.is_closed();
            if gone {
                queue.waiting.fetch_sub(1, Ordering::Relaxed);
                metrics.job_finished(j.submitted.elapsed().as_secs_f64(), 0, 0);
            }
            !gone
        });
        while self.running.len() < self.cfg.max_batch {
            let Some(job) = self.waiting.front() else {
                break;
            };
            let want = (job.prompt.len() + job.params.max_tokens).min(self.max_context);
            let bytes = reserved_positions(want) * self.kv_per_token;
            if bytes > self.cfg.kv_budget_bytes {
                let job = self.waiting.pop_front().expect("front");
                self.queue.waiting.fetch_sub(1, Ordering::Relaxed);
                let msg = format!(
                    "this request needs {} MiB of KV cache ({want} positions) but the server's budget is {} MiB (--kv-cache-mb); shorten the prompt or max_tokens",
                    bytes.div_ceil(1 << 20),
                    self.cfg.kv_budget_bytes >> 20
                );
                self.fail(job, msg, false);
                continue;
            }
            if self.reserved + bytes > self.cfg.kv_budget_bytes {
                break; // wait for a sequence to finish
            }
            let job = self.waiting.pop_front().expect("front");
            self.queue.waiting.fetch_sub(1, Ordering::Relaxed);
            let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.slot_for(&job.target)
            }))
            .unwrap_or_else(|p| {
                self.installed = None;
                Err(quiver_core::Error::Library(format!(
                    "internal error while building the route: {}",
                    panic_message(&p)
                )))
            });
            let slot = match built {
                Ok(s) => s,
                Err(e) => {
                    // A bad setting (top_k past the library's size, ...) is
                    // the request's fault; an unreadable or damaged expert
                    // is the library's.
                    let server = !matches!(e, quiver_core::Error::InvalidArgument(_));
                    self.fail(job, e.to_string(), server);
                    continue;
                }
            };
            self.reserved += bytes;
            let sampler = Sampler::new(job.params.clone());
            self.running.push(Seq {
                cache: self.lm.model.new_cache(),
                fed: 0,
                next: None,
                out: Vec::new(),
                sampler,
                text: TextStream::default(),
                reserved: bytes,
                done: false,
                slot,
                job,
            });
        }
        self.metrics.set_running(self.running.len());
    }

    fn fail(&self, job: Job, message: String, server: bool) {
        let _ = job.events.send(Event::Error { message, server });
        self.metrics
            .job_finished(job.submitted.elapsed().as_secs_f64(), 0, 0);
    }

    /// The built target's index, building it (and dropping the least
    /// recently used one past the cache's size) when new.
    fn slot_for(&mut self, target: &Target) -> quiver_core::Result<usize> {
        self.clock += 1;
        if let Some(i) = self.built.iter().position(|b| &b.target == target) {
            self.built[i].last_used = self.clock;
            return Ok(i);
        }
        // Building puts the route on the model: the batch's slots are
        // installed again at the next step.
        self.installed = None;
        let lib = target.library.map(|i| &*self.libraries[i]);
        let observer = target
            .spec
            .route
            .selector_kind()
            .map(|_| self.recorder.clone() as Arc<dyn RouteObserver>);
        let session = install_route(&mut self.lm, lib, &target.spec, observer)?;
        tracing::info!("built route: {}", session.installed.description);
        let adapters = adapters_of(&self.lm.model);
        let in_use: Vec<usize> = self.running.iter().map(|s| s.slot).collect();
        if self.built.len() >= self.cfg.route_cache.max(1) {
            if let Some(evict) = (0..self.built.len())
                .filter(|i| !in_use.contains(i))
                .min_by_key(|&i| self.built[i].last_used)
            {
                self.built[evict] = Built {
                    target: target.clone(),
                    adapters,
                    last_used: self.clock,
                };
                return Ok(evict);
            }
        }
        self.built.push(Built {
            target: target.clone(),
            adapters,
            last_used: self.clock,
        });
        Ok(self.built.len() - 1)
    }

    /// One packed forward pass over the batch.
    fn step(&mut self) -> quiver_core::Result<()> {
        // Decoding sequences first (one token each), then prompt chunks
        // from what is left of the token budget.
        let mut budget = self.cfg.max_batch_tokens.max(1);
        let mut take: Vec<usize> = vec![0; self.running.len()];
        for (i, s) in self.running.iter().enumerate() {
            if s.next.is_some() {
                take[i] = 1;
                budget = budget.saturating_sub(1);
            }
        }
        for (i, s) in self.running.iter().enumerate() {
            if s.next.is_none() && budget > 0 {
                let n = (s.job.prompt.len() - s.fed).min(budget);
                take[i] = n;
                budget -= n;
            }
        }
        if take.iter().all(|&n| n == 0) {
            // Only prompts, and a zero budget left: give the first its chunk.
            take[0] = (self.running[0].job.prompt.len() - self.running[0].fed)
                .min(self.cfg.max_batch_tokens.max(1));
        }
        let slots: Vec<usize> = {
            let mut v: Vec<usize> = self.running.iter().map(|s| s.slot).collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        if self.installed.as_ref() != Some(&slots) {
            let sets: Vec<&AdapterSet> = slots.iter().map(|&i| &self.built[i].adapters).collect();
            install_slots(&mut self.lm.model, &self.layout, &sets);
            self.installed = Some(slots.clone());
        }
        // Grouped by slot: each slot's adapters run once over its rows.
        let mut members: Vec<usize> = (0..self.running.len()).filter(|&i| take[i] > 0).collect();
        members.sort_by_key(|&i| self.running[i].slot);
        let inputs: Vec<Vec<u32>> = members
            .iter()
            .map(|&i| {
                let s = &self.running[i];
                match s.next {
                    Some(t) => vec![t],
                    None => s.job.prompt[s.fed..s.fed + take[i]].to_vec(),
                }
            })
            .collect();
        self.layout.set(
            members
                .iter()
                .zip(&inputs)
                .map(|(&i, t)| {
                    let slot = self.running[i].slot;
                    (t.len(), slots.binary_search(&slot).expect("installed"))
                })
                .collect(),
        );
        // Explanations: of the sequences whose next token this pass gives.
        let gives_token: Vec<bool> = members
            .iter()
            .map(|&i| {
                let s = &self.running[i];
                s.next.is_some() || s.fed + take[i] == s.job.prompt.len()
            })
            .collect();
        self.recorder.begin(
            members
                .iter()
                .zip(&gives_token)
                .map(|(&i, &g)| self.running[i].job.explain.filter(|_| g).is_some())
                .collect(),
        );
        self.metrics
            .batch(members.len(), inputs.iter().map(Vec::len).sum());
        let logits = {
            let mut chosen: Vec<Option<&mut Seq>> = self.running.iter_mut().map(Some).collect();
            let mut packed: Vec<PackedSeq<'_>> = Vec::with_capacity(members.len());
            for (&i, t) in members.iter().zip(&inputs) {
                let s = chosen[i].take().expect("each member once");
                packed.push(PackedSeq {
                    tokens: t,
                    cache: &mut s.cache,
                });
            }
            self.lm.model.forward_packed(&mut packed)?
        };
        let logits = logits.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
        for (row, (&i, &gives)) in members.iter().zip(&gives_token).enumerate() {
            let explain = self.recorder.take(row, self.running[i].job.explain);
            let s = &mut self.running[i];
            if s.next.take().is_none() {
                s.fed += take[i];
            }
            if !gives {
                continue;
            }
            let tok = &self.lm.tokenizer;
            if let Err(e) = emit(
                s,
                &logits[row],
                explain,
                tok,
                &self.metrics,
                self.max_context,
            ) {
                let _ = s.job.events.send(Event::Error {
                    message: e.to_string(),
                    server: true,
                });
                s.done = true;
            }
        }
        Ok(())
    }

    /// Drops finished sequences (and those whose client went away) from
    /// the batch and frees their KV budget.
    fn retire(&mut self) {
        let mut keep = Vec::with_capacity(self.running.len());
        for s in std::mem::take(&mut self.running) {
            if s.done || s.job.events.is_closed() {
                self.reserved -= s.reserved;
                self.metrics.job_finished(
                    s.job.submitted.elapsed().as_secs_f64(),
                    s.job.prompt.len(),
                    s.out.len(),
                );
            } else {
                keep.push(s);
            }
        }
        self.running = keep;
        self.metrics.set_running(self.running.len());
    }
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}

/// Samples a sequence's next token from its logits and sends what the
/// client sees; marks the sequence done when it ends.
fn emit(
    s: &mut Seq,
    logits: &[f32],
    explain: Option<serde_json::Value>,
    tok: &quiver_core::tokenizer::Tokenizer,
    metrics: &Metrics,
    max_context: usize,
) -> quiver_core::Result<()> {
    let penalised = s.job.presence_penalty != 0.0 || s.job.frequency_penalty != 0.0;
    let next = if s.job.logit_bias.is_empty() && !penalised {
        s.sampler.sample_slice(logits)
    } else {
        let mut adjusted = logits.to_vec();
        for &(t, b) in &s.job.logit_bias {
            adjusted[t as usize] += b;
        }
        if penalised {
            let mut counts: std::collections::HashMap<u32, u32> = Default::default();
            for &t in &s.out {
                *counts.entry(t).or_default() += 1;
            }
            for (t, n) in counts {
                adjusted[t as usize] -= s.job.presence_penalty + s.job.frequency_penalty * n as f32;
            }
        }
        s.sampler.sample_slice(&adjusted)
    };
    let finish = |s: &mut Seq, reason: StopReason| -> quiver_core::Result<()> {
        if let Some(rest) = s.text.finish(tok)? {
            let _ = s.job.events.send(Event::Text(rest));
        }
        let _ = s.job.events.send(Event::Done {
            reason,
            prompt_tokens: s.job.prompt.len(),
            completion_tokens: s.out.len(),
        });
        s.done = true;
        Ok(())
    };
    if !s.job.ignore_eos && tok.eos_ids().contains(&next) {
        return finish(s, StopReason::Eos);
    }
    if s.out.is_empty() {
        metrics.first_token(s.job.submitted.elapsed().as_secs_f64());
    }
    s.out.push(next);
    if let Some(v) = explain {
        let _ = s.job.events.send(Event::Explain(v));
    }
    if let Some(n) = s.job.logprobs {
        let _ = s
            .job
            .events
            .send(Event::Logprob(token_logprob(logits, next, n, tok)?));
    }
    let (ready, stopped) = s.text.push(next, tok, &s.job.stop)?;
    if let Some(t) = ready {
        let _ = s.job.events.send(Event::Text(t));
    }
    if stopped {
        return finish(s, StopReason::Stopped);
    }
    if s.out.len() >= s.job.params.max_tokens {
        return finish(s, StopReason::MaxTokens);
    }
    if s.job.prompt.len() + s.out.len() >= max_context {
        return finish(s, StopReason::ContextFull);
    }
    s.next = Some(next);
    Ok(())
}

/// The chosen token's log-probability under the model (log-softmax of the
/// raw logits, before temperature and top-p) and the `n` most likely.
fn token_logprob(
    logits: &[f32],
    chosen: u32,
    n: usize,
    tok: &quiver_core::tokenizer::Tokenizer,
) -> quiver_core::Result<TokenLogprob> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();
    let piece = |id: u32| -> quiver_core::Result<(String, Vec<u8>)> {
        let t = tok.decode(&[id], false)?;
        Ok((t.clone(), t.into_bytes()))
    };
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    let n = n.min(order.len());
    if n > 0 {
        order.select_nth_unstable_by(n - 1, |&a, &b| {
            logits[b as usize].total_cmp(&logits[a as usize])
        });
        order.truncate(n);
        order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    } else {
        order.clear();
    }
    let (token, bytes) = piece(chosen)?;
    Ok(TokenLogprob {
        token,
        bytes,
        logprob: logits[chosen as usize] - lse,
        top: order
            .into_iter()
            .map(|id| {
                let (t, b) = piece(id)?;
                Ok((t, b, logits[id as usize] - lse))
            })
            .collect::<quiver_core::Result<_>>()?,
    })
}

/// A sequence's generated text as it goes out: whole characters only, and
/// a tail that could still grow into a stop sequence held back.
#[derive(Debug, Default)]
struct TextStream {
    ids: Vec<u32>,
    sent: usize,
    stopped: bool,
}

impl TextStream {
    /// Adds a token; returns the text ready to send and whether a stop
    /// sequence ended the generation (the text before it is sent, the
    /// stop sequence itself is not).
    fn push(
        &mut self,
        id: u32,
        tok: &quiver_core::tokenizer::Tokenizer,
        stop: &[String],
    ) -> quiver_core::Result<(Option<String>, bool)> {
        self.ids.push(id);
        // Decode the whole tail: byte-level tokens may split a character.
        let text = tok.decode(&self.ids, true)?;
        if text.ends_with('\u{FFFD}') {
            return Ok((None, false));
        }
        let mut end = text.len();
        if let Some(at) = stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            end = at;
            self.stopped = true;
        }
        let hold = if self.stopped {
            0
        } else {
            stop.iter()
                .map(|s| longest_prefix_suffix(&text[..end], s))
                .max()
                .unwrap_or(0)
        };
        let ready = floor_char_boundary(&text, end - hold);
        let piece = (ready > self.sent).then(|| text[self.sent..ready].to_string());
        self.sent = self.sent.max(ready);
        Ok((piece, self.stopped))
    }

    /// Whatever was held back for a stop sequence that never came.
    fn finish(
        &mut self,
        tok: &quiver_core::tokenizer::Tokenizer,
    ) -> quiver_core::Result<Option<String>> {
        if self.stopped {
            return Ok(None);
        }
        let text = tok.decode(&self.ids, true)?;
        let piece = (text.len() > self.sent).then(|| text[self.sent..].to_string());
        self.sent = text.len();
        Ok(piece)
    }
}

/// The length of the longest proper prefix of `stop` that `text` ends with.
fn longest_prefix_suffix(text: &str, stop: &str) -> usize {
    (1..stop.len())
        .rev()
        .filter(|&n| stop.is_char_boundary(n))
        .find(|&n| text.ends_with(&stop[..n]))
        .unwrap_or(0)
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_back_tail_is_the_longest_stop_prefix() {
        assert_eq!(longest_prefix_suffix("hello wo", "world"), 2);
        assert_eq!(longest_prefix_suffix("hello", "world"), 0);
        assert_eq!(longest_prefix_suffix("ab\n", "\n\n"), 1);
        assert_eq!(floor_char_boundary("aé", 2), 1);
    }

    #[test]
    fn reservations_round_up_like_the_cache_grows() {
        assert_eq!(reserved_positions(1), 64);
        assert_eq!(reserved_positions(64), 64);
        assert_eq!(reserved_positions(65), 128);
    }
}
