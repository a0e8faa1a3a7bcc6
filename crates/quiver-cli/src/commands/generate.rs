//! `quiver generate`: greedy or sampled generation with a KV cache.

use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Result;
use quiver_core::generate::{generate, SamplingParams};
use quiver_core::tokenizer::ChatMessage;

use crate::args::GenerateArgs;
use crate::flags::GlobalArgs;

pub fn run(g: &GlobalArgs, a: GenerateArgs) -> Result<ExitCode> {
    let params = SamplingParams {
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
        max_tokens: a.max_tokens,
    };
    params.validate()?;
    let mut lm = super::load_model(g, &a.model)?;
    super::route::apply_route(&mut lm, &a.route)?;
    let tok = &lm.tokenizer;
    let prompt = if a.chat {
        let msgs = [ChatMessage {
            role: "user".into(),
            content: a.prompt.clone(),
        }];
        tok.apply_chat_template(&msgs, true)?
    } else {
        a.prompt.clone()
    };
    let ids = tok.encode(&prompt)?;
    let start = Instant::now();
    let mut printed = String::new();
    let mut stdout = std::io::stdout().lock();
    let mut new_ids: Vec<u32> = Vec::new();
    let (out, reason) = generate(&lm.model, &ids, &params, tok.eos_ids(), |id| {
        if !a.json {
            // Decode the whole tail each time: byte-level BPE tokens may
            // split a UTF-8 character, so print only complete text.
            new_ids.push(id);
            let text = tok.decode(&new_ids, true)?;
            if text.len() > printed.len() && !text.ends_with('\u{FFFD}') {
                let _ = write!(stdout, "{}", &text[printed.len()..]);
                let _ = stdout.flush();
                printed = text;
            }
        }
        Ok(())
    })?;
    let secs = start.elapsed().as_secs_f64();
    let text = tok.decode(&out, true)?;
    if a.json {
        let v = serde_json::json!({
            "prompt": prompt,
            "text": text,
            "prompt_tokens": ids.len(),
            "tokens": out,
            "stop_reason": reason,
            "tokens_per_second": out.len() as f64 / secs.max(1e-9),
        });
        writeln!(stdout, "{v}")?;
    } else {
        if text.len() > printed.len() {
            write!(stdout, "{}", &text[printed.len()..])?;
        }
        writeln!(stdout)?;
        tracing::info!("{} tokens in {secs:.2}s ({reason:?})", out.len());
    }
    Ok(ExitCode::SUCCESS)
}
