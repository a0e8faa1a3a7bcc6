//! The experiment as phases of independent units of work (issue 19): what
//! any executor (this machine, a Slurm job array, a Kubernetes Indexed Job)
//! runs. Every unit is named by its phase and its index, is found again from
//! the config alone (so `quiver experiment --phase P --index I` on another
//! machine does the same work), is skipped when its output already exists,
//! and writes only through the library's crash-safe publishing or a
//! temporary file renamed into place.
//!
//! Phases run in order; the units of one phase are independent of each
//! other and depend only on earlier phases.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use quiver_core::expert::expert_name_for_task;
use quiver_core::library::ExpertLibrary;

use super::commands::{expert_args, lib_uri, route_args, train_data};
use super::config::{ExperimentConfig, Lib, RouteSpec, RowKind};
use super::{report, slug, stored_eval, Step, TableSpec};

/// A phase: a set of units that can all run at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Phase {
    /// One private expert per training task.
    TrainPrivate,
    /// MBC and random clusterings of the private experts.
    Cluster,
    /// One expert per cluster, the shared expert and the task oracles.
    TrainLibrary,
    /// The private+shared library (GenKnowSub).
    Link,
    /// Every evaluation that needs only trained experts.
    Eval,
    /// The family oracle's evaluations (they need the `eval` phase's choice).
    EvalOracle,
}

impl Phase {
    pub const ALL: [Phase; 6] = [
        Phase::TrainPrivate,
        Phase::Cluster,
        Phase::TrainLibrary,
        Phase::Link,
        Phase::Eval,
        Phase::EvalOracle,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::TrainPrivate => "train-private",
            Phase::Cluster => "cluster",
            Phase::TrainLibrary => "train-library",
            Phase::Link => "link",
            Phase::Eval => "eval",
            Phase::EvalOracle => "eval-oracle",
        }
    }
}

/// Which evaluation.
#[derive(Debug, Clone, PartialEq)]
pub enum EvalKind {
    /// The base model on the library tasks' test items.
    OwnBase,
    /// A private expert on its own task.
    OwnExpert(String),
    /// A library task's private expert on its family's held-out siblings'
    /// validation items (the family oracle's choice).
    Select(String),
    /// Route `i` (plain) on the held-out siblings.
    HeldOut(usize),
    /// Route `i` (task oracle) on held-out sibling `h`.
    TaskOracle(usize, String),
    /// Route `i` (family oracle) on held-out sibling `h`.
    FamilyOracle(usize, String),
    /// Route `i` (plain) on `[eval] tasks`.
    Extra(usize),
}

/// One unit of work.
#[derive(Debug, Clone, PartialEq)]
pub enum Unit {
    TrainPrivate(String),
    /// A clustering: MBC (the configured embedding), random, or MBC with the
    /// other embedding (for the record, not trained).
    Cluster(ClusterKind),
    /// Cluster number `i` (in name order) of the MBC or random clustering.
    TrainCluster(Lib, usize),
    TrainShared,
    TrainOracle(String),
    Link,
    Eval(EvalKind),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ClusterKind {
    Mbc,
    Random,
    OtherEmbed,
}

impl ClusterKind {
    /// The clustering a cluster library (MBC or random) is trained from.
    fn of(lib: Lib) -> ClusterKind {
        if lib == Lib::Mbc {
            ClusterKind::Mbc
        } else {
            ClusterKind::Random
        }
    }
}

/// What a unit needs besides the config: the output directory and which
/// held-out inputs occur in library tasks.
pub struct Ctx<'a> {
    pub cfg: &'a ExperimentConfig,
    pub out: &'a Path,
    pub contamination: &'a [report::Contamination],
}

