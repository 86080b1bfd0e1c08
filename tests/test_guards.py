"""The import's per-record guards and the receipt checks, driven in-process on real databases.

The same promises as ``test_promises.py`` and ``test_receipts.py`` (which go through the CLI),
at the level of :func:`bundlesync.sync.dequeue.dequeue` and
:func:`bundlesync.trust.receipts.read_receipt`: fast enough that mutation testing
(``scripts/mutation.sh``) runs them for every mutant, and precise about counts, refusal
reasons and what reaches the store.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from conftest import PROFILE, make_db, store_rows
from forge import record_line
from sim import World

from bundlesync.device import Device, init_device
from bundlesync.errors import ReceiptError, StateError
from bundlesync.format.container import canonical_json
from bundlesync.format.records import Version
from bundlesync.partitions import within
from bundlesync.replica.clock import ahead_hlc
from bundlesync.replica.db import write_transaction
from bundlesync.replica.store import fetch_versions, serialize_changes
from bundlesync.replica.tracking import suppressed
from bundlesync.sync.deserialize import DeserializeResult
from bundlesync.sync.dequeue import DequeueResult, dequeue
from bundlesync.sync.status import list_conflicts
from bundlesync.trust.receipts import read_receipt
from bundlesync.trust.scope import ScopeFilters, scope_filters

LOGS = "logger_contentsessionlog"
USERS = "kolibriauth_facilityuser"


@dataclass
class Scene:
    """A source device holding a facility (serialized) and an empty target device of the same profile."""

    source: Device
    target: Device
    target_db: Path
    dataset: str
    user: str
    other: str

    def versions(self, sql_where: str = "1", params: tuple[object, ...] = ()) -> list[Version]:
        """The source's store versions matching ``sql_where``, as a bundle would carry them."""
        return [Version(r["model"], r["id"], r["partition"], r["data"], bool(r["deleted"]), bool(r["purged"]), r["hlc"],
                        r["inst"], r["ctr"], json.loads(r["vv"]), r["hlc"] >> 16 if r["wall"] is None else r["wall"])
                for r in store_rows(self.source.conn, f"{sql_where} ORDER BY model, id", params)]

    def scope(self, scope: str) -> ScopeFilters:
        return scope_filters(self.target.profile, self.dataset, scope)

    def apply(self, versions: Sequence[Version], *, signer: str = "full", reader: str = "full",
              batch: int = 1000) -> tuple[DequeueResult, DeserializeResult]:
        """Run the DEQUEUING stage on the target, as an import signed under ``signer``'s scope does."""
        lines = [record_line(v) for v in versions]
        batches = [lines[i:i + batch] for i in range(0, len(lines), batch)]
        written = DeserializeResult()
        conn = self.target.conn
        with write_transaction(conn), suppressed(conn):
            result = dequeue(conn, self.target.profile, batches, signer_write=self.scope(signer).write,
                             local_read=self.scope(reader).read, bundle_id="b" * 32,
                             detected_at="2026-01-01T00:00:00Z", written=written,
                             signer_may_purge=signer == "full")
        return result, written

    def stored(self, model: str, record_id: str) -> Version | None:
        return fetch_versions(self.target.conn, [(model, record_id)], self.target.profile).get((model, record_id))

    def app_count(self, table: str, where: str = "1", params: tuple[object, ...] = ()) -> int:
        return int(self.target.conn.execute(f'SELECT count(*) FROM "{table}" WHERE {where}', params).fetchone()[0])


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A facility database with its device home, initialised and serialized once per module."""
    root = tmp_path_factory.mktemp("guards")
    make_db(root / "s.sqlite3", users=5, logs=40, seed=3)
    make_db(root / "t.sqlite3", schema_only=True)
    init_device(root / "hs", root / "s.sqlite3", PROFILE)
    init_device(root / "ht", root / "t.sqlite3", PROFILE)
    with Device.open(root / "hs") as dev, write_transaction(dev.conn):
        serialize_changes(dev.conn, dev.profile)
    return root


@pytest.fixture
def scene(template: Path, tmp_path: Path) -> Iterator[Scene]:
    import shutil

    import yaml

    for name in ("s.sqlite3", "t.sqlite3"):
        shutil.copy2(template / name, tmp_path / name)
    for home, db in (("hs", "s.sqlite3"), ("ht", "t.sqlite3")):
        shutil.copytree(template / home, tmp_path / home)
        config = tmp_path / home / "config.yaml"
        data = yaml.safe_load(config.read_text())
        data["db"] = str(tmp_path / db)
        config.write_text(yaml.safe_dump(data))
    source, target = Device.open(tmp_path / "hs"), Device.open(tmp_path / "ht")
    conn = sqlite3.connect(tmp_path / "s.sqlite3")
    users = [r[0] for r in conn.execute(f"SELECT user_id FROM {LOGS} WHERE user_id IS NOT NULL GROUP BY user_id "
                                        "ORDER BY count(*) DESC, user_id")]
    dataset = str(conn.execute(f"SELECT dataset_id FROM {USERS} LIMIT 1").fetchone()[0])
    conn.close()
    try:
        yield Scene(source, target, tmp_path / "t.sqlite3", dataset, users[0], users[1])
    finally:
        source.close()
        target.close()


def test_a_learner_signer_may_not_write_another_users_records(scene: Scene) -> None:
    s = scene
    own = s.versions("model = ? AND partition = ?", (LOGS, f"{s.dataset}:user-rw:{s.user}"))
    foreign = s.versions("model = ? AND partition = ?", (LOGS, f"{s.dataset}:user-rw:{s.other}"))
    assert own and foreign
    s.apply(s.versions("model != ?", (LOGS,)))  # the users and collections the logs refer to
    # The refused record comes first: what follows it in the batch must still apply.
    result, written = s.apply([foreign[0], *own], signer=f"user:{s.user}")
    assert (result.received, result.out_of_scope, result.refused) == (len(own) + 1, 1, 1)
    assert result.refused_sample == [f"{LOGS} {foreign[0].id}: partition {foreign[0].partition} is outside "
                                     "the signer's write scope"]
    assert s.stored(LOGS, foreign[0].id) is None
    assert s.app_count(LOGS, "user_id = ?", (s.other,)) == 0
    assert s.app_count(LOGS, "user_id = ?", (s.user,)) == len(own) == written.written
    assert result.outcomes["new"] == len(own)


def test_a_scope_the_profile_does_not_define_is_refused_with_its_name(scene: Scene) -> None:
    profile = replace(scene.target.profile, scopes={k: t for k, t in scene.target.profile.scopes.items() if k != "user"})
    with pytest.raises(StateError) as caught:
        scope_filters(profile, scene.dataset, f"user:{scene.user}")
    assert str(caught.value) == f"profile {profile.name} defines no 'user' scope; it cannot be used with this profile"
    assert scope_filters(profile, scene.dataset, "full").scope == "full"


def test_a_record_whose_data_lies_about_its_partition_is_refused(scene: Scene) -> None:
    """Another user's session log claiming the signer's user's partition: the claim is checked against the data."""
    s = scene
    s.apply(s.versions("model != ?", (LOGS,)))
    own = s.versions("model = ? AND partition = ?", (LOGS, f"{s.dataset}:user-rw:{s.user}"))
    foreign = s.versions("model = ? AND partition = ?", (LOGS, f"{s.dataset}:user-rw:{s.other}"))[0]
    lying = replace(foreign, partition=own[0].partition)
    result, written = s.apply([*own, lying], signer=f"user:{s.user}")
    assert (result.bad_partition, result.out_of_scope, result.refused) == (1, 0, 1)
    assert result.refused_sample == [f"{LOGS} {lying.id}: data does not belong to partition {lying.partition}"]
    assert s.stored(LOGS, lying.id) is None and s.app_count(LOGS, "id = ?", (lying.id,)) == 0
    assert written.written == len(own)


