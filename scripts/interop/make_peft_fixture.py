#!/usr/bin/env python3
"""Generate a tiny, deterministic PEFT LoRA adapter fixture for quiver-core.

What it does
------------
Loads the ``tiny_llama`` fixture (``crates/quiver-core/tests/fixtures/tiny_llama``,
a random LlamaForCausalLM made by ``scripts/fixtures/make_tiny_llama.py``) with
``AutoModelForCausalLM`` in float32, wraps it with a PEFT LoRA

    LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
               target_modules=[q_proj, k_proj, v_proj, o_proj,
                               gate_proj, up_proj, down_proj])

and trains it for 30 AdamW steps (lr 1e-2) on a few fixed sentences (causal LM
loss over all tokens), so that both ``lora_A`` and ``lora_B`` hold trained,
non-trivial values. The adapter is written with PEFT's own
``model.save_pretrained(DIR)`` into
``crates/quiver-core/tests/fixtures/peft_tiny_llama/``:

* ``adapter_config.json``       as written by PEFT, except that
                                ``base_model_name_or_path`` is set to the
                                relative name ``"tiny_llama"`` and
                                ``target_modules`` is sorted (PEFT saves a set,
                                whose order varies with PYTHONHASHSEED);
* ``adapter_model.safetensors`` float32 LoRA tensors, named
                                ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight``
                                etc. (PEFT strips the adapter name ``default``);
                                PEFT's empty ``README.md`` model card is deleted;
* ``expected.json``             reference scores, see below.

``expected.json``::

    {"base_model": "tiny_llama",
     "lora_config": {"r": 4, "lora_alpha": 8, "scaling": 2.0, "target_modules": [...]},
     "tensors": {"<name>": [shape...], ...},
     "scores": [{"context", "continuation", "context_ids", "continuation_ids",
                 "tokens", "logprob", "base_logprob", "is_greedy"}, ...]}

Scores are lm-evaluation-harness style log-likelihoods: trailing whitespace
of the context moves to the continuation; whole = enc(context + continuation),
ctx = enc(context), cont = whole[len(ctx):] (no special tokens, no BOS); one
forward over ``whole``; logprob = sum_i log_softmax(logits)[len(ctx)-1+i, cont[i]]
(computed in float64 from float32 logits). ``logprob`` has the adapter applied,
``base_logprob`` is the same with the adapter disabled. The script asserts the
two differ by more than 0.1 for every pair, and that reloading the saved
adapter with ``PeftModel.from_pretrained`` reproduces ``logprob`` exactly.

Everything is CPU, float32, ``torch.manual_seed(0)``, deterministic
algorithms, one thread; reruns give the same bytes on the same versions.
Hub access is disabled (HF_HUB_OFFLINE=1); only local directories are read.

How to run (from the repository root)
-------------------------------------
    /path/to/venv/bin/python scripts/interop/make_peft_fixture.py [--fixtures DIR]

``--fixtures`` is the parent directory holding ``tiny_llama/``; the adapter is
written to ``DIR/peft_tiny_llama/`` (replaced if present).

Versions used to produce the checked-in fixture
-----------------------------------------------
python 3, torch 2.15.0 (CPU), transformers 5.24.0, peft 0.21.2,
safetensors 0.8.0, numpy 2.4.6.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
import peft  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEFAULT_FIXTURES = os.path.join(REPO_ROOT, "crates", "quiver-core", "tests", "fixtures")

BASE_NAME = "tiny_llama"
OUT_NAME = "peft_tiny_llama"

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 4
ALPHA = 8
STEPS = 30
LR = 1e-2

TRAIN_TEXT = [
    "hello world",
    "The cat sat on the mat.",
    "The quick brown fox jumps over the lazy dog.",
    "Tests should be small, fast and deterministic.",
]

# (context, continuation); the third has trailing context whitespace, which
# lm-eval style scoring moves onto the continuation.
PAIRS = [
    ("hello", " world"),
    ("the cat", " sat on the mat"),
    ("The quick brown fox ", "jumps over the lazy dog."),
    ("Numbers like 1, 2, 3", " and 42 are tokens too."),
]


def lm_eval_ids(tok, context: str, continuation: str):
    n = len(context) - len(context.rstrip())
    if n:
        continuation = context[-n:] + continuation
        context = context[:-n]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    assert whole[: len(ctx)] == ctx, (ctx, whole)
    cont = whole[len(ctx):]
    assert len(ctx) >= 1 and len(cont) >= 1, (context, continuation)
    return ctx, cont


@torch.no_grad()
def score(model, ctx, cont):
    whole = torch.tensor([ctx + cont], dtype=torch.long)
    logits = model(input_ids=whole).logits[0].to(torch.float64)
    lp = torch.log_softmax(logits, dim=-1)
    total = 0.0
    greedy = True
    for i, t in enumerate(cont):
        row = lp[len(ctx) - 1 + i]
        total += float(row[t])
        greedy &= int(row.argmax()) == t
    return total, bool(greedy)


def train(model, tok) -> list:
    seqs = [tok(t, add_special_tokens=False)["input_ids"] for t in TRAIN_TEXT]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    model.train()
    losses = []
    for step in range(STEPS):
        ids = torch.tensor([seqs[step % len(seqs)]], dtype=torch.long)
        out = model(input_ids=ids, labels=ids)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    model.eval()
    return losses


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fixtures", default=DEFAULT_FIXTURES,
                    help="parent directory holding tiny_llama/ (output goes next to it)")
    args = ap.parse_args()

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    base_dir = os.path.join(args.fixtures, BASE_NAME)
    out_dir = os.path.join(args.fixtures, OUT_NAME)

    tok = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()

    cfg = LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        lora_dropout=0.0,
        target_modules=list(TARGETS),
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(0)
    model = get_peft_model(base, cfg)
    model.print_trainable_parameters()

    losses = train(model, tok)
    print(f"train loss: step 1 {losses[0]:.4f} -> step {STEPS} {losses[-1]:.4f}")
    assert losses[-1] < losses[0], losses

    # every LoRA matrix must have moved away from its init (B starts at 0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            assert p.detach().abs().max().item() > 1e-3, name

    scores = []
    for context, continuation in PAIRS:
        ctx, cont = lm_eval_ids(tok, context, continuation)
        lp, greedy = score(model, ctx, cont)
        with model.disable_adapter():
            blp, _ = score(model, ctx, cont)
        assert abs(lp - blp) > 0.1, f"adapter barely matters for {(context, continuation)}: {lp} vs {blp}"
        scores.append({
            "context": context,
            "continuation": continuation,
            "context_ids": ctx,
            "continuation_ids": cont,
            "tokens": len(cont),
            "logprob": lp,
            "base_logprob": blp,
            "is_greedy": greedy,
        })

    # ---- save with PEFT itself (base path still the real directory, so PEFT's
    # "was the vocabulary resized?" check reads the local config.json), then
    # post-process adapter_config.json:
    #   * base_model_name_or_path -> "tiny_llama" (relative, relocatable);
    #   * target_modules sorted (PEFT stores a set, so its order depends on
    #     PYTHONHASHSEED; sorting keeps reruns byte-identical).
    # The file keeps PEFT's own formatting (indent=2, sort_keys, no final newline).
    # PEFT's README.md model-card stub is removed: it is an empty template.
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    model.save_pretrained(out_dir)
    cfg_path = os.path.join(out_dir, "adapter_config.json")
    with open(cfg_path) as f:
        saved_cfg = json.load(f)
    saved_cfg["base_model_name_or_path"] = BASE_NAME
    saved_cfg["target_modules"] = sorted(saved_cfg["target_modules"])
    with open(cfg_path, "w") as f:
        f.write(json.dumps(saved_cfg, indent=2, sort_keys=True))
    readme = os.path.join(out_dir, "README.md")
    if os.path.exists(readme):
        os.remove(readme)

    tensors = {}
    with safe_open(os.path.join(out_dir, "adapter_model.safetensors"), framework="pt") as f:
        for k in sorted(f.keys()):
            t = f.get_tensor(k)
            assert t.dtype == torch.float32, (k, t.dtype)
            tensors[k] = list(t.shape)

    expected = {
        "base_model": BASE_NAME,
        "lora_config": {
            "r": RANK,
            "lora_alpha": ALPHA,
            "scaling": ALPHA / RANK,
            "target_modules": sorted(TARGETS),
        },
        "tensors": tensors,
        "scores": scores,
    }
    with open(os.path.join(out_dir, "expected.json"), "w") as f:
        json.dump(expected, f, indent=2)
        f.write("\n")

    # ---- verification: a fresh base + PeftModel.from_pretrained reproduces the scores
    fresh = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    reloaded = PeftModel.from_pretrained(fresh, out_dir).eval()
    for s in scores:
        lp, _ = score(reloaded, s["context_ids"], s["continuation_ids"])
        assert lp == s["logprob"], (s["context"], lp, s["logprob"])
        with reloaded.disable_adapter():
            blp, _ = score(reloaded, s["context_ids"], s["continuation_ids"])
        assert blp == s["base_logprob"], (s["context"], blp, s["base_logprob"])
    print("reload check: PeftModel.from_pretrained reproduces every logprob exactly")

    print(f"adapter_config.json: {json.dumps(saved_cfg, sort_keys=True)}")
    print(f"{len(tensors)} tensors in adapter_model.safetensors, e.g.:")
    for k in list(tensors)[:4]:
        print(f"  {k} {tensors[k]}")
    for s in scores:
        print(f"  {s['context']!r} + {s['continuation']!r}: ctx {s['context_ids']} cont {s['continuation_ids']} "
              f"logprob {s['logprob']:.6f} base {s['base_logprob']:.6f}")
    size = sum(os.path.getsize(os.path.join(out_dir, n)) for n in os.listdir(out_dir))
    print(f"{out_dir}: {sorted(os.listdir(out_dir))}, {size} bytes")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
