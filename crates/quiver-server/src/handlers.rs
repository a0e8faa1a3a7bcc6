//! `POST /v1/completions` and `POST /v1/chat/completions`: a request
//! becomes one engine job per prompt and choice (`n`), all submitted at
//! once so that they share the batch, and the jobs' events become OpenAI's
//! response or its stream of chunks.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use quiver_core::generate::SamplingParams;
use quiver_core::tokenizer::ChatMessage;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tokio_stream::{StreamExt, StreamMap};

use crate::api::{self, ApiError, ApiJson, Usage};
use crate::engine::{Event, Job, Target, TokenLogprob};
use crate::explain::{self, ExplainMode};
use crate::AppState;

/// The most likely tokens a request may ask to see per generated token.
const MAX_TOP_LOGPROBS: usize = 20;

/// Which endpoint: the response shapes differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

/// A request, checked and ready to run.
struct Plan {
    kind: Kind,
    target: Target,
    prompts: Vec<Vec<u32>>,
    n: usize,
    stop: Vec<String>,
    explain: Option<ExplainMode>,
    logprobs: Option<usize>,
    logit_bias: Vec<(u32, f32)>,
    /// One per job: prompt `i`, choice `j` is job `i * n + j` (the seed
    /// differs).
    params: Vec<SamplingParams>,
    common: api::Common,
}

/// One finished choice.
#[derive(Default)]
struct Finished {
    text: String,
    explain: Vec<serde_json::Value>,
    logprobs: Vec<TokenLogprob>,
    reason: &'static str,
    prompt_tokens: usize,
    completion_tokens: usize,
}

pub async fn completions(
    State(st): State<Arc<AppState>>,
    ApiJson(req): ApiJson<api::CompletionRequest>,
) -> Result<Response, ApiError> {
    let prompts = prompt_ids(&st, &req.prompt)?;
    let plan = plan(&st, Kind::Completion, req.common, prompts).await?;
    run(&st, plan).await
}

pub async fn chat_completions(
    State(st): State<Arc<AppState>>,
    ApiJson(req): ApiJson<api::ChatRequest>,
) -> Result<Response, ApiError> {
    if req.messages.is_empty() {
        return Err(ApiError::bad(
            "messages must not be empty",
            Some("messages"),
        ));
    }
    let msgs: Vec<ChatMessage> = req
        .messages
        .iter()
        .map(|m| {
            Ok(ChatMessage {
                role: m.role.clone(),
                content: m.text().map_err(|e| ApiError::bad(e, Some("messages")))?,
            })
        })
        .collect::<Result<_, ApiError>>()?;
    let text = st
        .tokenizer
        .apply_chat_template(&msgs, true)
        .map_err(|e| ApiError::bad(e.to_string(), Some("messages")))?;
    let prompt = encode(&st, &text)?;
    let plan = plan(&st, Kind::Chat, req.common, vec![prompt]).await?;
    run(&st, plan).await
}

/// Checks the request's fields and resolves its model (listing the
/// libraries again when the name is new).
async fn plan(
    st: &Arc<AppState>,
    kind: Kind,
    mut c: api::Common,
    prompts: Vec<Vec<u32>>,
) -> Result<Plan, ApiError> {
    unsupported(&c)?;
    if let Some(m) = c.max_completion_tokens {
        if c.max_tokens.is_some_and(|t| t != m) {
            return Err(ApiError::bad(
                "max_tokens and max_completion_tokens disagree; send one",
                Some("max_completion_tokens"),
            ));
        }
        c.max_tokens = Some(m);
    }
    for (v, param) in [
        (c.presence_penalty, "presence_penalty"),
        (c.frequency_penalty, "frequency_penalty"),
    ] {
        if v.is_some_and(|v| !(-2.0..=2.0).contains(&v)) {
            return Err(ApiError::bad(
                format!("{param} must be between -2 and 2"),
                Some(param),
            ));
        }
    }
    let n = c.n.unwrap_or(1);
    if n == 0 {
        return Err(ApiError::bad("n must be at least 1", Some("n")));
    }
    let logprobs = logprobs(kind, &c)?;
    let target = match st.catalog.resolve(&c) {
        Err(e) if e.code == Some("model_not_found") => {
            crate::relist(st).await?;
            st.catalog.resolve(&c)?
        }
        r => r?,
    };
    // Checked before anything is queued.
    let params = (0..prompts.len() * n)
        .map(|i| params(&c, i))
        .collect::<Result<Vec<_>, _>>()?;
    let max_tokens = params[0].max_tokens;
    for p in &prompts {
        if p.len() + max_tokens > st.max_context && c.max_tokens.is_some() {
            return Err(ApiError::bad(
                format!(
                    "the prompt has {} tokens and max_tokens is {max_tokens}, past the model's context window of {} tokens",
                    p.len(),
                    st.max_context
                ),
                Some("max_tokens"),
            ));
        }
    }
    Ok(Plan {
        kind,
        target,
        n,
        stop: c.stop.as_ref().map(api::Stop::list).unwrap_or_default(),
        explain: explain::mode(&c)?,
        logprobs,
        logit_bias: logit_bias(&c, st.vocab_size)?,
        params,
        prompts,
        common: c,
    })
}

