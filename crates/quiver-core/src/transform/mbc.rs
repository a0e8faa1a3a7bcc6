//! Model-based clustering (MBC) of a library of experts, steps 2 to 6 of
//! METHOD.md section 1, and the random-clusters baseline of the same
//! section. Step 7 (training one expert per cluster) is the trainer's job.
//!
//! Pipeline ([`cluster`]): flatten every expert's A and B (modules in sorted
//! order) -> zero the entries at or below each vector's own q-quantile of
//! |values| -> truncated SVD to `n_components` -> L2-normalise the rows ->
//! cosine similarity `S` -> k-means (k-means++, restarts) on the rows of
//! `S`. Experts are put in name order first, so the partition does not
//! depend on the order the caller passes them in.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::DType;
use faer::Mat;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::expert::Expert;
use crate::fsutil::write_atomic;
use crate::library::ExpertLibrary;

use super::kmeans::kmeans;
use super::svd::{sparsify, truncated_svd_embed};

/// How tasks are grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClusterMethod {
    /// Model-based clustering on the experts' weights.
    Mbc,
    /// k random groups of near-equal size.
    Random,
}

impl std::fmt::Display for ClusterMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ClusterMethod::Mbc => "mbc",
            ClusterMethod::Random => "random",
        })
    }
}

impl std::str::FromStr for ClusterMethod {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "mbc" => Ok(ClusterMethod::Mbc),
            "random" => Ok(ClusterMethod::Random),
            _ => Err(Error::invalid(format!(
                "unknown clustering method `{s}` (expected mbc or random)"
            ))),
        }
    }
}

/// Everything that determines a clustering besides the experts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterConfig {
    pub method: ClusterMethod,
    /// Number of clusters (the paper: 10).
    pub k: usize,
    /// Seeds the randomized SVD, k-means++ and the random split.
    pub seed: u64,
    /// q of MBC step 3: the fraction of each expert's entries zeroed
    /// (mttl's script: 0.5).
    pub sparsity: f64,
    /// Components of the truncated SVD (the paper: 64; fewer when there are
    /// fewer experts).
    pub n_components: usize,
    /// k-means restarts (the paper: 10).
    pub restarts: usize,
    /// What MBC flattens (step 2): the weights, or what training changed.
    #[serde(default, skip_serializing_if = "Embedding::is_weights")]
    pub embed: Embedding,
}

/// What MBC step 2 flattens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Embedding {
    /// The trained A and B as they are (mttl). When every expert starts from
    /// the same A, that shared initialisation dominates the vectors and all
    /// similarities are high.
    #[default]
    Weights,
    /// What training changed: `A - A_0` and `B` (B starts at zero), with
    /// `A_0` recomputed from the initialisation seed recorded in the
    /// expert's metadata. Experts trained from one shared `A_0` stay in one
    /// basis, so their `B`s are comparable, and the offset is gone.
    Delta,
}

impl Embedding {
    fn is_weights(&self) -> bool {
        *self == Embedding::Weights
    }
}

impl std::fmt::Display for Embedding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Embedding::Weights => "weights",
            Embedding::Delta => "delta",
        })
    }
}

impl std::str::FromStr for Embedding {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "weights" => Ok(Embedding::Weights),
            "delta" => Ok(Embedding::Delta),
            _ => Err(Error::invalid(format!(
                "unknown MBC embedding `{s}` (expected weights or delta)"
            ))),
        }
    }
}

