"""Tests of the cloud stub over real HTTP on loopback."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from bridge.push.signing import PUSH_PATH, Credentials, push_headers, sign
from bridge.tools.cloud_stub import (
    KEYS_ENV,
    CloudStub,
    Faults,
    StubOptions,
    add_arguments,
    options_from_args,
    parse_keys,
)
from tests.support import load_push_vector

REPO = Path(__file__).resolve().parents[2]
KEY = Credentials("testid", "testsecret")
GOOD_BODY = {
    "deviceType": "1",
    "devices": [
        {"deviceId": "m1", "recordTime": "2021-09-08 18:40:00", "data": {"Ua": "220.1"}},
        {"deviceId": "m2", "recordTime": "2021-09-08 18:40:00", "data": {"Ua": "230.5"}},
    ],
}


def _load(name: str) -> dict[str, Any]:
    vector = load_push_vector(name)
    if "headers_wire" not in vector:
        # Captured before transport: add what the HTTP client would (unsigned) on the wire.
        vector["headers_wire"] = [
            *vector["headers"].items(),
            ("Content-Length", str(len(vector["body"]))),
        ]
    vector["epoch"] = (
        datetime.strptime(vector["headers"]["x-acs-date"], "%Y-%m-%dT%H:%M:%SZ")
        .replace(tzinfo=UTC)
        .timestamp()
    )
    vector["credentials"] = Credentials(**vector["credentials"])
    return vector


@dataclass
class Answer:
    """One HTTP answer."""

    status: int
    headers: Mapping[str, str]
    body: Any

    @property
    def code(self) -> str | None:
        """The gateway error Code, if any."""
        return self.body.get("Code") if isinstance(self.body, dict) else None


@dataclass
class Running:
    """A stub served on loopback with a client session."""

    stub: CloudStub
    server: TestServer
    session: aiohttp.ClientSession

    @property
    def host(self) -> str:
        """The Host header value to sign."""
        return f"127.0.0.1:{self.server.port}"

    async def request(self, method: str, path: str, **kwargs: Any) -> Answer:
        """Send one request and read the JSON answer."""
        async with self.session.request(method, self.server.make_url(path), **kwargs) as resp:
            raw = await resp.read()
            return Answer(resp.status, dict(resp.headers), orjson.loads(raw) if raw else None)

    async def push(
        self,
        body: Any = None,
        *,
        credentials: Credentials = KEY,
        now: datetime | None = None,
        nonce: str | None = None,
        tweak: Callable[[dict[str, str]], object] | None = None,
    ) -> Answer:
        """Push ``body`` (a dict is serialised) signed with ``push_headers``."""
        raw = body if isinstance(body, bytes) else orjson.dumps(GOOD_BODY if body is None else body)
        headers = push_headers(
            host=self.host,
            body=raw,
            credentials=credentials,
            user_agent="energy-bridge-test",
            now=now,
            nonce=nonce,
        )
        if tweak is not None:
            tweak(headers)
        return await self.request("POST", PUSH_PATH, data=raw, headers=headers)

    async def replay(self, vector: dict[str, Any], body: bytes | None = None) -> Answer:
        """Send a captured request byte for byte (``body`` replaces the captured body)."""
        payload = vector["body"] if body is None else body
        head = "".join(f"{name}: {value}\r\n" for name, value in vector["headers_wire"])
        raw = f"POST {vector['path']} HTTP/1.1\r\n{head}\r\n".encode() + payload
        reader, writer = await asyncio.open_connection("127.0.0.1", self.server.port)
        try:
            writer.write(raw)
            await writer.drain()
            status_line = await reader.readline()
            headers: dict[str, str] = {}
            while (line := await reader.readline()) not in {b"\r\n", b""}:
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            content = await reader.readexactly(int(headers.get("content-length", "0")))
        finally:
            writer.close()
            await writer.wait_closed()
        return Answer(int(status_line.split()[1]), headers, orjson.loads(content))


Serve = Callable[..., Awaitable[Running]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """A starter of stubs on 127.0.0.1; every stub it started stops at teardown.

    Call it as ``await serve(options, clock=...)``.
    """
    async with contextlib.AsyncExitStack() as stack:
        session = await stack.enter_async_context(aiohttp.ClientSession())

        async def start(
            options: StubOptions | None = None, *, clock: Callable[[], float] = time.time
        ) -> Running:
            stub = CloudStub(options, clock=clock)
            server = TestServer(stub.make_app(), host="127.0.0.1")
            await stack.enter_async_context(server)
            return Running(stub, server, session)

        yield start


async def _serve_vector(serve: Serve, vector: dict[str, Any], **options: Any) -> Running:
    """Serve a stub that knows the vector's key and whose clock reads the vector's date."""
    options.setdefault("keys", (vector["credentials"],))
    return await serve(StubOptions(**options), clock=lambda: vector["epoch"])


def _tamper(body: bytes) -> bytes:
    """Change exactly one byte (a digit of the first voltage), keeping the length."""
    index = body.index(b"220.1") + 4
    return body[:index] + b"2" + body[index + 1 :]


def _entry(device_id: str | None = "m1", **changes: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"recordTime": "2021-09-08 18:40:00", "data": {"Ua": "220.1"}}
    if device_id is not None:
        entry["deviceId"] = device_id
    entry.update(changes)
    return entry


V3_REPLAYABLE = ("push_v3_ak", "push_v3_sts", "push_v3_sts_prodhost_offline")


# -- signature, date, nonce, keys -----------------------------------------------------------


@pytest.mark.parametrize("name", V3_REPLAYABLE)
async def test_auth_accepts_captured_vector(serve: Serve, name: str) -> None:
    """Test that each captured vendor-SDK request replayed byte for byte is accepted."""
    vector = _load(name)
    running = await _serve_vector(serve, vector)

    answer = await running.replay(vector)
    received = await running.request("GET", "/_stub/received")

    sent = orjson.loads(vector["body"])["devices"]
    expected = ((200, "success"), [{"deviceType": "1", **entry} for entry in sent])
    assert expected == ((answer.status, answer.body["data"]), received.body["entries"])
    assert answer.body["requestId"]


@pytest.mark.parametrize("name", V3_REPLAYABLE)
@pytest.mark.parametrize("fix_content_sha", [False, True], ids=["stale-sha", "fixed-sha"])
async def test_auth_changed_body_byte_signature_does_not_match(
    serve: Serve, name: str, fix_content_sha: bool
) -> None:
    """Test that a captured request with one body byte changed is SignatureDoesNotMatch."""
    vector = _load(name)
    running = await _serve_vector(serve, vector)
    body = _tamper(vector["body"])
    if fix_content_sha:
        # Then only the signature itself can catch the change.
        vector["headers_wire"] = [
            (n, hashlib.sha256(body).hexdigest() if n.lower() == "x-acs-content-sha256" else v)
            for n, v in vector["headers_wire"]
        ]

    answer = await running.replay(vector, body)

    expected = (400, "SignatureDoesNotMatch")
    assert expected == (answer.status, answer.code)
    assert not running.stub.entries


async def test_auth_signature_checked_before_nonce(serve: Serve) -> None:
    """Test that a tampered replay of an accepted request is SignatureDoesNotMatch, not a replay."""
    vector = _load("push_v3_ak")
    running = await _serve_vector(serve, vector)

    first = await running.replay(vector)
    second = await running.replay(vector, _tamper(vector["body"]))

    expected = (200, "SignatureDoesNotMatch")
    assert expected == (first.status, second.code)


async def test_auth_wrong_secret_signature_does_not_match(serve: Serve) -> None:
    """Test that a request signed with another secret is SignatureDoesNotMatch."""
    running = await serve()

    answer = await running.push(credentials=Credentials("testid", "othersecret"))

    expected = (400, "SignatureDoesNotMatch")
    assert expected == (answer.status, answer.code)
    assert {"RequestId", "HostId", "Code", "Message", "Recommend"} == set(answer.body)


@pytest.mark.parametrize("offset", [901.0, -901.0, 86400.0])
async def test_auth_date_outside_window_is_expired(serve: Serve, offset: float) -> None:
    """Test that x-acs-date more than 900 s from the stub's clock is InvalidTimeStamp.Expired."""
    vector = _load("push_v3_ak")
    running = await serve(StubOptions(), clock=lambda: vector["epoch"] + offset)

    answer = await running.replay(vector)

    expected = (400, "InvalidTimeStamp.Expired")
    assert expected == (answer.status, answer.code)


