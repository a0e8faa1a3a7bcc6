//! The JSONL format: one example per line, so that FLAN or your own data
//! use the same commands as the built-in sources.
//!
//! ```text
//! {"task": "sentiment", "source": "Review: great film\nSentiment:", "target": "positive"}
//! {"task": "sentiment", "source": "Review: dull\nSentiment:", "target": "negative", "options": ["positive", "negative"], "answer": 1}
//! ```
//!
//! * `task`, `source`: required strings; `task` must not be empty.
//! * `target`: required string, except that a multiple-choice line may
//!   leave it out (it is then `options[answer]`).
//! * `options` (list of strings) and `answer` (0-based index into
//!   `options`): optional, for multiple choice. When `answer` is missing
//!   but `target` is one of the options, `answer` is its index. When both
//!   are given, `target` must equal `options[answer]`.
//! * `scored_suffix` (string): optional, for multiple choice whose options
//!   all end with the same text (WinoGrande): only that suffix is scored,
//!   conditioned on the source and each option's head.
//! * `doc_id` (non-negative integer): optional, the document's id in its
//!   source (kept in `quiver eval --predictions`); default: the example's
//!   position among its task's lines.
//! * Other fields are ignored; blank lines are skipped; a file whose name
//!   ends in `.gz` is gzip-compressed.
//!
//! A bad line is an [`Error::DataLine`] naming the file and the 1-based
//! line.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use super::{unknown_task, Example, TaskInfo};
use crate::error::{Error, Result};

fn is_gz(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "gz")
}

fn open(path: &Path) -> Result<Box<dyn BufRead>> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let r: Box<dyn Read> = if is_gz(path) {
        Box::new(flate2::read::MultiGzDecoder::new(f))
    } else {
        Box::new(f)
    };
    Ok(Box::new(BufReader::with_capacity(1 << 20, r)))
}

/// A serde_json message without its " at line L column C" suffix (a JSONL
/// record is always on line 1 of itself).
fn json_msg(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(i) => format!("{} (column {})", &s[..i], e.column()),
        None => s,
    }
}

#[derive(serde::Deserialize)]
struct Line {
    task: Option<String>,
    source: Option<String>,
    target: Option<String>,
    options: Option<Vec<String>>,
    answer: Option<usize>,
    scored_suffix: Option<String>,
    doc_id: Option<u64>,
}

/// Parses one JSONL record (`Err` is the message of a [`Error::DataLine`]).
pub fn parse_line(text: &str) -> std::result::Result<Example, String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("invalid JSON: {}", json_msg(&e)))?;
    if !value.is_object() {
        return Err(
            "expected a JSON object {\"task\": ..., \"source\": ..., \"target\": ...}".into(),
        );
    }
    let line: Line = serde_json::from_value(value).map_err(|e| json_msg(&e))?;
    let task = line.task.ok_or("missing field `task`")?;
    if task.trim().is_empty() {
        return Err("`task` is empty".into());
    }
    let source = line.source.ok_or("missing field `source`")?;
    let answer = match (&line.options, line.answer, &line.target) {
        (Some(opts), None, Some(t)) => Some(opts.iter().position(|o| o == t).ok_or(
            "`options` is given but `answer` is not, and `target` is not one of the options",
        )?),
        _ => line.answer,
    };
    let target = match (line.target, &line.options, answer) {
        (Some(t), _, _) => t,
        // An out-of-range answer is reported by `check` below.
        (None, Some(opts), Some(a)) => opts.get(a).cloned().unwrap_or_default(),
        (None, _, _) => return Err("missing field `target`".into()),
    };
    let ex = Example {
        task,
        source,
        target,
        options: line.options,
        answer,
        scored_suffix: line.scored_suffix,
        doc_id: line.doc_id,
    };
    ex.check()?;
    Ok(ex)
}

/// Reads a JSONL file of examples (see the module docs for the format).
pub fn read_jsonl(path: &Path) -> Result<Vec<Example>> {
    let mut out = Vec::new();
    for_each_example(path, |ex| out.push(ex))?;
    Ok(out)
}

fn for_each_example(path: &Path, mut f: impl FnMut(Example)) -> Result<()> {
    let mut reader = open(path)?;
    let mut buf = Vec::new();
    let mut line_no = 0usize;
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|e| Error::io(path, e))?;
        if n == 0 {
            return Ok(());
        }
        line_no += 1;
        let bad = |msg: String| Error::DataLine {
            path: path.to_path_buf(),
            line: line_no,
            msg,
        };
        let text = std::str::from_utf8(&buf).map_err(|_| bad("not valid UTF-8".into()))?;
        let text = text.trim_start_matches('\u{feff}');
        if text.trim().is_empty() {
            continue;
        }
        f(parse_line(text).map_err(bad)?);
    }
}

