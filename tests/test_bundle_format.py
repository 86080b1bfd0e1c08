"""Tests of the bundle container (bundlesync/bundle.py, docs/format.md).

Files are real files under pytest's tmp dirs. Signatures come from a deterministic
HMAC-SHA512 test signer: the container never checks signatures (its caller does),
so the tests check them themselves where the brief says "every flip is detected".
"""

from __future__ import annotations

import errno
import gc
import hashlib
import hmac
import io
import json
import os
import random
import shutil
import struct
import subprocess
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard as zstd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bundlesync.format import _payload
from bundlesync.format import container as B
from bundlesync.errors import BundleError, FormatError, IntegrityError, SyncError

KEY = b"bundlesync-test-key"
# Independent restatement of the v1 layout (docs/format.md), not the module's Structs.
PREAMBLE_FMT = ">8sHHI"
FOOTER_FMT = ">QI32s64s8s"
MAGIC = b"BSYNC\x00\r\n"
END_MAGIC = b"BSYNCEND"
SIG_START, SIG_END = -72, -8  # signature position, counted from the end of the file

LINES = [
    b'{"id":"6c1f0d7e2b8a4e1f9a3c5d7e9f1a2b3c","v":1}\n',
    b'{"id":"0b9e8d7c6b5a49382716a5b4c3d2e1f0","v":2.5,"t":"2024-03-01T10:00:00Z"}\n',
    b"\n",
    b"binary \x00\xff\r ok\n",
] * 3

# Written by BundleWriter (DEFAULT_LEVEL) when format v1 was introduced; readers of
# v1 must keep reading it whatever zstd version or level the writer uses later.
GOLDEN_V1 = bytes.fromhex(
    "4253594e43000d0a00010000000000267b22666f726d6174223a22676f6c64656e2d7631222c"
    "226e6f7465223a2268c3a96c6c6f227d28b52ffd046885010054027b226964223a22303122"
    "2c2276223a317d0a32322e357d0a0a7261770d627974657300ff0a03006010a77a9008b804"
    "bcc25c7b227061796c6f61645f7261775f6279746573223a3131312c227265636f72647322"
    "3a342c227461626c6573223a7b2274223a347d7d000000000000003d0000003609a3597f57"
    "c7611b2906400ef8facaa3650bcf98ed7b17341981effdd7dbcd703eac618b735fb0a288ca"
    "53abd183dd7d7f62b0dee462e306f1f25d52b86f320a40c465188f4bc189dd17a2b085411c"
    "c614351ee2343a956df3020a65a7e7584b4253594e43454e44"
)
# Written when the encrypted flag (0x0001) was introduced: the same four lines, encrypted
# with age to the test-only key below. Readers must keep decrypting and reading it.
GOLDEN_SECRET = "AGE-SECRET-KEY-1NZ4PR4TX38AVHATL0S9R9KPFSSEXXWXX83NEYADYFPALJ3UYUUDQJY92J2"
GOLDEN_V1_ENCRYPTED = bytes.fromhex(
    "4253594e43000d0a000100010000008e7b22656e6372797074696f6e223a7b22726563697069"
    "656e7473223a5b226167653161366e30756b34653568723267613833356172686c6538646e66"
    "61347333327535783838746865327074727277676c7a67397a71726c6b637061225d2c227363"
    "68656d65223a22616765227d2c22666f726d6174223a22676f6c64656e2d76312d656e637279"
    "70746564227d6167652d656e6372797074696f6e2e6f72672f76310a2d3e2058323535313920"
    "36496e585465654d685278477149636864315a6b376c767a33724c3944697746757356456254"
    "336d6678630a4835624341596a54387a416165345341544b4e4d2b5067783976656b61584f38"
    "33594a31616e702b4e7a770a2d3e206c5534476830742d6772656173650a37317250534d2b2f"
    "714e4f4d774852714f784f4139483373416962526369593839332b32643233394d666d457336"
    "770a2d2d2d204e734734477674426144715a7742383355677851674855527441695444467450"
    "773439355556635a5359590af028cb4744bb710774dcefed710778974a0fc31e640eaa290617"
    "aff11fd45a202d831c5c3825352a7f050a3ebcff2f58ac1fb05621f28287ebadc5b6eb4c9823"
    "07c088a5c185718c418197494b18377460101d8b5673d51686369c0fe67b227061796c6f6164"
    "5f706c61696e5f736861323536223a2239333638303636623361633666373135653465353435"
    "6166666432323164373533313233613434643462386232633033623138373339366131393834"
    "39383264222c227061796c6f61645f7261775f6279746573223a3131312c227265636f726473"
    "223a342c227461626c6573223a7b2274223a347d7d0000000000000147000000904d24527b9e"
    "5e16d991020e1e3481633c9fd69661888bd5bbafd392fb5c7a55f9a4dd7350706dd0c0dc6a25"
    "3db90811e785f18994826898081485499be0060a7c17c4761ca74ca05a58501165b69c18cbf7"
    "9efe6b0eac49c888ff91ae487600b64253594e43454e44"
)
GOLDEN_V1_LINES = [
    b'{"id":"00000000000000000000000000000001","v":1}\n',
    b'{"id":"00000000000000000000000000000002","v":2.5}\n',
    b"\n",
    b"raw\rbytes\x00\xff\n",
]


class SignatureMismatch(Exception):
    """Raised by the tests' own signature check (the caller's job, not bundle.py's)."""


def signer(digest: bytes) -> bytes:
    return hmac.new(KEY, digest, hashlib.sha512).digest()


