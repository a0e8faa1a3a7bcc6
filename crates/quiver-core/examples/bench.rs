//! Quiver's side of the side-by-side benchmark (`bench/run.sh`): LoRA
//! training step, batched scoring, KV-cached generation, and peak memory on
//! one model, printed as JSON in the schema `bench/report.py` reads.
//!
//! ```text
//! cargo run --release -p quiver-core --example bench -- --model smollm2-135m --threads 2 --out quiver.json
//! ```

use std::time::Instant;

mod common;

use candle_core::{DType, Device, Tensor};
use quiver_core::generate::{generate, SamplingParams};
use quiver_core::lora::{LoraConfig, TargetModules};
use quiver_core::train::{Batch, LoraTrainer, Tokenized, TrainConfig};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Args {
    model: String,
    threads: usize,
    quick: bool,
    out: Option<String>,
    sections: Vec<String>,
}

fn parse_args() -> Args {
    let mut a = Args {
        model: "smollm2-135m".into(),
        threads: 2,
        quick: false,
        out: None,
        sections: vec![
            "train".into(),
            "score".into(),
            "generate".into(),
            "arrow".into(),
        ],
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let val = || argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--model" => {
                a.model = val();
                i += 1
            }
            "--threads" => {
                a.threads = val().parse().expect("--threads N");
                i += 1
            }
            "--out" => {
                a.out = Some(val());
                i += 1
            }
            "--sections" => {
                a.sections = val().split(',').map(String::from).collect();
                i += 1
            }
            "--quick" => a.quick = true,
            other => panic!("unknown argument {other}"),
        }
        i += 1;
    }
    a
}

/// Median of `reps` timings of `f` after one warm-up call.
fn time_median(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut ts: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    ts.sort_by(|a, b| a.total_cmp(b));
    ts[ts.len() / 2]
}

fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn random_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % vocab as u64) as u32
        })
        .collect()
}

