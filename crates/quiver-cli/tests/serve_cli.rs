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

use candle_core::{DType, Device, Tensor};
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
        // Strong, and pointing in different directions (each A plus its
        // own deterministic noise), so Arrow's choices are not ties.
        let mut seed = 17 + i as u64;
        for (a, _) in e.weights.values_mut() {
            let noise: Vec<f32> = (0..a.elem_count())
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
                })
                .collect();
            let scale = a
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let noise = Tensor::from_vec(noise, a.dims(), &Device::Cpu).unwrap();
            *a = (a.affine(4.0 + i as f64, 0.0).unwrap()
                + noise.affine(4.0 * scale as f64, 0.0).unwrap())
            .unwrap();
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
    let fixture_model = fixture("tiny_llama").display().to_string();
    let (_server, addr, _log) = start_server(&["--model", &fixture_model, "--library", &lib]);
    let v = script(
        &py,
        "check_openai_client.py",
        &[&format!("{addr}/v1"), "ad1"],
        &[],
    );
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
    // logprobs: one per generated token; greedy picks the most likely.
    let lp = &v["logprobs"];
    let tokens = lp["tokens"].as_array().unwrap();
    assert_eq!(
        tokens.len() as u64,
        lp["completion_tokens"].as_u64().unwrap(),
        "{lp}"
    );
    let mut last_offset = 0;
    for (i, top) in lp["top_logprobs"].as_array().unwrap().iter().enumerate() {
        let chosen = lp["token_logprobs"][i].as_f64().unwrap();
        assert!(chosen <= 0.0, "{lp}");
        let top = top.as_object().unwrap();
        // Tokens that decode to the same text share one key.
        assert!(!top.is_empty() && top.len() <= 3, "{lp}");
        let best = top
            .values()
            .map(|x| x.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert!((best - chosen).abs() < 1e-5, "greedy = most likely: {lp}");
        let off = lp["text_offset"][i].as_u64().unwrap();
        assert!(off >= last_offset);
        last_offset = off;
    }
    let chat_lp = &v["chat_logprobs"];
    let content = chat_lp["content"].as_array().unwrap();
    assert_eq!(
        content.len() as u64,
        chat_lp["completion_tokens"].as_u64().unwrap()
    );
    for c in content {
        let top = c["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2, "{c}");
        let first = top[0]["logprob"].as_f64().unwrap();
        assert!((first - c["logprob"].as_f64().unwrap()).abs() < 1e-5, "{c}");
        assert!(top[1]["logprob"].as_f64().unwrap() <= first);
    }
    let bias = &v["logit_bias"];
    let toks = bias["tokens"].as_array().unwrap();
    assert_eq!(toks.len(), 4, "{bias}");
    assert!(
        toks.iter().all(|t| t == &toks[0]),
        "one forced token: {bias}"
    );
    assert_eq!(bias["bad"]["status"], 400, "{bias}");
    assert_eq!(bias["bad"]["param"], "logit_bias");
    // Newer and unsupported fields: what a vLLM user sends.
    let c = &v["compat"];
    assert_eq!(c["retrieve"], "ad1");
    assert_eq!(c["retrieve_missing"], 404);
    assert_eq!(c["parts"], c["plain"], "text parts = a string: {c}");
    assert_eq!(c["max_completion_tokens"], 3);
    let p = &c["penalty"];
    assert_eq!(p["zero"], p["none"], "{p}");
    assert_eq!(p["strong"], p["strong_again"], "{p}");
    assert_ne!(p["strong"], p["none"], "penalties change greedy text: {p}");
    for (field, param) in [
        ("echo", "echo"),
        ("best_of", "best_of"),
        ("presence_penalty", "presence_penalty"),
        ("tools", "tools"),
    ] {
        assert_eq!(c[field]["status"], 400, "{field}: {c}");
        assert_eq!(c[field]["param"], param, "{field}");
    }
    // n and several prompts.
    let n = &v["n"];
    assert_eq!(n["a"], n["b"], "seeded sampling repeats: {n}");
    assert_eq!(n["indices"], serde_json::json!([0, 1]));
    assert_eq!(n["streamed"], n["a"], "streamed choices = plain: {n}");
    assert_eq!(
        n["multi"], n["single"],
        "a list of prompts = one at a time: {n}"
    );
    // Continuous batching: concurrent requests with their own routes give
    // what each gives alone.
    let b = &v["batching"];
    let alone = b["alone"].as_array().unwrap();
    let together = b["together"].as_array().unwrap();
    assert_eq!(together.len(), 3 * alone.len());
    for (i, t) in together.iter().enumerate() {
        assert_eq!(t, &alone[i % alone.len()], "request {i}: batched = alone");
    }
    let ex_alone = b["explain_alone"].as_array().unwrap();
    let ex_together = b["explain_together"].as_array().unwrap();
    for (i, t) in ex_together.iter().enumerate() {
        let a = &ex_alone[i % ex_alone.len()];
        let (ta, aa) = (t.as_array().unwrap(), a.as_array().unwrap());
        assert_eq!(ta.len(), aa.len(), "request {i}: one explanation per token");
        for (x, y) in ta.iter().zip(aa) {
            let names = |v: &serde_json::Value| -> Vec<String> {
                v["experts"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| e["expert"].to_string())
                    .collect()
            };
            assert_eq!(
                names(x),
                names(y),
                "request {i}: batched explanation = alone"
            );
            for (ex, ey) in x["experts"]
                .as_array()
                .unwrap()
                .iter()
                .zip(y["experts"].as_array().unwrap())
            {
                let d = ex["weight"].as_f64().unwrap() - ey["weight"].as_f64().unwrap();
                assert!(d.abs() < 1e-4, "request {i}: {x:#} vs {y:#}");
            }
        }
    }
    // /metrics counts what the client did.
    let m = v["metrics"].as_str().unwrap();
    let value = |line: &str| metric(m, line);
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
    // Some forward passes held several sequences.
    let passes = value("quiver_batch_size_count");
    let single = value("quiver_batch_size_bucket{le=\"1\"}");
    println!("{single} of {passes} forward passes had one sequence");
    assert!(single < passes, "no forward pass batched two sequences");
}

/// The value of the Prometheus sample that starts with `line` in `text`.
fn metric(text: &str, line: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(line))
        .unwrap_or_else(|| panic!("{line} in {text}"))
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Starts `quiver serve` with `args`; returns the server, its address and
/// its stderr lines so far (kept being read).
fn start_server(
    args: &[&str],
) -> (
    Server,
    String,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    let mut child = quiver()
        .arg("serve")
        .args(args)
        .args(["--port", "0"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
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
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let l = log.clone();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            l.lock().unwrap().push(line);
        }
    });
    (Server(child), addr, log)
}

