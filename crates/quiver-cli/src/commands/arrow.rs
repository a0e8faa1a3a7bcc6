//! `quiver arrow`: compute and cache a library's routing prototypes
//! (METHOD.md section 2): Arrow prototypes from the experts' weights alone
//! (top right singular vectors of B A), or the mu / Phatgoose prototypes,
//! which need the base model and each expert's training data. They are
//! stored under `LIB/.aux/<kind>-<config hash>/`, where `--route` finds them.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use quiver_core::routing::{self, ExampleSource, LibraryDir, RouteOptions, SelectorKind};

use crate::args::{GlobalArgs, ModelArgs};

#[derive(Debug, Args)]
pub struct ArrowArgs {
    /// Expert library directory (default: $QUIVER_LIBRARY).
    #[arg(long, env = "QUIVER_LIBRARY")]
    pub library: std::path::PathBuf,
    /// Which prototypes: `arrow` (from the weights alone), `mu` (mean hidden
    /// states) or `phatgoose` (trained gates); the last two run --model on
    /// each expert's own training data (--source).
    #[arg(long, default_value = "arrow")]
    pub kind: String,
    /// GenKnowSub: comma-separated general experts subtracted from the others
    /// first (use the same list with `--route ... --gks`).
    #[arg(long, value_delimiter = ',')]
    pub gks: Vec<String>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Data of the experts' tasks for mu / phatgoose: `bigbench`, `olmo` or a JSONL path.
    #[arg(long, default_value = "bigbench")]
    pub source: String,
    /// Seed of the train/validation/test split of that data.
    #[arg(long, default_value_t = 0)]
    pub split_seed: u64,
}

pub fn run(g: &GlobalArgs, a: ArrowArgs) -> Result<ExitCode> {
    let kind = match a.kind.as_str() {
        "arrow" => SelectorKind::Arrow,
        "mu" => SelectorKind::Mu,
        "phatgoose" => SelectorKind::Phatgoose,
        k => bail!("--kind `{k}`: expected arrow, mu or phatgoose"),
    };
    let start = Instant::now();
    let device = super::parse_device(&a.model.device)?;
    let dtype = super::parse_dtype(&a.model.dtype)?;
    let (lib, n_experts, stats) = if kind == SelectorKind::Arrow {
        let lib = LibraryDir::open(&a.library, &device, dtype)?;
        let experts = routing::gen_know_sub(&lib.experts, &a.gks)?;
        routing::check_compatible(&experts)?;
        let (_, stats) = routing::arrow_prototypes_cached(&lib, &experts, &a.gks)?;
        (lib, experts.len(), stats)
    } else {
        let mut lm = super::load_model(g, &a.model)?;
        let lib = LibraryDir::open(&a.library, &device, dtype)?;
        let fp = quiver_core::expert::model_fingerprint(&lm.model)?;
        lib.check_fits(&lm.model, Some(&fp))?;
        let experts = routing::gen_know_sub(&lib.experts, &a.gks)?;
        routing::check_compatible(&experts)?;
        let get = super::route::examples_for(&a.source, a.split_seed);
        let src = ExampleSource {
            id: super::route::example_source_id(&a.source, a.split_seed),
            examples: Some(&get),
        };
        let sp = crate::progress::spinner(
            g,
            &format!(
                "computing {} prototypes for {} experts",
                a.kind,
                experts.len()
            ),
        );
        let opts = RouteOptions {
            gks: a.gks.clone(),
            ..RouteOptions::default()
        };
        let res = routing::learned_prototypes_cached(
            &lib,
            &experts,
            kind,
            &mut lm.model,
            &lm.tokenizer,
            &src,
            &opts,
        );
        sp.finish_and_clear();
        let (_, stats) = res?;
        (lib, experts.len(), stats)
    };
    let v = serde_json::json!({
        "kind": a.kind,
        "library": lib.root(),
        "experts": n_experts,
        "modules": lib.experts[0].weights.len(),
        "cache": stats.cache_dir,
        "computed": stats.computed,
        "cached": stats.cached,
        "seconds": start.elapsed().as_secs_f64(),
    });
    println!("{v}");
    Ok(ExitCode::SUCCESS)
}