def write_bundle(
    out_dir: Path,
    lines: list[bytes],
    manifest: dict[str, object] | None = None,
    summary: dict[str, object] | None = None,
    name: str = "t.bsb",
    batch: bool = True,
) -> Path:
    if manifest is None:
        manifest = {"kind": "test"}
    with B.BundleWriter(out_dir, name, manifest, signer) as writer:
        if batch:
            writer.write_records(lines)
        else:
            for line in lines:
                writer.write_record(line)
        assert writer.records == len(lines)
        return writer.finish({} if summary is None else summary)


def read_all(path: Path) -> tuple[B.BundleInfo, list[bytes]]:
    """Everything import does: structure, digest, signature, payload."""
    info = B.read_info(path)
    B.verify_digest(info)
    if not hmac.compare_digest(signer(info.digest), info.signature):
        raise SignatureMismatch(path)
    return info, list(B.iter_records(info))


def craft(
    path: Path,
    payload: bytes,
    summary: bytes,
    manifest: bytes = b"{}",
    version: int = 1,
    flags: int = 0,
) -> Path:
    """Build a bundle by hand, with a correct digest and signature."""
    signed = struct.pack(PREAMBLE_FMT, MAGIC, version, flags, len(manifest))
    signed += manifest + payload + summary
    digest = hashlib.sha256(signed).digest()
    footer = struct.pack(FOOTER_FMT, len(payload), len(summary), digest, signer(digest), END_MAGIC)
    path.write_bytes(signed + footer)
    return path


def frame(data: bytes, level: int = 3) -> bytes:
    return zstd.ZstdCompressor(level=level, write_checksum=True).compress(data)


def summary_for(lines: list[bytes]) -> bytes:
    return B.canonical_json({"payload_raw_bytes": sum(map(len, lines)), "records": len(lines)})


def format_error(path: Path) -> FormatError:
    with pytest.raises(FormatError) as caught:
        read_all(path)
    message = str(caught.value)
    assert "\n" not in message and ": " in message
    return caught.value


# ---------------------------------------------------------------------------- round trip

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
record_lines = st.lists(
    st.binary(max_size=80).map(lambda b: b.replace(b"\n", b"") + b"\n"), max_size=60
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lines=record_lines,
    manifest=st.dictionaries(st.text(max_size=10), json_values, max_size=5),
    summary=st.dictionaries(
        st.text(max_size=10).filter(lambda k: k not in {"records", "payload_raw_bytes"}),
        json_values,
        max_size=5,
    ),
    batch=st.booleans(),
    max_bytes=st.integers(min_value=1, max_value=300),
)
def test_round_trip(
    tmp_path_factory: pytest.TempPathFactory,
    lines: list[bytes],
    manifest: dict[str, object],
    summary: dict[str, object],
    batch: bool,
    max_bytes: int,
) -> None:
    out = tmp_path_factory.mktemp("rt")
    path = write_bundle(out, lines, manifest, summary, batch=batch)
    assert os.listdir(out) == ["t.bsb"]
    info, got = read_all(path)
    assert got == lines
    assert info.manifest == manifest
    raw = sum(map(len, lines))
    assert info.summary == {**summary, "records": len(lines), "payload_raw_bytes": raw}
    assert (info.records, info.payload_raw_bytes) == (len(lines), raw)
    batches = list(B.iter_record_batches(info, max_bytes=max_bytes))
    assert all(batches) and [line for b in batches for line in b] == lines
    assert (info.version, info.flags, info.size) == (1, 0, path.stat().st_size)


def test_layout_matches_the_spec(tmp_path: Path) -> None:
    path = write_bundle(tmp_path, LINES, {"k": "é"}, {"tables": {"a": 1}})
    data = path.read_bytes()
    magic, version, flags, manifest_len = struct.unpack_from(PREAMBLE_FMT, data)
    assert (magic, version, flags) == (MAGIC, 1, 0)
    assert data[16 : 16 + manifest_len] == '{"k":"é"}'.encode()
    payload_len, summary_len, digest, signature, end = struct.unpack(FOOTER_FMT, data[-116:])
    assert end == END_MAGIC and 16 + manifest_len + payload_len + summary_len + 116 == len(data)
    assert digest == hashlib.sha256(data[:-116]).digest() and signature == signer(digest)
    payload = data[16 + manifest_len : 16 + manifest_len + payload_len]
    params = zstd.get_frame_parameters(payload)
    assert params.has_checksum and params.window_size <= 1 << 27
    assert zstd.ZstdDecompressor().decompress(payload, max_output_size=1 << 20) == b"".join(LINES)
    summary = json.loads(data[-116 - summary_len : -116])
    raw = len(b"".join(LINES))
    assert summary == {"tables": {"a": 1}, "records": 12, "payload_raw_bytes": raw}
    info = B.read_info(path)
    assert (info.payload_offset, info.payload_len) == (16 + manifest_len, payload_len)


def test_golden_v1_vector_still_reads(tmp_path: Path) -> None:
    path = tmp_path / "golden.bsb"
    path.write_bytes(GOLDEN_V1)
    info, got = read_all(path)
    assert got == GOLDEN_V1_LINES
    assert info.manifest == {"format": "golden-v1", "note": "héllo"}
    assert info.summary == {"tables": {"t": 4}, "records": 4, "payload_raw_bytes": 111}