@pytest.mark.parametrize("offset", [899.0, -899.0])
async def test_auth_date_inside_window_is_accepted(serve: Serve, offset: float) -> None:
    """Test that x-acs-date within 900 s of the stub's clock is accepted."""
    vector = _load("push_v3_ak")
    running = await serve(StubOptions(), clock=lambda: vector["epoch"] + offset)

    answer = await running.replay(vector)

    expected = 200
    assert expected == answer.status


@pytest.mark.parametrize("date", [None, "yesterday", "2026-11-26 09:21:27", "1700000000"])
async def test_auth_missing_or_bad_date_is_expired(serve: Serve, date: str | None) -> None:
    """Test that a missing or unparseable (but signed) x-acs-date is InvalidTimeStamp.Expired."""
    running = await serve()

    def resign(headers: dict[str, str]) -> None:
        if date is None:
            del headers["x-acs-date"]
        else:
            headers["x-acs-date"] = date
        headers.update(
            sign(
                method="POST",
                path=PUSH_PATH,
                query=None,
                headers=headers,
                body=orjson.dumps(GOOD_BODY),
                credentials=KEY,
            )
        )

    answer = await running.push(tweak=resign)

    expected = (400, "InvalidTimeStamp.Expired")
    assert expected == (answer.status, answer.code)


