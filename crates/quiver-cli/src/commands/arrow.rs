//! `quiver arrow`: compute and cache a library's routing prototypes
//! (METHOD.md section 2): Arrow prototypes from the experts' weights alone
//! (top right singular vectors of B A), or the mu / Phatgoose prototypes,
//! which need the base model and each expert's training data. They are
//! stored under `LIB/.aux/<kind>-<config hash>/`, where `--route` finds them.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use quiver_core::library::ExpertLibrary;
use quiver_core::routing::{self, RouteData, RouteOptions, RouteSpec, SelectorKind};

use crate::flags::{GlobalArgs, ModelArgs};

#[derive(Debug, Args)]
pub struct ArrowArgs {
    /// Expert library: a directory or `s3://bucket/prefix` (default: $QUIVER_LIBRARY).
    #[arg(long, env = "QUIVER_LIBRARY", value_name = "DIR|s3://BUCKET/PREFIX")]
    pub library: String,
    /// Which prototypes: `arrow` (from the weights alone), `mu` (mean hidden
    /// states) or `phatgoose` (trained gates); the last two run --model on
    /// each expert's own training data (--source).
    #[arg(long, value_enum, default_value_t = KindArg::Arrow)]
    pub kind: KindArg,
    /// GenKnowSub: comma-separated general experts subtracted from the others
    /// first (use the same list with `--route ... --gks`).
    #[arg(long, value_delimiter = ',')]
    pub gks: Vec<String>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Data of the experts' tasks for mu / phatgoose: `olmo+evals`, `olmo`, `evals`,
    /// `bigbench:DIR` or a JSONL path.
    #[arg(long, default_value = "olmo+evals")]
    pub source: String,
    /// Seed of the train/validation/test split of that data.
    #[arg(long, default_value_t = 0)]
    pub split_seed: u64,
    /// Use experts made for another base model than --model (mu / phatgoose).
    #[arg(long)]
    pub allow_base_mismatch: bool,
}

/// `--kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KindArg {
    Arrow,
    Mu,
    Phatgoose,
}

pub fn run(g: &GlobalArgs, a: ArrowArgs) -> Result<ExitCode> {
    let kind = match a.kind {
        KindArg::Arrow => SelectorKind::Arrow,
        KindArg::Mu => SelectorKind::Mu,
        KindArg::Phatgoose => SelectorKind::Phatgoose,
    };
    let start = Instant::now();
    let lib = ExpertLibrary::open(&a.library)?;
    let spec = RouteSpec {
        options: RouteOptions {
            gks: a.gks.clone(),
            ..RouteOptions::default()
        },
        data: RouteData {
            source: a.source.clone(),
            split_seed: a.split_seed,
        },
        allow_base_mismatch: a.allow_base_mismatch,
        ..RouteSpec::default()
    };
    let (n_experts, n_modules, stats) = if kind == SelectorKind::Arrow {
        // Arrow needs no model: its prototypes come from the weights alone.
        let device = a.model.device.device()?;
        let all = lib.load_experts(&device, a.model.dtype.dtype())?;
        routing::check_compatible(&all)?;
        let experts = routing::gen_know_sub(&all, &a.gks)?;
        let (_, stats) = routing::arrow_prototypes_cached(&lib, &experts, &a.gks)?;
        (experts.len(), all[0].weights.len(), stats)
    } else {
        let mut lm = super::load_model(g, &a.model)?;
        let all = lib.load_experts(lm.model.device(), lm.model.dtype())?;
        routing::session::check_made_for(&lm, &all, a.allow_base_mismatch)?;
        for e in &all {
            e.check_fits(&lm.model, None)?;
        }
        let experts = routing::gen_know_sub(&all, &a.gks)?;
        let sp = crate::progress::spinner(
            g,
            &format!(
                "computing {kind:?} prototypes for {} experts",
                experts.len()
            ),
        );
        let res = routing::session::prototypes(&mut lm, &lib, &experts, kind, &spec);
        sp.finish_and_clear();
        let (_, stats) = res?;
        (experts.len(), all[0].weights.len(), stats)
    };
    if n_experts == 0 {
        bail!("library {} has no experts left after GenKnowSub", lib.uri());
    }
    let v = serde_json::json!({
        "kind": format!("{kind:?}").to_lowercase(),
        "library": lib.uri(),
        "experts": n_experts,
        "modules": n_modules,
        "cache": stats.cache_dir,
        "computed": stats.computed,
        "cached": stats.cached,
        "seconds": start.elapsed().as_secs_f64(),
    });
    println!("{v}");
    Ok(ExitCode::SUCCESS)
}
