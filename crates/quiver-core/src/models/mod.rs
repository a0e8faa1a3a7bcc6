//! Model runtime: configs, weights, and the Llama-family decoder, loaded
//! from a Hugging Face directory or a GGUF file.

pub mod config;
pub mod gguf;
pub mod llama;
pub mod weights;

pub use config::LlamaConfig;
pub use llama::{KvCache, Llama, PackedSeq};
pub use weights::WeightMap;
