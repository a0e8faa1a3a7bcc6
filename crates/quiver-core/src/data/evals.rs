//! OpenAI's evals registry (`quiver fetch evals`: the `evals` package's
//! `registry/data/<task>/*.jsonl`), as a data source.
//!
//! # Tasks
//!
//! Every `.jsonl` file under `registry/data` whose records carry `input`
//! (chat messages, or a string) and `ideal` (a string or a list of
//! acceptable strings) is a task; files of other shapes (few-shot pools of
//! `sample`s, model-graded and agent tasks) are not. A task is named by
//! its folder when the folder holds one such file (`logiqa`,
//! `pantone_to_hex`), else by folder and file stem
//! (`logiqa-logical-reasoning-plus/reclor-logical-reasoning-plus`).
//!
//! # Examples
//!
//! The source is the messages rendered as text, each message's content on
//! its own paragraph (an assistant's turn, as in few-shot demonstrations,
//! as `Answer: ...`), ending in `\nAnswer:` as the olmo tasks do; the
//! target is the ideal answer (the first when several are acceptable).
//!
//! A task is **multiple choice** when its samples list `choices` that hold
//! the ideal answer, or when its ideal answers come from a small closed
//! set: between 2 and [`MAX_CLOSED_SET`] distinct short answers, each one
//! answer, at least [`MIN_PER_LABEL`] samples per distinct answer on
//! average. Its options are that set in sorted order; a set of single
//! capital letters (or single digits) is filled to a range from `A` (`0`)
//! to its largest, so a letter no gold answer uses is still an option.
//! Every other task is generative (exact match and Rouge-L).
//!
//! # Licenses
//!
//! The registry is MIT-licensed except for the datasets its `LICENSE.md`
//! lists with their own licenses; a task under one of those locations
//! carries them in its [`TaskInfo::license`].

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{load_named, parallel_map, Example, TaskInfo};
use crate::error::{Error, Result};

/// At most this many distinct ideal answers make a closed set.
pub const MAX_CLOSED_SET: usize = 10;
/// A closed set needs at least this many samples per distinct answer.
pub const MIN_PER_LABEL: usize = 5;
/// A closed-set answer is at most this many characters.
const MAX_LABEL_CHARS: usize = 24;

/// The `registry` directory under an evals asset root.
fn registry(root: &Path) -> PathBuf {
    for cand in [root.join("registry"), root.join("evals/registry")] {
        if cand.join("data").is_dir() {
            return cand;
        }
    }
    root.to_path_buf()
}

/// One task: its name and file.
#[derive(Debug, Clone)]
struct TaskFile {
    name: String,
    path: PathBuf,
    /// The folder under `data/` (for the license lookup).
    folder: String,
}

/// Whether a record has the `input` + `ideal` shape.
fn is_sample(v: &Value) -> bool {
    v.get("ideal")
        .is_some_and(|i| i.is_string() || i.is_array())
        && v.get("input")
            .is_some_and(|i| i.is_string() || i.is_array())
}

/// Whether the first record of `path` is a sample.
fn first_is_sample(path: &Path) -> Result<bool> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    for line in BufReader::new(f).lines() {
        let Ok(line) = line else { return Ok(false) };
        if line.trim().is_empty() {
            continue;
        }
        return Ok(serde_json::from_str::<Value>(&line).is_ok_and(|v| is_sample(&v)));
    }
    Ok(false)
}

fn jsonl_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        if path.is_dir() {
            jsonl_files(&path, out)?;
        } else if path.extension().is_some_and(|x| x == "jsonl") {
            out.push(path);
        }
    }
    Ok(())
}

