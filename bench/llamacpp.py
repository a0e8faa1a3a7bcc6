#!/usr/bin/env python3
"""llama.cpp (llama-cpp-python) generation reference for the Quiver benchmark.

    python bench/llamacpp.py --gguf FILE.gguf --threads 2 [--quick] --out FILE.json

Greedy decoding (temperature 0, no repeat penalty), batch 1, a fixed 16-token
prompt of random token ids, exactly 64 new tokens (the low-level generator never
stops on EOS by itself; we stop after 64). Time includes the prompt prefill, as
in peer.py and Quiver's bench: tokens_per_s = 64 / total time (median of N).
The model runs in whatever precision the GGUF holds (llama.cpp does not
dequantise to f32 as Quiver and PyTorch do).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import sys
import time

PROMPT_LEN = 16
NEW_TOKENS = 64
SEED = 0


def log(msg: str) -> None:
    print(f"[llamacpp] {msg}", file=sys.stderr, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()

    import llama_cpp
    from llama_cpp import Llama

    t = time.perf_counter()
    llm = Llama(
        model_path=args.gguf,
        n_ctx=256,
        n_batch=256,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_gpu_layers=0,
        seed=SEED,
        verbose=False,
    )
    load_s = time.perf_counter() - t
    n_vocab = llm.n_vocab()
    rng = random.Random(SEED)
    prompt = [rng.randrange(n_vocab) for _ in range(PROMPT_LEN)]

    def run() -> int:
        llm.reset()  # forget the KV prefix so every run pays the same prefill
        n = 0
        for _tok in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                 reset=True):
            n += 1
            if n >= NEW_TOKENS:
                break
        return n

    warmup, repeats = (1, 3) if args.quick else (2, 10)
    for i in range(warmup):
        run()
    samples = []
    for i in range(repeats):
        t = time.perf_counter()
        n = run()
        samples.append(time.perf_counter() - t)
        if n != NEW_TOKENS:
            raise RuntimeError(f"generated {n} tokens, expected {NEW_TOKENS}")
        log(f"run {i + 1}/{repeats} {samples[-1]:.3f}s")
    med = statistics.median(samples)

    result = {
        "impl": "llama.cpp",
        "versions": {"python": platform.python_version(), "llama_cpp_python": llama_cpp.__version__},
        "threads": args.threads,
        "model": args.gguf,
        "quick": args.quick,
        "generate": {
            "tokens_per_s": NEW_TOKENS / med,
            "best_tokens_per_s": NEW_TOKENS / min(samples),
            "new_tokens": NEW_TOKENS,
            "prompt_tokens": PROMPT_LEN,
            "batch": 1,
            "total_s": med,
            "load_s": load_s,
            "timing": {"median_s": med, "min_s": min(samples), "max_s": max(samples),
                       "samples_s": [round(s, 5) for s in samples], "warmup": warmup, "repeats": repeats},
            "note": "greedy, GGUF weights as stored (quantised), time includes the 16-token prefill",
        },
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
