import json

import pytest

from perplib.config import RunConfig
from perplib.report import records_table, save_table
from perplib.results import ResultStore, config_key


def test_key_ignores_order_and_type_of_config():
    cfg = RunConfig(model="tiny-llama", seqlen=64)
    # the keyed view (fields added later are left out while at their default), in reverse order
    as_dict = dict(reversed(list(cfg.key_view().items())))
    assert config_key(cfg) == config_key(as_dict)
    assert config_key(cfg) != config_key(cfg.replace(seqlen=65))


def test_sparsity_spellings_share_a_key():
    a = RunConfig(prune="magnitude", sparsity="50%")
    b = RunConfig(prune="magnitude", sparsity="0.5")
    assert a.sparsity == b.sparsity == "0.5" and config_key(a) == config_key(b)


def test_finished_record_is_reused(tmp_path):
    store = ResultStore(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return {"metrics": {"perplexity": 3.0}, "timings": {}}

    first = store.run("llm", {"a": 1}, compute)
    second = store.run("llm", {"a": 1}, compute)
    assert len(calls) == 1 and not first["reused"] and second["reused"]
    assert second["metrics"] == {"perplexity": 3.0} and second["config"] == {"a": 1}
    assert "versions" in second["env"] and second["env"]["versions"]["torch"]


def test_crashed_run_leaves_nothing_and_is_recomputed(tmp_path):
    store = ResultStore(tmp_path)

    def crash():
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        store.run("llm", {"a": 2}, crash)
    assert store.get("llm", {"a": 2}) is None
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob("*.json"))
    record = store.run("llm", {"a": 2}, lambda: {"metrics": {"x": 1}})
    assert not record["reused"] and json.loads(store.path("llm", {"a": 2}).read_text())["metrics"] == {"x": 1}


def test_unwritable_results_folder_fails_early(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match="cannot be written"):
        ResultStore(blocker / "results")


def test_tables_are_built_from_records(tmp_path):
    store = ResultStore(tmp_path)
    for s in ("0.5", "0.7"):
        store.run("llm", {"sparsity": s}, lambda s=s: {"metrics": {"perplexity": float(s) * 10}})
    table = records_table(store.records("llm"), config=["sparsity"], metrics=["perplexity", "missing"])
    assert sorted(table["perplexity"]) == [5.0, 7.0] and table["missing"].isna().all()
    written = save_table(table, "t", "unit")
    assert written["csv"].read_text().startswith("sparsity,perplexity,missing")
    assert "sparsity |   perplexity" in written["md"].read_text()
    with pytest.raises(ValueError, match="no rows"):
        save_table(table.iloc[:0], "empty", "unit")


def test_a_computed_record_runs_under_and_carries_the_runtime_settings(tmp_path, monkeypatch):
    import torch

    from perplib import runtime

    threads = torch.get_num_threads()
    monkeypatch.setattr(runtime, "_state", {"flush_denormals": False, "keep_freed_memory": False, "configured": False})
    monkeypatch.setenv(runtime.THREADS_ENV, "1")
    monkeypatch.delenv(runtime.FLUSH_ENV, raising=False)
    monkeypatch.delenv(runtime.KEEP_ENV, raising=False)
    store = ResultStore(tmp_path)
    seen = []
    try:
        record = store.run("llm", {"a": 3}, lambda: seen.append(runtime.settings()) or {"metrics": {}})
    finally:
        runtime.configure(threads=threads, flush_denormals=False)
    # the defaults were applied before computing (flushing on, memory kept, PERPLIB_THREADS), recorded outside the key
    expected = {"torch_threads": 1, "flush_denormals": True, "keep_freed_memory": True}
    assert seen == [expected] == [record["env"]["runtime"]]
    assert record["key"] == config_key({"a": 3}) and "runtime" not in record["config"]
