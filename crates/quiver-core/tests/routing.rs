//! Zero-shot reuse of a library (METHOD.md section 2): Arrow routing
//! against Python PEFT's `create_arrow_model` and a dense SVD
//! (`scripts/interop/make_arrow_fixture.py`), the fast routed forward
//! against the reference on random libraries, the static baselines, the
//! learned routers, caching, and one-sentence errors for bad input.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use common::fixture;
use quiver_core::data::Example;
use quiver_core::expert::{Expert, ExpertInfo};
use quiver_core::library::ExpertLibrary;
use quiver_core::lora::{LinearAdapter, Lora, LoraConfig, TargetModules};
use quiver_core::model::{load_source, ModelSource};
use quiver_core::models::weights::tiny_config;
use quiver_core::models::{Llama, WeightMap};
use quiver_core::routing::{
    self, arrow_prototypes, arrow_prototypes_cached, check_compatible, gen_know_sub, install,
    learned_prototypes_cached, oracle_expert, ExampleSource, MixMode, Prototypes, Route,
    RouteDecision, RouteObserver, RouteOptions, RoutePath, SelectorKind, SvdMethod,
};
use quiver_core::score::{encode_pair, score_batch};
use rand::{Rng, SeedableRng};

// ---------------------------------------------------------------- helpers

/// A library opened with every expert loaded (each checked).
#[derive(Debug)]
struct Opened {
    lib: ExpertLibrary,
    experts: Vec<Expert>,
}

impl std::ops::Deref for Opened {
    type Target = ExpertLibrary;
    fn deref(&self) -> &ExpertLibrary {
        &self.lib
    }
}

impl Opened {
    fn names(&self) -> Vec<String> {
        self.experts.iter().map(|e| e.name.clone()).collect()
    }
}

fn open_library(dir: &std::path::Path) -> quiver_core::Result<Opened> {
    let lib = ExpertLibrary::open(&dir.display().to_string())?;
    let experts = lib.load_experts(&Device::Cpu, DType::F32)?;
    Ok(Opened { lib, experts })
}

fn randn(rng: &mut rand::rngs::StdRng, shape: (usize, usize), std: f32) -> Tensor {
    let n = shape.0 * shape.1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            let u1: f32 = rng.random::<f32>().max(1e-7);
            let u2: f32 = rng.random::<f32>();
            std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn tiny_model(seed: u64) -> Llama {
    let cfg = tiny_config();
    let w = WeightMap::random(&cfg, seed, &Device::Cpu).unwrap();
    Llama::new(&cfg, &w, &Device::Cpu).unwrap()
}

/// A random expert on the model's attention projections (rank 4, alpha 16).
fn random_expert(model: &Llama, name: &str, seed: u64, targets: &[&str], rank: usize) -> Expert {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let config = LoraConfig {
        rank,
        target_modules: TargetModules::Names(targets.iter().map(|s| s.to_string()).collect()),
        ..LoraConfig::default()
    };
    let mut weights = BTreeMap::new();
    for lin in model.linears() {
        if lin.name() != "lm_head" && config.target_modules.matches(lin.name()) {
            let a = randn(&mut rng, (rank, lin.in_features()), 0.3);
            let b = randn(&mut rng, (lin.out_features(), rank), 0.3);
            weights.insert(lin.name().to_string(), (a, b));
        }
    }
    Expert {
        name: name.into(),
        config,
        weights,
        info: Some(ExpertInfo {
            name: name.into(),
            tasks: vec![format!("task_of_{name}")],
            base_model: quiver_core::expert::BaseModelId {
                id: "tiny".into(),
                fingerprint: "unused".into(),
            },
            training: serde_json::Value::Null,
            metrics: BTreeMap::new(),
            created: 0,
        }),
    }
}

const ATTN: [&str; 4] = ["q_proj", "k_proj", "v_proj", "o_proj"];

fn random_library(model: &Llama, n: usize, seed: u64) -> Vec<Expert> {
    (0..n)
        .map(|i| random_expert(model, &format!("e{i:03}"), seed * 1000 + i as u64, &ATTN, 4))
        .collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    common::max_abs_diff(a, b)
}

fn logits(model: &Llama, ids: &Tensor) -> Tensor {
    model.forward(ids, None).unwrap()
}

fn sample_ids(seed: u64, b: usize, s: usize) -> Tensor {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let v: Vec<u32> = (0..b * s).map(|_| rng.random_range(0..64u32)).collect();
    Tensor::from_vec(v, (b, s), &Device::Cpu).unwrap()
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), to).unwrap();
        }
    }
}

