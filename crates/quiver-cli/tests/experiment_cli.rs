//! `quiver eval`, `quiver experiment` and `quiver demo` through the binary:
//! the whole pipeline on a tiny model and JSONL tasks (resumed on a second
//! run), held-out tasks refused as training data, and, with the fetched
//! assets, SmolLM2 on ARC-Easy.

#[path = "../../quiver-core/tests/fixtures/library/s3_server.rs"]
mod s3_server;

mod common;

use std::path::Path;

use common::{
    assert_clean_error, assets_present, experts_in, fixture, quiver, run, write_config, write_data,
};

#[test]
fn experiment_runs_every_route_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let (train, eval) = write_data(dir.path());
    let cfg = write_config(
        dir.path(),
        &train,
        &eval,
        r#""plural_a", "plural_b", "reverse_a", "reverse_b""#,
    );
    let out = dir.path().join("run");
    let args = [
        "experiment",
        "--no-progress",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    let (o, table, err) = run(quiver().args(args));
    assert!(o.status.success(), "{err}");
    // The commands it ran are printed, so any step can be rerun by hand.
    assert!(err.contains("$ quiver train --library"), "{err}");
    assert!(err.contains("$ quiver cluster --library"), "{err}");
    for route in [
        "base",
        "shared",
        "uniform@private",
        "arrow@private",
        "arrow@mbc",
        "arrow@random",
        "ties@mbc",
    ] {
        assert!(table.contains(&format!("| {route} |")), "{route}: {table}");
    }
    // Libraries: 4 private experts, k = 2 cluster experts each, 1 shared.
    let count = |lib: &str| experts_in(&out.join(lib));
    assert_eq!(count("private"), 4);
    assert_eq!(count("mbc"), 2);
    assert_eq!(count("random"), 2);
    assert_eq!(count("shared"), 1);
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let routes = results["routes"].as_array().unwrap();
    assert_eq!(routes.len(), 7);
    for r in routes {
        let t = &r["report"]["tasks"][0];
        assert_eq!(t["items"], 6, "{r}");
        let score = t["score"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&score));
    }
    assert!(std::fs::read_to_string(out.join("results.md"))
        .unwrap()
        .contains("| arrow@mbc |"));
    // The MBC clusters each hold whole tasks.
    let clusters: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("clusters-mbc.json")).unwrap())
            .unwrap();
    let n: usize = clusters["clusters"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_array().unwrap().len())
        .sum();
    assert_eq!(n, 4);

    // Second run: nothing retrained or re-evaluated, the same table.
    let (o, table2, err) = run(quiver().args(args));
    assert!(o.status.success(), "{err}");
    assert_eq!(table, table2);
    assert!(
        err.contains("private expert plural_a: already done"),
        "{err}"
    );
    assert!(!err.contains("$ quiver train"), "{err}");
    assert!(err.contains("already done"), "{err}");
    assert!(!err.contains("$ quiver eval"), "{err}");
}

fn bigbench_fetched() -> bool {
    let home = std::env::var_os("QUIVER_HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/quiver")
        });
    home.join("data/bigbench/.quiver-complete").exists()
}

