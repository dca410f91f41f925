"""The pusher's adaptive concurrency limit: opens while requests wait, closes on throttling."""

from __future__ import annotations

import asyncio

from bridge.push.pusher import AdaptiveLimit
from bridge.telemetry import Metrics


async def _requests(limit: AdaptiveLimit, count: int, *, seconds: float = 0.005) -> int:
    """Send ``count`` requests at once through ``limit``; return the most in flight at once."""
    peak = 0

    async def one() -> None:
        nonlocal peak
        async with limit:
            peak = max(peak, limit.in_flight)
            await asyncio.sleep(seconds)
            limit.on_success()

    await asyncio.gather(*(one() for _ in range(count)))
    return peak


async def test_limit_opens_from_its_start_while_requests_wait_for_a_slot() -> None:
    """Test that with more requests than slots, successes open the limit one per success.

    The limit grows from 2 towards the maximum (slow start), and more requests run at once.
    """
    limit = AdaptiveLimit(32, Metrics(), initial=2)
    peak = await _requests(limit, 200)

    assert 32.0 == limit.limit
    assert peak > 2


async def test_limit_stays_put_when_no_request_waits() -> None:
    """Test that successes without demand beyond the limit leave it where it started."""
    limit = AdaptiveLimit(32, Metrics(), initial=4)
    for _ in range(50):
        await _requests(limit, 1)

    assert 4.0 == limit.limit


async def test_throttling_halves_the_limit_and_it_reopens_slowly() -> None:
    """Test that a throttle halves the limit and sets the threshold there.

    The next successes then add about one per round trip (1/limit each), not one each.
    """
    limit = AdaptiveLimit(32, Metrics(), initial=2)
    await _requests(limit, 200)
    limit.on_throttle()
    assert (16.0, 16.0) == (limit.limit, limit.threshold)

    await _requests(limit, 64)  # 64 successes at ~16: about 4 more

    assert 17.0 < limit.limit < 22.0


def test_limit_never_falls_below_one_nor_starts_above_its_maximum() -> None:
    """Test the bounds: repeated throttling stops at 1; a start above the maximum is cut."""
    limit = AdaptiveLimit(4, Metrics(), initial=10)
    assert 4.0 == limit.limit
    for _ in range(5):
        limit.on_throttle()
    assert 1.0 == limit.limit
