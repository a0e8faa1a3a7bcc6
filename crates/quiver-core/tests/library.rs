//! The expert library on a local directory and on a real S3-compatible
//! server (moto, started by the tests on loopback): round trips, the
//! base-model guard, bad input, corruption, writers killed mid-write and
//! concurrent writers.
//!
//! Experts are the PEFT fixture `peft_tiny_llama` (written by PEFT itself)
//! with varied weights and Quiver metadata.

#[path = "fixtures/library/s3_server.rs"]
mod s3_server;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device};
use quiver_core::expert::{BaseModelId, Expert, ExpertInfo};
use quiver_core::library::{ExpertLibrary, LibraryError, StorageOptions};

/// Short enough that messages, which show 12 characters of a fingerprint, show it all.
const FP: &str = "fptiny01";

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft_tiny_llama")
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

/// The fixture's weights scaled by `1 + seed / 10`, with Quiver metadata
/// for base model `fp` (none if `None`).
fn expert(name: &str, seed: u64, fp: Option<&str>) -> Expert {
    let mut e = Expert::load(&fixture(), &Device::Cpu, DType::F32).unwrap();
    let s = 1.0 + seed as f64 / 10.0;
    for (a, _) in e.weights.values_mut() {
        *a = a.affine(s, 0.0).unwrap();
    }
    e.name = name.into();
    e.info = fp.map(|fp| ExpertInfo {
        name: name.into(),
        tasks: vec![format!("task_{seed}")],
        base_model: BaseModelId {
            id: "tiny_llama".into(),
            fingerprint: fp.into(),
        },
        training: serde_json::json!({"steps": 10, "lr": 1e-3}),
        metrics: BTreeMap::from([("val_loss".to_string(), 1.25)]),
        created: 1_700_000_000 + seed,
    });
    e
}

fn max_diff(a: &Expert, b: &Expert) -> f32 {
    let mut worst = 0f32;
    for (m, (wa, wb)) in &a.weights {
        let (va, vb) = &b.weights[m];
        for (x, y) in [(wa, va), (wb, vb)] {
            let d: f32 = (x - y)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            worst = worst.max(d);
        }
    }
    worst
}

/// Every file under `dir` with its bytes, to prove nothing changed.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd {
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

/// An S3 library in a fresh bucket, or `None` when the S3 tests are skipped.
fn s3_library() -> Option<(ExpertLibrary, String, &'static s3_server::S3Server)> {
    let server = s3_server::server()?;
    let bucket = server.bucket();
    let uri = format!("s3://{bucket}/team/lib");
    let lib = ExpertLibrary::create_with(&uri, &s3_opts(server)).unwrap();
    Some((lib, bucket, server))
}

fn s3_opts(server: &s3_server::S3Server) -> StorageOptions {
    StorageOptions {
        s3: server.options(),
    }
}

fn names(lib: &ExpertLibrary) -> Vec<String> {
    lib.list().unwrap().into_iter().map(|e| e.name).collect()
}

#[test]
fn local_round_trip_keeps_the_directory_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("lib");
    let lib = ExpertLibrary::create(root.to_str().unwrap()).unwrap();
    assert!(ExpertLibrary::create(root.to_str().unwrap()).is_err());

    // A plain PEFT adapter: named after its directory, no base model yet.
    let peft = tmp.path().join("peft_adapter");
    copy_dir(&fixture(), &peft);
    assert_eq!(lib.import_dir(&peft, None).unwrap(), "peft_adapter");
    assert_eq!(lib.base_model().unwrap(), None);
    // Stored byte for byte.
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        assert_eq!(
            std::fs::read(root.join("peft_adapter").join(f)).unwrap(),
            std::fs::read(peft.join(f)).unwrap()
        );
    }

    let e = expert("sst2", 3, Some(FP));
    lib.add_expert(&e).unwrap();
    assert_eq!(lib.base_model().unwrap().unwrap().fingerprint, FP);

    let list = lib.list().unwrap();
    assert_eq!(
        list.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
        ["peft_adapter", "sst2"]
    );
    let sst2 = &list[1];
    assert_eq!(sst2.tasks, ["task_3"]);
    assert_eq!((sst2.rank, sst2.modules), (4, 14));
    assert_eq!(sst2.target_modules.len(), 7);
    assert_eq!(sst2.created, 1_700_000_003);
    assert!(sst2.sealed && sst2.size > 19_000);

    // Code that reads LIB/<name> directly still works.
    let direct = Expert::load(&root.join("sst2"), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(max_diff(&direct, &e), 0.0);
    let loaded = lib.load_expert("sst2", &Device::Cpu, DType::F32).unwrap();
    assert_eq!(max_diff(&loaded, &e), 0.0);
    assert_eq!(loaded.info.as_ref().unwrap().metrics["val_loss"], 1.25);
    assert_eq!(lib.local_path("sst2"), Some(root.join("sst2")));

    // Export gives a PEFT directory that imports again under another name.
    let out = tmp.path().join("out/sst2");
    lib.export("sst2", &out).unwrap();
    assert!(
        lib.export("sst2", &out).is_err(),
        "export over a non-empty dir"
    );
    assert_eq!(
        lib.import_dir(&out, Some("sst2_again")).unwrap(),
        "sst2_again"
    );
    let again = lib
        .load_expert("sst2_again", &Device::Cpu, DType::F32)
        .unwrap();
    assert_eq!(again.info.unwrap().name, "sst2_again");

    let report = lib.verify().unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!((report.experts, report.files), (3, 8));

    // Soft delete: gone from the listing, kept in .trash.
    lib.remove("sst2_again", false).unwrap();
    assert!(!lib.contains("sst2_again").unwrap());
    assert!(!root.join("sst2_again").exists());
    let trash: Vec<_> = std::fs::read_dir(root.join(".trash")).unwrap().collect();
    assert_eq!(trash.len(), 1);
    lib.remove("peft_adapter", true).unwrap();
    assert_eq!(names(&lib), ["sst2"]);
    assert!(lib.verify().unwrap().is_ok());
}

