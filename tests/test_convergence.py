"""Issue 4: convergence with one-way files — any order, duplicates, drops, relays, conflicts."""

from __future__ import annotations

import json
import random
import sqlite3
import time
from pathlib import Path

import pytest

from conftest import Pair, dump_tables, make_db, run_cli, store_rows
from sim import World, edit

from bundlesync.errors import EXIT_PARTIAL
from bundlesync.partitions import within
from bundlesync.sync.purge import purge_user
from bundlesync.trust.scope import scope_filters
from bundlesync.sync.status import device_status, list_conflicts


def _within_read(world: World, i: int) -> list[tuple[object, ...]]:
    """Device i's store rows in partitions a device of its scope reads (all of them for a full device)."""
    dev = world.devices[i]
    dataset_id, _ = dev.resolve_facility(world.facility)
    scope = f"user:{world.users[i]}" if i in world.users else "full"
    read = scope_filters(dev.profile, dataset_id, scope).read
    return [_row(r) for r in store_rows(dev.conn, "1 ORDER BY model, id") if within(str(r["partition"]), read)]


def _reference_for(world: World, i: int) -> list[tuple[object, ...]]:
    """The authority's store rows in what device i reads."""
    dev = world.devices[i]
    dataset_id, _ = dev.resolve_facility(world.facility)
    scope = f"user:{world.users[i]}" if i in world.users else "full"
    read = scope_filters(dev.profile, dataset_id, scope).read
    return [_row(r) for r in store_rows(world.devices[0].conn, "1 ORDER BY model, id")
            if within(str(r["partition"]), read)]


def _row(r: dict[str, object]) -> tuple[object, ...]:
    return (r["model"], r["id"], r["data"], r["deleted"], r["purged"], r["inst"], r["ctr"])


RECEIPTLESS_ROUNDS = 3
"""Rounds of export-and-deliver after which a simulated facility with no receipts must be silent."""


