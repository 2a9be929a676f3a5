import json

import nbformat
import pytest

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


def fake_repo(root, profile_text, cells):
    """A checkout with one notebook (``x``: a parameters cell, then ``cells``) and one profile ``p``."""
    (root / "notebooks" / "profiles").mkdir(parents=True)
    (root / "notebooks" / "profiles" / "p.yaml").write_text(profile_text)
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('profile = "smoke"\nmodels = ["tiny-opt"]\nsteps = 2')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, *(nbformat.v4.new_code_cell(c) for c in cells)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, root / "notebooks" / "x.ipynb")


def test_each_notebook_gets_exactly_its_declared_parameters(tmp_path, monkeypatch):
    monkeypatch.setenv("PERPLIB_ROOT", str(tmp_path))
    fake_repo(tmp_path, "common: {seqlen: 64, steps: 3}\nx: {models: [a]}\n", [])
    book = tmp_path / "notebooks" / "x.ipynb"
    assert reproduce.declared_parameters(book) == ["profile", "models", "steps"]
    # common values the notebook does not declare are left out; the notebook's own win
    assert reproduce.notebook_parameters("p", "x", ["profile", "models", "steps"]) == {
        "profile": "p", "models": ["a"], "steps": 3
    }  # fmt: skip
    (tmp_path / "notebooks" / "profiles" / "p.yaml").write_text("x: {models: [a], step: 3}\n")
    with pytest.raises(ValueError, match=r"x has no parameter\(s\) \['step'\]"):
        reproduce.notebook_parameters("p", "x", ["profile", "models", "steps"])
    (tmp_path / "notebooks" / "profiles" / "p.yaml").write_text("x: {models: [a]}\n")
    with pytest.raises(ValueError, match=r"no value for x's parameter\(s\) \['steps'\]"):
        reproduce.notebook_parameters("p", "x", ["profile", "models", "steps"])


def test_every_profile_sets_every_parameter_of_every_notebook():
    for profile in reproduce.profiles():
        for book in sorted((paths.repo_root() / "notebooks").glob("*.ipynb")):
            reproduce.notebook_parameters(profile, book.stem, reproduce.declared_parameters(book))


def test_dry_run_fails_early_on_a_model_id_the_mapping_does_not_cover(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PERPLIB_ROOT", str(tmp_path))
    monkeypatch.setenv("PERPLIB_BUILD", str(tmp_path / "build"))
    fake_repo(tmp_path, "x: {models: [facebook/opt-1.3b, google/gemma-2b], steps: 1000}\n", ["1 / 0"])
    with pytest.raises(SystemExit) as exit_:
        reproduce.main(["--profile", "p", "--dry-run"])
    assert exit_.value.code == 2
    assert "x, parameter 'models': model id 'google/gemma-2b' is not covered" in capsys.readouterr().err
    assert not (tmp_path / "build").exists()  # nothing ran, no fixtures were built


def test_console_shows_run_lines_and_one_line_per_notebook_the_log_has_the_rest(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PERPLIB_ROOT", str(tmp_path))
    monkeypatch.setenv("PERPLIB_BUILD", str(tmp_path / "build"))
    cells = [
        'import sys\nprint("chatter", models, steps)\nprint("[1/2] model=a (reused)")\nprint("[2/2] model=b (3s)")\n'
        'print("stderr chatter", file=sys.stderr)',
        "from perplib.claims import Claim, save_claims\n"
        'save_claims([Claim("C1", "a claim", "Section 1", "1", "1", True)], "x", profile)',
    ]
    fake_repo(tmp_path, "common: {seqlen: 64}\nx: {models: [a], steps: 3}\n", cells)
    monkeypatch.setenv("PYTHONPATH", str(paths.Path(reproduce.__file__).parents[1]))  # the kernel imports this perplib
    assert reproduce.main(["--profile", "p"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "    [1/2] model=a (reused)" in out and "    [2/2] model=b (3s)" in out
    assert any(line.startswith("== [1/1] x: 2 runs (1 reused, 1 computed), ") for line in out)
    assert not any("chatter" in line or "Executing" in line or "unknown parameter" in line for line in out)
    assert any(line.startswith("claims of every notebook: ") and line.endswith("claims.md") for line in out)
    log = (tmp_path / "build" / "p" / "x.log").read_text()
    assert "chatter ['a'] 3" in log and "stderr chatter" in log and "[2/2] model=b (3s)" in log
    executed = nbformat.read(tmp_path / "build" / "p" / "x.ipynb", as_version=4)
    injected = next(c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", []))
    assert "seqlen" not in injected.source and "steps = 3" in injected.source


def test_xfail_notebooks_must_fail_and_a_pass_fails_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PERPLIB_ROOT", str(tmp_path))
    monkeypatch.setenv("PERPLIB_BUILD", str(tmp_path / "build"))
    fake_repo(tmp_path, "x: {models: [a], steps: 13}\n", ["assert steps != 13, 'the known bug'"])
    with pytest.raises(SystemExit, match="2"):
        reproduce.main(["--profile", "p", "--xfail", "no_such_notebook"])
    assert reproduce.main(["--profile", "p", "--xfail", "x"]) == 0
    assert "x failed as expected (--xfail) after" in capsys.readouterr().out
    assert reproduce.main(["--profile", "p"]) == 1  # the same failure without --xfail fails the run
    (tmp_path / "notebooks" / "profiles" / "p.yaml").write_text("x: {models: [a], steps: 2}\n")
    assert reproduce.main(["--profile", "p", "--xfail", "x"]) == 1  # fixed: the --xfail entry must go
    assert "passed although expected to fail: ['x']" in capsys.readouterr().out


def test_kernels_get_an_explicit_thread_count_and_flushing_and_a_bad_count_stops_early(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PERPLIB_ROOT", str(tmp_path))
    monkeypatch.setenv("PERPLIB_BUILD", str(tmp_path / "build"))
    for name in ("PERPLIB_THREADS", "OMP_NUM_THREADS", "PERPLIB_FLUSH_DENORMALS"):  # restored after the test
        monkeypatch.setenv(name, "")
    cells = ["import os, torch\nfrom perplib import runtime\n"
             "print('settings', runtime.ensure(), os.environ['OMP_NUM_THREADS'])"]  # fmt: skip
    fake_repo(tmp_path, "x: {models: [a], steps: 3}\n", cells)
    monkeypatch.setenv("PYTHONPATH", str(paths.Path(reproduce.__file__).parents[1]))  # the kernel imports this perplib
    with pytest.raises(SystemExit) as exit_:
        reproduce.main(["--profile", "p", "--threads", "0"])
    assert exit_.value.code == 2 and "argument --threads: '0' is not a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "build").exists()
    assert reproduce.main(["--profile", "p", "--threads", "1", "--no-flush-denormals", "--no-keep-freed-memory"]) == 0
    assert (
        "one at a time with 1 torch thread(s), denormals kept, freed memory as malloc decides"
        in capsys.readouterr().out
    )
    log = (tmp_path / "build" / "p" / "x.log").read_text()
    assert "settings {'torch_threads': 1, 'flush_denormals': False, 'keep_freed_memory': False} 1" in log
    assert reproduce.main(["--profile", "p"]) == 0  # default: every usable CPU, denormals flushed
    log = (tmp_path / "build" / "p" / "x.log").read_text()
    from perplib import runtime

    n = runtime.usable_cpus()
    assert f"settings {{'torch_threads': {n}, 'flush_denormals': True, 'keep_freed_memory': True}} {n}" in log
