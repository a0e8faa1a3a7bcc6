//! `quiver_explain`: which experts produced each generated token. A
//! [`Recorder`] observes every routed layer; for each forward pass it keeps
//! the decision at the last position (the one whose output is the next
//! token) and the engine takes it after every token: the experts' weights
//! averaged over the routed layers, and with `"layers"` each layer's top-k.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

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

/// One layer's decision for one token.
#[derive(Debug, Clone, PartialEq)]
struct LayerChoice {
    layer: String,
    experts: Vec<(String, f32)>,
}

/// Routing decisions of the current forward pass, when a job asked; and
/// every decision's experts, counted for `/metrics`.
#[derive(Debug)]
pub struct Recorder {
    state: Mutex<Option<Vec<LayerChoice>>>,
    metrics: Arc<Metrics>,
}

impl Recorder {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            state: Mutex::new(None),
            metrics,
        }
    }

    /// Starts recording (for a job that asked) or stops.
    pub fn set_active(&self, on: bool) {
        *self.state.lock().expect("recorder") = on.then(Vec::new);
    }

    /// The decisions since the last call, as the JSON of one token's
    /// explanation; `None` when not recording or nothing was routed.
    pub fn take(&self, mode: ExplainMode) -> Option<serde_json::Value> {
        let mut st = self.state.lock().expect("recorder");
        let layers = std::mem::take(st.as_mut()?);
        if layers.is_empty() {
            return None;
        }
        let mut mean: BTreeMap<&str, f64> = BTreeMap::new();
        for l in &layers {
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
        let mut st = self.state.lock().expect("recorder");
        let Some(layers) = st.as_mut() else {
            return;
        };
        if d.b_sz == 0 || d.seq_len == 0 {
            return;
        }
        // Row 0, last position: the token this pass predicts.
        let t = d.seq_len - 1;
        let sel = d.selection;
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
