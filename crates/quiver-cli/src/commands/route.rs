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
use quiver_core::expert::Expert;
use quiver_core::library::ExpertLibrary;
use quiver_core::routing::{
    self, MixMode, Route, RouteData, RouteDecision, RouteObserver, RouteOptions, RouteSpec, Usage,
};
use quiver_core::LoadedModel;

#[derive(Debug, Args, Clone)]
pub struct RouteArgs {
    /// Expert library: a directory or `s3://bucket/prefix` (default: $QUIVER_LIBRARY).
    #[arg(long, env = "QUIVER_LIBRARY", value_name = "DIR|s3://BUCKET/PREFIX")]
    pub library: Option<String>,
    /// How to reuse the library: `base` (no adapter), `expert:NAME`, `oracle:TASK`
    /// (the expert trained on TASK), `uniform` (mean of the As and of the Bs),
    /// `uniform-dw` (mean of the updates BA), `ties` (TIES merge of the updates),
    /// or per-token routing: `arrow`, `mu` (mean hidden states), `phatgoose`.
    #[arg(long, default_value = "base", value_parser = parse_route)]
    pub route: Route,
    /// A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors),
    /// e.g. one saved by Python PEFT, applied instead of --route.
    #[arg(long, conflicts_with = "route")]
    pub adapter: Option<PathBuf>,
    /// Experts kept per token (default: arrow 4, phatgoose 2, mu all).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Router softmax temperature (default: arrow 1, mu and phatgoose sqrt(d)).
    #[arg(long, allow_negative_numbers = true)]
    pub router_temperature: Option<f64>,
    /// How the chosen experts are combined: `output` (sum of w_e s B_e A_e x, as
    /// PEFT's Arrow) or `factor` (s (sum w_e B_e)(sum w_e A_e) x, as mttl).
    #[arg(long, default_value = "output", value_parser = parse_mix)]
    pub mix: MixMode,
    /// GenKnowSub: comma-separated general experts whose mean A and B are
    /// subtracted from every other expert, which alone are then routed or merged.
    #[arg(long, value_delimiter = ',')]
    pub gks: Vec<String>,
    /// Write each token's routing decision at each layer (chosen experts and
    /// weights) to FILE as JSON lines, and print expert usage to stderr at the end.
    #[arg(long, value_name = "FILE")]
    pub explain: Option<PathBuf>,
    /// Data the `mu` and `phatgoose` prototypes are computed from (each expert's
    /// own tasks, from its quiver_expert.json): `olmo+evals`, `olmo`, `evals`,
    /// `bigbench:DIR` or a JSONL path.
    /// Computed once, then cached in the library.
    #[arg(long, default_value = "olmo+evals")]
    pub route_data: String,
    /// Seed of the train/validation/test split of that data (as `quiver train --split-seed`).
    #[arg(long, default_value_t = 0)]
    pub route_split_seed: u64,
    /// Use experts and adapters made for another base model (Quiver's recorded
    /// fingerprint, or PEFT's base_model_name_or_path, differs from --model).
    #[arg(long)]
    pub allow_base_mismatch: bool,
}

/// `--route` as clap parses it: [`Route`]'s own parser.
pub fn parse_route(s: &str) -> Result<Route, String> {
    s.parse().map_err(|e: quiver_core::Error| e.to_string())
}

fn parse_mix(s: &str) -> Result<MixMode, String> {
    s.parse().map_err(|e: quiver_core::Error| e.to_string())
}

impl RouteArgs {
    /// The typed route these flags describe.
    pub fn spec(&self) -> RouteSpec {
        RouteSpec {
            route: self.route.clone(),
            options: RouteOptions {
                top_k: self.top_k,
                temperature: self.router_temperature,
                mix: self.mix,
                gks: self.gks.clone(),
                ..RouteOptions::default()
            },
            data: RouteData {
                source: self.route_data.clone(),
                split_seed: self.route_split_seed,
            },
            allow_base_mismatch: self.allow_base_mismatch,
        }
    }

    /// The `--library`, opened (local or S3), if given.
    pub fn open_library(&self) -> Result<Option<ExpertLibrary>> {
        Ok(match &self.library {
            Some(uri) => Some(ExpertLibrary::open(uri)?),
            None => None,
        })
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
    if let Some(dir) = &r.adapter {
        if r.explain.is_some() {
            bail!("--explain shows per-token routing; an --adapter is the same for every token");
        }
        let expert = Expert::load(dir, lm.model.device(), lm.model.dtype())?;
        routing::session::check_made_for(lm, std::slice::from_ref(&expert), r.allow_base_mismatch)?;
        expert.attach(&mut lm.model, None)?;
        return Ok(());
    }
    let route = &r.route;
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
    let library = r.open_library()?;
    let explain = match &r.explain {
        Some(path) => Some(Arc::new(Explain::create(path)?)),
        None => None,
    };
    let observer = match (explain.clone().map(|e| e as Arc<dyn RouteObserver>), extra) {
        (Some(a), Some(b)) => Some(Arc::new(routing::Fanout(vec![a, b])) as Arc<dyn RouteObserver>),
        (a, b) => a.or(b),
    };
    let session = routing::install_route(lm, library.as_ref(), &r.spec(), observer)?;
    if let Some(p) = &session.prototypes {
        tracing::info!(
            "{route} prototypes: {} cached, {} computed ({})",
            p.cached,
            p.computed,
            p.cache_dir
        );
    }
    if let (Some(e), Some(u)) = (&explain, &session.installed.usage) {
        *e.usage.lock().expect("explain") = Some(u.clone());
    }
    tracing::info!("{}", session.installed.description);
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