async def test_auth_replayed_nonce_is_rejected(serve: Serve) -> None:
    """Test that the same captured request sent twice is SignatureNonceUsed the second time."""
    vector = _load("push_v3_ak")
    running = await _serve_vector(serve, vector)

    first = await running.replay(vector)
    second = await running.replay(vector)

    expected = (200, 400, "SignatureNonceUsed", 2)
    assert expected == (first.status, second.status, second.code, len(running.stub.entries))


async def test_auth_reused_nonce_with_new_body_is_rejected(serve: Serve) -> None:
    """Test that a nonce reused by a freshly signed request is SignatureNonceUsed."""
    running = await serve()

    first = await running.push(nonce="fixed-nonce")
    second = await running.push({**GOOD_BODY, "deviceType": "2"}, nonce="fixed-nonce")

    expected = (200, "SignatureNonceUsed")
    assert expected == (first.status, second.code)


async def test_auth_unknown_access_key_not_found(serve: Serve) -> None:
    """Test that a request from an AccessKey id the stub does not know is NotFound."""
    vector = _load("push_v3_ak")
    running = await _serve_vector(serve, vector, keys=(Credentials("otherid", "testsecret"),))

    answer = await running.replay(vector)

    expected = (404, "InvalidAccessKeyId.NotFound")
    assert expected == (answer.status, answer.code)


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "acs testid:UcCP9aJxzHIoIbLitELYYAabKB8=",
        "ACS3-HMAC-SHA256 Credential=testid,SignedHeaders=host",
        "ACS3-HMAC-SHA256 Credential=testid,SignedHeaders=host,Signature=xyz",
    ],
)
async def test_auth_missing_or_malformed_authorization_incomplete(
    serve: Serve, authorization: str | None
) -> None:
    """Test that a missing or malformed Authorization header is IncompleteSignature."""
    running = await serve()

    def replace(headers: dict[str, str]) -> None:
        if authorization is None:
            del headers["authorization"]
        else:
            headers["authorization"] = authorization

    answer = await running.push(tweak=replace)

    expected = (400, "IncompleteSignature")
    assert expected == (answer.status, answer.code)


async def test_auth_unsigned_acs_header_incomplete(serve: Serve) -> None:
    """Test that an x-acs-* header added after signing is IncompleteSignature."""
    running = await serve()

    answer = await running.push(tweak=lambda headers: headers.update({"x-acs-extra": "1"}))

    expected = (400, "IncompleteSignature")
    assert expected == (answer.status, answer.code)
    assert "x-acs-extra" in answer.body["Message"]


async def test_auth_empty_nonce_incomplete(serve: Serve) -> None:
    """Test that a signed but empty x-acs-signature-nonce is IncompleteSignature."""
    running = await serve()

    answer = await running.push(nonce="")

    expected = (400, "IncompleteSignature")
    assert expected == (answer.status, answer.code)


async def test_auth_accesskey_id_header_mismatch_rejected(serve: Serve) -> None:
    """Test that an x-acs-accesskey-id other than the Credential is SignatureDoesNotMatch."""
    running = await serve(StubOptions(keys=(Credentials("testid", "testsecret", "tok"),)))
    body = orjson.dumps(GOOD_BODY)

    def resign(headers: dict[str, str]) -> None:
        headers.update(
            sign(
                method="POST",
                path=PUSH_PATH,
                query=None,
                headers={**headers, "x-acs-accesskey-id": "someone-else"},
                body=body,
                credentials=Credentials("testid", "testsecret"),
            )
        )

    answer = await running.push(
        body, credentials=Credentials("testid", "testsecret", "tok"), tweak=resign
    )

    expected = (400, "SignatureDoesNotMatch")
    assert expected == (answer.status, answer.code)
    assert "x-acs-accesskey-id" in answer.body["Message"]


