//! `quiver cluster`: group a library's experts into k clusters by the
//! similarity of their LoRA weights (MBC) or at random, the step before
//! training one expert per cluster (METHOD.md section 1, MBC steps 2-6).
//! The work is `quiver_core::transform`'s; this file parses, reports and
//! writes.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use candle_core::{DType, Device};
use quiver_core::expert::Expert;
use quiver_core::library::ExpertLibrary;
use quiver_core::transform::{
    cluster, plot_similarity_named, ClusterConfig, ClusterMethod, ClusterQuality, Clustering,
    Embedding,
};

use crate::flags::GlobalArgs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MethodArg {
    /// Model-based clustering: k-means on the cosine similarities of the
    /// experts' sparsified, SVD-reduced weights.
    Mbc,
    /// k random groups of near-equal size.
    Random,
}

#[derive(Debug, clap::Args)]
#[command(
    after_help = "MBC (Ostapenko et al., 2024): each expert's LoRA A and B are flattened into one \
vector, entries at or below the --sparsity quantile of |values| are zeroed, a truncated SVD keeps \
--n-components components, rows are L2-normalised, and k-means (k-means++, --restarts restarts) \
runs on the rows of the cosine-similarity matrix. The clusters map to task lists: train one \
expert per cluster on the union of its tasks with `quiver train --shared NAME --tasks ...`.\n\n\
The output also reports the mean similarity of experts within a cluster and between clusters, \
for MBC and for random clusters of the same experts, and stores the clustering in the library \
(LIB/.aux/clusters-<hash of the settings and experts>/clustering.json)."
)]
pub struct ClusterArgs {
    /// Expert library: a directory or `s3://bucket/prefix` (default: $QUIVER_LIBRARY).
    #[arg(long, env = "QUIVER_LIBRARY", value_name = "DIR|s3://BUCKET/PREFIX")]
    pub library: String,
    /// How to group the experts.
    #[arg(long, value_enum, default_value_t = MethodArg::Mbc)]
    pub method: MethodArg,
    /// Number of clusters (the paper uses 10).
    #[arg(long, default_value_t = 10)]
    pub k: usize,
    /// Seed of the randomized SVD, k-means++ and the random split.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Where to write the clustering (JSON: cluster name -> tasks, plus method, settings and experts).
    #[arg(long)]
    pub out: PathBuf,
    /// Also write a PNG heatmap of the similarity matrix, rows and columns grouped by cluster.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Fraction of each expert's weights zeroed before the SVD (smallest |values| first).
    #[arg(long, default_value_t = 0.5, allow_negative_numbers = true)]
    pub sparsity: f64,
    /// SVD components kept (fewer when the library has fewer experts).
    #[arg(long, default_value_t = 64)]
    pub n_components: usize,
    /// k-means restarts; the one with the lowest inertia wins.
    #[arg(long, default_value_t = 10)]
    pub restarts: usize,
    /// What MBC flattens: `delta` (what training changed: each A minus its
    /// initialisation, recomputed from the seed in quiver_expert.json, and B) or
    /// `weights` (A and B as they are, as mttl; the behaviour before issue 15, where a
    /// shared initialisation makes every similarity high). Experts imported from
    /// elsewhere record no initialisation: use `weights` for them.
    #[arg(long, value_enum, default_value_t = EmbedArg::Delta)]
    pub embed: EmbedArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EmbedArg {
    /// A minus its initialisation, and B.
    Delta,
    /// A and B as trained.
    Weights,
}

fn load_experts(g: &GlobalArgs, lib: &ExpertLibrary) -> Result<Vec<Expert>> {
    let sp = crate::progress::spinner(g, &format!("loading the experts of {}", lib.uri()));
    // Every expert, checked: one broken expert is an error, not skipped.
    let experts = lib.load_experts(&Device::Cpu, DType::F32);
    sp.finish_and_clear();
    Ok(experts?)
}

fn fmt_quality(q: Option<ClusterQuality>) -> (String, String) {
    let f = |v: Option<f64>| v.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into());
    match q {
        Some(q) => (f(q.within), f(q.between)),
        None => ("-".into(), "-".into()),
    }
}