fn scan(root: &Path) -> Result<BTreeMap<String, TaskFile>> {
    let data = registry(root).join("data");
    if !data.is_dir() {
        return Err(Error::Data {
            path: data,
            msg: "not an evals registry: no `registry/data` directory".into(),
        });
    }
    let mut files = Vec::new();
    jsonl_files(&data, &mut files)?;
    files.sort();
    let usable: Vec<bool> = parallel_map(&files, |p| first_is_sample(p).unwrap_or(false));
    let mut by_dir: BTreeMap<PathBuf, Vec<PathBuf>> = BTreeMap::new();
    for (p, ok) in files.into_iter().zip(usable) {
        if ok {
            let dir = p.parent().map(Path::to_path_buf).unwrap_or_default();
            by_dir.entry(dir).or_default().push(p);
        }
    }
    let mut out = BTreeMap::new();
    for (dir, files) in by_dir {
        let rel = dir
            .strip_prefix(&data)
            .unwrap_or(&dir)
            .to_string_lossy()
            .replace('\\', "/");
        let folder = rel.split('/').next().unwrap_or("").to_string();
        let single = files.len() == 1;
        for path in files {
            let stem = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let name = if single {
                rel.clone()
            } else {
                format!("{rel}/{stem}")
            };
            out.insert(
                name.clone(),
                TaskFile {
                    name,
                    path,
                    folder: folder.clone(),
                },
            );
        }
    }
    Ok(out)
}

/// `LICENSE.md`'s datasets with their own licenses: folder -> licenses.
fn licenses(root: &Path) -> BTreeMap<String, String> {
    let candidates = [
        root.join("LICENSE.md"),
        registry(root).join("../LICENSE.md"),
    ];
    let Some(text) = candidates
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
    else {
        return BTreeMap::new();
    };
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let l = line.trim();
        if l.starts_with("####") {
            current = None;
        } else if let Some(loc) = l.strip_prefix("- **Location**:") {
            current = loc
                .trim()
                .trim_end_matches('/')
                .rsplit("registry/data/")
                .next()
                .map(|s| s.split('/').next().unwrap_or(s).to_string());
        } else if let (Some(folder), Some(lic)) = (&current, l.strip_prefix("- **License**:")) {
            let short = lic
                .split("http")
                .next()
                .unwrap_or(lic)
                .trim()
                .trim_end_matches(':')
                .trim();
            if !short.is_empty() {
                out.entry(folder.clone())
                    .or_default()
                    .insert(short.to_string());
            }
        }
    }
    out.into_iter()
        .map(|(k, v)| (k, v.into_iter().collect::<Vec<_>>().join("; ")))
        .collect()
}

/// The content of a message: a string, or the text parts of a list.
fn content(m: &Value) -> Option<String> {
    match m.get("content")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => {
            let texts: Vec<&str> = parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str).or(p.as_str()))
                .collect();
            (!texts.is_empty()).then(|| texts.join("\n"))
        }
        _ => None,
    }
}

/// A sample's `input` as a prompt (see the module docs).
pub fn render_prompt(input: &Value) -> std::result::Result<String, String> {
    let mut parts: Vec<String> = Vec::new();
    match input {
        Value::String(s) => parts.push(s.trim().to_string()),
        Value::Array(msgs) => {
            for m in msgs {
                let text = content(m).ok_or("a message of `input` has no text `content`")?;
                let text = text.trim();
                let assistant = m.get("role").and_then(Value::as_str) == Some("assistant")
                    || m.get("name").and_then(Value::as_str) == Some("example_assistant");
                if assistant {
                    parts.push(format!("Answer: {text}"));
                } else if !text.is_empty() {
                    parts.push(text.to_string());
                }
            }
        }
        _ => return Err("`input` is neither a string nor a list of messages".into()),
    }
    if parts.is_empty() {
        return Err("`input` has no text".into());
    }
    Ok(format!("{}\nAnswer:", parts.join("\n\n")))
}

/// One parsed sample.
struct Sample {
    source: String,
    /// Acceptable answers, first the canonical one.
    ideal: Vec<String>,
    choices: Option<Vec<String>>,
}

fn parse_sample(v: &Value) -> std::result::Result<Sample, String> {
    let input = v.get("input").ok_or("missing field `input`")?;
    let ideal = match v.get("ideal").ok_or("missing field `ideal`")? {
        Value::String(s) => vec![s.trim().to_string()],
        Value::Array(a) => a
            .iter()
            .map(|x| match x {
                Value::String(s) => Ok(s.trim().to_string()),
                Value::Number(n) => Ok(n.to_string()),
                _ => Err("`ideal` holds a non-string"),
            })
            .collect::<std::result::Result<Vec<_>, _>>()?,
        _ => return Err("`ideal` is neither a string nor a list".into()),
    };
    if ideal.is_empty() || ideal[0].is_empty() {
        return Err("`ideal` is empty".into());
    }
    let choices = match v.get("choices") {
        Some(Value::Array(c)) if c.iter().all(Value::is_string) => Some(
            c.iter()
                .filter_map(Value::as_str)
                .map(|s| s.trim().to_string())
                .collect(),
        ),
        _ => None,
    };
    Ok(Sample {
        source: render_prompt(input)?,
        ideal,
        choices,
    })
}

