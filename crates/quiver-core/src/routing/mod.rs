//! Zero-shot reuse of a library of LoRA experts (METHOD.md section 2):
//! Arrow routing, the mu and Phatgoose routers, uniform and TIES merges,
//! the oracle, and GenKnowSub, all plugged into the model through
//! [`crate::lora::LinearAdapter`] on each LoRA-wrapped layer.
//!
//! * [`prototypes`]: Arrow prototypes from the thin factors (QR / Cholesky-QR
//!   plus an `r x r` SVD).
//! * [`router`]: the per-token routed layer ([`RoutedLora`]) with a
//!   reference, a grouped and a fast path, and the expert-usage counter.
//! * [`merge`]: uniform (factors or updates), TIES, GenKnowSub.
//! * [`mu`], [`phatgoose`]: prototypes learned from the experts' data.
//! * [`session`]: the typed [`RouteSpec`] and the one call that installs
//!   a route on a model from an [`ExpertLibrary`] (local or S3, every
//!   expert checked on load).
//!
//! Prototypes are cached in the library's auxiliary store
//! ([`ExpertLibrary::get_vectors`]), keyed by a hash of the transform's
//! configuration and each expert's weights digest.

pub mod merge;
pub mod mu;
pub mod phatgoose;
pub mod prototypes;
pub mod router;
pub mod session;
pub mod tally;

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{DType, Device};

use crate::library::ExpertLibrary;

use crate::data::{split_examples, DataSource, Example, Split};
use crate::error::{Error, Result};
pub use crate::expert::check_compatible;
use crate::expert::{detach_all, Expert};
use crate::models::Llama;
use crate::tokenizer::Tokenizer;

pub use merge::{gen_know_sub, ties_merge, uniform_factors, uniform_updates, DenseDelta};
pub use mu::{mu_prototypes, MuConfig};
pub use phatgoose::{phatgoose_prototypes, PhatgooseConfig};
pub use prototypes::{arrow_prototypes, top_right_singular, Prototypes, SvdMethod, TopSingular};
pub use router::{
    MixMode, RouteDecision, RouteObserver, RoutePath, RoutedLora, Selection, Selector,
    SelectorKind, Usage, UsageReport,
};
pub use session::{install_route, RouteData, RouteSpec};
pub use tally::{Fanout, RoutingSummary, RoutingTally};

/// A way to reuse the library on a new input (`--route`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Route {
    /// The base model alone.
    #[default]
    Base,
    /// One expert, by name.
    Expert(String),
    /// The expert trained on the given task (an upper bound for held-in tasks).
    Oracle(String),
    /// Mean of the `A`s and of the `B`s (mttl).
    Uniform,
    /// Mean of the updates `s B A`.
    UniformDw,
    /// TIES merge of the updates.
    Ties,
    /// Per-token Arrow routing.
    Arrow,
    /// Per-token routing on mean hidden states.
    Mu,
    /// Per-token routing on trained sigmoid gates.
    Phatgoose,
}

impl std::str::FromStr for Route {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = |what: &str| {
            Err(Error::InvalidArgument(format!(
                "route `{s}`: {what}; expected base, expert:NAME, oracle:TASK, uniform, uniform-dw, ties, arrow, mu or phatgoose"
            )))
        };
        if let Some(name) = s.strip_prefix("expert:") {
            if name.is_empty() {
                return bad("the expert name is empty");
            }
            return Ok(Route::Expert(name.to_string()));
        }
        if let Some(task) = s.strip_prefix("oracle:") {
            if task.is_empty() {
                return bad("the task name is empty");
            }
            return Ok(Route::Oracle(task.to_string()));
        }
        Ok(match s {
            "base" => Route::Base,
            "uniform" => Route::Uniform,
            "uniform-dw" => Route::UniformDw,
            "ties" => Route::Ties,
            "arrow" => Route::Arrow,
            "mu" => Route::Mu,
            "phatgoose" => Route::Phatgoose,
            "expert" => return bad("name the expert"),
            "oracle" => return bad("name the input's task"),
            _ => return bad("unknown route"),
        })
    }
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Route::Base => write!(f, "base"),
            Route::Expert(n) => write!(f, "expert:{n}"),
            Route::Oracle(t) => write!(f, "oracle:{t}"),
            Route::Uniform => write!(f, "uniform"),
            Route::UniformDw => write!(f, "uniform-dw"),
            Route::Ties => write!(f, "ties"),
            Route::Arrow => write!(f, "arrow"),
            Route::Mu => write!(f, "mu"),
            Route::Phatgoose => write!(f, "phatgoose"),
        }
    }
}

