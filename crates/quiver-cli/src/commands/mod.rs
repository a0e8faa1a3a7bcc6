//! One module per subcommand.

pub mod arrow;
pub mod cluster;
mod convert;
pub mod data;
pub mod eval;
pub mod experiment;
mod fetch;
mod generate;
pub mod library;
pub mod route;
mod score;
mod train;

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use quiver_core::LoadedModel;

use crate::args::{Cli, Command, GlobalArgs, ModelArgs};

pub fn run(cli: Cli) -> Result<ExitCode> {
    let g = &cli.global;
    match cli.command {
        Command::Fetch(a) => fetch::run(g, a),
        Command::Generate(a) => generate::run(g, a),
        Command::Score(a) => score::run(g, a),
        Command::Convert(a) => convert::run(g, a),
        Command::Train(a) => train::run(g, a),
        Command::Data(a) => data::run(g, a),
        Command::Library(a) => library::run(g, a),
        Command::Cluster(a) => cluster::run(g, a),
        Command::Arrow(a) => arrow::run(g, a),
        Command::Eval(a) => eval::run(g, a),
        Command::Experiment(a) => experiment::run_experiment(g, a),
        Command::Demo(a) => experiment::run_demo(g, a),
    }
}

pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        _ => {
            let ordinal = match s.strip_prefix("cuda") {
                Some("") => 0,
                Some(rest) => rest
                    .strip_prefix(':')
                    .and_then(|n| n.parse().ok())
                    .with_context(|| format!("--device `{s}`: expected cpu, cuda or cuda:N"))?,
                None => bail!("--device `{s}`: expected cpu, cuda or cuda:N"),
            };
            Device::new_cuda(ordinal).with_context(|| {
                format!("--device {s}: CUDA is not available (build with `--features cuda` on a machine with a GPU)")
            })
        }
    }
}

pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        _ => bail!("--dtype `{s}`: expected f32, bf16 or f16"),
    }
}

/// Loads `--model` with a spinner.
pub fn load_model(g: &GlobalArgs, m: &ModelArgs) -> Result<LoadedModel> {
    let device = parse_device(&m.device)?;
    let dtype = parse_dtype(&m.dtype)?;
    let sp = crate::progress::spinner(g, &format!("loading {}", m.model));
    let quantize = match m.quantize.as_str() {
        "none" => None,
        "q8_0" | "q8" => Some(candle_core::quantized::GgmlDType::Q8_0),
        "q4_1" | "q4" => Some(candle_core::quantized::GgmlDType::Q4_1),
        other => bail!("--quantize `{other}`: expected none, q8_0 or q4_1"),
    };
    let mut loaded = quiver_core::load(&m.model, &device, dtype);
    if let (Ok(lm), Some(q)) = (loaded.as_mut(), quantize) {
        let n = lm.model.quantize(q)?;
        tracing::info!("{n} linear layers quantized to {q:?} for decoding");
    }
    sp.finish_and_clear();
    Ok(loaded?)
}
