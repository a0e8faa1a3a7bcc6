#!/usr/bin/env python3
"""PyTorch + PEFT side of the Quiver side-by-side CPU benchmark.

    python bench/peer.py --model HF_DIR --threads 2 [--quick] [--sections train,score,generate,arrow] --out FILE.json

Measures, on a local Hugging Face directory (never the hub):
  train     one LoRA step (forward + backward + AdamW) on 8 x 128 random tokens,
            LoRA r=4, alpha=16, dropout=0.05 on q,k,v,o,gate,up,down
  score     no-grad batched forward of 8 x 128 tokens, full logits (base model);
            again under torch.autocast("cpu", bfloat16) as "score_bf16"
  generate  greedy KV-cached generation, batch 1, 16-token prompt, 64 new tokens
  arrow     PEFT Arrow routing (create_arrow_model) over 8 and 64 random LoRA
            experts (r=4, q,k,v,o), top_k=4, temperature 1.0; 8 x 128 forward
Each measurement: warm-up, then the median of N timed repeats (time.perf_counter).
The JSON schema is shared with Quiver's `examples/bench` ("impl": "quiver").
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time

# Never touch a model hub: everything is loaded from local directories.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ALL_SECTIONS = ("train", "score", "generate", "arrow")
BATCH = 8
SEQ_LEN = 128
PROMPT_LEN = 16
NEW_TOKENS = 64
ARROW_SIZES = (8, 64)
ARROW_TOP_K = 4
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ARROW_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
SEED = 0


def log(msg: str) -> None:
    print(f"[peer] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- memory


def peak_rss_mb() -> float:
    """High-water mark of this process's resident set (ru_maxrss is KiB on Linux)."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.platform == "darwin":  # bytes there
        kb /= 1024
    return round(kb / 1024, 1)


def current_rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    try:
        import psutil

        return round(psutil.Process().memory_info().rss / 2**20, 1)
    except Exception:
        return None