def test_golden_v1_encrypted_vector_still_reads(tmp_path: Path) -> None:
    path = tmp_path / "golden-encrypted.bsb"
    path.write_bytes(GOLDEN_V1_ENCRYPTED)
    info = B.read_info(path)
    B.verify_digest(info)
    assert info.flags == B.FLAG_ENCRYPTED
    assert info.manifest["format"] == "golden-v1-encrypted"
    assert GOLDEN_V1_LINES[0] not in GOLDEN_V1_ENCRYPTED
    with pytest.raises(FormatError, match="encrypted"):
        list(B.iter_records(info))
    plain = B.decrypt_payload(info, tmp_path / "plain", GOLDEN_SECRET)
    assert list(B.iter_records(plain)) == GOLDEN_V1_LINES
    assert info.summary["tables"] == {"t": 4} and info.summary["records"] == 4


def test_empty_payload_is_valid(tmp_path: Path) -> None:
    path = write_bundle(tmp_path, [])
    info, got = read_all(path)
    assert got == [] and list(B.iter_record_batches(info)) == []
    assert info.summary == {"records": 0, "payload_raw_bytes": 0} and info.payload_len > 0


def test_single_and_batched_writes_keep_their_order(tmp_path: Path) -> None:
    with B.BundleWriter(tmp_path, "m.bsb", {}, signer) as writer:
        writer.write_record(b"1\n")
        writer.write_records(iter([b"2\n", b"3\n"]))
        writer.write_record(b"4\n")
        writer.write_record(b"5\n")
        assert writer.records == 5
        path = writer.finish({})
    info, got = read_all(path)
    assert got == [b"1\n", b"2\n", b"3\n", b"4\n", b"5\n"] and info.payload_raw_bytes == 10


def test_every_level_round_trips(tmp_path: Path) -> None:
    for level in (1, 3, 19):
        with B.BundleWriter(tmp_path, f"l{level}.bsb", {}, signer, level=level) as writer:
            writer.write_records(LINES)
            path = writer.finish({})
        assert read_all(path)[1] == LINES


def test_canonical_json() -> None:
    assert B.canonical_json({"b": [1, 2.5], "a": "é", "c": None}) == (
        '{"a":"é","b":[1,2.5],"c":null}'.encode()
    )
    for bad in ({"x": float("nan")}, {"x": object()}, {"x": "\ud800"}):
        with pytest.raises(ValueError, match="canonical JSON"):
            B.canonical_json(bad)


# -------------------------------------------------------------------- damage detection


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    out = tmp_path_factory.mktemp("small")
    return write_bundle(out, LINES, {"m": [1, "two"]}, {"tables": {"x": 12}}).read_bytes()


def assert_flip_detected(path: Path, data: bytes, offset: int, xor: int) -> None:
    damaged = bytearray(data)
    damaged[offset] ^= xor
    path.write_bytes(damaged)
    if len(data) + SIG_START <= offset < len(data) + SIG_END:
        # The signature is not covered by the digest: the caller's check catches it.
        info = B.read_info(path)
        B.verify_digest(info)
        assert list(B.iter_records(info)) == LINES
        with pytest.raises(SignatureMismatch):
            read_all(path)
    else:
        with pytest.raises((FormatError, IntegrityError)) as caught:
            read_all(path)
        assert "\n" not in str(caught.value)


def test_every_single_byte_flip_is_detected(small_bundle: bytes, tmp_path: Path) -> None:
    path = tmp_path / "flipped.bsb"
    for offset in range(len(small_bundle)):
        for xor in (0x01, 0x80, 0xFF):
            assert_flip_detected(path, small_bundle, offset, xor)


@settings(max_examples=200, deadline=None)
@given(position=st.floats(min_value=0, max_value=1, exclude_max=True), xor=st.integers(1, 255))
def test_random_byte_flip_is_detected(
    small_bundle: bytes, tmp_path_factory: pytest.TempPathFactory, position: float, xor: int
) -> None:
    path = tmp_path_factory.getbasetemp() / "random-flip.bsb"
    assert_flip_detected(path, small_bundle, int(position * len(small_bundle)), xor)


def test_every_truncation_is_detected(small_bundle: bytes, tmp_path: Path) -> None:
    path = tmp_path / "cut.bsb"
    for length in range(len(small_bundle)):
        path.write_bytes(small_bundle[:length])
        with pytest.raises(FormatError) as caught:
            B.read_info(path)
        message = str(caught.value)
        assert "\n" not in message
        if length >= len(MAGIC):
            assert "truncated" in message and "copy it again" in message, (length, message)


@pytest.mark.parametrize(
    "extra",
    [b"\x00", b"x" * 1000, END_MAGIC, b"\0" * 108 + END_MAGIC, None],
    ids=["one-byte", "1000-bytes", "end-magic", "fake-footer", "second-bundle"],
)
def test_appended_bytes_are_detected(
    small_bundle: bytes, tmp_path: Path, extra: bytes | None
) -> None:
    path = tmp_path / "long.bsb"
    path.write_bytes(small_bundle + (small_bundle if extra is None else extra))
    error = format_error(path)
    if extra is None or len(extra) in (1, 1000):
        assert "unexpected bytes" in str(error)


def test_one_appended_byte_message(small_bundle: bytes, tmp_path: Path) -> None:
    path = tmp_path / "long.bsb"
    path.write_bytes(small_bundle + b"\n")
    assert "has 1 unexpected bytes after its end marker" in str(format_error(path))


def test_wrong_magic(small_bundle: bytes, tmp_path: Path) -> None:
    path = tmp_path / "x.bsb"
    path.write_bytes(b"XSYNC" + small_bundle[5:])
    assert "not a bundlesync bundle" in str(format_error(path))