def test_a_concurrent_loser_is_logged_exactly_as_it_was(scene: Scene) -> None:
    """The conflict log keeps the losing version whole (who, which write, when, deleted, where, what)."""
    s = scene
    s.apply(s.versions())
    [mine] = s.versions("model = ? AND id = (SELECT min(id) FROM bundlesync_store WHERE model = ?)", (USERS, USERS))
    row = json.loads(mine.data)
    row["full_name"] = "concurrent"
    other = "c" * 32
    theirs = replace(mine, data=json.dumps(row, separators=(",", ":")), inst=other, ctr=3, hlc=mine.hlc + 5,
                     vv={other: 3}, wall=None)
    result, _ = s.apply([theirs])
    assert result.outcomes["conflict"] == 1
    [entry] = list_conflicts(s.target)
    assert (entry["model"], entry["record_id"]) == (USERS, mine.id)
    assert entry["loser"] == {"inst": mine.inst, "ctr": mine.ctr, "hlc": mine.hlc, "deleted": False,
                              "partition": mine.partition, "data": json.loads(mine.data)}
    assert entry["winner"] == {"instance": other, "counter": 3}
    assert (entry["bundle_id"], entry["detected_at"]) == ("b" * 32, "2026-01-01T00:00:00Z")
    assert s.target.conn.execute(f"SELECT full_name FROM {USERS} WHERE id = ?", (mine.id,)).fetchone()[0] == "concurrent"


