"""What to do after a push attempt: a pure classification table and the backoff policy.

Classification follows the ``Code`` table of the push API reference: by ``Code`` first, by the
HTTP status class only when no code came back (the vendor's tables disagree on statuses).
"""

from __future__ import annotations

import random
from enum import StrEnum

__all__ = ["Failure", "Outcome", "backoff", "classify"]


class Failure(StrEnum):
    """Why an attempt got no answer from the cloud.

    Kept beside the cloud's own codes, never mixed with them.
    """

    TIMEOUT = "timeout"
    """No complete answer within ``cloud.request_timeout_secs`` (the cloud may have stored it)."""
    CONNECTION = "connection"
    """The connection could not be made or broke."""
    NO_CREDENTIALS = "no_credentials"
    """No usable credentials to sign with."""


class Outcome(StrEnum):
    """The action a push result calls for."""

    SUCCESS = "success"
    """Accepted (HTTP 2xx and ``data == "success"``): delete the readings."""
    RETRY = "retry"
    """Transient (5xx, timeout, reset, unexpected answer): retry with backoff, keep data."""
    THROTTLED = "throttled"
    """Rate limited: retry later honouring ``x-acs-retry-after``, lower concurrency."""
    SIGN_AGAIN = "sign_again"
    """Nonce reused: sign again with a fresh nonce and retry at once (counts as a bug signal)."""
    CLOCK = "clock"
    """Local clock too far off: keep data, retry slowly, not ready (fix NTP)."""
    CREDENTIALS = "credentials"
    """Credentials or permission refused: keep data, pause, refresh credentials, not ready."""
    CONFIG = "config"
    """Wrong endpoint or protocol: keep data, pause, not ready."""
    PAYLOAD = "payload"
    """An entry is bad (a code that names entries): isolate the bad entries, dead-letter them,
    deliver the rest."""
    REFUSED = "refused"
    """Refused for a reason the API reference does not place (an unlisted code, a 4xx without
    one, a 2xx without ``success``): retried a few times, then the batch is split to see
    whether an entry or the request carries it; never dropped on a guess."""


_THROTTLING = frozenset({"Throttling", "Throttling.User", "Throttling.Api", "Throttling.Tenant"})
_CREDENTIALS = frozenset(
    {
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "InvalidAccessKeyId.NotFound",
        "InvalidAccessKeyId.Inactive",
        "InvalidAccessKeyId",
        "InvalidSecurityToken.Expired",
        "InvalidSecurityToken.Malformed",
        "InvalidSecurityToken.MismatchWithAccessKey",
        "InvalidSecurityToken",
        "Forbidden.RAM",
        "Forbidden",
        "NoPermission",
        "Forbidden.AccessKeyDisabled",
    }
)
# Endpoint-level codes: the request goes to the wrong place or in the wrong form, whatever it
# carries (the gateway's codes for the API, action, version, region, product and protocol).
_CONFIG_PREFIXES = (
    "InvalidApi",
    "InvalidAction",
    "InvalidVersion",
    "InvalidRegionId",
    "InvalidProduct",
    "InvalidProtocol",
    "InvalidEndpoint",
    "UnsupportedHTTPMethod",
)
_TRANSIENT = frozenset({"ServiceUnavailable", "InternalError"})
# Codes the API reference gives for an entry of the body (the message may name it).
_ENTRY_CODES = frozenset({"InvalidParameter", "MissingParameter"})


def classify(
    status: int, code: str, *, success_body: bool, failure: Failure | None = None
) -> Outcome:
    """Classify one push attempt.

    Args:
        status: the HTTP status, 0 when no response arrived (timeout, reset, refused).
        code: the cloud's error ``Code`` from the body, ``""`` when absent.
        success_body: whether the body was a JSON object with ``"data": "success"``.
        failure: why no answer arrived, when none did.

    Returns:
        The outcome to act on.
    """
    if failure is Failure.NO_CREDENTIALS:
        return Outcome.CREDENTIALS
    if failure is not None:
        return Outcome.RETRY
    if 200 <= status < 300 and success_body:
        return Outcome.SUCCESS
    if 300 <= status < 400:
        # A signed request is never validly redirected (the client does not follow).
        return Outcome.CONFIG
    if code:
        if code in _THROTTLING or code.startswith("Throttling"):
            return Outcome.THROTTLED
        if code == "SignatureNonceUsed":
            return Outcome.SIGN_AGAIN
        if code.startswith("InvalidTimeStamp"):
            return Outcome.CLOCK
        if code in _CREDENTIALS or code.startswith(
            ("InvalidAccessKeyId", "InvalidSecurityToken", "Forbidden")
        ):
            return Outcome.CREDENTIALS
        if code.startswith(_CONFIG_PREFIXES):
            return Outcome.CONFIG
        if code in _TRANSIENT:
            return Outcome.RETRY
        if code.split(".", 1)[0] in _ENTRY_CODES:
            return Outcome.PAYLOAD
        # Unknown codes: judge by status; never drop data on a guess.
    return _by_status(status)


def _by_status(status: int) -> Outcome:
    if status == 429:
        return Outcome.THROTTLED
    if status in {401, 403}:
        return Outcome.CREDENTIALS
    if status in {404, 405, 501}:
        return Outcome.CONFIG
    if status == 408 or status >= 500 or status == 0:
        return Outcome.RETRY
    # 2xx without "success", 400, 413 and other 4xx: a refusal we cannot place.
    return Outcome.REFUSED


def backoff(
    attempt: int,
    *,
    initial: float,
    cap: float,
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Capped exponential backoff with full jitter.

    Args:
        attempt: 1 for the first retry.
        initial: the cap of the first delay, in seconds.
        cap: the largest delay, in seconds.
        retry_after: a delay the server asked for; the result is never below it.
        rng: source of jitter (seeded in tests).

    Returns:
        Seconds to wait before the next attempt.
    """
    upper = min(cap, initial * (2 ** max(0, min(attempt - 1, 30))))
    delay = (rng or random).uniform(0, upper)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay
