"""The age envelope of an encrypted bundle payload: the only module that imports ``pyrage``.

An encrypted bundle's payload is an age v1 file (binary, not armored) whose plaintext is
the zstd frame an unencrypted bundle would carry (``docs/format.md``). age does the
cryptography (X25519 recipients, ChaCha20-Poly1305 in 64 KiB authenticated chunks); this
module only streams bytes through it and turns its failures into one-line errors.

Identities are age secret keys (``AGE-SECRET-KEY-1...``) and recipients their public
halves (``age1...``), passed around as strings.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Sequence
from typing import BinaryIO

import pyrage
from pyrage import x25519

from bundlesync.errors import BundleError, ConfigError, TrustError

__all__ = ["RECIPIENT_RE", "check_recipient", "decrypt_stream", "encrypt_stream", "generate_identity", "recipient_of"]

RECIPIENT_RE = re.compile(r"age1[02-9ac-hj-np-z]{58}")


def generate_identity() -> str:
    """A fresh age X25519 secret key, as its ``AGE-SECRET-KEY-1...`` string."""
    return str(x25519.Identity.generate())


def recipient_of(secret: str) -> str:
    """The public recipient (``age1...``) of a secret key.

    Raises:
        ConfigError: ``secret`` is not an age X25519 secret key.
    """
    try:
        return str(x25519.Identity.from_str(secret.strip()).to_public())
    except (pyrage.IdentityError, ValueError) as exc:
        raise ConfigError("the encryption key is not an age secret key (damaged?); restore it from a backup") from exc


def check_recipient(value: str) -> str:
    """Return ``value`` if it is an age X25519 recipient.

    Raises:
        ConfigError: It is not one.
    """
    try:
        if not RECIPIENT_RE.fullmatch(value):
            raise ValueError(value)
        x25519.Recipient.from_str(value)
    except (pyrage.RecipientError, ValueError) as exc:
        raise ConfigError(f"{value!r} is not an age recipient; give one like age1... (see `bundlesync cert list`)") from exc
    return value


class _Sink(io.RawIOBase):
    """A writable stream that hands every chunk to a callback (hash and write)."""

    def __init__(self, emit: Callable[[bytes], None]) -> None:
        super().__init__()
        self._emit = emit

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        chunk = bytes(data)
        self._emit(chunk)
        return len(chunk)


class _Window(io.RawIOBase):
    """At most ``length`` bytes of a file from its current position."""

    def __init__(self, file: BinaryIO, length: int) -> None:
        super().__init__()
        self._file, self._left = file, length

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if self._left <= 0:
            return 0
        data = self._file.read(min(len(buffer), self._left))
        buffer[: len(data)] = data
        self._left -= len(data)
        return len(data)


def encrypt_stream(source: BinaryIO, emit: Callable[[bytes], None], recipients: Sequence[str]) -> None:
    """Encrypt everything ``source`` yields to ``recipients``, passing the ciphertext to ``emit``.

    Raises:
        ConfigError: A recipient is not valid.
    """
    try:
        parsed = [x25519.Recipient.from_str(check_recipient(r)) for r in recipients]
        pyrage.encrypt_io(source, _Sink(emit), parsed)  # type: ignore[arg-type]
    except pyrage.EncryptError as exc:
        raise ConfigError(f"encrypting the bundle failed: {exc}; check the recipients") from exc


def decrypt_stream(source: BinaryIO, length: int, emit: Callable[[bytes], None], secret: str, *,
                   shown_as: str) -> None:
    """Decrypt ``length`` bytes of ``source`` (an age file) with ``secret``, passing the plaintext to ``emit``.

    Raises:
        TrustError: The key is not one of the recipients.
        BundleError: The ciphertext is damaged (age authenticates every chunk).
    """
    identity = x25519.Identity.from_str(secret.strip())
    try:
        pyrage.decrypt_io(_Window(source, length), _Sink(emit), [identity])  # type: ignore[arg-type]
    except pyrage.DecryptError as exc:
        if "No matching keys" in str(exc):
            raise TrustError(f"{shown_as} is not encrypted to this device's key; ask the sender to export "
                             "again with --encrypt-to for this device") from exc
        raise BundleError(f"{shown_as}: the encrypted payload is damaged ({exc}); copy it again") from exc
    except OSError as exc:
        raise BundleError(f"{shown_as}: the encrypted payload is damaged ({exc}); copy it again") from exc