/// Every phase with its units, from the config alone (the same on every
/// machine, whatever has run already).
pub fn phases(cfg: &ExperimentConfig) -> Vec<(Phase, Vec<Unit>)> {
    let libs = cfg.libraries();
    let held_out = cfg.held_out();
    let routes = cfg.routes();
    let mut v = Vec::new();
    let mut train = Vec::new();
    if libs.contains(&Lib::Private) {
        train.extend(cfg.train_tasks().into_iter().map(Unit::TrainPrivate));
    }
    v.push((Phase::TrainPrivate, train));
    let mut cluster = Vec::new();
    if libs.contains(&Lib::Mbc) {
        cluster.push(Unit::Cluster(ClusterKind::Mbc));
    }
    if libs.contains(&Lib::Random) {
        cluster.push(Unit::Cluster(ClusterKind::Random));
    }
    if libs.contains(&Lib::Mbc) && !cfg.families.is_empty() {
        cluster.push(Unit::Cluster(ClusterKind::OtherEmbed));
    }
    v.push((Phase::Cluster, cluster));
    let mut lib_units = Vec::new();
    for lib in [Lib::Mbc, Lib::Random] {
        if libs.contains(&lib) {
            lib_units.extend((0..cfg.library.k).map(|i| Unit::TrainCluster(lib, i)));
        }
    }
    if libs.contains(&Lib::Shared) {
        lib_units.push(Unit::TrainShared);
    }
    if libs.contains(&Lib::Oracle) {
        lib_units.extend(held_out.iter().cloned().map(Unit::TrainOracle));
    }
    v.push((Phase::TrainLibrary, lib_units));
    let link = if libs.contains(&Lib::PrivateShared) {
        vec![Unit::Link]
    } else {
        Vec::new()
    };
    v.push((Phase::Link, link));
    let mut eval = Vec::new();
    if !cfg.families.is_empty() && cfg.eval.own_limit > 0 {
        eval.push(Unit::Eval(EvalKind::OwnBase));
        eval.extend(
            cfg.train_tasks()
                .into_iter()
                .map(|t| Unit::Eval(EvalKind::OwnExpert(t))),
        );
    }
    let mut oracle = Vec::new();
    if !held_out.is_empty() {
        for (i, r) in routes.iter().enumerate() {
            match r.kind {
                RowKind::Plain { .. } => eval.push(Unit::Eval(EvalKind::HeldOut(i))),
                RowKind::TaskOracle => eval.extend(
                    held_out
                        .iter()
                        .map(|h| Unit::Eval(EvalKind::TaskOracle(i, h.clone()))),
                ),
                RowKind::FamilyOracle => {
                    if oracle.is_empty() {
                        // The choice, made once for every family-oracle row.
                        for f in cfg.families.values() {
                            eval.extend(
                                f.library
                                    .iter()
                                    .map(|t| Unit::Eval(EvalKind::Select(t.clone()))),
                            );
                        }
                    }
                    oracle.extend(
                        held_out
                            .iter()
                            .map(|h| Unit::Eval(EvalKind::FamilyOracle(i, h.clone()))),
                    );
                }
            }
        }
    }
    if !cfg.eval.tasks.is_empty() {
        for (i, r) in routes.iter().enumerate() {
            if matches!(r.kind, RowKind::Plain { .. }) {
                eval.push(Unit::Eval(EvalKind::Extra(i)));
            }
        }
    }
    v.push((Phase::Eval, eval));
    v.push((Phase::EvalOracle, oracle));
    v
}

