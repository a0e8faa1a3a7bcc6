//! `--library`, `--route`, `--adapter` and the router flags: which experts
//! run on top of the base model, shared by every command that runs a model
//! (METHOD.md section 2). `--explain FILE` writes every per-token routing
//! decision as JSON lines and prints expert usage to stderr when the model
//! is released at the end of the command.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use clap::Args;
use quiver_core::data::{DataSource, DEFAULT_CAP};
use quiver_core::expert::{model_fingerprint, validate_name, Expert};
use quiver_core::routing::{
    self, ExampleSource, LibraryDir, MixMode, Route, RouteDecision, RouteObserver, RouteOptions,
    SelectorKind, Usage,
};
use quiver_core::LoadedModel;

#[derive(Debug, Args, Clone)]
pub struct RouteArgs {
    /// Expert library directory (default: $QUIVER_LIBRARY).
    #[arg(long, env = "QUIVER_LIBRARY")]
    pub library: Option<PathBuf>,
    /// How to reuse the library: `base` (no adapter), `expert:NAME`, `oracle:TASK`
    /// (the expert trained on TASK), `uniform` (mean of the As and of the Bs),
    /// `uniform-dw` (mean of the updates BA), `ties` (TIES merge of the updates),
    /// or per-token routing: `arrow`, `mu` (mean hidden states), `phatgoose`.
    #[arg(long, default_value = "base")]
    pub route: String,
    /// A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors),
    /// e.g. one saved by Python PEFT, applied instead of --route.
    #[arg(long, conflicts_with = "route")]
    pub adapter: Option<PathBuf>,
    /// Experts kept per token (default: arrow 4, phatgoose 2, mu all).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Router softmax temperature (default: arrow 1, mu and phatgoose sqrt(d)).
    #[arg(long)]
    pub router_temperature: Option<f64>,
    /// How the chosen experts are combined: `output` (sum of w_e s B_e A_e x, as
    /// PEFT's Arrow) or `factor` (s (sum w_e B_e)(sum w_e A_e) x, as mttl).
    #[arg(long, default_value = "output")]
    pub mix: String,
    /// GenKnowSub: comma-separated general experts whose mean A and B are
    /// subtracted from every other expert, which alone are then routed or merged.
    #[arg(long, value_delimiter = ',')]
    pub gks: Vec<String>,
    /// Write each token's routing decision at each layer (chosen experts and
    /// weights) to FILE as JSON lines, and print expert usage to stderr at the end.
    #[arg(long, value_name = "FILE")]
    pub explain: Option<PathBuf>,
    /// Data the `mu` and `phatgoose` prototypes are computed from (each expert's
    /// own tasks, from its quiver_expert.json): `bigbench`, `olmo` or a JSONL path.
    /// Computed once, then cached in the library.
    #[arg(long, default_value = "bigbench")]
    pub route_data: String,
    /// Seed of the train/validation/test split of that data (as `quiver train --split-seed`).
    #[arg(long, default_value_t = 0)]
    pub route_split_seed: u64,
}

/// The key under which mu and Phatgoose caches record their data.
pub fn example_source_id(spec: &str, split_seed: u64) -> String {
    let spec = match Path::new(spec).canonicalize() {
        Ok(p) if !matches!(spec, "bigbench" | "olmo" | "olmo-tasks") => p.display().to_string(),
        _ => spec.to_string(),
    };
    format!("{spec} split_seed={split_seed} cap={DEFAULT_CAP}")
}

/// An expert's own training examples from the data source `spec`.
pub fn examples_for(
    spec: &str,
    split_seed: u64,
) -> impl Fn(&Expert) -> quiver_core::Result<Vec<quiver_core::data::Example>> + '_ {
    move |e: &Expert| {
        let src = DataSource::from_spec(spec, &quiver_core::assets::quiver_home())?;
        routing::expert_examples(&src, e, split_seed, DEFAULT_CAP)
    }
}

/// Applies `--route` / `--adapter` to a loaded model.
pub fn apply_route(lm: &mut LoadedModel, r: &RouteArgs) -> Result<()> {
    apply_route_observed(lm, r, None)
}

