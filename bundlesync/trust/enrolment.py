"""A device's enrolment: ask a facility's authority for a certificate, and install the answer.

``cert request`` writes a request file carrying this device's public key; ``cert install``
checks the grant the authority wrote back and stores the certificate chain (and, the first
time, the facility's root: trust on install).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from bundlesync.errors import CertError, TrustError
from bundlesync.trust.certfiles import make_request, read_grant, write_request
from bundlesync.trust.certs import Certificate, verify_chain
from bundlesync.trust.crypto import key_fingerprint
from bundlesync.trust.keystore import KeyStore

__all__ = ["install_grant", "request_certificate"]


def request_certificate(
    store: KeyStore,
    *,
    dataset_id: str | None,
    facility_id: str,
    profile: str,
    scope: str,
    instance_id: str,
    out_dir: Path,
    now: datetime | None = None,
) -> Path:
    """Write a certificate request for this device's key into ``out_dir``.

    Args:
        dataset_id: The dataset the certificate is wanted for; ``None`` or ``""`` when
            this device has not received the facility yet (the authority then uses
            its dataset of ``facility_id``).
        facility_id: The facility id.
        profile: The sync profile name.
        scope: ``"full"`` or ``"user:<USER_ID>"``.
        instance_id: This device's instance id.
        out_dir: Where to write the request (e.g. a USB drive).
        now: The creation time (default: the current time).

    Returns:
        The request file's path.

    Raises:
        CertError: An argument is not valid, or a file cannot be read or written.
    """
    request = make_request(
        store.ensure_device_key(),
        dataset_id=dataset_id,
        facility_id=facility_id,
        profile=profile,
        scope=scope,
        instance_id=instance_id,
        now=now,
    )
    return write_request(Path(out_dir), request)


def install_grant(
    store: KeyStore, grant_path: Path, *, now: datetime | None = None) -> Certificate:
    """Install a grant: check it is for this device, trust its root if none yet, save.

    Installing the same grant again changes nothing. A grant for the same dataset that
    verifies replaces the device's previous certificate (e.g. a wider scope).

    Args:
        grant_path: The ``*.certgrant.json`` file.
        now: The time to check expiry against (default: the current time).

    Returns:
        The installed leaf certificate.

    Raises:
        CertError: The grant is unreadable, does not verify, is for another device's
            key, or comes from a root other than the one already trusted.
    """
    path = Path(grant_path)
    grant = read_grant(path, now=now)
    leaf = grant.leaf
    device = store.existing_device_key()
    if device is None:
        raise CertError(
            f"certificate grant {path} is for device key {leaf.fingerprint}, but this "
            "device has no key yet; install it on the device that wrote the request"
        )
    if leaf.subject_key != device.public_key:
        raise CertError(
            f"certificate grant {path} is for device key {leaf.fingerprint}, not this "
            f"device's key {key_fingerprint(device.public_key)}; install it on the device "
            "that wrote the request, or make a new request here"
        )
    trusted = store.trusted_root(leaf.dataset_id)
    if trusted is not None and trusted != grant.root:
        raise CertError(
            f"grant's root differs from the trusted root of facility {trusted.facility_id}; "
            "it was issued by another authority, so ask this facility's authority "
            f"(root {trusted.cert_id}) for a grant"
        )
    try:
        verify_chain(
            grant.full_chain, trusted or grant.root, dataset_id=leaf.dataset_id, now=now
        )
    except TrustError as exc:  # pragma: no cover - read_grant already verified it
        raise CertError(f"certificate grant {path} cannot be trusted: {exc}") from exc
    if trusted is None:
        # Trust on install: the user chose to install this grant.
        store.save_trusted_root(grant.root)
    existing = store.device_chain(leaf.dataset_id)
    # Certificates compare every field, signature included: a re-signed copy differs.
    if existing != grant.full_chain:
        store.save_device_chain(grant.full_chain)
    return leaf
