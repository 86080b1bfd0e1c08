"""Facility certificates: what a device key may do, and the offline request/grant round trip.

A facility (dataset) has a self-signed *root* certificate held by its authority device. Every
other certificate binds one device's Ed25519 key to ``(dataset_id, facility_id, profile,
scope)`` and is signed by its issuer; a chain ``[leaf, ..., root]`` is trusted when it ends
exactly at the device's trusted root for that dataset (see :func:`verify_chain`). Scopes are
``"full"`` or ``"user:<USER_ID>"``; only full-scope certificates may issue others.

Certificates travel as JSON. Their identity and signatures are computed over *canonical*
bytes (sorted keys, no spaces, UTF-8; keys and signatures as lowercase hex), so a file may
be pretty-printed freely without breaking anything:

* ``cert_id`` = first 32 hex characters of SHA-256 over the canonical body without
  ``cert_id`` and ``signature``;
* ``signature`` = the issuer's key over the canonical body (everything but ``signature``),
  in the ``"cert"`` signature context.

Because USB drives pass through untrusted hands, everything read from a file is validated
field by field and refused with one line that says what is wrong and what to do.

Deliberately not checked: a certificate's ``issued_at`` against the clock. Offline tablets'
clocks drift by days, and refusing a fresh certificate as "not yet valid" would strand
them; only ``expires_at`` is enforced.

The request/grant round trip (Morango's CSR, done with files):

1. the requesting device writes a request (:func:`make_request` + :func:`write_request`),
   signed by its device key as proof of possession;
2. the authority reads it (:func:`read_request`), issues a leaf certificate
   (:func:`issue_certificate`) and writes a grant (:func:`write_grant`);
3. the requesting device reads the grant (:func:`read_grant`) and installs it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from bundlesync.crypto import (
    PUBLIC_KEY_SIZE,
    SIGNATURE_SIZE,
    SigningKey,
    key_fingerprint,
    verify,
)
from bundlesync.errors import CertError, TrustError

__all__ = [
    "CHAIN_TYPE",
    "FORMAT_VERSION",
    "FULL_SCOPE",
    "GRANT_TYPE",
    "MAX_CHAIN_LENGTH",
    "REQUEST_TYPE",
    "CertGrant",
    "CertRequest",
    "Certificate",
    "canonical_json",
    "format_time",
    "grant_file_name",
    "issue_certificate",
    "make_request",
    "make_root_certificate",
    "parse_scope",
    "read_chain_file",
    "read_grant",
    "read_request",
    "request_file_name",
    "scope_covers",
    "validate_id",
    "verify_chain",
    "write_chain_file",
    "write_grant",
    "write_request",
]

FORMAT_VERSION = 1
REQUEST_TYPE = "bundlesync-cert-request"
GRANT_TYPE = "bundlesync-cert-grant"
CHAIN_TYPE = "bundlesync-cert-chain"
FULL_SCOPE = "full"
# Real chains are [leaf, root] or [leaf, intermediate, root]; the cap bounds the work a
# hostile file can make us do.
MAX_CHAIN_LENGTH = 8

_CERT_CONTEXT = "cert"
_REQUEST_CONTEXT = "request"
# Requests and grants are a few KB; refuse to slurp a multi-GB file a user picked by mistake.
_MAX_FILE_SIZE = 1024 * 1024
# Ids end up in file names (keys/root-<dataset_id>.key), so no dots or slashes: no traversal.
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
_PROFILE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_USER_ID_RE = re.compile(r"[0-9a-f]{1,64}")
_CERT_ID_RE = re.compile(r"[0-9a-f]{32}")
_NONCE_RE = re.compile(r"[0-9a-f]{32}")
_TIME_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,6})?Z", re.ASCII)
_HEX_RE = re.compile(r"(?:[0-9a-f]{2})*")

_CERT_FIELDS = frozenset(
    "cert_id dataset_id facility_id profile scope subject_key issuer_id issued_at expires_at "
    "signature".split()
)
_REQUEST_FIELDS = frozenset(
    "type format dataset_id facility_id profile scope device_key instance_id created_at nonce "
    "signature".split()
)
_KIND_NAMES = {
    REQUEST_TYPE: "a certificate request",
    GRANT_TYPE: "a certificate grant",
    CHAIN_TYPE: "a certificate chain",
}

_NEW_CERT_HINT = "ask the facility's authority for a new certificate"


class _Malformed(ValueError):
    """A field has the wrong shape; callers turn it into a CertError with their own hint."""


# --------------------------------------------------------------------------- helpers


def canonical_json(obj: object) -> bytes:
    """The canonical bytes of a JSON value: what ids and signatures are computed over.

    Args:
        obj: A JSON-compatible value (binary already hex encoded).

    Returns:
        Sorted keys, no whitespace, UTF-8.
    """
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def format_time(dt: datetime) -> str:
    """Format a datetime the way certificates store it: ISO-8601 UTC with a ``Z``.

    Args:
        dt: An aware datetime, or a naive one taken to be UTC.

    Returns:
        E.g. ``"2025-01-31T12:00:00Z"`` (whole seconds).
    """
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(timezone.utc)
    # A naive "now" is taken as UTC (datetime.utcnow() style) rather than local time.
    return now if now.tzinfo is not None else now.replace(tzinfo=timezone.utc)


def _parse_time(value: str, field: str) -> datetime:
    if not _TIME_RE.fullmatch(value):
        raise _Malformed(
            f"{field} {value!r} is not an ISO-8601 UTC time like 2025-01-31T12:00:00Z"
        )
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise _Malformed(f"{field} {value!r} is not a valid date and time") from exc


def validate_id(value: str, what: str) -> str:
    """Check a dataset, facility or instance id before it is used in a file name.

    Args:
        value: The id.
        what: What it is, for the message (e.g. ``"dataset id"``).

    Returns:
        ``value`` unchanged.

    Raises:
        CertError: The id is empty, too long or has characters other than letters,
            digits, ``-`` and ``_``.
    """
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise CertError(
            f"{what} {value!r} is not valid; use 1-128 letters, digits, '-' or '_' "
            "(starting with a letter or digit)"
        )
    return value


def _check_id(value: str, field: str) -> None:
    if not _ID_RE.fullmatch(value):
        raise _Malformed(f"{field} {value!r} is not a valid id")


def _check_profile(value: str) -> None:
    if not _PROFILE_RE.fullmatch(value):
        raise _Malformed(f"profile {value!r} is not a valid profile name")


def _check_scope(value: str) -> None:
    if value == FULL_SCOPE:
        return
    kind, sep, uid = value.partition(":")
    if kind != "user" or not sep or not _USER_ID_RE.fullmatch(uid):
        raise _Malformed(
            f"scope {value!r} is not 'full' or 'user:<USER_ID>' with a lowercase hex user id"
        )


def _unhex(value: object, field: str, size: int) -> bytes:
    if value is None:
        raise _Malformed(f"field {field!r} is missing")
    if not isinstance(value, str) or len(value) != 2 * size or not _HEX_RE.fullmatch(value):
        raise _Malformed(f"{field} is not {2 * size} lowercase hex characters")
    return bytes.fromhex(value)


def _opt_str(d: Mapping[str, object], field: str) -> str | None:
    # Optional fields are still always written (as null), so absence means damage.
    if field not in d:
        raise _Malformed(f"field {field!r} is missing")
    value = d[field]
    if value is not None and not isinstance(value, str):
        raise _Malformed(f"field {field!r} is not a string or null")
    return value


def _req_str(d: Mapping[str, object], field: str) -> str:
    value = d.get(field)
    if value is None:
        raise _Malformed(f"field {field!r} is missing")
    if not isinstance(value, str):
        raise _Malformed(f"field {field!r} is not a string")
    return value


def _check_keys(d: Mapping[str, object], allowed: frozenset[str], what: str) -> None:
    # Unknown fields would be unsigned yet look meaningful; refuse rather than ignore.
    extra = sorted(str(k) for k in d if k not in allowed)
    if extra:
        raise _Malformed(f"{what} has unknown field(s) {', '.join(map(repr, extra))}")


# --------------------------------------------------------------------------- scopes


def parse_scope(scope: str) -> tuple[str, str | None]:
    """Split a scope string into its kind and user id.

    Args:
        scope: ``"full"`` or ``"user:<USER_ID>"`` (USER_ID in lowercase hex).

    Returns:
        ``("full", None)`` or ``("user", user_id)``.

    Raises:
        CertError: The scope is neither form.
    """
    if not isinstance(scope, str):
        raise CertError(
            f"scope {scope!r} is not a string; use --scope full or --scope user:USER_ID"
        )
    try:
        _check_scope(scope)
    except _Malformed as exc:
        raise CertError(f"{exc}; use --scope full or --scope user:USER_ID") from exc
    if scope == FULL_SCOPE:
        return (FULL_SCOPE, None)
    return ("user", scope.partition(":")[2])


def scope_covers(parent: str, child: str) -> bool:
    """Whether everything ``child`` may touch is inside ``parent``.

    ``"full"`` covers every scope; ``"user:U"`` covers only itself.

    Args:
        parent: The wider scope.
        child: The scope to test.

    Returns:
        True if ``child`` ⊆ ``parent``.

    Raises:
        CertError: Either scope is malformed.
    """
    parent_kind, _ = parse_scope(parent)
    parse_scope(child)
    if parent_kind == FULL_SCOPE:
        return True
    return parent == child


# --------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Certificate:
    """A signed statement "key ``subject_key`` may sync ``scope`` of dataset ``dataset_id``".

    Instances always hold well-formed fields (checked on construction); whether the id
    and signature are *right* is checked by :func:`verify_chain`.

    Attributes:
        cert_id: 32 hex characters derived from the content (see :meth:`computed_id`).
        dataset_id: The dataset (facility data) the certificate is for.
        facility_id: The facility the dataset belongs to.
        profile: The sync profile name, e.g. ``"facilitydata"``.
        scope: ``"full"`` or ``"user:<USER_ID>"``.
        subject_key: The raw 32-byte Ed25519 public key being certified.
        issuer_id: The issuing certificate's id; ``None`` for a self-signed root.
        issued_at: ISO-8601 UTC time of issue.
        expires_at: ISO-8601 UTC expiry time, or ``None`` for no expiry.
        signature: The issuer's 64-byte signature over :meth:`body`.
    """

    cert_id: str
    dataset_id: str
    facility_id: str
    profile: str
    scope: str
    subject_key: bytes
    issuer_id: str | None
    issued_at: str
    expires_at: str | None
    signature: bytes

    def __post_init__(self) -> None:
        """Refuse ill-formed fields (raises ``ValueError``; file readers translate it)."""
        if not _CERT_ID_RE.fullmatch(self.cert_id):
            raise _Malformed(f"cert_id {self.cert_id!r} is not 32 lowercase hex characters")
        _check_id(self.dataset_id, "dataset_id")
        _check_id(self.facility_id, "facility_id")
        _check_profile(self.profile)
        _check_scope(self.scope)
        if len(self.subject_key) != PUBLIC_KEY_SIZE:
            raise _Malformed(f"subject_key is not {PUBLIC_KEY_SIZE} bytes")
        if self.issuer_id is not None and not _CERT_ID_RE.fullmatch(self.issuer_id):
            raise _Malformed(f"issuer_id {self.issuer_id!r} is not 32 lowercase hex characters")
        if self.issuer_id is None and self.scope != FULL_SCOPE:
            raise _Malformed("a root certificate must have scope 'full'")
        issued = _parse_time(self.issued_at, "issued_at")
        if self.expires_at is not None and _parse_time(self.expires_at, "expires_at") <= issued:
            raise _Malformed("expires_at is not after issued_at")
        if len(self.signature) != SIGNATURE_SIZE:
            raise _Malformed(f"signature is not {SIGNATURE_SIZE} bytes")

    def _id_fields(self) -> dict[str, object]:
        return {
            "dataset_id": self.dataset_id,
            "facility_id": self.facility_id,
            "profile": self.profile,
            "scope": self.scope,
            "subject_key": self.subject_key.hex(),
            "issuer_id": self.issuer_id,
            "issued_at": self.issued_at,
            "expires_at": self.expires_at,
        }

    def computed_id(self) -> str:
        """The id this certificate's content implies (equals ``cert_id`` unless altered).

        Returns:
            First 32 hex characters of SHA-256 over the canonical unsigned body.
        """
        return hashlib.sha256(canonical_json(self._id_fields())).hexdigest()[:32]

    def body(self) -> dict[str, object]:
        """Everything but the signature, JSON-ready; its canonical bytes are what is signed.

        Returns:
            A new dict.
        """
        return {"cert_id": self.cert_id, **self._id_fields()}

    def signed_bytes(self) -> bytes:
        """The exact bytes the issuer signs.

        Returns:
            ``canonical_json(self.body())``.
        """
        return canonical_json(self.body())

    def to_dict(self) -> dict[str, object]:
        """The JSON form of the certificate.

        Returns:
            :meth:`body` plus ``signature`` as hex.
        """
        return {**self.body(), "signature": self.signature.hex()}

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> Certificate:
        """Parse the JSON form written by :meth:`to_dict`.

        Args:
            d: The parsed JSON object.

        Returns:
            The certificate (its signature is not checked here; see :func:`verify_chain`).

        Raises:
            CertError: A field is missing, unknown or ill-formed.
            TrustError: The content does not match ``cert_id`` (it was altered).
        """
        try:
            cert = _cert_from_dict(d)
        except _Malformed as exc:
            raise CertError(f"certificate is malformed: {exc}; {_NEW_CERT_HINT}") from exc
        _check_cert_id(cert)
        return cert

    @property
    def is_root(self) -> bool:
        """True for a self-signed root certificate (it names no issuer)."""
        return self.issuer_id is None

    @property
    def fingerprint(self) -> str:
        """Short display fingerprint of ``subject_key``."""
        return key_fingerprint(self.subject_key)


def _cert_from_dict(d: object) -> Certificate:
    if not isinstance(d, Mapping):
        raise _Malformed("a certificate is not a JSON object")
    _check_keys(d, _CERT_FIELDS, "certificate")
    return Certificate(
        cert_id=_req_str(d, "cert_id"),
        dataset_id=_req_str(d, "dataset_id"),
        facility_id=_req_str(d, "facility_id"),
        profile=_req_str(d, "profile"),
        scope=_req_str(d, "scope"),
        subject_key=_unhex(d.get("subject_key"), "subject_key", PUBLIC_KEY_SIZE),
        issuer_id=_opt_str(d, "issuer_id"),
        issued_at=_req_str(d, "issued_at"),
        expires_at=_opt_str(d, "expires_at"),
        signature=_unhex(d.get("signature"), "signature", SIGNATURE_SIZE),
    )


def _check_cert_id(cert: Certificate) -> None:
    if cert.computed_id() != cert.cert_id:
        raise TrustError(
            f"certificate {cert.cert_id} was altered (its content does not match its id); "
            f"{_NEW_CERT_HINT}"
        )


def _build(
    signer: SigningKey,
    *,
    dataset_id: str,
    facility_id: str,
    profile: str,
    scope: str,
    subject_key: bytes,
    issuer_id: str | None,
    issued_at: str,
    expires_at: str | None,
) -> Certificate:
    # A draft with placeholder id and signature reuses the field checks of __post_init__.
    draft = Certificate(
        cert_id="0" * 32,
        dataset_id=dataset_id,
        facility_id=facility_id,
        profile=profile,
        scope=scope,
        subject_key=subject_key,
        issuer_id=issuer_id,
        issued_at=issued_at,
        expires_at=expires_at,
        signature=bytes(SIGNATURE_SIZE),
    )
    unsigned = replace(draft, cert_id=draft.computed_id())
    return replace(unsigned, signature=signer.sign(_CERT_CONTEXT, unsigned.signed_bytes()))


def make_root_certificate(
    root_key: SigningKey,
    *,
    dataset_id: str,
    facility_id: str,
    profile: str,
    now: datetime | None = None,
) -> Certificate:
    """Make a facility's self-signed root certificate (scope ``"full"``, no expiry).

    Args:
        root_key: The facility's root key; it both is certified and signs.
        dataset_id: The dataset id.
        facility_id: The facility id.
        profile: The sync profile name.
        now: The issue time (default: the current time).

    Returns:
        The root certificate.

    Raises:
        CertError: An id or the profile name is not valid.
    """
    validate_id(dataset_id, "dataset id")
    validate_id(facility_id, "facility id")
    if not isinstance(profile, str) or not _PROFILE_RE.fullmatch(profile):
        raise CertError(
            f"profile name {profile!r} is not valid; use letters, digits, '.', '-' or '_'"
        )
    return _build(
        root_key,
        dataset_id=dataset_id,
        facility_id=facility_id,
        profile=profile,
        scope=FULL_SCOPE,
        subject_key=root_key.public_key,
        issuer_id=None,
        issued_at=format_time(_now(now)),
        expires_at=None,
    )


def issue_certificate(
    issuer: Certificate,
    issuer_key: SigningKey,
    subject_key: bytes,
    scope: str,
    *,
    now: datetime | None = None,
    expires_at: str | None = None,
) -> Certificate:
    """Issue a certificate for ``subject_key`` signed by ``issuer``.

    The new certificate inherits the issuer's dataset, facility and profile.

    Args:
        issuer: A full-scope certificate whose key is ``issuer_key``.
        issuer_key: The issuer's private key.
        subject_key: The raw 32-byte public key to certify.
        scope: ``"full"`` or ``"user:<USER_ID>"``.
        now: The issue time (default: the current time).
        expires_at: ISO-8601 UTC expiry (``"2026-01-31T00:00:00Z"``), or ``None``.

    Returns:
        The new certificate.

    Raises:
        CertError: The key does not belong to ``issuer``, the issuer may not issue this
            scope or has expired, or an argument is ill-formed.
    """
    if issuer_key.public_key != issuer.subject_key:
        raise CertError(
            f"the signing key {key_fingerprint(issuer_key.public_key)} does not belong to "
            f"certificate {issuer.cert_id}; use that certificate's own key"
        )
    parse_scope(scope)
    if issuer.scope != FULL_SCOPE:
        raise CertError(
            f"certificate {issuer.cert_id} has scope {issuer.scope} and may not issue "
            "certificates; only a full-scope certificate may"
        )
    if not scope_covers(issuer.scope, scope):  # pragma: no cover - full covers everything
        raise CertError(f"scope {scope} is wider than the issuer's scope {issuer.scope}")
    if len(subject_key) != PUBLIC_KEY_SIZE:
        raise CertError(
            f"the public key to certify is {len(subject_key)} bytes, not {PUBLIC_KEY_SIZE}; "
            "make a new certificate request"
        )
    moment = _now(now)
    if issuer.expires_at is not None and moment >= _parse_time(issuer.expires_at, "expires_at"):
        raise CertError(
            f"the issuing certificate {issuer.cert_id} expired at {issuer.expires_at}; "
            "renew it before issuing"
        )
    issued_at = format_time(moment)
    if expires_at is not None:
        try:
            expiry = _parse_time(expires_at, "expiry")
        except _Malformed as exc:
            raise CertError(f"{exc}; give the expiry as e.g. 2026-01-31T00:00:00Z") from exc
        if expiry <= _parse_time(issued_at, "issued_at"):
            raise CertError(
                f"expiry {expires_at} is not after the issue time {issued_at}; "
                "give a later expiry"
            )
    return _build(
        issuer_key,
        dataset_id=issuer.dataset_id,
        facility_id=issuer.facility_id,
        profile=issuer.profile,
        scope=scope,
        subject_key=bytes(subject_key),
        issuer_id=issuer.cert_id,
        issued_at=issued_at,
        expires_at=expires_at,
    )


def _check_not_expired(cert: Certificate, moment: datetime) -> None:
    if cert.expires_at is not None and moment >= _parse_time(cert.expires_at, "expires_at"):
        raise TrustError(
            f"certificate {cert.cert_id} (scope {cert.scope}) expired at {cert.expires_at}; "
            f"{_NEW_CERT_HINT}"
        )


def verify_chain(
    chain: Sequence[Certificate],
    trusted_root: Certificate,
    *,
    dataset_id: str | None = None,
    now: datetime | None = None,
) -> Certificate:
    """Check that ``chain`` (leaf first) leads from its leaf to ``trusted_root``.

    Checks, in order: length; every id matches its content; the last certificate is
    exactly ``trusted_root`` (a valid self-signed root, of ``dataset_id`` if given); each
    certificate names and is signed by the next one, is for the same dataset, facility and
    profile, has a scope inside its issuer's, and its issuer has scope ``"full"``; nothing
    has expired at ``now``.

    Args:
        chain: ``[leaf, ..., root]``.
        trusted_root: The root certificate this device trusts for the dataset.
        dataset_id: If given, the dataset the chain must be for.
        now: The time to check expiry against (default: the current time).

    Returns:
        The leaf certificate.

    Raises:
        TrustError: With one specific reason.
    """
    if not chain:
        raise TrustError(f"the certificate chain is empty; {_NEW_CERT_HINT}")
    if len(chain) > MAX_CHAIN_LENGTH:
        raise TrustError(
            f"the certificate chain has {len(chain)} certificates, more than the "
            f"{MAX_CHAIN_LENGTH} allowed; {_NEW_CERT_HINT}"
        )
    moment = _now(now)

    # The anchor first: a damaged trusted root must not make anything verify.
    if not trusted_root.is_root:
        raise TrustError(
            f"the trusted root {trusted_root.cert_id} is not a root certificate; "
            "re-install the facility's certificate grant"
        )
    _check_cert_id(trusted_root)
    try:
        verify(
            trusted_root.subject_key,
            _CERT_CONTEXT,
            trusted_root.signed_bytes(),
            trusted_root.signature,
        )
    except TrustError as exc:
        raise TrustError(
            f"the trusted root {trusted_root.cert_id} is not validly self-signed; "
            "re-install the facility's certificate grant"
        ) from exc
    if dataset_id is not None and trusted_root.dataset_id != dataset_id:
        raise TrustError(
            f"the trusted root is for dataset {trusted_root.dataset_id}, not {dataset_id}; "
            "use the trusted root of the right facility"
        )

    for cert in chain:
        _check_cert_id(cert)

    last = chain[-1]
    if canonical_json(last.to_dict()) != canonical_json(trusted_root.to_dict()):
        if last.dataset_id != trusted_root.dataset_id:
            raise TrustError(
                f"the certificate chain is for dataset {last.dataset_id}, not "
                f"{trusted_root.dataset_id} (facility {trusted_root.facility_id}); "
                "use a certificate of this facility"
            )
        if last.cert_id == trusted_root.cert_id:
            raise TrustError(
                f"the certificate chain's root {last.cert_id} is not byte-for-byte the trusted "
                "root (its signature differs: altered or forged); "
                f"{_NEW_CERT_HINT}"
            )
        raise TrustError(
            f"the certificate chain ends at root {last.cert_id}, not at the trusted root "
            f"{trusted_root.cert_id} of facility {trusted_root.facility_id}; it comes from "
            "another authority, so use a certificate issued by this facility's authority"
        )

    for child, parent in zip(chain, chain[1:]):
        if (child.dataset_id, child.facility_id, child.profile) != (
            trusted_root.dataset_id,
            trusted_root.facility_id,
            trusted_root.profile,
        ):
            raise TrustError(
                f"certificate {child.cert_id} is for dataset {child.dataset_id}, facility "
                f"{child.facility_id}, profile {child.profile}, but its root is for dataset "
                f"{trusted_root.dataset_id}, facility {trusted_root.facility_id}, profile "
                f"{trusted_root.profile}; {_NEW_CERT_HINT}"
            )
        if child.issuer_id != parent.cert_id:
            raise TrustError(
                f"certificate {child.cert_id} names issuer {child.issuer_id}, but the next "
                f"certificate in the chain is {parent.cert_id}; {_NEW_CERT_HINT}"
            )
        try:
            verify(parent.subject_key, _CERT_CONTEXT, child.signed_bytes(), child.signature)
        except TrustError as exc:
            raise TrustError(
                f"certificate {child.cert_id} is not signed by its issuer {parent.cert_id} "
                f"(altered or forged); {_NEW_CERT_HINT}"
            ) from exc
        if not scope_covers(parent.scope, child.scope):
            raise TrustError(
                f"certificate {child.cert_id} has scope {child.scope}, wider than its "
                f"issuer's scope {parent.scope}; {_NEW_CERT_HINT}"
            )
        if parent.scope != FULL_SCOPE:
            raise TrustError(
                f"certificate {child.cert_id} was issued by {parent.cert_id}, whose scope "
                f"{parent.scope} may not issue certificates; {_NEW_CERT_HINT}"
            )

    for cert in chain:
        _check_not_expired(cert, moment)
    return chain[0]


# --------------------------------------------------------------------------- files


def _fsync_dir(directory: Path) -> None:
    # Makes the rename durable on POSIX (USB drives get pulled); not possible on Windows.
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, obj: object, what: str) -> None:
    data = (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()
    partial = path.with_name(path.name + ".partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.unlink(missing_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        fd = os.open(partial, flags, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)
    except OSError as exc:
        raise CertError(
            f"cannot write {what} {path}: {exc.strerror or exc}; check that the folder "
            "is writable and the drive is mounted and not full"
        ) from exc


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # With duplicate keys, what we verify and what another parser shows could differ.
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise _Malformed(f"field {key!r} appears twice")
        result[key] = value
    return result


def _read_json_file(path: Path, expected_type: str, what: str, hint: str) -> dict[str, object]:
    """Read a typed bundlesync JSON file; every failure is a CertError naming ``path``."""
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_FILE_SIZE + 1)
    except FileNotFoundError as exc:
        raise CertError(f"{what} {path} does not exist; check the file name") from exc
    except IsADirectoryError as exc:
        raise CertError(f"{what} {path} is a folder, not a file; give the file's path") from exc
    except OSError as exc:
        raise CertError(
            f"cannot read {what} {path}: {exc.strerror or exc}; check the drive and permissions"
        ) from exc
    if len(raw) > _MAX_FILE_SIZE:
        raise CertError(f"{path} is too large to be {_KIND_NAMES[expected_type]}; {hint}")
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except _Malformed as exc:
        raise CertError(f"{what} {path} is damaged: {exc}; {hint}") from exc
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CertError(
            f"{path} is not {_KIND_NAMES[expected_type]} (not valid JSON: truncated or "
            f"damaged?); {hint}"
        ) from exc
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise CertError(f"{path} is not a bundlesync file (no 'type' field); {hint}")
    file_type = obj["type"]
    if file_type != expected_type:
        found = _KIND_NAMES.get(file_type, f"a {file_type!r} file")
        raise CertError(f"{path} is {found}, not {_KIND_NAMES[expected_type]}; {hint}")
    version = obj.get("format")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CertError(f"{what} {path} is damaged: no valid 'format' field; {hint}")
    if version != FORMAT_VERSION:
        raise CertError(
            f"{what} {path} has format {version}, but this bundlesync reads format "
            f"{FORMAT_VERSION}; upgrade bundlesync on this device"
        )
    return obj


def _certs_from_list(value: object, field: str) -> tuple[Certificate, ...]:
    if not isinstance(value, list):
        raise _Malformed(f"field {field!r} is not a list of certificates")
    if len(value) > MAX_CHAIN_LENGTH:
        raise _Malformed(f"field {field!r} has more than {MAX_CHAIN_LENGTH} certificates")
    return tuple(_cert_from_dict(item) for item in value)


# --------------------------------------------------------------------------- requests


def request_file_name(facility_id: str, instance_id: str) -> str:
    """The file name of a certificate request.

    Args:
        facility_id: The facility id.
        instance_id: The requesting device's instance id.

    Returns:
        ``<facility_id[:8]>-<instance_id[:8]>.certreq.json``.
    """
    return f"{facility_id[:8]}-{instance_id[:8]}.certreq.json"


def grant_file_name(facility_id: str, instance_id: str) -> str:
    """The file name of a certificate grant.

    Args:
        facility_id: The facility id.
        instance_id: The requesting device's instance id.

    Returns:
        ``<facility_id[:8]>-<instance_id[:8]>.certgrant.json``.
    """
    return f"{facility_id[:8]}-{instance_id[:8]}.certgrant.json"


@dataclass(frozen=True)
class CertRequest:
    """A device's signed request for a certificate, carried to the authority on a drive.

    Attributes:
        dataset_id: The dataset the certificate is wanted for, or ``None`` when the
            requesting device does not know it yet (a fresh device that has never
            received the facility); the authority then picks its dataset of ``facility_id``.
        facility_id: The facility of the dataset.
        profile: The sync profile name.
        scope: The scope asked for.
        device_key: The requesting device's raw public key.
        instance_id: The requesting device's instance id (names the grant file).
        created_at: ISO-8601 UTC time the request was made.
        nonce: 32 random hex characters, so two requests never have the same bytes.
        signature: ``device_key``'s signature over :meth:`body`: proof of possession.
    """

    dataset_id: str | None
    facility_id: str
    profile: str
    scope: str
    device_key: bytes
    instance_id: str
    created_at: str
    nonce: str
    signature: bytes

    def __post_init__(self) -> None:
        """Refuse ill-formed fields (raises ``ValueError``; file readers translate it)."""
        if self.dataset_id is not None:
            _check_id(self.dataset_id, "dataset_id")
        _check_id(self.facility_id, "facility_id")
        _check_profile(self.profile)
        _check_scope(self.scope)
        if len(self.device_key) != PUBLIC_KEY_SIZE:
            raise _Malformed(f"device_key is not {PUBLIC_KEY_SIZE} bytes")
        _check_id(self.instance_id, "instance_id")
        _parse_time(self.created_at, "created_at")
        if not _NONCE_RE.fullmatch(self.nonce):
            raise _Malformed("nonce is not 32 lowercase hex characters")
        if len(self.signature) != SIGNATURE_SIZE:
            raise _Malformed(f"signature is not {SIGNATURE_SIZE} bytes")

    def body(self) -> dict[str, object]:
        """Everything but the signature, including the file's type and format.

        Returns:
            A new JSON-ready dict; its canonical bytes are what the device signs.
        """
        return {
            "type": REQUEST_TYPE,
            "format": FORMAT_VERSION,
            "dataset_id": self.dataset_id,
            "facility_id": self.facility_id,
            "profile": self.profile,
            "scope": self.scope,
            "device_key": self.device_key.hex(),
            "instance_id": self.instance_id,
            "created_at": self.created_at,
            "nonce": self.nonce,
        }

    def to_dict(self) -> dict[str, object]:
        """The JSON form of the request (the request file's content).

        Returns:
            :meth:`body` plus ``signature`` as hex.
        """
        return {**self.body(), "signature": self.signature.hex()}

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> CertRequest:
        """Parse the JSON form; the signature is not checked (see :meth:`verify`).

        Args:
            d: The parsed request file.

        Returns:
            The request.

        Raises:
            CertError: Wrong type or format, or a field is missing, unknown or ill-formed.
        """
        try:
            return _request_from_dict(d)
        except _Malformed as exc:
            raise CertError(
                f"certificate request is malformed: {exc}; make a new request"
            ) from exc

    def verify(self) -> None:
        """Check the proof of possession: the request is signed by ``device_key``.

        Raises:
            CertError: The signature does not verify (altered, or not made by that key).
        """
        try:
            verify(self.device_key, _REQUEST_CONTEXT, canonical_json(self.body()), self.signature)
        except TrustError as exc:
            raise CertError(
                "certificate request is not signed by the device key it names (altered or "
                "damaged); make a new request on the requesting device"
            ) from exc

    @property
    def fingerprint(self) -> str:
        """Short display fingerprint of ``device_key``."""
        return key_fingerprint(self.device_key)


def _request_from_dict(d: Mapping[str, object]) -> CertRequest:
    if not isinstance(d, Mapping):
        raise _Malformed("the request is not a JSON object")
    _check_keys(d, _REQUEST_FIELDS, "the request")
    if d.get("type") != REQUEST_TYPE:
        raise _Malformed(f"type is {d.get('type')!r}, not {REQUEST_TYPE!r}")
    if d.get("format") != FORMAT_VERSION or isinstance(d.get("format"), bool):
        raise _Malformed(f"format is {d.get('format')!r}, not {FORMAT_VERSION}")
    return CertRequest(
        dataset_id=_opt_str(d, "dataset_id"),
        facility_id=_req_str(d, "facility_id"),
        profile=_req_str(d, "profile"),
        scope=_req_str(d, "scope"),
        device_key=_unhex(d.get("device_key"), "device_key", PUBLIC_KEY_SIZE),
        instance_id=_req_str(d, "instance_id"),
        created_at=_req_str(d, "created_at"),
        nonce=_req_str(d, "nonce"),
        signature=_unhex(d.get("signature"), "signature", SIGNATURE_SIZE),
    )


def make_request(
    device_key: SigningKey,
    *,
    dataset_id: str | None,
    facility_id: str,
    profile: str,
    scope: str,
    instance_id: str,
    now: datetime | None = None,
) -> CertRequest:
    """Make a certificate request signed by ``device_key``.

    Args:
        device_key: The requesting device's key (signs as proof of possession).
        dataset_id: The dataset the certificate is wanted for; ``None`` (or ``""``) if
            this device does not know it yet.
        facility_id: The facility id.
        profile: The sync profile name.
        scope: ``"full"`` or ``"user:<USER_ID>"``.
        instance_id: The requesting device's instance id.
        now: The creation time (default: the current time).

    Returns:
        The signed request.

    Raises:
        CertError: An argument is not valid.
    """
    # "" is what a caller has when the device has not received the facility yet.
    dataset_id = dataset_id or None
    if dataset_id is not None:
        validate_id(dataset_id, "dataset id")
    validate_id(facility_id, "facility id")
    validate_id(instance_id, "instance id")
    parse_scope(scope)
    if not isinstance(profile, str) or not _PROFILE_RE.fullmatch(profile):
        raise CertError(
            f"profile name {profile!r} is not valid; use letters, digits, '.', '-' or '_'"
        )
    unsigned = CertRequest(
        dataset_id=dataset_id,
        facility_id=facility_id,
        profile=profile,
        scope=scope,
        device_key=device_key.public_key,
        instance_id=instance_id,
        created_at=format_time(_now(now)),
        nonce=secrets.token_hex(16),
        signature=bytes(SIGNATURE_SIZE),
    )
    signature = device_key.sign(_REQUEST_CONTEXT, canonical_json(unsigned.body()))
    return replace(unsigned, signature=signature)


def write_request(out_dir: Path, request: CertRequest) -> Path:
    """Write ``request`` into ``out_dir`` atomically (the folder is created if needed).

    Args:
        out_dir: The destination folder, e.g. on a USB drive.
        request: The signed request.

    Returns:
        The path of the written file.

    Raises:
        CertError: The file cannot be written.
    """
    path = Path(out_dir) / request_file_name(request.facility_id, request.instance_id)
    _write_json_atomic(path, request.to_dict(), "certificate request")
    return path


def read_request(path: Path) -> CertRequest:
    """Read a request file and check its proof of possession.

    Args:
        path: The ``*.certreq.json`` file.

    Returns:
        The verified request.

    Raises:
        CertError: The file is missing, unreadable, not a request, of another format,
            malformed, or not signed by the key it names.
    """
    hint = "make a new request on the requesting device"
    obj = _read_json_file(path, REQUEST_TYPE, "certificate request", hint)
    try:
        request = _request_from_dict(obj)
    except _Malformed as exc:
        raise CertError(f"certificate request {path} is damaged: {exc}; {hint}") from exc
    try:
        request.verify()
    except CertError as exc:
        raise CertError(
            f"certificate request {path} is not signed by the device key it names "
            f"(altered or damaged); {hint}"
        ) from exc
    return request


# --------------------------------------------------------------------------- grants


@dataclass(frozen=True)
class CertGrant:
    """The authority's answer to a request: the new certificate and its issuers.

    Attributes:
        leaf: The certificate issued for the requesting device's key.
        chain: The leaf's issuers, from its direct issuer up to the root (root last);
            the leaf itself is not repeated here (see :attr:`full_chain`).
    """

    leaf: Certificate
    chain: tuple[Certificate, ...]

    @property
    def full_chain(self) -> tuple[Certificate, ...]:
        """``(leaf, *chain)``: the form :func:`verify_chain` takes."""
        return (self.leaf, *self.chain)

    @property
    def root(self) -> Certificate:
        """The root certificate at the end of the chain."""
        return self.full_chain[-1]

    def to_dict(self) -> dict[str, object]:
        """The JSON form of the grant (the grant file's content).

        Returns:
            A new dict with ``type``, ``format``, ``leaf`` and ``chain``.
        """
        return {
            "type": GRANT_TYPE,
            "format": FORMAT_VERSION,
            "leaf": self.leaf.to_dict(),
            "chain": [cert.to_dict() for cert in self.chain],
        }


def write_grant(out_dir: Path, grant: CertGrant, *, instance_id: str) -> Path:
    """Write ``grant`` into ``out_dir`` atomically (the folder is created if needed).

    Args:
        out_dir: The destination folder, e.g. on a USB drive.
        grant: The grant.
        instance_id: The requesting device's instance id (names the file).

    Returns:
        The path of the written file.

    Raises:
        CertError: The file cannot be written or ``instance_id`` is not valid.
    """
    validate_id(instance_id, "instance id")
    path = Path(out_dir) / grant_file_name(grant.leaf.facility_id, instance_id)
    _write_json_atomic(path, grant.to_dict(), "certificate grant")
    return path


def read_grant(path: Path, *, now: datetime | None = None) -> CertGrant:
    """Read a grant file and check that its chain verifies up to its own root.

    Whether that root is the one this device trusts is for the caller to decide (see
    :meth:`bundlesync.keyring.Keyring.install`).

    Args:
        path: The ``*.certgrant.json`` file.
        now: The time to check expiry against (default: the current time).

    Returns:
        The grant.

    Raises:
        CertError: The file is missing, unreadable, not a grant, of another format,
            malformed, or its chain does not verify.
    """
    hint = "ask the facility's authority to issue it again"
    obj = _read_json_file(path, GRANT_TYPE, "certificate grant", hint)
    try:
        _check_keys(obj, frozenset({"type", "format", "leaf", "chain"}), "the grant")
        if "leaf" not in obj:
            raise _Malformed("field 'leaf' is missing")
        leaf = _cert_from_dict(obj["leaf"])
        chain = _certs_from_list(obj.get("chain"), "chain")
    except _Malformed as exc:
        raise CertError(f"certificate grant {path} is damaged: {exc}; {hint}") from exc
    if not chain:
        raise CertError(f"certificate grant {path} has no issuer chain; {hint}")
    grant = CertGrant(leaf=leaf, chain=chain)
    try:
        verify_chain(grant.full_chain, grant.root, now=now)
    except TrustError as exc:
        raise CertError(f"certificate grant {path} cannot be trusted: {exc}") from exc
    return grant


# --------------------------------------------------------------------------- chain files


def write_chain_file(path: Path, chain: Sequence[Certificate]) -> None:
    """Store a certificate chain (leaf first; a single root is a chain of one) atomically.

    Args:
        path: The JSON file to write.
        chain: The certificates.

    Raises:
        CertError: The file cannot be written.
    """
    obj = {
        "type": CHAIN_TYPE,
        "format": FORMAT_VERSION,
        "chain": [cert.to_dict() for cert in chain],
    }
    _write_json_atomic(Path(path), obj, "certificate file")


def read_chain_file(path: Path) -> tuple[Certificate, ...]:
    """Read a chain written by :func:`write_chain_file`.

    Only the form and ids are checked; use :func:`verify_chain` to check signatures.

    Args:
        path: The JSON file.

    Returns:
        The certificates, in stored order.

    Raises:
        CertError: The file is missing, unreadable, damaged or altered.
    """
    hint = "restore it from a backup or install the facility's grant again"
    obj = _read_json_file(path, CHAIN_TYPE, "certificate file", hint)
    try:
        _check_keys(obj, frozenset({"type", "format", "chain"}), "the certificate file")
        chain = _certs_from_list(obj.get("chain"), "chain")
    except _Malformed as exc:
        raise CertError(f"certificate file {path} is damaged: {exc}; {hint}") from exc
    if not chain:
        raise CertError(f"certificate file {path} holds no certificate; {hint}")
    for cert in chain:
        if cert.computed_id() != cert.cert_id:
            raise CertError(f"certificate file {path} was altered; {hint}")
    return chain
