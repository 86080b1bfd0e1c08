"""The fixed parts of a bundle: layout constants, limits, Preamble, Footer, BundleInfo.

Private to :mod:`bundlesync.format.container`, which re-exports the public names; the byte layout is
specified in ``docs/format.md``. Nothing here does I/O. Also here: canonical JSON (the
manifest and summary encoding) and the error constructors that give every bundle error
its one-line wording.
"""

from __future__ import annotations

import errno
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from bundlesync.errors import BundleError, DriveError, FormatError, IntegrityError, SyncError

__all__ = [
    "AGAIN",
    "FLAG_ENCRYPTED",
    "SUMMARY_PLAIN_SHA256",
    "SUMMARY_RAW_BYTES",
    "SUMMARY_RECORDS",
    "CHUNK_SIZE",
    "DIGEST_SIZE",
    "END_MAGIC",
    "FLAG_MASK",
    "FOOTER",
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_MANIFEST",
    "EXPANSION_ALLOWANCE",
    "MAX_BATCH_LINES",
    "MAX_EXPANSION",
    "MAX_RECORD",
    "MAX_RECORDS",
    "MAX_SUMMARY",
    "MAX_WINDOW_LOG",
    "PREAMBLE",
    "SIGNATURE_SIZE",
    "BundleInfo",
    "Footer",
    "Preamble",
    "bad_magic_message",
    "canonical_json",
    "damaged",
    "digest_mismatch",
    "missing_end_message",
    "parse_object",
    "read_error",
    "write_error",
]

MAGIC: Final = b"BSYNC\x00\r\n"
"""First 8 bytes. The NUL and CR LF expose text-mode (newline-translating) copies."""

END_MAGIC: Final = b"BSYNCEND"
"""Last 8 bytes; its absence means truncation, appended bytes or corruption."""

FORMAT_VERSION: Final = 1
"""Any change to the layout or its rules bumps this; readers refuse other values."""

FLAG_ENCRYPTED: Final = 0x0001
"""The payload is an age file whose plaintext is the zstd frame (see docs/format.md)."""

FLAG_MASK: Final = FLAG_ENCRYPTED
"""Flag bits this reader understands. Any other set bit makes the file unreadable."""

PREAMBLE: Final = struct.Struct(">8sHHI")
"""magic, format version, flags, manifest_len (16 bytes)."""

FOOTER: Final = struct.Struct(">QI32s64s8s")
"""payload_len, summary_len, digest, signature, END_MAGIC (116 bytes)."""

DIGEST_SIZE: Final = 32
"""SHA-256 digest length."""

SIGNATURE_SIZE: Final = 64
"""Signature length (an Ed25519 signature, for instance)."""

MAX_MANIFEST: Final = 16 << 20
"""Largest manifest a reader accepts (it is read into memory)."""

MAX_SUMMARY: Final = 16 << 20
"""Largest summary a reader accepts (it is read into memory)."""

MAX_RECORD: Final = 16 << 20
"""Largest record line, newline included; bounds a reader's line buffer."""

MAX_RECORDS: Final = 50_000_000
"""Most records a reader accepts in one bundle (a whole large facility is a few million)."""

MAX_EXPANSION: Final = 1000
"""Most decompressed bytes per compressed payload byte a reader accepts (record lines compress
5-20x; a decompression bomb expands thousands of times)."""

EXPANSION_ALLOWANCE: Final = 1 << 20
"""Decompressed bytes always allowed on top of MAX_EXPANSION, for tiny payloads."""

MAX_BATCH_LINES: Final = 16384
"""Most lines a reader holds split at once: with the byte bound, it bounds a reader's memory
even for a payload of very short lines."""

MAX_WINDOW_LOG: Final = 27
"""Largest zstd window (128 MiB) a reader accepts; bounds decompression memory."""

CHUNK_SIZE: Final = 1 << 20
"""Read size for hashing, copying and streaming the payload."""

AGAIN: Final = "copy it again from the source device"
"""What to do about a damaged bundle; ends most FormatError messages."""

SUMMARY_RECORDS: Final = "records"
SUMMARY_RAW_BYTES: Final = "payload_raw_bytes"
SUMMARY_PLAIN_SHA256: Final = "payload_plain_sha256"
"""In an encrypted bundle: SHA-256 (hex) of the decrypted payload, the zstd frame."""
"""Summary keys the writer adds: the number of records and the decompressed payload size."""


def _unpack(layout: struct.Struct, data: bytes, what: str) -> tuple[Any, ...]:
    try:
        return layout.unpack(data)
    except struct.error as exc:
        raise FormatError(
            f"bundle {what} has {len(data)} bytes instead of {layout.size}: "
            f"the file is truncated; {AGAIN}"
        ) from exc


