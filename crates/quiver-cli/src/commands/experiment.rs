//! `quiver experiment --config FILE` and `quiver demo`: the paper's whole
//! pipeline (METHOD.md sections 1, 2 and 4) from one TOML file:
//!
//! 1. private experts, one per training task (`quiver train`);
//! 2. MBC clusters of them, and random clusters (`quiver cluster`);
//! 3. one expert per cluster (`quiver train --clusters`), and one shared
//!    expert on all the tasks (`quiver train --shared`);
//! 4. every route of the config evaluated on the held-out tasks
//!    (`quiver eval`), then one table.
//!
//! Each step runs as a child `quiver` process whose command line is
//! printed, so any step can be re-run or changed by hand; their JSON output
//! is kept under `OUT/logs/`. Every step is resumable: experts already in a
//! library are skipped (and a half-trained one resumes from its
//! checkpoint), clusterings and evaluations already written are reused
//! when their command is unchanged.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use quiver_core::data::{is_held_out, DataSource};
use quiver_core::eval::EvalReport;

use crate::args::GlobalArgs;
use quiver_core::fsutil::write_atomic;

/// The demo's configuration, also kept in the repository as
/// `configs/demo.toml`.
pub const DEMO_CONFIG: &str = include_str!("../../../../configs/demo.toml");

#[derive(Debug, Args)]
#[command(after_help = "The TOML file has four tables; `configs/demo.toml` and \
`configs/paper-small.toml` are commented examples:\n\n\
  name = \"...\"                 results go to runs/<name> unless --out is given\n\
  model = \"smollm2-135m\"\n\
  [train]   tasks, source, steps, cluster_steps, shared_steps, lr, batch_size, grad_accum,\n\
            max_input_len, max_target_len, rank, alpha, dropout, target_modules,\n\
            max_eval_examples, seed\n\
  [library] k (clusters), seed\n\
  [eval]    tasks, data, limit, split, seed, top_k, routes\n\n\
A route is ROUTE@LIBRARY with LIBRARY one of private (one expert per task), mbc, random \
(one expert per cluster) or shared; ROUTE is any `quiver eval --route` value (arrow, uniform, \
mu, ...). `base` needs no library and `shared` means expert:shared@shared.")]
pub struct ExperimentArgs {
    /// The experiment's TOML file.
    #[arg(long)]
    pub config: PathBuf,
    /// Output directory: libraries, clusterings, evaluations, results (default: runs/<name>).
    #[arg(long)]
    pub out: Option<PathBuf>,
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

#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    pub name: String,
    #[serde(default = "default_model")]
    pub model: String,
    pub train: TrainSection,
    #[serde(default)]
    pub library: LibrarySection,
    pub eval: EvalSection,
}

fn default_model() -> String {
    "smollm2-135m".into()
}

#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Training tasks (never a held-out task).
    pub tasks: Vec<String>,
    /// Where they come from: `bigbench` (default), `olmo` or a JSONL path.
    #[serde(default = "d_source")]
    pub source: String,
    pub steps: usize,
    /// Steps of each cluster expert (default: `steps`).
    pub cluster_steps: Option<usize>,
    /// Steps of the shared expert (default: `cluster_steps`).
    pub shared_steps: Option<usize>,
    #[serde(default = "d_lr")]
    pub lr: f64,
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    #[serde(default = "d_one")]
    pub grad_accum: usize,
    #[serde(default = "d_input")]
    pub max_input_len: usize,
    #[serde(default = "d_target")]
    pub max_target_len: usize,
    #[serde(default = "d_rank")]
    pub rank: usize,
    #[serde(default = "d_alpha")]
    pub alpha: f64,
    #[serde(default = "d_dropout")]
    pub dropout: f64,
    #[serde(default = "d_targets")]
    pub target_modules: String,
    #[serde(default = "d_eval_examples")]
    pub max_eval_examples: usize,
    #[serde(default = "d_seed")]
    pub seed: u64,
}

fn d_source() -> String {
    "bigbench".into()
}
fn d_lr() -> f64 {
    1e-3
}
fn d_batch() -> usize {
    4
}
fn d_one() -> usize {
    1
}
fn d_input() -> usize {
    256
}
fn d_target() -> usize {
    64
}
fn d_rank() -> usize {
    4
}
fn d_alpha() -> f64 {
    16.0
}
fn d_dropout() -> f64 {
    0.05
}
fn d_targets() -> String {
    "q_proj,k_proj,v_proj,o_proj".into()
}
fn d_eval_examples() -> usize {
    32
}
fn d_seed() -> u64 {
    42
}

