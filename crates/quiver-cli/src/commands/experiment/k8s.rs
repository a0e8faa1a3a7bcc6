//! `quiver experiment --executor k8s --emit DIR`: one Kubernetes Indexed Job
//! per phase (`completionMode: Indexed`; pod `JOB_COMPLETION_INDEX` runs
//! `quiver experiment --phase P --index I`), a ConfigMap holding the
//! experiment file, a last Job that writes the results, and `apply.sh`,
//! which applies them in order and waits for each to complete. S3
//! credentials come from a named Secret; the output directory is a shared
//! volume (PersistentVolumeClaim).

use std::path::Path;

use anyhow::{bail, Context, Result};
use quiver_core::fsutil::write_atomic;
use serde_json::{json, Value};

use super::plan::{Ctx, Phase, Unit};

fn job_name(cfg_name: &str, phase: &str) -> String {
    let raw = format!("quiver-{cfg_name}-{phase}").to_ascii_lowercase();
    let s: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    s.chars()
        .take(63)
        .collect::<String>()
        .trim_end_matches('-')
        .to_string()
}

/// One Job running `quiver ARGS`; indexed over `completions` when given.
fn job(ctx: &Ctx, name: &str, phase: Option<(Phase, usize)>, args: Vec<String>) -> Result<Value> {
    let k = &ctx.cfg.k8s;
    let image = k
        .image
        .clone()
        .context("[k8s] image is not set: the container image with quiver on its PATH")?;
    let claim = k.pvc.clone().context(
        "[k8s] pvc is not set: the PersistentVolumeClaim that holds the output directory",
    )?;
    let mount = k.mount.clone().unwrap_or_else(|| "/work/out".into());
    let mut requests = serde_json::Map::new();
    if let Some(c) = &k.cpu {
        requests.insert("cpu".into(), json!(c));
    }
    if let Some(m) = &k.memory {
        requests.insert("memory".into(), json!(m));
    }
    let mut resources = json!({ "requests": requests });
    if let Some(g) = k.gpus.filter(|g| *g > 0) {
        resources["limits"] = json!({ "nvidia.com/gpu": g });
    }
    let mut env = vec![];
    if phase.is_some() {
        env.push(json!({
            "name": "QUIVER_INDEX",
            "valueFrom": { "fieldRef": {
                "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"
            }}
        }));
    }
    let container = json!({
        "name": "quiver",
        "image": image,
        "command": std::iter::once("quiver".to_string()).chain(args).collect::<Vec<_>>(),
        "env": env,
        "envFrom": [ { "secretRef": { "name": k.secret.clone().unwrap_or_else(|| "quiver-s3".into()) } } ],
        "resources": resources,
        "volumeMounts": [
            { "name": "config", "mountPath": "/etc/quiver", "readOnly": true },
            { "name": "out", "mountPath": mount },
        ],
    });
    let mut spec = json!({
        "backoffLimit": k.retries.unwrap_or(1),
        "template": {
            "metadata": { "labels": { "app.kubernetes.io/name": "quiver" } },
            "spec": {
                "restartPolicy": "Never",
                "containers": [container],
                "volumes": [
                    { "name": "config", "configMap": { "name": job_name(&ctx.cfg.name, "config") } },
                    { "name": "out", "persistentVolumeClaim": { "claimName": claim } },
                ],
            },
        },
    });
    if let Some((_, n)) = phase {
        spec["completionMode"] = json!("Indexed");
        spec["completions"] = json!(n);
        spec["parallelism"] = json!(k.parallelism.unwrap_or(n).min(n));
        // Retries count per index, not for the whole Job.
        spec["backoffLimitPerIndex"] = json!(k.retries.unwrap_or(1));
        spec.as_object_mut().expect("object").remove("backoffLimit");
    }
    let mut metadata = json!({
        "name": name,
        "labels": {
            "app.kubernetes.io/name": "quiver",
            "quiver/experiment": job_name(&ctx.cfg.name, "x").trim_end_matches("-x"),
        },
    });
    if let Some((p, _)) = phase {
        metadata["labels"]["quiver/phase"] = json!(p.name());
    }
    if let Some(ns) = &k.namespace {
        metadata["namespace"] = json!(ns);
    }
    Ok(json!({ "apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": spec }))
}

