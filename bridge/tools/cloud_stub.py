"""The local stand-in for the Energy Expert ``PushDeviceData`` API.

An aiohttp application that checks requests the way the cloud does (signature V3, date window,
nonce replay, STS token, body shape), answers with the cloud's error body, stores what it
accepted, and injects faults on demand.

Checks run in this order; the first failure answers with its HTTP status and ``Code``:

1.  outage (``outage`` or an ``outage_windows`` entry): 503 ``ServiceUnavailable``
2.  ``x-acs-action`` / ``x-acs-version`` not this API: 404 ``InvalidApi.NotFound``
3.  ``Authorization`` missing or malformed: 400 ``IncompleteSignature``
4.  AccessKey id unknown: 404 ``InvalidAccessKeyId.NotFound``
5.  ``x-acs-date`` missing, unparseable or more than ``max_skew_secs`` off:
    400 ``InvalidTimeStamp.Expired``
6.  ``x-acs-security-token`` not the key's token (wrong, missing, or sent for a key without
    one): 400 ``InvalidSecurityToken.Expired``
7.  ``host`` or any ``x-acs-*`` header sent but not signed, a signed header absent, or an
    empty nonce: 400 ``IncompleteSignature``
8.  ``x-acs-accesskey-id`` not the Credential's id, ``x-acs-content-sha256`` not the body's
    SHA-256, or the signature differs: 400 ``SignatureDoesNotMatch``
9.  nonce seen before within the date window: 400 ``SignatureNonceUsed``
10. ``throttle_rate`` / ``error_rate`` faults: 429 ``Throttling.User`` / 503 ``ServiceUnavailable``
11. body shape: 400 ``MissingParameter`` (absent field) or ``InvalidParameter``
12. ``poison_point`` fault: 400 ``InvalidParameter``
13. ``fail_body_rate`` fault: 200 ``{"requestId": ..., "data": "fail"}``

Faults only hit authenticated requests, so their rates are fractions of otherwise good traffic;
a request that passed step 9 has used up its nonce, as on the real gateway.

Any other path answers 404 ``InvalidApi.NotFound``. Introspection, not part of the real API:

- ``GET /_stub/received[?since=K][&limit=L]``: ``{"requests": accepted requests, "total",
  "next", "more", "dropped", "entries": [{"deviceType", "deviceId", "recordTime", "data"},
  ...]}``; ``K`` counts every entry ever stored, also those dropped (``--keep-max``)
- ``GET /_stub/stats``: the counters of :meth:`CloudStub.stats`
- ``GET /_stub/faults``, ``POST /_stub/faults`` with ``{"error_rate": 0.2, ...}`` (names as in
  :class:`Faults`, plus ``seed``): the faults in effect afterwards
- ``POST /_stub/reset``: forget entries, counters and nonces; restore the starting faults
- ``GET /_stub/health``: ``{"status": "ok"}``

Credentials come from ``ENERGY_BRIDGE_STUB_KEYS="id:secret[:token],..."`` (preferred) or
``--key``; secrets are never logged.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import itertools
import logging
import math
import os
import random
import re
import signal
import sys
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any, Final

import orjson
from aiohttp import web

from bridge.models import NO_DEVICE_ID_TYPES
from bridge.push.signing import (
    ACTION,
    DATE_FORMAT,
    PUSH_PATH,
    VERSION,
    Credentials,
    canonical_request,
    parse_authorization,
    signature,
    string_to_sign,
)

__all__ = [
    "DEFAULT_KEY",
    "KEYS_ENV",
    "CloudStub",
    "Faults",
    "StoredEntry",
    "StubOptions",
    "add_arguments",
    "main",
    "options_from_args",
    "parse_keys",
    "run_from_args",
]

log = logging.getLogger(__name__)

KEYS_ENV: Final = "ENERGY_BRIDGE_STUB_KEYS"
DEFAULT_KEY: Final = Credentials("testid", "testsecret")

_ALWAYS_SIGNED = frozenset(
    {
        "host",
        "x-acs-action",
        "x-acs-version",
        "x-acs-date",
        "x-acs-signature-nonce",
        "x-acs-content-sha256",
    }
)
_RECORD_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}")
_STR_ONLY = frozenset({str})
_MAX_BODY_BYTES = 32 * 1024 * 1024
_JSON_TYPE = "application/json"


@dataclass(frozen=True, slots=True)
class Faults:
    """Faults the stub injects; validated on creation.

    Attributes:
        error_rate: fraction of requests answered 503 ``ServiceUnavailable``.
        throttle_rate: fraction answered 429 ``Throttling.User``.
        retry_after_ms: when set, throttled answers carry ``x-acs-retry-after`` with this value.
        latency_ms: delay before a push request is processed and answered.
        outage: refuse every push with 503 while true.
        outage_windows: ``(start_secs, duration_secs)`` after the stub started with an outage.
        poison_point: a data point name; a batch with an entry carrying it is rejected with
            ``InvalidParameter`` naming that entry.
        fail_body_rate: fraction answered 200 with ``"data": "fail"``.
        refuse_status: when not 0, refuse pushes with this HTTP status (a hostile cloud: 413
            from a gateway, 400 with a code nobody listed, an endpoint-level code).
        refuse_code: the ``Code`` of those refusals (``""``: an answer without one).
        refuse_point: refuse only requests with an entry carrying this data point.
        refuse_body: answer refusals with this raw text instead of a JSON error (garbage).
        refuse_body_size: pad ``refuse_body`` (or ``x``) to this many bytes (a huge answer).
        redirect_status: when not 0, answer every push with this 3xx status and a Location.
        redirect_location: the Location of those redirects.
        answer_pieces: write every push answer in this many pieces (chunked encoding).
        piece_delay_ms: pause between two pieces.
        retry_after_raw: the ``x-acs-retry-after`` text of throttled answers, verbatim
            (``inf``, ``1e12``); overrides ``retry_after_ms``.
    """

    error_rate: float = 0.0
    throttle_rate: float = 0.0
    retry_after_ms: int | None = None
    latency_ms: float = 0.0
    outage: bool = False
    outage_windows: tuple[tuple[float, float], ...] = ()
    poison_point: str | None = None
    fail_body_rate: float = 0.0
    refuse_status: int = 0
    refuse_code: str = ""
    refuse_point: str | None = None
    refuse_body: str | None = None
    refuse_body_size: int = 0
    redirect_status: int = 0
    redirect_location: str = "http://127.0.0.1:9/elsewhere"
    answer_pieces: int = 1
    piece_delay_ms: float = 0.0
    retry_after_raw: str | None = None

    def __post_init__(self) -> None:
        """Check every field.

        Raises:
            TypeError: ``outage`` or ``outage_windows`` has the wrong type.
            ValueError: a field is out of range or not a number where one is needed.
        """
        for name in ("error_rate", "throttle_rate", "fail_body_rate"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a number from 0 to 1")
        if self.retry_after_ms is not None and (
            not isinstance(self.retry_after_ms, int)
            or isinstance(self.retry_after_ms, bool)
            or self.retry_after_ms < 0
        ):
            raise ValueError("retry_after_ms must be a non-negative integer or null")
        if not _is_number(self.latency_ms) or self.latency_ms < 0:
            raise ValueError("latency_ms must be a non-negative number")
        for name, low, high in (
            ("refuse_status", 0, 599),
            ("redirect_status", 0, 399),
            ("answer_pieces", 1, 100_000),
            ("refuse_body_size", 0, 64 * 1024 * 1024),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer from {low} to {high}")
        if self.redirect_status and self.redirect_status < 300:
            raise ValueError("redirect_status must be a 3xx status (or 0: off)")
        if not _is_number(self.piece_delay_ms) or self.piece_delay_ms < 0:
            raise ValueError("piece_delay_ms must be a non-negative number")
        for name in ("refuse_code", "redirect_location"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a string")
        for name in ("refuse_point", "refuse_body", "retry_after_raw"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a string or null")
        if not isinstance(self.outage, bool):
            raise TypeError("outage must be true or false")
        if self.poison_point is not None and (
            not isinstance(self.poison_point, str) or not self.poison_point
        ):
            raise ValueError("poison_point must be a non-empty string or null")
        if not isinstance(self.outage_windows, Sequence):
            raise TypeError("outage_windows must be a list of [start_secs, duration_secs]")
        windows = []
        for window in self.outage_windows:
            if (
                not isinstance(window, Sequence)
                or len(window) != 2
                or not all(_is_number(part) for part in window)
                or window[0] < 0
                or window[1] <= 0
            ):
                raise ValueError(
                    "outage_windows must be [start_secs >= 0, duration_secs > 0] pairs"
                )
            windows.append((float(window[0]), float(window[1])))
        # Normalises JSON lists into tuples so that the frozen value is hashable and comparable.
        object.__setattr__(self, "outage_windows", tuple(windows))

    def updated(self, changes: Mapping[str, Any]) -> Faults:
        """Return a copy with ``changes`` applied.

        Args:
            changes: field name -> new value, as sent to ``POST /_stub/faults``.

        Returns:
            The new, validated faults.

        Raises:
            TypeError: a value has the wrong type.
            ValueError: an unknown name or an invalid value.
        """
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown fault(s): {', '.join(unknown)}")
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """Return the faults as a JSON-ready dict with the field names as keys."""
        document = {f.name: getattr(self, f.name) for f in fields(self)}
        document["outage_windows"] = [list(window) for window in self.outage_windows]
        return document


@dataclass(frozen=True, slots=True)
class StubOptions:
    """How the stub runs.

    Attributes:
        host: address to listen on.
        port: TCP port; 0 picks a free one.
        keys: accepted credentials; an STS key only accepts its ``security_token``.
        faults: the faults injected from the start.
        max_skew_secs: largest accepted distance between ``x-acs-date`` and the stub's clock.
        seed: seed of the random generator that decides the rate-based faults.
        keep_entries: store accepted entries; when false only count them (long benchmarks).
        keep_max: keep only the last this many entries, and remember only their fingerprints
            for duplicate counting; older ones are dropped and counted. ``None``: keep all
            (tests that account for every reading); a stub that runs for days needs a bound.
    """

    host: str = "127.0.0.1"
    port: int = 8080
    keys: tuple[Credentials, ...] = (DEFAULT_KEY,)
    faults: Faults = field(default_factory=Faults)
    max_skew_secs: float = 900.0
    seed: int | None = None
    keep_entries: bool = True
    keep_max: int | None = None


@dataclass(slots=True)
class StoredEntry:
    """One accepted ``devices[]`` entry.

    Attributes:
        device_type: the request's ``deviceType``.
        device_id: the entry's ``deviceId``, ``None`` for types 15/16.
        record_time: the entry's ``recordTime``.
        data: the entry's data points.
        request: number of the accepted request that carried it, from 1.
        received_at: the stub's clock when it was accepted.
    """

    device_type: str
    device_id: str | None
    record_time: str
    data: dict[str, str]
    request: int
    received_at: float

    def to_json(self) -> dict[str, Any]:
        """Return the entry the way the push API names its fields."""
        return {
            "deviceType": self.device_type,
            "deviceId": self.device_id,
            "recordTime": self.record_time,
            "data": self.data,
        }


class _Reject(Exception):
    """Answer the current request with a gateway error (or, for a hostile cloud, raw text)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        retry_after: str | None = None,
        raw_body: bytes | None = None,
    ) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.raw_body = raw_body
        super().__init__(f"{code}: {message}")