/// [`apply_route`], with one more observer of every routing decision
/// (`quiver eval --routing-summary`); an error for routes that are the same
/// for every token.
pub fn apply_route_observed(
    lm: &mut LoadedModel,
    r: &RouteArgs,
    extra: Option<Arc<dyn RouteObserver>>,
) -> Result<()> {
    let device = lm.model.device().clone();
    let dtype = lm.model.dtype();
    if let Some(dir) = &r.adapter {
        if r.explain.is_some() {
            bail!("--explain shows per-token routing; an --adapter is the same for every token");
        }
        let expert = Expert::load(dir, &device, dtype)?;
        expert.attach(&mut lm.model, None)?;
        return Ok(());
    }
    let route: Route = r.route.parse()?;
    let mix: MixMode = r.mix.parse()?;
    if extra.is_some() && route.selector_kind().is_none() {
        bail!(
            "--routing-summary sums per-token routing; route `{route}` is the same for every token (use arrow, mu or phatgoose)"
        );
    }
    if r.explain.is_some() && route.selector_kind().is_none() {
        bail!(
            "--explain shows per-token routing; route `{route}` is the same for every token (use arrow, mu or phatgoose)"
        );
    }
    if route == Route::Base {
        return Ok(());
    }
    let lib_path = r
        .library
        .as_ref()
        .with_context(|| format!("--route {route} needs --library (or $QUIVER_LIBRARY)"))?;
    if let Route::Expert(name) = &route {
        // One expert: load only its directory, so the rest of the library
        // (other base models, half-written experts) does not matter.
        validate_name(name)?;
        let dir = lib_path.join(name);
        if !dir.is_dir() {
            bail!("library {} has no expert `{name}`", lib_path.display());
        }
        let expert = Expert::load(&dir, &device, dtype)?;
        let fp = model_fingerprint(&lm.model)?;
        expert.attach(&mut lm.model, Some(&fp))?;
        return Ok(());
    }
    let lib = LibraryDir::open(lib_path, &device, dtype)?;
    let fp = model_fingerprint(&lm.model)?;
    lib.check_fits(&lm.model, Some(&fp))?;
    routing::check_compatible(&lib.experts)?;
    let experts = routing::gen_know_sub(&lib.experts, &r.gks)?;
    if let Some(k) = r.top_k {
        routing::router::check_top_k(k, experts.len())?;
    }
    if let Some(t) = r.router_temperature {
        routing::router::check_temperature(t)?;
    }
    let opts = RouteOptions {
        top_k: r.top_k,
        temperature: r.router_temperature,
        mix,
        gks: r.gks.clone(),
        ..RouteOptions::default()
    };
    let protos = match route.selector_kind() {
        None => None,
        Some(SelectorKind::Arrow) => {
            let (p, stats) = routing::arrow_prototypes_cached(&lib, &experts, &r.gks)?;
            tracing::info!(
                "arrow prototypes: {} cached, {} computed ({})",
                stats.cached,
                stats.computed,
                stats.cache_dir.display()
            );
            Some(p)
        }
        Some(kind) => {
            let get = examples_for(&r.route_data, r.route_split_seed);
            let src = ExampleSource {
                id: example_source_id(&r.route_data, r.route_split_seed),
                examples: Some(&get),
            };
            let (p, stats) = routing::learned_prototypes_cached(
                &lib,
                &experts,
                kind,
                &mut lm.model,
                &lm.tokenizer,
                &src,
                &opts,
            )?;
            tracing::info!(
                "{route} prototypes: {} cached, {} computed ({})",
                stats.cached,
                stats.computed,
                stats.cache_dir.display()
            );
            Some(p)
        }
    };
    let explain = match &r.explain {
        Some(path) => Some(Arc::new(Explain::create(path)?)),
        None => None,
    };
    let observer = match (explain.clone().map(|e| e as Arc<dyn RouteObserver>), extra) {
        (Some(a), Some(b)) => Some(Arc::new(routing::Fanout(vec![a, b])) as Arc<dyn RouteObserver>),
        (a, b) => a.or(b),
    };
    let installed = routing::install(
        &mut lm.model,
        &experts,
        &route,
        protos.as_ref(),
        &opts,
        observer,
    )?;
    if let (Some(e), Some(u)) = (&explain, &installed.usage) {
        *e.usage.lock().expect("explain") = Some(u.clone());
    }
    tracing::info!("{}", installed.description);
    Ok(())
}

/// `--explain`: one JSON line per (token, layer) decision. Every routed
/// layer holds it, so it is dropped when the model is, at the end of the
/// command: that is when the file is flushed and usage is printed, without
/// the commands having to know about it.
#[derive(Debug)]
struct Explain {
    path: PathBuf,
    out: Mutex<ExplainOut>,
    usage: Mutex<Option<Arc<Usage>>>,
}

#[derive(Debug)]
struct ExplainOut {
    file: std::io::BufWriter<std::fs::File>,
    /// Positions already seen per layer: with a KV cache, a layer sees the
    /// prompt, then one token per call.
    offsets: HashMap<String, usize>,
    error: Option<String>,
}

impl Explain {
    fn create(path: &Path) -> Result<Self> {
        let file = std::fs::File::create(path)
            .with_context(|| format!("--explain {}: cannot create the file", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            out: Mutex::new(ExplainOut {
                file: std::io::BufWriter::new(file),
                offsets: HashMap::new(),
                error: None,
            }),
            usage: Mutex::new(None),
        })
    }
}

impl RouteObserver for Explain {
    fn on_route(&self, d: &RouteDecision<'_>) {
        let mut out = self.out.lock().expect("explain");
        if out.error.is_some() {
            return;
        }
        let offset = *out.offsets.get(d.layer).unwrap_or(&0);
        let sel = d.selection;
        let mut text = String::new();
        for row in 0..d.b_sz {
            for pos in 0..d.seq_len {
                let t = row * d.seq_len + pos;
                let ks = &sel.experts[t * sel.k..(t + 1) * sel.k];
                let ws = &sel.weights[t * sel.k..(t + 1) * sel.k];
                let v = serde_json::json!({
                    "layer": d.layer,
                    "row": row,
                    "pos": offset + pos,
                    "experts": ks.iter().map(|&e| d.names[e as usize].as_str()).collect::<Vec<_>>(),
                    "weights": ws,
                });
                text.push_str(&v.to_string());
                text.push('\n');
            }
        }
        out.offsets.insert(d.layer.to_string(), offset + d.seq_len);
        if let Err(e) = out.file.write_all(text.as_bytes()) {
            out.error = Some(e.to_string());
        }
    }
}

impl Drop for Explain {
    fn drop(&mut self) {
        let out = self.out.get_mut().expect("explain");
        let flushed = out.file.flush();
        match (&out.error, flushed) {
            (Some(e), _) => eprintln!("warning: --explain {}: {e}", self.path.display()),
            (None, Err(e)) => eprintln!("warning: --explain {}: {e}", self.path.display()),
            _ => {}
        }
        if let Some(u) = self.usage.get_mut().expect("explain") {
            eprint!("{}", u.report().summary());
            eprintln!("routing decisions: {}", self.path.display());
        }
    }
}
