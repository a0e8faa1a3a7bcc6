//! `quiver serve`: an OpenAI-compatible HTTP server over a base model and
//! one or more expert libraries (issue 17).
//!
//! `model` in a request names the base model (`base` or its `--model`
//! spec), one expert (`NAME`, or `LIB:NAME` with several libraries), or a
//! route over a library (`arrow`, `uniform`, `uniform-dw`, `ties`, `mu`,
//! `phatgoose`, or `LIB:ROUTE`); the optional body fields `route`, `top_k`,
//! `router_temperature` and `mix` override the route's defaults. Routes are
//! installed through `quiver_core::routing::install_route`, so every
//! expert is checked on load as everywhere else.
//!
//! Built so far: `POST /v1/completions`, `POST /v1/chat/completions` (the
//! model's chat template), both with `stream: true` as server-sent events
//! in OpenAI's chunk format, `max_tokens`, `temperature`, `top_p`, `seed`,
//! `stop`, `n` (without streaming), `usage`; `quiver_explain` (`true`:
//! the experts' weights behind every generated token, averaged over the
//! routed layers; `"layers"`: each layer's choice too; in streaming mode in
//! each chunk); `GET /v1/models`; `GET /health`; `GET /metrics`
//! (Prometheus text). Requests run one at a time on one model thread, in
//! arrival order. Not built yet: continuous batching with a route per
//! sequence, a KV-cache budget, `logprobs` (refused, never faked).

pub mod api;
pub mod engine;
pub mod explain;
pub mod metrics;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{mpsc, Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use quiver_core::generate::SamplingParams;
use quiver_core::library::ExpertLibrary;
use quiver_core::routing::{MixMode, Route, RouteSpec};
use quiver_core::tokenizer::{ChatMessage, Tokenizer};
use quiver_core::LoadedModel;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;

use api::{ErrorBody, ErrorDetail, ModelCard, ModelList, Usage};
use engine::{Event, Job, Target};
use explain::ExplainMode;

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
}

struct AppState {
    model_id: String,
    tokenizer: Tokenizer,
    max_context: usize,
    /// (library name, its experts' names), in `--library` order.
    libraries: Vec<(String, Vec<String>)>,
    jobs: Mutex<mpsc::Sender<Job>>,
    metrics: Arc<metrics::Metrics>,
}

/// The routes `/v1/models` lists for each library.
const ROUTES: [&str; 6] = ["arrow", "uniform", "uniform-dw", "ties", "mu", "phatgoose"];

/// An HTTP error in OpenAI's shape.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl ApiError {
    fn bad(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
        }
    }

    fn no_model(model: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("the model `{model}` does not exist; GET /v1/models lists the base model, every expert and every route"),
            kind: "invalid_request_error",
            param: Some("model"),
            code: Some("model_not_found"),
        }
    }

    fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                message: self.message,
                kind: self.kind,
                param: self.param,
                code: self.code,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

impl AppState {
    fn model_ids(&self) -> Vec<String> {
        let mut ids = vec![self.model_id.clone(), "base".to_string()];
        let prefix = |lib: &str| {
            if self.libraries.len() > 1 {
                format!("{lib}:")
            } else {
                String::new()
            }
        };
        for (lib, experts) in &self.libraries {
            let p = prefix(lib);
            ids.extend(experts.iter().map(|e| format!("{p}{e}")));
            ids.extend(ROUTES.iter().map(|r| format!("{p}{r}")));
        }
        ids
    }

