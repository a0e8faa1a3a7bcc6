#!/usr/bin/env python3
"""`quiver serve` against llama.cpp's OpenAI-compatible server, side by side.

    python bench/serve/bench_serve.py --quiver target/release/quiver --gguf F.gguf \
        --lib8 DIR --lib64 DIR [--threads 2] [--quick] --out bench/serve/results

Both servers load the same GGUF (SmolLM2-135M-Instruct, Q4_1) with the
same thread count; Quiver runs it with `--quantize q4_1` (its own Q4_1
kernel for decoding, f32 for longer prompt chunks). They run one after the
other, never together. For 1, 4 and 16 concurrent clients, each client
sends the same streamed, greedy completion requests (a fixed prompt, exactly
NEW_TOKENS new tokens: the end-of-sequence token is banned with
`logit_bias` on both). Measured per run: aggregate output tokens/s (every
client's tokens over the wall time), time to first token and request
latency (p50, p99). Quiver is also run with Arrow over 8 and 64 experts
(`e8:arrow`, `e64:arrow`). Ratios are printed and written with the table.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

import httpx

NEW_TOKENS = 64
PROMPT = (
    "Write a short story about a cat who learns to play the piano in a small "
    "town by the sea, and how the neighbours react to the music."
)
EOS = 2  # SmolLM2-Instruct's <|im_end|>


def log(msg: str) -> None:
    print(f"[bench-serve] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} was not ready after {timeout} s")


def one_request(url: str, model: str) -> dict:
    body = {
        "model": model,
        "prompt": PROMPT,
        "max_tokens": NEW_TOKENS,
        "temperature": 0,
        "stream": True,
        "logit_bias": {str(EOS): -100},
    }
    t0 = time.perf_counter()
    ttft, chunks, finish = None, 0, None
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            c = json.loads(line[6:])["choices"]
            if not c:
                continue
            if c[0].get("text"):
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
            finish = c[0].get("finish_reason") or finish
    return {"ttft": ttft, "latency": time.perf_counter() - t0, "chunks": chunks, "finish": finish}


def load(url: str, model: str, clients: int, per_client: int) -> dict:
    one_request(url, model)  # warm-up (and, for routes, the route built)
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as ex:
        futures = [ex.submit(one_request, url, model) for _ in range(clients * per_client)]
        runs = [f.result() for f in futures]
    wall = time.perf_counter() - t0
    lat = sorted(r["latency"] for r in runs)
    ttft = sorted(r["ttft"] for r in runs if r["ttft"] is not None)
    q = lambda xs, p: xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]
    # Every request asks for exactly NEW_TOKENS tokens (EOS banned); a
    # streamed chunk may hold more than one token's text, so tokens are
    # counted from the requests, and chunks are reported to show it.
    tokens = NEW_TOKENS * len(runs)
    return {
        "model": model,
        "clients": clients,
        "requests": len(runs),
        "tokens_per_s": tokens / wall,
        "ttft_p50_s": statistics.median(ttft),
        "latency_p50_s": q(lat, 0.5),
        "latency_p99_s": q(lat, 0.99),
        "wall_s": wall,
        "chunks": sum(r["chunks"] for r in runs),
        "finish": sorted({str(r["finish"]) for r in runs}),
    }


def serve(cmd: list[str], env: dict, url: str):
    log("$ " + " ".join(cmd))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        wait_ready(url, proc)
    except BaseException:
        proc.kill()
        raise
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quiver", required=True)
    ap.add_argument("--gguf", required=True, help="the GGUF file llama.cpp loads")
    ap.add_argument("--quiver-model", default="smollm2-135m",
                    help="the same weights for Quiver (default: the built-in name of that GGUF)")
    ap.add_argument("--lib8", required=True)
    ap.add_argument("--lib64", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="one request per client")
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--out", default="bench/serve/results")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    per_client = 1 if args.quick else 2
    levels = [1, 4, 16]
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    rows = []

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # The built-in name is the same GGUF file (`quiver fetch`), and names
    # the base model the experts were made for.
    q = serve([args.quiver, "serve", "--model", args.quiver_model, "--quantize", "q4_1",
               "--library", f"e8={args.lib8}", "--library", f"e64={args.lib64}",
               "--port", str(port), "--max-batch", "16", "--quiet"], env, url)
    try:
        for model in ["base", "e8:arrow", "e64:arrow"]:
            for c in levels if model == "base" else [1, 16]:
                r = load(url, model, c, per_client)
                r["server"] = "quiver"
                log(json.dumps(r))
                rows.append(r)
    finally:
        stop(q)

    if not args.skip_llamacpp:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        l = serve([sys.executable, "-m", "llama_cpp.server", "--model", args.gguf,
                   "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
                   "--n_ctx", "2048", "--host", "127.0.0.1", "--port", str(port),
                   "--verbose", "False",
                   # Queue concurrent requests (its default lets a new request
                   # interrupt the one streaming).
                   "--interrupt_requests", "False"], env, url)
        try:
            for c in levels:
                r = load(url, "base", c, per_client)
                r["server"] = "llama.cpp"
                log(json.dumps(r))
                rows.append(r)
        finally:
            stop(l)

    def find(server, model, c):
        return next((r for r in rows if r["server"] == server and r["model"] == model
                     and r["clients"] == c), None)

    lines = [
        "| server | model | clients | requests | output tokens/s | TTFT p50 (s) | latency p50 (s) | latency p99 (s) | vs llama.cpp | vs Quiver base |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        peer = find("llama.cpp", "base", r["clients"])
        own = find("quiver", "base", r["clients"])
        vs_peer = f"{r['tokens_per_s'] / peer['tokens_per_s']:.2f}x" if peer and r["server"] == "quiver" else ""
        vs_own = f"{r['tokens_per_s'] / own['tokens_per_s']:.2f}x" if own and r["model"] != "base" else ""
        lines.append(
            f"| {r['server']} | {r['model']} | {r['clients']} | {r['requests']} | "
            f"{r['tokens_per_s']:.1f} | {r['ttft_p50_s']:.3f} | {r['latency_p50_s']:.2f} | "
            f"{r['latency_p99_s']:.2f} | {vs_peer} | {vs_own} |"
        )
    cpu = platform.processor() or platform.machine()
    try:
        flags = open("/proc/cpuinfo").read()
        avx = "avx512" if "avx512f" in flags else ("avx2" if "avx2" in flags else "no avx2")
    except OSError:
        avx = "?"
    header = (f"{NEW_TOKENS} new tokens per request (EOS banned), greedy, streamed; "
              f"{per_client} request(s) per client; threads={args.threads}; CPU {cpu} ({avx}), "
              f"{os.cpu_count()} logical CPUs; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    table = header + "\n\n" + "\n".join(lines) + "\n"
    print(table)
    with open(os.path.join(args.out, "serve.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.out, "serve.json"), "w") as f:
        json.dump({"header": header, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
