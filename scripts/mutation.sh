#!/usr/bin/env bash
# Mutation testing of the modules that hold the sync invariants (pyproject [tool.mutmut]).
# Not part of CI: it is slow. It changes the library one small edit at a time (a mutant) and
# runs the tests that reach the edited function; a mutant no test notices "survives" and
# points at a promise no test defends.
#
#   scripts/mutation.sh [--budget SECONDS] [--tests 'TEST_PATH...'] [MUTANT_GLOB...]
#
#   --budget  stop after this many seconds (default 3600); results so far are kept in
#             ./mutants/ and the next run carries on from them
#   --tests   run with this test selection instead of pyproject's, in a scratch copy of the
#             checkout (./mutants-tests/, kept between runs like ./mutants/): the format
#             modules are reached by the slow multi-device tests, so they are run with
#             --tests 'tests/test_bundle_format.py tests/test_bomb.py tests/test_fuzz_readers.py'
#   MUTANT_GLOB  only these mutants, e.g. 'bundlesync.sync.dequeue.*' (default: all); named
#             mutants are run again even if they have a result, so name a survivor to re-check it
#
# Runs under `nice -n 10` with one test process (MUTMUT_CHILDREN=N for more), then prints
# the counts per status and every survivor (`python -m mutmut show NAME` shows its diff).
source "$(dirname "$0")/_venv.sh"
cd "$ROOT"
budget=3600
if [ "${1:-}" = "--budget" ]; then
    budget="$2"
    shift 2
fi
if [ "${1:-}" = "--tests" ]; then
    selection="$2"
    shift 2
    scratch="$ROOT/mutants-tests"
    mkdir -p "$scratch"
    git ls-files -z | tar --null -T - -cf - | (cd "$scratch" && tar xf -)
    ln -sfn "$VENV" "$scratch/.venv"
    SELECTION="$selection" python - "$scratch/pyproject.toml" <<'PY'
import os, re, sys
path = sys.argv[1]
text = open(path).read()
tests = ", ".join(f'"{t}"' for t in os.environ["SELECTION"].split())
text = re.sub(r"pytest_add_cli_args_test_selection = \[.*?\n\]", f"pytest_add_cli_args_test_selection = [{tests}]",
              text, flags=re.S)
open(path, "w").write(text)
PY
    cd "$scratch"
fi
status=0
timeout --signal=INT --kill-after=30 "$budget" \
    nice -n 10 python -m mutmut run --max-children "${MUTMUT_CHILDREN:-1}" "$@" >mutants-run.log 2>&1 || status=$?
if [ "$status" = 124 ]; then
    echo "mutation: stopped after the ${budget}s budget; run again to continue" >&2
elif [ "$status" != 0 ]; then
    echo "mutation: mutmut exited $status; see mutants-run.log" >&2
fi
python -m mutmut results --all true >mutants-results.txt 2>&1 || true
echo "mutants by status:"
sed -n 's/.*: \([a-z ]*\)$/\1/p' mutants-results.txt | sort | uniq -c
echo "by module:"
sed -n 's/^ *\(.*\)\.x[^.]*__mutmut_[0-9]*: \([a-z ]*\)$/\1: \2/p' mutants-results.txt | sort | uniq -c
echo "survivors:"
grep -E ': survived$' mutants-results.txt || echo "  (none)"
