"""Process-wide CPU settings of a heavy run: torch's thread count, flushing of denormal floats, and
glibc's malloc keeping freed memory for reuse.

All three are speed settings (flushing sets values below 2^-126 to zero, see ``benchmarks/denormals.py``;
the thread count can change the rounding of multi-threaded LAPACK calls, which SparseGPT's masks
follow; the allocator setting changes no value), and all are recorded with every result (the
record's ``env.runtime``, not its key):

    >>> from perplib import runtime
    >>> runtime.configure(threads=2, flush_denormals=True, keep_freed_memory=True)
    {'torch_threads': 2, 'flush_denormals': True, 'keep_freed_memory': True}

Every computed record (``ResultStore.run``) first calls :func:`ensure`: unless the process chose its
settings already (``configure``, the ``perp`` options ``--threads`` / ``--no-flush-denormals`` /
``--no-keep-freed-memory``), the defaults apply: denormals flushed (``PERPLIB_FLUSH_DENORMALS=0``
keeps them), freed memory kept (``PERPLIB_KEEP_FREED_MEMORY=0`` leaves glibc's malloc as it is) and
torch's thread count (``PERPLIB_THREADS=N`` sets it; otherwise torch's own, which follows
``OMP_NUM_THREADS``).

``torch.set_flush_denormal`` sets the flag of the calling thread only, so a computation that
torch splits over its OpenMP pool would keep denormals in the other threads' halves;
``set_flush_denormals`` sets it on every pool thread too.

torch's CPU tensors come from ``malloc``. glibc serves a block above its mmap threshold with fresh
pages from the kernel and returns the free top of its heap to the kernel above its trim
threshold; both thresholds move with the history of allocations, so a calibration walk or a
training step that frees and reallocates activations of a few MiB may page-fault on every one of
them, or not, from one run to the next (measured on the embedded model: 4.9 million minor faults
and 9 s of system time in one 54 s Wanda run, 1 million and 2 s in the next, 3 thousand with the
setting below, which took 48 s). :func:`set_keep_freed_memory` fixes both: blocks up to 32 MiB (the
largest threshold glibc accepts) come from the heap, and freed memory stays in it for reuse
(``benchmarks/prune_speed.py`` and ``retrain_speed.py`` take ``--no-keep-freed-memory``).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import warnings
from typing import Any

import torch

FLUSH_ENV = "PERPLIB_FLUSH_DENORMALS"
THREADS_ENV = "PERPLIB_THREADS"
KEEP_ENV = "PERPLIB_KEEP_FREED_MEMORY"
_state: dict[str, Any] = {"flush_denormals": False, "keep_freed_memory": False, "configured": False}
_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


def _openmp_library() -> ctypes.CDLL | None:
    """The GNU OpenMP runtime torch loaded (None on builds without one, e.g. macOS wheels).

    Another library may bring its own copy (scikit-learn's wheel vendors ``libgomp-<hash>.so``):
    its pool is not torch's, so torch's own copy (in torch's folder) comes first."""
    try:
        with open("/proc/self/maps") as maps:
            loaded = sorted({line.split()[-1] for line in maps if "libgomp" in line.rsplit("/", 1)[-1]})
    except OSError:
        return None
    if not loaded:
        return None
    lib = ctypes.CDLL(torchs_openmp(loaded, os.path.dirname(os.path.realpath(torch.__file__))))
    lib.GOMP_parallel.argtypes = [_CALLBACK, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    lib.GOMP_parallel.restype = None
    return lib


def torchs_openmp(loaded: list[str], torch_dir: str) -> str:
    """Of the loaded libgomp copies, the one torch uses: the one in torch's folder, else a plain
    ``libgomp.so*`` (a system copy), else the first."""
    own = [path for path in loaded if os.path.realpath(path).startswith(os.path.join(torch_dir, ""))]
    plain = [path for path in loaded if os.path.basename(path).startswith("libgomp.so")]
    return (own or plain or loaded)[0]


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


# glibc's mallopt parameters and values (malloc.h); 32 MiB is the largest mmap threshold it accepts
# on 64-bit systems, 128 KiB its initial mmap and trim thresholds
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEPT = {_M_MMAP_THRESHOLD: 32 * 2**20, _M_TRIM_THRESHOLD: 2**31 - 1}
_GLIBC_INITIAL = {_M_MMAP_THRESHOLD: 128 * 2**10, _M_TRIM_THRESHOLD: 128 * 2**10}


def _glibc() -> ctypes.CDLL | None:
    """The C library of this process when it is glibc (None elsewhere: macOS, musl, Windows)."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        return libc
    except (OSError, AttributeError, TypeError):
        return None


def set_keep_freed_memory(enabled: bool = True) -> bool:
    """glibc's malloc: serve blocks up to 32 MiB from its heap and keep freed memory there for reuse
    (``True``), instead of thresholds that move with the allocation history (see the module).
    ``False`` after ``True`` sets glibc's initial thresholds (128 KiB, fixed); ``False`` before
    leaves malloc untouched. Returns whether the setting is in force (False without glibc)."""
    libc = _glibc()
    if libc is None:
        _state["keep_freed_memory"] = False
        return False
    if enabled or _state["keep_freed_memory"]:
        values = _KEPT if enabled else _GLIBC_INITIAL
        refused = [(param, value) for param, value in values.items() if libc.mallopt(param, value) != 1]
        if refused:  # e.g. a 32-bit glibc, whose largest mmap threshold is 512 KiB: a speed setting, not an error
            warnings.warn(
                f"glibc {libc.gnu_get_libc_version().decode()} refused mallopt{refused[0]}; freed memory is not kept",
                stacklevel=2,
            )
            enabled = False
    _state["keep_freed_memory"] = enabled
    return enabled


def configure(
    threads: int | None = None, flush_denormals: bool = True, keep_freed_memory: bool = True
) -> dict[str, Any]:
    """Set torch's intra-op thread count (``None``: keep torch's, which follows ``OMP_NUM_THREADS``),
    denormal flushing and malloc's reuse of freed memory; returns :func:`settings`."""
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads={threads!r}: must be a positive integer (or None for torch's default)")
        torch.set_num_threads(threads)
    set_flush_denormals(flush_denormals)
    set_keep_freed_memory(keep_freed_memory)
    _state["configured"] = True
    return settings()


def positive_threads(value: Any, source: str = "threads") -> int:
    """``value`` (an int or its text) as a thread count >= 1, else a ValueError naming ``source``."""
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        threads = int(value)
    except (TypeError, ValueError):
        threads = 0
    if threads < 1:
        raise ValueError(f"{source}={value!r}: the thread count must be a positive integer")
    return threads


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the OS says it, else every CPU)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else os.cpu_count() or 1


def env_flush() -> bool:
    """Denormal flushing as ``PERPLIB_FLUSH_DENORMALS`` asks (unset: on)."""
    return _env_switch(FLUSH_ENV, "flush denormals, the default", "keep them")


def env_keep() -> bool:
    """malloc keeping freed memory as ``PERPLIB_KEEP_FREED_MEMORY`` asks (unset: on)."""
    return _env_switch(KEEP_ENV, "keep freed memory for reuse, the default", "leave glibc's malloc as it is")


def _env_switch(name: str, on: str, off: str) -> bool:
    value = os.environ.get(name, "1").strip().lower()
    if value in ("1", "true", "yes", "on", ""):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={value!r}: use 1 ({on}) or 0 ({off})")


def env_threads() -> int | None:
    """The thread count ``PERPLIB_THREADS`` asks for (unset: None, torch's own)."""
    value = os.environ.get(THREADS_ENV, "").strip()
    return positive_threads(value, THREADS_ENV) if value else None


def apply(
    threads: int | None = None, flush_denormals: bool | None = None, keep_freed_memory: bool | None = None
) -> dict[str, Any]:
    """:func:`configure`, taking what is None from the environment (``PERPLIB_THREADS``,
    ``PERPLIB_FLUSH_DENORMALS``, ``PERPLIB_KEEP_FREED_MEMORY``; defaults: torch's thread count,
    flushing on, freed memory kept)."""
    return configure(
        threads=env_threads() if threads is None else threads,
        flush_denormals=env_flush() if flush_denormals is None else flush_denormals,
        keep_freed_memory=env_keep() if keep_freed_memory is None else keep_freed_memory,
    )


def ensure() -> dict[str, Any]:
    """The settings of a heavy run: the defaults (:func:`apply`) unless this process configured its
    own already; returns :func:`settings`."""
    return settings() if _state["configured"] else apply()


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The command-line options ``--threads``, ``--no-flush-denormals`` and ``--no-keep-freed-memory``
    (see :func:`from_args`)."""
    parser.add_argument("--threads", type=_threads_option, default=None, metavar="N",
                        help=f"torch CPU threads (default: ${THREADS_ENV}, else torch's, which follows "
                             "$OMP_NUM_THREADS); running several jobs at once, give each cores/jobs")  # fmt: skip
    parser.add_argument("--no-flush-denormals", dest="no_flush_denormals", action="store_true", default=None,
                        help=f"keep denormal floats (default: flushed to zero on the CPU, a speed setting; "
                             f"${FLUSH_ENV}=0 does the same)")  # fmt: skip
    parser.add_argument("--no-keep-freed-memory", dest="no_keep_freed_memory", action="store_true", default=None,
                        help=f"leave glibc's malloc as it is (default: blocks up to 32 MiB from its heap, freed "
                             f"memory kept for reuse, a speed setting; ${KEEP_ENV}=0 does the same)")  # fmt: skip


def _threads_option(text: str) -> int:
    try:
        return positive_threads(text, "--threads")
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer (the number of torch threads)") from e


def from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Apply the options of :func:`add_arguments` (what is not given comes from the environment)."""
    return apply(
        threads=getattr(args, "threads", None),
        flush_denormals=False if getattr(args, "no_flush_denormals", None) else None,
        keep_freed_memory=False if getattr(args, "no_keep_freed_memory", None) else None,
    )


_BITS = {  # dtype -> (integer view, exponent bits, mantissa bits)
    torch.float32: (torch.int32, 0x7F800000, 0x007FFFFF),
    torch.bfloat16: (torch.int16, 0x7F80, 0x007F),
    torch.float16: (torch.int16, 0x7C00, 0x03FF),
}


def count_denormals(x: torch.Tensor) -> int:
    """How many entries of a floating-point tensor are denormal (exponent bits all zero, mantissa
    not). Read from the bits, so that the count is right also while denormals are flushed (a
    comparison would see them as zero then); 0 for other dtypes (fp64's denormals never arise here)."""
    bits = _BITS.get(x.dtype)
    if bits is None:
        return 0
    view, exponent, mantissa = bits
    raw = x.detach().contiguous().view(view)
    return int(((raw & exponent) == 0).logical_and_((raw & mantissa) != 0).sum())


def settings() -> dict[str, Any]:
    """The settings in force, as recorded with every result."""
    return {
        "torch_threads": torch.get_num_threads(),
        "flush_denormals": _state["flush_denormals"],
        "keep_freed_memory": _state["keep_freed_memory"],
    }
