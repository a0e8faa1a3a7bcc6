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
    let sp = crate::progress::spinner(g, &format!("loading {}", m.model));
    let mut loaded = quiver_core::load(&m.model, &device, m.dtype.dtype());
    if let (Ok(lm), Some(q)) = (loaded.as_mut(), m.quantize.ggml()) {
        let n = lm.model.quantize(q)?;
        tracing::info!("{n} linear layers quantized to {q:?} for decoding");
    }
    sp.finish_and_clear();
    Ok(loaded?)
}
