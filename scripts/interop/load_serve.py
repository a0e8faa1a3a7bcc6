"""A bounded load test of `quiver serve` on loopback.

Usage: python load_serve.py BASE_URL CLIENTS REQUESTS TIME_CAP_S MODEL [MODEL ...]
($QUIVER_API_KEY, when set, is sent as the bearer key.)

First every distinct request (each MODEL x two prompts x three max_tokens,
greedy) is sent once, one at a time: the reference answers. Then CLIENTS
threads send REQUESTS requests in all, drawn from the same set in a fixed
random order, each with a per-request timeout, and the whole run has a hard
cap of TIME_CAP_S seconds. Prints one JSON object: per status the count,
the requests whose answer differed from the reference, the ones that
failed otherwise, and the wall time. The Rust test checks it.
"""
import concurrent.futures as cf
import json
import random
import sys
import time

import os

import httpx

base_url = sys.argv[1]
clients, total, cap = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
models = sys.argv[5:]
prompts = ["The plural of cat is", "Say hi to the people of the world"]
combos = [(m, p, t) for m in models for p in prompts for t in (4, 8, 16)]
key = os.environ.get("QUIVER_API_KEY")
headers = {"Authorization": f"Bearer {key}"} if key else {}


def ask(http, combo, timeout):
    m, p, t = combo
    r = http.post(f"{base_url}/completions", timeout=timeout,
                  json={"model": m, "prompt": p, "max_tokens": t, "temperature": 0})
    if r.status_code == 200:
        return 200, r.json()["choices"][0]["text"]
    return r.status_code, r.text


with httpx.Client(headers=headers) as http:
    reference = {c: ask(http, c, 60)[1] for c in combos}

rng = random.Random(0)
plan = [rng.choice(combos) for _ in range(total)]
deadline = time.time() + cap
statuses, wrong, failed = {}, [], []


def worker(k):
    out = []
    with httpx.Client(headers=headers) as http:
        for i in range(k, total, clients):
            left = deadline - time.time()
            if left <= 0:
                out.append((i, "timeout", "time cap reached before sending"))
                continue
            try:
                out.append((i, *ask(http, plan[i], min(left, 60))))
            except httpx.HTTPError as e:
                out.append((i, "error", repr(e)))
    return out


t0 = time.time()
with cf.ThreadPoolExecutor(clients) as ex:
    results = [r for rs in ex.map(worker, range(clients)) for r in rs]
wall = time.time() - t0
for i, status, body in results:
    statuses[str(status)] = statuses.get(str(status), 0) + 1
    if status == 200 and body != reference[plan[i]]:
        wrong.append({"request": i, "combo": plan[i], "got": body, "want": reference[plan[i]]})
    elif status not in (200, 429):
        failed.append({"request": i, "status": status, "body": body[:300]})
print(json.dumps({"statuses": statuses, "wrong": wrong, "failed": failed, "wall_s": wall,
                  "requests": len(results)}))
