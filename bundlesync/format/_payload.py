"""The bulk bytes of a bundle: zstd settings, bounded decompression, line splitting, hashing.

Private to :mod:`bundlesync.format.container`. Reading never trusts the file: the frame must carry a
content checksum and need at most a 2^MAX_WINDOW_LOG window, each decompressor call is fed
little enough input that its output stays bounded, and the output may never exceed the
size the summary announces (so a decompression bomb stops at once). The last batch of
lines is only released after every end-of-payload check passed.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, Final

import zstandard as zstd

from bundlesync.format._frames import (
    AGAIN,
    CHUNK_SIZE,
    EXPANSION_ALLOWANCE,
    FLAG_ENCRYPTED,
    MAX_BATCH_LINES,
    MAX_EXPANSION,
    MAX_RECORD,
    MAX_RECORDS,
    MAX_WINDOW_LOG,
    BundleInfo,
    damaged,
    read_error,
)
from bundlesync.errors import FormatError
from bundlesync.format.volumes import open_joined

__all__ = [
    "DEFAULT_LEVEL",
    "DestinationError",
    "check_declared",
    "check_unchanged",
    "compressor",
    "hash_copy",
    "iter_line_blocks",
    "iter_payload",
    "open_read",
]

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
#   level 1, window_log 23, hash_log 18  14.52   1.24          580-640
#
# No stock level meets both targets (>= 300k records/s, <= 1.3x level 19): the ids
# recur at megabyte distances, beyond the 0.5-2 MiB window of the fast levels, and
# the fast levels' small hash tables forget them. A window of at least 8 MiB and a
# hash table of at least 2^18 entries fix that for every level (LDM adds little
# here and cut decompression speed from ~1.5 GB/s to 0.2-0.8 GB/s).
#
# Against the size target of 1.2x zstd -19, measured on the bench's facility, one core, CPU
# seconds of compression per 1M records (zstd -19 -T1: 7.91 MB at 100,699 records, 83.0 MB at
# 1,000,699 records; the target is defined at 1M):
#
#   setting                                  100k      1M       CPU-s / 1M
#   level 1, window_log 23, hash_log 18      1.216x
#   level 1, window_log 24, hash_log 18      1.213x   1.197x   3.5     <- chosen
#   level 1, window_log 24, hash_log 19      1.195x   1.2005x  6.0
#   level 1, window_log 24, hash_log 20      1.191x   1.203x   7.3
#   level 1, window_log 25, hash_log 18               1.197x   3.5
#   level 1, window_log 25, hash_log 20               1.198x   7.3
#   level 1, window_log 26, hash_log 19               1.200x   4.4
#   level 2-4, window_log 23-24              1.25-1.29x
#   level 1 + ldm (window_log 23)            1.182x            ~2x level 1
#
# A larger hash table helps the small facility and not the large one; a window beyond 16 MiB
# buys nothing at 1M. Decompression of the chosen setting needs the 16 MiB window plus ~0.3 MiB.
DEFAULT_LEVEL: Final = 1
"""zstd level used by the bundle writer, with the window/hash floors below."""

MIN_WINDOW_LOG: Final = 24
"""The writer's window is at least 2^24 bytes (16 MiB), whatever the level."""

MIN_HASH_LOG: Final = 18
"""The writer's match-finder hash table has at least 2^18 entries, whatever the level."""

DECOMPRESS_SLICE: Final = 1024
"""Compressed bytes fed to the decompressor per call. zstd can expand ~32768x (RLE
blocks), so 1 KiB bounds one call's output to ~32 MiB; measured cost vs 64 KiB: none
beyond noise (1.3-1.5 GB/s either way)."""

DECOMPRESS_WRITE_SIZE: Final = 1 << 17
"""Output buffer size of the decompressor."""

_NL: Final = b"\n"


def compressor(level: int) -> zstd.ZstdCompressor:
    """The payload compressor for zstd ``level``, with this module's window/hash floors."""
    base = zstd.ZstdCompressionParameters.from_level(level)
    params = zstd.ZstdCompressionParameters.from_level(
        level,
        window_log=min(max(base.window_log, MIN_WINDOW_LOG), MAX_WINDOW_LOG),
        hash_log=max(base.hash_log, MIN_HASH_LOG),
        write_checksum=1,
        write_dict_id=0,
    )
    return zstd.ZstdCompressor(compression_params=params)


def open_read(path: Path) -> io.BufferedReader:
    """Open a bundle, or the volume set ``path`` is part of, for reading (raises BundleError)."""
    try:
        return open_joined(path)
    except OSError as exc:
        raise read_error(path, exc) from exc


