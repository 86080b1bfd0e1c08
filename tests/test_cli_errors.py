"""Invariant 5 through the real CLI: bad input gets one clear line and changes nothing.

Every case runs ``python -m bundlesync`` as a subprocess against real SQLite files, real
bundles and real Ed25519 keys (no mocks), and checks:

* a non-zero exit code (the documented one where the README fixes it);
* stderr is exactly one non-empty line, starting with ``error:``, that names what happened
  and says what to do; stdout is empty; no ``Traceback`` anywhere;
* nothing changed on the device: app tables (``dump_tables``), every table including
  bundlesync's own (``state``), the files of the device home, no stray file in the home's
  ``staging/`` folder, and the input file itself is untouched.

The importing device B already holds the facility (it imported A's first bundle) and has a
pending local edit, so a refused bundle that wrote anything at all — a merged record, a
serialized local change, a transfer row, an FSIC — shows up in the comparison. The bad
bundles are derived from a *valid* bundle B has not imported yet (checked by
``test_control_bundle_is_valid``), so each refusal is due to the damage alone.
"""

from __future__ import annotations

import copy
import hashlib
import random
import re
import sqlite3
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from bundlesync.format import container as container
from bundlesync.trust.crypto import SigningKey
from bundlesync.trust.keystore import KeyStore
from conftest import PROFILE, CliResult, build_pair, dump_tables, make_db, run_cli, state

# A key no device of the test trusts, fixed so runs are reproducible (Ed25519 from a 32-byte seed).
UNTRUSTED_KEY = SigningKey.from_pem(Ed25519PrivateKey.from_private_bytes(bytes(range(32))).private_bytes(
    Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))

PREAMBLE_SIZE = 16
FOOTER_SIZE = 116
SIGNATURE_FROM_END = (-72, -8)  # the 64 signature bytes, counted from the end of the file

# "What to do": every message must carry an instruction such as "copy it again", "check
# the path", "run `bundlesync init`", "upgrade …", "ask the facility's authority …".
HINT = re.compile(
    r"\b(run|copy|check|install|ask|upgrade|create|fix|use|retry|try|mount|pass|set|restore|re-run|"
    r"request|report|make|add|delete|remove|choose|give)\b",
    re.IGNORECASE,
)


# --------------------------------------------------------------------------- the world


@dataclass
class World:
    """A (authority, holds facility F), B (full cert, imported A's first bundle, one local edit)."""

    root: Path
    facility: str
    a_db: Path
    b_db: Path
    a: Path
    b: Path
    usb: Path
    bad: Path
    good: Path  # a valid bundle from A that B has not imported
    foreign: Path  # a valid bundle of another facility, from its own authority C


def _export(home: Path, facility: str, out: Path, *extra: str) -> Path:
    res = run_cli(home, "export", "--facility", facility, "--out", str(out), *extra)
    path = Path(res.last_line)
    assert path.is_file(), res
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("errors")
    p = build_pair(root)
    a_db, b_db, a, b, usb, facility = p.a_db, p.b_db, p.a, p.b, p.usb, p.facility
    c_db, c = root / "c.sqlite3", root / "devC"
    other = make_db(c_db, users=6, logs=120, seed=2)
    assert other != facility
    bad, elsewhere = root / "bad", root / "other-usb"
    for d in (bad, elsewhere):
        d.mkdir()
    run_cli(b, "import", str(_export(a, facility, usb)))
    assert dump_tables(a_db) == dump_tables(b_db)

    # A changes rows after B's import, then writes a full bundle: B would change if it applied it.
    conn = sqlite3.connect(a_db)
    conn.execute("UPDATE kolibriauth_facilityuser SET full_name = 'Changed on A' "
                 "WHERE id = (SELECT min(id) FROM kolibriauth_facilityuser)")
    conn.execute("DELETE FROM logger_attemptlog WHERE id IN (SELECT id FROM logger_attemptlog ORDER BY id LIMIT 2)")
    conn.commit()
    conn.close()
    good = _export(a, facility, usb, "--full")
    # B has a local edit that an import would serialize (bundlesync_changes -> store) first.
    conn = sqlite3.connect(b_db)
    conn.execute("UPDATE kolibriauth_facilityuser SET full_name = 'Local on B' "
                 "WHERE id = (SELECT max(id) FROM kolibriauth_facilityuser)")
    conn.commit()
    conn.close()
    assert state(b_db)["bundlesync_changes"], "B's local edit should be pending"

    # Another facility with its own authority C (B has never heard of it).
    run_cli(c, "init", "--db", str(c_db), "--profile", str(PROFILE))
    run_cli(c, "facility", "provision", "--facility", other)
    foreign = _export(c, other, elsewhere)
    return World(root, facility, a_db, b_db, a, b, usb, bad, good, foreign)