def test_text_mode_copy_is_recognised(small_bundle: bytes, tmp_path: Path) -> None:
    path = tmp_path / "x.bsb"
    path.write_bytes(small_bundle.replace(b"\r\n", b"\n"))
    assert "text mode" in str(format_error(path))


@pytest.mark.parametrize(
    ("version", "flags", "expected"),
    [
        (2, 0, "format version 2 is not supported (this bundlesync reads version 1): upgrade"),
        (0, 0, "format version 0 is not supported"),
        (1, 2, "unknown feature flags 0x0002: upgrade bundlesync"),
        (1, 0x8000, "unknown feature flags 0x8000"),
    ],
)
def test_unknown_version_or_flags(
    tmp_path: Path, version: int, flags: int, expected: str
) -> None:
    path = craft(
        tmp_path / "v.bsb", frame(LINES[0]), summary_for(LINES[:1]), version=version, flags=flags
    )
    assert expected in str(format_error(path))


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"0123456789",
        b"hello, this is a text file\n" * 20,
        random.Random(4096).randbytes(4096),
        MAGIC,
        frame(b"x" * 500),
    ],
    ids=["empty", "10-bytes", "text", "random", "magic-only", "bare-zstd"],
)
def test_not_a_bundle(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "not.bsb"
    path.write_bytes(content)
    message = str(format_error(path))
    assert any(word in message for word in ("not a bundlesync bundle", "empty", "truncated"))


def test_missing_file_is_a_bundle_error(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="cannot read bundle .*: check the path"):
        B.read_info(tmp_path / "nope.bsb")


# ------------------------------------------------------- payload rules (crafted bundles)


def test_bytes_after_the_frame_are_detected(tmp_path: Path) -> None:
    path = craft(tmp_path / "p.bsb", frame(b"a\n") + b"junk", summary_for([b"a\n"]))
    assert "4 bytes follow the end of the compressed data" in str(format_error(path))


def test_every_byte_after_the_frame_is_counted_across_slices_and_chunks(tmp_path: Path) -> None:
    """Junk longer than a decompression slice and a read chunk: the count adds all three parts."""
    junk = b"j" * ((1 << 20) + 3000)
    path = craft(tmp_path / "p.bsb", frame(b"a\n") + junk, summary_for([b"a\n"]))
    assert f"bundle {path} payload is corrupt ({len(junk)} bytes follow the end of the compressed data)" in str(
        format_error(path))


def test_a_payload_that_is_not_zstd_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = craft(tmp_path / "p.bsb", b"a\n", summary_for([b"a\n"]))
    assert str(format_error(path)).startswith(f"bundle {path} payload is not a zstd frame: ")


def test_two_frames_are_rejected(tmp_path: Path) -> None:
    path = craft(tmp_path / "p.bsb", frame(b"a\n") + frame(b"b\n"), summary_for([b"a\n", b"b\n"]))
    assert "follow the end of the compressed data" in str(format_error(path))


def test_incomplete_frame_is_detected(tmp_path: Path) -> None:
    data = b"".join(LINES) * 50
    payload = frame(data)
    for cut in (len(payload) - 1, len(payload) // 2, 12):
        path = craft(tmp_path / "p.bsb", payload[:cut], summary_for(LINES * 50))
        assert "payload is corrupt" in str(format_error(path))


def test_empty_payload_region_is_rejected(tmp_path: Path) -> None:
    path = craft(tmp_path / "p.bsb", b"", summary_for([]))
    assert "payload is" in str(format_error(path))


def test_frame_without_checksum_is_rejected(tmp_path: Path) -> None:
    payload = zstd.ZstdCompressor(write_checksum=False).compress(b"a\n")
    path = craft(tmp_path / "p.bsb", payload, summary_for([b"a\n"]))
    assert str(format_error(path)).startswith(
        f"bundle {path} payload lacks a content checksum or needs a dictionary: ")


def test_frame_needing_an_oversized_window_is_rejected(tmp_path: Path) -> None:
    """A frame that asks for a window over the reader's limit is refused before decompression."""
    params = zstd.ZstdCompressionParameters(window_log=28, write_checksum=1, write_content_size=0)
    stream = zstd.ZstdCompressor(compression_params=params).compressobj()
    payload = stream.compress(b"a\n") + stream.flush()
    assert zstd.get_frame_parameters(payload).window_size == 1 << 28
    path = craft(tmp_path / "p.bsb", payload, summary_for([b"a\n"]))
    message = str(format_error(path))
    assert f"needs a {1 << 28} byte window, over the {1 << 27} limit" in message
    # A frame at the limit itself is read.
    params = zstd.ZstdCompressionParameters(window_log=27, write_checksum=1, write_content_size=0)
    stream = zstd.ZstdCompressor(compression_params=params).compressobj()
    at_limit = craft(tmp_path / "q.bsb", stream.compress(b"a\n") + stream.flush(), summary_for([b"a\n"]))
    assert read_all(at_limit)[1] == [b"a\n"]


def test_frame_needing_a_dictionary_is_rejected(tmp_path: Path) -> None:
    """A frame compressed against a dictionary cannot be read by anyone without it: refused."""
    samples = [f'{{"id":"{i:032x}","v":{i * 7 % 13},"name":"learner {i % 17}"}}\n'.encode() for i in range(2000)]
    dictionary = zstd.train_dictionary(2048, list[bytes | bytearray | memoryview](samples))
    payload = zstd.ZstdCompressor(dict_data=dictionary, write_checksum=True).compress(samples[0])
    assert zstd.get_frame_parameters(payload).dict_id == dictionary.dict_id() != 0
    path = craft(tmp_path / "p.bsb", payload, summary_for(samples[:1]))
    assert "needs a dictionary" in str(format_error(path))


@pytest.mark.parametrize(
    ("records", "raw", "expected"),
    [
        (3, 4, "holds 2 records but its summary says 3"),
        (2, 5, "decompresses to 4 bytes but its summary says 5"),
        (2, 3, "decompresses to more than the 3 bytes its summary says"),
    ],
)
def test_counts_must_match_the_summary(
    tmp_path: Path, records: int, raw: int, expected: str
) -> None:
    summary = B.canonical_json({"payload_raw_bytes": raw, "records": records})
    path = craft(tmp_path / "p.bsb", frame(b"a\nb\n"), summary)
    assert expected in str(format_error(path))


def test_payload_must_end_with_a_newline(tmp_path: Path) -> None:
    path = craft(tmp_path / "p.bsb", frame(b"a\nb"), summary_for([b"a\n", b"b"]))
    assert "middle of a record" in str(format_error(path))


def test_decompression_stops_at_the_announced_size(tmp_path: Path) -> None:
    bomb = frame(b"\n" * (64 << 20), level=19)  # 64 MiB of empty records in ~2 KiB
    path = craft(tmp_path / "bomb.bsb", bomb, summary_for([b"\n"]))
    tracemalloc.start()
    try:
        error = format_error(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert f"bundle {path} payload is corrupt (it decompresses to more than the 1 bytes its summary says)" in str(error)
    assert peak < 40 << 20


@pytest.mark.parametrize(
    ("manifest", "summary", "expected"),
    [
        (b'{"a": 1}', None, "manifest is not valid canonical JSON (not in canonical form)"),
        (b"[1,2]", None, "manifest is not valid canonical JSON (not an object)"),
        (b'{"a":NaN}', None, "manifest is not valid canonical JSON"),
        (b'{"a":1,"a":1}', None, "not in canonical form"),
        (b"\xff", None, "manifest is not valid canonical JSON"),
        (b"[" * 100000, None, "manifest is not valid canonical JSON"),
        (b"{}", b'{"records":1}', "summary lacks a valid 'payload_raw_bytes' count"),
        (b"{}", b'{"payload_raw_bytes":2,"records":true}', "summary lacks a valid 'records'"),
        (b"{}", b'{"payload_raw_bytes":2,"records":-1}', "summary lacks a valid 'records'"),
    ],
)
def test_bad_json_is_a_format_error(
    tmp_path: Path, manifest: bytes, summary: bytes | None, expected: str
) -> None:
    summary = summary or summary_for([b"a\n"])
    path = craft(tmp_path / "j.bsb", frame(b"a\n"), summary, manifest=manifest)
    assert expected in str(format_error(path))


def test_file_changed_after_read_info(small_bundle: bytes, tmp_path: Path) -> None:
    path = tmp_path / "c.bsb"
    path.write_bytes(small_bundle)
    info = B.read_info(path)
    path.write_bytes(small_bundle + b"x")
    with pytest.raises(FormatError, match="changed size"):
        B.verify_digest(info)
    with pytest.raises(FormatError, match="changed size"):
        list(B.iter_records(info))


# ------------------------------------------------------------------------------- writer


def test_abort_leaves_nothing(tmp_path: Path) -> None:
    writer = B.BundleWriter(tmp_path, "a.bsb", {}, signer)
    writer.write_records(LINES)
    assert os.listdir(tmp_path) == ["a.bsb.partial"]
    writer.abort()
    writer.abort()  # idempotent
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="aborted"):
        writer.write_record(b"x\n")


def test_exception_inside_with_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with B.BundleWriter(tmp_path, "a.bsb", {}, signer) as writer:
            writer.write_records(LINES)
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_leaving_with_without_finish_warns_and_cleans_up(tmp_path: Path) -> None:
    with pytest.warns(ResourceWarning, match="without finish"):
        with B.BundleWriter(tmp_path, "a.bsb", {}, signer) as writer:
            writer.write_record(b"x\n")
    assert os.listdir(tmp_path) == []


def test_abandoned_writer_warns_and_cleans_up(tmp_path: Path) -> None:
    writer = B.BundleWriter(tmp_path, "a.bsb", {}, signer)
    with pytest.warns(ResourceWarning, match="never finished or aborted"):
        del writer
        gc.collect()
    assert os.listdir(tmp_path) == []


def test_failed_finish_leaves_nothing(tmp_path: Path) -> None:
    with B.BundleWriter(tmp_path, "a.bsb", {}, lambda digest: b"short") as writer:
        writer.write_records(LINES)
        with pytest.raises(ValueError, match="signer must return 64 bytes"):
            writer.finish({})
    assert os.listdir(tmp_path) == []


def test_stale_partial_is_overwritten(tmp_path: Path) -> None:
    (tmp_path / "t.bsb.partial").write_bytes(b"left over from a crash")
    path = write_bundle(tmp_path, LINES)
    assert os.listdir(tmp_path) == ["t.bsb"] and read_all(path)[1] == LINES


@pytest.mark.parametrize("line", [b"no newline", b"two\nlines\n", b"", b"\n\n"])
def test_bad_lines_are_refused(tmp_path: Path, line: bytes) -> None:
    with B.BundleWriter(tmp_path, "a.bsb", {}, signer) as writer:
        with pytest.raises(ValueError, match="must end with"):
            writer.write_record(line)
        with pytest.raises(ValueError, match="must end with"):
            writer.write_records([b"ok\n", line, b"ok\n"])
        writer.abort()


@pytest.mark.parametrize(
    ("name", "manifest", "level", "expected"),
    [
        ("a/b.bsb", {}, 1, "plain file name"),
        ("..", {}, 1, "plain file name"),
        ("x.partial", {}, 1, "plain file name"),
        ("a.bsb", {}, 0, "level must be"),
        ("a.bsb", {"x": float("inf")}, 1, "canonical JSON"),
        ("a.bsb", ["not", "a", "mapping"], 1, "must be a mapping"),
    ],
)
def test_bad_writer_arguments(
    tmp_path: Path, name: str, manifest: Any, level: int, expected: str
) -> None:
    with pytest.raises(ValueError, match=expected):
        B.BundleWriter(tmp_path, name, manifest, signer, level=level)
    assert os.listdir(tmp_path) == []


def test_reserved_summary_keys_are_refused(tmp_path: Path) -> None:
    with B.BundleWriter(tmp_path, "a.bsb", {}, signer) as writer:
        with pytest.raises(ValueError, match="added by the writer"):
            writer.finish({"records": 5})
    assert os.listdir(tmp_path) == []


def test_unwritable_directory_is_a_sync_error(tmp_path: Path) -> None:
    with pytest.raises(SyncError, match="cannot write .*: check that the drive"):
        B.BundleWriter(tmp_path / "missing", "a.bsb", {}, signer)


# ------------------------------------------------------------------------ copy_verified


def test_copy_verified(small_bundle: bytes, tmp_path: Path) -> None:
    src = tmp_path / "usb" / "b.bsb"
    src.parent.mkdir()
    src.write_bytes(small_bundle)
    dst = tmp_path / "inbox" / "b.bsb"
    dst.parent.mkdir()
    info = B.copy_verified(src, dst)
    assert info.path == dst and dst.read_bytes() == small_bundle
    assert info == B.read_info(dst)
    assert os.listdir(dst.parent) == ["b.bsb"]


@pytest.mark.parametrize(
    ("damage", "error"),
    [
        (lambda d: d[:200] + bytes([d[200] ^ 1]) + d[201:], IntegrityError),
        (lambda d: d[:-1], FormatError),
    ],
    ids=["flipped", "truncated"],
)
def test_copy_verified_publishes_nothing_on_failure(
    small_bundle: bytes, tmp_path: Path, damage: object, error: type[Exception]
) -> None:
    src = tmp_path / "b.bsb"
    src.write_bytes(damage(small_bundle))  # type: ignore[operator]
    out = tmp_path / "inbox"
    out.mkdir()
    with pytest.raises(error):
        B.copy_verified(src, out / "b.bsb")
    assert os.listdir(out) == []


# ----------------------------------------------------------------------- memory, tools


def many_lines(count: int, *, note: int = 0) -> Iterator[bytes]:
    """Record-like lines of about 95 bytes, plus a ``note`` of that many bytes (hex of the line number, repeated)."""
    for i in range(count):
        pad = (b"%032x" % i * (note // 32 + 1))[:note]
        yield b'{"id":"%032x","n":%d,"ts":"2024-01-01T00:00:%02dZ","p":0.%06d,"note":"%s"}\n' % (
            i * 2654435761,
            i,
            i % 60,
            i % 999983,
            pad,
        )


def test_streaming_does_not_materialise_records(tmp_path: Path) -> None:
    count = 180_000  # lines of about 330 bytes (59 MB): the size that matters, in fewer Python iterations
    tracemalloc.start()
    try:
        with B.BundleWriter(tmp_path, "big.bsb", {}, signer) as writer:
            writer.write_records(many_lines(count, note=220))
            path = writer.finish({})
        write_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        info = B.read_info(path)
        assert info.payload_raw_bytes > 40 << 20  # materialising would cost > 60 MB
        seen = sum(1 for _ in B.iter_records(info))
        records_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        in_batches = sum(len(batch) for batch in B.iter_record_batches(info))
        batches_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seen == in_batches == count
    assert max(write_peak, records_peak, batches_peak) < 50 << 20, (
        write_peak,
        records_peak,
        batches_peak,
    )


@pytest.mark.skipif(
    shutil.which("zstd") is None or shutil.which("dd") is None, reason="needs zstd and dd CLIs"
)
def test_payload_decompresses_with_the_zstd_cli(tmp_path: Path) -> None:
    path = write_bundle(tmp_path, LINES * 100)
    info = B.read_info(path)
    script = (
        f'dd if="{path}" bs=1M iflag=skip_bytes,count_bytes skip={info.payload_offset} '
        f"count={info.payload_len} status=none | zstd -d -c"
    )
    result = subprocess.run(["sh", "-c", script], capture_output=True, check=True)
    assert result.stdout == b"".join(LINES * 100)


def test_line_batches_stay_within_their_line_bound_without_shrinking_needlessly(tmp_path: Path) -> None:
    """Tiny lines, then long ones, then tiny again: every batch holds at most ``max_lines`` lines."""
    from bundlesync.format._payload import iter_line_blocks

    lines = [b"a\n"] * 30_000 + [b"x" * 3000 + b"\n"] * 200 + [b"bb\n"] * 30_000
    path = craft(tmp_path / "p.bsb", frame(b"".join(lines)), summary_for(lines))
    info = B.read_info(path)
    batches = list(iter_line_blocks(info, 1 << 16, max_lines=500))
    assert [line for batch in batches for line in batch] == lines
    # readlines() ends a batch with the line that crosses its byte window: at most one line over.
    assert max(len(batch) for batch in batches) <= 501
    # Tiny lines fill their batches: about 60,200 / 500 batches, not many more.
    assert len(batches) <= 2 * (len(lines) // 500 + 1) + 20


@pytest.mark.parametrize("over", [0, 1])
def test_a_complete_record_over_the_limit_inside_a_block_is_refused(tmp_path: Path, over: int) -> None:
    """A record of exactly MAX_RECORD bytes (newline included) is read; one byte more is refused."""
    from bundlesync.format._frames import MAX_RECORD

    # Random hex, so that the payload stays within the expansion a bundle may announce.
    big = random.Random(over).randbytes(MAX_RECORD // 2).hex().encode()[: MAX_RECORD - 1 + over]
    lines = [b"a\n", big.ljust(MAX_RECORD - 1 + over, b"0") + b"\n", b"b\n"]
    path = craft(tmp_path / "p.bsb", frame(b"".join(lines), level=1), summary_for(lines))
    if over:
        assert str(format_error(path)).startswith(f"bundle {path} has a record over the {MAX_RECORD} byte limit: ")
    else:
        assert [len(line) for line in read_all(path)[1]] == [2, MAX_RECORD, 2]


def test_a_file_cut_short_while_it_is_read_is_a_clear_format_error(tmp_path: Path) -> None:
    """The size is checked before reading; a file truncated after that is caught by the reader."""
    from bundlesync.format._payload import iter_payload

    lines = [random.Random(i).randbytes(3000).hex().encode() + b"\n" for i in range(600)]  # ~3.6 MB, incompressible
    path = craft(tmp_path / "p.bsb", frame(b"".join(lines), level=1), summary_for(lines))
    info = B.read_info(path)
    pieces = iter_payload(info)
    next(pieces)
    with open(path, "r+b") as file:
        file.truncate(info.payload_offset + (1 << 20) + 10)  # the first chunk was read whole, the next is cut
    with pytest.raises(FormatError) as caught:
        for _ in pieces:
            pass
    assert str(caught.value).startswith(f"bundle {path} was truncated while being read: ")


def test_an_empty_file_and_a_short_file_get_their_own_messages(tmp_path: Path) -> None:
    empty = tmp_path / "empty.bsb"
    empty.write_bytes(b"")
    with pytest.raises(FormatError) as caught:
        B.read_info(empty)
    assert str(caught.value) == f"{empty} is empty, not a bundlesync bundle: check the file name"
    one = tmp_path / "one.bsb"
    one.write_bytes(b"x")
    with pytest.raises(FormatError) as caught:
        B.read_info(one)
    assert "is empty" not in str(caught.value)
    least = struct.calcsize(PREAMBLE_FMT) + struct.calcsize(FOOTER_FMT)
    short = tmp_path / "short.bsb"
    short.write_bytes(struct.pack(PREAMBLE_FMT, MAGIC, 1, 0, 0).ljust(least - 1, b"\0"))
    assert str(format_error(short)).startswith(
        f"bundle {short} is truncated ({least - 1} bytes, a bundle has at least {least}): ")
    exact = tmp_path / "exact.bsb"  # long enough for the preamble and the footer: refused further on
    exact.write_bytes(struct.pack(PREAMBLE_FMT, MAGIC, 1, 0, 0).ljust(least, b"\0"))
    assert "bytes, a bundle has at least" not in str(format_error(exact))


def test_a_manifest_longer_than_the_file_says_how_many_bytes_are_missing(tmp_path: Path) -> None:
    least = struct.calcsize(PREAMBLE_FMT) + struct.calcsize(FOOTER_FMT)
    cut = tmp_path / "cut.bsb"
    cut.write_bytes(struct.pack(PREAMBLE_FMT, MAGIC, 1, 0, 500).ljust(least + 100, b"\0"))
    assert str(format_error(cut)).startswith(f"bundle {cut} is truncated (expected at least 400 more bytes): ")
    fits = tmp_path / "fits.bsb"  # the manifest and the footer exactly fill the file: not truncated
    fits.write_bytes(struct.pack(PREAMBLE_FMT, MAGIC, 1, 0, 100).ljust(least + 100, b"\0"))
    assert "more bytes" not in str(format_error(fits)) and "end marker is missing" in str(format_error(fits))


def test_every_damaged_layout_is_named_with_its_file_and_byte_count(tmp_path: Path) -> None:
    """Each way the lengths can disagree gets its own message, naming the file and the count."""
    good = craft(tmp_path / "good.bsb", frame(LINES[0]), summary_for(LINES[:1])).read_bytes()
    footer_size = struct.calcsize(FOOTER_FMT)
    body, footer = good[:-footer_size], good[-footer_size:]

    def message(name: str, data: bytes) -> str:
        path = tmp_path / name
        path.write_bytes(data)
        return str(format_error(path))

    short = tmp_path / "short-summary.bsb"  # three bytes gone before an intact footer
    assert message(short.name, body[:-3] + footer).startswith(
        f"bundle {short} is truncated (expected 3 more bytes): ")
    padded = tmp_path / "padded.bsb"  # five bytes slipped in before an intact footer
    assert message(padded.name, body + b"\0" * 5 + footer).startswith(
        f"bundle {padded} has 5 unexpected bytes (appended, or corrupt lengths): ")
    no_end = tmp_path / "no-end.bsb"
    assert message(no_end.name, good[:-1]).startswith(
        f"bundle {no_end} is truncated or damaged (its end marker is missing): ")
    huge = tmp_path / "huge-summary.bsb"
    lengths = struct.calcsize(">QI")  # the footer's payload and summary lengths come first
    oversized = struct.pack(">QI", len(frame(LINES[0])), B.MAX_SUMMARY + 1) + footer[lengths:]
    assert message(huge.name, body + oversized).startswith(f"{huge}: ")
    newer = craft(tmp_path / "newer.bsb", frame(LINES[0]), summary_for(LINES[:1]), version=2)
    assert str(format_error(newer)).startswith(f"{newer}: ")
    bad_manifest = craft(tmp_path / "bad-manifest.bsb", frame(LINES[0]), summary_for(LINES[:1]), manifest=b"{")
    assert str(format_error(bad_manifest)).startswith(f"bundle {bad_manifest} manifest is not valid canonical JSON")
    bad_summary = craft(tmp_path / "bad-summary.bsb", frame(LINES[0]), b"[]")
    assert str(format_error(bad_summary)).startswith(f"bundle {bad_summary} summary is not")
    no_count = craft(tmp_path / "no-count.bsb", frame(LINES[0]), b'{"records":1}')
    assert str(format_error(no_count)).startswith(
        f"bundle {no_count} is damaged: its summary lacks a valid 'payload_raw_bytes' count: ")
    for name, plain in (("no-plain", None), ("upper-plain", "A" * 64), ("x-plain", "X" * 64), ("short-plain", "a" * 63)):
        summary = {"payload_raw_bytes": 1, "records": 1, **({} if plain is None else {"payload_plain_sha256": plain})}
        sealed = craft(tmp_path / f"{name}.bsb", b"age", B.canonical_json(summary), flags=1)
        assert str(format_error(sealed)).startswith(
            f"bundle {sealed} is damaged: it is encrypted but its summary lacks a valid 'payload_plain_sha256': ")
    least = struct.calcsize(PREAMBLE_FMT) + footer_size
    one_short = tmp_path / "one-short.bsb"  # the manifest and the footer need one byte more
    assert message(one_short.name, struct.pack(PREAMBLE_FMT, MAGIC, 1, 0, 101).ljust(least + 100, b"\0")).startswith(
        f"bundle {one_short} is truncated (expected at least 1 more bytes): ")


def test_a_digest_mismatch_names_the_file(tmp_path: Path) -> None:
    path = craft(tmp_path / "flipped.bsb", frame(LINES[0]), summary_for(LINES[:1]))
    data = bytearray(path.read_bytes())
    data[struct.calcsize(PREAMBLE_FMT) + len(b"{}") + 5] ^= 1  # inside the payload: read_info passes
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as caught:
        B.verify_digest(B.read_info(path))
    assert str(caught.value).startswith(f"bundle {path} does not match its digest: ")


class FailingDrive(io.BufferedReader):
    """A bundle file on a drive whose byte ``at`` cannot be read: a read that reaches it fails (EIO)
    or, with ``short``, ends just before it."""

    def __init__(self, path: Path, at: int, *, short: bool) -> None:
        super().__init__(io.FileIO(path, "rb"))
        self.at, self.short = at, short

    def _allowed(self, count: int) -> int:
        here = self.tell()
        if here <= self.at and (count < 0 or here + count > self.at):
            if not self.short:
                raise OSError(errno.EIO, "Input/output error")
            return self.at - here
        return count

    def read(self, size: int | None = -1) -> bytes:
        allowed = self._allowed(-1 if size is None else size)
        return super().read(allowed) if allowed else b""

    def readinto(self, buffer: Any) -> int:
        allowed = self._allowed(len(buffer))
        return super().readinto(memoryview(buffer)[:allowed]) if allowed else 0


@pytest.mark.parametrize("short", [False, True], ids=["io-error", "short-read"])
@pytest.mark.parametrize("where", ["manifest", "summary", "digest", "records", "copy"])
def test_a_drive_failing_in_the_middle_of_a_read_gives_one_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, short: bool
) -> None:
    """A USB drive that fails mid-read: an I/O error or a read that comes back empty, never a traceback,
    and a copy publishes nothing."""
    path = craft(tmp_path / "b.bsb", frame(LINES[0] * 50), summary_for(LINES[:1] * 50), manifest=b'{"a":1}')
    info = B.read_info(path)
    at = {"manifest": struct.calcsize(PREAMBLE_FMT) + 2, "summary": info.payload_offset + info.payload_len + 2}.get(
        where, info.payload_offset + 10)
    for module in (B, _payload):
        monkeypatch.setattr(module, "open_read", lambda p: FailingDrive(p, at, short=short))
    out = tmp_path / "inbox"
    out.mkdir()
    with pytest.raises(BundleError) as caught:
        if where == "digest":
            B.verify_digest(info)
        elif where == "records":
            for _ in B.iter_records(info):
                pass
        elif where == "copy":
            B.copy_verified(path, out / "b.bsb")
        else:
            B.read_info(path)
    message = str(caught.value)
    assert os.listdir(out) == []
    if short:
        assert type(caught.value) is FormatError
        assert message.startswith(f"bundle {path} was truncated while being read: "), message
    else:
        assert type(caught.value) is BundleError
        assert message == (f"cannot read bundle {path}: Input/output error: check the path and that the drive "
                           "is still connected"), message
