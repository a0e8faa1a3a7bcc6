#!/usr/bin/env python3
"""Train a small LoRA adapter with Hugging Face PEFT, for Quiver interop checks.

What it does
------------
Loads BASE_MODEL_DIR (any local causal-LM directory transformers can load,
e.g. the tiny_llama fixture or SmolLM2-135M converted by ``quiver convert``)
with ``AutoModelForCausalLM`` in float32 on CPU, wraps it with

    LoraConfig(r=R, lora_alpha=A, lora_dropout=0.0, target_modules=TARGETS,
               task_type="CAUSAL_LM")

and trains it with AdamW (lr 1e-2 by default) for N steps on a few fixed short
English sentences (one sentence per step, cycling; causal-LM loss over all
tokens, no special tokens added). The adapter is then written with PEFT's own
``save_pretrained(OUT_DIR)`` (``adapter_config.json`` +
``adapter_model.safetensors``), so Quiver can be checked against an adapter
that Python PEFT produced: load it in Quiver, score some pairs, and compare
with ``scripts/interop/check_peft_expert.py BASE_MODEL_DIR OUT_DIR scores.json``.

``base_model_name_or_path`` in ``adapter_config.json`` is whatever path was
given as BASE_MODEL_DIR. ``target_modules`` is written sorted (PEFT stores a
set, whose order depends on PYTHONHASHSEED). PEFT's empty README.md model
card is removed. Training is deterministic for a given --seed (CPU, one
thread, deterministic algorithms). On SmolLM2-135M, 20 steps take well under
a minute on a laptop CPU. Hub access is disabled (HF_HUB_OFFLINE=1).

Usage
-----
    python scripts/interop/train_peft_adapter.py BASE_MODEL_DIR OUT_DIR \\
        [--steps 20] [--rank 8] [--alpha 16] [--targets q_proj,v_proj] \\
        [--seed 0] [--lr 1e-2]

Tested with python 3.11, torch 2.15.0 (CPU), transformers 5.24.0, peft 0.21.2,
safetensors 0.8.0.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
import peft  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

SENTENCES = [
    "The cat sat on the mat.",
    "A small dog ran across the green field.",
    "She drinks a cup of tea every morning.",
    "The sun rises in the east and sets in the west.",
    "We walked to the market to buy some bread.",
    "Rain fell softly on the quiet town.",
    "He reads a book before he goes to sleep.",
    "Birds sing in the trees when spring comes.",
]

MAX_TOKENS = 32


def main() -> int:
    ap = argparse.ArgumentParser(description="Train a PEFT LoRA adapter on a few fixed sentences.")
    ap.add_argument("base_model_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--targets", default="q_proj,v_proj",
                    help="comma-separated module names (default q_proj,v_proj)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-2)
    args = ap.parse_args()

    targets = sorted({t.strip() for t in args.targets.split(",") if t.strip()})
    if not targets:
        ap.error("--targets is empty")
    if args.steps < 1 or args.rank < 1:
        ap.error("--steps and --rank must be >= 1")
    alpha = int(args.alpha) if float(args.alpha).is_integer() else args.alpha

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(args.base_model_dir)
    base = AutoModelForCausalLM.from_pretrained(args.base_model_dir, dtype=torch.float32)
    cfg = LoraConfig(r=args.rank, lora_alpha=alpha, lora_dropout=0.0,
                     target_modules=targets, task_type="CAUSAL_LM")
    torch.manual_seed(args.seed)
    model = get_peft_model(base, cfg)
    model.print_trainable_parameters()

    seqs = []
    for s in SENTENCES:
        ids = tok(s, add_special_tokens=False)["input_ids"][:MAX_TOKENS]
        if len(ids) >= 2:
            seqs.append(ids)
    assert seqs, "tokenizer produced no usable sequences"

    @torch.no_grad()
    def mean_loss():
        model.eval()
        return sum(model(input_ids=torch.tensor([s]), labels=torch.tensor([s])).loss.item()
                   for s in seqs) / len(seqs)

    before = mean_loss()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    for step in range(args.steps):
        ids = torch.tensor([seqs[step % len(seqs)]], dtype=torch.long)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 0 or (step + 1) % 5 == 0 or step + 1 == args.steps:
            print(f"step {step + 1}/{args.steps}: loss {loss.item():.4f}")
    after = mean_loss()

    os.makedirs(args.out_dir, exist_ok=True)
    model.save_pretrained(args.out_dir)
    cfg_path = os.path.join(args.out_dir, "adapter_config.json")
    with open(cfg_path) as f:
        saved = json.load(f)
    saved["target_modules"] = sorted(saved["target_modules"])
    with open(cfg_path, "w") as f:
        f.write(json.dumps(saved, indent=2, sort_keys=True))
    readme = os.path.join(args.out_dir, "README.md")
    if os.path.exists(readme):
        os.remove(readme)

    with safe_open(os.path.join(args.out_dir, "adapter_model.safetensors"), framework="pt") as f:
        names = sorted(f.keys())
        shapes = {k: list(f.get_slice(k).get_shape()) for k in names}
    print(f"saved {args.out_dir}: r={saved['r']} lora_alpha={saved['lora_alpha']} "
          f"target_modules={saved['target_modules']} tensors={len(names)} e.g. {names[0]} {shapes[names[0]]}")
    print(f"mean loss over the {len(seqs)} sentences: {before:.4f} -> {after:.4f}; {time.time() - t0:.1f}s "
          f"(torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
