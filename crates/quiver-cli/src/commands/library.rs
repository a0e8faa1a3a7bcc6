//! `quiver library`: list, show, import, export, remove, verify and copy
//! the experts of a library, in a directory or at `s3://bucket/prefix`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use indicatif::{ProgressBar, ProgressStyle};
use quiver_core::library::{format_utc, ExpertEntry, ExpertLibrary};

use crate::flags::GlobalArgs;

#[derive(Debug, clap::Args)]
#[command(
    after_help = "A library is a directory (one sub-directory per expert, in Hugging Face PEFT's \
layout) or an S3-compatible bucket, `s3://bucket/prefix`, with the same layout. S3 credentials and \
endpoint come from the usual environment: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION (or \
AWS_DEFAULT_REGION) and, for other S3-compatible servers, AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3; \
plain http:// endpoints are allowed).\n\nEvery file of an expert is recorded with its sha256 in the \
expert's quiver_manifest.json; `verify` re-hashes them. A library holds experts of one base model: \
the first expert that names one records it, and experts of another base model (or whose layer shapes \
differ from the library's) are refused."
)]
pub struct LibraryArgs {
    /// The library: a directory or s3://bucket/prefix (default: $QUIVER_LIBRARY).
    #[arg(long, env = "QUIVER_LIBRARY", global = true, value_name = "LIB")]
    pub library: Option<String>,
    #[command(subcommand)]
    pub command: LibraryCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum LibraryCommand {
    /// List the experts: name, tasks, rank, adapted layers, size, creation time.
    Ls {
        /// Print a JSON array of {name, tasks, base_model, rank, alpha, target_modules, modules, created, size, sealed}.
        #[arg(long)]
        json: bool,
    },
    /// Show one expert: base model, LoRA and training configuration, metrics, file hashes.
    Show {
        name: String,
        /// Print {manifest, lora_config, info} as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add PEFT adapter directories (written by Quiver or any other tool). The library is
    /// created if needed; adapters must fit its base model.
    Import {
        /// Adapter directories (adapter_config.json + adapter_model.safetensors).
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
        /// Name of the expert (only with one PATH; default: the name in its
        /// quiver_expert.json, else the directory's name).
        #[arg(long)]
        name: Option<String>,
        /// Import PEFT adapters whose base_model_name_or_path does not name the
        /// library's base model (when you know they are the same weights).
        #[arg(long)]
        allow_base_mismatch: bool,
    },
    /// Write an expert as a PEFT adapter directory DIR (must not exist, or be empty).
    Export { name: String, dir: PathBuf },
    /// Remove an expert: moved to the library's .trash/ (no longer listed), or deleted with --purge.
    Rm {
        name: String,
        /// Delete for good (also clears what an interrupted write left under NAME).
        #[arg(long)]
        purge: bool,
    },
    /// Re-hash every file of every expert; exits non-zero naming each corrupt or missing file.
    Verify {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Copy every expert (and cached transform data) from SRC into DST, e.g. from a
    /// directory to s3://bucket/prefix. With one argument, SRC is --library.
    Copy {
        #[arg(required = true, num_args = 1..=2, value_names = ["SRC", "DST"])]
        uris: Vec<String>,
    },
}

fn library_uri(a: &Option<String>) -> Result<String> {
    match a.as_deref().map(str::trim) {
        Some(s) if !s.is_empty() => Ok(s.to_string()),
        _ => bail!("no library given: pass --library LIB (a directory or s3://bucket/prefix) or set QUIVER_LIBRARY"),
    }
}

fn human_size(bytes: u64) -> String {
    let mut v = bytes as f64;
    for unit in ["B", "KiB", "MiB", "GiB"] {
        if v < 1024.0 || unit == "GiB" {
            return if unit == "B" {
                format!("{bytes} B")
            } else {
                format!("{v:.1} {unit}")
            };
        }
        v /= 1024.0;
    }
    unreachable!()
}

fn short(s: &str) -> &str {
    &s[..s.len().min(12)]
}

fn counter(g: &GlobalArgs, what: &str) -> ProgressBar {
    if !crate::progress::enabled(g) {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(0);
    pb.set_style(
        ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} {wide_msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_prefix(what.to_string());
    pb
}

fn print_table(entries: &[ExpertEntry]) {
    let rows: Vec<[String; 6]> = entries
        .iter()
        .map(|e| {
            let mut tasks = e.tasks.join(",");
            if tasks.chars().count() > 40 {
                tasks = tasks.chars().take(39).collect::<String>() + "…";
            }
            let created = if e.created == 0 {
                "-".to_string()
            } else {
                format_utc(e.created)[..16].replace('T', " ")
            };
            [
                format!("{}{}", e.name, if e.sealed { "" } else { "*" }),
                if tasks.is_empty() { "-".into() } else { tasks },
                e.rank.to_string(),
                e.modules.to_string(),
                human_size(e.size),
                created,
            ]
        })
        .collect();
    let header = ["NAME", "TASKS", "RANK", "LAYERS", "SIZE", "CREATED (UTC)"];
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: [&str; 6]| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
            let pad = w - c.chars().count();
            // Numbers right-aligned, text left-aligned.
            if (2..=4).contains(&i) {
                s.push_str(&" ".repeat(pad));
                s.push_str(c);
            } else {
                s.push_str(c);
                s.push_str(&" ".repeat(pad));
            }
            s.push_str("  ");
        }
        println!("{}", s.trim_end());
    };
    line(header);
    for r in &rows {
        line([&r[0], &r[1], &r[2], &r[3], &r[4], &r[5]]);
    }
}

pub fn run(g: &GlobalArgs, a: LibraryArgs) -> Result<ExitCode> {
    match a.command {
        LibraryCommand::Ls { json } => {
            let lib = ExpertLibrary::open(&library_uri(&a.library)?)?;
            let entries = lib.list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
                return Ok(ExitCode::SUCCESS);
            }
            if !g.quiet {
                let base = match lib.base_model()? {
                    Some(b) => format!(
                        "base model `{}` (fingerprint {})",
                        b.id,
                        short(&b.fingerprint)
                    ),
                    None => "no base model recorded yet".into(),
                };
                eprintln!("{}: {} expert(s), {base}", lib.uri(), entries.len());
            }
            if !entries.is_empty() {
                print_table(&entries);
            }
            if entries.iter().any(|e| !e.sealed) && !g.quiet {
                eprintln!(
                    "* no manifest (written by an older quiver): its files are not hash-checked"
                );
            }
        }
        LibraryCommand::Show { name, json } => {
            let lib = ExpertLibrary::open(&library_uri(&a.library)?)?;
            let manifest = lib.manifest(&name)?;
            let expert = lib.load_expert(&name, &Device::Cpu, DType::F32)?;
            if json {
                let v = serde_json::json!({
                    "manifest": manifest,
                    "lora_config": expert.config,
                    "info": expert.info,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(ExitCode::SUCCESS);
            }
            let base = match &manifest.base_model {
                Some(b) => format!("{} (fingerprint {})", b.id, b.fingerprint),
                None => "unknown (a PEFT adapter without Quiver metadata)".into(),
            };
            let targets = serde_json::to_string(&manifest.target_modules)?;
            println!("name:         {}", manifest.name);
            println!("tasks:        {}", manifest.tasks.join(", "));
            println!("base model:   {base}");
            println!(
                "LoRA:         rank {}, alpha {}, dropout {}, target_modules {targets}",
                expert.config.rank, expert.config.alpha, expert.config.dropout
            );
            println!("layers:       {}", manifest.modules.len());
            if let Some(info) = &expert.info {
                println!("training:     {}", serde_json::to_string(&info.training)?);
                let metrics: Vec<String> = info
                    .metrics
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                println!("metrics:      {}", metrics.join(", "));
            }
            let when = |t: u64| if t == 0 { "-".into() } else { format_utc(t) };
            println!("created:      {}", when(manifest.created));
            println!("added:        {}", when(manifest.added));
            println!("size:         {}", human_size(manifest.size()));
            println!("files:");
            for (f, d) in &manifest.files {
                println!("  {f:<28} {:>10}  sha256 {}", human_size(d.size), d.sha256);
            }
        }
        LibraryCommand::Import {
            paths,
            name,
            allow_base_mismatch,
        } => {
            if name.is_some() && paths.len() != 1 {
                bail!("--name needs exactly one PATH (got {})", paths.len());
            }
            let lib = ExpertLibrary::open_or_create(&library_uri(&a.library)?)?;
            for p in &paths {
                let res = lib.import_dir_with(p, name.as_deref(), allow_base_mismatch);
                // With several paths, say which one failed (one path: the
                // message names it or its expert already).
                let n = if paths.len() > 1 {
                    res.with_context(|| format!("cannot import {}", p.display()))?
                } else {
                    res?
                };
                if !g.quiet {
                    eprintln!("imported {} as `{n}` into {}", p.display(), lib.uri());
                }
                println!("{n}");
            }
        }
        LibraryCommand::Export { name, dir } => {
            let lib = ExpertLibrary::open(&library_uri(&a.library)?)?;
            lib.export(&name, &dir)?;
            if !g.quiet {
                eprintln!("exported `{name}` to {}", dir.display());
            }
        }
        LibraryCommand::Rm { name, purge } => {
            let lib = ExpertLibrary::open(&library_uri(&a.library)?)?;
            lib.remove(&name, purge)?;
            if !g.quiet {
                if purge {
                    eprintln!("deleted `{name}` from {}", lib.uri());
                } else {
                    eprintln!(
                        "removed `{name}` from {} (kept in its .trash/; --purge deletes for good)",
                        lib.uri()
                    );
                }
            }
        }
        LibraryCommand::Verify { json } => {
            let lib = ExpertLibrary::open(&library_uri(&a.library)?)?;
            let pb = counter(g, "verify");
            let report = lib.verify_with(&mut |done, total, what| {
                pb.set_length(total as u64);
                pb.set_position(done as u64);
                pb.set_message(what.to_string());
            })?;
            pb.finish_and_clear();
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for p in &report.problems {
                    println!("{p}");
                }
                if !g.quiet {
                    for n in &report.notes {
                        eprintln!("note: {n}");
                    }
                }
            }
            if !report.is_ok() {
                bail!(
                    "library {} failed verification: {} problem(s) in {} expert(s), {} file(s) checked",
                    lib.uri(),
                    report.problems.len(),
                    report.experts,
                    report.files
                );
            }
            if !json && !g.quiet {
                eprintln!(
                    "ok: {} expert(s), {} file(s) verified in {}",
                    report.experts,
                    report.files,
                    lib.uri()
                );
            }
        }
        LibraryCommand::Copy { uris } => {
            let (src, dst) = match uris.as_slice() {
                [src, dst] => (src.clone(), dst.clone()),
                [dst] => (library_uri(&a.library)?, dst.clone()),
                _ => unreachable!("clap takes one or two"),
            };
            let src = ExpertLibrary::open(&src)?;
            let dst = ExpertLibrary::open_or_create(&dst)?;
            let pb = counter(g, "copy");
            let report = src.copy_to_with(&dst, &mut |done, total, what| {
                pb.set_length(total as u64);
                pb.set_position(done as u64);
                pb.set_message(what.to_string());
            })?;
            pb.finish_and_clear();
            if !g.quiet {
                eprintln!(
                    "copied {} expert(s) from {} to {} ({} already there, {} auxiliary object(s))",
                    report.copied.len(),
                    src.uri(),
                    dst.uri(),
                    report.skipped.len(),
                    report.aux_copied
                );
            }
            for n in &report.copied {
                println!("{n}");
            }
            if !report.conflicts.is_empty() {
                bail!(
                    "{} expert(s) of {} differ from those of the same name in {} and were left alone: {}",
                    report.conflicts.len(),
                    src.uri(),
                    dst.uri(),
                    report.conflicts.join(", ")
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
