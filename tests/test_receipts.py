"""Receipts that cannot lie: a receipt lowers an export's basis only for its own signer.

A receipt is used only when its instance id is the one its signer's certificate binds and
its filter lies inside that certificate's read scope; anything else is ignored with a
warning naming the file, so whatever sits on a drive, the next bundle carries what every
honest reader of that drive lacks.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import PROFILE, Pair, dump_tables, make_db, run_cli
from sim import World

from bundlesync.format.records import parse_record
from bundlesync.partitions import covered, within
from bundlesync.sync.importer import read_records
from bundlesync.trust.certfiles import read_chain_file
from bundlesync.trust.crypto import load_private_key
from bundlesync.trust.receipts import Receipt, now_text, receipt_name, write_receipt
from bundlesync.trust.scope import scope_filters


def _status(home: Path) -> dict[str, object]:
    return json.loads(run_cli(home, "status", "--json").out)  # type: ignore[no-any-return]


def _learner(pair: Pair, name: str = "devL") -> tuple[Path, str]:
    """A third device with a single-user certificate issued by A; returns (home, user id)."""
    conn = sqlite3.connect(pair.a_db)
    user = str(conn.execute("SELECT min(id) FROM kolibriauth_facilityuser").fetchone()[0])
    conn.close()
    db, home = pair.tmp / f"{name}.sqlite3", pair.tmp / name
    make_db(db, schema_only=True)
    run_cli(home, "init", "--db", str(db), "--profile", str(PROFILE))
    certs = pair.tmp / f"{name}-certs"
    request = run_cli(home, "cert", "request", "--facility", pair.facility, "--scope", f"user:{user}",
                      "--out", str(certs)).last_line
    run_cli(home, "cert", "install", run_cli(pair.a, "cert", "issue", request, "--out", str(certs)).last_line)
    return home, user


def _forge(signer_home: Path, out: Path, *, dataset_id: str, claimed_instance: str, filter: list[str],
           fsic: dict[str, int]) -> Path:
    """A receipt signed with the signer's own valid key and chain, but claiming what it likes."""
    chain = read_chain_file(signer_home / "certs" / dataset_id / "device-chain.json")
    receipt = Receipt(dataset_id, claimed_instance, tuple(filter), fsic, now_text(),
                      tuple(c.to_dict() for c in chain))
    path = write_receipt(out, receipt, load_private_key(signer_home / "keys" / "device.key"))
    assert path.name == receipt_name(dataset_id, claimed_instance)
    return path


def test_a_learner_cannot_silence_the_authority_with_a_forged_receipt(pair: Pair) -> None:
    learner, _ = _learner(pair)
    first = run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb)).last_line
    run_cli(pair.b, "import", "--no-receipt", first)
    dataset_id = str(_status(pair.a)["facilities"][0]["dataset_id"])  # type: ignore[index]
    b_instance = str(_status(pair.b)["instance_id"])
    a_instance = str(_status(pair.a)["instance_id"])
    # The learner claims to be B, to read the whole facility, and to hold everything A will ever write.
    forged = _forge(learner, pair.usb, dataset_id=dataset_id, claimed_instance=b_instance, filter=[dataset_id],
                    fsic={a_instance: 10**9, b_instance: 10**9})
    conn = sqlite3.connect(pair.a_db)
    conn.execute("UPDATE kolibriauth_facilityuser SET full_name = 'edited on A' "
                 "WHERE id = (SELECT max(id) FROM kolibriauth_facilityuser)")
    conn.commit()
    conn.close()
    res = run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb))
    assert "nothing new" not in res.err
    assert f"ignored receipt {forged.name}" in res.err
    assert "instance" in res.err.split(forged.name, 1)[1].splitlines()[0]
    run_cli(pair.b, "import", res.last_line)
    assert dump_tables(pair.a_db) == dump_tables(pair.b_db)


