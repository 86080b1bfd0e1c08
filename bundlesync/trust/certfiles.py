"""Certificate files: the offline request/grant round trip, and stored certificate chains.

Three JSON file types, each with a ``type`` and a ``format`` (version) field:

* a *request* (``*.certreq.json``): a device asks for a certificate, signed by its device
  key as proof of possession (Morango's CSR, done with files);
* a *grant* (``*.certgrant.json``): the authority's answer, the new leaf certificate and
  its issuers;
* a *chain file*: a chain kept in a device home (see :mod:`bundlesync.trust.keystore`).

The round trip: the requesting device writes a request (:func:`make_request`,
:func:`write_request`); the authority reads it (:func:`read_request`), issues a leaf
(:func:`bundlesync.trust.certs.issue_certificate`) and writes a grant (:func:`write_grant`);
the requesting device reads the grant (:func:`read_grant`) and installs it.

Because USB drives pass through untrusted hands, everything read from a file is validated
field by field and refused with one :class:`~bundlesync.errors.CertError` line that names
the file, says what is wrong and what to do. Writes are atomic.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import TypeVar

from bundlesync.trust._certfields import (
    OMIT_IF_NONE,
    Malformed,
    check_fields,
    check_keys,
    from_json,
    now_utc,
    to_json,
    validate_id,
    validate_names,
)
from bundlesync.trust.certs import (
    MAX_CHAIN_LENGTH,
    Certificate,
    canonical_json,
    format_time,
    parse_scope,
    verify_chain,
)
from bundlesync.trust.crypto import SIGNATURE_SIZE, SigningKey, key_fingerprint, verify
from bundlesync.errors import CertError, TrustError
from bundlesync.fsutil import FileTooLargeError, atomic_write_bytes, read_regular

__all__ = [
    "CHAIN_TYPE",
    "FORMAT_VERSION",
    "GRANT_TYPE",
    "REQUEST_TYPE",
    "CertGrant",
    "CertRequest",
    "make_request",
    "read_chain_file",
    "read_grant",
    "read_request",
    "write_chain_file",
    "write_grant",
    "write_request",
]

FORMAT_VERSION = 1
REQUEST_TYPE = "bundlesync-cert-request"
GRANT_TYPE = "bundlesync-cert-grant"
CHAIN_TYPE = "bundlesync-cert-chain"

_REQUEST_CONTEXT = "request"
# Requests and grants are a few KB; refuse to slurp a multi-GB file a user picked by mistake.
_MAX_FILE_SIZE = 1024 * 1024
# Each file type: what it is called in messages, and what to do when it is damaged.
_KINDS = {
    REQUEST_TYPE: ("certificate request", "make a new request on the requesting device"),
    GRANT_TYPE: ("certificate grant", "ask the facility's authority to issue it again"),
    CHAIN_TYPE: (
        "certificate chain file",
        "restore it from a backup or install the facility's grant again",
    ),
}

_T = TypeVar("_T")


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class CertRequest:
    """A device's signed request for a certificate, carried to the authority on a drive.

    Attributes:
        dataset_id: The dataset the certificate is wanted for, or ``None`` when the
            requesting device does not know it yet (it has never received the facility);
            the authority then picks its dataset of ``facility_id``.
        facility_id: The facility of the dataset.
        profile: The sync profile name.
        scope: The scope asked for.
        device_key: The requesting device's raw public key.
        instance_id: The requesting device's instance id (names the grant file).
        created_at: ISO-8601 UTC time the request was made.
        nonce: 32 random hex characters, so two requests never have the same bytes.
        signature: ``device_key``'s signature over :meth:`body`: proof of possession.
        recipient: The device's age encryption recipient, to be bound by the certificate.
        expires_at: The expiry asked for (``--valid-days``); the issuer may shorten it.
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
    recipient: str | None = field(default=None, metadata={OMIT_IF_NONE: True})
    expires_at: str | None = field(default=None, metadata={OMIT_IF_NONE: True})

    def __post_init__(self) -> None:
        """Refuse ill-formed fields (with a ``ValueError``; file readers translate it)."""
        check_fields(self)

    def body(self) -> dict[str, object]:
        """Everything but the signature, file type and format included: what is signed."""
        fields = to_json(self, without=("signature",))
        return {"type": REQUEST_TYPE, "format": FORMAT_VERSION, **fields}

    def to_dict(self) -> dict[str, object]:
        """The request file's content: :meth:`body` plus ``signature`` as hex."""
        return {**self.body(), "signature": self.signature.hex()}

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> CertRequest:
        """Parse the JSON form; the signature is not checked (see :meth:`verify`).

        Raises:
            CertError: Wrong type or format, or a field is missing, unknown or ill-formed.
        """
        try:
            return _request_from_json(d)
        except Malformed as exc:
            raise CertError(
                f"certificate request is malformed: {exc}; {_KINDS[REQUEST_TYPE][1]}"
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
                f"damaged); {_KINDS[REQUEST_TYPE][1]}"
            ) from exc

    @property
    def fingerprint(self) -> str:
        """Short display fingerprint of ``device_key``."""
        return key_fingerprint(self.device_key)


