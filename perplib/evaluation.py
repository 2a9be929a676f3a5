"""Evaluation: perplexity over non-overlapping windows (Section 2.3) and zero-shot accuracy
through EleutherAI's lm-evaluation-harness (Appendix B.3, Table 11)."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

_MAX_EXP = math.log(1.7976931348623157e308)  # the largest float's log: exp of more overflows


def perplexity(
    model, ids: torch.Tensor, seqlen: int, windows: int | None = None, batch_size: int = 4, bos_id: int | None = None
) -> dict[str, float | int]:
    """Perplexity of ``model`` on a 1-D token stream cut into non-overlapping windows of ``seqlen``
    tokens (the trailing remainder is dropped, as in the Wanda/SparseGPT reference code); with
    ``windows``, only the first ``windows`` of them. ``exp`` of the mean next-token NLL over all
    predicted tokens, which equals the reference's mean of per-window losses since all windows
    have the same length. With ``bos_id`` (``--bos window``), each window is that BOS followed by
    ``seqlen - 1`` tokens of the stream, as the model's own tokenizer feeds a text to it."""
    if ids.ndim != 1:
        raise ValueError(f"ids must be a 1-D token stream, got shape {tuple(ids.shape)}")
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2, got {seqlen}")
    if windows is not None and windows < 1:
        raise ValueError(f"windows must be >= 1 (or None for all), got {windows}")
    step = seqlen - 1 if bos_id is not None else seqlen  # text tokens per window
    available = ids.numel() // step
    if available == 0:
        raise ValueError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    n = available if windows is None else min(windows, available)
    from .offload import input_device

    device = input_device(model)  # a device-mapped model's hooks move the batch on from there
    chunks = ids[: n * step].view(n, step)
    if bos_id is not None:
        from .data import with_bos

        chunks = with_bos(chunks, bos_id)
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, n, batch_size):
            batch = chunks[i : i + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            nll += F.cross_entropy(
                logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum"
            ).item()
            count += batch[:, 1:].numel()
    model.train(was_training)
    elapsed = time.perf_counter() - start
    return {
        "perplexity": math.exp(nll / count) if nll / count < _MAX_EXP else math.inf,  # inf, not OverflowError
        "nll": nll / count,
        "tokens": n * seqlen,
        "windows": n,
        "windows_available": available,
        "eval_tokens_per_s": n * seqlen / elapsed if elapsed > 0 else float("nan"),
    }


ZERO_SHOT_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


def zero_shot(
    model,
    tokenizer,
    tasks: tuple[str, ...] | list[str] = ZERO_SHOT_TASKS,
    *,
    batch_size: int = 8,
    limit: int | None = None,
    include_path: str | None = None,
    include_defaults: bool = True,
) -> dict:
    """Zero-shot accuracy with EleutherAI's lm-evaluation-harness on an in-memory model, as in
    Table 11 (BoolQ, RTE, HellaSwag, WinoGrande, ARC-e, ARC-c, OpenBookQA by default; their data
    comes from the Hugging Face hub). ``include_path`` adds a folder of local task YAML files;
    ``include_defaults=False`` skips indexing lm-eval's own tasks (much faster for local ones).
    Returns per-task accuracy and their mean."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError("zero-shot evaluation needs lm-eval: pip install lm-eval") from e
    tasks = list(tasks)
    if not tasks:
        raise ValueError("tasks must name at least one lm-eval task")
    from . import dryrun
    from .zeroshot import LOCAL_TASKS, task_folder

    if include_path is None and set(tasks) <= set(LOCAL_TASKS):  # perplib's own offline task(s)
        include_path, include_defaults = task_folder(), False
    elif dryrun.active() and include_path is None:  # the same task definitions, reading local copies
        include_path, include_defaults = dryrun.lm_eval_tasks(), False
    manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {unknown}; e.g. {list(ZERO_SHOT_TASKS)}")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=manager, log_samples=False)
    acc = {t: float(out["results"][t]["acc,none"]) for t in tasks}
    return {"zero_shot": acc, "zero_shot_mean": sum(acc.values()) / len(acc)}
