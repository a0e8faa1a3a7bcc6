//! `quiver experiment --config FILE` and `quiver demo`: the paper's whole
//! pipeline (METHOD.md sections 1, 2 and 4) from one TOML file:
//!
//! 1. private experts, one per training task (`quiver train`), the
//!    families' held-out siblings refused as training tasks;
//! 2. MBC clusters of them, and random clusters (`quiver cluster`);
//! 3. one expert per cluster (`quiver train --clusters`), one shared expert
//!    on all the tasks (`quiver train --shared`), and the task oracles (one
//!    expert per held-out sibling, kept out of every library);
//! 4. every private expert on its own task against the base model, the
//!    family oracle chosen on the siblings' validation items, and every
//!    route evaluated on the held-out siblings' test items and on the
//!    `[eval] tasks` (`quiver eval`);
//! 5. tables with paired differences against the base model and the
//!    uniform merge, cluster recovery (ARI) and routing diagnostics
//!    ([`report`]).
//!
//! Each step runs as a child `quiver` process whose command line is
//! printed, so any step can be re-run or changed by hand; their output is
//! kept under `OUT/logs/`. Every step is resumable: experts already in a
//! library are skipped (and a half-trained one resumes from its
//! checkpoint), clusterings and evaluations already written are reused
//! when their command is unchanged, and the results are rewritten after
//! every evaluation, so an interrupted run shows what it has.

mod commands;
mod config;
mod k8s;
mod plan;
mod report;
mod slurm;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use quiver_core::data::DataSource;
use quiver_core::eval::EvalReport;
use quiver_core::expert::expert_name_for_task;
use quiver_core::fsutil::write_atomic;
use quiver_core::library::ExpertLibrary;
use quiver_core::routing::RoutingSummary;

use crate::flags::GlobalArgs;
use commands::{lib_uri, library_size};
pub use config::ExperimentConfig;
use config::{Lib, RowKind};
use report::{Cells, Row, TaskCell};

/// The demo's configuration, also kept in the repository as
/// `configs/demo.toml`.
pub const DEMO_CONFIG: &str = include_str!("../../../../../configs/demo.toml");

#[derive(Debug, Args)]
#[command(after_help = "The TOML file has these tables; `configs/demo.toml`, \
`configs/siblings.toml` and `configs/paper-small.toml` are commented examples:\n\n\
  name = \"...\"                 results go to runs/<name> unless --out is given\n\
  model = \"smollm2-135m\"\n\
  [train]   tasks, source, steps, cluster_steps, shared_steps, oracle_steps, lr, batch_size,\n\
            grad_accum, max_input_len, max_target_len, rank, alpha, dropout, target_modules,\n\
            max_eval_examples, seed, init (shared | per-expert)\n\
  [library] k (clusters), seed, embed (delta | weights)\n\
  [families.NAME] library = [subtasks trained], held_out = [sibling subtasks never trained on]\n\
  [eval]    tasks, data, limit, split, seed, top_k, routes, held_out_limit, held_out_split,\n\
            select_limit, own_limit\n\
  [slurm]   cpus, mem, time, partition, gpus, max_running, extra (sbatch options), setup (shell\n\
            lines), quiver (executable), poll_seconds; [slurm.phases.PHASE] overrides one phase\n\
  [k8s]     image, pvc, mount, secret, namespace, parallelism, cpu, memory, gpus, retries\n\n\
Phases (units of work): train-private, cluster, train-library, link, eval, eval-oracle; \
`--phase P --index I` runs one unit, skipping it when its output exists.\n\n\
A route is ROUTE@LIBRARY with LIBRARY one of private (one expert per task), mbc, random \
(one expert per cluster) or shared; ROUTE is any `quiver eval --route` value (arrow, uniform, \
ties, mu, phatgoose, ...). `base` needs no library, `shared` means expert:shared@shared, \
`family-oracle` is, per held-out sibling, the library expert of its family that scores best on \
the sibling's validation items, and `task-oracle` an expert trained on the sibling itself. A \
table `{ route = \"arrow\", library = \"private\", top_k = 2, gks = true, label = \"...\" }` sets \
options: gks subtracts the shared expert from the private ones (GenKnowSub).\n\n\
Results: results.md and results.json in the output directory, with every route's paired \
difference from the base model and from the uniform merge (95% paired bootstrap interval, \
McNemar's exact p), the private experts on their own tasks, the adjusted Rand index of the \
clusters against the families, and the share of routing weight on each sibling's family.")]
pub struct ExperimentArgs {
    /// The experiment's TOML file.
    #[arg(long)]
    pub config: PathBuf,
    /// Output directory: libraries, clusterings, evaluations, results (default: runs/<name>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Where the libraries live instead of OUT: a directory or `s3://bucket/prefix`
    /// (each library is ROOT/private, ROOT/mbc, ...); overrides `[library] root`.
    #[arg(long, value_name = "DIR|s3://BUCKET/PREFIX")]
    pub library_root: Option<String>,
    /// Print the plan and the commands (with --executor slurm: the sbatch
    /// scripts), run nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Where the units of work run: `local` (one after the other, here),
    /// `slurm` (each phase a job array submitted with sbatch, phases chained
    /// by afterok; resources from `[slurm]`), or `k8s` (writes one Indexed Job
    /// manifest per phase to --emit DIR; settings from `[k8s]`).
    #[arg(long, value_enum, default_value_t = Executor::Local)]
    pub executor: Executor,
    /// With --executor k8s: the directory the manifests are written to.
    #[arg(long, value_name = "DIR")]
    pub emit: Option<PathBuf>,
    /// Run one unit of work of this phase and exit (what a job array element
    /// runs); needs --index. Done work is skipped.
    #[arg(long, value_enum, requires = "index")]
    pub phase: Option<plan::Phase>,
    /// The unit's index within --phase (0-based, as SLURM_ARRAY_TASK_ID and
    /// JOB_COMPLETION_INDEX give it).
    #[arg(long, requires = "phase")]
    pub index: Option<usize>,
}

