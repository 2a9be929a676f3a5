"""The dry run: every notebook with a profile's grids, settings and code paths, with only the
heavy things substituted, through this one mapping.

    python -m perplib.reproduce --profile paper --dry-run      # what `make dry-run` and CI run

The dry run is switched on by the environment variable ``PERPLIB_DRY_RUN`` (a folder for the
fixtures; ``--dry-run`` sets it, the notebook kernels inherit it). Nothing else changes: the
notebooks, the experiment functions and the loaders run exactly as for the real profile, and the
substitutions happen where names are resolved:

- **model ids** (:func:`resolve_model`, called by ``models.load_model`` and
  ``experiments.validate``): a paper model id becomes a local checkpoint folder holding a tiny
  random model of the same family (:data:`MODEL_FAMILIES`), loaded through the same
  ``from_pretrained`` path as the real one; an id the mapping does not cover is an error naming it;
- **hub datasets** (:func:`hub_dataset`, called by ``data`` and, for lm-eval, :func:`lm_eval_tasks`):
  ``allenai/c4`` becomes a folder with the same ``en/c4-*.json.gz`` shards, ``wikitext`` a folder in
  the hub's parquet layout with the ``wikitext-2-raw-v1`` config, and the seven zero-shot tasks read
  lm-eval's own task definitions with their ``dataset_path`` pointed at local copies in the hub
  layout (same columns, same splits);
- **sizes** (:func:`cut_parameters`, called by ``reproduce`` on each notebook's parameters): steps,
  epochs, windows, calibration samples, sequence length and grids are cut (:data:`CUTS`); the
  vision model becomes ``resnet-tiny`` (a ResNet) and the ImageNet root a small ImageFolder tree.

Fixtures are generated deterministically on first use (seconds; nothing large is committed) from
data that ships with the environment: text from the embedded wiki-vital articles (© Wikipedia
contributors, CC BY-SA 4.0) and images from scikit-learn's digits (UCI ML hand-written digits,
CC BY 4.0). They carry no meaning: a dry run proves that the code paths run, not what they give.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENV = "PERPLIB_DRY_RUN"
FIXTURES_VERSION = "3"  # bump when a fixture's content or layout changes (the stamp forces a rebuild)

# Paper model id (full match) -> tiny family of perplib.models.TINY_FAMILIES.
MODEL_FAMILIES: tuple[tuple[str, str], ...] = (
    (r"facebook/opt-\d+(\.\d+)?[bm]", "opt"),
    (r"meta-llama/Llama-2-\d+b(-hf)?", "llama"),
    (r"mistralai/Mistral-7B(-v0\.\d)?", "mistral"),
    (r"mistralai/Mixtral-8x7B(-v0\.\d)?", "mixtral"),
)
# Vision model -> the small ResNet of the same family (the paper's ResNet-50 takes minutes per
# epoch on a CPU even on a handful of images).
VISION_MODELS = {"resnet50": "resnet-tiny", "resnet18": "resnet-tiny", "resnet-small": "resnet-tiny"}
TINY_CONTEXT = 256  # max_position_embeddings of the tiny checkpoints
SEQLEN = 64
CACHE = ".cache/datasets"  # inside the fixtures folder: rebuilt with them
# The zero-shot tasks of Table 11 and the hub dataset each one reads.
LM_EVAL_DATASETS = {
    "boolq": ("aps/super_glue", "super_glue/boolq/default.yaml"),
    "rte": ("nyu-mll/glue", "glue/rte/default.yaml"),
    "hellaswag": ("Rowan/hellaswag", "hellaswag/hellaswag.yaml"),
    "winogrande": ("allenai/winogrande", "winogrande/default.yaml"),
    "arc_easy": ("allenai/ai2_arc", "arc/arc_easy.yaml"),
    "arc_challenge": ("allenai/ai2_arc", "arc/arc_challenge.yaml"),
    "openbookqa": ("allenai/openbookqa", "openbookqa/openbookqa.yaml"),
}
HUB_DATASETS = ("allenai/c4", "wikitext", *sorted({d for d, _ in LM_EVAL_DATASETS.values()}))


def _first_last(values: list) -> list:
    return list(values) if len(values) <= 2 else [values[0], values[-1]]


def _sparsities(values: list) -> list:
    """First and last unstructured ratio plus the first N:M pattern, in the profile's order."""
    ratios = [v for v in values if ":" not in str(v)]
    patterns = [v for v in values if ":" in str(v)]
    keep = {str(v) for v in _first_last(ratios) + patterns[:1]}
    return [v for v in values if str(v) in keep]


def _one_per_family(ids: list) -> list:
    """The first id of each model family (sizes of one family run the same code)."""
    seen, out = set(), []
    for name in ids:
        family = model_family(name) or name
        if family not in seen:
            seen.add(family)
            out.append(name)
    return out


