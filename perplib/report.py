"""The one place figures and tables are written: built from records, saved atomically.

Tables: CSV (machine-readable) + Markdown (for the README and reviewers).
Figures: PNG + PDF. Both go to ``<figures|tables>/<profile>/<name>.*``.
"""

from __future__ import annotations

import io
from pathlib import Path

from . import paths
from .results import write_atomic


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
    write_atomic(csv_path, df.to_csv(index=index))
    write_atomic(md_path, df.to_markdown(index=index, floatfmt=floatfmt) + "\n")
    return {"csv": csv_path, "md": md_path}


def save_figure(fig, name: str, profile: str, *, dpi: int = 150) -> dict[str, Path]:
    """Write ``fig`` as ``figures/<profile>/<name>.png`` and ``.pdf``; returns the paths."""
    out = paths.figures_dir() / profile
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for ext in ("png", "pdf"):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, dpi=dpi, bbox_inches="tight")
        target = out / f"{name}.{ext}"
        tmp = target.with_suffix(f".{ext}.tmp")
        tmp.write_bytes(buf.getvalue())
        tmp.replace(target)
        written[ext] = target
    return written