pub fn run(g: &GlobalArgs, a: ClusterArgs) -> Result<ExitCode> {
    if let Some(p) = &a.plot {
        if p.extension().and_then(|e| e.to_str()) != Some("png") {
            bail!(
                "--plot {}: the plot is a PNG, so its name must end in .png",
                p.display()
            );
        }
    }
    let method = match a.method {
        MethodArg::Mbc => ClusterMethod::Mbc,
        MethodArg::Random => ClusterMethod::Random,
    };
    let cfg = ClusterConfig {
        method,
        k: a.k,
        seed: a.seed,
        sparsity: a.sparsity,
        n_components: a.n_components,
        restarts: a.restarts,
        embed: match a.embed {
            EmbedArg::Delta => Embedding::Delta,
            EmbedArg::Weights => Embedding::Weights,
        },
    };
    cfg.validate()?;
    let lib = ExpertLibrary::open(&a.library)?;
    let experts = load_experts(g, &lib)?;
    if a.k > experts.len() {
        bail!(
            "--k {} is larger than the number of experts in {} ({}); choose k <= {}",
            a.k,
            a.library,
            experts.len(),
            experts.len()
        );
    }

    let sp = crate::progress::spinner(g, &format!("clustering {} experts", experts.len()));
    // MBC always runs: its similarity matrix scores both clusterings.
    let mbc = cluster(
        &experts,
        &ClusterConfig {
            method: ClusterMethod::Mbc,
            ..cfg.clone()
        },
    );
    let random = cluster(
        &experts,
        &ClusterConfig {
            method: ClusterMethod::Random,
            ..cfg.clone()
        },
    );
    sp.finish_and_clear();
    let random = random?;
    let mbc: Option<Clustering> = match (method, mbc) {
        (_, Ok(c)) => Some(c),
        (ClusterMethod::Mbc, Err(e)) => return Err(e.into()),
        (ClusterMethod::Random, Err(e)) => {
            if a.plot.is_some() {
                bail!("--plot needs the MBC similarity matrix, which failed: {e}");
            }
            tracing::warn!("no similarity report: {e}");
            None
        }
    };
    let chosen = match method {
        ClusterMethod::Mbc => mbc.clone().expect("MBC succeeded"),
        ClusterMethod::Random => random.clone(),
    };
    let s = mbc.as_ref().and_then(|c| c.similarity.clone());
    let q_mbc = mbc.as_ref().and_then(|c| c.quality(None));
    let q_random = random.quality(s.as_deref());

    chosen.save(&a.out)?;
    let aux = chosen.store_in_library(&lib)?;
    let scale = match (&a.plot, &s) {
        (Some(p), Some(s)) => Some(plot_similarity_named(
            p,
            s,
            &chosen.labels(),
            &chosen.experts,
        )?),
        _ => None,
    };

    if !g.quiet {
        let d: usize = experts[0]
            .weights
            .values()
            .map(|(a, b)| a.elem_count() + b.elem_count())
            .sum();
        eprintln!(
            "{} experts, {} weights each; {method}: k = {}, seed {}{}",
            experts.len(),
            d,
            cfg.k,
            cfg.seed,
            if method == ClusterMethod::Mbc {
                format!(
                    ", sparsity {}, {} SVD components, {} restarts",
                    cfg.sparsity,
                    cfg.n_components.min(experts.len()).min(d),
                    cfg.restarts
                )
            } else {
                String::new()
            }
        );
        for (name, members) in &chosen.members {
            let tasks = &chosen.clusters[name];
            eprintln!("{name} ({} experts): {}", members.len(), tasks.join(", "));
        }
        eprintln!("mean cosine similarity   within   between");
        for (label, q) in [("mbc", q_mbc), ("random", q_random)] {
            let (w, b) = fmt_quality(q);
            eprintln!("  {label:<22} {w:>7}   {b:>7}");
        }
        eprintln!("wrote {} (and {})", a.out.display(), aux);
        if let (Some(p), Some(sc)) = (&a.plot, &scale) {
            eprintln!(
                "wrote {}: rows/columns grouped by cluster (white lines), dark = {:.3}, bright >= {:.3}",
                p.display(),
                sc.low,
                sc.high
            );
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "out": a.out,
            "aux": aux,
            "plot": a.plot,
            "method": method,
            "k": cfg.k,
            "experts": chosen.experts.len(),
            "members": chosen.members,
            "quality": {"mbc": q_mbc, "random": q_random},
            "plot_scale": scale.map(|s| serde_json::json!({"low": s.low, "high": s.high})),
        })
    );
    Ok(ExitCode::SUCCESS)
}
