"""The pusher and the push client against the cloud stand-in, with a real spool behind them."""

from __future__ import annotations

import asyncio
import random

import pytest

from bridge.credentials import ENV_SECRET, CredentialsProvider
from bridge.health import Health
from bridge.models import Batch, Reading
from bridge.push.batching import Batcher
from bridge.push.client import PushClient
from bridge.push.pusher import Pusher
from bridge.spool.store import DeadLetterFilter, SpoolStore
from bridge.spool.thread import SpoolThread
from bridge.telemetry import Metrics
from tests.stages.conftest import Cloud, eventually, reading, reopened, running, sample


def _pusher(
    client: PushClient,
    spool: SpoolThread,
    metrics: Metrics,
    health: Health,
    *,
    retry_initial: float = 0.01,
    rng: random.Random | None = None,
    on_credentials_problem: CredentialsProvider | None = None,
    max_in_flight: int = 4,
    initial_in_flight: int | None = None,
) -> tuple[Pusher, asyncio.Queue[Batch]]:
    queue: asyncio.Queue[Batch] = asyncio.Queue()
    pusher = Pusher(
        queue=queue,
        send=client.push,
        spool=spool,
        metrics=metrics,
        health=health,
        max_in_flight=max_in_flight,
        initial_in_flight=initial_in_flight,
        retry_initial=retry_initial,
        retry_max=0.05,
        on_credentials_problem=(
            on_credentials_problem.reload if on_credentials_problem else lambda: None
        ),
        rng=rng or random.Random(7),
    )
    return pusher, queue


async def _batch(spool: SpoolThread, readings: list[Reading], max_devices: int = 100) -> Batch:
    """Commit ``readings`` to the spool and batch them as the feeder would (one batch)."""
    rows = await spool.put(readings, [])
    batcher = Batcher(
        max_devices=max_devices, max_bytes=1 << 20, window_secs=3600, linger_secs=0, clock=lambda: 0
    )
    for row in rows:
        assert [] == batcher.add(row)
    (batch,) = batcher.flush()
    return batch


async def test_pusher_success_deletes_the_delivered_rows(
    client: PushClient,
    spool: SpoolThread,
    store: SpoolStore,
    cloud: Cloud,
    metrics: Metrics,
    health: Health,
) -> None:
    """Test that an accepted batch reaches the cloud as sent and its rows leave the spool."""
    pusher, queue = _pusher(client, spool, metrics, health)
    async with running(pusher, spool):
        await queue.put(await _batch(spool, [reading(n, f"m{n}") for n in range(3)]))
        await eventually(lambda: not store.fetch_after(0, 10), message="the rows deleted")

    expected = ({"m0": "0", "m1": "1", "m2": "2"}, 3.0)
    assert expected == (
        {d["deviceId"]: d["data"]["seq"] for d in cloud.devices()},
        sample(metrics, "bridge_readings_delivered_total"),
    )


async def test_pusher_throttling_lowers_the_concurrency_limit(
    client: PushClient, spool: SpoolThread, cloud: Cloud, metrics: Metrics, health: Health
) -> None:
    """Test that throttled answers halve the adaptive limit and the batch still arrives.

    Throttled answers halve the adaptive limit and the batch still arrives once
    the throttling stops.
    """
    cloud.stub.set_faults({"throttle_rate": 1.0, "retry_after_ms": 10})
    pusher, queue = _pusher(client, spool, metrics, health)
    async with running(pusher, spool):
        await queue.put(await _batch(spool, [reading(1)]))
        await eventually(
            lambda: sample(metrics, "bridge_push_requests_total", outcome="throttled",
                           code="Throttling.User") >= 3,
            message="three throttled answers",
        )  # fmt: skip
        throttled_limit = pusher.limit.limit
        cloud.stub.set_faults({"throttle_rate": 0.0})
        await eventually(cloud.devices, message="the batch after the throttling")

    assert 1.0 == throttled_limit  # 4 -> 2 -> 1, never below 1
    assert 1 == len(cloud.devices())


