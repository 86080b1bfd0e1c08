#!/usr/bin/env bash
# Runs the test suite in a local virtual environment it creates on first use.
source "$(dirname "$0")/_venv.sh"
cd "$ROOT"
python -m mypy  # library, tests and scripts are typed strictly (pyproject [tool.mypy])
# --slow adds the measurements at scale (tests marked slow: the live app beside a 100k-record
# sync, memory at 20k vs 200k records), about two more minutes.
if [ "${1:-}" = "--slow" ]; then
    shift
    exec python -m pytest -n auto -m "slow or not slow" "$@"
fi
exec python -m pytest -n auto "$@"
