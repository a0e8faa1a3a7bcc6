//! Typed errors of the expert library. Each renders as one sentence that
//! names the library, the expert or the stored file; they convert into the
//! crate-wide [`crate::error::Error`] so callers can use `?` across modules.

use crate::error::Error;
use crate::expert::BaseModelId;

/// Result alias of the library API.
pub type LibraryResult<T> = std::result::Result<T, LibraryError>;

#[derive(Debug, thiserror::Error)]
pub enum LibraryError {
    #[error("`{uri}` is not a library location: {reason}")]
    BadUri { uri: String, reason: String },

    #[error("{uri} is not a Quiver expert library ({reason})")]
    NotALibrary { uri: String, reason: String },

    #[error("{uri} already holds a Quiver expert library")]
    AlreadyExists { uri: String },

    #[error("library {library} has format version {version}, but this quiver reads only version {supported}; upgrade quiver")]
    UnsupportedVersion {
        library: String,
        version: u32,
        supported: u32,
    },

    /// `known`: " (it has: a, b, ...)" or empty.
    #[error("library {library} has no expert `{name}`{known}")]
    NoSuchExpert {
        library: String,
        name: String,
        known: String,
    },

    #[error("library {library} already has an expert `{name}`")]
    Duplicate { library: String, name: String },

    #[error("expert `{name}` in library {library} is being written by another process ({holder}); if no writer is running, clear it with `quiver library rm {name} --purge`")]
    WriteInProgress {
        library: String,
        name: String,
        holder: String,
    },

    #[error(
        "expert `{}` was trained on base model `{}` (fingerprint {}), but library {} holds experts for `{}` (fingerprint {})",
        .0.expert, .0.expert_base.id, short(&.0.expert_base.fingerprint), .0.library,
        .0.library_base.id, short(&.0.library_base.fingerprint)
    )]
    BaseModelMismatch(Box<BaseModelMismatch>),

    #[error(
        "expert `{}` does not fit library {}: its module `{}` is a {}x{} layer (out x in), but expert `{}` there adapts a {}x{} layer under that name (a different base model?)",
        .0.expert, .0.library, .0.module, .0.got[0], .0.got[1], .0.other, .0.expected[0], .0.expected[1]
    )]
    ShapeMismatch(Box<ShapeMismatch>),

    #[error("{location} is corrupt: {reason}; run `quiver library verify`")]
    Corrupt { location: String, reason: String },

    #[error("{location}: {msg}")]
    Storage { location: String, msg: String },

    #[error(transparent)]
    Core(#[from] Error),
}

/// Details of [`LibraryError::BaseModelMismatch`].
#[derive(Debug, Clone, PartialEq)]
pub struct BaseModelMismatch {
    pub library: String,
    pub expert: String,
    pub expert_base: BaseModelId,
    pub library_base: BaseModelId,
}

/// Details of [`LibraryError::ShapeMismatch`]; shapes are
/// `[out_features, in_features]` of the adapted layer.
#[derive(Debug, Clone, PartialEq)]
pub struct ShapeMismatch {
    pub library: String,
    pub expert: String,
    pub module: String,
    pub expected: [usize; 2],
    pub got: [usize; 2],
    /// The library's expert that has the expected shape.
    pub other: String,
}

impl From<LibraryError> for Error {
    fn from(e: LibraryError) -> Self {
        match e {
            LibraryError::Core(e) => e,
            other => Error::Library(other.to_string()),
        }
    }
}

impl From<candle_core::Error> for LibraryError {
    fn from(e: candle_core::Error) -> Self {
        LibraryError::Core(e.into())
    }
}

pub(crate) fn short(s: &str) -> &str {
    &s[..s.len().min(12)]
}

/// A storage error at `location`, flattened to one line.
pub(crate) fn storage(location: impl Into<String>, msg: impl std::fmt::Display) -> LibraryError {
    let msg = msg.to_string();
    let msg = msg.split_whitespace().collect::<Vec<_>>().join(" ");
    LibraryError::Storage {
        location: location.into(),
        msg,
    }
}