class Phase:
    """Records RSS before/after a section and how much the peak grew during it."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        gc.collect()
        self.rss0 = current_rss_mb()
        self.peak0 = peak_rss_mb()
        self.t0 = time.perf_counter()
        log(f"{self.name}: start (rss {self.rss0} MB, peak so far {self.peak0} MB)")
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        self.peak1 = peak_rss_mb()
        self.rss1 = current_rss_mb()

    def info(self) -> dict:
        return {
            "rss_before_mb": self.rss0,
            "rss_after_mb": self.rss1,
            "peak_rss_after_mb": self.peak1,
            # growth of the process high-water mark while this section ran
            "peak_rss_increase_mb": round(self.peak1 - self.peak0, 1),
            "section_wall_s": round(self.wall, 2),
        }


# ---------------------------------------------------------------- timing


# --wait-idle: before each timed call, wait (up to this many seconds) until the other
# processes leave the CPUs idle. For shared development machines only; 0 = off.
WAIT_IDLE_MAX_S = 0.0
IDLE_WAITED_S = [0.0]


def _cpu_times() -> tuple[int, int] | None:
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v)  # idle + iowait, total
    except (OSError, ValueError, IndexError):
        return None


def wait_idle(window_s: float = 0.5, max_busy: float = 0.15) -> None:
    if WAIT_IDLE_MAX_S <= 0:
        return
    t0 = time.perf_counter()
    quiet = 0
    while time.perf_counter() - t0 < WAIT_IDLE_MAX_S:
        a = _cpu_times()
        time.sleep(window_s)
        b = _cpu_times()
        if a is None or b is None:
            return
        busy = 1 - (b[0] - a[0]) / max(b[1] - a[1], 1)
        quiet = quiet + 1 if busy < max_busy else 0
        if quiet >= 4:
            break
    IDLE_WAITED_S[0] += time.perf_counter() - t0


def timed(fn, warmup: int, repeats: int, label: str) -> dict:
    for i in range(warmup):
        wait_idle()
        t = time.perf_counter()
        fn()
        log(f"{label}: warm-up {i + 1}/{warmup} {time.perf_counter() - t:.3f}s")
    samples = []
    for i in range(repeats):
        wait_idle()
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
        log(f"{label}: run {i + 1}/{repeats} {samples[-1]:.3f}s")
    return {
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "max_s": max(samples),
        "samples_s": [round(s, 5) for s in samples],
        "warmup": warmup,
        "repeats": repeats,
    }


# ---------------------------------------------------------------- model


def load_model(model_dir: str):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, local_files_only=True
    )
    model.to(torch.float32)
    model.eval()
    return model


def random_ids(vocab: int, batch: int, seq: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g, dtype=torch.long)


def vocab_size(model) -> int:
    return int(model.get_input_embeddings().weight.shape[0])


# ---------------------------------------------------------------- sections


def bench_train(model_dir: str, warmup: int, repeats: int) -> dict:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(SEED)
    model = load_model(model_dir)
    cfg = LoraConfig(
        r=4,
        lora_alpha=16,
        lora_dropout=0.05,
        target_modules=LORA_TARGETS,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, cfg)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = random_ids(vocab_size(model), BATCH, SEQ_LEN, SEED)
    losses = []

    def step():
        opt.zero_grad(set_to_none=True)
        # labels=ids: transformers shifts internally -> causal LM loss over every next-token position
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))

    t = timed(step, warmup, repeats, "train")
    res = {
        "step_s": t["median_s"],
        "tokens_per_s": BATCH * SEQ_LEN / t["median_s"],
        "best_tokens_per_s": BATCH * SEQ_LEN / t["min_s"],
        "batch": BATCH,
        "seq_len": SEQ_LEN,
        "lora": {"r": 4, "alpha": 16, "dropout": 0.05, "targets": LORA_TARGETS},
        "trainable_params": trainable,
        "optimizer": "AdamW(lr=1e-4)",
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "timing": t,
    }
    del model, opt
    return res


def bench_score(model_dir: str, warmup: int, repeats: int, bf16: bool = False) -> dict:
    """The score workload; with `bf16`, under CPU autocast to bfloat16 (the
    weights stay f32, matrix products run in bf16: oneDNN's AVX512-BF16/AMX
    kernels where the CPU has them)."""
    model = load_model(model_dir)
    ids = random_ids(vocab_size(model), BATCH, SEQ_LEN, SEED + 1)
    shape = []

    @torch.inference_mode()
    def fwd():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=ids, use_cache=False).logits
        shape[:] = list(logits.shape)
        return logits

    t = timed(fwd, warmup, repeats, "score_bf16" if bf16 else "score")
    res = {
        "tokens_per_s": BATCH * SEQ_LEN / t["median_s"],
        "best_tokens_per_s": BATCH * SEQ_LEN / t["min_s"],
        "batch": BATCH,
        "seq_len": SEQ_LEN,
        "forward_s": t["median_s"],
        "logits_shape": shape,
        "timing": t,
    }
    del model
    return res


def bench_generate(model_dir: str, warmup: int, repeats: int) -> dict:
    model = load_model(model_dir)
    prompt = random_ids(vocab_size(model), 1, PROMPT_LEN, SEED + 2)
    attn = torch.ones_like(prompt)
    eos = model.config.eos_token_id
    if isinstance(eos, list):
        eos = eos[0]
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else eos
    produced = []

    @torch.inference_mode()
    def gen():
        out = model.generate(
            input_ids=prompt,
            attention_mask=attn,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,  # never stop early on EOS
            do_sample=False,
            num_beams=1,
            use_cache=True,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=pad,
        )
        produced.append(out.shape[1] - PROMPT_LEN)

    t = timed(gen, warmup, repeats, "generate")
    if any(n != NEW_TOKENS for n in produced):
        raise RuntimeError(f"generate produced {produced} new tokens, expected {NEW_TOKENS}")
    res = {
        "tokens_per_s": NEW_TOKENS / t["median_s"],
        "best_tokens_per_s": NEW_TOKENS / t["min_s"],
        "new_tokens": NEW_TOKENS,
        "prompt_tokens": PROMPT_LEN,
        "batch": 1,
        "total_s": t["median_s"],
        "timing": t,
        "note": "time includes the 16-token prefill; tokens_per_s = new_tokens / total time",
    }
    del model
    return res


def make_random_experts(model_dir: str, n: int, root: str) -> list[str]:
    """Saves n PEFT LoRA adapters (r=4, q,k,v,o, A and B ~ N(0, 0.02)) under root."""
    from peft import LoraConfig, get_peft_model

    base = load_model(model_dir)
    cfg = LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, target_modules=ARROW_TARGETS, bias="none",
                     task_type="CAUSAL_LM")
    pm = get_peft_model(base, cfg)
    lora_params = [(name, p) for name, p in pm.named_parameters() if "lora_A" in name or "lora_B" in name]
    g = torch.Generator().manual_seed(SEED + 100)
    paths = []
    with torch.no_grad():
        for e in range(n):
            for _, p in lora_params:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            path = os.path.join(root, f"expert_{e:03d}")
            pm.save_pretrained(path)
            paths.append(path)
    del pm, base
    gc.collect()
    return paths


def bench_arrow(model_dir: str, warmup: int, repeats: int) -> dict:
    from peft import ArrowConfig, create_arrow_model

    root = tempfile.mkdtemp(prefix="peer-arrow-")
    out: dict = {}
    try:
        t0 = time.perf_counter()
        paths = make_random_experts(model_dir, max(ARROW_SIZES), root)
        log(f"arrow: wrote {len(paths)} random experts in {time.perf_counter() - t0:.1f}s")
        for n in ARROW_SIZES:
            with Phase(f"arrow-{n}") as ph:
                base = load_model(model_dir)
                ids = random_ids(vocab_size(base), BATCH, SEQ_LEN, SEED + 3)
                cfg = ArrowConfig(top_k=ARROW_TOP_K, router_temperature=1.0, rng_seed=SEED)
                wait_idle()
                t = time.perf_counter()
                model = create_arrow_model(
                    base_model=base,
                    task_specific_adapter_paths=paths[:n],
                    arrow_config=cfg,
                )
                build_s = time.perf_counter() - t
                model.eval()

                @torch.inference_mode()
                def fwd():
                    return model(input_ids=ids, use_cache=False).logits

                # the first forward lazily computes the per-layer expert prototypes
                wait_idle()
                t = time.perf_counter()
                fwd()
                first_s = time.perf_counter() - t
                log(f"arrow-{n}: build {build_s:.2f}s, first forward (incl. prototypes) {first_s:.2f}s")
                tm = timed(fwd, max(warmup - 1, 0), repeats, f"arrow-{n}")
                del model, base
            out[str(n)] = {
                "tokens_per_s": BATCH * SEQ_LEN / tm["median_s"],
                "best_tokens_per_s": BATCH * SEQ_LEN / tm["min_s"],
                "build_s": build_s,
                "first_forward_s": first_s,
                "forward_s": tm["median_s"],
                "experts": n,
                "top_k": ARROW_TOP_K,
                "router_temperature": 1.0,
                "batch": BATCH,
                "seq_len": SEQ_LEN,
                "timing": tm,
                "memory": ph.info(),
            }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out["note"] = (
        "PEFT create_arrow_model over r=4 q,k,v,o experts; build_s = create_arrow_model (loading the "
        "adapters); first_forward_s includes PEFT's lazy prototype (power-iteration) computation"
    )
    return out


# ---------------------------------------------------------------- main


def versions() -> dict:
    import numpy
    import peft
    import transformers

    v = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "numpy": numpy.__version__,
    }
    try:
        import psutil

        v["psutil"] = psutil.__version__
    except ImportError:
        pass
    return v


def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    env = {k: os.environ[k] for k in sorted(os.environ)
           if k.startswith(("OPENBLAS_", "OMP_", "MKL_", "KMP_", "GOMP_"))}
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "thread_env": env,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="local Hugging Face directory (config.json, model.safetensors)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="fewer warm-ups and repeats")
    ap.add_argument("--sections", default=",".join(ALL_SECTIONS),
                    help=f"comma-separated subset of {','.join(ALL_SECTIONS)}")
    ap.add_argument("--out", help="write the JSON here (it is printed to stdout too)")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="MAX_S",
                    help="before each timed call wait up to MAX_S seconds for the CPUs to be idle "
                         "(shared development machines; default 0 = off)")
    args = ap.parse_args()
    global WAIT_IDLE_MAX_S
    WAIT_IDLE_MAX_S = args.wait_idle

    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in ALL_SECTIONS]
    if bad:
        ap.error(f"unknown section(s) {bad}; choose from {ALL_SECTIONS}")
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        ap.error(f"{args.model} has no config.json (expected a local Hugging Face directory)")

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)

    # (warmup, repeats) per section
    if args.quick:
        plan = {"train": (1, 2), "score": (1, 3), "generate": (1, 2), "arrow": (1, 2)}
    else:
        plan = {"train": (2, 5), "score": (2, 10), "generate": (1, 5), "arrow": (2, 5)}

    result: dict = {
        "impl": "pytorch+peft",
        "versions": versions(),
        "threads": args.threads,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "parallel_info": torch.__config__.parallel_info(),
        "machine": machine_info(),
        "model": args.model,
        "dtype": "float32",
        "quick": args.quick,
        "sections": sections,
    }
    memory: dict = {"rss_start_mb": current_rss_mb()}
    fns = {"train": bench_train, "score": bench_score, "generate": bench_generate, "arrow": bench_arrow}
    t_all = time.perf_counter()
    for name in ALL_SECTIONS:
        if name not in sections:
            continue
        with Phase(name) as ph:
            result[name] = fns[name](args.model, *plan[name])
            if name == "score":
                result["score_bf16"] = bench_score(args.model, *plan[name], bf16=True)
        gc.collect()
        memory[name] = ph.info()
    memory["note"] = (
        "peak_rss_mb is the whole-process high-water mark (ru_maxrss); run one section per process "
        "(--sections X) for a per-section peak"
    )
    result["memory"] = memory
    result["total_wall_s"] = round(time.perf_counter() - t_all, 1)
    if WAIT_IDLE_MAX_S > 0:
        result["wait_idle"] = {"max_s": WAIT_IDLE_MAX_S, "waited_s": round(IDLE_WAITED_S[0], 1)}
    result["peak_rss_mb"] = peak_rss_mb()

    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
