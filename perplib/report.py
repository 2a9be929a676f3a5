"""The one place figures and tables are written: built from records, saved atomically.

Tables: CSV (machine-readable) + Markdown (for the README and reviewers).
Figures: PNG + PDF. Both go to ``<figures|tables>/<profile>/<name>.*``.

Both are byte-stable: the same records give the same bytes on every run, so a rerun of
``make reproduce`` that reuses every record leaves the checkout unchanged. Figures carry no
creation date and no software version (matplotlib writes both by default); tables are written
with fixed line endings and float formatting.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from . import paths


def records_table(records, config: list[str], metrics: list[str], extra: dict[str, str] | None = None):
    """A DataFrame with one row per record: the named configuration fields, then the named
    metrics (``extra`` maps a column name to any dotted path, e.g. ``{"prune_s": "timings.prune_s"}``).
    Missing values become NaN, so records of different kinds can share a table."""
    import pandas as pd

    def dig(record, dotted):
        value = record
        for part in dotted.split("."):
            if not isinstance(value, dict) or part not in value:
                return None
            value = value[part]
        return value

    columns = {c: f"config.{c}" for c in config} | {m: f"metrics.{m}" for m in metrics} | dict(extra or {})
    return pd.DataFrame([{name: dig(r, path) for name, path in columns.items()} for r in records])


def save_table(df, name: str, profile: str, *, floatfmt: str = ".4g", index: bool = False) -> dict[str, Path]:
    """Write ``df`` as ``tables/<profile>/<name>.csv`` and ``.md``; returns the paths."""
    if df is None or len(df) == 0:
        raise ValueError(f"table '{name}' has no rows: no records matched; run the experiments first")
    out = paths.tables_dir() / profile
    csv_path, md_path = out / f"{name}.csv", out / f"{name}.md"
    write_if_changed(csv_path, df.to_csv(index=index, lineterminator="\n").encode())
    write_if_changed(md_path, (df.to_markdown(index=index, floatfmt=floatfmt) + "\n").encode())
    return {"csv": csv_path, "md": md_path}


# No creation date, no software version: the same figure gives the same bytes on every run.
FIGURE_METADATA = {
    "png": {"Software": None},
    "pdf": {"Creator": None, "Producer": None, "CreationDate": None},
}


def figure_bytes(fig, ext: str, *, dpi: int = 150) -> bytes:
    """``fig`` rendered as ``png`` or ``pdf``, byte-stable (see :data:`FIGURE_METADATA`)."""
    if ext not in FIGURE_METADATA:
        raise ValueError(f"figure format must be one of {list(FIGURE_METADATA)}, got {ext!r}")
    buf = io.BytesIO()
    fig.savefig(buf, format=ext, dpi=dpi, bbox_inches="tight", metadata=FIGURE_METADATA[ext])
    return buf.getvalue()


def save_figure(fig, name: str, profile: str, *, dpi: int = 150) -> dict[str, Path]:
    """Write ``fig`` as ``figures/<profile>/<name>.png`` and ``.pdf``; returns the paths."""
    out = paths.figures_dir() / profile
    written = {}
    for ext in FIGURE_METADATA:
        written[ext] = out / f"{name}.{ext}"
        write_if_changed(written[ext], figure_bytes(fig, ext, dpi=dpi))
    return written


def write_if_changed(path: Path, data: bytes) -> None:
    """Atomic write that leaves an identical file untouched (its modification time too)."""
    if path.is_file() and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    tmp.replace(path)
