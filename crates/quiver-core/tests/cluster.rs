//! Clustering a library (METHOD.md section 1, MBC steps 2-6 and random
//! clusters) on experts with a planted structure: each expert is one of
//! three group LoRAs plus small noise, over several modules, in shuffled
//! order. MBC must recover the groups exactly; random clusters must not.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use quiver_core::expert::{BaseModelId, Expert, ExpertInfo, LoraWeights};
use quiver_core::library::ExpertLibrary;
use quiver_core::lora::LoraConfig;
use quiver_core::transform::{
    adjusted_rand_index, cluster, mbc_embed, plot_similarity, similarity_matrix, ClusterConfig,
    ClusterMethod, Clustering,
};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const GROUPS: usize = 3;
const PER_GROUP: usize = 6;
const RANK: usize = 4;
/// (module, in, out): two layers of q/v/o of a tiny model with hidden 16.
const MODULES: [(&str, usize, usize); 6] = [
    ("model.layers.0.self_attn.q_proj", 16, 16),
    ("model.layers.0.self_attn.v_proj", 16, 8),
    ("model.layers.0.self_attn.o_proj", 16, 16),
    ("model.layers.1.self_attn.q_proj", 16, 16),
    ("model.layers.1.self_attn.v_proj", 16, 8),
    ("model.layers.1.self_attn.o_proj", 16, 16),
];

