"""Each measurement in a fresh process: a benchmark script runs itself again with ``--child JOB``
(JSON), so that no measurement inherits another's allocator state, caches or peak memory."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable, Mapping


def add_child_argument(parser: argparse.ArgumentParser) -> None:
    """The hidden ``--child JOB`` option of a script that measures in fresh processes."""
    parser.add_argument("--child", help=argparse.SUPPRESS)


def serve_child(args: argparse.Namespace, measure: Callable[[dict], dict]) -> bool:
    """In a child process (``--child`` given): print ``measure(job)`` as one JSON line; True then."""
    if not args.child:
        return False
    print(json.dumps(measure(json.loads(args.child))))
    return True


def run_child(script: str, job: dict, what: str, env: Mapping[str, str] | None = None) -> dict:
    """Run ``script --child job`` in a fresh interpreter and return its measurement; a failed child
    raises, naming ``what`` and ending with its stderr."""
    out = subprocess.run(
        [sys.executable, script, "--child", json.dumps(job)], capture_output=True, text=True, check=False, env=env
    )
    if out.returncode != 0:
        raise RuntimeError(f"measuring {what} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def methods_option(parser: argparse.ArgumentParser, text: str, known) -> list[str]:
    """The comma-separated ``--methods`` as a list; an unknown one is a parser error naming the known."""
    methods = text.split(",")
    if bad := [m for m in methods if m not in known]:
        parser.error(f"unknown methods {bad}; choose from {list(known)}")
    return methods


def release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc), so that RSS reflects live memory."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
