//! Training-readiness: with a LoRA on every linear layer, gradients reach
//! every LoRA parameter of every layer, an optimiser step changes only the
//! LoRA parameters, and the loss falls.
//!
//! This guards against candle's fused ops without backward (rms_norm,
//! softmax_last_dim, rope), which would silently cut the graph.

use std::sync::Arc;

use candle_core::{Device, Tensor, Var};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use quiver_core::lora::Lora;
use quiver_core::models::weights::tiny_config;
use quiver_core::models::{Llama, WeightMap};

fn attach_loras(model: &mut Llama, rank: usize) -> Vec<(String, Var, Var)> {
    let mut out = Vec::new();
    for lin in model.linears_mut() {
        let (o, i) = (lin.out_features(), lin.in_features());
        // B starts non-zero here (PEFT starts it at zero) so that A's
        // gradient is non-zero on the first step too.
        let a = Var::randn(0f32, 0.1, (rank, i), &Device::Cpu).unwrap();
        let b = Var::randn(0f32, 0.1, (o, rank), &Device::Cpu).unwrap();
        let lora = Lora::new(a.as_tensor().clone(), b.as_tensor().clone(), 2.0).unwrap();
        lin.set_adapter(Some(Arc::new(lora)));
        out.push((lin.name().to_string(), a, b));
    }
    out
}

fn loss(model: &Llama, ids: &Tensor) -> Tensor {
    let (b, s) = ids.dims2().unwrap();
    let inputs = ids.narrow(1, 0, s - 1).unwrap();
    let targets = ids.narrow(1, 1, s - 1).unwrap().flatten_all().unwrap();
    let logits = model
        .forward(&inputs, None)
        .unwrap()
        .reshape((b * (s - 1), ()))
        .unwrap();
    let logp = quiver_core::ops::log_softmax_last_dim(&logits).unwrap();
    let picked = logp.gather(&targets.unsqueeze(1).unwrap(), 1).unwrap();
    picked.mean_all().unwrap().neg().unwrap()
}

fn snapshot(model: &Llama) -> Vec<(String, Vec<f32>)> {
    model
        .named_weights()
        .into_iter()
        .map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

#[test]
fn gradients_reach_every_lora_and_base_stays_frozen() {
    let cfg = tiny_config();
    let w = WeightMap::random(&cfg, 7, &Device::Cpu).unwrap();
    let mut model = Llama::new(&cfg, &w, &Device::Cpu).unwrap();
    let loras = attach_loras(&mut model, 4);
    assert_eq!(
        loras.len(),
        cfg.num_hidden_layers * 7 + 1,
        "every linear layer is wrapped"
    );
    let ids = Tensor::new(
        &[[1u32, 5, 9, 13, 2, 40, 33, 7], [3, 3, 8, 21, 60, 11, 0, 4]],
        &Device::Cpu,
    )
    .unwrap();
    let before = snapshot(&model);

    let l0 = loss(&model, &ids);
    let grads = l0.backward().unwrap();
    for (name, a, b) in &loras {
        for (which, v) in [("A", a), ("B", b)] {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name} lora_{which}"));
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                norm.is_finite() && norm > 0.0,
                "{name} lora_{which}: gradient norm {norm}"
            );
        }
    }

    let vars: Vec<Var> = loras
        .iter()
        .flat_map(|(_, a, b)| [a.clone(), b.clone()])
        .collect();
    let a_before = loras[0].1.as_tensor().to_vec2::<f32>().unwrap();
    let mut opt = AdamW::new(
        vars,
        ParamsAdamW {
            lr: 1e-2,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    opt.step(&grads).unwrap();
    assert_ne!(
        a_before,
        loras[0].1.as_tensor().to_vec2::<f32>().unwrap(),
        "LoRA A moved"
    );
    for _ in 0..30 {
        opt.backward_step(&loss(&model, &ids)).unwrap();
    }
    let after = snapshot(&model);
    assert_eq!(before.len(), after.len());
    for ((n, x), (_, y)) in before.iter().zip(after.iter()) {
        assert!(x == y, "base weight {n} changed");
    }
    let l1 = loss(&model, &ids).to_scalar::<f32>().unwrap();
    let l0 = l0.to_scalar::<f32>().unwrap();
    assert!(l1 < l0 * 0.8, "loss fell clearly: {l0} -> {l1}");
}