def _check_limit(what: str, claimed: int, limit: int) -> None:
    if claimed > limit:
        raise FormatError(
            f"bundle {what} claims {claimed} bytes, over the {limit} byte limit: "
            f"the file is corrupt; {AGAIN}"
        )


@dataclass(frozen=True)
class Preamble:
    """The fixed 16-byte head of a bundle.

    Attributes:
        version: Format version; only :data:`FORMAT_VERSION` is readable.
        flags: Feature flags; only bits in :data:`FLAG_MASK` are allowed (none in v1).
        manifest_len: Length in bytes of the manifest that follows.
    """

    version: int
    flags: int
    manifest_len: int

    def to_bytes(self) -> bytes:
        """Encode the preamble (``PREAMBLE.size`` bytes)."""
        return PREAMBLE.pack(MAGIC, self.version, self.flags, self.manifest_len)

    @classmethod
    def from_bytes(cls, data: bytes) -> Preamble:
        """Decode and :meth:`validate` ``PREAMBLE.size`` bytes.

        Raises:
            FormatError: Wrong size or magic, unknown version or flags, oversized manifest.
        """
        magic, version, flags, manifest_len = _unpack(PREAMBLE, data, "preamble")
        if magic != MAGIC:
            raise FormatError(bad_magic_message(magic))
        preamble = cls(version=version, flags=flags, manifest_len=manifest_len)
        preamble.validate()
        return preamble

    def validate(self) -> None:
        """Check the fields against what this version of bundlesync reads.

        Raises:
            FormatError: Unknown version, unknown flags or an oversized manifest.
        """
        if self.version != FORMAT_VERSION:
            hint = (
                "upgrade bundlesync on this device"
                if self.version > FORMAT_VERSION
                else "the file is corrupt or was written by a pre-release bundlesync"
            )
            raise FormatError(
                f"bundle format version {self.version} is not supported (this bundlesync "
                f"reads version {FORMAT_VERSION}): {hint}"
            )
        unknown = self.flags & ~FLAG_MASK
        if unknown:
            raise FormatError(
                f"bundle uses unknown feature flags 0x{unknown:04x}: upgrade bundlesync "
                "on this device"
            )
        _check_limit("manifest", self.manifest_len, MAX_MANIFEST)


