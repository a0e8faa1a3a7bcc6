//! OpenAI's request and response shapes for `/v1/completions`,
//! `/v1/chat/completions` and `/v1/models`, with Quiver's route fields
//! (`route`, `top_k`, `router_temperature`, `mix`) as optional extras.

use serde::{Deserialize, Serialize};

/// `stop`: one string or a list of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn list(&self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s.clone()],
            Stop::Many(v) => v.clone(),
        }
    }
}

/// The fields both endpoints share.
#[derive(Debug, Clone, Deserialize)]
pub struct Common {
    pub model: String,
    #[serde(default)]
    pub max_tokens: Option<usize>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    pub n: Option<usize>,
    #[serde(default)]
    pub stream: bool,
    /// Completions: how many most likely tokens to list per generated
    /// token (0-20); chat: `true` to return log-probabilities.
    #[serde(default)]
    pub logprobs: Option<serde_json::Value>,
    /// Chat: how many most likely tokens to list (0-20; needs `logprobs`).
    #[serde(default)]
    pub top_logprobs: Option<usize>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Token id (as a string) to a bias in [-100, 100] added to its logit
    /// before sampling; -100 bans the token, 100 all but forces it.
    #[serde(default)]
    pub logit_bias: Option<std::collections::BTreeMap<String, f64>>,
    /// OpenAI's penalties in [-2, 2]: subtracted from a token's logit once
    /// it has been generated (presence) and per time (frequency).
    #[serde(default)]
    pub presence_penalty: Option<f64>,
    #[serde(default)]
    pub frequency_penalty: Option<f64>,
    /// Chat's newer name for `max_tokens`.
    #[serde(default)]
    pub max_completion_tokens: Option<usize>,
    /// Fields this server does not implement: refused when set, never
    /// silently ignored.
    #[serde(default)]
    pub echo: Option<bool>,
    #[serde(default)]
    pub best_of: Option<usize>,
    #[serde(default)]
    pub suffix: Option<String>,
    #[serde(default)]
    pub tools: Option<serde_json::Value>,
    #[serde(default)]
    pub functions: Option<serde_json::Value>,
    #[serde(default)]
    pub response_format: Option<serde_json::Value>,
    /// Keep generating past the end-of-sequence token, up to `max_tokens`
    /// (as vLLM's `ignore_eos`: benchmarks, load tests).
    #[serde(default)]
    pub ignore_eos: bool,
    /// Quiver: a route overriding the one `model` names (`arrow`, `uniform`, ...).
    #[serde(default)]
    pub route: Option<String>,
    #[serde(default)]
    pub top_k: Option<usize>,
    #[serde(default)]
    pub router_temperature: Option<f64>,
    #[serde(default)]
    pub mix: Option<String>,
    /// Quiver: `true` (experts' weights per generated token, averaged over
    /// layers) or `"layers"` (also each layer's choice).
    #[serde(default)]
    pub quiver_explain: Option<serde_json::Value>,
}

/// `stream_options`: `include_usage` adds a last chunk with `usage`.
#[derive(Debug, Clone, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// A string or a list of strings (each gets `n` choices).
    pub prompt: serde_json::Value,
    #[serde(flatten)]
    pub common: Common,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessageIn {
    pub role: String,
    /// A string, or a list of parts of which text parts are used.
    pub content: serde_json::Value,
}

impl ChatMessageIn {
    /// The message's text: the string, or its text parts joined.
    pub fn text(&self) -> Result<String, String> {
        match &self.content {
            serde_json::Value::String(s) => Ok(s.clone()),
            serde_json::Value::Null => Ok(String::new()),
            serde_json::Value::Array(parts) => parts
                .iter()
                .map(|p| match (p["type"].as_str(), p["text"].as_str()) {
                    (Some("text"), Some(t)) => Ok(t.to_string()),
                    (kind, _) => Err(format!(
                        "message content parts of type {} are not supported (text only)",
                        kind.unwrap_or("?")
                    )),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(|v| v.concat()),
            v => Err(format!(
                "message content must be a string or a list of parts, got {v}"
            )),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessageIn>,
    #[serde(flatten)]
    pub common: Common,
}

#[derive(Debug, Clone, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

/// OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

/// `finish_reason` in OpenAI's words.
pub fn finish_reason(r: quiver_core::generate::StopReason) -> &'static str {
    use quiver_core::generate::StopReason;
    match r {
        StopReason::Eos | StopReason::Stopped => "stop",
        StopReason::MaxTokens | StopReason::ContextFull => "length",
    }
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// An HTTP error in OpenAI's shape.
#[derive(Debug)]
pub struct ApiError {
    pub status: axum::http::StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
    /// `Retry-After` seconds (429).
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: axum::http::StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    pub fn bad(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self {
            param,
            ..Self::new(
                axum::http::StatusCode::BAD_REQUEST,
                "invalid_request_error",
                message,
            )
        }
    }

    pub fn no_model(model: &str) -> Self {
        Self {
            param: Some("model"),
            code: Some("model_not_found"),
            ..Self::new(
                axum::http::StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("the model `{model}` does not exist; GET /v1/models lists the base model, every expert and every route"),
            )
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            message,
        )
    }

    pub fn busy(waiting: usize) -> Self {
        Self {
            code: Some("rate_limit_exceeded"),
            retry_after: Some(1),
            ..Self::new(
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                format!("the server is busy: {waiting} requests are waiting (--max-queue); retry after a second"),
            )
        }
    }

    pub fn unauthorized() -> Self {
        Self {
            code: Some("invalid_api_key"),
            ..Self::new(
                axum::http::StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "a valid API key is needed: send `Authorization: Bearer <key>` (the server was started with --api-key)",
            )
        }
    }
}

impl axum::response::IntoResponse for ApiError {
    fn into_response(self) -> axum::response::Response {
        let body = ErrorBody {
            error: ErrorDetail {
                message: self.message,
                kind: self.kind,
                param: self.param,
                code: self.code,
            },
        };
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, s.into());
        }
        resp
    }
}

/// A JSON body whose rejection (bad JSON, a missing field, a body over the
/// size limit) is answered in OpenAI's error shape.
pub struct ApiJson<T>(pub T);

impl<S, T> axum::extract::FromRequest<S> for ApiJson<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Self(v)),
            Err(e) => {
                let status = e.status();
                let mut err = ApiError::bad(e.body_text(), None);
                if status == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                    err.status = status;
                    err.message =
                        "the request body is larger than the server accepts (--max-body-bytes)"
                            .into();
                }
                Err(err)
            }
        }
    }
}