/// Refuses the OpenAI fields this server does not implement, rather than
/// answering as if they had been applied.
fn unsupported(c: &api::Common) -> Result<(), ApiError> {
    let refuse = |param: &'static str, what: &str| {
        Err(ApiError::bad(
            format!("{param} is not supported by this server ({what})"),
            Some(param),
        ))
    };
    if c.echo == Some(true) {
        return refuse("echo", "the response has the completion only");
    }
    if c.best_of.is_some_and(|b| b > 1) {
        return refuse("best_of", "use n and pick on the client");
    }
    if c.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return refuse("suffix", "no insertion mode");
    }
    if c.tools.as_ref().is_some_and(|t| !t.is_null()) {
        return refuse("tools", "no tool calling");
    }
    if c.functions.as_ref().is_some_and(|t| !t.is_null()) {
        return refuse("functions", "no function calling");
    }
    if c.response_format
        .as_ref()
        .is_some_and(|f| !f.is_null() && f["type"] != "text")
    {
        return refuse(
            "response_format",
            "no constrained decoding; only {\"type\": \"text\"}",
        );
    }
    Ok(())
}

/// `logprobs` as the number of most likely tokens to list, or `None`.
fn logprobs(kind: Kind, c: &api::Common) -> Result<Option<usize>, ApiError> {
    use serde_json::Value;
    let range = |k: u64, param| {
        if k as usize > MAX_TOP_LOGPROBS {
            Err(ApiError::bad(
                format!("{param} must be between 0 and {MAX_TOP_LOGPROBS}, got {k}"),
                Some(param),
            ))
        } else {
            Ok(k as usize)
        }
    };
    match (kind, &c.logprobs) {
        (Kind::Completion, None | Some(Value::Null)) => Ok(None),
        (Kind::Completion, Some(Value::Number(k))) if k.as_u64().is_some() => {
            range(k.as_u64().expect("u64"), "logprobs").map(Some)
        }
        (Kind::Completion, Some(v)) => Err(ApiError::bad(
            format!("logprobs must be an integer between 0 and {MAX_TOP_LOGPROBS} (the most likely tokens to list), got {v}"),
            Some("logprobs"),
        )),
        (Kind::Chat, None | Some(Value::Null) | Some(Value::Bool(false))) => {
            if c.top_logprobs.is_some() {
                return Err(ApiError::bad(
                    "top_logprobs needs logprobs: true",
                    Some("top_logprobs"),
                ));
            }
            Ok(None)
        }
        (Kind::Chat, Some(Value::Bool(true))) => {
            range(c.top_logprobs.unwrap_or(0) as u64, "top_logprobs").map(Some)
        }
        (Kind::Chat, Some(v)) => Err(ApiError::bad(
            format!("logprobs must be true or false, got {v}"),
            Some("logprobs"),
        )),
    }
}