@pytest.mark.parametrize(
    ("header", "value"), [("x-acs-action", "PushData"), ("x-acs-version", "2021-01-01")]
)
async def test_auth_wrong_action_or_version_api_not_found(
    serve: Serve, header: str, value: str
) -> None:
    """Test that another x-acs-action or x-acs-version is InvalidApi.NotFound (404)."""
    running = await serve()
    body = orjson.dumps(GOOD_BODY)

    def resign(headers: dict[str, str]) -> None:
        headers[header] = value
        headers.update(
            sign(
                method="POST",
                path=PUSH_PATH,
                query=None,
                headers=headers,
                body=body,
                credentials=KEY,
            )
        )

    answer = await running.push(body, tweak=resign)

    expected = (404, "InvalidApi.NotFound")
    assert expected == (answer.status, answer.code)


async def test_auth_unknown_path_api_not_found(serve: Serve) -> None:
    """Test that another path answers InvalidApi.NotFound with the gateway error body."""
    running = await serve()

    answer = await running.request("POST", "/api/v1/data/push", data=b"{}")

    expected = (404, "InvalidApi.NotFound")
    assert expected == (answer.status, answer.code)


@pytest.mark.parametrize(
    ("configured", "sent"),
    [("other-token", "testsecuritytoken+/=="), (None, "testsecuritytoken+/=="), ("t", None)],
    ids=["wrong", "unexpected", "missing"],
)
async def test_auth_security_token_mismatch_rejected(
    serve: Serve, configured: str | None, sent: str | None
) -> None:
    """Test that an STS token other than the key's is InvalidSecurityToken.Expired."""
    vector = _load("push_v3_sts" if sent else "push_v3_ak")
    keys = (Credentials("testid", "testsecret", configured),)
    running = await _serve_vector(serve, vector, keys=keys)

    answer = await running.replay(vector)

    expected = (400, "InvalidSecurityToken.Expired")
    assert expected == (answer.status, answer.code)


async def test_auth_push_headers_request_accepted(serve: Serve) -> None:
    """Test that a request built with push_headers (AK and STS) is accepted."""
    sts = Credentials("STS.abc", "stssecret", "token+/==")
    running = await serve(StubOptions(keys=(KEY, sts)))

    plain = await running.push()
    with_token = await running.push(credentials=sts)

    expected = [(200, "success")] * 2
    assert expected == [(a.status, a.body["data"]) for a in (plain, with_token)]


# -- body shape -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "code", "message"),
    [
        (
            {"deviceType": "1", "devices": [_entry(data={"Ua": 220.1})]},
            "InvalidParameter",
            "devices[0].data.Ua must be a string",
        ),
        (
            {"deviceType": "1", "devices": [_entry(), _entry(data={"P": "1", "Q": None})]},
            "InvalidParameter",
            "devices[1].data.Q must be a string",
        ),
        (
            {"deviceType": "1", "devices": [_entry(recordTime="2021-09-08T18:40:00")]},
            "InvalidParameter",
            "devices[0].recordTime",
        ),
        (
            {"deviceType": "1", "devices": [_entry(recordTime="2021-02-30 10:00:00")]},
            "InvalidParameter",
            "devices[0].recordTime",
        ),
        (
            {"deviceType": "1", "devices": [_entry(recordTime="2021-9-8 18:40:00")]},
            "InvalidParameter",
            "devices[0].recordTime",
        ),
        (
            {"deviceType": "1", "devices": [_entry(recordTime="2021-09-08 18:40:00.5")]},
            "InvalidParameter",
            "devices[0].recordTime",
        ),
        (
            {"deviceType": "1", "devices": [_entry(recordTime=1631097600)]},
            "InvalidParameter",
            "devices[0].recordTime",
        ),
        (
            {"deviceType": "15", "devices": [_entry(None), _entry("x")]},
            "InvalidParameter",
            "devices[1].deviceId must be omitted",
        ),
        (
            {"deviceType": "16", "devices": [_entry()]},
            "InvalidParameter",
            "devices[0].deviceId must be omitted",
        ),
        (
            {"deviceType": "1", "devices": [_entry(), _entry(None)]},
            "MissingParameter",
            "devices[1].deviceId is required",
        ),
        (
            {"deviceType": "12", "devices": [_entry(None)]},
            "MissingParameter",
            "devices[0].deviceId is required",
        ),
        (
            {"deviceType": "1", "devices": [_entry("")]},
            "InvalidParameter",
            "devices[0].deviceId",
        ),
        (
            {"deviceType": "1", "devices": [{"deviceId": "m", "data": {"P": "1"}}]},
            "MissingParameter",
            "devices[0].recordTime is required",
        ),
        (
            {
                "deviceType": "1",
                "devices": [{"deviceId": "m", "recordTime": "2021-09-08 18:40:00"}],
            },
            "MissingParameter",
            "devices[0].data is required",
        ),
        (
            {"deviceType": "1", "devices": [_entry(data={})]},
            "InvalidParameter",
            "devices[0].data",
        ),
        (
            {"deviceType": "1", "devices": [_entry(data=["220.1"])]},
            "InvalidParameter",
            "devices[0].data",
        ),
        ({"deviceType": "1", "devices": ["m1"]}, "InvalidParameter", "devices[0]"),
        ({"deviceType": "1", "devices": []}, "InvalidParameter", "devices"),
        ({"deviceType": "1"}, "MissingParameter", "devices"),
        ({"devices": [_entry()]}, "MissingParameter", "deviceType"),
        ({"deviceType": 1, "devices": [_entry()]}, "InvalidParameter", "deviceType"),
        ({"deviceType": "", "devices": [_entry()]}, "InvalidParameter", "deviceType"),
        ([_entry()], "InvalidParameter", "JSON object"),
        (b'{"deviceType": "1", "devices": [', "InvalidParameter", "not valid JSON"),
    ],
)
async def test_body_shape_violation_rejected(
    serve: Serve, body: Any, code: str, message: str
) -> None:
    """Test that a malformed body is rejected with the right Code and a precise Message."""
    running = await serve()

    answer = await running.push(body)

    assert (400, code) == (answer.status, answer.code)
    assert message in answer.body["Message"]
    assert not running.stub.entries