impl ClusterConfig {
    /// The paper's settings for `method` and `k`, seed 42.
    pub fn new(method: ClusterMethod, k: usize) -> Self {
        Self {
            method,
            k,
            seed: 42,
            sparsity: 0.5,
            n_components: 64,
            restarts: 10,
            embed: Embedding::Weights,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.k == 0 {
            return Err(Error::invalid(
                "the number of clusters k must be at least 1",
            ));
        }
        if !(0.0..1.0).contains(&self.sparsity) {
            return Err(Error::invalid(format!(
                "sparsity {} is out of range: it is the fraction of weights zeroed, in [0, 1)",
                self.sparsity
            )));
        }
        if self.n_components == 0 {
            return Err(Error::invalid("the SVD needs at least 1 component"));
        }
        if self.restarts == 0 {
            return Err(Error::invalid("k-means needs at least 1 restart"));
        }
        Ok(())
    }

    /// A short hash of the configuration, the key of the clustering's
    /// auxiliary file in the library (mttl's `param_hash`).
    pub fn hash(&self) -> String {
        crate::hash::config_hash(&serde_json::to_value(self).expect("config serialises"))
    }
}

/// A partition of a library's experts into named clusters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Clustering {
    pub config: ClusterConfig,
    /// Every clustered expert, in name order (the order of `similarity`).
    pub experts: Vec<String>,
    /// Cluster name -> the tasks of its experts (sorted, deduplicated): what
    /// MBC step 7 trains one expert on.
    pub clusters: BTreeMap<String, Vec<String>>,
    /// Cluster name -> its experts (in name order).
    pub members: BTreeMap<String, Vec<String>>,
    /// k-means inertia of the chosen restart (MBC only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inertia: Option<f64>,
    /// The cosine similarity matrix `S` of MBC step 5, rows and columns in
    /// `experts` order (MBC only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub similarity: Option<Vec<Vec<f32>>>,
}

/// Mean similarity of pairs of distinct experts in one cluster and in
/// different clusters; a good clustering has `within` well above `between`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ClusterQuality {
    /// `None` when every cluster has a single expert.
    pub within: Option<f64>,
    /// `None` when there is a single cluster.
    pub between: Option<f64>,
}

/// Names of `k` clusters, zero-padded so that name order is numeric order.
pub fn cluster_names(k: usize) -> Vec<String> {
    let width = (k.max(2) - 1).to_string().len();
    (0..k).map(|i| format!("cluster_{i:0width$}")).collect()
}

/// The tasks an expert covers: its recorded tasks, else its name.
pub fn expert_tasks(e: &Expert) -> Vec<String> {
    match &e.info {
        Some(info) if !info.tasks.is_empty() => info.tasks.clone(),
        _ => vec![e.name.clone()],
    }
}

impl Clustering {
    /// Cluster index of each expert of `experts`, indices in name order of
    /// the clusters.
    pub fn labels(&self) -> Vec<usize> {
        let index: BTreeMap<&str, usize> = self
            .members
            .values()
            .enumerate()
            .flat_map(|(c, ms)| ms.iter().map(move |m| (m.as_str(), c)))
            .collect();
        self.experts
            .iter()
            .map(|e| *index.get(e.as_str()).expect("every expert is in a cluster"))
            .collect()
    }

    /// Within- and between-cluster mean similarity under `s` (in `experts`
    /// order; by default this clustering's own `similarity`).
    pub fn quality(&self, s: Option<&[Vec<f32>]>) -> Option<ClusterQuality> {
        let s = s.or(self.similarity.as_deref())?;
        Some(cluster_quality(&self.labels(), s))
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("clustering serialises");
        write_atomic(path, text.as_bytes())
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            source: e,
        })
    }

    /// The library's auxiliary-data key of a clustering with `cfg` of
    /// `experts`: the settings and the experts' manifest digests, so a
    /// clustering is found again only for the same experts.
    fn aux_config(
        library: &ExpertLibrary,
        cfg: &ClusterConfig,
        experts: &[String],
    ) -> Result<serde_json::Value> {
        let names: Vec<&str> = experts.iter().map(String::as_str).collect();
        Ok(serde_json::json!({
            "transform": "clusters",
            "config": cfg,
            "experts": library.experts_fingerprint(&names)?,
        }))
    }

    /// Stores the clustering in the library's auxiliary store (local or
    /// S3), replacing an earlier one with the same settings and experts;
    /// returns where.
    pub fn store_in_library(&self, library: &ExpertLibrary) -> Result<String> {
        let key = Self::aux_config(library, &self.config, &self.experts)?;
        let text = serde_json::to_string_pretty(self).expect("clustering serialises");
        library.put_aux(CLUSTERS_KIND, &key, CLUSTERING_FILE, text.as_bytes())?;
        Ok(format!(
            "{}/{CLUSTERING_FILE}",
            library.aux_location(CLUSTERS_KIND, &key)?
        ))
    }

    /// The clustering stored with `cfg` for exactly `experts`, if any.
    pub fn load_from_library(
        library: &ExpertLibrary,
        cfg: &ClusterConfig,
        experts: &[String],
    ) -> Result<Option<Self>> {
        let key = Self::aux_config(library, cfg, experts)?;
        let Some(bytes) = library.get_aux(CLUSTERS_KIND, &key, CLUSTERING_FILE)? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            Error::invalid(format!(
                "{}/{CLUSTERING_FILE}: invalid clustering: {e}",
                library
                    .aux_location(CLUSTERS_KIND, &key)
                    .unwrap_or_default()
            ))
        })
    }
}

