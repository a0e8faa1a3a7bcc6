#!/usr/bin/env python3
"""Cross-check Quiver's scores for a LoRA expert against Hugging Face PEFT.

What it does
------------
Loads BASE_MODEL_DIR with ``AutoModelForCausalLM`` (float32, eval mode) and the
LoRA adapter in ADAPTER_DIR with PEFT's ordinary loader,
``PeftModel.from_pretrained(base, ADAPTER_DIR)``, exactly as a PEFT user would;
the tokenizer comes from BASE_MODEL_DIR. For every item of SCORES.json it
recomputes the continuation log-likelihood lm-evaluation-harness style
(trailing context whitespace moves to the continuation; whole =
enc(context + continuation), ctx = enc(context), cont = whole[len(ctx):], no
special tokens / BOS; one forward over ``whole``; sum of
log_softmax(logits)[len(ctx)-1+i, cont[i]]) and prints one line per item:
transformers+PEFT value, Quiver value, the adapter-disabled (base) value, the
difference and ``ok`` / ``MISMATCH``.

The adapter's ``adapter_config.json`` may have been written by another tool
(Quiver): this script requires nothing beyond what PEFT itself needs to load
it (``peft_type``, ``r``, ``lora_alpha``, ``target_modules``, ...); PEFT's
warnings (e.g. ignored unknown keys) are printed. It does check that PEFT
really loaded every tensor of ``adapter_model.safetensors`` (PEFT only warns
about missing keys and silently drops tensors it cannot place), because
otherwise a match would prove nothing.

Exit status: 0 if every item matches; 1 if any |diff| > --tol, a token count
differs from the item's ``tokens`` (when given), or the adapter tensors were
not all loaded; 2 on bad usage.

Usage
-----
    python scripts/interop/check_peft_expert.py BASE_MODEL_DIR ADAPTER_DIR SCORES.json [--tol 1e-3]

SCORES.json: ``{"scores": [{"context": str, "continuation": str,
"logprob": float, "tokens": int}, ...]}`` as Quiver writes it (a bare list of
such items is accepted too; extra fields are ignored).

Hub access is disabled (HF_HUB_OFFLINE=1); both directories must be local.

Tested with python 3.11, torch 2.15.0 (CPU), transformers 5.24.0, peft 0.21.2,
safetensors 0.8.0.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
import peft  # noqa: E402
from peft import PeftModel  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


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


@torch.no_grad()
def logprob(model, ctx, cont):
    if not ctx or not cont:
        raise ValueError(f"empty context ({len(ctx)} ids) or continuation ({len(cont)} ids)")
    logits = model(input_ids=torch.tensor([ctx + cont])).logits[0].to(torch.float64)
    lp = torch.log_softmax(logits, dim=-1)
    return sum(float(lp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))


def load_safetensors_files(adapter_dir):
    from safetensors.torch import load_file

    names = [n for n in os.listdir(adapter_dir) if n.endswith(".safetensors")]
    if "adapter_model.safetensors" in names:
        names = ["adapter_model.safetensors"]
    out = {}
    for n in sorted(names):
        out.update(load_file(os.path.join(adapter_dir, n)))
    return out


def strip_adapter_name(key, adapter_name):
    """'x.lora_A.default.weight' -> 'x.lora_A.weight' (PEFT's on-disk spelling)."""
    return re.sub(r"\." + re.escape(adapter_name) + r"(?=\.[^.]+$|$)", "", key)


def check_loaded(model, adapter_dir, adapter_name="default"):
    """Every LoRA parameter of the PEFT model must hold the tensor from the file.

    PEFT only warns about missing keys and silently skips file tensors it
    cannot place, so a "match" could otherwise mean "adapter not applied".
    """
    file_sd = load_safetensors_files(adapter_dir)
    if not file_sd:
        print(f"note: no *.safetensors in {adapter_dir} (adapter_model.bin?); skipping the tensor check")
        return True
    canonical = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
    model_sd = model.state_dict()
    canon_to_model = {}
    for mk in model_sd:
        ck = strip_adapter_name(mk, adapter_name)
        if ck in canonical and ck != mk:
            canon_to_model[ck] = mk
    for ck in canonical:
        canon_to_model.setdefault(ck, ck)

    ok = True
    placed, ignored, with_name, changed = {}, [], [], []
    for fk, t in file_sd.items():
        if fk in canon_to_model:
            mk = canon_to_model[fk]
        elif fk in model_sd and strip_adapter_name(fk, adapter_name) in canon_to_model:
            mk = fk  # PEFT 0.21 passes unknown keys through unchanged, so this loads
            with_name.append(fk)
        else:
            ignored.append(fk)
            continue
        placed[mk] = fk
        m = model_sd[mk].detach().cpu()
        if m.shape != t.shape or not torch.equal(m, t.to(m.dtype)):
            changed.append(fk)
    missing = sorted(mk for mk in canon_to_model.values() if mk not in placed)

    def few(xs):
        xs = sorted(xs)
        return str(xs[:4]) + (f" ... ({len(xs)} in all)" if len(xs) > 4 else "")

    if with_name:
        print(f"note: {len(with_name)} tensor name(s) contain the adapter name '{adapter_name}' "
              f"(PEFT itself writes them without it; they load only under that adapter name): {few(with_name)}")
    if ignored:
        ok = False
        print(f"ADAPTER: {len(ignored)} tensor(s) in the file that PEFT did not place: {few(ignored)}")
    if missing:
        ok = False
        print(f"ADAPTER: {len(missing)} PEFT parameter(s) with no tensor in the file: {few(missing)}")
    if changed:
        ok = False
        print(f"ADAPTER: {len(changed)} tensor(s) differ between file and loaded model: {few(changed)}")
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in file_sd.values()})
    print(f"adapter tensors: {len(file_sd)} in file ({', '.join(dtypes)}), "
          f"{len(canon_to_model)} LoRA parameters in the PEFT model, {'all loaded' if ok else 'NOT all loaded'}")
    return ok


