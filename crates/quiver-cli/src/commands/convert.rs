//! `quiver convert`: write a model as a Hugging Face directory.

use std::process::ExitCode;

use anyhow::Result;

use crate::args::ConvertArgs;
use crate::flags::GlobalArgs;

pub fn run(g: &GlobalArgs, a: ConvertArgs) -> Result<ExitCode> {
    let lm = super::load_model(g, &a.model)?;
    let sp = crate::progress::spinner(g, &format!("writing {}", a.out.display()));
    let r = quiver_core::model::write_hf_dir(&lm.model, &lm.tokenizer, &a.out);
    sp.finish_and_clear();
    r?;
    if !g.quiet {
        eprintln!(
            "wrote {} (config.json, model.safetensors, tokenizer.json, tokenizer_config.json)",
            a.out.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
