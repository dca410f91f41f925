"""The one HTTP seam to the push API: sign exactly the bytes we send, send them, read the answer.

aiohttp stays inside this module; callers get a :class:`PushResult` and never an aiohttp type.
"""

from __future__ import annotations

import asyncio
import math
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
import orjson

from bridge.credentials import CredentialsProvider
from bridge.errors import CredentialsError
from bridge.push.retry import Failure
from bridge.push.signing import PUSH_PATH, push_headers

__all__ = ["PushClient", "PushResult"]

_MAX_ANSWER = 64 * 1024
"""An answer is a small JSON object; more than this is not one (and is not kept)."""


async def _read_capped(stream: aiohttp.StreamReader, cap: int) -> bytes:
    """The whole answer, however many pieces it arrives in, up to ``cap`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while size < cap:
        chunk = await stream.read(cap - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


@dataclass(slots=True, frozen=True)
class PushResult:
    """What one attempt produced.

    Attributes:
        status: HTTP status, 0 when no response arrived.
        code: the cloud's error ``Code``, ``""`` when it sent none (or did not answer).
        message: the service's Message, or a description of the local failure.
        request_id: the service's request id, if any.
        retry_after: seconds from ``x-acs-retry-after``, if sent.
        success: HTTP 2xx with ``"data": "success"``.
        elapsed: seconds the request took.
        failure: why no answer arrived, ``None`` when one did.
    """

    status: int
    code: str
    message: str
    request_id: str
    retry_after: float | None
    success: bool
    elapsed: float
    failure: Failure | None = None

    @property
    def label(self) -> str:
        """What went wrong in one word, for metrics and logs.

        The cloud's code, else the local failure, else the HTTP status.
        """
        return self.code or (self.failure.value if self.failure else str(self.status))


def _parse_answer(raw: bytes) -> tuple[bool, str, str, str]:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False, "", "answer is not JSON: " + raw[:200].decode("utf-8", "replace"), ""
    if not isinstance(doc, dict):
        return False, "", "answer is not a JSON object", ""
    request_id = str(doc.get("requestId") or doc.get("RequestId") or "")
    code = str(doc.get("Code") or doc.get("code") or "")
    message = str(doc.get("Message") or doc.get("message") or "")
    success = doc.get("data") == "success"
    if not success and not message and "data" in doc:
        message = f"data is {doc.get('data')!r}, not 'success'"
    return success, code, message, request_id


class PushClient:
    """One aiohttp session to the push endpoint.

    Args:
        endpoint: base URL, e.g. ``https://energyexpertexternal.cn-hangzhou.aliyuncs.com``.
        credentials: where signing credentials come from.
        user_agent: the (signed) User-Agent.
        timeout_secs: total time one request may take.
        connect_timeout_secs: time to establish a connection.
        verify_tls: verify the server certificate.
        max_connections: connection pool size (the pusher's concurrency bound).
    """

    def __init__(
        self,
        *,
        endpoint: str,
        credentials: CredentialsProvider,
        user_agent: str,
        timeout_secs: float,
        connect_timeout_secs: float,
        verify_tls: bool,
        max_connections: int,
    ) -> None:
        parts = urlsplit(endpoint)
        self._url = endpoint.rstrip("/") + PUSH_PATH
        self._host = parts.netloc
        self._credentials = credentials
        self._user_agent = user_agent
        self._timeout = aiohttp.ClientTimeout(total=timeout_secs, connect=connect_timeout_secs)
        self._verify = verify_tls
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> PushClient:
        """Open the HTTP session (TLS verified unless ``verify_tls`` is off)."""
        ssl_ctx: ssl.SSLContext | bool = True
        if not self._verify:
            ssl_ctx = False
        else:
            ssl_ctx = ssl.create_default_context()
            ssl_ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        connector = aiohttp.TCPConnector(
            limit=self._max_connections, ssl=ssl_ctx, enable_cleanup_closed=True
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=True,
            skip_auto_headers=("User-Agent", "Content-Type"),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Close the HTTP session; the client can be entered again."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def push(self, body: bytes) -> PushResult:
        """Sign and send one body; never raises for HTTP or network failures."""
        assert self._session is not None, "use PushClient as an async context manager"  # noqa: S101
        started = time.monotonic()

        def elapsed() -> float:
            return time.monotonic() - started

        try:
            creds = await self._credentials.get()
        except CredentialsError as exc:
            return PushResult(0, "", str(exc), "", None, False, 0.0, Failure.NO_CREDENTIALS)
        headers = push_headers(
            host=self._host, body=body, credentials=creds, user_agent=self._user_agent
        )
        try:
            # Never follow a redirect: it would hand the signed request (token, key id, body)
            # to another host, or turn the POST into a GET whose "success" means nothing.
            async with self._session.post(
                self._url, data=body, headers=headers, allow_redirects=False
            ) as resp:
                raw = await _read_capped(resp.content, _MAX_ANSWER)
                retry_after = resp.headers.get("x-acs-retry-after")
                status = resp.status
        except TimeoutError:
            return PushResult(
                0, "", "request timed out", "", None, False, elapsed(), Failure.TIMEOUT
            )
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            message = f"{type(exc).__name__}: {exc}"[:300]
            return PushResult(0, "", message, "", None, False, elapsed(), Failure.CONNECTION)
        except asyncio.CancelledError:
            raise
        success, code, message, request_id = _parse_answer(raw)
        success = success and 200 <= status < 300
        after: float | None = None
        if retry_after:
            try:
                millis = float(retry_after)
            except ValueError:
                millis = math.nan
            if math.isfinite(millis):
                after = max(0.0, millis / 1000.0)
        return PushResult(
            status, code, message, request_id, after, success, time.monotonic() - started
        )
