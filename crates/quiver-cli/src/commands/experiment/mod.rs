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
mod report;

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
use commands::{expert_args, lib_uri, library_size, route_args, train_data};
pub use config::ExperimentConfig;
use config::{Lib, RouteSpec, RowKind};
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
            select_limit, own_limit\n\n\
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
    /// Print the plan and the commands, run nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Output directory (default: $QUIVER_HOME/runs/demo). A second run reuses what is there.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the plan and the commands, run nothing.
    #[arg(long)]
    pub dry_run: bool,
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

/// Runs `quiver eval ARGS` unless the same command already ran (its
/// report and predictions are stored), and returns its outcome.
fn run_eval(
    g: &GlobalArgs,
    out: &Path,
    slug: &str,
    what: &str,
    args: &[String],
    routing: bool,
) -> Result<EvalOut> {
    let f = eval_files(out, slug);
    let stored: Option<StoredEval> = std::fs::read_to_string(&f.report)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let have_files = f.predictions.exists() && (!routing || f.routing.exists());
    let report = match stored {
        Some(s) if s.command == args && have_files => {
            if !g.quiet {
                eprintln!("\n== {what}: already done ({})", f.report.display());
            }
            s.report
        }
        _ => {
            let dir = out.join("eval");
            std::fs::create_dir_all(&dir)?;
            let tmp_report = dir.join(format!(".{slug}.report.json"));
            let tmp_pred = dir.join(format!(".{slug}.predictions.jsonl"));
            let tmp_routing = dir.join(format!(".{slug}.routing.json"));
            let mut full = args.to_vec();
            full.extend(["--json".into(), tmp_report.display().to_string()]);
            full.extend(["--predictions".into(), tmp_pred.display().to_string()]);
            if routing {
                full.extend([
                    "--routing-summary".into(),
                    tmp_routing.display().to_string(),
                ]);
            }
            run_step(
                g,
                &Step {
                    what: what.to_string(),
                    args: full,
                    log: out.join("logs").join(format!("eval-{slug}.txt")),
                },
            )?;
            let report: EvalReport = serde_json::from_str(
                &std::fs::read_to_string(&tmp_report)
                    .with_context(|| format!("cannot read {}", tmp_report.display()))?,
            )?;
            std::fs::rename(&tmp_pred, &f.predictions)?;
            if routing {
                std::fs::rename(&tmp_routing, &f.routing)?;
            }
            let stored = StoredEval {
                command: args.to_vec(),
                report: report.clone(),
            };
            write_atomic(&f.report, serde_json::to_string_pretty(&stored)?.as_bytes())?;
            let _ = std::fs::remove_file(&tmp_report);
            report
        }
    };
    let items = read_items(&f.predictions)?;
    let routing = if routing {
        let text = std::fs::read_to_string(&f.routing)
            .with_context(|| format!("cannot read {}", f.routing.display()))?;
        Some(serde_json::from_str(&text).with_context(|| format!("{}", f.routing.display()))?)
    } else {
        None
    };
    Ok(EvalOut {
        report,
        items,
        routing,
    })
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
    let mut cfg = ExperimentConfig::parse(&text, &a.config.display().to_string())?;
    if a.library_root.is_some() {
        cfg.library.root = a.library_root.clone();
    }
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(&cfg.name));
    run_pipeline(g, &cfg, &text, &out, a.dry_run)
}

pub fn run_demo(g: &GlobalArgs, a: DemoArgs) -> Result<ExitCode> {
    let cfg = ExperimentConfig::parse(DEMO_CONFIG, "configs/demo.toml")?;
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| quiver_core::assets::quiver_home().join("runs").join("demo"));
    run_pipeline(g, &cfg, DEMO_CONFIG, &out, a.dry_run)
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

