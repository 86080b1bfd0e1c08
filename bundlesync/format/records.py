"""The record-line codec: one record version as a line of a bundle's payload, and back.

A bundle's payload is a sequence of record lines ``<head JSON>\t<data JSON>\n``. The head
holds the version (``m`` table, ``id``, ``p`` partition, ``h`` hybrid logical clock, ``i``
writer instance, ``c`` writer counter, ``v`` version vector, ``f`` flags: 1 deleted,
2 purged); the data is the row's values as a JSON object. :func:`head_sql` builds a line's head
from a store row inside SQLite (export adds the data), :func:`parse_record` reads one back
(import); :func:`encode_data` / :func:`decode_data` turn a row's values into the data JSON
that the store keeps and the line carries.

How values become JSON:

Values are encoded exactly as Python's JSON encoder writes them (compact separators,
non-ASCII text as is): floats keep full precision as their shortest round-trip ``repr``
(SQLite's own JSON functions keep only 15 significant digits, so serialization is
deliberately not done in SQL), and three kinds of value get a tag because JSON cannot
hold them:

- BLOB -> ``{"$hex": "<hex digits>"}``;
- a non-finite float -> ``{"$float": "nan" | "inf" | "-inf"}``;
- TEXT whose bytes are not valid UTF-8 (SQLite stores what it is given) ->
  ``{"$texthex": "<hex digits of the bytes>"}``, read back as :class:`RawText` and written
  to the app table as TEXT with the identical bytes, so such a value syncs exactly.

A row's data JSON may be at most :data:`MAX_DATA_BYTES` long, so that its record line stays
under the container's line limit; serialization holds back a larger row (see
:mod:`bundlesync.replica.store`).

:func:`decode_data` is the inverse. ``docs/format.md`` ("Record lines")
documents the encoding for other implementations.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Final

import msgspec

from bundlesync.errors import FormatError

__all__ = [
    "COUNTER_MAX",
    "HLC_MAX",
    "LINE_SQL",
    "MAX_DATA_BYTES",
    "RawText",
    "Version",
    "VersionVector",
    "WALL_MAX_MS",
    "check_records",
    "decode_data",
    "data_hash",
    "encode_data",
    "head_sql",
    "lenient_text",
    "line_key",
    "parse_record",
]

_HEX, _FLOAT, _TEXTHEX = "$hex", "$float", "$texthex"

MAX_DATA_BYTES = 15 << 20
"""Largest data JSON (UTF-8 bytes) of one record: the line limit (16 MiB) less 1 MiB for the head."""


class RawText(bytes):
    """A TEXT value whose bytes are not valid UTF-8: kept as bytes, written back as TEXT."""

    __slots__ = ()


def lenient_text(raw: bytes) -> str | RawText:
    """SQLite ``text_factory`` that keeps undecodable TEXT as :class:`RawText` instead of failing."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return RawText(raw)


def _tagged(value: object) -> object:
    if isinstance(value, RawText):
        return {_TEXTHEX: value.hex()}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {_HEX: bytes(value).hex()}
    raise TypeError(f"cannot serialize {type(value).__name__}")


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=_tagged, allow_nan=False)

# The fast codec is msgspec's (C, several times Python's json per row; see docs/performance.md). Its
# output and results must be exactly the reference encoder's above, because stored data is compared
# with fresh encodings to find edits that changed nothing, and peers compare lines byte for byte.
# msgspec writes floats in its own notation (1e16, not 1e+16) and BLOBs as base64, so those values
# are handed to it pre-encoded; anything else it cannot do exactly falls back to the reference.
_FAST_ENCODER = msgspec.json.Encoder()
_FAST_DECODER = msgspec.json.Decoder()
_RAW = msgspec.Raw
_PLAIN: Final = frozenset({str, int, type(None)})


def _may_hold_tags(text: str) -> bool:
    """False only if no key of ``text`` can be a tag: a ``$`` in a key is there as is or as an escape."""
    return "$" in text or "\\u" in text


def _fast_value(value: object) -> object:
    if type(value) is float:
        if value - value == 0.0:  # finite: NaN and the infinities are tagged, as the reference does
            return _RAW(float.__repr__(value))
        return {_FLOAT: repr(value)}
    if isinstance(value, RawText):
        return {_TEXTHEX: value.hex()}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {_HEX: bytes(value).hex()}
    return value


