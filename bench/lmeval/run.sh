#!/usr/bin/env bash
# Item-by-item comparison of `quiver eval` with lm-evaluation-harness (lm_eval).
#
#   bash bench/lmeval/run.sh [--limit N] [--seed S] [--threads N] [--adapter DIR]
#                            [--library LIB --expert NAME] [--quantize q8_0|q4_1]
#                            [--model M] [--out DIR] [--skip-lmeval] [--skip-quiver] TASK...
#
# TASK: any olmo multiple-choice task (`quiver data tasks --source olmo`), e.g.
# arc_easy piqa winogrande csqa or a full name such as piqa:mc:validation
# (a bare name means TASK:validation). Default: arc_easy piqa.
#
# Steps: (1) bench/lmeval/.venv from requirements.txt unless it exists (or
# LMEVAL_PYTHON names an interpreter that has lm_eval); (2) `quiver convert` of
# the model to a Hugging Face directory, once; (3) `quiver data export` of each
# task's validation items, exactly the items `quiver eval --tasks TASK` loads,
# and prepare.py: --limit items per task (a seeded sample of its own, not
# `quiver eval --limit`'s), as Quiver --data JSONL and
# as lm-eval local task YAMLs + JSONL datasets whose requests are Quiver's
# (context, continuation) pairs; (4) per task, `quiver eval --data` and
# `lm_eval --model hf ... --log_samples` on those items, one after the other,
# with the same thread count (RAYON_NUM_THREADS / OMP_NUM_THREADS=N);
# (5) compare.py prints the table and every disagreement (also saved to
# OUT/compare.txt and OUT/compare.json).
#
# --adapter DIR: a PEFT LoRA directory, applied on both sides (quiver
# --adapter, lm_eval peft=DIR).
# --library LIB --expert NAME: an expert of a Quiver library (a directory or
# s3://...): Quiver routes to it (`--route expert:NAME`), lm_eval loads the
# PEFT directory `quiver library export` writes of it (peft=OUT/expert-NAME).
# --quantize Q: a third side, `quiver eval --quantize Q --quantize-rows all`
# (8-bit products for the whole batch) on the same items; quantized.py then
# prints its paired differences from Quiver's f32 run (95% bootstrap CI,
# McNemar's p) and both speeds (OUT/quantized.txt, OUT/quantized.json).
# Environment: QUIVER (the quiver binary; default target/release/quiver),
# LMEVAL_PYTHON (use this interpreter instead of bench/lmeval/.venv),
# LMEVAL_BASE_SITE (a site-packages directory, e.g. of an existing venv with
# torch/transformers/peft, that a fresh bench/lmeval/.venv reuses through a
# .pth file instead of downloading torch again),
# LMEVAL_BATCH_SIZE (lm_eval --batch_size, default 1).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
QUIVER="${QUIVER:-$ROOT/target/release/quiver}"

limit=100
seed=0
threads=2
adapter=""
library=""
expert=""
quantize=""
model="smollm2-135m"
out="$HERE/out"
skip_lmeval=0
skip_quiver=0
tasks=()
while [ $# -gt 0 ]; do
  case "$1" in
    --limit) limit="$2"; shift ;;
    --seed) seed="$2"; shift ;;
    --threads) threads="$2"; shift ;;
    --adapter) adapter="$(cd "$2" && pwd)"; shift ;;
    --library) library="$2"; shift ;;
    --expert) expert="$2"; shift ;;
    --quantize) quantize="$2"; shift ;;
    --model) model="$2"; shift ;;
    --out) out="$2"; shift ;;
    --skip-lmeval) skip_lmeval=1 ;;
    --skip-quiver) skip_quiver=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    -*) echo "run.sh: unknown option $1" >&2; exit 2 ;;
    *) tasks+=("$1") ;;
  esac
  shift
done
[ ${#tasks[@]} -gt 0 ] || tasks=(arc_easy piqa)
if [ -n "$expert" ] && [ -z "$library" ]; then echo "run.sh: --expert needs --library" >&2; exit 2; fi
if [ -n "$expert" ] && [ -n "$adapter" ]; then echo "run.sh: --adapter and --expert exclude each other" >&2; exit 2; fi
mkdir -p "$out"
out="$(cd "$out" && pwd)"
say() { printf '\n== %s\n' "$*" >&2; }
[ -x "$QUIVER" ] || { echo "run.sh: no quiver binary at $QUIVER (cargo build --release -p quiver-cli)" >&2; exit 1; }

# 1. Python side.
if [ -n "${LMEVAL_PYTHON:-}" ]; then
  PY="$LMEVAL_PYTHON"
else
  PY="$HERE/.venv/bin/python"
  if [ ! -x "$HERE/.venv/bin/lm_eval" ]; then
    say "creating $HERE/.venv"
    python3 -m venv "$HERE/.venv"
    if [ -n "${LMEVAL_BASE_SITE:-}" ]; then
      site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
      echo "$LMEVAL_BASE_SITE" > "$site/_lmeval_base_site.pth"
    fi
    "$PY" -m pip install -q -r "$HERE/requirements.txt"
  fi
fi
"$PY" -c 'import lm_eval, torch, transformers' || { echo "run.sh: $PY lacks lm_eval/torch/transformers" >&2; exit 1; }

# 2. The model as a Hugging Face directory.
hf="$out/model-hf-$(echo "$model" | tr -c 'A-Za-z0-9_.\n-' _)"
if [ ! -f "$hf/model.safetensors" ]; then
  say "converting $model to $hf"
  rm -rf "$hf"
  "$QUIVER" convert -q --model "$model" --out "$hf"
fi

# 3. Items.
full=()
for t in "${tasks[@]}"; do
  case "$t" in *:*) full+=("$t") ;; *) full+=("$t:validation") ;; esac
