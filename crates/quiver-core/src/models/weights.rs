//! A named set of tensors a model is built from, whichever file they came
//! from, with errors that name that file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Tensors by Hugging Face name (`model.layers.0.self_attn.q_proj.weight`).
#[derive(Debug, Clone)]
pub struct WeightMap {
    /// Where they came from, for error messages.
    pub source: PathBuf,
    pub tensors: HashMap<String, Tensor>,
}

impl WeightMap {
    pub fn new(source: impl Into<PathBuf>, tensors: HashMap<String, Tensor>) -> Self {
        Self {
            source: source.into(),
            tensors,
        }
    }

    /// Loads one or more safetensors files, converting every tensor to `dtype`.
    pub fn from_safetensors(files: &[PathBuf], dtype: DType, device: &Device) -> Result<Self> {
        let mut tensors = HashMap::new();
        for file in files {
            for (name, t) in load_safetensors(file, device)? {
                tensors.insert(name, t.to_dtype(dtype)?);
            }
        }
        let source = match files {
            [one] => one.clone(),
            _ => files
                .first()
                .and_then(|f| f.parent())
                .map(Path::to_path_buf)
                .unwrap_or_default(),
        };
        Ok(Self { source, tensors })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The tensor `name`, checked to have `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.tensors.get(name).ok_or_else(|| Error::MissingWeight {
            path: self.source.clone(),
            name: name.to_string(),
        })?;
        if t.dims() != shape {
            return Err(Error::WeightShape {
                path: self.source.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                got: t.dims().to_vec(),
            });
        }
        Ok(t.clone())
    }

    pub fn get_opt(&self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        if self.contains(name) {
            self.get(name, shape).map(Some)
        } else {
            Ok(None)
        }
    }
}

/// Reads a safetensors file with an error that names it when the header or
/// data is damaged.
pub fn load_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the map is read-only and dropped before this function
    // returns; a file changed underneath by another process could give
    // wrong values but not unsoundness in safe code we rely on.
    let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let st = safetensors_header_check(path, &bytes)?;
    let mut out = HashMap::with_capacity(st.len());
    for (name, view) in st {
        let t = candle_core::safetensors::Load::load(&view, device).map_err(|e| {
            Error::Safetensors {
                path: path.to_path_buf(),
                msg: format!("tensor `{name}`: {e}"),
            }
        })?;
        out.insert(name, t);
    }
    Ok(out)
}

fn safetensors_header_check<'a>(
    path: &Path,
    bytes: &'a [u8],
) -> Result<Vec<(String, safetensors::tensor::TensorView<'a>)>> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| Error::Safetensors {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    Ok(st.tensors())
}
