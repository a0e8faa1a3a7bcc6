//! The experiment file (`configs/*.toml`): its tables, their defaults, the
//! route grammar, and the checks made before anything runs.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use quiver_core::data::{is_held_out, SplitFractions};

#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    pub name: String,
    #[serde(default = "default_model")]
    pub model: String,
    pub train: TrainSection,
    #[serde(default)]
    pub library: LibrarySection,
    /// Task families: in each, some subtasks go into the library and their
    /// held-out siblings are evaluated zero-shot (the held-out-sibling
    /// design of issue 15). Keyed by family name.
    #[serde(default)]
    pub families: BTreeMap<String, Family>,
    pub eval: EvalSection,
    /// How `--executor slurm` submits each phase.
    #[serde(default)]
    pub slurm: SlurmSection,
    /// What `--executor k8s --emit DIR` writes.
    #[serde(default)]
    pub k8s: K8sSection,
}

fn default_model() -> String {
    "smollm2-135m".into()
}

/// One family of related tasks.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Family {
    /// Subtasks trained into the library (one private expert each).
    pub library: Vec<String>,
    /// Sibling subtasks never trained on (but by the task oracle, which stays
    /// out of every library), evaluated on their test split.
    pub held_out: Vec<String>,
}

#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Training tasks besides the families' library tasks (never a held-out task).
    #[serde(default)]
    pub tasks: Vec<String>,
    /// Where they come from: `olmo+evals` (default), `olmo`, `evals`,
    /// `bigbench:DIR` (a local BIG-bench copy) or a JSONL path.
    #[serde(default = "d_source")]
    pub source: String,
    pub steps: usize,
    /// Steps of each cluster expert (default: `steps`).
    pub cluster_steps: Option<usize>,
    /// Steps of the shared expert (default: `cluster_steps`).
    pub shared_steps: Option<usize>,
    /// Steps of each task oracle (default: `steps`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oracle_steps: Option<usize>,
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
    /// LoRA initialisation: `shared` (default) or `per-expert` (`quiver train --init`).
    #[serde(default = "d_init")]
    pub init: String,
}

fn d_source() -> String {
    "olmo+evals".into()
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
fn d_init() -> String {
    "shared".into()
}
fn d_embed() -> String {
    "delta".into()
}

#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct LibrarySection {
    /// Number of clusters (MBC and random).
    pub k: usize,
    #[serde(default = "d_seed")]
    pub seed: u64,
    /// What MBC flattens: `delta` (default) or `weights` (`quiver cluster --embed`).
    #[serde(default = "d_embed")]
    pub embed: String,
    /// Where the libraries live: a directory or `s3://bucket/prefix` (default:
    /// the output directory); `quiver experiment --library-root` overrides it.
    #[serde(default)]
    pub root: Option<String>,
}

impl Default for LibrarySection {
    fn default() -> Self {
        Self {
            k: 10,
            seed: 42,
            root: None,
            embed: d_embed(),
        }
    }
}

#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    /// Further evaluation tasks (e.g. the paper's seven), a second table.
    #[serde(default)]
    pub tasks: Vec<String>,
    /// A JSONL file or directory `tasks` come from (default: olmo and BIG-bench).
    pub data: Option<String>,
    /// Items per task of `tasks`.
    pub limit: Option<usize>,
    #[serde(default = "d_split")]
    pub split: String,
    #[serde(default)]
    pub seed: u64,
    /// Experts per token for routed routes (capped at the library's size).
    #[serde(default = "d_top_k")]
    pub top_k: usize,
    pub routes: Vec<RouteItem>,
    /// Test items per held-out sibling (default 300; all when a task has fewer).
    #[serde(default = "d_held_out_limit")]
    pub held_out_limit: Option<usize>,
    /// Train and validation fractions of the held-out siblings' split (test gets
    /// the rest): the task oracle trains on train, the family oracle is chosen on
    /// validation, every route is scored on test.
    #[serde(default = "d_held_out_split")]
    pub held_out_split: [f64; 2],
    /// Validation items of a held-out sibling on which the family oracle is chosen.
    #[serde(default = "d_select_limit")]
    pub select_limit: usize,
    /// Test items of each library task on which its private expert is compared
    /// with the base model (0: skip that table).
    #[serde(default = "d_own_limit")]
    pub own_limit: usize,
    /// A held-out sibling whose most common gold answer is more
    /// than this share of its items is refused: a route that only learned to
    /// say that answer would look like transfer (1.0 allows any).
    #[serde(default = "d_max_majority")]
    pub max_majority: f64,
}

fn d_max_majority() -> f64 {
    0.7
}