/// Where the units of work run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Executor {
    Local,
    Slurm,
    K8s,
}

/// How `run_pipeline` runs.
struct Mode {
    dry_run: bool,
    executor: Executor,
    emit: Option<PathBuf>,
    unit: Option<(plan::Phase, usize)>,
    library_root: Option<String>,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Output directory (default: $QUIVER_HOME/runs/demo). A second run reuses what is there.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the plan and the commands, run nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// A smoke run of the same pipeline on the same tasks, in minutes: 2
    /// training steps per expert and 4 items per held-out sibling (default
    /// output: $QUIVER_HOME/runs/demo-smoke). Checks that the demo's data can
    /// be had and every step runs; its numbers mean nothing.
    #[arg(long)]
    pub smoke: bool,
}

/// The demo's config cut to a smoke run (`quiver demo --smoke`).
fn smoke(cfg: &mut ExperimentConfig) {
    cfg.name = format!("{}-smoke", cfg.name);
    cfg.train.steps = 2;
    cfg.train.cluster_steps = Some(2);
    cfg.train.shared_steps = Some(2);
    cfg.train.oracle_steps = Some(2);
    cfg.train.max_eval_examples = 2;
    cfg.eval.held_out_limit = Some(4);
    cfg.eval.select_limit = cfg.eval.select_limit.min(4);
    cfg.eval.own_limit = cfg.eval.own_limit.min(4);
    cfg.eval.limit = cfg.eval.limit.map(|l| l.min(4));
}

/// One child `quiver` command.
struct Step {
    what: String,
    args: Vec<String>,
    /// Its stdout goes here.
    log: PathBuf,
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@,+".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Makes a step's process end when `quiver experiment`/`demo` itself is
/// killed (SIGTERM from a scheduler, `kill PID`): otherwise the step runs on
/// alone and writes into the output directory the user may already be
/// reusing. Ctrl-C already reaches both (one process group). A killed step
/// loses nothing: its outputs are written to a temporary file and renamed.
#[cfg(target_os = "linux")]
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id();
    // SAFETY: between fork and exec the closure calls only prctl(2) and
    // getppid(2), both async-signal-safe, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before the call above (we were
            // re-parented): stop now rather than run unwatched.
            if libc::getppid() as u32 != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        })
    };
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_cmd: &mut Command) {}

fn command_line(args: &[String]) -> String {
    args.iter()
        .map(|a| shell_quote(a))
        .collect::<Vec<_>>()
        .join(" ")
}

