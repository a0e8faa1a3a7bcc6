"""Drives `quiver serve`'s limits and faults with OpenAI's Python client
(and httpx, which it is built on, for what the client hides).

Usage:
  python check_serve_limits.py BASE_URL API_KEY limits EXPERT
  python check_serve_limits.py BASE_URL API_KEY reload NEW CORRUPT
  python check_serve_limits.py BASE_URL API_KEY stream MAX_TOKENS
  python check_serve_limits.py BASE_URL API_KEY kv

The server runs with `--api-key API_KEY --max-batch 1 --max-queue 1
--max-body-bytes 4096` on a model with a long context. `limits` checks
authentication, bodies, the queue and disconnects; `reload` asks for an
expert imported while the server runs and for one whose files were
damaged; `stream` prints a line after the first chunk (the test then sends
SIGTERM) and the stream's end; `kv` (a server with `--kv-cache-mb 1`) asks
for more KV cache than the budget, then sends four requests of which only
two fit at once. Each mode prints one JSON object; the Rust
test (crates/quiver-cli/tests/serve_cli.rs) checks it.
"""
import concurrent.futures as cf
import json
import sys
import time

import httpx
import openai

base_url, key, mode = sys.argv[1], sys.argv[2], sys.argv[3]
root = base_url.removesuffix("/v1")
auth = {"Authorization": f"Bearer {key}"} if key else {}
out = {}


def status(r):
    try:
        body = r.json()
    except ValueError:
        body = r.text
    return {"status": r.status_code, "body": body, "retry_after": r.headers.get("retry-after")}


if mode == "reload":
    new, corrupt = sys.argv[4], sys.argv[5]
    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0)
    # Asked for before any listing: the server reads the library again.
    r = client.completions.create(model=new, prompt="The plural of cat is", max_tokens=4,
                                  temperature=0)
    out["new"] = {"text": r.choices[0].text}
    out["models"] = [m.id for m in client.models.list().data]
    out["corrupt"] = status(httpx.post(
        f"{base_url}/completions", headers=auth,
        json={"model": corrupt, "prompt": "hi", "max_tokens": 2}))
    out["reload"] = status(httpx.post(f"{base_url}/reload", headers=auth))
    print(json.dumps(out))
    sys.exit(0)

if mode == "stream":
    n, text, finish = 0, "", None
    with httpx.stream("POST", f"{base_url}/completions", headers=auth, timeout=120,
                      json={"model": "base", "prompt": "The plural of cat is",
                            "max_tokens": int(sys.argv[4]), "temperature": 0,
                            "stream": True, "ignore_eos": True}) as r:
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                out["done"] = True
                break
            c = json.loads(data)["choices"][0]
            n += 1
            if n == 1:
                print("first chunk", flush=True)
            text += c["text"]
            finish = c["finish_reason"] or finish
    out.update({"chunks": n, "finish_reason": finish})
    print(json.dumps(out))
    sys.exit(0)

if mode == "kv":
    def ask(max_tokens):
        return status(httpx.post(
            f"{base_url}/completions", headers=auth, timeout=300,
            json={"model": "base", "prompt": "The plural of cat is", "max_tokens": max_tokens,
                  "temperature": 0, "ignore_eos": True}))
    out["too_big"] = ask(8000)
    with cf.ThreadPoolExecutor(4) as ex:
        runs = list(ex.map(ask, [1500] * 4))
    out["fits"] = [{"status": r["status"],
                    "tokens": r["body"]["usage"]["completion_tokens"] if r["status"] == 200 else None}
                   for r in runs]
    out["metrics"] = httpx.get(f"{root}/metrics", headers=auth).text
    print(json.dumps(out))
    sys.exit(0)

expert = sys.argv[4]

# Authentication: /health is open, everything else needs the key.
out["health"] = status(httpx.get(f"{root}/health"))
out["no_key"] = status(httpx.get(f"{base_url}/models"))
out["wrong_key"] = status(httpx.get(f"{base_url}/models", headers={"Authorization": "Bearer nope"}))
try:
    openai.OpenAI(base_url=base_url, api_key="nope").models.list()
    out["client_wrong_key"] = "no error"
