//! `quiver train`: private experts (one per task) or a shared expert (one
//! on the union of tasks), written to the library in PEFT's layout.

use std::process::ExitCode;

use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressStyle};
use quiver_core::data::{
    is_held_out, split_examples_with, stable_hash, DataSource, Example, Split,
};
use quiver_core::expert::{expert_name_for_task, model_fingerprint, validate_name, BaseModelId};
use quiver_core::lora::{LoraConfig, TargetModules};
use quiver_core::train::{make_expert, train_lora, StepStats, TrainConfig, TrainObserver};

use crate::args::{InitScheme, TrainArgs};
use crate::flags::GlobalArgs;

struct Bar {
    pb: ProgressBar,
}

impl TrainObserver for Bar {
    fn on_step(&mut self, s: &StepStats) {
        self.pb.set_length(s.steps as u64);
        self.pb.set_position(s.step as u64);
        let val = s
            .val_loss
            .map(|v| format!(" val {v:.3}"))
            .unwrap_or_default();
        self.pb.set_message(format!(
            "loss {:.3}{val} {:.0} tok/s",
            s.loss, s.tokens_per_second
        ));
        if let Some(v) = s.val_loss {
            tracing::info!("step {}: val loss {v:.4}", s.step);
        }
    }
    fn on_message(&mut self, msg: &str) {
        self.pb.println(msg);
    }
}

fn target_modules(spec: &str) -> TargetModules {
    if spec == "all-linear" {
        TargetModules::Regex(spec.into())
    } else if let Some(re) = spec.strip_prefix("re:") {
        TargetModules::Regex(re.into())
    } else {
        TargetModules::Names(
            spec.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
        )
    }
}

/// The tasks' validation examples taken in turn (first of each task, then
/// second, ...), so `--max-eval-examples` keeps every task represented.
fn interleave(parts: &[&[Example]]) -> Vec<Example> {
    let longest = parts.iter().map(|p| p.len()).max().unwrap_or(0);
    (0..longest)
        .flat_map(|i| parts.iter().filter_map(move |p| p.get(i).cloned()))
        .collect()
}

/// One expert to train: its name, the tasks it covers, train and validation data.
struct Job {
    name: String,
    tasks: Vec<String>,
    train: Vec<Example>,
    val: Vec<Example>,
}