fn base_args(ctx: &Ctx, library_root: Option<&str>) -> Vec<String> {
    let mount = ctx
        .cfg
        .k8s
        .mount
        .clone()
        .unwrap_or_else(|| "/work/out".into());
    let mut v: Vec<String> = [
        "--no-progress",
        "experiment",
        "--config",
        "/etc/quiver/experiment.toml",
        "--out",
        &mount,
    ]
    .map(String::from)
    .to_vec();
    if let Some(r) = library_root.or(ctx.cfg.library.root.as_deref()) {
        v.extend(["--library-root".into(), r.to_string()]);
    }
    v
}

/// The manifests, in the order they are applied: (file name, object).
pub fn manifests(
    ctx: &Ctx,
    phases: &[(Phase, Vec<Unit>)],
    text: &str,
    library_root: Option<&str>,
) -> Result<Vec<(String, Value)>> {
    let mut v = Vec::new();
    let mut meta = json!({ "name": job_name(&ctx.cfg.name, "config") });
    if let Some(ns) = &ctx.cfg.k8s.namespace {
        meta["namespace"] = json!(ns);
    }
    v.push((
        "00-config.yaml".to_string(),
        json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": meta,
                "data": { "experiment.toml": text } }),
    ));
    let mut n = 1;
    for (phase, units) in phases {
        if units.is_empty() {
            continue;
        }
        let mut args = base_args(ctx, library_root);
        args.extend([
            "--phase".into(),
            phase.name().into(),
            "--index".into(),
            "$(QUIVER_INDEX)".into(),
        ]);
        let name = job_name(&ctx.cfg.name, phase.name());
        v.push((
            format!("{n:02}-{}.yaml", phase.name()),
            job(ctx, &name, Some((*phase, units.len())), args)?,
        ));
        n += 1;
    }
    let name = job_name(&ctx.cfg.name, "report");
    v.push((
        format!("{n:02}-report.yaml"),
        job(ctx, &name, None, base_args(ctx, library_root))?,
    ));
    Ok(v)
}

/// YAML for a JSON value (strings double-quoted, which YAML reads as JSON
/// strings; multi-line strings as literal blocks).
pub fn to_yaml(v: &Value) -> String {
    let mut s = String::new();
    write_yaml(v, 0, &mut s);
    s
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(x) => serde_json::to_string(x).expect("a string"),
        other => other.to_string(),
    }
}

fn write_yaml(v: &Value, indent: usize, s: &mut String) {
    let pad = " ".repeat(indent);
    match v {
        Value::Object(m) => {
            for (k, val) in m {
                match val {
                    Value::Object(o) if !o.is_empty() => {
                        s.push_str(&format!("{pad}{}:\n", scalar(&json!(k))));
                        write_yaml(val, indent + 2, s);
                    }
                    Value::Array(a) if !a.is_empty() => {
                        s.push_str(&format!("{pad}{}:\n", scalar(&json!(k))));
                        write_yaml(val, indent, s);
                    }
                    Value::String(t) if t.contains('\n') => {
                        s.push_str(&format!("{pad}{}: |\n", scalar(&json!(k))));
                        for line in t.lines() {
                            if line.is_empty() {
                                s.push('\n');
                            } else {
                                s.push_str(&format!("{pad}  {line}\n"));
                            }
                        }
                    }
                    Value::Object(_) => s.push_str(&format!("{pad}{}: {{}}\n", scalar(&json!(k)))),
                    Value::Array(_) => s.push_str(&format!("{pad}{}: []\n", scalar(&json!(k)))),
                    _ => s.push_str(&format!("{pad}{}: {}\n", scalar(&json!(k)), scalar(val))),
                }
            }
        }
        Value::Array(a) => {
            for item in a {
                match item {
                    Value::Object(_) | Value::Array(_) => {
                        let mut inner = String::new();
                        write_yaml(item, indent + 2, &mut inner);
                        let body = inner
                            .strip_prefix(&" ".repeat(indent + 2))
                            .unwrap_or(&inner);
                        s.push_str(&format!("{pad}- {body}"));
                    }
                    _ => s.push_str(&format!("{pad}- {}\n", scalar(item))),
                }
            }
        }
        other => s.push_str(&format!("{pad}{}\n", scalar(other))),
    }
}