/// The samples of a file, and where the first malformed one is and how
/// many there are: the registry is other people's data, so a bad sample
/// (an empty `ideal`, a message without text) is left out and reported
/// rather than failing the whole task. A line that is not JSON fails.
fn read_samples(path: &Path) -> Result<(Vec<Sample>, Skipped)> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    let mut skipped = Skipped::default();
    for (i, line) in BufReader::with_capacity(1 << 20, f).lines().enumerate() {
        let line = line.map_err(|e| Error::io(path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(&line).map_err(|e| Error::DataLine {
            path: path.to_path_buf(),
            line: i + 1,
            msg: format!("invalid JSON: {e}"),
        })?;
        match parse_sample(&v) {
            Ok(s) => out.push(s),
            Err(msg) => {
                skipped.count += 1;
                skipped
                    .first
                    .get_or_insert(format!("{}:{}: {msg}", path.display(), i + 1));
            }
        }
    }
    Ok((out, skipped))
}

/// Malformed samples left out of a task.
#[derive(Debug, Default)]
struct Skipped {
    count: usize,
    /// `file:line: what is wrong` of the first.
    first: Option<String>,
}

impl Skipped {
    fn note(&self) -> Option<String> {
        self.first.as_ref().map(|f| {
            format!(
                "{} malformed sample(s) left out, the first at {f}",
                self.count
            )
        })
    }
}

/// The closed set of answers that makes a task multiple choice, if any
/// (see the module docs), in option order.
pub fn closed_set<'a>(ideals: impl IntoIterator<Item = &'a [String]>) -> Option<Vec<String>> {
    let mut set: BTreeSet<&str> = BTreeSet::new();
    let mut n = 0usize;
    for ideal in ideals {
        if ideal.len() != 1 || ideal[0].chars().count() > MAX_LABEL_CHARS {
            return None;
        }
        set.insert(ideal[0].as_str());
        if set.len() > MAX_CLOSED_SET {
            return None;
        }
        n += 1;
    }
    if set.len() < 2 || n < MIN_PER_LABEL * set.len() {
        return None;
    }
    let single = |pred: fn(char) -> bool| {
        set.iter().all(|s| {
            let mut c = s.chars();
            c.next().is_some_and(pred) && c.next().is_none()
        })
    };
    let first = set.iter().next().expect("non-empty").as_bytes()[0];
    let last = set.iter().next_back().expect("non-empty").as_bytes()[0];
    let range = |from: u8| (from..=last).map(|b| char::from(b).to_string()).collect();
    if single(|c| ('A'..='J').contains(&c)) {
        return Some(range(b'A'));
    }
    if single(|c| c.is_ascii_digit()) {
        return Some(range(first));
    }
    Some(set.into_iter().map(str::to_string).collect())
}

fn examples(task: &str, samples: Vec<Sample>) -> std::result::Result<Vec<Example>, String> {
    let with_choices = samples.iter().all(|s| {
        s.choices
            .as_ref()
            .is_some_and(|c| c.len() >= 2 && c.contains(&s.ideal[0]))
    });
    let set = if with_choices {
        None
    } else {
        closed_set(samples.iter().map(|s| s.ideal.as_slice()))
    };
    samples
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let target = s.ideal[0].clone();
            let options = if with_choices { s.choices } else { set.clone() };
            let answer = match &options {
                Some(o) => Some(o.iter().position(|x| *x == target).ok_or_else(|| {
                    format!("sample {i}: the ideal answer {target:?} is not an option")
                })?),
                None => None,
            };
            Ok(Example {
                task: task.to_string(),
                source: s.source,
                target,
                options,
                answer,
                scored_suffix: None,
                doc_id: Some(i as u64),
            })
        })
        .collect()
}

