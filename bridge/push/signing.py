r"""ACS3-HMAC-SHA256 (Alibaba Cloud signature V3) request signing; pure, no I/O.

::

    CanonicalRequest = METHOD \n PATH \n CANONICAL_QUERY \n CANONICAL_HEADERS \n
                       SIGNED_HEADERS \n BODY_SHA256
    StringToSign     = "ACS3-HMAC-SHA256\n" + hex(SHA256(CanonicalRequest))
    Signature        = hex(HMAC-SHA256(AccessKeySecret, StringToSign))
    Authorization    = ACS3-HMAC-SHA256 Credential=<id>,SignedHeaders=<a;b;c>,Signature=<hex>

The same functions serve both sides: the pusher signs with :func:`push_headers` and the local
cloud stub verifies with :func:`parse_authorization`, :func:`canonical_request`,
:func:`string_to_sign` and :func:`signature`.
"""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import quote

__all__ = [
    "ACTION",
    "ALGORITHM",
    "CONTENT_TYPE",
    "DATE_FORMAT",
    "PUSH_PATH",
    "UNSIGNED_HEADERS",
    "VERSION",
    "Credentials",
    "canonical_request",
    "parse_authorization",
    "push_headers",
    "sign",
    "signature",
    "string_to_sign",
]

ALGORITHM = "ACS3-HMAC-SHA256"
PUSH_PATH = "/api/v1/data/increment/push"
ACTION = "PushDeviceData"
VERSION = "2022-09-23"
CONTENT_TYPE = "application/json; charset=utf-8"
DATE_FORMAT = "%Y-%m-%dT%H:%M:%SZ"

UNSIGNED_HEADERS = frozenset({"authorization", "content-length", "accept-encoding", "connection"})
"""Headers never signed: the HTTP client or a proxy may add or rewrite them in transit."""

_STRING_TO_SIGN_PREFIX = ALGORITHM + "\n"
_AUTHORIZATION_PREFIX = ALGORITHM + " "
_HEX_DIGITS = frozenset("0123456789abcdef")
_RFC3986_SAFE = "-_.~"


@dataclass(frozen=True, slots=True)
class Credentials:
    """An AccessKey pair, optionally with an STS security token.

    ``repr()`` shows the AccessKey id only; the secret and the token never appear in it.

    Attributes:
        access_key_id: the AccessKey id (``STS.…`` for STS credentials).
        access_key_secret: the AccessKey secret.
        security_token: the STS security token, ``None`` for a permanent AccessKey.
    """

    access_key_id: str
    access_key_secret: str = field(repr=False)
    security_token: str | None = field(default=None, repr=False)


def canonical_request(  # noqa: PLR0917 - positional on purpose: the six parts in spec order
    method: str,
    path: str,
    query: Mapping[str, str],
    headers: Mapping[str, str],
    signed_headers: Sequence[str],
    body_sha256: str,
) -> str:
    """Build the V3 canonical request.

    Args:
        method: the HTTP method; upper-cased.
        path: the request path exactly as sent (already percent-encoded).
        query: query parameters, unencoded; RFC 3986 encoded and sorted here.
        headers: the request headers; looked up by lower-case name, so pass a dict keyed by
            lower-case names or a case-insensitive mapping.
        signed_headers: the names of the headers to sign, in any order and case.
        body_sha256: lower-case hex SHA-256 of the exact body bytes.

    Returns:
        The canonical request text.

    Raises:
        ValueError: a name in ``signed_headers`` is not in ``headers``.
    """
    return _canonical(
        method=method.upper(),
        path=path,
        query_text=_canonical_query(query),
        headers=headers,
        names=sorted({name.lower() for name in signed_headers}),
        body_sha256=body_sha256,
    )


def string_to_sign(canonical: str) -> str:
    r"""Turn a canonical request into the V3 string to sign.

    Args:
        canonical: the output of :func:`canonical_request`.

    Returns:
        ``"ACS3-HMAC-SHA256\n"`` followed by the hex SHA-256 of ``canonical``.
    """
    return _STRING_TO_SIGN_PREFIX + hashlib.sha256(canonical.encode()).hexdigest()


def signature(secret: str, string_to_sign: str) -> str:
    """Compute the V3 signature.

    Args:
        secret: the AccessKey secret.
        string_to_sign: the output of :func:`string_to_sign`.

    Returns:
        The lower-case hex HMAC-SHA256 of ``string_to_sign`` keyed with ``secret``.
    """
    return hmac.digest(secret.encode(), string_to_sign.encode(), "sha256").hex()


def sign(
    *,
    method: str,
    path: str,
    query: Mapping[str, str] | None,
    headers: Mapping[str, str],
    body: bytes,
    credentials: Credentials,
) -> dict[str, str]:
    """Sign a request.

    Every header is signed except ``authorization``, ``content-length``, ``accept-encoding``
    and ``connection``. A given ``authorization`` or ``x-acs-content-sha256`` is replaced.

    Args:
        method: the HTTP method.
        path: the request path exactly as sent.
        query: query parameters, unencoded, or ``None``.
        headers: the headers to send; not modified.
        body: the exact body bytes that will be sent.
        credentials: who signs.

    Returns:
        A new dict with lower-case names: ``headers`` plus ``x-acs-content-sha256``, with STS
        credentials ``x-acs-security-token`` and ``x-acs-accesskey-id``, and ``authorization``.
    """
    out = {name.lower(): value for name, value in headers.items()}
    out.pop("authorization", None)
    return _sign_into(
        out, method=method, path=path, query=query, body=body, credentials=credentials
    )


