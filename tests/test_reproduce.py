import json

import nbformat

from perplib import paths, reproduce


def test_profiles_exist_and_notebooks_have_parameters():
    assert {"smoke", "embedded", "paper"} <= set(reproduce.profiles())
    for book in sorted((paths.repo_root() / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(book, as_version=4)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{book.name} needs exactly one cell tagged 'parameters'"
        source = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        assert "def " not in source and "class " not in source, f"{book.name}: helpers belong in perplib"


def test_papermill_runs_dense_baselines_at_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("PERPLIB_BUILD", str(tmp_path / "build"))
    assert reproduce.main(["--profile", "smoke", "--only", "00_dense_baselines"]) == 0
    table = (paths.tables_dir() / "smoke" / "dense_baselines.csv").read_text()
    assert table.splitlines()[0] == "model,eval,seqlen,windows,tokens,perplexity" and "tiny-opt" in table
    assert (paths.figures_dir() / "smoke" / "dense_baselines.png").stat().st_size > 1000
    records = list((paths.results_dir() / "smoke" / "llm").glob("*.json"))
    assert len(records) == 2 and json.loads(records[0].read_text())["config"]["seqlen"] == 64