/// The table of held-out siblings (test items of their own split).
fn held_out_table(cfg: &ExperimentConfig, contamination: &[report::Contamination]) -> TableSpec {
    TableSpec {
        tasks: cfg.held_out(),
        split: "test".into(),
        fractions: Some(cfg.held_out_fractions()),
        limit: cfg.eval.held_out_limit,
        data: train_data(cfg),
        seed: cfg.eval.seed,
        exclude: contaminating(cfg, contamination),
    }
}

/// The library tasks some held-out input occurs in.
fn contaminating(cfg: &ExperimentConfig, c: &[report::Contamination]) -> Vec<String> {
    cfg.train_tasks()
        .into_iter()
        .filter(|t| c.iter().any(|x| &x.library_task == t))
        .collect()
}

fn run_pipeline(
    g: &GlobalArgs,
    cfg: &ExperimentConfig,
    text: &str,
    out: &Path,
    dry_run: bool,
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
    let logs = out.join("logs");
    let libs = cfg.libraries();
    let lib_path = |l: Lib| lib_uri(cfg, out, l);
    let guard: Vec<String> = if held_out.is_empty() {
        Vec::new()
    } else {
        vec!["--held-out".into(), held_out.join(",")]
    };
    let mut steps: Vec<Step> = Vec::new();
    let tasks = train_tasks.join(",");
    if libs.contains(&Lib::Private) {
        let mut args = vec![
            "train".to_string(),
            "--library".into(),
            lib_path(Lib::Private),
        ];
        args.extend(["--tasks".into(), tasks.clone()]);
        args.extend(guard.clone());
        args.extend(cfg.train_flags(cfg.train.steps));
        steps.push(Step {
            what: format!(
                "private library: one expert per task ({} tasks)",
                train_tasks.len()
            ),
            args,
            log: logs.join("train-private.jsonl"),
        });
    }
    let cluster_steps = cfg.train.cluster_steps.unwrap_or(cfg.train.steps);
    let mut cluster_files: BTreeMap<Lib, PathBuf> = BTreeMap::new();
    let cluster_args = |method: &str, embed: &str, file: &Path| {
        vec![
            "cluster".to_string(),
            "--library".into(),
            lib_path(Lib::Private),
            "--method".into(),
            method.into(),
            "--k".into(),
            cfg.library.k.to_string(),
            "--seed".into(),
            cfg.library.seed.to_string(),
            "--embed".into(),
            embed.into(),
            "--out".into(),
            file.display().to_string(),
        ]
    };
    for (lib, method) in [(Lib::Mbc, "mbc"), (Lib::Random, "random")] {
        if !libs.contains(&lib) {
            continue;
        }
        let file = out.join(format!("clusters-{method}.json"));
        let mut args = cluster_args(method, &cfg.library.embed, &file);
        if lib == Lib::Mbc {
            args.extend([
                "--plot".into(),
                out.join("clusters-mbc.png").display().to_string(),
            ]);
        }
        if !file.exists() {
            steps.push(Step {
                what: format!(
                    "{method} clusters of the private experts (k = {})",
                    cfg.library.k
                ),
                args,
                log: logs.join(format!("cluster-{method}.jsonl")),
            });
        }
        cluster_files.insert(lib, file);
    }
    // The other embedding, for the record: how well each recovers the families.
    let other_embed = if cfg.library.embed == "delta" {
        "weights"
    } else {
        "delta"
    };
    let other_file = out.join(format!("clusters-mbc-{other_embed}.json"));
    if libs.contains(&Lib::Mbc) && !cfg.families.is_empty() && !other_file.exists() {
        steps.push(Step {
            what: format!("MBC clusters with --embed {other_embed}, for comparison (not trained)"),
            args: cluster_args("mbc", other_embed, &other_file),
            log: logs.join(format!("cluster-mbc-{other_embed}.jsonl")),
        });
    }
    for (lib, file) in &cluster_files {
        let mut args = vec![
            "train".to_string(),
            "--library".into(),
            lib_path(*lib),
            "--clusters".into(),
            file.display().to_string(),
        ];
        args.extend(guard.clone());
        args.extend(cfg.train_flags(cluster_steps));
        steps.push(Step {
            what: format!("{} library: one expert per cluster", lib.dir()),
            args,
            log: logs.join(format!("train-{}.jsonl", lib.dir())),
        });
    }
    if libs.contains(&Lib::Shared) {
        let mut args = vec![
            "train".to_string(),
            "--library".into(),
            lib_path(Lib::Shared),
            "--shared".into(),
            "shared".into(),
            "--tasks".into(),
            tasks.clone(),
        ];
        args.extend(guard.clone());
        args.extend(cfg.train_flags(cfg.train.shared_steps.unwrap_or(cluster_steps)));
        steps.push(Step {
            what: "shared expert on the union of the training tasks".into(),
            args,
            log: logs.join("train-shared.jsonl"),
        });
    }
    // The task oracles train only when their row is evaluated (last in
    // most configs), so the routes before it report sooner.
    let oracle_step = libs.contains(&Lib::Oracle).then(|| {
        let fr = cfg.held_out_fractions();
        let mut args = vec![
            "train".to_string(),
            "--library".into(),
            lib_path(Lib::Oracle),
            "--tasks".into(),
            held_out.join(","),
            "--split-fractions".into(),
            format!("{},{}", fr.train, fr.validation),
        ];
        args.extend(cfg.train_flags(cfg.train.oracle_steps.unwrap_or(cfg.train.steps)));
        Step {
            what: "task oracles: one expert per held-out sibling, trained on its own train split (an upper bound, in no library)".into(),
            args,
            log: logs.join("train-oracle.jsonl"),
        }
    });

    if dry_run {
        for s in steps.iter().chain(&oracle_step) {
            eprintln!("\n== {}\n$ quiver {}", s.what, command_line(&s.args));
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
    for s in &steps {
        run_step(g, s)?;
    }
    if libs.contains(&Lib::PrivateShared) {
        link_private_shared(cfg, out)?;
    }

    let mut results = report::Results::new(cfg, out, contamination);
    results.load_clusterings()?;

    // The private experts on their own tasks first: if they do not help
    // there, nothing downstream means anything.
    if !cfg.families.is_empty() && cfg.eval.own_limit > 0 {
        let own = TableSpec {
            tasks: train_tasks.clone(),
            split: "test".into(),
            fractions: None,
            limit: Some(cfg.eval.own_limit),
            data: train_data(cfg),
            seed: cfg.eval.seed,
            exclude: Vec::new(),
        };
        let mut args = vec!["eval".to_string(), "--model".into(), cfg.model.clone()];
        args.extend(own.args(&own.tasks));
        let base = run_eval(
            g,
            out,
            "own-tasks.base",
            "base model on the library tasks' test items",
            &args,
            false,
        )?;
        let (bc, bi) = cells(&base);
        let mut expert = Row::new("private expert");
        for t in &train_tasks {
            let name = expert_name_for_task(t);
            let mut args = expert_args(cfg, out, Lib::Private, &name);
            args.extend(own.args(std::slice::from_ref(t)));
            let e = run_eval(
                g,
                out,
                &format!("own-tasks.{}", slug(&name)),
                &format!("private expert {name} on its own task"),
                &args,
                false,
            )?;
            expert.absorb(cells(&e));
        }
        let mut base_row = Row::new("base");
        base_row.absorb((bc, bi));
        results.own = Some((base_row, expert));
        results.write()?;
    }

    let routes: Vec<RouteSpec> = cfg.routes();
    let mut family_choice: BTreeMap<String, (String, f64)> = BTreeMap::new();
    // Every route on the held-out siblings and on `[eval] tasks`.
    let siblings = held_out_table(cfg, &results.contamination);
    let extra = TableSpec {
        tasks: cfg.eval.tasks.clone(),
        split: cfg.eval.split.clone(),
        fractions: None,
        limit: cfg.eval.limit,
        data: cfg.eval.data.clone(),
        seed: cfg.eval.seed,
        exclude: Vec::new(),
    };
    for r in &routes {
        if !held_out.is_empty() {
            let mut row = Row::new(&r.label);
            match &r.kind {
                RowKind::Plain { .. } => {
                    let mut args = route_args(cfg, out, &r.kind);
                    args.extend(siblings.args(&siblings.tasks));
                    let e = run_eval(
                        g,
                        out,
                        &format!("{}.held-out", slug(&r.label)),
                        &format!("evaluate {} on the held-out siblings", r.label),
                        &args,
                        r.routed(),
                    )?;
                    row.routing = e.routing.clone();
                    row.absorb(cells(&e));
                }
                RowKind::FamilyOracle | RowKind::TaskOracle => {
                    // The family oracle's choices, on the siblings' validation items.
                    if r.kind == RowKind::FamilyOracle && family_choice.is_empty() {
                        let fr = cfg.held_out_fractions();
                        let val = TableSpec {
                            tasks: held_out.clone(),
                            split: "validation".into(),
                            fractions: Some(fr),
                            limit: Some(cfg.eval.select_limit),
                            data: train_data(cfg),
                            seed: cfg.eval.seed,
                            exclude: contaminating(cfg, &results.contamination),
                        };
                        for (fam, f) in &cfg.families {
                            for t in &f.library {
                                let name = expert_name_for_task(t);
                                let mut args = expert_args(cfg, out, Lib::Private, &name);
                                args.extend(val.args(&f.held_out));
                                let e = run_eval(
                            g,
                            out,
                            &format!("select.{}", slug(&name)),
                            &format!(
                                "family oracle ({fam}): {name} on the held-out siblings' validation items"
                            ),
                            &args,
                            false,
                        )?;
                                for r in &e.report.tasks {
                                    let better = family_choice
                                        .get(&r.task)
                                        .is_none_or(|(_, best)| r.score > *best);
                                    if better {
                                        family_choice
                                            .insert(r.task.clone(), (name.clone(), r.score));
                                    }
                                }
                            }
                        }
                    }
                    if r.kind == RowKind::TaskOracle {
                        if let Some(step) = &oracle_step {
                            run_step(g, step)?;
                        }
                    }
                    for h in &held_out {
                        let (lib, name) = if r.kind == RowKind::TaskOracle {
                            (Lib::Oracle, expert_name_for_task(h))
                        } else {
                            let (name, _) = family_choice
                                .get(h)
                                .cloned()
                                .with_context(|| format!("no family oracle chosen for {h}"))?;
                            (Lib::Private, name)
                        };
                        let mut args = expert_args(cfg, out, lib, &name);
                        args.extend(siblings.args(std::slice::from_ref(h)));
                        let e = run_eval(
                            g,
                            out,
                            &format!("{}.{}", slug(&r.label), slug(h)),
                            &format!("{}: {name} on {h}", r.label),
                            &args,
                            false,
                        )?;
                        row.notes.insert(h.clone(), name);
                        row.absorb(cells(&e));
                    }
                }
            }
            results.held_out.push(row);
            results.write()?;
        }
    }
    // Then the further tasks, once every route has its held-out row.
    for r in &routes {
        if !cfg.eval.tasks.is_empty() && matches!(r.kind, RowKind::Plain { .. }) {
            let mut args = route_args(cfg, out, &r.kind);
            args.extend(extra.args(&extra.tasks));
            let e = run_eval(
                g,
                out,
                &slug(&r.label),
                &format!("evaluate {}", r.label),
                &args,
                false,
            )?;
            let mut row = Row::new(&r.label);
            row.absorb(cells(&e));
            results.extra.push((row, e.report));
            results.write()?;
        }
    }
    let md = results.write()?;
    println!("{md}");
    if !g.quiet {
        eprintln!(
            "wrote {} and {} ({:.0} s)",
            out.join("results.md").display(),
            out.join("results.json").display(),
            start.elapsed().as_secs_f64()
        );
    }
    Ok(ExitCode::SUCCESS)
}