def push_headers(
    *,
    host: str,
    body: bytes,
    credentials: Credentials,
    user_agent: str,
    now: datetime | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """Build the complete signed header set of one ``PushDeviceData`` attempt.

    Call once per attempt: every retry needs a fresh date and nonce.

    Args:
        host: the ``Host`` header value (the endpoint's host, with ``:port`` if not default).
        body: the exact JSON body bytes that will be sent.
        credentials: who signs.
        user_agent: the ``User-Agent`` value.
        now: the signing time (timezone-aware); the current time when ``None``.
        nonce: the signature nonce; a fresh uuid4 hex when ``None``.

    Returns:
        A new dict of lower-case header names to send with ``POST`` :data:`PUSH_PATH`.

    Raises:
        ValueError: ``now`` is a naive datetime.
    """
    if now is None:
        date = time.strftime(DATE_FORMAT, time.gmtime())
    elif now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    else:
        date = now.astimezone(UTC).strftime(DATE_FORMAT)
    out = {
        "host": host,
        "accept": "application/json",
        "content-type": CONTENT_TYPE,
        "user-agent": user_agent,
        "x-acs-action": ACTION,
        "x-acs-version": VERSION,
        "x-acs-date": date,
        "x-acs-signature-nonce": uuid.uuid4().hex if nonce is None else nonce,
    }
    return _sign_into(
        out, method="POST", path=PUSH_PATH, query=None, body=body, credentials=credentials
    )


def parse_authorization(value: str) -> tuple[str, list[str], str]:
    """Split a V3 ``Authorization`` header into its parts.

    Args:
        value: ``ACS3-HMAC-SHA256 Credential=<id>,SignedHeaders=<a;b>,Signature=<hex>``.

    Returns:
        The AccessKey id, the signed header names (lower-cased, as listed) and the signature.

    Raises:
        ValueError: not the V3 algorithm, a part missing, repeated, unknown or empty, or the
            signature is not 64 lower-case hex digits.
    """
    value = value.strip()
    if not value.startswith(_AUTHORIZATION_PREFIX):
        raise ValueError(f"authorization must start with {ALGORITHM!r}")
    parts: dict[str, str] = {}
    for item in value[len(_AUTHORIZATION_PREFIX) :].split(","):
        key, sep, part = item.strip().partition("=")
        if not sep or not part:
            raise ValueError(f"authorization part {key!r} has no value")
        if key not in {"Credential", "SignedHeaders", "Signature"}:
            raise ValueError(f"unknown authorization part {key!r}")
        if key in parts:
            raise ValueError(f"authorization part {key!r} is repeated")
        parts[key] = part
    try:
        access_key_id = parts["Credential"]
        names = parts["SignedHeaders"].lower().split(";")
        sig = parts["Signature"]
    except KeyError as exc:
        raise ValueError(f"authorization lacks {exc.args[0]}") from None
    if not all(names):
        raise ValueError("SignedHeaders has an empty name")
    if len(sig) != 64 or not _HEX_DIGITS.issuperset(sig):
        raise ValueError("Signature must be 64 lower-case hex digits")
    return access_key_id, names, sig


def _sign_into(
    out: dict[str, str],
    *,
    method: str,
    path: str,
    query: Mapping[str, str] | None,
    body: bytes,
    credentials: Credentials,
) -> dict[str, str]:
    """Add content hash, STS headers and ``authorization`` to ``out`` (lower-case names)."""
    body_sha256 = hashlib.sha256(body).hexdigest()
    out["x-acs-content-sha256"] = body_sha256
    if credentials.security_token is not None:
        out["x-acs-security-token"] = credentials.security_token
        out["x-acs-accesskey-id"] = credentials.access_key_id
    names = sorted(name for name in out if name not in UNSIGNED_HEADERS)
    query_text = _canonical_query(query) if query else ""
    canonical = _canonical(
        method=method.upper(),
        path=path,
        query_text=query_text,
        headers=out,
        names=names,
        body_sha256=body_sha256,
    )
    sig = signature(credentials.access_key_secret, string_to_sign(canonical))
    out["authorization"] = (
        f"{_AUTHORIZATION_PREFIX}Credential={credentials.access_key_id},"
        f"SignedHeaders={';'.join(names)},Signature={sig}"
    )
    return out


def _canonical(
    *,
    method: str,
    path: str,
    query_text: str,
    headers: Mapping[str, str],
    names: list[str],
    body_sha256: str,
) -> str:
    """Join the canonical request from parts; ``names`` are lower-case, unique and sorted."""
    lines = []
    for name in names:
        try:
            value = headers[name]
        except KeyError:
            raise ValueError(f"signed header {name!r} is not in the request") from None
        lines.append(f"{name}:{value.strip()}\n")
    return f"{method}\n{path}\n{query_text}\n{''.join(lines)}\n{';'.join(names)}\n{body_sha256}"


def _canonical_query(query: Mapping[str, str]) -> str:
    """Encode ``query`` the V3 way: RFC 3986 names and values, sorted, joined by ``&``."""
    if not query:
        return ""
    pairs = sorted(
        (quote(name, safe=_RFC3986_SAFE), quote(value, safe=_RFC3986_SAFE))
        for name, value in query.items()
    )
    return "&".join(f"{name}={value}" for name, value in pairs)