def test_a_learner_receipt_claiming_the_whole_facility_is_ignored(pair: Pair) -> None:
    learner, _ = _learner(pair)
    first = run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb)).last_line
    run_cli(pair.b, "import", "--no-receipt", first)
    dataset_id = str(_status(pair.a)["facilities"][0]["dataset_id"])  # type: ignore[index]
    l_instance = str(_status(learner)["instance_id"])
    a_instance = str(_status(pair.a)["instance_id"])
    forged = _forge(learner, pair.usb, dataset_id=dataset_id, claimed_instance=l_instance, filter=[dataset_id],
                    fsic={a_instance: 10**9})
    conn = sqlite3.connect(pair.a_db)
    conn.execute("UPDATE kolibriauth_facilityuser SET full_name = 'edited again' "
                 "WHERE id = (SELECT max(id) FROM kolibriauth_facilityuser)")
    conn.commit()
    conn.close()
    res = run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb))
    assert f"ignored receipt {forged.name}" in res.err and "read scope" in res.err
    run_cli(pair.b, "import", res.last_line)
    assert dump_tables(pair.a_db) == dump_tables(pair.b_db)


# --------------------------------------------------------------------------- the property

AUTH, FULL_READER, LEARNER, OTHER_FULL = 0, 1, 2, 3
READERS = (FULL_READER, LEARNER, OTHER_FULL)


@dataclass
class Drive:
    """A world where readers hold different things, and receipts of each made at two moments."""

    world: World
    dataset_id: str
    user: str
    stale: dict[int, Receipt]
    current: dict[int, Receipt]
    tmp: Path


def _receipt_of(world: World, i: int, dataset_id: str, folder: Path) -> Receipt:
    path = world.receipt(i, folder)
    doc = json.loads(path.read_bytes())["receipt"]
    path.unlink()
    return Receipt(doc["dataset_id"], doc["instance_id"], tuple(doc["filter"]), doc["fsic"], doc["created_at"],
                   tuple(doc["chain"]))


@pytest.fixture(scope="module")
def drive_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Drive]:
    tmp = tmp_path_factory.mktemp("receipts")
    probe = tmp / "probe.sqlite3"
    make_db(probe, users=5, logs=40, seed=3)
    conn = sqlite3.connect(probe)
    user = str(conn.execute("SELECT user_id FROM logger_contentsessionlog WHERE user_id IS NOT NULL "
                            "GROUP BY user_id ORDER BY count(*) DESC LIMIT 1").fetchone()[0])
    conn.close()
    world = World.create(tmp / "w", 4, users=5, logs=40, seed=3, scopes={LEARNER: f"user:{user}"})
    dataset_id, _ = world.devices[AUTH].resolve_facility(world.facility)
    scratch = tmp / "scratch"
    scratch.mkdir()
    stale = {i: _receipt_of(world, i, dataset_id, scratch) for i in READERS}  # before anything arrived
    first = world.export(AUTH, tmp / "first")
    user_first = world.export(AUTH, tmp / "user-first", user=user)
    assert first is not None and user_first is not None
    world.deliver(first, FULL_READER)
    world.deliver(user_first, LEARNER)
    # Later edits everywhere, the learner's own rows included: nobody but A has them yet.
    world.sql(AUTH, "UPDATE kolibriauth_facilityuser SET full_name = 'later' WHERE id = "
                    "(SELECT max(id) FROM kolibriauth_facilityuser)")
    world.sql(AUTH, "UPDATE logger_contentsessionlog SET progress = 0.5 WHERE user_id = ?", (user,))
    world.sql(AUTH, "DELETE FROM logger_attemptlog WHERE id = (SELECT min(id) FROM logger_attemptlog)")
    second = world.export(AUTH, tmp / "second")
    assert second is not None
    world.deliver(second, OTHER_FULL)  # C got only the second bundle: a gap, it holds little of A
    world.sql(AUTH, "UPDATE logger_contentsessionlog SET time_spent = 7 WHERE user_id = ?", (user,))
    current = {i: _receipt_of(world, i, dataset_id, scratch) for i in READERS}
    yield Drive(world, dataset_id, user, stale, current, tmp)
    world.close()


