//! The trainer on a tiny model built from the transformers fixture: loss
//! falls, base weights stay bit-identical, a resumed run ends where an
//! uninterrupted one does, and the expert round-trips through PEFT's layout.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use quiver_core::data::Example;
use quiver_core::expert::{model_fingerprint, BaseModelId, Expert};
use quiver_core::lora::{LoraConfig, TargetModules};
use quiver_core::model::{load_source, ModelSource};
use quiver_core::train::{
    make_expert, mean_loss, tokenize_example, train_lora, NoObserver, StepStats, TrainConfig,
    TrainObserver,
};
use quiver_core::LoadedModel;

fn tiny() -> LoadedModel {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_llama");
    load_source(ModelSource::HfDir(dir), &Device::Cpu, DType::F32).unwrap()
}

fn examples() -> Vec<Example> {
    let words = ["hello", "world", "the", "cat", "sat", "mat", "dog", "quick"];
    (0..24)
        .map(|i| {
            let a = words[i % words.len()];
            let b = words[(i * 3 + 1) % words.len()];
            Example {
                task: "swap".into(),
                source: format!("{a} {b} ->"),
                target: format!("{b} {a}"),
                options: None,
                answer: None,
                scored_suffix: None,
                doc_id: None,
            }
        })
        .collect()
}

fn cfg(steps: usize) -> TrainConfig {
    TrainConfig {
        steps,
        lr: 2e-2,
        batch_size: 4,
        grad_accum: 2,
        checkpoint_every: 4,
        max_input_len: 32,
        max_target_len: 8,
        seed: 3,
        lora: LoraConfig {
            rank: 4,
            alpha: 8.0,
            dropout: 0.1,
            target_modules: TargetModules::Names(vec![
                "q_proj".into(),
                "v_proj".into(),
                "down_proj".into(),
            ]),
            ..LoraConfig::default()
        },
        ..TrainConfig::default()
    }
}

