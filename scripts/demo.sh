#!/usr/bin/env bash
# Quiver's main job on the default model and data, end to end as far as it
# exists today: fetch the assets, then generate and score with SmolLM2-135M.
# (Training, the MBC library, Arrow routing and evaluation join this script
# as they land; see the README.)
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq cargo rustc
fi
if ! command -v python3 >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq python3 python3-pip
fi
cargo build --release --locked
quiver=./target/release/quiver
"$quiver" fetch
echo "== generate"
"$quiver" generate --model smollm2-135m --prompt "The capital of France is" --max-tokens 16
"$quiver" generate --model smollm2-135m --chat --prompt "Name three primary colors." --max-tokens 40
echo "== score (log-likelihood of each answer)"
ctx=$'Question: Which gas do plants absorb from the air for photosynthesis?\nAnswer:'
for answer in " carbon dioxide" " oxygen" " nitrogen" " helium"; do
  printf '%-16s ' "$answer"
  "$quiver" score --model smollm2-135m --context "$ctx" --continuation "$answer"
done