except openai.AuthenticationError as e:
    out["client_wrong_key"] = {"status": e.status_code, "code": e.code}
client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0)
out["models"] = [m.id for m in client.models.list().data]

# A body over --max-body-bytes, and bodies that are not what they claim.
big = {"model": "base", "prompt": "x" * 10000, "max_tokens": 1}
out["too_large"] = status(httpx.post(f"{base_url}/completions", json=big, headers=auth))
out["bad_json"] = status(httpx.post(f"{base_url}/completions", content=b"{not json",
                                    headers={**auth, "content-type": "application/json"}))
out["missing_field"] = status(httpx.post(f"{base_url}/completions", json={"prompt": "hi"},
                                         headers=auth))
out["bad_temperature"] = status(httpx.post(
    f"{base_url}/completions", json={"model": "base", "prompt": "hi", "temperature": -1},
    headers=auth))
out["past_context"] = status(httpx.post(
    f"{base_url}/completions", json={"model": "base", "prompt": "hi", "max_tokens": 10**9},
    headers=auth))
out["bad_logprobs"] = status(httpx.post(
    f"{base_url}/completions", json={"model": "base", "prompt": "hi", "logprobs": 99},
    headers=auth))

# A full queue: one sequence runs, one waits, the rest are refused.
def long_request(_):
    r = httpx.post(f"{base_url}/completions", headers=auth, timeout=120,
                   json={"model": "base", "prompt": "The plural of cat is", "max_tokens": 2000,
                         "temperature": 0, "ignore_eos": True})
    return status(r)


with cf.ThreadPoolExecutor(6) as ex:
    results = list(ex.map(long_request, range(6)))
out["queue"] = [{"status": r["status"], "retry_after": r["retry_after"],
                 "type": (r["body"].get("error") or {}).get("type") if isinstance(r["body"], dict) else None}
                for r in results]


def metric(name):
    text = httpx.get(f"{root}/metrics", headers=auth).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


# A client that goes away mid-stream frees its sequence at once.
before = metric("quiver_completion_tokens_total")
with httpx.stream("POST", f"{base_url}/completions", headers=auth, timeout=60,
                  json={"model": "base", "prompt": "The plural of cat is", "max_tokens": 4000,
                        "temperature": 0, "stream": True, "ignore_eos": True}) as r:
    for line in r.iter_lines():
        if line.startswith("data: {"):
            break
t0 = time.time()
while metric("quiver_running_sequences") > 0 and time.time() - t0 < 30:
    time.sleep(0.05)
out["disconnect"] = {
    "freed_after_s": time.time() - t0,
    "running": metric("quiver_running_sequences"),
    "tokens": metric("quiver_completion_tokens_total") - before,
}
# A client that gives up while waiting for the batch frees its place in
# the queue at once (one sequence runs at a time here).
with httpx.stream("POST", f"{base_url}/completions", headers=auth, timeout=60,
                  json={"model": "base", "prompt": "The plural of cat is", "max_tokens": 4000,
                        "temperature": 0, "stream": True, "ignore_eos": True}) as r:
    # Read the first chunk and keep the stream open (leaving a `for`
    # over iter_lines() would close it).
    lines = r.iter_lines()
    while not next(lines).startswith("data: {"):
        pass
    try:
        httpx.post(f"{base_url}/completions", headers=auth, timeout=0.5,
                   json={"model": "base", "prompt": "hi", "max_tokens": 5})
        gave_up = False
    except httpx.TimeoutException:
        gave_up = True
    t0 = time.time()
    while metric("quiver_queue_depth") > 1 and time.time() - t0 < 10:
        time.sleep(0.05)
    out["waiting_gone"] = {"gave_up": gave_up, "depth": metric("quiver_queue_depth"),
                           "after_s": time.time() - t0}
# The server still answers.
r = client.completions.create(model=expert, prompt="The plural of cat is", max_tokens=4,
                              temperature=0)
out["after"] = {"text": r.choices[0].text, "tokens": r.usage.completion_tokens}
print(json.dumps(out))