def _reference_encode(columns: Sequence[str], values: Sequence[object]) -> str:
    row = dict(zip(columns, values))
    try:
        return _ENCODER.encode(row)
    except ValueError:  # NaN or infinity somewhere: tag those floats
        return _ENCODER.encode(
            {k: {_FLOAT: repr(v)} if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
        )


def encode_data(columns: Sequence[str], values: Sequence[object]) -> str:
    """A row's values (in ``columns`` order) -> JSON object text."""
    plain = _PLAIN
    try:
        # Floats in [1e-4, 1e16) (either sign) and zero msgspec writes exactly as repr does (tested
        # over millions of values in tests/test_codec.py); others are handed over pre-encoded.
        return _FAST_ENCODER.encode(dict(zip(columns, [
            v if type(v) in plain or (type(v) is float and (1e-4 <= v < 1e16 or -1e16 < v <= -1e-4 or v == 0.0))
            else _fast_value(v) for v in values]))).decode("utf-8")
    except (TypeError, ValueError, OverflowError, UnicodeError, msgspec.MsgspecError):
        return _reference_encode(columns, values)  # an odd value: the reference encoder's text (or its error)


def _untag(row: dict[str, Any]) -> dict[str, Any]:
    for key, value in row.items():
        if isinstance(value, dict) and len(value) == 1:
            if _HEX in value:
                row[key] = bytes.fromhex(value[_HEX])
            elif _FLOAT in value:
                row[key] = float(value[_FLOAT])
            elif _TEXTHEX in value:
                row[key] = RawText(bytes.fromhex(value[_TEXTHEX]))
    return row


def decode_data(text: str) -> dict[str, Any]:
    """JSON text -> row dict, turning tagged BLOBs and non-finite floats back into values."""
    try:
        row = _FAST_DECODER.decode(text)
    except msgspec.MsgspecError:
        row = json.loads(text)  # what msgspec refuses (NaN literals, numbers out of range): the reference reader
    # Not an object: _untag fails on it as the reference reader always did.
    return _untag(row) if type(row) is not dict or _may_hold_tags(text) else row


VersionVector = dict[str, int]


@dataclass(frozen=True, slots=True)
class Version:
    """One record version as stored and as carried in bundles."""

    model: str
    id: str
    partition: str
    data: str
    deleted: bool
    purged: bool
    hlc: int
    inst: str
    ctr: int
    vv: VersionVector
    wall: int | None = None
    """The edit's own wall-clock time in ms (None: a version from before it was kept, ``hlc >> 16``)."""

    @property
    def edit_ms(self) -> int:
        """The edit's wall-clock time in ms."""
        return self.hlc >> 16 if self.wall is None else self.wall

    def key(self) -> tuple[bool, int, int, str, int]:
        """Total order used to pick a winner deterministically (see :mod:`bundlesync.replica.merge`)."""
        return (self.purged, self.hlc, self.edit_ms, self.inst, self.ctr)

    def covers(self, inst: str, ctr: int) -> bool:
        """True if this record's history includes write ``(inst, ctr)``."""
        return self.vv.get(inst, 0) >= ctr


WALL_MAX_MS: Final = (1 << 46) - 1
"""Latest edit time a clock may carry, in ms since 1970 (year 4199): clocks beyond are not real."""

HLC_MAX: Final = (1 << 62) - 1
"""Largest hybrid logical clock a record may carry (``WALL_MAX_MS << 16`` plus its logical part)."""

COUNTER_MAX: Final = (1 << 62) - 1
"""Largest counter (``c`` and version-vector values) a record may carry."""

def data_hash(data: str | bytes) -> int:
    """The 64-bit hash (signed, as SQLite keeps integers) of a record's data JSON (text, or its UTF-8 bytes).

    The store keeps it for every record, so it can tell a changed row or line from an unchanged one
    without keeping the data itself (BLAKE2b: a peer cannot make another line match a stored one).
    """
    raw = data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass")
    return int.from_bytes(_blake2b(raw, digest_size=8).digest(), "little", signed=True)


_blake2b = hashlib.blake2b


def head_sql(model: str, record_id: str, partition: str, inst: str) -> str:
    """SQL for the head JSON of a record line over a store row, given how its names are read.

    The other fields are the store's own columns (``hlc``, ``wall``, ``ctr``, ``vv``, ``deleted``,
    ``purged``); a NULL ``vv`` is the default vector ``{writer: counter}``, spelled out here exactly as
    the store's vector text would have it (it is NULL only for writer ids made of ASCII letters and
    digits).
    """
    return (f"json_object('m', {model}, 'id', {record_id}, 'p', {partition}, 'h', hlc, "
            f"'w', coalesce(wall, hlc >> 16), 'i', {inst}, 'c', ctr, "
            f"'v', coalesce(json(vv), json_object({inst}, ctr)), 'f', deleted + 2 * purged)")


LINE_SQL = f"CAST({head_sql('model', 'id', 'partition', 'inst')} || char(9) || data || char(10) AS BLOB)"
"""SQL over a row of the ``bundlesync_store`` view that yields its record line, where the store keeps its data."""


_Counter = Annotated[int, msgspec.Meta(ge=0, le=COUNTER_MAX)]


class _Head(msgspec.Struct):
    """A record head as a well-formed line has it, clocks in range (anything else takes the reference path)."""

    m: str
    id: str
    p: str
    h: Annotated[int, msgspec.Meta(ge=0, le=HLC_MAX)]
    i: str
    c: _Counter
    v: dict[str, _Counter]
    f: int
    w: Annotated[int, msgspec.Meta(ge=0, le=WALL_MAX_MS)] | None = None


_HEAD_DECODER = msgspec.json.Decoder(_Head)


def parse_record(line: bytes) -> Version:
    """Decode one record line; :class:`FormatError` if it is malformed."""
    head, tab, data = line.rstrip(b"\n").partition(b"\t")
    if tab:
        try:
            # The decoder checks the clock and counter ranges too (the reference path's _check_clocks).
            h = _HEAD_DECODER.decode(head)
            return Version(h.m, h.id, h.p, data.decode("utf-8"), bool(h.f & 1), bool(h.f & 2), h.h, h.i, h.c,
                           h.v, h.w)
        except (msgspec.MsgspecError, UnicodeDecodeError):
            pass  # the reference parser below says what is wrong (or accepts what it accepted before)
    return _parse_reference(line)


def check_records(lines: Sequence[bytes]) -> None:
    """Raise what :func:`parse_record` raises for the first line it refuses, without building versions.

    Import checks every line of a bundle before it writes anything, then parses each line it
    applies again: this check costs a fifth of a parse. A line the fast decoder takes,
    :func:`parse_record` takes too (same decoder); any other goes through :func:`parse_record`.
    """
    decode = _HEAD_DECODER.decode
    for line in lines:
        head, tab, data = line.partition(b"\t")
        if tab:
            try:
                decode(head)
                data.decode("utf-8")
                continue
            except (msgspec.MsgspecError, UnicodeDecodeError):
                pass
        parse_record(line)


_KEY_START = b'{"m":"'
_KEY_ID = b'","id":"'


def line_key(line: bytes) -> tuple[str, str] | None:
    """The ``(model, id)`` a record line names, read off a head laid out as bundlesync writes it.

    No parsing and no checks: None for any other layout, and a wrong answer for a head whose
    model or id holds an escaped quote. Use it only to find a stored line to compare the whole
    line with, byte for byte (a match proves the key).
    """
    if not line.startswith(_KEY_START):
        return None
    end = line.find(_KEY_ID, 6)
    stop = line.find(b'"', end + 8) if end > 0 else -1
    if stop < 0:
        return None
    return line[6:end].decode("utf-8", "replace"), line[end + 8 : stop].decode("utf-8", "replace")


def _parse_reference(line: bytes) -> Version:
    """Decode one record line; :class:`FormatError` if it is malformed."""
    head, tab, data = line.rstrip(b"\n").partition(b"\t")
    try:
        h = json.loads(head)
        flags = int(h["f"])
        wall = h.get("w")
        version = Version(
            model=str(h["m"]), id=str(h["id"]), partition=str(h["p"]), data=data.decode("utf-8"),
            deleted=bool(flags & 1), purged=bool(flags & 2), hlc=int(h["h"]), inst=str(h["i"]),
            ctr=int(h["c"]), vv={str(k): int(v) for k, v in h["v"].items()},
            wall=None if wall is None else int(wall),
        )
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError, OverflowError, RecursionError) as exc:
        detail = " ".join(repr(exc).split())[:200]
        raise FormatError(f"malformed record in bundle ({detail}); the signer wrote a bad bundle: report it") from exc
    if not tab:
        raise FormatError("malformed record in bundle (no data part); the signer wrote a bad bundle: report it")
    _check_clocks(version)
    return version


def _check_clocks(version: Version) -> None:
    """Refuse clocks and counters no real device makes: they would overflow SQLite's integers later."""
    problem = None
    if not 0 <= version.hlc <= HLC_MAX:
        problem = f"clock {version.hlc} outside 0..{HLC_MAX}"
    elif version.wall is not None and not 0 <= version.wall <= WALL_MAX_MS:
        problem = f"edit time {version.wall} outside 0..{WALL_MAX_MS}"
    elif not 0 <= version.ctr <= COUNTER_MAX or any(not 0 <= c <= COUNTER_MAX for c in version.vv.values()):
        problem = f"counter outside 0..{COUNTER_MAX}"
    if problem is not None:
        raise FormatError(f"malformed record in bundle ({version.model} {version.id[:40]}: {problem}); "
                          "the signer wrote a bad bundle: report it")
