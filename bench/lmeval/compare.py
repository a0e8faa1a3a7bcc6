#!/usr/bin/env python3
"""Item-by-item comparison of `quiver eval` and lm-eval on the items of run.sh.

    compare.py OUT_DIR [--threads N] [--max-listed K]

Reads OUT_DIR/tasks.json (prepare.py), quiver_<name>.jsonl/.json/.wall and
lmeval_<name>/**/samples_quiver_<name>_*.jsonl + lmeval_<name>.wall, matches
items (Quiver's item i is lm-eval's doc_id i: both score the same JSONL in
file order), and prints per task:

* items, and each side's accuracies (acc; acc_norm of lm-eval = per
  character; Quiver's acc_char = per character, and Quiver's acc_norm = per
  token, which lm-eval does not have);
* agreement of the picks: acc vs acc, lm-eval acc_norm vs Quiver acc_char;
* |delta log-likelihood| per continuation token (mean and max over
  requests) and the largest |delta| of a request;
* items/s of each side, end to end (model loading included) and Quiver's
  scoring alone;
* every item where a pick differs, with both sides' scores.

Writes OUT_DIR/compare.json with the same numbers.
"""
import argparse
import glob
import json
import os
import sys


def load_jsonl(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def read_wall(path):
    try:
        return float(open(path).read().strip())
    except (OSError, ValueError):
        return None


def argmax(xs):
    best = 0
    for i, x in enumerate(xs):
        if x > xs[best]:
            best = i
    return best


def sample_requests(s):
    """(context, continuation) of each request of one logged lm-eval sample."""
    args = s["arguments"]
    if isinstance(args, dict):
        keys = sorted(args, key=lambda k: int(k.rsplit("_", 1)[-1]))
        return [(args[k]["arg_0"], args[k]["arg_1"]) for k in keys]
    return [(a[0], a[1]) for a in args]


def sample_logliks(s):
    out = []
    for r in s["filtered_resps"]:
        v = r[0] if isinstance(r, (list, tuple)) else r
        out.append(float(v))
    return out


def lm_samples(out, name):
    pat = os.path.join(out, f"lmeval_{name}", "**", f"samples_quiver_{name}_*.jsonl")
    files = sorted(glob.glob(pat, recursive=True))
    if not files:
        return None
    return {s["doc_id"]: s for s in load_jsonl(files[-1])}


def norm_lengths(doc):
    """lm-eval's acc_norm divisor: len() of each doc_to_choice entry."""
    if "choices" in doc:
        return [len(c) for c in doc["choices"]]
    return [len(c) for c in doc["contexts"]]


def fmt_rate(items, secs):
    return f"{items / secs:.1f}" if secs else "-"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--threads", default="?")
    ap.add_argument("--max-listed", type=int, default=1000, help="disagreements listed per task")
    a = ap.parse_args()
    out = os.path.abspath(a.out)
    meta = json.load(open(os.path.join(out, "tasks.json")))
    report = {"limit": meta["limit"], "seed": meta["seed"], "threads": a.threads, "tasks": []}
    rows = []
    listings = []
    for t in meta["tasks"]:
        name = t["name"]
        qpath = os.path.join(out, f"quiver_{name}.jsonl")
        lm = lm_samples(out, name)
        if not os.path.exists(qpath) or lm is None:
            print(f"{name}: missing {'quiver predictions' if not os.path.exists(qpath) else 'lm-eval samples'}", file=sys.stderr)
            continue
        docs = load_jsonl(os.path.join(out, "lmeval_tasks", f"{name}.jsonl"))
        quiver = load_jsonl(qpath)
        n = min(len(quiver), len(docs))
        if len(quiver) != len(docs) or len(lm) != len(docs):
            print(f"{name}: {len(quiver)} Quiver items, {len(lm)} lm-eval samples, {len(docs)} docs", file=sys.stderr)
        agree_acc = agree_norm = 0
        q_acc = q_char = q_tok = l_acc = l_norm = 0
        per_tok = []
        max_abs = 0.0
        disagreements = []
        matched = 0
        text_mismatch = 0
        for i in range(n):
            if i not in lm:
                continue
            matched += 1
            q = quiver[i]["choices"]
            s = lm[i]
            doc = docs[i]
            gold = doc["gold"]
            assert quiver[i]["answer"] == gold, (name, i)
            lls = sample_logliks(s)
            lens = norm_lengths(doc)
            if "choices" in doc:
                want = [(doc["context"], c) for c in doc["choices"]]
            else:
                want = [(c, doc["suffix"]) for c in doc["contexts"]]
            if sample_requests(s) != want:
                text_mismatch += 1
            l_pred = argmax(lls)
            l_pred_norm = argmax([x / n_ for x, n_ in zip(lls, lens)])
            for lp_q, lp_l, ntok in zip(q["logprobs"], lls, q["tokens"]):
                d = abs(lp_q - lp_l)
                per_tok.append(d / ntok)
                max_abs = max(max_abs, d)
            agree_acc += q["pred"] == l_pred
            agree_norm += q["pred_norm_chars"] == l_pred_norm
            q_acc += q["pred"] == gold
            q_char += q["pred_norm_chars"] == gold
            q_tok += q["pred_norm"] == gold
            l_acc += l_pred == gold
            l_norm += l_pred_norm == gold
            if q["pred"] != l_pred or q["pred_norm_chars"] != l_pred_norm:
                reqs = sample_requests(s)
                disagreements.append(
                    {
                        "item": i,
                        "index": doc["index"],
                        "gold": gold,
                        "acc_pick": [q["pred"], l_pred],
                        "norm_pick": [q["pred_norm_chars"], l_pred_norm],
                        "context": reqs[0][0],
                        "options": [
                            {
                                "continuation": c,
                                "quiver": lp_q,
                                "lmeval": lp_l,
                                "tokens": ntok,
                                "quiver_chars": nch,
                                "lmeval_len": ln,
                            }
                            for (_, c), lp_q, lp_l, ntok, nch, ln in zip(
                                reqs, q["logprobs"], lls, q["tokens"], q["chars"], lens
                            )
                        ],
                    }
                )
        if not matched:
            continue
        if text_mismatch:
            print(f"{name}: WARNING: {text_mismatch} item(s) whose lm-eval requests differ from the prepared texts", file=sys.stderr)
        qwall = read_wall(os.path.join(out, f"quiver_{name}.wall"))
        lwall = read_wall(os.path.join(out, f"lmeval_{name}.wall"))
        try:
            qscore = json.load(open(os.path.join(out, f"quiver_{name}.json")))["tasks"][0]["wall_time_s"]
        except (OSError, KeyError, IndexError, ValueError):
            qscore = None
        rec = {
            "task": t["task"],
            "name": name,
            "partial": t["partial"],
            "items": matched,
            "requests": len(per_tok),
            "request_text_mismatches": text_mismatch,
            "quiver": {"acc": q_acc / matched, "acc_char": q_char / matched, "acc_norm_tokens": q_tok / matched},
            "lmeval": {"acc": l_acc / matched, "acc_norm": l_norm / matched},
            "agree_acc": agree_acc / matched,
            "agree_norm": agree_norm / matched,
            "mean_abs_dll_per_token": sum(per_tok) / len(per_tok),
            "max_abs_dll_per_token": max(per_tok),
            "max_abs_dll": max_abs,
            "quiver_wall_s": qwall,
            "quiver_scoring_s": qscore,
            "lmeval_wall_s": lwall,
            "quiver_items_per_s": matched / qwall if qwall else None,
            "quiver_scoring_items_per_s": matched / qscore if qscore else None,
            "lmeval_items_per_s": matched / lwall if lwall else None,
            "disagreements": disagreements,
        }
        report["tasks"].append(rec)
        rows.append(rec)
        listings.append((rec, disagreements[: a.max_listed]))

    with open(os.path.join(out, "compare.json"), "w") as f:
        json.dump(report, f, indent=2, ensure_ascii=False)

    print(f"limit {meta['limit']} items per task, seed {meta['seed']}, threads {a.threads}")
    print("acc: highest total log-likelihood (both sides); lm-eval acc_norm and Quiver acc_char: highest per")
    print("character of the continuation; Quiver acc_norm(tok): per token (no lm-eval counterpart).")
    print("|dLL|/tok: |Quiver - lm-eval| log-likelihood of a request / its continuation tokens.")
    print("items/s: end to end (process start to exit, model loading included); Quiver scoring alone in ().")
    print()
    hdr = (
        f"{'task':<22} {'items':>5} {'agree acc':>9} {'agree norm':>10} "
        f"{'acc q/lm':>11} {'char q / norm lm':>16} {'q tok':>6} "
        f"{'mean |dLL|/tok':>14} {'max |dLL|/tok':>13} {'max |dLL|':>9} "
        f"{'q items/s':>15} {'lm items/s':>10}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        qr = fmt_rate(r["items"], r["quiver_wall_s"])
        qs = fmt_rate(r["items"], r["quiver_scoring_s"])
        print(
            f"{r['name'] + (' *' if r['partial'] else ''):<22} {r['items']:>5} "
            f"{100 * r['agree_acc']:>8.1f}% {100 * r['agree_norm']:>9.1f}% "
            f"{100 * r['quiver']['acc']:>5.1f}/{100 * r['lmeval']['acc']:<5.1f} "
            f"{100 * r['quiver']['acc_char']:>7.1f}/{100 * r['lmeval']['acc_norm']:<8.1f} "
            f"{100 * r['quiver']['acc_norm_tokens']:>6.1f} "
            f"{r['mean_abs_dll_per_token']:>14.2e} {r['max_abs_dll_per_token']:>13.2e} {r['max_abs_dll']:>9.2e} "
            f"{qr + ' (' + qs + ')':>15} {fmt_rate(r['items'], r['lmeval_wall_s']):>10}"
        )
    if any(r["partial"] for r in rows):
        print()
        print("* partial scoring (one context per option, shared scored suffix): lm-eval's acc_norm divides")
        print("  by the length of each option's *context* (its multiple-input convention), and so does")
        print("  Quiver's acc_char.")
    for rec, dis in listings:
        print()
        if not rec["disagreements"]:
            print(f"{rec['name']}: no disagreement in {rec['items']} items")
            continue
        print(f"{rec['name']}: {len(rec['disagreements'])} item(s) with a different pick"
              + (f" (first {len(dis)} listed)" if len(dis) < len(rec["disagreements"]) else ""))
        for d in dis:
            print(
                f"  item {d['item']} (file index {d['index']}), gold {d['gold']}: "
                f"acc pick quiver {d['acc_pick'][0]} / lm-eval {d['acc_pick'][1]}; "
                f"norm pick quiver acc_char {d['norm_pick'][0]} / lm-eval acc_norm {d['norm_pick'][1]}"
            )
            print(f"    context: {d['context'][-120:]!r}")
            for j, o in enumerate(d["options"]):
                print(
                    f"    [{j}] quiver {o['quiver']:.6f} (/char {o['quiver'] / max(o['quiver_chars'], 1):.6f})  "
                    f"lm-eval {o['lmeval']:.6f} (/len {o['lmeval'] / max(o['lmeval_len'], 1):.6f})  "
                    f"tokens {o['tokens']}  {o['continuation'][:60]!r}"
                )


if __name__ == "__main__":
    main()
