#!/usr/bin/env python3
"""Writes N random PEFT LoRA adapters for a Hugging Face model directory.

    random_library.py HF_DIR OUT_DIR [--experts 64] [--rank 4] [--seed 0]

Each adapter (OUT_DIR/expert_XX: adapter_config.json +
adapter_model.safetensors) adapts q, k, v and o of every layer with rank-r
factors drawn from N(0, 0.02), as bench/peer.py's Arrow workload does: what
routing costs does not depend on what the experts learned. For timing only.
"""
import argparse
import json
import os

import numpy as np
from safetensors.numpy import save_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("hf_dir")
    ap.add_argument("out")
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base-name", default="smollm2-135m", help="base_model_name_or_path to record")
    a = ap.parse_args()
    cfg = json.load(open(os.path.join(a.hf_dir, "config.json")))
    h = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads)
    hd = cfg.get("head_dim", h // heads)
    shapes = {"q_proj": (heads * hd, h), "k_proj": (kv * hd, h), "v_proj": (kv * hd, h), "o_proj": (h, heads * hd)}
    rng = np.random.default_rng(a.seed)
    os.makedirs(a.out, exist_ok=True)
    for e in range(a.experts):
        d = os.path.join(a.out, f"expert_{e:02d}")
        os.makedirs(d, exist_ok=True)
        tensors = {}
        for layer in range(cfg["num_hidden_layers"]):
            for m, (out_f, in_f) in shapes.items():
                p = f"base_model.model.model.layers.{layer}.self_attn.{m}"
                tensors[f"{p}.lora_A.weight"] = rng.normal(0, 0.02, (a.rank, in_f)).astype(np.float32)
                tensors[f"{p}.lora_B.weight"] = rng.normal(0, 0.02, (out_f, a.rank)).astype(np.float32)
        save_file(tensors, os.path.join(d, "adapter_model.safetensors"))
        json.dump(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "base_model_name_or_path": a.base_name,
                "r": a.rank,
                "lora_alpha": 16,
                "lora_dropout": 0.0,
                "target_modules": list(shapes),
                "bias": "none",
                "fan_in_fan_out": False,
            },
            open(os.path.join(d, "adapter_config.json"), "w"),
            indent=1,
        )
    print(f"{a.experts} adapters in {a.out}")


if __name__ == "__main__":
    main()