def _at_most(n: int) -> Callable[[Any], Any]:
    return lambda v: v if v is None else min(v, n)


def _retraining(v: dict[str, Any]) -> dict[str, Any]:
    """The LLM run plan (perplib.plan): 2 steps, evaluation every step, one candidate rate per method."""
    out = dict(v, steps=min(v["steps"], 2), eval_every=min(v.get("eval_every", 0), 1))
    if sel := v.get("selection"):
        grid = {m: list(rates)[:1] for m, rates in (sel.get("grid") or {}).items()}
        out["selection"] = dict(sel, steps=min(sel.get("steps", 2), 2), grid=grid)
    return out


# Parameter name -> how a dry run cuts its value. Names not listed keep the profile's value,
# except integers whose name ends in "steps" (at most 2) or "epochs" (at most 1).
CUTS: dict[str, Callable[[Any], Any]] = {
    "seqlen": _at_most(SEQLEN),
    "windows": _at_most(4),  # None (every window) stays: the fixture's test split is ~100 windows
    "nsamples": _at_most(4),
    "eval_every": _at_most(1),
    "retraining": _retraining,
    "models": _one_per_family,
    "full_models": _one_per_family,
    "sparsities": _sparsities,
    "perp_sparsities": _sparsities,
    "seeds": lambda v: list(v)[:1],
    "ranks": _first_last,
    "alphas": _first_last,
    "perp_ranks": _first_last,
    "cycles": lambda v: list(v)[:1],
    "retrain_epochs": lambda v: [min(v[0], 1)],
    "epochs_per_cycle": _at_most(1),
    "recal_batches": _at_most(2),
    "recon_nsamples": _at_most(4),
    "long_sparsities": _sparsities,  # vision: the sparsities that also get the long retraining
    "feature_images": _at_most(4),  # vision: images behind Figure 1's similarity
}


# -- activation and resolution ------------------------------------------------------------------


def active() -> bool:
    return bool(os.environ.get(ENV))


def root() -> Path:
    """The fixtures folder of the active dry run, generated on first use."""
    value = os.environ.get(ENV)
    if not value:
        raise RuntimeError(f"no dry run is active (set {ENV} to a fixtures folder)")
    return ensure_fixtures(Path(value).expanduser())


def model_family(name: str) -> str | None:
    """The tiny family a paper model id maps to, or None when the mapping does not cover it."""
    for pattern, family in MODEL_FAMILIES:
        if re.fullmatch(pattern, name):
            return family
    return None


def _passes_through(name: str) -> bool:
    from .models import EMBEDDED

    return name.startswith("tiny-") or name == EMBEDDED or Path(name).expanduser().exists()


def uncovered_model(name: str) -> ValueError:
    covered = ", ".join(f"{p} -> tiny-{f}" for p, f in MODEL_FAMILIES)
    return ValueError(
        f"model id {name!r} is not covered by the dry-run mapping (perplib/dryrun.py MODEL_FAMILIES: {covered}); "
        "add its family there or use a covered id"
    )


def resolve_model(name: str) -> str:
    """The model to load for ``name``: itself, or in a dry run the tiny checkpoint folder of its family."""
    if not active() or _passes_through(name):
        return name
    family = model_family(name)
    if family is None:
        raise uncovered_model(name)
    return str(root() / "models" / family)


def hub_dataset(dataset_id: str) -> dict[str, str]:
    """The arguments of ``datasets.load_dataset`` that locate a hub dataset: its id, or in a dry run
    its local copy and a cache of its own (``datasets`` keys local folders by name, not content, so
    the shared cache would hand a stale or fake copy to the next caller)."""
    if not active():
        return {"path": dataset_id}
    if dataset_id not in HUB_DATASETS:
        raise ValueError(f"hub dataset {dataset_id!r} is not covered by the dry-run mapping; covered: {HUB_DATASETS}")
    base = root()
    return {"path": str(base / "hub" / dataset_id), "cache_dir": str(base / CACHE)}


def lm_eval_tasks() -> str:
    """Folder of lm-eval task files for a dry run: each of Table 11's tasks is lm-eval's own
    definition (included from the installed package) with ``dataset_path`` pointed at the local
    copy. Written at each call, since both locations are absolute paths."""
    import lm_eval

    installed, base = Path(lm_eval.__file__).parent / "tasks", root()
    folder = base / "lm_eval_tasks"
    folder.mkdir(exist_ok=True)
    for task, (repo, definition) in LM_EVAL_DATASETS.items():
        text = (f"include: {installed / definition}\ntask: {task}\ndataset_path: {base / 'hub' / repo}\n"
                f"dataset_kwargs:\n  cache_dir: {base / CACHE}\n")  # fmt: skip
        target = folder / f"{task}.yaml"
        if not target.is_file() or target.read_text() != text:
            target.write_text(text)
    return str(folder)