class CloudStub:
    """The stub's state and request handling; one instance serves one application.

    Args:
        options: how to behave; the defaults when ``None``.
        clock: wall clock in epoch seconds, for the date window and ``received_at``.
    """

    def __init__(
        self, options: StubOptions | None = None, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.options = options if options is not None else StubOptions()
        self._clock = clock
        self._keys = {key.access_key_id: key for key in self.options.keys}
        self._faults = self.options.faults
        self._rng = random.Random(self.options.seed)
        self._started = clock()
        self._entries: deque[StoredEntry] = deque(maxlen=self.options.keep_max)
        self._dropped = 0
        self._seen: set[int] = set()
        # With keep_max: the fingerprints of the last keep_max entries, oldest first, and how
        # often each occurs among them.
        self._recent: deque[int] = deque()
        self._recent_counts: Counter[int] = Counter()
        self._nonces: set[str] = set()
        self._nonce_expiry: deque[tuple[float, str]] = deque()
        self._requests = 0
        self._accepted = 0
        self._fail_body = 0
        self._entries_accepted = 0
        self._duplicates = 0
        self._rejected: Counter[str] = Counter()
        self._last_request_time: float | None = None

    @property
    def faults(self) -> Faults:
        """The faults in effect."""
        return self._faults

    @property
    def key_ids(self) -> list[str]:
        """The accepted AccessKey ids (never the secrets)."""
        return list(self._keys)

    @property
    def entries(self) -> Sequence[StoredEntry]:
        """Every stored entry in arrival order (empty with ``keep_entries=False``)."""
        return self._entries

    def set_faults(self, changes: Mapping[str, Any]) -> Faults:
        """Change some faults; ``seed`` in ``changes`` re-seeds the random generator.

        Args:
            changes: fault name -> value; names as in :class:`Faults`, plus ``seed``.

        Returns:
            The faults now in effect.

        Raises:
            TypeError: a value has the wrong type; nothing is changed then.
            ValueError: an unknown name or an invalid value; nothing is changed then.
        """
        changes = dict(changes)
        reseed = "seed" in changes
        seed = changes.pop("seed", None)
        if reseed and (isinstance(seed, bool) or not isinstance(seed, int | None)):
            raise ValueError("seed must be an integer or null")
        self._faults = self._faults.updated(changes)
        if reseed:
            self._rng.seed(seed)
        log.info("cloud-stub faults: %s", self._faults.to_json())
        return self._faults

    def reset(self) -> None:
        """Forget entries, counters and nonces; restore the starting faults and random seed."""
        self._faults = self.options.faults
        self._rng.seed(self.options.seed)
        self._entries.clear()
        self._dropped = 0
        self._seen.clear()
        self._recent.clear()
        self._recent_counts.clear()
        self._nonces.clear()
        self._nonce_expiry.clear()
        self._requests = self._accepted = self._fail_body = 0
        self._entries_accepted = self._duplicates = 0
        self._rejected.clear()
        self._last_request_time = None

    def stats(self) -> dict[str, Any]:
        """Return the counters.

        Returns:
            ``requests`` (push requests seen), ``accepted``, ``rejected`` (``Code`` -> count),
            ``rejected_total``, ``fail_body`` (200 answers with ``"data": "fail"``),
            ``entries_accepted``, ``entries_kept``, ``entries_dropped`` (older than the last
            ``keep_max``), ``duplicates`` (accepted entries equal in deviceType, deviceId,
            recordTime and data to an earlier one, among the last ``keep_max`` when set) and
            ``last_request_time``.
        """
        return {
            "requests": self._requests,
            "accepted": self._accepted,
            "rejected": dict(self._rejected),
            "rejected_total": self._rejected.total(),
            "fail_body": self._fail_body,
            "entries_accepted": self._entries_accepted,
            "entries_kept": len(self._entries),
            "entries_dropped": self._dropped,
            "duplicates": self._duplicates,
            "last_request_time": self._last_request_time,
        }

    def make_app(self) -> web.Application:
        """Build the aiohttp application serving this stub.

        Returns:
            The application; run it with an ``AppRunner`` or a test server.
        """
        app = web.Application(client_max_size=_MAX_BODY_BYTES)
        app.router.add_post(PUSH_PATH, self._handle_push)
        app.router.add_get("/_stub/received", self._handle_received)
        app.router.add_get("/_stub/stats", self._handle_stats)
        app.router.add_get("/_stub/faults", self._handle_get_faults)
        app.router.add_post("/_stub/faults", self._handle_set_faults)
        app.router.add_post("/_stub/reset", self._handle_reset)
        app.router.add_get("/_stub/health", self._handle_health)
        app.router.add_route("*", "/{tail:.*}", self._handle_unknown)
        return app

    async def _handle_push(self, request: web.Request) -> web.StreamResponse:
        self._requests += 1
        faults = self._faults
        # Like the real service, the request is read and processed first and the answer is
        # what comes late: a client that gives up waiting may find its data stored anyway.
        body = await request.read()
        now = self._clock()
        self._last_request_time = now
        if faults.redirect_status:
            self._rejected[f"HTTP {faults.redirect_status}"] += 1
            return web.Response(
                status=faults.redirect_status, headers={"Location": faults.redirect_location}
            )
        try:
            answer = self._process(request, body, faults, now)
        except _Reject as reject:
            self._rejected[reject.code] += 1
            log.debug("cloud-stub rejected a push: %s", reject)
            response = self._error_response(request, reject)
        else:
            response = _json_response(200, {"requestId": _request_id(), "data": answer})
        if faults.latency_ms > 0:
            await asyncio.sleep(faults.latency_ms / 1000)
        if faults.answer_pieces > 1:
            return await _in_pieces(request, response, faults)
        return response

    def _process(self, request: web.Request, body: bytes, faults: Faults, now: float) -> str:
        """Run every check, store the entries on success and return the ``data`` answer."""
        if faults.outage or self._in_outage_window(faults, now):
            raise _Reject(
                503, "ServiceUnavailable", "The service is unavailable (injected outage)."
            )
        self._authenticate(request, body, now)
        rng = self._rng
        if faults.throttle_rate > 0 and rng.random() < faults.throttle_rate:
            raise _Reject(
                429,
                "Throttling.User",
                "Request was denied due to user flow control.",
                retry_after=_retry_after(faults),
            )
        if faults.error_rate > 0 and rng.random() < faults.error_rate:
            raise _Reject(503, "ServiceUnavailable", "The service is unavailable (injected error).")
        device_type, devices = _validate_body(body)
        if faults.poison_point is not None:
            _check_poison(devices, faults.poison_point)
        if faults.refuse_status and (
            faults.refuse_point is None
            or any(faults.refuse_point in entry["data"] for entry in devices)
        ):
            raise _hostile_refusal(faults)
        if faults.fail_body_rate > 0 and rng.random() < faults.fail_body_rate:
            self._fail_body += 1
            return "fail"
        self._store(device_type, devices, now)
        return "success"

    def _authenticate(self, request: web.Request, body: bytes, now: float) -> None:
        headers = request.headers
        if headers.get("x-acs-action") != ACTION or headers.get("x-acs-version") != VERSION:
            raise _Reject(
                404,
                "InvalidApi.NotFound",
                f"Specified api is not found; expected x-acs-action {ACTION} "
                f"and x-acs-version {VERSION}.",
            )
        authorization = headers.get("authorization")
        if authorization is None:
            raise _Reject(400, "IncompleteSignature", "The Authorization header is missing.")
        try:
            access_key_id, names, claimed = parse_authorization(authorization)
        except ValueError as exc:
            raise _Reject(
                400, "IncompleteSignature", f"The Authorization header is malformed: {exc}."
            ) from None
        key = self._keys.get(access_key_id)
        if key is None:
            raise _Reject(404, "InvalidAccessKeyId.NotFound", "Specified access key is not found.")
        self._check_date(headers.get("x-acs-date"), now)
        if headers.get("x-acs-security-token") != key.security_token:
            raise _Reject(
                400,
                "InvalidSecurityToken.Expired",
                "The security token is expired or not the one issued for this access key.",
            )
        signed = set(names)
        required = {name.lower() for name in headers if name[:6].lower() == "x-acs-"}
        unsigned = (required | _ALWAYS_SIGNED) - signed
        if unsigned:
            raise _Reject(
                400,
                "IncompleteSignature",
                f"Headers must be signed: {', '.join(sorted(unsigned))}.",
            )
        absent = sorted(name for name in signed if name not in headers)
        if absent:
            raise _Reject(
                400, "IncompleteSignature", f"Signed headers are missing: {', '.join(absent)}."
            )
        if not headers["x-acs-signature-nonce"].strip():
            raise _Reject(400, "IncompleteSignature", "x-acs-signature-nonce is empty.")
        header_key_id = headers.get("x-acs-accesskey-id")
        if header_key_id is not None and header_key_id != access_key_id:
            raise _Reject(
                400, "SignatureDoesNotMatch", "x-acs-accesskey-id differs from the Credential."
            )
        body_sha256 = headers["x-acs-content-sha256"]
        if body_sha256 != hashlib.sha256(body).hexdigest():
            raise _Reject(
                400,
                "SignatureDoesNotMatch",
                "x-acs-content-sha256 does not match the SHA-256 of the request body.",
            )
        canonical = canonical_request(
            request.method,
            request.rel_url.raw_path,
            request.query,
            headers,
            names,
            body_sha256,
        )
        server_string_to_sign = string_to_sign(canonical)
        expected = signature(key.access_key_secret, server_string_to_sign)
        if not hmac.compare_digest(expected, claimed):
            raise _Reject(
                400,
                "SignatureDoesNotMatch",
                "Specified signature does not match our calculation. Server string to sign is: "
                + server_string_to_sign.replace("\n", "\\n"),
            )
        self._use_nonce(headers["x-acs-signature-nonce"], now)

    def _check_date(self, value: str | None, now: float) -> None:
        if value is None:
            raise _Reject(400, "InvalidTimeStamp.Expired", "x-acs-date is missing.")
        try:
            sent = datetime.strptime(value, DATE_FORMAT).replace(tzinfo=UTC).timestamp()
        except ValueError:
            raise _Reject(
                400, "InvalidTimeStamp.Expired", "x-acs-date must be YYYY-MM-DDTHH:MM:SSZ (UTC)."
            ) from None
        if abs(sent - now) > self.options.max_skew_secs:
            raise _Reject(
                400,
                "InvalidTimeStamp.Expired",
                f"Specified time stamp or date value is expired: {value} is more than "
                f"{self.options.max_skew_secs:g} s from the server time.",
            )

    def _use_nonce(self, nonce: str, now: float) -> None:
        expiry = self._nonce_expiry
        while expiry and expiry[0][0] < now:
            self._nonces.discard(expiry.popleft()[1])
        if nonce in self._nonces:
            raise _Reject(400, "SignatureNonceUsed", "Specified signature nonce was used already.")
        self._nonces.add(nonce)
        # A replay stays acceptable by date until x-acs-date + skew, and x-acs-date was at most
        # one skew ahead of now, so two skews after receipt no replay can pass the date check.
        expiry.append((now + 2 * self.options.max_skew_secs, nonce))

    def _in_outage_window(self, faults: Faults, now: float) -> bool:
        elapsed = now - self._started
        return any(start <= elapsed < start + length for start, length in faults.outage_windows)

    def _store(self, device_type: str, devices: list[dict[str, Any]], now: float) -> None:
        self._accepted += 1
        self._entries_accepted += len(devices)
        keep = self.options.keep_entries
        keep_max = self.options.keep_max
        seen = self._seen
        for entry in devices:
            device_id = entry.get("deviceId")
            record_time = entry["recordTime"]
            data = entry["data"]
            # A 64-bit hash instead of the canonical bytes keeps memory flat on long benchmark
            # runs; a false duplicate needs a hash collision (about 1 in 10^19 per pair).
            key = hash(
                orjson.dumps(
                    (device_type, device_id, record_time, data), option=orjson.OPT_SORT_KEYS
                )
            )
            if key in seen:
                self._duplicates += 1
            else:
                seen.add(key)
            if keep_max is not None:
                self._forget_all_but_recent(key, keep_max)
            if keep:
                if len(self._entries) == keep_max:
                    self._dropped += 1  # the deque drops its oldest entry on append
                self._entries.append(
                    StoredEntry(device_type, device_id, record_time, data, self._accepted, now)
                )

    def _forget_all_but_recent(self, key: int, keep_max: int) -> None:
        """Remember ``key`` among the last ``keep_max`` fingerprints.

        The one that falls out is forgotten, unless it occurs again within them.
        """
        recent, counts = self._recent, self._recent_counts
        recent.append(key)
        counts[key] += 1
        if len(recent) > keep_max:
            old = recent.popleft()
            counts[old] -= 1
            if not counts[old]:
                del counts[old]
                self._seen.discard(old)

    def _error_response(self, request: web.Request, reject: _Reject) -> web.Response:
        request_id = _request_id()
        headers = {"x-acs-request-id": request_id}
        if reject.retry_after is not None:
            headers["x-acs-retry-after"] = reject.retry_after
        if reject.raw_body is not None:
            return web.Response(status=reject.status, body=reject.raw_body, headers=headers)
        if not reject.code:
            return _json_response(
                reject.status, {"RequestId": request_id, "Message": reject.message}, headers=headers
            )
        return _json_response(
            reject.status,
            {
                "RequestId": request_id,
                "HostId": request.host,
                "Code": reject.code,
                "Message": reject.message,
                "Recommend": (
                    "https://api.aliyun.com/troubleshoot"
                    f"?q={reject.code}&product=energyExpertExternal&requestId={request_id}"
                ),
            },
            headers=headers,
        )

    async def _handle_received(self, request: web.Request) -> web.Response:
        try:
            since = int(request.query.get("since", "0"))
            limit = int(request.query["limit"]) if "limit" in request.query else None
        except ValueError:
            return _json_response(400, {"error": "since and limit must be integers"})
        if since < 0 or (limit is not None and limit < 0):
            return _json_response(400, {"error": "since and limit must not be negative"})
        # Indices count every entry ever stored: the first kept one is number `dropped`.
        dropped = self._dropped
        total = dropped + len(self._entries)
        first = max(since, dropped)
        stop = total if limit is None else min(total, first + limit)
        page = list(itertools.islice(self._entries, first - dropped, max(first, stop) - dropped))
        return _json_response(
            200,
            {
                "requests": self._accepted,
                "total": total,
                "next": first + len(page),
                "more": first + len(page) < total,
                "dropped": dropped,
                "entries": [entry.to_json() for entry in page],
            },
        )

    async def _handle_stats(self, _request: web.Request) -> web.Response:
        return _json_response(200, self.stats())

    async def _handle_get_faults(self, _request: web.Request) -> web.Response:
        return _json_response(200, self._faults.to_json())

    async def _handle_set_faults(self, request: web.Request) -> web.Response:
        try:
            changes = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _json_response(400, {"error": "body must be a JSON object"})
        if not isinstance(changes, dict):
            return _json_response(400, {"error": "body must be a JSON object"})
        try:
            faults = self.set_faults(changes)
        except (TypeError, ValueError) as exc:
            return _json_response(400, {"error": str(exc)})
        return _json_response(200, faults.to_json())

    async def _handle_reset(self, _request: web.Request) -> web.Response:
        self.reset()
        return _json_response(200, {"status": "ok"})

    async def _handle_health(self, _request: web.Request) -> web.Response:
        return _json_response(200, {"status": "ok"})

    async def _handle_unknown(self, request: web.Request) -> web.Response:
        return self._error_response(
            request,
            _Reject(
                404,
                "InvalidApi.NotFound",
                f"Specified api is not found: {request.method} {request.path}.",
            ),
        )


def _validate_body(body: bytes) -> tuple[str, list[dict[str, Any]]]:
    """Check a ``PushDeviceData`` body the way the service does.

    Args:
        body: the raw request body.

    Returns:
        The ``deviceType`` and the ``devices`` list.

    Raises:
        _Reject: ``MissingParameter`` for an absent required field, ``InvalidParameter`` for
            anything else; the message names the entry index and field.
    """
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise _Reject(400, "InvalidParameter", "The request body is not valid JSON.") from None
    if not isinstance(document, dict):
        raise _Reject(400, "InvalidParameter", "The request body must be a JSON object.")
    if "deviceType" not in document:
        raise _Reject(400, "MissingParameter", "deviceType is required.")
    device_type = document["deviceType"]
    if not isinstance(device_type, str) or not device_type:
        raise _Reject(400, "InvalidParameter", "deviceType must be a non-empty string.")
    if "devices" not in document:
        raise _Reject(400, "MissingParameter", "devices is required.")
    devices = document["devices"]
    if not isinstance(devices, list) or not devices:
        raise _Reject(400, "InvalidParameter", "devices must be a non-empty list.")
    without_id = device_type in NO_DEVICE_ID_TYPES
    good_times: set[str] = set()
    for index, entry in enumerate(devices):
        where = f"devices[{index}]"
        if not isinstance(entry, dict):
            raise _Reject(400, "InvalidParameter", f"{where} must be an object.")
        record_time = entry.get("recordTime")
        if type(record_time) is not str or record_time not in good_times:
            if record_time is None:
                raise _Reject(400, "MissingParameter", f"{where}.recordTime is required.")
            if not isinstance(record_time, str) or not _is_record_time(record_time):
                raise _Reject(
                    400,
                    "InvalidParameter",
                    f"{where}.recordTime must be a real date as YYYY-MM-DD HH:MM:SS.",
                )
            good_times.add(record_time)
        data = entry.get("data")
        if data is None:
            raise _Reject(400, "MissingParameter", f"{where}.data is required.")
        if not isinstance(data, dict) or not data:
            raise _Reject(400, "InvalidParameter", f"{where}.data must be a non-empty object.")
        if set(map(type, data.values())) != _STR_ONLY:
            name = next(name for name, value in data.items() if not isinstance(value, str))
            raise _Reject(400, "InvalidParameter", f"{where}.data.{name} must be a string.")
        if "" in data:
            raise _Reject(400, "InvalidParameter", f"{where}.data has an empty point name.")
        if without_id:
            if "deviceId" in entry:
                raise _Reject(
                    400,
                    "InvalidParameter",
                    f"{where}.deviceId must be omitted for deviceType {device_type}.",
                )
        elif "deviceId" not in entry:
            raise _Reject(
                400,
                "MissingParameter",
                f"{where}.deviceId is required for deviceType {device_type}.",
            )
        elif not isinstance(entry["deviceId"], str) or not entry["deviceId"]:
            raise _Reject(400, "InvalidParameter", f"{where}.deviceId must be a non-empty string.")
    return device_type, devices


def parse_keys(text: str) -> tuple[Credentials, ...]:
    """Parse ``id:secret[:token],id2:secret2`` (the ``ENERGY_BRIDGE_STUB_KEYS`` format).

    Args:
        text: comma-separated keys; blank items are ignored.

    Returns:
        The keys in order.

    Raises:
        ValueError: an item lacks the id or the secret (the message never shows a secret).
    """
    keys = []
    for index, item in enumerate(text.split(",")):
        if item.strip():
            keys.append(_parse_key(item.strip(), where=f"key #{index + 1}"))
    return tuple(keys)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the stub's command-line flags to ``parser``.

    Args:
        parser: the (sub)command parser to extend.
    """
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument(
        "--port", type=_port, default=8080, help="TCP port, 0 for a free one (default %(default)s)"
    )
    parser.add_argument(
        "--key",
        action="append",
        type=_key_argument,
        default=[],
        metavar="ID:SECRET[:TOKEN]",
        help=f"accepted credentials, repeatable; prefer {KEYS_ENV} (the command line is visible "
        "in ps); default testid:testsecret when neither is given",
    )
    parser.add_argument("--error-rate", type=_rate, default=0.0, help="fraction answered 503")
    parser.add_argument(
        "--throttle-rate", type=_rate, default=0.0, help="fraction answered 429 Throttling.User"
    )
    parser.add_argument(
        "--retry-after-ms",
        type=_non_negative_int,
        default=None,
        help="x-acs-retry-after sent with throttled answers",
    )
    parser.add_argument(
        "--latency-ms", type=_non_negative_float, default=0.0, help="delay before answering"
    )
    parser.add_argument(
        "--outage",
        action="append",
        type=_window,
        default=[],
        metavar="START:DURATION",
        help="refuse everything with 503 from START for DURATION seconds after start; repeatable",
    )
    parser.add_argument(
        "--poison-point", default=None, help="reject any batch with an entry carrying this point"
    )
    parser.add_argument(
        "--fail-body-rate",
        type=_rate,
        default=0.0,
        help='fraction answered 200 with "data": "fail"',
    )
    parser.add_argument(
        "--max-skew-secs",
        type=_non_negative_float,
        default=900.0,
        help="accepted x-acs-date distance from the stub's clock (default %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=None, help="seed for the rate-based faults")
    parser.add_argument(
        "--no-keep", action="store_true", help="count accepted entries without storing them"
    )
    parser.add_argument(
        "--keep-max",
        type=_positive_int,
        default=None,
        metavar="N",
        help="keep only the last N accepted entries (and their fingerprints for duplicate"
        " counting), count the rest: a bound for a stub that runs for days (default: keep all)",
    )


def options_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> StubOptions:
    """Build options from parsed flags and ``ENERGY_BRIDGE_STUB_KEYS``.

    Keys from the environment come first; ``--key`` replaces one with the same id.

    Args:
        args: flags parsed by a parser set up with :func:`add_arguments`.
        environ: the environment; ``os.environ`` when ``None``.

    Returns:
        The options.

    Raises:
        ValueError: ``ENERGY_BRIDGE_STUB_KEYS`` or a fault value is invalid.
    """
    environ = os.environ if environ is None else environ
    keys = {key.access_key_id: key for key in parse_keys(environ.get(KEYS_ENV, ""))}
    keys.update((key.access_key_id, key) for key in args.key)
    faults = Faults(
        error_rate=args.error_rate,
        throttle_rate=args.throttle_rate,
        retry_after_ms=args.retry_after_ms,
        latency_ms=args.latency_ms,
        outage_windows=tuple(args.outage),
        poison_point=args.poison_point,
        fail_body_rate=args.fail_body_rate,
    )
    return StubOptions(
        host=args.host,
        port=args.port,
        keys=tuple(keys.values()) or (DEFAULT_KEY,),
        faults=faults,
        max_skew_secs=args.max_skew_secs,
        seed=args.seed,
        keep_entries=not args.no_keep,
        keep_max=args.keep_max,
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Run the stub until SIGINT or SIGTERM.

    Prints ``cloud-stub listening on http://HOST:PORT`` (the real port) to stdout once
    listening.

    Args:
        args: flags parsed by a parser set up with :func:`add_arguments`.

    Returns:
        The process exit status: 0 after a signal, 2 for bad options, 1 if it cannot listen.
    """
    try:
        options = options_from_args(args)
    except ValueError as exc:
        print(f"cloud-stub: {exc}", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        asyncio.run(_serve(options))
    except OSError as exc:
        print(f"cloud-stub: cannot listen on {options.host}:{options.port}: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m bridge.tools.cloud_stub``.

    Args:
        argv: the arguments; ``sys.argv[1:]`` when ``None``.

    Returns:
        The process exit status.
    """
    parser = argparse.ArgumentParser(
        prog="cloud-stub", description="Local stand-in for the Energy Expert push API."
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


async def _serve(options: StubOptions) -> None:
    """Serve until a stop signal arrives, then shut the server down."""
    stub = CloudStub(options)
    runner = web.AppRunner(stub.make_app(), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, options.host, options.port)
        await site.start()
        port = runner.addresses[0][1]
        host = f"[{options.host}]" if ":" in options.host else options.host
        log.info(
            "cloud-stub keys: %s; faults: %s; keeping %s",
            ", ".join(stub.key_ids),
            stub.faults.to_json(),
            "no entries"
            if not options.keep_entries
            else f"the last {options.keep_max} entries"
            if options.keep_max is not None
            else "every entry",
        )
        print(f"cloud-stub listening on http://{host}:{port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(signum, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def _retry_after(faults: Faults) -> str | None:
    """The ``x-acs-retry-after`` text of a throttled answer, if any."""
    if faults.retry_after_raw is not None:
        return faults.retry_after_raw
    return None if faults.retry_after_ms is None else str(faults.retry_after_ms)


def _hostile_refusal(faults: Faults) -> _Reject:
    """The refusal a hostile cloud answers with (see :class:`Faults`)."""
    raw: bytes | None = None
    if faults.refuse_body is not None or faults.refuse_body_size:
        raw = (faults.refuse_body or "").encode()
        raw += b"x" * max(0, faults.refuse_body_size - len(raw))
    return _Reject(
        faults.refuse_status,
        faults.refuse_code,
        f"Refused with {faults.refuse_code or 'no code'} (injected).",
        raw_body=raw,
    )


async def _in_pieces(
    request: web.Request, response: web.Response, faults: Faults
) -> web.StreamResponse:
    """Send ``response``'s body in ``answer_pieces`` chunks with pauses between them."""
    body = bytes(response.body) if isinstance(response.body, (bytes, bytearray)) else b""
    stream = web.StreamResponse(status=response.status, headers=response.headers)
    stream.enable_chunked_encoding()
    await stream.prepare(request)
    pieces = min(faults.answer_pieces, max(1, len(body)))
    size = -(-len(body) // pieces)
    for start in range(0, len(body), size):
        await stream.write(body[start : start + size])
        if faults.piece_delay_ms and start + size < len(body):
            await asyncio.sleep(faults.piece_delay_ms / 1000)
    await stream.write_eof()
    return stream


def _check_poison(devices: list[dict[str, Any]], point: str) -> None:
    for index, entry in enumerate(devices):
        if point in entry["data"]:
            raise _Reject(
                400,
                "InvalidParameter",
                f"devices[{index}].data.{point} is not accepted (injected poison point).",
            )


def _is_record_time(value: str) -> bool:
    if len(value) != 19 or _RECORD_TIME.fullmatch(value) is None:
        return False
    try:
        datetime(
            int(value[0:4]),
            int(value[5:7]),
            int(value[8:10]),
            int(value[11:13]),
            int(value[14:16]),
            int(value[17:19]),
        )
    except ValueError:
        return False
    return True


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _request_id() -> str:
    return str(uuid.uuid4()).upper()


def _json_response(
    status: int, payload: object, *, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(payload),
        content_type=_JSON_TYPE,
        charset="utf-8",
        headers=headers,
    )


def _parse_key(text: str, *, where: str) -> Credentials:
    access_key_id, _, rest = text.partition(":")
    secret, has_token, token = rest.partition(":")
    if not access_key_id or not secret:
        raise ValueError(f"{where} must look like ID:SECRET[:TOKEN]")
    if has_token and not token:
        raise ValueError(f"{where} has an empty token")
    return Credentials(access_key_id, secret, token if has_token else None)


def _key_argument(text: str) -> Credentials:
    try:
        return _parse_key(text, where="--key")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _rate(text: str) -> float:
    value = _non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction from 0 to 1")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def _port(text: str) -> int:
    value = _non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port")
    return value


def _window(text: str) -> tuple[float, float]:
    start, sep, duration = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} must look like START:DURATION")
    first, length = _non_negative_float(start), _non_negative_float(duration)
    if length <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} needs a positive DURATION")
    return first, length


if __name__ == "__main__":
    raise SystemExit(main())
