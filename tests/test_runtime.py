import subprocess
import sys

import pytest
import torch

from perplib import runtime


@pytest.fixture
def restore():
    threads = torch.get_num_threads()
    yield
    runtime.configure(threads=threads, flush_denormals=False)


_ALLOCATE = """
import ctypes, sys, torch
from perplib import runtime
if sys.argv[1] == "keep":
    runtime.configure(flush_denormals=False, keep_freed_memory=True)


class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
before = libc.mallinfo2().hblkhd
x = torch.empty(30 * 2**18).fill_(1.0)  # 30 MiB of activations
mapped = libc.mallinfo2().hblkhd - before
del x
print(mapped, libc.mallinfo2().fordblks)
"""


@pytest.mark.skipif(runtime._glibc() is None, reason="glibc's malloc only")
def test_kept_memory_comes_from_the_heap_and_stays_there():
    # a fresh process each: glibc's thresholds depend on the allocation history
    def run(mode: str) -> tuple[int, int]:
        done = subprocess.run([sys.executable, "-c", _ALLOCATE, mode], capture_output=True, text=True, check=True)
        mapped, free = done.stdout.split()
        return int(mapped), int(free)

    mapped, free = run("keep")
    assert mapped == 0 and free >= 30 * 2**20  # served by the heap, and kept there once freed
    mapped, free = run("as-is")
    assert mapped >= 30 * 2**20  # glibc's own threshold: fresh pages from the kernel, given back on free


def test_keeping_memory_is_off_where_glibc_is_not(monkeypatch, restore):
    monkeypatch.setattr(runtime, "_glibc", lambda: None)
    assert runtime.set_keep_freed_memory(True) is False
    assert runtime.settings()["keep_freed_memory"] is False
    monkeypatch.undo()  # before `restore` configures the real glibc again


def test_a_refused_threshold_warns_and_is_recorded_as_off(monkeypatch, restore):
    class Refusing:  # a glibc that refuses the thresholds (32-bit: at most 512 KiB)
        def mallopt(self, param, value):
            return 0

        def gnu_get_libc_version(self):
            return b"2.36"

    monkeypatch.setattr(runtime, "_glibc", Refusing)
    with pytest.warns(UserWarning, match=r"glibc 2.36 refused mallopt\(-3, 33554432\); freed memory is not kept"):
        assert runtime.set_keep_freed_memory(True) is False
    assert runtime.settings()["keep_freed_memory"] is False
    monkeypatch.undo()


def _flushed(x: torch.Tensor) -> int:
    return int(((x * 1.0) == 0).sum())


def test_flushing_reaches_every_pool_thread(restore):
    runtime.configure(threads=2, flush_denormals=False)
    x = torch.full((1 << 21,), 1e-40)  # denormal in fp32, split over both threads by torch
    assert _flushed(x) == 0
    assert runtime.configure(threads=2, flush_denormals=True)["flush_denormals"] is True
    assert _flushed(x) == x.numel()  # torch.set_flush_denormal alone leaves the other thread's half
    runtime.configure(threads=2, flush_denormals=False)
    assert _flushed(x) == 0


def test_torchs_own_openmp_is_chosen_over_a_vendored_copy(tmp_path):
    # scikit-learn's wheel vendors its own libgomp; where it sat lower in the address map, flushing
    # went through its pool, not torch's, and half of a two-thread computation kept its denormals
    torch_dir = tmp_path / "site" / "torch"
    sklearn_copy = str(tmp_path / "site" / "scikit_learn.libs" / "libgomp-e985bcbb.so.1.0.0")
    torch_copy = str(torch_dir / "lib" / "libgomp.so.1")
    assert runtime.torchs_openmp([sklearn_copy, torch_copy], str(torch_dir)) == torch_copy
    assert runtime.torchs_openmp([sklearn_copy, "/usr/lib/libgomp.so.1"], str(torch_dir)) == "/usr/lib/libgomp.so.1"
    assert runtime.torchs_openmp([sklearn_copy], str(torch_dir)) == sklearn_copy


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_thread_count_is_refused(bad, restore):
    with pytest.raises(ValueError, match="threads="):
        runtime.configure(threads=bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_count_denormals_reads_the_bits(dtype, restore):
    tiny = torch.finfo(dtype).tiny
    x = torch.tensor([0.0, -0.0, tiny, -tiny, 1.0, float("inf"), float("nan")], dtype=dtype)
    sub = torch.tensor([tiny / 2, -tiny / 4], dtype=torch.float64).to(dtype)  # converted without flushing
    assert runtime.count_denormals(x) == 0
    assert runtime.count_denormals(torch.cat([x, sub])) == 2
    runtime.configure(flush_denormals=True)  # flushing makes a comparison see zeros; the bits still count
    assert runtime.count_denormals(torch.cat([x, sub])) == 2
    assert runtime.count_denormals(torch.tensor([1e-300], dtype=torch.float64)) == 0


def test_defaults_come_from_the_environment(monkeypatch, restore):
    monkeypatch.delenv(runtime.FLUSH_ENV, raising=False)
    monkeypatch.delenv(runtime.KEEP_ENV, raising=False)
    monkeypatch.delenv(runtime.THREADS_ENV, raising=False)

    def settings(threads, flush, keep):
        return {"torch_threads": threads, "flush_denormals": flush, "keep_freed_memory": keep}

    assert runtime.apply(threads=1) == settings(1, True, True)  # flushing and keeping are the defaults
    monkeypatch.setenv(runtime.FLUSH_ENV, "0")
    monkeypatch.setenv(runtime.KEEP_ENV, "off")
    monkeypatch.setenv(runtime.THREADS_ENV, "2")
    assert runtime.apply() == settings(2, False, False)
    assert runtime.apply(threads=1, flush_denormals=True) == settings(1, True, False)
    monkeypatch.setattr(runtime, "_state", {"flush_denormals": False, "keep_freed_memory": False, "configured": False})
    assert runtime.ensure() == settings(2, False, False)  # first heavy run: the defaults
    runtime.configure(threads=1, flush_denormals=True)
    assert runtime.ensure() == settings(1, True, True)  # the process's own choice stays
    monkeypatch.setenv(runtime.KEEP_ENV, "sometimes")
    with pytest.raises(ValueError, match="PERPLIB_KEEP_FREED_MEMORY='sometimes': use 1"):
        runtime.env_keep()
    monkeypatch.setenv(runtime.FLUSH_ENV, "maybe")
    with pytest.raises(ValueError, match="PERPLIB_FLUSH_DENORMALS='maybe'"):
        runtime.env_flush()
    monkeypatch.setenv(runtime.THREADS_ENV, "0")
    with pytest.raises(ValueError, match="PERPLIB_THREADS='0': the thread count must be a positive integer"):
        runtime.env_threads()
