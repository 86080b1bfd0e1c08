"""Ed25519 signing recipes: the only module of bundlesync that imports ``cryptography``.

Everything else (certificates, bundles, receipts) calls the handful of functions here, so
the hazardous-materials layer stays in one reviewable place (style guideline 15, "two
crypto layers"). Failures are opaque on purpose: :func:`verify` raises one
:class:`~bundlesync.errors.TrustError` whatever went wrong, and key-file problems become a
one-line :class:`~bundlesync.errors.CertError` that says what to do.

Signatures are domain separated: the signed bytes are
``b"bundlesync/v1/" + context + b"\\0" + message``, so a signature made for a certificate can
never be replayed as a bundle or receipt signature (and vice versa).

Private keys are stored as unencrypted PKCS#8 PEM files with mode 0600, written atomically
(:func:`bundlesync.fsutil.atomic_write_bytes`) so a crash never leaves half a key.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from bundlesync.errors import CertError, TrustError
from bundlesync.fsutil import TargetExistsError, atomic_write_bytes

__all__ = [
    "PUBLIC_KEY_SIZE",
    "SIGNATURE_SIZE",
    "SigningKey",
    "key_fingerprint",
    "load_private_key",
    "save_private_key",
    "verify",
]

PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64

# Bumping the prefix is how a future signature scheme stays distinct from v1.
_DOMAIN_PREFIX = b"bundlesync/v1/"
# Contexts are short ASCII names without NUL, so "context\0message" is unambiguous.
_CONTEXT_RE = re.compile(r"[a-z][a-z0-9-]{0,31}")
# A PKCS#8 Ed25519 PEM is ~119 bytes; anything far bigger is not one of our key files.
_MAX_KEY_FILE_SIZE = 64 * 1024


def _signed_bytes(context: str, message: bytes) -> bytes:
    if not _CONTEXT_RE.fullmatch(context):
        # A programming error, not user input: fail loudly rather than sign ambiguously.
        raise ValueError(f"invalid signature context {context!r}")
    return _DOMAIN_PREFIX + context.encode("ascii") + b"\0" + message


class SigningKey:
    """An Ed25519 private key that signs with bundlesync's domain separation."""

    __slots__ = ("_key",)

    def __init__(self, key: Ed25519PrivateKey) -> None:
        """Wrap an already loaded key; use :meth:`generate` or :meth:`from_pem` instead."""
        self._key = key

    def __repr__(self) -> str:
        # Never show key material, only the public fingerprint.
        return f"SigningKey(fingerprint={key_fingerprint(self.public_key)!r})"

    @classmethod
    def generate(cls) -> SigningKey:
        """Make a fresh key from the operating system's random source.

        Returns:
            A new signing key.
        """
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, data: bytes) -> SigningKey:
        """Load an unencrypted PKCS#8 PEM Ed25519 private key.

        Args:
            data: The PEM bytes.

        Returns:
            The key.

        Raises:
            CertError: The data is not an unencrypted Ed25519 private key.
        """
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise CertError(
                "key data is not an unencrypted Ed25519 private key in PEM form; "
                "restore the key file from a backup"
            ) from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise CertError(
                f"key data holds a {type(key).__name__.removesuffix('PrivateKey')} key, "
                "not an Ed25519 key; restore the key file from a backup"
            )
        return cls(key)

    def to_pem(self) -> bytes:
        """Serialize the key as unencrypted PKCS#8 PEM.

        Returns:
            The PEM bytes.
        """
        return self._key.private_bytes(
            encoding=serialization.Encoding.PEM,
            format=serialization.PrivateFormat.PKCS8,
            encryption_algorithm=serialization.NoEncryption(),
        )

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte Ed25519 public key."""
        return self._key.public_key().public_bytes(
            encoding=serialization.Encoding.Raw,
            format=serialization.PublicFormat.Raw,
        )

    def sign(self, context: str, message: bytes) -> bytes:
        """Sign ``message`` for ``context`` ("cert", "request", "bundle", "receipt", ...).

        Args:
            context: What the signature is for; a short lowercase ASCII name.
            message: The bytes to sign.

        Returns:
            The 64-byte signature.

        Raises:
            ValueError: ``context`` is not a valid context name (a programming error).
        """
        return self._key.sign(_signed_bytes(context, message))


def verify(public_key: bytes, context: str, message: bytes, signature: bytes) -> None:
    """Check that ``signature`` was made by ``public_key`` over ``message`` for ``context``.

    Args:
        public_key: The raw 32-byte Ed25519 public key.
        context: The context the signer used.
        message: The signed bytes.
        signature: The 64-byte signature.

    Raises:
        TrustError: The signature does not verify, for whatever reason (wrong key, wrong
            context, altered message, malformed key or signature). Callers add context.
        ValueError: ``context`` is not a valid context name (a programming error).
    """
    signed = _signed_bytes(context, message)
    if len(public_key) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        raise TrustError("signature does not verify")
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, signed)
    except (InvalidSignature, ValueError) as exc:
        raise TrustError("signature does not verify") from exc


def key_fingerprint(public_key: bytes) -> str:
    """A short, stable name for a public key, for messages and listings.

    Args:
        public_key: The raw public key bytes.

    Returns:
        The first 16 hex characters of the key's SHA-256.
    """
    return hashlib.sha256(public_key).hexdigest()[:16]


def save_private_key(path: Path, key: SigningKey, *, exclusive: bool = False) -> None:
    """Write ``key`` to ``path`` atomically, readable by the owner only (mode 0600).

    The file is created with mode 0600 from the start, so the key is never briefly
    readable by others. A missing parent directory is created with mode 0700; an existing
    one is left as it is.

    Args:
        path: Where to write the PEM file.
        key: The key to store.
        exclusive: Refuse to replace an existing file (used when creating a key that
            other processes may be creating at the same moment).

    Raises:
        CertError: The file cannot be written, or ``exclusive`` and it already exists.
    """
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write_bytes(path, key.to_pem(), mode=0o600, exclusive=exclusive)
    except TargetExistsError as exc:
        raise CertError(
            f"key file {path} already exists; it was not replaced (load it instead)"
        ) from exc
    except OSError as exc:
        raise CertError(
            f"cannot write key file {path}: {exc.strerror or exc}; "
            "check that the directory exists, is writable and the disk is not full"
        ) from exc


def load_private_key(path: Path) -> SigningKey:
    """Read a private key written by :func:`save_private_key`.

    Args:
        path: The PEM file.

    Returns:
        The key.

    Raises:
        CertError: The file is missing, unreadable, not an Ed25519 key, or readable or
            writable by users other than its owner.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise CertError(f"key file {path} is not a regular file; restore it from a backup")
            # POSIX mode bits mean nothing on Windows; there the ACLs of the home apply.
            if os.name == "posix" and st.st_mode & 0o077:
                raise CertError(
                    f"key file {path} is accessible by other users "
                    f"(mode {stat.S_IMODE(st.st_mode):04o}); run `chmod 600 {path}` and retry"
                )
            data = f.read(_MAX_KEY_FILE_SIZE + 1)
    except FileNotFoundError as exc:
        raise CertError(
            f"key file {path} does not exist; restore it from a backup or set the device up again"
        ) from exc
    except OSError as exc:
        raise CertError(
            f"cannot read key file {path}: {exc.strerror or exc}; check its owner and permissions"
        ) from exc
    if len(data) > _MAX_KEY_FILE_SIZE:
        raise CertError(f"key file {path} is too large to be a key; restore it from a backup")
    try:
        return SigningKey.from_pem(data)
    except CertError as exc:
        raise CertError(
            f"key file {path} is not an unencrypted Ed25519 private key (damaged?); "
            "restore it from a backup"
        ) from exc
