#!/usr/bin/env python3
"""Side-by-side table of Quiver vs PyTorch + PEFT (and llama.cpp for generation).

    python bench/report.py [--quiver bench/results/quiver.json] [--peer bench/results/peer.json]
                           [--llamacpp bench/results/llamacpp.json] [--out-dir bench/results]

Ratios are always oriented so that > 1 means "Quiver is better": quiver/peer for
throughput, peer/quiver for memory. Missing files or sections print "n/a".
Writes OUT_DIR/summary.json and OUT_DIR/summary.md. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

# Generation: Quiver must reach this many tokens/s in absolute terms, and match llama.cpp.
GEN_ABS_TARGET = 100.0
GEN_VS_LLAMACPP_TARGET = 1.0


def load(path: str | None) -> dict | None:
    if not path or not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        print(f"warning: cannot read {path}: {e}", file=sys.stderr)
        return None


def get(d: dict | None, *keys):
    """Nested lookup that returns None for anything missing or non-numeric at the leaf."""
    cur = d
    for k in keys:
        if not isinstance(cur, dict) or k not in cur:
            return None
        cur = cur[k]
    if isinstance(cur, bool) or not isinstance(cur, (int, float)):
        return None
    return float(cur)


# (key, label, json path, higher_is_better, target ratio vs peer or None)
METRICS = [
    ("train_tokens_per_s", "train tokens/s", ("train", "tokens_per_s"), True, 1.3),
    ("score_tokens_per_s", "score tokens/s", ("score", "tokens_per_s"), True, 1.5),
    # Quiver's 8-bit batched scoring (`--quantize q8_0 --quantize-rows all`)
    # against PyTorch in f32 and in bf16 (autocast); issue 18's 2x target is
    # for CPUs with AVX512-VNNI or AVX512-BF16 (this row is judged anyway).
    ("score_q8_tokens_per_s", "score tokens/s (quiver Q8_0 vs torch f32)", ("score_q8", "tokens_per_s"), True, 2.0),
    ("score_q8_vs_bf16_tokens_per_s", "score tokens/s (quiver Q8_0 vs torch bf16)", ("score_q8", "tokens_per_s"), True, None),
    ("generate_tokens_per_s", "generate tokens/s", ("generate", "tokens_per_s"), True, None),
    # Quiver with weights quantized to Q8_0 / Q4_1 for decoding (`--quantize`); the
    # peer column is PyTorch's f32 generate, llama.cpp runs the Q4_1 GGUF.
    ("generate_q8_tokens_per_s", "generate tokens/s (quiver Q8_0)", ("generate_q8", "tokens_per_s"), True, None),
    ("generate_q4_tokens_per_s", "generate tokens/s (quiver Q4_1)", ("generate_q4", "tokens_per_s"), True, None),
    ("arrow8_tokens_per_s", "arrow-8 tokens/s", ("arrow", "8", "tokens_per_s"), True, None),
    ("arrow64_tokens_per_s", "arrow-64 tokens/s", ("arrow", "64", "tokens_per_s"), True, 3.0),
    ("peak_rss_mb", "peak RSS MB", ("peak_rss_mb",), False, 1.0),
]

# Rows whose peer number is another section than Quiver's.
PEER_PATHS = {
    "score_q8_tokens_per_s": ("score", "tokens_per_s"),
    "score_q8_vs_bf16_tokens_per_s": ("score_bf16", "tokens_per_s"),
}

GENERATE_KEYS = ("generate_tokens_per_s", "generate_q8_tokens_per_s", "generate_q4_tokens_per_s")


def fmt(x: float | None, digits: int = 1) -> str:
    if x is None:
        return "n/a"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}" if abs(x) >= 10 else f"{x:.{max(digits, 2)}f}"


def ratio(q: float | None, p: float | None, higher_is_better: bool) -> float | None:
    if q is None or p is None or q <= 0 or p <= 0:
        return None
    return q / p if higher_is_better else p / q


def build_rows(quiver: dict | None, peer: dict | None, llama: dict | None) -> list[dict]:
    rows = []
    for key, label, path, hib, target in METRICS:
        q = get(quiver, *path)
        p = get(peer, *PEER_PATHS.get(key, path))
        r = ratio(q, p, hib)
        row = {"metric": key, "label": label, "quiver": q, "peer": p, "ratio": r}
        if key in GENERATE_KEYS:
            if key != "generate_tokens_per_s":
                row["peer"] = p = get(peer, "generate", "tokens_per_s")
                row["ratio"] = r = ratio(q, p, hib)
            ll = get(llama, "generate", "tokens_per_s")
            vs_ll = ratio(q, ll, True)
            row["llamacpp"] = ll
            row["ratio_vs_llamacpp"] = vs_ll
            row["target"] = f">= {GEN_ABS_TARGET:.0f} tok/s and >= {GEN_VS_LLAMACPP_TARGET:.1f}x llama.cpp"
            if q is None:
                row["met"] = None
            elif vs_ll is None:
                # llama.cpp not measured: only the absolute half can be judged
                row["met"] = False if q < GEN_ABS_TARGET else None
                row["met_note"] = f"abs {'yes' if q >= GEN_ABS_TARGET else 'NO'}, llama.cpp n/a"
            else:
                row["met"] = q >= GEN_ABS_TARGET and vs_ll >= GEN_VS_LLAMACPP_TARGET
        elif target is None:
            row["target"] = None
            row["met"] = None
        else:
            row["target"] = f">= {target:.1f}x"
            row["met"] = None if r is None else r >= target
        rows.append(row)
    return rows


def met_str(row: dict) -> str:
    m = row.get("met")
    if "met_note" in row:
        return row["met_note"]
    if m is True:
        return "yes"
    if m is False:
        return "NO"
    if row.get("target") is None:
        return "-"
    return "n/a"


def ratio_str(row: dict) -> str:
    s = "n/a" if row["ratio"] is None else f"{row['ratio']:.2f}x"
    if row["metric"] in GENERATE_KEYS:
        ll = row.get("llamacpp")
        if ll is not None:
            vs = row.get("ratio_vs_llamacpp")
            s += f" (llama.cpp {fmt(ll)} tok/s: {'n/a' if vs is None else f'{vs:.2f}x'})"
    return s


def table(rows: list[dict]) -> list[list[str]]:
    header = ["metric", "quiver", "pytorch+peft", "ratio (>1 = quiver better)", "target", "met?"]
    body = [header]
    for r in rows:
        body.append([
            r["label"],
            fmt(r["quiver"]),
            fmt(r["peer"]),
            ratio_str(r),
            r["target"] or "-",
            met_str(r),
        ])
    return body


def render_text(body: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in body) for i in range(len(body[0]))]
    lines = []
    for n, row in enumerate(body):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_md(body: list[list[str]]) -> str:
    out = ["| " + " | ".join(body[0]) + " |", "|" + "|".join(" --- " for _ in body[0]) + "|"]
    for row in body[1:]:
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    return "\n".join(out)


def context_lines(quiver: dict | None, peer: dict | None, llama: dict | None) -> list[str]:
    lines = []
    for name, d in (("quiver", quiver), ("pytorch+peft", peer), ("llama.cpp", llama)):
        if d is None:
            lines.append(f"{name}: no results")
            continue
        bits = []
        if d.get("threads") is not None:
            bits.append(f"threads={d.get('threads')}")
        if d.get("quick"):
            bits.append("quick")
        v = d.get("versions")
        if isinstance(v, dict) and v:
            bits.append(", ".join(f"{k} {val}" for k, val in v.items()))
        if d.get("model"):
            bits.append(f"model={d.get('model')}")
        lines.append(f"{name}: " + "; ".join(bits))
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quiver", default=os.path.join(RESULTS, "quiver.json"))
    ap.add_argument("--peer", default=os.path.join(RESULTS, "peer.json"))
    ap.add_argument("--llamacpp", default=os.path.join(RESULTS, "llamacpp.json"))
    ap.add_argument("--out-dir", default=RESULTS)
    args = ap.parse_args()

    quiver, peer, llama = load(args.quiver), load(args.peer), load(args.llamacpp)
    rows = build_rows(quiver, peer, llama)
    body = table(rows)
    ctx = context_lines(quiver, peer, llama)

    print(render_text(body))
    print()
    for line in ctx:
        print(line)

    os.makedirs(args.out_dir, exist_ok=True)
    summary = {
        "rows": rows,
        "inputs": {"quiver": args.quiver, "peer": args.peer, "llamacpp": args.llamacpp},
        "context": ctx,
        "all_targets_met": all(r["met"] is True for r in rows if r["target"] is not None),
    }
    with open(os.path.join(args.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    with open(os.path.join(args.out_dir, "summary.md"), "w") as f:
        f.write("Ratios: quiver/peer for throughput, peer/quiver for memory (> 1 = Quiver better).\n\n")
        f.write(render_md(body) + "\n\n")
        for line in ctx:
            f.write(f"- {line}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
