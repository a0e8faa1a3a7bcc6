//! One door to the library (issue 16), through the built binary: `score`,
//! `eval --route arrow`, `arrow` and `cluster` read a library on local disk
//! and on a real S3 server (moto) alike, with the same numbers; a flipped
//! byte, NaN weights and an edited manifest are refused on load by every
//! command that loads experts, and by `verify`; an adapter made for another
//! base model is refused unless `--allow-base-mismatch`.

#[path = "../../quiver-core/tests/fixtures/library/s3_server.rs"]
mod s3_server;

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use common::{assert_clean_error, fixture, quiver, run};
use quiver_core::expert::Expert;

/// Three PEFT adapters for the tiny Llama fixture (the fixture with its A
/// scaled), imported into `lib` (a directory or an s3:// URI).
fn build_library(lib: &str, env: &[(&'static str, String)], tmp: &Path) {
    let mut dirs = Vec::new();
    for i in 0..3 {
        let mut e = Expert::load(&fixture("peft_tiny_llama"), &Device::Cpu, DType::F32).unwrap();
        for (a, b) in e.weights.values_mut() {
            *a = a.affine(1.0 + i as f64 / 2.0, 0.0).unwrap();
            *b = b.affine(1.0 - i as f64 / 4.0, 0.0).unwrap();
        }
        let name = format!("ad{i}");
        e.name = name.clone();
        let p = tmp.join(format!("src_{name}"));
        e.save(&p).unwrap();
        dirs.push((name, p));
    }
    for (name, p) in dirs {
        ok(quiver()
            .envs(env.iter().cloned())
            .args(["library", "import", "--library", lib, "--name", &name])
            .arg(&p));
    }
}

fn ok(cmd: &mut Command) -> String {
    let (out, stdout, stderr) = run(cmd);
    assert!(out.status.success(), "failed: {stderr}");
    stdout
}

fn tiny() -> String {
    fixture("tiny_llama").display().to_string()
}

fn data(tmp: &Path) -> PathBuf {
    let p = tmp.join("eval.jsonl");
    let mut text = String::new();
    for (i, w) in ["cat", "sun", "red", "box", "pen", "cup"]
        .iter()
        .enumerate()
    {
        let v = serde_json::json!({
            "task": "pick_plural",
            "source": format!("{i}: the plural of {w} is"),
            "options": [format!(" {w}s"), format!(" {w}x"), format!(" {w}")],
            "answer": 0,
        });
        text.push_str(&format!("{v}\n"));
    }
    std::fs::write(&p, text).unwrap();
    p
}

fn score(lib: &str, env: &[(&'static str, String)], route: &str) -> Command {
    let mut c = quiver();
    c.envs(env.iter().cloned()).args([
        "score",
        "--model",
        &tiny(),
        "--library",
        lib,
        "--route",
        route,
        "--context",
        "the plural of cat is",
        "--continuation",
        " cats",
    ]);
    c
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn logprob(out: &str) -> f64 {
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    v["logprob"].as_f64().expect("a finite log-likelihood")
}

/// score / eval --route arrow / arrow / cluster on `lib`; returns what the
/// numbers were, to compare a local and an S3 library.
fn commands(lib: &str, env: &[(&'static str, String)], tmp: &Path) -> Vec<String> {
    let mut seen = Vec::new();
    for route in ["expert:ad1", "uniform", "arrow"] {
        seen.push(format!(
            "{route} {:.6}",
            logprob(&ok(&mut score(lib, env, route)))
        ));
    }
    let arrow: serde_json::Value = serde_json::from_str(
        ok(quiver()
            .envs(env.iter().cloned())
            .args(["arrow", "--library", lib]))
        .trim(),
    )
    .unwrap();
    assert_eq!(arrow["experts"], 3, "{arrow}");
    // The prototypes `score --route arrow` computed are in the library now.
    assert_eq!(arrow["cached"], 3, "{arrow}");
    let report = tmp.join(format!("eval-{}.json", seen.len()));
    ok(quiver().envs(env.iter().cloned()).args([
        "eval",
        "--model",
        &tiny(),
        "--library",
        lib,
        "--route",
        "arrow",
        "--top-k",
        "2",
        "--data",
        data(tmp).to_str().unwrap(),
        "--tasks",
        "pick_plural",
        "--split",
        "all",
        "--json",
        report.to_str().unwrap(),
    ]));
    seen.push(format!("eval {}", read_json(&report)["tasks"][0]["score"]));
    let clusters = tmp.join("clusters.json");
    ok(quiver().envs(env.iter().cloned()).args([
        "cluster",
        "--library",
        lib,
        "--k",
        "2",
        "--embed",
        "weights",
        "--out",
        clusters.to_str().unwrap(),
    ]));
    seen.push(format!("clusters {}", read_json(&clusters)["members"]));
    seen
}

#[test]
fn every_command_reads_local_and_s3_libraries_alike() {
    let tmp = tempfile::tempdir().unwrap();
    let local = tmp.path().join("lib").display().to_string();
    build_library(&local, &[], tmp.path());
    let here = commands(&local, &[], tmp.path());
    let Some(server) = s3_server::server() else {
        return;
    };
    let bucket = server.bucket();
    let uri = format!("s3://{bucket}/door/lib");
    let env = server.env();
    let tmp2 = tempfile::tempdir().unwrap();
    build_library(&uri, &env, tmp2.path());
    let there = commands(&uri, &env, tmp2.path());
    assert_eq!(here, there, "an S3 library gives the same numbers");
    // The S3 library holds its derived data too.
    let aux = server.keys(&bucket, "door/lib/.aux/");
    assert!(aux.iter().any(|k| k.contains("/arrow-")), "{aux:?}");
    assert!(aux.iter().any(|k| k.contains("/clusters-")), "{aux:?}");
}

fn lib_with_three(tmp: &Path) -> (PathBuf, String) {
    let dir = tmp.join("lib");
    let lib = dir.display().to_string();
    build_library(&lib, &[], tmp);
    (dir, lib)
}

/// Every command that loads `ad1` refuses it with one sentence naming it.
fn refused_everywhere(lib: &str, needles: &[&str], tmp: &Path) {
    for route in ["expert:ad1", "uniform", "ties", "arrow"] {
        assert_clean_error(&mut score(lib, &[], route), needles);
    }
    let d = data(tmp);
    let mut eval = quiver();
    eval.args([
        "eval",
        "--model",
        &tiny(),
        "--library",
        lib,
        "--route",
        "arrow",
    ])
    .args(["--data", d.to_str().unwrap(), "--tasks", "pick_plural"]);
    assert_clean_error(&mut eval, needles);
    assert_clean_error(quiver().args(["arrow", "--library", lib]), needles);
    let out = tmp.join("c.json");
    assert_clean_error(
        quiver()
            .args([
                "cluster",
                "--library",
                lib,
                "--k",
                "2",
                "--embed",
                "weights",
                "--out",
            ])
            .arg(&out),
        needles,
    );
    let (o, stdout, stderr) = run(quiver().args(["library", "verify", "--library", lib]));
    assert!(!o.status.success(), "verify passed:\n{stdout}{stderr}");
    assert!(
        format!("{stdout}{stderr}").contains("ad1"),
        "{stdout}{stderr}"
    );
}

#[test]
fn a_flipped_byte_is_refused_on_load() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, lib) = lib_with_three(tmp.path());
    let w = dir.join("ad1/adapter_model.safetensors");
    let mut bytes = std::fs::read(&w).unwrap();
    let at = bytes.len() - 7;
    bytes[at] ^= 0x10;
    std::fs::write(&w, bytes).unwrap();
    refused_everywhere(
        &lib,
        &["ad1", "adapter_model.safetensors", "sha256"],
        tmp.path(),
    );
}

#[test]
fn nan_weights_are_refused_on_load_and_on_import() {
    let tmp = tempfile::tempdir().unwrap();
    // A NaN-filled PEFT adapter: refused by import and by --adapter.
    let mut e = Expert::load(&fixture("peft_tiny_llama"), &Device::Cpu, DType::F32).unwrap();
    let (a, _) = e.weights.values_mut().next().unwrap();
    *a = Tensor::full(f32::NAN, a.dims(), &Device::Cpu).unwrap();
    let nan = tmp.path().join("nan_adapter");
    e.save(&nan).unwrap();
    let lib = tmp.path().join("lib");
    assert_clean_error(
        quiver()
            .args(["library", "import", "--library"])
            .arg(&lib)
            .arg(&nan),
        &["adapter_model.safetensors", "non-finite"],
    );
    let mut c = quiver();
    c.args(["score", "--model", &tiny(), "--adapter"])
        .arg(&nan)
        .args(["--context", "a", "--continuation", " b"]);
    assert_clean_error(&mut c, &["nan_adapter", "non-finite"]);
    // NaNs written into a library expert's weights (same size, so only the
    // digest tells).
    let (dir, lib) = lib_with_three(&tmp.path().join("second"));
    std::fs::create_dir_all(tmp.path().join("second")).unwrap();
    let w = dir.join("ad1/adapter_model.safetensors");
    let mut bytes = std::fs::read(&w).unwrap();
    let n = bytes.len();
    for chunk in bytes[n - 64..].chunks_exact_mut(4) {
        chunk.copy_from_slice(&f32::NAN.to_le_bytes());
    }
    std::fs::write(&w, bytes).unwrap();
    refused_everywhere(&lib, &["ad1", "adapter_model.safetensors"], tmp.path());
}

#[test]
fn an_edited_manifest_field_is_refused_on_load() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, lib) = lib_with_three(tmp.path());
    let m = dir.join("ad1/quiver_manifest.json");
    let text = std::fs::read_to_string(&m).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let alpha = v["alpha"].as_f64().unwrap();
    let mut edited = v.clone();
    edited["alpha"] = serde_json::json!(alpha + 1.0);
    std::fs::write(&m, serde_json::to_string_pretty(&edited).unwrap()).unwrap();
    refused_everywhere(&lib, &["ad1", "quiver_manifest.json", "edited"], tmp.path());
    // `ls` does not report the edited value as the expert's.
    let (_, stdout, _) = run(quiver().args(["library", "ls", "--json", "--library", &lib]));
    let listed: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    for e in listed.iter().filter(|e| e["name"] == "ad1") {
        assert_eq!(e["alpha"].as_f64(), Some(alpha), "{stdout}");
    }
    // Removing the seal as well does not help: the manifest no longer
    // describes the files.
    let mut unsealed = edited;
    unsealed.as_object_mut().unwrap().remove("seal");
    std::fs::write(&m, serde_json::to_string_pretty(&unsealed).unwrap()).unwrap();
    refused_everywhere(&lib, &["ad1", "quiver_manifest.json", "alpha"], tmp.path());
}

#[test]
fn an_adapter_for_another_base_model_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let other = tmp.path().join("llama2_adapter");
    std::fs::create_dir_all(&other).unwrap();
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        std::fs::copy(fixture("peft_tiny_llama").join(f), other.join(f)).unwrap();
    }
    let cfg = other.join("adapter_config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["base_model_name_or_path"] = "meta-llama/Llama-2-7b-hf".into();
    std::fs::write(&cfg, v.to_string()).unwrap();
    let scored = |extra: &[&str]| {
        let mut c = quiver();
        c.args(["score", "--model", &tiny(), "--adapter"])
            .arg(&other)
            .args(["--context", "a", "--continuation", " b"])
            .args(extra);
        c
    };
    assert_clean_error(
        &mut scored(&[]),
        &["meta-llama/Llama-2-7b-hf", "--allow-base-mismatch"],
    );
    logprob(&ok(&mut scored(&["--allow-base-mismatch"])));
    // Imported into a library, it is refused when a route loads it.
    let lib = tmp.path().join("lib").display().to_string();
    ok(quiver()
        .args(["library", "import", "--library", &lib])
        .arg(&other));
    assert_clean_error(
        &mut score(&lib, &[], "expert:llama2_adapter"),
        &["meta-llama/Llama-2-7b-hf"],
    );
    // A library that knows its base model refuses it at import.
    let mut quiver_expert =
        Expert::load(&fixture("peft_tiny_llama"), &Device::Cpu, DType::F32).unwrap();
    quiver_expert.name = "q0".into();
    quiver_expert.info = Some(quiver_core::expert::ExpertInfo {
        name: "q0".into(),
        tasks: vec!["t".into()],
        base_model: quiver_core::expert::BaseModelId {
            id: tiny(),
            fingerprint: "fp".into(),
        },
        training: serde_json::json!({}),
        metrics: Default::default(),
        created: 0,
    });
    let q0 = tmp.path().join("q0");
    quiver_expert.save(&q0).unwrap();
    let based = tmp.path().join("based").display().to_string();
    ok(quiver()
        .args(["library", "import", "--library", &based])
        .arg(&q0));
    let mut c = quiver();
    c.args(["library", "import", "--library", &based])
        .arg(&other);
    assert_clean_error(
        &mut c,
        &["meta-llama/Llama-2-7b-hf", "--allow-base-mismatch"],
    );
    ok(quiver()
        .args([
            "library",
            "import",
            "--allow-base-mismatch",
            "--library",
            &based,
        ])
        .arg(&other));
    // The tiny Llama's own adapter on the tiny Qwen2.
    let mut c = quiver();
    c.args(["score", "--model"])
        .arg(fixture("tiny_qwen2"))
        .arg("--adapter")
        .arg(fixture("peft_tiny_llama"))
        .args(["--context", "a", "--continuation", " b"]);
    assert_clean_error(&mut c, &["tiny_llama"]);
}

#[test]
fn bad_route_flags_read_as_one_sentence() {
    let mut c = quiver();
    c.args(["score", "--model", &tiny(), "--route", "arow"])
        .args(["--context", "a", "--continuation", " b"]);
    let (o, _, stderr) = run(&mut c);
    assert!(!o.status.success());
    assert!(
        stderr.contains("arow") && stderr.contains("unknown route"),
        "{stderr}"
    );
    let mut c = quiver();
    c.args(["score", "--model", &tiny(), "--device", "gpu"])
        .args(["--context", "a", "--continuation", " b"]);
    let (o, _, stderr) = run(&mut c);
    assert!(!o.status.success());
    assert!(stderr.contains("cuda:N"), "{stderr}");
}

#[test]
fn s3_errors_read_as_their_cause() {
    // No endpoint reachable: one sentence that says so.
    let mut c = quiver();
    c.env("AWS_ACCESS_KEY_ID", "k")
        .env("AWS_SECRET_ACCESS_KEY", "s")
        .env("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        .args(["library", "ls", "--library", "s3://bkt/lib"]);
    assert_clean_error(&mut c, &["cannot reach the S3 endpoint", "127.0.0.1:9"]);
    let Some(server) = s3_server::server() else {
        return;
    };
    // A bucket that does not exist, on a server that does.
    let mut c = quiver();
    c.envs(server.env())
        .args(["library", "ls", "--library", "s3://no-such-bucket-q/lib"]);
    assert_clean_error(&mut c, &["no-such-bucket-q", "does not exist"]);
    let mut c = quiver();
    c.envs(server.env()).args([
        "score",
        "--model",
        &tiny(),
        "--library",
        "s3://no-such-bucket-q/lib",
        "--route",
        "arrow",
        "--context",
        "a",
        "--continuation",
        " b",
    ]);
    assert_clean_error(&mut c, &["does not exist"]);
}
