"""Facility certificates: what a device key may do, and when a chain of them is trusted.

A facility (dataset) has a self-signed *root* certificate held by its authority device. Every
other certificate binds one device's Ed25519 key to ``(dataset_id, facility_id, profile,
scope)`` and is signed by its issuer; a chain ``[leaf, ..., root]`` is trusted when it ends
exactly at the device's trusted root for that dataset (see :func:`verify_chain`). Scopes are
``"full"`` or ``"user:<USER_ID>"``; only full-scope certificates may issue others.

Identity and signatures are computed over *canonical* JSON (:func:`canonical_json`; keys and
signatures as lowercase hex), so a certificate file may be pretty-printed freely:

* ``cert_id`` = first 32 hex characters of SHA-256 over the canonical body without
  ``cert_id`` and ``signature``;
* ``signature`` = the issuer's key over the canonical body (everything but ``signature``),
  in the ``"cert"`` signature context.

Deliberately not checked: a certificate's ``issued_at`` against the clock. Offline tablets'
clocks drift by days, and refusing a fresh certificate as "not yet valid" would strand
them; only ``expires_at`` is enforced.

The files that carry certificates between devices (requests, grants, stored chains) are
in :mod:`bundlesync.trust.certfiles`; the field rules both share are in ``_certfields``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

from bundlesync.trust._certfields import (
    FULL_SCOPE,
    OMIT_IF_NONE,
    Malformed,
    check_fields,
    check_scope,
    from_json,
    now_utc,
    parse_time,
    to_json,
    validate_id,
    validate_names,
)
from bundlesync.format.container import canonical_json
from bundlesync.trust.crypto import (
    PUBLIC_KEY_SIZE,
    SIGNATURE_SIZE,
    SigningKey,
    key_fingerprint,
    verify,
)
from bundlesync.errors import CertError, TrustError

__all__ = [
    "FULL_SCOPE",
    "MAX_CHAIN_LENGTH",
    "Certificate",
    "canonical_json",
    "format_time",
    "issue_certificate",
    "make_root_certificate",
    "parse_scope",
    "scope_covers",
    "validate_id",
    "verify_chain",
]

# Real chains are [leaf, root] or [leaf, intermediate, root]; the cap bounds the work a
# hostile file can make us do.
MAX_CHAIN_LENGTH = 8
_CERT_CONTEXT = "cert"
_NEW_CERT_HINT = "ask the facility's authority for a new certificate"


# --------------------------------------------------------------------------- times


def format_time(dt: datetime) -> str:
    """Format ``dt`` (naive means UTC) as certificates store it: ``"2025-01-31T12:00:00Z"``."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- scopes


def parse_scope(scope: str) -> tuple[str, str | None]:
    """Split a scope into its kind and user id: ``("full", None)`` or ``("user", user_id)``.

    Raises:
        CertError: The scope is neither ``"full"`` nor ``"user:<USER_ID>"`` (lowercase hex).
    """
    try:
        check_scope("scope", scope)
    except Malformed as exc:
        raise CertError(f"{exc}; use --scope full or --scope user:USER_ID") from exc
    if scope == FULL_SCOPE:
        return (FULL_SCOPE, None)
    return ("user", scope.partition(":")[2])


def scope_covers(parent: str, child: str) -> bool:
    """Whether ``child`` ⊆ ``parent``: ``"full"`` covers every scope, ``"user:U"`` only itself.

    Raises:
        CertError: Either scope is malformed.
    """
    parent_kind, _ = parse_scope(parent)
    parse_scope(child)
    return parent_kind == FULL_SCOPE or parent == child


