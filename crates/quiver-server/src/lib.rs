//! `quiver serve`: an OpenAI-compatible HTTP server over a base model and
//! one or more expert libraries (issue 17).
//!
//! `model` in a request names the base model (`base` or its `--model`
//! spec), one expert (`NAME`, or `LIB:NAME` with several libraries), or a
//! route over a library (`arrow`, `uniform`, `uniform-dw`, `ties`, `mu`,
//! `phatgoose`, or `LIB:ROUTE`); the optional body fields `route`, `top_k`,
//! `router_temperature` and `mix` override the route's defaults. Routes are
//! built through `quiver_core::routing::install_route`, so every expert is
//! checked on load as everywhere else.
//!
//! * `POST /v1/completions`, `POST /v1/chat/completions` (the model's chat
//!   template): `stream` (server-sent events in OpenAI's chunk format,
//!   `stream_options.include_usage`), `max_tokens`, `temperature`,
//!   `top_p`, `seed`, `stop`, `n`, `logprobs` (and chat's
//!   `top_logprobs`), several prompts, `usage`; `quiver_explain` (`true`:
//!   the experts' weights behind every generated token, averaged over the
//!   routed layers; `"layers"`: each layer's choice too; in streaming mode
//!   in each chunk).
//! * `GET /v1/models`, `POST /v1/reload` (re-read the libraries),
//!   `GET /health`, `GET /metrics` (Prometheus text).
//! * Continuous batching ([`engine`]): concurrent requests share forward
//!   passes, each sequence with its own route, prompts prefilled in
//!   chunks, within a KV-cache budget.
//! * A bounded queue (429 with `Retry-After` when full), a body size
//!   limit, `--api-key` (401 without it), SIGTERM: stop accepting, finish
//!   what runs within a grace period, exit.

pub mod api;
pub mod catalog;
pub mod engine;
pub mod explain;
mod handlers;
pub mod metrics;

use std::net::SocketAddr;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use quiver_core::library::ExpertLibrary;
use quiver_core::tokenizer::Tokenizer;
use quiver_core::LoadedModel;

use api::{ApiError, ModelCard, ModelList};
use catalog::Catalog;
use engine::{EngineConfig, Job, Queue};

/// Errors of starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Core(#[from] quiver_core::Error),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A library the server routes over, by the name requests use.
pub struct NamedLibrary {
    pub name: String,
    pub library: ExpertLibrary,
}

/// What the server needs to start.
pub struct ServeConfig {
    /// The `--model` spec, as `/v1/models` lists it.
    pub model_id: String,
    pub model: LoadedModel,
    pub libraries: Vec<NamedLibrary>,
    pub addr: SocketAddr,
    pub engine: EngineConfig,
    /// Generations waiting for the batch at most; more get 429.
    pub max_queue: usize,
    /// Every endpoint but `/health` needs `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Request bodies larger than this get 413.
    pub max_body_bytes: usize,
    /// After SIGTERM (or Ctrl-C): how long running requests may take to
    /// finish before the server exits anyway.
    pub grace: Duration,
    /// Serve experts whose recorded base model differs from the model's.
    pub allow_base_mismatch: bool,
}

struct AppState {
    catalog: Catalog,
    tokenizer: Tokenizer,
    max_context: usize,
    vocab_size: usize,
    jobs: Mutex<mpsc::Sender<Job>>,
    engine: Arc<Queue>,
    max_queue: usize,
    api_key: Option<String>,
    metrics: Arc<metrics::Metrics>,
}

/// Reads the libraries' listings again, off the async workers; answers
/// the libraries that could not be read (they keep their last listing).
async fn relist(st: &Arc<AppState>) -> Result<Vec<String>, ApiError> {
    let s = st.clone();
    tokio::task::spawn_blocking(move || s.catalog.reload())
        .await
        .map_err(|e| ApiError::internal(e.to_string()))
}

async fn models(State(st): State<Arc<AppState>>) -> Json<ModelList> {
    // A library that cannot be listed keeps its last listing.
    let _ = relist(&st).await;
    model_list(&st)
}

fn model_list(st: &AppState) -> Json<ModelList> {
    let created = api::now_secs();
    Json(ModelList {
        object: "list",
        data: st
            .catalog
            .model_ids()
            .into_iter()
            .map(|id| ModelCard {
                id,
                object: "model",
                created,
                owned_by: "quiver",
            })
            .collect(),
    })
}