    /// What `model` (and the route fields) name.
    fn resolve(&self, c: &api::Common) -> Result<Target, ApiError> {
        let model = c.model.as_str();
        let (lib, name) = match model.split_once(':') {
            Some((l, rest)) if self.libraries.iter().any(|(n, _)| n == l) => {
                let i = self
                    .libraries
                    .iter()
                    .position(|(n, _)| n == l)
                    .expect("found");
                (Some(i), rest)
            }
            _ => (
                if self.libraries.is_empty() {
                    None
                } else {
                    Some(0)
                },
                model,
            ),
        };
        let mut route = if model == "base" || model == self.model_id {
            Route::Base
        } else if let Some(i) = lib {
            if self.libraries[i].1.iter().any(|e| e == name) {
                Route::Expert(name.to_string())
            } else {
                name.parse::<Route>()
                    .map_err(|_| ApiError::no_model(model))?
            }
        } else {
            return Err(ApiError::no_model(model));
        };
        if let Some(r) = &c.route {
            route = r
                .parse()
                .map_err(|e: quiver_core::Error| ApiError::bad(e.to_string(), Some("route")))?;
        }
        let mut spec = RouteSpec::new(route);
        spec.options.top_k = c.top_k;
        spec.options.temperature = c.router_temperature;
        if let Some(m) = &c.mix {
            spec.options.mix = m
                .parse::<MixMode>()
                .map_err(|e| ApiError::bad(e.to_string(), Some("mix")))?;
        }
        spec.validate()
            .map_err(|e| ApiError::bad(e.to_string(), None))?;
        let library = if spec.route == Route::Base { None } else { lib };
        if spec.route != Route::Base && library.is_none() {
            return Err(ApiError::bad(
                format!(
                    "route `{}` needs a library; the server was started without --library",
                    spec.route
                ),
                Some("model"),
            ));
        }
        if explain_mode(c)?.is_some() && spec.route.selector_kind().is_none() {
            return Err(ApiError::bad(
                format!("quiver_explain shows per-token routing; route `{}` is the same for every token (use arrow, mu or phatgoose)", spec.route),
                Some("quiver_explain"),
            ));
        }
        Ok(Target { library, spec })
    }

    fn params(&self, c: &api::Common, i: usize) -> Result<SamplingParams, ApiError> {
        let p = SamplingParams {
            temperature: c.temperature.unwrap_or(1.0),
            top_p: c.top_p.unwrap_or(1.0),
            seed: c.seed.unwrap_or(0).wrapping_add(i as u64),
            max_tokens: c.max_tokens.unwrap_or(16),
        };
        p.validate().map_err(|e| {
            ApiError::bad(
                e.to_string()
                    .replace("--temperature", "temperature")
                    .replace("--top-p", "top_p"),
                None,
            )
        })?;
        if p.max_tokens == 0 {
            return Err(ApiError::bad(
                "max_tokens must be at least 1",
                Some("max_tokens"),
            ));
        }
        Ok(p)
    }

    fn submit(&self, job: Job) -> Result<(), ApiError> {
        self.metrics.job_queued();
        self.jobs
            .lock()
            .map_err(|_| ApiError::internal("the model thread is gone"))?
            .send(job)
            .map_err(|_| ApiError::internal("the model thread is gone"))
    }
}

fn explain_mode(c: &api::Common) -> Result<Option<ExplainMode>, ApiError> {
    match &c.quiver_explain {
        None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => Ok(None),
        Some(serde_json::Value::Bool(true)) => Ok(Some(ExplainMode::Tokens)),
        Some(serde_json::Value::String(s)) if s == "layers" => Ok(Some(ExplainMode::Layers)),
        Some(v) => Err(ApiError::bad(
            format!("quiver_explain must be true, false or \"layers\", not {v}"),
            Some("quiver_explain"),
        )),
    }
}

fn check_common(c: &api::Common) -> Result<usize, ApiError> {
    if c.logprobs
        .as_ref()
        .is_some_and(|v| !v.is_null() && *v != serde_json::json!(false))
    {
        return Err(ApiError::bad(
            "logprobs are not supported by this server yet",
            Some("logprobs"),
        ));
    }
    let n = c.n.unwrap_or(1);
    if n == 0 {
        return Err(ApiError::bad("n must be at least 1", Some("n")));
    }
    if n > 1 && c.stream {
        return Err(ApiError::bad(
            "n > 1 with stream is not supported yet",
            Some("n"),
        ));
    }
    Ok(n)
}

/// One finished generation.
struct Finished {
    text: String,
    explain: Vec<serde_json::Value>,
    reason: &'static str,
    prompt_tokens: usize,
    completion_tokens: usize,
}

async fn collect(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
) -> Result<Finished, ApiError> {
    let mut text = String::new();
    let mut explain = Vec::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Text(t) => text.push_str(&t),
            Event::Explain(v) => explain.push(v),
            Event::Done {
                reason,
                prompt_tokens,
                completion_tokens,
            } => {
                return Ok(Finished {
                    text,
                    explain,
                    reason: api::finish_reason(reason),
                    prompt_tokens,
                    completion_tokens,
                })
            }
            Event::Error(e) => return Err(ApiError::bad(e, None)),
        }
    }
    Err(ApiError::internal("the model thread stopped mid-request"))
}