#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct LibrarySection {
    /// Number of clusters (MBC and random).
    pub k: usize,
    #[serde(default = "d_seed")]
    pub seed: u64,
}

impl Default for LibrarySection {
    fn default() -> Self {
        Self { k: 10, seed: 42 }
    }
}

#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    pub tasks: Vec<String>,
    /// A JSONL file or directory the tasks come from (default: olmo and BIG-bench).
    pub data: Option<String>,
    pub limit: Option<usize>,
    #[serde(default = "d_split")]
    pub split: String,
    #[serde(default)]
    pub seed: u64,
    /// Experts per token for routed routes (capped at the library's size).
    #[serde(default = "d_top_k")]
    pub top_k: usize,
    pub routes: Vec<String>,
}

fn d_split() -> String {
    "validation".into()
}
fn d_top_k() -> usize {
    4
}

/// Which library a route reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Lib {
    Private,
    Mbc,
    Random,
    Shared,
}

impl Lib {
    fn parse(s: &str) -> Result<Lib> {
        Ok(match s {
            "private" => Lib::Private,
            "mbc" => Lib::Mbc,
            "random" => Lib::Random,
            "shared" => Lib::Shared,
            _ => bail!("unknown library `{s}` in a route: expected private, mbc, random or shared"),
        })
    }
    fn dir(self) -> &'static str {
        match self {
            Lib::Private => "private",
            Lib::Mbc => "mbc",
            Lib::Random => "random",
            Lib::Shared => "shared",
        }
    }
}

/// One row of the results: a route on a library.
#[derive(Debug, Clone)]
struct RouteSpec {
    label: String,
    route: String,
    lib: Option<Lib>,
}

fn parse_route(s: &str) -> Result<RouteSpec> {
    let s = s.trim();
    if s == "base" {
        return Ok(RouteSpec {
            label: "base".into(),
            route: "base".into(),
            lib: None,
        });
    }
    if s == "shared" {
        return Ok(RouteSpec {
            label: "shared".into(),
            route: "expert:shared".into(),
            lib: Some(Lib::Shared),
        });
    }
    let (route, lib) = s.split_once('@').with_context(|| {
        format!("route `{s}`: expected ROUTE@LIBRARY (e.g. arrow@mbc), `base` or `shared`")
    })?;
    route
        .parse::<quiver_core::routing::Route>()
        .with_context(|| format!("route `{s}`"))?;
    Ok(RouteSpec {
        label: s.to_string(),
        route: route.to_string(),
        lib: Some(Lib::parse(lib)?),
    })
}