/// The held-out siblings' test items (inputs that occur in a library task
/// left out).
pub fn held_out_table(
    cfg: &ExperimentConfig,
    contamination: &[report::Contamination],
) -> TableSpec {
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
pub fn contaminating(cfg: &ExperimentConfig, c: &[report::Contamination]) -> Vec<String> {
    cfg.train_tasks()
        .into_iter()
        .filter(|t| c.iter().any(|x| &x.library_task == t))
        .collect()
}

/// The library tasks' test items (the experts on their own tasks).
fn own_table(cfg: &ExperimentConfig) -> TableSpec {
    TableSpec {
        tasks: cfg.train_tasks(),
        split: "test".into(),
        fractions: None,
        limit: Some(cfg.eval.own_limit),
        data: train_data(cfg),
        seed: cfg.eval.seed,
        exclude: Vec::new(),
    }
}

/// The `[eval] tasks` table.
fn extra_table(cfg: &ExperimentConfig) -> TableSpec {
    TableSpec {
        tasks: cfg.eval.tasks.clone(),
        split: cfg.eval.split.clone(),
        fractions: None,
        limit: cfg.eval.limit,
        data: cfg.eval.data.clone(),
        seed: cfg.eval.seed,
        exclude: Vec::new(),
    }
}

/// One `quiver eval`: where its results are stored, what it is, its
/// arguments, and whether it records routing weights.
pub struct EvalJob {
    pub slug: String,
    pub what: String,
    pub args: Vec<String>,
    pub routing: bool,
}

/// The evaluation `kind`'s command. The family oracle's needs the choices
/// made on the validation items (`family_choices`).
pub fn eval_job(ctx: &Ctx, kind: &EvalKind) -> Result<EvalJob> {
    let (cfg, out) = (ctx.cfg, ctx.out);
    let routes: Vec<RouteSpec> = cfg.routes();
    let siblings = held_out_table(cfg, ctx.contamination);
    let plain = |what: String, slug: String, args: Vec<String>| EvalJob {
        slug,
        what,
        args,
        routing: false,
    };
    Ok(match kind {
        EvalKind::OwnBase => {
            let own = own_table(cfg);
            let mut args = vec!["eval".to_string(), "--model".into(), cfg.model.clone()];
            args.extend(own.args(&own.tasks));
            plain(
                "base model on the library tasks' test items".into(),
                "own-tasks.base".into(),
                args,
            )
        }
        EvalKind::OwnExpert(t) => {
            let own = own_table(cfg);
            let name = expert_name_for_task(t);
            let mut args = expert_args(cfg, out, Lib::Private, &name);
            args.extend(own.args(std::slice::from_ref(t)));
            plain(
                format!("private expert {name} on its own task"),
                format!("own-tasks.{}", slug(&name)),
                args,
            )
        }
        EvalKind::Select(t) => {
            let fam = cfg
                .family_of(t)
                .with_context(|| format!("{t} is in no family"))?;
            let f = &cfg.families[fam];
            let val = TableSpec {
                tasks: f.held_out.clone(),
                split: "validation".into(),
                fractions: Some(cfg.held_out_fractions()),
                limit: Some(cfg.eval.select_limit),
                data: train_data(cfg),
                seed: cfg.eval.seed,
                exclude: contaminating(cfg, ctx.contamination),
            };
            let name = expert_name_for_task(t);
            let mut args = expert_args(cfg, out, Lib::Private, &name);
            args.extend(val.args(&f.held_out));
            plain(
                format!("family oracle ({fam}): {name} on the held-out siblings' validation items"),
                format!("select.{}", slug(&name)),
                args,
            )
        }
        EvalKind::HeldOut(i) => {
            let r = &routes[*i];
            let mut args = route_args(cfg, out, &r.kind);
            args.extend(siblings.args(&siblings.tasks));
            EvalJob {
                slug: format!("{}.held-out", slug(&r.label)),
                what: format!("evaluate {} on the held-out siblings", r.label),
                args,
                routing: r.routed(),
            }
        }
        EvalKind::TaskOracle(i, h) | EvalKind::FamilyOracle(i, h) => {
            let r = &routes[*i];
            let (lib, name) = if matches!(kind, EvalKind::TaskOracle(..)) {
                (Lib::Oracle, expert_name_for_task(h))
            } else {
                let choice = family_choices(ctx)?;
                let (name, _) = choice
                    .get(h)
                    .cloned()
                    .with_context(|| format!("no family oracle chosen for {h}: its family's validation evaluations (phase eval) are missing"))?;
                (Lib::Private, name)
            };
            let mut args = expert_args(cfg, out, lib, &name);
            args.extend(siblings.args(std::slice::from_ref(h)));
            plain(
                format!("{}: {name} on {h}", r.label),
                format!("{}.{}", slug(&r.label), slug(h)),
                args,
            )
        }
        EvalKind::Extra(i) => {
            let r = &routes[*i];
            let extra = extra_table(cfg);
            let mut args = route_args(cfg, out, &r.kind);
            args.extend(extra.args(&extra.tasks));
            plain(format!("evaluate {}", r.label), slug(&r.label), args)
        }
    })
}

/// Per held-out sibling, the library expert of its family that scores best
/// on its validation items (ties: the first in the config), from the stored
/// `select.*` evaluations; an error names the first one missing.
pub fn family_choices(ctx: &Ctx) -> Result<BTreeMap<String, (String, f64)>> {
    let mut choice: BTreeMap<String, (String, f64)> = BTreeMap::new();
    for f in ctx.cfg.families.values() {
        for t in &f.library {
            let job = eval_job(ctx, &EvalKind::Select(t.clone()))?;
            let Some(e) = stored_eval(ctx.out, &job)? else {
                bail!(
                    "{} is missing: run phase eval first",
                    super::eval_files(ctx.out, &job.slug).report.display()
                );
            };
            let name = expert_name_for_task(t);
            for r in &e.report.tasks {
                if choice.get(&r.task).is_none_or(|(_, best)| r.score > *best) {
                    choice.insert(r.task.clone(), (name.clone(), r.score));
                }
            }
        }
    }
    Ok(choice)
}

/// The clustering file of MBC or random clusters.
pub fn cluster_file(out: &Path, kind: ClusterKind, cfg: &ExperimentConfig) -> PathBuf {
    match kind {
        ClusterKind::Mbc => out.join("clusters-mbc.json"),
        ClusterKind::Random => out.join("clusters-random.json"),
        ClusterKind::OtherEmbed => out.join(format!("clusters-mbc-{}.json", other_embed(cfg))),
    }
}

fn other_embed(cfg: &ExperimentConfig) -> &'static str {
    if cfg.library.embed == "delta" {
        "weights"
    } else {
        "delta"
    }
}

