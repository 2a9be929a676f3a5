"""Figures and tables are byte-stable: the same records give the same files, run after run."""

import subprocess
import sys

import pandas as pd

from perplib import paths, report

SCRIPT = """
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
from perplib.report import save_figure, save_table

table = pd.DataFrame({"method": ["PERP ✓", "Full IMP"], "sparsity": ["0.5", "2:4"], "perplexity": [13.0712345, 1e-7]})
save_table(table, "t", "p")
fig, ax = plt.subplots(figsize=(3, 2))
ax.plot([0.5, 0.6, 0.7], [13.1, 14.9, 31.0], marker="o", label="PERP ✓")
ax.set_yscale("log")
ax.legend()
ax.set_title("perplexity (wikitext2)")
save_figure(fig, "f", "p")
"""


def render(tmp_path, name):
    """Render one table and one figure in a fresh process (dates and hash seeds change between runs)."""
    env = {"PERPLIB_FIGURES": str(tmp_path / name), "PERPLIB_TABLES": str(tmp_path / name),
           "PYTHONPATH": str(paths.repo_root()), "PATH": "/usr/bin:/bin"}  # fmt: skip
    subprocess.run([sys.executable, "-c", SCRIPT], check=True, env=env, capture_output=True)
    return {p.name: p.read_bytes() for p in sorted((tmp_path / name / "p").iterdir())}


def test_figures_and_tables_are_byte_identical_run_to_run(tmp_path):
    first, second = render(tmp_path, "a"), render(tmp_path, "b")
    assert sorted(first) == ["f.pdf", "f.png", "t.csv", "t.md"]
    assert first == second
    assert b"CreationDate" not in first["f.pdf"] and b"Matplotlib" not in first["f.pdf"]
    assert b"Software" not in first["f.png"]
    assert first["t.csv"].decode().splitlines()[1] == "PERP ✓,0.5,13.0712345"


def test_an_unchanged_output_is_not_rewritten(tmp_path, monkeypatch):
    monkeypatch.setenv("PERPLIB_TABLES", str(tmp_path))
    written = report.save_table(pd.DataFrame({"a": [1.0]}), "t", "p")["csv"]
    stamp = written.stat().st_mtime_ns
    report.save_table(pd.DataFrame({"a": [1.0]}), "t", "p")
    assert written.stat().st_mtime_ns == stamp
    report.save_table(pd.DataFrame({"a": [2.0]}), "t", "p")
    assert written.read_text() == "a\n2.0\n"
