"""How a row's values become the JSON text kept in the store and carried in bundles.

Values are encoded by Python's C JSON encoder: floats keep full precision
(shortest round-trip ``repr``; SQLite's own JSON functions keep only 15
significant digits, so serialization is deliberately not done in SQL), and two
kinds of value get a tag because JSON cannot hold them:

- BLOB -> ``{"$hex": "<hex digits>"}``;
- a non-finite float -> ``{"$float": "nan" | "inf" | "-inf"}``.

:func:`decode_data` is the inverse. ``docs/format.md`` ("Record lines")
documents the encoding for other implementations.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

__all__ = ["decode_data", "encode_data"]

_HEX, _FLOAT = "$hex", "$float"


def _tagged(value: object) -> object:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {_HEX: bytes(value).hex()}
    raise TypeError(f"cannot serialize {type(value).__name__}")


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=_tagged, allow_nan=False)


def encode_data(columns: Sequence[str], values: Sequence[object]) -> str:
    """A row's values (in ``columns`` order) -> JSON object text."""
    row = dict(zip(columns, values))
    try:
        return _ENCODER.encode(row)
    except ValueError:  # NaN or infinity somewhere: tag those floats (rare, so not on the fast path)
        return _ENCODER.encode(
            {k: {_FLOAT: repr(v)} if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
        )


def decode_data(text: str) -> dict[str, Any]:
    """JSON text -> row dict, turning tagged BLOBs and non-finite floats back into values."""
    row: dict[str, Any] = json.loads(text)
    for key, value in row.items():
        if isinstance(value, dict) and len(value) == 1:
            if _HEX in value:
                row[key] = bytes.fromhex(value[_HEX])
            elif _FLOAT in value:
                row[key] = float(value[_FLOAT])
    return row
