import pytest
import torch

from perplib import runtime


@pytest.fixture
def restore():
    threads = torch.get_num_threads()
    yield
    runtime.configure(threads=threads, flush_denormals=False)


def _flushed(x: torch.Tensor) -> int:
    return int(((x * 1.0) == 0).sum())


def test_flushing_reaches_every_pool_thread(restore):
    runtime.configure(threads=2, flush_denormals=False)
    x = torch.full((1 << 21,), 1e-40)  # denormal in fp32, split over both threads by torch
    assert _flushed(x) == 0
    assert runtime.configure(threads=2, flush_denormals=True) == {"torch_threads": 2, "flush_denormals": True}
    assert _flushed(x) == x.numel()  # torch.set_flush_denormal alone leaves the other thread's half
    runtime.configure(threads=2, flush_denormals=False)
    assert _flushed(x) == 0


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_thread_count_is_refused(bad, restore):
    with pytest.raises(ValueError, match="threads="):
        runtime.configure(threads=bad)
