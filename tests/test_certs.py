"""Tests for bundlesync.trust.certs, .certfiles and .keys: chains, request/grant files, round trip."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from bundlesync.trust.certfiles import (
    CertGrant,
    CertRequest,
    make_request,
    read_chain_file,
    read_grant,
    read_request,
    write_chain_file,
    write_grant,
    write_request,
)
from bundlesync.trust.certs import (
    MAX_CHAIN_LENGTH,
    Certificate,
    canonical_json,
    format_time,
    issue_certificate,
    make_root_certificate,
    parse_scope,
    scope_covers,
    verify_chain,
)
from bundlesync.trust.crypto import SigningKey, key_fingerprint
from bundlesync.errors import CertError, StateError, TrustError
from bundlesync.trust.keystore import KeyStore
from bundlesync.trust.authority import issue_grant, provision_facility
from bundlesync.trust.enrolment import install_grant, request_certificate

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
DATASET = "d" * 32
FACILITY = "f" * 32
PROFILE = "facilitydata"
USER = "0123456789abcdef0123456789abcdef"



def key_from_seed(seed_hex: str) -> SigningKey:
    """A fixed Ed25519 key: runs are reproducible, and known answers can be checked."""
    private = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seed_hex))
    return SigningKey.from_pem(private.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))


# The secret keys of RFC 8032's Ed25519 test vectors 1, 2 and 3 (section 7.1).
ROOT_KEY = key_from_seed("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
DEVICE_KEY = key_from_seed("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb")
OTHER_KEY = key_from_seed("c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7")


def make_root(key: SigningKey = ROOT_KEY, dataset: str = DATASET) -> Certificate:
    return make_root_certificate(
        key, dataset_id=dataset, facility_id=FACILITY, profile=PROFILE, now=NOW
    )


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text
    return text


# --------------------------------------------------------------------------- scopes


def test_parse_scope() -> None:
    assert parse_scope("full") == ("full", None)
    assert parse_scope(f"user:{USER}") == ("user", USER)
    for bad in ("", "FULL", "user:", "user:XYZ", "user:ABCDEF", "group:ab", "user:ab:cd"):
        with pytest.raises(CertError, match="--scope"):
            parse_scope(bad)


def test_scope_covers() -> None:
    u, v = f"user:{USER}", "user:abcd"
    assert scope_covers("full", "full")
    assert scope_covers("full", u)
    assert scope_covers(u, u)
    assert not scope_covers(u, v)
    assert not scope_covers(u, "full")


# --------------------------------------------------------------------------- certificates


def test_root_and_leaf_verify() -> None:
    root = make_root()
    assert root.is_root and root.scope == "full" and root.issuer_id is None
    assert root.cert_id == root.computed_id() and len(root.cert_id) == 32
    leaf = issue_certificate(root, ROOT_KEY, DEVICE_KEY.public_key, f"user:{USER}", now=NOW)
    assert not leaf.is_root and leaf.issuer_id == root.cert_id
    assert (leaf.dataset_id, leaf.facility_id, leaf.profile) == (DATASET, FACILITY, PROFILE)
    assert verify_chain([leaf, root], root, dataset_id=DATASET, now=NOW) == leaf
    assert verify_chain([root], root, now=NOW) == root


def test_known_answers() -> None:
    """Fixed keys and times give fixed bytes: fingerprints, signatures and certificate ids never drift."""
    assert ROOT_KEY.public_key.hex() == "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"  # RFC 8032
    assert DEVICE_KEY.public_key.hex() == "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c"
    assert OTHER_KEY.public_key.hex() == "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025"
    assert key_fingerprint(ROOT_KEY.public_key) == "21fe31dfa154a261"
    assert key_fingerprint(DEVICE_KEY.public_key) == "39f713d0a644253f"
    assert key_fingerprint(bytes(32)) == "66687aadf862bd77"
    # A signature in the "bundle" context (Ed25519 is deterministic).
    assert ROOT_KEY.sign("bundle", b"").hex() == (
        "fedc05d8aec5248c772cbbb0abb5009ea30a2dba0139e98fce232ef15d461118"
        "813d862de075e686bd740ba2eae13fb12d1e4214dc9938086d9efbfd63c8d50a")
    root = make_root()
    assert (root.cert_id, root.fingerprint) == ("acb5f8741859d3b934bd7bb2426e66e7", "21fe31dfa154a261")
    assert root.signature.hex() == (
        "96a9e4d659cf6c900f3977e2d80f810c3fbb429788081c5630400fcc11bbb7c4"
        "d580a7510a5e37977af3707c4fb72ccf7fe9de725e050ed21d813eb1794c7a06")
    leaf = issue_certificate(root, ROOT_KEY, DEVICE_KEY.public_key, f"user:{USER}", now=NOW)
    assert (leaf.cert_id, leaf.fingerprint) == ("ea61bac42d7041bb041c89712377caab", "39f713d0a644253f")


def test_cert_id_is_hash_of_canonical_unsigned_body() -> None:
    import hashlib

    root = make_root()
    body = root.body()
    del body["cert_id"]
    expected = hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    ).hexdigest()[:32]
    assert root.cert_id == expected
    assert root.signed_bytes() == canonical_json(root.body())
    assert "signature" not in root.body()


def test_issue_needs_matching_key_and_full_issuer() -> None:
    root = make_root()
    with pytest.raises(CertError, match="does not belong"):
        issue_certificate(root, OTHER_KEY, DEVICE_KEY.public_key, "full", now=NOW)
    user_cert = issue_certificate(root, ROOT_KEY, DEVICE_KEY.public_key, f"user:{USER}", now=NOW)
    with pytest.raises(CertError, match="may not issue"):
        issue_certificate(user_cert, DEVICE_KEY, OTHER_KEY.public_key, f"user:{USER}", now=NOW)
    with pytest.raises(CertError, match="--scope"):
        issue_certificate(root, ROOT_KEY, DEVICE_KEY.public_key, "everything", now=NOW)
    with pytest.raises(CertError, match="not after"):
        issue_certificate(
            root, ROOT_KEY, DEVICE_KEY.public_key, "full", now=NOW,
            expires_at=format_time(NOW - timedelta(days=1)),
        )
    with pytest.raises(CertError, match="2026-01-31"):
        issue_certificate(
            root, ROOT_KEY, DEVICE_KEY.public_key, "full", now=NOW, expires_at="tomorrow"
        )


def test_bad_ids_are_refused() -> None:
    for bad in ("", "../etc", "a/b", "a.b", "x" * 129):
        with pytest.raises(CertError, match="is not valid"):
            make_root_certificate(ROOT_KEY, dataset_id=bad, facility_id=FACILITY, profile=PROFILE)


class TestVerifyChainRefuses:
    def setup_method(self) -> None:
        self.root = make_root()
        self.mid = issue_certificate(self.root, ROOT_KEY, OTHER_KEY.public_key, "full", now=NOW)
        self.leaf = issue_certificate(
            self.mid, OTHER_KEY, DEVICE_KEY.public_key, f"user:{USER}", now=NOW
        )

    def test_three_level_chain_verifies(self) -> None:
        assert verify_chain([self.leaf, self.mid, self.root], self.root, now=NOW) == self.leaf

    @pytest.mark.parametrize(
        "field,value",
        [
            ("scope", "full"),
            ("dataset_id", "e" * 32),
            ("facility_id", "e" * 32),
            ("profile", "other"),
            ("subject_key", OTHER_KEY.public_key),
            ("issued_at", "2030-01-01T00:00:00Z"),
            ("expires_at", "2099-01-01T00:00:00Z"),
        ],
        ids=["scope", "dataset_id", "facility_id", "profile", "subject_key", "issued_at", "expires_at"],
    )
    def test_tampered_field(self, field: str, value: object) -> None:
        changes: dict[str, Any] = {field: value}
        leaf = replace(self.leaf, **changes)
        # As sent: the id no longer matches the content.
        with pytest.raises(TrustError, match="altered"):
            verify_chain([leaf, self.mid, self.root], self.root, now=NOW)
        # A forger who also fixes up the id still lacks the issuer's signature (or, for
        # the dataset/profile fields, breaks the chain's consistency first).
        fixed = replace(leaf, cert_id=leaf.computed_id())
        with pytest.raises(TrustError) as info:
            verify_chain([fixed, self.mid, self.root], self.root, now=NOW)
        one_line(info.value)

    def test_tampered_signature(self) -> None:
        sig = bytes([self.leaf.signature[0] ^ 0x80]) + self.leaf.signature[1:]
        with pytest.raises(TrustError, match="not signed by its issuer"):
            verify_chain([replace(self.leaf, signature=sig), self.mid, self.root], self.root,
                         now=NOW)

    def test_wrong_root(self) -> None:
        other_root = make_root(OTHER_KEY)
        with pytest.raises(TrustError, match="not at the trusted root"):
            verify_chain([self.leaf, self.mid, self.root], other_root, now=NOW)

    def test_resigned_copy_of_root_is_not_the_trusted_root(self) -> None:
        # Same id, different signature bytes (Ed25519 is deterministic, so forge by flipping).
        sig = bytes([self.root.signature[0] ^ 1]) + self.root.signature[1:]
        fake = replace(self.root, signature=sig)
        with pytest.raises(TrustError, match="not byte-for-byte the trusted root"):
            verify_chain([self.leaf, self.mid, fake], self.root, now=NOW)

    def test_other_dataset(self) -> None:
        other = make_root(dataset="e" * 32)
        with pytest.raises(TrustError, match="dataset"):
            verify_chain([self.leaf, self.mid, self.root], other, now=NOW)
        with pytest.raises(TrustError, match="dataset"):
            verify_chain([self.leaf, self.mid, self.root], self.root, dataset_id="e" * 32,
                         now=NOW)

    def test_expired(self) -> None:
        leaf = issue_certificate(
            self.root, ROOT_KEY, DEVICE_KEY.public_key, "full", now=NOW,
            expires_at=format_time(NOW + timedelta(days=30)),
        )
        assert verify_chain([leaf, self.root], self.root, now=NOW + timedelta(days=29)) == leaf
        with pytest.raises(TrustError, match="expired at"):
            verify_chain([leaf, self.root], self.root, now=NOW + timedelta(days=30))
        mid = issue_certificate(
            self.root, ROOT_KEY, OTHER_KEY.public_key, "full", now=NOW,
            expires_at=format_time(NOW + timedelta(days=1)),
        )
        leaf2 = issue_certificate(mid, OTHER_KEY, DEVICE_KEY.public_key, "full", now=NOW)
        with pytest.raises(TrustError, match=f"{mid.cert_id}.*expired"):
            verify_chain([leaf2, mid, self.root], self.root, now=NOW + timedelta(days=2))

    def test_user_scope_issuer(self) -> None:
        # issue_certificate refuses this, so forge it the way an attacker would: by hand.
        user_mid = issue_certificate(
            self.root, ROOT_KEY, OTHER_KEY.public_key, f"user:{USER}", now=NOW
        )
        forged = _forge(user_mid, OTHER_KEY, DEVICE_KEY.public_key, f"user:{USER}")
        with pytest.raises(TrustError, match="may not issue"):
            verify_chain([forged, user_mid, self.root], self.root, now=NOW)

    def test_child_scope_wider_than_parent(self) -> None:
        user_mid = issue_certificate(
            self.root, ROOT_KEY, OTHER_KEY.public_key, f"user:{USER}", now=NOW
        )
        forged = _forge(user_mid, OTHER_KEY, DEVICE_KEY.public_key, "full")
        with pytest.raises(TrustError, match="wider than its issuer"):
            verify_chain([forged, user_mid, self.root], self.root, now=NOW)
        other_user = _forge(user_mid, OTHER_KEY, DEVICE_KEY.public_key, "user:abcdef")
        with pytest.raises(TrustError, match="wider than its issuer"):
            verify_chain([other_user, user_mid, self.root], self.root, now=NOW)

    def test_broken_link(self) -> None:
        other_mid = issue_certificate(self.root, ROOT_KEY, OTHER_KEY.public_key, "full",
                                      now=NOW + timedelta(seconds=1))
        with pytest.raises(TrustError, match="names issuer"):
            verify_chain([self.leaf, other_mid, self.root], self.root, now=NOW)

    def test_mixed_profile(self) -> None:
        other_root = make_root_certificate(
            OTHER_KEY, dataset_id=DATASET, facility_id=FACILITY, profile="other", now=NOW
        )
        foreign = issue_certificate(other_root, OTHER_KEY, DEVICE_KEY.public_key, "full", now=NOW)
        spliced = replace(foreign, issuer_id=self.root.cert_id)
        spliced = replace(spliced, cert_id=spliced.computed_id())
        with pytest.raises(TrustError, match="profile"):
            verify_chain([spliced, self.root], self.root, now=NOW)

    def test_empty_and_too_long(self) -> None:
        with pytest.raises(TrustError, match="empty"):
            verify_chain([], self.root, now=NOW)
        with pytest.raises(TrustError, match="more than"):
            verify_chain([self.leaf] * (MAX_CHAIN_LENGTH + 1), self.root, now=NOW)

    def test_trusted_root_must_be_a_valid_root(self) -> None:
        with pytest.raises(TrustError, match="not a root"):
            verify_chain([self.leaf, self.mid], self.mid, now=NOW)
        bad = replace(self.root, signature=bytes(64))
        with pytest.raises(TrustError, match="not validly self-signed"):
            verify_chain([self.leaf, self.mid, bad], bad, now=NOW)


def _forge(issuer: Certificate, issuer_key: SigningKey, subject: bytes, scope: str) -> Certificate:
    draft = Certificate(
        cert_id="0" * 32, dataset_id=issuer.dataset_id, facility_id=issuer.facility_id,
        profile=issuer.profile, scope=scope, subject_key=subject, issuer_id=issuer.cert_id,
        issued_at=format_time(NOW), expires_at=None, signature=bytes(64),
    )
    draft = replace(draft, cert_id=draft.computed_id())
    return replace(draft, signature=issuer_key.sign("cert", draft.signed_bytes()))


def test_from_dict_refuses_malformed() -> None:
    good = make_root().to_dict()
    cases: list[object] = []
    for key in good:
        d = dict(good)
        del d[key]
        cases.append(d)
    cases += [
        {**good, "extra": 1},
        {**good, "subject_key": "zz" * 32},
        {**good, "subject_key": str(good["subject_key"]).upper()},
        {**good, "signature": "00"},
        {**good, "scope": 7},
        {**good, "issued_at": "yesterday"},
        {**good, "issued_at": "2025-02-30T00:00:00Z"},
        {**good, "dataset_id": "../x"},
        {**good, "cert_id": "short"},
        {**good, "scope": f"user:{USER}"},  # a root must be full
        [],
        "text",
    ]
    for case in cases:
        with pytest.raises(CertError) as info:
            Certificate.from_dict(case)  # type: ignore[arg-type]
        assert one_line(info.value).startswith("certificate is malformed")


def test_from_dict_detects_altered_content() -> None:
    d = make_root().to_dict()
    d["facility_id"] = "g" * 32
    with pytest.raises(TrustError, match="altered"):
        Certificate.from_dict(d)


# --------------------------------------------------------------------------- hypothesis

ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_-]{0,40}\Z")
profiles = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,20}\Z")
scopes = st.one_of(st.just("full"), st.from_regex(r"\A[0-9a-f]{1,64}\Z").map(lambda u: "user:" + u))
moments = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2090, 1, 1), timezones=st.just(timezone.utc)
)


@st.composite
def chains(draw: st.DrawFn) -> tuple[Certificate, Certificate]:
    issued = draw(moments)
    root = make_root_certificate(
        ROOT_KEY, dataset_id=draw(ids), facility_id=draw(ids), profile=draw(profiles), now=issued
    )
    expires = draw(st.one_of(st.none(), st.integers(1, 10**8)))
    leaf = issue_certificate(
        root,
        ROOT_KEY,
        DEVICE_KEY.public_key,
        draw(scopes),
        now=issued,
        expires_at=None if expires is None else format_time(issued + timedelta(seconds=expires)),
    )
    return leaf, root


MUTATIONS: dict[str, st.SearchStrategy[object]] = {
    "cert_id": st.from_regex(r"\A[0-9a-f]{32}\Z"),
    "dataset_id": ids,
    "facility_id": ids,
    "profile": profiles,
    "scope": scopes,
    "subject_key": st.binary(min_size=32, max_size=32),
    "issuer_id": st.from_regex(r"\A[0-9a-f]{32}\Z"),
    "signature": st.binary(min_size=64, max_size=64),
}
"""Well-formed replacement values per field (the times depend on the certificate: see ``mutation``)."""


def moment(text: str) -> datetime:
    """A certificate time (``2025-03-01T12:00:00Z``) as an aware datetime."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def mutation(cert: Certificate, field: str) -> st.SearchStrategy[object]:
    """Values for ``field`` that differ from ``cert``'s and keep the certificate well-formed."""
    issued = moment(cert.issued_at)
    if field == "issued_at":  # still before the expiry, if any
        latest = datetime(2090, 1, 1) if cert.expires_at is None else \
            moment(cert.expires_at).replace(tzinfo=None) - timedelta(seconds=1)
        strategy: st.SearchStrategy[object] = st.datetimes(
            min_value=datetime(2000, 1, 1), max_value=latest, timezones=st.just(timezone.utc)).map(format_time)
    elif field == "expires_at":  # none, or after the issue time
        strategy = st.one_of(st.none(), st.integers(1, 10**9).map(
            lambda s: format_time(issued + timedelta(seconds=s))))
    else:
        strategy = MUTATIONS[field]
    return strategy.filter(lambda v: v != getattr(cert, field))


