//! The one door from (model, library, route) to a routed model: a typed
//! [`RouteSpec`], parsed once wherever a route comes from (flags, an
//! experiment's TOML, a server request), and [`install_route`], which loads
//! the library's experts (each checked against its manifest), checks they
//! fit the model and were made for it, applies GenKnowSub, finds or
//! computes the prototypes in the library's auxiliary store and puts the
//! route on the model.

use std::path::Path;
use std::sync::Arc;

use super::{
    arrow_prototypes_cached, check_compatible, expert_examples, gen_know_sub, install,
    learned_prototypes_cached, router, ExampleSource, Installed, PrototypeStats, Prototypes, Route,
    RouteObserver, RouteOptions, SelectorKind,
};
use crate::data::{DataSource, Example, DEFAULT_CAP};
use crate::error::{Error, Result};
use crate::expert::{model_fingerprint, Expert};
use crate::library::ExpertLibrary;
use crate::model::LoadedModel;

/// Where the mu and PHATGOOSE prototypes of a library's experts are
/// computed from when the library does not have them yet: each expert's
/// own tasks (from its `quiver_expert.json`) in `source` (`bigbench`,
/// `olmo` or a JSONL path), split with `split_seed`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteData {
    pub source: String,
    pub split_seed: u64,
}

impl Default for RouteData {
    fn default() -> Self {
        Self {
            source: "olmo+evals".into(),
            split_seed: 0,
        }
    }
}

impl RouteData {
    /// How the prototypes' cache key names the data.
    pub fn id(&self) -> String {
        let spec = match Path::new(&self.source).canonicalize() {
            Ok(p) if !crate::data::is_asset_spec(&self.source) => p.display().to_string(),
            _ => self.source.clone(),
        };
        format!("{spec} split_seed={} cap={DEFAULT_CAP}", self.split_seed)
    }

    /// An expert's own training examples.
    pub fn examples(&self, expert: &Expert) -> Result<Vec<Example>> {
        let src = DataSource::from_spec(&self.source, &crate::assets::quiver_home())?;
        expert_examples(&src, expert, self.split_seed, DEFAULT_CAP)
    }
}

/// How to reuse a library on a model: the route and its settings.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RouteSpec {
    pub route: Route,
    /// Top-k, router temperature, mix, GenKnowSub experts, TIES density.
    pub options: RouteOptions,
    /// The data of learned prototypes (mu, PHATGOOSE).
    pub data: RouteData,
    /// Use experts whose recorded base model differs from the model's.
    pub allow_base_mismatch: bool,
}

impl RouteSpec {
    /// A route with its method's defaults.
    pub fn new(route: Route) -> Self {
        Self {
            route,
            ..Self::default()
        }
    }

    /// Checks the settings that do not depend on the library.
    pub fn validate(&self) -> Result<()> {
        if let Some(t) = self.options.temperature {
            router::check_temperature(t)?;
        }
        if self.options.top_k == Some(0) {
            router::check_top_k(0, 1)?;
        }
        if !(0.0..=1.0).contains(&self.options.ties_density) || self.options.ties_density == 0.0 {
            return Err(Error::invalid(format!(
                "the TIES density must be in (0, 1], got {}",
                self.options.ties_density
            )));
        }
        Ok(())
    }
}

/// Checks that `experts` were made for `lm`'s base model (Quiver's
/// fingerprint, or a PEFT adapter's `base_model_name_or_path`), unless
/// `allow_mismatch`: the check every door to a model shares.
pub fn check_made_for(lm: &LoadedModel, experts: &[Expert], allow_mismatch: bool) -> Result<()> {
    if allow_mismatch || experts.is_empty() {
        return Ok(());
    }
    let fingerprint = model_fingerprint(&lm.model)?;
    experts
        .iter()
        .try_for_each(|e| e.check_base(&fingerprint, &lm.names))
}

