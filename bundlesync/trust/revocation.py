"""Certificate revocations: a signed "certificate X may no longer be trusted", and where it applies.

``bundlesync cert revoke CERT_ID`` on the facility's authority signs a :class:`Revocation`
with the root key (the issuer of every certificate of the facility). It is stored in the
home, rides in the manifest of every later bundle of that device, and every device that
verifies it stores it too and carries it on (relay), so it spreads the way records do.

A revocation applies to a certificate chain when it names a certificate of the chain and
its revoker is one of that certificate's issuers higher up the same chain (the root, in
practice). Revoking a certificate revokes everything issued under it, because their
chains contain it. A device that holds a revocation refuses bundles and receipts signed
under the revoked certificate (:func:`check_not_revoked`), naming the certificate.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from bundlesync.errors import CertError, TrustError
from bundlesync.format.container import canonical_json
from bundlesync.trust._certfields import Malformed, now_utc, parse_time
from bundlesync.trust.certs import Certificate, format_time, verify_chain
from bundlesync.trust.crypto import SIGNATURE_SIZE, SigningKey, verify

__all__ = ["Revocation", "check_not_revoked", "make_revocation", "parse_revocations", "verify_revocation"]

REVOCATION_KIND = "bundlesync-revocation"
_CONTEXT = "revocation"
# A facility revokes a handful of certificates in its life; the cap bounds a hostile manifest.
MAX_REVOCATIONS = 4096


@dataclass(frozen=True)
class Revocation:
    """A signed statement: certificate ``cert_id`` of ``dataset_id`` is revoked.

    Attributes:
        dataset_id: The facility dataset.
        cert_id: The revoked certificate.
        revoked_at: ISO-8601 UTC time of the revocation.
        revoker: The revoking certificate's chain, leaf (the revoker) first, root last.
        signature: The revoker's signature over :meth:`body`.
    """

    dataset_id: str
    cert_id: str
    revoked_at: str
    revoker: tuple[Certificate, ...]
    signature: bytes

    @property
    def revoker_id(self) -> str:
        """The id of the certificate whose key signed the revocation."""
        return self.revoker[0].cert_id

    def body(self) -> dict[str, object]:
        """The signed part."""
        return {
            "kind": REVOCATION_KIND, "dataset_id": self.dataset_id, "cert_id": self.cert_id,
            "revoked_at": self.revoked_at, "revoker": [c.to_dict() for c in self.revoker],
        }

    def to_dict(self) -> dict[str, object]:
        """The JSON form: :meth:`body` plus the signature as hex."""
        return {**self.body(), "signature": self.signature.hex()}

    @classmethod
    def from_dict(cls, raw: object) -> Revocation:
        """Parse the JSON form (the signature is checked by :func:`verify_revocation`).

        Raises:
            CertError: The object is not a well-formed revocation.
        """
        try:
            if not isinstance(raw, Mapping) or raw.get("kind") != REVOCATION_KIND:
                raise Malformed("it is not a revocation object")
            extra = set(raw) - {"kind", "dataset_id", "cert_id", "revoked_at", "revoker", "signature"}
            if extra:
                raise Malformed(f"unknown field(s) {sorted(extra)}")
            cert_id, dataset_id, signature = raw["cert_id"], raw["dataset_id"], raw["signature"]
            if not isinstance(cert_id, str) or len(cert_id) != 32 or not all(c in "0123456789abcdef" for c in cert_id):
                raise Malformed("cert_id is not 32 lowercase hex characters")
            if not isinstance(dataset_id, str) or not isinstance(signature, str):
                raise Malformed("dataset_id or signature is not a string")
            parse_time("revoked_at", raw["revoked_at"])
            revoker = raw["revoker"]
            if not isinstance(revoker, list) or not revoker:
                raise Malformed("revoker is not a certificate chain")
            sig = bytes.fromhex(signature)
            if len(sig) != SIGNATURE_SIZE:
                raise Malformed("signature has the wrong size")
            return cls(dataset_id, cert_id, str(raw["revoked_at"]),
                       tuple(Certificate.from_dict(c) for c in revoker), sig)
        except (Malformed, KeyError, ValueError, TypeError, TrustError) as exc:
            raise CertError(f"revocation is malformed: {exc}; ask the facility's authority to revoke again") from exc


def make_revocation(cert_id: str, revoker_key: SigningKey, revoker_chain: Sequence[Certificate], *,
                    now: datetime | None = None) -> Revocation:
    """Sign a revocation of ``cert_id`` with the key of ``revoker_chain[0]``."""
    unsigned = Revocation(revoker_chain[0].dataset_id, cert_id, format_time(now_utc(now)), tuple(revoker_chain),
                          bytes(SIGNATURE_SIZE))
    signature = revoker_key.sign(_CONTEXT, canonical_json(unsigned.body()))
    return Revocation(unsigned.dataset_id, cert_id, unsigned.revoked_at, unsigned.revoker, signature)


def verify_revocation(rev: Revocation, root: Certificate) -> None:
    """Check the revoker's chain to ``root`` and the signature.

    A revoker is a full-scope certificate of the facility (only those may issue); whether
    it is an issuer *of the revoked certificate* is decided where the revocation is
    applied (:func:`check_not_revoked`). The revoker's own expiry is not checked: a
    revocation stays true after its signer expires.

    Raises:
        TrustError: The revoker is not trusted or the signature does not verify.
    """
    if rev.dataset_id != root.dataset_id:
        raise TrustError(f"revocation of {rev.cert_id} is for dataset {rev.dataset_id}, not {root.dataset_id}")
    # Expiry of the revoker does not undo what it revoked: check the chain at the revocation's time.
    signer = verify_chain(rev.revoker, root, dataset_id=root.dataset_id, now=parse_time("revoked_at", rev.revoked_at))
    if signer.scope != "full":
        raise TrustError(f"revocation of {rev.cert_id} is signed by {signer.cert_id}, which may not revoke")
    verify(signer.subject_key, _CONTEXT, canonical_json(rev.body()), rev.signature)


def parse_revocations(raw: object, root: Certificate) -> list[Revocation]:
    """Parse and verify a manifest's list of revocations.

    Raises:
        TrustError: The list is malformed or one of them does not verify.
    """
    if not isinstance(raw, list) or len(raw) > MAX_REVOCATIONS:
        raise TrustError("the bundle's revocation list is malformed; ask the sender for a fresh export")
    out = []
    for item in raw:
        try:
            rev = Revocation.from_dict(item)
            verify_revocation(rev, root)
        except (CertError, TrustError) as exc:
            raise TrustError(f"the bundle carries a revocation that does not verify ({exc}); "
                             "ask the sender for a fresh export") from exc
        out.append(rev)
    return out


def check_not_revoked(chain: Sequence[Certificate], revocations: Iterable[Revocation], *, what: str) -> None:
    """Refuse a chain that contains a certificate revoked by one of its issuers in that chain.

    Raises:
        TrustError: Naming ``what`` (e.g. ``"bundle X"``), the revoked certificate and the signer.
    """
    ids = [c.cert_id for c in chain]
    for rev in revocations:
        if rev.cert_id not in ids:
            continue
        at = ids.index(rev.cert_id)
        if rev.revoker_id not in ids[at + 1:]:
            continue  # not revoked by one of its issuers: no authority over it
        leaf = chain[0]
        raise TrustError(
            f"{what} is signed under certificate {leaf.cert_id} ({leaf.scope}), which was revoked "
            f"at {rev.revoked_at}: refusing it; the device needs a new certificate from the facility's authority"
            if at == 0 else
            f"{what} is signed under certificate {leaf.cert_id} ({leaf.scope}), issued under certificate "
            f"{rev.cert_id}, which was revoked at {rev.revoked_at}: refusing it; the device needs a new "
            "certificate from the facility's authority"
        )


def revocation_json(rev: Revocation) -> bytes:
    """The bytes a revocation file holds."""
    return canonical_json(rev.to_dict())


def read_revocation_json(data: bytes) -> Revocation:
    """Parse the bytes of a revocation file (raises :class:`CertError`)."""
    try:
        return Revocation.from_dict(json.loads(data))
    except ValueError as exc:
        raise CertError(f"revocation file is damaged: {exc}; delete it and import a bundle that carries it") from exc
