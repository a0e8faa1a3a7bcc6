//! BIG-bench `task.json` files.
//!
//! Every `task.json` below the root is a task named by its directory
//! relative to the root, joined with `/`. A `task.json` may also hold
//! inline subtasks (`"subtasks": [{"name": ..., "examples": [...]}, ...]`),
//! named `<task>/<subtask name>` (a `<task>:` prefix of the subtask name is
//! dropped); they inherit the parent's prompt settings unless they set
//! their own. Files with no usable example are not tasks.
//!
//! An example becomes an [`Example`] the way BIG-bench itself builds a
//! zero-shot prompt (`bigbench/api/json_task.py`):
//!
//! ```text
//! source = task_prefix + example_input_prefix + input
//!          [+ choice_prefix + choices joined by choice_prefix]
//!          + example_output_prefix
//! ```
//!
//! with BIG-bench's defaults `example_input_prefix = "\nQ: "`,
//! `example_output_prefix = "\nA: "`, `choice_prefix = "\n  choice: "`.
//! Choices are appended only for `target_scores` examples and only when
//! `append_choices_to_input` is not false (its default is true); they are
//! listed in sorted order, so that their position does not give the answer
//! away (BIG-bench shuffles them). Leading whitespace and trailing spaces
//! of the source are removed (the space goes in front of the target
//! instead, see [`Example::continuation`]).
//!
//! * `target_scores` (multiple choice): `options` are its keys in file
//!   order, `answer` the index of the highest score (the first one on a
//!   tie) and `target` that option, even when the example also has a
//!   `target` (e.g. strategyqa's explanations).
//! * otherwise `target` (a string, or a list whose first string is used).
//! * Examples with neither are skipped.

use std::path::{Path, PathBuf};

use serde::de::{Deserializer, MapAccess, Visitor};

use super::{parallel_map, unknown_task, Example, TaskInfo};
use crate::error::{Error, Result};

/// A `task.json` (or an inline subtask). Deserialised by hand so that a
/// repeated key is not an error (the last one wins, as in Python's `json`;
/// timedial's `task.json` repeats `append_choices_to_input`).
#[derive(Default)]
struct RawTask {
    name: Option<String>,
    examples: Vec<RawExample>,
    subtasks: Vec<serde_json::Value>,
    task_prefix: Option<String>,
    example_input_prefix: Option<String>,
    example_output_prefix: Option<String>,
    choice_prefix: Option<String>,
    append_choices_to_input: Option<serde_json::Value>,
}

#[derive(Default)]
struct RawExample {
    input: Option<String>,
    target: Option<serde_json::Value>,
    target_scores: Option<Scores>,
}

/// A JSON value that may be `null` (read as absent).
fn opt<'de, T: serde::Deserialize<'de>, A: MapAccess<'de>>(
    m: &mut A,
) -> std::result::Result<Option<T>, A::Error> {
    m.next_value::<Option<T>>()
}

impl<'de> serde::Deserialize<'de> for RawTask {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawTask;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a BIG-bench task object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<RawTask, A::Error> {
                let mut t = RawTask::default();
                while let Some(key) = m.next_key::<String>()? {
                    match key.as_str() {
                        "name" => t.name = opt(&mut m)?,
                        "examples" => t.examples = opt(&mut m)?.unwrap_or_default(),
                        "subtasks" => t.subtasks = opt(&mut m)?.unwrap_or_default(),
                        "task_prefix" => t.task_prefix = opt(&mut m)?,
                        "example_input_prefix" => t.example_input_prefix = opt(&mut m)?,
                        "example_output_prefix" => t.example_output_prefix = opt(&mut m)?,
                        "choice_prefix" => t.choice_prefix = opt(&mut m)?,
                        "append_choices_to_input" => t.append_choices_to_input = opt(&mut m)?,
                        _ => {
                            m.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                }
                Ok(t)
            }
        }
        d.deserialize_map(V)
    }
}