@pytest.mark.parametrize(
    "body",
    [
        {"deviceType": "15", "devices": [_entry(None)]},
        {
            "deviceType": "16",
            "devices": [_entry(None), _entry(None, recordTime="2024-02-29 00:00:00")],
        },
        {"deviceType": "12", "devices": [_entry("system-1")]},
        {"deviceType": "17", "devices": [_entry("system-2")]},
        {"deviceType": "1", "devices": [_entry(data={"Ua": "220.1", "COSQ": "-0.98"})]},
    ],
)
async def test_body_valid_shapes_accepted(serve: Serve, body: dict[str, Any]) -> None:
    """Test that valid bodies of the special device types are accepted and stored as sent."""
    running = await serve()

    answer = await running.push(body)
    received = await running.request("GET", "/_stub/received")

    stored = [
        {"deviceType": body["deviceType"], "deviceId": entry.get("deviceId"), **entry}
        for entry in body["devices"]
    ]
    expected = ((200, "success"), stored)
    assert expected == ((answer.status, answer.body["data"]), received.body["entries"])


# -- faults ---------------------------------------------------------------------------------


async def test_faults_error_rate_answers_service_unavailable(serve: Serve) -> None:
    """Test that error_rate=1 answers every good request 503 ServiceUnavailable."""
    running = await serve(StubOptions(faults=Faults(error_rate=1.0)))

    answer = await running.push()

    expected = (503, "ServiceUnavailable")
    assert expected == (answer.status, answer.code)
    assert not running.stub.entries


async def test_faults_throttle_rate_answers_throttling_with_retry_after(serve: Serve) -> None:
    """Test that throttle_rate=1 answers 429 Throttling.User with x-acs-retry-after when set."""
    running = await serve(StubOptions(faults=Faults(throttle_rate=1.0, retry_after_ms=1500)))

    answer = await running.push()

    expected = (429, "Throttling.User", "1500")
    assert expected == (answer.status, answer.code, answer.headers.get("x-acs-retry-after"))


async def test_faults_throttle_without_retry_after_has_no_header(serve: Serve) -> None:
    """Test that a throttled answer has no x-acs-retry-after unless retry_after_ms is set."""
    running = await serve(StubOptions(faults=Faults(throttle_rate=1.0)))

    answer = await running.push()

    expected = (429, None)
    assert expected == (answer.status, answer.headers.get("x-acs-retry-after"))


async def test_faults_latency_delays_answer(serve: Serve) -> None:
    """Test that latency_ms delays the answer by at least that long."""
    running = await serve(StubOptions(faults=Faults(latency_ms=300)))
    started = time.monotonic()

    answer = await running.push()

    elapsed = time.monotonic() - started
    expected = 200
    assert expected == answer.status
    assert elapsed >= 0.3


