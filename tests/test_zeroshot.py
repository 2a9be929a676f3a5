"""perplib's offline lm-eval task: deterministic items from held-out articles, lm-eval's format."""

import json
from pathlib import Path

from perplib import zeroshot

ARTICLES = [
    f"Title {i}\n\nFirst sentence of article {i}. Second sentence here, number {i}. "
    f"The true next sentence of article {i} is this one. A fourth sentence of {i} follows."
    for i in range(6)
]


def test_sentences_split_at_capitals():
    assert zeroshot.sentences("A b. C d! e f. G?") == ["A b.", "C d! e f.", "G?"]


def test_items_are_deterministic_two_way_and_hold_the_true_next_sentence():
    items = zeroshot.next_sentence_items(ARTICLES, n=4, seed=0)
    assert items == zeroshot.next_sentence_items(ARTICLES, n=4, seed=0) and len(items) == 4
    for item in items:
        i = item["context"].split(".")[0].split()[-1]
        true = item["choices"][item["label"]]
        assert true == f"The true next sentence of article {i} is this one."
        assert (
            f"article {i}" not in item["choices"][1 - item["label"]]
            and f" {i}" not in item["choices"][1 - item["label"]][-4:]
        )
        assert item["context"] == f"Title {i}. First sentence of article {i}. Second sentence here, number {i}."


def test_task_folder_is_lm_eval_format(tmp_path):
    import yaml

    folder = Path(zeroshot.task_folder(tmp_path))
    spec = yaml.safe_load((folder / f"{zeroshot.NEXT_SENTENCE}.yaml").read_text())
    assert spec["task"] == zeroshot.NEXT_SENTENCE and spec["output_type"] == "multiple_choice"
    rows = [json.loads(line) for line in Path(spec["dataset_kwargs"]["data_files"]["test"]).read_text().splitlines()]
    assert len(rows) == zeroshot.ITEMS and {r["label"] for r in rows} == {0, 1}
    assert all(len(r["choices"]) == 2 for r in rows)
