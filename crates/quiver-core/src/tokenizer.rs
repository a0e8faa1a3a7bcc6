//! Tokenizer: a Hugging Face `tokenizers` tokenizer plus what a causal LM
//! needs around it (end-of-sequence ids, the chat template).

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    json: String,
    eos_ids: Vec<u32>,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("eos_ids", &self.eos_ids)
            .finish()
    }
}

/// One message of a chat, for [`Tokenizer::apply_chat_template`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// The fields of `tokenizer_config.json` we use.
#[derive(Debug, Default, Deserialize)]
struct TokenizerConfig {
    #[serde(default)]
    chat_template: Option<serde_json::Value>,
    #[serde(default)]
    bos_token: Option<serde_json::Value>,
    #[serde(default)]
    eos_token: Option<serde_json::Value>,
}

fn token_str(v: &Option<serde_json::Value>) -> Option<String> {
    match v {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Object(o)) => {
            o.get("content").and_then(|c| c.as_str()).map(String::from)
        }
        _ => None,
    }
}

impl Tokenizer {
    /// Builds from a `tokenizer.json` document.
    pub fn from_json_str(
        json: &str,
        eos_ids: Vec<u32>,
        chat_template: Option<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(json.as_bytes())
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut eos_ids = eos_ids;
        if let Some(t) = eos_token.as_deref().and_then(|t| inner.token_to_id(t)) {
            if !eos_ids.contains(&t) {
                eos_ids.push(t);
            }
        }
        Ok(Self {
            inner,
            json: json.to_string(),
            eos_ids,
            chat_template,
            bos_token,
            eos_token,
        })
    }

    /// Reads `dir/tokenizer.json` and, when present, `dir/tokenizer_config.json`.
    pub fn from_dir(dir: &Path, eos_ids: Vec<u32>) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let json = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: TokenizerConfig = match std::fs::read_to_string(&cfg_path) {
            Ok(s) => serde_json::from_str(&s).map_err(|e| Error::Json {
                path: cfg_path.clone(),
                source: e,
            })?,
            Err(_) => TokenizerConfig::default(),
        };
        let chat_template = match cfg.chat_template {
            Some(serde_json::Value::String(s)) => Some(s),
            // A list of named templates: take "default", else the first.
            Some(serde_json::Value::Array(list)) => {
                let pick = |v: &serde_json::Value| {
                    v.get("template").and_then(|t| t.as_str()).map(String::from)
                };
                list.iter()
                    .find(|v| v.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(pick)
                    .or_else(|| list.first().and_then(pick))
            }
            _ => None,
        };
        let chat_template =
            chat_template.or_else(|| std::fs::read_to_string(dir.join("chat_template.jinja")).ok());
        Self::from_json_str(
            &json,
            eos_ids,
            chat_template,
            token_str(&cfg.bos_token),
            token_str(&cfg.eos_token),
        )
        .map_err(|e| match e {
            Error::Tokenizer(msg) => Error::Tokenizer(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text`, without BOS or any other added special token.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Ids that end generation.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The `tokenizer.json` document this tokenizer was built from.
    pub fn to_json(&self) -> &str {
        &self.json
    }

    /// A `tokenizer_config.json` that transformers' `AutoTokenizer` reads.
    pub fn config_json(&self) -> serde_json::Value {
        serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "chat_template": self.chat_template,
            "clean_up_tokenization_spaces": false,
            "model_max_length": 1_000_000_000_000_000_000u64,
        })
    }

    /// Renders the model's chat template (Jinja) for `messages`.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            Error::invalid(
                "this model has no chat template; drop --chat and write the prompt yourself",
            )
        })?;
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", template)
            .map_err(|e| Error::Tokenizer(format!("chat template: {e}")))?;
        let tmpl = env.get_template("chat").expect("just added");
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        })
        .map_err(|e| Error::Tokenizer(format!("chat template: {e}")))
    }
}