@pytest.mark.parametrize("seed", range(12))
def test_random_sneakernet_converges_and_then_falls_silent(tmp_path: Path, seed: int) -> None:
    """Full and single-user devices edit, export, relay, lose drives and purge in a random order.

    Once every surviving bundle has reached every device, rounds of exports into fresh
    folders (no receipts anywhere) fill what lost drives kept back and fall silent within
    three rounds; then every device holds what its scope reads (full devices: the same rows
    and store), and no export of any device — full, single-user or a learner's own — into a
    drive holding everyone's receipt or into any new folder has anything to send.
    """
    rnd = random.Random(seed)
    n = 3 + seed % 2
    learners = 1 + (seed % 3 == 0)
    world = World.create(tmp_path, n + learners, seed=seed + 1, learners=learners)
    total = n + learners
    try:
        pool: list[Path] = []
        pool += world.natural_exports(0, tmp_path / "out0")
        dropped = 0
        for step in range(40):
            action = rnd.random()
            dev = rnd.randrange(total)
            if action < 0.35:
                edit(world, dev, rnd)
            elif action < 0.55:
                pool += world.natural_exports(dev, tmp_path / f"out{dev}", full=rnd.random() < 0.1)
            elif action < 0.9 and pool:
                world.deliver(rnd.choice(pool), dev)  # duplicates, any order, relays through learners welcome
            elif len(pool) > 1:
                pool.remove(rnd.choice(pool[1:]))  # a lost drive
                dropped += 1
            if step == 20 and rnd.random() < 0.5:
                user = world.devices[0].conn.execute(
                    "SELECT max(id) FROM kolibriauth_facilityuser WHERE id NOT IN (%s)"
                    % ",".join("?" * len(world.users)), tuple(world.users.values())).fetchone()[0]
                if user:
                    purge_user(world.devices[0], world.facility, user)
        # Every surviving bundle reaches every device, in a random order, some twice.
        for dev in range(total):
            for bundle in rnd.sample(pool, len(pool)) + rnd.sample(pool, len(pool) // 2):
                world.deliver(bundle, dev)
        # No receipt travels: each round, every device exports into a fresh folder and every
        # bundle reaches every device. What a lost drive kept from a device is asked for by what
        # the others' bundles say they hold, and the talk dies out: silent within three rounds.
        spoken = []
        for round_no in range(RECEIPTLESS_ROUNDS + 1):
            made = [b for dev in range(total) for b in world.natural_exports(dev, tmp_path / f"round{round_no}")]
            spoken.append(len(made))
            if not made:
                break
            for dev in range(total):
                for bundle in rnd.sample(made, len(made)):
                    world.deliver(bundle, dev)
        assert spoken[-1] == 0, f"still talking after {RECEIPTLESS_ROUNDS} rounds: {spoken} bundles (seed {seed})"
        reference_rows, reference_store = world.app_rows(0), world.store(0)
        for dev in range(1, n):
            assert world.app_rows(dev) == reference_rows, f"device {dev} differs (seed {seed}, {dropped} dropped)"
            assert world.store(dev) == reference_store
        for dev in world.users:
            assert _within_read(world, dev) == _reference_for(world, dev), f"learner {dev} differs (seed {seed})"
        for dev in range(total):
            assert device_status(world.devices[dev])["facilities"][0]["gaps"] == []
        # Quiescence is silent: into a drive where every device left its receipt, and into any folder.
        drive = tmp_path / "drive"
        drive.mkdir()
        for dev in range(total):
            world.receipt(dev, drive)
        for folder in (drive, tmp_path / "quiet"):
            for dev in range(total):
                assert world.natural_exports(dev, folder) == [], f"device {dev} spoke into {folder.name} (seed {seed})"
    finally:
        world.close()


def test_concurrent_edits_resolve_the_same_everywhere_and_losers_are_listed(tmp_path: Path) -> None:
    """Two concurrent edits: every device keeps the one with the greater (clock, instance id), logs the other.

    The edits are made one after the other, but on a fast machine both can fall in the same
    millisecond: their clocks then tie and the instance id decides. The test asserts the rule,
    not which edit usually wins.
    """
    world = World.create(tmp_path, 3)
    try:
        first = world.export(0, tmp_path / "o0")
        assert first is not None
        for dev in (1, 2):
            world.deliver(first, dev)
        user = world.devices[0].conn.execute("SELECT min(id) FROM kolibriauth_facilityuser").fetchone()[0]
        world.sql(1, "UPDATE kolibriauth_facilityuser SET full_name = 'from B' WHERE id = ?", (user,))
        world.sql(2, "UPDATE kolibriauth_facilityuser SET full_name = 'from C' WHERE id = ?", (user,))
        b1, c1 = world.export(1, tmp_path / "o1"), world.export(2, tmp_path / "o2")
        assert b1 is not None and c1 is not None
        keys = {}
        for dev, name in ((1, "from B"), (2, "from C")):
            hlc, inst = world.devices[dev].conn.execute(
                "SELECT hlc, inst FROM bundlesync_store WHERE model = 'kolibriauth_facilityuser' AND id = ?",
                (user,)).fetchone()
            assert inst == world.devices[dev].instance_id
            keys[name] = (hlc, inst)
        assert keys["from C"][0] >= keys["from B"][0]  # C edited after B: its clock is not lower
        winner = max(keys, key=keys.__getitem__)  # the later clock; on a tie, the greater instance id
        loser = "from B" if winner == "from C" else "from C"
        world.deliver(b1, 0), world.deliver(c1, 0)
        world.deliver(c1, 1), world.deliver(b1, 2)
        names = {world.devices[d].conn.execute("SELECT full_name FROM kolibriauth_facilityuser WHERE id = ?",
                                               (user,)).fetchone()[0] for d in range(3)}
        assert names == {winner}
        for dev in range(3):  # every device met both versions, so every device lists the loser
            losers = list_conflicts(world.devices[dev])
            assert [c["loser"]["data"]["full_name"] for c in losers] == [loser]
    finally:
        world.close()


def test_out_of_order_import_reports_gap_and_relay_fills_it(tmp_path: Path) -> None:
    world = World.create(tmp_path, 3)
    try:
        a = world.devices[0]
        b1 = world.export(0, tmp_path / "oa")
        world.sql(0, "UPDATE kolibriauth_facilityuser SET full_name = 'second' WHERE id = "
                     "(SELECT min(id) FROM kolibriauth_facilityuser)")
        b2 = world.export(0, tmp_path / "oa")
        assert b1 is not None and b2 is not None
        result = world.deliver(b2, 2, receipt=True)  # C sees the newer bundle first, and leaves its receipt
        assert a.instance_id in result.gaps  # type: ignore[attr-defined]
        gaps = device_status(world.devices[2])["facilities"][0]["gaps"]
        assert [g["instance"] for g in gaps] == [a.instance_id]
        held = device_status(world.devices[2])["facilities"][0]["fsic"]
        assert held.get(a.instance_id, 0) == 0  # knowledge did not jump over b1
        # B gets both and relays to C. Into an empty folder B assumes a reader like A, which holds it
        # all; onto C's drive, C's receipt says what C lacks.
        world.deliver(b1, 1), world.deliver(b2, 1)
        assert world.export(1, tmp_path / "ob") is None
        relay = world.export(1, tmp_path / "oa")
        assert relay is not None
        world.deliver(relay, 2)
        assert world.app_rows(2) == world.app_rows(0)
        assert device_status(world.devices[2])["facilities"][0]["gaps"] == []
        # Provenance: C's store says A wrote those records, not B.
        writers = {r[0] for r in world.devices[2].conn.execute("SELECT DISTINCT inst FROM bundlesync_store")}
        assert a.instance_id in writers and world.devices[1].instance_id not in writers
    finally:
        world.close()


def test_dropped_bundle_is_filled_through_a_receipt_cli(pair: Pair) -> None:
    first = run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb)).last_line
    run_cli(pair.b, "import", first)
    lost = pair.tmp / "lost"
    lost.mkdir()
    conn = sqlite3.connect(pair.a_db)
    conn.execute("UPDATE kolibriauth_facilityuser SET full_name = 'in the lost bundle' WHERE id = "
                 "(SELECT min(id) FROM kolibriauth_facilityuser)")
    conn.commit()
    run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(lost))  # this drive never arrives
    conn.execute("UPDATE logger_contentsessionlog SET progress = 0.25 WHERE id = (SELECT min(id) FROM logger_contentsessionlog)")
    conn.commit()
    conn.close()
    later = pair.tmp / "later"
    later.mkdir()
    second = run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(later)).last_line
    res = run_cli(pair.b, "import", second, check=False)
    assert res.code == EXIT_PARTIAL
    assert "gap: changes of device" in res.err and "--full" in res.err
    receipts = list(later.glob("receipt-*.json"))
    assert len(receipts) == 1  # B left what it holds next to the bundle
    assert dump_tables(pair.a_db) != dump_tables(pair.b_db)
    # A, exporting onto that drive, reads B's receipt and sends what B lacks.
    fill = run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(later), "--json")
    summary = json.loads(fill.out)
    assert summary["basis_source"].startswith("receipts of")
    run_cli(pair.b, "import", summary["path"])
    assert dump_tables(pair.a_db) == dump_tables(pair.b_db)
    assert json.loads(run_cli(pair.b, "status", "--json").out)["facilities"][0]["gaps"] == []
    # --since RECEIPT answers one peer; nothing new now.
    again = run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb), "--since", str(receipts[0]))
    assert "basis: receipt of" in again.err or "nothing new" in again.err