def test_the_report_counts_every_row_written_deleted_or_left_waiting(scene: Scene) -> None:
    """Counts add up over many batches: rows written, per model, deletions, and rows waiting for a parent."""
    s = scene
    logs = s.versions("model = ?", (LOGS,))
    s.apply(s.versions("model NOT IN (?, ?) AND NOT (model = ? AND id = ?)", (LOGS, USERS, USERS, s.other)))
    s.apply(s.versions("model = ? AND id != ?", (USERS, s.other)))
    # Session logs before their user (V) arrives: V's wait for it, the others are written.
    result, written = s.apply(logs, batch=3)
    waiting = s.target.conn.execute("SELECT count(*) FROM bundlesync_store WHERE model = ? AND dirty = 1 AND "
                                    "error IS NOT NULL", (LOGS,)).fetchone()[0]
    assert result.outcomes["new"] == len(logs) and 0 < waiting < len(logs)
    assert written.written == len(logs) - waiting == s.app_count(LOGS) == written.by_model[LOGS]
    assert written.deleted == 0
    # Rows written now are done (only the waiting stay dirty for DESERIALIZING), and each version
    # remembers the bundle it came with (a conflict with a later local edit names it).
    assert s.target.conn.execute("SELECT count(*) FROM bundlesync_store WHERE model = ? AND dirty = 1",
                                 (LOGS,)).fetchone()[0] == waiting
    assert {r[0] for r in s.target.conn.execute("SELECT DISTINCT bundle_id FROM bundlesync_store")} == {"b" * 32}
    # Deletions of some records, each a fast-forward by another device, in several batches.
    other = "d" * 32
    gone = [replace(v, deleted=True, hlc=v.hlc + 1, inst=other, ctr=n, vv={**v.vv, other: n}, wall=None)
            for n, v in enumerate(logs[:9], start=1)]
    result, written = s.apply(gone, batch=4)
    assert result.outcomes["fast_forward"] == 9
    assert (written.deleted, written.written) == (9, 0) and written.by_model == {LOGS: 9}
    assert s.app_count(LOGS, f"id IN ({', '.join('?' * 9)})", tuple(v.id for v in gone)) == 0


def test_a_clock_far_ahead_is_counted_and_its_highest_value_kept(scene: Scene) -> None:
    s = scene
    users = s.versions("model = ?", (USERS,))
    future = ahead_hlc()
    step = 1 << 50  # about 200 days of clock: far beyond the tolerance, whenever dequeue looks at its clock
    ahead = [replace(v, hlc=future + step * (i + 1), wall=None) for i, v in enumerate(users[:3])]
    result, _ = s.apply([*ahead, *users[3:]], batch=2)
    assert (result.ahead, result.ahead_max_hlc) == (3, future + 3 * step)
    assert result.outcomes["new"] == len(users)


def test_a_reader_keeps_only_what_its_scope_may_read_and_counts_the_rest(scene: Scene) -> None:
    s = scene
    everything = s.versions()
    readable = s.scope(f"user:{s.user}").read
    mine = [v for v in everything if within(v.partition, readable)]
    assert 0 < len(mine) < len(everything)
    result, _ = s.apply(everything, reader=f"user:{s.user}", batch=5)
    assert (result.not_for_us, result.refused) == (len(everything) - len(mine), 0)
    stored = {(m, i) for m, i in s.target.conn.execute("SELECT model, id FROM bundlesync_store")}
    assert stored == {(v.model, v.id) for v in mine}


