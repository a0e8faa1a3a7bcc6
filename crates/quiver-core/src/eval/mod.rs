//! Evaluation on held-out tasks (METHOD.md section 4).
//!
//! * **Multiple choice** by log-likelihood: each option is scored as the
//!   continuation of the example's source; the prediction is the option
//!   with the highest mean log-probability per option token
//!   (length-normalised, the paper's metric, `acc_norm` here) and, also
//!   reported, the highest total log-probability (`acc`). The source is
//!   run once and its KV cache reused for every option. Examples with a
//!   [`Example::scored_suffix`] (WinoGrande) are scored the partial way:
//!   the context is the source plus each option's head, and only the
//!   shared suffix is scored.
//! * **Generation**: greedy decoding until a newline or end of text, scored
//!   by exact match (after [`metrics::normalize_answer`]) and Rouge-L
//!   against the target. BIG-Bench-Hard tasks are evaluated this way.
//!
//! [`subsample`] picks `--limit` examples deterministically from a seed,
//! so two runs evaluate the same items.

pub mod metrics;
pub mod paired;
pub mod plot;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::data::{
    is_bbh, split_examples_with, stable_hash, DataSource, Example, Split, SplitFractions,
    DEFAULT_CAP, HELD_OUT_TASKS,
};
use crate::error::{Error, Result};
use crate::generate::argmax;
use crate::models::{KvCache, Llama};
use crate::ops;
use crate::score::encode_pair;
use crate::tokenizer::Tokenizer;

/// How a task is evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EvalMode {
    /// Multiple choice by log-likelihood.
    MultipleChoice,
    /// Greedy generation, exact match and Rouge-L.
    Generate,
}

impl EvalMode {
    /// The paper's choice for a task: generation for BIG-Bench-Hard and for
    /// tasks without options, multiple choice otherwise.
    pub fn for_task(task: &str, examples: &[Example]) -> EvalMode {
        if is_bbh(task) || !examples.iter().all(Example::is_multiple_choice) {
            EvalMode::Generate
        } else {
            EvalMode::MultipleChoice
        }
    }
}

/// Which part of a task to evaluate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvalSplit {
    /// One split: for olmo tasks the file of that split (`arc_easy` ->
    /// `arc_easy:validation`); for BIG-bench and JSONL tasks the part of
    /// [`split_examples`] (seed 0, the training default), so a task that
    /// was trained on is evaluated on examples its expert never saw.
    Split(Split),
    /// Every example of the task (BIG-bench and JSONL tasks).
    All,
}

impl std::str::FromStr for EvalSplit {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if s.eq_ignore_ascii_case("all") {
            Ok(EvalSplit::All)
        } else {
            s.parse::<Split>().map(EvalSplit::Split).map_err(|_| {
                Error::invalid(format!(
                    "unknown split `{s}`: expected validation, test, train or all"
                ))
            })
        }
    }
}

/// One task to evaluate, with every example of the chosen split.
#[derive(Debug, Clone)]
pub struct EvalTask {
    /// The task's full name in its source (`arc_easy:validation`).
    pub name: String,
    /// `olmo`, `bigbench` or the JSONL path.
    pub source: String,
    pub examples: Vec<Example>,
}

/// Names that stand for several tasks in [`resolve_tasks`].
pub const TASK_ALIASES: &[(&str, &str)] = &[
    ("held-out", "the paper's seven multiple-choice tasks (olmo)"),
    (
        "bbh",
        "every BIG-Bench-Hard task in the BIG-bench files (generation, exact match)",
    ),
];

/// Resolves `--tasks` names to tasks and loads them.
///
/// With `data` (a source spec: a JSONL file or directory, `olmo`, `evals`,
/// `olmo+evals`, `bigbench:DIR`) every name is a task of it, split as
/// training splits it. Otherwise a name is an olmo task when the olmo files
/// have it (`arc_easy` becomes `arc_easy:<split>`; a name with `:` is taken
/// as it is), else an evals task when the evals registry is fetched and has
/// it, else a BIG-bench task. `held-out` and `bbh` expand to task lists
/// ([`TASK_ALIASES`]). Olmo files are fetched assets under `home`.
pub fn resolve_tasks(
    names: &[String],
    split: EvalSplit,
    data: Option<&str>,
    home: &Path,
) -> Result<Vec<EvalTask>> {
    resolve_tasks_with(names, split, data, home, SplitFractions::default())
}

