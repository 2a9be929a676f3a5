"""Zero-shot accuracy through lm-evaluation-harness, on a local multiple-choice task, checked
against a hand computation of the same log-likelihood ranking."""

import json

import pytest
import torch

from perplib.evaluation import zero_shot
from perplib.models import load_model

DOCS = [
    ("The capital of France is", ["Paris", "Berlin", "Rome"], 0),
    ("Two plus two equals", ["four", "five"], 0),
    ("The sky on a clear day is", ["green", "blue"], 1),
    ("Water freezes at zero degrees", ["Celsius", "Kelvin", "Fahrenheit"], 0),
    ("A triangle has", ["three sides", "four sides"], 0),
    ("The largest planet is", ["Mars", "Jupiter"], 1),
]


def local_task(folder):
    data = folder / "toy.jsonl"
    data.write_text("\n".join(json.dumps({"q": q, "choices": c, "label": y}) for q, c, y in DOCS))
    (folder / "toy.yaml").write_text(
        f"task: perplib_toy\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n"
    )


def hand_accuracy(model, tokenizer):
    correct = 0
    for question, choices, label in DOCS:
        context = tokenizer(question)["input_ids"]
        scores = []
        for choice in choices:
            whole = tokenizer(question + " " + choice)["input_ids"]  # lm-eval's default target delimiter
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].double(), -1)
            scores.append(sum(logp[t - 1, whole[t]].item() for t in range(len(context), len(whole))))
        correct += int(max(range(len(choices)), key=scores.__getitem__) == label)
    return correct / len(DOCS)


def test_zero_shot_matches_hand_computation(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    local_task(tmp_path)
    model, tokenizer = load_model("tiny-llama")
    local = {"include_path": str(tmp_path), "include_defaults": False}
    out = zero_shot(model, tokenizer, ["perplib_toy"], batch_size=2, **local)
    assert out["zero_shot"]["perplib_toy"] == pytest.approx(hand_accuracy(model, tokenizer))
    assert out["zero_shot_mean"] == out["zero_shot"]["perplib_toy"]
    with pytest.raises(ValueError, match="unknown lm-eval task"):
        zero_shot(model, tokenizer, ["no_such_task_xyz"], **local)
