//! Unit tests of the library on a local directory and on object_store's
//! in-memory store (the same code path as S3, without a server; the S3
//! tests against a real server are in `tests/library.rs`).

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use object_store::memory::InMemory;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStoreExt, PutPayload};

use super::*;
use crate::expert::{BaseModelId, Expert, ExpertInfo};
use crate::lora::LoraConfig;

fn base(fp: &str) -> BaseModelId {
    BaseModelId {
        id: "tiny".into(),
        fingerprint: fp.into(),
    }
}

/// A rank-4 expert on a 32-wide model: q_proj 32x32, k_proj 16x32.
fn expert(name: &str, seed: u64, hidden: usize, fp: Option<&str>) -> Expert {
    let dev = Device::Cpu;
    let mut weights = BTreeMap::new();
    for (module, out) in [
        ("model.layers.0.self_attn.q_proj", hidden),
        ("model.layers.0.self_attn.k_proj", hidden / 2),
    ] {
        let a = Tensor::randn(seed as f32, 1.0, (4, hidden), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, (out, 4), &dev).unwrap();
        weights.insert(module.to_string(), (a, b));
    }
    Expert {
        name: name.into(),
        config: LoraConfig::default(),
        weights,
        info: fp.map(|fp| ExpertInfo {
            name: name.into(),
            tasks: vec![format!("task_{name}")],
            base_model: base(fp),
            training: serde_json::json!({"steps": 3}),
            metrics: BTreeMap::from([("val_loss".to_string(), 1.5)]),
            created: 1_700_000_000,
        }),
    }
}

fn memory_library() -> (ExpertLibrary, Arc<InMemory>) {
    let store = Arc::new(InMemory::new());
    let lib = ExpertLibrary::from_object_store(store.clone(), "libs/a", "memory://libs/a").unwrap();
    (lib, store)
}

fn same_weights(a: &Expert, b: &Expert) {
    assert_eq!(a.weights.len(), b.weights.len());
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
            assert_eq!(d, 0.0, "{m}");
        }
    }
}

fn both() -> Vec<(ExpertLibrary, Option<tempfile::TempDir>)> {
    let dir = tempfile::tempdir().unwrap();
    let local = ExpertLibrary::create(dir.path().join("lib").to_str().unwrap()).unwrap();
    vec![(local, Some(dir)), (memory_library().0, None)]
}

#[test]
fn add_list_load_remove() {
    for (lib, _keep) in both() {
        let e = expert("alpha", 1, 32, Some("fp1"));
        lib.add_expert(&e).unwrap();
        lib.add_expert(&expert("beta", 2, 32, Some("fp1"))).unwrap();
        let list = lib.list().unwrap();
        assert_eq!(
            list.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
            ["alpha", "beta"]
        );
        assert_eq!(list[0].tasks, ["task_alpha"]);
        assert_eq!(list[0].rank, 4);
        assert_eq!(list[0].modules, 2);
        assert!(list[0].sealed && list[0].size > 0);
        assert_eq!(lib.base_model().unwrap(), Some(base("fp1")));
        let back = lib.load_expert("alpha", &Device::Cpu, DType::F32).unwrap();
        same_weights(&e, &back);
        assert_eq!(back.info.unwrap().tasks, ["task_alpha"]);

        let dup = lib.add_expert(&e).unwrap_err();
        assert!(matches!(dup, LibraryError::Duplicate { .. }), "{dup}");

        lib.remove("alpha", false).unwrap();
        assert!(!lib.contains("alpha").unwrap());
        assert_eq!(lib.list().unwrap().len(), 1);
        lib.remove("beta", true).unwrap();
        assert!(lib.list().unwrap().is_empty());
        let err = lib.remove("beta", false).unwrap_err();
        assert!(matches!(err, LibraryError::NoSuchExpert { .. }), "{err}");
        assert!(lib.verify().unwrap().is_ok());
    }
}

