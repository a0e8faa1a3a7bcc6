//! The experiment's results: tables of accuracy with paired differences
//! against the base model and the uniform merge (`quiver_core::eval::paired`),
//! the private experts on their own tasks, how well the clusterings recover
//! the families (adjusted Rand index), the share of routing weight on each
//! held-out sibling's family, and a check that no held-out input occurs in
//! a library task. Written as results.md, results.json and summary.json
//! (the small machine-readable part) after every evaluation.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use quiver_core::data::{normalize_input, Example};
use quiver_core::eval::paired::{paired_difference, PairedDiff, PairedScores, BOOTSTRAP_RESAMPLES};
use quiver_core::eval::EvalReport;
use quiver_core::expert::expert_name_for_task;
use quiver_core::fsutil::write_atomic;
use quiver_core::routing::RoutingSummary;
use quiver_core::transform::{adjusted_rand_index, Clustering};

use super::config::{ExperimentConfig, Lib, RowKind};

/// One task's score in a row.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TaskCell {
    pub score: f64,
    pub items: usize,
    pub stderr: f64,
}

/// One row of a table: a route's per-task scores and item outcomes.
#[derive(Debug, Clone, Default)]
pub struct Row {
    pub label: String,
    pub cells: BTreeMap<String, TaskCell>,
    /// Task -> (item index, correct), for the paired comparisons.
    pub items: BTreeMap<String, Vec<(usize, bool)>>,
    /// Task -> the expert used (oracle rows).
    pub notes: BTreeMap<String, String>,
    /// Task -> routing weights (routed rows).
    pub routing: Option<BTreeMap<String, RoutingSummary>>,
}

/// Per-task cells and (item, correct) outcomes of one evaluation.
pub type Cells = (
    BTreeMap<String, TaskCell>,
    BTreeMap<String, Vec<(usize, bool)>>,
);

impl Row {
    pub fn new(label: &str) -> Self {
        Self {
            label: label.to_string(),
            ..Self::default()
        }
    }

    pub fn absorb(&mut self, (cells, items): Cells) {
        self.cells.extend(cells);
        for (t, mut v) in items {
            v.sort_unstable();
            self.items.insert(t, v);
        }
    }

    /// Mean of the task scores over `tasks`, when the row has them all.
    fn average(&self, tasks: &[String]) -> Option<f64> {
        let s: Option<Vec<f64>> = tasks
            .iter()
            .map(|t| self.cells.get(t).map(|c| c.score))
            .collect();
        s.filter(|v| !v.is_empty())
            .map(|v| v.iter().sum::<f64>() / v.len() as f64)
    }
}

/// `a - b` over `tasks`, items matched by index; `None` when they share no
/// task or a task's items differ.
pub fn compare(a: &Row, b: &Row, tasks: &[String]) -> Option<PairedDiff> {
    let mut groups = Vec::new();
    for t in tasks {
        let (Some(x), Some(y)) = (a.items.get(t), b.items.get(t)) else {
            continue;
        };
        if x.len() != y.len() || x.iter().zip(y).any(|(p, q)| p.0 != q.0) {
            return None;
        }
        groups.push(PairedScores {
            a: x.iter().map(|p| p.1 as u8 as f64).collect(),
            b: y.iter().map(|p| p.1 as u8 as f64).collect(),
        });
    }
    if groups.is_empty() {
        return None;
    }
    Some(paired_difference(&groups, BOOTSTRAP_RESAMPLES, 0))
}

/// Held-out inputs that also occur in a library task's data.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Contamination {
    pub held_out: String,
    pub library_task: String,
    pub overlapping: usize,
}

/// Every held-out sibling against every training task (all of their
/// examples, every split): how many of the sibling's inputs occur there.
pub fn contamination(
    cfg: &ExperimentConfig,
    loaded: &BTreeMap<String, Vec<Example>>,
) -> Vec<Contamination> {
    let library: Vec<(String, BTreeSet<String>)> = cfg
        .train_tasks()
        .into_iter()
        .filter_map(|t| {
            let set = loaded
                .get(&t)?
                .iter()
                .map(|e| normalize_input(&e.source))
                .collect();
            Some((t, set))
        })
        .collect();
    let mut out = Vec::new();
    for h in cfg.held_out() {
        let Some(ex) = loaded.get(&h) else { continue };
        let inputs: Vec<String> = ex.iter().map(|e| normalize_input(&e.source)).collect();
        for (t, set) in &library {
            let n = inputs.iter().filter(|i| set.contains(*i)).count();
            if n > 0 {
                out.push(Contamination {
                    held_out: h.clone(),
                    library_task: t.clone(),
                    overlapping: n,
                });
            }
        }
    }
    out
}

