"""Fuzz the bundle reader and the receipt reader (small budget; ``scripts/fuzz.py`` runs longer).

Only bundlesync's own errors may come out, and each example stays within a memory bound
(``tracemalloc`` peak), whatever the damage.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import Pair, run_cli
from fuzz_targets import Mutation, Seeds, read_bundle, read_receipt_file

from bundlesync.trust.keystore import KeyStore

PEAK_BYTES = 64 << 20
"""Most memory one read of a damaged file may allocate (the seeds are a few KiB)."""

mutations = st.lists(
    st.builds(Mutation, st.floats(0, 1), st.integers(0, 64),
              st.binary(max_size=64) | st.sampled_from([b"\n", b"\t", b"{", b'"h":1e400', b"\xff" * 8, b"\x00" * 64])),
    min_size=1, max_size=4,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


@pytest.fixture
def seeds(pair: Pair) -> Seeds:
    bundle = Path(run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb)).last_line)
    run_cli(pair.b, "import", str(bundle))
    receipt = next(pair.usb.glob("receipt-*.json"))
    return Seeds(bundle.read_bytes(), receipt.read_bytes(), KeyStore(pair.a).device_key(), pair.a)


def bounded(target: object, *args: object) -> None:
    tracemalloc.start()
    try:
        target(*args)  # type: ignore[operator]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < PEAK_BYTES, peak


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damage=mutations, resign=st.booleans())
def test_damaged_bundles_fail_only_with_bundlesync_errors(seeds: Seeds, tmp_path: Path, damage: list[Mutation],
                                                          resign: bool) -> None:
    bounded(read_bundle, seeds, damage, resign, tmp_path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damage=mutations, field=st.none() | st.sampled_from(["fsic", "filter", "chain", "dataset_id", "created_at",
                                                            "format", "kind"]), value=json_values)
def test_damaged_receipts_fail_only_with_bundlesync_errors(seeds: Seeds, tmp_path: Path, damage: list[Mutation],
                                                           field: str | None, value: object) -> None:
    bounded(read_receipt_file, seeds, damage, field, value, tmp_path)


HEAD = b'{"c":1,"f":0,"h":65536,"i":"a","id":"r","m":"t","p":"d","v":{"a":1}}'


@pytest.mark.parametrize("line", [
    HEAD.replace(b'"h":65536', b'"h":1e400'),  # JSON infinity: int() overflows
    HEAD.replace(b'"h":65536', b'"h":9223372036854775807'),  # 2^63 - 1: every later edit overflows
    HEAD.replace(b'"h":65536', b'"h":-1'),
    HEAD.replace(b'"c":1', b'"c":1e400'),
    HEAD.replace(b'"v":{"a":1}', b'"v":{"a":1e999}'),
    HEAD.replace(b'"v":{"a":1}', b'"v":{"a":99999999999999999999999}'),
    HEAD.replace(b'"h":65536', b'"h":65536,"w":1e400'),
    b"[" * 100_000,  # deeper than the JSON parser recurses
])
def test_hostile_record_heads_are_malformed_records(line: bytes) -> None:
    from bundlesync.errors import FormatError
    from bundlesync.format.records import parse_record

    with pytest.raises(FormatError, match="malformed record"):
        parse_record(line + b"\t{}\n")
