"""Cross-check `quiver convert` output against Python transformers.

Loads a directory written by `quiver convert` with transformers
(AutoModelForCausalLM + AutoTokenizer from our tokenizer.json), then checks
that transformers gives the same continuation log-likelihoods and the same
greedy text as Quiver printed for the original model.

Usage:
    python scripts/interop/check_convert.py CONVERTED_DIR QUIVER_RESULTS.json

QUIVER_RESULTS.json: {"scores": [{"context": ..., "continuation": ...,
"logprob": ..., "tokens": ...}], "generations": [{"prompt": ..., "tokens":
[ids]}]}, as scripts/test.sh writes it from `quiver score` / `quiver
generate --json`. Exits 1 on any mismatch (logprob tolerance 1e-3).
Tested with torch 2.15, transformers 5.24.
"""

import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def lm_eval_pair(tok, context, continuation):
    # lm-evaluation-harness: trailing context whitespace moves to the
    # continuation; continuation ids are the tail of the joint encoding.
    n = len(context) - len(context.rstrip())
    if n:
        continuation = context[-n:] + continuation
        context = context[:-n]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    return whole[: len(ctx)], whole[len(ctx):]


def main():
    model_dir, results_path = sys.argv[1], sys.argv[2]
    results = json.load(open(results_path))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    print(f"loaded {type(model).__name__} and {type(tok).__name__} from {model_dir}")
    ok = True
    for s in results.get("scores", []):
        ctx, cont = lm_eval_pair(tok, s["context"], s["continuation"])
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logits = model(ids).logits[0].float()
        logp = torch.log_softmax(logits, dim=-1)
        lp = sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
        diff = abs(lp - s["logprob"])
        good = diff <= 1e-3 and len(cont) == s["tokens"]
        ok &= good
        print(f"score {s['continuation']!r}: transformers {lp:.5f} quiver {s['logprob']:.5f} "
              f"tokens {len(cont)}/{s['tokens']} diff {diff:.2e} {'ok' if good else 'MISMATCH'}")
    for g in results.get("generations", []):
        ids = tok(g["prompt"], add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=len(g["tokens"]), do_sample=False)
        new = out[0, ids.shape[1]:].tolist()
        good = new == g["tokens"]
        ok &= good
        print(f"generate {g['prompt']!r}: transformers {tok.decode(new)!r} "
              f"{'ok' if good else 'MISMATCH vs quiver ' + repr(g['tokens'])}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
