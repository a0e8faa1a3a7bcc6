#!/usr/bin/env python3
"""Write the lm-eval parity fixture of crates/quiver-cli/tests/lmeval_parity.rs.

    make_fixture.py OUT_DIR [OUT_DIR...] [--tasks arc_easy,piqa,winogrande]
                    [--per-task 12] [--out crates/quiver-cli/tests/fixtures/lmeval/parity.json]

Each OUT_DIR is a finished bench/lmeval/run.sh output (its tasks.json,
items.jsonl, lmeval_tasks/ and lm-eval's logged samples). For the first
--per-task items of each task (in run order; items whose lm-eval picks are
decided by less than 1e-3 in log-likelihood are passed over, so that
rounding cannot flip them), the fixture records the item as Quiver reads it
(source, options, answer, scored_suffix), every lm-eval request of it
(context, continuation, lm-eval's log-likelihood), lm-eval's acc pick
(argmax log-likelihood), its acc_norm pick (argmax log-likelihood / len of
doc_to_choice) and those lengths.
"""
import argparse
import glob
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from compare import argmax, lm_samples, load_jsonl, norm_lengths, sample_logliks, sample_requests  # noqa: E402

MARGIN = 1e-3


def margin(xs):
    s = sorted(xs, reverse=True)
    return s[0] - s[1] if len(s) > 1 else float("inf")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("outs", nargs="+")
    ap.add_argument("--tasks", default="arc_easy,piqa,winogrande")
    ap.add_argument("--per-task", type=int, default=12)
    ap.add_argument("--out", default=os.path.join(ROOT, "crates/quiver-cli/tests/fixtures/lmeval/parity.json"))
    a = ap.parse_args()
    wanted = [t for t in a.tasks.split(",") if t]
    found = {}
    version = None
    for out in a.outs:
        meta = json.load(open(os.path.join(out, "tasks.json")))
        items = load_jsonl(os.path.join(out, "items.jsonl"))
        for t in meta["tasks"]:
            name = t["name"]
            if name not in wanted or name in found:
                continue
            lm = lm_samples(out, name)
            if lm is None:
                continue
            docs = load_jsonl(os.path.join(out, "lmeval_tasks", f"{name}.jsonl"))
            q_items = [e for e in items if e["task"] == name]
            chosen = []
            for i, doc in enumerate(docs):
                if len(chosen) == a.per_task:
                    break
                s = lm.get(i)
                if s is None:
                    continue
                lls = sample_logliks(s)
                lens = norm_lengths(doc)
                normed = [x / n for x, n in zip(lls, lens)]
                if margin(lls) < MARGIN or margin(normed) < MARGIN / max(lens):
                    continue
                ex = q_items[i]
                rec = {k: ex[k] for k in ("task", "source", "options", "answer", "scored_suffix") if k in ex}
                rec["doc_index"] = doc["index"]
                rec["requests"] = [
                    {"context": c, "continuation": x, "loglik": ll}
                    for (c, x), ll in zip(sample_requests(s), lls)
                ]
                rec["lmeval_acc_pick"] = argmax(lls)
                rec["lmeval_acc_norm_pick"] = argmax(normed)
                rec["lmeval_acc_norm_lengths"] = lens
                chosen.append(rec)
            found[name] = (t, chosen)
            results = glob.glob(os.path.join(out, f"lmeval_{name}", "**", "results_*.json"), recursive=True)
            if results and version is None:
                try:
                    cfg = json.load(open(sorted(results)[-1]))
                    version = cfg.get("lm_eval_version") or cfg.get("git_hash")
                except (OSError, ValueError):
                    pass
    missing = [t for t in wanted if t not in found]
    if missing:
        sys.exit(f"make_fixture.py: no lm-eval samples for {missing} in {a.outs}")
    try:
        import lm_eval  # noqa: F401
        from importlib.metadata import version as v

        version = v("lm_eval")
    except Exception:
        pass
    fixture = {
        "about": "lm-evaluation-harness log-likelihoods of Quiver's own olmo items, for tests/lmeval_parity.rs; "
        "written by bench/lmeval/make_fixture.py from bench/lmeval/run.sh outputs",
        "lm_eval_version": version,
        "model": "smollm2-135m (quiver convert to a Hugging Face directory, lm_eval --model hf dtype=float32, add_bos_token=False)",
        "tasks": {name: {"task": t["task"], "partial": t["partial"], "items": len(ch)} for name, (t, ch) in found.items()},
        "items": [rec for name in wanted for rec in found[name][1]],
    }
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(fixture, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {len(fixture['items'])} items ({', '.join(f'{n} {len(c)}' for n, (_, c) in found.items())}) to {a.out}")


if __name__ == "__main__":
    main()
