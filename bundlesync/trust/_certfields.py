"""The field rules shared by certificates and certificate requests, and their JSON form.

Private to :mod:`bundlesync.trust.certs` and :mod:`bundlesync.trust.certfiles`. Each field name has
one rule, whichever dataclass it appears in; :func:`check_fields` applies them on
construction. The JSON form of such a dataclass is an object with exactly its fields:
optional ones are written as null (so an absent field means damage), ``bytes`` as
lowercase hex. A broken rule raises :class:`Malformed`; the caller turns it into a
one-line :class:`~bundlesync.errors.CertError` with its own hint.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from bundlesync.trust.crypto import PUBLIC_KEY_SIZE, SIGNATURE_SIZE
from bundlesync.errors import CertError

__all__ = [
    "FULL_SCOPE",
    "OMIT_IF_NONE",
    "RECIPIENT_RE",
    "Malformed",
    "check_fields",
    "check_keys",
    "check_scope",
    "from_json",
    "now_utc",
    "parse_time",
    "to_json",
    "validate_id",
    "validate_names",
]

FULL_SCOPE = "full"
# Ids end up in file names (keys/root-<dataset_id>.key), so no dots or slashes: no traversal.
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
_PROFILE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_USER_ID_RE = re.compile(r"[0-9a-f]{1,64}")
_HEX32_RE = re.compile(r"[0-9a-f]{32}")
_TIME_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,6})?Z", re.ASCII)
_HEX_RE = re.compile(r"(?:[0-9a-f]{2})*")
# An age X25519 recipient: "age1" and 58 lowercase Bech32 characters.
RECIPIENT_RE = re.compile(r"age1[02-9ac-hj-np-z]{58}")
OMIT_IF_NONE = "omit_if_none"
"""Field metadata: the field was added later; ``None`` is written by leaving the key out.

Certificates signed before such a field existed keep their id and signature, because
their canonical body is unchanged; a reader treats the missing key as ``None``.
"""


class Malformed(ValueError):
    """A field has the wrong shape; callers turn it into a CertError with their own hint."""


def now_utc(now: datetime | None) -> datetime:
    """``now`` as an aware datetime (naive means UTC), or the current time if ``None``."""
    if now is None:
        return datetime.now(timezone.utc)
    return now if now.tzinfo is not None else now.replace(tzinfo=timezone.utc)


def parse_time(field: str, value: object) -> datetime:
    """Parse an ISO-8601 UTC time such as ``"2025-01-31T12:00:00Z"`` (raises Malformed)."""
    if not isinstance(value, str) or not _TIME_RE.fullmatch(value):
        raise Malformed(
            f"{field} {value!r} is not an ISO-8601 UTC time like 2025-01-31T12:00:00Z"
        )
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise Malformed(f"{field} {value!r} is not a valid date and time") from exc


def check_scope(field: str, value: object) -> None:
    """Require ``"full"`` or ``"user:<USER_ID>"`` with a lowercase hex user id."""
    if value == FULL_SCOPE:
        return
    kind, sep, uid = value.partition(":") if isinstance(value, str) else ("", "", "")
    if kind != "user" or not sep or not _USER_ID_RE.fullmatch(uid):
        raise Malformed(
            f"{field} {value!r} is not 'full' or 'user:<USER_ID>' with a lowercase hex user id"
        )


def validate_id(value: str, what: str) -> str:
    """Return ``value`` if it is a valid dataset, facility or instance id (safe in file names).

    Raises:
        CertError: Not 1-128 letters, digits, ``-`` or ``_`` starting with a letter or digit;
            ``what`` names the id in the message (e.g. ``"dataset id"``).
    """
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise CertError(
            f"{what} {value!r} is not valid; use 1-128 letters, digits, '-' or '_' "
            "(starting with a letter or digit)"
        )
    return value


def validate_names(profile: str, **ids: str | None) -> None:
    """Check the ids (``None`` is skipped) and the profile name a caller was given.

    Raises:
        CertError: Naming the first argument that is not valid.
    """
    for name, value in ids.items():
        if value is not None:
            validate_id(value, name.replace("_", " "))
    if not isinstance(profile, str) or not _PROFILE_RE.fullmatch(profile):
        raise CertError(
            f"profile name {profile!r} is not valid; use letters, digits, '.', '-' or '_'"
        )


def _text(pattern: re.Pattern[str], describe: str) -> Callable[[str, object], None]:
    def check(field: str, value: object) -> None:
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise Malformed(f"{field} {value!r} is not {describe}")

    return check


def _raw(size: int) -> Callable[[str, object], None]:
    def check(field: str, value: object) -> None:
        if not isinstance(value, bytes) or len(value) != size:
            raise Malformed(f"{field} is not {size} bytes")

    return check


_hex32 = _text(_HEX32_RE, "32 lowercase hex characters")
_recipient = _text(RECIPIENT_RE, "an age recipient (age1...)")
_ident = _text(_ID_RE, "a valid id")
_RULES: dict[str, Callable[[str, object], object]] = {
    "cert_id": _hex32,
    "issuer_id": _hex32,
    "nonce": _hex32,
    "dataset_id": _ident,
    "facility_id": _ident,
    "instance_id": _ident,
    "profile": _text(_PROFILE_RE, "a valid profile name"),
    "scope": check_scope,
    "issued_at": parse_time,
    "expires_at": parse_time,
    "created_at": parse_time,
    "recipient": _recipient,
    "subject_key": _raw(PUBLIC_KEY_SIZE),
    "device_key": _raw(PUBLIC_KEY_SIZE),
    "signature": _raw(SIGNATURE_SIZE),
}
_SCHEMAS: dict[type, tuple[tuple[str, bool, bool, bool], ...]] = {}


def _schema(cls: type) -> tuple[tuple[str, bool, bool, bool], ...]:
    """``(name, is bytes, may be None, omitted when None)`` of each field of a dataclass."""
    if cls not in _SCHEMAS:
        hints = typing.get_type_hints(cls)
        _SCHEMAS[cls] = tuple(
            (f.name, hints[f.name] is bytes, type(None) in typing.get_args(hints[f.name]),
             bool(f.metadata.get(OMIT_IF_NONE)))
            for f in dataclasses.fields(cls)
        )
    return _SCHEMAS[cls]


def check_fields(obj: object) -> None:
    """Apply each field's rule to a dataclass instance (``None`` passes where allowed)."""
    for name, _, optional, _ in _schema(type(obj)):
        value = getattr(obj, name)
        if value is not None or not optional:
            _RULES[name](name, value)