/// `GET /v1/models/{id}`: one model's card, or 404.
async fn model_card(
    State(st): State<Arc<AppState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<ModelCard>, ApiError> {
    let _ = relist(&st).await;
    if !st.catalog.model_ids().contains(&id) {
        return Err(ApiError::no_model(&id));
    }
    Ok(Json(ModelCard {
        id,
        object: "model",
        created: api::now_secs(),
        owned_by: "quiver",
    }))
}

/// `POST /v1/reload`: the libraries' listings read again; answers the new
/// model list, or 500 naming the libraries that could not be read.
async fn reload(State(st): State<Arc<AppState>>) -> Result<Json<ModelList>, ApiError> {
    let problems = relist(&st).await?;
    if !problems.is_empty() {
        return Err(ApiError::internal(problems.join("; ")));
    }
    Ok(model_list(&st))
}

async fn metrics_text(State(st): State<Arc<AppState>>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        st.metrics.render(),
    )
        .into_response()
}

/// Counts every response by endpoint and status.
async fn count_requests(
    State(st): State<Arc<AppState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = req.uri().path().to_string();
    let resp = next.run(req).await;
    st.metrics.request(&path, resp.status().as_u16());
    resp
}

/// With `--api-key`, every endpoint but `/health` needs the key.
async fn check_key(
    State(st): State<Arc<AppState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(key) = &st.api_key {
        let given = req
            .headers()
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if req.uri().path() != "/health" && !given.is_some_and(|g| constant_time_eq(g, key)) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

/// Compares without stopping at the first difference, so the time taken
/// does not tell how much of a guessed key was right.
fn constant_time_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

async fn not_found() -> ApiError {
    let mut e = ApiError::bad(
        "no such endpoint; the server has /v1/completions, /v1/chat/completions, /v1/models, /v1/reload, /health and /metrics",
        None,
    );
    e.status = axum::http::StatusCode::NOT_FOUND;
    e
}

/// The HTTP routes over a started model thread.
fn router(state: Arc<AppState>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{*id}", get(model_card))
        .route("/v1/reload", post(reload))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            check_key,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .with_state(state)
}

/// SIGTERM or Ctrl-C.
async fn stop_signal() {
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let sigterm = async {
            match term.as_mut() {
                Some(t) => {
                    t.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = sigterm => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Serves until SIGTERM or Ctrl-C; `on_listen` gets the bound address
/// (with `port 0`, the one the system chose) once requests are accepted.
/// After the signal no new connection is accepted; requests already
/// running get `cfg.grace` to finish.
pub fn serve(cfg: ServeConfig, on_listen: impl FnOnce(SocketAddr)) -> Result<(), ServeError> {
    let libraries: Vec<(String, Arc<ExpertLibrary>)> = cfg
        .libraries
        .into_iter()
        .map(|l| (l.name, Arc::new(l.library)))
        .collect();
    let catalog = Catalog::new(
        cfg.model_id.clone(),
        libraries.clone(),
        cfg.allow_base_mismatch,
    )?;
    let metrics = Arc::new(metrics::Metrics::default());
    let config = cfg.model.model.config();
    let (max_context, vocab_size) = (config.max_position_embeddings, config.vocab_size);
    let tokenizer = cfg.model.tokenizer.clone();
    let mut model = cfg.model;
    // With --quantize, prompt chunks use the quantized weights as decoding
    // does: several times faster than f32 here (bench/README).
    model.model.set_quantized_max_rows(
        cfg.engine
            .max_batch_tokens
            .max(quiver_core::lora::QUANTIZED_MAX_ROWS),
    );
    let engine = engine::start(
        model,
        libraries.into_iter().map(|(_, l)| l).collect(),
        metrics.clone(),
        cfg.engine,
    );
    let state = Arc::new(AppState {
        catalog,
        tokenizer,
        max_context,
        vocab_size,
        jobs: Mutex::new(engine.jobs),
        engine: engine.queue,
        max_queue: cfg.max_queue,
        api_key: cfg.api_key,
        metrics: metrics.clone(),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let grace = cfg.grace;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(cfg.addr)
            .await
            .map_err(|source| ServeError::Bind {
                addr: cfg.addr.to_string(),
                source,
            })?;
        on_listen(listener.local_addr()?);
        let (stopping_tx, mut stopping) = tokio::sync::watch::channel(false);
        let server = axum::serve(listener, router(state, cfg.max_body_bytes))
            .with_graceful_shutdown(async move {
                stop_signal().await;
                let _ = stopping_tx.send(true);
            });
        let deadline = async {
            let _ = stopping.wait_for(|s| *s).await;
            eprintln!(
                "stopping: no new requests; {} running or waiting get {}s to finish",
                metrics.in_flight(),
                grace.as_secs()
            );
            tokio::time::sleep(grace).await;
        };
        tokio::select! {
            r = server => r?,
            _ = deadline => {
                eprintln!("stopping: the grace period is over; {} requests cut off", metrics.in_flight());
            }
        }
        Ok(())
    })
}