fn opts(k: usize, mix: MixMode, path: RoutePath) -> RouteOptions {
    RouteOptions {
        top_k: Some(k),
        mix,
        path,
        ..RouteOptions::default()
    }
}

// ------------------------------------------------ peer cross-check (PEFT)

#[derive(serde::Deserialize)]
struct ArrowScore {
    context: String,
    continuation: String,
    continuation_ids: Vec<u32>,
    logprob: f64,
    base_logprob: f64,
}

#[derive(serde::Deserialize)]
struct ArrowExpected {
    experts: Vec<String>,
    top_k: usize,
    router_temperature: f64,
    prototypes: BTreeMap<String, BTreeMap<String, Vec<f64>>>,
    singular_values: BTreeMap<String, BTreeMap<String, Vec<f64>>>,
    peft_prototypes: BTreeMap<String, BTreeMap<String, Vec<f64>>>,
    scores: Vec<ArrowScore>,
}

fn arrow_expected() -> ArrowExpected {
    let text = std::fs::read_to_string(fixture("arrow/expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn one_minus_abs_cos(a: &[f32], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * y).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    1.0 - (dot / (na * nb)).abs()
}

#[test]
fn arrow_prototypes_equal_dense_svd_and_peft() {
    let exp = arrow_expected();
    let lib = open_library(&fixture("arrow/library")).unwrap();
    assert_eq!(lib.names(), exp.experts);
    for method in [SvdMethod::CholeskyQr, SvdMethod::Qr] {
        let protos = arrow_prototypes(&lib.experts, method).unwrap();
        assert_eq!(protos.layers.len(), 14, "2 layers x 7 modules");
        let (mut worst_dense, mut worst_peft) = (0f64, 0f64);
        for (e, name) in exp.experts.iter().enumerate() {
            for (module, want) in &exp.prototypes[name] {
                let got: Vec<f32> = protos.layers[module].get(e).unwrap().to_vec1().unwrap();
                // Same sign convention as the script: largest entry positive.
                let max_dense = got
                    .iter()
                    .zip(want)
                    .map(|(g, w)| (*g as f64 - w).abs())
                    .fold(0.0, f64::max);
                assert!(max_dense < 1e-5, "{method:?} {name} {module}: {max_dense}");
                worst_dense = worst_dense.max(one_minus_abs_cos(&got, want));
                worst_peft =
                    worst_peft.max(one_minus_abs_cos(&got, &exp.peft_prototypes[name][module]));
            }
        }
        eprintln!(
            "{method:?}: 1-|cos| vs numpy dense SVD <= {worst_dense:.2e}, vs PEFT power iteration <= {worst_peft:.2e}"
        );
        assert!(worst_dense < 1e-10);
        assert!(worst_peft < 1e-6);
    }
    // The singular value too (scale-free: Arrow never multiplies by it).
    let e0 = &lib.experts[0];
    for (module, (a, b)) in &e0.weights {
        let (r, inp) = a.dims2().unwrap();
        let out = b.dims()[0];
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        let t = routing::top_right_singular(&a, &b, r, inp, out, SvdMethod::CholeskyQr).unwrap();
        let want = exp.singular_values[&exp.experts[0]][module][0];
        assert!(
            (t.value - want).abs() < 1e-5 * want,
            "{module}: {} vs {want}",
            t.value
        );
    }
}

#[test]
fn arrow_top2_output_mix_scores_like_peft_create_arrow_model() {
    let exp = arrow_expected();
    let mut lm = load_source(
        ModelSource::HfDir(fixture("tiny_llama")),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let items: Vec<_> = exp
        .scores
        .iter()
        .map(|s| encode_pair(&lm.tokenizer, &s.context, &s.continuation).unwrap())
        .collect();
    for (item, s) in items.iter().zip(&exp.scores) {
        assert_eq!(item.1, s.continuation_ids);
    }
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture("arrow/library"), tmp.path());
    let lib = open_library(tmp.path()).unwrap();
    let (protos, stats) = arrow_prototypes_cached(&lib, &lib.experts, &[]).unwrap();
    assert_eq!((stats.computed, stats.cached), (4, 0));
    for path in [RoutePath::Fast, RoutePath::Grouped, RoutePath::Reference] {
        let o = RouteOptions {
            top_k: Some(exp.top_k),
            temperature: Some(exp.router_temperature),
            mix: MixMode::Output,
            path,
            ..RouteOptions::default()
        };
        let installed = install(
            &mut lm.model,
            &lib.experts,
            &Route::Arrow,
            Some(&protos),
            &o,
            None,
        )
        .unwrap();
        let got = score_batch(&lm.model, &items, 4).unwrap();
        for (g, s) in got.iter().zip(&exp.scores) {
            eprintln!(
                "{path:?} {:?}: quiver {:.6} peft {:.6} (base {:.6}) diff {:.2e}",
                s.context,
                g.logprob,
                s.logprob,
                s.base_logprob,
                (g.logprob - s.logprob).abs()
            );
            assert!(
                (g.logprob - s.logprob).abs() < 1e-3,
                "{path:?}: {} vs PEFT {}",
                g.logprob,
                s.logprob
            );
        }
        let usage = installed.usage.unwrap().report();
        assert!(usage.decisions > 0);
        assert_eq!(
            usage.experts.iter().map(|e| e.chosen).sum::<u64>(),
            usage.decisions * 2
        );
    }
    // The base model is what PEFT's adapter-disabled run saw.
    routing::install(
        &mut lm.model,
        &lib.experts,
        &Route::Base,
        None,
        &RouteOptions::default(),
        None,
    )
    .unwrap();
    let base = score_batch(&lm.model, &items, 4).unwrap();
    for (b, s) in base.iter().zip(&exp.scores) {
        assert!((b.logprob - s.base_logprob).abs() < 1e-3);
    }
}

// ------------------------------------------- fast path = reference path

/// Full model forward: Fast, Grouped and Reference give the same logits.
#[test]
fn fast_and_grouped_paths_equal_reference_on_random_libraries() {
    let model0 = tiny_model(11);
    let ids = sample_ids(5, 3, 9);
    for (n, ks) in [
        (1usize, vec![1usize]),
        (4, vec![1, 2, 4]),
        (64, vec![1, 3, 8, 64]),
    ] {
        let experts = random_library(&model0, n, n as u64);
        let protos = arrow_prototypes(&experts, SvdMethod::CholeskyQr).unwrap();
        for &k in &ks {
            for mix in [MixMode::Output, MixMode::Factor] {
                for kind in [Route::Arrow, Route::Mu, Route::Phatgoose] {
                    if kind != Route::Arrow && (k != ks[ks.len() / 2] || n == 1) {
                        continue; // one k suffices for the other scorers
                    }
                    let mut out = Vec::new();
                    for path in [RoutePath::Reference, RoutePath::Grouped, RoutePath::Fast] {
                        let mut m = model0.clone();
                        install(
                            &mut m,
                            &experts,
                            &kind,
                            Some(&protos),
                            &opts(k, mix, path),
                            None,
                        )
                        .unwrap();
                        out.push(logits(&m, &ids));
                    }
                    let d1 = max_diff(&out[0], &out[1]);
                    let d2 = max_diff(&out[0], &out[2]);
                    assert!(
                        d1 < 1e-4 && d2 < 1e-4,
                        "n={n} k={k} {mix:?} {kind}: {d1} {d2}"
                    );
                }
            }
        }
    }
}

/// A bf16 model routes too (factors stay f32; the input is converted).
#[test]
fn fast_path_equals_reference_in_bf16() {
    let cfg = tiny_config();
    let mut w = WeightMap::random(&cfg, 21, &Device::Cpu).unwrap();
    for t in w.tensors.values_mut() {
        *t = t.to_dtype(DType::BF16).unwrap();
    }
    let model0 = Llama::new(&cfg, &w, &Device::Cpu).unwrap();
    let experts = random_library(&tiny_model(21), 6, 3);
    let protos = arrow_prototypes(&experts, SvdMethod::CholeskyQr).unwrap();
    let ids = sample_ids(4, 2, 7);
    let mut out = Vec::new();
    for path in [RoutePath::Reference, RoutePath::Fast] {
        let mut m = model0.clone();
        install(
            &mut m,
            &experts,
            &Route::Arrow,
            Some(&protos),
            &opts(2, MixMode::Output, path),
            None,
        )
        .unwrap();
        out.push(logits(&m, &ids).to_dtype(DType::F32).unwrap());
    }
    let d = max_diff(&out[0], &out[1]);
    assert!(d < 0.1, "bf16 fast vs reference: {d}");
}

/// Layer level, with an explicit check against a hand-written mix.
#[test]
fn routed_layer_matches_hand_computed_mix() {
    let model = tiny_model(3);
    let experts = random_library(&model, 5, 9);
    let protos = arrow_prototypes(&experts, SvdMethod::Qr).unwrap();
    let mut m = model.clone();
    install(
        &mut m,
        &experts,
        &Route::Arrow,
        Some(&protos),
        &opts(2, MixMode::Output, RoutePath::Fast),
        None,
    )
    .unwrap();
    let module = "model.layers.1.self_attn.q_proj";
    let lin = m
        .linears()
        .into_iter()
        .find(|l| l.name() == module)
        .unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let xs = randn(&mut rng, (7, 16), 1.0).reshape((1, 7, 16)).unwrap();
    let got = lin.adapter().unwrap().delta(&xs).unwrap();
    let p: Vec<Vec<f32>> = protos.layers[module].to_vec2().unwrap();
    let x: Vec<Vec<f32>> = xs.squeeze(0).unwrap().to_vec2().unwrap();
    for (t, xt) in x.iter().enumerate() {
        let mut l: Vec<(f32, usize)> = p
            .iter()
            .enumerate()
            .map(|(e, v)| (v.iter().zip(xt).map(|(a, b)| a * b).sum::<f32>().abs(), e))
            .collect();
        l.sort_by(|a, b| b.0.total_cmp(&a.0));
        let z = (l[0].0 - l[0].0).exp() + (l[1].0 - l[0].0).exp();
        let mut want = Tensor::zeros((1, 1, 16), DType::F32, &Device::Cpu).unwrap();
        for &(logit, e) in &l[..2] {
            let w = ((logit - l[0].0).exp() / z) as f64;
            let (a, b) = &experts[e].weights[module];
            let lora = Lora::new(a.clone(), b.clone(), 4.0).unwrap();
            let d = lora.delta(&xs.narrow(1, t, 1).unwrap()).unwrap();
            want = (want + (d * w).unwrap()).unwrap();
        }
        let g = got.narrow(1, t, 1).unwrap();
        assert!(max_diff(&g, &want) < 1e-5, "token {t}");
    }
}

#[test]
fn one_expert_top1_routing_is_that_expert() {
    let model = tiny_model(4);
    let experts = random_library(&model, 1, 2);
    let protos = arrow_prototypes(&experts, SvdMethod::CholeskyQr).unwrap();
    let ids = sample_ids(1, 2, 6);
    let mut a = model.clone();
    experts[0].attach(&mut a, None).unwrap();
    for mix in [MixMode::Output, MixMode::Factor] {
        let mut b = model.clone();
        install(
            &mut b,
            &experts,
            &Route::Arrow,
            Some(&protos),
            &opts(1, mix, RoutePath::Fast),
            None,
        )
        .unwrap();
        assert!(max_diff(&logits(&a, &ids), &logits(&b, &ids)) < 1e-4);
    }
}

// --------------------------------------------------- static baselines

#[test]
fn merges_compute_what_they_say() {
    let model = tiny_model(8);
    let experts = random_library(&model, 3, 4);
    let module = "model.layers.0.self_attn.v_proj";
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let xs = randn(&mut rng, (5, 16), 1.0).reshape((1, 5, 16)).unwrap();
    let deltas: Vec<Tensor> = experts
        .iter()
        .map(|e| {
            let (a, b) = &e.weights[module];
            Lora::new(a.clone(), b.clone(), e.config.scale())
                .unwrap()
                .delta(&xs)
                .unwrap()
        })
        .collect();
    let delta_of = |route: Route| -> Tensor {
        let mut m = model.clone();
        install(
            &mut m,
            &experts,
            &route,
            None,
            &RouteOptions::default(),
            None,
        )
        .unwrap();
        let lin = m
            .linears()
            .into_iter()
            .find(|l| l.name() == module)
            .unwrap();
        lin.adapter().unwrap().delta(&xs).unwrap()
    };
    // uniform-dw: the mean of the experts' deltas.
    let mean = ((&deltas[0] + &deltas[1]).unwrap() + &deltas[2]).unwrap() / 3.0;
    assert!(max_diff(&delta_of(Route::UniformDw), &mean.unwrap()) < 1e-5);
    // uniform: s * mean(B) mean(A) x.
    let mean_t = |i: usize| {
        let ts: Vec<Tensor> = experts
            .iter()
            .map(|e| {
                if i == 0 {
                    e.weights[module].0.clone()
                } else {
                    e.weights[module].1.clone()
                }
            })
            .collect();
        (Tensor::stack(&ts, 0).unwrap().sum(0).unwrap() / 3.0).unwrap()
    };
    let want = Lora::new(mean_t(0), mean_t(1), 4.0)
        .unwrap()
        .delta(&xs)
        .unwrap();
    assert!(max_diff(&delta_of(Route::Uniform), &want) < 1e-5);
    // ties: trimmed, sign-elected, disjoint mean of dense updates.
    let dws: Vec<Vec<f32>> = experts
        .iter()
        .map(|e| {
            let (a, b) = &e.weights[module];
            (b.matmul(a).unwrap() * 4.0)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect();
    let n = dws[0].len();
    let trimmed: Vec<Vec<f32>> = dws
        .iter()
        .map(|v| {
            let mut s: Vec<f32> = v.iter().map(|x| x.abs()).collect();
            s.sort_by(|a, b| a.total_cmp(b));
            let pos = 0.8 * (n - 1) as f64;
            let lo = pos.floor() as usize;
            let th = s[lo] + (pos - lo as f64) as f32 * (s[lo + 1] - s[lo]);
            v.iter()
                .map(|&x| if x.abs() >= th { x } else { 0.0 })
                .collect()
        })
        .collect();
    let merged: Vec<f32> = (0..n)
        .map(|i| {
            let sign = trimmed.iter().map(|v| v[i]).sum::<f32>().signum();
            let agree: Vec<f32> = trimmed
                .iter()
                .map(|v| v[i])
                .filter(|&x| x != 0.0 && x.signum() == sign)
                .collect();
            if agree.is_empty() {
                0.0
            } else {
                agree.iter().sum::<f32>() / agree.len() as f32
            }
        })
        .collect();
    let kept = trimmed[0].iter().filter(|x| **x != 0.0).count() as f64 / n as f64;
    assert!((kept - 0.2).abs() < 0.05, "TIES keeps ~20%: {kept}");
    let dw = Tensor::from_vec(merged, (8, 16), &Device::Cpu).unwrap();
    let want = xs.broadcast_matmul(&dw.t().unwrap()).unwrap();
    assert!(max_diff(&delta_of(Route::Ties), &want) < 1e-5);
}

#[test]
fn oracle_and_single_expert_routes() {
    let model = tiny_model(2);
    let mut experts = random_library(&model, 3, 7);
    experts[2].info.as_mut().unwrap().tasks = vec!["task_of_e001".into(), "x".into()];
    assert_eq!(
        oracle_expert(&experts, "task_of_e001").unwrap().name,
        "e001"
    );
    assert_eq!(oracle_expert(&experts, "x").unwrap().name, "e002");
    let e = oracle_expert(&experts, "nope").unwrap_err().to_string();
    assert!(
        e.contains("no expert of the library was trained on task `nope`"),
        "{e}"
    );
    let ids = sample_ids(3, 1, 5);
    let mut a = model.clone();
    install(
        &mut a,
        &experts,
        &Route::Oracle("task_of_e001".into()),
        None,
        &RouteOptions::default(),
        None,
    )
    .unwrap();
    let mut b = model.clone();
    experts[1].attach(&mut b, None).unwrap();
    assert!(max_diff(&logits(&a, &ids), &logits(&b, &ids)) < 1e-6);
}

#[test]
fn gen_know_sub_subtracts_the_general_mean() {
    let model = tiny_model(2);
    let experts = random_library(&model, 4, 3);
    let general = vec!["e002".to_string(), "e003".to_string()];
    let out = gen_know_sub(&experts, &general).unwrap();
    assert_eq!(
        out.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
        ["e000", "e001"]
    );
    let m = "model.layers.0.self_attn.q_proj";
    for (i, which) in [(0usize, 0usize), (1, 1)] {
        let pick = |e: &Expert| {
            if which == 0 {
                e.weights[m].0.clone()
            } else {
                e.weights[m].1.clone()
            }
        };
        let mean = ((pick(&experts[2]) + pick(&experts[3])).unwrap() / 2.0).unwrap();
        let want = (pick(&experts[i]) - mean).unwrap();
        assert!(max_diff(&pick(&out[i]), &want) < 1e-6);
    }
    let e = gen_know_sub(&experts, &["zzz".into()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("no expert `zzz`"), "{e}");
}

// ------------------------------------------------ learned prototypes

/// Test-side capture of a layer's input at the last position.
#[derive(Debug)]
struct CaptureLast {
    inner: Lora,
    sum: Arc<Mutex<Vec<f64>>>,
}

impl LinearAdapter for CaptureLast {
    fn delta(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let s = xs.dims()[1];
        let last: Vec<f32> = xs.narrow(1, s - 1, 1)?.flatten_all()?.to_vec1()?;
        let mut sum = self.sum.lock().unwrap();
        for (a, b) in sum.iter_mut().zip(last) {
            *a += b as f64;
        }
        self.inner.delta(xs)
    }
}

fn toy_examples(task: &str) -> Vec<Example> {
    (0..12)
        .map(|i| Example {
            task: task.into(),
            source: format!("the {task} number {i} is"),
            target: format!("{}", i * 7 % 10),
            options: None,
            answer: None,
            scored_suffix: None,
            doc_id: None,
        })
        .collect()
}

#[test]
fn mu_and_phatgoose_prototypes_are_computed_cached_and_routable() {
    let mut lm = load_source(
        ModelSource::HfDir(fixture("tiny_llama")),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture("arrow/library"), tmp.path());
    let lib = open_library(tmp.path()).unwrap();
    let calls = Mutex::new(0usize);
    let get = |e: &Expert| -> quiver_core::Result<Vec<Example>> {
        *calls.lock().unwrap() += 1;
        Ok(toy_examples(&e.name))
    };
    let data = ExampleSource {
        id: "toy".into(),
        examples: Some(&get),
    };
    let lookup = ExampleSource {
        id: "toy".into(),
        examples: None,
    };
    let o = RouteOptions::default();
    // Without data and without a cache: one sentence naming the command.
    let e = learned_prototypes_cached(
        &lib,
        &lib.experts,
        SelectorKind::Mu,
        &mut lm.model,
        &lm.tokenizer,
        &lookup,
        &o,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("quiver arrow --library") && e.contains("--kind mu"),
        "{e}"
    );
    let (mu, stats) = learned_prototypes_cached(
        &lib,
        &lib.experts,
        SelectorKind::Mu,
        &mut lm.model,
        &lm.tokenizer,
        &data,
        &o,
    )
    .unwrap();
    assert_eq!((stats.computed, stats.cached), (4, 0));
    for t in mu.layers.values() {
        for row in t.to_vec2::<f32>().unwrap() {
            let n: f32 = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((n - 1.0).abs() < 1e-4);
        }
    }
    let (mu2, stats) = learned_prototypes_cached(
        &lib,
        &lib.experts,
        SelectorKind::Mu,
        &mut lm.model,
        &lm.tokenizer,
        &data,
        &o,
    )
    .unwrap();
    assert_eq!((stats.computed, stats.cached), (0, 4));
    assert_eq!(*calls.lock().unwrap(), 4);
    for (m, t) in &mu.layers {
        assert_eq!(max_diff(t, &mu2.layers[m]), 0.0);
    }
    // A lookup without data now finds them.
    let (_, stats) = learned_prototypes_cached(
        &lib,
        &lib.experts,
        SelectorKind::Mu,
        &mut lm.model,
        &lm.tokenizer,
        &lookup,
        &o,
    )
    .unwrap();
    assert_eq!(stats.cached, 4);
    // Mu by hand for one expert and module: the normalised mean of the
    // layer's input at the last token, with the expert loaded.
    let module = "model.layers.1.self_attn.o_proj";
    let e = &lib.experts[1];
    let sum = Arc::new(Mutex::new(vec![0f64; 32]));
    e.attach(&mut lm.model, None).unwrap();
    for lin in lm.model.linears_mut() {
        if lin.name() == module {
            let (a, b) = &e.weights[module];
            lin.set_adapter(Some(Arc::new(CaptureLast {
                inner: Lora::new(a.clone(), b.clone(), e.config.scale()).unwrap(),
                sum: sum.clone(),
            })));
        }
    }
    for ex in toy_examples(&e.name).iter().take(10) {
        let t = quiver_core::train::tokenize_example(&lm.tokenizer, ex, 512, 64).unwrap();
        let ids: Vec<u32> = t.input.into_iter().chain(t.target).collect();
        let n = ids.len();
        lm.model
            .forward(&Tensor::from_vec(ids, (1, n), &Device::Cpu).unwrap(), None)
            .unwrap();
    }
    quiver_core::expert::detach_all(&mut lm.model);
    let sum = sum.lock().unwrap().clone();
    let norm = sum.iter().map(|x| x * x).sum::<f64>().sqrt();
    let got: Vec<f32> = mu.layers[module].get(1).unwrap().to_vec1().unwrap();
    for (g, s) in got.iter().zip(&sum) {
        assert!((*g as f64 - s / norm).abs() < 1e-5, "{g} vs {}", s / norm);
    }

    let (pg, stats) = learned_prototypes_cached(
        &lib,
        &lib.experts,
        SelectorKind::Phatgoose,
        &mut lm.model,
        &lm.tokenizer,
        &data,
        &o,
    )
    .unwrap();
    assert_eq!(stats.computed, 4);
    let moved = pg
        .layers
        .values()
        .map(|t| {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .fold(0f32, f32::max);
    assert!(moved > 1e-3, "Phatgoose gates must move from 0: {moved}");
    // Both route.
    let ids = Tensor::new(&[[5u32, 17, 42, 8]], &Device::Cpu).unwrap();
    for (route, protos) in [(Route::Mu, &mu), (Route::Phatgoose, &pg)] {
        let i = install(&mut lm.model, &lib.experts, &route, Some(protos), &o, None).unwrap();
        lm.model.forward(&ids, None).unwrap();
        assert!(i.usage.unwrap().report().decisions > 0);
    }
}

#[test]
fn phatgoose_trains_one_gate_per_layer_and_leaves_the_model_clean() {
    let mut lm = load_source(
        ModelSource::HfDir(fixture("tiny_llama")),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let lib = open_library(&fixture("arrow/library")).unwrap();
    let cfg = routing::PhatgooseConfig {
        steps: 30,
        ..Default::default()
    };
    let ex = toy_examples("task_a");
    let gates = routing::phatgoose::expert_phatgoose_gates(
        &mut lm.model,
        &lm.tokenizer,
        &lib.experts[0],
        &ex,
        &cfg,
    )
    .unwrap();
    assert_eq!(gates.len(), lib.experts[0].weights.len());
    for (m, g) in &gates {
        assert!(g.iter().any(|v| v.abs() > 1e-4), "gate of {m} did not move");
    }
    assert!(lm.model.linears().iter().all(|l| l.adapter().is_none()));
}

// ------------------------------------------------------------- caching

#[test]
fn arrow_cache_is_keyed_by_config_and_weights() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture("arrow/library"), tmp.path());
    let lib = open_library(tmp.path()).unwrap();
    let (p1, s1) = arrow_prototypes_cached(&lib, &lib.experts, &[]).unwrap();
    assert_eq!((s1.computed, s1.cached), (4, 0));
    let aux = tmp.path().join(".aux").display().to_string();
    assert!(
        s1.cache_dir.starts_with(&format!("{aux}/arrow-")),
        "{}",
        s1.cache_dir
    );
    let (p2, s2) = arrow_prototypes_cached(&lib, &lib.experts, &[]).unwrap();
    assert_eq!((s2.computed, s2.cached), (0, 4));
    for (m, t) in &p1.layers {
        assert_eq!(max_diff(t, &p2.layers[m]), 0.0);
    }
    // A '.aux' directory is not an expert.
    assert_eq!(open_library(tmp.path()).unwrap().experts.len(), 4);
    // GenKnowSub is another configuration: another cache.
    let gks = vec!["task_d".to_string()];
    let sub = gen_know_sub(&lib.experts, &gks).unwrap();
    let (_, s3) = arrow_prototypes_cached(&lib, &sub, &gks).unwrap();
    assert_eq!(s3.computed, 3);
    assert_ne!(s3.cache_dir, s1.cache_dir);
    // A retrained expert (new weights file) is recomputed, not served stale.
    let e = &lib.experts[0];
    let mut changed = e.clone();
    for (a, _) in changed.weights.values_mut() {
        *a = (&*a * 2.0).unwrap();
    }
    std::fs::remove_dir_all(tmp.path().join("task_a")).unwrap();
    changed.save(&tmp.path().join("task_a")).unwrap();
    let lib = open_library(tmp.path()).unwrap();
    let (_, s4) = arrow_prototypes_cached(&lib, &lib.experts, &[]).unwrap();
    assert_eq!((s4.computed, s4.cached), (1, 3));
}

// ----------------------------------------------------------- observers

/// (layer, b_sz, seq_len, chosen experts) of one call.
type Seen = (String, usize, usize, Vec<u32>);

#[derive(Debug, Default)]
struct Recorder {
    seen: Mutex<Vec<Seen>>,
}

impl RouteObserver for Recorder {
    fn on_route(&self, d: &RouteDecision<'_>) {
        self.seen.lock().unwrap().push((
            d.layer.to_string(),
            d.b_sz,
            d.seq_len,
            d.selection.experts.clone(),
        ));
    }
}

#[test]
fn observer_sees_every_layer_and_token() {
    let model = tiny_model(6);
    let experts = random_library(&model, 6, 1);
    let protos = arrow_prototypes(&experts, SvdMethod::CholeskyQr).unwrap();
    let rec = Arc::new(Recorder::default());
    let mut m = model.clone();
    let inst = install(
        &mut m,
        &experts,
        &Route::Arrow,
        Some(&protos),
        &opts(3, MixMode::Output, RoutePath::Fast),
        Some(rec.clone()),
    )
    .unwrap();
    m.forward(&sample_ids(2, 2, 5), None).unwrap();
    let seen = rec.seen.lock().unwrap();
    assert_eq!(seen.len(), 8, "2 layers x q, k, v, o");
    for (_, b, s, sel) in seen.iter() {
        assert_eq!((*b, *s, sel.len()), (2, 5, 2 * 5 * 3));
    }
    let r = inst.usage.unwrap().report();
    assert_eq!(r.decisions, 8 * 10);
    assert!(inst.description.contains("top-3"), "{}", inst.description);
}

// -------------------------------------------------------- bad input

#[test]
fn bad_input_is_one_sentence() {
    let model = tiny_model(1);
    let experts = random_library(&model, 4, 5);
    let protos = arrow_prototypes(&experts, SvdMethod::CholeskyQr).unwrap();
    let err = |route: Route, o: RouteOptions, p: Option<&Prototypes>, ex: &[Expert]| -> String {
        let mut m = model.clone();
        let e = install(&mut m, ex, &route, p, &o, None)
            .unwrap_err()
            .to_string();
        assert!(!e.contains('\n'), "one line: {e}");
        e
    };
    let e = err(
        Route::Arrow,
        opts(0, MixMode::Output, RoutePath::Fast),
        Some(&protos),
        &experts,
    );
    assert!(e.contains("top-k is 0") && e.contains("(4)"), "{e}");
    let e = err(
        Route::Arrow,
        opts(5, MixMode::Output, RoutePath::Fast),
        Some(&protos),
        &experts,
    );
    assert!(
        e.contains("top-k is 5") && e.contains("number of experts in the library (4)"),
        "{e}"
    );
    let e = err(
        Route::Expert("nobody".into()),
        RouteOptions::default(),
        None,
        &experts,
    );
    assert!(
        e.contains("no expert `nobody`") && e.contains("e000"),
        "{e}"
    );
    let e = err(Route::Arrow, RouteOptions::default(), None, &experts);
    assert!(e.contains("needs prototypes"), "{e}");
    // Mismatched target modules.
    let mut mixed = experts.clone();
    mixed[2] = random_expert(&model, "e002", 9, &["q_proj", "v_proj"], 4);
    let e = err(Route::Arrow, RouteOptions::default(), Some(&protos), &mixed);
    assert!(
        e.contains("expert `e002` does not adapt module") && e.contains("same target modules"),
        "{e}"
    );
    assert!(check_compatible(&mixed).is_err());
    let e = gen_know_sub(&mixed, &["e000".into()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("same target modules"), "{e}");
    for route in [Route::Uniform, Route::UniformDw, Route::Ties] {
        let e = err(route, RouteOptions::default(), None, &mixed);
        assert!(e.contains("same target modules"), "{e}");
    }
    // Mismatched ranks.
    let mut ranks = experts.clone();
    ranks[1] = random_expert(&model, "e001", 9, &ATTN, 8);
    let e = err(Route::Uniform, RouteOptions::default(), None, &ranks);
    assert!(
        e.contains("expert `e001` has LoRA rank 8 but expert `e000` has rank 4"),
        "{e}"
    );
    // Unknown route and mixing mode.
    let e = "arrows".parse::<Route>().unwrap_err().to_string();
    assert!(e.contains("unknown route"), "{e}");
    let e = "sum".parse::<MixMode>().unwrap_err().to_string();
    assert!(e.contains("expected `output` or `factor`"), "{e}");
    // Not a library / an empty one.
    let tmp = tempfile::tempdir().unwrap();
    let e = open_library(&tmp.path().join("nope"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a Quiver expert library"), "{e}");
    let e = open_library(tmp.path()).unwrap_err().to_string();
    assert!(e.contains("has no experts"), "{e}");
    // An unknown expert names the known ones.
    let lib_dir = tmp.path().join("lib");
    copy_dir(&fixture("arrow/library"), &lib_dir);
    let lib = open_library(&lib_dir).unwrap();
    let e = lib
        .load_expert("zed", &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("has no expert `zed` (it has: task_a, task_b"),
        "{e}"
    );
}