def _request_from_json(d: object) -> CertRequest:
    fields = from_json(CertRequest, d, "the request", extra=("type", "format"))
    assert isinstance(d, Mapping)  # checked by from_json
    if d.get("type") != REQUEST_TYPE:
        raise Malformed(f"type is {d.get('type')!r}, not {REQUEST_TYPE!r}")
    if d.get("format") != FORMAT_VERSION or isinstance(d.get("format"), bool):
        raise Malformed(f"format is {d.get('format')!r}, not {FORMAT_VERSION}")
    return CertRequest(**fields)


def make_request(
    device_key: SigningKey,
    *,
    dataset_id: str | None,
    facility_id: str,
    profile: str,
    scope: str,
    instance_id: str,
    now: datetime | None = None,
    recipient: str | None = None,
    valid_days: int | None = None,
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
        recipient: The device's age recipient (``age1...``), bound by the certificate.
        valid_days: Ask for a certificate that expires this many days from now.

    Raises:
        CertError: An argument is not valid.
    """
    # "" is what a caller has when the device has not received the facility yet.
    dataset_id = dataset_id or None
    validate_names(profile, dataset_id=dataset_id, facility_id=facility_id, instance_id=instance_id)
    parse_scope(scope)
    moment = now_utc(now)
    expires_at = None
    if valid_days is not None:
        if valid_days < 1:
            raise CertError(f"--valid-days {valid_days} is not a positive number of days; give 1 or more")
        expires_at = format_time(moment + timedelta(days=valid_days))
    unsigned = CertRequest(
        dataset_id=dataset_id,
        facility_id=facility_id,
        profile=profile,
        scope=scope,
        device_key=device_key.public_key,
        instance_id=instance_id,
        created_at=format_time(moment),
        nonce=secrets.token_hex(16),
        signature=bytes(SIGNATURE_SIZE),
        recipient=recipient,
        expires_at=expires_at,
    )
    signature = device_key.sign(_REQUEST_CONTEXT, canonical_json(unsigned.body()))
    return replace(unsigned, signature=signature)


def write_request(out_dir: Path, request: CertRequest) -> Path:
    """Write ``request`` into ``out_dir`` (created if needed); return the file's path.

    Raises:
        CertError: The file cannot be written.
    """
    path = _file_path(out_dir, request.facility_id, request.instance_id, "certreq")
    _write(path, REQUEST_TYPE, request.to_dict())
    return path


def read_request(path: Path) -> CertRequest:
    """Read a ``*.certreq.json`` file and check its proof of possession.

    Raises:
        CertError: The file is missing, unreadable, not a request, of another format,
            malformed, or not signed by the key it names.
    """
    request = _read(path, REQUEST_TYPE, _request_from_json)
    try:
        request.verify()
    except CertError as exc:
        raise CertError(f"{path}: {exc}") from exc
    return request


# --------------------------------------------------------------------------- grants


@dataclass(frozen=True)
class CertGrant:
    """The authority's answer to a request: the new certificate and its issuers.

    Attributes:
        leaf: The certificate issued for the requesting device's key.
        chain: The leaf's issuers, from its direct issuer up to the root (root last);
            the leaf itself is not repeated here (see :attr:`full_chain`).
        peers: Certificates of other devices the new device may encrypt bundles to (the
            authority's own device certificate), each issued directly by the root.
    """

    leaf: Certificate
    chain: tuple[Certificate, ...]
    peers: tuple[Certificate, ...] = ()

    @property
    def full_chain(self) -> tuple[Certificate, ...]:
        """``(leaf, *chain)``: the form :func:`~bundlesync.trust.certs.verify_chain` takes."""
        return (self.leaf, *self.chain)

    @property
    def root(self) -> Certificate:
        """The root certificate at the end of the chain."""
        return self.full_chain[-1]

    def to_dict(self) -> dict[str, object]:
        """The grant file's content: ``type``, ``format``, ``leaf`` and ``chain``."""
        return {
            "type": GRANT_TYPE,
            "format": FORMAT_VERSION,
            "leaf": self.leaf.to_dict(),
            "chain": [cert.to_dict() for cert in self.chain],
            **({"peers": [cert.to_dict() for cert in self.peers]} if self.peers else {}),
        }


def _grant_from_json(obj: Mapping[str, object]) -> CertGrant:
    check_keys(obj, ("type", "format", "leaf", "chain", "peers"), "the grant")
    if "leaf" not in obj:
        raise Malformed("field 'leaf' is missing")
    leaf = _certificate(obj["leaf"])
    chain = _certs_from_list(obj.get("chain"))
    if not chain:
        raise Malformed("it has no issuer chain")
    peers = _certs_from_list(obj["peers"]) if "peers" in obj else ()
    return CertGrant(leaf=leaf, chain=chain, peers=peers)


def write_grant(out_dir: Path, grant: CertGrant, *, instance_id: str) -> Path:
    """Write ``grant`` into ``out_dir`` (created if needed); return the file's path.

    Args:
        out_dir: The destination folder, e.g. on a USB drive.
        grant: The grant.
        instance_id: The requesting device's instance id (names the file).

    Raises:
        CertError: The file cannot be written or ``instance_id`` is not valid.
    """
    validate_id(instance_id, "instance id")
    path = _file_path(out_dir, grant.leaf.facility_id, instance_id, "certgrant")
    _write(path, GRANT_TYPE, grant.to_dict())
    return path


def read_grant(path: Path, *, now: datetime | None = None) -> CertGrant:
    """Read a ``*.certgrant.json`` file and check that its chain verifies up to its own root.

    Whether that root is the one this device trusts is for the caller to decide (see
    :meth:`bundlesync.trust.keystore.KeyStore.install`). ``now`` is the time to check expiry
    against (default: the current time).

    Raises:
        CertError: The file is missing, unreadable, not a grant, of another format,
            malformed, or its chain does not verify.
    """
    grant = _read(path, GRANT_TYPE, _grant_from_json)
    try:
        verify_chain(grant.full_chain, grant.root, now=now)
        for peer in grant.peers:
            verify_chain((peer, grant.root), grant.root, now=now)
    except TrustError as exc:
        raise CertError(f"certificate grant {path} cannot be trusted: {exc}") from exc
    return grant


# --------------------------------------------------------------------------- chain files


def write_chain_file(path: Path, chain: Sequence[Certificate]) -> None:
    """Store a certificate chain (leaf first; a single root is a chain of one).

    Raises:
        CertError: The file cannot be written.
    """
    _write(Path(path), CHAIN_TYPE, {"chain": [cert.to_dict() for cert in chain]})


def _chain_from_json(obj: Mapping[str, object]) -> tuple[Certificate, ...]:
    check_keys(obj, ("type", "format", "chain"), "the file")
    chain = _certs_from_list(obj.get("chain"))
    if not chain:
        raise Malformed("it holds no certificate")
    if any(cert.computed_id() != cert.cert_id for cert in chain):
        raise Malformed("a certificate was altered (its content does not match its id)")
    return chain


def read_chain_file(path: Path) -> tuple[Certificate, ...]:
    """Read a chain written by :func:`write_chain_file`, in stored order.

    Only the form and ids are checked; :func:`~bundlesync.trust.certs.verify_chain` checks the
    signatures.

    Raises:
        CertError: The file is missing, unreadable, damaged or altered.
    """
    return _read(path, CHAIN_TYPE, _chain_from_json)


# --------------------------------------------------------------------------- file I/O


def _file_path(out_dir: Path, facility_id: str, instance_id: str, kind: str) -> Path:
    return Path(out_dir) / f"{facility_id[:8]}-{instance_id[:8]}.{kind}.json"


def _certificate(d: object) -> Certificate:
    return Certificate(**from_json(Certificate, d, "a certificate"))


def _certs_from_list(value: object) -> tuple[Certificate, ...]:
    if not isinstance(value, list):
        raise Malformed("field 'chain' is not a list of certificates")
    if len(value) > MAX_CHAIN_LENGTH:
        raise Malformed(f"field 'chain' has more than {MAX_CHAIN_LENGTH} certificates")
    return tuple(_certificate(d) for d in value)


def _write(path: Path, file_type: str, obj: Mapping[str, object]) -> None:
    obj = {"type": file_type, "format": FORMAT_VERSION, **obj}
    data = (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
    except OSError as exc:
        raise CertError(
            f"cannot write {_KINDS[file_type][0]} {path}: {exc.strerror or exc}; check that "
            "the folder is writable and the drive is mounted and not full"
        ) from exc


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # With duplicate keys, what we verify and what another parser shows could differ.
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise Malformed(f"field {key!r} appears twice")
        result[key] = value
    return result


def _read(path: Path, file_type: str, parse: Callable[[dict[str, object]], _T]) -> _T:
    """Read a bundlesync JSON file of ``file_type``; every failure is a CertError naming it."""
    what, hint = _KINDS[file_type]
    try:
        raw = read_regular(path, _MAX_FILE_SIZE)
    except FileTooLargeError as exc:
        raise CertError(f"{path} is too large to be a {what}; {hint}") from exc
    except FileNotFoundError as exc:
        raise CertError(f"{what} {path} does not exist; check the file name") from exc
    except IsADirectoryError as exc:
        raise CertError(f"{what} {path} is a folder, not a file; give the file's path") from exc
    except OSError as exc:
        raise CertError(
            f"cannot read {what} {path}: {exc.strerror or exc}; check the drive and permissions"
        ) from exc
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except Malformed as exc:
        raise CertError(f"{what} {path} is damaged: {exc}; {hint}") from exc
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CertError(
            f"{path} is not a {what} (not valid JSON: truncated or damaged?); {hint}"
        ) from exc
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise CertError(f"{path} is not a bundlesync file (no 'type' field); {hint}")
    if obj["type"] != file_type:
        found = _KINDS[obj["type"]][0] if obj["type"] in _KINDS else f"{obj['type']!r} file"
        raise CertError(f"{path} is a {found}, not a {what}; {hint}")
    version = obj.get("format")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CertError(f"{what} {path} is damaged: no valid 'format' field; {hint}")
    if version != FORMAT_VERSION:
        raise CertError(
            f"{what} {path} has format {version}, but this bundlesync reads format "
            f"{FORMAT_VERSION}; upgrade bundlesync on this device"
        )
    try:
        return parse(obj)
    except Malformed as exc:
        raise CertError(f"{what} {path} is damaged: {exc}; {hint}") from exc