@pytest.mark.parametrize("newer_first", [True, False])
def test_one_record_twice_in_a_bundle_keeps_the_join_of_both(scene: Scene, newer_first: bool) -> None:
    """A bundle may carry two versions of a record (a relay's and its own): the result is their join,
    in either order, and both edits' histories are in its vector."""
    s = scene
    s.apply(s.versions())
    [base] = s.versions("model = ? AND id = (SELECT min(id) FROM bundlesync_store WHERE model = ?)", (USERS, USERS))
    row = json.loads(base.data)
    b, c = "b" * 32, "c" * 32
    older = replace(base, data=json.dumps({**row, "full_name": "older"}, separators=(",", ":")), inst=b, ctr=4,
                    hlc=base.hlc + 10, vv={**base.vv, b: 4}, wall=None)
    newer = replace(base, data=json.dumps({**row, "full_name": "newer"}, separators=(",", ":")), inst=c, ctr=2,
                    hlc=base.hlc + 20, vv={**base.vv, c: 2}, wall=None)
    result, written = s.apply([newer, older] if newer_first else [older, newer])
    assert result.received == 2 and written.written == 1
    kept = s.stored(USERS, base.id)
    assert kept is not None and (kept.inst, kept.ctr, kept.vv) == (c, 2, {**base.vv, b: 4, c: 2})
    assert s.target.conn.execute(f"SELECT full_name FROM {USERS} WHERE id = ?", (base.id,)).fetchone()[0] == "newer"


def test_a_learner_may_not_take_over_a_record_another_user_holds(scene: Scene) -> None:
    """A record whose id is V's here, sent by U's device as U's (the data agrees with the claim): the
    local record decides, so it is refused, and the records after it still apply."""
    s = scene
    s.apply(s.versions())
    victim = s.versions("model = ? AND partition = ?", (LOGS, f"{s.dataset}:user-rw:{s.other}"))[0]
    template = s.versions("model = ? AND partition = ?", (LOGS, f"{s.dataset}:user-rw:{s.user}"))[0]
    row = {**json.loads(template.data), "id": victim.id, "progress": 0.25}
    learner = "e" * 32
    claim = replace(template, id=victim.id, data=json.dumps(row, separators=(",", ":")), inst=learner, ctr=1,
                    hlc=victim.hlc + 100, vv={**victim.vv, learner: 1}, wall=None)
    edit = replace(template, data=json.dumps({**json.loads(template.data), "progress": 0.75}, separators=(",", ":")),
                   inst=learner, ctr=2, hlc=template.hlc + 100, vv={**template.vv, learner: 2}, wall=None)
    result, written = s.apply([claim, edit], signer=f"user:{s.user}")
    assert (result.out_of_scope, result.refused, written.written) == (1, 1, 1)
    assert result.refused_sample == [f"{LOGS} {victim.id}: the local record lies in {victim.partition}, outside "
                                     "the signer's write scope"]
    assert s.stored(LOGS, victim.id) == replace(victim, wall=None)  # record_line() does not carry the edit time
    assert s.target.conn.execute(f"SELECT user_id FROM {LOGS} WHERE id = ?", (victim.id,)).fetchone()[0] == s.other
    assert s.target.conn.execute(f"SELECT progress FROM {LOGS} WHERE id = ?", (template.id,)).fetchone()[0] == 0.75


def test_only_a_full_facility_signer_may_purge(scene: Scene) -> None:
    """A purge of U's own session log, signed by U's device: inside its write scope, still refused."""
    s = scene
    s.apply(s.versions())
    own = s.versions("model = ? AND partition = ?", (LOGS, f"{s.dataset}:user-rw:{s.user}"))
    learner = "e" * 32
    purge = replace(own[0], data="{}", deleted=True, purged=True, inst=learner, ctr=1, hlc=own[0].hlc + 100,
                    vv={**own[0].vv, learner: 1}, wall=None)
    edit = replace(own[1], data=json.dumps({**json.loads(own[1].data), "progress": 0.75}, separators=(",", ":")),
                   inst=learner, ctr=2, hlc=own[1].hlc + 100, vv={**own[1].vv, learner: 2}, wall=None)
    result, written = s.apply([purge, edit], signer=f"user:{s.user}")
    assert (result.out_of_scope, result.refused, written.written, written.deleted) == (1, 1, 1, 0)
    assert result.refused_sample == [f"{LOGS} {own[0].id}: only a full-facility certificate may purge records"]
    assert s.stored(LOGS, own[0].id) == replace(own[0], wall=None) and s.app_count(LOGS, "id = ?", (own[0].id,)) == 1
    assert s.target.conn.execute(f"SELECT progress FROM {LOGS} WHERE id = ?", (own[1].id,)).fetchone()[0] == 0.75
    # The same purge signed under a full-facility certificate is taken, and erases the row.
    result, written = s.apply([purge])
    assert result.refused == 0 and written.deleted == 1 and s.app_count(LOGS, "id = ?", (own[0].id,)) == 0
    stored = s.stored(LOGS, own[0].id)
    assert stored is not None and stored.purged