/// The auxiliary-data kind and file name of a stored clustering.
const CLUSTERS_KIND: &str = "clusters";
const CLUSTERING_FILE: &str = "clustering.json";

pub use crate::expert::check_compatible;

/// MBC step 2: all A and B of an expert in one vector, modules in sorted
/// order, each A then its B, row-major.
pub fn flatten_expert(e: &Expert) -> Result<Vec<f32>> {
    let mut out = Vec::new();
    for (a, b) in e.weights.values() {
        for t in [a, b] {
            out.extend(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
        }
    }
    Ok(out)
}

/// MBC step 2 on what training changed: [`flatten_expert`] with each `A`
/// minus its initialisation, recomputed from the `init_seed` the trainer
/// recorded in the expert's metadata ([`crate::train::lora_init_a`]).
pub fn flatten_delta(e: &Expert) -> Result<Vec<f32>> {
    let seed = e
        .info
        .as_ref()
        .and_then(|i| i.training.get("init_seed"))
        .and_then(|v| v.as_u64())
        .ok_or_else(|| {
            Error::invalid(format!(
                "expert `{}` records no initialisation seed (imported, or trained before Quiver recorded one), so MBC cannot subtract its initialisation: cluster with --embed weights, or retrain it",
                e.name
            ))
        })?;
    let mut out = Vec::new();
    for (module, (a, b)) in &e.weights {
        let (r, inp) = a.dims2()?;
        let a0 = crate::train::lora_init_a(seed, module, r, inp);
        let a = a.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        out.extend(a.iter().zip(&a0).map(|(x, y)| x - y));
        out.extend(b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(out)
}

/// MBC steps 2-4: one L2-normalised embedding per expert (in the order
/// given) from the sparsified, flattened weights, by truncated SVD to
/// `min(n_components, N)` components (randomized when N > n_components + 10,
/// exact otherwise; see [`super::svd`]).
///
/// # Shapes
/// * returns `N` rows of `min(n_components, N, D)` values.
pub fn mbc_embed(
    experts: &[Expert],
    sparsity: f64,
    n_components: usize,
    seed: u64,
) -> Result<Vec<Vec<f32>>> {
    mbc_embed_with(experts, Embedding::Weights, sparsity, n_components, seed)
}

/// [`mbc_embed`] of what [`Embedding`] says to flatten.
pub fn mbc_embed_with(
    experts: &[Expert],
    embed: Embedding,
    sparsity: f64,
    n_components: usize,
    seed: u64,
) -> Result<Vec<Vec<f32>>> {
    check_compatible(experts)?;
    let n = experts.len();
    let mut xt: Option<Mat<f32>> = None;
    for (j, e) in experts.iter().enumerate() {
        let mut v = match embed {
            Embedding::Weights => flatten_expert(e)?,
            Embedding::Delta => flatten_delta(e)?,
        };
        sparsify(&mut v, sparsity);
        if v.iter().all(|x| *x == 0.0) {
            return Err(Error::invalid(format!(
                "expert `{}` has only zero weights after sparsification, so it cannot be compared with the others",
                e.name
            )));
        }
        let xt = xt.get_or_insert_with(|| Mat::zeros(v.len(), n));
        for (i, x) in v.into_iter().enumerate() {
            xt[(i, j)] = x;
        }
    }
    let xt = xt.expect("at least one expert");
    let emb = truncated_svd_embed(xt.as_ref(), n_components, seed)?;
    Ok((0..n)
        .map(|i| {
            let row: Vec<f64> = (0..emb.ncols()).map(|j| emb[(i, j)]).collect();
            let norm = row
                .iter()
                .map(|x| x * x)
                .sum::<f64>()
                .sqrt()
                .max(f64::MIN_POSITIVE);
            row.into_iter().map(|x| (x / norm) as f32).collect()
        })
        .collect())
}

/// MBC step 5: cosine similarity of every pair of rows.
///
/// # Shapes
/// * `rows`: `N` rows of equal length; returns `N x N`, symmetric.
pub fn similarity_matrix(rows: &[Vec<f32>]) -> Vec<Vec<f32>> {
    let unit: Vec<Vec<f64>> = rows
        .iter()
        .map(|r| {
            let norm = r.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
            r.iter()
                .map(|&x| if norm > 0.0 { x as f64 / norm } else { 0.0 })
                .collect()
        })
        .collect();
    let n = rows.len();
    let mut s = vec![vec![0.0f32; n]; n];
    for i in 0..n {
        for j in i..n {
            let v: f64 = unit[i].iter().zip(&unit[j]).map(|(a, b)| a * b).sum();
            s[i][j] = v as f32;
            s[j][i] = v as f32;
        }
    }
    s
}

/// k groups of near-equal size (sizes differ by at most one), from `seed`.
pub fn random_partition(n: usize, k: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    let mut labels = vec![0; n];
    for (pos, i) in order.into_iter().enumerate() {
        labels[i] = pos % k.max(1);
    }
    labels
}

/// Relabels so that clusters are numbered by their first member.
fn canonical_labels(labels: &[usize]) -> Vec<usize> {
    let mut map = BTreeMap::new();
    labels
        .iter()
        .map(|l| {
            let next = map.len();
            *map.entry(*l).or_insert(next)
        })
        .collect()
}

/// Clusters the experts (METHOD.md section 1: MBC steps 2-6, or random
/// clusters). Experts are taken in name order, so the input order does not
/// matter; clusters are named `cluster_0`.. in the name order of their
/// first expert.
pub fn cluster(experts: &[Expert], cfg: &ClusterConfig) -> Result<Clustering> {
    cfg.validate()?;
    check_compatible(experts)?;
    let n = experts.len();
    if cfg.k > n {
        return Err(Error::invalid(format!(
            "cannot make {} clusters from {n} experts: k must be at most the number of experts",
            cfg.k
        )));
    }
    let mut sorted: Vec<&Expert> = experts.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let (labels, inertia, similarity) = match cfg.method {
        ClusterMethod::Mbc => {
            let owned: Vec<Expert> = sorted.iter().map(|e| (*e).clone()).collect();
            let emb = mbc_embed_with(&owned, cfg.embed, cfg.sparsity, cfg.n_components, cfg.seed)?;
            let s = similarity_matrix(&emb);
            let km = kmeans(&s, cfg.k, cfg.restarts, cfg.seed)?;
            (km.labels, Some(km.inertia), Some(s))
        }
        ClusterMethod::Random => (random_partition(n, cfg.k, cfg.seed), None, None),
    };
    let labels = canonical_labels(&labels);
    let names = cluster_names(cfg.k);
    let mut clusters: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut members: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (e, &l) in sorted.iter().zip(&labels) {
        members
            .entry(names[l].clone())
            .or_default()
            .push(e.name.clone());
        clusters
            .entry(names[l].clone())
            .or_default()
            .extend(expert_tasks(e));
    }
    for tasks in clusters.values_mut() {
        tasks.sort();
        tasks.dedup();
    }
    Ok(Clustering {
        config: cfg.clone(),
        experts: sorted.iter().map(|e| e.name.clone()).collect(),
        clusters,
        members,
        inertia,
        similarity,
    })
}

/// Mean of `s[i][j]` over pairs `i != j` in one cluster and in different
/// clusters.
pub fn cluster_quality(labels: &[usize], s: &[Vec<f32>]) -> ClusterQuality {
    let (mut within, mut nw, mut between, mut nb) = (0.0, 0usize, 0.0, 0usize);
    for (i, li) in labels.iter().enumerate() {
        for (j, lj) in labels.iter().enumerate() {
            if i == j {
                continue;
            }
            if li == lj {
                within += s[i][j] as f64;
                nw += 1;
            } else {
                between += s[i][j] as f64;
                nb += 1;
            }
        }
    }
    ClusterQuality {
        within: (nw > 0).then(|| within / nw as f64),
        between: (nb > 0).then(|| between / nb as f64),
    }
}

/// Adjusted Rand index of two partitions of the same items (1 for the same
/// partition under any renaming of labels, about 0 for independent ones;
/// Hubert and Arabie, 1985, as scikit-learn's `adjusted_rand_score`).
pub fn adjusted_rand_index(a: &[usize], b: &[usize]) -> f64 {
    assert_eq!(a.len(), b.len(), "partitions of different sets");
    let n = a.len();
    let pairs = |x: usize| (x * x.saturating_sub(1) / 2) as f64;
    let mut table: BTreeMap<(usize, usize), usize> = BTreeMap::new();
    let mut rows: BTreeMap<usize, usize> = BTreeMap::new();
    let mut cols: BTreeMap<usize, usize> = BTreeMap::new();
    for (&x, &y) in a.iter().zip(b) {
        *table.entry((x, y)).or_default() += 1;
        *rows.entry(x).or_default() += 1;
        *cols.entry(y).or_default() += 1;
    }
    let index: f64 = table.values().map(|&c| pairs(c)).sum();
    let sum_a: f64 = rows.values().map(|&c| pairs(c)).sum();
    let sum_b: f64 = cols.values().map(|&c| pairs(c)).sum();
    let total = pairs(n);
    if total == 0.0 {
        return 1.0;
    }
    let expected = sum_a * sum_b / total;
    let max = (sum_a + sum_b) / 2.0;
    if max == expected {
        // Both partitions trivial (all singletons or one cluster), as sklearn.
        return 1.0;
    }
    (index - expected) / (max - expected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ari_matches_sklearn() {
        // sklearn.metrics.adjusted_rand_score([0, 0, 1, 1], [0, 0, 1, 2]) == 0.5714285714285715
        let v = adjusted_rand_index(&[0, 0, 1, 1], &[0, 0, 1, 2]);
        assert!((v - 0.571_428_571_428_571_5).abs() < 1e-12, "{v}");
        // adjusted_rand_score([0, 0, 1, 1], [0, 1, 0, 1]) == -0.5
        let v = adjusted_rand_index(&[0, 0, 1, 1], &[0, 1, 0, 1]);
        assert!((v + 0.5).abs() < 1e-12, "{v}");
        assert_eq!(adjusted_rand_index(&[0, 0, 1, 2], &[5, 5, 3, 1]), 1.0);
    }

    #[test]
    fn random_partition_is_balanced() {
        let l = random_partition(10, 3, 1);
        let mut sizes = [0; 3];
        for x in &l {
            sizes[*x] += 1;
        }
        sizes.sort();
        assert_eq!(sizes, [3, 3, 4]);
        assert_eq!(l, random_partition(10, 3, 1));
    }

    #[test]
    fn names_sort_numerically() {
        assert_eq!(cluster_names(3), ["cluster_0", "cluster_1", "cluster_2"]);
        let n = cluster_names(12);
        assert_eq!(n[0], "cluster_00");
        assert_eq!(n[11], "cluster_11");
        assert_eq!(cluster_names(1), ["cluster_0"]);
    }

    #[test]
    fn quality_of_blocks() {
        let s = vec![
            vec![1.0, 0.9, 0.1],
            vec![0.9, 1.0, 0.2],
            vec![0.1, 0.2, 1.0],
        ];
        let q = cluster_quality(&[0, 0, 1], &s);
        assert!((q.within.unwrap() - 0.9).abs() < 1e-6);
        assert!((q.between.unwrap() - 0.15).abs() < 1e-6);
    }
}
