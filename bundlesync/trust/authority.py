"""The authority's work: become a facility's root, and answer certificate requests.

``facility provision`` makes this device the facility's authority (root key, trusted root,
its own full-scope certificate); ``cert issue`` signs a request file from another device
into a grant file. Both read and write the home through :class:`KeyStore`.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from bundlesync.errors import CertError, StateError, TrustError
from bundlesync.trust.certfiles import CertGrant, read_request, write_grant
from bundlesync.trust.certs import FULL_SCOPE, Certificate, issue_certificate, make_root_certificate, validate_id, verify_chain
from bundlesync.trust.keystore import KeyStore

__all__ = ["issue_grant", "provision_facility"]


def provision_facility(
    store: KeyStore,
    *,
    dataset_id: str,
    facility_id: str,
    profile: str,
    now: datetime | None = None,
) -> Certificate:
    """Make this device the facility's authority: root key, trusted root, device cert.

    Idempotent: on a device that already is the authority, the existing full-scope
    device certificate is returned (a new one is issued only if it is missing or no
    longer verifies); a new root is never made.

    Args:
        dataset_id: The dataset id.
        facility_id: The facility id.
        profile: The sync profile name.
        now: The issue time (default: the current time).

    Returns:
        This device's full-scope certificate for the dataset.

    Raises:
        CertError: The device already trusts another root for the dataset whose key it
            does not hold, the existing root is for another facility or profile, or a
            file cannot be read or written.
    """
    validate_id(dataset_id, "dataset id")
    validate_id(facility_id, "facility id")
    device = store.ensure_device_key()
    root = store.trusted_root(dataset_id)
    root_key = store.root_key(dataset_id)
    if root is not None:
        if root_key is None:
            raise CertError(
                f"this device already trusts root {root.cert_id} of facility "
                f"{root.facility_id}, whose key it does not hold; provision on the "
                "facility's authority device instead, or request a certificate from it"
            )
        store.check_root_key(root, root_key)
        if (root.facility_id, root.profile) != (facility_id, profile):
            raise CertError(
                f"dataset {dataset_id} is already provisioned for facility "
                f"{root.facility_id} with profile {root.profile}; use those values"
            )
        existing = store.device_chain(dataset_id)
        if existing is not None:
            leaf = existing[0]
            try:
                verify_chain(existing, root, dataset_id=dataset_id, now=now)
            except TrustError:
                pass  # expired or damaged: issue a fresh one below
            else:
                if leaf.subject_key == device.public_key and leaf.scope == FULL_SCOPE:
                    return leaf
    else:
        # Key first, then the root that names it: after a crash between the two, the
        # re-run finds the key and certifies it instead of making a second root.
        if root_key is None:
            root_key = store.create_key(store.root_key_path(dataset_id))
        root = make_root_certificate(
            root_key, dataset_id=dataset_id, facility_id=facility_id, profile=profile, now=now
        )
        store.save_trusted_root(root)
    leaf = issue_certificate(root, root_key, device.public_key, FULL_SCOPE, now=now)
    store.save_device_chain((leaf, root))
    return leaf


def issue_grant(
    store: KeyStore, request_path: Path, out_dir: Path, *, now: datetime | None = None) -> Path:
    """Answer a request with a grant, as the facility's authority.

    The leaf is signed directly by the root, so the grant's chain is ``[leaf, root]``.
    A request that names no dataset (made on a device that had not received the
    facility) is matched by its facility id, or dataset id, to a root held here.

    Args:
        request_path: The ``*.certreq.json`` file.
        out_dir: Where to write the grant (e.g. a USB drive).
        now: The issue time (default: the current time).

    Returns:
        The grant file's path.

    Raises:
        CertError: The request is unreadable, forged, or for another facility or
            profile than the one this device is the authority of.
        StateError: This device does not hold the root key of the request's dataset.
    """
    request = read_request(Path(request_path))
    dataset_id = request.dataset_id or _authority_dataset_of(store, request.facility_id)
    root_key = store.root_key(dataset_id) if dataset_id is not None else None
    root = store.trusted_root(dataset_id) if dataset_id is not None else None
    if root_key is None or root is None:
        raise StateError(
            f"this device is not the authority of facility {request.facility_id}; run it "
            "on the device that ran `bundlesync facility provision`"
        )
    store.check_root_key(root, root_key)
    # A device that did not know the dataset may have been given its id as "facility".
    if request.facility_id != root.facility_id and not (
        request.dataset_id is None and request.facility_id == root.dataset_id
    ):
        raise CertError(
            f"the request is for facility {request.facility_id}, but dataset "
            f"{root.dataset_id} belongs to facility {root.facility_id}; make the request "
            "with the right facility"
        )
    if request.profile != root.profile:
        raise CertError(
            f"the request is for profile {request.profile}, but facility "
            f"{root.facility_id} uses profile {root.profile}; make the request on a "
            "device set up with that profile"
        )
    leaf = issue_certificate(root, root_key, request.device_key, request.scope, now=now)
    grant = CertGrant(leaf=leaf, chain=(root,))
    return write_grant(Path(out_dir), grant, instance_id=request.instance_id)


def _authority_dataset_of(
    store: KeyStore, facility: str) -> str | None:
    """The dataset of ``facility`` (a facility or dataset id) whose root key we hold."""
    found = []
    for dataset_id in store.datasets():
        root = store.trusted_root(dataset_id)
        if (
            root is not None
            and facility in (root.facility_id, root.dataset_id)
            and store.root_key_path(dataset_id).exists()
        ):
            found.append(dataset_id)
    if len(found) > 1:
        raise CertError(
            f"this device is the authority of several datasets of facility {facility} "
            f"({', '.join(found)}); make the request with the dataset id as --facility"
        )
    return found[0] if found else None