/// Everything the experiment reports.
pub struct Results<'a> {
    cfg: &'a ExperimentConfig,
    out: PathBuf,
    pub contamination: Vec<Contamination>,
    /// (file stem, clustering): `mbc`, `random`, `mbc-<other embed>`.
    clusterings: Vec<(String, Clustering)>,
    /// (base, private experts) on the library tasks' test items.
    pub own: Option<(Row, Row)>,
    /// Rows of the held-out-sibling table.
    pub held_out: Vec<Row>,
    /// Rows of the `[eval] tasks` table, with their reports.
    pub extra: Vec<(Row, EvalReport)>,
}

fn short(task: &str) -> &str {
    task.split(':').next().unwrap_or(task)
}

fn pct(x: f64) -> String {
    format!("{:.1}", 100.0 * x)
}

fn fmt_diff(d: &Option<PairedDiff>) -> String {
    match d {
        Some(d) => format!(
            "{:+.1} [{:+.1}, {:+.1}]{}",
            100.0 * d.diff,
            100.0 * d.ci_low,
            100.0 * d.ci_high,
            if d.significant() { " *" } else { "" }
        ),
        None => "".into(),
    }
}

fn fmt_p(d: &Option<PairedDiff>) -> String {
    match d {
        Some(d) if d.mcnemar_p < 0.001 => "<0.001".into(),
        Some(d) => format!("{:.3}", d.mcnemar_p),
        None => "".into(),
    }
}

/// The layer index in a module name (`model.layers.12.self_attn.q_proj`).
fn layer_index(module: &str) -> Option<usize> {
    let rest = module.split("layers.").nth(1)?;
    rest.split('.').next()?.parse().ok()
}

/// Per held-out sibling: the share of routing weight on its family.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FamilyShare {
    pub route: String,
    pub task: String,
    pub family: String,
    /// Over all routed layers.
    pub share: f64,
    /// What uniform routing would give (the family's share of the experts).
    pub chance: f64,
    /// Per layer index (the modules of a layer averaged).
    pub per_layer: Vec<f64>,
}

impl<'a> Results<'a> {
    pub fn new(cfg: &'a ExperimentConfig, out: &Path, contamination: Vec<Contamination>) -> Self {
        Self {
            cfg,
            out: out.to_path_buf(),
            contamination,
            clusterings: Vec::new(),
            own: None,
            held_out: Vec::new(),
            extra: Vec::new(),
        }
    }

    pub fn load_clusterings(&mut self) -> Result<()> {
        let mut names = vec!["mbc".to_string(), "random".to_string()];
        for e in ["delta", "weights"] {
            names.push(format!("mbc-{e}"));
        }
        for n in names {
            let p = self.out.join(format!("clusters-{n}.json"));
            if p.exists() {
                let c = Clustering::load(&p).with_context(|| format!("{}", p.display()))?;
                self.clusterings.push((n, c));
            }
        }
        Ok(())
    }

    /// The tasks of each expert of a library (private: its own task;
    /// clusters: the cluster's tasks; shared: every training task).
    fn expert_tasks(&self, lib: Option<Lib>) -> BTreeMap<String, Vec<String>> {
        let mut m = BTreeMap::new();
        match lib {
            Some(Lib::Mbc) | Some(Lib::Random) => {
                let stem = if lib == Some(Lib::Mbc) {
                    "mbc"
                } else {
                    "random"
                };
                if let Some((_, c)) = self.clusterings.iter().find(|(n, _)| n == stem) {
                    for (name, tasks) in &c.clusters {
                        m.insert(name.clone(), tasks.clone());
                    }
                }
            }
            _ => {
                for t in self.cfg.train_tasks() {
                    m.insert(expert_name_for_task(&t), vec![t]);
                }
                m.insert("shared".into(), self.cfg.train_tasks());
            }
        }
        m
    }

