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
    #[serde(default)]
    pub logprobs: Option<serde_json::Value>,
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

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// One prompt (a list of one string is accepted too).
    pub prompt: serde_json::Value,
    #[serde(flatten)]
    pub common: Common,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessageIn {
    pub role: String,
    pub content: String,
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