/// What [`install_route`] put on the model.
#[derive(Debug, Clone)]
pub struct RouteSession {
    pub installed: Installed,
    /// The experts the route runs over (after GenKnowSub), in library order.
    pub experts: Vec<String>,
    /// Where the prototypes came from (per-token routes).
    pub prototypes: Option<PrototypeStats>,
}

/// Installs `spec` on the model from `library` (see the module's
/// documentation). `observer` sees every per-token routing decision.
pub fn install_route(
    lm: &mut LoadedModel,
    library: Option<&ExpertLibrary>,
    spec: &RouteSpec,
    observer: Option<Arc<dyn RouteObserver>>,
) -> Result<RouteSession> {
    spec.validate()?;
    let route = &spec.route;
    if observer.is_some() && route.selector_kind().is_none() {
        return Err(Error::invalid(format!(
            "route `{route}` is the same for every token, so it has no per-token routing decisions to observe (use arrow, mu or phatgoose)"
        )));
    }
    if *route == Route::Base {
        let installed = install(&mut lm.model, &[], route, None, &spec.options, None)?;
        return Ok(RouteSession {
            installed,
            experts: Vec::new(),
            prototypes: None,
        });
    }
    let lib = library.ok_or_else(|| {
        Error::invalid(format!(
            "route `{route}` needs a library (--library or $QUIVER_LIBRARY)"
        ))
    })?;
    let device = lm.model.device().clone();
    let dtype = lm.model.dtype();
    // Shapes and compatibility are `install`'s checks; the base model is
    // this door's.
    // One expert: load only it, so the rest of the library does not matter.
    if let Route::Expert(name) = route {
        let e = lib.load_expert(name, &device, dtype)?;
        check_made_for(lm, std::slice::from_ref(&e), spec.allow_base_mismatch)?;
        let installed = install(&mut lm.model, &[e], route, None, &spec.options, None)?;
        return Ok(RouteSession {
            installed,
            experts: vec![name.clone()],
            prototypes: None,
        });
    }
    let all = lib.load_experts(&device, dtype)?;
    check_made_for(lm, &all, spec.allow_base_mismatch)?;
    if let Route::Oracle(_) = route {
        let installed = install(&mut lm.model, &all, route, None, &spec.options, None)?;
        return Ok(RouteSession {
            installed,
            experts: all.iter().map(|e| e.name.clone()).collect(),
            prototypes: None,
        });
    }
    let experts = gen_know_sub(&all, &spec.options.gks)?;
    if let Some(k) = spec.options.top_k {
        router::check_top_k(k, experts.len())?;
    }
    let (protos, stats) = match route.selector_kind() {
        None => (None, None),
        Some(kind) => {
            let (p, s) = prototypes(lm, lib, &experts, kind, spec)?;
            (Some(p), Some(s))
        }
    };
    let installed = install(
        &mut lm.model,
        &experts,
        route,
        protos.as_ref(),
        &spec.options,
        observer,
    )?;
    Ok(RouteSession {
        installed,
        experts: experts.iter().map(|e| e.name.clone()).collect(),
        prototypes: stats,
    })
}

/// The prototypes of `experts` (the library's, after GenKnowSub with
/// `spec`'s experts) for a per-token route of `kind`, from the library's
/// auxiliary store or computed and stored there: Arrow's from the weights
/// alone, mu's and PHATGOOSE's by running the model on each expert's data
/// (`spec.data`).
pub fn prototypes(
    lm: &mut LoadedModel,
    lib: &ExpertLibrary,
    experts: &[Expert],
    kind: SelectorKind,
    spec: &RouteSpec,
) -> Result<(Prototypes, PrototypeStats)> {
    check_compatible(experts)?;
    if kind == SelectorKind::Arrow {
        return arrow_prototypes_cached(lib, experts, &spec.options.gks);
    }
    let get = |e: &Expert| spec.data.examples(e);
    let src = ExampleSource {
        id: spec.data.id(),
        examples: Some(&get),
    };
    learned_prototypes_cached(
        lib,
        experts,
        kind,
        &mut lm.model,
        &lm.tokenizer,
        &src,
        &spec.options,
    )
}
