"""perplib's own lm-evaluation-harness task for offline zero-shot accuracy (Table 11 stand-in).

``wiki_vital_next_sentence``: a two-way multiple-choice cloze built from the *held-out* wiki-vital
articles (the evaluation split; never trained on). The context is an article's title and first
sentences; the choices are its true next sentence and a sentence of similar length from another
held-out article. lm-eval scores each choice by its log-likelihood after the context (``acc``);
chance is 50%. The task is written in lm-eval's own format (a YAML file and a JSONL data file) and
run by lm-eval itself (:func:`perplib.evaluation.zero_shot`); the items are deterministic.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

NEXT_SENTENCE = "wiki_vital_next_sentence"
LOCAL_TASKS = {NEXT_SENTENCE: 0.5}  # task -> chance accuracy
ITEMS = 120
CONTEXT_SENTENCES = 2
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def sentences(text: str) -> list[str]:
    """Split a paragraph into sentences at '.', '!' or '?' followed by space and a capital letter."""
    return [s.strip() for s in _SENTENCE.split(text.strip()) if s.strip()]


def next_sentence_items(articles: list[str], n: int = ITEMS, seed: int = 0) -> list[dict]:
    """Items ``{"context", "choices", "label"}`` from articles ('title\\n\\ntext'): the first
    ``CONTEXT_SENTENCES`` sentences as context, the true next sentence and the sentence of another
    article closest to it in length (ties: the first) as the two choices, order seeded."""
    rng = random.Random(seed)
    parsed = []
    for a in articles:
        title, _, body = a.partition("\n\n")
        s = sentences(body.replace("\n", " "))
        if len(s) > CONTEXT_SENTENCES and 20 <= len(s[CONTEXT_SENTENCES]) <= 300:
            parsed.append((title, s))
    if len(parsed) < 2:
        raise ValueError(f"need at least two articles with more than {CONTEXT_SENTENCES} sentences, got {len(parsed)}")
    chosen = rng.sample(range(len(parsed)), min(n, len(parsed)))
    items = []
    for i in chosen:
        title, s = parsed[i]
        true = s[CONTEXT_SENTENCES]
        others = [t for j, (_, ss) in enumerate(parsed) if j != i for t in ss[1:] if 20 <= len(t) <= 300]
        start = rng.randrange(len(others))
        window = others[start:] + others[:start]  # a seeded start, then the closest length
        false = min(window[:400], key=lambda t: abs(len(t) - len(true)))
        label = rng.randrange(2)
        choices = [true, false] if label == 0 else [false, true]
        items.append({"context": f"{title}. " + " ".join(s[:CONTEXT_SENTENCES]), "choices": choices, "label": label})
    return items


TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def task_folder(folder: str | Path | None = None) -> str:
    """Write the local task (YAML + JSONL) into ``folder`` (default: perplib's cache) and return it."""
    from . import data, paths
    from .report import write_if_changed

    folder = Path(folder) if folder is not None else paths.cache_dir() / "lm_eval_tasks"
    folder.mkdir(parents=True, exist_ok=True)
    items = next_sentence_items(data.documents("wiki-vital", "eval"))
    jsonl = folder / f"{NEXT_SENTENCE}.jsonl"
    write_if_changed(jsonl, "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items).encode())
    write_if_changed(folder / f"{NEXT_SENTENCE}.yaml", TASK_YAML.format(task=NEXT_SENTENCE, data=jsonl).encode())
    return str(folder)
