//! Parity with lm-evaluation-harness without lm_eval installed.
//!
//! `tests/fixtures/lmeval/parity.json` was written by
//! `bench/lmeval/make_fixture.py` from a `bench/lmeval/run.sh` run: a few
//! dozen olmo items (arc_easy, piqa, winogrande) as Quiver reads them, every
//! lm-eval request of each (context, continuation) with the log-likelihood
//! lm-eval computed (HF transformers, float32, on `quiver convert`'s
//! export of smollm2-135m), and lm-eval's acc and acc_norm picks.
//!
//! * [`fixture_requests_are_quivers_prompts`] (no model): Quiver's own
//!   option texts of each item (`Example::continuation`, the partial
//!   scoring of WinoGrande) are lm-eval's requests, character for character.
//! * [`quiver_eval_matches_lmeval`] (the real model; skipped when it is not
//!   fetched, a failure with QUIVER_REQUIRE_ASSETS=1): `quiver eval --data`
//!   on the items gives every request's log-likelihood within 1e-3 per token
//!   on average and 1e-2 per token at most, and the same picks.
//! * [`quiver_score_matches_lmeval`] (the real model): `quiver score` on one
//!   request of each task, the raw request path.

mod common;

use std::path::PathBuf;

use common::{assets_present, quiver, run};
use quiver_core::data::Example;
use serde_json::Value;

const MEAN_PER_TOKEN: f64 = 1e-3;
const MAX_PER_TOKEN: f64 = 1e-2;

fn fixture() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lmeval/parity.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("parity.json is JSON")
}

fn items(f: &Value) -> &Vec<Value> {
    f["items"].as_array().expect("items")
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .expect("a list")
        .iter()
        .map(|s| s.as_str().expect("a string").to_string())
        .collect()
}

fn example(item: &Value) -> Example {
    let options = strings(&item["options"]);
    let answer = item["answer"].as_u64().expect("answer") as usize;
    Example {
        task: item["task"].as_str().unwrap().to_string(),
        source: item["source"].as_str().unwrap().to_string(),
        target: options[answer].clone(),
        options: Some(options),
        answer: Some(answer),
        scored_suffix: item["scored_suffix"].as_str().map(str::to_string),
        doc_id: None,
    }
}

/// (context, continuation) of each option, as quiver-core's eval builds them.
fn quiver_texts(ex: &Example) -> Vec<(String, String)> {
    ex.options
        .as_ref()
        .unwrap()
        .iter()
        .map(|o| match &ex.scored_suffix {
            Some(s) if o.ends_with(s.as_str()) && o.len() > s.len() => (
                format!("{}{}", ex.source, ex.continuation(&o[..o.len() - s.len()])),
                s.clone(),
            ),
            _ => (ex.source.clone(), ex.continuation(o)),
        })
        .collect()
}