#[test]
fn directories_written_by_older_code_are_listed_and_guarded() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("lib");
    // What `quiver train` writes: LIB/<name>/ via Expert::save, nothing else.
    expert("old", 1, Some(FP)).save(&root.join("old")).unwrap();
    std::fs::create_dir_all(root.join(".staging/partial")).unwrap();
    let lib = ExpertLibrary::open(root.to_str().unwrap()).unwrap();
    let list = lib.list().unwrap();
    assert_eq!(list.len(), 1);
    assert!(!list[0].sealed);
    assert_eq!(list[0].tasks, ["task_1"]);
    let report = lib.verify().unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert!(report.notes.iter().any(|n| n.contains("old")), "{report:?}");
    // Its shapes guard new adapters even without a manifest.
    let mut wide = expert("wide", 2, None);
    let (a, b) = wide
        .weights
        .get_mut("model.layers.0.self_attn.q_proj")
        .unwrap();
    *a = a.pad_with_zeros(1, 0, 16).unwrap();
    *b = b.pad_with_zeros(0, 0, 16).unwrap();
    let err = lib.add_expert(&wide).unwrap_err();
    assert!(matches!(err, LibraryError::ShapeMismatch { .. }), "{err}");
    lib.add_expert(&expert("new", 2, Some(FP))).unwrap();
    assert_eq!(names(&lib), ["new", "old"]);
    assert!(lib.verify().unwrap().is_ok());
}

