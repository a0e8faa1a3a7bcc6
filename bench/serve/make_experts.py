#!/usr/bin/env python3
"""Writes N random rank-4 LoRA experts for SmolLM2-135M in PEFT's format
(q/k/v/o of all 30 layers), for the serving benchmark's Arrow rows: their
throughput does not depend on what the experts learned.

    python bench/serve/make_experts.py --n 64 --out DIR   # DIR/e0 ... DIR/e63

The safetensors files are written by hand (8-byte header length, JSON
header, little-endian f32 data), so only numpy is needed.
"""
import argparse
import json
import os
import struct

import numpy as np

LAYERS, HIDDEN, KV = 30, 576, 192
SHAPES = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (KV, HIDDEN), "v_proj": (KV, HIDDEN),
          "o_proj": (HIDDEN, HIDDEN)}
RANK = 4


def write_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, arr in tensors.items():
        data = np.ascontiguousarray(arr, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    for i in range(args.n):
        d = os.path.join(args.out, f"e{i}")
        os.makedirs(d, exist_ok=True)
        tensors = {}
        for l in range(LAYERS):
            for m, (out, inp) in SHAPES.items():
                p = f"base_model.model.model.layers.{l}.self_attn.{m}"
                tensors[f"{p}.lora_A.weight"] = rng.normal(0, 1 / np.sqrt(inp), (RANK, inp))
                tensors[f"{p}.lora_B.weight"] = rng.normal(0, 0.01, (out, RANK))
        write_safetensors(os.path.join(d, "adapter_model.safetensors"), tensors)
        cfg = {"peft_type": "LORA", "r": RANK, "lora_alpha": 8,
               "target_modules": list(SHAPES), "base_model_name_or_path":
               "HuggingFaceTB/SmolLM2-135M", "task_type": "CAUSAL_LM", "bias": "none",
               "fan_in_fan_out": False, "lora_dropout": 0.0}
        with open(os.path.join(d, "adapter_config.json"), "w") as f:
            json.dump(cfg, f)


if __name__ == "__main__":
    main()