/// `logit_bias` as (token, bias) pairs, each checked.
fn logit_bias(c: &api::Common, vocab: usize) -> Result<Vec<(u32, f32)>, ApiError> {
    let Some(map) = &c.logit_bias else {
        return Ok(Vec::new());
    };
    map.iter()
        .map(|(k, &b)| {
            let t: u32 = k.parse().map_err(|_| {
                ApiError::bad(
                    format!("logit_bias keys are token ids, got `{k}`"),
                    Some("logit_bias"),
                )
            })?;
            if t as usize >= vocab {
                return Err(ApiError::bad(
                    format!("logit_bias: token id {t} is outside the vocabulary ({vocab} tokens)"),
                    Some("logit_bias"),
                ));
            }
            if !(-100.0..=100.0).contains(&b) {
                return Err(ApiError::bad(
                    format!("logit_bias values must be in [-100, 100], got {b} for token {t}"),
                    Some("logit_bias"),
                ));
            }
            Ok((t, b as f32))
        })
        .collect()
}

fn params(c: &api::Common, i: usize) -> Result<SamplingParams, ApiError> {
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

/// Submits every (prompt, choice) job at once; refuses all of them (429)
/// when the queue has no room for them.
fn submit(st: &AppState, plan: &Plan) -> Result<Vec<UnboundedReceiver<Event>>, ApiError> {
    let count = plan.prompts.len() * plan.n;
    let q = &st.engine.waiting;
    let before = q.fetch_add(count, Ordering::SeqCst);
    if before + count > st.max_queue {
        q.fetch_sub(count, Ordering::SeqCst);
        return Err(ApiError::busy(before));
    }
    let mut out = Vec::with_capacity(count);
    let jobs = st
        .jobs
        .lock()
        .map_err(|_| ApiError::internal("the model thread is gone"))?;
    for (i, prompt) in plan.prompts.iter().enumerate() {
        for j in 0..plan.n {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            st.metrics.job_queued();
            let job = Job {
                prompt: prompt.clone(),
                params: plan.params[i * plan.n + j].clone(),
                stop: plan.stop.clone(),
                target: plan.target.clone(),
                explain: plan.explain,
                logprobs: plan.logprobs,
                ignore_eos: plan.common.ignore_eos,
                logit_bias: plan.logit_bias.clone(),
                presence_penalty: plan.common.presence_penalty.unwrap_or(0.0) as f32,
                frequency_penalty: plan.common.frequency_penalty.unwrap_or(0.0) as f32,
                events: tx,
                submitted: std::time::Instant::now(),
            };
            if jobs.send(job).is_err() {
                return Err(ApiError::internal("the model thread is gone"));
            }
            out.push(rx);
        }
    }
    Ok(out)
}

async fn run(st: &AppState, plan: Plan) -> Result<Response, ApiError> {
    let receivers = submit(st, &plan)?;
    let id = format!(
        "{}-{:x}{:x}",
        if plan.kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        },
        api::now_secs(),
        std::process::id()
    );
    if plan.common.stream {
        return Ok(stream(plan, id, receivers));
    }
    let mut done = Vec::with_capacity(receivers.len());
    for rx in receivers {
        done.push(collect(rx).await?);
    }
    let choices: Vec<serde_json::Value> = done
        .iter()
        .enumerate()
        .map(|(i, f)| choice(&plan, i, f))
        .collect();
    let prompt_tokens: usize = done.iter().step_by(plan.n).map(|f| f.prompt_tokens).sum();
    let completion_tokens: usize = done.iter().map(|f| f.completion_tokens).sum();
    Ok(Json(serde_json::json!({
        "id": id,
        "object": if plan.kind == Kind::Chat { "chat.completion" } else { "text_completion" },
        "created": api::now_secs(),
        "model": plan.common.model,
        "choices": choices,
        "usage": Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        },
    }))
    .into_response())
}

async fn collect(mut rx: UnboundedReceiver<Event>) -> Result<Finished, ApiError> {
    let mut f = Finished::default();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Text(t) => f.text.push_str(&t),
            Event::Explain(v) => f.explain.push(v),
            Event::Logprob(l) => f.logprobs.push(l),
            Event::Done {
                reason,
                prompt_tokens,
                completion_tokens,
            } => {
                f.reason = api::finish_reason(reason);
                f.prompt_tokens = prompt_tokens;
                f.completion_tokens = completion_tokens;
                return Ok(f);
            }
            Event::Error { message, server } => {
                return Err(if server {
                    ApiError::internal(message)
                } else {
                    ApiError::bad(message, None)
                })
            }
        }
    }
    Err(ApiError::internal("the model thread stopped mid-request"))
}

