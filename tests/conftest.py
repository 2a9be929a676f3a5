"""Shared fixtures: every test writes results, figures and tables into its own temporary folders,
and nothing reaches for the network."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _isolated_outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("PERPLIB_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("PERPLIB_FIGURES", str(tmp_path / "figures"))
    monkeypatch.setenv("PERPLIB_TABLES", str(tmp_path / "tables"))


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded SmolLM2 tokenizer (converts the GGUF once into the cache on first use)."""
    from perplib.models import embedded_tokenizer

    return embedded_tokenizer()