done
joined=$(IFS=,; echo "${full[*]}")
say "exporting $joined"
"$QUIVER" data export -q --source olmo --tasks "$joined" --split all --cap 0 --out "$out/export.jsonl"
"$PY" "$HERE/prepare.py" "$out/export.jsonl" "$out" --limit "$limit" --seed "$seed"
names=$("$PY" -c 'import json,sys; print(" ".join(t["name"] for t in json.load(open(sys.argv[1]))["tasks"]))' "$out/tasks.json")

# Wall time of a command, in seconds, written to $1.
timed() {
  local file="$1"; shift
  local t0 t1
  t0=$(date +%s.%N)
  "$@"
  t1=$(date +%s.%N)
  awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f\n", b - a }' > "$file"
}

qadapter=()
peft=""
if [ -n "$adapter" ]; then
  qadapter=(--adapter "$adapter" --allow-base-mismatch)
  peft=",peft=$adapter"
elif [ -n "$expert" ]; then
  # The model is the `quiver convert` copy, whose fingerprint is not the
  # one the expert recorded: the same weights, hence --allow-base-mismatch.
  qadapter=(--library "$library" --route "expert:$expert" --allow-base-mismatch)
  exported="$out/expert-$(echo "$expert" | tr -c 'A-Za-z0-9_.\n-' _)"
  rm -rf "$exported"
  "$QUIVER" library -q --library "$library" export "$expert" "$exported"
  peft=",peft=$exported"
fi

# 4. Both sides, per task, one after the other.
for n in $names; do
  if [ "$skip_quiver" = 0 ]; then
    say "quiver eval $n"
    RAYON_NUM_THREADS="$threads" timed "$out/quiver_$n.wall" \
      "$QUIVER" eval -q --model "$hf" "${qadapter[@]}" --data "$out/items.jsonl" --tasks "$n" \
      --split all --mode mc --predictions "$out/quiver_$n.jsonl" --json "$out/quiver_$n.json"
    if [ -n "$quantize" ]; then
      say "quiver eval $n --quantize $quantize --quantize-rows all"
      RAYON_NUM_THREADS="$threads" timed "$out/quiverq_$n.wall" \
        "$QUIVER" eval -q --model "$hf" "${qadapter[@]}" --quantize "$quantize" --quantize-rows all \
        --data "$out/items.jsonl" --tasks "$n" --split all --mode mc \
        --predictions "$out/quiverq_$n.jsonl" --json "$out/quiverq_$n.json"
    fi
  fi
  if [ "$skip_lmeval" = 0 ]; then
    say "lm_eval $n"
    rm -rf "$out/lmeval_$n"
    HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    OMP_NUM_THREADS="$threads" MKL_NUM_THREADS="$threads" OPENBLAS_NUM_THREADS="$threads" \
    timed "$out/lmeval_$n.wall" \
      "$PY" -c 'import sys, torch; torch.set_num_threads(int(sys.argv[1])); sys.argv = ["lm_eval"] + sys.argv[2:]
from lm_eval.__main__ import cli_evaluate; cli_evaluate()' "$threads" \
      --model hf --model_args "pretrained=$hf,dtype=float32,add_bos_token=False$peft" \
      --device cpu --batch_size "${LMEVAL_BATCH_SIZE:-1}" --include_path "$out/lmeval_tasks" --tasks "quiver_$n" \
      --log_samples --output_path "$out/lmeval_$n" > "$out/lmeval_$n.log" 2>&1 \
      || { tail -30 "$out/lmeval_$n.log" >&2; exit 1; }
  fi
done

# 5. Comparison.
if [ "$skip_lmeval" = 0 ] || ls "$out"/lmeval_*/ >/dev/null 2>&1; then
  "$PY" "$HERE/compare.py" "$out" --threads "$threads" | tee "$out/compare.txt"
fi
if [ -n "$quantize" ]; then
  "$PY" "$HERE/quantized.py" "$out" --quantize "$quantize" | tee "$out/quantized.txt"
fi