/// [`resolve_tasks`], with BIG-bench and JSONL tasks split by `fractions`
/// instead of 80/10/10 (olmo tasks keep their own split files).
pub fn resolve_tasks_with(
    names: &[String],
    split: EvalSplit,
    data: Option<&str>,
    home: &Path,
    fractions: SplitFractions,
) -> Result<Vec<EvalTask>> {
    if names.is_empty() {
        return Err(Error::invalid("no tasks given (--tasks)"));
    }
    if let Some(spec) = data {
        let src = DataSource::from_spec(spec, home)?;
        return names
            .iter()
            .map(|n| split_task(&src, n, split, fractions))
            .collect();
    }
    let mut expanded: Vec<String> = Vec::new();
    for n in names {
        match n.as_str() {
            "held-out" => expanded.extend(HELD_OUT_TASKS.iter().map(|s| s.to_string())),
            "bbh" => {
                let bb = DataSource::from_spec("bigbench", home)?;
                expanded.extend(
                    bb.list_tasks()?
                        .into_iter()
                        .map(|t| t.name)
                        .filter(|t| is_bbh(t)),
                );
            }
            _ => expanded.push(n.clone()),
        }
    }
    let mut olmo: Option<(DataSource, Vec<String>)> = None;
    let mut olmo_missing: Option<Error> = None;
    let mut bigbench: Option<DataSource> = None;
    let mut evals: Option<Option<(Vec<String>, DataSource)>> = None;
    let mut out = Vec::new();
    for n in &expanded {
        if olmo.is_none() && olmo_missing.is_none() {
            match DataSource::from_spec("olmo", home) {
                Ok(src) => {
                    let names = src.task_names()?;
                    olmo = Some((src, names));
                }
                Err(e) => olmo_missing = Some(e),
            }
        }
        if olmo.is_none() && (n.contains(':') || HELD_OUT_TASKS.contains(&n.as_str())) {
            return Err(olmo_missing.take().expect("olmo failed to open"));
        }
        if let Some((src, olmo_names)) = &olmo {
            let full = if n.contains(':') {
                Some(n.clone())
            } else {
                match split {
                    EvalSplit::Split(s) => {
                        let full = format!("{n}:{s}");
                        if olmo_names.contains(&full) {
                            Some(full)
                        } else if olmo_names.iter().any(|m| m.starts_with(&format!("{n}:"))) {
                            let have: Vec<&String> = olmo_names
                                .iter()
                                .filter(|m| {
                                    m.starts_with(&format!("{n}:")) && m.matches(':').count() == 1
                                })
                                .collect();
                            return Err(Error::invalid(format!(
                                "olmo task `{n}` has no {s} split (it has: {})",
                                have.iter()
                                    .map(|h| format!("`{h}`"))
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            )));
                        } else {
                            None
                        }
                    }
                    EvalSplit::All => {
                        if olmo_names.iter().any(|m| m.starts_with(&format!("{n}:"))) {
                            return Err(Error::invalid(format!(
                                "olmo task `{n}` comes in splits: name one with --split validation|test|train"
                            )));
                        }
                        None
                    }
                }
            };
            if let Some(full) = full.filter(|f| f.contains(':')) {
                out.push(EvalTask {
                    examples: src.load_task(&full)?,
                    name: full,
                    source: src.describe(),
                });
                continue;
            }
        }
        if evals.is_none() {
            evals = Some(
                DataSource::from_spec("evals", home)
                    .and_then(|s| Ok((s.task_names()?, s)))
                    .ok(),
            );
        }
        if let Some(Some((names, src))) = &evals {
            if names.contains(n) {
                out.push(split_task(src, n, split, fractions)?);
                continue;
            }
        }
        if bigbench.is_none() {
            bigbench = Some(DataSource::from_spec("bigbench", home)?);
        }
        let src = bigbench.as_ref().expect("set above");
        out.push(split_task(src, n, split, fractions)?);
    }
    Ok(out)
}

fn split_task(
    src: &DataSource,
    name: &str,
    split: EvalSplit,
    fractions: SplitFractions,
) -> Result<EvalTask> {
    let all = src.load_task(name)?;
    let examples = match split {
        EvalSplit::All => all,
        EvalSplit::Split(s) => split_examples_with(&all, name, 0, DEFAULT_CAP, s, fractions),
    };
    Ok(EvalTask {
        name: name.to_string(),
        source: src.describe(),
        examples,
    })
}

