//! `quiver_explain`: which experts produced each generated token. A
//! [`Recorder`] observes every routed layer; for each forward pass it keeps
//! each sequence's decision at its last position (the one whose output is
//! the next token) and the engine takes it after every token: the experts' weights
//! averaged over the routed layers, and with `"layers"` each layer's top-k.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use quiver_core::batch::RowLayout;
use quiver_core::routing::{RouteDecision, RouteObserver};

use crate::metrics::Metrics;

/// What a request asked to see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExplainMode {
    /// Weights aggregated over layers.
    Tokens,
    /// Also each layer's chosen experts and weights.
    Layers,
}

/// The request's `quiver_explain` field.
pub fn mode(c: &crate::api::Common) -> Result<Option<ExplainMode>, crate::api::ApiError> {
    match &c.quiver_explain {
        None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => Ok(None),
        Some(serde_json::Value::Bool(true)) => Ok(Some(ExplainMode::Tokens)),
        Some(serde_json::Value::String(s)) if s == "layers" => Ok(Some(ExplainMode::Layers)),
        Some(v) => Err(crate::api::ApiError::bad(
            format!("quiver_explain must be true, false or \"layers\", not {v}"),
            Some("quiver_explain"),
        )),
    }
}

/// One layer's decision for one token.
#[derive(Debug, Clone, PartialEq)]
struct LayerChoice {
    layer: String,
    experts: Vec<(String, f32)>,
}

/// Routing decisions of the current forward pass, per sequence of the
/// batch that asked; and every decision's experts, counted for `/metrics`.
/// In a batch each sequence's adapter runs on its own rows, so a decision
/// belongs to the sequences the batch's [`RowLayout::current`] names.
#[derive(Debug)]
pub struct Recorder {
    /// For each sequence of the pass: `Some` (its layers' choices so far)
    /// when its next token is to be explained.
    state: Mutex<Vec<Option<Vec<LayerChoice>>>>,
    layout: Arc<RowLayout>,
    metrics: Arc<Metrics>,
}

impl Recorder {
    pub fn new(metrics: Arc<Metrics>, layout: Arc<RowLayout>) -> Self {
        Self {
            state: Mutex::new(Vec::new()),
            layout,
            metrics,
        }
    }

    /// Starts a pass: `explain[i]` says whether sequence `i`'s decisions
    /// are kept.
    pub fn begin(&self, explain: Vec<bool>) {
        *self.state.lock().expect("recorder") =
            explain.into_iter().map(|on| on.then(Vec::new)).collect();
    }

    /// Sequence `i`'s decisions of the pass, as the JSON of one token's
    /// explanation; `None` when it was not recorded or nothing was routed.
    pub fn take(&self, i: usize, mode: Option<ExplainMode>) -> Option<serde_json::Value> {
        let mode = mode?;
        let layers = self.state.lock().expect("recorder").get_mut(i)?.take()?;
        explanation(&layers, mode)
    }
}

/// One token's explanation: the experts' weights averaged over the routed
/// layers, and with [`ExplainMode::Layers`] each layer's choice.
fn explanation(layers: &[LayerChoice], mode: ExplainMode) -> Option<serde_json::Value> {
    if layers.is_empty() {
        return None;
    }
    let mut mean: BTreeMap<&str, f64> = BTreeMap::new();
    for l in layers {
        for (e, w) in &l.experts {
            *mean.entry(e.as_str()).or_default() += *w as f64 / layers.len() as f64;
        }
    }
    let mut experts: Vec<(&str, f64)> = mean.into_iter().collect();
    experts.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
    let mut v = serde_json::json!({
        "experts": experts
            .iter()
            .map(|(e, w)| serde_json::json!({"expert": e, "weight": w}))
            .collect::<Vec<_>>(),
    });
    if mode == ExplainMode::Layers {
        v["layers"] = layers
            .iter()
            .map(|l| {
                serde_json::json!({
                    "layer": l.layer,
                    "experts": l.experts.iter().map(|(e, w)| serde_json::json!({"expert": e, "weight": w})).collect::<Vec<_>>(),
                })
            })
            .collect();
    }
    Some(v)
}

impl RouteObserver for Recorder {
    fn on_route(&self, d: &RouteDecision<'_>) {
        let mut counts = vec![0u64; d.names.len()];
        for &e in &d.selection.experts {
            counts[e as usize] += 1;
        }
        for (name, n) in d.names.iter().zip(counts) {
            if n > 0 {
                self.metrics.experts_chosen(name, n);
            }
        }
        if d.b_sz == 0 || d.seq_len == 0 {
            return;
        }
        // The call's rows are the current sequences' new tokens, one
        // sequence after the other; each one's last row is the token this
        // pass predicts for it.
        let rows = d.b_sz * d.seq_len;
        let run = self.layout.current();
        let segments = self.layout.segments();
        let lens: Vec<usize> = match segments.get(run.clone()) {
            Some(s) if s.iter().map(|x| x.0).sum::<usize>() == rows => {
                s.iter().map(|x| x.0).collect()
            }
            // One row per sequence, or no batch layout (one sequence).
            Some(s) if s.len() == rows => vec![1; rows],
            _ => vec![rows],
        };
        let mut st = self.state.lock().expect("recorder");
        let sel = d.selection;
        let mut end = 0;
        for (i, len) in run.zip(lens) {
            end += len;
            let Some(Some(layers)) = st.get_mut(i) else {
                continue;
            };
            let t = end - 1;
            let experts = (0..sel.k)
                .map(|j| {
                    let e = sel.experts[t * sel.k + j] as usize;
                    (d.names[e].clone(), sel.weights[t * sel.k + j])
                })
                .collect();
            layers.push(LayerChoice {
                layer: d.layer.to_string(),
                experts,
            });
        }
    }
}