fn guard(cfg: &ExperimentConfig) -> Vec<String> {
    let held_out = cfg.held_out();
    if held_out.is_empty() {
        Vec::new()
    } else {
        vec!["--held-out".into(), held_out.join(",")]
    }
}

fn has_expert(cfg: &ExperimentConfig, out: &Path, lib: Lib, name: &str) -> Result<bool> {
    match ExpertLibrary::open(&lib_uri(cfg, out, lib)) {
        Ok(l) => Ok(l.contains(name)?),
        Err(_) => Ok(false),
    }
}

/// The cluster names of a clustering file, in order (None: not written yet).
fn cluster_names(file: &Path) -> Result<Option<Vec<String>>> {
    if !file.exists() {
        return Ok(None);
    }
    let c = quiver_core::transform::Clustering::load(file)?;
    Ok(Some(c.clusters.keys().cloned().collect()))
}

/// A unit's child command (None: nothing to run, e.g. a cluster index past
/// the number of clusters; `Link` and evaluations are run by the caller).
pub fn train_step(ctx: &Ctx, unit: &Unit) -> Result<Option<Step>> {
    let (cfg, out) = (ctx.cfg, ctx.out);
    let logs = out.join("logs");
    let lib_path = |l: Lib| lib_uri(cfg, out, l);
    let cluster_steps = cfg.train.cluster_steps.unwrap_or(cfg.train.steps);
    Ok(Some(match unit {
        Unit::TrainPrivate(t) => {
            let mut args = vec![
                "train".to_string(),
                "--library".into(),
                lib_path(Lib::Private),
                "--tasks".into(),
                t.clone(),
            ];
            args.extend(guard(cfg));
            args.extend(cfg.train_flags(cfg.train.steps));
            Step {
                what: format!("private expert for {t}"),
                args,
                log: logs.join(format!("train-private.{}.jsonl", slug(t))),
            }
        }
        Unit::Cluster(kind) => {
            let file = cluster_file(out, *kind, cfg);
            let (method, embed) = match kind {
                ClusterKind::Mbc => ("mbc", cfg.library.embed.as_str()),
                ClusterKind::Random => ("random", cfg.library.embed.as_str()),
                ClusterKind::OtherEmbed => ("mbc", other_embed(cfg)),
            };
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
                "--embed".into(),
                embed.into(),
                "--out".into(),
                file.display().to_string(),
            ];
            if *kind == ClusterKind::Mbc {
                args.extend([
                    "--plot".into(),
                    out.join("clusters-mbc.png").display().to_string(),
                ]);
            }
            let what = match kind {
                ClusterKind::OtherEmbed => {
                    format!("MBC clusters with --embed {embed}, for comparison (not trained)")
                }
                _ => format!(
                    "{method} clusters of the private experts (k = {})",
                    cfg.library.k
                ),
            };
            let log = match kind {
                ClusterKind::OtherEmbed => format!("cluster-mbc-{embed}.jsonl"),
                _ => format!("cluster-{method}.jsonl"),
            };
            Step {
                what,
                args,
                log: logs.join(log),
            }
        }
        Unit::TrainCluster(lib, i) => {
            let file = cluster_file(out, ClusterKind::of(*lib), cfg);
            let Some(names) = cluster_names(&file)? else {
                bail!("{} is missing: run phase cluster first", file.display());
            };
            let Some(name) = names.get(*i) else {
                return Ok(None);
            };
            let mut args = vec![
                "train".to_string(),
                "--library".into(),
                lib_path(*lib),
                "--clusters".into(),
                file.display().to_string(),
                "--cluster".into(),
                name.clone(),
            ];
            args.extend(guard(cfg));
            args.extend(cfg.train_flags(cluster_steps));
            Step {
                what: format!("{} library: the expert of {name}", lib.dir()),
                args,
                log: logs.join(format!("train-{}.{name}.jsonl", lib.dir())),
            }
        }
        Unit::TrainShared => {
            let mut args = vec![
                "train".to_string(),
                "--library".into(),
                lib_path(Lib::Shared),
                "--shared".into(),
                "shared".into(),
                "--tasks".into(),
                cfg.train_tasks().join(","),
            ];
            args.extend(guard(cfg));
            args.extend(cfg.train_flags(cfg.train.shared_steps.unwrap_or(cluster_steps)));
            Step {
                what: "shared expert on the union of the training tasks".into(),
                args,
                log: logs.join("train-shared.jsonl"),
            }
        }
        Unit::TrainOracle(h) => {
            let fr = cfg.held_out_fractions();
            let mut args = vec![
                "train".to_string(),
                "--library".into(),
                lib_path(Lib::Oracle),
                "--tasks".into(),
                h.clone(),
                "--split-fractions".into(),
                format!("{},{}", fr.train, fr.validation),
            ];
            args.extend(cfg.train_flags(cfg.train.oracle_steps.unwrap_or(cfg.train.steps)));
            Step {
                what: format!("task oracle for {h}: trained on its own train split (an upper bound, in no library)"),
                args,
                log: logs.join(format!("train-oracle.{}.jsonl", slug(h))),
            }
        }
        Unit::Link | Unit::Eval(_) => return Ok(None),
    }))
}