/// Runs `n` generations of `prompt` and collects them.
async fn run_all(
    st: &AppState,
    c: &api::Common,
    prompt: Vec<u32>,
    n: usize,
) -> Result<Vec<Finished>, ApiError> {
    let target = st.resolve(c)?;
    let stop = c.stop.as_ref().map(api::Stop::list).unwrap_or_default();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        st.submit(Job {
            prompt: prompt.clone(),
            params: st.params(c, i)?,
            stop: stop.clone(),
            target: target.clone(),
            explain: explain_mode(c)?,
            events: tx,
            submitted: std::time::Instant::now(),
        })?;
        out.push(collect(rx).await?);
    }
    Ok(out)
}

fn usage(f: &[Finished]) -> Usage {
    let prompt = f.first().map(|x| x.prompt_tokens).unwrap_or(0);
    let completion: usize = f.iter().map(|x| x.completion_tokens).sum();
    Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt + completion,
    }
}

fn encode(st: &AppState, text: &str) -> Result<Vec<u32>, ApiError> {
    let ids = st
        .tokenizer
        .encode(text)
        .map_err(|e| ApiError::bad(e.to_string(), Some("prompt")))?;
    if ids.is_empty() {
        return Err(ApiError::bad("the prompt is empty", Some("prompt")));
    }
    if ids.len() >= st.max_context {
        return Err(ApiError::bad(
            format!(
                "the prompt has {} tokens but the model's context window is {} tokens",
                ids.len(),
                st.max_context
            ),
            Some("prompt"),
        ));
    }
    Ok(ids)
}

/// A streamed generation as server-sent events: `chunk(text, finish)` makes
/// each `data:` object; `[DONE]` ends the stream.
fn stream_response(
    st: &AppState,
    c: &api::Common,
    prompt: Vec<u32>,
    chunk: impl Fn(Option<&str>, Option<&str>) -> serde_json::Value + Send + Sync + 'static,
) -> Result<Response, ApiError> {
    let target = st.resolve(c)?;
    let explain = explain_mode(c)?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    st.submit(Job {
        prompt,
        params: st.params(c, 0)?,
        stop: c.stop.as_ref().map(api::Stop::list).unwrap_or_default(),
        target,
        explain,
        events: tx,
        submitted: std::time::Instant::now(),
    })?;
    // Explanations ride in the next chunk that goes out.
    let mut pending: Vec<serde_json::Value> = Vec::new();
    let finish = move |mut v: serde_json::Value, pending: &mut Vec<serde_json::Value>| {
        if explain.is_some() {
            v["choices"][0]["quiver_explain"] = serde_json::Value::Array(std::mem::take(pending));
        }
        v.to_string()
    };
    let events = UnboundedReceiverStream::new(rx).filter_map(move |ev| {
        let data = match ev {
            Event::Explain(v) => {
                pending.push(v);
                return None;
            }
            Event::Text(t) => finish(chunk(Some(&t), None), &mut pending),
            Event::Done { reason, .. } => {
                finish(chunk(None, Some(api::finish_reason(reason))), &mut pending)
            }
            Event::Error(e) => serde_json::json!({"error": {
                "message": e, "type": "invalid_request_error", "param": null, "code": null
            }})
            .to_string(),
        };
        Some(Ok::<_, Infallible>(SseEvent::default().data(data)))
    });
    let done = tokio_stream::once(Ok::<_, Infallible>(SseEvent::default().data("[DONE]")));
    Ok(Sse::new(events.chain(done)).into_response())
}

fn prompt_text(v: &serde_json::Value) -> Result<String, ApiError> {
    match v {
        serde_json::Value::String(s) => Ok(s.clone()),
        serde_json::Value::Array(a) if a.len() == 1 && a[0].is_string() => {
            Ok(a[0].as_str().expect("string").to_string())
        }
        _ => Err(ApiError::bad(
            "prompt must be a string (batches of prompts are not supported yet)",
            Some("prompt"),
        )),
    }
}