# -- parameters -----------------------------------------------------------------------------------


def _model_values(params: dict[str, Any]) -> list[tuple[str, str]]:
    """(parameter, value) for every model name in a notebook's parameters."""
    out = []
    for key, value in params.items():
        if key == "model" or key.endswith(("_model", "models")):
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, str):
                    out.append((key, v))
    return out


def check_parameters(notebook: str, params: dict[str, Any]) -> None:
    """Fail early on a model id of ``notebook`` that the mapping does not cover."""
    vision = set(VISION_MODELS) | set(VISION_MODELS.values())
    for key, name in _model_values(params):
        if name in vision or _passes_through(name) or model_family(name):
            continue
        raise ValueError(f"{notebook}, parameter {key!r}: {uncovered_model(name)}")


def cut_parameters(notebook: str, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, tuple[Any, Any]]]:
    """A notebook's parameters for the dry run and what changed (name -> (profile value, dry-run value))."""
    check_parameters(notebook, params)
    out = dict(params)
    for key, value in params.items():
        if key in CUTS:
            out[key] = CUTS[key](value)
        elif isinstance(value, int) and not isinstance(value, bool) and key.endswith("steps"):
            out[key] = min(value, 2)
        elif isinstance(value, int) and not isinstance(value, bool) and key.endswith("epochs"):
            out[key] = min(value, 1)
    if out.get("model") in VISION_MODELS:
        out["model"] = VISION_MODELS[out["model"]]
    if out.get("data") == "imagenet":
        out["data_root"] = str(root() / "imagenet")
    if out.get("device") == "cuda":
        import torch

        out["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    return out, {k: (params[k], v) for k, v in out.items() if params[k] != v}


# -- fixtures -------------------------------------------------------------------------------------


def ensure_fixtures(folder: Path) -> Path:
    """Generate the fixtures into ``folder`` unless a complete set of this version is there
    (built in a temporary folder and renamed, so an interrupted build is redone)."""
    stamp = folder / "FIXTURES"
    if stamp.is_file() and stamp.read_text().strip() == FIXTURES_VERSION:
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        _write_fixtures(tmp)
        (tmp / "FIXTURES").write_text(FIXTURES_VERSION + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _write_fixtures(out: Path) -> None:
    from .data import documents

    train, held_out = documents("wiki-vital", "train")[:160], documents("wiki-vital", "eval")[:24]
    (out / "README.md").write_text(
        "Dry-run fixtures (generated by perplib.dryrun; not data to learn from).\n"
        "Text: lead sections of Wikipedia's vital articles, (c) Wikipedia contributors, CC BY-SA 4.0.\n"
        "Images: scikit-learn's digits (UCI ML hand-written digits), CC BY 4.0.\n"
    )
    tokenizer = byte_tokenizer()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Writing model shards" bar per checkpoint otherwise
    try:
        for family in sorted({f for _, f in MODEL_FAMILIES}):
            _tiny_checkpoint(out / "models" / family, family, tokenizer)
    finally:
        hf_logging.enable_progress_bar()
    _c4(out / "hub" / "allenai" / "c4", train[:120], held_out[8:])
    _wikitext(out / "hub" / "wikitext", train[120:], held_out)
    _lm_eval(out, held_out)
    _image_folder(out / "imagenet")


def byte_tokenizer():
    """A byte-level tokenizer (256 bytes + 3 special tokens, BOS prepended as LLaMA's and OPT's
    tokenizers do): deterministic, no training, and a vocabulary small enough that the tiny
    models' head costs nothing."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}  # a set: sort it
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _tiny_checkpoint(folder: Path, family: str, tokenizer) -> None:
    from .models import tiny_model

    model = tiny_model(family, vocab_size=len(tokenizer), max_positions=TINY_CONTEXT)
    model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id = 0, 1, 2
    model.generation_config.pad_token_id = 0
    model.generation_config.bos_token_id, model.generation_config.eos_token_id = 1, 2
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def _gzip_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = "".join(json.dumps(r) + "\n" for r in rows).encode()
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
        f.write(blob)


def _c4(folder: Path, train: list[str], validation: list[str]) -> None:
    """The two shards the reference code reads, in C4's json.gz layout (text, timestamp, url)."""

    def rows(docs, split):
        return [{"text": d, "timestamp": "2019-04-25T12:00:00Z", "url": f"https://example.org/{split}/{i}"}
                for i, d in enumerate(docs)]  # fmt: skip

    _gzip_jsonl(folder / "en" / "c4-train.00000-of-01024.json.gz", rows(train, "train"))
    _gzip_jsonl(folder / "en" / "c4-validation.00000-of-00008.json.gz", rows(validation, "validation"))


def _hub_repo(folder: Path, configs: dict[str, dict[str, list[dict]]]) -> None:
    """A dataset folder in the hub's parquet layout: ``<config>/<split>-00000-of-00001.parquet``
    and a README whose ``configs`` metadata ``load_dataset(folder, config)`` reads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = ["---", "configs:"]
    for config, splits in configs.items():
        lines += [f"- config_name: {config}", "  data_files:"]
        for split, rows in splits.items():
            target = folder / config / f"{split}-00000-of-00001.parquet"
            target.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(rows), target)
            lines += [f"  - split: {split}", f"    path: {config}/{split}-*"]
    (folder / "README.md").write_text("\n".join([*lines, "---", "Dry-run fixture (perplib.dryrun).", ""]))


def _wikitext_lines(docs: list[str]) -> list[dict]:
    """WikiText's raw line format: ' = Title = ' headings, paragraphs, empty lines."""
    rows = []
    for doc in docs:
        title, _, body = doc.partition("\n\n")
        rows += [{"text": ""}, {"text": f" = {title} = \n"}, {"text": ""}]
        rows += [{"text": f" {p.strip()} \n"} for p in body.split("\n") if p.strip()]
    return rows


def _wikitext(folder: Path, train: list[str], held_out: list[str]) -> None:
    # a short test split (~100 windows of 64 tokens), so the paper's "every window" is kept
    splits = {"train": _wikitext_lines(train), "validation": _wikitext_lines(held_out[8:16]),
              "test": _wikitext_lines(held_out[:4])}  # fmt: skip
    _hub_repo(folder, {"wikitext-2-raw-v1": splits})


def _lm_eval(out: Path, docs: list[str]) -> None:
    """Local copies of the seven zero-shot datasets in the hub layout, with their real columns
    (:func:`lm_eval_tasks` points lm-eval's task definitions at them)."""
    titles = [d.partition("\n\n")[0] for d in docs]
    bodies = [" ".join(d.partition("\n\n")[2].split())[:160] for d in docs]
    n = 8
    pick = lambda i, k: [titles[(i + j) % len(titles)] for j in range(k)]  # noqa: E731
    labels = ["A", "B", "C", "D"]

    def mc(i, key):  # ARC / OpenBookQA: the right title (titles[i]) sits at position i % 4
        texts = pick(i, 4)
        texts[0], texts[i % 4] = texts[i % 4], texts[0]
        return {"id": f"q{i}", key: f"Which article begins: {bodies[i][:60]}?",
                "choices": {"text": texts, "label": labels}, "answerKey": labels[i % 4]}  # fmt: skip

    split3 = lambda make: {s: [make(i) for i in range(n)] for s in ("train", "validation", "test")}  # noqa: E731
    repos = {
        "aps/super_glue": {"boolq": {s: [{"question": f"is this about {titles[i].lower()}", "passage": bodies[i],
                                          "idx": i, "label": i % 2} for i in range(n)]
                                     for s in ("train", "validation")}},
        "nyu-mll/glue": {"rte": {s: [{"sentence1": bodies[i], "sentence2": f"This text is about {titles[i]}.",
                                      "label": i % 2, "idx": i} for i in range(n)] for s in ("train", "validation")}},
        "Rowan/hellaswag": {"default": split3(lambda i: {
            "ind": i, "activity_label": titles[i], "ctx_a": bodies[i][:80], "ctx_b": "then", "ctx": bodies[i][:80],
            "endings": [bodies[(i + j) % len(bodies)][80:140] for j in range(4)], "source_id": f"s{i}",
            "split": "val", "split_type": "indomain", "label": str(i % 4)})},
        "allenai/winogrande": {"winogrande_xl": split3(lambda i: {
            "sentence": f"{bodies[i][:80]} _ is the subject of this text.", "option1": titles[i],
            "option2": titles[(i + 1) % len(titles)], "answer": "1" if i % 2 == 0 else "2"})},
        "allenai/ai2_arc": {c: split3(lambda i: mc(i, "question")) for c in ("ARC-Easy", "ARC-Challenge")},
        "allenai/openbookqa": {"main": split3(lambda i: mc(i, "question_stem"))},
    }  # fmt: skip
    for repo, configs in repos.items():
        _hub_repo(out / "hub" / repo, configs)


def _image_folder(folder: Path, classes: int = 3, train_per_class: int = 3, val_per_class: int = 1) -> None:
    """An ImageFolder tree (``train/<class>/*.png``, ``val/<class>/*.png``) of 32x32 RGB digits."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for c in range(classes):
        images = digits.images[digits.target == c][: train_per_class + val_per_class]
        for i, img in enumerate(images):
            split = "train" if i < train_per_class else "val"
            pixels = np.kron(img / 16.0 * 255, np.ones((4, 4))).astype(np.uint8)
            target = folder / split / f"n{c:08d}" / f"{i:03d}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.stack([pixels] * 3, axis=-1)).save(target)
