"""Clocks that are wrong: out-of-range clocks never wedge a device, skewed clocks never decide ties.

- A record arriving with a clock near 2^63 used to be accepted; every later edit of it then
  overflowed SQLite's integers (OverflowError on every export and import). It is now refused
  like any malformed record.
- A device clock at year 9999 used to overflow at the next export. Its reading is now brought
  into range, with a warning.
- After a device whose clock ran ten years ahead was fixed, every later concurrent edit of a
  record it touched tied on ``future + 1`` and the larger instance id won. Ties on the clock
  now go to the later edit (its own wall time); the merge is still a join (hypothesis).
"""

from __future__ import annotations

import datetime
import itertools
import json
import sqlite3
import time
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import Pair, run_cli
from test_merge import fold

from bundlesync.format import container
from bundlesync.format.records import HLC_MAX, Version
from bundlesync.replica.merge import merge
from bundlesync.trust.keystore import KeyStore

USERS = "kolibriauth_facilityuser"
TEN_YEARS_MS = 10 * 365 * 24 * 3600 * 1000


def execute(db: Path, statement: str, *params: object) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute(statement, params).fetchall()
        conn.commit()
        return rows
    finally:
        conn.close()


def sync(src: Path, dst: Path, pair: Pair) -> str:
    """Export from ``src`` (full), import into ``dst``; return the import's stderr."""
    bundle = run_cli(src, "export", "--facility", pair.facility, "--out", str(pair.usb), "--full", "--no-encrypt").last_line
    return run_cli(dst, "import", "--no-receipt", bundle).err


def instance(db: Path) -> str:
    return str(execute(db, "SELECT value FROM bundlesync_meta WHERE key = 'instance_id'")[0][0])


def test_a_record_with_an_extreme_clock_is_refused_and_the_device_goes_on(pair: Pair) -> None:
    bundle = Path(run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb), "--no-encrypt").last_line)
    info = container.read_info(bundle)
    lines = []
    for line in container.iter_records(info):
        head, tab, data = line.partition(b"\t")
        fields = json.loads(head)
        if fields["m"] == USERS:
            fields["h"] = (1 << 63) - 5  # a clock no device makes: every later edit would overflow
        lines.append(json.dumps(fields).encode() + tab + data)
    key = KeyStore(pair.a).device_key()
    manifest = {**info.manifest, "bundle_id": "e" * 32}
    with container.BundleWriter(pair.usb, "bundle-extreme.bsync", manifest, lambda d: key.sign("bundle", d)) as w:
        w.write_records(lines)
        extreme = w.finish({"counts": {}})
    for command in ("verify", "import"):
        refused = run_cli(pair.b, command, str(extreme), check=False)
        assert refused.code == 4 and "clock" in refused.err and "Traceback" not in refused.err, refused.err
    assert execute(pair.b_db, f"SELECT count(*) FROM {USERS}") == [(0,)]
    # B goes on: the honest bundle imports, B edits, exports, and A imports.
    run_cli(pair.b, "import", "--no-receipt", str(bundle))
    execute(pair.b_db, f"UPDATE {USERS} SET full_name = 'edited on B'")
    sync(pair.b, pair.a, pair)
    assert set(execute(pair.a_db, f"SELECT full_name FROM {USERS}")) == {("edited on B",)}


def test_a_device_clock_at_year_9999_is_brought_into_range(pair: Pair) -> None:
    sync(pair.a, pair.b, pair)
    user = str(execute(pair.a_db, f"SELECT id FROM {USERS} LIMIT 1")[0][0])
    execute(pair.a_db, f"UPDATE {USERS} SET full_name = 'edited in 9999' WHERE id = ?", user)
    # The triggers stamp each change with the device clock; this is what a clock at year 9999 leaves.
    year_9999 = int(datetime.datetime(9999, 12, 31, tzinfo=datetime.timezone.utc).timestamp() * 1000)
    execute(pair.a_db, "UPDATE bundlesync_changes SET at_ms = ?", year_9999)
    export = run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb), "--no-encrypt")
    assert "Traceback" not in export.err and "clock" in export.err, export.err
    imported = run_cli(pair.b, "import", "--no-receipt", export.last_line)
    assert "ahead of this device's clock" in imported.err, imported.err
    assert execute(pair.b_db, f"SELECT full_name FROM {USERS} WHERE id = ?", user) == [("edited in 9999",)]
    assert "clocks" in run_cli(pair.b, "status").out
    # Both devices go on editing and syncing that record.
    execute(pair.b_db, f"UPDATE {USERS} SET full_name = 'edited later on B' WHERE id = ?", user)
    sync(pair.b, pair.a, pair)
    assert execute(pair.a_db, f"SELECT full_name FROM {USERS} WHERE id = ?", user) == [("edited later on B",)]


