#!/usr/bin/env bash
# Side-by-side CPU benchmark: Quiver vs PyTorch + PEFT (and optionally llama.cpp).
#
#   bash bench/run.sh [--quick] [--with-llamacpp] [--threads N] [--skip-quiver] [--skip-peer]
#
# Builds Quiver (release), fetches SmolLM2-135M, converts it once to a Hugging Face
# directory (bench/results/smollm2-hf) for the PyTorch side, sets up bench/.venv from
# bench/requirements.txt, runs both benchmarks one after the other (never at the same
# time: they would share the cores) and prints the comparison (bench/report.py).
#
# Environment: QUIVER_HOME is respected (default: Quiver's own default).
# BENCH_PYTHON=/path/to/python uses an existing interpreter that already has the
# requirements instead of creating bench/.venv.
# OPENBLAS_* / OMP_* / MKL_* are left as they are; both sides record them.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BENCH="$ROOT/bench"
RESULTS="$BENCH/results"

quick=()
with_llamacpp=0
threads=2
skip_quiver=0
skip_peer=0
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=(--quick) ;;
    --with-llamacpp) with_llamacpp=1 ;;
    --threads) threads="$2"; shift ;;
    --threads=*) threads="${1#--threads=}" ;;
    --skip-quiver) skip_quiver=1 ;;
    --skip-peer) skip_peer=1 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

say() { printf '\n== %s\n' "$*"; }
mkdir -p "$RESULTS"

# Run a command under /usr/bin/time -v when available (its report goes to $1).
timed_run() {
  local report="$1"; shift
  if [ -x /usr/bin/time ]; then
    /usr/bin/time -v -o "$report" "$@"
    grep -E 'Maximum resident set size|Elapsed \(wall clock\)' "$report" | sed 's/^\s*/    /' || true
  else
    "$@"
  fi
}

say "build Quiver (release)"
cargo build --release
cargo build --release -p quiver-core --example bench
quiver="$ROOT/target/release/quiver"
qbench="$ROOT/target/release/examples/bench"

say "fetch smollm2-135m"
"$quiver" fetch smollm2-135m

HF_DIR="$RESULTS/smollm2-hf"
if [ -f "$HF_DIR/config.json" ] && [ -f "$HF_DIR/model.safetensors" ]; then
  echo "using existing $HF_DIR"
else
  say "convert smollm2-135m -> $HF_DIR"
  rm -rf "$HF_DIR"
  "$quiver" convert --model smollm2-135m --out "$HF_DIR"
fi

if [ "$skip_peer" = 0 ] || [ "$with_llamacpp" = 1 ]; then
  if [ -n "${BENCH_PYTHON:-}" ]; then
    PY="$BENCH_PYTHON"
    echo "using BENCH_PYTHON=$PY"
  else
    VENV="$BENCH/.venv"
    PY="$VENV/bin/python"
    if [ ! -x "$PY" ]; then
      say "create $VENV"
      python3 -m venv "$VENV"
    fi
    stamp="$VENV/.requirements.sha256"
    want=$(sha256sum "$BENCH/requirements.txt" | cut -d' ' -f1)
    if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
      say "install bench/requirements.txt into $VENV (torch is large; first time only)"
      "$PY" -m pip install --quiet --upgrade pip
      "$PY" -m pip install -r "$BENCH/requirements.txt"
      echo "$want" > "$stamp"
    fi
  fi
fi

# Timings are only meaningful on an idle machine (see bench/README.md).
check_idle() {
  # CPU busy fraction over 2 s (nothing of ours runs meanwhile); load averages lag too much.
  local a b busy
  a=$(head -n1 /proc/stat 2>/dev/null) || return 0
  sleep 2
  b=$(head -n1 /proc/stat)
  busy=$(printf '%s\n%s\n' "$a" "$b" | awk '{ idle = $5 + $6; tot = 0; for (i = 2; i <= NF; i++) tot += $i;
           if (NR == 1) { i0 = idle; t0 = tot } else { printf "%d", 100 * (1 - (idle - i0) / (tot - t0 + 1e-9)) } }')
  if [ "${busy:-0}" -gt 20 ]; then
    echo "run.sh: WARNING: the CPUs are ${busy}% busy with other work; the numbers will be distorted" >&2
  fi
}

if [ "$skip_peer" = 0 ]; then
  check_idle
  say "PyTorch + PEFT (threads=$threads ${quick[*]:-})"
  timed_run "$RESULTS/peer.time.txt" \
    "$PY" "$BENCH/peer.py" --model "$HF_DIR" --threads "$threads" "${quick[@]}" \
      --out "$RESULTS/peer.json" > "$RESULTS/peer.stdout.json"
fi

if [ "$skip_quiver" = 0 ]; then
  check_idle
  say "Quiver (threads=$threads ${quick[*]:-})"
  timed_run "$RESULTS/quiver.time.txt" \
    "$qbench" --model smollm2-135m --threads "$threads" "${quick[@]}" \
      --out "$RESULTS/quiver.json" > "$RESULTS/quiver.stdout.json"
fi

if [ "$with_llamacpp" = 1 ]; then
  if ! "$PY" -c 'import llama_cpp' 2>/dev/null; then
    say "install llama-cpp-python (builds llama.cpp from source, ~5 min)"
    "$PY" -m pip install -r "$BENCH/requirements-llamacpp.txt"
  fi
  home=$("$quiver" fetch --list 2>/dev/null | sed -n 's/^home: //p' | head -n1 || true)
  [ -n "$home" ] || home="${QUIVER_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/quiver}"
  gguf=$(ls "$home"/models/smollm2-135m/*.gguf 2>/dev/null | head -n1 || true)
  if [ -z "$gguf" ]; then
    echo "run.sh: no GGUF under $home/models/smollm2-135m; skipping llama.cpp" >&2
  else
    say "llama.cpp ($gguf, threads=$threads)"
    timed_run "$RESULTS/llamacpp.time.txt" \
      "$PY" "$BENCH/llamacpp.py" --gguf "$gguf" --threads "$threads" "${quick[@]}" \
        --out "$RESULTS/llamacpp.json" > "$RESULTS/llamacpp.stdout.json"
  fi
fi

say "report"
report_py=python3
command -v python3 >/dev/null 2>&1 || report_py="${PY:-python}"
"$report_py" "$BENCH/report.py" --out-dir "$RESULTS"
echo
echo "wrote $RESULTS/summary.md and $RESULTS/summary.json"