def valid_moment(leaf: Certificate) -> datetime:
    """A moment at which ``leaf`` is valid: its issue time (its expiry, if any, is later)."""
    return moment(leaf.issued_at)


@settings(max_examples=150, deadline=None)
@given(chains())
def test_hypothesis_round_trip(pair: tuple[Certificate, Certificate]) -> None:
    leaf, root = pair
    for cert in (leaf, root):
        d = json.loads(json.dumps(cert.to_dict()))
        assert Certificate.from_dict(d) == cert
    assert verify_chain([leaf, root], root, now=valid_moment(leaf)) == leaf
    if leaf.expires_at is not None:
        expiry = moment(leaf.expires_at)
        assert verify_chain([leaf, root], root, now=expiry - timedelta(seconds=1)) == leaf
        with pytest.raises(TrustError, match="expired"):
            verify_chain([leaf, root], root, now=expiry)


@settings(max_examples=300, deadline=None)
@given(chains(), st.sampled_from([*sorted(MUTATIONS), "issued_at", "expires_at"]), st.data())
def test_hypothesis_any_single_field_change_breaks_verification(
    pair: tuple[Certificate, Certificate], field: str, data: st.DataObject
) -> None:
    leaf, root = pair
    when = valid_moment(leaf)
    assert verify_chain([leaf, root], root, now=when) == leaf  # so a refusal below is due to the change
    changes: dict[str, Any] = {field: data.draw(mutation(leaf, field))}
    changed = replace(leaf, **changes)  # well-formed by construction
    # Through the JSON form: refused by from_dict (altered) or by the chain check.
    with pytest.raises((CertError, TrustError)):
        parsed = Certificate.from_dict(json.loads(json.dumps(changed.to_dict())))
        verify_chain([parsed, root], root, now=when)
    # Even with the id recomputed, the issuer's signature no longer matches.
    if field != "cert_id":
        fixed = replace(changed, cert_id=changed.computed_id())
        with pytest.raises(TrustError, match="not signed by its issuer|names issuer|dataset|profile"):
            verify_chain([fixed, root], root, now=when)


