"""The block-by-block calibration driver shared by every criterion and model family (Section 3.3).

``prune_(model, method, sparsity, calibration)`` prunes every ``nn.Linear`` inside the decoder
blocks to a uniform sparsity (Section 2.3). Magnitude needs neither data nor a forward pass.
Wanda and SparseGPT follow their reference code: the first block's inputs are captured with a
truncated forward; then, block after block, hooks gather input statistics during a pass through
the *dense* block, the block's linears are pruned, and the calibration activations are
propagated through the *pruned* block to become the next block's inputs. Only one block's
activations and statistics exist at a time; the model may stay on the CPU while each block visits
``device``.

Two extension points keep other methods out of the driver: ``counts`` (weights to remove per
layer, e.g. a layer-wise allocation such as OWL, :mod:`perplib.allocation`) and ``hooks``
(:class:`BlockHook`: code that runs on each block before and after it is pruned, e.g. block-wise
reconstruction, :mod:`perplib.reconstruct`). :func:`walk_blocks` is the walk itself, for passes
that gather statistics without pruning.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import offload
from .adapters import (
    ExpertMatrix,
    ReplacedForward,
    adapter_for,
    block_matrices,
    capture_block_inputs,
    matrix,
    routed_experts,
    run_block,
)
from .config import PRUNE_SCOPES
from .criteria import column_norms, hessian, magnitude_scores, select, sparsegpt_prune, wanda_scores
from .sparsity import Sparsity, count_mask

METHODS = ("magnitude", "wanda", "sparsegpt")
CALIBRATED = ("wanda", "sparsegpt")
# scope="auto": each criterion as its reference code compares scores (Wanda per output row,
# magnitude per matrix, SparseGPT per 128-column block of the whole matrix)
_AUTO_PER_ROW = {"magnitude": False, "wanda": True, "sparsegpt": False}


@dataclass(frozen=True)
class PruneReport:
    """What ``prune_`` did: the request (``target``), the achieved ``sparsity`` over all prunable
    weights and per layer (``layers``), and the wall time per phase in seconds (``timings``)."""

    method: str
    target: str
    scope: str
    nsamples: int
    seqlen: int
    device: str
    layers: dict[str, float] = field(repr=False)
    sparsity: float
    pruned: int
    prunable: int
    timings: dict[str, float]
    allocation: dict[str, Any] | None = None  # OWL: m, lam, ratios, block targets and achieved sparsities
    unpruned: list[str] = field(default_factory=list)  # 3-D tensors not read as expert matrices: left dense
    # expert matrices the router sent no calibration token: pruned by magnitude instead (Wanda, SparseGPT)
    magnitude_fallback: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class BlockHook:
    """Code that runs inside the calibration walk on every decoder block: ``start`` once with block
    0's captured inputs, ``before`` on the dense block, ``after`` on the pruned block (before the
    activations are propagated through it). ``inputs`` are the pruned model's activations; a hook
    may change the block's weights in ``after`` (zeros must stay zeros). No-ops by default."""

    def start(self, inputs: list) -> None:
        pass

    def before(self, index: int, block: nn.Module, inputs: list) -> None:
        pass

    def after(self, index: int, block: nn.Module, inputs: list) -> None:
        pass


def resolve_scope(method: str, scope: str) -> bool:
    """``True`` when scores are compared within each output row."""
    if scope not in PRUNE_SCOPES:
        raise ValueError(f"scope must be one of {list(PRUNE_SCOPES)}, got {scope!r}")
    return _AUTO_PER_ROW[method] if scope == "auto" else scope == "row"


