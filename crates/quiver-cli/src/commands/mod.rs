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
pub mod serve;
mod train;

use std::process::ExitCode;

use anyhow::Result;
use quiver_core::LoadedModel;

use crate::args::{Cli, Command};
use crate::flags::{GlobalArgs, ModelArgs};

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
        Command::Serve(a) => serve::run(g, a),
    }
}

/// Loads `--model` with a spinner.
pub fn load_model(g: &GlobalArgs, m: &ModelArgs) -> Result<LoadedModel> {
    let device = m.device.device()?;
    let rows = quantized_rows(m)?;
    let sp = crate::progress::spinner(g, &format!("loading {}", m.model));
    let mut loaded = quiver_core::load(&m.model, &device, m.dtype.dtype());
    if let (Ok(lm), Some(q)) = (loaded.as_mut(), m.quantize.ggml()) {
        let n = lm.model.quantize(q)?;
        lm.model.set_quantized_max_rows(rows);
        let upto = if rows == usize::MAX {
            "every input".to_string()
        } else {
            format!("inputs of up to {rows} tokens")
        };
        tracing::info!("{n} linear layers quantized to {q:?}, used for {upto}");
    }
    sp.finish_and_clear();
    Ok(loaded?)
}

/// `--quantize-rows`, checked against `--quantize` and the CPU: more than
/// the default needs a quantized weight and 8-bit SIMD products (without
/// them the portable loops would be far slower than f32, so longer inputs
/// stay in f32, with a warning).
fn quantized_rows(m: &ModelArgs) -> Result<usize> {
    let default = quiver_core::lora::QUANTIZED_MAX_ROWS;
    if m.quantize_rows == default {
        return Ok(default);
    }
    if m.quantize.ggml().is_none() {
        anyhow::bail!(
            "--quantize-rows {} needs --quantize (q8_0 or q4_1): without it there are no quantized weights to use",
            rows_label(m.quantize_rows)
        );
    }
    let kernel = quiver_core::kernels::q8::DotKernel::detect();
    if m.quantize_rows > default && kernel == quiver_core::kernels::q8::DotKernel::Portable {
        tracing::warn!(
            "--quantize-rows {}: this CPU has no SIMD 8-bit dot products (AVX2, AVX-VNNI or AVX512-VNNI), so inputs longer than {default} tokens stay in f32",
            rows_label(m.quantize_rows)
        );
        return Ok(default);
    }
    if m.quantize_rows > default {
        tracing::info!("8-bit products for long inputs on {}", kernel.name());
    }
    Ok(m.quantize_rows)
}

fn rows_label(rows: usize) -> String {
    if rows == usize::MAX {
        "all".into()
    } else {
        rows.to_string()
    }
}
