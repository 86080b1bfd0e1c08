"""Fuzzed record streams inside validly signed bundles.

Malformed lines: a clear BundleError (nothing written) or a clean refusal. Valid-looking
records (real rows of the facility, changed the way a buggy or hostile learner tablet could:
another owner, another claimed partition, a new id, a deletion or purge, other clocks and
counters) must reach the merge, the scope checks and the app writes, and each must end as
the import's rules say: applied, refused as outside the signer's scope, or refused because
its data does not yield its partition; the store and the app tables must agree afterwards.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from dataclasses import dataclass, replace
from typing import Any
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import Pair, dump_tables, run_cli, store_rows
from forge import record_line, resign, versions_of
from trio import LOGS, USERS, Trio, trio_template  # noqa: F401  (fixture)

from bundlesync.format import container as container
from bundlesync.device import Device
from bundlesync.errors import BundleError
from bundlesync.format.records import Version, decode_data
from bundlesync.partitions import within
from bundlesync.trust.scope import scope_filters
from bundlesync.sync.importer import import_bundle
from bundlesync.trust.keystore import KeyStore

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def record_lines(draw: st.DrawFn) -> bytes:
    """Lines that are near-misses of real records, or plain garbage."""
    kind = draw(st.sampled_from(["garbage", "head", "fields"]))
    if kind == "garbage":
        return draw(st.binary(max_size=60)).replace(b"\n", b" ") + b"\n"
    head: dict[str, object] = {"m": "kolibriauth_facilityuser", "id": "a" * 32, "p": "x", "h": 1, "i": "b" * 32,
                               "c": 1, "v": {"b" * 32: 1}, "f": 0}
    if kind == "head":
        head[draw(st.sampled_from(sorted(head)))] = draw(json_values)
    else:
        head = draw(st.dictionaries(st.sampled_from(["m", "id", "p", "h", "i", "c", "v", "f"]), json_values))
    data = json.dumps(draw(json_values)).encode()
    return json.dumps(head).encode().replace(b"\n", b" ") + b"\t" + data.replace(b"\n", b" ") + b"\n"


@pytest.fixture
def signed(pair: Pair) -> tuple[Pair, dict[str, object]]:
    bundle = run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb), "--no-encrypt").last_line
    return pair, dict(container.read_info(Path(bundle)).manifest)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(record_lines(), min_size=1, max_size=5))
def test_malformed_records_never_crash_or_half_apply(signed: tuple[Pair, dict[str, object]], lines: list[bytes]) -> None:
    pair, manifest = signed
    key = KeyStore(pair.a).device_key()
    out = pair.tmp / "fuzz"
    out.mkdir(exist_ok=True)
    manifest = {**manifest, "bundle_id": hashlib.sha256(b"".join(lines)).hexdigest()[:32]}
    with container.BundleWriter(out, "bundle-fuzz.bsync", manifest, lambda d: key.sign("bundle", d)) as writer:
        writer.write_records(lines)
        path = writer.finish({"counts": {}})
    before = dump_tables(pair.b_db)
    store_before = sqlite3.connect(pair.b_db).execute("SELECT count(*) FROM bundlesync_store").fetchone()[0]
    with Device.open(pair.b) as device:
        try:
            result = import_bundle(device, path, receipt=False)
        except BundleError as exc:
            assert "\n" not in str(exc)
            assert dump_tables(pair.b_db) == before
            assert sqlite3.connect(pair.b_db).execute("SELECT count(*) FROM bundlesync_store").fetchone()[0] == store_before
        else:
            assert result.dequeue.refused + result.dequeue.not_for_us == result.dequeue.received
            assert dump_tables(pair.b_db) == before
    path.unlink()


# --------------------------------------------------------------------------- valid-looking records


@dataclass
class Scene:
    """A's home and pristine database, L's template bundle, and the real versions to start from."""

    trio: Trio
    pristine: Path
    template: Path
    learner: str  # L's instance id
    bases: list[Version]  # real store versions of A: U's logs, V's logs, users, classes, anonymous logs
    write: tuple[str, ...]  # L's write scope


@pytest.fixture(scope="module")
def scene(trio_template: Trio) -> Scene:
    t = trio_template
    work = t.root / "fuzz"
    work.mkdir(exist_ok=True)
    conn = sqlite3.connect(t.l_db)
    conn.execute(f"UPDATE {LOGS} SET progress = 0.5 WHERE id = (SELECT min(id) FROM {LOGS} WHERE user_id = ?)",
                 (t.user,))
    conn.commit()
    conn.close()
    template = Path(run_cli(t.l, "export", "--facility", t.facility, "--out", str(work), "--no-encrypt").last_line)
    learner = versions_of(template)[0].inst
    conn = sqlite3.connect(t.a_db)
    columns = "model, id, partition, data, deleted, purged, hlc, inst, ctr, vv"
    bases = []
    for where, params in ((f"model = '{LOGS}' AND partition = ?", (f"{t.dataset}:user-rw:{t.user}",)),
                          (f"model = '{LOGS}' AND partition = ?", (f"{t.dataset}:user-rw:{t.other}",)),
                          (f"model = '{USERS}' AND id IN (?, ?)", (t.user, t.other)),
                          ("model = 'kolibriauth_collection'", ()),
                          ("partition LIKE '%:anonymous'", ())):
        for r in store_rows(conn, f"{where} ORDER BY id LIMIT 4", params):
            row = [r[c] for c in columns.split(", ")]
            bases.append(Version(model=row[0], id=row[1], partition=row[2], data=row[3], deleted=bool(row[4]),
                                 purged=bool(row[5]), hlc=row[6], inst=row[7], ctr=row[8], vv=json.loads(row[9])))
    conn.close()
    assert {b.model for b in bases} >= {LOGS, USERS, "kolibriauth_collection"}
    with Device.open(t.a) as device:
        write = scope_filters(device.profile, t.dataset, f"user:{t.user}").write
    pristine = work / "a-pristine.sqlite3"
    shutil.copy2(t.a_db, pristine)
    return Scene(t, pristine, template, learner, bases, write)


@st.composite
def forged_versions(draw: st.DrawFn, scene: Scene) -> list[Version]:
    """1-6 changed copies of real versions, each of a distinct record, written by L."""
    t = scene.trio
    picks = draw(st.lists(st.integers(0, len(scene.bases) - 1), min_size=1, max_size=6, unique=True))
    out: list[Version] = []
    for n, i in enumerate(picks):
        base = scene.bases[i]
        row: dict[str, Any] = json.loads(base.data)
        if draw(st.booleans()):  # a new record rather than a new version of this one
            row["id"] = f"{n:02x}" + "e" * 30
        if "user_id" in row and draw(st.booleans()):  # another owner (or none: anonymous)
            row["user_id"] = draw(st.sampled_from([t.user, t.other, None]))
        if "progress" in row:
            row["progress"] = draw(st.floats(0, 1))
        if "full_name" in row:
            row["full_name"] = draw(st.text(max_size=12))
        claimed = draw(st.sampled_from([
            "data", f"{t.dataset}:user-rw:{t.user}", f"{t.dataset}:user-rw:{t.other}", f"{t.dataset}:anonymous",
            f"{t.dataset}:allusers-ro", base.partition]))
        flags = draw(st.sampled_from([0, 0, 0, 1, 3]))
        ctr = draw(st.integers(1, 50))
        version = replace(
            base, id=str(row["id"]), data="{}" if flags & 2 else json.dumps(row, separators=(",", ":")),
            deleted=bool(flags & 1), purged=bool(flags & 2),
            hlc=base.hlc + draw(st.sampled_from([-(1 << 16), 0, 1, 1 << 40])), inst=scene.learner, ctr=ctr,
            vv={**(base.vv if draw(st.booleans()) else {}), scene.learner: ctr},
            partition=base.partition if claimed == "data" else claimed,
        )
        if claimed == "data" and not version.purged:
            with Device.open(t.a) as device:
                try:
                    version = replace(version, partition=device.profile.table(base.model).partition_of(row))
                except Exception:  # noqa: BLE001 - no template fits (a NULL owner where one is needed)
                    pass
        out.append(version)
    return out


def _expected(scene: Scene, version: Version, local: dict[str, tuple[str, int]]) -> str:
    """What the import's rules say about one record: 'applied', 'out_of_scope' or 'bad_partition'."""
    if not within(version.partition, scene.write):
        return "out_of_scope"
    if not version.purged:
        with Device.open(scene.trio.a) as device:
            try:
                if device.profile.table(version.model).partition_of(decode_data(version.data)) != version.partition:
                    return "bad_partition"
            except Exception:  # noqa: BLE001 - the data yields no partition at all
                return "bad_partition"
    mine = local.get(version.id)
    if mine is not None and not within(mine[0], scene.write):
        return "out_of_scope"
    if version.purged:
        return "out_of_scope"  # only a full-facility certificate may purge
    return "applied"


