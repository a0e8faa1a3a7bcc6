#!/usr/bin/env python3
"""Turn Quiver's own export of olmo tasks into the inputs of both sides.

    prepare.py EXPORT.jsonl OUT_DIR --limit N --seed S

EXPORT.jsonl is `quiver data export --source olmo --tasks T:validation,...
--split all --cap 0`: every item of each task's validation file, as
`quiver eval --tasks T` loads it (source, options, answer and, for partial
scoring such as WinoGrande, scored_suffix). Its order is the export's
(train, validation and test parts of Quiver's seeded 80/10/10 shuffle, which
with --cap 0 together hold every item), not the file's, so a --limit subset
here is a seeded sample of the same items but not the subset that
`quiver eval --limit N` would pick; an item's scores do not depend on which
other items are evaluated.

Writes under OUT_DIR:

* items.jsonl: the chosen items in Quiver's --data format (task renamed to
  a safe name), which `quiver eval --data items.jsonl --split all` scores
  in file order, so Quiver's item i is the i-th item of its task here;
* lmeval_tasks/<name>.yaml + <name>.jsonl: one lm-eval task per Quiver task
  whose requests are Quiver's (context, continuation) pairs, character for
  character (target_delimiter "" and the leading space Quiver adds already
  in each continuation);
* tasks.json: per task, the original name, safe name, lm-eval task name,
  item count and whether it uses partial scoring.

The (context, continuation) texts are built as Quiver builds them
(quiver-core eval::option_texts and data::Example::continuation): an option
o is scored as the continuation of the source, preceded by one space unless
the source is empty or ends in whitespace or o starts with whitespace; with
a scored_suffix, the context is source + continuation(head) and only the
suffix is scored.
"""
import argparse
import json
import os
import random
import re
import sys
from collections import OrderedDict


def continuation(source, text):
    if not source or source[-1].isspace() or (text and text[0].isspace()):
        return text
    return " " + text


def option_texts(ex):
    out = []
    suffix = ex.get("scored_suffix")
    for o in ex["options"]:
        if suffix and o.endswith(suffix) and len(o) > len(suffix):
            head = o[: len(o) - len(suffix)]
            out.append((ex["source"] + continuation(ex["source"], head), suffix))
        else:
            out.append((ex["source"], continuation(ex["source"], o)))
    return out


def safe_name(task):
    name = task[: -len(":validation")] if task.endswith(":validation") else task
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


YAML_PLAIN = """task: {lm_task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: gold
target_delimiter: ""
num_fewshot: 0
metric_list:
  - metric: acc
  - metric: acc_norm
metadata:
  version: 1.0
"""

# Partial scoring: doc_to_text returns the gold index (an int), which makes
# lm-eval build one request per context (doc_to_choice) with the shared
# continuation (doc_to_target), as its own winogrande task does.
YAML_PARTIAL = """task: {lm_task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: gold
doc_to_choice: contexts
doc_to_target: suffix
target_delimiter: ""
num_fewshot: 0
metric_list:
  - metric: acc
  - metric: acc_norm
metadata:
  version: 1.0
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("export")
    ap.add_argument("out")
    ap.add_argument("--limit", type=int, default=0, help="items per task (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    by_task = OrderedDict()
    with open(a.export) as f:
        for line in f:
            if line.strip():
                ex = json.loads(line)
                by_task.setdefault(ex["task"], []).append(ex)
    if not by_task:
        sys.exit("prepare.py: the export holds no items")

    out = os.path.abspath(a.out)
    tdir = os.path.join(out, "lmeval_tasks")
    os.makedirs(tdir, exist_ok=True)
    meta = []
    with open(os.path.join(out, "items.jsonl"), "w") as items_f:
        for task, exs in by_task.items():
            if any(not ex.get("options") for ex in exs):
                sys.exit(f"prepare.py: task {task} has items without options: not multiple choice")
            partial = any(ex.get("scored_suffix") for ex in exs)
            idx = list(range(len(exs)))
            if partial:
                # lm-eval scores a task one way: items without a shared
                # suffix cannot join the multiple-input form.
                plain = [i for i in idx if not exs[i].get("scored_suffix")]
                if plain:
                    print(f"{task}: {len(plain)} item(s) without scored_suffix left out", file=sys.stderr)
                idx = [i for i in idx if exs[i].get("scored_suffix")]
            if a.limit and a.limit < len(exs):
                rng = random.Random(f"{a.seed}:{task}")
                idx = sorted(rng.sample(idx, a.limit))
            name = safe_name(task)
            lm_task = f"quiver_{name}"
            data = os.path.join(tdir, f"{name}.jsonl")
            with open(data, "w") as df:
                for k, i in enumerate(idx):
                    ex = dict(exs[i])
                    texts = option_texts(ex)
                    rec = {"item": k, "index": i, "gold": ex["answer"]}
                    if partial:
                        suffixes = {c for _, c in texts}
                        if len(suffixes) != 1:
                            sys.exit(
                                f"prepare.py: {task} item {i}: partial scoring needs one shared suffix"
                            )
                        rec["contexts"] = [c for c, _ in texts]
                        rec["suffix"] = suffixes.pop()
                    else:
                        contexts = {c for c, _ in texts}
                        assert len(contexts) == 1
                        rec["context"] = texts[0][0]
                        rec["choices"] = [c for _, c in texts]
                    df.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    q = {k2: ex[k2] for k2 in ("source", "target", "options", "answer", "scored_suffix") if k2 in ex}
                    q["task"] = name
                    items_f.write(json.dumps(q, ensure_ascii=False) + "\n")
            with open(os.path.join(tdir, f"{name}.yaml"), "w") as yf:
                yf.write((YAML_PARTIAL if partial else YAML_PLAIN).format(lm_task=lm_task, data=json.dumps(data)))
            meta.append(
                {
                    "task": task,
                    "name": name,
                    "lm_task": lm_task,
                    "items": len(idx),
                    "available": len(exs),
                    "partial": partial,
                }
            )
            print(f"{task}: {len(idx)} of {len(exs)} items -> {lm_task}{' (partial scoring)' if partial else ''}")
    with open(os.path.join(out, "tasks.json"), "w") as f:
        json.dump({"limit": a.limit, "seed": a.seed, "tasks": meta}, f, indent=2)


if __name__ == "__main__":
    main()
