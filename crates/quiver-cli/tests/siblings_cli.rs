//! The held-out-sibling design of `quiver experiment` (issue 15) on the
//! tiny model: families from the TOML, held-out siblings refused as
//! training tasks, every route (oracles, GenKnowSub, mu, Phatgoose
//! included) on the same items, paired statistics and routing diagnostics
//! in the results, and a resumed run that reuses everything.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_clean_error, experts_in, fixture, quiver, run};

/// Three families of multiple-choice tasks, three subtasks each; one of
/// them (`*_c`) will be held out. Inputs differ between subtasks, except
/// for one `copy_c` input planted in `copy_a`, which the contamination
/// check must find.
fn write_data(dir: &Path) -> PathBuf {
    let words = [
        "cat", "sun", "red", "box", "pen", "cup", "hat", "map", "dog", "fig",
    ];
    let mut t = String::new();
    type Answer = fn(&str) -> String;
    let fams: [(&str, Answer); 3] = [
        ("plural", |w| format!("{w}s")),
        ("reverse", |w| w.chars().rev().collect()),
        ("copy", |w| w.to_string()),
    ];
    for (fam, f) in fams {
        for sub in ["a", "b", "c"] {
            for (i, w) in words.iter().cycle().take(40).enumerate() {
                let right = f(w);
                let wrong = format!("{w}{w}");
                let v = serde_json::json!({
                    "task": format!("{fam}_{sub}"),
                    "source": format!("{fam} {sub}{i}: {w} ->"),
                    "target": right,
                    "options": [right, wrong, "x"],
                    "answer": 0,
                });
                t.push_str(&format!("{v}\n"));
            }
        }
    }
    // One held-out input that also occurs in a library task.
    let v = serde_json::json!({
        "task": "copy_a", "source": "copy c3: box ->", "target": "box",
        "options": ["box", "boxbox", "x"], "answer": 0,
    });
    t.push_str(&format!("{v}\n"));
    let path = dir.join("fam.jsonl");
    std::fs::write(&path, t).unwrap();
    path
}

fn write_config(dir: &Path, data: &Path, extra_train: &str) -> PathBuf {
    let cfg = format!(
        r#"
name = "tiny-siblings"
model = "{model}"

[train]
tasks = [{extra_train}]
source = "{data}"
steps = 2
cluster_steps = 2
shared_steps = 2
lr = 1e-2
batch_size = 2
max_input_len = 32
max_target_len = 8
max_eval_examples = 2

[library]
k = 3

[families.plural]
library = ["plural_a", "plural_b"]
held_out = ["plural_c"]

[families.reverse]
library = ["reverse_a", "reverse_b"]
held_out = ["reverse_c"]

[families.copy]
library = ["copy_a", "copy_b"]
held_out = ["copy_c"]

[eval]
held_out_split = [0.2, 0.1]
held_out_limit = 12
select_limit = 4
own_limit = 4
top_k = 2
routes = [
    "base",
    "uniform@private",
    {{ route = "arrow", library = "private", top_k = 2 }},
    "shared",
    "family-oracle",
    "task-oracle",
    "arrow@mbc",
    "arrow@random",
    "ties@private",
    {{ route = "arrow", library = "private", gks = true }},
    "mu@private",
    "phatgoose@private",
]
"#,
        model = fixture("tiny_llama").display(),
        data = data.display(),
    );
    let path = dir.join("siblings.toml");
    std::fs::write(&path, cfg).unwrap();
    path
}