fn d_split() -> String {
    "validation".into()
}
fn d_top_k() -> usize {
    4
}
fn d_held_out_limit() -> Option<usize> {
    Some(300)
}
fn d_held_out_split() -> [f64; 2] {
    [0.2, 0.1]
}
fn d_select_limit() -> usize {
    100
}
fn d_own_limit() -> usize {
    100
}

/// A route as written in `[eval] routes`: `"ROUTE@LIBRARY"`, `"base"`,
/// `"shared"`, `"family-oracle"`, `"task-oracle"`, or a table with options.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(untagged)]
pub enum RouteItem {
    Text(String),
    Table(RouteTable),
}

#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteTable {
    /// Any `quiver eval --route` value (arrow, uniform, ties, mu, ...).
    pub route: String,
    /// private, mbc, random or shared.
    pub library: String,
    /// Experts per token (default: `[eval] top_k`).
    pub top_k: Option<usize>,
    /// GenKnowSub with the shared expert as the general-knowledge expert.
    #[serde(default)]
    pub gks: bool,
    /// The row's name (default: derived from the others).
    pub label: Option<String>,
}

/// Which library a route reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Lib {
    Private,
    Mbc,
    Random,
    Shared,
    /// Experts trained on the held-out siblings themselves (upper bound).
    Oracle,
    /// The private experts plus the shared one (GenKnowSub's general expert).
    PrivateShared,
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
    pub fn dir(self) -> &'static str {
        match self {
            Lib::Private => "private",
            Lib::Mbc => "mbc",
            Lib::Random => "random",
            Lib::Shared => "shared",
            Lib::Oracle => "oracle",
            Lib::PrivateShared => "private+shared",
        }
    }
}

/// One row of the results.
#[derive(Debug, Clone, PartialEq)]
pub enum RowKind {
    /// One `quiver eval --route ROUTE [--library LIB]` over all tasks.
    Plain {
        route: quiver_core::routing::Route,
        lib: Option<Lib>,
        top_k: Option<usize>,
        gks: bool,
    },
    /// Per held-out sibling: the library expert of its family that scores best
    /// on the sibling's validation items.
    FamilyOracle,
    /// Per held-out sibling: an expert trained on it.
    TaskOracle,
}

#[derive(Debug, Clone)]
pub struct RouteSpec {
    pub label: String,
    pub kind: RowKind,
}

impl RouteSpec {
    /// Whether the route differs token by token (arrow, mu, phatgoose).
    pub fn routed(&self) -> bool {
        match &self.kind {
            RowKind::Plain { route, .. } => route.selector_kind().is_some(),
            _ => false,
        }
    }
}