/// At most `limit` examples, picked by a seeded shuffle and kept in file
/// order: the same (examples, task, limit, seed) always gives the same items.
pub fn subsample(
    examples: &[Example],
    task: &str,
    limit: Option<usize>,
    seed: u64,
) -> Vec<Example> {
    match limit {
        Some(n) if n < examples.len() => {
            let mut idx: Vec<usize> = (0..examples.len()).collect();
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ stable_hash(task) ^ 0x6576_616c);
            idx.shuffle(&mut rng);
            idx.truncate(n);
            idx.sort_unstable();
            idx.into_iter().map(|i| examples[i].clone()).collect()
        }
        _ => examples.to_vec(),
    }
}

/// The (context ids, continuation ids) of each option of a multiple-choice
/// example.
pub fn option_pairs(tok: &Tokenizer, ex: &Example) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
    encode_texts(tok, &option_texts(ex)?)
}

fn encode_texts(tok: &Tokenizer, texts: &[(String, String)]) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
    texts.iter().map(|(c, x)| encode_pair(tok, c, x)).collect()
}

/// Each option's (context, scored continuation) as text; see
/// [`option_pairs`].
fn option_texts(ex: &Example) -> Result<Vec<(String, String)>> {
    let options = ex.options.as_ref().ok_or_else(|| {
        Error::invalid(format!("an example of task `{}` has no options", ex.task))
    })?;
    Ok(options
        .iter()
        .map(|o| match &ex.scored_suffix {
            Some(suffix) if o.ends_with(suffix.as_str()) && o.len() > suffix.len() => {
                let head = &o[..o.len() - suffix.len()];
                (
                    format!("{}{}", ex.source, ex.continuation(head)),
                    suffix.clone(),
                )
            }
            _ => (ex.source.clone(), ex.continuation(o)),
        })
        .collect())
}

/// Log-likelihoods of continuations of one shared context: the context runs
/// once, its KV cache is copied for the continuations, which run as one
/// batch. Only the positions that predict a continuation token go through
/// the output layer. A context too long for the model keeps its last
/// tokens (as lm-evaluation-harness does).
pub fn score_continuations(model: &Llama, context: &[u32], conts: &[Vec<u32>]) -> Result<Vec<f64>> {
    let job = (context.to_vec(), conts.to_vec());
    Ok(score_contexts(model, std::slice::from_ref(&job), 1)?.remove(0))
}

/// Context tokens (rows x padded length) [`evaluate_task`] scores in one
/// forward by default ([`EvalOptions::batch_tokens`]).
pub const CONTEXT_BATCH_TOKENS: usize = 4096;

