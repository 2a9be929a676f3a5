"""The statistics pass's shortcuts (issue 12) give exactly the statistics of a plain pass: the
skipped product of the linear a block calls last, block 0's statistics gathered while its inputs are
captured, and the fallback when a block calls its linears in another order."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from perplib.adapters import BlockInput, adapter_for, block_linears, capture_block_inputs, run_block
from perplib.models import tiny_model
from perplib.pruning import StatsPass, _prune_linears, collect_input_stats, prune_, walk_blocks
from perplib.sparsity import Sparsity

LAST = {"llama": "mlp.down_proj", "opt": "fc2"}


def calib(n: int = 6, seqlen: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def plain(block: nn.Module, inputs: list, full: bool) -> dict:
    """The statistics of a plain pass: every product computed."""
    with torch.no_grad(), StatsPass(block, block_linears(block), full, torch.device("cpu")) as sp:
        for inp in inputs:
            run_block(block, inp)
    return sp.stats


def zero_outputs(module: nn.Module) -> tuple[list[bool], object]:
    seen: list[bool] = []
    handle = module.register_forward_hook(lambda _m, _a, out: seen.append(bool(torch.all(out == 0))))
    return seen, handle


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("known", [False, True])
def test_skipping_the_last_product_keeps_the_statistics(family, full, known):
    model = tiny_model(family).eval()
    inputs = capture_block_inputs(model, list(calib().split(2)), "cpu")  # 3 batches
    block = adapter_for(model).blocks(model)[0]
    want = plain(block, inputs, full)
    learnt = {"skip": LAST[family]} if known else {}
    zeros, handle = zero_outputs(block.get_submodule(LAST[family]))
    with torch.no_grad():
        got = collect_input_stats(block, block_linears(block), inputs, full, torch.device("cpu"), learnt)
    handle.remove()
    assert learnt == {"skip": LAST[family]}
    # the product is skipped from the second batch on, or from the first when learnt on an earlier block
    assert zeros == [known or i > 0 for i in range(3)]
    assert set(got) == set(want) == set(block_linears(block))
    for name in want:
        assert torch.equal(got[name].value(), want[name].value()), name
    assert "forward" not in block.get_submodule(LAST[family]).__dict__  # its own forward is back


class Swapping(nn.Module):
    """Calls ``a`` then ``b`` on batches whose first entry is positive, else ``b`` then ``a``."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g)

    def forward(self, x):
        return x + (self.b(self.a(x)) if x[0, 0, 0] > 0 else self.a(self.b(x)))


class NormLast(Swapping):
    """A module (a norm), not a linear, runs last: nothing can be skipped."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        return self.norm(x + self.b(self.a(x)))


def batches(signs: list[int]) -> list[BlockInput]:
    g = torch.Generator().manual_seed(1)
    out = []
    for s in signs:
        x = torch.randn(2, 3, 4, generator=g)
        x[0, 0, 0] = s * (abs(x[0, 0, 0]) + 0.1)
        out.append(BlockInput(x, {}))
    return out


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("learnt", [{}, {"skip": "a"}, {"skip": "b"}])
def test_a_block_calling_its_linears_in_another_order_gets_every_statistic(full, learnt):
    block, learnt = Swapping(), dict(learnt)  # a copy: pytest shares the parameter between cases
    inputs = batches([1, -1, 1])  # the first batch calls b last; the second calls a after b
    want = plain(block, inputs, full)
    with torch.no_grad():
        got = collect_input_stats(block, block_linears(block), inputs, full, torch.device("cpu"), learnt)
    assert set(got) == {"a", "b"}
    for name in want:
        assert torch.equal(got[name].value(), want[name].value()), name
    assert learnt == {"skip": None}  # the walk's later blocks do not skip any more
    assert "forward" not in block.a.__dict__ and "forward" not in block.b.__dict__


def test_nothing_is_skipped_when_a_module_runs_after_the_last_linear():
    block = NormLast()
    inputs = batches([1, 1, 1])
    learnt: dict = {}
    with torch.no_grad():
        got = collect_input_stats(block, block_linears(block), inputs, False, torch.device("cpu"), learnt)
    assert learnt == {"skip": None}
    want = plain(block, inputs, False)
    assert all(torch.equal(got[n].value(), want[n].value()) for n in want)


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("method, spec", [("wanda", "0.5"), ("sparsegpt", "2:4")])
def test_prune_equals_a_walk_with_plain_statistics_passes(family, method, spec):
    """Block 0's statistics gathered during the capture and every later block's skipped product:
    the pruned weights are bit for bit those of plain passes, and block 0 runs once less."""
    ours = tiny_model(family)
    ref = copy.deepcopy(ours).eval()
    ids = calib()
    block0 = adapter_for(ours).blocks(ours)[0]
    calls = []
    handle = block0.register_forward_pre_hook(lambda *_: calls.append(1))
    prune_(ours, method, spec, ids, device="cpu", batch_size=4)
    handle.remove()
    assert len(calls) == 2 * 2  # capture and propagation, 2 batches each: no separate statistics pass

    def visit(_i, block, inputs, _at):
        stats = plain(block, inputs, method == "sparsegpt")
        _prune_linears(block, method, stats, Sparsity.parse(spec), method == "wanda", 128, 0.01)

    with torch.no_grad():
        walk_blocks(ref, ids, visit, device="cpu", batch_size=4)
    for name, lin in adapter_for(ours).prunable(ours).items():
        assert torch.equal(lin.weight, ref.get_submodule(name).weight), name
