#!/usr/bin/env bash
# `quiver serve` vs llama.cpp's OpenAI-compatible server (llama-cpp-python),
# side by side on the same GGUF and thread count; see bench/serve/bench_serve.py.
#
#   bash bench/serve/run.sh [--quick] [--threads N] [--skip-llamacpp]
#
# Installs bench/serve/.venv (llama-cpp-python[server] builds llama.cpp from
# source: a C/C++ compiler, ~5-10 minutes on 2 cores, once), builds Quiver in
# release mode, fetches SmolLM2-135M, writes two libraries of random experts
# (8 and 64) and runs the benchmark. Run it on an idle machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
args=("$@")
threads=2
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    --threads) threads="${args[$((i + 1))]}" ;;
  esac
done
say() { printf '\n== %s\n' "$*" >&2; }
home="${QUIVER_HOME:-$HOME/.cache/quiver}"
work=bench/serve/results
mkdir -p "$work"

say "cargo build --release"
cargo build --release -p quiver-cli
quiver=target/release/quiver
"$quiver" fetch smollm2-135m
gguf=$(ls "$home"/models/smollm2-135m/*.gguf | head -1)

venv=bench/serve/.venv
stamp="$venv/.requirements.sha256"
want=$(sha256sum bench/serve/requirements.txt | cut -d' ' -f1)
if [[ ! -x $venv/bin/python || "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  say "installing bench/serve/requirements.txt into $venv (llama.cpp builds from source)"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -r bench/serve/requirements.txt
  echo "$want" > "$stamp"
fi

for n in 8 64; do
  lib="$work/lib$n"
  if [[ ! -f $lib/.complete ]]; then
    say "a library of $n random experts: $lib"
    rm -rf "$lib" "$work/experts$n"
    "$venv/bin/python" bench/serve/make_experts.py --n "$n" --out "$work/experts$n"
    for ((i = 0; i < n; i++)); do
      "$quiver" --quiet library import --library "$lib" --name "e$i" --allow-base-mismatch "$work/experts$n/e$i" > /dev/null
    done
    touch "$lib/.complete"
  fi
done

load=$(cut -d' ' -f1 /proc/loadavg)
if awk "BEGIN { exit !($load > 0.5) }"; then
  echo "warning: load average $load: other work on the CPUs skews both sides" >&2
fi
say "benchmark (threads=$threads)"
"$venv/bin/python" bench/serve/bench_serve.py --quiver "$quiver" --gguf "$gguf" \
  --lib8 "$work/lib8" --lib64 "$work/lib64" --out "$work" "${args[@]}"