# --------------------------------------------------------------------------- request files


def _request(tmp_path: Path, scope: str = "full") -> Path:
    req = make_request(
        DEVICE_KEY, dataset_id=DATASET, facility_id=FACILITY, profile=PROFILE, scope=scope,
        instance_id="1234567890abcdef", now=NOW,
    )
    return write_request(tmp_path, req)


def test_request_round_trip(tmp_path: Path) -> None:
    path = _request(tmp_path, f"user:{USER}")
    assert path.name == "ffffffff-12345678.certreq.json"
    req = read_request(path)
    assert req.device_key == DEVICE_KEY.public_key
    assert req.scope == f"user:{USER}"
    assert CertRequest.from_dict(req.to_dict()) == req
    assert not list(tmp_path.glob("*.partial"))
    obj = json.loads(path.read_text())
    assert obj["type"] == "bundlesync-cert-request" and obj["format"] == 1


def test_request_nonce_differs(tmp_path: Path) -> None:
    a = make_request(DEVICE_KEY, dataset_id=DATASET, facility_id=FACILITY, profile=PROFILE,
                     scope="full", instance_id="i1", now=NOW)
    b = make_request(DEVICE_KEY, dataset_id=DATASET, facility_id=FACILITY, profile=PROFILE,
                     scope="full", instance_id="i1", now=NOW)
    assert a.nonce != b.nonce