    fn row_lib(&self, label: &str) -> Option<Lib> {
        self.cfg
            .routes()
            .into_iter()
            .find(|r| r.label == label)
            .and_then(|r| match r.kind {
                RowKind::Plain { lib, .. } => lib,
                _ => None,
            })
    }

    pub fn family_shares(&self) -> Vec<FamilyShare> {
        let mut out = Vec::new();
        for row in &self.held_out {
            let Some(routing) = &row.routing else {
                continue;
            };
            let tasks_of = self.expert_tasks(self.row_lib(&row.label));
            for (task, summary) in routing {
                let Some(fam) = self.cfg.family_of(task) else {
                    continue;
                };
                let members = &self.cfg.families[fam].library;
                let frac: Vec<f64> = summary
                    .experts
                    .iter()
                    .map(|e| match tasks_of.get(e) {
                        Some(ts) if !ts.is_empty() => {
                            ts.iter().filter(|t| members.contains(t)).count() as f64
                                / ts.len() as f64
                        }
                        _ => 0.0,
                    })
                    .collect();
                let chance = frac.iter().sum::<f64>() / frac.len().max(1) as f64;
                let (per_module, share) = summary.weighted_share(&frac);
                let mut layers: BTreeMap<usize, (f64, usize)> = BTreeMap::new();
                for (module, s) in per_module {
                    if let Some(l) = layer_index(&module) {
                        let e = layers.entry(l).or_default();
                        e.0 += s;
                        e.1 += 1;
                    }
                }
                out.push(FamilyShare {
                    route: row.label.clone(),
                    task: task.clone(),
                    family: fam.to_string(),
                    share,
                    chance,
                    per_layer: layers.values().map(|(s, n)| s / *n as f64).collect(),
                });
            }
        }
        out
    }

    /// Adjusted Rand index of each clustering against the family labels of
    /// the experts that belong to a family.
    fn aris(&self) -> Vec<(String, f64, usize)> {
        let fams: Vec<&String> = self.cfg.families.keys().collect();
        self.clusterings
            .iter()
            .map(|(name, c)| {
                let (mut truth, mut pred) = (Vec::new(), Vec::new());
                for (ci, tasks) in c.clusters.values().enumerate() {
                    for t in tasks {
                        if let Some(f) = self.cfg.family_of(t) {
                            truth.push(fams.iter().position(|x| *x == f).expect("family"));
                            pred.push(ci);
                        }
                    }
                }
                (
                    name.clone(),
                    adjusted_rand_index(&truth, &pred),
                    c.clusters.len(),
                )
            })
            .collect()
    }

    /// The reference of the "vs uniform" column.
    fn uniform_label(rows: &[&Row]) -> Option<String> {
        rows.iter()
            .find(|r| r.label == "uniform@private")
            .or_else(|| rows.iter().find(|r| r.label.starts_with("uniform")))
            .map(|r| r.label.clone())
    }

