//! `quiver serve` through OpenAI's own Python client (`openai`, installed
//! by scripts/test.sh): models, completions and chat completions, plain and
//! streamed, for the base model, one expert and the Arrow route, each equal
//! to what `quiver generate` prints for the same greedy request; stop
//! sequences; OpenAI's error for an unknown model. Without the client the
//! test says so and skips, or fails when `QUIVER_REQUIRE_OPENAI=1`.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use candle_core::{DType, Device};
use common::{fixture, quiver, run};
use quiver_core::expert::Expert;

fn python() -> Option<String> {
    let py = std::env::var("QUIVER_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&py)
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(py);
    }
    let msg = format!("the `openai` Python client is not importable by {py}");
    if std::env::var("QUIVER_REQUIRE_OPENAI").as_deref() == Ok("1") {
        panic!("{msg} (QUIVER_REQUIRE_OPENAI=1 makes this test mandatory)");
    }
    eprintln!("note: skipping the quiver serve test: {msg}");
    None
}

/// Kills the server when the test ends, however it ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn library(tmp: &Path) -> String {
    let lib = tmp.join("lib").display().to_string();
    for i in 0..3 {
        let mut e = Expert::load(&fixture("peft_tiny_llama"), &Device::Cpu, DType::F32).unwrap();
        for (a, _) in e.weights.values_mut() {
            *a = a.affine(4.0 + i as f64, 0.0).unwrap();
        }
        let name = format!("ad{i}");
        let dir = tmp.join(&name);
        e.save(&dir).unwrap();
        let (o, _, err) = run(quiver()
            .args(["library", "import", "--library", &lib, "--name", &name])
            .arg(&dir));
        assert!(o.status.success(), "{err}");
    }
    lib
}

fn generated(lib: &str, route: &str) -> String {
    let (o, out, err) = run(quiver().args([
        "generate",
        "--model",
        fixture("tiny_llama").to_str().unwrap(),
        "--library",
        lib,
        "--route",
        route,
        "--prompt",
        "The plural of cat is",
        "--max-tokens",
        "8",
        "--json",
    ]));
    assert!(o.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    v["text"].as_str().unwrap().to_string()
}

#[test]
fn openai_client_talks_to_quiver_serve() {
    let Some(py) = python() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let lib = library(tmp.path());
    let mut child = quiver()
        .args(["serve", "--model"])
        .arg(fixture("tiny_llama"))
        .args(["--library", &lib, "--port", "0"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let _server = Server(child);
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("the server prints its address")
            .unwrap();
        if let Some(a) = line.strip_prefix("listening on ") {
            break a.to_string();
        }
    };
    // Keep reading stderr so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/interop/check_openai_client.py");
    let out = Command::new(&py)
        .arg(script)
        .arg(format!("{addr}/v1"))
        .arg("ad1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let models: Vec<&str> = v["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    for m in [
        "base",
        "ad0",
        "ad1",
        "ad2",
        "arrow",
        "uniform",
        "ties",
        "mu",
        "phatgoose",
    ] {
        assert!(models.contains(&m), "{m} in {models:?}");
    }
    for (model, route) in [("base", "base"), ("ad1", "expert:ad1"), ("arrow", "arrow")] {
        let r = &v[model];
        assert_eq!(r["object"], "text_completion");
        assert_eq!(
            r["text"].as_str().unwrap(),
            generated(&lib, route),
            "{model}: the server's greedy text is quiver generate's"
        );
        assert_eq!(r["streamed"], r["text"], "{model}: streamed = plain");
        let u = &r["usage"];
        assert_eq!(
            u["total_tokens"].as_u64().unwrap(),
            u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
        );
    }
    // The expert and the route change the output (the adapters are strong).
    assert_ne!(v["ad1"]["text"], v["base"]["text"]);
    let chat = &v["chat"];
    assert_eq!(chat["object"], "chat.completion");
    assert_eq!(chat["role"], "assistant");
    assert_eq!(chat["streamed"], chat["text"]);
    assert_eq!(chat["first_role"], "assistant");
    assert_eq!(chat["chunk_object"], "chat.completion.chunk");
    let base = v["base"]["text"].as_str().unwrap();
    println!("stop check: {}", v["stop"]);
    if let Some(s) = v["stop"]["stop"].as_str() {
        // Generation ends at the stop sequence, which is not returned.
        let at = base
            .char_indices()
            .skip(1)
            .find(|(_, c)| c.to_string() == s)
            .unwrap()
            .0;
        assert_eq!(
            v["stop"]["text"].as_str().unwrap(),
            &base[..at],
            "stop at {s:?}"
        );
        assert_eq!(v["stop"]["finish_reason"], "stop");
    } else {
        eprintln!("note: no printable ASCII in the base text; stop sequences not checked");
    }
    // quiver_explain: one entry per generated token, weights averaged over
    // layers summing to 1, over the library's experts; with "layers", each
    // layer's top-2.
    let ex = &v["explain"];
    let plain = ex["plain"]
        .as_array()
        .expect("quiver_explain in the choice");
    assert_eq!(plain.len() as u64, ex["tokens"].as_u64().unwrap(), "{ex}");
    for t in plain {
        let experts = t["experts"].as_array().unwrap();
        let total: f64 = experts.iter().map(|e| e["weight"].as_f64().unwrap()).sum();
        assert!((total - 1.0).abs() < 1e-4, "{t}");
        for e in experts {
            assert!(
                ["ad0", "ad1", "ad2"].contains(&e["expert"].as_str().unwrap()),
                "{e}"
            );
        }
        let layers = t["layers"].as_array().unwrap();
        assert!(!layers.is_empty());
        for l in layers {
            assert_eq!(l["experts"].as_array().unwrap().len(), 2, "top_k = 2: {l}");
        }
    }
    let streamed = ex["streamed"]
        .as_array()
        .expect("explanations in the chunks");
    assert_eq!(streamed.len(), plain.len(), "{ex}");
    for (s, p) in streamed.iter().zip(plain) {
        assert_eq!(
            s["experts"], p["experts"],
            "streamed = plain (the same greedy tokens)"
        );
        assert!(s.get("layers").is_none());
    }
    assert_eq!(v["explain_base"]["status"], 400, "{}", v["explain_base"]);
    assert_eq!(v["unknown_model"]["status"], 404);
    assert_eq!(v["unknown_model"]["code"], "model_not_found");
    // /metrics counts what the client did.
    let m = v["metrics"].as_str().unwrap();
    let value = |line: &str| -> f64 {
        m.lines()
            .find(|l| l.starts_with(line))
            .unwrap_or_else(|| panic!("{line} in {m}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(value("quiver_requests_total{endpoint=\"/v1/completions\",status=\"200\"}") >= 8.0);
    assert!(value("quiver_requests_total{endpoint=\"/v1/completions\",status=\"404\"}") >= 1.0);
    assert!(
        value("quiver_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"}") >= 2.0
    );
    assert!(value("quiver_completion_tokens_total") >= 40.0);
    assert_eq!(value("quiver_queue_depth"), 0.0);
    assert!(value("quiver_time_to_first_token_seconds_count") >= 8.0);
    assert!(value("quiver_request_duration_seconds_bucket{le=\"+Inf\"}") >= 8.0);
    for e in ["ad0", "ad1", "ad2"] {
        assert!(value(&format!("quiver_expert_chosen_total{{expert=\"{e}\"}}")) > 0.0);
    }
}
