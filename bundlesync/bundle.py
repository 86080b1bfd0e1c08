"""The bundle container: a signed, zstd-compressed file of record lines.

This module only knows bytes: it neither reads SQLite nor checks certificates.
The byte layout, its validity rules and its versioning rule are specified in
``docs/format.md``; in short (all integers big-endian)::

    preamble  16 B   MAGIC, FORMAT_VERSION (u16), flags (u16, 0), manifest_len (u32)
    manifest         canonical JSON object
    payload          ONE zstd frame with content checksum; content = record lines
    summary          canonical JSON object (caller's counts + "records", "payload_raw_bytes")
    footer    116 B  payload_len (u64), summary_len (u32), SHA-256 digest, signature, END_MAGIC

The digest covers every byte from offset 0 through the end of the summary, and the
signature (made by a caller-supplied :data:`Signer`) covers the digest. This module
checks structure, the digest and the payload; the *caller* checks the signature.

Writing streams records through the compressor into ``<name>.partial`` and hashes the
compressed bytes as they are written; :meth:`BundleWriter.finish` adds summary and
footer, fsyncs and renames the file into place. Reading is split so that import can
refuse a bad file early and cheaply: :func:`read_info` reads only the head and the
tail, :func:`copy_verified` moves a bundle off removable media while hashing it in
the same pass, and :func:`iter_records` / :func:`iter_record_batches` stream the
payload with bounded memory.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import hmac
import io
import itertools
import json
import os
import struct
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Final, TypeVar

import zstandard as zstd

from .errors import BundleError, FormatError, IntegrityError, SyncError

__all__ = [
    "CHUNK_SIZE",
    "DEFAULT_LEVEL",
    "DIGEST_SIZE",
    "END_MAGIC",
    "FLAG_MASK",
    "FOOTER",
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_MANIFEST",
    "MAX_RECORD",
    "MAX_SUMMARY",
    "MAX_WINDOW_LOG",
    "PARTIAL_SUFFIX",
    "PREAMBLE",
    "SIGNATURE_SIZE",
    "BundleInfo",
    "BundleWriter",
    "Footer",
    "Preamble",
    "Signer",
    "canonical_json",
    "copy_verified",
    "iter_record_batches",
    "iter_records",
    "read_info",
    "verify_digest",
]

# --------------------------------------------------------------------------- layout

MAGIC: Final = b"BSYNC\x00\r\n"
"""First 8 bytes. The NUL and CR LF expose text-mode (newline-translating) copies."""

END_MAGIC: Final = b"BSYNCEND"
"""Last 8 bytes; its absence means truncation, appended bytes or corruption."""

FORMAT_VERSION: Final = 1
"""Any change to the layout or its rules bumps this; readers refuse other values."""

FLAG_MASK: Final = 0x0000
"""Flag bits this version understands: none. Any set bit makes the file unreadable."""

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

MAX_WINDOW_LOG: Final = 27
"""Largest zstd window (128 MiB) a reader accepts; bounds decompression memory."""

# ------------------------------------------------------------------- tuning knobs

CHUNK_SIZE: Final = 1 << 20
"""Read size for hashing, copying and streaming the payload."""

PARTIAL_SUFFIX: Final = ".partial"
"""Suffix of a file that is still being written; it is renamed when complete."""

# Compression, measured on 200k synthetic Morango-like records (471 B average: four
# random 32-hex ids of which user/content ids recur every 1-3 MB, an ISO timestamp,
# floats, small nested objects; 94.2 MB raw), zstandard 0.25, one core of a 2-vCPU
# x86-64 VM, batches of 4096 lines through compressobj():
#
#   setting                              MB    x level 19   k records/s
#   level 1                            18.51     1.58          915
#   level 3                            16.97     1.45          510-530
#   level 6                            16.08     1.37          210-250
#   level 9                            14.80     1.26          108
#   level 12                           14.52     1.24           49
#   level 19                           11.71     1.00            3
#   level 3 + ldm, window_log 27       15.95     1.36          190-300
#   level 9 + ldm, window_log 27       14.04     1.20           79
#   level 3, threads=2                 17.06     1.46         1143
#   level 3, window_log 23             16.51     1.41          530
#   level 1, window_log 23, hash_log 18  14.52   1.24          580-640   <- chosen
#
# No stock level meets both targets (>= 300k records/s, <= 1.3x level 19): the ids
# recur at megabyte distances, beyond the 0.5-2 MiB window of the fast levels, and
# the fast levels' small hash tables forget them. A window of at least 8 MiB and a
# hash table of at least 2^18 entries fix that for every level (LDM adds little
# here and cut decompression speed from ~1.5 GB/s to 0.2-0.8 GB/s). Decompression
# of the chosen setting needs the 8 MiB window plus ~0.3 MiB.
DEFAULT_LEVEL: Final = 1
"""zstd level used by :class:`BundleWriter`, with the window/hash floors below."""

MIN_WINDOW_LOG: Final = 23
"""The writer's window is at least 2^23 bytes (8 MiB), whatever the level."""

