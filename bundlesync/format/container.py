"""The bundle container: a signed, zstd-compressed file of record lines.

This module only knows bytes: it neither reads SQLite nor checks certificates.
``docs/format.md`` specifies the layout, its validity rules and its versioning rule;
in short (all integers big-endian)::

    preamble  16 B   MAGIC, FORMAT_VERSION (u16), flags (u16, 0), manifest_len (u32)
    manifest         canonical JSON object
    payload          ONE zstd frame with content checksum; content = record lines
    summary          canonical JSON object (caller's counts + "records", "payload_raw_bytes")
    footer    116 B  payload_len (u64), summary_len (u32), SHA-256 digest, signature, END_MAGIC

The digest covers every byte from offset 0 through the end of the summary, and the
signature (made by a caller-supplied :data:`Signer`) covers the digest. This module
checks structure, the digest and the payload; the *caller* checks the signature.

Reading is split so that import can refuse a bad file early and cheaply: :func:`read_info`
reads only the head and the tail, :func:`copy_verified` moves a bundle off removable media
while hashing it, and :func:`iter_records` / :func:`iter_record_batches` stream the payload
in bounded memory. The fixed structs are in ``_frames``, the payload codec in ``_payload``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import itertools
import os
import queue
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Final, TypeVar

import zstandard as zstd

from bundlesync.format._frames import (
    FLAG_ENCRYPTED,
    SUMMARY_PLAIN_SHA256,
    CHUNK_SIZE,
    DIGEST_SIZE,
    END_MAGIC,
    FLAG_MASK,
    FOOTER,
    FORMAT_VERSION,
    MAGIC,
    MAX_MANIFEST,
    MAX_RECORD,
    MAX_SUMMARY,
    MAX_WINDOW_LOG,
    PREAMBLE,
    SIGNATURE_SIZE,
    SUMMARY_RAW_BYTES,
    SUMMARY_RECORDS,
    BundleInfo,
    Footer,
    Preamble,
    bad_magic_message,
    canonical_json,
    damaged,
    digest_mismatch,
    missing_end_message,
    parse_object,
    read_error,
    write_error,
)
from bundlesync.format._payload import (
    DEFAULT_LEVEL,
    DestinationError,
    check_unchanged,
    compressor,
    hash_copy,
    iter_line_blocks,
    open_read,
)

from bundlesync.format.volumes import VolumeSetWriter
from bundlesync.errors import BundlesyncError, FormatError, IntegrityError, SyncError
from bundlesync.format.envelope import decrypt_stream, encrypt_stream
from bundlesync.fsutil import PARTIAL_SUFFIX, AtomicFile, fsync_dir, partial_path

__all__ = [
    "CHUNK_SIZE",
    "DEFAULT_LEVEL",
    "DIGEST_SIZE",
    "END_MAGIC",
    "FLAG_ENCRYPTED",
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
    "decrypt_payload",
    "iter_record_batches",
    "iter_records",
    "read_info",
    "verify_digest",
]

WRITE_BATCH: Final = 4096
"""Records joined into one compressor call by :meth:`BundleWriter.write_records`."""

WRITE_BUFFER: Final = 256 << 10
"""Bytes of single records (:meth:`BundleWriter.write_record`) joined per compressor call."""

RECORD_BLOCK: Final = 256 << 10
"""Decompressed bytes split into lines at once by :func:`iter_records`."""

_NL: Final = b"\n"
_BAD_LINE: Final = "a record must end with b'\\n' and contain no other b'\\n'"

Signer = Callable[[bytes], bytes]
"""Turns the 32-byte digest into a 64-byte signature."""

_T = TypeVar("_T")


# --------------------------------------------------------------------------- writer


class BundleWriter:
    """Streams records into ``<out_dir>/<name>.partial`` and publishes it atomically.

    :meth:`finish` appends summary and footer and publishes the file (fsync, rename,
    directory fsync); :meth:`abort` removes it. A ``with`` block aborts on an exception,
    and also when left without :meth:`finish` (warning ``ResourceWarning``), as does
    garbage collection of an open writer. After an exception from any method but
    :meth:`abort` the output is unusable: abort (``with`` does). A partial file left
    under the same name by an interrupted run is replaced.

    Example::

        with BundleWriter(usb_dir, "0001.bsb", manifest, signer) as writer:
            writer.write_records(lines)
            path = writer.finish({"tables": counts})
    """

    _state = "new"  # class default so __del__ works if __init__ failed early

    def __init__(
        self,
        out_dir: Path,
        name: str,
        manifest: Mapping[str, object],
        signer: Signer,
        *,
        level: int = DEFAULT_LEVEL,
        max_volume: int | None = None,
        encrypt_to: Sequence[str] = (),
        scratch_dir: Path | None = None,
    ) -> None:
        """Create the partial file and write preamble and manifest.

        Args:
            out_dir: Existing directory to write into (e.g. on the USB drive).
            name: Final file name, without directories.
            manifest: JSON object describing the bundle (the engine defines its fields).
            signer: Called once, by :meth:`finish`, with the 32-byte digest.
            level: zstd level, 1-22 (window and hash table floors still apply).
            max_volume: Split the file into volumes of at most this many bytes
                (:mod:`bundlesync.format.volumes`); :attr:`path` is then the first volume.
            encrypt_to: age recipients; if any, the payload is encrypted to them
                (:data:`FLAG_ENCRYPTED`) and the summary records the plaintext's SHA-256.
            scratch_dir: Where the compressed plaintext waits until :meth:`finish`
                encrypts it (an unnamed temporary file: never on the output drive).

        Raises:
            ValueError: Bad ``name``, ``level`` or manifest (not a JSON object, too big).
            SyncError: The partial file cannot be created or written.
        """
        separators = ("/", os.sep, os.altsep)
        if name in {"", ".", ".."} or name.endswith(PARTIAL_SUFFIX) or any(
            sep and sep in name for sep in separators
        ):
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
        self._partial = partial_path(self._path)
        self._signer = signer
        self._hasher = hashlib.sha256()
        self._compress = compressor(level).compressobj()
        # Compression, hashing and writing run on a worker thread (zstd and hashlib release the GIL), so
        # they overlap with the caller producing the next records; see _submit.
        self._chunks: queue.Queue[bytes | None] | None = None
        self._worker: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._records = 0
        self._pending: list[bytes] = []  # single records not yet given to the compressor
        self._pending_len = 0
        self._raw_bytes = 0
        self._payload_len = 0
        self._recipients = tuple(encrypt_to)
        self._plain = hashlib.sha256()
        self._scratch: BinaryIO | None = None
        if self._recipients:
            if scratch_dir is None:
                raise ValueError("an encrypted bundle needs a scratch_dir for its plaintext")
            try:
                self._scratch = tempfile.TemporaryFile(dir=scratch_dir)
            except OSError as exc:
                raise write_error(Path(scratch_dir), exc) from exc
        try:
            self._out: AtomicFile | VolumeSetWriter = (
                VolumeSetWriter(self._path, max_volume) if max_volume else AtomicFile(self._path)
            )
        except OSError as exc:
            self._close_scratch()
            raise write_error(self._partial, exc) from exc
        self._state = "open"
        flags = FLAG_ENCRYPTED if self._recipients else 0
        try:
            self._emit(Preamble(FORMAT_VERSION, flags, len(manifest_bytes)).to_bytes() + manifest_bytes)
        except BundlesyncError:
            self._abort_quietly()
            raise

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

    def write_record(self, line: bytes) -> None:
        """Append one record: a line that ends with ``b"\\n"`` and has no other newline.

        Raises:
            ValueError: The line is malformed or longer than :data:`MAX_RECORD`.
            SyncError: Writing failed; the writer has been aborted.
        """
        self._check_open()
        if not line.endswith(_NL) or line.count(_NL) != 1:
            raise ValueError(_BAD_LINE)
        if len(line) > MAX_RECORD:
            raise ValueError(f"a record is {len(line)} bytes, over the {MAX_RECORD} limit")
        self._pending.append(line)
        self._pending_len += len(line)
        self._records += 1
        if self._pending_len >= WRITE_BUFFER:
            try:
                self._flush_pending()
            except BundlesyncError:
                self._abort_quietly()
                raise

    def write_records(self, lines: Iterable[bytes]) -> None:
        """Append many records, consumed lazily in batches of :data:`WRITE_BATCH`.

        Raises:
            ValueError: A line is malformed or too long (as for :meth:`write_record`);
                earlier batches of this call have already been written.
            SyncError: Writing failed; the writer has been aborted.
        """
        self._check_open()
        try:
            self._flush_pending()
            iterator = iter(lines)
            endswith = bytes.endswith
            while batch := list(itertools.islice(iterator, WRITE_BATCH)):
                data = b"".join(batch)
                # One newline per line, each at the end of its line.
                if data.count(_NL) != len(batch) or not all(
                    map(endswith, batch, itertools.repeat(_NL))
                ):
                    raise ValueError(_BAD_LINE)
                if len(data) > MAX_RECORD and max(map(len, batch)) > MAX_RECORD:
                    raise ValueError(f"a record is over the {MAX_RECORD} byte limit")
                self._compress_data(data)
                self._records += len(batch)
        except BundlesyncError:
            self._abort_quietly()
            raise

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
            reserved = {SUMMARY_RECORDS, SUMMARY_RAW_BYTES, SUMMARY_PLAIN_SHA256} & set(summary)
            if reserved:
                raise ValueError(f"summary keys {sorted(reserved)} are added by the writer")
            self._flush_pending()
            self._compress_data(b"", end_frame=True)
            extra: dict[str, object] = {}
            if self._scratch is not None:
                self._encrypt_scratch()
                extra[SUMMARY_PLAIN_SHA256] = self._plain.hexdigest()
            summary_bytes = canonical_json(
                {**summary, **extra, SUMMARY_RECORDS: self._records, SUMMARY_RAW_BYTES: self._raw_bytes}
            )
            if len(summary_bytes) > MAX_SUMMARY:
                raise ValueError(
                    f"summary is {len(summary_bytes)} bytes, over the {MAX_SUMMARY} limit"
                )
            self._emit(summary_bytes)
            digest = self._hasher.digest()
            signature = self._signer(digest)
            if not isinstance(signature, bytes) or len(signature) != SIGNATURE_SIZE:
                raise ValueError(f"signer must return {SIGNATURE_SIZE} bytes")
            footer = Footer(self._payload_len, len(summary_bytes), digest, signature)
            self._write(footer.to_bytes())
            try:
                self._out.sync()
            except OSError as exc:
                raise write_error(self._path, exc) from exc
            _publish(self._out)
            self._path = self._out.path  # the first volume, when split
            self._state = "finished"
        except BaseException:
            self._abort_quietly()
            raise
        return self._path

    def abort(self) -> None:
        """Close and remove the partial file. Idempotent; does nothing after finish."""
        if self._state != "open":
            return
        self._state = "aborted"
        self._stop_worker()
        self._close_scratch()
        try:
            self._out.discard()
        except OSError as exc:
            raise SyncError(
                f"could not remove the unfinished bundle {self._partial}: "
                f"{exc.strerror or exc}: delete it by hand"
            ) from exc

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

    def _abort_quietly(self) -> None:
        """Abort on an error path: the error being raised matters more than cleanup's."""
        with contextlib.suppress(SyncError):
            self.abort()

    def _close_scratch(self) -> None:
        if self._scratch is not None:
            with contextlib.suppress(OSError):
                self._scratch.close()
            self._scratch = None

    def _encrypt_scratch(self) -> None:
        """Encrypt the finished zstd frame from the scratch file into the bundle."""
        assert self._scratch is not None
        try:
            self._scratch.flush()
            self._scratch.seek(0)
        except OSError as exc:
            raise write_error(self._partial, exc) from exc

        def emit(data: bytes) -> None:
            self._payload_len += len(data)
            self._emit(data)

        encrypt_stream(self._scratch, emit, self._recipients)
        self._close_scratch()

    def _check_open(self) -> None:
        if self._state != "open":
            raise ValueError(f"BundleWriter is {self._state}; it cannot write any more")

    def _flush_pending(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending, self._pending_len = [], 0
            self._compress_data(data)

    def _compress_data(self, data: bytes, *, end_frame: bool = False) -> None:
        """Compress ``data`` (on the worker), or end the frame once everything before it is written."""
        if not end_frame:
            self._submit(data)
            return
        self._drain()
        self._compress_now(b"", end_frame=True)

    def _submit(self, data: bytes) -> None:
        """Hand ``data`` to the worker; at most two chunks wait, so memory stays bounded."""
        self._raise_failure()
        if self._worker is None:
            self._chunks = queue.Queue(maxsize=2)
            self._worker = threading.Thread(target=self._work, name="bundlesync-compress", daemon=True)
            self._worker.start()
        assert self._chunks is not None
        self._chunks.put(data)

    def _work(self) -> None:
        assert self._chunks is not None
        while (data := self._chunks.get()) is not None:
            if self._failure is None:  # after a failure, only drain until told to stop
                try:
                    self._compress_now(data)
                except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread by _raise_failure
                    self._failure = exc

    def _stop_worker(self) -> None:
        if self._worker is not None:
            assert self._chunks is not None
            self._chunks.put(None)
            self._worker.join()
            self._worker = self._chunks = None

    def _drain(self) -> None:
        """Wait until every chunk handed over is compressed and written; raise what failed meanwhile."""
        self._stop_worker()
        self._raise_failure()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure

    def _compress_now(self, data: bytes, *, end_frame: bool = False) -> None:
        try:
            if end_frame:
                out = self._compress.flush(zstd.COMPRESSOBJ_FLUSH_FINISH)
            else:
                out = self._compress.compress(data)
        except zstd.ZstdError as exc:
            raise SyncError(f"compressing the bundle failed: {exc}") from exc
        self._raw_bytes += len(data)
        if out and self._scratch is not None:
            self._plain.update(out)
            try:
                self._scratch.write(out)
            except OSError as exc:
                raise write_error(self._partial, exc) from exc
        elif out:
            self._payload_len += len(out)
            self._emit(out)

    def _emit(self, data: bytes) -> None:
        self._hasher.update(data)
        self._write(data)

    def _write(self, data: bytes) -> None:
        # No abort here: this may run on the worker; the public method that hears of it aborts.
        try:
            self._out.file.write(data)
        except OSError as exc:
            raise write_error(self._partial, exc) from exc


# --------------------------------------------------------------------------- reader


def read_info(path: Path) -> BundleInfo:
    """Read and check a bundle's preamble, manifest, summary and footer (not the payload).

    Checks: magic, version, flags, that the lengths add up to the file size exactly, the
    end marker, and that manifest and summary are canonical JSON objects with the
    summary's reserved counts present. Digest and signature are *not* checked.

    Raises:
        FormatError: The file is not a readable bundle (see message).
        BundleError: The file cannot be read at all.
    """
    path = Path(path)
    with open_read(path) as file:
        try:
            size = file.seek(0, os.SEEK_END)  # a volume set has no single fstat
            file.seek(0)
            head = file.read(PREAMBLE.size)
            if len(head) < len(MAGIC) or head[: len(MAGIC)] != MAGIC:
                raise FormatError(
                    f"{path} is empty, not a bundlesync bundle: check the file name"
                    if size == 0
                    else f"{path}: {bad_magic_message(head[: len(MAGIC)])}"
                )
            if size < PREAMBLE.size + FOOTER.size:
                raise damaged(
                    path,
                    f"is truncated ({size} bytes, a bundle has at least "
                    f"{PREAMBLE.size + FOOTER.size})",
                )
            preamble = _in(path, Preamble.from_bytes, head)
            payload_offset = PREAMBLE.size + preamble.manifest_len
            if payload_offset + FOOTER.size > size:
                missing = payload_offset + FOOTER.size - size
                raise damaged(path, f"is truncated (expected at least {missing} more bytes)")
            file.seek(size - FOOTER.size)
            tail = file.read(FOOTER.size)
            if tail[-len(END_MAGIC) :] != END_MAGIC:
                start = max(0, size - CHUNK_SIZE)
                file.seek(start)
                window = file.read(size - start)
                raise FormatError(
                    missing_end_message(path, window, start, size, preamble.manifest_len)
                )
            footer = _in(path, Footer.from_bytes, tail)
            expected = payload_offset + footer.payload_len + footer.summary_len + FOOTER.size
            if expected > size:
                raise damaged(path, f"is truncated (expected {expected - size} more bytes)")
            if expected < size:
                raise damaged(
                    path, f"has {size - expected} unexpected bytes (appended, or corrupt lengths)"
                )
            file.seek(PREAMBLE.size)
            manifest_bytes = _read_exact(file, preamble.manifest_len, path)
            file.seek(payload_offset + footer.payload_len)
            summary_bytes = _read_exact(file, footer.summary_len, path)
        except OSError as exc:
            raise read_error(path, exc) from exc
    manifest = parse_object(manifest_bytes, "manifest", path)
    summary = parse_object(summary_bytes, "summary", path)
    for key in (SUMMARY_RECORDS, SUMMARY_RAW_BYTES):
        value = summary.get(key)
        if type(value) is not int or value < 0:
            raise damaged(path, f"is damaged: its summary lacks a valid {key!r} count")
    plain = summary.get(SUMMARY_PLAIN_SHA256)
    if preamble.flags & FLAG_ENCRYPTED and not (
        isinstance(plain, str) and len(plain) == 64 and all(c in "0123456789abcdef" for c in plain)
    ):
        raise damaged(path, f"is damaged: it is encrypted but its summary lacks a valid {SUMMARY_PLAIN_SHA256!r}")
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
    """Hash the file (from :func:`read_info`, unchanged since) and compare with the footer.

    Raises:
        IntegrityError: The bytes do not match the digest.
        FormatError: The file changed size since ``info`` was read.
        BundleError: The file cannot be read.
    """
    with open_read(info.path) as file:
        try:
            check_unchanged(file, info)
            hasher = hashlib.sha256()
            hash_copy(file, info.signed_len, hasher.update, None, info.path)
        except OSError as exc:
            raise read_error(info.path, exc) from exc
    if not hmac.compare_digest(hasher.digest(), info.digest):
        raise digest_mismatch(info.path)


def iter_records(info: BundleInfo) -> Iterator[bytes]:
    """Yield each record line (with its ``b"\\n"``), decompressing with bounded memory.

    ``info`` comes from :func:`read_info`, normally after :func:`verify_digest` and the
    caller's signature check. The payload is checked as it streams: the last records are
    only yielded once the frame ended exactly at the end of the payload and the counts
    equal the summary's, so an error can still arrive after earlier records: apply them
    in one transaction.

    Raises:
        FormatError: Corrupt or incomplete frame, bytes after it, a partial last line,
            or counts that differ from the summary.
        BundleError: The file cannot be read.
    """
    for batch in iter_line_blocks(info, RECORD_BLOCK):
        yield from batch


def iter_record_batches(info: BundleInfo, max_bytes: int = 4 << 20) -> Iterator[list[bytes]]:
    """Like :func:`iter_records`, but yield lists of lines of about ``max_bytes`` bytes.

    The fast path for import: each batch is split from one large block of decompressed
    data by a C-level splitter. A batch may exceed ``max_bytes`` by up to one
    decompressor output and one record.

    Raises:
        FormatError, BundleError: As for :func:`iter_records`.
        ValueError: ``max_bytes`` is not positive.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    return iter_line_blocks(info, max_bytes)


def copy_verified(src: Path, dst: Path) -> BundleInfo:
    """Copy a bundle while hashing it in the same pass; publish ``dst`` only if valid.

    Returns ``read_info(dst)``, its digest verified against the bytes copied. On any
    failure neither ``dst`` nor ``<dst>.partial`` is left.

    Raises:
        FormatError: ``src`` is not a valid bundle or changed while being copied.
        IntegrityError: The copied bytes do not match the digest.
        BundleError: ``src`` cannot be read.
        SyncError: ``dst`` cannot be written.
    """
    src, dst = Path(src), Path(dst)
    src_info = read_info(src)
    hasher = hashlib.sha256()
    with open_read(src) as fin:
        try:
            out = AtomicFile(dst)
        except OSError as exc:
            raise write_error(partial_path(dst), exc) from exc
        try:
            try:
                check_unchanged(fin, src_info)
                hash_copy(fin, src_info.signed_len, hasher.update, out.file, src)
                hash_copy(fin, FOOTER.size, None, out.file, src)
                if fin.read(1):
                    raise damaged(src, "grew while it was being copied")
            except DestinationError as exc:
                raise write_error(out.partial, exc.__cause__) from exc.__cause__
            except OSError as exc:
                raise read_error(src, exc) from exc
            try:
                out.sync()
            except OSError as exc:
                raise write_error(out.partial, exc) from exc
            info = read_info(out.partial)
            if info.size != src_info.size or not hmac.compare_digest(
                hasher.digest(), info.digest
            ):
                raise digest_mismatch(src)
            _publish(out)
        except BaseException:
            with contextlib.suppress(OSError):
                out.discard()
            raise
    return dataclasses.replace(info, path=dst)


# ------------------------------------------------------------------------ internals


def _read_exact(file: BinaryIO, count: int, path: Path) -> bytes:
    data = file.read(count)
    if len(data) != count:
        raise damaged(path, "was truncated while being read")
    return data


def _in(path: Path, parse: Callable[[bytes], _T], data: bytes) -> _T:
    """Run ``parse`` and prefix its FormatError message with the bundle path."""
    try:
        return parse(data)
    except FormatError as exc:
        raise FormatError(f"{path}: {exc}") from exc


def _publish(out: AtomicFile | VolumeSetWriter) -> None:
    """Rename a synced bundle into place and make the rename durable."""
    try:
        out.publish()
        fsync_dir(out.path.parent)
    except OSError as exc:
        raise write_error(out.path, exc) from exc


def decrypt_payload(info: BundleInfo, dst: Path, secret: str, *, shown_as: str | None = None) -> BundleInfo:
    """Decrypt an encrypted bundle's payload into ``dst``; return the info to read it by.

    ``info`` must come from a bundle whose digest (and, by the caller, signature) was
    checked. The plaintext is written to ``dst`` (mode 0600; the caller keeps it off the
    drive and deletes it) and its SHA-256 must equal the summary's: the signer signed the
    plaintext too, so a payload re-encrypted by anyone else cannot pass.

    Raises:
        TrustError: ``secret`` is not one of the recipients' keys.
        BundleError: The ciphertext is damaged.
        IntegrityError: The plaintext is not the one the signer signed.
        SyncError: ``dst`` cannot be written.
    """
    name = shown_as or info.path.name
    hasher = hashlib.sha256()
    size = 0
    try:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o600)
        out = os.fdopen(fd, "wb")
    except OSError as exc:
        raise write_error(dst, exc) from exc
    try:
        with out, open_read(info.path) as file:

            def emit(data: bytes) -> None:
                nonlocal size
                hasher.update(data)
                size += len(data)
                out.write(data)

            try:
                check_unchanged(file, info)
                file.seek(info.payload_offset)
            except OSError as exc:
                raise read_error(info.path, exc) from exc
            decrypt_stream(file, info.payload_len, emit, secret, shown_as=name)
        if not hmac.compare_digest(hasher.hexdigest(), str(info.summary.get(SUMMARY_PLAIN_SHA256))):
            raise IntegrityError(f"{name}: the decrypted payload is not the one its signer signed (re-encrypted "
                                 "or swapped); do not import it, ask the sender for a fresh export")
    except BaseException:
        dst.unlink(missing_ok=True)
        raise
    return dataclasses.replace(info, path=dst, flags=0, payload_offset=0, payload_len=size, size=size)