fn run_step(g: &GlobalArgs, step: &Step) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find the quiver executable")?;
    if !g.quiet {
        eprintln!("\n== {}\n$ quiver {}", step.what, command_line(&step.args));
    }
    if let Some(dir) = step.log.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&step.log)
        .with_context(|| format!("cannot open {}", step.log.display()))?;
    let mut cmd = Command::new(exe);
    die_with_parent(&mut cmd);
    if g.quiet {
        cmd.arg("--quiet");
    } else if g.no_progress {
        cmd.arg("--no-progress");
    }
    let status = cmd
        .args(&step.args)
        .stdout(Stdio::from(log))
        .stderr(Stdio::inherit())
        .status()
        .context("cannot start a quiver child process")?;
    if !status.success() {
        bail!(
            "step `{}` failed ({status}); its output is in {}. Fix the cause and run the same command again: finished work is kept",
            step.what,
            step.log.display()
        );
    }
    Ok(())
}

/// A stored evaluation: the command that made it and its report.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredEval {
    command: Vec<String>,
    report: EvalReport,
}

/// One item's outcome, from `quiver eval --predictions`.
#[derive(Debug, Clone, serde::Deserialize)]
struct ItemOutcome {
    task: String,
    item: usize,
    correct: bool,
}

/// A finished evaluation: the report, every item's outcome, and (routed
/// routes) the routing weights per task.
struct EvalOut {
    report: EvalReport,
    items: Vec<ItemOutcome>,
    routing: Option<BTreeMap<String, RoutingSummary>>,
}

fn slug(label: &str) -> String {
    label
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

/// The files of a stored evaluation `eval/<slug>.*`.
struct EvalFiles {
    report: PathBuf,
    predictions: PathBuf,
    routing: PathBuf,
}

fn eval_files(out: &Path, slug: &str) -> EvalFiles {
    let dir = out.join("eval");
    EvalFiles {
        report: dir.join(format!("{slug}.json")),
        predictions: dir.join(format!("{slug}.predictions.jsonl")),
        routing: dir.join(format!("{slug}.routing.json")),
    }
}

fn read_items(path: &Path) -> Result<Vec<ItemOutcome>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{}: line {} is not a prediction", path.display(), i + 1))
        })
        .collect()
}

/// The stored outcome of `job`, if the same command already ran (its
/// report, predictions and, for a routed route, routing weights are there).
fn stored_eval(out: &Path, job: &plan::EvalJob) -> Result<Option<EvalOut>> {
    let f = eval_files(out, &job.slug);
    let stored: Option<StoredEval> = std::fs::read_to_string(&f.report)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let have_files = f.predictions.exists() && (!job.routing || f.routing.exists());
    let report = match stored {
        Some(s) if s.command == job.args && have_files => s.report,
        _ => return Ok(None),
    };
    let items = read_items(&f.predictions)?;
    let routing = if job.routing {
        let text = std::fs::read_to_string(&f.routing)
            .with_context(|| format!("cannot read {}", f.routing.display()))?;
        Some(serde_json::from_str(&text).with_context(|| format!("{}", f.routing.display()))?)
    } else {
        None
    };
    Ok(Some(EvalOut {
        report,
        items,
        routing,
    }))
}

/// Runs `quiver eval ARGS` unless the same command already ran, and stores
/// its report, predictions and routing weights (each written to a temporary
/// file and renamed, the report last).
fn run_eval(g: &GlobalArgs, out: &Path, job: &plan::EvalJob) -> Result<()> {
    let f = eval_files(out, &job.slug);
    if stored_eval(out, job)?.is_some() {
        if !g.quiet {
            eprintln!("\n== {}: already done ({})", job.what, f.report.display());
        }
        return Ok(());
    }
    let slug = &job.slug;
    let dir = out.join("eval");
    std::fs::create_dir_all(&dir)?;
    let tmp_report = dir.join(format!(".{slug}.report.json"));
    let tmp_pred = dir.join(format!(".{slug}.predictions.jsonl"));
    let tmp_routing = dir.join(format!(".{slug}.routing.json"));
    let mut full = job.args.clone();
    full.extend(["--json".into(), tmp_report.display().to_string()]);
    full.extend(["--predictions".into(), tmp_pred.display().to_string()]);
    if job.routing {
        full.extend([
            "--routing-summary".into(),
            tmp_routing.display().to_string(),
        ]);
    }
    run_step(
        g,
        &Step {
            what: job.what.clone(),
            args: full,
            log: out.join("logs").join(format!("eval-{slug}.txt")),
        },
    )?;
    let report: EvalReport = serde_json::from_str(
        &std::fs::read_to_string(&tmp_report)
            .with_context(|| format!("cannot read {}", tmp_report.display()))?,
    )?;
    std::fs::rename(&tmp_pred, &f.predictions)?;
    if job.routing {
        std::fs::rename(&tmp_routing, &f.routing)?;
    }
    let stored = StoredEval {
        command: job.args.clone(),
        report,
    };
    write_atomic(&f.report, serde_json::to_string_pretty(&stored)?.as_bytes())?;
    let _ = std::fs::remove_file(&tmp_report);
    Ok(())
}