/// [`score_continuations`] for many `(context, continuations)` groups:
/// contexts sorted by length run `batch_tokens` tokens at a time as one
/// right-padded batch (a causal model's positions never see the padding
/// after them), each row's last position gives its continuations' first
/// token, and each row's cache, cut to its own length, continues with its
/// continuations as in [`score_continuations`]. `batch_tokens <= 1` runs
/// one context at a time. The result is in the order of `jobs`.
pub fn score_contexts(
    model: &Llama,
    jobs: &[(Vec<u32>, Vec<Vec<u32>>)],
    batch_tokens: usize,
) -> Result<Vec<Vec<f64>>> {
    let max = model.config().max_position_embeddings;
    let mut contexts = Vec::with_capacity(jobs.len());
    for (context, conts) in jobs {
        if context.is_empty() || conts.is_empty() || conts.iter().any(Vec::is_empty) {
            return Err(Error::invalid(
                "every scored item needs a non-empty context and continuation",
            ));
        }
        let longest = conts.iter().map(Vec::len).max().unwrap_or(0);
        if longest >= max {
            return Err(Error::ContextTooLong {
                tokens: longest + 1,
                max,
            });
        }
        contexts.push(&context[context.len().saturating_sub(max - longest)..]);
    }
    let mut order: Vec<usize> = (0..jobs.len()).collect();
    order.sort_by_key(|&j| contexts[j].len());
    let device = model.device();
    let mut out = vec![Vec::new(); jobs.len()];
    let mut start = 0;
    while start < order.len() {
        // Ascending lengths: the batch's last context is its longest.
        let mut end = start + 1;
        while end < order.len() && (end - start + 1) * contexts[order[end]].len() <= batch_tokens {
            end += 1;
        }
        let batch = &order[start..end];
        let width = contexts[order[end - 1]].len();
        let mut ids = Vec::with_capacity(batch.len() * width);
        let mut last = Vec::with_capacity(batch.len());
        for (r, &j) in batch.iter().enumerate() {
            ids.extend_from_slice(contexts[j]);
            ids.resize((r + 1) * width, 0);
            last.push((r * width + contexts[j].len() - 1) as u32);
        }
        let mut cache = model.new_cache();
        let input = Tensor::from_vec(ids, (batch.len(), width), device)?;
        let hidden = model.forward_hidden(&input, Some(&mut cache))?;
        let d = hidden.dim(2)?;
        let last = hidden
            .reshape((batch.len() * width, d))?
            .index_select(&Tensor::new(last.as_slice(), device)?, 0)?;
        let first = ops::log_softmax_last_dim(&model.logits(&last)?.to_dtype(DType::F32)?)?
            .to_vec2::<f32>()?;
        for (r, &j) in batch.iter().enumerate() {
            let conts = &jobs[j].1;
            let mut scores: Vec<f64> = conts
                .iter()
                .map(|c| first[r][c[0] as usize] as f64)
                .collect();
            if conts.iter().any(|c| c.len() > 1) {
                let row = if batch.len() == 1 {
                    cache.clone()
                } else {
                    cache.row(r, contexts[j].len())?
                };
                continue_scores(model, &row, conts, &mut scores)?;
            }
            out[j] = scores;
        }
        start = end;
    }
    Ok(out)
}

/// Adds to `scores` the log-likelihoods of every continuation's tokens
/// after its first, run as one batch on copies of a batch-1 `cache`.
fn continue_scores(
    model: &Llama,
    cache: &KvCache,
    conts: &[Vec<u32>],
    scores: &mut [f64],
) -> Result<()> {
    let device = model.device();
    let width = conts.iter().map(Vec::len).max().unwrap_or(1) - 1;
    let n = conts.len();
    let mut ids = Vec::with_capacity(n * width);
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (i, c) in conts.iter().enumerate() {
        let mut seq = c[..c.len() - 1].to_vec();
        for (j, &t) in c[1..].iter().enumerate() {
            rows.push((i * width + j) as u32);
            targets.push(t);
        }
        seq.resize(width, 0);
        ids.extend(seq);
    }
    let mut cache = cache.expand_batch(n)?;
    let input = Tensor::from_vec(ids, (n, width), device)?;
    let hidden = model.forward_hidden(&input, Some(&mut cache))?;
    let d = hidden.dim(2)?;
    let picked = hidden
        .reshape((n * width, d))?
        .index_select(&Tensor::new(rows.as_slice(), device)?, 0)?;
    let logp = ops::log_softmax_last_dim(&model.logits(&picked)?.to_dtype(DType::F32)?)?;
    let t = Tensor::new(targets.as_slice(), device)?.unsqueeze(1)?;
    let lp: Vec<f32> = logp.gather(&t, 1)?.squeeze(1)?.to_vec1()?;
    let mut k = 0;
    for (i, c) in conts.iter().enumerate() {
        for _ in 1..c.len() {
            scores[i] += lp[k] as f64;
            k += 1;
        }
    }
    Ok(())
}

/// The scores of one multiple-choice example.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChoiceScores {
    /// Total log-probability of each option's scored tokens.
    pub logprobs: Vec<f64>,
    /// Number of scored tokens of each option.
    pub tokens: Vec<usize>,
    /// Option with the highest total log-probability.
    pub pred: usize,
    /// Option with the highest mean log-probability per token.
    pub pred_norm: usize,
    /// Characters of each option's scored continuation (under partial
    /// scoring, of each option's context: the part that differs, as
    /// lm-evaluation-harness counts it).
    pub chars: Vec<usize>,
    /// Option with the highest log-probability per character: what
    /// lm-evaluation-harness calls `acc_norm` (Quiver's `acc_norm`, the
    /// paper's, normalises per token).
    pub pred_norm_chars: usize,
}

