#!/usr/bin/env bash
# Runs the test suite in a local virtual environment it creates on first use.
source "$(dirname "$0")/_venv.sh"
cd "$ROOT"
exec python -m pytest "$@"