def check_unchanged(file: BinaryIO, info: BundleInfo) -> None:
    """Refuse a file whose size changed since :func:`~bundlesync.format.container.read_info`."""
    here = file.tell()
    size = file.seek(0, os.SEEK_END)  # a volume set has no single fstat
    file.seek(here)
    if size != info.size:
        raise FormatError(
            f"bundle {info.path} changed size ({info.size} -> {size} bytes) since it was "
            f"inspected: {AGAIN}"
        )


def iter_payload(info: BundleInfo) -> Iterator[bytes]:
    """Decompress the payload of the bundle ``info`` describes, in bounded pieces.

    Raises:
        FormatError: Not one complete checked frame, bytes after it, or a decompressed size
            other than the summary's.
        BundleError: The file cannot be read.
    """
    if info.flags & FLAG_ENCRYPTED:
        raise FormatError(f"{info.path}: the payload is encrypted; decrypt it first (decrypt_payload)")
    with open_read(info.path) as file:
        try:
            check_unchanged(file, info)
            file.seek(info.payload_offset)
            yield from _decompress(file, info.payload_len, info.payload_raw_bytes, info.path)
        except OSError as exc:
            raise read_error(info.path, exc) from exc


def _decompress(file: BinaryIO, length: int, expected_raw: int, path: Path) -> Iterator[bytes]:
    raw = 0
    remaining = length
    first = True
    dobj = zstd.ZstdDecompressor(max_window_size=1 << MAX_WINDOW_LOG).decompressobj(
        write_size=DECOMPRESS_WRITE_SIZE
    )
    try:
        while remaining:
            chunk = file.read(min(CHUNK_SIZE, remaining))
            if not chunk:
                raise damaged(path, "was truncated while being read")
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
                        raise damaged(
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
                        raise damaged(
                            path,
                            f"payload is corrupt ({extra} bytes follow the end of "
                            f"the compressed data)",
                        )
                    break
        if not dobj.eof:
            raise damaged(path, "payload is corrupt (the compressed data is incomplete)")
    except zstd.ZstdError as exc:
        raise damaged(path, f"payload is corrupt ({exc})") from exc
    if raw != expected_raw:
        raise damaged(
            path,
            f"payload is corrupt (it decompresses to {raw} bytes but its summary says "
            f"{expected_raw})",
        )


def _check_frame_header(chunk: bytes, path: Path) -> None:
    """Require a plain zstd frame with a content checksum and a bounded window."""
    if not chunk.startswith(zstd.FRAME_HEADER):
        raise damaged(path, "payload is not a zstd frame")
    params = zstd.get_frame_parameters(chunk)
    if not params.has_checksum or params.dict_id:
        raise damaged(path, "payload lacks a content checksum or needs a dictionary")
    if params.window_size > 1 << MAX_WINDOW_LOG:
        raise FormatError(
            f"bundle {path} payload needs a {params.window_size} byte window, over the "
            f"{1 << MAX_WINDOW_LOG} limit: it was not written by bundlesync"
        )


def check_declared(info: BundleInfo) -> None:
    """Refuse, before decompressing anything, a summary that announces more than a reader does.

    Raises:
        FormatError: Over :data:`MAX_RECORDS` records, or a decompressed size over
            :data:`MAX_EXPANSION` times the compressed payload (plus a small allowance).
    """
    if info.records > MAX_RECORDS:
        raise FormatError(
            f"bundle {info.path} announces {info.records} records, over the {MAX_RECORDS} a bundle may hold: "
            "refusing it unread; ask the sender to export in smaller parts"
        )
    allowed = MAX_EXPANSION * info.payload_len + EXPANSION_ALLOWANCE
    if info.payload_raw_bytes > allowed:
        raise FormatError(
            f"bundle {info.path} announces {info.payload_raw_bytes} bytes of records from a {info.payload_len} byte "
            f"payload, over the {MAX_EXPANSION}x expansion a bundle may have (a decompression bomb?): refusing it unread"
        )


def iter_line_blocks(info: BundleInfo, block_bytes: int, max_lines: int = MAX_BATCH_LINES) -> Iterator[list[bytes]]:
    """Yield the payload's lines in lists of at most ~``block_bytes`` bytes and ``max_lines`` lines (+1).

    Memory stays bounded whatever the bundle declares: the announced sizes are checked first
    (:func:`check_declared`), the decompressed output may never exceed the announced size,
    lines are split at most ``max_lines`` at a time (one more when the last line of a list crosses
    its byte window), and the count of lines may never exceed
    the announced number of records.

    Raises:
        FormatError: As for :func:`iter_payload` and :func:`check_declared`, or a line over
            :data:`MAX_RECORD`, a partial last line, or a number of lines other than the summary's.
        BundleError: The file cannot be read.
    """
    check_declared(info)
    path = info.path
    splitter = _Splitter(block_bytes, max_lines, path)
    records = 0
    held: list[bytes] | None = None  # last batch, released only after the final checks
    for data in _blocks(info, block_bytes, splitter):
        for lines in splitter.batches(data):
            records += len(lines)
            if records > info.records:
                raise damaged(path, f"holds more records than the {info.records} its summary says")
            if held is not None:
                yield held
            held = lines
    if splitter.rest:
        raise damaged(path, "payload ends in the middle of a record")
    if records != info.records:
        raise damaged(path, f"holds {records} records but its summary says {info.records}")
    if held is not None:
        yield held


def _blocks(info: BundleInfo, block_bytes: int, splitter: _Splitter) -> Iterator[bytes]:
    """The decompressed payload in blocks of about ``block_bytes``, each led by the partial line before it.

    A block is cut only once it holds a newline (split only when it yields lines: no quadratic
    re-joins); the partial line the splitter kept from the previous block leads the next one.
    """
    pending: list[bytes] = []
    pending_len = 0
    newline_pending = False
    for piece in iter_payload(info):
        pending.append(piece)
        pending_len += len(piece)
        newline_pending = newline_pending or _NL in piece
        if not newline_pending:
            if len(splitter.rest) + pending_len > MAX_RECORD:
                raise damaged(info.path, f"has a record over the {MAX_RECORD} byte limit")
            continue
        if pending_len < block_bytes:
            continue
        yield b"".join([splitter.rest, *pending])
        pending, pending_len, newline_pending = [], 0, False
    if pending or splitter.rest:
        yield b"".join([splitter.rest, *pending])


class _Splitter:
    """Splits decompressed data into batches of whole lines, bounded by bytes and by lines.

    ``io.BytesIO.readlines(hint)`` splits in C; the hint is chosen so that a batch holds at
    most ``max_lines`` lines (``bytes.count``, also in C, tells how many a hint would take),
    and adapts from batch to batch so that short lines cost no repeated counting.
    """

    def __init__(self, max_bytes: int, max_lines: int, path: Path) -> None:
        self.max_bytes, self.max_lines, self.path = max_bytes, max_lines, path
        self.hint = max_bytes
        self.rest = b""

    def batches(self, data: bytes) -> Iterator[list[bytes]]:
        """Yield the complete lines of ``data``; afterwards :attr:`rest` holds the partial last line."""
        end = data.rfind(_NL) + 1  # complete lines end here
        rest_len = len(data) - end
        if rest_len > MAX_RECORD:
            raise damaged(self.path, f"has a record over the {MAX_RECORD} byte limit")
        reader = io.BytesIO(data)
        pos = 0
        while pos < end:
            window = min(self.hint, end - pos)
            count = data.count(_NL, pos, pos + window)
            while count > self.max_lines:
                window = max(1, window * self.max_lines // count)
                count = data.count(_NL, pos, pos + window)
            # readlines stops after the line that reaches ``window`` bytes: at most count + 1 lines,
            # all complete, since ``window`` never reaches past ``end``.
            lines = reader.readlines(window)
            size = reader.tell() - pos
            pos += size
            if size > MAX_RECORD and max(map(len, lines)) > MAX_RECORD:
                raise damaged(self.path, f"has a record over the {MAX_RECORD} byte limit")
            self.hint = min(self.max_bytes, max(window * 2, 1 << 12))
            yield lines
        self.rest = data[end:] if rest_len else b""


class DestinationError(Exception):
    """Marks an OSError raised while writing the copy (its ``__cause__``)."""


def hash_copy(
    fin: io.BufferedReader,
    count: int,
    update: Callable[[memoryview], object] | None,
    fout: BinaryIO | None,
    path: Path,
) -> None:
    """Read exactly ``count`` bytes in CHUNK_SIZE pieces, passing them to ``update`` and ``fout``.

    Raises:
        FormatError: ``fin`` ends early.
        DestinationError: Writing to ``fout`` failed.
        OSError: Reading failed.
    """
    buffer = bytearray(min(CHUNK_SIZE, max(count, 1)))
    view = memoryview(buffer)
    while count:
        n = fin.readinto(view[: min(len(buffer), count)])
        if not n:
            raise damaged(path, "was truncated while being read")
        count -= n
        if update is not None:
            update(view[:n])
        if fout is not None:
            try:
                fout.write(view[:n])
            except OSError as exc:
                raise DestinationError() from exc