fn normal(rng: &mut impl Rng) -> f32 {
    let u1: f32 = 1.0 - rng.random::<f32>();
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

fn random_matrix(rng: &mut impl Rng, rows: usize, cols: usize, scale: f32) -> Vec<f32> {
    (0..rows * cols).map(|_| scale * normal(rng)).collect()
}

/// Group LoRA factors: (A `r x in`, B `out x r`) per module, as flat vectors.
type Factors = Vec<(Vec<f32>, Vec<f32>)>;

fn group_factors(rng: &mut impl Rng, rank: usize) -> Factors {
    MODULES
        .iter()
        .map(|&(_, i, o)| {
            (
                random_matrix(rng, rank, i, 1.0),
                random_matrix(rng, o, rank, 1.0),
            )
        })
        .collect()
}

fn expert(
    name: &str,
    task: &str,
    base: &Factors,
    noise: f32,
    rank: usize,
    fingerprint: &str,
    rng: &mut impl Rng,
) -> Expert {
    let mut weights = LoraWeights::new();
    for (&(m, i, o), (a, b)) in MODULES.iter().zip(base) {
        let a: Vec<f32> = a.iter().map(|x| x + noise * normal(rng)).collect();
        let b: Vec<f32> = b.iter().map(|x| x + noise * normal(rng)).collect();
        weights.insert(
            m.to_string(),
            (
                Tensor::from_vec(a, (rank, i), &Device::Cpu).unwrap(),
                Tensor::from_vec(b, (o, rank), &Device::Cpu).unwrap(),
            ),
        );
    }
    Expert {
        name: name.to_string(),
        config: LoraConfig {
            rank,
            ..LoraConfig::default()
        },
        weights,
        info: Some(ExpertInfo {
            name: name.to_string(),
            tasks: vec![task.to_string()],
            base_model: BaseModelId {
                id: "tiny".into(),
                fingerprint: fingerprint.into(),
            },
            training: serde_json::Value::Null,
            metrics: BTreeMap::new(),
            created: 0,
        }),
    }
}

/// 18 experts, 6 per planted group, in shuffled order; names do not reveal
/// the group. Returns the experts and each expert's group by name.
fn planted(seed: u64) -> (Vec<Expert>, BTreeMap<String, usize>) {
    planted_with_common(seed, 0.0)
}

/// As [`planted`], plus a component `common` times larger than the group
/// LoRAs shared by every expert (as experts trained from one LoRA
/// initialisation share most of their A).
fn planted_with_common(seed: u64, common: f32) -> (Vec<Expert>, BTreeMap<String, usize>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let shared = group_factors(&mut rng, RANK);
    let add = |g: Factors| -> Factors {
        g.into_iter()
            .zip(&shared)
            .map(|((a, b), (sa, sb))| {
                (
                    a.iter().zip(sa).map(|(x, y)| x + common * y).collect(),
                    b.iter().zip(sb).map(|(x, y)| x + common * y).collect(),
                )
            })
            .collect()
    };
    let bases: Vec<Factors> = (0..GROUPS)
        .map(|_| add(group_factors(&mut rng, RANK)))
        .collect();
    let mut groups: Vec<usize> = (0..GROUPS * PER_GROUP).map(|i| i % GROUPS).collect();
    groups.shuffle(&mut rng);
    let mut experts = Vec::new();
    let mut truth = BTreeMap::new();
    for (i, &g) in groups.iter().enumerate() {
        let name = format!("task_{i:02}");
        experts.push(expert(
            &name,
            &format!("bigbench/{name}"),
            &bases[g],
            0.3,
            RANK,
            "fp-tiny",
            &mut rng,
        ));
        truth.insert(name, g);
    }
    experts.shuffle(&mut rng);
    (experts, truth)
}

fn ari(c: &Clustering, truth: &BTreeMap<String, usize>) -> f64 {
    let want: Vec<usize> = c.experts.iter().map(|e| truth[e]).collect();
    adjusted_rand_index(&c.labels(), &want)
}

fn mbc(k: usize) -> ClusterConfig {
    ClusterConfig::new(ClusterMethod::Mbc, k)
}

#[test]
fn mbc_recovers_planted_groups_and_random_does_not() {
    let (experts, truth) = planted(1);
    let c = cluster(&experts, &mbc(3)).unwrap();
    let mbc_ari = ari(&c, &truth);
    let q = c.quality(None).unwrap();
    let random = cluster(&experts, &ClusterConfig::new(ClusterMethod::Random, 3)).unwrap();
    let random_ari = ari(&random, &truth);
    let rq = random.quality(c.similarity.as_deref()).unwrap();
    println!(
        "MBC: ARI {mbc_ari:.3}, within {:.3}, between {:.3}; random: ARI {random_ari:.3}, within {:.3}, between {:.3}",
        q.within.unwrap(),
        q.between.unwrap(),
        rq.within.unwrap(),
        rq.between.unwrap()
    );
    assert_eq!(mbc_ari, 1.0);
    assert!(random_ari < 0.5, "random ARI {random_ari}");
    assert!(q.within.unwrap() > q.between.unwrap() + 0.5, "{q:?}");
    assert!(q.within.unwrap() > rq.within.unwrap(), "{q:?} vs {rq:?}");

    // Over several seeds random clusters stay far from the truth.
    let mut aris = Vec::new();
    for seed in 0..10 {
        let cfg = ClusterConfig {
            seed,
            ..ClusterConfig::new(ClusterMethod::Random, 3)
        };
        aris.push(ari(&cluster(&experts, &cfg).unwrap(), &truth));
    }
    let mean = aris.iter().sum::<f64>() / aris.len() as f64;
    println!(
        "random ARI over seeds 0..10: mean {mean:.3}, max {:.3}",
        aris.iter().cloned().fold(f64::MIN, f64::max)
    );
    assert!(mean < 0.3 && aris.iter().all(|&a| a < 1.0), "{aris:?}");

    // Named clusters carry the tasks of their experts, and sizes add up.
    assert_eq!(
        c.clusters.keys().collect::<Vec<_>>(),
        ["cluster_0", "cluster_1", "cluster_2"]
    );
    let total: usize = c.clusters.values().map(Vec::len).sum();
    assert_eq!(total, GROUPS * PER_GROUP);
    assert!(c.clusters["cluster_0"]
        .iter()
        .all(|t| t.starts_with("bigbench/task_")));
    // cluster_0 holds the first expert by name.
    assert!(c.members["cluster_0"].contains(&"task_00".to_string()));
}

#[test]
fn mbc_sees_groups_under_a_large_shared_component() {
    // Every expert is 3x a shared LoRA + its group's + noise: all pairs are
    // similar (S > 0.8), but the rows of S still separate the groups.
    let (experts, truth) = planted_with_common(7, 3.0);
    let c = cluster(&experts, &mbc(3)).unwrap();
    let q = c.quality(None).unwrap();
    println!(
        "shared component: MBC ARI {:.3}, within {:.3}, between {:.3}",
        ari(&c, &truth),
        q.within.unwrap(),
        q.between.unwrap()
    );
    assert!(q.between.unwrap() > 0.8, "{q:?}");
    assert_eq!(ari(&c, &truth), 1.0);
}

#[test]
fn randomized_svd_path_recovers_groups_too() {
    // 18 experts > 3 components + 10 oversamples: the sketch is used.
    let (experts, truth) = planted(2);
    let cfg = ClusterConfig {
        n_components: 3,
        ..mbc(3)
    };
    let c = cluster(&experts, &cfg).unwrap();
    assert_eq!(ari(&c, &truth), 1.0);
    let emb = mbc_embed(&experts, 0.5, 3, 0).unwrap();
    assert_eq!(emb.len(), experts.len());
    assert!(emb.iter().all(|r| r.len() == 3));
    for r in &emb {
        let norm: f32 = r.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
    }
}

#[test]
fn same_seed_same_clusters_and_order_does_not_matter() {
    let (experts, truth) = planted(3);
    let a = cluster(&experts, &mbc(3)).unwrap();
    let b = cluster(&experts, &mbc(3)).unwrap();
    assert_eq!(a, b);
    let mut reversed = experts.clone();
    reversed.reverse();
    let c = cluster(&reversed, &mbc(3)).unwrap();
    assert_eq!(a.members, c.members);
    assert_eq!(a.clusters, c.clusters);
    assert_eq!(ari(&c, &truth), 1.0);
    let mut shuffled = experts.clone();
    shuffled.shuffle(&mut rand::rngs::StdRng::seed_from_u64(99));
    assert_eq!(cluster(&shuffled, &mbc(3)).unwrap().members, a.members);

    let r1 = cluster(&experts, &ClusterConfig::new(ClusterMethod::Random, 3)).unwrap();
    let r2 = cluster(&reversed, &ClusterConfig::new(ClusterMethod::Random, 3)).unwrap();
    assert_eq!(r1, r2);
    let sizes: Vec<usize> = r1.members.values().map(Vec::len).collect();
    assert_eq!(sizes, [6, 6, 6]);
}

#[test]
fn similarity_is_symmetric_with_unit_diagonal() {
    let (experts, _) = planted(4);
    let s = similarity_matrix(&mbc_embed(&experts, 0.5, 64, 0).unwrap());
    for (i, row) in s.iter().enumerate() {
        assert!((row[i] - 1.0).abs() < 1e-5);
        for (j, &v) in row.iter().enumerate() {
            assert_eq!(v, s[j][i]);
            assert!((-1.0 - 1e-5..=1.0 + 1e-5).contains(&v));
        }
    }
}

fn write_library(dir: &Path, experts: &[Expert]) {
    for e in experts {
        e.save(&dir.join(&e.name)).unwrap();
    }
}

#[test]
fn library_round_trip_aux_data_and_plot() {
    let (experts, truth) = planted(5);
    let tmp = tempfile::tempdir().unwrap();
    let lib = tmp.path().join("lib");
    write_library(&lib, &experts);
    std::fs::create_dir_all(lib.join(".staging/ignored")).unwrap();
    let library = ExpertLibrary::open(&lib.display().to_string()).unwrap();
    let loaded = library.load_experts(&Device::Cpu, DType::F32).unwrap();
    assert_eq!(loaded.len(), experts.len());
    let cfg = mbc(3);
    let c = cluster(&loaded, &cfg).unwrap();
    assert_eq!(ari(&c, &truth), 1.0);

    let out = tmp.path().join("clusters.json");
    c.save(&out).unwrap();
    assert_eq!(Clustering::load(&out).unwrap(), c);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(json["config"]["method"], "mbc");
    assert_eq!(json["config"]["k"], 3);
    assert_eq!(json["config"]["sparsity"], 0.5);
    assert_eq!(json["experts"].as_array().unwrap().len(), 18);
    assert!(json["clusters"]["cluster_1"].is_array());

    let names = c.experts.clone();
    assert_eq!(
        Clustering::load_from_library(&library, &cfg, &names).unwrap(),
        None
    );
    let aux = c.store_in_library(&library).unwrap();
    let aux_dir = lib.join(".aux").display().to_string();
    assert!(aux.starts_with(&aux_dir), "{aux}");
    assert!(
        aux.contains("/clusters-") && aux.ends_with("/clustering.json"),
        "{aux}"
    );
    assert_eq!(
        Clustering::load_from_library(&library, &cfg, &names).unwrap(),
        Some(c.clone())
    );
    // The aux directory is not taken for an expert.
    assert_eq!(
        library
            .load_experts(&Device::Cpu, DType::F32)
            .unwrap()
            .len(),
        experts.len()
    );
    // A different configuration, or other experts, is another key.
    let other = ClusterConfig {
        seed: 1,
        ..cfg.clone()
    };
    assert_eq!(
        Clustering::load_from_library(&library, &other, &names).unwrap(),
        None
    );
    assert_eq!(
        Clustering::load_from_library(&library, &cfg, &names[1..]).unwrap(),
        None
    );

    let png = tmp.path().join("clusters.png");
    let s = c.similarity.as_ref().unwrap();
    let scale = plot_similarity(&png, s, &c.labels()).unwrap();
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    assert!(scale.low < scale.high);
    assert_eq!(scale.order.len(), 18);
    // Keep a copy to look at (target/tmp/cluster-heatmap.png).
    let keep = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cluster-heatmap.png");
    std::fs::copy(&png, &keep).unwrap();
    println!(
        "heatmap: {} (low {:.3}, high {:.3})",
        keep.display(),
        scale.low,
        scale.high
    );
    // And the library, to try `quiver cluster` on (target/tmp/cluster-planted-lib).
    let keep = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cluster-planted-lib");
    let _ = std::fs::remove_dir_all(&keep);
    write_library(&keep, &experts);
}

fn err(r: quiver_core::Result<Clustering>) -> String {
    let e = r.unwrap_err().to_string();
    println!("{e}");
    assert!(!e.contains('\n'), "one line: {e}");
    e
}

#[test]
fn bad_input_gives_one_clear_sentence() {
    let (experts, _) = planted(6);

    let e = err(cluster(&experts, &mbc(19)));
    assert!(e.contains("cannot make 19 clusters from 18 experts"), "{e}");
    let e = err(cluster(
        &experts,
        &ClusterConfig::new(ClusterMethod::Random, 19),
    ));
    assert!(e.contains("19 clusters from 18 experts"), "{e}");
    let e = err(cluster(&experts, &mbc(0)));
    assert!(e.contains("at least 1"), "{e}");

    let e = err(cluster(&[], &mbc(1)));
    assert!(e.contains("no experts"), "{e}");
    let tmp = tempfile::tempdir().unwrap();
    let lib = ExpertLibrary::open(&tmp.path().display().to_string()).unwrap();
    let e = lib
        .load_experts(&Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    println!("{e}");
    assert!(
        e.contains("has no experts") && e.contains(&tmp.path().display().to_string()),
        "{e}"
    );
    let e = ExpertLibrary::open(&tmp.path().join("missing").display().to_string())
        .unwrap_err()
        .to_string();
    assert!(e.contains("no such directory"), "{e}");

    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let mut mixed = experts.clone();
    let base8 = group_factors(&mut rng, 8);
    mixed.push(expert("rank8", "t", &base8, 0.0, 8, "fp-tiny", &mut rng));
    let e = err(cluster(&mixed, &mbc(3)));
    assert!(
        e.contains("different LoRA ranks") && e.contains("rank8"),
        "{e}"
    );

    let mut mixed = experts.clone();
    let base = group_factors(&mut rng, RANK);
    mixed.push(expert("other", "t", &base, 0.0, RANK, "fp-other", &mut rng));
    let e = err(cluster(&mixed, &mbc(3)));
    assert!(
        e.contains("different base models") && e.contains("other"),
        "{e}"
    );
    let e = err(cluster(
        &mixed,
        &ClusterConfig::new(ClusterMethod::Random, 3),
    ));
    assert!(e.contains("different base models"), "{e}");

    let mut mixed = experts.clone();
    mixed[0].weights.pop_first();
    let e = err(cluster(&mixed, &mbc(3)));
    assert!(e.contains("different modules"), "{e}");

    let mut dup = experts.clone();
    dup[1].name = dup[0].name.clone();
    let e = err(cluster(&dup, &mbc(3)));
    assert!(e.contains("unique"), "{e}");

    let e = err(cluster(
        &experts,
        &ClusterConfig {
            sparsity: 1.0,
            ..mbc(3)
        },
    ));
    assert!(e.contains("sparsity"), "{e}");
}
