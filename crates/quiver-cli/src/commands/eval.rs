//! `quiver eval`: accuracy on held-out tasks, for the base model, one
//! expert, a merge or a routed library (METHOD.md section 4).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use quiver_core::data::normalize_input;
use quiver_core::eval::{self, EvalMode, EvalOptions, EvalReport, EvalSplit};
use quiver_core::fsutil::write_atomic;

use crate::commands::route::RouteArgs;
use crate::flags::{GlobalArgs, ModelArgs};

#[derive(Debug, Args, Clone)]
#[command(
    after_help = "Multiple choice: `acc_norm` (the score, the paper's metric) picks the option with the \
highest log-probability per token; `acc` the highest total; `acc_char` (`acc_norm_chars` in --json) \
the highest per character of the scored continuation (under partial scoring, WinoGrande, of each \
option's context), which is what lm-evaluation-harness calls `acc_norm`: compare published lm-eval \
numbers with acc_char. --predictions records each item's doc_id, each option's tokens and \
characters and all three picks."
)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub route: RouteArgs,
    /// Comma-separated tasks: olmo tasks (`arc_easy`, `piqa`, ... or full names such as
    /// `arc_easy:mc:validation`), BIG-bench tasks (`navigate`,
    /// `logical_deduction/three_objects`), `held-out` (the paper's seven multiple-choice
    /// tasks) or `bbh` (every BIG-Bench-Hard task). With --data, tasks of that JSONL.
    #[arg(long, value_delimiter = ',', required = true)]
    pub tasks: Vec<String>,
    /// Evaluate at most N items per task, picked deterministically from --seed.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Which examples: `validation` (default), `test`, `train`, or `all` (BIG-bench/JSONL
    /// tasks only). Olmo tasks use their split files; BIG-bench and JSONL tasks the
    /// 80/10/10 split that `quiver train` uses, so trained tasks are evaluated on unseen items.
    #[arg(long, default_value = "validation", value_parser = parse_split)]
    pub split: SplitArg,
    /// Train and validation fractions of the split of BIG-bench and JSONL tasks,
    /// TRAIN,VALIDATION (test gets the rest); as `quiver train --split-fractions`.
    #[arg(long, default_value = "0.8,0.1")]
    pub split_fractions: quiver_core::data::SplitFractions,
    /// Seed of the --limit subsample.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// `auto` (generation + exact match for BIG-Bench-Hard and tasks without options,
    /// log-likelihood multiple choice otherwise), `mc` or `generate`.
    #[arg(long, value_enum, default_value_t = ModeArg::Auto)]
    pub mode: ModeArg,
    /// Tokens generated at most per item in generation mode (stops earlier at a newline).
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// Take every task from this source and split it 80/10/10 (or by
    /// --split-fractions) as `quiver train` does: a JSONL file or directory of
    /// your own tasks, `olmo`, `evals`, `olmo+evals` or `bigbench:DIR` (see
    /// `quiver data --help`). Without it, a name is an olmo task (kept as its
    /// file splits it), else an evals task, else a BIG-bench task.
    #[arg(long, value_name = "SOURCE")]
    pub data: Option<String>,
    /// Also write the report as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write every item's scores or generated answer to FILE as JSON lines, with its
    /// `doc_id` (the olmo file's document id, else its position in the task's file).
    #[arg(long, value_name = "FILE")]
    pub predictions: Option<PathBuf>,
    /// Leave out items whose input (whitespace collapsed, lower case) also occurs in
    /// any example of these tasks (comma-separated, from the same data), e.g. the
    /// training tasks, so that only inputs never seen in training are scored.
    #[arg(long, value_delimiter = ',', value_name = "TASKS")]
    pub exclude_inputs_of: Vec<String>,
    /// Routed routes only (arrow, mu, phatgoose): write, per task, the mean routing
    /// weight of every expert at every routed layer to FILE as JSON (sums over all
    /// scored tokens, options' padding included; see RESULTS.md's routing diagnostics).
    #[arg(long, value_name = "FILE")]
    pub routing_summary: Option<PathBuf>,
    /// Multiple choice: context tokens (rows x padded length) scored in one forward.
    /// Contexts of similar length run together, right-padded, each continuing with its
    /// own options from its own cache; `1` scores one item at a time (what
    /// --routing-summary uses, so that padding is never routed or counted). The scores
    /// are the same either way, to float rounding.
    #[arg(long, default_value_t = quiver_core::eval::CONTEXT_BATCH_TOKENS, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub batch_tokens: usize,
}

/// `--split`: the parsed split and how the user wrote it (the report keeps
/// the latter).
#[derive(Debug, Clone)]
pub struct SplitArg {
    pub split: EvalSplit,
    pub name: String,
}

fn parse_split(s: &str) -> Result<SplitArg, String> {
    let split = s.parse().map_err(|e: quiver_core::Error| e.to_string())?;
    Ok(SplitArg {
        split,
        name: s.to_string(),
    })
}

