"""Decompression bombs inside validly signed bundles: refused fast, in bounded memory.

A learner device holds a real certificate, so it can sign anything. Its bundle may announce
GiBs of records from a few hundred KiB, or hold millions of tiny lines. ``verify`` and
``import`` must refuse both quickly, with a peak memory that does not grow with what the
bundle declares, and ``verify`` must never call a bundle OK that ``import`` refuses.

Peak memory is the child's ``ru_maxrss`` from ``os.wait4``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard as zstd

from conftest import ROOT, Pair, dump_tables, run_cli

from bundlesync.format import container
from bundlesync.trust.authority import issue_grant
from bundlesync.trust.crypto import SigningKey
from bundlesync.trust.enrolment import install_grant, request_certificate
from bundlesync.trust.keystore import KeyStore

BASELINE_RSS_KIB = 200 * 1024
"""Peak RSS allowed for a refusing ``verify``/``import``: Python, our imports, the decompressor's window
and a bounded batch (the old reader took ~1 GiB on the many-lines bundle)."""


@dataclass
class Learner:
    key: SigningKey
    manifest: dict[str, object]


@pytest.fixture
def learner(pair: Pair) -> Learner:
    """A single-user device enrolled with the facility's authority, and a manifest it may sign."""
    bundle = Path(run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb), "--no-encrypt").last_line)
    manifest = dict(container.read_info(bundle).manifest)
    bundle.unlink()
    dataset_id = str(manifest["dataset_id"])
    store = KeyStore(pair.tmp / "devC")
    request = request_certificate(store, dataset_id=dataset_id, facility_id=str(manifest["facility_id"]),
                                  profile="facilitydata", scope="user:" + "1" * 32, instance_id="c" * 32,
                                  out_dir=pair.tmp)
    install_grant(store, issue_grant(KeyStore(pair.a), request, pair.tmp))
    chain = store.device_chain(dataset_id)
    assert chain is not None and chain[0].scope.startswith("user:")
    manifest.update(chain=[c.to_dict() for c in chain], sender={"instance_id": "c" * 32, "counter": 1},
                    bundle_id="b0" * 16)
    return Learner(store.device_key(), manifest)


def craft(path: Path, learner: Learner, chunks: list[bytes], repeat: int, *, records: int, raw: int) -> Path:
    """A signed bundle whose payload is ``chunks`` then ``chunks[-1]`` ``repeat`` more times, summary as given."""
    compressor = zstd.ZstdCompressor(level=3, write_checksum=True).compressobj()
    payload = b"".join(compressor.compress(chunk) for chunk in chunks)
    payload += b"".join(compressor.compress(chunks[-1]) for _ in range(repeat))
    payload += compressor.flush()
    manifest = container.canonical_json(learner.manifest)
    summary = container.canonical_json({"counts": {}, "records": records, "payload_raw_bytes": raw})
    head = container.Preamble(container.FORMAT_VERSION, 0, len(manifest)).to_bytes() + manifest
    signed = head + payload + summary
    digest = hashlib.sha256(signed).digest()
    footer = container.Footer(len(payload), len(summary), digest, learner.key.sign("bundle", digest))
    path.write_bytes(signed + footer.to_bytes())
    return path


def idle_rss(home: Path) -> int:
    """Peak RSS (KiB) that a run reports for doing nothing: a forked child's peak counts its parent's
    pages from before ``exec``, so a large test worker inflates every child's figure alike."""
    return run_measured(home, "--version")[3]


def run_measured(home: Path, *args: str) -> tuple[int, str, float, int]:
    """Exit code, stderr, seconds and peak RSS (KiB) of one CLI run."""
    env = {k: v for k, v in os.environ.items() if k != "BUNDLESYNC_HOME"}
    env["BUNDLESYNC_HOME"] = str(home)
    err = home.parent / "stderr.txt"
    start = time.monotonic()
    with err.open("wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "bundlesync", *args], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, err.read_text(), time.monotonic() - start, usage.ru_maxrss


@pytest.mark.parametrize(("records", "limit"), [(1 << 29, "records"), (1000, "expansion")])
def test_a_bomb_announcing_gibs_is_refused_unread(pair: Pair, learner: Learner, records: int, limit: str) -> None:
    chunk = b"x\n" * (32 << 20)  # 64 MiB of two-byte lines, 16 times: 1 GiB from ~100 KiB
    bomb = craft(pair.usb / "bundle-bomb.bsync", learner, [chunk], 15, records=records, raw=(1 << 30))
    assert bomb.stat().st_size < 1 << 20
    before = dump_tables(pair.b_db)
    for command in ("verify", "import"):
        code, err, seconds, rss = run_measured(pair.b, command, str(bomb))
        assert code == 4 and err.startswith("error: ") and len(err.splitlines()) == 1, err
        assert limit in err and "refusing it unread" in err, err
        assert seconds < 10 and rss - idle_rss(pair.b) < BASELINE_RSS_KIB, (command, seconds, rss)
    assert dump_tables(pair.b_db) == before


def test_millions_of_tiny_lines_within_the_limits_are_refused_in_bounded_memory(pair: Pair, learner: Learner) -> None:
    # 64 MiB of "x\n" after 1 MiB of noise (so the expansion stays under the limit): 33 million lines,
    # announced truthfully, none of them a record.
    noise = os.urandom(1 << 20).replace(b"\n", b" ") + b"\n"
    chunk = b"x\n" * (1 << 20)
    lines = 1 + 32 * (1 << 20)
    bomb = craft(pair.usb / "bundle-lines.bsync", learner, [noise, chunk], 31, records=lines,
                 raw=len(noise) + 32 * len(chunk))
    before = dump_tables(pair.b_db)
    for command in ("verify", "import"):
        code, err, seconds, rss = run_measured(pair.b, command, str(bomb))
        assert code == 4 and err.startswith("error: ") and len(err.splitlines()) == 1, err
        assert "malformed record" in err, err
        assert seconds < 60 and rss - idle_rss(pair.b) < BASELINE_RSS_KIB, (command, seconds, rss)
    assert dump_tables(pair.b_db) == before