#[test]
fn bad_input_is_refused_in_one_sentence_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("lib");
    let lib = ExpertLibrary::create(root.to_str().unwrap()).unwrap();
    lib.add_expert(&expert("good", 1, Some(FP))).unwrap();
    let before = snapshot(tmp.path());
    let one_sentence = |e: &LibraryError, needles: &[&str]| {
        let msg = e.to_string();
        assert!(!msg.contains('\n'), "{msg}");
        for n in needles {
            assert!(msg.contains(n), "`{n}` missing from: {msg}");
        }
    };

    // Path traversal and other bad names.
    let peft = tmp.path().join("peft");
    copy_dir(&fixture(), &peft);
    for bad in ["../x", "a/b", "", ".hidden", "..", "/etc"] {
        let err = lib.import_dir(&peft, Some(bad)).unwrap_err();
        one_sentence(&err, &["not a valid expert name"]);
        assert!(lib.load_expert(bad, &Device::Cpu, DType::F32).is_err());
        assert!(lib.remove(bad, true).is_err());
        assert!(lib.export(bad, &tmp.path().join("x")).is_err());
    }
    let mut evil = expert("../evil", 1, Some(FP));
    assert!(lib.add_expert(&evil).is_err());
    evil.name = "ok".into();
    evil.info.as_mut().unwrap().name = "../evil".into();
    // The stored name is the expert's, never the one inside its metadata.
    lib.add_expert(&evil).unwrap();
    lib.remove("ok", true).unwrap();
    std::fs::remove_dir_all(root.join(".tmp")).ok();

    // Not a PEFT directory.
    let junk = tmp.path().join("junk");
    std::fs::create_dir(&junk).unwrap();
    std::fs::write(junk.join("notes.txt"), "hello").unwrap();
    let err = lib.import_dir(&junk, None).unwrap_err();
    one_sentence(&err, &["junk", "not a PEFT adapter directory"]);

    // A truncated safetensors header.
    let trunc = tmp.path().join("trunc");
    copy_dir(&fixture(), &trunc);
    let w = trunc.join("adapter_model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..100]).unwrap();
    let err = lib.import_dir(&trunc, None).unwrap_err();
    one_sentence(&err, &["adapter_model.safetensors"]);

    // Trained on another base model (fingerprint differs).
    let other = tmp.path().join("other");
    expert("other", 2, Some("fp-other")).save(&other).unwrap();
    let err = lib.import_dir(&other, None).unwrap_err();
    assert!(matches!(err, LibraryError::BaseModelMismatch { .. }));
    one_sentence(&err, &["`other`", "fp-other", FP, "lib"]);

    // Plain PEFT adapter whose layers have other shapes (no fingerprint).
    let mut wide = expert("wide", 2, None);
    for (a, b) in wide.weights.values_mut() {
        *a = a.pad_with_zeros(1, 0, 8).unwrap();
        *b = b.pad_with_zeros(0, 0, 8).unwrap();
    }
    let wide_dir = tmp.path().join("wide");
    wide.save(&wide_dir).unwrap();
    let err = lib.import_dir(&wide_dir, None).unwrap_err();
    assert!(matches!(err, LibraryError::ShapeMismatch { .. }));
    one_sentence(&err, &["`wide`", "`good`", "base model"]);

    // A duplicate name.
    let err = lib.add_expert(&expert("good", 5, Some(FP))).unwrap_err();
    one_sentence(&err, &["already has an expert `good`"]);

    // Not a library at all.
    let err = ExpertLibrary::open(tmp.path().join("nope").to_str().unwrap()).unwrap_err();
    one_sentence(&err, &["nope", "not a Quiver expert library"]);

    let after = snapshot(tmp.path());
    let changed: Vec<_> = before
        .keys()
        .chain(after.keys())
        .filter(|p| p.starts_with(&root) && before.get(*p) != after.get(*p))
        .collect();
    assert!(changed.is_empty(), "library changed: {changed:?}");
    assert!(lib.verify().unwrap().is_ok());
}

#[test]
fn verify_names_corrupt_and_missing_files() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("lib");
    let lib = ExpertLibrary::create(root.to_str().unwrap()).unwrap();
    for (i, n) in ["a", "b", "c"].into_iter().enumerate() {
        lib.add_expert(&expert(n, i as u64, Some(FP))).unwrap();
    }
    assert!(lib.verify().unwrap().is_ok());
    let w = root.join("b/adapter_model.safetensors");
    let mut bytes = std::fs::read(&w).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&w, &bytes).unwrap();
    std::fs::remove_file(root.join("c/adapter_config.json")).unwrap();
    let report = lib.verify().unwrap();
    assert!(!report.is_ok());
    let lines: Vec<String> = report.problems.iter().map(|p| p.to_string()).collect();
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert!(lines[0].starts_with(&w.display().to_string()) && lines[0].contains("corrupt"));
    assert!(lines[1].contains("c/adapter_config.json") && lines[1].contains("missing"));
    let err = lib.load_expert("b", &Device::Cpu, DType::F32).unwrap_err();
    assert!(
        err.to_string().contains("b/adapter_model.safetensors"),
        "{err}"
    );
    assert!(lib.export("b", &tmp.path().join("out")).is_err());
    assert!(!tmp.path().join("out").exists());
}

/// Adds expert `name` to `uri` in a child process that aborts after
/// writing `crash_after` files (the test hook of `library::storage`).
fn add_in_crashing_child(
    uri: &str,
    name: &str,
    crash_after: usize,
    s3: Option<&s3_server::S3Server>,
) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
        .env("QUIVER_TEST_CRASH_CHILD", format!("{uri}\n{name}"))
        .env("QUIVER_LIBRARY_CRASH_AFTER_FILES", crash_after.to_string());
    if let Some(s) = s3 {
        cmd.envs(s.env());
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the child should have aborted: {stderr}"
    );
    assert!(stderr.contains("aborting mid-write"), "{stderr}");
}

/// Not a test on its own: the body of `add_in_crashing_child`.
#[test]
fn crash_child() {
    let Ok(spec) = std::env::var("QUIVER_TEST_CRASH_CHILD") else {
        return;
    };
    let (uri, name) = spec.split_once('\n').unwrap();
    let lib = ExpertLibrary::open(uri).unwrap();
    lib.add_expert(&expert(name, 7, Some(FP))).unwrap();
    panic!("the crash hook did not fire");
}