fn load(t: &TaskFile) -> Result<(Vec<Example>, Skipped)> {
    let (samples, skipped) = read_samples(&t.path)?;
    if samples.is_empty() {
        return Err(Error::Data {
            path: t.path.clone(),
            msg: skipped.note().unwrap_or_else(|| "no samples".into()),
        });
    }
    let ex = examples(&t.name, samples).map_err(|msg| Error::Data {
        path: t.path.clone(),
        msg,
    })?;
    Ok((ex, skipped))
}

pub(crate) fn list_tasks(root: &Path) -> Result<Vec<TaskInfo>> {
    let tasks: Vec<TaskFile> = scan(root)?.into_values().collect();
    let lic = licenses(root);
    let loaded = parallel_map(&tasks, load);
    tasks
        .iter()
        .zip(loaded)
        .map(|(t, r)| {
            let (ex, skipped) = r?;
            let mut info = TaskInfo::from_examples(&t.name, &ex);
            info.license = lic.get(&t.folder).cloned();
            info.note = skipped.note();
            Ok(info)
        })
        .collect()
}

pub(crate) fn load_task(root: &Path, name: &str, source: &str) -> Result<Vec<Example>> {
    let (ex, skipped) = load_named(scan(root)?, name, source, load)?;
    if let Some(note) = skipped.note() {
        tracing::warn!("evals task `{name}`: {note}");
    }
    Ok(ex)
}

pub(crate) fn task_names(root: &Path) -> Result<Vec<String>> {
    Ok(scan(root)?.into_keys().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ideals(v: &[&str]) -> Vec<Vec<String>> {
        v.iter().map(|s| vec![s.to_string()]).collect()
    }

    #[test]
    fn closed_sets() {
        let set = |v: &[&str]| {
            let v = ideals(v);
            closed_set(v.iter().map(|x| x.as_slice()))
        };
        fn rep<'a>(v: &[&'a str], n: usize) -> Vec<&'a str> {
            v.iter().cycle().take(v.len() * n).copied().collect()
        }
        assert_eq!(
            set(&rep(&["Y", "N"], 5)),
            Some(vec!["N".into(), "Y".into()])
        );
        // Letters fill from A: D is an option though no gold answer is D.
        assert_eq!(
            set(&rep(&["A", "C", "B", "E"], 5)),
            Some(["A", "B", "C", "D", "E"].map(String::from).to_vec())
        );
        assert_eq!(
            set(&rep(&["1", "3"], 5)),
            Some(["1", "2", "3"].map(String::from).to_vec())
        );
        assert_eq!(
            set(&rep(&["true", "false"], 5)),
            Some(vec!["false".into(), "true".into()])
        );
        // Too few samples per label, too many labels, long answers, one label.
        assert_eq!(set(&rep(&["Y", "N"], 4)), None);
        let many: Vec<String> = (0..11).map(|i| format!("x{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(set(&rep(&many, 10)), None);
        assert_eq!(
            set(&rep(&["a long free-text answer to a question", "no"], 10)),
            None
        );
        assert_eq!(set(&rep(&["Y"], 10)), None);
        let multi = vec![vec!["a".to_string(), "b".to_string()]; 20];
        assert_eq!(closed_set(multi.iter().map(|x| x.as_slice())), None);
    }

    #[test]
    fn prompts() {
        let input = json!([
            {"role": "system", "content": "Answer Y or N."},
            {"role": "user", "content": " Is water wet? "}
        ]);
        assert_eq!(
            render_prompt(&input).unwrap(),
            "Answer Y or N.\n\nIs water wet?\nAnswer:"
        );
        let shots = json!([
            {"role": "system", "content": "1+1", "name": "example_user"},
            {"role": "system", "content": "2", "name": "example_assistant"},
            {"role": "user", "content": "2+2"}
        ]);
        assert_eq!(
            render_prompt(&shots).unwrap(),
            "1+1\n\nAnswer: 2\n\n2+2\nAnswer:"
        );
        assert!(render_prompt(&json!(3)).is_err());
    }
}