/// One table's items: which tasks, which split, how many.
struct TableSpec {
    tasks: Vec<String>,
    split: String,
    fractions: Option<quiver_core::data::SplitFractions>,
    limit: Option<usize>,
    data: Option<String>,
    seed: u64,
    /// Items whose input occurs in these tasks are left out.
    exclude: Vec<String>,
}

impl TableSpec {
    fn args(&self, tasks: &[String]) -> Vec<String> {
        let mut v = vec![
            "--tasks".into(),
            tasks.join(","),
            "--split".into(),
            self.split.clone(),
            "--seed".into(),
            self.seed.to_string(),
        ];
        if let Some(fr) = self.fractions {
            v.extend([
                "--split-fractions".into(),
                format!("{},{}", fr.train, fr.validation),
            ]);
        }
        if let Some(l) = self.limit {
            v.extend(["--limit".into(), l.to_string()]);
        }
        if let Some(d) = &self.data {
            v.extend(["--data".into(), d.clone()]);
        }
        if !self.exclude.is_empty() {
            v.extend(["--exclude-inputs-of".into(), self.exclude.join(",")]);
        }
        v
    }
}

/// Per-task cells and item outcomes of an evaluation.
fn cells(e: &EvalOut) -> Cells {
    let mut c = BTreeMap::new();
    for t in &e.report.tasks {
        c.insert(
            t.task.clone(),
            TaskCell {
                score: t.score,
                items: t.items,
                stderr: t.stderr,
            },
        );
    }
    let mut items: BTreeMap<String, Vec<(usize, bool)>> = BTreeMap::new();
    for i in &e.items {
        items
            .entry(i.task.clone())
            .or_default()
            .push((i.item, i.correct));
    }
    (c, items)
}

/// The library `private+shared`: every private expert and the shared one,
/// for GenKnowSub (copied, each checked on the way; experts already there
/// are skipped).
fn link_private_shared(cfg: &ExperimentConfig, out: &Path) -> Result<()> {
    let dst = ExpertLibrary::open_or_create(&lib_uri(cfg, out, Lib::PrivateShared))?;
    for lib in [Lib::Private, Lib::Shared] {
        let src = ExpertLibrary::open(&lib_uri(cfg, out, lib))?;
        let report = src.copy_to(&dst)?;
        if !report.conflicts.is_empty() {
            bail!(
                "{}: experts {} differ from those of {}; remove the directory and run again",
                dst.uri(),
                report.conflicts.join(", "),
                src.uri()
            );
        }
    }
    Ok(())
}

pub fn run_experiment(g: &GlobalArgs, a: ExperimentArgs) -> Result<ExitCode> {
    let text = std::fs::read_to_string(&a.config)
        .with_context(|| format!("cannot read {}", a.config.display()))?;
    let origin = a.config.display().to_string();
    let mut cfg = ExperimentConfig::parse(&text, &origin)?;
    slurm::validate(&cfg.slurm, &origin)?;
    if a.library_root.is_some() {
        cfg.library.root = a.library_root.clone();
    }
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(&cfg.name));
    let mode = Mode {
        dry_run: a.dry_run,
        executor: a.executor,
        emit: a.emit.clone(),
        unit: a.phase.zip(a.index),
        library_root: a.library_root.clone(),
    };
    run_pipeline(g, &cfg, &text, &out, &mode)
}

pub fn run_demo(g: &GlobalArgs, a: DemoArgs) -> Result<ExitCode> {
    let mut cfg = ExperimentConfig::parse(DEMO_CONFIG, "configs/demo.toml")?;
    if a.smoke {
        smoke(&mut cfg);
    }
    let out = a.out.clone().unwrap_or_else(|| {
        quiver_core::assets::quiver_home()
            .join("runs")
            .join(if a.smoke { "demo-smoke" } else { "demo" })
    });
    let mode = Mode {
        dry_run: a.dry_run,
        executor: Executor::Local,
        emit: None,
        unit: None,
        library_root: None,
    };
    run_pipeline(g, &cfg, DEMO_CONFIG, &out, &mode)
}

