#!/usr/bin/env bash
# kolibri_check.sh — the built-in Kolibri profile against a real Kolibri 0.19.5 database (not run in CI).
#
# Makes a real Kolibri database with the Kolibri kit's make_kolibri_db.sh (installs kolibri==0.19.5 into a
# cached venv; about a minute), adds with Kolibri's own models the rows its generator leaves out
# (scripts/kolibri_enrich.py: groups, course sessions, learner lesson/quiz copies…), then runs
# scripts/kolibri_check.py: partitions against Kolibri's, A -> B full, A -> learner device, SQL edits on every
# side, sync back, every table and column compared. Exit 0 when everything agrees.
#
# Usage: MAKE_KOLIBRI_DB=/path/to/make_kolibri_db.sh scripts/kolibri_check.sh [WORKDIR] [small|medium|large]
#    or: KOLIBRI_DB=/path/to/kolibri.sqlite3 scripts/kolibri_check.sh [WORKDIR]   (use an existing database)
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
cd "$ROOT"
WORK=$(realpath -m "${1:-$ROOT/kolibri-check}")
SIZE=${2:-small}
mkdir -p "$WORK"
if [ -z "${KOLIBRI_DB:-}" ]; then
  [ -n "${MAKE_KOLIBRI_DB:-}" ] && [ -f "$MAKE_KOLIBRI_DB" ] ||
    { echo "error: set MAKE_KOLIBRI_DB to the Kolibri kit's make_kolibri_db.sh, or KOLIBRI_DB to a Kolibri database" >&2; exit 2; }
  KOLIBRI_DB="$WORK/kolibri.sqlite3"
  rm -f "$KOLIBRI_DB"
  echo "making a Kolibri database ($SIZE) ..." >&2
  MAKE_KOLIBRI_DB_KEEP=1 bash "$MAKE_KOLIBRI_DB" "$KOLIBRI_DB" "$SIZE" > "$WORK/make.json" 2> "$WORK/make.log" ||
    { tail -n 20 "$WORK/make.log" >&2; exit 1; }
  KIT_WORK=$(sed -n 's/^make_kolibri_db: kept work folder \(.*\) (home.*$/\1/p' "$WORK/make.log")
  VENV=${KOLIBRI_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/bundlesync-kolibri/venv-0.19.5}
  echo "adding rows with Kolibri's own models (scripts/kolibri_enrich.py) ..." >&2
  (
    export KOLIBRI_HOME="$KIT_WORK/home" KOLIBRI_LISTEN_ADDRESS=127.0.0.1 KOLIBRI_ZEROCONF_ENABLED=False \
      KOLIBRI_DISABLE_PING=True KOLIBRI_DATABASE_ENGINE=sqlite KOLIBRI_RUN_MODE=bundlesync-check
    "$VENV/bin/kolibri" manage --skip-update shell -c \
      "import runpy; runpy.run_path('$ROOT/scripts/kolibri_enrich.py', run_name='__main__')" > "$WORK/enrich.log" 2>&1
  ) || { tail -n 20 "$WORK/enrich.log" >&2; exit 1; }
  grep '^enriched' "$WORK/enrich.log" >&2
  python - "$KIT_WORK/home/db.sqlite3" "$KOLIBRI_DB" <<'PY'
import sqlite3, sys
src = sqlite3.connect(sys.argv[1]); dst = sqlite3.connect(sys.argv[2] + ".tmp")
src.backup(dst); dst.execute("PRAGMA journal_mode = DELETE"); dst.close(); src.close()
import os; os.replace(sys.argv[2] + ".tmp", sys.argv[2])
PY
  rm -rf -- "$KIT_WORK"
fi
exec python scripts/kolibri_check.py "$KOLIBRI_DB" "$WORK/run"
