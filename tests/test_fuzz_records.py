"""Signed but malformed record streams: a clear BundleError (nothing written) or a clean refusal."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import Pair, dump_tables

from bundlesync.format import container as container
from bundlesync.device import Device
from bundlesync.errors import BundleError
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
    from conftest import run_cli

    bundle = run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb)).last_line
    return pair, dict(container.read_info(Path(bundle)).manifest)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(record_lines(), min_size=1, max_size=5))
def test_malformed_records_never_crash_or_half_apply(signed: tuple[Pair, dict[str, object]], lines: list[bytes]) -> None:
    pair, manifest = signed
    key = KeyStore(pair.a).device_key()
    out = pair.tmp / "fuzz"
    out.mkdir(exist_ok=True)
    manifest = {**manifest, "bundle_id": f"{abs(hash(tuple(lines))):032x}"[-32:]}
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
