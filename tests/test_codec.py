"""The fast record codec (msgspec) gives exactly what the reference codec (Python's json) gives.

Stored data is compared with fresh encodings to tell real edits from no-op updates, and
record lines travel between devices byte for byte, so the fast path may never change a
single byte or a single decoded value; what it cannot do exactly must take the reference path.
"""

from __future__ import annotations

import json
import math
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bundlesync.errors import FormatError
from bundlesync.format import records
from bundlesync.format.records import RawText, decode_data, encode_data, parse_record

values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1),
    st.integers(min_value=-(1 << 80), max_value=1 << 80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-1e17, max_value=1e17),
    st.floats(min_value=-1e-3, max_value=1e-3),
    st.text(),
    st.text(alphabet=st.sampled_from('"\\$/\x00\x1f\x7f\u2028é😀{}u')),
    st.binary(),
    st.binary().map(RawText),
)


def _decode_reference(text: str) -> object:
    """decode_data as it was: json.loads, then every tag turned back into its value."""
    row = json.loads(text)
    return records._untag(row)


@settings(max_examples=400, deadline=None)
@given(st.lists(values, max_size=12))
def test_encode_matches_the_reference(row: list[object]) -> None:
    columns = [f"c{i}" for i in range(len(row))]
    fast = encode_data(columns, row)
    assert fast == records._reference_encode(columns, row)
    decoded = decode_data(fast)
    assert list(decoded) == columns
    for got, want in zip(decoded.values(), row):
        if isinstance(want, float) and math.isnan(want):
            assert isinstance(got, float) and math.isnan(got)
        elif isinstance(want, (bytes, bytearray)):
            assert got == want and type(got) is (RawText if isinstance(want, RawText) else bytes)
        else:
            assert got == want and type(got) is type(want)
            if isinstance(want, float) and isinstance(got, float):
                assert math.copysign(1.0, got) == math.copysign(1.0, want)  # -0.0 stays -0.0


def test_float_notation_matches_repr_across_the_range() -> None:
    # The fast path writes floats itself only where its notation is repr's; sample every binade.
    rnd = random.Random(20)
    samples = [0.0, -0.0, 1e-4, -1e-4, 1e16, -1e16, 9999999999999998.0, 5e-324, 1.7976931348623157e308]
    samples += [struct.unpack("<d", struct.pack("<Q", rnd.getrandbits(64)))[0] for _ in range(20_000)]
    samples += [rnd.choice((-1, 1)) * 10 ** rnd.uniform(-6, 18) for _ in range(20_000)]
    for value in samples:
        assert encode_data(["x"], [value]) == records._reference_encode(["x"], [value]), value


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from('{}[]":,0123456789.eE+-$\\untrfalsex ')))
def test_decode_matches_the_reference_on_any_text(text: str) -> None:
    try:
        want: object = _decode_reference(text)
    except Exception as exc:  # noqa: BLE001 - the reference's failure is what the fast path must give
        with pytest.raises(type(exc)):
            decode_data(text)
        return
    got = decode_data(text)
    assert json.dumps(got, default=repr, sort_keys=True) == json.dumps(want, default=repr, sort_keys=True)


def test_decode_keeps_what_only_the_reference_reads() -> None:
    assert math.isnan(decode_data('{"a":NaN}')["a"])
    assert decode_data('{"a":1E400}')["a"] == math.inf
    assert decode_data('{"a":123456789012345678901234567890}')["a"] == 123456789012345678901234567890
    assert decode_data('{"a":{"\\u0024hex":"00ff"}}')["a"] == b"\x00\xff"  # an escaped tag key is still a tag
    with pytest.raises(AttributeError):
        decode_data("[1, 2]")


heads = st.fixed_dictionaries(
    {"m": st.text(max_size=8), "id": st.text(max_size=8), "p": st.text(max_size=8),
     "h": st.integers(min_value=-2, max_value=1 << 64), "i": st.text(max_size=8),
     "c": st.one_of(st.integers(min_value=-2, max_value=1 << 64), st.booleans(), st.floats(0, 9)),
     "v": st.dictionaries(st.text(max_size=4), st.integers(min_value=-2, max_value=1 << 64), max_size=3),
     "f": st.integers(min_value=0, max_value=3)},
    optional={"w": st.one_of(st.none(), st.integers(min_value=-2, max_value=1 << 50)), "x": st.integers()},
)


@settings(max_examples=400, deadline=None)
@given(heads, st.sampled_from([b"\t{}\n", b"\t{\"a\":1}\n", b"\n", b"\t\xff\n"]))
def test_parse_matches_the_reference(head: dict[str, object], tail: bytes) -> None:
    line = json.dumps(head, ensure_ascii=False).encode() + tail
    try:
        want = records._parse_reference(line)
    except FormatError as exc:
        with pytest.raises(FormatError) as caught:
            parse_record(line)
        assert str(caught.value) == str(exc)
        return
    assert parse_record(line) == want


@settings(max_examples=400, deadline=None)
@given(heads, st.sampled_from([b"\t{}\n", b"\t{\"a\":1}\n", b"\n", b"\t\xff\n", b"\t\t{}"]), st.integers(0, 3))
def test_check_refuses_exactly_what_parse_refuses(head: dict[str, object], tail: bytes, at: int) -> None:
    line = json.dumps(head, ensure_ascii=False).encode() + tail
    good = b'{"m":"t","id":"r","p":"d:p","h":1,"i":"a","c":1,"v":{"a":1},"f":0}\t{}\n'
    lines = [good] * at + [line] + [good]
    try:
        parse_record(line)
    except FormatError as exc:
        with pytest.raises(FormatError) as caught:
            records.check_records(lines)
        assert str(caught.value) == str(exc)
        return
    records.check_records(lines)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.one_of(st.text(), st.text(alphabet="0123456789abcdef", min_size=32, max_size=32)),
                       st.integers(min_value=-(1 << 70), max_value=1 << 70), max_size=5))
def test_stored_vectors_keep_their_text(vv: dict[str, int]) -> None:
    from bundlesync.replica.store import _vector_text
    assert _vector_text(vv) == json.dumps(vv, separators=(",", ":"), sort_keys=True)


@settings(max_examples=200, deadline=None)
@given(heads)
def test_line_key_names_the_record_of_a_line_as_exported(head: dict[str, object]) -> None:
    from bundlesync.format.records import line_key
    ordered = {"m": head["m"], "id": head["id"], **head}
    line = json.dumps(ordered, ensure_ascii=False, separators=(",", ":")).encode() + b"\t{}\n"
    key = line_key(line)
    plain = all('"' not in str(head[k]) and "\\" not in json.dumps(head[k]) for k in ("m", "id"))
    if plain:
        assert key == (head["m"], head["id"])  # a wrong guess is allowed only where escapes make one
    assert line_key(b' {"m":"a","id":"b"}\t{}\n') is None and line_key(b'{"m":"a"}\t{}\n') is None