fn check_crash_recovery(lib: &ExpertLibrary, s3: Option<&s3_server::S3Server>) {
    lib.add_expert(&expert("kept", 1, Some(FP))).unwrap();
    // Files: weights, config, info, then the manifest (4 = after everything).
    for crash_after in 1..=4 {
        let name = format!("victim{crash_after}");
        add_in_crashing_child(lib.uri(), &name, crash_after, s3);
        // Only a crash after the manifest leaves the expert visible, and
        // then complete: on object storage the manifest is the commit; on a
        // local disk the directory rename is, which had not happened yet.
        let visible = s3.is_some() && crash_after == 4;
        assert_eq!(
            lib.contains(&name).unwrap(),
            visible,
            "crash after {crash_after} files"
        );
        assert_eq!(names(lib).len(), 1 + crash_after - 1 + usize::from(visible));
        let report = lib.verify().unwrap();
        assert!(report.is_ok(), "crash after {crash_after}: {report:?}");
        if !lib.contains(&name).unwrap() {
            assert!(!report.notes.is_empty(), "leftovers are reported");
            // The name is free again (an abandoned S3 lock is taken over).
            lib.add_expert(&expert(&name, 8, Some(FP))).unwrap();
        }
        let e = lib.load_expert(&name, &Device::Cpu, DType::F32).unwrap();
        assert_eq!(e.name, name);
    }
    assert_eq!(names(lib).len(), 5);
    assert!(lib.verify().unwrap().is_ok());
}

#[test]
fn writer_killed_mid_write_leaves_a_valid_local_library() {
    let tmp = tempfile::tempdir().unwrap();
    let lib = ExpertLibrary::create(tmp.path().join("lib").to_str().unwrap()).unwrap();
    check_crash_recovery(&lib, None);
}

fn concurrent_adds(open: impl Fn() -> ExpertLibrary + Sync) {
    let originals: Vec<Expert> = (0..16)
        .map(|i| expert(&format!("task{i:02}"), i, Some(FP)))
        .collect();
    // Two library handles (as two processes would have), eight writers each.
    let handles = [open(), open()];
    std::thread::scope(|s| {
        for (lib, half) in handles.iter().zip(originals.chunks(8)) {
            for e in half {
                s.spawn(move || lib.add_expert(e).unwrap());
            }
        }
    });
    let lib = open();
    assert_eq!(names(&lib).len(), 16);
    let report = lib.verify().unwrap();
    assert!(report.is_ok() && report.files == 48, "{report:?}");
    for e in &originals {
        let back = lib.load_expert(&e.name, &Device::Cpu, DType::F32).unwrap();
        assert_eq!(max_diff(&back, e), 0.0, "{}", e.name);
    }
}

#[test]
fn concurrent_writers_lose_nothing_local() {
    let tmp = tempfile::tempdir().unwrap();
    let uri = tmp.path().join("lib").to_str().unwrap().to_string();
    concurrent_adds(|| ExpertLibrary::open_or_create(&uri).unwrap());
}