# --------------------------------------------------------------------------- checks


def _files(home: Path) -> dict[str, str]:
    """Every file of a home outside staging/, with a hash of its content.

    The run log (which records the failure, on purpose) and the run lock file are left out.
    """
    out = {}
    for p in sorted(home.rglob("*")):
        rel = p.relative_to(home).as_posix()
        if p.is_file() and not rel.startswith(("staging/", "bundlesync.log", "bundlesync.lock")):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _staging(home: Path) -> list[str]:
    staging = home / "staging"
    return sorted(p.relative_to(home).as_posix() for p in staging.rglob("*")) if staging.exists() else []


@dataclass
class Snapshot:
    app: dict[str, list[tuple[object, ...]]]
    everything: dict[str, list[tuple[object, ...]]]
    home: dict[str, str]
    staging: list[str]
    inputs: dict[str, str | None]


def _input_fingerprint(path: Path) -> dict[str, str | None]:
    """The input file's bytes and its folder's listing (no .partial or copy left beside it)."""
    out: dict[str, str | None] = {}
    if path.is_file():
        out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    folder = path if path.is_dir() else path.parent
    if folder.is_dir():
        out[f"{folder}/"] = "\n".join(sorted(p.name for p in folder.iterdir()))
    else:
        out[f"{folder}/"] = None
    return out


def snapshot(db: Path, home: Path, *inputs: Path) -> Snapshot:
    fp: dict[str, str | None] = {}
    for p in inputs:
        fp.update(_input_fingerprint(p))
    return Snapshot(dump_tables(db), state(db), _files(home) if home.exists() else {}, _staging(home), fp)


def assert_unchanged(before: Snapshot, db: Path, home: Path, *inputs: Path) -> None:
    after = snapshot(db, home, *inputs)
    assert after.app == before.app, "app tables changed"
    changed = sorted(k for k in set(before.everything) | set(after.everything)
                     if before.everything.get(k) != after.everything.get(k))
    assert not changed, f"tables changed: {changed}"
    assert after.home == before.home, "files of the device home changed"
    assert after.staging == [], f"stray files left in staging/: {after.staging}"
    assert after.inputs == before.inputs, "the input file or its folder changed"


def assert_one_line_error(res: CliResult, *, code: int, about: str, hint: bool = True) -> str:
    """The output rule of invariant 5. Returns the error line."""
    shown = f"exit {res.code}\n--- stdout\n{res.out}--- stderr\n{res.err}"
    assert "Traceback" not in res.out + res.err, shown
    lines = res.err.splitlines()
    assert len(lines) == 1, f"stderr must be exactly one line:\n{shown}"
    line = lines[0]
    assert line.startswith("error:") and line[len("error:"):].strip(), f"not an 'error: …' line:\n{shown}"
    assert res.out.strip() == "", f"a failure prints nothing on stdout:\n{shown}"
    assert res.code == code, f"expected exit code {code}:\n{shown}"
    assert re.search(about, line, re.IGNORECASE), f"the line should say what happened ({about!r}):\n{shown}"
    if hint:
        assert HINT.search(line), f"the line should say what to do:\n{shown}"
    return line


def refuse(world: World, command: str, path: Path, *, code: int, about: str, hint: bool = True) -> str:
    """Run ``command path`` on B; check the refusal and that nothing changed."""
    before = snapshot(world.b_db, world.b, path)
    res = run_cli(world.b, command, str(path), check=False)
    assert_unchanged(before, world.b_db, world.b, path)
    return assert_one_line_error(res, code=code, about=about, hint=hint)