pub fn parse_route(item: &RouteItem) -> Result<RouteSpec> {
    let plain = |label: String, route: &str, lib: Option<Lib>, top_k, gks| {
        // The same parser as `quiver eval --route`.
        let route = route
            .parse::<quiver_core::routing::Route>()
            .with_context(|| format!("route `{label}`"))?;
        Ok(RouteSpec {
            label,
            kind: RowKind::Plain {
                route,
                lib,
                top_k,
                gks,
            },
        })
    };
    match item {
        RouteItem::Text(s) => {
            let s = s.trim();
            match s {
                "base" => plain("base".into(), "base", None, None, false),
                "shared" => plain(
                    "shared".into(),
                    "expert:shared",
                    Some(Lib::Shared),
                    None,
                    false,
                ),
                "family-oracle" => Ok(RouteSpec {
                    label: s.into(),
                    kind: RowKind::FamilyOracle,
                }),
                "task-oracle" => Ok(RouteSpec {
                    label: s.into(),
                    kind: RowKind::TaskOracle,
                }),
                _ => {
                    let (route, lib) = s.split_once('@').with_context(|| {
                        format!("route `{s}`: expected ROUTE@LIBRARY (e.g. arrow@mbc), `base`, `shared`, `family-oracle` or `task-oracle`")
                    })?;
                    plain(s.to_string(), route, Some(Lib::parse(lib)?), None, false)
                }
            }
        }
        RouteItem::Table(t) => {
            let lib = Lib::parse(&t.library)?;
            if t.gks && lib != Lib::Private {
                bail!("route `{}`: gks = true needs library = \"private\" (the shared expert is subtracted from the private ones)", t.route);
            }
            if t.top_k == Some(0) {
                bail!("route `{}`: top_k must be at least 1", t.route);
            }
            let label = t.label.clone().unwrap_or_else(|| {
                let mut l = t.route.clone();
                if t.gks {
                    l.push_str("+gks");
                }
                l.push('@');
                l.push_str(&t.library);
                if let Some(k) = t.top_k {
                    l.push_str(&format!(" k={k}"));
                }
                l
            });
            plain(
                label,
                &t.route,
                Some(if t.gks { Lib::PrivateShared } else { lib }),
                t.top_k,
                t.gks,
            )
        }
    }
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

    /// Every training task: the families' library tasks, then `[train] tasks`.
    pub fn train_tasks(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .families
            .values()
            .flat_map(|f| f.library.iter().cloned())
            .collect();
        for t in &self.train.tasks {
            if !v.contains(t) {
                v.push(t.clone());
            }
        }
        v
    }

    /// Every held-out sibling, family by family.
    pub fn held_out(&self) -> Vec<String> {
        self.families
            .values()
            .flat_map(|f| f.held_out.iter().cloned())
            .collect()
    }

    /// The family of a task (library or held out).
    pub fn family_of(&self, task: &str) -> Option<&str> {
        self.families
            .iter()
            .find(|(_, f)| f.library.iter().chain(&f.held_out).any(|t| t == task))
            .map(|(n, _)| n.as_str())
    }

    pub fn held_out_fractions(&self) -> SplitFractions {
        SplitFractions::new(self.eval.held_out_split[0], self.eval.held_out_split[1])
            .expect("validated")
    }

    fn validate(&self, origin: &str) -> Result<()> {
        let tasks = self.train_tasks();
        if tasks.is_empty() {
            bail!(
                "{origin}: no training tasks: give [train] tasks or [families.NAME] library lists"
            );
        }
        let held = self.held_out();
        for t in &tasks {
            if is_held_out(t) {
                bail!("{origin}: training task `{t}` is a held-out evaluation task; it must not be trained on");
            }
            if held.contains(t) {
                bail!("{origin}: training task `{t}` is a held-out sibling of a family; it must not be trained on");
            }
        }
        let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
        for (name, f) in &self.families {
            if f.library.is_empty() || f.held_out.is_empty() {
                bail!("{origin}: [families.{name}] needs at least one library task and one held_out task");
            }
            for t in f.library.iter().chain(&f.held_out) {
                if let Some(other) = seen.insert(t, name) {
                    bail!("{origin}: task `{t}` is listed twice (families {other} and {name})");
                }
                if is_held_out(t) {
                    bail!("{origin}: [families.{name}] task `{t}` is one of the paper's held-out evaluation tasks (or BIG-Bench-Hard); choose another family");
                }
            }
        }
        if self.eval.tasks.is_empty() && self.families.is_empty() {
            bail!("{origin}: [eval] needs tasks (or [families] with held-out siblings)");
        }
        if self.eval.routes.is_empty() {
            bail!("{origin}: [eval] needs routes");
        }
        if self.library.k == 0 || self.library.k > tasks.len() {
            bail!(
                "{origin}: [library] k = {} must be between 1 and the number of training tasks ({})",
                self.library.k,
                tasks.len()
            );
        }
        if !matches!(self.library.embed.as_str(), "delta" | "weights") {
            bail!(
                "{origin}: [library] embed = \"{}\": expected \"delta\" or \"weights\"",
                self.library.embed
            );
        }
        if !matches!(self.train.init.as_str(), "per-expert" | "shared") {
            bail!(
                "{origin}: [train] init = \"{}\": expected \"per-expert\" or \"shared\"",
                self.train.init
            );
        }
        if self.eval.top_k == 0 {
            bail!("{origin}: [eval] top_k must be at least 1");
        }
        SplitFractions::new(self.eval.held_out_split[0], self.eval.held_out_split[1])
            .map_err(|e| anyhow::anyhow!("{origin}: [eval] held_out_split: {e}"))?;
        if self.eval.held_out_limit == Some(0) || self.eval.select_limit == 0 {
            bail!("{origin}: [eval] held_out_limit and select_limit must be at least 1");
        }
        let mut labels = Vec::new();
        for r in &self.eval.routes {
            let spec = parse_route(r).with_context(|| format!("{origin}: [eval] routes"))?;
            if matches!(spec.kind, RowKind::FamilyOracle | RowKind::TaskOracle)
                && self.families.is_empty()
            {
                bail!(
                    "{origin}: [eval] route `{}` needs [families] with held-out siblings",
                    spec.label
                );
            }
            if labels.contains(&spec.label) {
                bail!(
                    "{origin}: [eval] route `{}` is listed twice (give tables a label)",
                    spec.label
                );
            }
            labels.push(spec.label);
        }
        Ok(())
    }

    pub fn routes(&self) -> Vec<RouteSpec> {
        self.eval
            .routes
            .iter()
            .map(|r| parse_route(r).expect("validated"))
            .collect()
    }

    /// The libraries the routes need (MBC, random and the family oracle
    /// need the private one; GenKnowSub the private and shared ones).
    pub fn libraries(&self) -> Vec<Lib> {
        let mut libs = Vec::new();
        for r in self.routes() {
            match r.kind {
                RowKind::Plain { lib: Some(l), .. } => libs.push(l),
                RowKind::Plain { lib: None, .. } => {}
                RowKind::FamilyOracle => libs.push(Lib::Private),
                RowKind::TaskOracle => libs.push(Lib::Oracle),
            }
        }
        if libs.contains(&Lib::PrivateShared) {
            libs.extend([Lib::Private, Lib::Shared]);
        }
        if libs.iter().any(|l| matches!(l, Lib::Mbc | Lib::Random)) {
            libs.push(Lib::Private);
        }
        if self.eval.own_limit > 0 && !self.families.is_empty() {
            libs.push(Lib::Private);
        }
        libs.sort();
        libs.dedup();
        libs
    }

    pub fn train_flags(&self, steps: usize) -> Vec<String> {
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
            "--init".into(),
            t.init.clone(),
        ];
        v.extend(["--checkpoint-every".into(), "5".into()]);
        v
    }
}

