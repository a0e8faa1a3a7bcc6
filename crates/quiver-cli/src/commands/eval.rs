//! `quiver eval`: accuracy on held-out tasks, for the base model, one
//! expert, a merge or a routed library (METHOD.md section 4).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use quiver_core::eval::{self, EvalMode, EvalOptions, EvalReport, EvalSplit};
use quiver_core::fsutil::write_atomic;

use crate::args::{GlobalArgs, ModelArgs};
use crate::commands::route::RouteArgs;

#[derive(Debug, Args, Clone)]
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
    #[arg(long, default_value = "validation")]
    pub split: String,
    /// Seed of the --limit subsample.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// `auto` (generation + exact match for BIG-Bench-Hard and tasks without options,
    /// log-likelihood multiple choice otherwise), `mc` or `generate`.
    #[arg(long, default_value = "auto")]
    pub mode: String,
    /// Tokens generated at most per item in generation mode (stops earlier at a newline).
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// A JSONL file or directory of your own tasks (see `quiver data --help`).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Also write the report as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write every item's scores or generated answer to FILE as JSON lines.
    #[arg(long, value_name = "FILE")]
    pub predictions: Option<PathBuf>,
}

fn parse_mode(s: &str) -> Result<Option<EvalMode>> {
    match s {
        "auto" => Ok(None),
        "mc" | "multiple-choice" | "multiple_choice" => Ok(Some(EvalMode::MultipleChoice)),
        "generate" | "gen" => Ok(Some(EvalMode::Generate)),
        _ => bail!("--mode `{s}`: expected auto, mc or generate"),
    }
}

/// Runs the evaluation and returns the report (also used by `quiver demo`).
pub fn evaluate(g: &GlobalArgs, a: &EvalArgs) -> Result<EvalReport> {
    let split: EvalSplit = a.split.parse()?;
    if a.limit == Some(0) {
        bail!("--limit must be at least 1");
    }
    if a.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    let opts = EvalOptions {
        limit: a.limit,
        seed: a.seed,
        mode: parse_mode(&a.mode)?,
        max_new_tokens: a.max_new_tokens,
    };
    let home = quiver_core::assets::quiver_home();
    let tasks = eval::resolve_tasks(&a.tasks, split, a.data.as_deref(), &home)?;
    let mut lm = super::load_model(g, &a.model)?;
    super::route::apply_route(&mut lm, &a.route)?;
    let route = match &a.route.adapter {
        Some(p) => format!("adapter:{}", p.display()),
        None => a.route.route.clone(),
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
        results.push(res);
    }
    pb.finish_and_clear();
    if let Some(mut w) = predictions {
        w.flush()?;
    }
    Ok(EvalReport::new(
        &a.model.model,
        &route,
        &opts,
        &a.split,
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
