//! Flags shared by every command (`-v`, `-q`, `--model`, `--device`,
//! `--dtype`, `--quantize`) and their typed values. Nothing here imports
//! the commands, so commands and the command tree ([`crate::args`]) both
//! depend on this module without a loop.

use clap::Args;

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// More log output (-v: debug, -vv: trace). Logs go to stderr.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Print only results and errors: no progress bars, no logs.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Hide progress bars but keep logs.
    #[arg(long, global = true)]
    pub no_progress: bool,
}

/// Where a model runs.
#[derive(Debug, Args, Clone)]
pub struct ModelArgs {
    /// Model: a built-in name (smollm2-135m, after `quiver fetch`), a Hugging Face
    /// directory (config.json + model.safetensors + tokenizer.json) or a GGUF file.
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    /// Device to run on: `cpu`, `cuda` or `cuda:N` (CUDA needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu", value_parser = parse_device_arg)]
    pub device: DeviceArg,
    /// Compute dtype: f32, bf16 or f16. Weights are converted on load.
    #[arg(long, value_enum, default_value_t = DTypeArg::F32)]
    pub dtype: DTypeArg,
    /// `q8_0`: also keep every linear weight quantized to 8 bits (blocks of 32) and use it
    /// on the CPU for inputs of at most 16 tokens (token-by-token decoding, short prompts),
    /// where reading weights from memory is the cost (about 2x faster generation; numbers
    /// differ slightly from f32). `q4_1`: the same with 4 bits per weight, as SmolLM2's
    /// GGUF file stores them (about 4x faster; coarser on models that were not 4-bit
    /// already). Longer inputs (batched scoring) and training keep the full-precision
    /// weights unless --quantize-rows says otherwise. `none` (default) is exact.
    #[arg(long, value_enum, default_value_t = QuantizeArg::None)]
    pub quantize: QuantizeArg,
    /// With --quantize: inputs of up to this many tokens use the quantized weights.
    /// `16` (default) is decoding and short prompts; `all` (or a larger number) also
    /// batched scoring and prefill, where q8_0 multiplies 8-bit weights by 8-bit
    /// activations on the widest instructions the CPU has (AVX512-VNNI or AVX-VNNI,
    /// else AVX2), detected at run time. Scores then differ slightly from f32 (well
    /// inside the paired noise of an evaluation; bench/README). A CPU without those
    /// instructions keeps longer inputs in f32 and says so. Training always runs in f32.
    #[arg(long, value_parser = parse_rows_arg, default_value = "16", value_name = "N|all")]
    pub quantize_rows: usize,
}

/// Parses `--quantize-rows`: a positive number or `all`.
pub fn parse_rows_arg(s: &str) -> Result<usize, String> {
    match s {
        "all" => Ok(usize::MAX),
        _ => match s.parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!(
                "`{s}` is not a row count: expected a positive number or `all`"
            )),
        },
    }
}

/// `--device`: where a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceArg {
    Cpu,
    Cuda(usize),
}

impl DeviceArg {
    /// The candle device (an error when CUDA is not available).
    pub fn device(&self) -> anyhow::Result<candle_core::Device> {
        match *self {
            DeviceArg::Cpu => Ok(candle_core::Device::Cpu),
            DeviceArg::Cuda(n) => candle_core::Device::new_cuda(n).map_err(|_| {
                anyhow::anyhow!("--device cuda:{n}: CUDA is not available (build with `--features cuda` on a machine with a GPU)")
            }),
        }
    }
}

/// Parses `--device`.
pub fn parse_device_arg(s: &str) -> Result<DeviceArg, String> {
    let bad = || format!("`{s}` is not a device: expected cpu, cuda or cuda:N");
    match s {
        "cpu" => Ok(DeviceArg::Cpu),
        "cuda" => Ok(DeviceArg::Cuda(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(DeviceArg::Cuda)
            .ok_or_else(bad),
    }
}

/// `--dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DTypeArg {
    F32,
    Bf16,
    F16,
}

impl DTypeArg {
    pub fn dtype(&self) -> candle_core::DType {
        match self {
            DTypeArg::F32 => candle_core::DType::F32,
            DTypeArg::Bf16 => candle_core::DType::BF16,
            DTypeArg::F16 => candle_core::DType::F16,
        }
    }
}

/// `--quantize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QuantizeArg {
    None,
    #[value(name = "q8_0", alias = "q8")]
    Q8_0,
    #[value(name = "q4_1", alias = "q4")]
    Q4_1,
}

impl QuantizeArg {
    pub fn ggml(&self) -> Option<candle_core::quantized::GgmlDType> {
        match self {
            QuantizeArg::None => None,
            QuantizeArg::Q8_0 => Some(candle_core::quantized::GgmlDType::Q8_0),
            QuantizeArg::Q4_1 => Some(candle_core::quantized::GgmlDType::Q4_1),
        }
    }
}
