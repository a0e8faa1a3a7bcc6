//! Library transforms: computations over a whole library of experts
//! (METHOD.md section 1). For now, model-based clustering (MBC) and the
//! random-clusters baseline, built from a sparsified truncated SVD
//! ([`svd`]), cosine similarity and k-means ([`kmeans`]), with a heatmap of
//! the similarity matrix ([`plot`]).
//!
//! Linear algebra is faer's: the truncated SVD is randomized (Gaussian
//! sketch, power iterations, QR, small SVD) when a library has more than
//! `n_components + 10` experts and exact (QR of `X^T`, then the SVD of the
//! small triangular factor) otherwise; both give `U_k S_k` as scikit-learn's
//! `TruncatedSVD.fit_transform`, which mttl uses.

pub mod kmeans;
pub mod mbc;
pub mod plot;
pub mod svd;

pub use kmeans::{kmeans, KMeans};
pub use mbc::{
    adjusted_rand_index, check_compatible, cluster, cluster_names, cluster_quality, expert_tasks,
    flatten_delta, flatten_expert, mbc_embed, mbc_embed_with, random_partition, similarity_matrix,
    ClusterConfig, ClusterMethod, ClusterQuality, Clustering, Embedding,
};
pub use plot::{plot_similarity, plot_similarity_named, HeatmapScale};
