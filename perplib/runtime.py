"""Process-wide CPU settings of a heavy run: torch's thread count and flushing of denormal floats.

Both are speed settings (flushing sets values below 2^-126 to zero, see ``benchmarks/denormals.py``;
the thread count can change the rounding of multi-threaded LAPACK calls, which SparseGPT's masks
follow), and both are recorded with every result (the record's ``env.runtime``, not its key):

    >>> from perplib import runtime
    >>> runtime.configure(threads=2, flush_denormals=True)
    {'torch_threads': 2, 'flush_denormals': True}

Every computed record (``ResultStore.run``) first calls :func:`ensure`: unless the process chose its
settings already (``configure``, the ``perp`` options ``--threads`` / ``--no-flush-denormals``), the
defaults apply: denormals flushed (``PERPLIB_FLUSH_DENORMALS=0`` keeps them) and torch's thread count
(``PERPLIB_THREADS=N`` sets it; otherwise torch's own, which follows ``OMP_NUM_THREADS``).

``torch.set_flush_denormal`` sets the flag of the calling thread only, so a computation that
torch splits over its OpenMP pool would keep denormals in the other threads' halves;
``set_flush_denormals`` sets it on every pool thread too.
"""

from __future__ import annotations

import argparse
import ctypes
import os
from typing import Any

import torch

FLUSH_ENV = "PERPLIB_FLUSH_DENORMALS"
THREADS_ENV = "PERPLIB_THREADS"
_state: dict[str, Any] = {"flush_denormals": False, "configured": False}
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


def configure(threads: int | None = None, flush_denormals: bool = True) -> dict[str, Any]:
    """Set torch's intra-op thread count (``None``: keep torch's, which follows ``OMP_NUM_THREADS``)
    and denormal flushing; returns :func:`settings`."""
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads={threads!r}: must be a positive integer (or None for torch's default)")
        torch.set_num_threads(threads)
    set_flush_denormals(flush_denormals)
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
    value = os.environ.get(FLUSH_ENV, "1").strip().lower()
    if value in ("1", "true", "yes", "on", ""):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{FLUSH_ENV}={value!r}: use 1 (flush denormals, the default) or 0 (keep them)")


def env_threads() -> int | None:
    """The thread count ``PERPLIB_THREADS`` asks for (unset: None, torch's own)."""
    value = os.environ.get(THREADS_ENV, "").strip()
    return positive_threads(value, THREADS_ENV) if value else None


def apply(threads: int | None = None, flush_denormals: bool | None = None) -> dict[str, Any]:
    """:func:`configure`, taking what is None from the environment (``PERPLIB_THREADS``,
    ``PERPLIB_FLUSH_DENORMALS``; defaults: torch's thread count, flushing on)."""
    return configure(
        threads=env_threads() if threads is None else threads,
        flush_denormals=env_flush() if flush_denormals is None else flush_denormals,
    )


def ensure() -> dict[str, Any]:
    """The settings of a heavy run: the defaults (:func:`apply`) unless this process configured its
    own already; returns :func:`settings`."""
    return settings() if _state["configured"] else apply()


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The command-line options ``--threads`` and ``--no-flush-denormals`` (see :func:`from_args`)."""
    parser.add_argument("--threads", type=_threads_option, default=None, metavar="N",
                        help=f"torch CPU threads (default: ${THREADS_ENV}, else torch's, which follows "
                             "$OMP_NUM_THREADS); running several jobs at once, give each cores/jobs")  # fmt: skip
    parser.add_argument("--no-flush-denormals", dest="no_flush_denormals", action="store_true", default=None,
                        help=f"keep denormal floats (default: flushed to zero on the CPU, a speed setting; "
                             f"${FLUSH_ENV}=0 does the same)")  # fmt: skip


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
    return {"torch_threads": torch.get_num_threads(), "flush_denormals": _state["flush_denormals"]}