async def test_faults_outage_refuses_everything(serve: Serve) -> None:
    """Test that outage answers 503 to good and unsigned pushes alike."""
    running = await serve(StubOptions(faults=Faults(outage=True)))

    good = await running.push()
    unsigned = await running.request("POST", PUSH_PATH, data=b"{}")

    expected = [(503, "ServiceUnavailable")] * 2
    assert expected == [(answer.status, answer.code) for answer in (good, unsigned)]


async def test_faults_outage_window_relative_to_start(serve: Serve) -> None:
    """Test that an outage window refuses pushes only between start and start + duration."""
    now = [1_800_000_000.0]
    running = await serve(
        StubOptions(faults=Faults(outage_windows=((10, 5),))), clock=lambda: now[0]
    )
    statuses = []

    for offset in (0.0, 9.9, 10.0, 14.9, 15.0):
        now[0] = 1_800_000_000.0 + offset
        answer = await running.push(now=datetime.fromtimestamp(now[0], UTC))
        statuses.append(answer.status)

    expected = [200, 200, 503, 503, 200]
    assert expected == statuses


async def test_faults_poison_point_rejects_batch_naming_entry(serve: Serve) -> None:
    """Test that a batch with the poison point is InvalidParameter naming the entry's index."""
    running = await serve(StubOptions(faults=Faults(poison_point="Pz")))
    body = {"deviceType": "1", "devices": [_entry(), _entry("m2", data={"Pz": "1"})]}

    poisoned = await running.push(body)
    clean = await running.push()

    expected = (400, "InvalidParameter", 200)
    assert expected == (poisoned.status, poisoned.code, clean.status)
    assert "devices[1].data.Pz" in poisoned.body["Message"]


async def test_faults_fail_body_rate_answers_data_fail(serve: Serve) -> None:
    """Test that fail_body_rate=1 answers 200 with data "fail" and stores nothing."""
    running = await serve(StubOptions(faults=Faults(fail_body_rate=1.0)))

    answer = await running.push()
    stats = await running.request("GET", "/_stub/stats")

    expected = (200, "fail", 1)
    assert expected == (answer.status, answer.body["data"], stats.body["fail_body"])
    assert answer.body["requestId"]
    assert not running.stub.entries


async def test_faults_set_at_runtime(serve: Serve) -> None:
    """Test that POST /_stub/faults changes the behaviour of the next request."""
    running = await serve()

    set_answer = await running.request("POST", "/_stub/faults", json={"error_rate": 1.0})
    failing = await running.push()
    await running.request("POST", "/_stub/faults", json={"error_rate": 0})
    passing = await running.push()
    current = await running.request("GET", "/_stub/faults")

    expected = (1.0, 503, 200)
    assert expected == (set_answer.body["error_rate"], failing.status, passing.status)
    assert Faults().to_json() == current.body


@pytest.mark.parametrize(
    "change",
    [
        {"error_rte": 0.5},
        {"error_rate": 2},
        {"throttle_rate": "0.5"},
        {"outage": "yes"},
        {"outage_windows": [[0]]},
        {"retry_after_ms": -1},
        {"poison_point": ""},
        {"seed": "x"},
    ],
)
async def test_faults_invalid_runtime_change_refused(serve: Serve, change: dict[str, Any]) -> None:
    """Test that an unknown fault name or a bad value is refused and changes nothing."""
    running = await serve()

    answer = await running.request("POST", "/_stub/faults", json=change)

    expected = (400, Faults())
    assert expected == (answer.status, running.stub.faults)


async def test_faults_seed_makes_rates_reproducible(serve: Serve) -> None:
    """Test that two stubs with the same seed fail the same requests."""
    options = StubOptions(seed=7, faults=Faults(error_rate=0.5))
    first, second = await serve(options), await serve(options)

    statuses = [[(await running.push()).status for _ in range(20)] for running in (first, second)]

    assert statuses[0] == statuses[1]
    assert {200, 503} == set(statuses[0])


# -- introspection --------------------------------------------------------------------------


async def test_introspection_received_and_stats(serve: Serve) -> None:
    """Test that received pages from an index and stats count accepted, rejected, duplicates."""
    running = await serve()
    second = {"deviceType": "1", "devices": [_entry("m3")]}

    await running.push()
    await running.push(second)
    await running.push()  # the same entries again: duplicates
    await running.push(credentials=Credentials("nobody", "x"))
    page = await running.request("GET", "/_stub/received", params={"since": "3"})
    stats = await running.request("GET", "/_stub/stats")

    expected_requests = 3
    assert expected_requests == page.body["requests"]
    assert GOOD_BODY["devices"] == [
        {k: v for k, v in entry.items() if k != "deviceType"} for entry in page.body["entries"]
    ]
    assert {
        "requests": 4,
        "accepted": 3,
        "rejected": {"InvalidAccessKeyId.NotFound": 1},
        "rejected_total": 1,
        "fail_body": 0,
        "entries_accepted": 5,
        "duplicates": 2,
    }.items() <= stats.body.items()
    assert isinstance(stats.body["last_request_time"], float)
    expected_numbers = [1, 1, 2, 3, 3]
    assert expected_numbers == [entry.request for entry in running.stub.entries]