    /// A markdown table of `rows` over `tasks`, with paired differences.
    fn table(rows: &[&Row], tasks: &[String]) -> (String, Vec<serde_json::Value>) {
        let base = rows.iter().find(|r| r.label == "base").copied();
        let uni_label = Self::uniform_label(rows);
        let uniform = rows
            .iter()
            .find(|r| Some(&r.label) == uni_label.as_ref())
            .copied();
        let mut s = String::from("| route |");
        for t in tasks {
            s.push_str(&format!(" {} |", short(t)));
        }
        s.push_str(" average | vs base [95% CI] | p | vs uniform [95% CI] | p |\n|---|");
        for _ in tasks {
            s.push_str("---:|");
        }
        s.push_str("---:|---:|---:|---:|---:|\n");
        let mut json = Vec::new();
        for r in rows {
            s.push_str(&format!("| {} |", r.label));
            for t in tasks {
                match r.cells.get(t) {
                    Some(c) => s.push_str(&format!(" {} |", pct(c.score))),
                    None => s.push_str(" - |"),
                }
            }
            let avg = r.average(tasks);
            s.push_str(&format!(
                " {} |",
                avg.map(pct).unwrap_or_else(|| "-".into())
            ));
            let vs_base = base
                .filter(|b| b.label != r.label)
                .and_then(|b| compare(r, b, tasks));
            let vs_uni = uniform
                .filter(|u| u.label != r.label)
                .and_then(|u| compare(r, u, tasks));
            s.push_str(&format!(
                " {} | {} | {} | {} |\n",
                fmt_diff(&vs_base),
                fmt_p(&vs_base),
                fmt_diff(&vs_uni),
                fmt_p(&vs_uni)
            ));
            let per_task: Vec<serde_json::Value> = tasks
                .iter()
                .filter_map(|t| {
                    let c = r.cells.get(t)?;
                    let one = std::slice::from_ref(t);
                    Some(serde_json::json!({
                        "task": t,
                        "accuracy": c.score,
                        "n": c.items,
                        "expert": r.notes.get(t),
                        "vs_base": base.filter(|b| b.label != r.label).and_then(|b| compare(r, b, one)),
                        "vs_uniform": uniform.filter(|u| u.label != r.label).and_then(|u| compare(r, u, one)),
                    }))
                })
                .collect();
            json.push(serde_json::json!({
                "route": r.label,
                "average": avg,
                "n": r.cells.values().map(|c| c.items).sum::<usize>(),
                "vs_base": vs_base,
                "vs_uniform": vs_uni,
                "uniform_reference": uni_label,
                "tasks": per_task,
            }));
        }
        (s, json)
    }

    /// One sentence a newcomer can read: which routes beat the base model
    /// on these items, which fall below it, which are within noise.
    fn reading(rows: &[&Row], tasks: &[String]) -> String {
        let Some(base) = rows.iter().find(|r| r.label == "base") else {
            return String::new();
        };
        let (mut up, mut down, mut same) = (Vec::new(), Vec::new(), Vec::new());
        for r in rows.iter().filter(|r| r.label != "base") {
            match compare(r, base, tasks) {
                Some(d) if d.ci_low > 0.0 => {
                    up.push(format!("{} ({:+.1})", r.label, 100.0 * d.diff))
                }
                Some(d) if d.ci_high < 0.0 => {
                    down.push(format!("{} ({:+.1})", r.label, 100.0 * d.diff))
                }
                Some(_) => same.push(r.label.clone()),
                None => {}
            }
        }
        let n: usize = tasks
            .iter()
            .filter_map(|t| base.cells.get(t).map(|c| c.items))
            .sum();
        let list = |v: &[String]| {
            if v.is_empty() {
                "none".to_string()
            } else {
                v.join(", ")
            }
        };
        format!(
            "\n**Reading** ({n} items, the same for every route): better than the base model with 95% confidence: {}; worse: {}; within noise of it: {}.\n",
            list(&up),
            list(&down),
            list(&same)
        )
    }

