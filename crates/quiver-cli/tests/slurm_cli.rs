//! `quiver experiment --executor slurm` on a real single-node Slurm cluster
//! (scripts/slurm/cluster.sh: Debian's slurm-wlm and munge, as root) with
//! the libraries on the S3 test server: the same table as the local
//! executor; an array element cancelled mid-run is named with its log, and
//! the rerun resubmits only it. `--executor k8s --emit` writes Indexed Jobs.
//!
//! Skipped (saying so) where Slurm is not installed or we are not root,
//! unless `QUIVER_REQUIRE_SLURM=1` (as the README's test command sets it).

#[path = "../../quiver-core/tests/fixtures/library/s3_server.rs"]
mod s3_server;

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{quiver, run, write_config, write_data};

fn slurm_missing() -> Option<String> {
    for bin in [
        "sbatch",
        "squeue",
        "scancel",
        "slurmctld",
        "slurmd",
        "munged",
    ] {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
            || Path::new("/usr/sbin").join(bin).is_file();
        if !found {
            return Some(format!(
                "`{bin}` is not installed (apt-get install -y slurm-wlm munge)"
            ));
        }
    }
    // The test cluster runs its daemons as root.
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("the test cluster's daemons need root".into());
    }
    None
}

/// A single-node cluster, stopped on drop.
struct Cluster {
    dir: PathBuf,
    conf: PathBuf,
}

