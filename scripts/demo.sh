#!/usr/bin/env bash
# Quiver's main job on the default model and data, end to end: fetch the
# assets, then `quiver demo` (configs/demo.toml): train private experts on
# BIG-bench tasks, build an MBC library, route with Arrow, and compare the
# base model, a shared expert, a uniform merge, Arrow on the private
# library and Arrow on the MBC library on the seven held-out tasks.
# About 15 minutes on a 2-core CPU; a second run reuses what is done
# (results in $QUIVER_HOME/runs/demo).
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