def test_after_a_skewed_clock_is_fixed_the_later_concurrent_edit_wins(pair: Pair) -> None:
    sync(pair.a, pair.b, pair)
    user = str(execute(pair.a_db, f"SELECT id FROM {USERS} LIMIT 1")[0][0])
    # A's clock runs ten years ahead for one edit, which B receives.
    execute(pair.a_db, f"UPDATE {USERS} SET full_name = 'from the future' WHERE id = ?", user)
    execute(pair.a_db, "UPDATE bundlesync_changes SET at_ms = at_ms + ?", TEN_YEARS_MS)
    warned = sync(pair.a, pair.b, pair)
    assert "ahead of this device's clock" in warned, warned
    status = json.loads(run_cli(pair.b, "status", "--json").out)
    assert status["clocks_ahead"]["records"] >= 1
    # A's clock is fixed. Both devices edit the record concurrently, the larger instance id first, so
    # that a tie broken by instance id would pick the earlier edit.
    first, second = sorted([(pair.a, pair.a_db), (pair.b, pair.b_db)], key=lambda d: instance(d[1]), reverse=True)
    execute(first[1], f"UPDATE {USERS} SET full_name = 'earlier edit' WHERE id = ?", user)
    run_cli(first[0], "status")  # nothing exported yet; the edit waits in the change log with its time
    time.sleep(0.05)
    execute(second[1], f"UPDATE {USERS} SET full_name = 'later edit' WHERE id = ?", user)
    sync(first[0], second[0], pair)
    sync(second[0], first[0], pair)
    for db in (pair.a_db, pair.b_db):
        assert execute(db, f"SELECT full_name FROM {USERS} WHERE id = ?", user) == [("later edit",)]
    losers = json.loads(run_cli(pair.a, "conflicts", "--json").out) + json.loads(run_cli(pair.b, "conflicts", "--json").out)
    assert any(c["loser"]["data"].get("full_name") == "earlier edit" for c in losers)


# --- the merge key with the edit's wall time is still a join --------------------------------

INSTANCES = ["a", "b", "c"]


@st.composite
def skewed_histories(draw: st.DrawFn) -> list[Version]:
    """Versions of one record written by three replicas whose clocks may run far ahead, then be fixed."""
    states: dict[str, Version | None] = {i: None for i in INSTANCES}
    counters = {i: 0 for i in INSTANCES}
    skew = {i: draw(st.sampled_from([0, 0, 1000])) for i in INSTANCES}
    produced: list[Version] = []
    real = 0
    for _ in range(draw(st.integers(1, 14))):
        actor = draw(st.sampled_from(INSTANCES))
        if draw(st.booleans()) and produced:
            got = draw(st.sampled_from(produced))
            current = states[actor]
            states[actor] = got if current is None else merge(current, got).result
            continue
        if draw(st.integers(0, 4)) == 0:
            skew[actor] = 0  # the clock is fixed
        real += draw(st.integers(0, 3))
        wall = real + skew[actor]
        base = states[actor]
        if base is not None and base.purged:
            continue  # a purged record is never edited again (serialization undoes such an edit)
        counters[actor] += 1
        vv = dict(base.vv) if base else {}
        vv[actor] = counters[actor]
        hlc = max(wall << 4, base.hlc + 1 if base else 0)
        new = Version("t", "r1", "d:p", f'{{"n":{len(produced)}}}', draw(st.booleans()),
                      draw(st.integers(0, 20)) == 0, hlc, actor, counters[actor], vv, wall=wall)
        states[actor] = new if base is None else merge(base, new).result
        produced.append(new)
    return produced


@settings(max_examples=200, deadline=None)
@given(skewed_histories(), st.randoms())
def test_merge_with_wall_time_is_a_join(history: list[Version], rnd: object) -> None:
    reference = fold(history)
    shuffled = list(history) * 2
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    assert fold(shuffled) == reference  # commutative, idempotent
    for a, b, c in itertools.islice(itertools.permutations(history, 3), 20):
        assert merge(merge(a, b).result, c).result == merge(a, merge(b, c).result).result  # associative
    for x, y in itertools.permutations(history, 2):
        if y.covers(x.inst, x.ctr) and (x.inst, x.ctr) != (y.inst, y.ctr):
            assert y.key() > x.key()  # a causal successor always wins
        if x.hlc == y.hlc and x.purged == y.purged and x.wall != y.wall:
            assert (merge(x, y).result.wall == max(x.wall or 0, y.wall or 0))  # equal clocks: the later edit


def test_older_record_lines_default_the_wall_time_to_the_clock() -> None:
    line = b'{"c":1,"f":0,"h":196608,"i":"a","id":"r","m":"t","p":"d","v":{"a":1}}\t{}\n'
    from bundlesync.format.records import parse_record

    version = parse_record(line)
    assert version.wall is None and version.edit_ms == 3
    assert parse_record(line.replace(b'"h":196608', b'"h":196608,"w":7')).edit_ms == 7
    assert HLC_MAX < 1 << 63