    /// Writes results.md, results.json and summary.json; returns the markdown.
    pub fn write(&self) -> Result<String> {
        let cfg = self.cfg;
        let mut md = format!(
            "# {}\n\nModel `{}`; {} training tasks in {} families; k = {}; MBC embedding `{}`; LoRA init `{}`. Scores are accuracy in % (acc_norm for multiple choice). \"vs\" columns: paired difference on the same items in points, with its 95% paired-bootstrap interval (* when it excludes 0) and McNemar's exact p-value.\n",
            cfg.name,
            cfg.model,
            cfg.train_tasks().len(),
            cfg.families.len(),
            cfg.library.k,
            cfg.library.embed,
            cfg.train.init,
        );
        let mut summary = serde_json::json!({"name": cfg.name, "model": cfg.model});
        let mut full = serde_json::json!({"name": cfg.name, "model": cfg.model, "config": cfg});

        let held = cfg.held_out();
        if !held.is_empty() {
            let fr = cfg.held_out_fractions();
            md.push_str(&format!(
                "\n## Held-out siblings\n\nTest items of each held-out sibling (split {}/{}/{} train/validation/test{}), never trained on but by the task oracle.\n\n",
                fr.train,
                fr.validation,
                ((1.0 - fr.train - fr.validation) * 100.0).round() / 100.0,
                cfg.eval
                    .held_out_limit
                    .map(|l| format!(", at most {l} per task"))
                    .unwrap_or_default()
            ));
            md.push_str(&format!("Families: {}.\n\n", self.family_list()));
            if self.contamination.is_empty() {
                md.push_str("No held-out sibling's input occurs in any library task's data (all splits compared after whitespace and case normalisation).\n\n");
            } else {
                md.push_str("Held-out inputs that also occur in library data (whitespace and case normalised), left out of every held-out evaluation (`quiver eval --exclude-inputs-of`):\n\n");
                for c in &self.contamination {
                    md.push_str(&format!(
                        "* {} inputs of {} occur in {}\n",
                        c.overlapping, c.held_out, c.library_task
                    ));
                }
                md.push('\n');
            }
            let rows: Vec<&Row> = self.held_out.iter().collect();
            let (t, j) = Self::table(&rows, &held);
            md.push_str(&t);
            md.push_str(&Self::reading(&rows, &held));
            let notes: Vec<String> = self
                .held_out
                .iter()
                .filter(|r| !r.notes.is_empty())
                .map(|r| {
                    format!(
                        "{}: {}",
                        r.label,
                        r.notes
                            .iter()
                            .map(|(t, e)| format!("{} -> {e}", short(t)))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })
                .collect();
            if !notes.is_empty() {
                md.push_str(&format!("\nExperts used: {}.\n", notes.join("; ")));
            }
            summary["held_out"] = serde_json::Value::Array(j.clone());
            full["held_out"] = serde_json::Value::Array(j);
        }

        if let Some((base, expert)) = &self.own {
            let tasks = cfg.train_tasks();
            md.push_str(&format!(
                "\n## Private experts on their own tasks\n\nTest items (80/10/10 split, at most {} per task): base model vs the task's own expert.\n\n| task | family | base | expert | expert - base [95% CI] | p |\n|---|---|---:|---:|---:|---:|\n",
                cfg.eval.own_limit
            ));
            let mut j = Vec::new();
            for t in &tasks {
                let one = std::slice::from_ref(t);
                let d = compare(expert, base, one);
                let (b, e) = (base.cells.get(t), expert.cells.get(t));
                md.push_str(&format!(
                    "| {t} | {} | {} | {} | {} | {} |\n",
                    cfg.family_of(t).unwrap_or("-"),
                    b.map(|c| pct(c.score)).unwrap_or_default(),
                    e.map(|c| pct(c.score)).unwrap_or_default(),
                    fmt_diff(&d),
                    fmt_p(&d)
                ));
                j.push(serde_json::json!({
                    "task": t, "base": b.map(|c| c.score), "expert": e.map(|c| c.score),
                    "n": e.map(|c| c.items), "expert_vs_base": d,
                }));
            }
            let all = compare(expert, base, &tasks);
            md.push_str(&format!(
                "| **average** | | {} | {} | {} | {} |\n",
                base.average(&tasks).map(pct).unwrap_or_default(),
                expert.average(&tasks).map(pct).unwrap_or_default(),
                fmt_diff(&all),
                fmt_p(&all)
            ));
            summary["own_tasks"] = serde_json::json!({"tasks": j, "average": all});
        }

        let aris = self.aris();
        if !cfg.families.is_empty() && !aris.is_empty() {
            md.push_str("\n## Clusters against families\n\nAdjusted Rand index of each clustering of the private experts against their family labels (1: the families exactly; about 0: chance).\n\n| clustering | clusters | ARI |\n|---|---:|---:|\n");
            for (name, ari, k) in &aris {
                let label = match name.as_str() {
                    "mbc" => format!("MBC (embed {}, trained)", cfg.library.embed),
                    "random" => "random".to_string(),
                    other => format!("MBC (embed {})", other.trim_start_matches("mbc-")),
                };
                md.push_str(&format!("| {label} | {k} | {ari:.3} |\n"));
            }
            for (name, c) in &self.clusterings {
                if name == "mbc" {
                    md.push_str(&format!(
                        "\nMBC clusters: {}.\n",
                        c.clusters
                            .iter()
                            .map(|(n, ts)| format!("{n} = {{{}}}", ts.join(", ")))
                            .collect::<Vec<_>>()
                            .join("; ")
                    ));
                }
            }
            summary["ari"] = aris
                .iter()
                .map(|(n, a, k)| serde_json::json!({"clustering": n, "k": k, "ari": a}))
                .collect();
        }

        let shares = self.family_shares();
        if !shares.is_empty() {
            md.push_str("\n## Routing: share of weight on the sibling's own family\n\nMean routing weight, over every routed token and layer of the sibling's test items, on the experts of its own family (a cluster expert counts by the fraction of its tasks in the family); chance = the family's share of the library.\n\n| route | task | family | share | chance |\n|---|---|---|---:|---:|\n");
            for s in &shares {
                md.push_str(&format!(
                    "| {} | {} | {} | {:.3} | {:.3} |\n",
                    s.route, s.task, s.family, s.share, s.chance
                ));
            }
            if let Some(note) = self.plot_routing(&shares) {
                md.push_str(&note);
            }
            full["routing"] = serde_json::to_value(&shares)?;
            summary["routing"] = shares
                .iter()
                .map(|s| serde_json::json!({"route": s.route, "task": s.task, "share": s.share, "chance": s.chance}))
                .collect();
        }

        if !self.extra.is_empty() {
            let tasks: Vec<String> = self.extra[0]
                .1
                .tasks
                .iter()
                .map(|t| t.task.clone())
                .collect();
            md.push_str(&format!(
                "\n## {} tasks\n\nSplit `{}`{}.\n\n",
                if cfg.families.is_empty() {
                    "Evaluation"
                } else {
                    "Further"
                },
                cfg.eval.split,
                cfg.eval
                    .limit
                    .map(|l| format!(", at most {l} items per task"))
                    .unwrap_or_default()
            ));
            let rows: Vec<&Row> = self.extra.iter().map(|(r, _)| r).collect();
            let (t, j) = Self::table(&rows, &tasks);
            md.push_str(&t);
            md.push_str(&Self::reading(&rows, &tasks));
            summary["further"] = serde_json::Value::Array(j);
            full["routes"] = self
                .extra
                .iter()
                .map(|(r, rep)| serde_json::json!({"route": r.label, "report": rep}))
                .collect();
        }
        full["summary"] = summary.clone();
        full["contamination"] = serde_json::to_value(&self.contamination)?;
        write_atomic(
            &self.out.join("results.json"),
            serde_json::to_string_pretty(&full)?.as_bytes(),
        )?;
        write_atomic(
            &self.out.join("summary.json"),
            serde_json::to_string_pretty(&summary)?.as_bytes(),
        )?;
        write_atomic(&self.out.join("results.md"), md.as_bytes())?;
        Ok(md)
    }

    /// `routing.png`: per layer, the share of weight on each sibling's
    /// family under the first Arrow route over the private library (the
    /// first routed route if there is none). Returns the markdown line, or
    /// `None` (with a warning) when it cannot be drawn.
    fn plot_routing(&self, shares: &[FamilyShare]) -> Option<String> {
        let arrow = self
            .held_out
            .iter()
            .filter(|r| r.routing.is_some())
            .find(|r| {
                r.label.starts_with("arrow") && matches!(self.row_lib(&r.label), Some(Lib::Private))
            })
            .or_else(|| self.held_out.iter().find(|r| r.routing.is_some()))?;
        let series: Vec<quiver_core::eval::plot::Series> = shares
            .iter()
            .filter(|s| s.route == arrow.label)
            .map(|s| quiver_core::eval::plot::Series {
                label: format!("{} (dashed: chance {:.2})", s.task, s.chance),
                values: s.per_layer.clone(),
                reference: Some(s.chance),
            })
            .collect();
        let path = self.out.join("routing.png");
        match quiver_core::eval::plot::plot_lines(
            &path,
            &format!(
                "{}: routing weight on the held-out task's own family",
                arrow.label
            ),
            "layer",
            "share of routing weight on own family",
            &series,
        ) {
            Ok(()) => Some(format!(
                "\nPer layer, for {}: `routing.png` (one line per held-out sibling, dashed = chance).\n",
                arrow.label
            )),
            Err(e) => {
                eprintln!("warning: no routing plot: {e}");
                None
            }
        }
    }

    fn family_list(&self) -> String {
        self.cfg
            .families
            .iter()
            .map(|(n, f)| {
                format!(
                    "{n} (library: {}; held out: {})",
                    f.library.join(", "),
                    f.held_out.join(", ")
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}