/// Rough wall time on the 2-core CPU this was developed on: a training step
/// of `batch x accum` examples at ~1.5 s per 4 examples, and ~0.3 s per
/// multiple-choice item (routed routes ~0.45 s).
fn estimate_seconds(cfg: &ExperimentConfig, out: &Path) -> f64 {
    let t = &cfg.train;
    let per_step = (t.batch_size * t.grad_accum) as f64 * 1.5 / 4.0;
    let have = |lib: Lib, name: &str| {
        ExpertLibrary::open(&lib_uri(cfg, out, lib))
            .and_then(|l| l.contains(name))
            .unwrap_or(false)
    };
    let libs = cfg.libraries();
    let mut steps = 0usize;
    if libs.contains(&Lib::Private) {
        steps += cfg
            .train_tasks()
            .iter()
            .filter(|task| !have(Lib::Private, &expert_name_for_task(task)))
            .count()
            * t.steps;
    }
    let cluster_steps = t.cluster_steps.unwrap_or(t.steps);
    for lib in [Lib::Mbc, Lib::Random] {
        if libs.contains(&lib) {
            steps += cfg
                .library
                .k
                .saturating_sub(library_size(&lib_uri(cfg, out, lib)))
                * cluster_steps;
        }
    }
    if libs.contains(&Lib::Shared) && !have(Lib::Shared, "shared") {
        steps += t.shared_steps.unwrap_or(cluster_steps);
    }
    if libs.contains(&Lib::Oracle) {
        steps += cfg
            .held_out()
            .iter()
            .filter(|task| !have(Lib::Oracle, &expert_name_for_task(task)))
            .count()
            * t.oracle_steps.unwrap_or(t.steps);
    }
    let routes = cfg.routes();
    let pending = |label: &str| !eval_files(out, &slug(label)).report.exists();
    let mut items = 0.0;
    for r in &routes {
        let cost = if r.routed() { 0.45 } else { 0.3 };
        if !cfg.families.is_empty() && pending(&format!("{}.held-out", r.label)) {
            items += cost * (cfg.held_out().len() * cfg.eval.held_out_limit.unwrap_or(300)) as f64;
        }
        if !cfg.eval.tasks.is_empty()
            && matches!(r.kind, RowKind::Plain { .. })
            && pending(&r.label)
        {
            items += cost * (cfg.eval.tasks.len() * cfg.eval.limit.unwrap_or(500)) as f64;
        }
    }
    if !cfg.families.is_empty() && cfg.eval.own_limit > 0 {
        items += 0.3 * (2 * cfg.train_tasks().len() * cfg.eval.own_limit) as f64;
    }
    steps as f64 * per_step + items
}

