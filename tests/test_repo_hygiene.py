"""The checkout stays small: no weights, caches or data blobs are ever committed.

A submission that carries a large file (a converted checkpoint, a cached vision model, a dataset
copy) is refused whole by the hosting side, so a test guards the tracked tree. Everything large
that perplib uses is made again by a script (the cache folder, ``perplib.paths.cache_dir()``).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 2 * 1024 * 1024  # bytes; the largest committed file today is a ~120 KB figure
SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".npz", ".arrow", ".parquet")


def tracked_files() -> list[Path]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / name for name in out.decode().split("\0") if name]


def test_no_large_tracked_file():
    big = [(p.relative_to(ROOT), p.stat().st_size) for p in tracked_files() if p.is_file() and p.stat().st_size > LIMIT]
    assert not big, f"files over {LIMIT} bytes are tracked (make them again from a script instead): {big}"


def test_no_weights_or_data_blobs_tracked():
    blobs = [str(p.relative_to(ROOT)) for p in tracked_files() if p.suffix in SUFFIXES]
    assert not blobs, f"weights or data files are tracked: {blobs}"