MIN_HASH_LOG: Final = 18
"""The writer's match-finder hash table has at least 2^18 entries, whatever the level."""

WRITE_BATCH: Final = 4096
"""Records joined into one compressor call by :meth:`BundleWriter.write_records`."""

WRITE_BUFFER: Final = 256 << 10
"""Bytes of single records (:meth:`BundleWriter.write_record`) joined per compressor call."""

DECOMPRESS_SLICE: Final = 1024
"""Compressed bytes fed to the decompressor per call. zstd can expand ~32768x (RLE
blocks), so 1 KiB bounds one call's output to ~32 MiB; measured cost vs 64 KiB: none
beyond noise (1.3-1.5 GB/s either way)."""

DECOMPRESS_WRITE_SIZE: Final = 1 << 17
"""Output buffer size of the decompressor."""

RECORD_BLOCK: Final = 256 << 10
"""Decompressed bytes split into lines at once by :func:`iter_records`."""

_SUMMARY_RECORDS: Final = "records"
_SUMMARY_RAW_BYTES: Final = "payload_raw_bytes"
_NL: Final = b"\n"
_AGAIN: Final = "copy it again from the source device"

Signer = Callable[[bytes], bytes]
"""Turns the 32-byte digest into a 64-byte signature."""

_T = TypeVar("_T")


# ------------------------------------------------------------------ pure structures


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
        """Encode the preamble.

        Returns:
            Exactly ``PREAMBLE.size`` bytes.
        """
        return PREAMBLE.pack(MAGIC, self.version, self.flags, self.manifest_len)

    @classmethod
    def from_bytes(cls, data: bytes) -> Preamble:
        """Decode and validate a preamble.

        Args:
            data: Exactly ``PREAMBLE.size`` bytes.

        Returns:
            The validated preamble.

        Raises:
            FormatError: Wrong magic, unknown version or flags, oversized manifest.
        """
        try:
            magic, version, flags, manifest_len = PREAMBLE.unpack(data)
        except struct.error as exc:
            raise FormatError(
                f"bundle preamble has {len(data)} bytes instead of {PREAMBLE.size}: "
                f"the file is truncated; {_AGAIN}"
            ) from exc
        if magic != MAGIC:
            raise FormatError(_bad_magic_message(magic))
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
                f"on this device"
            )
        if self.manifest_len > MAX_MANIFEST:
            raise FormatError(
                f"bundle manifest claims {self.manifest_len} bytes, over the "
                f"{MAX_MANIFEST} byte limit: the file is corrupt; {_AGAIN}"
            )


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
        """Encode the footer.

        Returns:
            Exactly ``FOOTER.size`` bytes.

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
        """Decode and validate a footer.

        Args:
            data: Exactly ``FOOTER.size`` bytes.

        Returns:
            The validated footer.

        Raises:
            FormatError: Wrong size, missing end marker or an oversized summary.
        """
        try:
            payload_len, summary_len, digest, signature, end = FOOTER.unpack(data)
        except struct.error as exc:
            raise FormatError(
                f"bundle footer has {len(data)} bytes instead of {FOOTER.size}: "
                f"the file is truncated; {_AGAIN}"
            ) from exc
        if end != END_MAGIC:
            raise FormatError(
                f"bundle end marker is missing: the file is truncated or damaged; {_AGAIN}"
            )
        footer = cls(payload_len, summary_len, digest, signature)
        footer.validate()
        return footer

    def validate(self) -> None:
        """Check the length fields.

        Raises:
            FormatError: The summary is longer than :data:`MAX_SUMMARY`.
        """
        if self.summary_len > MAX_SUMMARY:
            raise FormatError(
                f"bundle summary claims {self.summary_len} bytes, over the "
                f"{MAX_SUMMARY} byte limit: the file is corrupt; {_AGAIN}"
            )


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
        value = self.summary[_SUMMARY_RECORDS]
        assert isinstance(value, int)  # guaranteed by read_info
        return value

    @property
    def payload_raw_bytes(self) -> int:
        """Decompressed payload size the summary announces."""
        value = self.summary[_SUMMARY_RAW_BYTES]
        assert isinstance(value, int)  # guaranteed by read_info
        return value

    @property
    def signed_len(self) -> int:
        """Number of leading bytes covered by the digest."""
        return self.size - FOOTER.size


def canonical_json(obj: object) -> bytes:
    """Encode ``obj`` as canonical JSON: sorted keys, no spaces, UTF-8, no NaN.

    Args:
        obj: A JSON-serialisable value.

    Returns:
        The UTF-8 bytes of ``json.dumps(obj, sort_keys=True, separators=(",", ":"),
        ensure_ascii=False, allow_nan=False)``.

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