fn run_pipeline(
    g: &GlobalArgs,
    cfg: &ExperimentConfig,
    text: &str,
    out: &Path,
    mode: &Mode,
) -> Result<ExitCode> {
    let start = Instant::now();
    let home = quiver_core::assets::quiver_home();
    // Fail on a typo in a task name now, not after an hour of training.
    let source = DataSource::from_spec(&cfg.train.source, &home)?;
    let train_tasks = cfg.train_tasks();
    let held_out = cfg.held_out();
    let mut loaded = BTreeMap::new();
    for t in train_tasks.iter().chain(&held_out) {
        loaded.insert(t.clone(), source.load_task(t)?);
    }
    for t in &held_out {
        if let Some(m) = quiver_core::data::majority_share(&loaded[t]) {
            if m > cfg.eval.max_majority {
                bail!(
                    "held-out task `{t}`: {:.1}% of its items have the same gold answer, above [eval] max_majority = {:.0}%: a route that only learned to give that answer would look like transfer; hold out another task (or raise max_majority and read the table against that baseline)",
                    100.0 * m,
                    100.0 * cfg.eval.max_majority
                );
            }
        }
    }
    let contamination = report::contamination(cfg, &loaded);
    drop(loaded);
    // Experts already trained must have been trained with these settings.
    let train_key = serde_json::to_string(&(&cfg.model, &cfg.train, &cfg.library, &cfg.families))?;
    let key_path = out.join("train-settings.json");
    if let Ok(old) = std::fs::read_to_string(&key_path) {
        if old != train_key {
            bail!(
                "{} holds experts trained with other [train]/[library]/[families] settings; use another --out or delete it",
                out.display()
            );
        }
    }
    let est = estimate_seconds(cfg, out);
    if !g.quiet {
        eprintln!(
            "experiment `{}`: {} training tasks in {} families, {} held-out siblings, k = {}, {} routes{}; output in {}",
            cfg.name,
            train_tasks.len(),
            cfg.families.len(),
            held_out.len(),
            cfg.library.k,
            cfg.eval.routes.len(),
            if cfg.eval.tasks.is_empty() {
                String::new()
            } else {
                format!(" (also on {} more tasks)", cfg.eval.tasks.len())
            },
            out.display()
        );
        if !contamination.is_empty() {
            for c in &contamination {
                eprintln!(
                    "warning: {} of {}'s inputs also occur in library task {}",
                    c.overlapping, c.held_out, c.library_task
                );
            }
        } else if !held_out.is_empty() {
            eprintln!("no held-out sibling's input occurs in a library task's data");
        }
        eprintln!(
            "estimated time: about {:.0} min on a 2-core CPU (less when steps are already done)",
            (est / 60.0).ceil()
        );
    }
    let ctx = plan::Ctx {
        cfg,
        out,
        contamination: &contamination,
    };
    let phases = plan::phases(cfg);
    if let Some((phase, index)) = mode.unit {
        // One unit of work, as a job array element runs it.
        let units = &phases
            .iter()
            .find(|(p, _)| *p == phase)
            .expect("every phase is planned")
            .1;
        let unit = units.get(index).with_context(|| {
            format!(
                "phase {} has {} units of work (indices 0 to {}), not {index}",
                phase.name(),
                units.len(),
                units.len().saturating_sub(1)
            )
        })?;
        std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
        run_unit(g, &ctx, unit)?;
        return Ok(ExitCode::SUCCESS);
    }
    match mode.executor {
        Executor::Local => {}
        Executor::Slurm => {
            let submit = slurm::Submit {
                ctx: &ctx,
                phases: &phases,
                text,
                library_root: mode.library_root.as_deref(),
                key: (&key_path, &train_key),
            };
            if mode.dry_run {
                slurm::dry_run(&submit)?;
                return Ok(ExitCode::SUCCESS);
            }
            slurm::run(g, &submit)?;
            return finish(g, &ctx, start);
        }
        Executor::K8s => {
            let dir = mode
                .emit
                .as_deref()
                .context("--executor k8s needs --emit DIR: where to write the manifests")?;
            k8s::emit(&ctx, &phases, text, mode.library_root.as_deref(), dir)?;
            return Ok(ExitCode::SUCCESS);
        }
    }
    if mode.dry_run {
        for (phase, units) in &phases {
            for u in units {
                match plan::train_step(&ctx, u) {
                    Ok(Some(s)) => eprintln!(
                        "\n== [{}] {}\n$ quiver {}",
                        phase.name(),
                        s.what,
                        command_line(&s.args)
                    ),
                    Ok(None) => {}
                    // Its command depends on an earlier phase's output.
                    Err(_) => eprintln!("\n== [{}] {}", phase.name(), plan::describe(&ctx, u)),
                }
            }
        }
        eprintln!(
            "\n(then one `quiver eval` per route and table: {})",
            cfg.routes()
                .iter()
                .map(|r| r.label.clone())
                .collect::<Vec<_>>()
                .join(", ")
        );
        return Ok(ExitCode::SUCCESS);
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    write_atomic(&key_path, train_key.as_bytes())?;
    write_atomic(&out.join("experiment.toml"), text.as_bytes())?;
    for (_, units) in &phases {
        for u in units {
            run_unit(g, &ctx, u)?;
            // An interrupted run shows what it has.
            if matches!(u, plan::Unit::Eval(_)) {
                assemble(&ctx, true)?.write()?;
            }
        }
    }
    finish(g, &ctx, start)
}

/// Runs one unit of work unless its output is there.
fn run_unit(g: &GlobalArgs, ctx: &plan::Ctx, unit: &plan::Unit) -> Result<()> {
    if !matches!(unit, plan::Unit::Eval(_)) && plan::is_done(ctx, unit)? {
        if !g.quiet {
            eprintln!("\n== {}: already done", plan::describe(ctx, unit));
        }
        return Ok(());
    }
    match unit {
        plan::Unit::Link => link_private_shared(ctx.cfg, ctx.out),
        plan::Unit::Eval(kind) => run_eval(g, ctx.out, &plan::eval_job(ctx, kind)?),
        _ => match plan::train_step(ctx, unit)? {
            Some(step) => run_step(g, &step),
            None => Ok(()),
        },
    }
}

/// Writes the results from what the output directory holds (every
/// evaluation must be there) and prints the table.
fn finish(g: &GlobalArgs, ctx: &plan::Ctx, start: Instant) -> Result<ExitCode> {
    let md = assemble(ctx, false)?.write()?;
    println!("{md}");
    if !g.quiet {
        eprintln!(
            "wrote {} and {} ({:.0} s)",
            ctx.out.join("results.md").display(),
            ctx.out.join("results.json").display(),
            start.elapsed().as_secs_f64()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The results from the stored evaluations, whoever ran them (this process,
/// a job array element, a pod). With `allow_missing`, rows not evaluated
/// yet are left out; without it a missing evaluation is an error naming it.
fn assemble<'a>(ctx: &plan::Ctx<'a>, allow_missing: bool) -> Result<report::Results<'a>> {
    use plan::EvalKind;
    let (cfg, out) = (ctx.cfg, ctx.out);
    let mut results = report::Results::new(cfg, out, ctx.contamination.to_vec());
    results.load_clusterings()?;
    let get = |kind: EvalKind| -> Result<Option<EvalOut>> {
        let job = match plan::eval_job(ctx, &kind) {
            Ok(j) => j,
            Err(_) if allow_missing => return Ok(None),
            Err(e) => return Err(e),
        };
        match stored_eval(out, &job)? {
            Some(e) => Ok(Some(e)),
            None if allow_missing => Ok(None),
            None => bail!(
                "{} is missing ({}): run the experiment again to make it",
                job.what,
                eval_files(out, &job.slug).report.display()
            ),
        }
    };
    let train_tasks = cfg.train_tasks();
    if !cfg.families.is_empty() && cfg.eval.own_limit > 0 {
        if let Some(base) = get(EvalKind::OwnBase)? {
            let mut expert = Row::new("private expert");
            let mut complete = true;
            for t in &train_tasks {
                match get(EvalKind::OwnExpert(t.clone()))? {
                    Some(e) => expert.absorb(cells(&e)),
                    None => complete = false,
                }
            }
            if complete {
                let mut base_row = Row::new("base");
                base_row.absorb(cells(&base));
                results.own = Some((base_row, expert));
            }
        }
    }
    let routes = cfg.routes();
    let held_out = cfg.held_out();
    if !held_out.is_empty() {
        for (i, r) in routes.iter().enumerate() {
            let mut row = Row::new(&r.label);
            let mut complete = true;
            match &r.kind {
                RowKind::Plain { .. } => match get(EvalKind::HeldOut(i))? {
                    Some(e) => {
                        row.routing = e.routing.clone();
                        row.absorb(cells(&e));
                    }
                    None => complete = false,
                },
                RowKind::FamilyOracle | RowKind::TaskOracle => {
                    let choice = if r.kind == RowKind::FamilyOracle {
                        match plan::family_choices(ctx) {
                            Ok(c) => Some(c),
                            Err(_) if allow_missing => None,
                            Err(e) => return Err(e),
                        }
                    } else {
                        None
                    };
                    for h in &held_out {
                        let (kind, name) = if r.kind == RowKind::TaskOracle {
                            (EvalKind::TaskOracle(i, h.clone()), expert_name_for_task(h))
                        } else {
                            let name = choice
                                .as_ref()
                                .and_then(|c| c.get(h))
                                .map(|(n, _)| n.clone())
                                .unwrap_or_default();
                            (EvalKind::FamilyOracle(i, h.clone()), name)
                        };
                        match get(kind)? {
                            Some(e) => {
                                row.notes.insert(h.clone(), name);
                                row.absorb(cells(&e));
                            }
                            None => complete = false,
                        }
                    }
                }
            }
            if complete {
                results.held_out.push(row);
            }
        }
    }
    if !cfg.eval.tasks.is_empty() {
        for (i, r) in routes.iter().enumerate() {
            if matches!(r.kind, RowKind::Plain { .. }) {
                if let Some(e) = get(EvalKind::Extra(i))? {
                    let mut row = Row::new(&r.label);
                    row.absorb(cells(&e));
                    results.extra.push((row, e.report));
                }
            }
        }
    }
    Ok(results)
}