/// Whether a unit's output is already there.
pub fn is_done(ctx: &Ctx, unit: &Unit) -> Result<bool> {
    let (cfg, out) = (ctx.cfg, ctx.out);
    Ok(match unit {
        Unit::TrainPrivate(t) => has_expert(cfg, out, Lib::Private, &expert_name_for_task(t))?,
        Unit::Cluster(kind) => cluster_file(out, *kind, cfg).exists(),
        Unit::TrainCluster(lib, i) => {
            match cluster_names(&cluster_file(out, ClusterKind::of(*lib), cfg))? {
                None => false,
                Some(names) => match names.get(*i) {
                    None => true,
                    Some(name) => has_expert(cfg, out, *lib, name)?,
                },
            }
        }
        Unit::TrainShared => has_expert(cfg, out, Lib::Shared, "shared")?,
        Unit::TrainOracle(h) => has_expert(cfg, out, Lib::Oracle, &expert_name_for_task(h))?,
        Unit::Link => {
            let Ok(dst) = ExpertLibrary::open(&lib_uri(cfg, out, Lib::PrivateShared)) else {
                return Ok(false);
            };
            let have = dst.list()?;
            let mut all = true;
            for lib in [Lib::Private, Lib::Shared] {
                let Ok(src) = ExpertLibrary::open(&lib_uri(cfg, out, lib)) else {
                    return Ok(false);
                };
                for e in src.list()? {
                    all &= have.iter().any(|h| h.name == e.name);
                }
            }
            all
        }
        Unit::Eval(kind) => match eval_job(ctx, kind) {
            Ok(job) => stored_eval(out, &job)?.is_some(),
            // The family oracle's choice is not made yet.
            Err(_) => false,
        },
    })
}

/// A short name for a unit, for progress and failures.
pub fn describe(ctx: &Ctx, unit: &Unit) -> String {
    match unit {
        Unit::TrainPrivate(t) => format!("private expert {t}"),
        Unit::Cluster(k) => format!(
            "clustering {}",
            cluster_file(ctx.out, *k, ctx.cfg)
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default()
        ),
        Unit::TrainCluster(lib, i) => format!("{} cluster expert #{i}", lib.dir()),
        Unit::TrainShared => "shared expert".into(),
        Unit::TrainOracle(h) => format!("task oracle {h}"),
        Unit::Link => "private+shared library".into(),
        Unit::Eval(kind) => match eval_job(ctx, kind) {
            Ok(j) => format!("eval {}", j.slug),
            Err(_) => format!("eval {kind:?}"),
        },
    }
}
