//! Helpers shared by the benchmark examples.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use quiver_core::expert::Expert;
use quiver_core::lora::LoraConfig;
use quiver_core::models::Llama;
use rand::Rng;

/// A random rank-4 expert on q/k/v/o (PEFT's default targets here), its A
/// and B entries uniform with standard deviation 0.02, as the PyTorch
/// peer's `make_random_experts` draws them.
pub fn random_expert(model: &Llama, name: String, rng: &mut rand::rngs::StdRng) -> Expert {
    let config = LoraConfig::default(); // rank 4, alpha 16, q/k/v/o
    let mut weights = BTreeMap::new();
    for lin in model.linears() {
        if lin.name() == "lm_head" || !config.target_modules.matches(lin.name()) {
            continue;
        }
        let mut m = |rows: usize, cols: usize, std: f32| {
            let v: Vec<f32> = (0..rows * cols)
                .map(|_| std * (rng.random::<f32>() * 2.0 - 1.0) * 1.732)
                .collect();
            Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
        };
        let a = m(4, lin.in_features(), 0.02);
        let b = m(lin.out_features(), 4, 0.02);
        weights.insert(lin.name().to_string(), (a, b));
    }
    Expert {
        name,
        config,
        weights,
        info: None,
    }
}