impl Route {
    /// The per-token selector of a routed strategy.
    pub fn selector_kind(&self) -> Option<SelectorKind> {
        match self {
            Route::Arrow => Some(SelectorKind::Arrow),
            Route::Mu => Some(SelectorKind::Mu),
            Route::Phatgoose => Some(SelectorKind::Phatgoose),
            _ => None,
        }
    }
}

/// Router settings; `None` means the method's own default.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteOptions {
    /// Experts kept per token: Arrow 4 (the paper), Phatgoose 2, mu all.
    pub top_k: Option<usize>,
    /// Logit temperature: Arrow 1, mu and Phatgoose `sqrt(in)`.
    pub temperature: Option<f64>,
    pub mix: MixMode,
    pub path: RoutePath,
    /// GenKnowSub: general experts whose mean is subtracted from the others.
    pub gks: Vec<String>,
    /// Fraction of entries TIES keeps per expert.
    pub ties_density: f64,
}

impl Default for RouteOptions {
    fn default() -> Self {
        Self {
            top_k: None,
            temperature: None,
            mix: MixMode::Output,
            path: RoutePath::Fast,
            gks: Vec::new(),
            ties_density: 0.2,
        }
    }
}

impl RouteOptions {
    fn top_k_for(&self, kind: SelectorKind, n_experts: usize) -> Result<usize> {
        let k = match (self.top_k, kind) {
            (Some(k), _) => k,
            (None, SelectorKind::Arrow) => 4.min(n_experts),
            (None, SelectorKind::Phatgoose) => 2.min(n_experts),
            (None, SelectorKind::Mu) => n_experts,
        };
        router::check_top_k(k, n_experts)?;
        Ok(k)
    }

    fn temperature_for(&self, kind: SelectorKind, in_features: usize) -> Result<f64> {
        let t = match (self.temperature, kind) {
            (Some(t), _) => t,
            (None, SelectorKind::Arrow) => 1.0,
            (None, _) => (in_features as f64).sqrt(),
        };
        router::check_temperature(t)?;
        Ok(t)
    }
}

/// The oracle's expert for an input of `task`: the expert whose
/// `quiver_expert.json` lists the task (a single-task expert wins over a
/// multi-task one; ties go to the first by name).
pub fn oracle_expert<'a>(experts: &'a [Expert], task: &str) -> Result<&'a Expert> {
    experts
        .iter()
        .filter(|e| {
            e.info
                .as_ref()
                .is_some_and(|i| i.tasks.iter().any(|t| t == task))
        })
        .min_by_key(|e| e.info.as_ref().map(|i| i.tasks.len()).unwrap_or(usize::MAX))
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "oracle: no expert of the library was trained on task `{task}` (no quiver_expert.json lists it)"
            ))
        })
}

/// The training examples of an expert's own tasks (from its
/// `quiver_expert.json`): the union of their train splits.
pub fn expert_examples(
    source: &DataSource,
    expert: &Expert,
    split_seed: u64,
    cap: usize,
) -> Result<Vec<Example>> {
    let tasks = expert
        .info
        .as_ref()
        .map(|i| i.tasks.clone())
        .unwrap_or_default();
    if tasks.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "expert `{}` has no quiver_expert.json listing its tasks, so its training data is unknown",
            expert.name
        )));
    }
    let mut out = Vec::new();
    for t in &tasks {
        let all = source.load_task(t)?;
        out.extend(split_examples(&all, t, split_seed, cap, Split::Train));
    }
    Ok(out)
}