/// Resources of a phase's jobs (`[slurm]` for all, `[slurm.phases.NAME]`
/// to override one phase).
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// `--cpus-per-task`.
    pub cpus: Option<usize>,
    /// `--mem`, e.g. "8G".
    pub mem: Option<String>,
    /// `--time`, e.g. "02:00:00".
    pub time: Option<String>,
    /// `--partition`.
    pub partition: Option<String>,
    /// `--gpus-per-task`.
    pub gpus: Option<usize>,
    /// At most this many elements of the array run at once (`--array=...%N`).
    pub max_running: Option<usize>,
    /// More sbatch options, one per entry, e.g. "--account=lab".
    #[serde(default)]
    pub extra: Vec<String>,
}

impl Resources {
    pub fn or(&self, base: &Resources) -> Resources {
        Resources {
            cpus: self.cpus.or(base.cpus),
            mem: self.mem.clone().or_else(|| base.mem.clone()),
            time: self.time.clone().or_else(|| base.time.clone()),
            partition: self.partition.clone().or_else(|| base.partition.clone()),
            gpus: self.gpus.or(base.gpus),
            max_running: self.max_running.or(base.max_running),
            extra: base.extra.iter().chain(&self.extra).cloned().collect(),
        }
    }
}

/// `[slurm]`: how `--executor slurm` submits: the default [`Resources`] of
/// every phase, written directly in the table, and these.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(try_from = "toml::Table")]
pub struct SlurmSection {
    /// The quiver executable the jobs run (default: this one; it must be
    /// reachable from the compute nodes).
    pub quiver: Option<String>,
    /// Seconds between two looks at the queue (default 5).
    pub poll_seconds: Option<f64>,
    /// Shell lines run before the step (e.g. `module load ...`).
    pub setup: Vec<String>,
    #[serde(flatten)]
    pub defaults: Resources,
    /// Per-phase overrides, keyed by phase name (train-private, cluster,
    /// train-library, link, eval, eval-oracle).
    pub phases: BTreeMap<String, Resources>,
}

impl TryFrom<toml::Table> for SlurmSection {
    type Error = String;

    fn try_from(mut t: toml::Table) -> std::result::Result<Self, String> {
        fn field<T: serde::de::DeserializeOwned>(
            t: &mut toml::Table,
            key: &str,
        ) -> std::result::Result<Option<T>, String> {
            t.remove(key)
                .map(|v| v.try_into().map_err(|e| format!("[slurm] {key}: {e}")))
                .transpose()
        }
        Ok(SlurmSection {
            quiver: field(&mut t, "quiver")?,
            poll_seconds: field(&mut t, "poll_seconds")?,
            setup: field(&mut t, "setup")?.unwrap_or_default(),
            phases: field(&mut t, "phases")?.unwrap_or_default(),
            defaults: toml::Value::Table(t)
                .try_into()
                .map_err(|e| format!("[slurm]: {e}"))?,
        })
    }
}

/// `[k8s]`: what the emitted manifests run and mount.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct K8sSection {
    /// The container image with `quiver` on its PATH (required).
    pub image: Option<String>,
    pub namespace: Option<String>,
    /// The Secret whose keys become the pods' environment (AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...). Default `quiver-s3`.
    pub secret: Option<String>,
    /// The PersistentVolumeClaim holding the output directory (required: every
    /// pod reads and writes it).
    pub pvc: Option<String>,
    /// Where the claim is mounted in the pods, which is the output directory
    /// (default /work/out).
    pub mount: Option<String>,
    /// Pods of one phase running at once (default: all).
    pub parallelism: Option<usize>,
    /// Per pod: CPU and memory requests (e.g. "2", "8Gi"), GPUs (nvidia.com/gpu).
    pub cpu: Option<String>,
    pub memory: Option<String>,
    pub gpus: Option<usize>,
    /// Retries of one index before the Job gives up on it (default 1).
    pub retries: Option<usize>,
}