def _holds(world: World, i: int, model: str, record_id: str, inst: str, ctr: int) -> bool:
    row = world.devices[i].conn.execute("SELECT vv FROM bundlesync_store WHERE model = ? AND id = ?",
                                        (model, record_id)).fetchone()
    return row is not None and int(json.loads(row[0]).get(inst, 0)) >= ctr


_counter = st.one_of(st.integers(0, 40), st.just(10**9))


@st.composite
def _forgery(draw: st.DrawFn) -> tuple[int, int | None, str, dict[int, int]]:
    """(signer, claimed device or None for a made-up instance, filter kind, counters per device)."""
    signer = draw(st.sampled_from(READERS))
    claimed = draw(st.one_of(st.none(), st.sampled_from((AUTH, *READERS))))
    filt = draw(st.sampled_from(["facility", "user", "other-user", "empty"]))
    fsic = draw(st.dictionaries(st.sampled_from((AUTH, *READERS)), _counter, max_size=4))
    return signer, claimed, filt, fsic


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    honest=st.sets(st.sampled_from(READERS)),
    stale_too=st.sets(st.sampled_from(READERS)),
    forgeries=st.lists(_forgery(), max_size=4),
    user_export=st.booleans(),
)
def test_the_next_bundle_plus_what_each_honest_reader_holds_covers_everything(
    drive_world: Drive, honest: set[int], stale_too: set[int],
    forgeries: list[tuple[int, int | None, str, dict[int, int]]], user_export: bool,
) -> None:
    d, w = drive_world, drive_world.world
    inst = {i: w.devices[i].instance_id for i in range(4)}
    # The world is shared by the examples, but each example is a new story: what A learned from an
    # earlier example's receipts (a device may claim anything about itself, and then starves only
    # itself) must not carry into this one, where that device is honest.
    with w.devices[AUTH].conn as conn:
        conn.execute("DELETE FROM bundlesync_peer_fsic")
        conn.execute("DELETE FROM bundlesync_peers")
    drive = d.tmp / f"drive-{uuid.uuid4().hex[:8]}"
    drive.mkdir()
    scope = scope_filters(w.devices[AUTH].profile, d.dataset_id, f"user:{d.user}")
    filters = {"facility": (d.dataset_id,), "user": scope.read, "empty": (),
               "other-user": scope_filters(w.devices[AUTH].profile, d.dataset_id, "user:abc").read}
    liars = [i for i in READERS if i not in honest]
    for n, i in enumerate(sorted(honest)):
        key = w.devices[i].keys.device_key()
        for tag, receipt in [("now", d.current[i])] + ([("old", d.stale[i])] if i in stale_too else []):
            write_receipt(drive, receipt, key).rename(drive / f"receipt-{d.dataset_id[:8]}-h{n}{tag}.json")
    for n, (signer, claimed, filt, counters) in enumerate(forgeries):
        if signer in honest:
            signer = liars[n % len(liars)] if liars else signer
        if signer in honest:
            continue  # every reader is honest in this example: forgeries come from outsiders' keys only
        dev = w.devices[signer]
        chain = dev.keys.device_chain(d.dataset_id)
        assert chain is not None
        claim = inst[claimed] if claimed is not None else uuid.uuid4().hex
        forged = Receipt(d.dataset_id, claim, tuple(filters[filt]), {inst[k]: v for k, v in counters.items()},
                         "9999-12-31T00:00:00.000000Z", tuple(c.to_dict() for c in chain))
        write_receipt(drive, forged, dev.keys.device_key()).rename(drive / f"receipt-{d.dataset_id[:8]}-f{n}.json")

    bundle = w.export(AUTH, drive, user=d.user if user_export else None)
    carried: set[tuple[str, str, str, int]] = set()
    if bundle is not None:
        for line in read_records(w.devices[AUTH], bundle):
            v = parse_record(line)
            carried.add((v.model, v.id, v.inst, v.ctr))
    export_filter = scope.read if user_export else (d.dataset_id,)
    for reader in honest:
        cert = w.devices[reader].keys.device_chain(d.dataset_id)
        assert cert is not None
        readable = scope_filters(w.devices[reader].profile, d.dataset_id, cert[0].scope).read
        if not covered(export_filter, readable):
            # Not a reader of this bundle: it is encrypted only to devices that may read its whole filter
            # (a learner's tablet gets its user's export, never the facility's).
            continue
        for model, record_id, partition, writer, ctr in w.devices[AUTH].conn.execute(
                "SELECT model, id, partition, inst, ctr FROM bundlesync_store"):
            if not (within(partition, export_filter) and within(partition, readable)):
                continue
            assert (model, record_id, writer, ctr) in carried or _holds(w, reader, model, record_id, writer, ctr), (
                f"reader {reader} would miss {model} {record_id} ({writer[:8]}:{ctr})")