/// How many experts' prototypes came from the cache and how many were computed.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PrototypeStats {
    /// Where the library keeps them (`LIB/.aux/<kind>-<hash>/`).
    pub cache_dir: String,
    pub cached: usize,
    pub computed: usize,
}

/// GenKnowSub changes every other expert, so its experts' weights are part
/// of any derived cache's key.
fn gks_key(lib: &ExpertLibrary, gks: &[String]) -> Result<serde_json::Value> {
    let mut v = Vec::new();
    for name in gks {
        v.push(serde_json::json!([name, lib.weights_digest(name)?]));
    }
    Ok(serde_json::Value::Array(v))
}

fn cached_prototypes(
    lib: &ExpertLibrary,
    experts: &[Expert],
    kind: &str,
    config: serde_json::Value,
    mut compute: impl FnMut(&Expert) -> Result<BTreeMap<String, Vec<f32>>>,
) -> Result<(Prototypes, PrototypeStats)> {
    let (mut cached, mut computed) = (0, 0);
    let mut rows = Vec::with_capacity(experts.len());
    for e in experts {
        let digest = lib.weights_digest(&e.name)?;
        let complete = |v: &BTreeMap<String, Vec<f32>>| {
            e.weights.keys().all(|m| v.contains_key(m)) && v.len() == e.weights.len()
        };
        match lib
            .get_vectors(kind, &config, &e.name, &digest)?
            .filter(complete)
        {
            Some(v) => {
                cached += 1;
                rows.push(v);
            }
            None => {
                let v = compute(e)?;
                lib.put_vectors(kind, &config, &e.name, &digest, &v)?;
                computed += 1;
                rows.push(v);
            }
        }
    }
    let protos = Prototypes::from_rows(experts.iter().map(|e| e.name.clone()).collect(), &rows)?;
    Ok((
        protos,
        PrototypeStats {
            cache_dir: lib.aux_location(kind, &config)?,
            cached,
            computed,
        },
    ))
}

/// Arrow prototypes of `experts` (the library's experts after GenKnowSub
/// with `gks`), from `LIB/.aux/arrow-<hash>/` or computed and stored there.
pub fn arrow_prototypes_cached(
    lib: &ExpertLibrary,
    experts: &[Expert],
    gks: &[String],
) -> Result<(Prototypes, PrototypeStats)> {
    let method = SvdMethod::CholeskyQr;
    let config = serde_json::json!({
        "transform": "arrow", "version": 1, "method": method, "gks": gks_key(lib, gks)?,
    });
    cached_prototypes(lib, experts, "arrow", config, |e| {
        prototypes::expert_arrow_prototypes(e, method)
    })
}

/// An expert's training examples.
pub type ExamplesFn<'a> = &'a dyn Fn(&Expert) -> Result<Vec<Example>>;

/// Where mu and Phatgoose find their examples.
pub struct ExampleSource<'a> {
    /// Identifies the data in the cache key (e.g. `bigbench split_seed=0`).
    pub id: String,
    /// An expert's training examples; `None` only looks the cache up.
    pub examples: Option<ExamplesFn<'a>>,
}