/// Writes the manifests and `apply.sh` into `dir`.
pub fn emit(
    ctx: &Ctx,
    phases: &[(Phase, Vec<Unit>)],
    text: &str,
    library_root: Option<&str>,
    dir: &Path,
) -> Result<()> {
    if text.contains("\r") {
        bail!("the experiment file has CR line ends; save it with LF to put it in a ConfigMap");
    }
    let files = manifests(ctx, phases, text, library_root)?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let ns = ctx
        .cfg
        .k8s
        .namespace
        .as_ref()
        .map(|n| format!(" -n {n}"))
        .unwrap_or_default();
    let mut apply = String::from(
        "#!/usr/bin/env bash\n# Applies the experiment's manifests in order, each Job after the one before completes.\n# Re-running is safe: finished units of work are skipped by the pods.\nset -euo pipefail\ncd \"$(dirname \"$0\")\"\n",
    );
    // `kubectl wait --for=condition=complete` waits forever on a failed Job.
    apply.push_str(&format!(
        "wait_job() {{\n  while true; do\n    c=$(kubectl{ns} get job \"$1\" -o jsonpath='{{.status.conditions[?(@.status==\"True\")].type}}')\n    case \" $c \" in\n      *\" Complete \"*) return 0 ;;\n      *\" Failed \"*) echo \"job $1 failed: kubectl{ns} logs -l job-name=$1; fix it and run $0 again\" >&2; exit 1 ;;\n    esac\n    sleep 10\n  done\n}}\n"
    ));
    for (file, obj) in &files {
        write_atomic(&dir.join(file), to_yaml(obj).as_bytes())?;
        let kind = obj["kind"].as_str().unwrap_or("");
        let name = obj["metadata"]["name"].as_str().unwrap_or("");
        if kind == "Job" {
            apply.push_str(&format!(
                "kubectl{ns} delete job {name} --ignore-not-found\nkubectl{ns} apply -f {file}\nwait_job {name}\n"
            ));
        } else {
            apply.push_str(&format!("kubectl{ns} apply -f {file}\n"));
        }
    }
    write_atomic(&dir.join("apply.sh"), apply.as_bytes())?;
    eprintln!(
        "wrote {} manifests and apply.sh to {}",
        files.len(),
        dir.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_quotes_strings_and_nests() {
        let v = json!({"a": "x: y", "b": [1, {"c": "d", "e": ["f"]}], "t": "l1\nl2\n", "n": 3});
        let y = to_yaml(&v);
        assert!(y.contains("\"a\": \"x: y\"\n"), "{y}");
        assert!(
            y.contains("\"b\":\n- 1\n- \"c\": \"d\"\n  \"e\":\n  - \"f\"\n"),
            "{y}"
        );
        assert!(y.contains("\"t\": |\n  l1\n  l2\n"), "{y}");
        assert!(y.contains("\"n\": 3\n"), "{y}");
    }

    #[test]
    fn job_names_are_dns_labels() {
        assert_eq!(
            job_name("Siblings_1", "train-private"),
            "quiver-siblings-1-train-private"
        );
        assert!(job_name(&"x".repeat(80), "eval").len() <= 63);
    }
}