#[test]
fn base_model_and_shape_guards() {
    for (lib, _keep) in both() {
        lib.add_expert(&expert("a", 1, 32, Some("fp1"))).unwrap();
        let err = lib
            .add_expert(&expert("b", 2, 32, Some("fp2")))
            .unwrap_err();
        assert!(
            matches!(err, LibraryError::BaseModelMismatch { .. }),
            "{err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("`b`") && msg.contains("fp1") && msg.contains("fp2"),
            "{msg}"
        );
        // No fingerprint, but 48-wide layers where the library has 32-wide ones.
        let err = lib.add_expert(&expert("c", 3, 48, None)).unwrap_err();
        assert!(matches!(err, LibraryError::ShapeMismatch { .. }), "{err}");
        assert!(
            err.to_string().contains("model.layers.0.self_attn"),
            "{err}"
        );
        // No fingerprint and fitting shapes: accepted.
        lib.add_expert(&expert("d", 4, 32, None)).unwrap();
        assert_eq!(lib.list().unwrap().len(), 2);
        assert!(lib.set_base_model(&base("fp1")).is_ok());
        assert!(lib.set_base_model(&base("fp9")).is_err());
    }
}

#[test]
fn names_are_validated() {
    for (lib, _keep) in both() {
        for bad in ["../x", "a/b", "", ".hidden", "x\\y"] {
            let e = expert(bad, 1, 32, Some("fp1"));
            assert!(lib.add_expert(&e).is_err(), "{bad}");
            assert!(lib.contains(bad).is_err(), "{bad}");
            assert!(lib.remove(bad, true).is_err(), "{bad}");
            assert!(
                lib.load_expert(bad, &Device::Cpu, DType::F32).is_err(),
                "{bad}"
            );
        }
        assert!(lib.list().unwrap().is_empty());
    }
}

#[test]
fn object_store_corruption_and_leftovers() {
    let (lib, store) = memory_library();
    lib.add_expert(&expert("a", 1, 32, Some("fp1"))).unwrap();
    assert!(lib.verify().unwrap().is_ok());
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let key = ObjPath::from("libs/a/a/adapter_model.safetensors");
    let mut bytes = rt
        .block_on(async { store.get(&key).await.unwrap().bytes().await.unwrap() })
        .to_vec();
    let n = bytes.len();
    bytes[n - 3] ^= 0x40;
    rt.block_on(store.put(&key, PutPayload::from(bytes)))
        .unwrap();
    let report = lib.verify().unwrap();
    assert_eq!(report.problems.len(), 1, "{report:?}");
    assert!(report.problems[0]
        .location
        .ends_with("a/adapter_model.safetensors"));
    assert!(report.problems[0].what.starts_with("corrupt"));
    let err = lib.load_expert("a", &Device::Cpu, DType::F32).unwrap_err();
    assert!(matches!(err, LibraryError::Corrupt { .. }), "{err}");

    // Data files without a manifest (an interrupted upload) stay invisible.
    let orphan = ObjPath::from("libs/a/ghost/adapter_config.json");
    rt.block_on(store.put(&orphan, PutPayload::from(b"{}".to_vec())))
        .unwrap();
    assert_eq!(lib.list().unwrap().len(), 1);
    assert!(!lib.contains("ghost").unwrap());
    let report = lib.verify().unwrap();
    assert!(
        report.notes.iter().any(|n| n.contains("ghost")),
        "{report:?}"
    );
    lib.remove("ghost", true).unwrap();
    assert!(lib.verify().unwrap().notes.is_empty());
}

#[test]
fn object_store_write_locks() {
    let (lib, store) = memory_library();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let lock = |pid: u32, started: u64| {
        serde_json::to_vec(&serde_json::json!({
            "token": "t", "host": object::this_host(), "pid": pid, "started": started
        }))
        .unwrap()
    };
    // A live writer (this process) holds the name: refused.
    let key = ObjPath::from("libs/a/busy/.quiver-write.lock");
    rt.block_on(store.put(
        &key,
        PutPayload::from(lock(std::process::id(), storage::now_secs())),
    ))
    .unwrap();
    let err = lib.add_expert(&expert("busy", 1, 32, None)).unwrap_err();
    assert!(matches!(err, LibraryError::WriteInProgress { .. }), "{err}");
    assert!(err.to_string().contains("--purge"), "{err}");
    // An hour-old lock is abandoned: taken over.
    rt.block_on(store.put(&key, PutPayload::from(lock(std::process::id(), 1))))
        .unwrap();
    lib.add_expert(&expert("busy", 1, 32, None)).unwrap();
    assert!(lib.contains("busy").unwrap());
    // The lock is released after the write.
    assert!(rt.block_on(store.head(&key)).is_err());
}