async def test_introspection_received_limit_pages(serve: Serve) -> None:
    """Test that ?limit=L returns L entries with a next cursor and a more flag."""
    running = await serve()
    await running.push()
    await running.push({"deviceType": "1", "devices": [_entry("m3")]})

    first = await running.request("GET", "/_stub/received", params={"limit": "2"})
    rest = await running.request("GET", "/_stub/received", params={"since": first.body["next"]})

    expected = [(2, 2, True), (1, 3, False)]
    assert expected == [
        (len(page.body["entries"]), page.body["next"], page.body["more"]) for page in (first, rest)
    ]


async def test_introspection_reset_clears_state(serve: Serve) -> None:
    """Test that /_stub/reset forgets entries, counters, nonces and runtime faults."""
    running = await serve()
    await running.push(nonce="n1")
    await running.request("POST", "/_stub/faults", json={"latency_ms": 5})

    reset = await running.request("POST", "/_stub/reset")
    received = await running.request("GET", "/_stub/received")
    stats = await running.request("GET", "/_stub/stats")
    again = await running.push(nonce="n1")

    expected: tuple[Any, ...] = (200, 0, [], 0, 0, Faults(), 200)
    assert expected == (
        reset.status,
        received.body["requests"],
        received.body["entries"],
        stats.body["requests"],
        stats.body["entries_accepted"],
        running.stub.faults,
        again.status,
    )


async def test_introspection_health(serve: Serve) -> None:
    """Test that /_stub/health answers ok."""
    running = await serve()

    answer = await running.request("GET", "/_stub/health")

    expected = (200, {"status": "ok"})
    assert expected == (answer.status, answer.body)


async def test_introspection_no_keep_counts_only(serve: Serve) -> None:
    """Test that keep_entries=False counts accepted entries without storing them."""
    running = await serve(StubOptions(keep_entries=False))

    await running.push()
    await running.push()
    received = await running.request("GET", "/_stub/received")
    stats = await running.request("GET", "/_stub/stats")

    expected: tuple[Any, ...] = (2, [], 4, 2)
    assert expected == (
        received.body["requests"],
        received.body["entries"],
        stats.body["entries_accepted"],
        stats.body["duplicates"],
    )


async def test_introspection_keep_max_keeps_the_last_entries_and_counts_the_rest(
    serve: Serve,
) -> None:
    """Test that keep_max=3 keeps the last three entries with their original indices.

    keep_max=3 keeps the last three entries, counts the one dropped, and pages
    with indices that stay those of all entries ever accepted.
    """
    running = await serve(StubOptions(keep_max=3))

    await running.push()  # m1, m2
    await running.push({"deviceType": "1", "devices": [_entry("m3"), _entry("m4")]})
    everything = await running.request("GET", "/_stub/received")
    page = await running.request("GET", "/_stub/received", params={"since": "2", "limit": "1"})
    stats = await running.request("GET", "/_stub/stats")

    assert (["m2", "m3", "m4"], 4, 4, False, 1) == (
        [e["deviceId"] for e in everything.body["entries"]],
        everything.body["total"],
        everything.body["next"],
        everything.body["more"],
        everything.body["dropped"],
    )
    assert (["m3"], 3, True) == (
        [e["deviceId"] for e in page.body["entries"]],
        page.body["next"],
        page.body["more"],
    )
    assert {"entries_accepted": 4, "entries_kept": 3, "entries_dropped": 1}.items() <= (
        stats.body.items()
    )
    assert ["m2", "m3", "m4"] == [e.device_id for e in running.stub.entries]


async def test_introspection_keep_max_bounds_duplicate_detection_too(serve: Serve) -> None:
    """Test that with keep_max only the kept entries' fingerprints count for duplicates.

    With keep_max only the last N entries' fingerprints are remembered: an entry
    equal to one within them is a duplicate, one equal to an older entry is not.
    """
    running = await serve(StubOptions(keep_max=3))

    await running.push()  # m1, m2
    again = _entry("m2", data={"Ua": "230.5"})  # m2 as in GOOD_BODY: a duplicate
    await running.push({"deviceType": "1", "devices": [again]})
    await running.push({"deviceType": "1", "devices": [_entry("m3"), _entry("m4")]})
    await running.push({"deviceType": "1", "devices": [_entry("m1")]})  # m1 is forgotten
    stats = await running.request("GET", "/_stub/stats")

    assert (6, 1) == (stats.body["entries_accepted"], stats.body["duplicates"])