# --------------------------------------------------------------------------- bad bundles

Builder = Callable[[bytes], bytes]


def _layout(data: bytes) -> tuple[int, int, int]:
    (manifest_len,) = struct.unpack(">I", data[12:16])
    payload_len, summary_len = struct.unpack(">QI", data[-FOOTER_SIZE:-FOOTER_SIZE + 12])
    return manifest_len, payload_len, summary_len


def _flip(offset: Callable[[bytes], int]) -> Builder:
    def build(data: bytes) -> bytes:
        out = bytearray(data)
        out[offset(data)] ^= 0x01
        return bytes(out)
    return build


def _payload_middle(data: bytes) -> int:
    ml, pl, _ = _layout(data)
    return PREAMBLE_SIZE + ml + pl // 2


def _manifest_middle(data: bytes) -> int:
    """The second character of the first string value from the manifest's middle on (stays valid JSON)."""
    ml, _, _ = _layout(data)
    return data.index(b'":"', PREAMBLE_SIZE + ml // 2, PREAMBLE_SIZE + ml) + 4


def _in_manifest(key: bytes, skip: int = 2, last: bool = False) -> Callable[[bytes], int]:
    """Offset of a character inside the value of manifest field ``key`` (first or last occurrence)."""
    def offset(data: bytes) -> int:
        ml, _, _ = _layout(data)
        find = data.rindex if last else data.index
        at = find(b'"' + key + b'":', PREAMBLE_SIZE, PREAMBLE_SIZE + ml)
        return at + len(key) + 3 + skip
    return offset


def _summary_middle(data: bytes) -> int:
    ml, pl, sl = _layout(data)
    return PREAMBLE_SIZE + ml + pl + sl // 2


def _set_u16(offset: int, value: int) -> Builder:
    def build(data: bytes) -> bytes:
        return data[:offset] + struct.pack(">H", value) + data[offset + 2:]
    return build


def _cut(length: Callable[[int], int]) -> Builder:
    return lambda data: data[:length(len(data))]


TAMPERED = "digest|altered|damaged|corrupt"
TRUNCATED = "truncated"
TRAILING = "appended|unexpected bytes|trailing|extra bytes"
NOT_A_BUNDLE = "not a bundle|not a bundlesync bundle|is empty|not a file|does not exist|no such file|directory"


# name -> (builder, exit code, what the line must say, run inspect too?)
BAD_BUNDLES: dict[str, tuple[Builder, int, str, bool]] = {
    "tampered-payload-middle": (_flip(_payload_middle), 4, TAMPERED, False),
    "tampered-manifest-middle": (_flip(_manifest_middle), 4, TAMPERED, False),
    "tampered-manifest-bundle-id": (_flip(_in_manifest(b"bundle_id")), 4, TAMPERED, False),
    "tampered-manifest-dataset-id": (_flip(_in_manifest(b"dataset_id", last=True)), 4, TAMPERED, False),
    "tampered-manifest-profile-version": (_flip(_in_manifest(b"version", skip=0)), 4, TAMPERED, False),
    "tampered-manifest-chain-issuer": (_flip(_in_manifest(b"issuer_id")), 4, TAMPERED, False),
    "tampered-summary": (_flip(_summary_middle), 4, TAMPERED, False),
    "tampered-digest-field": (_flip(lambda d: len(d) - FOOTER_SIZE + 12 + 7), 4, TAMPERED, False),
    "tampered-signature": (_flip(lambda d: len(d) + SIGNATURE_FROM_END[0] + 20), 5, "signature|signer|trust", False),
    "tampered-signature-last-byte": (_flip(lambda d: len(d) + SIGNATURE_FROM_END[1] - 1), 5,
                                     "signature|signer|trust", False),
    "unknown-format-version": (_set_u16(8, 2), 4, "version", True),
    "unknown-flags": (_set_u16(10, 2), 4, "flag", True),
    "truncated-to-magic": (_cut(lambda n: 8), 4, TRUNCATED, True),
    "truncated-to-preamble": (_cut(lambda n: PREAMBLE_SIZE), 4, TRUNCATED, True),
    "truncated-100": (_cut(lambda n: 100), 4, TRUNCATED, True),
    "truncated-quarter": (_cut(lambda n: n // 4), 4, TRUNCATED, True),
    "truncated-half": (_cut(lambda n: n // 2), 4, TRUNCATED, True),
    "truncated-before-footer": (_cut(lambda n: n - FOOTER_SIZE), 4, TRUNCATED, True),
    "truncated-minus-8": (_cut(lambda n: n - 8), 4, TRUNCATED, True),
    "truncated-minus-1": (_cut(lambda n: n - 1), 4, TRUNCATED, True),
    "trailing-1-byte": (lambda d: d + b"\x00", 4, TRAILING, True),
    "trailing-crlf": (lambda d: d + b"\r\n", 4, TRAILING, True),
    "trailing-4k-random": (lambda d: d + random.Random(4).randbytes(4096), 4, TRAILING, True),
    "trailing-second-copy": (lambda d: d + d, 4, TRAILING, True),
    "not-a-bundle-text": (lambda d: b"facility export, see attached\nline two\n", 4, NOT_A_BUNDLE, True),
    "not-a-bundle-empty": (lambda d: b"", 4, NOT_A_BUNDLE, True),
    "not-a-bundle-random-100k": (lambda d: random.Random(100).randbytes(100_000), 4, NOT_A_BUNDLE, True),
    "not-a-bundle-zstd-compressed-bundle": (lambda d: __import__("zstandard").ZstdCompressor().compress(d), 4,
                                     NOT_A_BUNDLE, True),
}


def _bad_path(world: World, name: str) -> Path:
    path = world.bad / name / f"{world.good.name}"
    if not path.exists():
        path.parent.mkdir()
        path.write_bytes(BAD_BUNDLES[name][0](world.good.read_bytes()))
    return path


def test_control_bundle_is_valid(world: World) -> None:
    """The undamaged bundle passes verify on B, so each refusal below is due to the damage."""
    before = snapshot(world.b_db, world.b, world.good)
    res = run_cli(world.b, "verify", str(world.good))
    assert res.code == 0 and "OK" in res.err
    assert_unchanged(before, world.b_db, world.b, world.good)


@pytest.mark.parametrize("name", list(BAD_BUNDLES))
def test_bad_bundle_is_refused_by_import_and_verify(world: World, name: str) -> None:
    _, code, about, _ = BAD_BUNDLES[name]
    path = _bad_path(world, name)
    imported = refuse(world, "import", path, code=code, about=about)
    verified = refuse(world, "verify", path, code=code, about=about)
    assert verified == imported, "verify must give the same refusal as import"


@pytest.mark.parametrize("name", [n for n, case in BAD_BUNDLES.items() if case[3]])
def test_inspect_of_a_non_bundle_gives_one_line(world: World, name: str) -> None:
    _, _, about, _ = BAD_BUNDLES[name]
    path = _bad_path(world, name)
    before = _input_fingerprint(path)
    res = run_cli(None, "inspect", str(path), check=False)
    assert_one_line_error(res, code=4, about=about)
    assert _input_fingerprint(path) == before


@pytest.mark.parametrize("command", ["import", "verify", "inspect"])
def test_directory_instead_of_a_bundle(world: World, command: str) -> None:
    folder = world.bad / "a-folder"
    folder.mkdir(exist_ok=True)
    (folder / "readme.txt").write_text("not a bundle\n")
    if command == "inspect":
        assert_one_line_error(run_cli(None, command, str(folder), check=False), code=4, about=NOT_A_BUNDLE)
    else:
        refuse(world, command, folder, code=4, about=NOT_A_BUNDLE)


@pytest.mark.parametrize("command", ["import", "verify", "inspect"])
def test_nonexistent_path(world: World, command: str) -> None:
    missing = world.bad / "no-such-folder" / "bundle-missing.bsync"
    if command == "inspect":
        assert_one_line_error(run_cli(None, command, str(missing), check=False), code=4, about=NOT_A_BUNDLE)
    else:
        refuse(world, command, missing, code=4, about=NOT_A_BUNDLE)
    assert not missing.parent.exists()


# --------------------------------------------------------------------------- trust and profile


@pytest.mark.parametrize("command", ["import", "verify"])
def test_foreign_facility_bundle_is_refused(world: World, command: str) -> None:
    """Signed by another facility's authority (valid in itself): B does not trust that facility."""
    run_cli(world.root / "devC", "verify", str(world.foreign))  # valid where it comes from
    line = refuse(world, command, world.foreign, code=5, about="not trust|untrusted|does not trust")
    assert "bundlesync cert" in line


def _rewrite(src: Path, out_dir: Path, manifest: dict[str, object], key: SigningKey) -> Path:
    """A new bundle with ``manifest`` and the records and summary of ``src``, signed by ``key``."""
    info = container.read_info(src)
    container.verify_digest(info)
    summary = {k: v for k, v in info.summary.items()
               if k not in ("records", "payload_raw_bytes", "payload_plain_sha256")}
    out_dir.mkdir(parents=True, exist_ok=True)
    readable = info
    if info.flags & container.FLAG_ENCRYPTED:  # A's own key reads it; the rewrite is in the clear
        readable = container.decrypt_payload(info, out_dir / "plain", KeyStore(src.parents[1] / "devA").encryption_secret())
        manifest = {k: v for k, v in manifest.items() if k != "encryption"}
    with container.BundleWriter(out_dir, src.name, manifest, lambda digest: key.sign("bundle", digest)) as writer:
        writer.write_records(container.iter_records(readable))
        path = writer.finish(summary)
    (out_dir / "plain").unlink(missing_ok=True)
    assert container.read_info(path).records == info.records
    return path


@pytest.fixture(scope="module")
def resigned(world: World) -> Path:
    """Same dataset, same manifest and chain (A's certificate), but signed by a fresh key."""
    info = container.read_info(world.good)
    return _rewrite(world.good, world.bad / "resigned", copy.deepcopy(info.manifest), UNTRUSTED_KEY)


@pytest.mark.parametrize("command", ["import", "verify"])
def test_bundle_resigned_by_untrusted_key_is_refused(world: World, resigned: Path, command: str) -> None:
    refuse(world, command, resigned, code=5, about="signature|signer|trust")


@pytest.mark.parametrize("field,value", [("version", 2), ("name", "otherprofile")])
@pytest.mark.parametrize("command", ["import", "verify"])
def test_bundle_for_another_profile_is_refused(world: World, command: str, field: str, value: object) -> None:
    """Written for profile version 2 (or another profile), genuinely signed by A's device key."""
    info = container.read_info(world.good)
    manifest = copy.deepcopy(info.manifest)
    profile = manifest["profile"]
    assert isinstance(profile, dict)
    profile[field] = value
    path = _rewrite(world.good, world.bad / f"profile-{field}-{command}", manifest, KeyStore(world.a).device_key())
    run_cli(world.a, "inspect", str(path))  # structurally a fine bundle
    line = refuse(world, command, path, code=4, about=r"profile")
    assert str(value) in line


# --------------------------------------------------------------------------- device set-up errors


@pytest.mark.parametrize("args", [
    ("status",),
    ("status", "--json"),
    ("export", "--facility", "FACILITY", "--out", "USB"),
    ("import", "BUNDLE"),
    ("verify", "BUNDLE"),
])
@pytest.mark.parametrize("home_exists", [True, False], ids=["empty-home", "missing-home"])
def test_device_not_initialised(world: World, tmp_path: Path, args: tuple[str, ...], home_exists: bool) -> None:
    home = tmp_path / "fresh-home"
    if home_exists:
        home.mkdir()
    usb = tmp_path / "usb"
    usb.mkdir()
    argv = [{"FACILITY": world.facility, "USB": str(usb), "BUNDLE": str(world.good)}.get(a, a) for a in args]
    good_before = _input_fingerprint(world.good)
    res = run_cli(home, *argv, check=False)
    line = assert_one_line_error(res, code=3, about="not an initialised|not initialised|no .*config")
    assert "bundlesync init" in line
    assert home.exists() == home_exists
    if home_exists:
        assert list(home.iterdir()) == [], "nothing may be created in an uninitialised home"
    assert list(usb.iterdir()) == []
    assert _input_fingerprint(world.good) == good_before


def test_no_home_at_all(tmp_path: Path) -> None:
    res = run_cli(None, "status", check=False)
    assert_one_line_error(res, code=2, about="home", hint=True)


def _a_snapshot(world: World, *inputs: Path) -> Snapshot:
    return snapshot(world.a_db, world.a, *inputs)


def test_export_unknown_facility(world: World) -> None:
    before = _a_snapshot(world, world.usb)
    res = run_cli(world.a, "export", "--facility", "0123456789abcdef0123456789abcdef", "--out", str(world.usb),
                  check=False)
    assert_unchanged(before, world.a_db, world.a, world.usb)
    assert_one_line_error(res, code=3, about="unknown facility|0123456789abcdef0123456789abcdef")


def test_export_to_missing_folder(world: World) -> None:
    missing = world.root / "unplugged-drive" / "usb"
    before = _a_snapshot(world, missing)
    res = run_cli(world.a, "export", "--facility", world.facility, "--out", str(missing), check=False)
    assert_unchanged(before, world.a_db, world.a, missing)
    assert not missing.exists() and not missing.parent.exists()
    assert_one_line_error(res, code=3, about="does not exist|no such|missing")


def test_init_with_missing_database(tmp_path: Path) -> None:
    home, db = tmp_path / "h", tmp_path / "nope.sqlite3"
    res = run_cli(home, "init", "--db", str(db), "--profile", str(PROFILE), check=False)
    assert_one_line_error(res, code=2, about="does not exist|not found|no such")
    assert not db.exists(), "init must not create the app database"
    assert not home.exists(), "a failed init must not leave a half-made home"


@pytest.mark.parametrize("text", [
    "tables: [\n  - oops: {\n",  # not YAML
    "name: facilitydata\nversion: 1\n",  # YAML, but not a profile
    "- just\n- a list\n",
    "",
], ids=["syntax", "missing-keys", "list", "empty"])
def test_init_with_broken_profile(tmp_path: Path, text: str) -> None:
    home, db, profile = tmp_path / "h", tmp_path / "app.sqlite3", tmp_path / "profile.yaml"
    make_db(db, users=3, logs=10, seed=5)
    profile.write_text(text)
    before = state(db)
    res = run_cli(home, "init", "--db", str(db), "--profile", str(profile), check=False)
    assert_one_line_error(res, code=2, about="profile")
    assert state(db) == before, "a failed init must not touch the database (tables, triggers)"
    assert not home.exists(), "a failed init must not leave a half-made home"


@pytest.mark.parametrize("content", [
    b"\x00\x01garbage\xff" * 40,
    b'{"hello": "world"}',
    b"",
    b"not json at all\n",
], ids=["binary", "json-without-type", "empty", "text"])
def test_cert_install_of_garbage(world: World, content: bytes) -> None:
    grant = world.bad / f"garbage-{hashlib.sha256(content).hexdigest()[:8]}.certgrant.json"
    grant.write_bytes(content)
    before = snapshot(world.b_db, world.b, grant)
    res = run_cli(world.b, "cert", "install", str(grant), check=False)
    assert_unchanged(before, world.b_db, world.b, grant)
    assert_one_line_error(res, code=5, about="grant|certificate|not a bundlesync file|json")


def test_cert_install_of_a_bundle(world: World) -> None:
    before = snapshot(world.b_db, world.b, world.good)
    res = run_cli(world.b, "cert", "install", str(world.good), check=False)
    assert_unchanged(before, world.b_db, world.b, world.good)
    assert_one_line_error(res, code=5, about="grant|certificate|not a bundlesync file|json")


def test_cert_issue_on_a_device_that_is_not_the_authority(world: World, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    request = run_cli(world.b, "cert", "request", "--facility", world.facility, "--scope", "full",
                      "--out", str(tmp_path)).last_line
    before = snapshot(world.b_db, world.b, Path(request))
    res = run_cli(world.b, "cert", "issue", request, "--out", str(out), check=False)
    assert_unchanged(before, world.b_db, world.b, Path(request))
    assert list(out.iterdir()) == [], "no grant may be written"
    line = assert_one_line_error(res, code=3, about="not the authority")
    assert "provision" in line