# --------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Certificate:
    """A signed statement "key ``subject_key`` may sync ``scope`` of dataset ``dataset_id``".

    Instances always hold well-formed fields (checked on construction); whether the id
    and signature are *right* is checked by :func:`verify_chain`. Equality compares every
    field, signature included.

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
        instance_id: The instance id of the certified device, which binds its receipts to it;
            ``None`` for a root and for certificates issued before certificates carried one.
        recipient: The certified device's age encryption recipient (``age1...``), to which
            bundles for it are encrypted; ``None`` for a root and for older certificates.
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
    instance_id: str | None = field(default=None, metadata={OMIT_IF_NONE: True})
    recipient: str | None = field(default=None, metadata={OMIT_IF_NONE: True})

    def __post_init__(self) -> None:
        """Refuse ill-formed fields (with a ``ValueError``; file readers translate it)."""
        check_fields(self)
        if self.issuer_id is None and self.scope != FULL_SCOPE:
            raise Malformed("a root certificate must have scope 'full'")
        issued = parse_time("issued_at", self.issued_at)
        if self.expires_at is not None and parse_time("expires_at", self.expires_at) <= issued:
            raise Malformed("expires_at is not after issued_at")

    def computed_id(self) -> str:
        """The id this content implies: equals ``cert_id`` unless the content was altered."""
        unsigned = to_json(self, without=("cert_id", "signature"))
        return hashlib.sha256(canonical_json(unsigned)).hexdigest()[:32]

    def body(self) -> dict[str, object]:
        """Everything but the signature, as a new JSON-ready dict."""
        return to_json(self, without=("signature",))

    def signed_bytes(self) -> bytes:
        """The exact bytes the issuer signs: the canonical JSON of :meth:`body`."""
        return canonical_json(self.body())

    def to_dict(self) -> dict[str, object]:
        """The JSON form: :meth:`body` plus ``signature`` as hex."""
        return to_json(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> Certificate:
        """Parse the JSON form written by :meth:`to_dict` (the signature is not checked).

        Raises:
            CertError: A field is missing, unknown or ill-formed.
            TrustError: The content does not match ``cert_id`` (it was altered).
        """
        try:
            cert = _certfrom_json(d)
        except Malformed as exc:
            raise CertError(f"certificate is malformed: {exc}; {_NEW_CERT_HINT}") from exc
        _check_cert_id(cert)
        return cert

    def has_expired(self, moment: datetime) -> bool:
        """Whether the certificate has expired at ``moment`` (an aware datetime)."""
        return self.expires_at is not None and moment >= parse_time("expires_at", self.expires_at)

    @property
    def is_root(self) -> bool:
        """True for a self-signed root certificate (it names no issuer)."""
        return self.issuer_id is None

    @property
    def fingerprint(self) -> str:
        """Short display fingerprint of ``subject_key``."""
        return key_fingerprint(self.subject_key)


def _certfrom_json(d: object) -> Certificate:
    return Certificate(**from_json(Certificate, d, "certificate"))


def _check_cert_id(cert: Certificate) -> None:
    if cert.computed_id() != cert.cert_id:
        raise TrustError(
            f"certificate {cert.cert_id} was altered (its content does not match its id); "
            f"{_NEW_CERT_HINT}"
        )


def _build(signer: SigningKey, **fields: Any) -> Certificate:
    # A draft with placeholder id and signature reuses the field checks of __post_init__.
    draft = Certificate(cert_id="0" * 32, signature=bytes(SIGNATURE_SIZE), **fields)
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

    ``root_key`` is both certified and signs; ``now`` is the issue time (default: the
    current time).

    Raises:
        CertError: An id or the profile name is not valid.
    """
    validate_names(profile, dataset_id=dataset_id, facility_id=facility_id)
    return _build(
        root_key,
        dataset_id=dataset_id,
        facility_id=facility_id,
        profile=profile,
        scope=FULL_SCOPE,
        subject_key=root_key.public_key,
        issuer_id=None,
        issued_at=format_time(now_utc(now)),
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
    instance_id: str | None = None,
    recipient: str | None = None,
) -> Certificate:
    """Issue a certificate for ``subject_key``, of the issuer's dataset, facility and profile.

    Args:
        issuer: A full-scope certificate whose key is ``issuer_key``.
        issuer_key: The issuer's private key.
        subject_key: The raw 32-byte public key to certify.
        scope: ``"full"`` or ``"user:<USER_ID>"``.
        now: The issue time (default: the current time).
        expires_at: ISO-8601 UTC expiry (``"2026-01-31T00:00:00Z"``), or ``None``; never
            later than the issuer's own expiry (a later one is cut to it).
        instance_id: The subject device's instance id (binds its receipts to it).
        recipient: The subject device's age recipient (bundles are encrypted to it).

    Raises:
        CertError: The key does not belong to ``issuer``, the issuer may not issue or has
            expired, or an argument is ill-formed.
    """
    if issuer_key.public_key != issuer.subject_key:
        raise CertError(
            f"the signing key {key_fingerprint(issuer_key.public_key)} does not belong to "
            f"certificate {issuer.cert_id}; use that certificate's own key"
        )
    parse_scope(scope)
    if issuer.scope != FULL_SCOPE:  # and "full" covers every scope
        raise CertError(
            f"certificate {issuer.cert_id} has scope {issuer.scope} and may not issue "
            "certificates; only a full-scope certificate may"
        )
    if len(subject_key) != PUBLIC_KEY_SIZE:
        raise CertError(
            f"the public key to certify is {len(subject_key)} bytes, not {PUBLIC_KEY_SIZE}; "
            "make a new certificate request"
        )
    moment = now_utc(now)
    if issuer.has_expired(moment):
        raise CertError(
            f"the issuing certificate {issuer.cert_id} expired at {issuer.expires_at}; "
            "renew it before issuing"
        )
    issued_at = format_time(moment)
    if expires_at is not None:
        try:
            expiry = parse_time("expiry", expires_at)
        except Malformed as exc:
            raise CertError(f"{exc}; give the expiry as e.g. 2026-01-31T00:00:00Z") from exc
        if expiry <= parse_time("issued_at", issued_at):
            raise CertError(
                f"expiry {expires_at} is not after the issue time {issued_at}; "
                "give a later expiry"
            )
    # A certificate never outlives its issuer: an issuer may shorten, never extend.
    if issuer.expires_at is not None and (
        expires_at is None
        or parse_time("expiry", expires_at) > parse_time("expires_at", issuer.expires_at)
    ):
        expires_at = issuer.expires_at
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
        instance_id=instance_id,
        recipient=recipient,
    )


