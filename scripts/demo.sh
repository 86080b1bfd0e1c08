#!/usr/bin/env bash
# Two-device demo on the bundled fixtures: A (the facility's authority, with data) and
# B (an empty device) exchange the facility through bundle files in ./demo/usb, then B
# edits rows with plain SQL and sends them back. Sets up ./.venv on first use.
source "$(dirname "$0")/_venv.sh"
cd "$ROOT"
DEMO="$ROOT/demo"
rm -rf "$DEMO" && mkdir -p "$DEMO/usb"
run() { printf '\n$ %s\n' "$*" >&2; "$@"; }

F=$(run python scripts/make_facility_db.py "$DEMO/a.sqlite3" --users 30 --logs 3000 --seed 1)
run python scripts/make_facility_db.py "$DEMO/b.sqlite3" --schema-only
export BUNDLESYNC_HOME
BUNDLESYNC_HOME="$DEMO/devA" run bundlesync init --db "$DEMO/a.sqlite3" --profile fixtures/facility_profile.yaml
BUNDLESYNC_HOME="$DEMO/devA" run bundlesync facility provision --facility "$F"
BUNDLESYNC_HOME="$DEMO/devB" run bundlesync init --db "$DEMO/b.sqlite3" --profile fixtures/facility_profile.yaml
REQ=$(BUNDLESYNC_HOME="$DEMO/devB" run bundlesync cert request --facility "$F" --scope full --out "$DEMO/usb")
GRANT=$(BUNDLESYNC_HOME="$DEMO/devA" run bundlesync cert issue "$REQ" --out "$DEMO/usb")
BUNDLESYNC_HOME="$DEMO/devB" run bundlesync cert install "$GRANT"

BUNDLE=$(BUNDLESYNC_HOME="$DEMO/devA" run bundlesync export --facility "$F" --out "$DEMO/usb" | tail -n 1)
BUNDLESYNC_HOME="$DEMO/devB" run bundlesync verify "$BUNDLE"
BUNDLESYNC_HOME="$DEMO/devB" run bundlesync import "$BUNDLE"
BUNDLESYNC_HOME="$DEMO/devB" run bundlesync import "$BUNDLE"     # again: a no-op

printf '\n# B edits with plain SQL (any SQLite client): update, insert, delete\n' >&2
python - "$DEMO/b.sqlite3" <<'PY'
import sqlite3, sys
c = sqlite3.connect(sys.argv[1])
c.execute("UPDATE kolibriauth_facilityuser SET full_name = 'Renamed on B' WHERE id = (SELECT min(id) FROM kolibriauth_facilityuser)")
c.execute("DELETE FROM logger_attemptlog WHERE id IN (SELECT id FROM logger_attemptlog ORDER BY id LIMIT 5)")
c.execute("""INSERT INTO kolibriauth_collection (id, name, kind, parent_id, dataset_id)
             SELECT lower(hex(randomblob(16))), 'Class made on B', 'classroom', id, dataset_id
             FROM kolibriauth_collection WHERE kind = 'facility'""")
c.commit()
PY
BACK=$(BUNDLESYNC_HOME="$DEMO/devB" run bundlesync export --facility "$F" --out "$DEMO/usb" | tail -n 1)
run bundlesync inspect "$BACK"
BUNDLESYNC_HOME="$DEMO/devA" run bundlesync import "$BACK"
BUNDLESYNC_HOME="$DEMO/devA" run bundlesync status

printf '\n# Compare every app table of A and B\n' >&2
python scripts/compare_dbs.py "$DEMO/a.sqlite3" "$DEMO/b.sqlite3" fixtures/facility_profile.yaml
