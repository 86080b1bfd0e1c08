"""A device home's keys and certificates on disk, and the provision/request/issue/install flow.

Layout under the home directory::

    keys/device.key                      this device's Ed25519 signing key (0600)
    keys/root-<dataset_id>.key           a facility's root key, on its authority only (0600)
    certs/<dataset_id>/trusted-root.json the root this device trusts for the dataset
    certs/<dataset_id>/device-chain.json this device's own certificate, leaf first, root last

A device trusts a facility's root in exactly two ways, both explicit user actions: by
provisioning the facility itself (it becomes the authority), or by installing a grant
(trust on install). A trusted root is never replaced silently: a grant from a different
root is refused.

Nothing is cached: every call reads the small files again, so several processes (CLI,
scheduled export) can share one home.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from bundlesync.certfiles import (
    CertGrant,
    make_request,
    read_chain_file,
    read_grant,
    read_request,
    write_chain_file,
    write_grant,
    write_request,
)
from bundlesync.certs import (
    FULL_SCOPE,
    Certificate,
    issue_certificate,
    make_root_certificate,
    validate_id,
    verify_chain,
)
from bundlesync.crypto import SigningKey, key_fingerprint, load_private_key, save_private_key
from bundlesync.errors import CertError, StateError, TrustError

__all__ = ["Keyring"]

_KEYS_DIR = "keys"
_CERTS_DIR = "certs"
_DEVICE_KEY = "device.key"
_TRUSTED_ROOT = "trusted-root.json"
_DEVICE_CHAIN = "device-chain.json"


class Keyring:
    """The keys and certificates of one device home."""

    def __init__(self, home: Path) -> None:
        """Open the keyring of ``home`` (nothing is read or created yet).

        Args:
            home: The device home directory (``--home`` / ``BUNDLESYNC_HOME``).
        """
        self.home = Path(home)

    # ------------------------------------------------------------------ paths

    @property
    def _keys_dir(self) -> Path:
        return self.home / _KEYS_DIR

    def _device_key_path(self) -> Path:
        return self._keys_dir / _DEVICE_KEY

    def _root_key_path(self, dataset_id: str) -> Path:
        return self._keys_dir / f"root-{validate_id(dataset_id, 'dataset id')}.key"

    def _dataset_dir(self, dataset_id: str) -> Path:
        return self.home / _CERTS_DIR / validate_id(dataset_id, "dataset id")

    # ------------------------------------------------------------------ keys

    def _create_key(self, path: Path) -> SigningKey:
        if path.exists():
            return load_private_key(path)
        key = SigningKey.generate()
        try:
            save_private_key(path, key, exclusive=True)
        except CertError:
            # Another process created it between our check and our write: use theirs.
            if path.exists():
                return load_private_key(path)
            raise
        return key

    def device_key(self) -> SigningKey:
        """This device's signing key, created on first use.

        Returns:
            The key.

        Raises:
            CertError: The key file exists but cannot be used (permissions, damage), or
                cannot be written.
        """
        return self._create_key(self._device_key_path())

    def _existing_device_key(self) -> SigningKey | None:
        path = self._device_key_path()
        return load_private_key(path) if path.exists() else None

    def root_key(self, dataset_id: str) -> SigningKey | None:
        """The root key of ``dataset_id``, if this device is that facility's authority.

        Args:
            dataset_id: The dataset id.

        Returns:
            The key, or ``None`` if this device does not hold it.

        Raises:
            CertError: The key file exists but cannot be used, or the id is not valid.
        """
        path = self._root_key_path(dataset_id)
        return load_private_key(path) if path.exists() else None

    # ------------------------------------------------------------------ certificates

    def trusted_root(self, dataset_id: str) -> Certificate | None:
        """The root certificate this device trusts for ``dataset_id``.

        Args:
            dataset_id: The dataset id.

        Returns:
            The root, or ``None`` if the device trusts none for that dataset yet.

        Raises:
            CertError: The stored file is damaged or is not a root of that dataset.
        """
        path = self._dataset_dir(dataset_id) / _TRUSTED_ROOT
        if not path.exists():
            return None
        chain = read_chain_file(path)
        root = chain[0]
        if len(chain) != 1 or not root.is_root or root.dataset_id != dataset_id:
            raise CertError(
                f"{path} does not hold the root certificate of dataset {dataset_id}; "
                "restore it from a backup or install the facility's grant again"
            )
        return root

    def device_chain(self, dataset_id: str) -> tuple[Certificate, ...] | None:
        """This device's own certificate chain for ``dataset_id``.

        Args:
            dataset_id: The dataset id.

        Returns:
            ``(leaf, ..., root)``, or ``None`` if the device has no certificate for it.

        Raises:
            CertError: The stored file is damaged.
        """
        path = self._dataset_dir(dataset_id) / _DEVICE_CHAIN
        if not path.exists():
            return None
        return read_chain_file(path)

    def datasets(self) -> list[str]:
        """The datasets this device trusts a root for.

        Returns:
            Their ids, sorted.
        """
        certs_dir = self.home / _CERTS_DIR
        try:
            entries = list(certs_dir.iterdir())
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise CertError(
                f"cannot list {certs_dir}: {exc.strerror or exc}; check its permissions"
            ) from exc
        found = []
        for entry in entries:
            try:
                validate_id(entry.name, "dataset id")
            except CertError:
                continue  # not ours (e.g. a stray file); never let it break listing
            if (entry / _TRUSTED_ROOT).is_file():
                found.append(entry.name)
        return sorted(found)

    def _check_root_key(self, root: Certificate, root_key: SigningKey) -> None:
        if root_key.public_key != root.subject_key:
            raise CertError(
                f"the root key of dataset {root.dataset_id} does not match its trusted root "
                f"{root.cert_id}; restore {self._root_key_path(root.dataset_id)} from a backup"
            )

    def _save_trusted_root(self, root: Certificate) -> None:
        write_chain_file(self._dataset_dir(root.dataset_id) / _TRUSTED_ROOT, (root,))

    def _save_device_chain(self, chain: tuple[Certificate, ...]) -> None:
        write_chain_file(self._dataset_dir(chain[0].dataset_id) / _DEVICE_CHAIN, chain)

    # ------------------------------------------------------------------ flows

    def provision(
        self,
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
        device = self.device_key()
        root = self.trusted_root(dataset_id)
        root_key = self.root_key(dataset_id)
        if root is not None:
            if root_key is None:
                raise CertError(
                    f"this device already trusts root {root.cert_id} of facility "
                    f"{root.facility_id}, whose key it does not hold; provision on the "
                    "facility's authority device instead, or request a certificate from it"
                )
            self._check_root_key(root, root_key)
            if (root.facility_id, root.profile) != (facility_id, profile):
                raise CertError(
                    f"dataset {dataset_id} is already provisioned for facility "
                    f"{root.facility_id} with profile {root.profile}; use those values"
                )
            existing = self.device_chain(dataset_id)
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
                root_key = self._create_key(self._root_key_path(dataset_id))
            root = make_root_certificate(
                root_key, dataset_id=dataset_id, facility_id=facility_id, profile=profile, now=now
            )
            self._save_trusted_root(root)
        leaf = issue_certificate(root, root_key, device.public_key, FULL_SCOPE, now=now)
        self._save_device_chain((leaf, root))
        return leaf

    def request(
        self,
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
            self.device_key(),
            dataset_id=dataset_id,
            facility_id=facility_id,
            profile=profile,
            scope=scope,
            instance_id=instance_id,
            now=now,
        )
        return write_request(Path(out_dir), request)

    def issue(self, request_path: Path, out_dir: Path, *, now: datetime | None = None) -> Path:
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
        dataset_id = request.dataset_id or self._authority_dataset_of(request.facility_id)
        root_key = self.root_key(dataset_id) if dataset_id is not None else None
        root = self.trusted_root(dataset_id) if dataset_id is not None else None
        if root_key is None or root is None:
            raise StateError(
                f"this device is not the authority of facility {request.facility_id}; run it "
                "on the device that ran `bundlesync facility provision`"
            )
        self._check_root_key(root, root_key)
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

    def _authority_dataset_of(self, facility: str) -> str | None:
        """The dataset of ``facility`` (a facility or dataset id) whose root key we hold."""
        found = []
        for dataset_id in self.datasets():
            root = self.trusted_root(dataset_id)
            if (
                root is not None
                and facility in (root.facility_id, root.dataset_id)
                and self._root_key_path(dataset_id).exists()
            ):
                found.append(dataset_id)
        if len(found) > 1:
            raise CertError(
                f"this device is the authority of several datasets of facility {facility} "
                f"({', '.join(found)}); make the request with the dataset id as --facility"
            )
        return found[0] if found else None

    def install(self, grant_path: Path, *, now: datetime | None = None) -> Certificate:
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
        device = self._existing_device_key()
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
        trusted = self.trusted_root(leaf.dataset_id)
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
            self._save_trusted_root(grant.root)
        existing = self.device_chain(leaf.dataset_id)
        # Certificates compare every field, signature included: a re-signed copy differs.
        if existing != grant.full_chain:
            self._save_device_chain(grant.full_chain)
        return leaf