fn main() -> anyhow::Result<()> {
    quiver_core::alloc::keep_freed_memory();
    let args = parse_args();
    std::env::set_var("RAYON_NUM_THREADS", args.threads.to_string());
    let reps = if args.quick { 2 } else { 5 };
    let (b_sz, seq_len) = (8usize, 128usize);
    let mut lm = quiver_core::load(&args.model, &Device::Cpu, DType::F32)?;
    let vocab = lm.model.config().vocab_size;
    let mut out = serde_json::json!({
        "impl": "quiver",
        "threads": args.threads,
        "model": args.model,
    });

    if args.sections.iter().any(|s| s == "score") {
        let ids = Tensor::from_vec(
            random_ids(b_sz * seq_len, vocab, 1),
            (b_sz, seq_len),
            &Device::Cpu,
        )?;
        let t = time_median(reps, || {
            lm.model.forward(&ids, None).expect("forward");
        });
        out["score"] = serde_json::json!({"tokens_per_s": (b_sz * seq_len) as f64 / t, "batch": b_sz, "seq_len": seq_len});
        eprintln!("score: {:.0} tokens/s", (b_sz * seq_len) as f64 / t);
        // The same forward on 8-bit weights and activations for every input
        // (`--quantize q8_0 --quantize-rows all`).
        let mut qm = lm.model.clone();
        let n = qm.quantize(candle_core::quantized::GgmlDType::Q8_0)?;
        qm.set_quantized_max_rows(usize::MAX);
        let kernel = quiver_core::kernels::q8::DotKernel::detect();
        let t = time_median(reps, || {
            qm.forward(&ids, None).expect("forward");
        });
        out["score_q8"] = serde_json::json!({
            "tokens_per_s": (b_sz * seq_len) as f64 / t, "batch": b_sz, "seq_len": seq_len,
            "quantized_layers": n, "kernel": kernel.name(),
        });
        eprintln!(
            "score (Q8_0, {}): {:.0} tokens/s",
            kernel.name(),
            (b_sz * seq_len) as f64 / t
        );
    }

    if args.sections.iter().any(|s| s == "generate") {
        let prompt = random_ids(16, vocab, 2);
        let params = SamplingParams {
            max_tokens: 64,
            ..Default::default()
        };
        let t = time_median(reps.min(3), || {
            let (toks, _) =
                generate(&lm.model, &prompt, &params, &[], |_| Ok(())).expect("generate");
            assert_eq!(toks.len(), 64);
        });
        out["generate"] = serde_json::json!({"tokens_per_s": 64.0 / t, "new_tokens": 64});
        eprintln!("generate: {:.1} tokens/s", 64.0 / t);
        // The same with quantized weights for decoding (`quiver generate
        // --quantize q8_0` / `q4_1`).
        for (key, dtype) in [
            ("generate_q8", candle_core::quantized::GgmlDType::Q8_0),
            ("generate_q4", candle_core::quantized::GgmlDType::Q4_1),
        ] {
            let mut qm = lm.model.clone();
            let n = qm.quantize(dtype)?;
            let t = time_median(reps.min(3), || {
                let (toks, _) = generate(&qm, &prompt, &params, &[], |_| Ok(())).expect("generate");
                assert_eq!(toks.len(), 64);
            });
            out[key] = serde_json::json!({"tokens_per_s": 64.0 / t, "new_tokens": 64, "quantized_layers": n});
            eprintln!("generate ({dtype:?} weights): {:.1} tokens/s", 64.0 / t);
        }
    }

    if args.sections.iter().any(|s| s == "arrow") {
        // Arrow-routed scoring as the peer measures PEFT's create_arrow_model:
        // random r=4 q/k/v/o experts, top-4, the full forward with logits.
        use quiver_core::routing::{arrow_prototypes, install, Route, RouteOptions, SvdMethod};
        use rand::SeedableRng;
        let ids = Tensor::from_vec(
            random_ids(b_sz * seq_len, vocab, 3),
            (b_sz, seq_len),
            &Device::Cpu,
        )?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        let experts: Vec<_> = (0..64)
            .map(|i| common::random_expert(&lm.model, format!("e{i}"), &mut rng))
            .collect();
        let mut arrow = serde_json::Map::new();
        for n in [8usize, 64] {
            let t = Instant::now();
            let protos = arrow_prototypes(&experts[..n], SvdMethod::CholeskyQr)?;
            let mut routed = lm.model.clone();
            let opts = RouteOptions {
                top_k: Some(4),
                ..RouteOptions::default()
            };
            install(
                &mut routed,
                &experts[..n],
                &Route::Arrow,
                Some(&protos),
                &opts,
                None,
            )?;
            let build_s = t.elapsed().as_secs_f64();
            let t = time_median(reps, || {
                routed.forward(&ids, None).expect("forward");
            });
            arrow.insert(
                n.to_string(),
                serde_json::json!({"tokens_per_s": (b_sz * seq_len) as f64 / t, "forward_s": t, "build_s": build_s, "experts": n, "top_k": 4}),
            );
            eprintln!(
                "arrow-{n}: {:.0} tokens/s (prototypes + install {build_s:.2}s)",
                (b_sz * seq_len) as f64 / t
            );
        }
        out["arrow"] = serde_json::Value::Object(arrow);
    }

    if args.sections.iter().any(|s| s == "train") {
        let cfg = TrainConfig {
            lora: LoraConfig {
                rank: 4,
                alpha: 16.0,
                dropout: 0.05,
                target_modules: TargetModules::Names(
                    [
                        "q_proj",
                        "k_proj",
                        "v_proj",
                        "o_proj",
                        "gate_proj",
                        "up_proj",
                        "down_proj",
                    ]
                    .map(String::from)
                    .to_vec(),
                ),
                ..LoraConfig::default()
            },
            ..TrainConfig::default()
        };
        let mut trainer = LoraTrainer::attach(&mut lm.model, &cfg)?;
        // Loss on every token but the first, as a causal-LM loss over the sequence.
        let items: Vec<Tokenized> = (0..b_sz)
            .map(|i| {
                let ids = random_ids(seq_len + 1, vocab, 10 + i as u64);
                Tokenized {
                    input: ids[..1].to_vec(),
                    target: ids[1..].to_vec(),
                }
            })
            .collect();
        let refs: Vec<&Tokenized> = items.iter().collect();
        let batch = Batch::new(&refs, &Device::Cpu)?;
        let micro = vec![(batch, 7u64)];
        let t = time_median(reps, || {
            trainer.step(&lm.model, &micro, 1e-4).expect("train step");
        });
        out["train"] = serde_json::json!({"step_s": t, "tokens_per_s": (b_sz * seq_len) as f64 / t, "batch": b_sz, "seq_len": seq_len});
        eprintln!(
            "train: {:.3}s/step, {:.0} tokens/s",
            t,
            (b_sz * seq_len) as f64 / t
        );
    }
    out["peak_rss_mb"] = serde_json::json!(peak_rss_mb());
    let text = serde_json::to_string_pretty(&out)?;
    println!("{text}");
    if let Some(p) = &args.out {
        std::fs::write(p, &text)?;
    }
    Ok(())
}
