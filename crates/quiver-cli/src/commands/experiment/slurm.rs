//! `quiver experiment --executor slurm`: each phase with work left is one
//! job array (`sbatch --array`, element `SLURM_ARRAY_TASK_ID` runs
//! `quiver experiment --phase P --index I`), chained to the phase before by
//! `afterok`; progress is followed with `squeue` (and `sacct` where
//! accounting is configured). Only units whose output is missing are
//! submitted, so running the same command after a failure, a timeout or
//! `scancel` resubmits exactly what is missing. Jobs submitted by an earlier
//! run that are still queued are followed, not submitted twice.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use quiver_core::fsutil::write_atomic;

use super::config::{Resources, SlurmSection};
use super::plan::{self, Ctx, Phase, Unit};
use super::shell_quote;
use crate::flags::GlobalArgs;

/// Checks `[slurm.phases.*]` names and `extra` lines.
pub fn validate(s: &SlurmSection, origin: &str) -> Result<()> {
    for name in s.phases.keys() {
        if !Phase::ALL.iter().any(|p| p.name() == name) {
            bail!(
                "{origin}: [slurm.phases.{name}]: no such phase (phases: {})",
                Phase::ALL.map(|p| p.name()).join(", ")
            );
        }
    }
    for line in s
        .defaults
        .extra
        .iter()
        .chain(s.phases.values().flat_map(|r| &r.extra))
    {
        if line.contains('\n') {
            bail!("{origin}: [slurm] extra: one sbatch option per entry, without newlines");
        }
    }
    Ok(())
}

/// A phase's resources: `[slurm.phases.PHASE]` over `[slurm]`.
fn resources(s: &SlurmSection, phase: Phase) -> Resources {
    match s.phases.get(phase.name()) {
        Some(r) => r.or(&s.defaults),
        None => s.defaults.clone(),
    }
}

/// What to submit.
pub struct Submit<'a> {
    pub ctx: &'a Ctx<'a>,
    pub phases: &'a [(Phase, Vec<Unit>)],
    /// The experiment file's text (written to OUT/experiment.toml, which the
    /// jobs read).
    pub text: &'a str,
    pub library_root: Option<&'a str>,
    /// The training settings' key file and its contents.
    pub key: (&'a Path, &'a str),
}

