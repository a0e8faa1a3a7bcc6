"""Drives `quiver serve` with OpenAI's own Python client.

Usage: python check_openai_client.py BASE_URL EXPERT

Prints one JSON object: the model ids, and for the base model, the expert
EXPERT and the `arrow` route the greedy completion text (plain and
streamed), a chat completion (plain and streamed), the usage, and what the
client raised for an unknown model. The Rust test compares these with
`quiver generate` and checks the shapes.
"""
import json
import sys

import openai

base_url, expert = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key="unused")
out = {"models": [m.id for m in client.models.list().data]}
prompt = "The plural of cat is"
for model in ["base", expert, "arrow"]:
    r = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=model, prompt=prompt, max_tokens=8, temperature=0, stream=True
        )
    )
    out[model] = {
        "text": r.choices[0].text,
        "finish_reason": r.choices[0].finish_reason,
        "usage": r.usage.model_dump(),
        "object": r.object,
        "streamed": streamed,
    }
msgs = [{"role": "user", "content": "Say hi"}]
chat = client.chat.completions.create(model="base", messages=msgs, max_tokens=6, temperature=0)
chunks = list(
    client.chat.completions.create(
        model="base", messages=msgs, max_tokens=6, temperature=0, stream=True
    )
)
out["chat"] = {
    "text": chat.choices[0].message.content,
    "role": chat.choices[0].message.role,
    "object": chat.object,
    "streamed": "".join(c.choices[0].delta.content or "" for c in chunks),
    "first_role": chunks[0].choices[0].delta.role,
    "chunk_object": chunks[0].object,
}
# A stop sequence: the first printable ASCII character after the first one.
base_text = out["base"]["text"]
stop_s = next((ch for ch in base_text[1:] if ch.isascii() and ch.isprintable()), None)
if stop_s is not None:
    stop = client.completions.create(
        model="base", prompt=prompt, max_tokens=8, temperature=0, stop=[stop_s]
    )
    out["stop"] = {"stop": stop_s, "text": stop.choices[0].text,
                   "finish_reason": stop.choices[0].finish_reason}
# quiver_explain: the experts behind each generated token, plain and streamed.
r = client.completions.create(model="arrow", prompt=prompt, max_tokens=5, temperature=0,
                              extra_body={"quiver_explain": "layers", "top_k": 2})
streamed = []
for c in client.completions.create(model="arrow", prompt=prompt, max_tokens=5, temperature=0,
                                   stream=True, extra_body={"quiver_explain": True, "top_k": 2}):
    streamed.extend((c.model_extra or {}).get("quiver_explain") or
                    (c.choices[0].model_extra or {}).get("quiver_explain") or [])
out["explain"] = {
    "tokens": r.usage.completion_tokens,
    "plain": (r.choices[0].model_extra or {}).get("quiver_explain"),
    "streamed": streamed,
}
try:
    client.completions.create(model="base", prompt=prompt, max_tokens=2,
                              extra_body={"quiver_explain": True})
    out["explain_base"] = "no error"
except openai.BadRequestError as e:
    out["explain_base"] = {"status": e.status_code, "message": str(e)}
try:
    client.completions.create(model="no-such-model", prompt=prompt, max_tokens=2)
    out["unknown_model"] = "no error"
except openai.NotFoundError as e:
    out["unknown_model"] = {"status": e.status_code, "code": e.code}
# Prometheus metrics, after all of the above.
import urllib.request
out["metrics"] = urllib.request.urlopen(base_url.removesuffix("/v1") + "/metrics").read().decode()
print(json.dumps(out))