def _store(db: Path) -> dict[str, tuple[str, int, str, int, int]]:
    conn = sqlite3.connect(db)
    try:
        return {f"{r['model']} {r['id']}": (r["partition"], r["hlc"], r["data"], r["purged"], r["dirty"])
                for r in store_rows(conn)}
    finally:
        conn.close()


def _store_matches_app(db: Path, device: Device) -> None:
    """Every applied store version is what the app table holds (rows waiting for a parent excepted)."""
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        for table in device.profile.tables:
            rows = {r[table.primary_key]: dict(r) for r in conn.execute(f'SELECT * FROM "{table.name}"')}
            for record_id, data, deleted, dirty, partition in [
                    (r["id"], r["data"], r["deleted"], r["dirty"], r["partition"])
                    for r in store_rows(conn, "model = ?", (table.name,))]:
                if dirty:
                    continue
                if deleted:
                    assert record_id not in rows, (table.name, record_id)
                    continue
                stored = decode_data(data)
                assert table.partition_of(stored) == partition, (table.name, record_id)
                assert rows.get(record_id) == {c: stored.get(c) for c in rows.get(record_id, stored)}, record_id
    finally:
        conn.close()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data())
def test_valid_looking_records_reach_every_check(scene: Scene, data: st.DataObject) -> None:
    t = scene.trio
    versions = data.draw(forged_versions(scene))
    shutil.copy2(scene.pristine, t.a_db)
    before = _store(t.a_db)
    local = {key.split(" ", 1)[1]: (v[0], v[1]) for key, v in before.items()}
    expected = [_expected(scene, v, local) for v in versions]
    for verdict in expected:
        event(verdict)  # --hypothesis-show-statistics: how often each rule decided
    path = resign(scene.template, t.l, map(record_line, versions), t.root / "fuzz" / "out")
    try:
        with Device.open(t.a) as device:
            result = import_bundle(device, path, receipt=False)
            dq = result.dequeue
            assert dq.received == len(versions)
            assert dq.out_of_scope == expected.count("out_of_scope"), (expected, dq.refused_sample)
            assert dq.bad_partition == expected.count("bad_partition"), (expected, dq.refused_sample)
            assert dq.not_for_us == 0  # A reads everything
            assert sum(dq.outcomes.values()) == expected.count("applied")
            after = _store(t.a_db)
            for v, verdict in zip(versions, expected):
                key = f"{v.model} {v.id}"
                if verdict != "applied":  # a refused record changes nothing
                    assert after.get(key) == before.get(key), (verdict, v)
                else:  # merged: new, or joined with A's version (the later clock is kept)
                    assert after[key][1] == (v.hlc if key not in before else max(v.hlc, before[key][1])), v
            _store_matches_app(t.a_db, device)
    finally:
        path.unlink()
