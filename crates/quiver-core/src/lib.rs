//! Quiver's core library: a Llama-family runtime with LoRA injection
//! points, and (as it grows) the expert library, library transforms,
//! routing, training and evaluation of "Towards Modular LLMs by Building
//! and Reusing a Library of LoRAs" (Ostapenko et al., ICML 2024).

pub mod alloc;
pub mod assets;
pub mod batch;
pub mod data;
pub mod error;
pub mod eval;
pub mod expert;
pub mod fsutil;
pub mod generate;
pub mod hash;
pub mod kernels;
pub mod library;
pub mod lora;
pub mod model;
pub mod models;
pub mod ops;
pub mod routing;
pub mod score;
pub mod threads;
pub mod tokenizer;
pub mod train;
pub mod transform;

pub use error::{Error, Result};
pub use model::{load, LoadedModel, ModelSource};

/// Helpers shared by the unit tests.
#[cfg(test)]
pub(crate) mod testutil {
    use candle_core::Tensor;

    /// The largest absolute difference between two tensors of one shape.
    pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
            .expect("tensors of one shape")
    }

    /// `n` deterministic values in [-0.5, 0.5) from `seed` (an LCG).
    pub fn uniform_values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }
}