/// A whole choice of a non-streamed response.
fn choice(plan: &Plan, index: usize, f: &Finished) -> serde_json::Value {
    let mut c = match plan.kind {
        Kind::Completion => serde_json::json!({"index": index, "text": f.text}),
        Kind::Chat => serde_json::json!({
            "index": index,
            "message": {"role": "assistant", "content": f.text},
        }),
    };
    c["logprobs"] = logprobs_json(plan, &f.logprobs, 0);
    c["finish_reason"] = f.reason.into();
    if plan.explain.is_some() {
        c["quiver_explain"] = f.explain.clone().into();
    }
    c
}

/// `logprobs` of a choice or chunk in the endpoint's shape (`null` when
/// not asked for); `offset` is the text length before these tokens.
fn logprobs_json(plan: &Plan, lps: &[TokenLogprob], offset: usize) -> serde_json::Value {
    if plan.logprobs.is_none() {
        return serde_json::Value::Null;
    }
    match plan.kind {
        Kind::Completion => {
            let mut at = offset;
            let offsets: Vec<usize> = lps
                .iter()
                .map(|l| {
                    let o = at;
                    at += l.token.chars().count();
                    o
                })
                .collect();
            serde_json::json!({
                "tokens": lps.iter().map(|l| l.token.clone()).collect::<Vec<_>>(),
                "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>(),
                "top_logprobs": lps.iter().map(|l| {
                    l.top.iter().map(|(t, _, p)| (t.clone(), serde_json::json!(p))).collect::<serde_json::Map<_, _>>()
                }).collect::<Vec<_>>(),
                "text_offset": offsets,
            })
        }
        Kind::Chat => serde_json::json!({
            "content": lps.iter().map(|l| serde_json::json!({
                "token": l.token,
                "logprob": l.logprob,
                "bytes": l.bytes,
                "top_logprobs": l.top.iter().map(|(t, b, p)| serde_json::json!({
                    "token": t, "logprob": p, "bytes": b,
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        }),
    }
}

/// Per-choice state of a stream: what rides in its next chunk.
#[derive(Default)]
struct Pending {
    explain: Vec<serde_json::Value>,
    logprobs: Vec<TokenLogprob>,
    /// Characters of text sent so far (completions' `text_offset`).
    sent_chars: usize,
    role_sent: bool,
    prompt_tokens: usize,
    completion_tokens: usize,
}

/// The choices' events as server-sent events in OpenAI's chunk format,
/// `[DONE]` last (after a `usage` chunk with `stream_options.include_usage`).
/// A client that goes away drops the stream, and with it every job's
/// receiver: the engine frees their sequences at its next step.
fn stream(plan: Plan, id: String, receivers: Vec<UnboundedReceiver<Event>>) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<SseEvent>(64);
    tokio::spawn(async move {
        let mut events = StreamMap::new();
        for (i, r) in receivers.into_iter().enumerate() {
            events.insert(i, UnboundedReceiverStream::new(r));
        }
        let mut pending: Vec<Pending> = (0..events.len()).map(|_| Pending::default()).collect();
        let created = api::now_secs();
        let chunk = |choices: serde_json::Value| {
            serde_json::json!({
                "id": id,
                "object": if plan.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
                "created": created,
                "model": plan.common.model,
                "choices": choices,
            })
        };
        while let Some((i, ev)) = events.next().await {
            let p = &mut pending[i];
            let (text, finish) = match ev {
                Event::Explain(v) => {
                    p.explain.push(v);
                    continue;
                }
                Event::Logprob(l) => {
                    p.logprobs.push(l);
                    continue;
                }
                Event::Text(t) => (Some(t), None),
                Event::Done {
                    reason,
                    prompt_tokens,
                    completion_tokens,
                } => {
                    p.prompt_tokens = prompt_tokens;
                    p.completion_tokens = completion_tokens;
                    (None, Some(api::finish_reason(reason)))
                }
                Event::Error { message, server } => {
                    let kind = if server {
                        "server_error"
                    } else {
                        "invalid_request_error"
                    };
                    let err = serde_json::json!({"error": {
                        "message": message, "type": kind, "param": null, "code": null
                    }});
                    if tx
                        .send(SseEvent::default().data(err.to_string()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    continue;
                }
            };
            let mut c = match plan.kind {
                Kind::Completion => {
                    serde_json::json!({"index": i, "text": text.clone().unwrap_or_default()})
                }
                Kind::Chat => {
                    let mut delta = serde_json::Map::new();
                    if !p.role_sent {
                        delta.insert("role".into(), "assistant".into());
                        p.role_sent = true;
                    }
                    if let Some(t) = &text {
                        delta.insert("content".into(), t.clone().into());
                    }
                    serde_json::json!({"index": i, "delta": delta})
                }
            };
            c["logprobs"] = logprobs_json(&plan, &p.logprobs, p.sent_chars);
            p.sent_chars += p
                .logprobs
                .iter()
                .map(|l| l.token.chars().count())
                .sum::<usize>();
            p.logprobs.clear();
            c["finish_reason"] = finish.into();
            if plan.explain.is_some() {
                c["quiver_explain"] = std::mem::take(&mut p.explain).into();
            }
            let data = chunk(serde_json::json!([c])).to_string();
            if tx.send(SseEvent::default().data(data)).await.is_err() {
                return; // the client is gone
            }
        }
        if plan
            .common
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
        {
            let prompt_tokens: usize = pending
                .iter()
                .step_by(plan.n)
                .map(|p| p.prompt_tokens)
                .sum();
            let completion_tokens: usize = pending.iter().map(|p| p.completion_tokens).sum();
            let mut u = chunk(serde_json::json!([]));
            u["usage"] = serde_json::json!(Usage {
                prompt_tokens,
                completion_tokens,
                total_tokens: prompt_tokens + completion_tokens,
            });
            let _ = tx.send(SseEvent::default().data(u.to_string())).await;
        }
        let _ = tx.send(SseEvent::default().data("[DONE]")).await;
    });
    Sse::new(ReceiverStream::new(rx).map(Ok::<_, Infallible>)).into_response()
}

/// The prompts of a completion request: a string, a list of strings, a
/// list of token ids, or a list of such lists.
fn prompt_ids(st: &AppState, v: &serde_json::Value) -> Result<Vec<Vec<u32>>, ApiError> {
    use serde_json::Value;
    let tokens = |a: &[Value]| -> Option<Vec<u32>> {
        a.iter()
            .map(|x| x.as_u64().and_then(|t| u32::try_from(t).ok()))
            .collect()
    };
    let prompts = match v {
        Value::String(s) => vec![encode(st, s)?],
        Value::Array(a) if !a.is_empty() && a.iter().all(Value::is_string) => a
            .iter()
            .map(|s| encode(st, s.as_str().expect("string")))
            .collect::<Result<_, _>>()?,
        Value::Array(a) if !a.is_empty() && a.iter().all(Value::is_number) => {
            vec![check_ids(st, tokens(a).ok_or_else(bad_prompt)?)?]
        }
        Value::Array(a) if !a.is_empty() && a.iter().all(Value::is_array) => a
            .iter()
            .map(|x| {
                let ids = tokens(x.as_array().expect("array")).ok_or_else(bad_prompt)?;
                check_ids(st, ids)
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(bad_prompt()),
    };
    Ok(prompts)
}

fn bad_prompt() -> ApiError {
    ApiError::bad(
        "prompt must be a string, a list of strings, a list of token ids, or a list of lists of token ids",
        Some("prompt"),
    )
}

fn encode(st: &AppState, text: &str) -> Result<Vec<u32>, ApiError> {
    let ids = st
        .tokenizer
        .encode(text)
        .map_err(|e| ApiError::bad(e.to_string(), Some("prompt")))?;
    check_ids(st, ids)
}

fn check_ids(st: &AppState, ids: Vec<u32>) -> Result<Vec<u32>, ApiError> {
    if ids.is_empty() {
        return Err(ApiError::bad("the prompt is empty", Some("prompt")));
    }
    if let Some(bad) = ids.iter().find(|&&t| t as usize >= st.vocab_size) {
        return Err(ApiError::bad(
            format!(
                "token id {bad} is outside the vocabulary ({} tokens)",
                st.vocab_size
            ),
            Some("prompt"),
        ));
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
