//! Routing weight per layer and expert, summed over a data set: what
//! `quiver eval --routing-summary` reports per task, so that the share of
//! weight landing on the experts of a task's own family (the routing
//! accuracy of later papers) can be read per layer and overall. Unlike
//! `--explain`, it keeps sums, not every decision, so it costs nothing on
//! thousands of items.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::router::{RouteDecision, RouteObserver};

/// Sums of routing weights, by layer then expert.
#[derive(Debug, Default)]
pub struct RoutingTally {
    inner: Mutex<TallyState>,
}

#[derive(Debug, Default, Clone)]
struct TallyState {
    names: Vec<String>,
    /// layer -> (decisions, per-expert weight sums indexed like `names`).
    layers: BTreeMap<String, (u64, Vec<f64>)>,
}

/// A snapshot: per layer, the mean routing weight of every expert over
/// the (token, layer) decisions counted (each decision's weights sum to 1).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RoutingSummary {
    pub experts: Vec<String>,
    /// Layer name -> decisions counted there.
    pub decisions: BTreeMap<String, u64>,
    /// Layer name -> mean weight per expert (in the order of `experts`).
    pub mean_weight: BTreeMap<String, Vec<f64>>,
}

impl RoutingSummary {
    /// Share of the routing weight that lands on `members` at each layer
    /// and over all layers (decisions weighted equally).
    pub fn share_of(&self, members: &[String]) -> (BTreeMap<String, f64>, f64) {
        let weights: Vec<f64> = self
            .experts
            .iter()
            .map(|n| f64::from(u8::from(members.contains(n))))
            .collect();
        self.weighted_share(&weights)
    }

    /// [`RoutingSummary::share_of`] with each expert counted by a weight in
    /// [0, 1] (e.g. the fraction of a cluster expert's tasks in a family),
    /// in the order of `experts`.
    pub fn weighted_share(&self, weights: &[f64]) -> (BTreeMap<String, f64>, f64) {
        let mut per_layer = BTreeMap::new();
        let (mut total, mut count) = (0.0, 0u64);
        for (layer, w) in &self.mean_weight {
            let s: f64 = w.iter().zip(weights).map(|(a, b)| a * b).sum();
            let d = self.decisions.get(layer).copied().unwrap_or(0);
            per_layer.insert(layer.clone(), s);
            total += s * d as f64;
            count += d;
        }
        (
            per_layer,
            if count == 0 {
                0.0
            } else {
                total / count as f64
            },
        )
    }
}

impl RoutingTally {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The sums so far, as means.
    pub fn summary(&self) -> RoutingSummary {
        let st = self.inner.lock().expect("routing tally").clone();
        let mut decisions = BTreeMap::new();
        let mut mean_weight = BTreeMap::new();
        for (layer, (d, w)) in st.layers {
            let m = d.max(1) as f64;
            let mut w: Vec<f64> = w.iter().map(|x| x / m).collect();
            w.resize(st.names.len(), 0.0);
            decisions.insert(layer.clone(), d);
            mean_weight.insert(layer, w);
        }
        RoutingSummary {
            experts: st.names,
            decisions,
            mean_weight,
        }
    }

    /// Forgets the sums (between two tasks).
    pub fn reset(&self) {
        self.inner.lock().expect("routing tally").layers.clear();
    }
}

impl RouteObserver for RoutingTally {
    fn on_route(&self, d: &RouteDecision<'_>) {
        let mut st = self.inner.lock().expect("routing tally");
        if st.names.is_empty() {
            st.names = d.names.to_vec();
        }
        let n = st.names.len();
        let sel = d.selection;
        let entry = st
            .layers
            .entry(d.layer.to_string())
            .or_insert_with(|| (0, vec![0.0; n]));
        for (&e, &w) in sel.experts.iter().zip(&sel.weights) {
            if let Some(slot) = entry.1.get_mut(e as usize) {
                *slot += w as f64;
            }
        }
        entry.0 += (sel.experts.len() / sel.k.max(1)) as u64;
    }
}

/// Passes every decision to several observers (`--explain` and the tally).
#[derive(Debug)]
pub struct Fanout(pub Vec<Arc<dyn RouteObserver>>);

impl RouteObserver for Fanout {
    fn on_route(&self, d: &RouteDecision<'_>) {
        for o in &self.0 {
            o.on_route(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::Selection;

    #[test]
    fn tally_means_and_family_share() {
        let t = RoutingTally::new();
        let names = vec!["a".to_string(), "b".into(), "c".into()];
        // Two tokens, k = 2: (a 0.75, b 0.25), (c 0.5, a 0.5).
        let sel = Selection {
            k: 2,
            experts: vec![0, 1, 2, 0],
            weights: vec![0.75, 0.25, 0.5, 0.5],
        };
        for layer in ["l0", "l1"] {
            t.on_route(&RouteDecision {
                layer,
                names: &names,
                b_sz: 1,
                seq_len: 2,
                selection: &sel,
            });
        }
        let s = t.summary();
        assert_eq!(s.decisions["l0"], 2);
        assert_eq!(s.mean_weight["l0"], vec![0.625, 0.125, 0.25]);
        let (per, all) = s.share_of(&["a".into(), "b".into()]);
        assert_eq!(per["l1"], 0.75);
        assert_eq!(all, 0.75);
        t.reset();
        assert!(t.summary().decisions.is_empty());
    }
}