/// The tiny model with a long context (its weights and tokenizer, a
/// config allowing 8192 positions): long generations for the tests of
/// queueing, disconnects and shutdown.
fn long_context_model(tmp: &Path) -> String {
    // Named like the fixture: the experts were made for `tiny_llama`.
    let dir = tmp.join("long").join("tiny_llama");
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(fixture("tiny_llama")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    let cfg = dir.join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    c["max_position_embeddings"] = 8192.into();
    std::fs::write(&cfg, c.to_string()).unwrap();
    dir.display().to_string()
}

/// Runs `scripts/interop/NAME` with `args` (and `env`); its stdout is one
/// JSON object.
fn script(py: &str, name: &str, args: &[&str], env: &[(&str, &str)]) -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../scripts/interop")
        .join(name);
    let out = Command::new(py)
        .arg(path)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{name}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap()
}

fn limits_script(py: &str, args: &[&str]) -> serde_json::Value {
    script(py, "check_serve_limits.py", args, &[])
}

/// `--api-key`, the body limit, OpenAI's errors for bad requests, the
/// bounded queue (429), a client that disconnects mid-stream, experts
/// imported or damaged while serving, and SIGTERM with requests running.
#[test]
fn serve_limits_faults_reload_and_shutdown() {
    let Some(py) = python() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let lib = library(tmp.path());
    let model = long_context_model(tmp.path());
    let key = "sekret-key";
    let (mut server, addr, log) = start_server(&[
        "--model",
        &model,
        "--library",
        &lib,
        "--api-key",
        key,
        "--max-batch",
        "1",
        "--max-queue",
        "1",
        "--max-body-bytes",
        "4096",
        "--grace-period",
        "60",
    ]);
    let url = format!("{addr}/v1");
    let v = limits_script(&py, &[&url, key, "limits", "ad1"]);
    println!("{v:#}");
    assert_eq!(v["health"]["status"], 200);
    for k in ["no_key", "wrong_key"] {
        assert_eq!(v[k]["status"], 401, "{k}: {}", v[k]);
        assert_eq!(v[k]["body"]["error"]["code"], "invalid_api_key");
    }
    assert_eq!(v["client_wrong_key"]["status"], 401);
    assert!(v["models"].as_array().unwrap().iter().any(|m| m == "ad1"));
    assert_eq!(v["too_large"]["status"], 413, "{}", v["too_large"]);
    assert!(v["too_large"]["body"]["error"]["message"].is_string());
    for k in [
        "bad_json",
        "missing_field",
        "bad_temperature",
        "past_context",
        "bad_logprobs",
    ] {
        assert_eq!(v[k]["status"], 400, "{k}: {}", v[k]);
        assert_eq!(
            v[k]["body"]["error"]["type"], "invalid_request_error",
            "{k}"
        );
    }
    assert_eq!(v["past_context"]["body"]["error"]["param"], "max_tokens");
    let queue = v["queue"].as_array().unwrap();
    assert!(
        queue
            .iter()
            .all(|r| r["status"] == 200 || r["status"] == 429),
        "{queue:?}"
    );
    assert!(queue.iter().any(|r| r["status"] == 200), "{queue:?}");
    let busy: Vec<_> = queue.iter().filter(|r| r["status"] == 429).collect();
    assert!(
        !busy.is_empty(),
        "one runs, one waits, the rest are refused: {queue:?}"
    );
    for r in busy {
        assert_eq!(r["retry_after"], "1");
        assert_eq!(r["type"], "rate_limit_error");
    }
    let d = &v["disconnect"];
    assert_eq!(d["running"], 0.0, "{d}");
    assert!(
        d["tokens"].as_f64().unwrap() < 4000.0,
        "the sequence was freed early: {d}"
    );
    let w = &v["waiting_gone"];
    assert_eq!(w["gave_up"], true, "{w}");
    assert_eq!(w["depth"], 1.0, "only the running stream is left: {w}");
    assert!(v["after"]["tokens"].as_u64().unwrap() <= 4);

    // An expert imported while serving is served without a restart; one
    // whose files were damaged is refused with the library named as the
    // fault, and the server goes on.
    let mut e = Expert::load(&fixture("peft_tiny_llama"), &Device::Cpu, DType::F32).unwrap();
    for (a, _) in e.weights.values_mut() {
        *a = a.affine(9.0, 0.0).unwrap();
    }
    e.save(&tmp.path().join("late")).unwrap();
    let (o, _, err) = run(quiver()
        .args(["library", "import", "--library", &lib, "--name", "late"])
        .arg(tmp.path().join("late")));
    assert!(o.status.success(), "{err}");
    let weights = Path::new(&lib)
        .join("ad2")
        .join("adapter_model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let n = bytes.len();
    bytes[n - 8..].iter_mut().for_each(|b| *b ^= 0x5a);
    std::fs::write(&weights, bytes).unwrap();
    let r = limits_script(&py, &[&url, key, "reload", "late", "ad2"]);
    println!("{r:#}");
    let (o, out, err) = run(quiver().args([
        "generate",
        "--model",
        &model,
        "--library",
        &lib,
        "--route",
        "expert:late",
        "--prompt",
        "The plural of cat is",
        "--max-tokens",
        "4",
        "--json",
    ]));
    assert!(o.status.success(), "{err}");
    let g: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(r["new"]["text"], g["text"]);
    assert!(r["models"].as_array().unwrap().iter().any(|m| m == "late"));
    assert_eq!(r["corrupt"]["status"], 500, "{}", r["corrupt"]);
    assert!(
        r["corrupt"]["body"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("ad2"),
        "{}",
        r["corrupt"]
    );
    assert_eq!(r["reload"]["status"], 200);

    // SIGTERM while a long stream runs: the stream finishes, then the
    // server exits cleanly.
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/interop/check_serve_limits.py");
    let mut client = Command::new(&py)
        .arg(script)
        .args([&url, key, "stream", "3000"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(client.stdout.take().unwrap()).lines();
    assert_eq!(out.next().unwrap().unwrap(), "first chunk");
    let pid = server.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let last: serde_json::Value = serde_json::from_str(&out.next().unwrap().unwrap()).unwrap();
    assert!(client.wait().unwrap().success());
    assert_eq!(last["done"], true, "{last}");
    assert_eq!(last["finish_reason"], "length", "{last}");
    assert!(last["chunks"].as_u64().unwrap() > 100, "{last}");
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(s) = server.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed().as_secs() < 60,
            "the server did not exit after SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    let log = log.lock().unwrap().join("\n");
    assert!(
        log.contains("stopping: no new requests; 1 running"),
        "{log}"
    );
}

/// The server's peak resident memory (`VmHWM`), in MiB.
fn peak_rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// A bounded load test on loopback: 16 concurrent clients, 320 greedy
/// requests over the base model, two experts and Arrow, a hard time cap;
/// every request completes (or gets a 429), none hangs, every answer
/// equals the same request sent alone, and the server's peak RSS stays
/// under 600 MiB. Then curl: SSE framing and the key check.
#[test]
fn serve_under_load_and_curl() {
    let Some(py) = python() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let lib = library(tmp.path());
    let model = fixture("tiny_llama").display().to_string();
    let (server, addr, _log) = start_server(&[
        "--model",
        &model,
        "--library",
        &lib,
        "--api-key",
        "k",
        "--max-queue",
        "64",
    ]);
    let url = format!("{addr}/v1");
    let v = script(
        &py,
        "load_serve.py",
        &[&url, "16", "320", "240", "base", "ad0", "ad1", "arrow"],
        &[("QUIVER_API_KEY", "k")],
    );
    println!(
        "load: {}",
        serde_json::json!({"statuses": v["statuses"], "wall_s": v["wall_s"]})
    );
    assert_eq!(v["requests"], 320);
    assert_eq!(v["failed"], serde_json::json!([]), "{v}");
    assert_eq!(
        v["wrong"],
        serde_json::json!([]),
        "concurrent answers = alone: {v}"
    );
    let ok = v["statuses"]["200"].as_u64().unwrap_or(0);
    let busy = v["statuses"]["429"].as_u64().unwrap_or(0);
    assert_eq!(ok + busy, 320, "{v}");
    assert!(ok >= 160, "most requests are served: {v}");
    let rss = peak_rss_mb(server.0.id()).expect("/proc/PID/status");
    println!("server peak RSS: {rss:.0} MiB");
    assert!(rss < 600.0, "peak RSS {rss:.0} MiB");

    // curl: the key, and the stream's framing (`data: ` events, a blank
    // line after each, `[DONE]` last).
    if Command::new("curl").arg("--version").output().is_err() {
        eprintln!("note: curl is not installed; the curl checks are skipped");
        return;
    }
    let curl = |args: &[&str]| -> (String, String) {
        let o = Command::new("curl")
            .args(["-sS", "-w", "\n%{http_code}"])
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap();
        (body.to_string(), code.to_string())
    };
    let (body, code) = curl(&[&format!("{url}/models")]);
    assert_eq!(code, "401", "{body}");
    let (_, code) = curl(&[&format!("{addr}/health")]);
    assert_eq!(code, "200");
    let (body, code) = curl(&[
        "-N",
        "-H",
        "Authorization: Bearer k",
        "-H",
        "Content-Type: application/json",
        "-d",
        r#"{"model": "arrow", "prompt": "The plural of cat is", "max_tokens": 5, "temperature": 0, "stream": true}"#,
        &format!("{url}/completions"),
    ]);
    assert_eq!(code, "200", "{body}");
    let events: Vec<&str> = body
        .split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .collect();
    assert!(events.len() >= 2, "{body}");
    for e in &events {
        assert!(e.starts_with("data: "), "an SSE data event: {e:?}");
    }
    assert_eq!(events.last().unwrap().trim(), "data: [DONE]");
    let mut text = String::new();
    for e in &events[..events.len() - 1] {
        let c: serde_json::Value = serde_json::from_str(&e["data: ".len()..]).unwrap();
        assert_eq!(c["object"], "text_completion");
        text.push_str(c["choices"][0]["text"].as_str().unwrap());
    }
    assert_eq!(
        text,
        generated(&lib, "arrow")
            .chars()
            .take(text.chars().count())
            .collect::<String>()
    );
}

/// The KV-cache budget: a request that can never fit is refused with one
/// sentence; requests that fit wait for room (two of four at a time here).
#[test]
fn serve_kv_budget() {
    let Some(py) = python() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let model = long_context_model(tmp.path());
    // The tiny model keeps 256 bytes per position (2 layers, 2 KV heads of
    // 8, keys and values, f32): 1 MiB is 4096 positions, and a request of
    // 1500 new tokens reserves 2048.
    let (_server, addr, _log) = start_server(&["--model", &model, "--kv-cache-mb", "1"]);
    let v = limits_script(&py, &[&format!("{addr}/v1"), "", "kv"]);
    let big = &v["too_big"];
    assert_eq!(big["status"], 400, "{big}");
    let msg = big["body"]["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("KV cache") && msg.contains("--kv-cache-mb"),
        "{msg}"
    );
    for r in v["fits"].as_array().unwrap() {
        assert_eq!(r["status"], 200, "{r}");
        assert_eq!(r["tokens"], 1500);
    }
    let m = v["metrics"].as_str().unwrap();
    let value = |line: &str| metric(m, line);
    let passes = value("quiver_batch_size_count");
    assert_eq!(
        value("quiver_batch_size_bucket{le=\"2\"}"),
        passes,
        "never more than two sequences at once"
    );
    assert!(
        value("quiver_batch_size_bucket{le=\"1\"}") < passes,
        "two at once"
    );
}