# --------------------------------------------------------------------------- writer


def _compressor(level: int) -> zstd.ZstdCompressor:
    """Build the payload compressor for a zstd ``level`` with this module's floors."""
    base = zstd.ZstdCompressionParameters.from_level(level)
    params = zstd.ZstdCompressionParameters.from_level(
        level,
        window_log=min(max(base.window_log, MIN_WINDOW_LOG), MAX_WINDOW_LOG),
        hash_log=max(base.hash_log, MIN_HASH_LOG),
        write_checksum=1,
        write_dict_id=0,
    )
    return zstd.ZstdCompressor(compression_params=params)


class BundleWriter:
    """Streams records into ``<out_dir>/<name>.partial`` and publishes it atomically.

    :meth:`finish` appends summary and footer, flushes, fsyncs, renames the file to
    ``<out_dir>/<name>`` and fsyncs the directory; :meth:`abort` removes the partial
    file. As a context manager an exception inside ``with`` aborts, and so does
    leaving the block without :meth:`finish` (with a ``ResourceWarning``). A writer
    that is garbage-collected while still open warns ``ResourceWarning`` and aborts.

    A partial file left by an interrupted earlier run under the same name is
    overwritten. After any exception from a method other than :meth:`abort`, the
    writer's output is unusable: call :meth:`abort` (``with`` does it for you).

    Example::

        with BundleWriter(usb_dir, "0001.bsb", manifest, signer) as writer:
            writer.write_records(lines)
            path = writer.finish({"tables": counts})
    """

    _state = "new"  # class default so __del__ works if __init__ failed early
    _file: BinaryIO | None = None

    def __init__(
        self,
        out_dir: Path,
        name: str,
        manifest: Mapping[str, object],
        signer: Signer,
        *,
        level: int = DEFAULT_LEVEL,
    ) -> None:
        """Create the partial file and write preamble and manifest.

        Args:
            out_dir: Existing directory to write into (e.g. on the USB drive).
            name: Final file name, without directories.
            manifest: JSON object describing the bundle (the engine defines fields).
            signer: Called once, by :meth:`finish`, with the 32-byte digest.
            level: zstd level, 1-22 (window and hash table floors still apply).

        Raises:
            ValueError: Bad ``name``, ``level`` or manifest (not a JSON object, too big).
            SyncError: The partial file cannot be created or written.
        """
        if not name or name in {".", ".."} or "/" in name or os.sep in name:
            raise ValueError(f"bundle name must be a plain file name, got {name!r}")
        if (os.altsep and os.altsep in name) or name.endswith(PARTIAL_SUFFIX):
            raise ValueError(f"bundle name must be a plain file name, got {name!r}")
        if not 1 <= level <= zstd.MAX_COMPRESSION_LEVEL:
            raise ValueError(f"level must be 1..{zstd.MAX_COMPRESSION_LEVEL}, got {level}")
        if not isinstance(manifest, Mapping):
            raise ValueError("manifest must be a mapping (a JSON object)")
        manifest_bytes = canonical_json(dict(manifest))
        if len(manifest_bytes) > MAX_MANIFEST:
            raise ValueError(
                f"manifest is {len(manifest_bytes)} bytes, over the {MAX_MANIFEST} limit"
            )
        self._path = Path(out_dir) / name
        self._partial = self._path.with_name(name + PARTIAL_SUFFIX)
        self._signer = signer
        self._hasher = hashlib.sha256()
        self._compress = _compressor(level).compressobj()
        self._records = 0
        self._pending: list[bytes] = []  # single records not yet given to the compressor
        self._pending_len = 0
        self._raw_bytes = 0
        self._payload_len = 0
        try:
            self._file = open(self._partial, "wb")  # noqa: SIM115 - closed in finish/abort
        except OSError as exc:
            raise _write_error(self._partial, exc) from exc
        self._state = "open"
        head = Preamble(FORMAT_VERSION, 0, len(manifest_bytes)).to_bytes()
        self._emit(head + manifest_bytes)

    # -- properties

    @property
    def records(self) -> int:
        """Number of records written so far."""
        return self._records

    @property
    def path(self) -> Path:
        """Where the finished bundle will be (or was) published."""
        return self._path

    @property
    def partial_path(self) -> Path:
        """The file being written until :meth:`finish` renames it."""
        return self._partial

    # -- writing

    def write_record(self, line: bytes) -> None:
        """Append one record.

        Args:
            line: The record; must end with ``b"\\n"`` and contain no other newline.

        Raises:
            ValueError: The line is malformed or longer than :data:`MAX_RECORD`.
            SyncError: Writing failed; the writer has been aborted.
        """
        self._check_open()
        if not line.endswith(_NL) or line.count(_NL) != 1:
            raise ValueError("a record must end with b'\\n' and contain no other b'\\n'")
        if len(line) > MAX_RECORD:
            raise ValueError(f"a record is {len(line)} bytes, over the {MAX_RECORD} limit")
        self._pending.append(line)
        self._pending_len += len(line)
        self._records += 1
        if self._pending_len >= WRITE_BUFFER:
            self._flush_pending()

    def write_records(self, lines: Iterable[bytes]) -> None:
        """Append many records, joining up to :data:`WRITE_BATCH` per compressor call.

        Args:
            lines: Records as for :meth:`write_record`; consumed lazily in batches,
                so a generator is never materialised.

        Raises:
            ValueError: A line is malformed or too long; earlier batches of this call
                have already been written.
            SyncError: Writing failed; the writer has been aborted.
        """
        self._check_open()
        self._flush_pending()
        iterator = iter(lines)
        endswith = bytes.endswith
        while True:
            batch = list(itertools.islice(iterator, WRITE_BATCH))
            if not batch:
                return
            data = b"".join(batch)
            # One newline per line, each at the end of its line.
            if data.count(_NL) != len(batch) or not all(
                map(endswith, batch, itertools.repeat(_NL))
            ):
                raise ValueError(
                    "a record must end with b'\\n' and contain no other b'\\n'"
                )
            if len(data) > MAX_RECORD and max(map(len, batch)) > MAX_RECORD:
                raise ValueError(f"a record is over the {MAX_RECORD} byte limit")
            self._compress_data(data)
            self._records += len(batch)

    def finish(self, summary: Mapping[str, object]) -> Path:
        """Write summary and footer, make the file durable and publish it.

        Args:
            summary: JSON object of the caller's totals; ``records`` and
                ``payload_raw_bytes`` are reserved and added by the writer.

        Returns:
            The path of the published bundle.

        Raises:
            ValueError: Bad summary or signature; the writer has been aborted.
            SyncError: Writing failed; the writer has been aborted.
        """
        self._check_open()
        try:
            if not isinstance(summary, Mapping):
                raise ValueError("summary must be a mapping (a JSON object)")
            reserved = {_SUMMARY_RECORDS, _SUMMARY_RAW_BYTES} & set(summary)
            if reserved:
                raise ValueError(f"summary keys {sorted(reserved)} are added by the writer")
            self._flush_pending()
            full = dict(summary)
            full[_SUMMARY_RECORDS] = self._records
            full[_SUMMARY_RAW_BYTES] = self._raw_bytes
            summary_bytes = canonical_json(full)
            if len(summary_bytes) > MAX_SUMMARY:
                raise ValueError(
                    f"summary is {len(summary_bytes)} bytes, over the {MAX_SUMMARY} limit"
                )
            try:
                tail = self._compress.flush(zstd.COMPRESSOBJ_FLUSH_FINISH)
            except zstd.ZstdError as exc:
                raise SyncError(f"compressing the bundle failed: {exc}") from exc
            self._emit_payload(tail)
            self._emit(summary_bytes)
            digest = self._hasher.digest()
            signature = self._signer(digest)
            if not isinstance(signature, bytes) or len(signature) != SIGNATURE_SIZE:
                raise ValueError(f"signer must return {SIGNATURE_SIZE} bytes")
            footer = Footer(self._payload_len, len(summary_bytes), digest, signature)
            self._write(footer.to_bytes())
            file = self._file
            assert file is not None
            try:
                file.flush()
                os.fsync(file.fileno())
                file.close()
                os.replace(self._partial, self._path)
            except OSError as exc:
                raise _write_error(self._path, exc) from exc
            self._state = "finished"
            self._file = None
            _fsync_dir(self._path.parent)
        except BaseException:
            self._abort_quietly()
            raise
        return self._path

    def abort(self) -> None:
        """Close and remove the partial file. Idempotent; does nothing after finish."""
        if self._state != "open":
            return
        self._state = "aborted"
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except OSError:
                pass  # the file is being thrown away; its flush error does not matter
        try:
            os.unlink(self._partial)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise SyncError(
                f"could not remove the unfinished bundle {self._partial}: "
                f"{exc.strerror or exc}: delete it by hand"
            ) from exc

    # -- context manager and cleanup

    def __enter__(self) -> BundleWriter:
        """Return the writer itself."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Abort unless :meth:`finish` completed; warn if exited cleanly but unfinished."""
        if self._state == "open":
            self.abort()
            if exc_type is None:
                warnings.warn(
                    f"BundleWriter for {self._path} left without finish(); "
                    f"the partial bundle was removed",
                    ResourceWarning,
                    stacklevel=2,
                )

    def __del__(self) -> None:
        """Warn and clean up if the writer was neither finished nor aborted."""
        if self._state == "open":
            warnings.warn(
                f"BundleWriter for {self._path} was never finished or aborted; "
                f"removing the partial bundle",
                ResourceWarning,
                stacklevel=2,
            )
            self._abort_quietly()

    # -- internals

    def _abort_quietly(self) -> None:
        """Abort on an error path: the error being raised matters more than cleanup's."""
        try:
            self.abort()
        except SyncError:
            pass

    def _check_open(self) -> None:
        if self._state != "open":
            raise ValueError(f"BundleWriter is {self._state}; it cannot write any more")

    def _flush_pending(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending, self._pending_len = [], 0
            self._compress_data(data)

    def _compress_data(self, data: bytes) -> None:
        try:
            out = self._compress.compress(data)
        except zstd.ZstdError as exc:
            self._abort_quietly()
            raise SyncError(f"compressing the bundle failed: {exc}") from exc
        self._raw_bytes += len(data)
        if out:
            self._emit_payload(out)

    def _emit_payload(self, data: bytes) -> None:
        self._payload_len += len(data)
        self._emit(data)

    def _emit(self, data: bytes) -> None:
        self._hasher.update(data)
        self._write(data)

    def _write(self, data: bytes) -> None:
        file = self._file
        assert file is not None
        try:
            file.write(data)
        except OSError as exc:
            self._abort_quietly()
            raise _write_error(self._partial, exc) from exc


# --------------------------------------------------------------------------- reader


def read_info(path: Path) -> BundleInfo:
    """Read and check a bundle's preamble, manifest, summary and footer.

    Only the head and the tail are read. Checks: magic, version, flags, that the
    lengths add up to the file size exactly, the end marker, and that manifest and
    summary are canonical JSON objects with the summary's reserved counts present.

    Args:
        path: The bundle file.

    Returns:
        The bundle's description. The digest and signature are *not* checked.

    Raises:
        FormatError: The file is not a readable bundle (see message).
        BundleError: The file cannot be read at all.
    """
    path = Path(path)
    with _open_read(path) as file:
        try:
            size = os.fstat(file.fileno()).st_size
            head = file.read(PREAMBLE.size)
            if len(head) < len(MAGIC) or head[: len(MAGIC)] != MAGIC:
                raise FormatError(
                    f"{path} is empty, not a bundlesync bundle: check the file name"
                    if size == 0
                    else f"{path}: {_bad_magic_message(head[: len(MAGIC)])}"
                )
            if size < PREAMBLE.size + FOOTER.size:
                raise _damaged(
                    path,
                    f"is truncated ({size} bytes, a bundle has at least "
                    f"{PREAMBLE.size + FOOTER.size})",
                )
            preamble = _in(path, Preamble.from_bytes, head)
            payload_offset = PREAMBLE.size + preamble.manifest_len
            if payload_offset + FOOTER.size > size:
                missing = payload_offset + FOOTER.size - size
                raise _damaged(path, f"is truncated (expected at least {missing} more bytes)")
            file.seek(size - FOOTER.size)
            tail = file.read(FOOTER.size)
            if tail[-len(END_MAGIC) :] != END_MAGIC:
                raise FormatError(_missing_end_message(path, file, size))
            footer = _in(path, Footer.from_bytes, tail)
            expected = payload_offset + footer.payload_len + footer.summary_len + FOOTER.size
            if expected > size:
                raise _damaged(path, f"is truncated (expected {expected - size} more bytes)")
            if expected < size:
                raise _damaged(
                    path, f"has {size - expected} unexpected bytes (appended, or corrupt lengths)"
                )
            file.seek(PREAMBLE.size)
            manifest_bytes = _read_exact(file, preamble.manifest_len, path)
            file.seek(payload_offset + footer.payload_len)
            summary_bytes = _read_exact(file, footer.summary_len, path)
        except OSError as exc:
            raise _read_error(path, exc) from exc
    manifest = _parse_object(manifest_bytes, "manifest", path)
    summary = _parse_object(summary_bytes, "summary", path)
    for key in (_SUMMARY_RECORDS, _SUMMARY_RAW_BYTES):
        value = summary.get(key)
        if type(value) is not int or value < 0:
            raise _damaged(path, f"summary lacks a valid {key!r} count")
    return BundleInfo(
        path=path,
        version=preamble.version,
        flags=preamble.flags,
        manifest=manifest,
        summary=summary,
        digest=footer.digest,
        signature=footer.signature,
        payload_offset=payload_offset,
        payload_len=footer.payload_len,
        size=size,
    )


def verify_digest(info: BundleInfo) -> None:
    """Hash the file in :data:`CHUNK_SIZE` pieces and compare with the footer.

    Args:
        info: From :func:`read_info` on the same, unchanged file.

    Raises:
        IntegrityError: The bytes do not match the digest.
        FormatError: The file changed size since ``info`` was read.
        BundleError: The file cannot be read.
    """
    with _open_read(info.path) as file:
        try:
            _check_unchanged(file, info)
            hasher = hashlib.sha256()
            _hash_copy(file, info.signed_len, hasher.update, None, info.path)
        except OSError as exc:
            raise _read_error(info.path, exc) from exc
    if not hmac.compare_digest(hasher.digest(), info.digest):
        raise IntegrityError(
            f"bundle {info.path} does not match its digest: it was altered or damaged "
            f"after it was written; {_AGAIN}"
        )


def iter_records(info: BundleInfo) -> Iterator[bytes]:
    """Yield each record line (with its ``b"\\n"``), decompressing with bounded memory.

    The payload is checked as it streams: the final batch of records is only yielded
    once the frame ended exactly at the end of the payload and the record and byte
    counts equal the summary's, so an error can still arrive after earlier records:
    apply them in one transaction.

    Args:
        info: From :func:`read_info` (normally after :func:`verify_digest` and the
            caller's signature check).

    Yields:
        Record lines, in order.

    Raises:
        FormatError: Corrupt or incomplete frame, bytes after it, a partial last line,
            or counts that differ from the summary.
        BundleError: The file cannot be read.
    """
    for batch in _iter_line_blocks(info, RECORD_BLOCK):
        yield from batch


def iter_record_batches(info: BundleInfo, max_bytes: int = 4 << 20) -> Iterator[list[bytes]]:
    """Like :func:`iter_records`, but yield lists of lines of about ``max_bytes`` bytes.

    This is the fast path for import: each batch is split from one large block of
    decompressed data with a C-level splitter, and a partial last line is carried
    over to the next batch.

    Args:
        info: From :func:`read_info`.
        max_bytes: Target decompressed size of one batch (a batch may exceed it by up
            to one decompressor output and one record).

    Yields:
        Non-empty lists of record lines, in order.

    Raises:
        FormatError: As for :func:`iter_records`.
        BundleError: The file cannot be read.
        ValueError: ``max_bytes`` is not positive.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    return _iter_line_blocks(info, max_bytes)


def copy_verified(src: Path, dst: Path) -> BundleInfo:
    """Copy a bundle while hashing it in the same pass; publish ``dst`` only if valid.

    The copy goes to ``<dst>.partial``, is flushed and fsynced, checked with
    :func:`read_info` and against the digest computed from the bytes that were
    copied, then renamed to ``dst`` (and the directory fsynced). On any failure no
    file is left at ``dst`` or ``<dst>.partial``.

    Args:
        src: The bundle, typically on removable media.
        dst: Destination path, typically on local disk.

    Returns:
        ``read_info(dst)``; its digest has been verified against the copied bytes.

    Raises:
        FormatError: ``src`` is not a valid bundle or changed while being copied.
        IntegrityError: The copied bytes do not match the digest.
        BundleError: ``src`` cannot be read.
        SyncError: ``dst`` cannot be written.
    """
    src, dst = Path(src), Path(dst)
    src_info = read_info(src)
    partial = dst.with_name(dst.name + PARTIAL_SUFFIX)
    hasher = hashlib.sha256()
    published = False
    try:
        with _open_read(src) as fin:
            try:
                fout = open(partial, "wb")  # noqa: SIM115
            except OSError as exc:
                raise _write_error(partial, exc) from exc
            with fout:
                try:
                    _check_unchanged(fin, src_info)
                    _hash_copy(fin, src_info.signed_len, hasher.update, fout, src)
                    _hash_copy(fin, FOOTER.size, None, fout, src)
                    if fin.read(1):
                        raise _damaged(src, "grew while it was being copied")
                except _DestinationError as exc:
                    raise _write_error(partial, exc.__cause__) from exc.__cause__
                except OSError as exc:
                    raise _read_error(src, exc) from exc
                try:
                    fout.flush()
                    os.fsync(fout.fileno())
                except OSError as exc:
                    raise _write_error(partial, exc) from exc
        info = read_info(partial)
        if info.size != src_info.size or not hmac.compare_digest(
            hasher.digest(), info.digest
        ):
            raise IntegrityError(
                f"bundle {src} does not match its digest: it was altered or damaged "
                f"after it was written; {_AGAIN}"
            )
        try:
            os.replace(partial, dst)
        except OSError as exc:
            raise _write_error(dst, exc) from exc
        published = True
        _fsync_dir(dst.parent)
    finally:
        if not published:
            try:
                os.unlink(partial)
            except OSError:
                pass  # never created, or already gone
    return dataclasses.replace(info, path=dst)


# ------------------------------------------------------------------------ internals


class _DestinationError(Exception):
    """Marks an OSError raised while writing the copy (its ``__cause__``)."""


def _iter_line_blocks(info: BundleInfo, block_bytes: int) -> Iterator[list[bytes]]:
    """Yield lists of complete lines, ~``block_bytes`` of payload at a time."""
    records = 0
    tail = b""
    pending: list[bytes] = []
    pending_len = 0
    newline_pending = False  # split only when it yields lines: no quadratic re-joins
    held: list[bytes] | None = None  # last block, released only after the final checks
    for piece in _iter_payload(info):
        pending.append(piece)
        pending_len += len(piece)
        newline_pending = newline_pending or _NL in piece
        if not newline_pending:
            if len(tail) + pending_len > MAX_RECORD:
                raise _damaged(info.path, f"has a record over the {MAX_RECORD} byte limit")
            continue
        if pending_len < block_bytes:
            continue
        lines, tail = _split_lines(tail, pending, info.path)
        pending, pending_len, newline_pending = [], 0, False
        records += len(lines)
        if held is not None:
            yield held
        held = lines
    if pending:
        lines, tail = _split_lines(tail, pending, info.path)
        records += len(lines)
        if lines:
            if held is not None:
                yield held
            held = lines
    if tail:
        raise _damaged(info.path, "payload ends in the middle of a record")
    if records != info.records:
        raise _damaged(
            info.path, f"holds {records} records but its summary says {info.records}"
        )
    if held is not None:
        yield held


def _split_lines(tail: bytes, pieces: list[bytes], path: Path) -> tuple[list[bytes], bytes]:
    """Join ``tail`` and ``pieces``; return the complete lines and the new tail."""
    data = b"".join([tail, *pieces]) if tail else b"".join(pieces)
    lines = io.BytesIO(data).readlines()  # splits on b"\n" only, unlike splitlines()
    rest = b""
    if lines and not lines[-1].endswith(_NL):
        rest = lines.pop()
    if len(data) > MAX_RECORD and (
        len(rest) > MAX_RECORD or (lines and max(map(len, lines)) > MAX_RECORD)
    ):
        raise _damaged(path, f"has a record over the {MAX_RECORD} byte limit")
    return lines, rest


def _iter_payload(info: BundleInfo) -> Iterator[bytes]:
    """Yield the decompressed payload in pieces of bounded size, checking the frame."""
    path = info.path
    expected_raw = info.payload_raw_bytes
    raw = 0
    with _open_read(path) as file:
        try:
            _check_unchanged(file, info)
            file.seek(info.payload_offset)
            remaining = info.payload_len
            first = True
            dobj = zstd.ZstdDecompressor(max_window_size=1 << MAX_WINDOW_LOG).decompressobj(
                write_size=DECOMPRESS_WRITE_SIZE
            )
            while remaining:
                chunk = file.read(min(CHUNK_SIZE, remaining))
                if not chunk:
                    raise _damaged(path, "was truncated while being read")
                remaining -= len(chunk)
                if first:
                    _check_frame_header(chunk, path)
                    first = False
                view = memoryview(chunk)
                for offset in range(0, len(chunk), DECOMPRESS_SLICE):
                    out = dobj.decompress(view[offset : offset + DECOMPRESS_SLICE])
                    if out:
                        raw += len(out)
                        if raw > expected_raw:
                            raise _damaged(
                                path,
                                f"payload is corrupt (it decompresses to more than the "
                                f"{expected_raw} bytes its summary says)",
                            )
                        yield out
                    if dobj.eof:
                        extra = (
                            len(dobj.unused_data)
                            + max(0, len(chunk) - offset - DECOMPRESS_SLICE)
                            + remaining
                        )
                        if extra:
                            raise _damaged(
                                path,
                                f"payload is corrupt ({extra} bytes follow the end of "
                                f"the compressed data)",
                            )
                        break
            if not dobj.eof:
                raise _damaged(path, "payload is corrupt (the compressed data is incomplete)")
        except zstd.ZstdError as exc:
            raise _damaged(path, f"payload is corrupt ({exc})") from exc
        except OSError as exc:
            raise _read_error(path, exc) from exc
    if raw != expected_raw:
        raise _damaged(
            path,
            f"payload is corrupt (it decompresses to {raw} bytes but its summary says "
            f"{expected_raw})",
        )


def _check_frame_header(chunk: bytes, path: Path) -> None:
    """Require a plain zstd frame with a content checksum and a bounded window."""
    if not chunk.startswith(zstd.FRAME_HEADER):
        raise _damaged(path, "payload is not a zstd frame")
    params = zstd.get_frame_parameters(chunk)
    if not params.has_checksum or params.dict_id:
        raise _damaged(path, "payload lacks a content checksum or needs a dictionary")
    if params.window_size > 1 << MAX_WINDOW_LOG:
        raise FormatError(
            f"bundle {path} payload needs a {params.window_size} byte window, over the "
            f"{1 << MAX_WINDOW_LOG} limit: it was not written by bundlesync"
        )


def _hash_copy(
    fin: io.BufferedReader,
    count: int,
    update: Callable[[memoryview], object] | None,
    fout: BinaryIO | None,
    path: Path,
) -> None:
    """Read exactly ``count`` bytes, passing them to ``update`` and to ``fout``."""
    buffer = bytearray(min(CHUNK_SIZE, max(count, 1)))
    view = memoryview(buffer)
    while count:
        n = fin.readinto(view[: min(len(buffer), count)])
        if not n:
            raise _damaged(path, "was truncated while being read")
        count -= n
        if update is not None:
            update(view[:n])
        if fout is not None:
            try:
                fout.write(view[:n])
            except OSError as exc:
                raise _DestinationError() from exc


def _check_unchanged(file: BinaryIO, info: BundleInfo) -> None:
    size = os.fstat(file.fileno()).st_size
    if size != info.size:
        raise FormatError(
            f"bundle {info.path} changed size ({info.size} -> {size} bytes) since it was "
            f"inspected: {_AGAIN}"
        )


def _read_exact(file: BinaryIO, count: int, path: Path) -> bytes:
    data = file.read(count)
    if len(data) != count:
        raise _damaged(path, "was truncated while being read")
    return data


def _parse_object(data: bytes, what: str, path: Path) -> dict[str, object]:
    """Decode canonical JSON bytes that must hold an object."""
    problem = f"bundle {path} {what} is not valid canonical JSON"
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FormatError(f"{problem} ({exc}): the file is corrupt; {_AGAIN}") from exc
    if not isinstance(value, dict):
        raise FormatError(f"{problem} (not an object): the file is corrupt; {_AGAIN}")
    try:
        canonical = canonical_json(value) == data
    except ValueError:
        canonical = False
    if not canonical:
        raise FormatError(
            f"{problem} (not in canonical form): it was altered or not written by "
            f"bundlesync; {_AGAIN}"
        )
    return value


def _in(path: Path, parse: Callable[[bytes], _T], data: bytes) -> _T:
    """Run ``parse`` and prefix its FormatError message with the bundle path."""
    try:
        return parse(data)
    except FormatError as exc:
        raise FormatError(f"{path}: {exc}") from exc


def _bad_magic_message(magic: bytes) -> str:
    if magic.startswith(MAGIC[:6]):
        return (
            "bundle marker is damaged (the file was probably copied in text mode, which "
            f"changes line endings): {_AGAIN} as a binary file"
        )
    return "not a bundlesync bundle (it does not start with the bundle marker): check the file"


def _missing_end_message(path: Path, file: BinaryIO, size: int) -> str:
    """Explain a missing end marker: appended bytes if a footer is found earlier."""
    start = max(0, size - CHUNK_SIZE)
    file.seek(start)
    window = file.read(size - start)
    head_len = _manifest_len_at_start(file)
    end = window.rfind(END_MAGIC)
    while end >= 0 and head_len is not None:
        stop = start + end + len(END_MAGIC)  # where the bundle would end
        footer_at = end + len(END_MAGIC) - FOOTER.size
        if footer_at >= 0 and stop < size:
            payload_len, summary_len = struct.unpack_from(">QI", window, footer_at)
            if (
                PREAMBLE.size + head_len + payload_len + summary_len + FOOTER.size == stop
            ):
                return (
                    f"bundle {path} has {size - stop} unexpected bytes after its end "
                    f"marker (something was appended): {_AGAIN}"
                )
        end = window.rfind(END_MAGIC, 0, end)
    return f"bundle {path} is truncated or damaged (its end marker is missing): {_AGAIN}"


def _manifest_len_at_start(file: BinaryIO) -> int | None:
    file.seek(0)
    head = file.read(PREAMBLE.size)
    if len(head) != PREAMBLE.size:
        return None
    manifest_len: int = PREAMBLE.unpack(head)[3]
    return manifest_len


def _open_read(path: Path) -> io.BufferedReader:
    try:
        return open(path, "rb")
    except OSError as exc:
        raise _read_error(path, exc) from exc


def _damaged(path: Path, detail: str) -> FormatError:
    """A FormatError for a file that was recognised as a bundle but is damaged."""
    return FormatError(f"bundle {path} {detail}: {_AGAIN}")


def _read_error(path: Path, exc: OSError) -> BundleError:
    return BundleError(
        f"cannot read bundle {path}: {exc.strerror or exc}: check the path and that "
        f"the drive is still connected"
    )


def _write_error(path: Path, exc: BaseException | None) -> SyncError:
    reason = getattr(exc, "strerror", None) or exc
    return SyncError(
        f"cannot write {path}: {reason}: check that the drive is connected, writable "
        f"and has free space"
    )


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable; skipped where directories cannot be fsynced."""
    if os.name == "nt":  # pragma: no cover - Windows cannot open directories
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError as exc:
        raise _write_error(directory, exc) from exc
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in {errno.EINVAL, errno.ENOTSUP, errno.EBADF}:
            raise _write_error(directory, exc) from exc
    finally:
        os.close(fd)

