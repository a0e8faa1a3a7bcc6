//! Typed errors of the core library.
//!
//! Every variant renders as one sentence that names the offending file or
//! value, so the binary can print it as-is without a backtrace.

use std::path::PathBuf;

/// Result alias used across `quiver-core`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: no such file or directory")]
    NotFound { path: PathBuf },

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("{path}: invalid model config: {msg}")]
    Config { path: PathBuf, msg: String },

    #[error("{path}: not a valid GGUF file: {msg}")]
    Gguf { path: PathBuf, msg: String },

    #[error("{path}: not a valid safetensors file: {msg}")]
    Safetensors { path: PathBuf, msg: String },

    #[error("{path}: weight `{name}` is missing")]
    MissingWeight { path: PathBuf, name: String },

    #[error("{path}: weight `{name}` has shape {got:?}, expected {expected:?}")]
    WeightShape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },

    /// A bad record in a data file, located by line (1-based).
    #[error("{path}:{line}: {msg}")]
    DataLine {
        path: PathBuf,
        line: usize,
        msg: String,
    },

    /// A bad data file, or a bad record in one that has no lines (Arrow).
    #[error("{path}: {msg}")]
    Data { path: PathBuf, msg: String },

    #[error("unknown task `{name}`{hint}")]
    UnknownTask { name: String, hint: String },

    #[error("interrupted after step {step}; run the same command again to resume")]
    Interrupted { step: usize },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("the input has {tokens} tokens but the model's context window is {max} tokens")]
    ContextTooLong { tokens: usize, max: usize },

    #[error("{0}")]
    InvalidArgument(String),

    /// An expert library could not be read or holds something damaged
    /// (its own error, flattened to one line).
    #[error("{0}")]
    Library(String),

    #[error("asset `{name}` is not available: {msg}")]
    Asset { name: String, msg: String },

    #[error("tensor error: {0}")]
    Candle(candle_core::Error),
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Candle(strip_backtrace(e))
    }
}

/// candle attaches a backtrace to errors when `RUST_BACKTRACE` is set and
/// prints it as part of the message; users get one sentence instead.
pub fn strip_backtrace(e: candle_core::Error) -> candle_core::Error {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => strip_backtrace(*inner),
        other => other,
    }
}

/// The message of a candle error without its backtrace.
pub fn candle_msg(e: candle_core::Error) -> String {
    strip_backtrace(e).to_string()
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::NotFound { path }
        } else {
            Error::Io { path, source }
        }
    }

    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }
}
