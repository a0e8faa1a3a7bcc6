//! `GET /metrics` in Prometheus' text format: requests by endpoint and
//! status, tokens in and out, queue depth, batch size, request latency and
//! time to first token (histograms), and how often each expert was chosen.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Upper bounds (seconds) of the latency histograms' buckets.
const BUCKETS: [f64; 12] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Upper bounds of the batch-size histogram's buckets (sequences per pass).
const BATCH_BUCKETS: [f64; 8] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

#[derive(Debug)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    n: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::with(&BUCKETS)
    }
}

impl Histogram {
    fn with(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            n: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        for (c, &b) in self.counts.iter_mut().zip(self.bounds) {
            if v <= b {
                *c += 1;
            }
        }
        self.sum += v;
        self.n += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (c, b) in self.counts.iter().zip(self.bounds) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.n);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", self.sum, self.n);
    }
}

/// The server's counters, shared by the handlers and the model thread.
#[derive(Debug)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    /// Jobs submitted and not finished (waiting or running).
    queued: AtomicU64,
    /// Sequences in the batch.
    running: AtomicU64,
    latency: Mutex<Histogram>,
    ttft: Mutex<Histogram>,
    /// Sequences per forward pass.
    batch: Mutex<Histogram>,
    /// New tokens of all forward passes (prompt chunks and decoded tokens).
    pass_tokens: AtomicU64,
    experts: Mutex<BTreeMap<String, u64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Mutex::default(),
            prompt_tokens: AtomicU64::default(),
            completion_tokens: AtomicU64::default(),
            queued: AtomicU64::default(),
            running: AtomicU64::default(),
            latency: Mutex::default(),
            ttft: Mutex::default(),
            batch: Mutex::new(Histogram::with(&BATCH_BUCKETS)),
            pass_tokens: AtomicU64::default(),
            experts: Mutex::default(),
        }
    }
}

impl Metrics {
    pub fn request(&self, endpoint: &str, status: u16) {
        *self
            .requests
            .lock()
            .expect("metrics")
            .entry((endpoint.to_string(), status))
            .or_default() += 1;
    }

    pub fn job_queued(&self) {
        self.queued.fetch_add(1, Ordering::Relaxed);
    }

    /// Sequences now in the batch.
    pub fn set_running(&self, n: usize) {
        self.running.store(n as u64, Ordering::Relaxed);
    }

    /// One forward pass over `sequences` sequences and `tokens` new tokens.
    pub fn batch(&self, sequences: usize, tokens: usize) {
        self.batch
            .lock()
            .expect("metrics")
            .observe(sequences as f64);
        self.pass_tokens.fetch_add(tokens as u64, Ordering::Relaxed);
    }

    /// Generations submitted and not finished.
    pub fn in_flight(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }

    pub fn first_token(&self, seconds: f64) {
        self.ttft.lock().expect("metrics").observe(seconds);
    }

    pub fn job_finished(&self, seconds: f64, prompt: usize, completion: usize) {
        self.queued.fetch_sub(1, Ordering::Relaxed);
        self.latency.lock().expect("metrics").observe(seconds);
        self.prompt_tokens
            .fetch_add(prompt as u64, Ordering::Relaxed);
        self.completion_tokens
            .fetch_add(completion as u64, Ordering::Relaxed);
    }

    /// An expert chosen `n` more times (one per token and routed layer).
    pub fn experts_chosen(&self, expert: &str, n: u64) {
        *self
            .experts
            .lock()
            .expect("metrics")
            .entry(expert.to_string())
            .or_default() += n;
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP quiver_requests_total HTTP requests by endpoint and status.\n# TYPE quiver_requests_total counter"
        );
        for ((e, s), n) in self.requests.lock().expect("metrics").iter() {
            let _ = writeln!(
                out,
                "quiver_requests_total{{endpoint=\"{e}\",status=\"{s}\"}} {n}"
            );
        }
        for (name, help, v) in [
            (
                "quiver_prompt_tokens_total",
                "Prompt tokens of finished generations.",
                self.prompt_tokens.load(Ordering::Relaxed),
            ),
            (
                "quiver_completion_tokens_total",
                "Generated tokens.",
                self.completion_tokens.load(Ordering::Relaxed),
            ),
            (
                "quiver_batch_tokens_total",
                "New tokens of all forward passes (prompt chunks and decoded tokens).",
                self.pass_tokens.load(Ordering::Relaxed),
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        }
        for (name, help, v) in [
            (
                "quiver_queue_depth",
                "Generations waiting or running.",
                self.queued.load(Ordering::Relaxed),
            ),
            (
                "quiver_running_sequences",
                "Sequences in the batch.",
                self.running.load(Ordering::Relaxed),
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        self.latency.lock().expect("metrics").render(
            &mut out,
            "quiver_request_duration_seconds",
            "Time from a generation's submission to its last token.",
        );
        self.ttft.lock().expect("metrics").render(
            &mut out,
            "quiver_time_to_first_token_seconds",
            "Time from a generation's submission to its first token.",
        );
        self.batch.lock().expect("metrics").render(
            &mut out,
            "quiver_batch_size",
            "Sequences per forward pass.",
        );
        let _ = writeln!(
            out,
            "# HELP quiver_expert_chosen_total Times an expert was among a token's top-k at a routed layer.\n# TYPE quiver_expert_chosen_total counter"
        );
        for (e, n) in self.experts.lock().expect("metrics").iter() {
            let _ = writeln!(out, "quiver_expert_chosen_total{{expert=\"{e}\"}} {n}");
        }
        out
    }
}