/// Scores every option of a multiple-choice example; options that share a
/// context share its forward pass.
pub fn score_choices(model: &Llama, tok: &Tokenizer, ex: &Example) -> Result<ChoiceScores> {
    Ok(score_choices_batch(model, tok, std::slice::from_ref(ex), 1)?.remove(0))
}

/// [`score_choices`] for many examples, their contexts batched
/// `batch_tokens` at a time ([`score_contexts`]).
pub fn score_choices_batch(
    model: &Llama,
    tok: &Tokenizer,
    examples: &[Example],
    batch_tokens: usize,
) -> Result<Vec<ChoiceScores>> {
    // Per example: its options' token pairs, characters, and the groups of
    // options that share a context (one job each).
    let mut prepared = Vec::with_capacity(examples.len());
    let mut jobs: Vec<(Vec<u32>, Vec<Vec<u32>>)> = Vec::new();
    let mut members: Vec<(usize, Vec<usize>)> = Vec::new();
    for (e, ex) in examples.iter().enumerate() {
        let texts = option_texts(ex)?;
        let pairs = encode_texts(tok, &texts)?;
        // lm-evaluation-harness divides by the characters of what differs
        // between options: the continuation, or under partial scoring (one
        // context per option, a shared suffix) each option's context.
        let chars: Vec<usize> = texts
            .iter()
            .map(|(c, x)| match ex.scored_suffix {
                Some(_) => c.chars().count(),
                None => x.chars().count(),
            })
            .collect();
        let mut index: HashMap<&[u32], usize> = HashMap::new();
        for (i, (ctx, cont)) in pairs.iter().enumerate() {
            let g = *index.entry(ctx.as_slice()).or_insert_with(|| {
                jobs.push((ctx.clone(), Vec::new()));
                members.push((e, Vec::new()));
                jobs.len() - 1
            });
            jobs[g].1.push(cont.clone());
            members[g].1.push(i);
        }
        let tokens: Vec<usize> = pairs.iter().map(|(_, c)| c.len()).collect();
        prepared.push((tokens, chars));
    }
    let scored = score_contexts(model, &jobs, batch_tokens)?;
    let mut logprobs: Vec<Vec<f64>> = prepared.iter().map(|(t, _)| vec![0.0; t.len()]).collect();
    for ((e, opts), lps) in members.iter().zip(scored) {
        for (&i, lp) in opts.iter().zip(lps) {
            logprobs[*e][i] = lp;
        }
    }
    Ok(prepared
        .into_iter()
        .zip(logprobs)
        .map(|((tokens, chars), logprobs)| {
            let best = |f: &dyn Fn(usize) -> f64| {
                (0..logprobs.len()).fold(0, |b, i| if f(i) > f(b) { i } else { b })
            };
            let pred = best(&|i| logprobs[i]);
            let pred_norm = best(&|i| logprobs[i] / tokens[i] as f64);
            let pred_norm_chars = best(&|i| logprobs[i] / chars[i].max(1) as f64);
            ChoiceScores {
                logprobs,
                tokens,
                pred,
                pred_norm,
                chars,
                pred_norm_chars,
            }
        })
        .collect())
}

/// Greedy continuation of `prompt` up to `max_new_tokens`, stopping at end
/// of text or at the first newline after some text. Returns the text.
pub fn generate_answer(
    model: &Llama,
    tok: &Tokenizer,
    prompt: &str,
    max_new_tokens: usize,
) -> Result<String> {
    let max = model.config().max_position_embeddings;
    let mut ids = tok.encode(prompt)?;
    if ids.is_empty() {
        ids = tok.eos_ids().first().copied().into_iter().collect();
    }
    if max_new_tokens >= max {
        return Err(Error::invalid(format!(
            "--max-new-tokens {max_new_tokens} does not fit the model's context window of {max} tokens"
        )));
    }
    let keep = max - max_new_tokens;
    let ids = &ids[ids.len().saturating_sub(keep)..];
    let mut cache = model.new_cache();
    let mut input = Tensor::new(ids, model.device())?.unsqueeze(0)?;
    let mut out: Vec<u32> = Vec::new();
    let mut text = String::new();
    while out.len() < max_new_tokens {
        let logits: Vec<f32> = model
            .forward_last(&input, Some(&mut cache))?
            .squeeze(0)?
            .to_dtype(DType::F32)?
            .to_vec1()?;
        let next = argmax(&logits);
        if tok.eos_ids().contains(&next) {
            break;
        }
        out.push(next);
        text = tok.decode(&out, true)?;
        if let Some(nl) = text.trim_start().find('\n') {
            let start = text.len() - text.trim_start().len();
            text.truncate(start + nl);
            break;
        }
        input = Tensor::new(&[next], model.device())?.unsqueeze(0)?;
    }
    Ok(text.trim().to_string())
}