impl<'de> serde::Deserialize<'de> for RawExample {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawExample;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a BIG-bench example object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<RawExample, A::Error> {
                let mut e = RawExample::default();
                while let Some(key) = m.next_key::<String>()? {
                    match key.as_str() {
                        "input" => e.input = opt(&mut m)?,
                        "target" => e.target = opt(&mut m)?,
                        "target_scores" => e.target_scores = opt(&mut m)?,
                        _ => {
                            m.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                }
                Ok(e)
            }
        }
        d.deserialize_map(V)
    }
}

/// `target_scores` with its keys in file order.
struct Scores(Vec<(String, f64)>);

impl<'de> serde::Deserialize<'de> for Scores {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Scores;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map from choices to numeric scores")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<Scores, A::Error> {
                let mut v = Vec::new();
                while let Some((k, s)) = m.next_entry::<String, Score>()? {
                    // A repeated key keeps its first place and its last score.
                    match v.iter_mut().find(|(old, _)| *old == k) {
                        Some(slot) => slot.1 = s.0,
                        None => v.push((k, s.0)),
                    }
                }
                Ok(Scores(v))
            }
        }
        d.deserialize_map(V)
    }
}

/// A score: a number (or a boolean, as 0/1).
struct Score(f64);

impl<'de> serde::Deserialize<'de> for Score {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum S {
            N(f64),
            B(bool),
        }
        Ok(match S::deserialize(d)? {
            S::N(x) => Score(x),
            S::B(b) => Score(f64::from(u8::from(b))),
        })
    }
}

/// How a task turns inputs into prompts.
#[derive(Debug, Clone)]
struct Format {
    task_prefix: String,
    input_prefix: String,
    output_prefix: String,
    choice_prefix: String,
    append_choices: bool,
}

impl Default for Format {
    fn default() -> Self {
        Format {
            task_prefix: String::new(),
            input_prefix: "\nQ: ".into(),
            output_prefix: "\nA: ".into(),
            choice_prefix: "\n  choice: ".into(),
            append_choices: true,
        }
    }
}

impl Format {
    /// The parent's format overridden by what `t` sets.
    fn with(&self, t: &RawTask) -> Format {
        let pick = |own: &Option<String>, inherited: &String| {
            own.clone().unwrap_or_else(|| inherited.clone())
        };
        Format {
            task_prefix: pick(&t.task_prefix, &self.task_prefix),
            input_prefix: pick(&t.example_input_prefix, &self.input_prefix),
            output_prefix: pick(&t.example_output_prefix, &self.output_prefix),
            choice_prefix: pick(&t.choice_prefix, &self.choice_prefix),
            append_choices: match &t.append_choices_to_input {
                Some(serde_json::Value::Bool(b)) => *b,
                Some(serde_json::Value::String(s)) => !s.trim().eq_ignore_ascii_case("false"),
                _ => self.append_choices,
            },
        }
    }

    fn source(&self, input: &str, choices: Option<&[String]>) -> String {
        let mut s = String::with_capacity(
            self.task_prefix.len() + self.input_prefix.len() + input.len() + 64,
        );
        s.push_str(&self.task_prefix);
        s.push_str(&self.input_prefix);
        s.push_str(input);
        if let Some(choices) = choices {
            let mut sorted: Vec<&String> = choices.iter().collect();
            sorted.sort();
            for c in sorted {
                s.push_str(&self.choice_prefix);
                s.push_str(c);
            }
        }
        s.push_str(&self.output_prefix);
        let end = s.trim_end_matches([' ', '\t']).len();
        s.truncate(end);
        let start = s.len() - s.trim_start().len();
        s.drain(..start);
        s
    }