def test_dropped_bundle_is_sent_again_without_a_receipt_cli(pair: Pair) -> None:
    """No receipt comes back (imports with --no-receipt, exports into fresh folders): B's own
    bundle, made after A's lost one, says what B holds, and A sends the lost part again."""
    def folder(name: str) -> str:
        (pair.tmp / name).mkdir()
        return str(pair.tmp / name)

    first = run_cli(pair.a, "export", "--facility", pair.facility, "--out", folder("d1")).last_line
    run_cli(pair.b, "import", "--no-receipt", first)
    conn = sqlite3.connect(pair.a_db)
    conn.execute("UPDATE kolibriauth_facilityuser SET full_name = 'in the lost bundle' WHERE id = "
                 "(SELECT min(id) FROM kolibriauth_facilityuser)")
    conn.commit()
    run_cli(pair.a, "export", "--facility", pair.facility, "--out", folder("lost"))  # this drive never arrives
    conn.execute("UPDATE logger_contentsessionlog SET progress = 0.25 WHERE id = (SELECT min(id) FROM logger_contentsessionlog)")
    conn.commit()
    conn.close()
    second = run_cli(pair.a, "export", "--facility", pair.facility, "--out", folder("d2")).last_line
    assert run_cli(pair.b, "import", "--no-receipt", second, check=False).code == EXIT_PARTIAL  # the gap
    conn = sqlite3.connect(pair.b_db)
    conn.execute("UPDATE logger_contentsessionlog SET progress = 0.5 WHERE id = (SELECT max(id) FROM logger_contentsessionlog)")
    conn.commit()
    conn.close()
    back = run_cli(pair.b, "export", "--facility", pair.facility, "--out", folder("d3")).last_line
    run_cli(pair.a, "import", "--no-receipt", back)
    resend = json.loads(run_cli(pair.a, "export", "--facility", pair.facility, "--out", folder("d4"), "--json").out)
    assert resend["path"] is not None and "held in bundle" in resend["basis_source"]
    assert run_cli(pair.b, "import", "--no-receipt", resend["path"]).code == 0
    assert dump_tables(pair.a_db) == dump_tables(pair.b_db)
    assert json.loads(run_cli(pair.b, "status", "--json").out)["facilities"][0]["gaps"] == []
    # Then both fall silent into fresh folders.
    for home, name in ((pair.b, "d5"), (pair.a, "d6"), (pair.b, "d7")):
        out = run_cli(home, "export", "--facility", pair.facility, "--out", folder(name), "--json")
        if json.loads(out.out)["path"] is not None:
            other = pair.a if home == pair.b else pair.b
            run_cli(other, "import", "--no-receipt", json.loads(out.out)["path"])
    for home, name in ((pair.a, "q1"), (pair.b, "q2")):
        assert json.loads(run_cli(home, "export", "--facility", pair.facility, "--out", folder(name),
                                  "--json").out)["path"] is None