#[test]
fn held_out_siblings_experiment_reports_paired_differences_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_data(dir.path());
    let cfg = write_config(dir.path(), &data, "");
    let out = dir.path().join("run");
    let args = [
        "experiment",
        "--no-progress",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    let (o, md, err) = run(quiver().args(args));
    assert!(o.status.success(), "{err}");
    // The guard: every library training step is told the siblings.
    assert!(
        err.contains("--held-out copy_c,plural_c,reverse_c"),
        "{err}"
    );
    // The planted overlap is found and left out of the held-out items.
    assert!(
        err.contains("1 of copy_c's inputs also occur in library task copy_a"),
        "{err}"
    );
    assert!(err.contains("--exclude-inputs-of copy_a"), "{err}");
    // `--exclude-inputs-of` drops exactly the planted item (40 -> 39).
    let (o, table, e) = run(quiver().args([
        "eval",
        "--model",
        fixture("tiny_llama").to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--tasks",
        "copy_c",
        "--split",
        "all",
        "--exclude-inputs-of",
        "copy_a,plural_a",
    ]));
    assert!(o.status.success(), "{e}");
    assert!(e.contains("1 of 40 items left out"), "{e}");
    assert!(table.contains(" 39 "), "{table}");
    for label in [
        "base",
        "uniform@private",
        "arrow@private k=2",
        "shared",
        "family-oracle",
        "task-oracle",
        "arrow@mbc",
        "arrow@random",
        "ties@private",
        "arrow+gks@private",
        "mu@private",
        "phatgoose@private",
    ] {
        assert!(md.contains(&format!("| {label} |")), "{label}: {md}");
    }
    // Libraries: 6 private experts, 3 task oracles, k = 3 cluster experts.
    let count = |lib: &str| experts_in(&out.join(lib));
    assert_eq!(count("private"), 6);
    assert_eq!(count("oracle"), 3);
    assert_eq!(count("mbc"), 3);
    assert_eq!(count("private+shared"), 7);
    // No library holds an expert trained on a held-out sibling.
    for lib in ["private", "mbc", "random", "shared"] {
        for e in std::fs::read_dir(out.join(lib)).unwrap() {
            let p = e.unwrap().path().join("quiver_expert.json");
            if let Ok(text) = std::fs::read_to_string(&p) {
                for h in ["plural_c", "reverse_c", "copy_c"] {
                    assert!(!text.contains(&format!("\"{h}\"")), "{}: {h}", p.display());
                }
            }
        }
    }

    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let rows = summary["held_out"].as_array().unwrap();
    assert_eq!(rows.len(), 12);
    let base = &rows[0];
    assert_eq!(base["route"], "base");
    assert!(base["vs_base"].is_null());
    for r in &rows[1..] {
        let d = &r["vs_base"];
        let (lo, diff, hi) = (
            d["ci_low"].as_f64().unwrap(),
            d["diff"].as_f64().unwrap(),
            d["ci_high"].as_f64().unwrap(),
        );
        assert!(lo <= diff && diff <= hi, "{r}");
        let p = d["mcnemar_p"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&p), "{r}");
        // Every route is scored on the same 12 items per sibling.
        assert_eq!(d["n"], 36, "{r}");
        let tasks = r["tasks"].as_array().unwrap();
        assert_eq!(tasks.len(), 3);
    }
    // The uniform reference has no difference with itself.
    let uni = rows
        .iter()
        .find(|r| r["route"] == "uniform@private")
        .unwrap();
    assert!(uni["vs_uniform"].is_null());
    // The family oracle names an expert of the sibling's own family.
    let fam = rows.iter().find(|r| r["route"] == "family-oracle").unwrap();
    for t in fam["tasks"].as_array().unwrap() {
        let task = t["task"].as_str().unwrap();
        let expert = t["expert"].as_str().unwrap();
        assert_eq!(
            task.split('_').next(),
            expert.split('_').next(),
            "{task} -> {expert}"
        );
    }
    // Own tasks: one row per library task.
    assert_eq!(summary["own_tasks"]["tasks"].as_array().unwrap().len(), 6);
    // ARI of each clustering against the families, in [-1, 1].
    let aris = summary["ari"].as_array().unwrap();
    assert!(aris.iter().any(|a| a["clustering"] == "mbc"));
    assert!(aris.iter().any(|a| a["clustering"] == "random"));
    assert!(aris.iter().any(|a| a["clustering"] == "mbc-weights"));
    for a in aris {
        let v = a["ari"].as_f64().unwrap();
        assert!((-1.0..=1.0).contains(&v), "{a}");
    }
    // Routing diagnostics for the routed rows on every sibling: a share of
    // weight in [0, 1], chance = 2 of 6 private experts.
    let routing = summary["routing"].as_array().unwrap();
    let arrow: Vec<_> = routing
        .iter()
        .filter(|r| r["route"] == "arrow@private k=2")
        .collect();
    assert_eq!(arrow.len(), 3);
    for r in arrow {
        let s = r["share"].as_f64().unwrap();
        assert!((0.0..=1.0 + 1e-9).contains(&s), "{r}");
        assert!(
            (r["chance"].as_f64().unwrap() - 2.0 / 6.0).abs() < 1e-9,
            "{r}"
        );
    }
    assert!(md.contains("Private experts on their own tasks"), "{md}");
    assert!(md.contains("Clusters against families"), "{md}");

    // Second run: nothing retrained or re-evaluated, the same results.
    let (o, md2, err) = run(quiver().args(args));
    assert!(o.status.success(), "{err}");
    assert_eq!(md, md2);
    assert!(!err.contains("$ quiver eval"), "{err}");
    assert!(err.contains(": already done"), "{err}");
    assert!(!err.contains("$ quiver train"), "{err}");
}

#[test]
fn held_out_siblings_are_refused_as_training_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_data(dir.path());
    // In the experiment file: as an extra training task...
    for h in ["plural_c", "reverse_c", "copy_c"] {
        let cfg = write_config(dir.path(), &data, &format!("\"{h}\""));
        assert_clean_error(
            quiver().args(["experiment", "--config", cfg.to_str().unwrap()]),
            &["held-out sibling", h],
        );
    }
    // ... and by `quiver train --held-out`, which the experiment passes.
    let lib = dir.path().join("lib");
    assert_clean_error(
        quiver().args([
            "train",
            "--model",
            fixture("tiny_llama").to_str().unwrap(),
            "--library",
            lib.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--tasks",
            "plural_a,plural_c",
            "--held-out",
            "plural_c,reverse_c",
            "--steps",
            "1",
        ]),
        &["plural_c", "held out"],
    );
    assert!(!lib.join("plural_a").exists());
    // A family listing a held-out sibling in its library is refused too.
    let text = std::fs::read_to_string(write_config(dir.path(), &data, "")).unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        text.replace(
            r#"library = ["plural_a", "plural_b"]"#,
            r#"library = ["plural_a", "reverse_c"]"#,
        ),
    )
    .unwrap();
    assert_clean_error(
        quiver().args(["experiment", "--config", bad.to_str().unwrap()]),
        &["reverse_c", "held-out sibling"],
    );
}