#[test]
fn held_out_tasks_are_never_trained_on() {
    let dir = tempfile::tempdir().unwrap();
    let (train, eval) = write_data(dir.path());
    for task in [
        "arc_easy",
        "winogrande:train",
        "navigate",
        "logical_deduction/three_objects",
    ] {
        let cfg = write_config(
            dir.path(),
            &train,
            &eval,
            &format!(r#""plural_a", "{task}""#),
        );
        assert_clean_error(
            quiver().args(["experiment", "--config", cfg.to_str().unwrap()]),
            &["held-out", task],
        );
    }
    // The configs kept in the repository never train on a held-out task.
    let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut seen = 0;
    for e in std::fs::read_dir(&configs).unwrap() {
        let p = e.unwrap().path();
        if p.extension().and_then(|x| x.to_str()) != Some("toml") {
            continue;
        }
        let v: toml::Value = toml::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        let strings = |x: Option<&toml::Value>| -> Vec<String> {
            x.and_then(|a| a.as_array())
                .map(|a| a.iter().map(|t| t.as_str().unwrap().to_string()).collect())
                .unwrap_or_default()
        };
        let mut trained = strings(v["train"].get("tasks"));
        let mut siblings = Vec::new();
        if let Some(fams) = v.get("families").and_then(|f| f.as_table()) {
            for f in fams.values() {
                trained.extend(strings(f.get("library")));
                siblings.extend(strings(f.get("held_out")));
            }
        }
        assert!(!trained.is_empty(), "{}", p.display());
        for t in &trained {
            assert!(
                !quiver_core::data::is_held_out(t) && !siblings.contains(t),
                "{}: trains on held-out {t}",
                p.display()
            );
        }
        for t in &siblings {
            assert!(!quiver_core::data::is_held_out(t), "{}: {t}", p.display());
        }
        // The file parses as an experiment (held-out guard included).
        let (o, _, err) = run(quiver().args([
            "experiment",
            "--dry-run",
            "--quiet",
            "--config",
            p.to_str().unwrap(),
        ]));
        // Task names are checked against the data. The BIG-bench configs
        // say at the top that they need a local copy and are refused with
        // that sentence without one; the others need the served assets,
        // which the test command fetches.
        let source = v["train"]
            .get("source")
            .and_then(|s| s.as_str())
            .unwrap_or("olmo+evals");
        if source.starts_with("bigbench") {
            let text = std::fs::read_to_string(&p).unwrap();
            assert!(text.starts_with("# NEEDS BIG-BENCH"), "{}", p.display());
            if bigbench_fetched() || std::env::var_os("QUIVER_BIGBENCH").is_some() {
                assert!(o.status.success(), "{}: {err}", p.display());
            } else {
                assert!(!o.status.success(), "{}", p.display());
                assert!(
                    err.contains("no longer serves bigbench") && err.contains("bigbench:DIR"),
                    "{}: {err}",
                    p.display()
                );
                assert!(!err.contains("pip"), "{err}");
            }
        } else if common::assets_present(&["olmo-tasks", "evals"]) {
            assert!(o.status.success(), "{}: {err}", p.display());
        } else {
            eprintln!(
                "skipping the task-name check of {}: olmo-tasks and evals not fetched",
                p.display()
            );
            assert!(!err.contains("not a valid experiment file"), "{err}");
        }
        seen += 1;
    }
    assert!(
        seen >= 3,
        "configs/demo.toml, configs/siblings.toml and configs/paper-small.toml"
    );
}

#[test]
fn bad_experiment_files_fail_with_one_sentence() {
    let dir = tempfile::tempdir().unwrap();
    let (train, eval) = write_data(dir.path());
    let cfg = write_config(dir.path(), &train, &eval, r#""plural_a", "plural_b""#);
    let text = std::fs::read_to_string(&cfg).unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, text.replace("arrow@mbc", "arrow@nowhere")).unwrap();
    assert_clean_error(
        quiver().args(["experiment", "--config", bad.to_str().unwrap()]),
        &["nowhere"],
    );
    std::fs::write(&bad, text.replace("k = 2", "k = 9")).unwrap();
    assert_clean_error(
        quiver().args(["experiment", "--config", bad.to_str().unwrap()]),
        &["k = 9"],
    );
    std::fs::write(&bad, text.replace("steps = 2", "stepz = 2")).unwrap();
    assert_clean_error(
        quiver().args(["experiment", "--config", bad.to_str().unwrap()]),
        &["bad.toml"],
    );
    assert_clean_error(
        quiver().args(["experiment", "--config", "/nonexistent/x.toml"]),
        &["/nonexistent/x.toml"],
    );
}

#[test]
fn eval_bad_input_fails_with_one_sentence() {
    let dir = tempfile::tempdir().unwrap();
    let (_, eval) = write_data(dir.path());
    let model = fixture("tiny_llama");
    let base = |extra: &[&str]| {
        let mut c = quiver();
        c.args([
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--data",
            eval.to_str().unwrap(),
        ]);
        c.args(extra);
        c
    };
    assert_clean_error(&mut base(&["--tasks", "nope"]), &["nope"]);
    assert_clean_error(
        &mut base(&["--tasks", "pick_plural", "--limit", "0"]),
        &["--limit"],
    );
    assert_clean_error(
        &mut base(&["--tasks", "pick_plural", "--split", "sideways"]),
        &["sideways"],
    );
    assert_clean_error(
        &mut base(&["--tasks", "pick_plural", "--route", "arrow"]),
        &["--library"],
    );
    // Same items, same numbers, every run.
    let ok = |c: &mut std::process::Command| {
        let (o, stdout, err) = run(c);
        assert!(o.status.success(), "{err}");
        stdout
    };
    let a = ok(&mut base(&[
        "--tasks",
        "pick_plural",
        "--split",
        "all",
        "--limit",
        "7",
    ]));
    let b = ok(&mut base(&[
        "--tasks",
        "pick_plural",
        "--split",
        "all",
        "--limit",
        "7",
    ]));
    assert_eq!(a, b);
    assert!(a.contains("pick_plural") && a.contains("acc_norm"), "{a}");
}

#[test]
fn real_model_beats_chance_on_arc_easy() {
    if !assets_present(&["smollm2-135m", "olmo-tasks"]) {
        eprintln!("skipping: smollm2-135m and olmo-tasks not fetched");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("arc.json");
    let args = [
        "eval",
        "--quiet",
        "--model",
        "smollm2-135m",
        "--tasks",
        "arc_easy",
        "--limit",
        "200",
        "--json",
        json.to_str().unwrap(),
    ];
    let (o, first, err) = run(quiver().args(args));
    assert!(o.status.success(), "{err}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let t = &report["tasks"][0];
    assert_eq!(t["task"], "arc_easy:validation");
    assert_eq!(t["items"], 200);
    // Four options: chance is 25%. SmolLM2-135M scores 47.9% acc_norm on the
    // whole validation split (570 items); 0.38 is over four standard errors
    // above chance at 200 items.
    let acc = t["score"].as_f64().unwrap();
    assert!(acc > 0.38, "acc_norm {acc}");
    let (_, second, _) = run(quiver().args(args));
    assert_eq!(first, second);
}

/// Killing `quiver experiment` (SIGTERM to its process alone, as a job
/// scheduler or `kill PID` does) ends the step it is running too, instead
/// of leaving it writing into the output directory.
#[cfg(target_os = "linux")]
#[test]
fn killing_the_experiment_ends_its_running_step() {
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let (train, eval) = write_data(dir.path());
    let cfg = write_config(dir.path(), &train, &eval, r#""plural_a", "plural_b""#);
    // A first training step long enough to be caught running.
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("steps = 2\n", "steps = 1000000\n");
    std::fs::write(&cfg, text).unwrap();
    let out = dir.path().join("run");
    let mut parent = quiver()
        .args(["experiment", "--quiet", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let ppid_of = |pid: &str| -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // pid (comm) state ppid ...: comm may hold spaces, so split after ')'.
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let child = loop {
        let found = std::fs::read_dir("/proc").unwrap().find_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            (ppid_of(&name)? == parent.id()).then_some(name)
        });
        if let Some(pid) = found {
            break pid;
        }
        assert!(
            parent.try_wait().unwrap().is_none(),
            "the experiment ended before it started a step"
        );
        assert!(Instant::now() < deadline, "no step process appeared");
        std::thread::sleep(Duration::from_millis(50));
    };
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &parent.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    parent.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    // Running: its stat is readable and its state is not Z (exited, not
    // yet reaped).
    let running = || {
        std::fs::read_to_string(format!("/proc/{child}/stat")).is_ok_and(|s| {
            !s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
    };
    while running() {
        assert!(
            Instant::now() < deadline,
            "step process {child} still running 20 s after its parent was killed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn experiment_libraries_on_s3_give_the_same_table() {
    let Some(server) = s3_server::server() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (train, eval) = write_data(dir.path());
    let cfg = write_config(
        dir.path(),
        &train,
        &eval,
        r#""plural_a", "reverse_a", "reverse_b""#,
    );
    let table = |out: &Path, root: Option<&str>| {
        let mut c = quiver();
        c.envs(server.env()).args([
            "experiment",
            "--no-progress",
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        if let Some(r) = root {
            c.args(["--library-root", r]);
        }
        let (o, table, err) = run(&mut c);
        assert!(o.status.success(), "{err}");
        let rows: Vec<String> = table
            .lines()
            .filter(|l| l.starts_with("| "))
            .map(str::to_string)
            .collect();
        assert!(rows.len() > 3, "{table}");
        rows
    };
    let local = table(&dir.path().join("local"), None);
    let root = format!("s3://{}/exp", server.bucket());
    let remote = table(&dir.path().join("remote"), Some(&root));
    assert_eq!(local, remote);
    // The libraries are on S3, not under the output directory.
    assert!(!dir.path().join("remote/private").exists());
    let bucket = root.trim_start_matches("s3://").split('/').next().unwrap();
    let keys = server.keys(bucket, "exp/private/");
    assert!(
        keys.iter().any(|k| k.ends_with("quiver_manifest.json")),
        "{keys:?}"
    );
}

/// A held-out sibling whose most common answer is most of its items would
/// make a route that learned only that answer look like transfer: the
/// experiment refuses it, naming the task and its share, unless
/// `[eval] max_majority` allows it.
#[test]
fn a_degenerate_held_out_sibling_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (train, _) = write_data(dir.path());
    let mut text = std::fs::read_to_string(&train).unwrap();
    for i in 0..30 {
        let v = serde_json::json!({
            "task": "always_y",
            "source": format!("Is word {i} a word? Answer Y or N:"),
            "target": if i % 10 == 0 { "N" } else { "Y" },
            "options": ["N", "Y"],
            "answer": if i % 10 == 0 { 0 } else { 1 },
        });
        text.push_str(&format!("{v}\n"));
    }
    std::fs::write(&train, text).unwrap();
    let cfg = |max_majority: &str| {
        let text = format!(
            r#"
name = "degenerate"
model = "{model}"

[train]
source = "{train}"
steps = 2
max_input_len = 32
max_target_len = 8

[library]
k = 1

[families.words]
library = ["plural_a"]
held_out = ["always_y"]

[eval]
routes = ["base"]
{max_majority}
"#,
            model = common::fixture("tiny_llama").display(),
            train = train.display(),
        );
        let path = dir.path().join("degenerate.toml");
        std::fs::write(&path, text).unwrap();
        path
    };
    let p = cfg("");
    assert_clean_error(
        quiver().args(["experiment", "--dry-run", "--config", p.to_str().unwrap()]),
        &["always_y", "90.0%", "max_majority"],
    );
    let p = cfg("max_majority = 0.95");
    let (o, _, err) = run(quiver().args([
        "experiment",
        "--dry-run",
        "--quiet",
        "--config",
        p.to_str().unwrap(),
    ]));
    assert!(o.status.success(), "{err}");
}

/// The registry no longer serves BIG-bench: fetching it says so in one
/// sentence with the way to use a local copy, never a pip error.
#[test]
fn fetching_bigbench_says_how_to_use_a_local_copy() {
    let home = tempfile::tempdir().unwrap();
    let mut cmd = quiver();
    cmd.env("QUIVER_HOME", home.path())
        .args(["fetch", "bigbench"]);
    assert_clean_error(&mut cmd, &["no longer serves bigbench", "bigbench:DIR"]);
    let (o, _, err) = run(quiver()
        .env("QUIVER_HOME", home.path())
        .args(["fetch", "bigbench"]));
    assert!(!err.contains("pip"), "{err}");
    assert!(!o.status.success());
}