@dataclass(frozen=True)
class Footer:
    """The fixed 116-byte tail of a bundle.

    Attributes:
        payload_len: Length in bytes of the compressed payload.
        summary_len: Length in bytes of the summary.
        digest: SHA-256 of every byte from offset 0 through the end of the summary.
        signature: The signer's signature over ``digest``.
    """

    payload_len: int
    summary_len: int
    digest: bytes
    signature: bytes

    def to_bytes(self) -> bytes:
        """Encode the footer (``FOOTER.size`` bytes).

        Raises:
            ValueError: The digest or signature has the wrong length.
        """
        if len(self.digest) != DIGEST_SIZE or len(self.signature) != SIGNATURE_SIZE:
            raise ValueError(
                f"footer needs a {DIGEST_SIZE}-byte digest and a {SIGNATURE_SIZE}-byte "
                f"signature, got {len(self.digest)} and {len(self.signature)}"
            )
        return FOOTER.pack(
            self.payload_len, self.summary_len, self.digest, self.signature, END_MAGIC
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Footer:
        """Decode and :meth:`validate` ``FOOTER.size`` bytes.

        Raises:
            FormatError: Wrong size, missing end marker or an oversized summary.
        """
        payload_len, summary_len, digest, signature, end = _unpack(FOOTER, data, "footer")
        if end != END_MAGIC:
            raise FormatError(
                f"bundle end marker is missing: the file is truncated or damaged; {AGAIN}"
            )
        footer = cls(payload_len, summary_len, digest, signature)
        footer.validate()
        return footer

    def validate(self) -> None:
        """Check the length fields.

        Raises:
            FormatError: The summary is longer than :data:`MAX_SUMMARY`.
        """
        _check_limit("summary", self.summary_len, MAX_SUMMARY)


@dataclass(frozen=True)
class BundleInfo:
    """What a bundle's head and tail tell, without reading the payload.

    Attributes:
        path: The file this describes.
        version: Format version (always :data:`FORMAT_VERSION` once read).
        flags: Feature flags (always 0 in v1).
        manifest: The decoded manifest object.
        summary: The decoded summary, including ``records`` and ``payload_raw_bytes``.
        digest: SHA-256 recorded in the footer (not yet checked: see verify_digest).
        signature: Signature over ``digest`` (not checked here: the caller's job).
        payload_offset: Offset of the compressed payload.
        payload_len: Length of the compressed payload.
        size: File size when read; every later read checks the file still has it.
    """

    path: Path
    version: int
    flags: int
    manifest: dict[str, object]
    summary: dict[str, object]
    digest: bytes
    signature: bytes
    payload_offset: int
    payload_len: int
    size: int

    @property
    def records(self) -> int:
        """Number of records the summary announces."""
        value = self.summary[SUMMARY_RECORDS]
        assert isinstance(value, int)  # guaranteed by read_info
        return value

    @property
    def payload_raw_bytes(self) -> int:
        """Decompressed payload size the summary announces."""
        value = self.summary[SUMMARY_RAW_BYTES]
        assert isinstance(value, int)  # guaranteed by read_info
        return value

    @property
    def signed_len(self) -> int:
        """Number of leading bytes covered by the digest."""
        return self.size - FOOTER.size


def canonical_json(obj: object) -> bytes:
    """Encode ``obj`` as canonical JSON: sorted keys, no spaces, UTF-8, no NaN.

    Raises:
        ValueError: ``obj`` cannot be encoded (unsupported type, NaN or infinity,
            lone surrogate, circular reference).
    """
    try:
        text = json.dumps(
            obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
        return text.encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"value cannot be encoded as canonical JSON: {exc}") from exc


def parse_object(data: bytes, what: str, path: Path) -> dict[str, object]:
    """Decode the ``what`` (manifest or summary): canonical JSON bytes holding an object.

    Raises:
        FormatError: Not JSON, not an object, or not in canonical form.
    """
    problem = f"bundle {path} {what} is not valid canonical JSON"
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FormatError(f"{problem} ({exc}): the file is corrupt; {AGAIN}") from exc
    if not isinstance(value, dict):
        raise FormatError(f"{problem} (not an object): the file is corrupt; {AGAIN}")
    try:
        canonical = canonical_json(value) == data
    except ValueError:
        canonical = False
    if not canonical:
        raise FormatError(
            f"{problem} (not in canonical form): it was altered or not written by "
            f"bundlesync; {AGAIN}"
        )
    return value


# --------------------------------------------------------------------------- error wording


def damaged(path: Path, detail: str) -> FormatError:
    """A FormatError for a file that was recognised as a bundle but is damaged."""
    return FormatError(f"bundle {path} {detail}: {AGAIN}")


def digest_mismatch(path: Path) -> IntegrityError:
    """The bytes of ``path`` do not match the digest in its footer."""
    return IntegrityError(
        f"bundle {path} does not match its digest: it was altered or damaged "
        f"after it was written; {AGAIN}"
    )


def read_error(path: Path, exc: OSError) -> BundleError:
    """``path`` cannot be read at all."""
    return BundleError(
        f"cannot read bundle {path}: {exc.strerror or exc}: check the path and that "
        f"the drive is still connected"
    )


def write_error(path: Path, exc: BaseException | None) -> SyncError | DriveError:
    """``path`` cannot be written (``exc`` is usually an OSError); a full drive is a :class:`DriveError`."""
    reason = getattr(exc, "strerror", None) or exc
    code = getattr(exc, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return DriveError(f"the drive is full: cannot write {path} ({reason}): free space on it or use another "
                          "drive; nothing was exported")
    if code == errno.EFBIG:
        return DriveError(f"cannot write {path}: {reason} (the file system's file size limit): export with a "
                          "smaller --max-size")
    return SyncError(
        f"cannot write {path}: {reason}: check that the drive is connected, writable "
        f"and has free space"
    )


def bad_magic_message(magic: bytes) -> str:
    """Explain a wrong marker: a text-mode copy if only its line ending changed."""
    if magic.startswith(MAGIC[:6]):
        return (
            "bundle marker is damaged (the file was probably copied in text mode, which "
            f"changes line endings): {AGAIN} as a binary file"
        )
    return "not a bundlesync bundle (it does not start with the bundle marker): check the file"


def missing_end_message(
    path: Path, window: bytes, window_start: int, size: int, manifest_len: int
) -> str:
    """Explain a missing end marker: appended bytes if a whole bundle ends earlier.

    ``window`` holds the file's bytes from ``window_start`` to its end (``size``).
    """
    end = window.rfind(END_MAGIC)
    while end >= 0:
        stop = window_start + end + len(END_MAGIC)  # where the bundle would end
        footer_at = end + len(END_MAGIC) - FOOTER.size
        if footer_at >= 0 and stop < size:
            payload_len, summary_len = struct.unpack_from(">QI", window, footer_at)
            if PREAMBLE.size + manifest_len + payload_len + summary_len + FOOTER.size == stop:
                return (
                    f"bundle {path} has {size - stop} unexpected bytes after its end "
                    f"marker (something was appended): {AGAIN}"
                )
        end = window.rfind(END_MAGIC, 0, end)
    return f"bundle {path} is truncated or damaged (its end marker is missing): {AGAIN}"
