#!/usr/bin/env bash
# Runs the test suite in a local virtual environment it creates on first use.
source "$(dirname "$0")/_venv.sh"
cd "$ROOT"
python -m mypy  # the library is typed strictly (pyproject [tool.mypy])
exec python -m pytest -n auto "$@"
