#!/usr/bin/env bash
# Arrow-routed evaluation against base evaluation, same items, same run.
#
#   bash bench/lmeval/routed.sh [--experts N] [--top-k K] [--reps R] [--limit L] [--threads T] OUT_DIR TASK...
#
# OUT_DIR is a run.sh output directory (its items.jsonl and model-hf-*/ are
# reused). Builds OUT_DIR/library-N from N random rank-4 q/k/v/o adapters
# (random_library.py; once), then per task runs `quiver eval --route base`
# and `quiver eval --library ... --route arrow --top-k K` R times each
# (on `--limit L` items of the task, default 200, the same items for both),
# alternating, and prints the median scoring time of each (model loading
# and the one-off prototype computation excluded: Arrow's prototypes are
# cached in the library after the first run) and their ratio. Quiver's
# target (issue 18): Arrow over 64 experts within 1.3x of base.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
QUIVER="${QUIVER:-$ROOT/target/release/quiver}"
PY="${LMEVAL_PYTHON:-$HERE/.venv/bin/python}"
experts=64
topk=4
reps=3
limit=200
threads=2
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --experts) experts="$2"; shift ;;
    --top-k) topk="$2"; shift ;;
    --reps) reps="$2"; shift ;;
    --limit) limit="$2"; shift ;;
    --threads) threads="$2"; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    -*) echo "routed.sh: unknown option $1" >&2; exit 2 ;;
    *) args+=("$1") ;;
  esac
  shift
done
[ ${#args[@]} -ge 2 ] || { echo "usage: routed.sh [options] OUT_DIR TASK..." >&2; exit 2; }
out="$(cd "${args[0]}" && pwd)"
tasks=("${args[@]:1}")
hf=$(ls -d "$out"/model-hf-* | head -1)
[ -f "$out/items.jsonl" ] && [ -d "$hf" ] || { echo "routed.sh: $out has no items.jsonl / model-hf-* (run run.sh first)" >&2; exit 1; }
lib="$out/library-$experts"
if [ ! -f "$lib/library.json" ]; then
  rm -rf "$lib" "$out/adapters-$experts"
  "$PY" "$HERE/random_library.py" "$hf" "$out/adapters-$experts" --experts "$experts"
  "$QUIVER" library -q --library "$lib" import --allow-base-mismatch "$out/adapters-$experts"/expert_*
fi
# The first Arrow run computes and caches the prototypes; not timed.
"$QUIVER" eval -q --model "$hf" --library "$lib" --route arrow --top-k "$topk" --allow-base-mismatch \
  --data "$out/items.jsonl" --tasks "${tasks[0]}" --split all --mode mc --limit 2 >/dev/null
mkdir -p "$out/routed"
for t in "${tasks[@]}"; do
  for r in $(seq 1 "$reps"); do
    for route in base arrow; do
      extra=()
      [ "$route" = arrow ] && extra=(--library "$lib" --route arrow --top-k "$topk" --allow-base-mismatch)
      RAYON_NUM_THREADS="$threads" "$QUIVER" eval -q --model "$hf" "${extra[@]}" --data "$out/items.jsonl" \
        --tasks "$t" --split all --mode mc --limit "$limit" --json "$out/routed/${t}_${route}_$r.json" >/dev/null
    done
  done
done
"$PY" - "$out/routed" "$experts" "$topk" "$reps" "${tasks[@]}" <<'PY'
import json, statistics, sys
d, experts, topk, reps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
print(f"Arrow over {experts} random experts (top-{topk}) vs base, scoring time (median of {reps}, alternating runs)")
print(f"{'task':<16}{'items':>6}{'base s':>9}{'arrow s':>9}{'base it/s':>11}{'arrow it/s':>11}{'ratio':>8}")
ratios = []
for t in sys.argv[5:]:
    times = {}
    for route in ("base", "arrow"):
        js = [json.load(open(f"{d}/{t}_{route}_{r}.json")) for r in range(1, reps + 1)]
        times[route] = statistics.median(j["tasks"][0]["wall_time_s"] for j in js)
        n = js[0]["tasks"][0]["items"]
    ratio = times["arrow"] / times["base"]
    ratios.append(ratio)
    print(f"{t:<16}{n:>6}{times['base']:>9.1f}{times['arrow']:>9.1f}{n / times['base']:>11.2f}{n / times['arrow']:>11.2f}{ratio:>7.2f}x")
print(f"mean time ratio arrow / base: {sum(ratios) / len(ratios):.2f}x (target <= 1.3x)")
PY