/// `--mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeArg {
    /// Generation for BIG-Bench-Hard and tasks without options, multiple choice otherwise.
    Auto,
    /// Log-likelihood multiple choice.
    #[value(alias = "multiple-choice", alias = "multiple_choice")]
    Mc,
    /// Greedy generation and exact match.
    #[value(alias = "gen")]
    Generate,
}

impl ModeArg {
    fn mode(self) -> Option<EvalMode> {
        match self {
            ModeArg::Auto => None,
            ModeArg::Mc => Some(EvalMode::MultipleChoice),
            ModeArg::Generate => Some(EvalMode::Generate),
        }
    }
}

/// Runs the evaluation and returns the report (also used by `quiver demo`).
pub fn evaluate(g: &GlobalArgs, a: &EvalArgs) -> Result<EvalReport> {
    let split = a.split.split;
    if a.limit == Some(0) {
        bail!("--limit must be at least 1");
    }
    if a.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    let opts = EvalOptions {
        limit: a.limit,
        seed: a.seed,
        mode: a.mode.mode(),
        max_new_tokens: a.max_new_tokens,
        batch_tokens: if a.routing_summary.is_some() {
            1
        } else {
            a.batch_tokens
        },
    };
    let home = quiver_core::assets::quiver_home();
    let mut tasks =
        eval::resolve_tasks_with(&a.tasks, split, a.data.as_deref(), &home, a.split_fractions)?;
    if !a.exclude_inputs_of.is_empty() {
        let seen: std::collections::HashSet<String> = eval::resolve_tasks_with(
            &a.exclude_inputs_of,
            eval::EvalSplit::All,
            a.data.as_deref(),
            &home,
            a.split_fractions,
        )?
        .iter()
        .flat_map(|t| t.examples.iter().map(|e| normalize_input(&e.source)))
        .collect();
        for t in &mut tasks {
            let before = t.examples.len();
            t.examples
                .retain(|e| !seen.contains(&normalize_input(&e.source)));
            let dropped = before - t.examples.len();
            if dropped > 0 && !g.quiet {
                eprintln!(
                    "{}: {dropped} of {before} items left out (their input occurs in --exclude-inputs-of tasks)",
                    t.name
                );
            }
        }
    }
    let mut lm = super::load_model(g, &a.model)?;
    let tally = a
        .routing_summary
        .as_ref()
        .map(|_| quiver_core::routing::RoutingTally::new());
    super::route::apply_route_observed(
        &mut lm,
        &a.route,
        tally
            .clone()
            .map(|t| t as Arc<dyn quiver_core::routing::RouteObserver>),
    )?;
    let mut summaries = std::collections::BTreeMap::new();
    let route = match &a.route.adapter {
        Some(p) => format!("adapter:{}", p.display()),
        None => a.route.route.to_string(),
    };
    let total: usize = tasks
        .iter()
        .map(|t| a.limit.unwrap_or(usize::MAX).min(t.examples.len()))
        .sum();
    let pb = if crate::progress::enabled(g) {
        let pb = ProgressBar::new(total as u64);
        pb.set_style(
            ProgressStyle::with_template(
                "eval {prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed}, eta {eta})",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        pb.set_prefix(route.clone());
        pb
    } else {
        ProgressBar::hidden()
    };
    let mut predictions = match &a.predictions {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
        )),
        None => None,
    };
    let mut results = Vec::new();
    for task in &tasks {
        let mut hits = 0usize;
        let mut seen = 0usize;
        if let Some(t) = &tally {
            t.reset();
        }
        let (res, records) = eval::evaluate_task(&lm.model, &lm.tokenizer, task, &opts, |r| {
            seen += 1;
            hits += r.correct as usize;
            pb.inc(1);
            pb.set_message(format!(
                "{} {:.1}%",
                task.name,
                100.0 * hits as f64 / seen as f64
            ));
        })?;
        if let Some(w) = predictions.as_mut() {
            for r in &records {
                writeln!(w, "{}", serde_json::to_string(r)?)?;
            }
        }
        tracing::info!(
            "{}: {} {:.4} over {} items ({:.1}s)",
            res.task,
            res.metric,
            res.score,
            res.items,
            res.wall_time_s
        );
        if let Some(t) = &tally {
            summaries.insert(res.task.clone(), t.summary());
        }
        results.push(res);
    }
    pb.finish_and_clear();
    if let Some(path) = &a.routing_summary {
        write_atomic(path, serde_json::to_string(&summaries)?.as_bytes())?;
    }
    if let Some(mut w) = predictions {
        w.flush()?;
    }
    Ok(EvalReport::new(
        &a.model.model,
        &route,
        &opts,
        &a.split.name,
        results,
    ))
}

pub fn run(g: &GlobalArgs, a: EvalArgs) -> Result<ExitCode> {
    let report = evaluate(g, &a)?;
    if let Some(path) = &a.json {
        write_atomic(path, serde_json::to_string_pretty(&report)?.as_bytes())?;
    }
    println!("model {}  route {}", report.model, report.route);
    print!("{}", report.table());
    Ok(ExitCode::SUCCESS)
}