#[test]
fn s3_create_import_list_verify_copy_remove() {
    let Some((s3, bucket, server)) = s3_library() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let peft = tmp.path().join("peft_adapter");
    copy_dir(&fixture(), &peft);
    assert_eq!(s3.import_dir(&peft, None).unwrap(), "peft_adapter");
    let e = expert("sst2", 2, Some(FP));
    s3.add_expert(&e).unwrap();
    assert_eq!(names(&s3), ["peft_adapter", "sst2"]);
    assert_eq!(s3.base_model().unwrap().unwrap().fingerprint, FP);
    let back = s3.load_expert("sst2", &Device::Cpu, DType::F32).unwrap();
    assert_eq!(max_diff(&back, &e), 0.0);
    // The bucket holds the same layout as a local library.
    let keys = server.keys(&bucket, "team/lib/sst2/");
    assert_eq!(
        keys,
        [
            "team/lib/sst2/adapter_config.json",
            "team/lib/sst2/adapter_model.safetensors",
            "team/lib/sst2/quiver_expert.json",
            "team/lib/sst2/quiver_manifest.json"
        ]
    );
    let report = s3.verify().unwrap();
    assert!(report.is_ok() && report.files == 5, "{report:?}");

    // Reopen by URI with the same options; an unknown bucket is one sentence.
    let uri = format!("s3://{bucket}/team/lib");
    let again = ExpertLibrary::open_with(&uri, &s3_opts(server)).unwrap();
    assert_eq!(again.list().unwrap(), s3.list().unwrap());
    let err = ExpertLibrary::open_with("s3://no-such-bucket-q/x", &s3_opts(server)).unwrap_err();
    assert!(
        err.to_string().contains("s3://no-such-bucket-q/x") && !err.to_string().contains('\n'),
        "{err}"
    );

    // S3 -> local -> S3 (another prefix).
    let local = ExpertLibrary::create(tmp.path().join("lib").to_str().unwrap()).unwrap();
    s3.put_aux(
        "prototypes",
        &serde_json::json!({"k": 1}),
        "all.bin",
        b"xyz",
    )
    .unwrap();
    let r = s3.copy_to(&local).unwrap();
    assert_eq!((r.copied.len(), r.aux_copied), (2, 2));
    assert!(local.verify().unwrap().is_ok());
    assert_eq!(local.base_model().unwrap(), s3.base_model().unwrap());
    local
        .add_expert(&expert("local_only", 4, Some(FP)))
        .unwrap();
    let s3b = ExpertLibrary::create_with(&format!("s3://{bucket}/copy"), &s3_opts(server)).unwrap();
    let r = local.copy_to(&s3b).unwrap();
    assert_eq!(r.copied, ["local_only", "peft_adapter", "sst2"]);
    let r = local.copy_to(&s3b).unwrap();
    assert_eq!(r.skipped.len(), 3);
    assert!(s3b.verify().unwrap().is_ok());
    assert_eq!(
        s3b.get_aux("prototypes", &serde_json::json!({"k": 1}), "all.bin")
            .unwrap()
            .as_deref(),
        Some(&b"xyz"[..])
    );

    // Remove: soft (to .trash), then purge.
    s3.remove("sst2", false).unwrap();
    assert_eq!(names(&s3), ["peft_adapter"]);
    assert!(server.keys(&bucket, "team/lib/sst2/").is_empty());
    assert_eq!(server.keys(&bucket, "team/lib/.trash/").len(), 4);
    s3.remove("peft_adapter", true).unwrap();
    assert!(names(&s3).is_empty());
    assert!(server.keys(&bucket, "team/lib/peft_adapter/").is_empty());
    assert!(s3.verify().unwrap().is_ok());
}

#[test]
fn s3_verify_names_a_flipped_byte() {
    let Some((s3, bucket, server)) = s3_library() else {
        return;
    };
    s3.add_expert(&expert("a", 1, Some(FP))).unwrap();
    s3.add_expert(&expert("b", 2, Some(FP))).unwrap();
    let key = "team/lib/b/adapter_model.safetensors";
    let mut bytes = server.get_object(&bucket, key).unwrap();
    bytes[200] ^= 0x80;
    server.put_object(&bucket, key, &bytes);
    let report = s3.verify().unwrap();
    assert_eq!(report.problems.len(), 1, "{report:?}");
    let line = report.problems[0].to_string();
    assert!(
        line.starts_with(&format!("s3://{bucket}/{key}: corrupt")),
        "{line}"
    );
    assert!(s3.load_expert("b", &Device::Cpu, DType::F32).is_err());
    assert!(s3.load_expert("a", &Device::Cpu, DType::F32).is_ok());
}

#[test]
fn s3_writer_killed_mid_write_leaves_a_valid_library() {
    let Some((s3, _, server)) = s3_library() else {
        return;
    };
    check_crash_recovery(&s3, Some(server));
}

#[test]
fn s3_concurrent_writers_lose_nothing() {
    let Some((_, bucket, server)) = s3_library() else {
        return;
    };
    let uri = format!("s3://{bucket}/team/lib");
    concurrent_adds(|| ExpertLibrary::open_with(&uri, &s3_opts(server)).unwrap());
}

#[test]
fn s3_bad_input_changes_nothing() {
    let Some((s3, bucket, server)) = s3_library() else {
        return;
    };
    s3.add_expert(&expert("good", 1, Some(FP))).unwrap();
    let before = server.keys(&bucket, "");
    let err = s3
        .add_expert(&expert("other", 2, Some("fp-other")))
        .unwrap_err();
    assert!(
        matches!(err, LibraryError::BaseModelMismatch { .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains(&format!("s3://{bucket}/team/lib")),
        "{err}"
    );
    let err = s3.add_expert(&expert("good", 3, Some(FP))).unwrap_err();
    assert!(matches!(err, LibraryError::Duplicate { .. }), "{err}");
    assert!(s3.add_expert(&expert("../x", 3, Some(FP))).is_err());
    assert!(s3.remove("../good", true).is_err());
    assert_eq!(server.keys(&bucket, ""), before);
}