def test_a_receipt_under_a_certificate_without_instance_id_is_ignored_with_a_hint_to_reissue(pair: Pair) -> None:
    """Certificates issued before they named their device cannot bind a receipt."""
    from bundlesync.trust.certs import issue_certificate
    from bundlesync.trust.keystore import KeyStore

    dataset_id = str(_status(pair.a)["facilities"][0]["dataset_id"])  # type: ignore[index]
    b_keys = KeyStore(pair.b)
    chain = b_keys.device_chain(dataset_id)
    root_key = KeyStore(pair.a).root_key(dataset_id)
    assert chain is not None and root_key is not None
    legacy = issue_certificate(chain[1], root_key, chain[0].subject_key, "full")  # no instance id
    b_keys.save_device_chain((legacy, chain[1]))
    run_cli(pair.b, "import", run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb)).last_line)
    receipt = next(pair.usb.glob("receipt-*.json")).name
    conn = sqlite3.connect(pair.a_db)
    conn.execute("UPDATE kolibriauth_facilityuser SET full_name = 'x' WHERE id = (SELECT min(id) FROM kolibriauth_facilityuser)")
    conn.commit()
    conn.close()
    res = run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb))
    assert f"ignored receipt {receipt}" in res.err and legacy.cert_id in res.err and "re-issue" in res.err


def test_of_several_receipts_of_one_device_on_a_drive_the_newest_counts(pair: Pair) -> None:
    """Two receipts of B on one drive, the older sorting last: A's basis comes from the newer."""
    from bundlesync.device import Device
    from bundlesync.replica.store import instance_id
    from bundlesync.trust.receipts import find_receipts, read_receipt

    def export_and_import() -> Path:
        for old in pair.usb.glob("*"):
            old.unlink()
        bundle = run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb)).last_line
        run_cli(pair.b, "import", bundle)
        (receipt,) = pair.usb.glob("receipt-*.json")
        return receipt

    first = export_and_import().read_bytes()
    conn = sqlite3.connect(pair.a_db)
    conn.execute("UPDATE kolibriauth_facilityuser SET full_name = full_name || ' (edited)'")
    conn.commit()
    conn.close()
    second = export_and_import().read_bytes()
    dev = Device.open(pair.a)
    try:
        drive = pair.tmp / "drive"
        drive.mkdir()
        dataset = json.loads(second)["receipt"]["dataset_id"]
        newer_path = drive / f"receipt-{dataset[:8]}-a-newer.json"
        older_path = drive / f"receipt-{dataset[:8]}-z-older.json"  # sorts last: read after the newer
        newer_path.write_bytes(second)
        older_path.write_bytes(first)
        newer = read_receipt(newer_path, dev.keys, dev.profile)
        older = read_receipt(older_path, dev.keys, dev.profile)
        assert older.created_at < newer.created_at and older.fsic != newer.fsic
        found, skipped = find_receipts(drive, dev.keys, dev.profile, dataset, instance_id(dev.conn))
    finally:
        dev.conn.close()
    assert skipped == []
    assert found == [newer]
