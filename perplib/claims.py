"""The paper's claims, checked against our records: one table per notebook, one over all of them.

Every notebook ends with a claims table built by :func:`save_claims`: the claim (one line, with
the paper's section or table), the paper's number(s), ours, and whether it holds here. A claim
is checked with a rule fixed before the numbers are seen (the ``rule`` column says which); a claim
that fails is reported as failing (✗), never dropped, and a claim the profile cannot measure is
reported as not measured (–). :func:`combine_claims` gathers every notebook's claims into
``tables/<profile>/claims.md`` (``make reproduce`` calls it after the last notebook).

The check functions that turn records into :class:`Claim` objects live next to the artefacts
they read (LLM: :mod:`perplib.artefacts`; vision: :mod:`perplib.vision.artefacts`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import paths

HOLDS = {True: "✓", False: "✗", None: "–"}
COLUMNS = ["id", "claim", "source", "paper", "ours", "rule", "holds"]


@dataclass(frozen=True)
class Claim:
    """One claim of the paper and what our records say about it."""

    id: str = field(metadata={"help": "short stable identifier, e.g. 'C1'"})
    claim: str = field(metadata={"help": "the paper's statement in one line"})
    source: str = field(metadata={"help": "where the paper says it, e.g. 'Section 3.3, Table 2'"})
    paper: str = field(metadata={"help": "the paper's number(s) behind the claim"})
    ours: str = field(metadata={"help": "our number(s), from the records"})
    holds: bool | None = field(metadata={"help": "True / False; None when this profile cannot measure it"})
    rule: str = field(default="", metadata={"help": "the test applied to our numbers, fixed in advance"})

    def __post_init__(self) -> None:
        for name in ("id", "claim", "source"):
            if not str(getattr(self, name)).strip():
                raise ValueError(f"a claim needs a non-empty {name}, got {getattr(self, name)!r}")
        if self.holds not in (True, False, None):
            raise ValueError(f"holds must be True, False or None (not measured), got {self.holds!r}")


def claims_frame(claims: Iterable[Claim]):
    """A DataFrame with one row per claim and the columns of :data:`COLUMNS` (holds as ✓/✗/–)."""
    import pandas as pd

    rows = []
    for c in claims:
        if not isinstance(c, Claim):
            raise TypeError(f"claims must be Claim objects, got {type(c).__name__}")
        row = asdict(c)
        row["holds"] = HOLDS[c.holds]
        rows.append(row)
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise ValueError(f"claim ids must be unique within a notebook, got {ids}")
    return pd.DataFrame(rows, columns=COLUMNS)


def save_claims(claims: Iterable[Claim], notebook: str, profile: str) -> dict[str, Path]:
    """Write ``tables/<profile>/claims_<notebook>.csv`` and ``.md``; returns the paths."""
    from .report import save_table

    frame = claims_frame(claims)
    if frame.empty:
        raise ValueError(f"notebook {notebook!r} states no claims")
    frame.insert(0, "notebook", notebook)
    return save_table(frame, f"claims_{notebook}", profile)


def combine_claims(profile: str) -> dict[str, Path] | None:
    """Gather every ``claims_<notebook>.csv`` of a profile into ``tables/<profile>/claims.{csv,md}``
    (notebooks in name order). Returns the paths, or None when no notebook wrote claims."""
    import pandas as pd

    from .report import save_table

    folder = paths.tables_dir() / profile
    parts = sorted(folder.glob("claims_*.csv"))
    if not parts:
        return None
    frame = pd.concat([pd.read_csv(p, dtype=str, keep_default_na=False) for p in parts], ignore_index=True)
    return save_table(frame, "claims", profile)