/// Mu or Phatgoose prototypes from the cache, computing missing experts'
/// from `data` (the model then has no adapters). Without examples, a
/// missing entry is an error that names the command that computes it.
pub fn learned_prototypes_cached(
    lib: &ExpertLibrary,
    experts: &[Expert],
    kind: SelectorKind,
    model: &mut Llama,
    tok: &Tokenizer,
    data: &ExampleSource<'_>,
    opts: &RouteOptions,
) -> Result<(Prototypes, PrototypeStats)> {
    let fp = crate::expert::model_fingerprint(model)?;
    let (name, cfg) = match kind {
        SelectorKind::Mu => (
            "mu",
            serde_json::to_value(MuConfig::default()).expect("json"),
        ),
        SelectorKind::Phatgoose => (
            "phatgoose",
            serde_json::to_value(PhatgooseConfig::default()).expect("json"),
        ),
        SelectorKind::Arrow => return arrow_prototypes_cached(lib, experts, &opts.gks),
    };
    let config = serde_json::json!({
        "transform": name, "version": 1, "config": cfg, "model": fp,
        "data": data.id, "gks": gks_key(lib, &opts.gks)?,
    });
    let mu_cfg = MuConfig::default();
    let pg_cfg = PhatgooseConfig::default();
    let lib_root = lib.uri().to_string();
    let res = cached_prototypes(lib, experts, name, config, |e| {
        let Some(examples) = data.examples else {
            return Err(Error::InvalidArgument(format!(
                "route `{name}` needs {name} prototypes, which library {lib_root} does not have for expert `{}`, this model and data `{}`; compute them with `quiver arrow --library {lib_root} --kind {name} --model MODEL --source DATA`",
                e.name, data.id
            )));
        };
        let ex = examples(e).map_err(|err| {
            Error::InvalidArgument(format!(
                "the {name} prototypes of expert `{}` are computed from its training data ({}), which could not be read: {err}",
                e.name, data.id
            ))
        })?;
        match kind {
            SelectorKind::Mu => mu::expert_mu_vectors(model, tok, e, &ex, &mu_cfg),
            _ => phatgoose::expert_phatgoose_gates(model, tok, e, &ex, &pg_cfg),
        }
    });
    detach_all(model);
    res
}

/// What [`install`] put on the model.
#[derive(Debug, Clone)]
pub struct Installed {
    /// One line for logs, e.g. `arrow over 4 experts (top-2, T=1, mix output) on 8 layers`.
    pub description: String,
    /// Expert usage of a per-token route.
    pub usage: Option<Arc<Usage>>,
}

/// Puts `route` on the model's LoRA-wrapped layers, replacing any adapter.
/// `experts` are the (possibly GenKnowSub-transformed) experts; per-token
/// routes need their `prototypes` (same expert order).
pub fn install(
    model: &mut Llama,
    experts: &[Expert],
    route: &Route,
    prototypes: Option<&Prototypes>,
    opts: &RouteOptions,
    observer: Option<Arc<dyn RouteObserver>>,
) -> Result<Installed> {
    detach_all(model);
    let single = |model: &mut Llama, name: &str| -> Result<Installed> {
        let e = experts.iter().find(|e| e.name == name).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "the library has no expert `{name}` (it has: {})",
                merge::names_list(experts)
            ))
        })?;
        e.attach(model, None)?;
        Ok(Installed {
            description: format!("expert {name}"),
            usage: None,
        })
    };
    match route {
        Route::Base => {
            return Ok(Installed {
                description: "base model".into(),
                usage: None,
            })
        }
        Route::Expert(name) => return single(model, name),
        Route::Oracle(task) => {
            let name = oracle_expert(experts, task)?.name.clone();
            return single(model, &name);
        }
        _ => {}
    }
    check_compatible(experts)?;
    for e in experts {
        e.check_fits(model, None)?;
    }
    let device = model.device().clone();
    let dtype = model.dtype();
    let n_layers = experts[0].weights.len();
    let static_adapters: Option<BTreeMap<String, Arc<dyn crate::lora::LinearAdapter>>> = match route
    {
        Route::Uniform => Some(
            uniform_factors(experts)?
                .into_iter()
                .map(|(m, l)| Ok((m, to_device_lora(l, &device, dtype)?)))
                .collect::<Result<_>>()?,
        ),
        Route::UniformDw => Some(
            uniform_updates(experts)?
                .into_iter()
                .map(|(m, l)| Ok((m, to_device_lora(l, &device, dtype)?)))
                .collect::<Result<_>>()?,
        ),
        Route::Ties => Some(
            ties_merge(experts, opts.ties_density)?
                .into_iter()
                .map(|(m, d)| {
                    let dw = d.dw.to_device(&device)?.to_dtype(dtype)?;
                    Ok((
                        m,
                        Arc::new(DenseDelta { dw }) as Arc<dyn crate::lora::LinearAdapter>,
                    ))
                })
                .collect::<Result<_>>()?,
        ),
        _ => None,
    };
    if let Some(adapters) = static_adapters {
        for lin in model.linears_mut() {
            if let Some(a) = adapters.get(lin.name()) {
                lin.set_adapter(Some(a.clone()));
            }
        }
        return Ok(Installed {
            description: format!(
                "{route} merge of {} experts on {n_layers} layers",
                experts.len()
            ),
            usage: None,
        });
    }
    let kind = route.selector_kind().expect("per-token route");
    let protos = prototypes
        .ok_or_else(|| Error::InvalidArgument(format!("route `{route}` needs prototypes")))?;
    let names: Vec<String> = experts.iter().map(|e| e.name.clone()).collect();
    if protos.experts != names {
        return Err(Error::InvalidArgument(format!(
            "the prototypes are for experts {:?}, not for the library's {:?}",
            protos.experts, names
        )));
    }
    let k = opts.top_k_for(kind, experts.len())?;
    let names = Arc::new(names);
    let usage = Arc::new(Usage::new(names.to_vec()));
    let mut temps = Vec::new();
    for lin in model.linears_mut() {
        let module = lin.name().to_string();
        if !experts[0].weights.contains_key(&module) {
            continue;
        }
        let t = opts.temperature_for(kind, lin.in_features())?;
        temps.push(t);
        let selector = Selector::new(kind, protos.layer(&module)?, t, k, &device)?;
        let factors = experts
            .iter()
            .map(|e| {
                let (a, b) = &e.weights[&module];
                (a.clone(), b.clone(), e.config.scale())
            })
            .collect();
        let routed = RoutedLora::new(
            &module,
            names.clone(),
            factors,
            selector,
            opts.mix,
            opts.path,
            &device,
        )?
        .with_usage(usage.clone())
        .with_observer(observer.clone());
        lin.set_adapter(Some(Arc::new(routed)));
    }
    let t = match opts.temperature {
        Some(t) => format!("{t}"),
        None if kind == SelectorKind::Arrow => "1".into(),
        None => "sqrt(d)".into(),
    };
    Ok(Installed {
        description: format!(
            "{route} routing over {} experts (top-{k}, T={t}, mix {}) on {} layers",
            experts.len(),
            match opts.mix {
                MixMode::Output => "output",
                MixMode::Factor => "factor",
            },
            temps.len()
        ),
        usage: Some(usage),
    })
}