def test_purged_user_never_reappears(tmp_path: Path) -> None:
    world = World.create(tmp_path, 3)
    try:
        a = world.devices[0]
        old = world.export(0, tmp_path / "oa")
        assert old is not None
        world.deliver(old, 1)
        user = a.conn.execute("SELECT user_id FROM logger_contentsessionlog WHERE user_id IS NOT NULL "
                              "GROUP BY user_id ORDER BY count(*) DESC LIMIT 1").fetchone()[0]
        # B edits the user's data before it hears of the purge.
        world.sql(1, "UPDATE logger_contentsessionlog SET progress = 0.99 WHERE user_id = ?", (user,))
        before_ms = int(time.time() * 1000)
        result = purge_user(a, world.facility, user)
        assert result.records > 0 and result.app_rows_deleted == result.records
        # The purge is an edit of its own: stamped with its own wall-clock time, not the replaced version's.
        walls = [w for (w,) in a.conn.execute("SELECT wall FROM bundlesync_store WHERE purged")]
        assert len(walls) == result.records and all(w is not None and w >= before_ms for w in walls)
        purge_bundle = world.export(0, tmp_path / "oa")
        stale = world.export(1, tmp_path / "ob")
        assert purge_bundle is not None and stale is not None
        world.deliver(purge_bundle, 2), world.deliver(old, 2), world.deliver(stale, 2)  # older data after the purge
        world.deliver(stale, 0), world.deliver(purge_bundle, 1)
        for dev in range(3):
            conn = world.devices[dev].conn
            assert conn.execute("SELECT count(*) FROM kolibriauth_facilityuser WHERE id = ?", (user,)).fetchone()[0] == 0
            assert conn.execute("SELECT count(*) FROM logger_contentsessionlog WHERE user_id = ?", (user,)).fetchone()[0] == 0
            assert [r["id"] for r in store_rows(conn) if user in str(r["data"])] == []
            assert conn.execute("SELECT count(*) FROM bundlesync_conflicts WHERE instr(loser, ?) > 0",
                                (user,)).fetchone()[0] == 0
        assert world.app_rows(0) == world.app_rows(1) == world.app_rows(2)
    finally:
        world.close()