    fn example(&self, task: &str, raw: RawExample) -> Option<Example> {
        let input = raw.input?;
        if let Some(Scores(scores)) = raw.target_scores.filter(|s| !s.0.is_empty()) {
            let mut best = 0;
            for (i, (_, s)) in scores.iter().enumerate() {
                if *s > scores[best].1 {
                    best = i;
                }
            }
            let options: Vec<String> = scores.into_iter().map(|(k, _)| k).collect();
            let source = self.source(&input, self.append_choices.then_some(&options[..]));
            return Some(Example {
                task: task.to_string(),
                source,
                target: options[best].clone(),
                options: Some(options),
                answer: Some(best),
                scored_suffix: None,
                doc_id: None,
            });
        }
        let target = match raw.target? {
            serde_json::Value::String(s) => s,
            serde_json::Value::Array(v) => v.into_iter().find_map(|t| match t {
                serde_json::Value::String(s) => Some(s),
                _ => None,
            })?,
            serde_json::Value::Number(n) => n.to_string(),
            _ => return None,
        };
        Some(Example {
            task: task.to_string(),
            source: self.source(&input, None),
            target,
            options: None,
            answer: None,
            scored_suffix: None,
            doc_id: None,
        })
    }
}

/// The tasks of one parsed `task.json` named `name`: its own examples and
/// those of its inline subtasks, recursively.
fn collect(
    raw: RawTask,
    name: &str,
    parent: &Format,
    path: &Path,
    out: &mut Vec<(String, Vec<Example>)>,
) -> Result<()> {
    let fmt = parent.with(&raw);
    let own: Vec<Example> = raw
        .examples
        .into_iter()
        .filter_map(|e| fmt.example(name, e))
        .collect();
    if !own.is_empty() {
        out.push((name.to_string(), own));
    }
    for (i, sub) in raw.subtasks.into_iter().enumerate() {
        if !sub.is_object() {
            continue; // a subtask listed by name lives in its own directory
        }
        let sub: RawTask = serde_json::from_value(sub).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        let last = name.rsplit('/').next().unwrap_or(name);
        let sub_name = match &sub.name {
            Some(n) if !n.trim().is_empty() => {
                let n = n.strip_prefix(&format!("{last}:")).unwrap_or(n);
                n.replace('/', "_")
            }
            _ => i.to_string(),
        };
        collect(sub, &format!("{name}/{sub_name}"), &fmt, path, out)?;
    }
    Ok(())
}

fn parse_file(path: &Path, name: &str) -> Result<Vec<(String, Vec<Example>)>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let raw: RawTask = serde_json::from_slice(&bytes).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })?;
    drop(bytes);
    let mut out = Vec::new();
    collect(raw, name, &Format::default(), path, &mut out)?;
    Ok(out)
}

/// Every `task.json` under `root` (not `root/task.json` itself) with its
/// task name, sorted by name.
fn task_files(root: &Path) -> Result<Vec<(String, PathBuf)>> {
    if !root.is_dir() {
        return Err(Error::io(
            root,
            std::io::Error::from(std::io::ErrorKind::NotFound),
        ));
    }
    let mut out = Vec::new();
    let mut stack = vec![(String::new(), root.to_path_buf())];
    while let Some((name, dir)) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&dir, e))?;
            let fname = entry.file_name().to_string_lossy().into_owned();
            if fname.starts_with('.') {
                continue;
            }
            let p = entry.path();
            if p.is_dir() {
                let child = if name.is_empty() {
                    fname
                } else {
                    format!("{name}/{fname}")
                };
                if p.join("task.json").is_file() {
                    out.push((child.clone(), p.join("task.json")));
                }
                stack.push((child, p));
            }
        }
    }
    out.sort();
    Ok(out)
}

pub(crate) fn list_tasks(root: &Path) -> Result<Vec<TaskInfo>> {
    let files = task_files(root)?;
    let results = parallel_map(&files, |(name, path)| -> Result<Vec<TaskInfo>> {
        Ok(parse_file(path, name)?
            .iter()
            .map(|(n, exs)| TaskInfo::from_examples(n, exs))
            .collect())
    });
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for r in results {
        for t in r? {
            if seen.insert(t.name.clone()) {
                out.push(t);
            }
        }
    }
    Ok(out)
}