def _check_calibration(calibration: Any, method: str) -> torch.Tensor:
    if calibration is None:
        raise ValueError(f"method {method!r} needs calibration token ids [nsamples, seqlen]; got None")
    if not isinstance(calibration, torch.Tensor) or calibration.dtype not in (torch.long, torch.int32, torch.int64):
        raise ValueError(f"calibration must be a LongTensor of token ids [nsamples, seqlen], got {type(calibration)}")
    if calibration.ndim != 2:
        raise ValueError(f"calibration must have shape [nsamples, seqlen], got {tuple(calibration.shape)}")
    if calibration.shape[0] < 1:
        raise ValueError(f"nsamples must be >= 1, got {calibration.shape[0]}")
    if calibration.shape[1] < 1:
        raise ValueError(f"seqlen must be >= 1, got {calibration.shape[1]}")
    return calibration.long()


class _InputStats:
    """Streamed statistics of one linear layer's input, in float32 over ``n`` tokens: the
    per-feature sum of squares ``sum_t x_tj^2`` (Wanda) or ``X^T X = sum_t x_t x_t^T`` (SparseGPT).

    ``X^T X`` is symmetric, so for wide inputs only the upper block triangle of ``chunks x chunks``
    column blocks is accumulated (10/16 of the multiply-adds for 4 chunks); :meth:`value` mirrors it.
    The sum of squares stays ``vector_norm(x, dim=0)**2``: ``x.square().sum(0)`` is ~5x faster on the
    CPU but sums in another order, which flips 0.15% of Wanda's mask on the embedded model (held-out
    perplexity 30.84 -> 30.93) and would make the committed results irreproducible from this code.
    """

    def __init__(self, width: int, device: torch.device, full: bool, chunks: int | None = None) -> None:
        self.n = 0
        self.sequences = 0  # calibration sequences seen: SparseGPT's Hessian is normalised by them
        self.full = full
        self.acc = torch.zeros((width, width) if full else (width,), dtype=torch.float32, device=device)
        chunks = chunks if chunks is not None else (4 if width >= 512 else 1)
        self.bounds = [(i * width) // chunks for i in range(chunks + 1)]

    def add(self, x: torch.Tensor, sequences: int) -> None:
        self.sequences += sequences
        x = x.reshape(-1, x.shape[-1]).float()
        self.n += x.shape[0]
        if not self.full:
            self.acc.add_(torch.linalg.vector_norm(x, 2, dim=0).square_())
            return
        b = self.bounds
        for lo, hi in zip(b[:-1], b[1:], strict=True):
            self.acc[lo:hi, lo:].addmm_(x[:, lo:hi].T, x[:, lo:])

    def value(self) -> torch.Tensor:
        if not self.full or len(self.bounds) == 2:
            return self.acc
        return torch.triu(self.acc) + torch.triu(self.acc, 1).T


class _CalledAfterSkip(Exception):
    """A module of the block ran after the linear whose product the statistics pass skipped."""


# modules that pass their input on unchanged in eval mode: not watched by the statistics pass
_PASSIVE = (nn.Dropout, nn.Identity)


class StatsPass:
    """Forward hooks that gather :class:`_InputStats` of a block's ``linears`` while the block runs
    (a context manager): the statistics pass, or block 0 while its inputs are captured.

    Layers fed the same tensor (q/k/v, gate/up) share one accumulator, so each distinct input is
    reduced once. ``last``: the block-local name of the module the block called last in the first
    batch, when it is one of ``linears`` (down_proj), else ``None``. :meth:`skip` makes that linear
    skip its *product* (its input is recorded, its output replaced by zeros): its output feeds no
    other module, only the block's output, which a statistics pass discards; a block's last matmul
    is ~1/5 of its multiply-adds. Every module call is watched: one after the skipped linear raises
    :class:`_CalledAfterSkip` (:func:`collect_input_stats` then runs the block again without it).
    """

    def __init__(self, block: nn.Module, linears: dict[str, nn.Module], full: bool, device: torch.device) -> None:
        self.block, self.linears, self.full, self.device = block, linears, full, device
        self.stats: dict[str, _InputStats] = {}
        self.skipping: str | None = None
        self._order: list[str] = []  # module calls of the first batch
        self._batches = 0
        self._skipped = False  # the skipped linear ran in this batch
        self._sequences = 0
        self._seen: dict[int, tuple[torch.Tensor, str]] = {}  # id(input) -> (input kept alive, owner)
        self._handles: list = []
        self._first = next(iter(inspect.signature(block.forward).parameters))  # the hidden states

    @property
    def last(self) -> str | None:
        name = self._order[-1] if self._order else None
        # an expert's view runs inside its experts module, in an order the router decides: never skipped
        return name if name in self.linears and not isinstance(self.linears[name], ExpertMatrix) else None

    def _block_starts(self, _module, args, kwargs) -> None:
        hidden = args[0] if args else kwargs[self._first]
        self._sequences = hidden.shape[0]  # a layer may see the sequences flattened
        self._batches += 1
        self._seen.clear()
        self._skipped = False

    def _called(self, name: str) -> None:
        if self._skipped:
            raise _CalledAfterSkip(name)
        if self._batches == 1:
            self._order.append(name)

    def _record(self, name: str, x: torch.Tensor) -> None:
        self._called(name)
        owner = self._seen.get(id(x))
        if owner is not None and owner[0] is x:
            self.stats[name] = self.stats[owner[1]]
        else:
            self._seen[id(x)] = (x, name)
            if name not in self.stats:
                self.stats[name] = _InputStats(x.shape[-1], self.device, self.full)
            self.stats[name].add(x, self._sequences)
        self._skipped = name == self.skipping

    def skip(self, name: str) -> None:
        """From now on, ``name``'s product is not computed (see the class)."""
        module = self.linears[name]
        out_features = matrix(module).shape[0]

        def zeros(x, *_args, **_kwargs):
            return x.new_zeros(*x.shape[:-1], out_features)

        self._handles.append(ReplacedForward(module, zeros))  # removed on exit, as the hooks
        self.skipping = name

    def __enter__(self) -> StatsPass:
        self._handles.append(self.block.register_forward_pre_hook(self._block_starts, with_kwargs=True))
        hooked = {id(m) for m in self.linears.values()}
        own = {id(m) for m in self.block.modules()}
        watched = [(n, m) for n, m in self.block.named_modules() if m is not self.block and not isinstance(m, _PASSIVE)]
        watched += [(n, m) for n, m in self.linears.items() if id(m) not in own]  # views of fused experts
        for name, module in watched:
            if id(module) in hooked:
                hook = functools.partial(lambda n, _m, args: self._record(n, args[0]), name)
            else:
                hook = functools.partial(lambda n, _m, _args: self._called(n), name)
            self._handles.append(module.register_forward_pre_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in reversed(self._handles):
            h.remove()
        self._handles.clear()
        self._seen.clear()


def collect_input_stats(
    block: nn.Module,
    linears: dict[str, nn.Linear],
    inputs: list,
    full: bool,
    device: torch.device,
    learnt: dict[str, Any] | None = None,
) -> dict[str, _InputStats]:
    """One pass through the dense block (:class:`StatsPass`), without the product of the linear the
    block calls last (down_proj): from the second batch on, once the first showed it, or from the
    first when ``learnt['skip']`` names it (learnt on an earlier block: pass the same dict to every
    block of a walk). If a module runs after it, the block is run again without skipping (the
    statistics are those of a plain pass) and ``learnt['skip']`` becomes ``None``: later blocks do
    not try again."""
    learnt = learnt if learnt is not None else {}
    try:
        with StatsPass(block, linears, full, device) as sp:
            known = learnt.get("skip", "")
            if known in linears:
                sp.skip(known)
            for i, inp in enumerate(inputs):
                if i == 1 and sp.skipping is None and known == "" and sp.last is not None:
                    sp.skip(sp.last)
                run_block(block, inp)
        if known == "":
            learnt["skip"] = sp.skipping or sp.last
        return sp.stats
    except _CalledAfterSkip:
        learnt["skip"] = None
        with StatsPass(block, linears, full, device) as sp:
            for inp in inputs:
                run_block(block, inp)
        return sp.stats


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _default_device(model: nn.Module) -> torch.device:
    """Where the model already is if that is a GPU, else the first GPU, else the CPU."""
    home = offload.input_device(model)
    return home if home.type == "cuda" or not torch.cuda.is_available() else torch.device("cuda")


def _in_eval_mode(fn: Callable) -> Callable:
    """Run ``fn(model, ...)`` with every module in eval mode (calibration without dropout: OPT has
    0.1), then give each module back its own previous mode."""

    @functools.wraps(fn)
    def wrapper(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            return fn(model, *args, **kwargs)
        finally:
            for m, training in modes:
                m.training = training

    return wrapper


@_in_eval_mode
@torch.no_grad()
def prune_(
    model: nn.Module,
    method: str,
    sparsity: str | float | Sparsity,
    calibration: torch.Tensor | None = None,
    *,
    scope: str = "auto",
    device: torch.device | str | None = None,
    batch_size: int = 8,
    blocksize: int = 128,
    percdamp: float = 0.01,
    allocation: Any = None,
    outlier_ratios: Sequence[float] | None = None,
    counts: Mapping[str, int] | None = None,
    hooks: Sequence[BlockHook] = (),
) -> PruneReport:
    """Prune every linear layer inside the decoder blocks of ``model`` in place (Section 2.3, 3.3).

    ``method``: ``magnitude`` (no data), ``wanda`` or ``sparsegpt`` (need ``calibration``, token
    ids ``[nsamples, seqlen]``, run ``batch_size`` windows at a time). ``sparsity``: a ratio in
    [0, 1) or ``N:M``. ``scope``: compare scores per output ``row``, per ``matrix``, or ``auto``
    (each criterion's reference default). ``device``: where each block is processed (default:
    CUDA when available); the model itself stays where it is. SparseGPT: ``blocksize`` columns
    per OBS block, damping ``percdamp`` x mean diagonal of ``H = 2XX^T/n`` (``n`` calibration
    sequences). Calibration runs in eval mode; every module's mode is restored afterwards. ``counts``: how many
    weights to remove in each prunable layer (by qualified name, every layer), instead of the uniform
    ``sparsity`` (unstructured only; per-row scopes spread a layer's count over its rows, SparseGPT
    per row rounds it to whole rows). ``hooks``: :class:`BlockHook` objects run on every block
    (they need calibration data, whatever the criterion). ``allocation``: a
    :class:`perplib.allocation.Allocation` (or 'uniform'/'owl'); OWL turns its outlier ratios (measured
    on ``calibration``, or ``outlier_ratios`` from an earlier run) into ``counts``, and the report's
    ``allocation`` says the block targets, achieved sparsities and ratios.
    """
    # ---- validate everything before any heavy work
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    sp = Sparsity.parse(sparsity)
    per_row = resolve_scope(method, scope)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    adapter = adapter_for(model)
    linears = adapter.prunable(model)
    if not linears:
        raise ValueError(
            f"model of type {model.config.model_type!r} has no nn.Linear inside its decoder blocks to prune"
        )
    if fused := adapter.fused_experts(model):  # not a linear layer's matrix: left dense, and said so
        warnings.warn(
            f"{len(fused)} 3-D tensors (e.g. {next(iter(fused))!r}) are not pruned: perplib prunes linear layers "
            "and the experts of transformers' fused experts modules; the report lists them under 'unpruned'",
            stacklevel=2,
        )
    for name, lin in linears.items():
        sp.check_width(matrix(lin).shape[1], name)
    from .allocation import Allocation, block_sparsities
    from .allocation import plan as allocation_plan

    allocation = Allocation(allocation) if isinstance(allocation, str) else allocation or Allocation()
    allocation.check(sp, method, calibrated=calibration is not None or outlier_ratios is not None)
    if allocation.kind != "uniform" and counts is not None:
        raise ValueError("give either an allocation or per-layer counts, not both")
    if counts is not None:
        if sp.is_nm:
            raise ValueError(f"per-layer counts (a layer-wise allocation) apply to unstructured sparsity, not {sp}")
        if set(counts) != set(linears):
            missing, extra = sorted(set(linears) - set(counts)), sorted(set(counts) - set(linears))
            raise ValueError(f"counts must name every prunable layer: missing {missing[:3]}, unknown {extra[:3]}")
        for name, k in counts.items():
            if not (isinstance(k, int) and 0 <= k <= linears[name].weight.numel()):
                raise ValueError(
                    f"count of {name} must be an integer in [0, {linears[name].weight.numel()}], got {k!r}"
                )
    walk = method in CALIBRATED or bool(hooks)
    if hooks and calibration is None:
        raise ValueError(f"block hooks ({type(hooks[0]).__name__}) run on calibration data; got None")
    measure = allocation.kind != "uniform" and outlier_ratios is None  # OWL ratios from calibration
    calib = _check_calibration(calibration, method) if walk or measure else None
    device = torch.device(device) if device is not None else _default_device(model)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    info = None
    if allocation.kind != "uniform":
        counts, info = allocation_plan(
            model, allocation, sp.ratio, calib, ratios=outlier_ratios, device=device, batch_size=batch_size
        )

    timings = {"capture": 0.0, "stats": 0.0, "solve": 0.0, "propagate": 0.0}
    start = time.perf_counter()
    nothing_to_do = not sp.is_nm and sp.ratio == 0 and counts is None and not hooks
    local = {}  # block-local layer name -> count, per block
    if counts is not None:
        for i in range(len(adapter.blocks(model))):
            prefix = adapter.block_prefix(i) + "."
            local[i] = {n[len(prefix) :]: k for n, k in counts.items() if n.startswith(prefix)}

    zeros: dict[str, int] = {}  # per layer, counted while its block is materialised
    fallback: list[str] = []  # expert matrices without routed calibration tokens
    if nothing_to_do:
        for i, block in enumerate(adapter.blocks(model)):
            with offload.materialized(block, offload.processing_device(block, device)):
                _count_zeros(block, adapter.block_prefix(i), zeros)
    elif not walk:  # magnitude: no data
        t = time.perf_counter()
        for i, block in enumerate(adapter.blocks(model)):  # one block at a time: offloaded models too
            with offload.materialized(block, offload.processing_device(block, device), write_back=True):
                _prune_linears(block, "magnitude", None, sp, per_row, blocksize, percdamp, local.get(i))
                _count_zeros(block, adapter.block_prefix(i), zeros)
        _sync(device)
        timings["solve"] = time.perf_counter() - t
    else:
        if hooks:
            timings["hooks"] = 0.0

        learnt: dict[str, Any] = {}  # the linear a block calls last, learnt on block 0 (collect_input_stats)
        first: list[StatsPass] = []  # block 0's statistics, gathered while its inputs are captured

        def capture_stats(block: nn.Module) -> contextlib.AbstractContextManager:
            if method not in CALIBRATED or offload.processing_device(block, device) != device:
                return contextlib.nullcontext()
            matrices = block_matrices(block)
            if any(isinstance(m, ExpertMatrix) for m in matrices.values()):
                return contextlib.nullcontext()  # fused experts' statistics need routed_experts (_prune_block)
            first.append(StatsPass(block, matrices, method == "sparsegpt", device))
            return first[0]

        def visit(i: int, block: nn.Module, inputs: list, at: torch.device) -> None:
            ready = None
            if i == 0 and first:
                ready, learnt["skip"] = first[0].stats, first[0].last
            unseen = _prune_block(
                block, inputs, method, sp, per_row, at, blocksize, percdamp, timings, local.get(i), i, hooks,
                learnt, ready,
            )  # fmt: skip
            fallback.extend(f"{adapter.block_prefix(i)}.{n}" for n in unseen)
            _count_zeros(block, adapter.block_prefix(i), zeros)

        walk_blocks(
            model, calib, visit, device=device, batch_size=batch_size, timings=timings, hooks=hooks,
            capture_hook=capture_stats,
        )  # fmt: skip

    timings["total"] = time.perf_counter() - start
    if info is not None:  # OWL: the ratios' time is reported apart (0 when they were given)
        timings["ratios"] = info.pop("ratios_s")
        sizes = {n: lin.weight.numel() for n, lin in linears.items()}
        prefixes = [adapter.block_prefix(i) + "." for i in range(len(adapter.blocks(model)))]
        block_of = {n: i for i, p in enumerate(prefixes) for n in linears if n.startswith(p)}
        info["achieved"] = block_sparsities({n: zeros[n] / sizes[n] for n in linears}, sizes, block_of)
    layers = {}
    pruned = prunable = 0
    for name, lin in linears.items():
        layers[name] = zeros[name] / lin.weight.numel()
        pruned += zeros[name]
        prunable += lin.weight.numel()
    report = PruneReport(
        method=method,
        target=str(sp),
        scope="row" if per_row else "matrix",
        nsamples=0 if calib is None else calib.shape[0],
        seqlen=0 if calib is None else calib.shape[1],
        device=str(device),
        layers=layers,
        sparsity=pruned / prunable,
        pruned=pruned,
        prunable=prunable,
        timings=timings,
        allocation=info,
        unpruned=sorted(fused),
        magnitude_fallback=fallback,
    )
    return report


def _count_zeros(block: nn.Module, prefix: str, zeros: dict[str, int]) -> None:
    for name, lin in block_matrices(block).items():
        zeros[f"{prefix}.{name}"] = lin.weight.numel() - int(torch.count_nonzero(lin.weight))


def walk_blocks(
    model: nn.Module,
    calibration: torch.Tensor,
    visit: Callable[[int, nn.Module, list, torch.device], None],
    *,
    device: torch.device | str | None = None,
    batch_size: int = 8,
    timings: dict[str, float] | None = None,
    hooks: Sequence[BlockHook] = (),
    write_back: bool = True,
    capture_hook: Callable[[nn.Module], contextlib.AbstractContextManager] | None = None,
) -> None:
    """The calibration walk: capture block 0's inputs for ``calibration`` (``batch_size`` windows
    at a time), then for every block call ``visit(index, block, inputs, device)`` with the block on
    its processing device and propagate ``inputs`` through it (they become the next block's inputs;
    not after the last block). ``write_back=False``: the walk only reads weights (an offloaded
    model skips writing them back). ``capture_hook(block0)``: a context entered around the capture,
    which runs the dense block 0 on ``device`` (e.g. a :class:`StatsPass` gathering its statistics
    there, so that the walk need not run block 0 once more for them)."""
    timings = timings if timings is not None else {}
    for key in ("capture", "propagate"):
        timings.setdefault(key, 0.0)
    device = torch.device(device) if device is not None else _default_device(model)
    adapter = adapter_for(model)
    t = time.perf_counter()
    blocks = adapter.blocks(model)
    with capture_hook(blocks[0]) if capture_hook is not None else contextlib.nullcontext():
        inputs = capture_block_inputs(model, list(calibration.split(batch_size)), device)
    _sync(device)
    timings["capture"] += time.perf_counter() - t
    for hook in hooks:
        hook.start(inputs)

    here = device
    for i, block in enumerate(blocks):
        # a block a device map put on another GPU is processed there; offloaded blocks visit `device`
        at = offload.processing_device(block, device)
        if at != here:
            for inp in inputs:
                inp.hidden = inp.hidden.to(at)
            here = at
        for inp in inputs:  # block i's own keyword arguments (masks, rotary tables), where it runs
            inp.use(i, at)
        with offload.materialized(block, at, write_back=write_back):
            visit(i, block, inputs, at)
            if i == len(blocks) - 1:  # nothing reads the last block's outputs
                break
            t = time.perf_counter()
            for inp in inputs:  # each batch only depends on itself: overwrite in place
                inp.hidden = run_block(block, inp)
            _sync(at)
            timings["propagate"] += time.perf_counter() - t


def _prune_linears(block, method, stats, sp, per_row, blocksize, percdamp, counts=None) -> None:
    """Prune every linear (and expert matrix) of one block by its criterion, to ``sp`` or to its entry
    of ``counts``. A layer without statistics (an expert no calibration token was routed to) is
    pruned by magnitude."""
    for name, lin in block_matrices(block).items():
        w = matrix(lin)
        k = None if counts is None else counts[name]
        target = sp if k is None else Sparsity(ratio=min(k / w.numel(), 1 - 1e-12))
        criterion = "magnitude" if stats is not None and name not in stats else method
        if criterion == "sparsegpt":
            s = stats[name]
            w_new, _ = sparsegpt_prune(w, hessian(s.value(), s.sequences), target, blocksize, percdamp, per_row=per_row)
            w.copy_(w_new)
            continue
        scores = magnitude_scores(w) if criterion == "magnitude" else wanda_scores(w, column_norms(stats[name].value()))
        w.mul_(select(scores, sp, per_row=per_row) if k is None else count_mask(scores, k, per_row=per_row))


def _prune_block(
    block, inputs, method, sp, per_row, device, blocksize, percdamp, timings, counts=None, index=0, hooks=(),
    learnt=None, ready=None,
) -> list[str]:  # fmt: skip
    """Hooks on the dense block, statistics from it (``ready``: gathered already, e.g. for block 0
    while its inputs were captured), prune its linears, hooks on the pruned block. Returns the
    expert matrices that saw no calibration token (pruned by magnitude)."""
    _run_hooks(hooks, "before", index, block, inputs, device, timings)
    stats = ready
    unseen: list[str] = []
    if method in CALIBRATED:
        linears = block_matrices(block)
        if stats is None:
            t = time.perf_counter()
            with routed_experts(block, linears):  # fused experts: each expert's tokens reach its views' hooks
                stats = collect_input_stats(block, linears, inputs, method == "sparsegpt", device, learnt)
            _sync(device)
            timings["stats"] += time.perf_counter() - t
        unseen = [name for name, m in linears.items() if name not in stats and isinstance(m, ExpertMatrix)]
        missing = [name for name in linears if name not in stats and name not in unseen]
        if missing:
            raise RuntimeError(f"layer {missing[0]} of a decoder block was not called during the block's forward pass")

    t = time.perf_counter()
    _prune_linears(block, method, stats, sp, per_row, blocksize, percdamp, counts)
    del stats
    _sync(device)
    timings["solve"] += time.perf_counter() - t
    _run_hooks(hooks, "after", index, block, inputs, device, timings)
    return unseen


def _run_hooks(hooks, phase: str, index: int, block: nn.Module, inputs: list, device, timings) -> None:
    """Call every hook's ``before`` or ``after`` on one block, timed under ``timings['hooks']``."""
    if not hooks:
        return
    t = time.perf_counter()
    for hook in hooks:
        getattr(hook, phase)(index, block, inputs)
    _sync(device)
    timings["hooks"] += time.perf_counter() - t


def save_pruned(
    model: nn.Module, tokenizer: Any, directory: str | os.PathLike, report: PruneReport | None = None
) -> Path:
    """Write the pruned model as a plain Hugging Face checkpoint (safetensors) that
    ``AutoModelForCausalLM.from_pretrained`` loads back with the same zeros; the tokenizer and,
    when given, the prune report (``perplib_prune.json``) go alongside. The checkpoint itself is
    written by :func:`perplib.lora.save_pretrained`, the one writer ``perp prune/run --save`` use."""
    from .lora import save_pretrained

    out = Path(directory)
    save_pretrained(model, out, tokenizer)
    if report is not None:
        (out / "perplib_prune.json").write_text(json.dumps(report.as_dict(), indent=1))
    return out
