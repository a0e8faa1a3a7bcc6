//! Helpers shared by the CLI tests: the binary, fixtures, running a
//! command, and the "one clean sentence" check for errors.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn quiver() -> Command {
    Command::new(env!("CARGO_BIN_EXE_quiver"))
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../quiver-core/tests/fixtures")
        .join(name)
}

pub fn run(cmd: &mut Command) -> (Output, String, String) {
    let out = cmd.output().expect("quiver runs");
    (
        out.clone(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The command fails with exactly one non-empty stderr line that mentions
/// every needle, and does not panic.
pub fn assert_clean_error(cmd: &mut Command, needles: &[&str]) {
    let (out, _, stderr) = run(cmd);
    assert!(!out.status.success(), "expected failure; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line of error, got: {stderr}");
    for n in needles {
        assert!(stderr.contains(n), "error should mention `{n}`: {stderr}");
    }
}

/// Experts (directories with a quiver_expert.json) in a library directory.
pub fn experts_in(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .join("quiver_expert.json")
                .exists()
        })
        .count()
}

/// Every file under `dir` with its bytes, to prove nothing changed.
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// Whether the fetched assets are there (`QUIVER_REQUIRE_ASSETS=1` makes
/// their absence a failure instead of a skip).
pub fn assets_present(names: &[&str]) -> bool {
    let home = std::env::var_os("QUIVER_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| dirs_home().join(".cache/quiver"));
    let ok = names.iter().all(|n| {
        let dir = match *n {
            "smollm2-135m" => home.join("models/smollm2-135m"),
            "olmo-tasks" => home.join("data/olmo"),
            "bigbench" => home.join("data/bigbench"),
            "evals" => home.join("data/evals"),
            other => panic!("unknown asset {other}"),
        };
        dir.join(".quiver-complete").exists()
    });
    if !ok && std::env::var("QUIVER_REQUIRE_ASSETS").as_deref() == Ok("1") {
        panic!("QUIVER_REQUIRE_ASSETS=1 but {names:?} are not all fetched (run `quiver fetch`)");
    }
    ok
}

fn dirs_home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/"))
}

/// The tiny experiment of the experiment tests: two families of training
/// tasks (`train.jsonl`) and a multiple-choice evaluation task (`eval.jsonl`).
pub fn write_data(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let train = dir.join("train.jsonl");
    let mut t = String::new();
    let words = ["cat", "sun", "red", "box", "pen", "cup", "hat", "map"];
    for (task, f) in [
        (
            "plural_a",
            (|w: &str| format!("{w}s")) as fn(&str) -> String,
        ),
        ("plural_b", |w: &str| format!("{w}s")),
        ("reverse_a", |w: &str| w.chars().rev().collect()),
        ("reverse_b", |w: &str| w.chars().rev().collect()),
    ] {
        for (i, w) in words.iter().cycle().take(30).enumerate() {
            let v = serde_json::json!({
                "task": task,
                "source": format!("{task} {i}: {w} ->"),
                "target": f(w),
            });
            t.push_str(&format!("{v}\n"));
        }
    }
    std::fs::write(&train, t).unwrap();
    let eval = dir.join("eval.jsonl");
    let mut e = String::new();
    for (i, w) in words.iter().cycle().take(40).enumerate() {
        let v = serde_json::json!({
            "task": "pick_plural",
            "source": format!("The plural of {w} is"),
            "options": [format!("{w}s"), format!("{w}x"), w.to_string()],
            "answer": 0,
            "_i": i,
        });
        e.push_str(&format!("{v}\n"));
    }
    std::fs::write(&eval, e).unwrap();
    (train, eval)
}

pub fn write_config(
    dir: &Path,
    train: &Path,
    eval: &Path,
    train_tasks: &str,
) -> std::path::PathBuf {
    let cfg = format!(
        r#"
name = "tiny"
model = "{model}"

[train]
tasks = [{train_tasks}]
source = "{train}"
steps = 2
cluster_steps = 2
lr = 1e-2
batch_size = 2
max_input_len = 32
max_target_len = 8
max_eval_examples = 2

[library]
k = 2

[eval]
tasks = ["pick_plural"]
data = "{eval}"
split = "all"
limit = 6
top_k = 2
routes = ["base", "shared", "uniform@private", "arrow@private", "arrow@mbc", "arrow@random", "ties@mbc"]
"#,
        model = fixture("tiny_llama").display(),
        train = train.display(),
        eval = eval.display(),
    );
    let path = dir.join("tiny.toml");
    std::fs::write(&path, cfg).unwrap();
    path
}
