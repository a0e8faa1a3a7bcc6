"""Drives `quiver serve` with OpenAI's own Python client.

Usage: python check_openai_client.py BASE_URL EXPERT

Prints one JSON object: the model ids, and for the base model, the expert
EXPERT and the `arrow` route the greedy completion text (plain and
streamed), a chat completion (plain and streamed), the usage, and what the
client raised for an unknown model. The Rust test compares these with
`quiver generate` and checks the shapes.
"""
import concurrent.futures as cf
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
# logprobs: completions list the n most likely tokens, chat the same in
# its own shape; greedy picks the most likely, so its logprob is the top's.
r = client.completions.create(model=expert, prompt=prompt, max_tokens=6, temperature=0,
                              logprobs=3)
lp = r.choices[0].logprobs
out["logprobs"] = {"tokens": lp.tokens, "token_logprobs": lp.token_logprobs,
                   "top_logprobs": lp.top_logprobs, "text_offset": lp.text_offset,
                   "completion_tokens": r.usage.completion_tokens}
r = client.chat.completions.create(model="base", messages=msgs, max_tokens=5, temperature=0,
                                   logprobs=True, top_logprobs=2)
out["chat_logprobs"] = {
    "content": [c.model_dump() for c in r.choices[0].logprobs.content],
    "completion_tokens": r.usage.completion_tokens,
}
# logit_bias: +100 on one token makes it every generated token; a key
# that is not a token id is refused.
r = client.completions.create(model="base", prompt=prompt, max_tokens=4, temperature=0,
                              logprobs=0, logit_bias={"5": 100})
out["logit_bias"] = {"tokens": r.choices[0].logprobs.tokens}
try:
    client.completions.create(model="base", prompt=prompt, max_tokens=2,
                              logit_bias={"x": 1})
    out["logit_bias"]["bad"] = "no error"
except openai.BadRequestError as e:
    out["logit_bias"]["bad"] = {"status": e.status_code, "param": e.param}
# Newer and unsupported fields.
compat = {"retrieve": client.models.retrieve(expert).id}
try:
    client.models.retrieve("no-such-model")
    compat["retrieve_missing"] = "no error"
except openai.NotFoundError as e:
    compat["retrieve_missing"] = e.status_code
parts = [{"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi"}]}]
compat["parts"] = client.chat.completions.create(model="base", messages=parts, max_tokens=6,
                                                 temperature=0).choices[0].message.content
compat["plain"] = chat.choices[0].message.content
r = client.chat.completions.create(model="base", messages=msgs, max_completion_tokens=3,
                                   temperature=0, extra_body={"ignore_eos": True})
compat["max_completion_tokens"] = r.usage.completion_tokens
pen = lambda **kw: client.completions.create(model="base", prompt=prompt, max_tokens=8,
                                             temperature=0, **kw).choices[0].text
compat["penalty"] = {"none": pen(), "zero": pen(presence_penalty=0.0, frequency_penalty=0.0),
                     "strong": pen(presence_penalty=2.0, frequency_penalty=2.0),
                     "strong_again": pen(presence_penalty=2.0, frequency_penalty=2.0)}
for field, kw in [("echo", {"echo": True}), ("best_of", {"best_of": 3}),
                  ("presence_penalty", {"presence_penalty": 5.0})]:
    try:
        client.completions.create(model="base", prompt=prompt, max_tokens=2, **kw)
        compat[field] = "no error"
    except openai.BadRequestError as e:
        compat[field] = {"status": e.status_code, "param": e.param}
try:
    client.chat.completions.create(model="base", messages=msgs, max_tokens=2, tools=[
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
    compat["tools"] = "no error"
except openai.BadRequestError as e:
    compat["tools"] = {"status": e.status_code, "param": e.param}
out["compat"] = compat
# n choices and several prompts: sampled with a seed, so repeatable, and
# streamed choices carry their index.
kw = dict(model="base", max_tokens=6, temperature=1.0, seed=7)
a = client.completions.create(prompt=prompt, n=2, **kw)
b = client.completions.create(prompt=prompt, n=2, **kw)
streamed = {}
for c in client.completions.create(prompt=prompt, n=2, stream=True, **kw):
    for ch in c.choices:
        streamed[ch.index] = streamed.get(ch.index, "") + ch.text
multi = client.completions.create(model="base", prompt=[prompt, "Say hi"], max_tokens=6,
                                  temperature=0)
single = [client.completions.create(model="base", prompt=p, max_tokens=6,
                                    temperature=0).choices[0].text for p in [prompt, "Say hi"]]
out["n"] = {"a": [c.text for c in a.choices], "b": [c.text for c in b.choices],
            "indices": [c.index for c in a.choices],
            "streamed": [streamed.get(i) for i in range(2)],
            "multi": [c.text for c in multi.choices], "single": single}
# Continuous batching: concurrent requests, each with its own model (base,
# experts, Arrow) and a prompt long enough to be prefilled in chunks, give
# what each gives alone.
long_prompt = " ".join(["The plural of cat is cats."] * 4)  # ~90 tokens: two prefill chunks
jobs = [("base", prompt), (expert, prompt), ("arrow", prompt), ("ad0", long_prompt),
        ("base", long_prompt), ("arrow", long_prompt), ("ad2", prompt), (expert, long_prompt)]


def complete(job):
    m, p = job
    return client.completions.create(model=m, prompt=p, max_tokens=12,
                                     temperature=0).choices[0].text


alone = [complete(j) for j in jobs]
with cf.ThreadPoolExecutor(len(jobs)) as ex:
    together = list(ex.map(complete, jobs * 3))
# Explanations in a batch: each sequence gets its own tokens' experts.
def explained(p):
    r = client.completions.create(model="arrow", prompt=p, max_tokens=6, temperature=0,
                                  extra_body={"quiver_explain": "layers", "top_k": 2})
    return (r.choices[0].model_extra or {}).get("quiver_explain")


ex_prompts = [prompt, long_prompt, "Say hi", "Two plus two is"]
ex_alone = [explained(p) for p in ex_prompts]
with cf.ThreadPoolExecutor(len(ex_prompts)) as ex:
    ex_together = list(ex.map(explained, ex_prompts * 2))
out["batching"] = {"alone": alone, "together": together, "explain_alone": ex_alone,
                   "explain_together": ex_together}
# Prometheus metrics, after all of the above.
import urllib.request
out["metrics"] = urllib.request.urlopen(base_url.removesuffix("/v1") + "/metrics").read().decode()
print(json.dumps(out))