fn flat(w: &BTreeMap<String, (Tensor, Tensor)>) -> Vec<f32> {
    w.values()
        .flat_map(|(a, b)| {
            let mut v = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v.extend(b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            v
        })
        .collect()
}

fn base_snapshot(lm: &LoadedModel) -> Vec<Vec<f32>> {
    lm.model
        .named_weights()
        .into_iter()
        .map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

#[test]
fn loss_falls_and_base_is_untouched() {
    let mut lm = tiny();
    let data = examples();
    let before = base_snapshot(&lm);
    let (weights, report) = train_lora(
        &mut lm.model,
        &lm.tokenizer,
        &data,
        &data,
        &cfg(30),
        None,
        &mut NoObserver,
    )
    .unwrap();
    let (b, a) = (report.base_val_loss.unwrap(), report.val_loss.unwrap());
    assert!(a < 0.7 * b, "validation loss fell clearly: {b} -> {a}");
    assert!(
        before == base_snapshot(&lm),
        "base weights bit-identical after training"
    );
    assert_eq!(
        weights.len(),
        2 * 3,
        "q_proj, v_proj, down_proj in 2 layers"
    );
    for (m, (wa, wb)) in &weights {
        assert_eq!(
            wa.dims(),
            &[
                4,
                lm.model
                    .linears()
                    .iter()
                    .find(|l| l.name() == m)
                    .unwrap()
                    .in_features()
            ]
        );
        let bn = wb
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(bn > 0.0, "{m}: B moved away from its zero init");
    }
    // Adapters are removed after training: the model is the base again.
    let toks: Vec<_> = data
        .iter()
        .map(|e| tokenize_example(&lm.tokenizer, e, 32, 8).unwrap())
        .collect();
    assert!((mean_loss(&lm.model, &toks, 4).unwrap() - b).abs() < 1e-4);
}

struct StopAt(usize, usize);
impl TrainObserver for StopAt {
    fn on_step(&mut self, s: &StepStats) {
        self.1 = s.step;
    }
    fn interrupted(&self) -> bool {
        self.1 >= self.0
    }
}

#[test]
fn resumed_run_equals_uninterrupted_run() {
    let data = examples();
    let c = cfg(10);
    let mut lm = tiny();
    let (straight, _) = train_lora(
        &mut lm.model,
        &lm.tokenizer,
        &data,
        &data,
        &c,
        None,
        &mut NoObserver,
    )
    .unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("ckpt");
    let mut lm = tiny();
    let err = train_lora(
        &mut lm.model,
        &lm.tokenizer,
        &data,
        &data,
        &c,
        Some(&ckpt),
        &mut StopAt(6, 0),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("interrupted after step 6"),
        "{err}"
    );
    assert!(
        ckpt.join("checkpoint.json").is_file(),
        "a checkpoint was written at step 4"
    );
    let mut lm = tiny();
    let (resumed, report) = train_lora(
        &mut lm.model,
        &lm.tokenizer,
        &data,
        &data,
        &c,
        Some(&ckpt),
        &mut NoObserver,
    )
    .unwrap();
    assert_eq!(
        report.resumed_from_step, 4,
        "resumed from the step-4 checkpoint"
    );
    let (x, y) = (flat(&straight), flat(&resumed));
    let diff = x
        .iter()
        .zip(&y)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff <= 1e-6, "resumed weights differ by {diff}");
}

#[test]
fn expert_round_trips_through_peft_layout() {
    let mut lm = tiny();
    let data = examples();
    let c = cfg(5);
    let (weights, report) = train_lora(
        &mut lm.model,
        &lm.tokenizer,
        &data,
        &data,
        &c,
        None,
        &mut NoObserver,
    )
    .unwrap();
    let base = BaseModelId {
        id: "tiny_llama".into(),
        fingerprint: model_fingerprint(&lm.model).unwrap(),
    };
    let expert = make_expert(
        "swap",
        vec!["swap".into()],
        weights.clone(),
        &c,
        &report,
        base.clone(),
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("swap");
    expert.save(&dir).unwrap();
    let cfg_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg_json["peft_type"], "LORA");
    assert_eq!(cfg_json["r"], 4);
    let back = Expert::load(&dir, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(flat(&back.weights), flat(&weights));
    assert_eq!(back.info.as_ref().unwrap().tasks, vec!["swap".to_string()]);

    // Attached, the expert gives the trained model's validation loss.
    let toks: Vec<_> = data
        .iter()
        .map(|e| tokenize_example(&lm.tokenizer, e, 32, 8).unwrap())
        .collect();
    back.attach(&mut lm.model, Some(&base.fingerprint)).unwrap();
    let with = mean_loss(&lm.model, &toks, 4).unwrap();
    assert!(
        (with - report.val_loss.unwrap()).abs() < 1e-4,
        "{with} vs {:?}",
        report.val_loss
    );

    // Another base model is refused.
    let err = back
        .attach(&mut lm.model, Some("0000"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("trained on base model"), "{err}");
}

#[test]
fn recorded_init_seed_recomputes_the_initial_a_and_delta_embeds_what_changed() {
    use quiver_core::train::lora_init_a;
    use quiver_core::transform::{flatten_delta, flatten_expert};
    let mut lm = tiny();
    let data = examples();
    // lr so small that A barely moves: A - A_0 must be tiny, B is what was learned.
    let c = TrainConfig {
        lr: 1e-7,
        init_seed: Some(1234),
        ..cfg(2)
    };
    let (weights, report) = train_lora(
        &mut lm.model,
        &lm.tokenizer,
        &data,
        &data,
        &c,
        None,
        &mut NoObserver,
    )
    .unwrap();
    for (m, (a, _)) in &weights {
        let (r, inp) = a.dims2().unwrap();
        let a0 = lora_init_a(1234, m, r, inp);
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let moved = a
            .iter()
            .zip(&a0)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            moved < 1e-5,
            "{m}: A moved {moved} from its recomputed init"
        );
        // Another seed gives another A.
        assert_ne!(lora_init_a(1235, m, r, inp), a0);
    }
    let fp = model_fingerprint(&lm.model).unwrap();
    let base = BaseModelId {
        id: "tiny".into(),
        fingerprint: fp,
    };
    let e = make_expert("e", vec!["swap".into()], weights, &c, &report, base.clone());
    let raw = flatten_expert(&e).unwrap();
    let delta = flatten_delta(&e).unwrap();
    assert_eq!(raw.len(), delta.len());
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    // The raw vector is dominated by the initialisation; the delta is not.
    assert!(
        norm(&delta) < 0.01 * norm(&raw),
        "{} vs {}",
        norm(&delta),
        norm(&raw)
    );
    // An expert without a recorded seed cannot be delta-embedded: one sentence.
    let mut bare = e.clone();
    bare.info = None;
    let err = flatten_delta(&bare).unwrap_err().to_string();
    assert!(
        err.contains("`e`") && err.contains("--embed weights"),
        "{err}"
    );
}