fn to_device_lora(
    l: crate::lora::Lora,
    device: &Device,
    dtype: DType,
) -> Result<Arc<dyn crate::lora::LinearAdapter>> {
    Ok(Arc::new(crate::lora::Lora::new(
        l.a.to_device(device)?.to_dtype(dtype)?,
        l.b.to_device(device)?.to_dtype(dtype)?,
        l.scale,
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse_and_print() {
        for s in [
            "base",
            "expert:a_b",
            "oracle:task/sub",
            "uniform",
            "uniform-dw",
            "ties",
            "arrow",
            "mu",
            "phatgoose",
        ] {
            let r: Route = s.parse().unwrap();
            assert_eq!(r.to_string(), s);
        }
        let e = "arow".parse::<Route>().unwrap_err().to_string();
        assert!(
            e.contains("unknown route") && e.contains("expected base"),
            "{e}"
        );
        assert!("expert:".parse::<Route>().is_err());
        assert!("oracle".parse::<Route>().is_err());
    }

    #[test]
    fn default_top_k_and_temperature_follow_the_method() {
        let o = RouteOptions::default();
        assert_eq!(o.top_k_for(SelectorKind::Arrow, 10).unwrap(), 4);
        assert_eq!(o.top_k_for(SelectorKind::Arrow, 3).unwrap(), 3);
        assert_eq!(o.top_k_for(SelectorKind::Phatgoose, 10).unwrap(), 2);
        assert_eq!(o.top_k_for(SelectorKind::Mu, 10).unwrap(), 10);
        assert_eq!(o.temperature_for(SelectorKind::Mu, 16).unwrap(), 4.0);
        assert_eq!(o.temperature_for(SelectorKind::Arrow, 16).unwrap(), 1.0);
        let o = RouteOptions {
            top_k: Some(11),
            ..Default::default()
        };
        assert!(o.top_k_for(SelectorKind::Arrow, 10).is_err());
    }
}
