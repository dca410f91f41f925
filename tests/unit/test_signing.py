"""Tests of ACS3-HMAC-SHA256 signing against requests captured from the vendor's SDK."""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.push.signing import (
    ACTION,
    CONTENT_TYPE,
    PUSH_PATH,
    VERSION,
    Credentials,
    canonical_request,
    parse_authorization,
    push_headers,
    sign,
    signature,
    string_to_sign,
)
from tests.support import PUSH_VECTORS, load_push_vector

V3_VECTORS = ("push_v3_ak", "push_v3_sts", "push_v3_sts_prodhost_offline")
SECRET = "testsecret"


def _load(name: str) -> dict[str, Any]:
    return load_push_vector(name)


def _recompute(headers: dict[str, str], body: bytes, secret: str, path: str = PUSH_PATH) -> str:
    """Recompute the signature the way a verifier does, from the Authorization's header list."""
    _, names, _ = parse_authorization(headers["authorization"])
    canonical = canonical_request(
        "POST", path, {}, headers, names, hashlib.sha256(body).hexdigest()
    )
    return signature(secret, string_to_sign(canonical))


def _split_canonical_txt(text: str) -> tuple[str, str]:
    match = re.fullmatch(
        r"=== canonical request ===\n(.*)\n=== string to sign ===\n(.*)\n", text, re.DOTALL
    )
    assert match is not None, "unexpected *.canonical.txt layout"
    return match.group(1), match.group(2)


