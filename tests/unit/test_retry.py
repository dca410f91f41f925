"""The retry policy: classification table and backoff."""

from __future__ import annotations

import random

import pytest

from bridge.push.retry import Failure, Outcome, backoff, classify


@pytest.mark.parametrize(
    ("status", "code", "success_body", "expected"),
    [
        (200, "", True, Outcome.SUCCESS),
        (200, "", False, Outcome.REFUSED),
        (429, "Throttling", False, Outcome.THROTTLED),
        (400, "Throttling.User", False, Outcome.THROTTLED),
        (503, "Throttling.Api", False, Outcome.THROTTLED),
        (503, "ServiceUnavailable", False, Outcome.RETRY),
        (500, "InternalError", False, Outcome.RETRY),
        (502, "", False, Outcome.RETRY),
        (0, "", False, Outcome.RETRY),
        (400, "SignatureNonceUsed", False, Outcome.SIGN_AGAIN),
        (400, "InvalidTimeStamp.Expired", False, Outcome.CLOCK),
        (400, "SignatureDoesNotMatch", False, Outcome.CREDENTIALS),
        (400, "IncompleteSignature", False, Outcome.CREDENTIALS),
        (404, "InvalidAccessKeyId.NotFound", False, Outcome.CREDENTIALS),
        (400, "InvalidAccessKeyId.Inactive", False, Outcome.CREDENTIALS),
        (403, "Forbidden.RAM", False, Outcome.CREDENTIALS),
        (403, "NoPermission", False, Outcome.CREDENTIALS),
        (400, "InvalidSecurityToken.Expired", False, Outcome.CREDENTIALS),
        (400, "InvalidSecurityToken.SomethingNew", False, Outcome.CREDENTIALS),
        (400, "InvalidAccessKeyId.Whatever", False, Outcome.CREDENTIALS),
        (404, "InvalidApi.NotFound", False, Outcome.CONFIG),
        (400, "InvalidProtocol.NeedSsl", False, Outcome.CONFIG),
        (400, "InvalidParameter", False, Outcome.PAYLOAD),
        (400, "MissingParameter", False, Outcome.PAYLOAD),
        (400, "InvalidParameter.DeviceId", False, Outcome.PAYLOAD),
        (400, "MissingDeviceId", False, Outcome.REFUSED),
        (400, "InvalidRecordTime", False, Outcome.REFUSED),
        (404, "InvalidAction.NotFound", False, Outcome.CONFIG),
        (400, "InvalidVersion", False, Outcome.CONFIG),
        (400, "InvalidRegionId", False, Outcome.CONFIG),
        (400, "InvalidProduct.NotFound", False, Outcome.CONFIG),
        (307, "", False, Outcome.CONFIG),
        (302, "", False, Outcome.CONFIG),
        (413, "", False, Outcome.REFUSED),
        (400, "", False, Outcome.REFUSED),
        (408, "", False, Outcome.RETRY),
        (501, "", False, Outcome.CONFIG),
        (504, "", False, Outcome.RETRY),
        (500, "SomethingNew", False, Outcome.RETRY),
        (403, "", False, Outcome.CREDENTIALS),
        (404, "", False, Outcome.CONFIG),
        (429, "", False, Outcome.THROTTLED),
        (400, "SomethingNew", False, Outcome.REFUSED),
    ],
)
def test_classify_follows_the_code_table(
    status: int, code: str, success_body: bool, expected: Outcome
) -> None:
    """Test that each documented Code maps to its action, by code first and status second."""
    assert expected == classify(status, code, success_body=success_body)


def test_classify_200_with_success_body_but_error_code_is_success() -> None:
    """Test that a 2xx answer with data == success counts as accepted, whatever Code it has."""
    assert Outcome.SUCCESS == classify(200, "InvalidParameter", success_body=True)


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        (Failure.TIMEOUT, Outcome.RETRY),
        (Failure.CONNECTION, Outcome.RETRY),
        (Failure.NO_CREDENTIALS, Outcome.CREDENTIALS),
    ],
)
def test_classify_local_failures_by_their_kind(failure: Failure, expected: Outcome) -> None:
    """Test that an attempt without an answer is judged by why it got none.

    An attempt without an answer is judged by why it got none: a timeout or a
    broken connection is retried, missing credentials pause delivery (not ready).
    """
    assert expected == classify(0, "", success_body=False, failure=failure)


def test_backoff_stays_within_capped_exponential_bounds() -> None:
    """Test that full-jitter delays never exceed min(cap, initial * 2**(attempt-1))."""
    rng = random.Random(1)
    for attempt in range(1, 40):
        delay = backoff(attempt, initial=0.5, cap=30.0, rng=rng)
        assert 0 <= delay <= min(30.0, 0.5 * 2 ** (attempt - 1))


def test_backoff_honours_retry_after() -> None:
    """Test that a server-requested delay is a floor for the backoff."""
    rng = random.Random(2)
    assert all(backoff(1, initial=0.1, cap=1, retry_after=2.0, rng=rng) >= 2.0 for _ in range(50))


def test_backoff_is_jittered() -> None:
    """Test that consecutive delays for the same attempt differ (full jitter, no herd)."""
    rng = random.Random(3)
    assert len({backoff(5, initial=1, cap=60, rng=rng) for _ in range(20)}) > 10