impl ExperimentConfig {
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let cfg: ExperimentConfig = toml::from_str(text).map_err(|e| {
            // toml's Display draws the line with a caret over several lines;
            // one sentence with the line number reads better in an error.
            let line = e
                .span()
                .map(|s| {
                    format!(
                        " (line {})",
                        text[..s.start.min(text.len())].lines().count().max(1)
                    )
                })
                .unwrap_or_default();
            anyhow::anyhow!(
                "{origin}: not a valid experiment file{line}: {}",
                e.message().trim().replace('\n', " ")
            )
        })?;
        cfg.validate(origin)?;
        Ok(cfg)
    }

    fn validate(&self, origin: &str) -> Result<()> {
        if self.train.tasks.is_empty() {
            bail!("{origin}: [train] tasks is empty");
        }
        for t in &self.train.tasks {
            if is_held_out(t) {
                bail!("{origin}: training task `{t}` is a held-out evaluation task; it must not be trained on");
            }
        }
        if self.eval.tasks.is_empty() || self.eval.routes.is_empty() {
            bail!("{origin}: [eval] needs tasks and routes");
        }
        if self.library.k == 0 || self.library.k > self.train.tasks.len() {
            bail!(
                "{origin}: [library] k = {} must be between 1 and the number of training tasks ({})",
                self.library.k,
                self.train.tasks.len()
            );
        }
        if self.eval.top_k == 0 {
            bail!("{origin}: [eval] top_k must be at least 1");
        }
        for r in &self.eval.routes {
            parse_route(r).with_context(|| format!("{origin}: [eval] routes"))?;
        }
        Ok(())
    }

    fn routes(&self) -> Vec<RouteSpec> {
        self.eval
            .routes
            .iter()
            .map(|r| parse_route(r).expect("validated"))
            .collect()
    }

    /// The libraries the routes need (MBC and random need the private one).
    fn libraries(&self) -> Vec<Lib> {
        let mut libs: Vec<Lib> = self.routes().iter().filter_map(|r| r.lib).collect();
        if libs.iter().any(|l| matches!(l, Lib::Mbc | Lib::Random)) {
            libs.push(Lib::Private);
        }
        libs.sort();
        libs.dedup();
        libs
    }

    fn train_flags(&self, steps: usize) -> Vec<String> {
        let t = &self.train;
        let mut v: Vec<String> = vec![
            "--model".into(),
            self.model.clone(),
            "--source".into(),
            t.source.clone(),
            "--steps".into(),
            steps.to_string(),
            "--lr".into(),
            t.lr.to_string(),
            "--batch-size".into(),
            t.batch_size.to_string(),
            "--grad-accum".into(),
            t.grad_accum.to_string(),
            "--max-input-len".into(),
            t.max_input_len.to_string(),
            "--max-target-len".into(),
            t.max_target_len.to_string(),
            "--rank".into(),
            t.rank.to_string(),
            "--alpha".into(),
            t.alpha.to_string(),
            "--dropout".into(),
            t.dropout.to_string(),
            "--target-modules".into(),
            t.target_modules.clone(),
            "--max-eval-examples".into(),
            t.max_eval_examples.to_string(),
            "--seed".into(),
            t.seed.to_string(),
        ];
        v.extend(["--checkpoint-every".into(), "5".into()]);
        v
    }
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