def test_request_with_bad_proof_of_possession(tmp_path: Path) -> None:
    path = _request(tmp_path, f"user:{USER}")
    obj = json.loads(path.read_text())
    # Widen the scope but keep the signature: the classic tamper.
    obj["scope"] = "full"
    path.write_text(json.dumps(obj))
    with pytest.raises(CertError, match="not signed by the device key") as info:
        read_request(path)
    one_line(info.value)
    # Signed by some other key than the one it names.
    obj = json.loads(_request(tmp_path).read_text())
    obj["device_key"] = OTHER_KEY.public_key.hex()
    path.write_text(json.dumps(obj))
    with pytest.raises(CertError, match="not signed by the device key"):
        read_request(path)


def _grant_file(tmp_path: Path) -> Path:
    root = make_root()
    leaf = issue_certificate(root, ROOT_KEY, DEVICE_KEY.public_key, "full", now=NOW)
    return write_grant(tmp_path, CertGrant(leaf=leaf, chain=(root,)), instance_id="abcdef012345")


def _bad_variants(good: dict[str, object]) -> list[bytes]:
    text = json.dumps(good).encode()
    out = [
        b"",
        text[: len(text) // 2],
        b"\x00\xff\xfe garbage",
        b"[]",
        b"null",
        b'"a string"',
        b"[" * 100000,
        json.dumps({**good, "type": "something-else"}).encode(),
        json.dumps({**good, "format": 2}).encode(),
        json.dumps({**good, "format": True}).encode(),
        json.dumps({k: v for k, v in good.items() if k != "type"}).encode(),
        json.dumps({k: v for k, v in good.items() if k != "format"}).encode(),
        json.dumps({**good, "surprise": 1}).encode(),
        text[:-1] + b', "type": "bundlesync-cert-request"}',  # duplicate key
    ]
    for key in good:
        if key not in ("type", "format"):
            out.append(json.dumps({k: v for k, v in good.items() if k != key}).encode())
            out.append(json.dumps({**good, key: 12}).encode())
            out.append(json.dumps({**good, key: None}).encode())
            out.append(json.dumps({**good, key: {"x": []}}).encode())
    return out


def test_bad_request_files_are_cert_errors(tmp_path: Path) -> None:
    good = json.loads(_request(tmp_path).read_text())
    target = tmp_path / "bad.certreq.json"
    for raw in _bad_variants(good):
        target.write_bytes(raw)
        with pytest.raises(CertError) as info:
            read_request(target)
        one_line(info.value)


def test_bad_grant_files_are_cert_errors(tmp_path: Path) -> None:
    good = json.loads(_grant_file(tmp_path).read_text())
    target = tmp_path / "bad.certgrant.json"
    variants = _bad_variants(good)
    leaf = dict(good["leaf"])
    leaf["scope"] = f"user:{USER}"
    variants.append(json.dumps({**good, "leaf": leaf}).encode())
    variants.append(json.dumps({**good, "chain": []}).encode())
    variants.append(json.dumps({**good, "chain": [good["leaf"]]}).encode())
    variants.append(json.dumps({**good, "chain": good["chain"] * 20}).encode())
    for raw in variants:
        target.write_bytes(raw)
        with pytest.raises(CertError) as info:
            read_grant(target, now=NOW)
        one_line(info.value)


def test_wrong_kind_of_file_is_named(tmp_path: Path) -> None:
    req = _request(tmp_path)
    grant = _grant_file(tmp_path)
    with pytest.raises(CertError, match="is a certificate request, not a certificate grant"):
        read_grant(req)
    with pytest.raises(CertError, match="is a certificate grant, not a certificate request"):
        read_request(grant)
    with pytest.raises(CertError, match="does not exist"):
        read_request(tmp_path / "missing.json")
    with pytest.raises(CertError, match="folder"):
        read_grant(tmp_path)


def test_chain_file_round_trip_and_damage(tmp_path: Path) -> None:
    root = make_root()
    path = tmp_path / "c" / "chain.json"
    write_chain_file(path, (root,))
    assert read_chain_file(path) == (root,)
    obj = json.loads(path.read_text())
    obj["chain"][0]["facility_id"] = "z" * 8
    path.write_text(json.dumps(obj))
    with pytest.raises(CertError, match="altered"):
        read_chain_file(path)


# --------------------------------------------------------------------------- keyring


@pytest.fixture
def authority(tmp_path: Path) -> KeyStore:
    ring = KeyStore(tmp_path / "authority")
    provision_facility(ring, dataset_id=DATASET, facility_id=FACILITY, profile=PROFILE, now=NOW)
    return ring


def test_provision_creates_authority(authority: KeyStore) -> None:
    root = authority.trusted_root(DATASET)
    assert root is not None and root.is_root
    root_key = authority.root_key(DATASET)
    assert root_key is not None and root_key.public_key == root.subject_key
    chain = authority.device_chain(DATASET)
    assert chain is not None and chain[-1] == root
    assert chain[0].subject_key == authority.device_key().public_key
    assert chain[0].scope == "full"
    assert authority.datasets() == [DATASET]
    if os.name == "posix":
        keys = authority.home / "keys"
        for key_file in (keys / "device.key", keys / f"root-{DATASET}.key"):
            assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(keys.stat().st_mode) == 0o700


def test_provision_is_idempotent(authority: KeyStore) -> None:
    chain = authority.device_chain(DATASET)
    assert chain is not None
    again = provision_facility(authority, 
        dataset_id=DATASET, facility_id=FACILITY, profile=PROFILE, now=NOW + timedelta(hours=1)
    )
    assert again == chain[0]
    assert authority.trusted_root(DATASET) == chain[-1]
    with pytest.raises(CertError, match="already provisioned"):
        provision_facility(authority, dataset_id=DATASET, facility_id=FACILITY, profile="other")


def test_provision_refused_when_trusting_foreign_root(tmp_path: Path, authority: KeyStore) -> None:
    device = KeyStore(tmp_path / "device")
    req = request_certificate(device, dataset_id=DATASET, facility_id=FACILITY, profile=PROFILE, scope="full",
                         instance_id="dev1", out_dir=tmp_path / "usb", now=NOW)
    install_grant(device, issue_grant(authority, req, tmp_path / "usb", now=NOW), now=NOW)
    with pytest.raises(CertError, match="whose key it does not hold") as info:
        provision_facility(device, dataset_id=DATASET, facility_id=FACILITY, profile=PROFILE)
    one_line(info.value)


def test_full_round_trip(tmp_path: Path, authority: KeyStore) -> None:
    usb = tmp_path / "usb"
    learner = KeyStore(tmp_path / "learner")
    assert learner.datasets() == []
    assert learner.trusted_root(DATASET) is None
    req_path = request_certificate(learner, 
        dataset_id=DATASET, facility_id=FACILITY, profile=PROFILE, scope=f"user:{USER}",
        instance_id="0a1b2c3d4e5f60718293a4b5c6d7e8f9", out_dir=usb, now=NOW,
    )
    assert req_path.name == f"{FACILITY[:8]}-0a1b2c3d.certreq.json"
    grant_path = issue_grant(authority, req_path, usb, now=NOW)
    assert grant_path.name == f"{FACILITY[:8]}-0a1b2c3d.certgrant.json"
    leaf = install_grant(learner, grant_path, now=NOW)
    assert leaf.scope == f"user:{USER}"
    assert leaf.subject_key == learner.device_key().public_key
    assert learner.trusted_root(DATASET) == authority.trusted_root(DATASET)
    assert learner.datasets() == [DATASET]
    assert learner.root_key(DATASET) is None
    chain = learner.device_chain(DATASET)
    assert chain is not None and chain[0] == leaf
    root = learner.trusted_root(DATASET)
    assert root is not None
    assert verify_chain(chain, root, dataset_id=DATASET, now=NOW) == leaf
    # Each side verifies the other's chain against its own trusted root.
    auth_chain = authority.device_chain(DATASET)
    assert auth_chain is not None
    verify_chain(auth_chain, root, now=NOW)
    # Installing again is a no-op.
    before = (learner.home / "certs" / DATASET / "device-chain.json").read_bytes()
    assert install_grant(learner, grant_path, now=NOW) == leaf
    assert (learner.home / "certs" / DATASET / "device-chain.json").read_bytes() == before
    assert not list(usb.glob("*.partial"))


def test_install_grant_for_another_device_is_refused(tmp_path: Path, authority: KeyStore) -> None:
    usb = tmp_path / "usb"
    a, b = KeyStore(tmp_path / "a"), KeyStore(tmp_path / "b")
    grant = issue_grant(authority, 
        request_certificate(a, dataset_id=DATASET, facility_id=FACILITY, profile=PROFILE, scope="full",
                  instance_id="aaaa", out_dir=usb, now=NOW),
        usb, now=NOW,
    )
    b.ensure_device_key()
    with pytest.raises(CertError, match="not this device's key") as info:
        install_grant(b, grant, now=NOW)
    one_line(info.value)
    assert b.trusted_root(DATASET) is None  # nothing was trusted on the way
    fresh = KeyStore(tmp_path / "fresh")
    with pytest.raises(CertError, match="has no key yet"):
        install_grant(fresh, grant, now=NOW)


def test_install_grant_from_another_root_is_refused(tmp_path: Path, authority: KeyStore) -> None:
    usb = tmp_path / "usb"
    impostor = KeyStore(tmp_path / "impostor")
    provision_facility(impostor, dataset_id=DATASET, facility_id=FACILITY, profile=PROFILE, now=NOW)
    device = KeyStore(tmp_path / "device")
    req = request_certificate(device, dataset_id=DATASET, facility_id=FACILITY, profile=PROFILE, scope="full",
                         instance_id="dev", out_dir=usb, now=NOW)
    install_grant(device, issue_grant(authority, req, usb, now=NOW), now=NOW)
    trusted = device.trusted_root(DATASET)
    evil = issue_grant(impostor, req, tmp_path / "evil", now=NOW)
    with pytest.raises(CertError, match="grant's root differs from the trusted root of facility"):
        install_grant(device, evil, now=NOW)
    assert device.trusted_root(DATASET) == trusted


def test_issue_requires_the_authority(tmp_path: Path, authority: KeyStore) -> None:
    usb = tmp_path / "usb"
    device = KeyStore(tmp_path / "device")
    req = request_certificate(device, dataset_id=DATASET, facility_id=FACILITY, profile=PROFILE, scope="full",
                         instance_id="dev", out_dir=usb, now=NOW)
    with pytest.raises(StateError, match="not the authority of facility .*facility provision"):
        issue_grant(device, req, usb, now=NOW)
    other_profile = request_certificate(device, dataset_id=DATASET, facility_id=FACILITY, profile="other",
                                   scope="full", instance_id="dev2", out_dir=usb, now=NOW)
    with pytest.raises(CertError, match="profile"):
        issue_grant(authority, other_profile, usb, now=NOW)
    other_facility = request_certificate(device, dataset_id=DATASET, facility_id="g" * 32, profile=PROFILE,
                                    scope="full", instance_id="dev3", out_dir=usb, now=NOW)
    with pytest.raises(CertError, match="facility"):
        issue_grant(authority, other_facility, usb, now=NOW)


def test_install_replaces_device_cert_with_new_grant(tmp_path: Path, authority: KeyStore) -> None:
    usb = tmp_path / "usb"
    device = KeyStore(tmp_path / "device")
    for scope in (f"user:{USER}", "full"):
        req = request_certificate(device, dataset_id=DATASET, facility_id=FACILITY, profile=PROFILE,
                             scope=scope, instance_id="dev", out_dir=usb, now=NOW)
        leaf = install_grant(device, issue_grant(authority, req, usb, now=NOW), now=NOW)
        chain = device.device_chain(DATASET)
        assert chain is not None and chain[0] == leaf and leaf.scope == scope


def test_keyring_refuses_world_readable_device_key(tmp_path: Path) -> None:
    if os.name != "posix":
        pytest.skip("POSIX file modes")
    ring = KeyStore(tmp_path / "home")
    ring.ensure_device_key()
    (tmp_path / "home" / "keys" / "device.key").chmod(0o644)
    with pytest.raises(CertError, match="chmod 600"):
        ring.device_key()


def test_keyring_refuses_path_like_dataset_ids(tmp_path: Path) -> None:
    ring = KeyStore(tmp_path / "home")
    for bad in ("../x", "a/b", ""):
        with pytest.raises(CertError, match="dataset id"):
            ring.trusted_root(bad)
        with pytest.raises(CertError, match="dataset id"):
            ring.root_key(bad)


@pytest.mark.parametrize("unknown", [None, ""])
@pytest.mark.parametrize("named", [FACILITY, DATASET])
def test_fresh_device_request_without_dataset(
    tmp_path: Path, authority: KeyStore, unknown: str | None, named: str
) -> None:
    # A device with an empty DB knows only what the operator typed (facility or dataset id).
    usb = tmp_path / "usb"
    fresh = KeyStore(tmp_path / "fresh")
    req = request_certificate(fresh, dataset_id=unknown, facility_id=named, profile=PROFILE, scope="full",
                        instance_id="fresh1", out_dir=usb, now=NOW)
    assert json.loads(req.read_text())["dataset_id"] is None
    assert read_request(req).dataset_id is None
    leaf = install_grant(fresh, issue_grant(authority, req, usb, now=NOW), now=NOW)
    assert (leaf.dataset_id, leaf.facility_id) == (DATASET, FACILITY)
    assert fresh.datasets() == [DATASET]
    stranger = KeyStore(tmp_path / "stranger")
    other = request_certificate(fresh, dataset_id=None, facility_id="unknownfacility", profile=PROFILE,
                          scope="full", instance_id="fresh2", out_dir=usb, now=NOW)
    with pytest.raises(StateError, match="not the authority of facility unknownfacility"):
        issue_grant(authority, other, usb, now=NOW)
    with pytest.raises(StateError):
        issue_grant(stranger, req, usb, now=NOW)
