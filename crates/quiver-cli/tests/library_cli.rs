//! `quiver library`, run as the built binary against a local directory and
//! a real S3-compatible server (moto, started on loopback by the tests):
//! the commands, bad input, writers killed mid-write, concurrent writers.

#[path = "../../quiver-core/tests/fixtures/library/s3_server.rs"]
mod s3_server;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use candle_core::{DType, Device};
use quiver_core::expert::{BaseModelId, Expert, ExpertInfo};

const FP: &str = "fptiny01";

fn quiver() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_quiver"));
    c.env_remove("QUIVER_LIBRARY")
        .env_remove("QUIVER_LIBRARY_CRASH_AFTER_FILES");
    c
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../quiver-core/tests/fixtures/peft_tiny_llama")
}

fn run(cmd: &mut Command) -> (Output, String, String) {
    let out = cmd.output().expect("quiver runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stdout, stderr)
}

/// Runs a command that must succeed; returns its stdout.
fn ok(cmd: &mut Command) -> String {
    let (out, stdout, stderr) = run(cmd);
    assert!(out.status.success(), "failed: {stderr}");
    stdout
}

/// Fails the test unless the command failed cleanly: non-zero exit, one
/// `error:` line that contains every `needle`, and no panic.
fn assert_clean_error(cmd: &mut Command, needles: &[&str]) {
    let (out, _, stderr) = run(cmd);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    assert!(
        !stderr.contains("RUST_BACKTRACE"),
        "backtrace hint: {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line of error, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "error should mention `{n}`: {stderr}");
    }
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.file_name() != "expected.json" {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
}

/// Writes Quiver experts `name_00..` (the PEFT fixture with scaled
/// weights and metadata for base model `fp`) under `dir`.
fn expert_dirs(dir: &Path, prefix: &str, n: usize, fp: &str) -> Vec<PathBuf> {
    (0..n)
        .map(|i| {
            let name = format!("{prefix}{i:02}");
            let mut e = Expert::load(&fixture(), &Device::Cpu, DType::F32).unwrap();
            for (a, _) in e.weights.values_mut() {
                *a = a.affine(1.0 + i as f64 / 10.0, 0.0).unwrap();
            }
            e.name = name.clone();
            e.info = Some(ExpertInfo {
                name: name.clone(),
                tasks: vec![format!("task/{i}")],
                base_model: BaseModelId {
                    id: "tiny_llama".into(),
                    fingerprint: fp.into(),
                },
                training: serde_json::json!({"steps": 10}),
                metrics: BTreeMap::from([("val_loss".to_string(), 0.5)]),
                created: 1_700_000_000,
            });
            let p = dir.join(&name);
            e.save(&p).unwrap();
            p
        })
        .collect()
}

fn ls_names(lib: &str, env: &[(&'static str, String)]) -> Vec<String> {
    let out =
        ok(quiver()
            .envs(env.iter().cloned())
            .args(["library", "ls", "--json", "--library", lib]));
    let v: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    v.iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect()
}

fn verify_ok(lib: &str, env: &[(&'static str, String)]) {
    let (out, stdout, stderr) =
        run(quiver()
            .envs(env.iter().cloned())
            .args(["library", "verify", "--library", lib]));
    assert!(out.status.success(), "verify failed:\n{stdout}{stderr}");
    assert!(stderr.contains("ok: "), "{stderr}");
}

/// ls, show, import, export, rm, verify, copy on `lib` (a directory or an
/// s3:// URI reached with `env`).
fn command_flow(lib: &str, env: &[(&'static str, String)], tmp: &Path) {
    let dirs = expert_dirs(tmp, "exp", 2, FP);
    let peft = tmp.join("peft_adapter");
    copy_dir(&fixture(), &peft);
    let q = || {
        let mut c = quiver();
        c.envs(env.iter().cloned()).env("QUIVER_LIBRARY", lib);
        c
    };
    // Import creates the library; the plain PEFT adapter is named after its directory.
    let out = ok(q().args(["library", "import"]).arg(&peft));
    assert_eq!(out.trim(), "peft_adapter");
    let out = ok(q().args(["library", "import"]).args(&dirs));
    assert_eq!(out.lines().collect::<Vec<_>>(), ["exp00", "exp01"]);
    let out = ok(q()
        .args(["library", "import", "--name", "renamed"])
        .arg(&dirs[0]));
    assert_eq!(out.trim(), "renamed");

    let (_, table, stderr) = run(q().args(["library", "ls"]));
    assert!(
        stderr.contains("4 expert(s)") && stderr.contains(FP),
        "{stderr}"
    );
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("TASKS"),
        "{table}"
    );
    assert_eq!(lines.len(), 5, "{table}");
    assert!(
        lines[1].starts_with("exp00 ") && lines[1].contains("task/0"),
        "{table}"
    );
    assert!(lines[1].contains("2023-11-14 22:13"), "{table}");
    assert_eq!(
        ls_names(lib, env),
        ["exp00", "exp01", "peft_adapter", "renamed"]
    );

    let show = ok(q().args(["library", "show", "exp01"]));
    assert!(
        show.contains("base model:   tiny_llama (fingerprint fptiny01)"),
        "{show}"
    );
    assert!(
        show.contains("adapter_model.safetensors") && show.contains("sha256"),
        "{show}"
    );
    let show: serde_json::Value =
        serde_json::from_str(&ok(q().args(["library", "show", "renamed", "--json"]))).unwrap();
    assert_eq!(show["info"]["name"], "renamed");
    assert_eq!(show["lora_config"]["r"], 4);
    assert_eq!(show["manifest"]["files"].as_object().unwrap().len(), 3);

    let out_dir = tmp.join("exported/exp01");
    ok(q().args(["library", "export", "exp01"]).arg(&out_dir));
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "quiver_expert.json",
    ] {
        assert_eq!(
            std::fs::read(out_dir.join(f)).unwrap(),
            std::fs::read(dirs[1].join(f)).unwrap(),
            "{f}"
        );
    }
    verify_ok(lib, env);

    // Copy to a local library and back into a new one.
    let local_copy = tmp.join("copy_local");
    let copied = ok(q().args(["library", "copy"]).arg(&local_copy));
    assert_eq!(copied.lines().count(), 4);
    verify_ok(local_copy.to_str().unwrap(), &[]);
    let back = format!("{}-back", lib.trim_end_matches('/'));
    let copied = ok(q().args(["library", "copy"]).arg(&local_copy).arg(&back));
    assert_eq!(copied.lines().count(), 4);
    assert_eq!(ls_names(&back, env), ls_names(lib, env));
    // Copying again finds everything there already.
    let (out, stdout, stderr) = run(q().args(["library", "copy"]).arg(&local_copy).arg(&back));
    assert!(out.status.success() && stdout.is_empty(), "{stderr}");
    assert!(stderr.contains("4 already there"), "{stderr}");

    ok(q().args(["library", "rm", "renamed"]));
    ok(q().args(["library", "rm", "--purge", "peft_adapter"]));
    assert_eq!(ls_names(lib, env), ["exp00", "exp01"]);
    assert_clean_error(
        q().args(["library", "rm", "renamed"]),
        &["no expert `renamed`"],
    );
    verify_ok(lib, env);
}

#[test]
fn commands_on_a_local_library() {
    let tmp = tempfile::tempdir().unwrap();
    let lib = tmp.path().join("lib");
    command_flow(lib.to_str().unwrap(), &[], tmp.path());
    // The layout stays what older code reads: LIB/<name>/ is a PEFT directory.
    Expert::load(&lib.join("exp00"), &Device::Cpu, DType::F32).unwrap();
    assert!(lib.join("exp00/quiver_manifest.json").is_file());
    assert!(lib.join("library.json").is_file() && lib.join("base_model.json").is_file());
}

#[test]
fn commands_on_an_s3_library() {
    let Some(server) = s3_server::server() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let bucket = server.bucket();
    command_flow(
        &format!("s3://{bucket}/libs/main"),
        &server.env(),
        tmp.path(),
    );
    assert!(server
        .get_object(&bucket, "libs/main/exp00/quiver_manifest.json")
        .is_some());
}

fn flip_byte_in_the_middle(bytes: &mut [u8]) {
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
}

#[test]
fn verify_names_a_corrupt_file_and_exits_non_zero() {
    let tmp = tempfile::tempdir().unwrap();
    let lib = tmp.path().join("lib");
    let dirs = expert_dirs(tmp.path(), "e", 3, FP);
    ok(quiver()
        .args(["library", "import", "--library"])
        .arg(&lib)
        .args(&dirs));
    let w = lib.join("e01/adapter_model.safetensors");
    let mut bytes = std::fs::read(&w).unwrap();
    flip_byte_in_the_middle(&mut bytes);
    std::fs::write(&w, bytes).unwrap();
    let (out, stdout, stderr) = run(quiver().args(["library", "verify", "--library"]).arg(&lib));
    assert!(!out.status.success());
    assert!(
        stdout.starts_with(&format!("{}: corrupt: its sha256 is", w.display())),
        "{stdout}"
    );
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains("failed verification: 1 problem(s)"),
        "{stderr}"
    );
    // The corrupt expert cannot be exported or shown; the others can.
    assert_clean_error(
        quiver()
            .args(["library", "export", "e01", "--library"])
            .arg(&lib)
            .arg(tmp.path().join("out")),
        &["e01/adapter_model.safetensors", "corrupt"],
    );
    ok(quiver()
        .args(["library", "show", "e00", "--library"])
        .arg(&lib));
}

#[test]
fn s3_verify_names_a_corrupt_object() {
    let Some(server) = s3_server::server() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let bucket = server.bucket();
    let lib = format!("s3://{bucket}/lib");
    let dirs = expert_dirs(tmp.path(), "e", 2, FP);
    ok(quiver()
        .envs(server.env())
        .args(["library", "import", "--library", &lib])
        .args(&dirs));
    let key = "lib/e00/adapter_model.safetensors";
    let mut bytes = server.get_object(&bucket, key).unwrap();
    flip_byte_in_the_middle(&mut bytes);
    server.put_object(&bucket, key, &bytes);
    let (out, stdout, _) =
        run(quiver()
            .envs(server.env())
            .args(["library", "verify", "--library", &lib]));
    assert!(!out.status.success());
    assert!(
        stdout.starts_with(&format!("s3://{bucket}/{key}: corrupt")),
        "{stdout}"
    );
}

#[test]
fn bad_input_gives_one_sentence_and_damages_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let lib = tmp.path().join("lib");
    let libs = lib.to_str().unwrap();
    let dirs = expert_dirs(tmp.path(), "good", 1, FP);
    ok(quiver()
        .args(["library", "import", "--library", libs])
        .args(&dirs));
    let before = ok(quiver().args(["library", "ls", "--json", "--library", libs]));
    let q = || {
        let mut c = quiver();
        c.env("QUIVER_LIBRARY", libs);
        c
    };

    // Path traversal and other invalid names.
    for bad in ["../x", "a/b", "..", ".hidden", ""] {
        assert_clean_error(
            q().args(["library", "import", "--name", bad]).arg(&dirs[0]),
            &["not a valid expert name"],
        );
        assert_clean_error(
            q().args(["library", "rm", "--purge", bad]),
            &["not a valid expert name"],
        );
        assert_clean_error(
            q().args(["library", "show", bad]),
            &["not a valid expert name"],
        );
        assert_clean_error(
            q().args(["library", "export", bad])
                .arg(tmp.path().join("o")),
            &["not a valid expert name"],
        );
    }
    assert!(!tmp.path().join("x").exists());

    // A directory that is not a PEFT adapter.
    let junk = tmp.path().join("junk");
    std::fs::create_dir(&junk).unwrap();
    std::fs::write(junk.join("README.md"), "hi").unwrap();
    assert_clean_error(
        q().args(["library", "import"]).arg(&junk),
        &["junk", "not a PEFT adapter directory"],
    );

    // A truncated safetensors header.
    let trunc = tmp.path().join("trunc");
    copy_dir(&fixture(), &trunc);
    let w = trunc.join("adapter_model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..60]).unwrap();
    assert_clean_error(
        q().args(["library", "import"]).arg(&trunc),
        &["trunc/adapter_model.safetensors"],
    );

    // An adapter trained on another base model.
    let other = expert_dirs(&tmp.path().join("o2"), "other", 1, "fpother1");
    assert_clean_error(
        q().args(["library", "import"]).args(&other),
        &["`other00`", "fpother1", FP, libs],
    );

    // A duplicate, a missing library, an unsupported URI, --name with two paths.
    assert_clean_error(
        q().args(["library", "import"]).args(&dirs),
        &["already has an expert `good00`"],
    );
    assert_clean_error(
        quiver().args(["library", "ls"]),
        &["--library", "QUIVER_LIBRARY"],
    );
    assert_clean_error(
        quiver()
            .args(["library", "ls", "--library"])
            .arg(tmp.path().join("nope")),
        &["nope", "not a Quiver expert library"],
    );
    assert_clean_error(
        quiver().args(["library", "ls", "--library", "gs://bucket/x"]),
        &["gs://bucket/x", "not supported"],
    );
    assert_clean_error(
        q().args(["library", "import", "--name", "n"])
            .args([&dirs[0], &junk]),
        &["--name needs exactly one PATH"],
    );

    let after = ok(quiver().args(["library", "ls", "--json", "--library", libs]));
    assert_eq!(before, after);
    verify_ok(libs, &[]);
}

/// Imports with the crash hook at every point, then kills real imports at
/// staggered moments: the library stays valid, every listed expert loads.
fn killed_writers(lib: &str, env: &[(&'static str, String)], tmp: &Path) {
    let dirs = expert_dirs(tmp, "k", 12, FP);
    ok(quiver()
        .envs(env.iter().cloned())
        .args(["library", "import", "--library", lib])
        .arg(&dirs[0]));
    // Files: weights, config, info, then the manifest.
    for (crash_after, dir) in dirs.iter().enumerate().take(5).skip(1) {
        let (out, _, stderr) = run(quiver()
            .envs(env.iter().cloned())
            .env("QUIVER_LIBRARY_CRASH_AFTER_FILES", crash_after.to_string())
            .args(["library", "import", "--library", lib])
            .arg(dir));
        assert!(!out.status.success(), "{stderr}");
        assert!(stderr.contains("aborting mid-write"), "{stderr}");
        verify_ok(lib, env);
        let listed = ls_names(lib, env);
        let name = format!("k{crash_after:02}");
        if !listed.contains(&name) {
            // Nothing half-written blocks the name.
            ok(quiver()
                .envs(env.iter().cloned())
                .args(["library", "import", "--library", lib])
                .arg(dir));
        }
    }
    assert_eq!(ls_names(lib, env).len(), 5);
    // SIGKILL a process importing the other experts after 0..350 ms.
    for (i, delay) in [0u64, 50, 100, 150, 250, 350].into_iter().enumerate() {
        let mut child = quiver()
            .envs(env.iter().cloned())
            .args(["library", "import", "--quiet", "--library", lib])
            .arg(&dirs[5 + i % 7])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay));
        let _ = child.kill();
        let _ = child.wait();
        verify_ok(lib, env);
    }
    let listed = ls_names(lib, env);
    for name in &listed {
        ok(quiver()
            .envs(env.iter().cloned())
            .args(["library", "show", name, "--library", lib]));
    }
}

#[test]
fn killed_writers_leave_a_valid_local_library() {
    let tmp = tempfile::tempdir().unwrap();
    let lib = tmp.path().join("lib");
    killed_writers(lib.to_str().unwrap(), &[], tmp.path());
}

#[test]
fn killed_writers_leave_a_valid_s3_library() {
    let Some(server) = s3_server::server() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let lib = format!("s3://{}/lib", server.bucket());
    killed_writers(&lib, &server.env(), tmp.path());
}

/// Two processes importing eight experts each, at the same time.
fn concurrent_imports(lib: &str, env: &[(&'static str, String)], tmp: &Path) {
    let dirs = expert_dirs(tmp, "c", 16, FP);
    let children: Vec<_> = dirs
        .chunks(8)
        .map(|half| {
            quiver()
                .envs(env.iter().cloned())
                .args(["library", "import", "--quiet", "--library", lib])
                .args(half)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 8);
    }
    let names = ls_names(lib, env);
    assert_eq!(names.len(), 16, "{names:?}");
    let (out, _, stderr) =
        run(quiver()
            .envs(env.iter().cloned())
            .args(["library", "verify", "--library", lib]));
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("ok: 16 expert(s), 48 file(s)"), "{stderr}");
}

#[test]
fn concurrent_imports_into_a_local_library() {
    let tmp = tempfile::tempdir().unwrap();
    let lib = tmp.path().join("lib");
    concurrent_imports(lib.to_str().unwrap(), &[], tmp.path());
}

#[test]
fn concurrent_imports_into_an_s3_library() {
    let Some(server) = s3_server::server() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let lib = format!("s3://{}/lib", server.bucket());
    concurrent_imports(&lib, &server.env(), tmp.path());
}