async def test_pusher_opens_its_limit_for_a_slow_cloud_and_closes_it_on_throttling(
    credentials: CredentialsProvider,
    spool: SpoolThread,
    cloud: Cloud,
    metrics: Metrics,
    health: Health,
) -> None:
    """Test that the limit opens for a slow cloud and halves on throttling; each batch once.

    A cloud answering after 100 ms, without throttling, gets more than the initial 2 requests at
    a time (the limit opens while batches wait); throttling then halves the limit.
    """
    cloud.stub.set_faults({"latency_ms": 100})
    peak = 0
    async with PushClient(
        endpoint=cloud.url,
        credentials=credentials,
        user_agent="energy-bridge-test",
        timeout_secs=5.0,
        connect_timeout_secs=1.0,
        verify_tls=True,
        max_connections=16,  # as the app sizes it: one connection per request in flight
    ) as client:
        pusher, queue = _pusher(
            client, spool, metrics, health, max_in_flight=16, initial_in_flight=2
        )
        async with running(pusher, spool):
            for n in range(60):
                await queue.put(await _batch(spool, [reading(n, f"m{n}")]))

            def delivered_all() -> bool:
                nonlocal peak
                peak = max(peak, pusher.limit.in_flight)
                return len(cloud.devices()) >= 60

            await eventually(delivered_all, message="60 batches through a 100 ms cloud")
            opened = pusher.limit.limit
            cloud.stub.set_faults({"latency_ms": 0, "throttle_rate": 1.0, "retry_after_ms": 10})
            await queue.put(await _batch(spool, [reading(60, "m60")]))
            await eventually(
                lambda: sample(metrics, "bridge_push_requests_total", outcome="throttled",
                               code="Throttling.User") >= 2,
                message="two throttled answers",
            )  # fmt: skip
            throttled = pusher.limit.limit
            cloud.stub.set_faults({"throttle_rate": 0.0})
            await eventually(lambda: len(cloud.devices()) >= 61, message="the throttled batch")

    assert opened > 4
    assert peak > 2
    assert throttled < opened * 0.75  # halved at least once (late answers may add a little)
    assert 61 == len(cloud.devices())


async def test_pusher_isolates_the_poisoned_entry_at_the_index_the_cloud_names(
    client: PushClient,
    spool: SpoolThread,
    store: SpoolStore,
    cloud: Cloud,
    metrics: Metrics,
    health: Health,
) -> None:
    """Test that a refused batch is cut at the entry the cloud names; the rest is delivered.

    A refused batch is cut at the entry the cloud names: that entry is
    dead-lettered with the cloud's code, every other entry is delivered.
    """
    cloud.stub.set_faults({"poison_point": "poison"})
    readings = [reading(n, f"m{n}") for n in range(6)]
    readings[4] = reading(4, "m4", poison="1")
    pusher, queue = _pusher(client, spool, metrics, health)
    async with running(pusher, spool):
        batch = await _batch(spool, readings)
        await queue.put(batch)
        await eventually(lambda: not store.fetch_after(0, 10), message="every row settled")

    with reopened(store.path) as settled:
        (dead,) = settled.dead_letters(DeadLetterFilter(source="cloud"))
    expected = (["m0", "m1", "m2", "m3", "m5"], ("InvalidParameter", "m4"), 4.0)
    assert expected == (
        sorted(d["deviceId"] for d in cloud.devices()),
        (dead.reason, dead.device_id),
        cloud.stub.stats()["requests"],  # the whole batch, then [0:4], [4:5], [5:6]
    )


async def test_pusher_counts_a_timed_out_batch_as_redelivered(
    client: PushClient, spool: SpoolThread, cloud: Cloud, metrics: Metrics, health: Health
) -> None:
    """Test that a batch whose request timed out is sent again and counted as redelivered.

    A batch whose request timed out is sent again and counted as redelivered (the
    cloud may have stored the first one).
    """
    cloud.stub.set_faults({"latency_ms": 1500})
    pusher, queue = _pusher(client, spool, metrics, health)
    async with running(pusher, spool):
        await queue.put(await _batch(spool, [reading(1), reading(2, "m2")]))
        await eventually(
            lambda: sample(metrics, "bridge_push_requests_total", outcome="retry", code="timeout"),
            message="a timeout",
        )
        cloud.stub.set_faults({"latency_ms": 0})
        await eventually(
            lambda: sample(metrics, "bridge_readings_delivered_total") == 2, message="delivery"
        )

    assert 2.0 <= sample(metrics, "bridge_readings_redelivered_total")


async def test_pusher_resume_now_ends_a_credentials_pause(
    client: PushClient,
    spool: SpoolThread,
    cloud: Cloud,
    metrics: Metrics,
    health: Health,
    credentials: CredentialsProvider,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Test that refused credentials pause delivery and resume_now ends the pause at once.

    Refused credentials pause delivery (not ready, data kept), and fixed
    credentials plus resume_now (what SIGHUP does) deliver at once, not after the pause.
    """
    good = credentials
    monkeypatch.setenv(ENV_SECRET, "not-the-secret")
    credentials.reload()
    # A seeded first pause of about 19 s: far longer than this test may wait.
    pusher, queue = _pusher(client, spool, metrics, health, retry_initial=30, rng=random.Random(3))
    async with running(pusher, spool):
        await queue.put(await _batch(spool, [reading(1)]))
        await eventually(lambda: "cloud" in health.problems, message="not ready")
        paused_problem = health.problems["cloud"]
        monkeypatch.setenv(ENV_SECRET, "testsecret")
        good.reload()
        pusher.resume_now()
        await eventually(cloud.devices, within=3.0, message="delivery right after resume_now")
        await eventually(lambda: health.ready, message="ready again")

    assert "SignatureDoesNotMatch" in paused_problem
    assert random.Random(0).uniform(0, 30) > 20  # the pause the test did not wait for
