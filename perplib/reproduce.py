"""Execute every notebook in ``notebooks/`` with papermill under one parameter profile.

    python -m perplib.reproduce --profile embedded          # what `make reproduce` runs
    python -m perplib.reproduce --profile smoke --only 00_dense_baselines
    python -m perplib.reproduce --profile paper --dry-run   # what `make dry-run` runs (perplib.dryrun)

A profile is ``notebooks/profiles/<name>.yaml``: a ``common`` mapping plus one mapping per
notebook stem. Each notebook gets only the parameters its ``parameters`` cell declares (common
values it does not declare are left out; a notebook entry naming an undeclared parameter, or a
declared parameter the profile does not set, is an error before anything runs). Notebooks run one
at a time (one kernel, one heavy process: two torch processes on the same cores slow each other
tenfold), each with the same explicit torch thread count (``--threads``, default: every CPU this
process may use; passed to the kernels as ``PERPLIB_THREADS`` and ``OMP_NUM_THREADS``) and denormal
flushing (``--no-flush-denormals`` keeps denormals), recorded in every record's ``env.runtime``. The console shows one line per run and per notebook, the full output of each notebook
goes to ``build/<profile>/<notebook>.log`` next to the executed copy. Figures and tables go to
``figures/<profile>/`` and ``tables/<profile>/``, records to the results store, so a rerun reuses
finished runs and an interrupted one resumes where it stopped. After the last notebook, the
claims of every notebook are gathered into ``tables/<profile>/claims.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import yaml

from . import paths

RUN_LINE = re.compile(r"^\[\d+/\d+\] ")  # the progress line of run_grid / run_vision_grid


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


def declared_parameters(book: Path) -> list[str]:
    """The names assigned in a notebook's ``parameters`` cell."""
    import papermill as pm

    return list(pm.inspect_notebook(str(book)))


def notebook_parameters(profile: str, stem: str, declared: list[str] | None = None) -> dict[str, Any]:
    """The parameters one notebook gets under a profile (common first, the notebook's own win).

    With ``declared`` (the notebook's parameter names), only those are passed, and the profile
    must set every one of them and nothing else for this notebook."""
    data = load_profile(profile)
    common, own = data.get("common") or {}, data.get(stem) or {}
    params = {**common, **own, "profile": profile}
    if declared is None:
        return params
    where = f"notebooks/profiles/{profile}.yaml"
    if unknown := sorted(set(own) - set(declared)):
        raise ValueError(f"{where}: {stem} has no parameter(s) {unknown}; its parameters cell declares {declared}")
    if missing := [name for name in declared if name not in params]:
        raise ValueError(
            f"{where} sets no value for {stem}'s parameter(s) {missing}: the notebook would run with its stored "
            "(smoke) values; add them under 'common' or the notebook's entry"
        )
    return {name: params[name] for name in declared}


class _RunLines:
    """papermill's ``stdout_file``: every line goes to the notebook's log; run lines also go to
    the console, and are counted (reused / computed)."""

    def __init__(self, log: TextIO, console: TextIO) -> None:
        self.log, self.console, self.pending = log, console, ""
        self.runs = self.reused = 0

    def write(self, text: str) -> int:
        self.log.write(text)
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if RUN_LINE.match(line):
                self.runs += 1
                self.reused += line.rstrip().rstrip(")").endswith("reused")
                self.console.write(f"    {line}\n")
                self.console.flush()
        return len(text)

    def flush(self) -> None:
        self.log.flush()


def _execute(book: Path, params: dict[str, Any], out_dir: Path, kernel: str, console: TextIO) -> _RunLines:
    """Run one notebook, its output in ``<out_dir>/<stem>.log``; raises papermill's error."""
    import papermill as pm

    log_path = out_dir / f"{book.stem}.log"
    with open(log_path, "w") as log:
        handler = logging.StreamHandler(log)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        pm_logger = logging.getLogger("papermill")
        pm_logger.addHandler(handler)
        pm_logger.propagate, pm_logger.level = False, logging.INFO
        lines = _RunLines(log, console)
        log.write(f"parameters: {params}\n")
        log.flush()
        # the kernel process inherits this process's stderr (its start-up warnings): point it at the log
        saved_stderr = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            pm.execute_notebook(
                str(book), str(out_dir / book.name), parameters=params, cwd=str(notebooks_dir()),
                kernel_name=kernel, log_output=False, progress_bar=False, stdout_file=lines, stderr_file=log,
            )  # fmt: skip
        finally:
            log.flush()
            os.dup2(saved_stderr, 2)
            os.close(saved_stderr)
            pm_logger.removeHandler(handler)
    return lines


