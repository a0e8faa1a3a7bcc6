//! `--library`, `--route` and `--adapter`: which experts run on top of the
//! base model, shared by every command that runs a model.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use quiver_core::LoadedModel;

#[derive(Debug, Args, Clone)]
pub struct RouteArgs {
    /// Expert library directory (default: $QUIVER_LIBRARY).
    #[arg(long, env = "QUIVER_LIBRARY")]
    pub library: Option<PathBuf>,
    /// Routing: `base` (no adapter) or `expert:NAME` (one expert of --library).
    #[arg(long, default_value = "base")]
    pub route: String,
    /// A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors),
    /// e.g. one saved by Python PEFT, applied instead of --route.
    #[arg(long, conflicts_with = "route")]
    pub adapter: Option<PathBuf>,
}

/// Applies `--route` / `--adapter` to a loaded model.
pub fn apply_route(lm: &mut LoadedModel, r: &RouteArgs) -> Result<()> {
    use quiver_core::expert::{model_fingerprint, Expert};
    let device = lm.model.device().clone();
    let dtype = lm.model.dtype();
    if let Some(dir) = &r.adapter {
        let expert = Expert::load(dir, &device, dtype)?;
        expert.attach(&mut lm.model, None)?;
        return Ok(());
    }
    match r.route.as_str() {
        "base" => Ok(()),
        route => {
            let Some(name) = route.strip_prefix("expert:") else {
                bail!("--route `{route}`: expected `base` or `expert:NAME`");
            };
            let lib = r
                .library
                .as_ref()
                .context("--route expert:NAME needs --library (or $QUIVER_LIBRARY)")?;
            quiver_core::expert::validate_name(name)?;
            let dir = lib.join(name);
            if !dir.is_dir() {
                bail!("library {} has no expert `{name}`", lib.display());
            }
            let expert = Expert::load(&dir, &device, dtype)?;
            let fp = model_fingerprint(&lm.model)?;
            expert.attach(&mut lm.model, Some(&fp))?;
            Ok(())
        }
    }
}
