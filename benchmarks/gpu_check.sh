#!/usr/bin/env bash
# The GPU check: CUDA tests, the CLIP embed benchmark and the SD-1.5-sized synthesis benchmark in one run of
# at most 8 minutes, results in benchmarks/results/gpu.json and a summary on stdout (benchmarks/gpu_check.py).
#
# On a fresh GPU machine, from the repository root:
#   pip install -c constraints.txt -e '.[dev]' && bash benchmarks/gpu_check.sh
# On any machine, the same code with tiny shapes on CPU (output to a temporary file):
#   bash benchmarks/gpu_check.sh --cpu-smoke
#
# It installs nothing. Python: $PYTHON, else the project's .venv when there is one, else python (an
# activated virtualenv), else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python
  elif command -v python >/dev/null; then PYTHON=python
  else PYTHON=python3; fi
fi
exec "$PYTHON" benchmarks/gpu_check.py --python "$PYTHON" "$@"
