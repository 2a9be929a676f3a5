"""Execute every notebook in ``notebooks/`` with papermill under one parameter profile.

    python -m perplib.reproduce --profile embedded          # what `make reproduce` runs
    python -m perplib.reproduce --profile smoke --only 00_dense_baselines

A profile is ``notebooks/profiles/<name>.yaml``: a ``common`` mapping given to every notebook,
plus one mapping per notebook stem. Executed copies go to ``build/<profile>/``; figures and
tables to ``figures/<profile>/`` and ``tables/<profile>/``; records to the results store, so a
rerun reuses finished runs and an interrupted one resumes where it stopped.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from . import paths


def notebooks_dir() -> Path:
    return paths.repo_root() / "notebooks"


def profiles() -> list[str]:
    return sorted(p.stem for p in (notebooks_dir() / "profiles").glob("*.yaml"))


def load_profile(name: str) -> dict[str, Any]:
    path = notebooks_dir() / "profiles" / f"{name}.yaml"
    if not path.exists():
        raise ValueError(f"unknown profile {name!r}: choose one of {profiles()}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"profile {path} must be a mapping, got {type(data).__name__}")
    return data


def notebook_parameters(profile: str, stem: str) -> dict[str, Any]:
    """The parameters one notebook gets under a profile (common first, the notebook's own win)."""
    data = load_profile(profile)
    return {**(data.get("common") or {}), **(data.get(stem) or {}), "profile": profile}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perplib.reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="embedded", help=f"parameter profile, one of {profiles()}")
    parser.add_argument("--only", action="append", default=[], help="notebook stem(s) to run (default: all)")
    parser.add_argument("--kernel", default="python3", help="Jupyter kernel name")
    args = parser.parse_args(argv)

    import logging

    import papermill as pm

    # papermill logs each cell's output (the per-run progress lines) on its logger
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("papermill").setLevel(logging.INFO)

    try:
        load_profile(args.profile)
    except ValueError as e:
        parser.error(str(e))
    books = sorted(notebooks_dir().glob("*.ipynb"))
    if args.only:
        unknown = set(args.only) - {b.stem for b in books}
        if unknown:
            parser.error(f"unknown notebook(s) {sorted(unknown)}; available: {[b.stem for b in books]}")
        books = [b for b in books if b.stem in args.only]
    out_dir = paths.build_dir() / args.profile
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for i, book in enumerate(books, 1):
        params = notebook_parameters(args.profile, book.stem)
        print(f"== [{i}/{len(books)}] {book.name} (profile {args.profile}) ==", flush=True)
        t0 = time.perf_counter()
        pm.execute_notebook(
            str(book), str(out_dir / book.name), parameters=params, cwd=str(notebooks_dir()),
            kernel_name=args.kernel, log_output=True, progress_bar=False,
        )  # fmt: skip
        print(f"== [{i}/{len(books)}] {book.name} done in {time.perf_counter() - t0:.0f}s ==", flush=True)
    print(f"all {len(books)} notebooks done in {time.perf_counter() - start:.0f}s; "
          f"figures in {paths.figures_dir() / args.profile}, tables in {paths.tables_dir() / args.profile}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
