"""Where things live. One module of paths (showyourwork style); every location can be moved
with an environment variable so tests and CI never write into a user's checkout or home."""

from __future__ import annotations

import os
from pathlib import Path


def repo_root() -> Path:
    """The checkout perplib runs from: ``PERPLIB_ROOT``, else the folder above the package when
    it holds ``pyproject.toml`` (an editable install), else the working directory."""
    if env := os.environ.get("PERPLIB_ROOT"):
        return Path(env).resolve()
    here = Path(__file__).resolve().parents[1]
    return here if (here / "pyproject.toml").exists() else Path.cwd()


def cache_dir() -> Path:
    """Converted checkpoints and pretrained vision models: ``PERPLIB_CACHE`` or ~/.cache/perplib."""
    return Path(os.environ.get("PERPLIB_CACHE", Path.home() / ".cache" / "perplib")).expanduser()


def _outputs(name: str) -> Path:
    # a dry run (PERPLIB_DRY_RUN, perplib.dryrun) never writes into the checkout's outputs
    return build_dir() / "dry-run" / name if os.environ.get("PERPLIB_DRY_RUN") else repo_root() / name


def results_dir() -> Path:
    """The results store: ``PERPLIB_RESULTS`` or ``<repo>/results`` (``<build>/dry-run/results`` in a dry run)."""
    return Path(os.environ.get("PERPLIB_RESULTS", _outputs("results"))).expanduser()


def figures_dir() -> Path:
    return Path(os.environ.get("PERPLIB_FIGURES", _outputs("figures"))).expanduser()


def tables_dir() -> Path:
    return Path(os.environ.get("PERPLIB_TABLES", _outputs("tables"))).expanduser()


def build_dir() -> Path:
    """Executed notebooks (not committed)."""
    return Path(os.environ.get("PERPLIB_BUILD", repo_root() / "build")).expanduser()