# --------------------------------------------------------------------------- receipts


def _resigned(path: Path, world: World, i: int, **changes: object) -> Path:
    """The receipt at ``path`` with ``changes`` to its body, signed again by device ``i`` (a valid signature)."""
    body = {**json.loads(path.read_bytes())["receipt"], **changes}
    dev = world.devices[i]
    chain = dev.keys.device_chain(str(body["dataset_id"]))
    assert chain is not None
    signature = dev.keys.signing_key(chain).sign("receipt", canonical_json(body))
    out = path.with_name(f"changed-{path.name}")
    out.write_bytes(canonical_json({"receipt": body, "signature": signature.hex()}))
    return out


def test_a_receipt_is_read_only_in_its_own_kind_and_format(tmp_path: Path) -> None:
    w = World.create(tmp_path / "w", 2)
    try:
        reader = w.devices[0]
        genuine = w.receipt(1, tmp_path)
        assert read_receipt(genuine, reader.keys, reader.profile).instance_id == w.devices[1].instance_id
        for changes in ({"format": 2}, {"kind": "bundlesync-manifest"}):
            changed = _resigned(genuine, w, 1, **changes)
            with pytest.raises(ReceiptError) as caught:
                read_receipt(changed, reader.keys, reader.profile)
            assert str(caught.value) == f"{changed} is not a bundlesync receipt (format 1)"
    finally:
        w.close()


@pytest.mark.parametrize(("content", "detail"), [
    (b"{not json", "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
    (b'{"receipt": {"kind": "bundlesync-receipt", "format": 1}, "signature": ""}', "'dataset_id'"),
])
def test_an_unreadable_receipt_is_a_receipt_error_naming_what_is_wrong(tmp_path: Path, content: bytes,
                                                                      detail: str) -> None:
    w = World.create(tmp_path / "w", 1)
    try:
        path = tmp_path / "receipt-00000000-00000000.json"
        path.write_bytes(content)
        with pytest.raises(ReceiptError) as caught:
            read_receipt(path, w.devices[0].keys, w.devices[0].profile)
        assert str(caught.value) == f"cannot read receipt {path}: {detail}; copy it again or export with --full"
    finally:
        w.close()


def test_a_concurrent_version_that_loses_still_leaves_its_history_in_the_vector(scene: Scene) -> None:
    """The local version wins, the incoming one is logged as the loser, and the stored vector is the join:
    a later local edit then fast-forwards the sender instead of conflicting with it again."""
    s = scene
    s.apply(s.versions())
    [mine] = s.versions("model = ? AND id = (SELECT min(id) FROM bundlesync_store WHERE model = ?)", (USERS, USERS))
    other = "c" * 32
    theirs = replace(mine, data=json.dumps({**json.loads(mine.data), "full_name": "loses"}, separators=(",", ":")),
                     inst=other, ctr=3, hlc=mine.hlc - 5, vv={other: 3}, wall=None)
    result, written = s.apply([theirs])
    assert result.outcomes["conflict"] == 1 and written.written == 0
    kept = s.stored(USERS, mine.id)
    assert kept is not None and (kept.inst, kept.ctr, kept.data) == (mine.inst, mine.ctr, mine.data)
    assert kept.vv == {**mine.vv, other: 3}
    [entry] = list_conflicts(s.target)
    assert entry["loser"]["inst"] == other and entry["loser"]["data"]["full_name"] == "loses"
