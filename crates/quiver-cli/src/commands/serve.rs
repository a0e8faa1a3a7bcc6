//! `quiver serve`: parses the flags, loads the model and opens the
//! libraries; `quiver_server` does the rest.

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;
use quiver_core::library::ExpertLibrary;
use quiver_server::{NamedLibrary, ServeConfig};

use crate::flags::{GlobalArgs, ModelArgs};

#[derive(Debug, Args)]
#[command(
    after_help = "A request's `model` names the base model (`base`), one expert (its name; \
`LIB:NAME` with several libraries) or a route over a library (`arrow`, `uniform`, `uniform-dw`, \
`ties`, `mu`, `phatgoose`; `LIB:arrow` with several). Optional body fields `route`, `top_k`, \
`router_temperature` and `mix` override the route's defaults. GET /v1/models lists them all.\n\n\
Requests run one at a time on one model thread, in arrival order."
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
    };
    quiver_server::serve(cfg, |addr| {
        // Printed even with --quiet: a caller with --port 0 needs it.
        eprintln!("listening on http://{addr}");
    })?;
    Ok(ExitCode::SUCCESS)
}