fn requests(item: &Value) -> Vec<(String, String, f64)> {
    item["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["context"].as_str().unwrap().to_string(),
                r["continuation"].as_str().unwrap().to_string(),
                r["loglik"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// First index of the largest value (numpy's argmax, Quiver's pick).
fn argmax(xs: &[f64]) -> usize {
    (0..xs.len()).fold(0, |b, i| if xs[i] > xs[b] { i } else { b })
}

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

fn tasks(f: &Value) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for it in items(f) {
        let t = it["task"].as_str().unwrap().to_string();
        if !out.contains(&t) {
            out.push(t);
        }
    }
    out
}

fn real_model() -> bool {
    let ok = assets_present(&["smollm2-135m"]);
    if !ok {
        eprintln!("skipping: smollm2-135m not fetched (run `quiver fetch smollm2-135m`)");
    }
    ok
}

#[test]
fn fixture_requests_are_quivers_prompts() {
    let f = fixture();
    let names = tasks(&f);
    assert!(names.len() >= 3, "tasks {names:?}");
    for t in &names {
        let n = items(&f).iter().filter(|i| i["task"] == t.as_str()).count();
        assert!(n >= 10, "{t}: {n} items");
    }
    let mut partial = 0;
    for item in items(&f) {
        let ex = example(item);
        ex.check().expect("a valid multiple-choice item");
        partial += ex.scored_suffix.is_some() as usize;
        let reqs = requests(item);
        let texts = quiver_texts(&ex);
        assert_eq!(texts.len(), reqs.len());
        for ((c, x), (lc, lx, _)) in texts.iter().zip(&reqs) {
            assert_eq!(c, lc, "{}: context", ex.task);
            assert_eq!(x, lx, "{}: continuation", ex.task);
        }
        // The recorded lm-eval picks follow from its log-likelihoods.
        let lls: Vec<f64> = reqs.iter().map(|r| r.2).collect();
        assert_eq!(
            argmax(&lls),
            item["lmeval_acc_pick"].as_u64().unwrap() as usize
        );
        let lens = usizes(&item["lmeval_acc_norm_lengths"]);
        let normed: Vec<f64> = lls.iter().zip(&lens).map(|(l, n)| l / *n as f64).collect();
        assert_eq!(
            argmax(&normed),
            item["lmeval_acc_norm_pick"].as_u64().unwrap() as usize
        );
        // lm-eval's acc_norm divides by the characters of the continuation,
        // or under partial scoring of each option's context, as Quiver's
        // acc_char.
        let chars: Vec<usize> = texts
            .iter()
            .map(|(c, x)| match ex.scored_suffix {
                Some(_) => c.chars().count(),
                None => x.chars().count(),
            })
            .collect();
        assert_eq!(lens, chars, "{}", ex.task);
    }
    assert!(
        partial > 0,
        "the fixture should hold partial-scoring (WinoGrande) items"
    );
}

#[test]
fn quiver_eval_matches_lmeval() {
    if !real_model() {
        return;
    }
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("items.jsonl");
    let mut lines = String::new();
    for item in items(&f) {
        let ex = example(item);
        let mut v = serde_json::json!({
            "task": ex.task, "source": ex.source, "target": ex.target,
            "options": ex.options, "answer": ex.answer,
        });
        if let Some(s) = &ex.scored_suffix {
            v["scored_suffix"] = Value::from(s.clone());
        }
        lines.push_str(&v.to_string());
        lines.push('\n');
    }
    std::fs::write(&data, lines).unwrap();
    let preds = dir.path().join("predictions.jsonl");
    let names = tasks(&f).join(",");
    let (o, stdout, stderr) = run(quiver().args([
        "eval",
        "-q",
        "--model",
        "smollm2-135m",
        "--data",
        data.to_str().unwrap(),
        "--tasks",
        &names,
        "--split",
        "all",
        "--mode",
        "mc",
        "--predictions",
        preds.to_str().unwrap(),
    ]));
    assert!(o.status.success(), "quiver eval failed: {stdout}{stderr}");
    let records: Vec<Value> = std::fs::read_to_string(&preds)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), items(&f).len());

    let mut per_token = Vec::new();
    let mut worst = (0.0f64, String::new());
    for t in tasks(&f) {
        let fx: Vec<&Value> = items(&f)
            .iter()
            .filter(|i| i["task"] == t.as_str())
            .collect();
        let qs: Vec<&Value> = records.iter().filter(|r| r["task"] == t.as_str()).collect();
        assert_eq!(fx.len(), qs.len(), "{t}");
        for (k, (item, rec)) in fx.iter().zip(&qs).enumerate() {
            assert_eq!(
                rec["item"].as_u64(),
                Some(k as u64),
                "{t}: items in file order"
            );
            let c = &rec["choices"];
            let q: Vec<f64> = c["logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            let toks = usizes(&c["tokens"]);
            let lls: Vec<f64> = requests(item).iter().map(|r| r.2).collect();
            assert_eq!(q.len(), lls.len(), "{t} item {k}");
            for j in 0..q.len() {
                let d = (q[j] - lls[j]).abs() / toks[j] as f64;
                per_token.push(d);
                if d > worst.0 {
                    worst = (
                        d,
                        format!(
                            "{t} item {k} option {j}: quiver {} lm-eval {}",
                            q[j], lls[j]
                        ),
                    );
                }
            }
            let acc_pick = item["lmeval_acc_pick"].as_u64().unwrap() as usize;
            let norm_pick = item["lmeval_acc_norm_pick"].as_u64().unwrap() as usize;
            assert_eq!(
                c["pred"].as_u64(),
                Some(acc_pick as u64),
                "{t} item {k}: acc pick"
            );
            // lm-eval's acc_norm rule on Quiver's log-likelihoods.
            let lens = usizes(&item["lmeval_acc_norm_lengths"]);
            let normed: Vec<f64> = q.iter().zip(&lens).map(|(l, n)| l / *n as f64).collect();
            assert_eq!(argmax(&normed), norm_pick, "{t} item {k}: acc_norm pick");
            // Quiver's acc_char is lm-eval's acc_norm, partial scoring included.
            assert_eq!(
                c["pred_norm_chars"].as_u64(),
                Some(norm_pick as u64),
                "{t} item {k}: acc_char pick"
            );
            assert_eq!(usizes(&c["chars"]), lens, "{t} item {k}: characters");
        }
    }
    let mean = per_token.iter().sum::<f64>() / per_token.len() as f64;
    eprintln!(
        "{} requests: mean |dLL|/token {mean:.2e}, max {:.2e} ({})",
        per_token.len(),
        worst.0,
        worst.1
    );
    assert!(mean < MEAN_PER_TOKEN, "mean |dLL| per token {mean:e}");
    assert!(
        worst.0 < MAX_PER_TOKEN,
        "max |dLL| per token {:e}: {}",
        worst.0,
        worst.1
    );
}

#[test]
fn quiver_score_matches_lmeval() {
    if !real_model() {
        return;
    }
    let f = fixture();
    for t in tasks(&f) {
        let item = items(&f).iter().find(|i| i["task"] == t.as_str()).unwrap();
        let (ctx, cont, ll) = requests(item).into_iter().last().unwrap();
        let (o, stdout, stderr) = run(quiver().args([
            "score",
            "-q",
            "--model",
            "smollm2-135m",
            "--context",
            &ctx,
            "--continuation",
            &cont,
        ]));
        assert!(o.status.success(), "quiver score failed: {stderr}");
        let v: Value = serde_json::from_str(stdout.trim()).expect("score prints JSON");
        let lp = v["logprob"].as_f64().unwrap();
        let toks = v["tokens"].as_u64().unwrap() as f64;
        let d = (lp - ll).abs() / toks;
        assert!(
            d < MAX_PER_TOKEN,
            "{t}: quiver score {lp}, lm-eval {ll} ({d:e} per token)"
        );
    }
}
