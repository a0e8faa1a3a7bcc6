//! `quiver train` and expert routing through the binary: a private expert
//! is trained on a tiny model and used by `score`; bad data and bad
//! adapters fail with one sentence and leave the library as it was.

mod common;

use common::{assert_clean_error, fixture, quiver, run, snapshot};

use std::path::Path;
use std::process::Output;

fn write_data(path: &Path) {
    let mut lines = String::new();
    for (a, b) in [
        ("cat", "dog"),
        ("sun", "moon"),
        ("red", "blue"),
        ("up", "down"),
    ]
    .iter()
    .cycle()
    .take(20)
    {
        lines.push_str(
            &serde_json::json!({"task": "pairs", "source": format!("{a} goes with"), "target": b})
                .to_string(),
        );
        lines.push('\n');
    }
    std::fs::write(path, lines).unwrap();
}

fn train(lib: &Path, data: &Path, model: &Path) -> (Output, String, String) {
    run(quiver().args([
        "train",
        "--quiet",
        "--model",
        model.to_str().unwrap(),
        "--library",
        lib.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--tasks",
        "pairs",
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--grad-accum",
        "1",
        "--lr",
        "1e-2",
    ]))
}

#[test]
fn train_then_route_then_bad_input_leaves_library_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let lib = tmp.path().join("lib");
    let data = tmp.path().join("data.jsonl");
    write_data(&data);
    let model = fixture("tiny_llama");
    let (o, stdout, e) = train(&lib, &data, &model);
    assert!(o.status.success(), "{e}");
    assert!(stdout.contains("\"expert\":\"pairs\""), "{stdout}");
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "quiver_expert.json",
    ] {
        assert!(lib.join("pairs").join(f).is_file(), "{f}");
    }
    // A second run skips the existing expert.
    let (o, _, e) = train(&lib, &data, &model);
    assert!(o.status.success(), "{e}");

    let score = |route: &str, m: &Path| {
        run(quiver().args([
            "score",
            "--model",
            m.to_str().unwrap(),
            "--library",
            lib.to_str().unwrap(),
            "--route",
            route,
            "--context",
            "cat goes with",
            "--continuation",
            " dog",
        ]))
    };
    let (o, base, e) = score("base", &model);
    assert!(o.status.success(), "{e}");
    let (o, routed, e) = score("expert:pairs", &model);
    assert!(o.status.success(), "{e}");
    let lp = |s: &str| {
        serde_json::from_str::<serde_json::Value>(s.trim()).unwrap()["logprob"]
            .as_f64()
            .unwrap()
    };
    assert!(
        lp(&routed) > lp(&base),
        "the expert raises the trained continuation: {base} vs {routed}"
    );

    let before = snapshot(&lib);

    // The expert refuses another base model (same shapes, other weights).
    let qwen = fixture("tiny_qwen2");
    let mut cmd = quiver();
    cmd.args([
        "score",
        "--model",
        qwen.to_str().unwrap(),
        "--library",
        lib.to_str().unwrap(),
        "--route",
        "expert:pairs",
        "--context",
        "a",
        "--continuation",
        " b",
    ]);
    assert_clean_error(&mut cmd, &["pairs", "trained on base model"]);

    // Unknown expert.
    assert_clean_error(
        quiver().args([
            "score",
            "--model",
            model.to_str().unwrap(),
            "--library",
            lib.to_str().unwrap(),
            "--route",
            "expert:nope",
            "--context",
            "a",
            "--continuation",
            " b",
        ]),
        &["no expert `nope`"],
    );

    // A path-traversal name.
    assert_clean_error(
        quiver().args([
            "score",
            "--model",
            model.to_str().unwrap(),
            "--library",
            lib.to_str().unwrap(),
            "--route",
            "expert:../x",
            "--context",
            "a",
            "--continuation",
            " b",
        ]),
        &["not a valid expert name"],
    );

    // A JSONL line with a missing field names the file and line.
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"task\": \"pairs\", \"source\": \"a\", \"target\": \"b\"}\n{\"task\": \"pairs\", \"source\": \"a\"}\n").unwrap();
    let mut cmd = quiver();
    cmd.args([
        "train",
        "--model",
        model.to_str().unwrap(),
        "--library",
        lib.to_str().unwrap(),
        "--data",
        bad.to_str().unwrap(),
        "--tasks",
        "pairs",
        "--shared",
        "other",
    ]);
    assert_clean_error(&mut cmd, &["bad.jsonl:2", "target"]);

    // An unknown task.
    let mut cmd = quiver();
    cmd.args([
        "train",
        "--model",
        model.to_str().unwrap(),
        "--library",
        lib.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--tasks",
        "pears",
    ]);
    assert_clean_error(&mut cmd, &["unknown task `pears`"]);

    // A held-out evaluation task is never trained on.
    let mut cmd = quiver();
    cmd.args([
        "train",
        "--model",
        model.to_str().unwrap(),
        "--library",
        lib.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--tasks",
        "arc_easy",
    ]);
    assert_clean_error(&mut cmd, &["held-out"]);

    assert!(
        before == snapshot(&lib),
        "the library is unchanged by failed commands"
    );
}

#[test]
fn bad_adapters_fail_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("tiny_llama");
    let copy = |name: &str| {
        let d = tmp.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(fixture("peft_tiny_llama").join(f), d.join(f)).unwrap();
        }
        d
    };
    let score = |adapter: &Path| {
        let mut c = quiver();
        c.args([
            "score",
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--context",
            "hello",
            "--continuation",
            " world",
        ]);
        c
    };
    // The fixture itself works.
    let ok = copy("ok");
    let (o, _, e) = run(&mut score(&ok));
    assert!(o.status.success(), "{e}");

    // Non-LoRA PEFT config.
    let d = copy("ia3");
    let p = d.join("adapter_config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    c["peft_type"] = "IA3".into();
    std::fs::write(&p, c.to_string()).unwrap();
    assert_clean_error(&mut score(&d), &["adapter_config.json", "IA3"]);

    // Shapes for another model: A matrices widened to 40 inputs.
    let d = copy("shapes");
    let w = d.join("adapter_model.safetensors");
    let tensors = candle_core::safetensors::load(&w, &candle_core::Device::Cpu).unwrap();
    let widened: std::collections::HashMap<String, candle_core::Tensor> = tensors
        .into_iter()
        .map(|(k, t)| {
            if k.contains("lora_A") {
                let (r, i) = t.dims2().unwrap();
                (
                    k,
                    candle_core::Tensor::zeros((r, i + 8), t.dtype(), t.device()).unwrap(),
                )
            } else {
                (k, t)
            }
        })
        .collect();
    candle_core::safetensors::save(&widened, &w).unwrap();
    assert_clean_error(&mut score(&d), &["needs A"]);

    // Not a PEFT directory at all.
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert_clean_error(&mut score(&empty), &["not a PEFT adapter directory"]);
}