pub fn run(g: &GlobalArgs, mut a: TrainArgs) -> Result<ExitCode> {
    let cfg = TrainConfig {
        steps: a.steps,
        lr: a.lr,
        warmup_ratio: a.warmup_ratio,
        weight_decay: a.weight_decay,
        batch_size: a.batch_size,
        grad_accum: a.grad_accum,
        max_input_len: a.max_input_len,
        max_target_len: a.max_target_len,
        seed: a.seed,
        init_seed: None,
        eval_every: a.eval_every,
        max_eval_examples: a.max_eval_examples,
        checkpoint_every: a.checkpoint_every,
        lora: LoraConfig {
            rank: a.rank,
            alpha: a.alpha,
            dropout: a.dropout,
            target_modules: target_modules(&a.target_modules),
            ..LoraConfig::default()
        },
    };
    cfg.validate()?;
    let clusters = match &a.clusters {
        Some(path) => {
            let mut c = quiver_core::transform::Clustering::load(path)?.clusters;
            if let Some(only) = &a.cluster {
                let Some(members) = c.remove(only) else {
                    bail!(
                        "{}: no cluster called `{only}` (it has {})",
                        path.display(),
                        c.keys().cloned().collect::<Vec<_>>().join(", ")
                    );
                };
                c = [(only.clone(), members)].into_iter().collect();
            }
            a.tasks = c.values().flatten().cloned().collect();
            Some(c)
        }
        None => None,
    };
    for t in &a.tasks {
        if is_held_out(t) {
            bail!(
                "task `{t}` is one of the held-out evaluation tasks and is never used for training"
            );
        }
        if a.held_out.iter().any(|h| h.trim() == t.trim()) {
            bail!("task `{t}` is held out (--held-out) and is never used for training");
        }
    }
    let home = quiver_core::assets::quiver_home();
    let spec = match &a.data {
        Some(p) => p.to_string_lossy().into_owned(),
        None => a.source.clone(),
    };
    let source = DataSource::from_spec(&spec, &home)?;
    // Load every task first: a typo fails before hours of training.
    let mut tasks: Vec<(String, Vec<Example>, Vec<Example>)> = Vec::new();
    for t in &a.tasks {
        let all = source.load_task(t)?;
        let train = split_examples_with(
            &all,
            t,
            a.split_seed,
            a.cap,
            Split::Train,
            a.split_fractions,
        );
        let val = split_examples_with(
            &all,
            t,
            a.split_seed,
            a.cap,
            Split::Validation,
            a.split_fractions,
        );
        if train.is_empty() {
            bail!(
                "task `{t}` has no training examples after the split ({} examples in all)",
                all.len()
            );
        }
        tasks.push((t.clone(), train, val));
    }
    let by_task: std::collections::HashMap<String, (Vec<Example>, Vec<Example>)> = tasks
        .iter()
        .map(|(t, tr, va)| (t.clone(), (tr.clone(), va.clone())))
        .collect();
    let jobs: Vec<Job> = match (&clusters, &a.shared) {
        (Some(clusters), _) => clusters
            .iter()
            .map(|(name, members)| {
                let mut train = Vec::new();
                let mut vals = Vec::new();
                for t in members {
                    let (tr, va) = &by_task[t];
                    train.extend(tr.iter().cloned());
                    vals.push(va.as_slice());
                }
                let val = interleave(&vals);
                Job {
                    name: name.clone(),
                    tasks: members.clone(),
                    train,
                    val,
                }
            })
            .collect(),
        (None, Some(name)) => {
            validate_name(name)?;
            let mut train = Vec::new();
            let mut vals = Vec::new();
            for (_, tr, va) in &tasks {
                train.extend(tr.iter().cloned());
                vals.push(va.as_slice());
            }
            let val = interleave(&vals);
            vec![Job {
                name: name.clone(),
                tasks: a.tasks.clone(),
                train,
                val,
            }]
        }
        (None, None) => tasks
            .into_iter()
            .map(|(t, train, val)| Job {
                name: expert_name_for_task(&t),
                tasks: vec![t],
                train,
                val,
            })
            .collect(),
    };
    for job in &jobs {
        validate_name(&job.name)?;
    }
    let library = quiver_core::library::ExpertLibrary::open_or_create(&a.library)?;
    // Checkpoints stay on local disk: next to a local library, under
    // $QUIVER_HOME for a remote one.
    let staging_root = match library.root() {
        Some(root) => root.join(".staging"),
        None => {
            let h = quiver_core::hash::sha256_hex(a.library.as_bytes());
            home.join("staging").join(&h[..16])
        }
    };

    let mut lm = super::load_model(g, &a.model)?;
    let base = BaseModelId {
        id: a.model.model.clone(),
        fingerprint: model_fingerprint(&lm.model)?,
    };
    let total = jobs.len();
    for (i, job) in jobs.into_iter().enumerate() {
        let Job {
            name,
            tasks: task_names,
            train,
            val,
        } = job;
        if library.contains(&name)? {
            if !g.quiet {
                eprintln!(
                    "[{}/{total}] {name}: already in the library, skipping",
                    i + 1
                );
            }
            continue;
        }
        let staging = staging_root.join(&name);
        let pb = if crate::progress::enabled(g) {
            let pb = ProgressBar::new(cfg.steps as u64);
            pb.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed}, eta {eta})",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            pb.set_prefix(format!("[{}/{total}] {name}", i + 1));
            pb
        } else {
            ProgressBar::hidden()
        };
        let mut bar = Bar { pb };
        let cfg = TrainConfig {
            init_seed: Some(match a.init {
                InitScheme::PerExpert => a.seed ^ stable_hash(&name),
                InitScheme::Shared => a.seed,
            }),
            ..cfg.clone()
        };
        let (weights, report) = train_lora(
            &mut lm.model,
            &lm.tokenizer,
            &train,
            &val,
            &cfg,
            Some(&staging),
            &mut bar,
        )?;
        bar.pb.finish_and_clear();
        let expert = make_expert(&name, task_names, weights, &cfg, &report, base.clone());
        library.add_expert(&expert)?;
        let _ = std::fs::remove_dir_all(&staging);
        if !g.quiet {
            let fmt = |v: Option<f64>| v.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
            eprintln!(
                "[{}/{total}] {name}: {} train examples, val loss {} -> {} ({} steps, {:.0}s{})",
                i + 1,
                train.len(),
                fmt(report.base_val_loss),
                fmt(report.val_loss),
                report.steps,
                report.wall_time_s,
                if report.resumed_from_step > 0 {
                    format!(", resumed at step {}", report.resumed_from_step)
                } else {
                    String::new()
                }
            );
        }
        println!(
            "{}",
            serde_json::json!({"expert": name, "library": a.library, "report": report})
        );
    }
    Ok(ExitCode::SUCCESS)
}