/// `0,2,5-9`: Slurm's array index list.
fn index_list(indices: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < indices.len() {
        let start = indices[i];
        let mut end = start;
        while i + 1 < indices.len() && indices[i + 1] == end + 1 {
            i += 1;
            end = indices[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join(",")
}

fn slurm_dir(out: &Path) -> PathBuf {
    out.join("slurm")
}

/// The log of element `index` of a phase's array.
fn log_path(out: &Path, phase: Phase, index: usize) -> PathBuf {
    slurm_dir(out).join(format!("{}-{index}.log", phase.name()))
}

fn quiver_exe(s: &Submit) -> Result<String> {
    match &s.ctx.cfg.slurm.quiver {
        Some(q) => Ok(q.clone()),
        None => Ok(std::env::current_exe()
            .context("cannot find the quiver executable")?
            .display()
            .to_string()),
    }
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p)
        .with_context(|| format!("{}: cannot make the path absolute", p.display()))
}

/// The sbatch script of one phase's array over `indices`.
fn script(s: &Submit, phase: Phase, indices: &[usize]) -> Result<String> {
    let cfg = s.ctx.cfg;
    let out = absolute(s.ctx.out)?;
    let r = resources(&cfg.slurm, phase);
    let mut t = String::from("#!/bin/bash\n");
    let mut opt = |o: String| t.push_str(&format!("#SBATCH {o}\n"));
    opt(format!("--job-name=quiver-{}-{}", cfg.name, phase.name()));
    let throttle = r.max_running.map(|n| format!("%{n}")).unwrap_or_default();
    opt(format!("--array={}{throttle}", index_list(indices)));
    opt(format!(
        "--output={}",
        slurm_dir(&out)
            .join(format!("{}-%a.log", phase.name()))
            .display()
    ));
    if let Some(c) = r.cpus {
        opt(format!("--cpus-per-task={c}"));
    }
    if let Some(m) = &r.mem {
        opt(format!("--mem={m}"));
    }
    if let Some(x) = &r.time {
        opt(format!("--time={x}"));
    }
    if let Some(p) = &r.partition {
        opt(format!("--partition={p}"));
    }
    if let Some(g) = r.gpus.filter(|g| *g > 0) {
        opt(format!("--gpus-per-task={g}"));
    }
    for e in &r.extra {
        opt(e.trim().trim_start_matches("#SBATCH").trim().to_string());
    }
    t.push_str("set -euo pipefail\n");
    for line in &cfg.slurm.setup {
        t.push_str(line);
        t.push('\n');
    }
    let mut cmd = vec![
        quiver_exe(s)?,
        "--no-progress".into(),
        "experiment".into(),
        "--config".into(),
        out.join("experiment.toml").display().to_string(),
        "--out".into(),
        out.display().to_string(),
    ];
    if let Some(root) = s.library_root {
        cmd.extend(["--library-root".into(), root.to_string()]);
    }
    cmd.extend(["--phase".into(), phase.name().into()]);
    let line: Vec<String> = cmd.iter().map(|a| shell_quote(a)).collect();
    t.push_str(&format!(
        "exec {} --index \"$SLURM_ARRAY_TASK_ID\"\n",
        line.join(" ")
    ));
    Ok(t)
}

/// Per phase, the indices of units whose output is missing.
fn pending(s: &Submit) -> Result<Vec<(Phase, Vec<usize>)>> {
    let mut v = Vec::new();
    for (phase, units) in s.phases {
        let mut idx = Vec::new();
        for (i, u) in units.iter().enumerate() {
            if !plan::is_done(s.ctx, u)? {
                idx.push(i);
            }
        }
        if !idx.is_empty() {
            v.push((*phase, idx));
        }
    }
    Ok(v)
}

/// `--dry-run`: the scripts that would be submitted, and how they chain.
pub fn dry_run(s: &Submit) -> Result<()> {
    let todo = pending(s)?;
    if todo.is_empty() {
        eprintln!("nothing to submit: every unit of work is done");
    }
    for (n, (phase, idx)) in todo.iter().enumerate() {
        let dep = if n == 0 {
            String::new()
        } else {
            format!(" --dependency=afterok:<job of {}>", todo[n - 1].0.name())
        };
        println!(
            "# phase {} ({} of {} units): sbatch --parsable{dep} {}",
            phase.name(),
            idx.len(),
            s.phases
                .iter()
                .find(|(p, _)| p == phase)
                .map_or(0, |(_, u)| u.len()),
            slurm_dir(s.ctx.out)
                .join(format!("{}.sbatch", phase.name()))
                .display()
        );
        println!("{}", script(s, *phase, idx)?);
    }
    Ok(())
}

/// Jobs this experiment submitted: phase name -> (job id, indices).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Submitted {
    jobs: Vec<Job>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Job {
    phase: String,
    id: String,
    indices: Vec<usize>,
}

fn jobs_file(out: &Path) -> PathBuf {
    slurm_dir(out).join("jobs.json")
}

fn tool(name: &str) -> Command {
    Command::new(name)
}

fn output(cmd: &mut Command, what: &str) -> Result<String> {
    let o = cmd
        .output()
        .with_context(|| format!("cannot run {what}: is Slurm installed and on PATH?"))?;
    if !o.status.success() {
        bail!(
            "{what} failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// An array element's state as Slurm reports it.
#[derive(Debug, Clone, PartialEq)]
struct ElementState {
    state: String,
    reason: String,
}

const ACTIVE: [&str; 8] = [
    "PENDING",
    "RUNNING",
    "CONFIGURING",
    "COMPLETING",
    "SUSPENDED",
    "REQUEUED",
    "RESIZING",
    "SIGNALING",
];

impl ElementState {
    fn active(&self) -> bool {
        ACTIVE.contains(&self.state.as_str()) && !self.never_runs()
    }
    /// Pending on a phase that failed: it will never start.
    fn never_runs(&self) -> bool {
        self.state == "PENDING" && self.reason.contains("DependencyNeverSatisfied")
    }
}

/// The states of the elements of `jobs` still known to squeue (pending,
/// running, or finished within MinJobAge), keyed by (job id, index).
fn squeue(jobs: &[Job]) -> Result<BTreeMap<(String, usize), ElementState>> {
    let ids: Vec<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
    let mut states = BTreeMap::new();
    if ids.is_empty() {
        return Ok(states);
    }
    let text = output(
        tool("squeue").args([
            "--noheader",
            "--array",
            "--states=all",
            "--jobs",
            &ids.join(","),
            "--format=%i|%T|%r",
        ]),
        "squeue",
    )
    .or_else(|e| {
        // squeue refuses a list in which every job has left its memory.
        if e.to_string().contains("Invalid job id") {
            Ok(String::new())
        } else {
            Err(e)
        }
    })?;
    for line in text.lines() {
        let mut f = line.split('|');
        let (Some(id), Some(state), reason) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let Some((job, idx)) = id.trim().split_once('_') else {
            continue;
        };
        let Ok(idx) = idx.parse::<usize>() else {
            continue;
        };
        states.insert(
            (job.to_string(), idx),
            ElementState {
                state: state.trim().to_string(),
                reason: reason.unwrap_or("").trim().to_string(),
            },
        );
    }
    Ok(states)
}

/// Final states from accounting, where it is configured (None: no accounting).
fn sacct(jobs: &[Job]) -> Option<BTreeMap<(String, usize), String>> {
    let ids: Vec<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
    let o = tool("sacct")
        .args([
            "--noheader",
            "--parsable2",
            "--allocations",
            "--jobs",
            &ids.join(","),
            "--format=JobID,State",
        ])
        .output()
        .ok()?;
    if !o.status.success() {
        return None;
    }
    let mut m = BTreeMap::new();
    for line in String::from_utf8_lossy(&o.stdout).lines() {
        let Some((id, state)) = line.split_once('|') else {
            continue;
        };
        if let Some((job, idx)) = id.split_once('_') {
            if let Ok(idx) = idx.parse() {
                let state = state.split_whitespace().next().unwrap_or("").to_string();
                m.insert((job.to_string(), idx), state);
            }
        }
    }
    Some(m)
}

fn load_submitted(out: &Path) -> Submitted {
    std::fs::read_to_string(jobs_file(out))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

/// Submits what is missing, follows it to the end, and fails naming every
/// unit that did not finish (its state and log file).
pub fn run(g: &GlobalArgs, s: &Submit) -> Result<()> {
    let out = s.ctx.out;
    std::fs::create_dir_all(slurm_dir(out))
        .with_context(|| format!("cannot create {}", slurm_dir(out).display()))?;
    write_atomic(s.key.0, s.key.1.as_bytes())?;
    write_atomic(&out.join("experiment.toml"), s.text.as_bytes())?;
    // Jobs of an earlier run still in the queue: follow them first, so that
    // nothing is submitted twice.
    let earlier = load_submitted(out);
    let still: Vec<Job> = {
        let states = squeue(&earlier.jobs).unwrap_or_default();
        earlier
            .jobs
            .iter()
            .filter(|j| {
                j.indices.iter().any(|i| {
                    states
                        .get(&(j.id.clone(), *i))
                        .is_some_and(ElementState::active)
                })
            })
            .cloned()
            .collect()
    };
    if !still.is_empty() {
        if !g.quiet {
            eprintln!(
                "following {} job array(s) submitted earlier and still queued: {}",
                still.len(),
                still
                    .iter()
                    .map(|j| format!("{} ({})", j.id, j.phase))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        follow(g, s, &still)?;
    }
    let todo = pending(s)?;
    if todo.is_empty() {
        if !g.quiet {
            eprintln!("every unit of work is done; nothing to submit");
        }
        return Ok(());
    }
    let mut submitted = Submitted::default();
    let mut previous: Option<String> = None;
    for (phase, idx) in &todo {
        let path = slurm_dir(out).join(format!("{}.sbatch", phase.name()));
        write_atomic(&path, script(s, *phase, idx)?.as_bytes())?;
        let mut cmd = tool("sbatch");
        cmd.arg("--parsable");
        if let Some(prev) = &previous {
            cmd.arg(format!("--dependency=afterok:{prev}"));
        }
        cmd.arg(&path);
        let text = output(&mut cmd, &format!("sbatch {}", path.display()))?;
        // `--parsable` prints "ID" or "ID;CLUSTER".
        let id = text.trim().split(';').next().unwrap_or("").to_string();
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
            bail!(
                "sbatch {} printed `{}`, not a job id",
                path.display(),
                text.trim()
            );
        }
        if !g.quiet {
            eprintln!(
                "submitted phase {} as job array {id} ({} units: {}){}",
                phase.name(),
                idx.len(),
                index_list(idx),
                previous
                    .as_ref()
                    .map(|p| format!(", after job {p} succeeds"))
                    .unwrap_or_default()
            );
        }
        submitted.jobs.push(Job {
            phase: phase.name().to_string(),
            id: id.clone(),
            indices: idx.clone(),
        });
        write_atomic(
            &jobs_file(out),
            serde_json::to_string_pretty(&submitted)?.as_bytes(),
        )?;
        previous = Some(id);
    }
    follow(g, s, &submitted.jobs)
}

fn phase_of(name: &str) -> Phase {
    Phase::ALL
        .into_iter()
        .find(|p| p.name() == name)
        .expect("written by us")
}

/// Follows `jobs` until none of their elements can still run; then checks
/// every unit's output.
fn follow(g: &GlobalArgs, s: &Submit, jobs: &[Job]) -> Result<()> {
    let out = s.ctx.out;
    let total: usize = jobs.iter().map(|j| j.indices.len()).sum();
    let poll = Duration::from_secs_f64(s.ctx.cfg.slurm.poll_seconds.unwrap_or(5.0).max(0.1));
    let pb = if crate::progress::enabled(g) {
        let pb = ProgressBar::new(total as u64);
        pb.set_style(
            ProgressStyle::with_template("slurm [{bar:30}] {pos}/{len} units {msg} ({elapsed})")
                .expect("valid template")
                .progress_chars("=> "),
        );
        pb
    } else {
        ProgressBar::hidden()
    };
    let mut last: BTreeMap<(String, usize), String> = BTreeMap::new();
    let mut last_summary = String::new();
    // Elements seen waiting or running: one that leaves the queue without a
    // final state was cancelled before it started (Slurm drops those).
    let mut seen: BTreeSet<(String, usize)> = BTreeSet::new();
    let finals: BTreeMap<(String, usize), String> = loop {
        let states = squeue(jobs)?;
        let mut active = 0usize;
        let mut running = 0usize;
        let mut blocked: BTreeSet<String> = BTreeSet::new();
        let mut reasons: BTreeSet<String> = BTreeSet::new();
        let mut finished = 0usize;
        for j in jobs {
            for i in &j.indices {
                let key = (j.id.clone(), *i);
                match states.get(&key) {
                    Some(st) if st.active() => {
                        seen.insert(key.clone());
                        active += 1;
                        if st.state == "RUNNING" {
                            running += 1;
                        } else if st.state == "PENDING"
                            && !st.reason.is_empty()
                            && st.reason != "None"
                            && st.reason != "Dependency"
                            && st.reason != "Priority"
                            && st.reason != "Resources"
                            && st.reason != "JobArrayTaskLimit"
                        {
                            reasons.insert(st.reason.clone());
                        }
                    }
                    Some(st) if st.never_runs() => {
                        blocked.insert(j.id.clone());
                        finished += 1;
                    }
                    Some(st) => {
                        finished += 1;
                        if st.state != "COMPLETED" && last.get(&key) != Some(&st.state) {
                            let unit = &s
                                .phases
                                .iter()
                                .find(|(p, _)| p.name() == j.phase)
                                .expect("planned")
                                .1[*i];
                            pb.suspend(|| {
                                eprintln!(
                                    "{} element {i} ({}) ended {}: see {}",
                                    j.phase,
                                    plan::describe(s.ctx, unit),
                                    st.state,
                                    log_path(out, phase_of(&j.phase), *i).display()
                                )
                            });
                        }
                        last.insert(key, st.state.clone());
                    }
                    None => finished += 1,
                }
            }
        }
        pb.set_position(finished as u64);
        let summary = format!(
            "{running} running, {} waiting{}",
            active - running,
            if reasons.is_empty() {
                String::new()
            } else {
                format!(" ({})", reasons.into_iter().collect::<Vec<_>>().join(", "))
            }
        );
        if summary != last_summary {
            pb.set_message(summary.clone());
            if pb.is_hidden() && !g.quiet {
                // Without a bar, each change of the queue is one line.
                eprintln!("slurm: {finished}/{total} units finished, {summary}");
            }
            last_summary = summary;
        }
        if active == 0 {
            if !blocked.is_empty() {
                // Their dependency failed: they would wait forever.
                let ids: Vec<String> = blocked.into_iter().collect();
                let _ = tool("scancel").args(&ids).status();
            }
            let mut m: BTreeMap<(String, usize), String> = states
                .into_iter()
                .map(|(k, v)| {
                    let state = if v.never_runs() {
                        "NOT RUN (an earlier phase failed)".to_string()
                    } else {
                        v.state
                    };
                    (k, state)
                })
                .collect();
            if let Some(acct) = sacct(jobs) {
                for (k, v) in acct {
                    m.entry(k).or_insert(v);
                }
            }
            break m;
        }
        std::thread::sleep(poll);
    };
    pb.finish_and_clear();
    // The outputs decide: a unit is done when its output is there.
    let mut failures = Vec::new();
    for j in jobs {
        let phase = phase_of(&j.phase);
        let units = &s
            .phases
            .iter()
            .find(|(p, _)| *p == phase)
            .expect("planned")
            .1;
        for i in &j.indices {
            let Some(unit) = units.get(*i) else { continue };
            if plan::is_done(s.ctx, unit)? {
                continue;
            }
            let key = (j.id.clone(), *i);
            let state = match finals.get(&key) {
                Some(s) => s.clone(),
                None if seen.contains(&key) => {
                    "CANCELLED before it started (it left the queue)".into()
                }
                None => "no longer known to Slurm".into(),
            };
            let hint = match state.as_str() {
                "TIMEOUT" => format!(
                    " (over its time limit: raise `time` in [slurm] or [slurm.phases.{}])",
                    j.phase
                ),
                "OUT_OF_MEMORY" => format!(
                    " (out of memory: raise `mem` in [slurm] or [slurm.phases.{}])",
                    j.phase
                ),
                "NODE_FAIL" => " (its node failed)".into(),
                _ => String::new(),
            };
            failures.push(format!(
                "{} element {i} ({}): {state}{hint}; log: {}",
                j.phase,
                plan::describe(s.ctx, unit),
                log_path(out, phase, *i).display()
            ));
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} of {total} units of work did not finish:\n  {}\nRun the same command again: only what is missing is resubmitted",
            failures.len(),
            failures.join("\n  ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_lists_are_compressed_into_ranges() {
        assert_eq!(index_list(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
        assert_eq!(index_list(&[3]), "3");
        assert_eq!(index_list(&[]), "");
    }

    #[test]
    fn phase_resources_override_the_defaults() {
        let s: SlurmSection = toml::from_str(
            "cpus = 2\nmem = \"4G\"\nextra = [\"--account=lab\"]\n[phases.eval]\ntime = \"01:00:00\"\ncpus = 4\nextra = [\"--qos=low\"]\n",
        )
        .unwrap();
        validate(&s, "t").unwrap();
        let r = resources(&s, Phase::Eval);
        assert_eq!(r.cpus, Some(4));
        assert_eq!(r.mem.as_deref(), Some("4G"));
        assert_eq!(r.time.as_deref(), Some("01:00:00"));
        assert_eq!(r.extra, vec!["--account=lab", "--qos=low"]);
        assert_eq!(resources(&s, Phase::Cluster).cpus, Some(2));
        let bad: SlurmSection = toml::from_str("[phases.evl]\ncpus = 1\n").unwrap();
        assert!(validate(&bad, "t")
            .unwrap_err()
            .to_string()
            .contains("no such phase"));
    }

    #[test]
    fn pending_dependency_never_satisfied_never_runs() {
        let st = ElementState {
            state: "PENDING".into(),
            reason: "DependencyNeverSatisfied".into(),
        };
        assert!(st.never_runs() && !st.active());
        let st = ElementState {
            state: "PENDING".into(),
            reason: "Dependency".into(),
        };
        assert!(st.active());
    }
}