async fn completions(
    State(st): State<Arc<AppState>>,
    Json(req): Json<api::CompletionRequest>,
) -> Result<Response, ApiError> {
    let n = check_common(&req.common)?;
    let prompt = encode(&st, &prompt_text(&req.prompt)?)?;
    let id = format!("cmpl-{:x}", api::now_secs());
    let created = api::now_secs();
    let model = req.common.model.clone();
    if req.common.stream {
        return stream_response(&st, &req.common, prompt, move |text, finish| {
            serde_json::json!({
                "id": id, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text.unwrap_or(""), "logprobs": null,
                             "finish_reason": finish}],
            })
        });
    }
    let done = run_all(&st, &req.common, prompt, n).await?;
    let choices: Vec<serde_json::Value> = done
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let mut c = serde_json::json!({"index": i, "text": f.text, "logprobs": null,
                               "finish_reason": f.reason});
            if explain_mode(&req.common).ok().flatten().is_some() {
                c["quiver_explain"] = f.explain.clone().into();
            }
            c
        })
        .collect();
    Ok(Json(serde_json::json!({
        "id": id, "object": "text_completion", "created": created, "model": model,
        "choices": choices, "usage": usage(&done),
    }))
    .into_response())
}

async fn chat_completions(
    State(st): State<Arc<AppState>>,
    Json(req): Json<api::ChatRequest>,
) -> Result<Response, ApiError> {
    let n = check_common(&req.common)?;
    if req.messages.is_empty() {
        return Err(ApiError::bad(
            "messages must not be empty",
            Some("messages"),
        ));
    }
    let msgs: Vec<ChatMessage> = req
        .messages
        .iter()
        .map(|m| ChatMessage {
            role: m.role.clone(),
            content: m.content.clone(),
        })
        .collect();
    let text = st
        .tokenizer
        .apply_chat_template(&msgs, true)
        .map_err(|e| ApiError::bad(e.to_string(), Some("messages")))?;
    let prompt = encode(&st, &text)?;
    let id = format!("chatcmpl-{:x}", api::now_secs());
    let created = api::now_secs();
    let model = req.common.model.clone();
    if req.common.stream {
        let first = std::sync::atomic::AtomicBool::new(true);
        return stream_response(&st, &req.common, prompt, move |text, finish| {
            let mut delta = serde_json::Map::new();
            if first.swap(false, std::sync::atomic::Ordering::Relaxed) {
                delta.insert("role".into(), "assistant".into());
            }
            if let Some(t) = text {
                delta.insert("content".into(), t.into());
            }
            serde_json::json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
            })
        });
    }
    let done = run_all(&st, &req.common, prompt, n).await?;
    let choices: Vec<serde_json::Value> = done
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let mut c = serde_json::json!({"index": i, "message": {"role": "assistant", "content": f.text},
                               "logprobs": null, "finish_reason": f.reason});
            if explain_mode(&req.common).ok().flatten().is_some() {
                c["quiver_explain"] = f.explain.clone().into();
            }
            c
        })
        .collect();
    Ok(Json(serde_json::json!({
        "id": id, "object": "chat.completion", "created": created, "model": model,
        "choices": choices, "usage": usage(&done),
    }))
    .into_response())
}

async fn models(State(st): State<Arc<AppState>>) -> Json<ModelList> {
    let created = api::now_secs();
    Json(ModelList {
        object: "list",
        data: st
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

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

/// The HTTP routes over a started model thread.
fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .with_state(state)
}

/// Serves until Ctrl-C; `on_listen` gets the bound address (with `port 0`,
/// the one the system chose) once requests are accepted.
pub fn serve(cfg: ServeConfig, on_listen: impl FnOnce(SocketAddr)) -> Result<(), ServeError> {
    let mut libraries = Vec::new();
    for l in &cfg.libraries {
        let names = l
            .library
            .list()
            .map_err(quiver_core::Error::from)?
            .into_iter()
            .map(|e| e.name)
            .collect();
        libraries.push((l.name.clone(), names));
    }
    let metrics = Arc::new(metrics::Metrics::default());
    let state = Arc::new(AppState {
        model_id: cfg.model_id.clone(),
        tokenizer: cfg.model.tokenizer.clone(),
        max_context: cfg.model.model.config().max_position_embeddings,
        libraries,
        jobs: Mutex::new(engine::start(
            cfg.model,
            cfg.libraries.into_iter().map(|l| l.library).collect(),
            metrics.clone(),
        )),
        metrics,
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(cfg.addr)
            .await
            .map_err(|source| ServeError::Bind {
                addr: cfg.addr.to_string(),
                source,
            })?;
        on_listen(listener.local_addr()?);
        axum::serve(listener, router(state))
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        Ok(())
    })
}
