"""Revocation and expiry through the CLI: refused in bundles, in relays and in receipts, by name."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

from conftest import Pair, run_cli, state
from enrol import cert_list, enrol, learner_of, own_cert, status

from bundlesync.device import Device
from bundlesync.sync.exporter import export_bundle
from bundlesync.trust.certfiles import read_request
from bundlesync.trust.receipts import make_receipt, write_receipt
from bundlesync.trust.scope import scope_filters
from bundlesync.trust.certs import format_time, issue_certificate
from bundlesync.trust.keystore import KeyStore


def _export(home: Path, facility: str, out: Path, *extra: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    res = run_cli(home, "export", "--facility", facility, "--out", str(out), *extra)
    assert res.last_line.endswith(".bsync"), res
    return Path(res.last_line)


def _learner_bundle(pair: Pair, learner: Path, user: str) -> Path:
    """The learner receives its data, edits one of its own rows and exports."""
    run_cli(learner, "import", "--no-receipt", str(_export(pair.a, pair.facility, pair.tmp / "to-l", "--user", user)))
    conn = sqlite3.connect(pair.tmp / f"{learner.name}.sqlite3")
    conn.execute("UPDATE logger_contentsessionlog SET progress = 0.99 WHERE user_id = ?", (user,))
    conn.commit()
    conn.close()
    return _export(learner, pair.facility, pair.tmp / "from-l")


def test_a_revoked_certificate_is_refused_in_bundles_relays_and_receipts(pair: Pair) -> None:
    user = learner_of(pair)
    learner = enrol(pair, "devL", f"user:{user}")
    third = enrol(pair, "devC", "full")
    l_cert = str(own_cert(learner)["cert_id"])
    assert l_cert in [p["cert_id"] for p in cert_list(pair.a)["facilities"][0]["peers"]]  # type: ignore[index]
    l_bundle = _learner_bundle(pair, learner, user)
    # The learner leaves a receipt on a shared drive while it is still trusted.
    shared = pair.tmp / "shared"
    run_cli(learner, "import", str(_export(pair.a, pair.facility, shared, "--user", user, "--full")))
    assert list(shared.glob("receipt-*.json"))

    res = run_cli(pair.a, "cert", "revoke", l_cert)
    assert l_cert in res.err
    assert [r["cert_id"] for r in cert_list(pair.a)["facilities"][0]["revocations"]] == [l_cert]  # type: ignore[index]

    # The authority refuses the learner's bundle, naming the certificate; nothing changes.
    before = state(pair.a_db)
    refused = run_cli(pair.a, "import", str(l_bundle), check=False)
    assert refused.code == 5 and l_cert in refused.err and "revoked" in refused.err
    assert refused.err.count("\n") == 1 and refused.err.startswith("error: ")
    assert state(pair.a_db) == before

    # ... and the learner's receipt, with a warning naming the file.
    conn = sqlite3.connect(pair.a_db)
    conn.execute("UPDATE kolibriauth_facilityuser SET full_name = 'after revoke' WHERE id = ?", (user,))
    conn.commit()
    conn.close()
    res = run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(shared), "--user", user)
    receipt = next(shared.glob("receipt-*.json")).name
    assert f"ignored receipt {receipt}" in res.err and "revoked" in res.err

    # The revocation travels: A -> B, then B relays it to C, who never saw A's bundle.
    run_cli(pair.b, "import", str(_export(pair.a, pair.facility, pair.usb)))
    assert [r["cert_id"] for r in cert_list(pair.b)["facilities"][0]["revocations"]] == [l_cert]  # type: ignore[index]
    relay = _export(pair.b, pair.facility, pair.tmp / "b-out", "--full",
                    "--encrypt-to", str(cert_list(third)["recipient"]))  # B has never met C
    run_cli(third, "import", str(relay))
    before = state(pair.tmp / "devC.sqlite3")
    refused = run_cli(third, "import", str(l_bundle), check=False)
    assert refused.code == 5 and l_cert in refused.err and "revoked" in refused.err
    assert state(pair.tmp / "devC.sqlite3") == before
    # verify refuses it too, and the learner itself can no longer sign once it hears of it.
    assert run_cli(third, "verify", str(l_bundle), check=False).code == 5


def test_revoke_is_for_the_authority_only(pair: Pair) -> None:
    res = run_cli(pair.b, "cert", "revoke", "0" * 32, check=False)
    assert res.code == 3 and "authority" in res.err
    root = cert_list(pair.a)["facilities"][0]["root"]["cert_id"]  # type: ignore[index]
    res = run_cli(pair.a, "cert", "revoke", str(root), check=False)
    assert res.code == 5 and "root" in res.err
    assert run_cli(pair.a, "cert", "revoke", "not-an-id", check=False).code == 5


def test_valid_days_the_issuer_may_shorten_never_extend(pair: Pair) -> None:
    now = datetime.now(timezone.utc)
    short = enrol(pair, "devS", "full", "--valid-days", "5")
    expires = datetime.fromisoformat(str(own_cert(short)["expires_at"]).replace("Z", "+00:00"))
    assert timedelta(days=4) < expires - now <= timedelta(days=5, minutes=5)
    # Near expiry: status and export say so.
    assert "expires at" in run_cli(short, "status").out
    facility = status(short)["facilities"][0]  # type: ignore[index]
    assert facility["warnings"] and "cert request" in facility["warnings"][0]
    (pair.tmp / "s-out").mkdir()
    res = run_cli(short, "export", "--facility", pair.facility, "--out", str(pair.tmp / "s-out"), "--full")
    assert "warning: this device's certificate" in res.err
    # The request asks for 400 days, the authority grants 10.
    certs = pair.tmp / "long-certs"
    request = run_cli(pair.b, "cert", "request", "--facility", pair.facility, "--scope", "full", "--out", str(certs),
                      "--valid-days", "400").last_line
    assert read_request(Path(request)).expires_at is not None
    grant = run_cli(pair.a, "cert", "issue", request, "--out", str(certs), "--valid-days", "10").last_line
    run_cli(pair.b, "cert", "install", grant)
    expires = datetime.fromisoformat(str(own_cert(pair.b)["expires_at"]).replace("Z", "+00:00"))
    assert timedelta(days=9) < expires - now <= timedelta(days=10, minutes=5)


def test_an_expired_certificate_is_refused_in_bundles_and_receipts(pair: Pair) -> None:
    user = learner_of(pair)
    learner = enrol(pair, "devL", f"user:{user}")
    run_cli(learner, "import", "--no-receipt", str(_export(pair.a, pair.facility, pair.tmp / "to-l", "--user", user)))
    # Re-issue the learner's certificate as if a month ago, valid for a week: it has expired.
    authority, keys = KeyStore(pair.a), KeyStore(learner)
    dataset_id = str(status(pair.a)["facilities"][0]["dataset_id"])  # type: ignore[index]
    chain = keys.device_chain(dataset_id)
    assert chain is not None
    old, root = chain
    root_key = authority.root_key(root.dataset_id)
    assert root_key is not None
    then = datetime.now(timezone.utc) - timedelta(days=30)
    leaf = issue_certificate(root, root_key, old.subject_key, old.scope, now=then,
                             expires_at=format_time(then + timedelta(days=7)),
                             instance_id=old.instance_id, recipient=old.recipient)
    keys.save_device_chain((leaf, root))
    # What the learner wrote back then, while its certificate was valid: a bundle and a receipt.
    conn = sqlite3.connect(pair.tmp / "devL.sqlite3")
    conn.execute("UPDATE logger_contentsessionlog SET progress = 0.99 WHERE user_id = ?", (user,))
    conn.commit()
    conn.close()
    (pair.tmp / "from-l").mkdir()
    shared = pair.tmp / "shared"
    shared.mkdir()
    with Device.open(learner) as device:
        l_bundle = export_bundle(device, pair.facility, pair.tmp / "from-l", now=then + timedelta(days=1)).path
        prefixes = scope_filters(device.profile, dataset_id, leaf.scope).read
        receipt = make_receipt(dataset_id, device.instance_id, prefixes, {}, (leaf, root))
        write_receipt(shared, receipt, keys.device_key())
    assert l_bundle is not None

    before = state(pair.a_db)
    refused = run_cli(pair.a, "import", str(l_bundle), check=False)
    assert refused.code == 5 and leaf.cert_id in refused.err and "expired" in refused.err
    assert state(pair.a_db) == before
    assert run_cli(pair.a, "verify", str(l_bundle), check=False).code == 5
    res = run_cli(pair.a, "export", "--facility", pair.facility, "--out", str(shared), "--user", user)
    name = next(shared.glob("receipt-*.json")).name
    assert f"ignored receipt {name}" in res.err and "expired" in res.err
    own = run_cli(learner, "export", "--facility", pair.facility, "--out", str(pair.tmp / "from-l"), check=False)
    assert own.code == 5 and leaf.cert_id in own.err and "expired" in own.err