async def test_introspection_reset_keeps_the_bound(serve: Serve) -> None:
    """Test that after a reset the stub still keeps at most keep_max entries."""
    running = await serve(StubOptions(keep_max=1))
    await running.push()
    await running.request("POST", "/_stub/reset")

    await running.push()
    received = await running.request("GET", "/_stub/received")

    assert (["m2"], 1) == (
        [e["deviceId"] for e in received.body["entries"]],
        received.body["dropped"],
    )


# -- command line ---------------------------------------------------------------------------


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_flags_build_options() -> None:
    """Test that every flag lands in StubOptions and keys merge env first, then --key."""
    args = _parse(
        "--host", "0.0.0.0", "--port", "0", "--key", "b:flagsecret", "--error-rate", "0.1",
        "--throttle-rate", "0.2", "--retry-after-ms", "1500", "--latency-ms", "5",
        "--outage", "10:5", "--outage", "60:1.5", "--poison-point", "Pz",
        "--fail-body-rate", "0.3", "--max-skew-secs", "60", "--seed", "3", "--no-keep",
        "--keep-max", "500",
    )  # fmt: skip

    options = options_from_args(args, {KEYS_ENV: "a:asecret:atoken, b:envsecret"})

    expected = StubOptions(
        host="0.0.0.0",
        port=0,
        keys=(Credentials("a", "asecret", "atoken"), Credentials("b", "flagsecret")),
        faults=Faults(
            error_rate=0.1,
            throttle_rate=0.2,
            retry_after_ms=1500,
            latency_ms=5,
            outage_windows=((10, 5), (60, 1.5)),
            poison_point="Pz",
            fail_body_rate=0.3,
        ),
        max_skew_secs=60,
        seed=3,
        keep_entries=False,
        keep_max=500,
    )
    assert expected == options


def test_cli_defaults() -> None:
    """Test that without flags or env the stub listens on 127.0.0.1:8080 with testid."""
    options = options_from_args(_parse(), {})

    assert StubOptions() == options
    assert (Credentials("testid", "testsecret"),) == options.keys


@pytest.mark.parametrize(
    "argv",
    [
        ["--error-rate", "1.5"],
        ["--outage", "10"],
        ["--outage", "10:0"],
        ["--port", "70000"],
        ["--key", "onlyid"],
        ["--latency-ms", "-1"],
        ["--keep-max", "0"],
    ],
)
def test_cli_bad_flag_exits(argv: list[str]) -> None:
    """Test that an invalid flag value is an argparse error."""
    with pytest.raises(SystemExit):
        _parse(*argv)


def test_cli_parse_keys_formats() -> None:
    """Test that ENERGY_BRIDGE_STUB_KEYS accepts id:secret[:token] items and rejects others."""
    expected = (Credentials("a", "s"), Credentials("b", "s2", "tok:en"))

    assert expected == parse_keys("a:s, b:s2:tok:en,")
    for bad in ("a", "a:", ":zzsecret", "a:zzsecret:"):
        with pytest.raises(ValueError, match="key #1") as info:
            parse_keys(bad)
        assert "zzsecret" not in str(info.value)


async def test_cli_process_serves_until_sigterm() -> None:
    """Test that the stub process prints its real port, serves env keys, exits 0 on SIGTERM."""
    env = {**os.environ, KEYS_ENV: "cliid:clisecret-xyz:clitoken-xyz", "PYTHONUNBUFFERED": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge.tools.cloud_stub", "--port", "0", "--seed", "1",
        cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=30)).decode()
        assert line.startswith("cloud-stub listening on http://127.0.0.1:"), line
        url = line.split()[-1]
        body = orjson.dumps(GOOD_BODY)
        headers = push_headers(
            host=url.removeprefix("http://"),
            body=body,
            credentials=Credentials("cliid", "clisecret-xyz", "clitoken-xyz"),
            user_agent="t",
        )
        async with (
            aiohttp.ClientSession() as session,
            session.post(url + PUSH_PATH, data=body, headers=headers) as resp,
        ):
            answer = await resp.json()
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    expected = ("success", 0)
    assert expected == (answer["data"], proc.returncode)
    output = line + stdout.decode() + stderr.decode()
    assert "clisecret" not in output
    assert "clitoken" not in output
