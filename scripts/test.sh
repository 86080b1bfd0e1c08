#!/usr/bin/env bash
# Runs the test suite in a local virtual environment it creates on first use.
source "$(dirname "$0")/_venv.sh"
cd "$ROOT"
python -m mypy  # library, tests and scripts are typed strictly (pyproject [tool.mypy])
exec python -m pytest -n auto "$@"
