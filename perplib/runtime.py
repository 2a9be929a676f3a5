"""Process-wide CPU settings of a heavy run: torch's thread count and flushing of denormal floats.

Both change speed, not what is computed (flushing sets values below 2^-126 to zero; see
``benchmarks/denormals.py`` for its effect), and both are recorded with every result:

    >>> from perplib import runtime
    >>> runtime.configure(threads=2, flush_denormals=True)
    {'torch_threads': 2, 'flush_denormals': True}

``torch.set_flush_denormal`` sets the flag of the calling thread only, so a computation that
torch splits over its OpenMP pool would keep denormals in the other threads' halves;
``set_flush_denormals`` sets it on every pool thread too.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch

_state: dict[str, Any] = {"flush_denormals": False}
_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


def _openmp_library() -> ctypes.CDLL | None:
    """The GNU OpenMP runtime torch loaded (None on builds without one, e.g. macOS wheels)."""
    try:
        with open("/proc/self/maps") as maps:
            found = next((line.split()[-1] for line in maps if "libgomp" in line.rsplit("/", 1)[-1]), None)
    except OSError:
        return None
    if found is None:
        return None
    lib = ctypes.CDLL(found)
    lib.GOMP_parallel.argtypes = [_CALLBACK, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    lib.GOMP_parallel.restype = None
    return lib


def set_flush_denormals(enabled: bool = True) -> bool:
    """Flush denormal floats to zero (or stop) on this thread and every thread of torch's OpenMP pool.

    Returns whether the CPU supports it (False: nothing changed)."""
    if not torch.set_flush_denormal(enabled):
        return False
    lib = _openmp_library()
    if lib is not None:
        callback = _CALLBACK(lambda _data: torch.set_flush_denormal(enabled))
        lib.GOMP_parallel(callback, None, torch.get_num_threads(), 0)
    _state["flush_denormals"] = enabled
    return True


def configure(threads: int | None = None, flush_denormals: bool = True) -> dict[str, Any]:
    """Set torch's intra-op thread count (``None``: keep torch's, which follows ``OMP_NUM_THREADS``)
    and denormal flushing; returns :func:`settings`."""
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads={threads!r}: must be a positive integer (or None for torch's default)")
        torch.set_num_threads(threads)
    set_flush_denormals(flush_denormals)
    return settings()


def settings() -> dict[str, Any]:
    """The settings in force, as recorded with every result."""
    return {"torch_threads": torch.get_num_threads(), "flush_denormals": _state["flush_denormals"]}
