"""Encrypted bundles through the CLI: a lost drive reveals nothing, a changed byte is caught.

By default an export is encrypted (age) to the devices that may read it; a device that is
not a recipient gets one clear line naming the recipients it would need; changing one byte
of the ciphertext, the age envelope or the recipient list fails before anything is written.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from conftest import Pair, dump_tables, run_cli, state
from enrol import cert_list, enrol

from bundlesync.format import container


def _export(home: Path, facility: str, out: Path, *extra: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    res = run_cli(home, "export", "--facility", facility, "--out", str(out), *extra)
    assert res.last_line.endswith(".bsync"), res
    return Path(res.last_line)


def _secrets(db: Path) -> list[str]:
    """Learners' names, usernames and password hashes: what a lost drive must not reveal."""
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT full_name, username, password FROM kolibriauth_facilityuser").fetchall()
    conn.close()
    return [str(v) for row in rows for v in row if v and len(str(v)) >= 6]


def _staging_is_empty(home: Path) -> bool:
    staging = home / "staging"
    return not staging.exists() or not any(staging.iterdir())


def test_a_bundle_cannot_be_read_without_a_recipient_key_and_is_with_one(pair: Pair) -> None:
    bundle = _export(pair.a, pair.facility, pair.usb)
    raw = bundle.read_bytes()
    secrets = _secrets(pair.a_db)
    assert secrets and not [s for s in secrets if s.encode() in raw]
    info = container.read_info(bundle)
    assert info.flags & container.FLAG_ENCRYPTED
    assert raw[info.payload_offset:].startswith(b"age-encryption.org/v1\n")  # no zstd frame to decompress
    assert "counts" not in info.summary  # per-table activity stays inside
    doc = json.loads(run_cli(None, "inspect", str(bundle), "--json").out)
    mine, theirs = str(cert_list(pair.a)["recipient"]), str(cert_list(pair.b)["recipient"])
    assert doc["encrypted"] and sorted(doc["recipients"]) == sorted([mine, theirs])
    human = run_cli(None, "inspect", str(bundle)).out
    assert "encrypted  to 2 recipient(s)" in human and str(theirs) in human
    run_cli(pair.b, "import", str(bundle))
    assert dump_tables(pair.a_db) == dump_tables(pair.b_db)
    assert _staging_is_empty(pair.b)


def test_a_device_that_is_not_a_recipient_gets_one_clear_line(pair: Pair) -> None:
    third = enrol(pair, "devC", "full")
    run_cli(pair.b, "import", str(_export(pair.a, pair.facility, pair.usb)))
    from_b = _export(pair.b, pair.facility, pair.tmp / "b-out", "--full")  # B has never met C
    before = state(pair.tmp / "devC.sqlite3")
    res = run_cli(third, "import", str(from_b), check=False)
    needed = json.loads(run_cli(None, "inspect", str(from_b), "--json").out)["recipients"]
    assert res.code == 5 and res.out == "" and res.err.count("\n") == 1 and res.err.startswith("error: ")
    assert all(r in res.err for r in needed) and "--encrypt-to " + str(cert_list(third)["recipient"]) in res.err
    assert state(pair.tmp / "devC.sqlite3") == before and _staging_is_empty(third)
    # With --encrypt-to, C can read B's next bundle.
    again = _export(pair.b, pair.facility, pair.tmp / "b-out2", "--full", "--encrypt-to",
                    str(cert_list(third)["recipient"]))
    run_cli(third, "import", str(again))
    assert dump_tables(pair.tmp / "devC.sqlite3") == dump_tables(pair.b_db)


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


@pytest.mark.parametrize("where", ["ciphertext", "envelope", "recipient list", "plaintext digest"])
def test_one_changed_byte_fails_verification_before_any_write(pair: Pair, where: str) -> None:
    bundle = _export(pair.a, pair.facility, pair.usb)
    raw = bundle.read_bytes()
    info = container.read_info(bundle)
    recipient = str(cert_list(pair.b)["recipient"]).encode()
    at = {
        "ciphertext": info.payload_offset + info.payload_len - 40,
        "envelope": info.payload_offset + raw[info.payload_offset:].index(b"X25519") + 10,
        "recipient list": raw.index(recipient) + 20,
        "plaintext digest": raw.rindex(b"payload_plain_sha256") + 30,
    }[where]
    bad = pair.tmp / "bad" / bundle.name
    bad.parent.mkdir()
    bad.write_bytes(_flip(raw, at))
    before = state(pair.b_db)
    for command in ("verify", "import"):
        res = run_cli(pair.b, command, str(bad), check=False)
        assert res.code == 4 and res.err.startswith("error: ") and res.err.count("\n") == 1, res
        assert "Traceback" not in res.err
    assert state(pair.b_db) == before and _staging_is_empty(pair.b)
    assert not list(bad.parent.glob("receipt-*"))
    run_cli(pair.b, "import", str(bundle))  # the original is fine


def test_no_encrypt_is_the_explicit_opt_out_and_inspect_shows_it(pair: Pair) -> None:
    bundle = _export(pair.a, pair.facility, pair.usb, "--no-encrypt")
    info = container.read_info(bundle)
    assert not info.flags & container.FLAG_ENCRYPTED and "encryption" not in info.manifest
    assert "encrypted  no" in run_cli(None, "inspect", str(bundle)).out
    assert json.loads(run_cli(None, "inspect", str(bundle), "--json").out)["encrypted"] is False
    run_cli(pair.b, "import", str(bundle))
    assert dump_tables(pair.a_db) == dump_tables(pair.b_db)
    bad = run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(pair.usb), "--encrypt-to", "age1nope",
                  check=False)
    assert bad.code == 2 and "age recipient" in bad.err


def test_a_learner_tablet_is_never_a_recipient_of_facility_wide_data(pair: Pair) -> None:
    conn = sqlite3.connect(pair.a_db)
    user = str(conn.execute("SELECT min(id) FROM kolibriauth_facilityuser").fetchone()[0])
    conn.close()
    learner = enrol(pair, "devL", f"user:{user}")
    mine = str(cert_list(learner)["recipient"])
    full = json.loads(run_cli(None, "inspect", str(_export(pair.a, pair.facility, pair.usb)), "--json").out)
    assert mine not in full["recipients"]
    own = _export(pair.a, pair.facility, pair.tmp / "to-l", "--user", user)
    assert mine in json.loads(run_cli(None, "inspect", str(own), "--json").out)["recipients"]
    run_cli(learner, "import", str(own))