/// What `evaluate_task` did with one example.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ItemRecord {
    pub task: String,
    /// The example's position in the evaluated subsample.
    pub item: usize,
    /// The document's id in its source file ([`Example::doc_id`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub doc_id: Option<u64>,
    pub correct: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub choices: Option<ChoiceScores>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answer: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prediction: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rouge_l: Option<f64>,
}

/// One task's result.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TaskResult {
    pub task: String,
    pub source: String,
    /// `multiple_choice` or `generate`.
    pub mode: String,
    /// Items evaluated.
    pub items: usize,
    /// Items in the split before `--limit`.
    pub available: usize,
    /// The headline metric: `acc_norm` (multiple choice) or `exact_match`.
    pub metric: String,
    /// Its value in [0, 1] and standard error.
    pub score: f64,
    pub stderr: f64,
    /// Unnormalised multiple-choice accuracy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acc: Option<f64>,
    /// Multiple-choice accuracy normalised per character, as
    /// lm-evaluation-harness's `acc_norm` (compare published lm-eval
    /// numbers with this, not with `score`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acc_norm_chars: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rouge_l: Option<f64>,
    pub wall_time_s: f64,
}

/// Options of [`evaluate_task`].
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Evaluate at most this many items per task ([`subsample`]).
    pub limit: Option<usize>,
    /// Seed of the subsample.
    pub seed: u64,
    /// Force a mode instead of [`EvalMode::for_task`].
    pub mode: Option<EvalMode>,
    /// Generation length for generative tasks.
    pub max_new_tokens: usize,
    /// Context tokens scored in one forward ([`score_contexts`]); `1`
    /// scores one item's contexts at a time, which a routing observer
    /// needs (padding rows would be routed, and counted, too).
    pub batch_tokens: usize,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            limit: None,
            seed: 0,
            mode: None,
            max_new_tokens: 32,
            batch_tokens: CONTEXT_BATCH_TOKENS,
        }
    }
}

