"""The results store: one JSON record per run, keyed by its configuration.

A record carries the full configuration, metrics, timings, package versions and the git
revision. It is written atomically (temporary file + ``os.replace``) only once the run has
finished, so an interrupted run leaves nothing behind and a rerun recomputes exactly the runs
that did not finish; finished ones are reused (``ResultStore.run``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from . import paths

SCHEMA = 1


def _plain(config: Any) -> dict[str, Any]:
    if is_dataclass(config):
        config = asdict(config)
    if not isinstance(config, Mapping):
        raise TypeError(f"a run configuration must be a dataclass or a mapping, got {type(config).__name__}")
    return json.loads(json.dumps(dict(config), sort_keys=True, default=str))


def config_key(config: Any) -> str:
    """Stable short hash of a configuration (key order and dataclass vs dict do not matter). A
    configuration with a ``key_view()`` method is keyed by what it returns (e.g. ``RunConfig``
    leaves fields added later out while they hold their default)."""
    view = getattr(config, "key_view", None)
    blob = json.dumps(_plain(view() if callable(view) else config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded with every result."""
    import importlib.metadata as md

    versions = {}
    for pkg in ("perplib", "torch", "torchvision", "transformers", "peft", "datasets", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    try:
        proc = subprocess.run(
            ["git", "rev-parse", "--verify", "-q", "HEAD"],
            cwd=paths.repo_root(),
            capture_output=True,
            text=True,
            timeout=5,
        )
        rev = proc.stdout.strip() if proc.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        rev = None
    device, settings = "cpu", None
    try:
        import torch

        from . import runtime

        if torch.cuda.is_available():
            device = torch.cuda.get_device_name(0)
        settings = runtime.settings()  # thread count and denormal flushing the run computed with
    except ImportError:
        pass
    return {
        "versions": versions,
        "python": platform.python_version(),
        "git_revision": rev,
        "device": device,
        "host_cpus": os.cpu_count(),
        "runtime": settings,
    }


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see either the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; records and tables are meant to be shared
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ResultStore:
    """A folder of records ``<kind>/<key>.json``."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root) if root is not None else paths.results_dir()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise PermissionError(
                f"results folder '{self.root}' cannot be written ({e.strerror or e}); "
                "set PERPLIB_RESULTS or --results to a writable folder"
            ) from None

    @classmethod
    def for_profile(cls, profile: str) -> ResultStore:
        """The store of one reproduction profile: ``<results>/<profile>``."""
        return cls(paths.results_dir() / profile)

    def path(self, kind: str, config: Any) -> Path:
        return self.root / kind / f"{config_key(config)}.json"

    def get(self, kind: str, config: Any) -> dict[str, Any] | None:
        """The finished record for this configuration, or None."""
        p = self.path(kind, config)
        if not p.exists():
            return None
        return json.loads(p.read_text())

    def put(self, kind: str, config: Any, result: Mapping[str, Any]) -> dict[str, Any]:
        """Store a finished run; ``result`` holds ``metrics``, ``timings`` and any extra fields."""
        record = {
            "schema": SCHEMA,
            "kind": kind,
            "key": config_key(config),
            "config": _plain(config),
            **dict(result),
            "env": environment(),
            "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        write_atomic(self.path(kind, config), json.dumps(record, indent=1, sort_keys=True, default=_json_default))
        return record

    def run(
        self, kind: str, config: Any, fn: Callable[[], Mapping[str, Any]], *, force: bool = False
    ) -> dict[str, Any]:
        """Reuse the finished record for ``config`` or compute it with ``fn`` and store it. A run
        computes under the process's CPU runtime settings (``runtime.ensure``: denormals flushed
        and the thread count, unless configured otherwise), which its record keeps in ``env.runtime``."""
        if not force and (done := self.get(kind, config)) is not None:
            done["reused"] = True
            return done
        from . import runtime

        runtime.ensure()
        record = self.put(kind, config, fn())
        record["reused"] = False
        return record

    def records(self, kind: str | None = None) -> list[dict[str, Any]]:
        """All finished records (of one kind), oldest first."""
        pattern = f"{kind}/*.json" if kind else "*/*.json"
        out = [json.loads(p.read_text()) for p in self.root.glob(pattern)]
        return sorted(out, key=lambda r: r.get("finished", ""))

    def frame(self, kind: str | None = None, records: Iterable[Mapping[str, Any]] | None = None):
        """Records flattened into a DataFrame: ``config.*``, ``metrics.*``, ``timings.*`` columns."""
        import pandas as pd

        rows = list(records) if records is not None else self.records(kind)
        return pd.json_normalize(rows, sep=".") if rows else pd.DataFrame()


def _json_default(obj: Any) -> Any:
    try:
        import numpy as np
        import torch

        if isinstance(obj, torch.Tensor):
            return obj.tolist()
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:
        pass
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot store {type(obj).__name__} in a result record")