# --------------------------------------------------------------------------- chains


def verify_chain(
    chain: Sequence[Certificate],
    trusted_root: Certificate,
    *,
    dataset_id: str | None = None,
    now: datetime | None = None,
) -> Certificate:
    """Check that ``chain`` (leaf first) leads from its leaf to ``trusted_root``.

    Checks, in order: length; ``trusted_root`` is a valid self-signed root (of
    ``dataset_id`` if given); every id matches its content; the last certificate is exactly
    ``trusted_root``; each certificate has the root's dataset, facility and profile, names
    and is signed by the next one, has a scope inside its issuer's, and its issuer has
    scope ``"full"``; nothing has expired at ``now`` (default: the current time).

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
    moment = now_utc(now)

    # The anchor first: a damaged trusted root must not make anything verify.
    reinstall = "re-install the facility's certificate grant"
    if not trusted_root.is_root:
        raise TrustError(
            f"the trusted root {trusted_root.cert_id} is not a root certificate; {reinstall}"
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
            f"the trusted root {trusted_root.cert_id} is not validly self-signed; {reinstall}"
        ) from exc
    if dataset_id is not None and trusted_root.dataset_id != dataset_id:
        raise TrustError(
            f"the trusted root is for dataset {trusted_root.dataset_id}, not {dataset_id}; "
            "use the trusted root of the right facility"
        )

    for cert in chain:
        _check_cert_id(cert)

    last = chain[-1]
    if last != trusted_root:
        if last.dataset_id != trusted_root.dataset_id:
            raise TrustError(
                f"the certificate chain is for dataset {last.dataset_id}, not "
                f"{trusted_root.dataset_id} (facility {trusted_root.facility_id}); "
                "use a certificate of this facility"
            )
        if last.cert_id == trusted_root.cert_id:
            raise TrustError(
                f"the certificate chain's root {last.cert_id} is not byte-for-byte the trusted "
                f"root (its signature differs: altered or forged); {_NEW_CERT_HINT}"
            )
        raise TrustError(
            f"the certificate chain ends at root {last.cert_id}, not at the trusted root "
            f"{trusted_root.cert_id} of facility {trusted_root.facility_id}; it comes from "
            "another authority, so use a certificate issued by this facility's authority"
        )

    root = trusted_root
    for child, parent in zip(chain, chain[1:]):
        if (child.dataset_id, child.facility_id, child.profile) != (
            root.dataset_id, root.facility_id, root.profile
        ):
            raise TrustError(
                f"certificate {child.cert_id} is for dataset {child.dataset_id}, facility "
                f"{child.facility_id}, profile {child.profile}, but its root is for dataset "
                f"{root.dataset_id}, facility {root.facility_id}, profile {root.profile}; "
                f"{_NEW_CERT_HINT}"
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

    # Issuers first: when an issuer expired, its children (which never outlive it) did too,
    # and the issuer is the one to renew.
    for cert in reversed(chain):
        if cert.has_expired(moment):
            raise TrustError(
                f"certificate {cert.cert_id} (scope {cert.scope}) expired at "
                f"{cert.expires_at}; {_NEW_CERT_HINT}"
            )
    return chain[0]