/// Evaluates one task; `on_item` is called after each item (for progress).
pub fn evaluate_task(
    model: &Llama,
    tok: &Tokenizer,
    task: &EvalTask,
    opts: &EvalOptions,
    mut on_item: impl FnMut(&ItemRecord),
) -> Result<(TaskResult, Vec<ItemRecord>)> {
    let start = std::time::Instant::now();
    if task.examples.is_empty() {
        return Err(Error::invalid(format!(
            "task `{}` has no examples in the chosen split",
            task.name
        )));
    }
    let items = subsample(&task.examples, &task.name, opts.limit, opts.seed);
    let mode = opts
        .mode
        .unwrap_or_else(|| EvalMode::for_task(&task.name, &task.examples));
    if mode == EvalMode::MultipleChoice && !items.iter().all(Example::is_multiple_choice) {
        return Err(Error::invalid(format!(
            "task `{}` has examples without options: it cannot be scored as multiple choice",
            task.name
        )));
    }
    let mut records = Vec::with_capacity(items.len());
    match mode {
        EvalMode::MultipleChoice => {
            // Items a chunk at a time: their contexts batch together, and
            // progress is still reported as the chunks finish.
            let per_chunk = (opts.batch_tokens / 64).clamp(1, 64);
            for (c, chunk) in items.chunks(per_chunk).enumerate() {
                let scores = score_choices_batch(model, tok, chunk, opts.batch_tokens)?;
                for (k, (ex, s)) in chunk.iter().zip(scores).enumerate() {
                    let answer = ex.answer.expect("checked multiple choice");
                    let rec = ItemRecord {
                        task: task.name.clone(),
                        item: c * per_chunk + k,
                        doc_id: ex.doc_id,
                        correct: s.pred_norm == answer,
                        choices: Some(s),
                        answer: Some(answer),
                        prediction: None,
                        target: None,
                        rouge_l: None,
                    };
                    on_item(&rec);
                    records.push(rec);
                }
            }
        }
        EvalMode::Generate => {
            for (i, ex) in items.iter().enumerate() {
                let text = generate_answer(model, tok, &ex.source, opts.max_new_tokens)?;
                let rec = ItemRecord {
                    task: task.name.clone(),
                    item: i,
                    doc_id: ex.doc_id,
                    correct: metrics::exact_match(&text, &ex.target),
                    rouge_l: Some(metrics::rouge_l(&text, &ex.target)),
                    choices: None,
                    answer: None,
                    prediction: Some(text),
                    target: Some(ex.target.clone()),
                };
                on_item(&rec);
                records.push(rec);
            }
        }
    }
    let hits: Vec<f64> = records.iter().map(|r| r.correct as u8 as f64).collect();
    let (score, stderr) = metrics::mean_stderr(&hits);
    let share = |pick: fn(&ChoiceScores) -> usize| -> f64 {
        let hits: Vec<f64> = records
            .iter()
            .filter_map(|r| Some((Some(pick(r.choices.as_ref()?)) == r.answer) as u8 as f64))
            .collect();
        metrics::mean_stderr(&hits).0
    };
    let mut acc_norm_chars = None;
    let (acc, rouge_l, metric, mode_name) = match mode {
        EvalMode::MultipleChoice => {
            acc_norm_chars = Some(share(|c| c.pred_norm_chars));
            (Some(share(|c| c.pred)), None, "acc_norm", "multiple_choice")
        }
        EvalMode::Generate => {
            let r: Vec<f64> = records.iter().filter_map(|r| r.rouge_l).collect();
            (
                None,
                Some(metrics::mean_stderr(&r).0),
                "exact_match",
                "generate",
            )
        }
    };
    Ok((
        TaskResult {
            task: task.name.clone(),
            source: task.source.clone(),
            mode: mode_name.into(),
            items: records.len(),
            available: task.examples.len(),
            metric: metric.into(),
            score,
            stderr,
            acc,
            acc_norm_chars,
            rouge_l,
            wall_time_s: start.elapsed().as_secs_f64(),
        },
        records,
    ))
}

/// Results of every task and their average.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct EvalReport {
    pub model: String,
    pub route: String,
    pub limit: Option<usize>,
    pub seed: u64,
    pub split: String,
    pub tasks: Vec<TaskResult>,
    /// Mean of the tasks' headline scores.
    pub average: f64,
}

impl EvalReport {
    pub fn new(
        model: &str,
        route: &str,
        opts: &EvalOptions,
        split: &str,
        tasks: Vec<TaskResult>,
    ) -> Self {
        let average = if tasks.is_empty() {
            0.0
        } else {
            tasks.iter().map(|t| t.score).sum::<f64>() / tasks.len() as f64
        };
        Self {
            model: model.to_string(),
            route: route.to_string(),
            limit: opts.limit,
            seed: opts.seed,
            split: split.to_string(),
            tasks,
            average,
        }
    }

    /// A plain-text table: one row per task and the average, scores in
    /// percent with their standard error.
    pub fn table(&self) -> String {
        let w = self
            .tasks
            .iter()
            .map(|t| t.task.len())
            .max()
            .unwrap_or(4)
            .max(7);
        let mut s = format!(
            "{:<w$}  {:>11}  {:>6}  {:>13}  {:>5}  {:>8}\n",
            "task", "metric", "items", "score", "acc", "acc_char"
        );
        for t in &self.tasks {
            let extra = match (t.acc, t.rouge_l) {
                (Some(a), _) => format!("{:.1}", a * 100.0),
                (None, Some(r)) => format!("R-L {:.1}", r * 100.0),
                _ => String::new(),
            };
            let chars = t
                .acc_norm_chars
                .map(|a| format!("{:.1}", a * 100.0))
                .unwrap_or_default();
            s.push_str(&format!(
                "{:<w$}  {:>11}  {:>6}  {:>6.1} ± {:>4.1}  {:>5}  {:>8}\n",
                t.task,
                t.metric,
                t.items,
                t.score * 100.0,
                t.stderr * 100.0,
                extra,
                chars
            ));
        }
        s.push_str(&format!(
            "{:<w$}  {:>11}  {:>6}  {:>6.1}\n",
            "average",
            "",
            self.tasks.iter().map(|t| t.items).sum::<usize>(),
            self.average * 100.0
        ));
        s
    }
}