impl Cluster {
    fn start(dir: &Path) -> Cluster {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/slurm/cluster.sh");
        let o = Command::new("bash")
            .arg(&script)
            .arg("start")
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "cluster.sh start failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        Cluster {
            dir: dir.to_path_buf(),
            conf: dir.join("slurm.conf"),
        }
    }
    fn cmd(&self, bin: &str) -> Command {
        let mut c = Command::new(bin);
        c.env("SLURM_CONF", &self.conf);
        c
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/slurm/cluster.sh");
        let _ = Command::new("bash")
            .arg(script)
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

/// The experiment tests' tiny config, with `[slurm]` and `[k8s]` tables.
fn write_inputs(dir: &Path) -> PathBuf {
    let (train, eval) = write_data(dir);
    let path = write_config(
        dir,
        &train,
        &eval,
        r#""plural_a", "plural_b", "reverse_a", "reverse_b""#,
    );
    let mut cfg = std::fs::read_to_string(&path).unwrap();
    cfg.push_str(
        r#"
[slurm]
poll_seconds = 0.3
cpus = 1
mem = "1G"
time = "00:10:00"

[slurm.phases.eval]
# One element at a time, so that the test can cancel the last one mid-run.
max_running = 1

[k8s]
image = "ghcr.io/example/quiver:latest"
pvc = "quiver-out"
secret = "quiver-s3"
cpu = "2"
memory = "8Gi"
parallelism = 4
"#,
    );
    std::fs::write(&path, cfg).unwrap();
    path
}

fn table_rows(md: &str) -> Vec<String> {
    md.lines()
        .filter(|l| l.starts_with("| "))
        .map(str::to_string)
        .collect()
}

#[test]
fn slurm_executor_gives_the_local_table_and_resubmits_only_what_is_missing() {
    if let Some(why) = slurm_missing() {
        if std::env::var("QUIVER_REQUIRE_SLURM").as_deref() == Ok("1") {
            panic!("{why} (QUIVER_REQUIRE_SLURM=1 makes the Slurm test mandatory)");
        }
        eprintln!("note: skipping the Slurm executor test: {why}");
        return;
    }
    let Some(s3) = s3_server::server() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_inputs(dir.path());
    let cluster = Cluster::start(&dir.path().join("cluster"));
    let bucket = s3.bucket();

    let experiment = |out: &Path, root: &str, slurm: bool| {
        let mut c = quiver();
        c.envs(s3.env())
            .env("SLURM_CONF", &cluster.conf)
            .args(["experiment", "--no-progress", "--config"])
            .arg(&cfg)
            .arg("--out")
            .arg(out)
            .args(["--library-root", root]);
        if slurm {
            c.args(["--executor", "slurm"]);
        }
        c
    };

    // The local executor's table.
    let (o, local, err) = run(&mut experiment(
        &dir.path().join("local"),
        &format!("s3://{bucket}/local"),
        false,
    ));
    assert!(o.status.success(), "{err}");
    let local = table_rows(&local);
    assert!(local.len() > 5, "{local:?}");

    // `--dry-run` prints one sbatch script per phase, chained by afterok.
    let out = dir.path().join("slurm");
    let root = format!("s3://{bucket}/slurm");
    let (o, scripts, err) = run(experiment(&out, &root, true).arg("--dry-run"));
    assert!(o.status.success(), "{err}");
    for phase in ["train-private", "cluster", "train-library", "eval"] {
        assert!(
            scripts.contains(&format!("--phase {phase} --index \"$SLURM_ARRAY_TASK_ID\"")),
            "{scripts}"
        );
    }
    assert!(scripts.contains("#SBATCH --array=0-3\n"), "{scripts}");
    assert!(scripts.contains("#SBATCH --array=0-6%1\n"), "{scripts}");
    assert!(scripts.contains("--dependency=afterok:"), "{scripts}");
    assert!(!out.join("slurm").exists(), "a dry run submits nothing");

    // A Slurm run in which the last evaluation is cancelled mid-run.
    let child = experiment(&out, &root, true)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    let eval_job = loop {
        assert!(Instant::now() < deadline, "the eval array never appeared");
        let o = cluster
            .cmd("squeue")
            .args(["--noheader", "--name=quiver-tiny-eval", "--format=%F"])
            .output()
            .unwrap();
        let id = String::from_utf8_lossy(&o.stdout).trim().to_string();
        if let Some(id) = id.lines().next().filter(|l| !l.is_empty()) {
            break id.to_string();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let o = cluster
        .cmd("scancel")
        .arg(format!("{eval_job}_6"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "the cancelled element went unnoticed: {err}"
    );
    assert!(
        err.contains("1 of 18 units of work did not finish"),
        "{err}"
    );
    assert!(err.contains("eval element 6"), "{err}");
    assert!(err.contains("CANCELLED"), "{err}");
    assert!(err.contains("eval-6.log"), "{err}");
    assert!(err.contains("only what is missing is resubmitted"), "{err}");

    // The rerun submits only the cancelled element, and the table is the local one.
    let (o, table, err) = run(&mut experiment(&out, &root, true));
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("submitted phase eval as job array") && err.contains("(1 units: 6)"),
        "{err}"
    );
    for phase in ["train-private", "cluster", "train-library"] {
        assert!(!err.contains(&format!("submitted phase {phase} ")), "{err}");
    }
    assert_eq!(table_rows(&table), local);
    // The libraries are on S3, not under the output directory.
    assert!(!out.join("private").exists());
    assert!(s3
        .keys(&bucket, "slurm/private/")
        .iter()
        .any(|k| k.ends_with("quiver_manifest.json")));

    // A third run has nothing to submit.
    let (o, _, err) = run(&mut experiment(&out, &root, true));
    assert!(o.status.success(), "{err}");
    assert!(err.contains("nothing to submit"), "{err}");
}

#[test]
fn k8s_executor_writes_indexed_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_inputs(dir.path());
    let emit = dir.path().join("k8s");
    let (o, _, err) = run(quiver()
        .args(["experiment", "--no-progress", "--config"])
        .arg(&cfg)
        .args(["--out", "/work/out", "--library-root", "s3://lab/tiny"])
        .args(["--executor", "k8s", "--emit"])
        .arg(&emit));
    assert!(o.status.success(), "{err}");
    let mut files: Vec<String> = std::fs::read_dir(&emit)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "00-config.yaml",
            "01-train-private.yaml",
            "02-cluster.yaml",
            "03-train-library.yaml",
            "04-eval.yaml",
            "05-report.yaml",
            "apply.sh"
        ]
    );
    let eval = std::fs::read_to_string(emit.join("04-eval.yaml")).unwrap();
    for field in [
        "\"apiVersion\": \"batch/v1\"",
        "\"kind\": \"Job\"",
        "\"completionMode\": \"Indexed\"",
        "\"completions\": 7",
        "\"parallelism\": 4",
        "\"restartPolicy\": \"Never\"",
        "\"secretRef\":",
        "\"name\": \"quiver-s3\"",
        "\"claimName\": \"quiver-out\"",
        "batch.kubernetes.io/job-completion-index",
        "- \"$(QUIVER_INDEX)\"",
        "- \"s3://lab/tiny\"",
        "\"image\": \"ghcr.io/example/quiver:latest\"",
    ] {
        assert!(eval.contains(field), "{field}: {eval}");
    }
    let config = std::fs::read_to_string(emit.join("00-config.yaml")).unwrap();
    assert!(config.contains("\"kind\": \"ConfigMap\""), "{config}");
    assert!(config.contains("  [slurm.phases.eval]\n"), "{config}");
    let apply = std::fs::read_to_string(emit.join("apply.sh")).unwrap();
    assert!(
        apply.contains("kubectl apply -f 04-eval.yaml\nwait_job quiver-tiny-eval\n"),
        "{apply}"
    );
    // Where a YAML parser is at hand, the manifests parse as the Job objects
    // described above.
    let py = std::env::var("QUIVER_PYTHON").unwrap_or_else(|_| "python3".into());
    let check = Command::new(&py)
        .arg("-c")
        .arg(
            "import sys, yaml\n\
             j = yaml.safe_load(open(sys.argv[1]))\n\
             s = j['spec']\n\
             assert j['kind'] == 'Job' and s['completionMode'] == 'Indexed' and s['completions'] == 7, j\n\
             c = s['template']['spec']['containers'][0]\n\
             assert c['command'][-2:] == ['--index', '$(QUIVER_INDEX)'], c\n\
             assert c['env'][0]['valueFrom']['fieldRef']['fieldPath'].endswith(\"['batch.kubernetes.io/job-completion-index']\")\n\
             m = yaml.safe_load(open(sys.argv[2]))\n\
             assert '[slurm.phases.eval]' in m['data']['experiment.toml']\n",
        )
        .arg(emit.join("04-eval.yaml"))
        .arg(emit.join("00-config.yaml"))
        .output();
    match check {
        Ok(o) if o.status.success() => {}
        Ok(o) if String::from_utf8_lossy(&o.stderr).contains("No module named 'yaml'") => {
            eprintln!("note: no PyYAML in {py}: the manifests were checked as text only")
        }
        Ok(o) => panic!("{}", String::from_utf8_lossy(&o.stderr)),
        Err(e) => eprintln!("note: no {py} ({e}): the manifests were checked as text only"),
    }
}
