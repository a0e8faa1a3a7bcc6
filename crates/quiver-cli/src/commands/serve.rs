//! `quiver serve`: parses the flags, loads the model and opens the
//! libraries; `quiver_server` does the rest.

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;
use quiver_core::library::ExpertLibrary;
use quiver_server::engine::EngineConfig;
use quiver_server::{NamedLibrary, ServeConfig};

use crate::flags::{GlobalArgs, ModelArgs};

#[derive(Debug, Args)]
#[command(
    after_help = "A request's `model` names the base model (`base`), one expert (its name; \
`LIB:NAME` with several libraries) or a route over a library (`arrow`, `uniform`, `uniform-dw`, \
`ties`, `mu`, `phatgoose`; `LIB:arrow` with several). Optional body fields `route`, `top_k`, \
`router_temperature` and `mix` override the route's defaults. GET /v1/models lists them all; it, POST /v1/reload and \
any request naming something new read the libraries again, so experts imported while the server \
runs are served without a restart.\n\n\
Concurrent requests share forward passes (continuous batching): each step feeds every decoding \
sequence one token and prompt chunks from what is left of --max-batch-tokens, and each sequence \
keeps its own route. A request waits for room in the batch and in the KV-cache budget; past \
--max-queue waiting requests the server answers 429 with Retry-After.\n\n\
With --quantize, prompt chunks (up to --max-batch-tokens rows) use the quantized weights \
too, not only decoding.\n\n\
SIGTERM or Ctrl-C: no new requests; running ones get --grace-period seconds to finish."
)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// An expert library to serve: `DIR`, `s3://bucket/prefix`, or `NAME=LIB` to give it
    /// the name requests use (default name: `lib`, then `lib2`, ...). Repeat for several.
    #[arg(long, value_name = "[NAME=]LIB")]
    pub library: Vec<String>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: std::net::IpAddr,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every endpoint but /health (401 otherwise).
    #[arg(long, env = "QUIVER_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Sequences in one forward pass at most.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub max_batch: u64,
    /// New tokens in one forward pass at most: every decoding sequence's one token, then
    /// chunks of waiting prompts, so a long prompt is prefilled over several steps.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_batch_tokens: u64,
    /// KV-cache memory for all running sequences, in MiB. A request reserves room for its
    /// prompt and max_tokens when it joins the batch, and waits until the room is free.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    pub kv_cache_mb: u64,
    /// Requests waiting for the batch at most; more are answered 429 with Retry-After.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Largest request body accepted, in bytes (413 past it).
    #[arg(long, default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
    /// Seconds running requests get to finish after SIGTERM or Ctrl-C.
    #[arg(long, default_value_t = 30)]
    pub grace_period: u64,
    /// Serve experts whose recorded base model differs from --model's (when they are the
    /// same weights under another name).
    #[arg(long)]
    pub allow_base_mismatch: bool,
}

pub fn run(g: &GlobalArgs, a: ServeArgs) -> Result<ExitCode> {
    let mut libraries = Vec::new();
    for (i, spec) in a.library.iter().enumerate() {
        let (name, uri) = match spec.split_once('=') {
            Some((n, u)) if !n.is_empty() && !n.contains('/') && !n.contains(':') => {
                (n.to_string(), u.to_string())
            }
            _ if i == 0 => ("lib".to_string(), spec.clone()),
            _ => (format!("lib{}", i + 1), spec.clone()),
        };
        if libraries.iter().any(|l: &NamedLibrary| l.name == name) {
            bail!("--library: two libraries are named `{name}`; name them with NAME=LIB");
        }
        let library = ExpertLibrary::open(&uri).with_context(|| format!("--library {spec}"))?;
        libraries.push(NamedLibrary { name, library });
    }
    let model = super::load_model(g, &a.model)?;
    let cfg = ServeConfig {
        model_id: a.model.model.clone(),
        model,
        libraries,
        addr: SocketAddr::new(a.host, a.port),
        engine: EngineConfig {
            max_batch: a.max_batch as usize,
            max_batch_tokens: a.max_batch_tokens as usize,
            kv_budget_bytes: (a.kv_cache_mb as usize) << 20,
            ..EngineConfig::default()
        },
        max_queue: a.max_queue,
        api_key: a.api_key.filter(|k| !k.is_empty()),
        max_body_bytes: a.max_body_bytes,
        grace: std::time::Duration::from_secs(a.grace_period),
        allow_base_mismatch: a.allow_base_mismatch,
    };
    quiver_server::serve(cfg, |addr| {
        // Printed even with --quiet: a caller with --port 0 needs it.
        eprintln!("listening on http://{addr}");
    })?;
    Ok(ExitCode::SUCCESS)
}
