#!/usr/bin/env python3
"""Quiver's quantized scoring against its own f32 scoring, item by item.

    quantized.py OUT_DIR [--quantize q8_0] [--resamples 2000] [--seed 0]

Reads OUT_DIR/tasks.json and, per task, quiver_<name>.jsonl (f32) and
quiverq_<name>.jsonl (`--quantize Q --quantize-rows all`), both written by
run.sh on the same items. Prints per task and metric (acc: total
log-likelihood; acc_char: per character, lm-eval's acc_norm; acc_norm: per
token) both accuracies and the paired difference quantized - f32 on the same
items, with a 95% paired-bootstrap interval and McNemar's exact p-value; the
share of items whose pick is the same; the mean |delta log-likelihood| per
continuation token; and items/s of both sides (end to end, and scoring
alone). Writes OUT_DIR/quantized.json with the same numbers.
"""
import argparse
import json
import math
import os
import random
import sys

from compare import load_jsonl, read_wall

METRICS = [("acc", "pred"), ("acc_char", "pred_norm_chars"), ("acc_norm", "pred_norm")]


def scoring_s(path):
    try:
        return json.load(open(path))["tasks"][0]["wall_time_s"]
    except (OSError, KeyError, IndexError, ValueError):
        return None


def mcnemar_exact(b, c):
    """Two-sided exact McNemar p-value: b, c are the discordant counts."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_ci(diffs, resamples, rng):
    """95% percentile interval of the mean of paired differences."""
    n = len(diffs)
    means = []
    for _ in range(resamples):
        s = 0
        for _ in range(n):
            s += diffs[rng.randrange(n)]
        means.append(s / n)
    means.sort()
    return means[int(0.025 * resamples)], means[min(resamples - 1, int(0.975 * resamples))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--quantize", default="q8_0")
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    out = os.path.abspath(a.out)
    meta = json.load(open(os.path.join(out, "tasks.json")))
    report = {"quantize": a.quantize, "resamples": a.resamples, "tasks": []}
    lines = []
    for t in meta["tasks"]:
        name = t["name"]
        fp, qp = (os.path.join(out, f"{side}_{name}.jsonl") for side in ("quiver", "quiverq"))
        if not (os.path.exists(fp) and os.path.exists(qp)):
            print(f"{name}: missing {fp if not os.path.exists(fp) else qp}", file=sys.stderr)
            continue
        # Matched by document id: the quantized side may score a subsample
        # (`quiver eval --limit`), whose item numbers are its own.
        key = lambda r: r.get("doc_id", r["item"])
        f = {key(r): r for r in load_jsonl(fp)}
        q = {key(r): r for r in load_jsonl(qp)}
        items = sorted(set(f) & set(q))
        if not items:
            print(f"{name}: no item scored on both sides", file=sys.stderr)
            continue
        if len(items) != len(q):
            print(f"{name}: {len(q)} quantized items, only {len(items)} of them scored in f32", file=sys.stderr)
        rng = random.Random(a.seed)
        rec = {"name": name, "task": t["task"], "items": len(items), "metrics": {}}
        per_tok = []
        for i in items:
            for lf, lq, n in zip(f[i]["choices"]["logprobs"], q[i]["choices"]["logprobs"], f[i]["choices"]["tokens"]):
                per_tok.append(abs(lf - lq) / n)
        rec["mean_abs_dll_per_token"] = sum(per_tok) / len(per_tok)
        rec["max_abs_dll_per_token"] = max(per_tok)
        for metric, key in METRICS:
            cf = [int(f[i]["choices"][key] == f[i]["answer"]) for i in items]
            cq = [int(q[i]["choices"][key] == q[i]["answer"]) for i in items]
            diffs = [b - a_ for a_, b in zip(cf, cq)]
            lo, hi = paired_ci(diffs, a.resamples, rng)
            b = sum(1 for x, y in zip(cf, cq) if x and not y)
            c = sum(1 for x, y in zip(cf, cq) if y and not x)
            same = sum(1 for i in items if f[i]["choices"][key] == q[i]["choices"][key])
            rec["metrics"][metric] = {
                "f32": sum(cf) / len(items),
                "quantized": sum(cq) / len(items),
                "diff": sum(diffs) / len(items),
                "ci95": [lo, hi],
                "mcnemar_p": mcnemar_exact(b, c),
                "f32_only_right": b,
                "quantized_only_right": c,
                "same_pick": same / len(items),
            }
        for side, pre in (("f32", "quiver"), ("quantized", "quiverq")):
            wall = read_wall(os.path.join(out, f"{pre}_{name}.wall"))
            sc = scoring_s(os.path.join(out, f"{pre}_{name}.json"))
            rec[f"{side}_wall_s"] = wall
            rec[f"{side}_scoring_s"] = sc
            n_side = len(f) if side == "f32" else len(q)
            rec[f"{side}_items_per_s"] = n_side / wall if wall else None
            rec[f"{side}_scoring_items_per_s"] = n_side / sc if sc else None
        rec["same_items"] = len(items) == len(f) == len(q)
        report["tasks"].append(rec)

    print(f"Quiver --quantize {a.quantize} --quantize-rows all vs f32, same items; diff = quantized - f32 in points,")
    print(f"95% paired bootstrap ({a.resamples} resamples), McNemar exact p; same = share of items with the same pick.")
    hdr = f"{'task':<16}{'items':>6}  {'metric':<9}{'f32':>6}{'q':>6}{'diff':>7}  {'95% CI':<15}{'p':>6}{'same':>8}"
    print()
    print(hdr + f"{'|dLL|/tok':>11}{'f32 it/s':>10}{'q it/s':>9}{'ratio':>7}")
    print("-" * (len(hdr) + 37))
    ratios = []
    for r in report["tasks"]:
        for j, (metric, _) in enumerate(METRICS):
            m = r["metrics"][metric]
            ci = f"[{100 * m['ci95'][0]:+.1f}, {100 * m['ci95'][1]:+.1f}]"
            row = (
                f"{r['name'] if j == 0 else '':<16}{r['items'] if j == 0 else '':>6}  {metric:<9}"
                f"{100 * m['f32']:>6.1f}{100 * m['quantized']:>6.1f}{100 * m['diff']:>+7.1f}  {ci:<15}"
                f"{m['mcnemar_p']:>6.2f}{100 * m['same_pick']:>7.1f}%"
            )
            if j == 0:
                fs, qs = r["f32_scoring_items_per_s"], r["quantized_scoring_items_per_s"]
                # Speeds compare only when both sides scored the same items.
                ratio = qs / fs if fs and qs and r["same_items"] else None
                if ratio:
                    ratios.append(ratio)
                rate = lambda v: f"{v:.1f}" if v else "-"
                rr = f"{ratio:.2f}x" if ratio else "-"
                row += f"{r['mean_abs_dll_per_token']:>11.2e}{rate(fs):>10}{rate(qs):>9}{rr:>7}"
            print(row)
    if ratios:
        mean = sum(ratios) / len(ratios)
        report["mean_scoring_ratio"] = mean
        print(f"\nscoring items/s, quantized / f32: {mean:.2f}x on average over {len(ratios)} tasks (model loading excluded)")
    json.dump(report, open(os.path.join(out, "quantized.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