def test_child_before_parent_waits_then_applies(pair: Pair) -> None:
    run_cli(pair.b, "import", run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb)).last_line)
    conn = sqlite3.connect(pair.a_db)
    conn.execute("INSERT INTO kolibriauth_facilityuser (id, username, full_name, password, date_joined, birth_year, "
                 "gender, id_number, facility_id, dataset_id, extra_fields) SELECT 'abcdabcdabcdabcdabcdabcdabcdabcd', "
                 "'newbie', 'New Learner', password, date_joined, birth_year, gender, id_number, facility_id, "
                 "dataset_id, extra_fields FROM kolibriauth_facilityuser LIMIT 1")
    conn.commit()
    parent_dir, child_dir = pair.tmp / "p", pair.tmp / "c"
    parent_dir.mkdir()
    child_dir.mkdir()
    parent = run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(parent_dir)).last_line
    conn.execute("INSERT INTO logger_contentsessionlog SELECT 'feedfeedfeedfeedfeedfeedfeedfeed', "
                 "'abcdabcdabcdabcdabcdabcdabcdabcd', content_id, channel_id, start_timestamp, end_timestamp, "
                 "time_spent, progress, kind, extra_fields, dataset_id FROM logger_contentsessionlog LIMIT 1")
    conn.commit()
    conn.close()
    child = run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(child_dir)).last_line
    res = run_cli(pair.b, "import", child, check=False)
    assert res.code == EXIT_PARTIAL and "1 row(s) wait for their parent rows" in res.err
    waiting = json.loads(run_cli(pair.b, "status", "--json").out)["waiting_records"]
    assert waiting == [{"model": "logger_contentsessionlog", "count": 1, "example": waiting[0]["example"]}]
    assert "waiting for kolibriauth_facilityuser abcdabcd" in waiting[0]["example"]
    run_cli(pair.b, "import", parent)
    assert dump_tables(pair.a_db) == dump_tables(pair.b_db)
    assert json.loads(run_cli(pair.b, "status", "--json").out)["waiting_records"] == []


def _busiest_learner(tmp_path: Path) -> str:
    tmp_path.mkdir(parents=True, exist_ok=True)
    probe = tmp_path / "probe.sqlite3"

    make_db(probe, users=6, logs=60, seed=1)
    conn = sqlite3.connect(probe)
    user = conn.execute("SELECT user_id FROM logger_contentsessionlog WHERE user_id IS NOT NULL GROUP BY user_id "
                        "ORDER BY count(*) DESC LIMIT 1").fetchone()[0]
    conn.close()
    return str(user)


def test_a_narrow_relay_never_makes_a_device_claim_what_it_lacks(tmp_path: Path) -> None:
    """A bundle's result counts only what the sender holds for *every* prefix of its filter."""
    user = _busiest_learner(tmp_path / "p")
    f, g, u, v = 0, 1, 2, 3
    w = World.create(tmp_path / "w", 4, users=6, logs=60, seed=1, scopes={2: f"user:{user}", 3: f"user:{user}"})
    try:
        w.deliver(w.export(f, tmp_path / "f2g"), g)  # type: ignore[arg-type]
        room = w.one(g, "SELECT min(id) FROM kolibriauth_collection WHERE kind = 'classroom'")
        w.sql(g, "UPDATE kolibriauth_collection SET name = 'renamed by G' WHERE id = ?", (room,))
        w.sql(g, "UPDATE logger_contentsessionlog SET progress = 0.77 WHERE user_id = ?", (user,))
        w.deliver(w.export(g, tmp_path / "g2u", user=user), u)  # type: ignore[arg-type]
        w.sql(u, "UPDATE logger_contentsessionlog SET time_spent = 5.5 WHERE user_id = ?", (user,))
        # The tablet carries its own rows: G's edits are assumed known to its readers, so F claims none of them.
        w.deliver(w.export(u, tmp_path / "u2f"), f)  # type: ignore[arg-type]
        drive = tmp_path / "drive-v"
        # V is a second tablet of the same user, unknown to F (which assumes a reader like U): set up in full.
        w.deliver(w.export(f, drive, user=user, full=True), v, receipt=True)  # type: ignore[arg-type]
        w.deliver(w.export(g, tmp_path / "g2f"), f)  # type: ignore[arg-type]
        later = w.export(f, drive, user=user)
        assert later is not None, "V's receipt must not claim the rename it never received"
        w.deliver(later, v)
        assert w.one(v, "SELECT name FROM kolibriauth_collection WHERE id = ?", (room,)) == "renamed by G"
    finally:
        w.close()


