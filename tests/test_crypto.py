"""Tests for bundlesync.trust.crypto: signatures, domain separation and key files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from bundlesync.trust.crypto import (
    PUBLIC_KEY_SIZE,
    SIGNATURE_SIZE,
    SigningKey,
    key_fingerprint,
    load_private_key,
    save_private_key,
    verify,
)
from bundlesync.errors import CertError, TrustError

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_sign_verify_round_trip() -> None:
    key = SigningKey.generate()
    sig = key.sign("bundle", b"manifest bytes")
    assert len(sig) == SIGNATURE_SIZE
    assert len(key.public_key) == PUBLIC_KEY_SIZE
    verify(key.public_key, "bundle", b"manifest bytes", sig)  # no exception


def test_wrong_context_fails() -> None:
    key = SigningKey.generate()
    sig = key.sign("cert", b"body")
    for context in ("bundle", "receipt", "request"):
        with pytest.raises(TrustError, match="^signature does not verify$"):
            verify(key.public_key, context, b"body", sig)


def test_tampered_message_fails() -> None:
    key = SigningKey.generate()
    sig = key.sign("receipt", b"hello")
    with pytest.raises(TrustError):
        verify(key.public_key, "receipt", b"hellO", sig)
    bad_sig = bytes([sig[0] ^ 1]) + sig[1:]
    with pytest.raises(TrustError):
        verify(key.public_key, "receipt", b"hello", bad_sig)


def test_wrong_key_and_malformed_inputs_fail_with_trust_error() -> None:
    key, other = SigningKey.generate(), SigningKey.generate()
    sig = key.sign("bundle", b"m")
    with pytest.raises(TrustError):
        verify(other.public_key, "bundle", b"m", sig)
    with pytest.raises(TrustError):
        verify(key.public_key[:31], "bundle", b"m", sig)
    with pytest.raises(TrustError):
        verify(key.public_key, "bundle", b"m", sig[:63])
    with pytest.raises(TrustError):
        verify(b"\xff" * 32, "bundle", b"m", sig)


def test_domain_separation_is_not_raw_ed25519() -> None:
    # A signature over the raw message must not pass as a context signature.
    key = SigningKey.generate()
    raw_sig = key.sign("bundle", b"")
    with pytest.raises(TrustError):
        verify(key.public_key, "bundl", b"e\0", raw_sig)


def test_invalid_context_is_a_programming_error() -> None:
    key = SigningKey.generate()
    with pytest.raises(ValueError):
        key.sign("Bad Context", b"m")
    with pytest.raises(ValueError):
        key.sign("a\0b", b"m")


def test_pem_round_trip_and_repr_hides_key() -> None:
    key = SigningKey.generate()
    pem = key.to_pem()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    again = SigningKey.from_pem(pem)
    assert again.public_key == key.public_key
    assert "PRIVATE" not in repr(key)
    assert key_fingerprint(key.public_key) in repr(key)


@pytest.mark.parametrize("data", [b"", b"garbage", b"-----BEGIN PRIVATE KEY-----\nAAAA\n"])
def test_from_pem_garbage_is_cert_error(data: bytes) -> None:
    with pytest.raises(CertError, match="not an unencrypted Ed25519 private key"):
        SigningKey.from_pem(data)


def test_key_fingerprint() -> None:
    key = SigningKey.generate()
    fp = key_fingerprint(key.public_key)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fp == key_fingerprint(key.public_key)


@posix_only
def test_saved_key_is_0600_and_parent_0700(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "device.key"
    key = SigningKey.generate()
    save_private_key(path, key)
    assert mode_of(path) == 0o600
    assert mode_of(path.parent) == 0o700
    assert load_private_key(path).public_key == key.public_key
    assert not path.with_name("device.key.partial").exists()


@posix_only
def test_stale_partial_with_wide_mode_does_not_leak(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    stale = tmp_path / "k.key.partial"
    stale.write_bytes(b"junk")
    stale.chmod(0o666)
    save_private_key(path, SigningKey.generate())
    assert mode_of(path) == 0o600
    assert not stale.exists()


@posix_only
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_group_or_world_accessible_key_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "k.key"
    save_private_key(path, SigningKey.generate())
    path.chmod(mode)
    with pytest.raises(CertError, match=r"chmod 600") as info:
        load_private_key(path)
    assert "\n" not in str(info.value)


def test_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(CertError, match="does not exist"):
        load_private_key(tmp_path / "nope.key")


def test_garbage_key_file(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    path.write_bytes(b"\x00\x01not a key")
    path.chmod(0o600)
    with pytest.raises(CertError, match="not an unencrypted Ed25519 private key"):
        load_private_key(path)


def test_directory_as_key_file(tmp_path: Path) -> None:
    path = tmp_path / "dir.key"
    path.mkdir(mode=0o700)
    with pytest.raises(CertError):
        load_private_key(path)


def test_exclusive_save_does_not_replace(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    first = SigningKey.generate()
    save_private_key(path, first, exclusive=True)
    with pytest.raises(CertError, match="already exists"):
        save_private_key(path, SigningKey.generate(), exclusive=True)
    assert load_private_key(path).public_key == first.public_key
    # A plain save replaces atomically.
    second = SigningKey.generate()
    save_private_key(path, second)
    assert load_private_key(path).public_key == second.public_key


def test_save_into_unwritable_place_is_cert_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CertError, match="cannot write key file"):
        save_private_key(blocker / "k.key", SigningKey.generate())