@pytest.fixture(params=V3_VECTORS)
def vector(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Each captured V3 request."""
    return _load(request.param)


def test_vectors_all_v3_captures_are_covered() -> None:
    """Test that every push_v3_*.json in tests/data/vectors is one of the vectors tested here."""
    found = {path.stem for path in PUSH_VECTORS.glob("push_v3_*.json")}

    assert set(V3_VECTORS) == found


def test_signing_vector_signature_recomputed(vector: dict[str, Any]) -> None:
    """Test that the captured Signature is recomputed byte for byte from headers, body, secret."""
    _, _, captured = parse_authorization(vector["headers"]["authorization"])

    assert captured == _recompute(vector["headers"], vector["body"], SECRET, vector["path"])


def test_signing_vector_content_sha256_matches_body(vector: dict[str, Any]) -> None:
    """Test that the captured x-acs-content-sha256 is the SHA-256 of the captured body."""
    expected = hashlib.sha256(vector["body"]).hexdigest()

    assert expected == vector["headers"]["x-acs-content-sha256"]


def test_signing_vector_canonical_text_matches_file(vector: dict[str, Any]) -> None:
    """Test that the canonical request and string to sign equal the *.canonical.txt content."""
    expected_canonical, expected_sts = _split_canonical_txt(vector["canonical_txt"])
    headers = vector["headers"]
    _, names, _ = parse_authorization(headers["authorization"])

    canonical = canonical_request(
        vector["method"], vector["path"], vector["query"], headers, names,
        headers["x-acs-content-sha256"],
    )  # fmt: skip

    assert expected_canonical == canonical
    assert expected_sts == string_to_sign(canonical)


def test_signing_sign_reproduces_vector_authorization(vector: dict[str, Any]) -> None:
    """Test that sign() over the captured headers gives the captured Authorization exactly."""
    headers = {k: v for k, v in vector["headers"].items() if k != "authorization"}

    signed = sign(
        method=vector["method"],
        path=vector["path"],
        query=None,
        headers=headers,
        body=vector["body"],
        credentials=Credentials(**vector["credentials"]),
    )

    assert vector["headers"]["authorization"] == signed["authorization"]


def test_signing_sign_skips_unsigned_headers(vector: dict[str, Any]) -> None:
    """Test that authorization, content-length, accept-encoding, connection are never signed."""
    headers = {k: v for k, v in vector["headers"].items() if k != "authorization"}
    headers["Connection"] = "keep-alive"

    signed = sign(
        method="POST",
        path=PUSH_PATH,
        query=None,
        headers=headers,
        body=vector["body"],
        credentials=Credentials(**vector["credentials"]),
    )
    _, names, _ = parse_authorization(signed["authorization"])

    assert not {"authorization", "content-length", "accept-encoding", "connection"} & set(names)
    expected_connection = "keep-alive"
    assert expected_connection == signed["connection"]


@given(index=st.integers(min_value=0), delta=st.integers(min_value=1, max_value=255))
def test_signing_any_changed_body_byte_changes_signature(index: int, delta: int) -> None:
    """Test that changing any one body byte gives a different signature."""
    vector = _load("push_v3_ak")
    body = bytearray(vector["body"])
    body[index % len(body)] = (body[index % len(body)] + delta) % 256

    assert _recompute(vector["headers"], vector["body"], SECRET) != _recompute(
        vector["headers"], bytes(body), SECRET
    )


def test_signing_changed_secret_changes_signature(vector: dict[str, Any]) -> None:
    """Test that another secret (even one character off) gives a different signature."""
    _, _, captured = parse_authorization(vector["headers"]["authorization"])

    for secret in ("testsecreT", "testsecret ", "", "x"):
        assert captured != _recompute(vector["headers"], vector["body"], secret, vector["path"])


def test_signing_changed_signed_header_changes_signature(vector: dict[str, Any]) -> None:
    """Test that changing the value of any signed header gives a different signature."""
    headers = vector["headers"]
    _, names, captured = parse_authorization(headers["authorization"])

    for name in names:
        changed = {**headers, name: headers[name] + "x"}
        assert captured != _recompute(changed, vector["body"], SECRET, vector["path"]), name


def test_signing_unsigned_header_change_keeps_signature(vector: dict[str, Any]) -> None:
    """Test that headers left out of SignedHeaders do not take part in the signature."""
    headers = {**vector["headers"], "content-length": "1", "accept-encoding": "gzip"}
    _, _, captured = parse_authorization(headers["authorization"])

    assert captured == _recompute(headers, vector["body"], SECRET, vector["path"])


def test_signing_sign_does_not_mutate_and_lowercases() -> None:
    """Test that sign() returns a new dict with lower-case names and leaves its input alone."""
    headers = {"Host": "example.com", "X-Acs-Date": "2026-11-26T09:21:27Z", "Authorization": "x"}
    before = dict(headers)

    signed = sign(
        method="post",
        path=PUSH_PATH,
        query=None,
        headers=headers,
        body=b"{}",
        credentials=Credentials("id", "secret"),
    )

    assert before == headers
    assert all(name == name.lower() for name in signed)
    assert {"host", "x-acs-date", "x-acs-content-sha256", "authorization"} == set(signed)
    assert hashlib.sha256(b"{}").hexdigest() == signed["x-acs-content-sha256"]
    assert signed["authorization"].startswith(
        "ACS3-HMAC-SHA256 Credential=id,SignedHeaders=host;x-acs-content-sha256;x-acs-date,"
    )


def test_signing_sign_adds_sts_headers() -> None:
    """Test that STS credentials add and sign x-acs-security-token and x-acs-accesskey-id."""
    signed = sign(
        method="POST",
        path=PUSH_PATH,
        query=None,
        headers={"host": "h"},
        body=b"",
        credentials=Credentials("STS.id", "secret", "token+/=="),
    )
    _, names, _ = parse_authorization(signed["authorization"])

    expected = {"x-acs-security-token": "token+/==", "x-acs-accesskey-id": "STS.id"}
    assert expected.items() <= signed.items()
    assert {"x-acs-security-token", "x-acs-accesskey-id"} <= set(names)


def test_signing_canonical_request_encodes_and_sorts() -> None:
    """Test that the canonical form sorts names, trims values and RFC 3986 encodes the query."""
    headers = {"b-head": "  two  ", "a-head": "one", "unsigned": "zzz"}

    canonical = canonical_request(
        "get", "/p", {"b": "x y/~", "a": "1*"}, headers, ["B-Head", "a-head"], "abc"
    )

    expected = "GET\n/p\na=1%2A&b=x%20y%2F~\na-head:one\nb-head:two\n\na-head;b-head\nabc"
    assert expected == canonical


def test_signing_canonical_request_missing_signed_header_raises() -> None:
    """Test that signing a header the request lacks raises ValueError."""
    with pytest.raises(ValueError, match="x-acs-date"):
        canonical_request("POST", "/", {}, {"host": "h"}, ["host", "x-acs-date"], "")


def test_signing_push_headers_verify() -> None:
    """Test that push_headers output verifies with the same functions a server uses."""
    body = b'{"deviceType":"1","devices":[]}'
    credentials = Credentials("testid", "testsecret")

    headers = push_headers(
        host="127.0.0.1:8080", body=body, credentials=credentials, user_agent="energy-bridge/0.1"
    )
    access_key_id, _, claimed = parse_authorization(headers["authorization"])

    assert credentials.access_key_id == access_key_id
    assert claimed == _recompute(headers, body, "testsecret")
    assert {
        "host": "127.0.0.1:8080",
        "accept": "application/json",
        "content-type": CONTENT_TYPE,
        "user-agent": "energy-bridge/0.1",
        "x-acs-action": ACTION,
        "x-acs-version": VERSION,
        "x-acs-content-sha256": hashlib.sha256(body).hexdigest(),
    }.items() <= headers.items()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", headers["x-acs-date"])
    assert re.fullmatch(r"[0-9a-f]{32}", headers["x-acs-signature-nonce"])


def test_signing_push_headers_reproduce_vector() -> None:
    """Test that push_headers with the captured date, nonce and user agent gives its signature."""
    vector = _load("push_v3_sts_prodhost_offline")
    expected = vector["headers"]
    headers = push_headers(
        host=expected["host"],
        body=vector["body"],
        credentials=Credentials(**vector["credentials"]),
        user_agent=expected["user-agent"],
        now=datetime(2026, 11, 26, 17, 23, tzinfo=timezone(timedelta(hours=8))),
        nonce=expected["x-acs-signature-nonce"],
    )
    # The SDK also signs x-acs-credentials-provider, which the bridge does not send.
    headers["x-acs-credentials-provider"] = expected["x-acs-credentials-provider"]
    resigned = sign(
        method="POST",
        path=PUSH_PATH,
        query=None,
        headers=headers,
        body=vector["body"],
        credentials=Credentials(**vector["credentials"]),
    )

    assert expected["x-acs-date"] == headers["x-acs-date"]
    assert expected == resigned


def test_signing_push_headers_fresh_nonce_each_call() -> None:
    """Test that every push_headers call gets its own nonce and so its own signature."""
    credentials = Credentials("testid", "testsecret")
    now = datetime(2026, 1, 1, tzinfo=UTC)

    first, second = (
        push_headers(host="h", body=b"{}", credentials=credentials, user_agent="u", now=now)
        for _ in range(2)
    )

    assert first["x-acs-signature-nonce"] != second["x-acs-signature-nonce"]
    assert first["authorization"] != second["authorization"]


def test_signing_push_headers_naive_datetime_raises() -> None:
    """Test that a naive datetime is refused instead of being taken for UTC."""
    with pytest.raises(ValueError, match="timezone-aware"):
        push_headers(
            host="h",
            body=b"",
            credentials=Credentials("i", "s"),
            user_agent="u",
            now=datetime(2026, 1, 1),
        )


def test_signing_parse_authorization_parts() -> None:
    """Test that parse_authorization returns id, header names and signature."""
    value = "ACS3-HMAC-SHA256 Credential=STS.x,SignedHeaders=Host;x-acs-date,Signature=" + "a" * 64

    expected = ("STS.x", ["host", "x-acs-date"], "a" * 64)
    assert expected == parse_authorization(value)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "acs testid:UcCP9aJxzHIoIbLitELYYAabKB8=",
        "ACS3-HMAC-SHA1 Credential=a,SignedHeaders=host,Signature=" + "a" * 64,
        "ACS3-HMAC-SHA256 SignedHeaders=host,Signature=" + "a" * 64,
        "ACS3-HMAC-SHA256 Credential=a,Signature=" + "a" * 64,
        "ACS3-HMAC-SHA256 Credential=a,SignedHeaders=host",
        "ACS3-HMAC-SHA256 Credential=,SignedHeaders=host,Signature=" + "a" * 64,
        "ACS3-HMAC-SHA256 Credential=a,SignedHeaders=host;;date,Signature=" + "a" * 64,
        "ACS3-HMAC-SHA256 Credential=a,SignedHeaders=host,Signature=" + "A" * 64,
        "ACS3-HMAC-SHA256 Credential=a,SignedHeaders=host,Signature=" + "a" * 63,
        "ACS3-HMAC-SHA256 Credential=a,Credential=b,SignedHeaders=host,Signature=" + "a" * 64,
        "ACS3-HMAC-SHA256 Credential=a,SignedHeaders=host,Signature=" + "a" * 64 + ",Extra=1",
        "ACS3-HMAC-SHA256 Credential",
    ],
)
def test_signing_parse_authorization_malformed_raises(value: str) -> None:
    """Test that a malformed Authorization header raises ValueError."""
    with pytest.raises(ValueError, match=r"."):
        parse_authorization(value)


def test_signing_credentials_repr_hides_secrets() -> None:
    """Test that repr() and str() of Credentials show neither the secret nor the token."""
    credentials = Credentials("testid", "s3cr3t-value", "t0ken-value")

    for text in (repr(credentials), str(credentials), f"{credentials!r}"):
        assert "testid" in text
        assert "s3cr3t" not in text
        assert "t0ken" not in text