#[test]
fn aux_data_is_keyed_by_config() {
    for (lib, _keep) in both() {
        let cfg = serde_json::json!({"rank": 4, "experts": ["a", "b"], "seed": 0});
        let same = serde_json::json!({"seed": 0, "experts": ["a", "b"], "rank": 4});
        let other = serde_json::json!({"seed": 1, "experts": ["a", "b"], "rank": 4});
        assert_eq!(lib.get_aux("prototypes", &cfg, "a.bin").unwrap(), None);
        lib.put_aux("prototypes", &cfg, "a.bin", b"proto").unwrap();
        assert_eq!(
            lib.get_aux("prototypes", &same, "a.bin")
                .unwrap()
                .as_deref(),
            Some(&b"proto"[..])
        );
        assert_eq!(lib.get_aux("prototypes", &other, "a.bin").unwrap(), None);
        assert_eq!(lib.get_aux("embeddings", &cfg, "a.bin").unwrap(), None);
        assert_eq!(lib.aux_names("prototypes", &same).unwrap(), ["a.bin"]);
        lib.put_aux("prototypes", &cfg, "a.bin", b"proto2").unwrap();
        assert_eq!(
            lib.get_aux("prototypes", &cfg, "a.bin").unwrap().as_deref(),
            Some(&b"proto2"[..])
        );
        assert!(lib.put_aux("../x", &cfg, "a", b"").is_err());
        assert!(lib.put_aux("k", &cfg, "a/b", b"").is_err());
        assert!(lib.put_aux("k", &cfg, "config.json", b"").is_err());
        assert_eq!(
            ExpertLibrary::aux_key("prototypes", &same).unwrap(),
            ExpertLibrary::aux_key("prototypes", &cfg).unwrap()
        );
        // Aux data is never mistaken for an expert.
        assert!(lib.list().unwrap().is_empty());
        assert!(lib.verify().unwrap().is_ok());
    }
}

#[test]
fn copy_between_backends() {
    let dir = tempfile::tempdir().unwrap();
    let local = ExpertLibrary::create(dir.path().join("lib").to_str().unwrap()).unwrap();
    local.add_expert(&expert("a", 1, 32, Some("fp1"))).unwrap();
    local.add_expert(&expert("b", 2, 32, Some("fp1"))).unwrap();
    local
        .put_aux("emb", &serde_json::json!({}), "x", b"1")
        .unwrap();
    let (mem, _) = memory_library();
    let r = local.copy_to(&mem).unwrap();
    assert_eq!(r.copied, ["a", "b"]);
    assert_eq!(r.aux_copied, 2);
    assert_eq!(mem.base_model().unwrap(), Some(base("fp1")));
    assert!(mem.verify().unwrap().is_ok());
    let r = local.copy_to(&mem).unwrap();
    assert_eq!(r.skipped, ["a", "b"]);
    mem.remove("b", true).unwrap();
    mem.add_expert(&expert("b", 3, 32, Some("fp1"))).unwrap();
    let r = local.copy_to(&mem).unwrap();
    assert_eq!(
        (r.skipped.as_slice(), r.conflicts.as_slice()),
        (&["a".to_string()][..], &["b".to_string()][..])
    );
    assert_eq!(
        mem.get_aux("emb", &serde_json::json!({}), "x")
            .unwrap()
            .as_deref(),
        Some(&b"1"[..])
    );
    assert!(local.copy_to(&local).is_err());
}

#[test]
fn uris() {
    assert!(matches!(
        ExpertLibrary::open("gs://b/x"),
        Err(LibraryError::BadUri { .. })
    ));
    assert!(matches!(
        ExpertLibrary::open(""),
        Err(LibraryError::BadUri { .. })
    ));
    assert!(matches!(
        ExpertLibrary::open("s3://"),
        Err(LibraryError::BadUri { .. })
    ));
    assert!(matches!(
        ExpertLibrary::open("s3://b/../x"),
        Err(LibraryError::BadUri { .. })
    ));
    assert_eq!(
        object::parse_s3_uri("s3://b/x/y/").unwrap(),
        ("b".to_string(), "x/y".to_string())
    );
    assert_eq!(
        object::parse_s3_uri("s3://b").unwrap(),
        ("b".to_string(), String::new())
    );
    let err = ExpertLibrary::open("/nonexistent/quiver-lib").unwrap_err();
    assert!(err.to_string().contains("/nonexistent/quiver-lib"), "{err}");
}

#[test]
fn utc_dates() {
    assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
    assert_eq!(format_utc(1_700_000_000), "2023-11-14T22:13:20Z");
    assert_eq!(format_utc(951_782_400), "2000-02-29T00:00:00Z");
}