def check_keys(d: Mapping[str, object], allowed: Sequence[str], what: str) -> None:
    """Refuse keys not in ``allowed``: they would be unsigned, yet look meaningful."""
    extra = sorted(str(k) for k in d if k not in allowed)
    if extra:
        raise Malformed(f"{what} has unknown field(s) {', '.join(map(repr, extra))}")


def to_json(obj: object, *, without: Sequence[str] = ()) -> dict[str, object]:
    """The JSON object of a dataclass instance, minus the fields in ``without``."""
    form: dict[str, object] = {}
    for name, _, _, omit in _schema(type(obj)):
        value = getattr(obj, name)
        if name not in without and not (omit and value is None):
            form[name] = value.hex() if isinstance(value, bytes) else value
    return form


def from_json(cls: type, d: object, what: str, extra: Sequence[str] = ()) -> dict[str, Any]:
    """The constructor arguments of dataclass ``cls`` from its JSON object ``d``.

    ``what`` names the object in messages; ``extra`` lists other keys it may have.
    """
    if not isinstance(d, Mapping):
        raise Malformed(f"{what} is not a JSON object")
    schema = _schema(cls)
    check_keys(d, [name for name, _, _, _ in schema] + list(extra), what)
    kwargs: dict[str, Any] = {}
    for name, is_bytes, optional, omit in schema:
        if name not in d and omit:
            kwargs[name] = None
            continue
        if name not in d:
            raise Malformed(f"field {name!r} is missing")
        value = d[name]
        if value is None and optional and not omit:
            kwargs[name] = None
        elif not isinstance(value, str):
            raise Malformed(f"field {name!r} is not a string")
        elif is_bytes:
            if not _HEX_RE.fullmatch(value):
                raise Malformed(f"{name} is not lowercase hex")
            kwargs[name] = bytes.fromhex(value)
        else:
            kwargs[name] = value
    return kwargs
