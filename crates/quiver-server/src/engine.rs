//! The model thread: owns the loaded model and the libraries, takes jobs
//! from a queue, installs each job's route (through the core's one door,
//! `routing::install_route`, reusing the installed route when the next job
//! asks for the same one) and streams tokens back.
//!
//! Jobs run one at a time, in arrival order. Continuous batching (several
//! sequences, each with its own route, in one forward pass) is not built
//! yet; see the crate's documentation.

use std::sync::{mpsc, Arc};

use quiver_core::generate::{generate_until, Flow, SamplingParams, StopReason};
use quiver_core::library::ExpertLibrary;
use quiver_core::routing::{install_route, RouteSpec};
use quiver_core::LoadedModel;
use tokio::sync::mpsc::UnboundedSender;

use crate::explain::{ExplainMode, Recorder};
use crate::metrics::Metrics;

/// Which library and route a job runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// Index into the server's libraries (`None`: the base model).
    pub library: Option<usize>,
    pub spec: RouteSpec,
}

/// One generation.
#[derive(Debug)]
pub struct Job {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub stop: Vec<String>,
    pub target: Target,
    /// `quiver_explain`: per-token expert weights (per-token routes only).
    pub explain: Option<ExplainMode>,
    pub events: UnboundedSender<Event>,
    /// When the job was submitted (latency and time-to-first-token metrics).
    pub submitted: std::time::Instant,
}

/// What a job sends back, in order: text pieces, then one `Done` or `Error`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Text(String),
    /// The experts behind the next generated token (`quiver_explain`),
    /// sent before that token's text.
    Explain(serde_json::Value),
    Done {
        reason: StopReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Error(String),
}

/// Starts the model thread; jobs sent to the returned queue run in order.
pub fn start(
    mut lm: LoadedModel,
    libraries: Vec<ExpertLibrary>,
    metrics: Arc<Metrics>,
) -> mpsc::Sender<Job> {
    let (tx, rx) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("quiver-model".into())
        .spawn(move || {
            let mut installed: Option<Target> = None;
            let recorder = Arc::new(Recorder::new(metrics.clone()));
            for job in rx {
                metrics.job_started();
                let (prompt, completion) = match run_job(
                    &mut lm,
                    &libraries,
                    &mut installed,
                    &recorder,
                    &metrics,
                    &job,
                ) {
                    Ok(n) => (job.prompt.len(), n),
                    Err(e) => {
                        let _ = job.events.send(Event::Error(e.to_string()));
                        (0, 0)
                    }
                };
                metrics.job_finished(job.submitted.elapsed().as_secs_f64(), prompt, completion);
                recorder.set_active(false);
            }
        })
        .expect("the model thread starts");
    tx
}

fn run_job(
    lm: &mut LoadedModel,
    libraries: &[ExpertLibrary],
    installed: &mut Option<Target>,
    recorder: &Arc<Recorder>,
    metrics: &Metrics,
    job: &Job,
) -> quiver_core::Result<usize> {
    if installed.as_ref() != Some(&job.target) {
        *installed = None;
        let lib = job.target.library.map(|i| &libraries[i]);
        // Per-token routes always report to the recorder; it keeps
        // decisions only for jobs that asked.
        let observer = job
            .target
            .spec
            .route
            .selector_kind()
            .map(|_| recorder.clone() as Arc<dyn quiver_core::routing::RouteObserver>);
        let session = install_route(lm, lib, &job.target.spec, observer)?;
        tracing::info!("route: {}", session.installed.description);
        *installed = Some(job.target.clone());
    }
    let tok = &lm.tokenizer;
    let mut ids: Vec<u32> = Vec::new();
    let mut sent = 0usize;
    let mut stopped_at: Option<usize> = None;
    recorder.set_active(job.explain.is_some());
    let (out, reason) = generate_until(&lm.model, &job.prompt, &job.params, tok.eos_ids(), |id| {
        if let Some(mode) = job.explain {
            if let Some(v) = recorder.take(mode) {
                if job.events.send(Event::Explain(v)).is_err() {
                    return Ok(Flow::Stop); // the client is gone
                }
            }
        }
        if ids.is_empty() {
            metrics.first_token(job.submitted.elapsed().as_secs_f64());
        }
        ids.push(id);
        // Decode the whole tail: byte-level tokens may split a character.
        let text = tok.decode(&ids, true)?;
        if text.ends_with('\u{FFFD}') {
            return Ok(Flow::Continue);
        }
        let mut end = text.len();
        let mut stop = false;
        if let Some(at) = job
            .stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            end = at;
            stop = true;
            stopped_at = Some(at);
        }
        // Hold back a tail that could still grow into a stop sequence.
        let hold = if stop {
            0
        } else {
            job.stop
                .iter()
                .map(|s| longest_prefix_suffix(&text[..end], s))
                .max()
                .unwrap_or(0)
        };
        let ready = floor_char_boundary(&text, end - hold);
        if ready > sent {
            if job
                .events
                .send(Event::Text(text[sent..ready].to_string()))
                .is_err()
            {
                return Ok(Flow::Stop); // the client is gone
            }
            sent = ready;
        }
        Ok(if stop { Flow::Stop } else { Flow::Continue })
    })?;
    if stopped_at.is_none() {
        // Whatever was held back for a stop sequence that never came.
        let text = tok.decode(&ids, true)?;
        if text.len() > sent {
            let _ = job.events.send(Event::Text(text[sent..].to_string()));
        }
    }
    let _ = job.events.send(Event::Done {
        reason,
        prompt_tokens: job.prompt.len(),
        completion_tokens: out.len(),
    });
    Ok(out.len())
}

/// The length of the longest proper prefix of `stop` that `text` ends with.
fn longest_prefix_suffix(text: &str, stop: &str) -> usize {
    (1..stop.len())
        .rev()
        .filter(|&n| stop.is_char_boundary(n))
        .find(|&n| text.ends_with(&stop[..n]))
        .unwrap_or(0)
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_back_tail_is_the_longest_stop_prefix() {
        assert_eq!(longest_prefix_suffix("hello wo", "world"), 2);
        assert_eq!(longest_prefix_suffix("hello", "world"), 0);
        assert_eq!(longest_prefix_suffix("ab\n", "\n\n"), 1);
        assert_eq!(floor_char_boundary("aé", 2), 1);
    }
}