def _prepare_dry_run(out: Path) -> None:
    """A dry run computes everything again, in its own folders under ``<build>/dry-run``."""
    from . import dryrun

    os.environ.setdefault(dryrun.ENV, str(out / "fixtures"))
    os.environ.setdefault("PERPLIB_CACHE", str(out / "cache"))
    for name in ("results", "figures", "tables", "cache"):
        path = out / name
        if path.exists() and path.resolve() in {
            Path(p).resolve() for p in (paths.results_dir(), paths.figures_dir(), paths.tables_dir(), paths.cache_dir())
        }:
            shutil.rmtree(path)
    dryrun.root()  # generate the fixtures now, not inside the first notebook


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perplib.reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="embedded", help=f"parameter profile, one of {profiles()}")
    parser.add_argument("--only", action="append", default=[], help="notebook stem(s) to run (default: all)")
    parser.add_argument("--kernel", default="python3", help="Jupyter kernel name")
    parser.add_argument("--dry-run", action="store_true",
                        help="the profile's grids and code paths on tiny models and local fixtures (perplib.dryrun), "
                             "outputs under <build>/dry-run")  # fmt: skip
    parser.add_argument("--keep-going", action="store_true", help="run the remaining notebooks after a failure")
    parser.add_argument("--xfail", action="append", default=[], metavar="STEM",
                        help="a notebook expected to fail (a known bug being fixed): its failure is reported and "
                             "does not fail the run, but its success does, so that the entry gets removed")  # fmt: skip
    from . import runtime

    runtime.add_arguments(parser)
    args = parser.parse_args(argv)

    from . import dryrun

    try:
        threads = args.threads or runtime.env_threads() or runtime.usable_cpus()
        flush = False if args.no_flush_denormals else runtime.env_flush()
        keep = False if args.no_keep_freed_memory else runtime.env_keep()
    except ValueError as e:
        parser.error(str(e))

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
    if unknown := set(args.xfail) - {b.stem for b in sorted(notebooks_dir().glob("*.ipynb"))}:
        parser.error(f"--xfail names unknown notebook(s) {sorted(unknown)}")
    # every notebook's parameters before anything runs: a profile error fails now, not after an hour
    try:
        plan = {book: notebook_parameters(args.profile, book.stem, declared_parameters(book)) for book in books}
        if args.dry_run:
            for book, params in plan.items():
                dryrun.check_parameters(book.stem, params)
    except ValueError as e:
        parser.error(str(e))

    out_dir = paths.build_dir() / args.profile
    if args.dry_run:
        dry = paths.build_dir() / "dry-run"
        _prepare_dry_run(dry)
        out_dir = dry / args.profile
    out_dir.mkdir(parents=True, exist_ok=True)
    label = f"profile {args.profile}" + (" (dry run)" if args.dry_run else "")
    print(f"{len(books)} notebook(s), {label}, one at a time with {threads} torch thread(s), denormals "
          f"{'flushed' if flush else 'kept'}, freed memory {'kept' if keep else 'as malloc decides'}; logs and "
          f"executed notebooks in {out_dir}", flush=True)  # fmt: skip

    with _kernel_environment(threads, flush, keep):
        return _run(args, plan, out_dir)


@contextlib.contextmanager
def _kernel_environment(threads: int, flush: bool, keep: bool) -> Iterator[None]:
    """The kernels' CPU settings, in the environment they inherit while the notebooks run
    (``perplib.runtime.ensure`` reads them at each run; torch reads ``OMP_NUM_THREADS`` at import)."""
    from . import runtime

    wanted = {
        runtime.THREADS_ENV: str(threads),
        "OMP_NUM_THREADS": str(threads),
        runtime.FLUSH_ENV: str(int(flush)),
        runtime.KEEP_ENV: str(int(keep)),
    }
    before = {name: os.environ.get(name) for name in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _run(args: argparse.Namespace, plan: dict[Path, dict[str, Any]], out_dir: Path) -> int:
    """Execute the notebooks of ``plan`` one after the other; returns the exit status."""
    from . import dryrun

    failed: list[str] = []
    expected, unexpected = [], []  # --xfail notebooks that failed / passed
    start = time.perf_counter()
    for i, (book, params) in enumerate(plan.items(), 1):
        if args.dry_run:
            params, cut = dryrun.cut_parameters(book.stem, params)
            print(f"[{book.stem}] dry run cuts {', '.join(f'{k}={v!r}' for k, (_, v) in cut.items()) or 'nothing'}")
        t0 = time.perf_counter()
        try:
            lines = _execute(book, params, out_dir, args.kernel, sys.stdout)
        except Exception as e:  # papermill's PapermillExecutionError names the cell and the exception
            reason = f"{getattr(e, 'ename', type(e).__name__)}: {getattr(e, 'evalue', e)}"
            verdict = "failed as expected (--xfail)" if book.stem in args.xfail else "FAILED"
            print(f"== [{i}/{len(plan)}] {book.stem} {verdict} after {time.perf_counter() - t0:.0f}s: {reason}\n"
                  f"   log: {out_dir / (book.stem + '.log')}, notebook: {out_dir / book.name}", flush=True)  # fmt: skip
            if book.stem in args.xfail:
                expected.append(book.stem)
                continue
            failed.append(book.stem)
            if not args.keep_going:
                break
            continue
        if book.stem in args.xfail:
            unexpected.append(book.stem)
        runs = f"{lines.runs} runs ({lines.reused} reused, {lines.runs - lines.reused} computed)" if lines.runs else ""
        print(f"== [{i}/{len(plan)}] {book.stem}: {runs + ', ' if runs else ''}"
              f"{time.perf_counter() - t0:.0f}s", flush=True)  # fmt: skip

    from .claims import combine_claims

    claims = combine_claims(args.profile)
    if claims:
        print(f"claims of every notebook: {claims['md']}")
    total = time.perf_counter() - start
    if expected:
        print(f"expected failures (--xfail): {expected}")
    if unexpected:
        print(f"passed although expected to fail: {unexpected}; remove them from --xfail (Makefile DRY_RUN_XFAIL)")
    if failed or unexpected:
        print(f"{len(failed)} notebook(s) failed: {failed} ({total:.0f}s)", flush=True)
        return 1
    print(f"all {len(plan)} notebooks done in {total:.0f}s; figures in {paths.figures_dir() / args.profile}, "
          f"tables in {paths.tables_dir() / args.profile}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
