"""A device home's keys and certificates on disk (:class:`KeyStore`).

Layout under the home directory::

    keys/device.key                      this device's Ed25519 signing key (0600)
    keys/root-<dataset_id>.key           a facility's root key, on its authority only (0600)
    certs/<dataset_id>/trusted-root.json the root this device trusts for the dataset
    certs/<dataset_id>/device-chain.json this device's own certificate, leaf first, root last

A device trusts a facility's root in exactly two ways, both explicit user actions: by
provisioning the facility itself (:mod:`bundlesync.trust.authority`), or by installing a
grant (:mod:`bundlesync.trust.enrolment`). A trusted root is never replaced silently.

Nothing is cached: every call reads the small files again, so several processes (CLI,
scheduled export) can share one home.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from bundlesync.trust.certfiles import (
    CertGrant,
    make_request,
    read_chain_file,
    read_grant,
    read_request,
    write_chain_file,
    write_grant,
    write_request,
)
from bundlesync.trust.certs import (
    FULL_SCOPE,
    Certificate,
    issue_certificate,
    make_root_certificate,
    validate_id,
    verify_chain,
)
from bundlesync.trust.crypto import SigningKey, key_fingerprint, load_private_key, save_private_key
from bundlesync.errors import CertError, StateError, TrustError

__all__ = ["KeyStore"]

_KEYS_DIR = "keys"
_CERTS_DIR = "certs"
_DEVICE_KEY = "device.key"
_TRUSTED_ROOT = "trusted-root.json"
_DEVICE_CHAIN = "device-chain.json"
_NEW_CERT = (
    "get a new certificate: run `bundlesync cert request --facility FACILITY --scope SCOPE --out DRIVE` here, "
    "`bundlesync cert issue REQUEST --out DRIVE` on the facility's authority, then `bundlesync cert install GRANT` "
    "here (on the authority itself: `bundlesync facility provision --facility FACILITY`)"
)


class KeyStore:
    """The keys and certificates of one device home."""

    def __init__(self, home: Path) -> None:
        """Open the key store of ``home`` (nothing is read or created yet).

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

    def root_key_path(self, dataset_id: str) -> Path:
        return self._keys_dir / f"root-{validate_id(dataset_id, 'dataset id')}.key"

    def dataset_dir(self, dataset_id: str) -> Path:
        return self.home / _CERTS_DIR / validate_id(dataset_id, "dataset id")

    # ------------------------------------------------------------------ keys

    def create_key(self, path: Path) -> SigningKey:
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

    def ensure_device_key(self) -> SigningKey:
        """This device's signing key, created if the home has none yet.

        Only the commands that set a device up (``init``, ``cert request``, ``facility
        provision``) may create it: a new key is useless until a certificate names it.

        Raises:
            CertError: The key file exists but cannot be used (permissions, damage), or
                cannot be written.
        """
        return self.create_key(self._device_key_path())

    def device_key(self) -> SigningKey:
        """This device's existing signing key (never created here).

        Raises:
            StateError: There is no key file: the home lost it.
            CertError: The key file exists but cannot be used (permissions, damage).
        """
        path = self._device_key_path()
        if not path.exists():
            raise StateError(f"this device's signing key {path} is missing and a new one is never made silently: "
                             f"restore it from a backup, or {_NEW_CERT}")
        return load_private_key(path)

    def signing_key(self, chain: tuple[Certificate, ...]) -> SigningKey:
        """The device key, checked against the certificate it will sign for (``chain[0]``).

        Called before an export or a receipt writes anything, so a lost, damaged or
        replaced key is reported up front with the way to recover, instead of a bundle
        whose signature no device would accept.

        Raises:
            StateError: The key is missing, damaged or not the key the certificate names.
            CertError: The key file is readable by other users (the fix is ``chmod``).
        """
        path = self._device_key_path()
        leaf = chain[0]
        hint = _NEW_CERT.replace("FACILITY", leaf.facility_id).replace("SCOPE", leaf.scope)
        if not path.exists():
            raise StateError(f"this device's signing key {path} is missing and a new one is never made silently "
                             f"(no certificate would name it): restore it from a backup, or {hint}")
        try:
            key = load_private_key(path)
        except CertError as exc:
            if "chmod" in str(exc):
                raise
            raise StateError(f"this device's signing key {path} is damaged: restore it from a backup, or delete "
                             f"it and {hint}") from exc
        if key.public_key != leaf.subject_key:
            raise StateError(f"this device's signing key {path} is not the key its certificate {leaf.cert_id} "
                             f"names (replaced?): restore the original from a backup, or {hint}")
        return key

    def existing_device_key(self) -> SigningKey | None:
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
        path = self.root_key_path(dataset_id)
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
        path = self.dataset_dir(dataset_id) / _TRUSTED_ROOT
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
        path = self.dataset_dir(dataset_id) / _DEVICE_CHAIN
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

    def check_root_key(self, root: Certificate, root_key: SigningKey) -> None:
        if root_key.public_key != root.subject_key:
            raise CertError(
                f"the root key of dataset {root.dataset_id} does not match its trusted root "
                f"{root.cert_id}; restore {self.root_key_path(root.dataset_id)} from a backup"
            )

    def save_trusted_root(self, root: Certificate) -> None:
        write_chain_file(self.dataset_dir(root.dataset_id) / _TRUSTED_ROOT, (root,))

    def save_device_chain(self, chain: tuple[Certificate, ...]) -> None:
        write_chain_file(self.dataset_dir(chain[0].dataset_id) / _DEVICE_CHAIN, chain)