fn run_step(g: &GlobalArgs, step: &Step) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find the quiver executable")?;
    if !g.quiet {
        eprintln!(
            "\n== {}\n$ quiver {}",
            step.what,
            step.args
                .iter()
                .map(|a| shell_quote(a))
                .collect::<Vec<_>>()
                .join(" ")
        );
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

fn slug(label: &str) -> String {
    label
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

/// Rough wall time on the 2-core CPU this was developed on: a training step
/// of `batch x accum` examples of ~`tokens` tokens at ~150 tokens/s, and
/// ~0.35 s per multiple-choice item (~1 s per generated answer).
fn estimate_seconds(cfg: &ExperimentConfig, out: &Path) -> f64 {
    let t = &cfg.train;
    let per_step = (t.batch_size * t.grad_accum) as f64 * 90.0 / 150.0;
    let have = |lib: &str, name: &str| out.join(lib).join(name).join("quiver_expert.json").exists();
    let mut steps = 0usize;
    let libs = cfg.libraries();
    if libs.contains(&Lib::Private) {
        steps += t
            .tasks
            .iter()
            .filter(|task| !have("private", &quiver_core::expert::expert_name_for_task(task)))
            .count()
            * t.steps;
    }
    let cluster_steps = t.cluster_steps.unwrap_or(t.steps);
    for lib in [Lib::Mbc, Lib::Random] {
        if libs.contains(&lib) {
            let dir = out.join(lib.dir());
            let done = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
            steps += cfg.library.k.saturating_sub(done) * cluster_steps;
        }
    }
    if libs.contains(&Lib::Shared) && !have("shared", "shared") {
        steps += t.shared_steps.unwrap_or(cluster_steps);
    }
    let items = cfg.eval.limit.unwrap_or(500) * cfg.eval.tasks.len();
    let evals = cfg
        .routes()
        .iter()
        .filter(|r| {
            !out.join("eval")
                .join(format!("{}.json", slug(&r.label)))
                .exists()
        })
        .count();
    steps as f64 * per_step + (items * evals) as f64 * 0.35
}

pub fn run_experiment(g: &GlobalArgs, a: ExperimentArgs) -> Result<ExitCode> {
    let text = std::fs::read_to_string(&a.config)
        .with_context(|| format!("cannot read {}", a.config.display()))?;
    let cfg = ExperimentConfig::parse(&text, &a.config.display().to_string())?;
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
    for t in &cfg.train.tasks {
        source.load_task(t)?;
    }
    // Experts already trained must have been trained with these settings.
    let train_key = serde_json::to_string(&(&cfg.model, &cfg.train, &cfg.library))?;
    let key_path = out.join("train-settings.json");
    if let Ok(old) = std::fs::read_to_string(&key_path) {
        if old != train_key {
            bail!(
                "{} holds experts trained with other [train]/[library] settings; use another --out or delete it",
                out.display()
            );
        }
    }
    let est = estimate_seconds(cfg, out);
    if !g.quiet {
        eprintln!(
            "experiment `{}`: {} training tasks, k = {}, {} routes x {} eval tasks{}; output in {}",
            cfg.name,
            cfg.train.tasks.len(),
            cfg.library.k,
            cfg.eval.routes.len(),
            cfg.eval.tasks.len(),
            cfg.eval
                .limit
                .map(|l| format!(" (at most {l} items each)"))
                .unwrap_or_default(),
            out.display()
        );
        eprintln!(
            "estimated time: about {:.0} min on a 2-core CPU (less when steps are already done)",
            (est / 60.0).ceil()
        );
    }
    let logs = out.join("logs");
    let libs = cfg.libraries();
    let lib_path = |l: Lib| out.join(l.dir()).display().to_string();
    let mut steps: Vec<Step> = Vec::new();
    let tasks = cfg.train.tasks.join(",");
    if libs.contains(&Lib::Private) {
        let mut args = vec![
            "train".to_string(),
            "--library".into(),
            lib_path(Lib::Private),
        ];
        args.extend(["--tasks".into(), tasks.clone()]);
        args.extend(cfg.train_flags(cfg.train.steps));
        steps.push(Step {
            what: format!(
                "private library: one expert per task ({} tasks)",
                cfg.train.tasks.len()
            ),
            args,
            log: logs.join("train-private.jsonl"),
        });
    }
    let cluster_steps = cfg.train.cluster_steps.unwrap_or(cfg.train.steps);
    let mut cluster_files: BTreeMap<Lib, PathBuf> = BTreeMap::new();
    for (lib, method) in [(Lib::Mbc, "mbc"), (Lib::Random, "random")] {
        if !libs.contains(&lib) {
            continue;
        }
        let file = out.join(format!("clusters-{method}.json"));
        let mut args = vec![
            "cluster".to_string(),
            "--library".into(),
            lib_path(Lib::Private),
            "--method".into(),
            method.into(),
            "--k".into(),
            cfg.library.k.to_string(),
            "--seed".into(),
            cfg.library.seed.to_string(),
            "--out".into(),
            file.display().to_string(),
        ];
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
    for (lib, file) in &cluster_files {
        let mut args = vec![
            "train".to_string(),
            "--library".into(),
            lib_path(*lib),
            "--clusters".into(),
            file.display().to_string(),
        ];
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
        args.extend(cfg.train_flags(cfg.train.shared_steps.unwrap_or(cluster_steps)));
        steps.push(Step {
            what: "shared expert on the union of the training tasks".into(),
            args,
            log: logs.join("train-shared.jsonl"),
        });
    }

    if dry_run {
        for s in &steps {
            eprintln!("\n== {}\n$ quiver {}", s.what, s.args.join(" "));
        }
        eprintln!(
            "\n(then one `quiver eval` per route: {})",
            cfg.eval.routes.join(", ")
        );
        return Ok(ExitCode::SUCCESS);
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    write_atomic(&key_path, train_key.as_bytes())?;
    write_atomic(&out.join("experiment.toml"), text.as_bytes())?;
    for s in &steps {
        run_step(g, s)?;
    }

    // Evaluations.
    let eval_dir = out.join("eval");
    let mut reports: Vec<(String, EvalReport)> = Vec::new();
    for r in cfg.routes() {
        let mut args = vec![
            "eval".to_string(),
            "--model".into(),
            cfg.model.clone(),
            "--tasks".into(),
            cfg.eval.tasks.join(","),
            "--split".into(),
            cfg.eval.split.clone(),
            "--seed".into(),
            cfg.eval.seed.to_string(),
            "--route".into(),
            r.route.clone(),
        ];
        if let Some(l) = cfg.eval.limit {
            args.extend(["--limit".into(), l.to_string()]);
        }
        if let Some(d) = &cfg.eval.data {
            args.extend(["--data".into(), d.clone()]);
        }
        if let Some(lib) = r.lib {
            args.extend(["--library".into(), lib_path(lib)]);
            let size = std::fs::read_dir(out.join(lib.dir()))
                .map(|d| {
                    d.filter_map(|e| e.ok())
                        .filter(|e| e.path().join("quiver_expert.json").exists())
                        .count()
                })
                .unwrap_or(0);
            let routed = r
                .route
                .parse::<quiver_core::routing::Route>()
                .ok()
                .and_then(|x| x.selector_kind())
                .is_some();
            if routed && size > 0 {
                args.extend(["--top-k".into(), cfg.eval.top_k.min(size).to_string()]);
            }
        }
        let file = eval_dir.join(format!("{}.json", slug(&r.label)));
        let stored: Option<StoredEval> = std::fs::read_to_string(&file)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        let report = match stored {
            Some(s) if s.command == args => {
                if !g.quiet {
                    eprintln!(
                        "\n== evaluate {}: already done ({})",
                        r.label,
                        file.display()
                    );
                }
                s.report
            }
            _ => {
                let tmp = eval_dir.join(format!(".{}.report.json", slug(&r.label)));
                let mut full = args.clone();
                full.extend(["--json".into(), tmp.display().to_string()]);
                run_step(
                    g,
                    &Step {
                        what: format!("evaluate {}", r.label),
                        args: full,
                        log: logs.join(format!("eval-{}.txt", slug(&r.label))),
                    },
                )?;
                let report: EvalReport = serde_json::from_str(
                    &std::fs::read_to_string(&tmp)
                        .with_context(|| format!("cannot read {}", tmp.display()))?,
                )?;
                let stored = StoredEval {
                    command: args.clone(),
                    report: report.clone(),
                };
                write_atomic(&file, serde_json::to_string_pretty(&stored)?.as_bytes())?;
                let _ = std::fs::remove_file(&tmp);
                report
            }
        };
        reports.push((r.label.clone(), report));
    }

    let table = results_table(&reports);
    let results = serde_json::json!({
        "name": cfg.name,
        "model": cfg.model,
        "config": cfg,
        "routes": reports.iter().map(|(l, r)| serde_json::json!({"route": l, "report": r})).collect::<Vec<_>>(),
    });
    write_atomic(
        &out.join("results.json"),
        serde_json::to_string_pretty(&results)?.as_bytes(),
    )?;
    let md = format!(
        "# {}\n\nModel `{}`; {} training tasks; k = {}; eval split `{}`{}; scores in % (acc_norm for multiple choice, exact match for generation), ± standard error of the average.\n\n{}",
        cfg.name,
        cfg.model,
        cfg.train.tasks.len(),
        cfg.library.k,
        cfg.eval.split,
        cfg.eval.limit.map(|l| format!(", at most {l} items per task")).unwrap_or_default(),
        table
    );
    write_atomic(&out.join("results.md"), md.as_bytes())?;
    println!("{table}");
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

/// A markdown table: one row per route, one column per task, and the
/// average with its standard error.
fn results_table(reports: &[(String, EvalReport)]) -> String {
    let Some((_, first)) = reports.first() else {
        return String::new();
    };
    let short = |t: &str| t.split(':').next().unwrap_or(t).to_string();
    let mut s = String::from("| route |");
    for t in &first.tasks {
        s.push_str(&format!(" {} |", short(&t.task)));
    }
    s.push_str(" average |\n|---|");
    for _ in &first.tasks {
        s.push_str("---:|");
    }
    s.push_str("---:|\n");
    for (label, r) in reports {
        s.push_str(&format!("| {label} |"));
        for t in &r.tasks {
            s.push_str(&format!(" {:.1} |", t.score * 100.0));
        }
        // Standard error of the mean of task scores, from each task's stderr.
        let n = r.tasks.len().max(1) as f64;
        let se = (r.tasks.iter().map(|t| t.stderr.powi(2)).sum::<f64>()).sqrt() / n;
        s.push_str(&format!(
            " {:.1} ± {:.1} |\n",
            r.average * 100.0,
            se * 100.0
        ));
    }
    s
}