def test_a_learner_cannot_take_over_another_users_record(tmp_path: Path) -> None:
    user = _busiest_learner(tmp_path / "p")
    w = World.create(tmp_path / "w", 2, users=6, logs=60, seed=1, scopes={1: f"user:{user}"})
    try:
        victim, owner = w.devices[0].conn.execute(
            "SELECT id, user_id FROM logger_contentsessionlog WHERE user_id IS NOT NULL AND user_id != ? LIMIT 1",
            (user,)).fetchone()
        w.deliver(w.export(0, tmp_path / "a", user=user), 1)  # type: ignore[arg-type]
        w.sql(1, "INSERT INTO logger_contentsessionlog SELECT ?, ?, content_id, channel_id, start_timestamp, "
                 "end_timestamp, 999, 0.0, kind, extra_fields, dataset_id FROM logger_contentsessionlog LIMIT 1",
              (victim, user))
        result = w.deliver(w.export(1, tmp_path / "b"), 0)  # type: ignore[arg-type]
        assert result.dequeue.refused == 1  # type: ignore[attr-defined]
        assert w.one(0, "SELECT user_id FROM logger_contentsessionlog WHERE id = ?", (victim,)) == owner
    finally:
        w.close()


def test_local_edit_over_a_waiting_version_keeps_the_loser(tmp_path: Path) -> None:
    w = World.create(tmp_path, 2)
    try:
        w.deliver(w.export(0, tmp_path / "a"), 1)  # type: ignore[arg-type]
        person = w.one(0, "SELECT min(id) FROM kolibriauth_facilityuser")
        w.sql(1, "INSERT INTO kolibriauth_facilityuser SELECT 'c0ffeec0ffeec0ffeec0ffeec0ffee01', 'zed', full_name, "
                 "password, date_joined, last_login, birth_year, gender, id_number, facility_id, extra_fields, "
                 "dataset_id FROM kolibriauth_facilityuser WHERE id = ?", (person,))
        w.sql(0, "UPDATE kolibriauth_facilityuser SET username = 'zed' WHERE id = ?", (person,))
        result = w.deliver(w.export(0, tmp_path / "a"), 1)  # type: ignore[arg-type]
        assert result.deserialize.failed == 1  # type: ignore[attr-defined]  # UNIQUE(username) refuses it here
        w.sql(1, "UPDATE kolibriauth_facilityuser SET full_name = 'Fixed Name' WHERE id = ?", (person,))
        w.deliver(w.export(1, tmp_path / "b"), 0)  # type: ignore[arg-type]
        losers = [c for c in list_conflicts(w.devices[1]) if c["record_id"] == person]
        assert [c["loser"]["data"]["username"] for c in losers] == ["zed"]
        assert w.app_rows(0) == w.app_rows(1)
    finally:
        w.close()


def test_a_receipt_for_a_narrower_filter_is_not_used_as_basis(tmp_path: Path) -> None:
    user = _busiest_learner(tmp_path / "p")
    w = World.create(tmp_path / "w", 3, users=6, logs=60, seed=1, scopes={1: f"user:{user}"})
    try:
        drive = tmp_path / "drive"
        w.deliver(w.export(0, drive, user=user), 1, receipt=True)  # type: ignore[arg-type]
        full = w.export(0, drive)
        assert full is not None
        w.deliver(full, 2)
        assert w.app_rows(2) == w.app_rows(0)
    finally:
        w.close()