def main():
    ap = argparse.ArgumentParser(description="Cross-check Quiver LoRA-expert scores against PEFT.")
    ap.add_argument("base_model_dir")
    ap.add_argument("adapter_dir")
    ap.add_argument("scores_json")
    ap.add_argument("--tol", type=float, default=1e-3, help="max |logprob diff| (default 1e-3)")
    args = ap.parse_args()

    transformers.utils.logging.disable_progress_bar()
    with open(args.scores_json) as f:
        data = json.load(f)
    items = data if isinstance(data, list) else data.get("scores", [])
    if not items:
        print(f"no scores in {args.scores_json}")
        return 1

    # PEFT falls back to a hub lookup (and a confusing repo-id error) when a file is absent
    need = [("adapter_config.json",), ("adapter_model.safetensors", "adapter_model.bin")]
    for names in need:
        if not any(os.path.isfile(os.path.join(args.adapter_dir, n)) for n in names):
            print(f"{args.adapter_dir}: no {' or '.join(names)}")
            return 1

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(args.base_model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.base_model_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, args.adapter_dir).eval()
    ok = True
    for w in caught:
        if os.sep + "peft" + os.sep not in str(w.filename):
            continue  # e.g. transformers deprecation notices
        msg = str(w.message)
        if "Found missing adapter keys" in msg:
            ok = False
        print(f"peft warning: {msg}")
    cfg = model.active_peft_config
    scaling = set()
    for _, mod in model.named_modules():
        if isinstance(getattr(mod, "scaling", None), dict):
            scaling.update(float(v) for v in mod.scaling.values())
    print(f"loaded {type(base).__name__} from {args.base_model_dir} + {type(model).__name__} from {args.adapter_dir}")
    print(f"adapter: peft_type={getattr(cfg.peft_type, 'value', cfg.peft_type)} r={getattr(cfg, 'r', None)} "
          f"lora_alpha={getattr(cfg, 'lora_alpha', None)} use_rslora={getattr(cfg, 'use_rslora', None)} "
          f"scaling={sorted(scaling)} "
          f"target_modules={sorted(cfg.target_modules) if isinstance(cfg.target_modules, (set, list)) else cfg.target_modules}")
    ok &= check_loaded(model, args.adapter_dir)

    n_effect = 0
    for s in items:
        ctx, cont = lm_eval_pair(tok, s["context"], s["continuation"])
        lp = logprob(model, ctx, cont)
        with model.disable_adapter():
            blp = logprob(model, ctx, cont)
        n_effect += abs(lp - blp) > args.tol
        q = float(s["logprob"])
        diff = abs(lp - q)
        want_tokens = s.get("tokens")
        good = diff <= args.tol and (want_tokens is None or int(want_tokens) == len(cont))
        ok &= good
        tok_txt = f"tokens {len(cont)}/{want_tokens if want_tokens is not None else '?'}"
        print(f"score {s['context']!r} + {s['continuation']!r}: transformers+peft {lp:.5f} quiver {q:.5f} "
              f"(base {blp:.5f}) {tok_txt} diff {diff:.2e} {'ok' if good else 'MISMATCH'}")
    if n_effect == 0:
        print("note: the adapter changes none of these scores by more than --tol (is it trained?)")
    print(f"{'OK' if ok else 'FAILED'}: {len(items)} item(s), tol {args.tol:g} "
          f"(torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