/// Directory task names for hints: those without nested task directories
/// (in BIG-bench the parents of nested subtasks have no examples).
fn hint_names(root: &Path) -> Vec<String> {
    let names: Vec<String> = task_files(root)
        .map(|v| v.into_iter().map(|(n, _)| n).collect())
        .unwrap_or_default();
    names
        .iter()
        .filter(|n| {
            let prefix = format!("{n}/");
            !names.iter().any(|m| m.starts_with(&prefix))
        })
        .cloned()
        .collect()
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.contains('\\')
        && name
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && !c.contains(':'))
}

pub(crate) fn load_task(root: &Path, name: &str, source: &str) -> Result<Vec<Example>> {
    if valid_name(name) {
        let file = root.join(name).join("task.json");
        if file.is_file() {
            if let Some((_, exs)) = parse_file(&file, name)?
                .into_iter()
                .find(|(n, _)| n == name)
            {
                return Ok(exs);
            }
        } else {
            // An inline subtask of some ancestor `task.json`.
            let mut parent = name;
            while let Some((p, _)) = parent.rsplit_once('/') {
                parent = p;
                let file = root.join(parent).join("task.json");
                if file.is_file() {
                    if let Some((_, exs)) = parse_file(&file, parent)?
                        .into_iter()
                        .find(|(n, _)| n == name)
                    {
                        return Ok(exs);
                    }
                    break;
                }
            }
        }
    } else if !root.is_dir() {
        return Err(Error::io(
            root,
            std::io::Error::from(std::io::ErrorKind::NotFound),
        ));
    }
    Err(unknown_task(name, source, &hint_names(root)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(json: &str) -> RawExample {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn default_prompt_format() {
        let f = Format::default();
        let e = f
            .example("t", raw(r#"{"input": "2+2?", "target": ["4", "four"]}"#))
            .unwrap();
        assert_eq!(e.source, "Q: 2+2?\nA:");
        assert_eq!(e.target, "4");
        assert_eq!(e.options, None);
        let e = f
            .example(
                "t",
                raw(r#"{"input": "Pick", "target_scores": {"b": 0, "c": 1, "a": 0.5}}"#),
            )
            .unwrap();
        assert_eq!(
            e.source,
            "Q: Pick\n  choice: a\n  choice: b\n  choice: c\nA:"
        );
        assert_eq!(e.options.as_deref().unwrap(), ["b", "c", "a"]);
        assert_eq!((e.answer, e.target.as_str()), (Some(1), "c"));
        assert!(f.example("t", raw(r#"{"input": "x"}"#)).is_none());
        assert!(f
            .example("t", raw(r#"{"input": "x", "target": []}"#))
            .is_none());
    }

    #[test]
    fn task_settings_override_defaults() {
        let t: RawTask = serde_json::from_str(
            r#"{"task_prefix": "Judge. ", "example_input_prefix": "\nIn: ",
                "example_output_prefix": "\nOut: ", "append_choices_to_input": "false",
                "examples": []}"#,
        )
        .unwrap();
        let f = Format::default().with(&t);
        let e = f
            .example(
                "t",
                raw(r#"{"input": "x", "target_scores": {"no": 0, "yes": 1}, "target": "yes, since"}"#),
            )
            .unwrap();
        assert_eq!(e.source, "Judge. \nIn: x\nOut:");
        assert_eq!(e.target, "yes");
        assert_eq!(e.answer, Some(1));
    }

    #[test]
    fn repeated_keys_are_not_an_error() {
        let t: RawTask = serde_json::from_str(
            r#"{"append_choices_to_input": true, "append_choices_to_input": false,
                "examples": [{"input": "x", "target_scores": {"a": 1, "b": 0, "a": 0}}]}"#,
        )
        .unwrap();
        let f = Format::default().with(&t);
        assert!(!f.append_choices);
        let e = f
            .example("t", t.examples.into_iter().next().unwrap())
            .unwrap();
        assert_eq!(e.options.as_deref().unwrap(), ["a", "b"]);
        assert_eq!(e.answer, Some(0)); // a tie at 0: the first option
    }

    #[test]
    fn names_are_checked() {
        assert!(valid_name("a/b_c"));
        for bad in ["", "../x", "a//b", "/abs", "a\\b", "a:b"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