/// Writes examples as JSONL (gzip when the name ends in `.gz`) through a
/// temporary file in the same directory, renamed into place at the end, so
/// that a reader never sees half a file. Creates missing parent directories.
pub fn write_jsonl(path: &Path, examples: &[Example]) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let tmp =
        crate::fsutil::temp_file_in(&dir, ".quiver-jsonl-").map_err(|e| Error::io(&dir, e))?;
    {
        let file = tmp.as_file().try_clone().map_err(|e| Error::io(path, e))?;
        let mut w: Box<dyn Write> = if is_gz(path) {
            Box::new(flate2::write::GzEncoder::new(
                BufWriter::new(file),
                flate2::Compression::default(),
            ))
        } else {
            Box::new(BufWriter::new(file))
        };
        write_examples(&mut w, examples).map_err(|e| Error::io(path, e))?;
        w.flush().map_err(|e| Error::io(path, e))?;
        // Dropping a GzEncoder writes the gzip trailer; do it explicitly.
        drop(w);
    }
    tmp.as_file().sync_all().map_err(|e| Error::io(path, e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// Writes examples as JSONL lines to any writer (e.g. stdout).
pub fn write_examples(w: &mut dyn Write, examples: &[Example]) -> std::io::Result<()> {
    for ex in examples {
        serde_json::to_writer(&mut *w, ex)?;
        w.write_all(b"\n")?;
    }
    Ok(())
}

/// The JSONL files of a source: the file itself, or the `.jsonl` and
/// `.jsonl.gz` files of a directory, sorted by name.
fn files(path: &Path) -> Result<Vec<PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| Error::io(path, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().map(|n| n.to_string_lossy().into_owned());
            p.is_file()
                && n.is_some_and(|n| {
                    !n.starts_with('.') && (n.ends_with(".jsonl") || n.ends_with(".jsonl.gz"))
                })
        })
        .collect();
    out.sort();
    if out.is_empty() {
        return Err(Error::invalid(format!(
            "{} contains no .jsonl or .jsonl.gz files",
            path.display()
        )));
    }
    Ok(out)
}

pub(crate) fn list_tasks(path: &Path) -> Result<Vec<TaskInfo>> {
    let mut tasks: BTreeMap<String, TaskInfo> = BTreeMap::new();
    // Per task, how often each gold answer occurs (the majority share).
    let mut golds: BTreeMap<String, std::collections::HashMap<String, usize>> = BTreeMap::new();
    for file in files(path)? {
        for_each_example(&file, |ex| {
            let t = tasks.entry(ex.task.clone()).or_insert_with(|| TaskInfo {
                name: ex.task.clone(),
                examples: 0,
                multiple_choice: true,
                majority: None,
                license: None,
                note: None,
            });
            t.examples += 1;
            t.multiple_choice &= ex.is_multiple_choice();
            *golds
                .entry(ex.task.clone())
                .or_default()
                .entry(ex.target)
                .or_default() += 1;
        })?;
    }
    for t in tasks.values_mut() {
        let top = golds[&t.name].values().copied().max().unwrap_or(0);
        t.majority = Some(top as f64 / t.examples.max(1) as f64);
    }
    Ok(tasks.into_values().collect())
}

pub(crate) fn load_task(path: &Path, name: &str, source: &str) -> Result<Vec<Example>> {
    let mut out = Vec::new();
    let mut names = std::collections::BTreeSet::new();
    for file in files(path)? {
        for_each_example(&file, |ex| {
            if ex.task == name {
                out.push(ex);
            } else if out.is_empty() {
                names.insert(ex.task);
            }
        })?;
    }
    if out.is_empty() {
        let names: Vec<String> = names.into_iter().collect();
        return Err(unknown_task(name, source, &names));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines() {
        let e = parse_line(r#"{"task":"t","source":"s","target":"x","id":7}"#).unwrap();
        assert_eq!((e.task.as_str(), e.target.as_str()), ("t", "x"));
        assert_eq!(e.options, None);

        let e =
            parse_line(r#"{"task":"t","source":"s","target":"b","options":["a","b"]}"#).unwrap();
        assert_eq!(e.answer, Some(1));

        let e = parse_line(r#"{"task":"t","source":"s","options":["a","b"],"answer":0}"#).unwrap();
        assert_eq!(e.target, "a");

        for (line, want) in [
            (r#"{"task":"t","source":"s"}"#, "missing field `target`"),
            (r#"{"source":"s","target":"x"}"#, "missing field `task`"),
            (r#"{"task":"t","target":"x"}"#, "missing field `source`"),
            (
                r#"{"task":"","source":"s","target":"x"}"#,
                "`task` is empty",
            ),
            (
                r#"{"task":"t","source":"s","target":"a","options":["a"],"answer":3}"#,
                "`answer` is 3 but there are only 1 options",
            ),
            (
                r#"{"task":"t","source":"s","target":"b","options":["a","b"],"answer":0}"#,
                "is not the answer option",
            ),
            (
                r#"{"task":"t","source":"s","target":"x","answer":0}"#,
                "`answer` is given but `options` is not",
            ),
            (
                r#"{"task":"t","source":"s","target":"c","options":["a","b"]}"#,
                "`target` is not one of the options",
            ),
            (r#"{"task":"t","source":"s""#, "invalid JSON"),
            (r#"["t","s","x"]"#, "expected a JSON object"),
            (r#"{"task":1,"source":"s","target":"x"}"#, "invalid type"),
        ] {
            let err = parse_line(line).unwrap_err();
            assert!(err.contains(want), "{line}: {err}");
        }
    }
}
