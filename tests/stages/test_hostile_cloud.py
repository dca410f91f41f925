"""The pusher against a cloud that answers oddly.

Answers come in pieces, with redirects, with codes and statuses nobody listed, with garbage,
huge bodies and absurd retry-after values.

Every test ends in an exact account: what the cloud stored, what was dead-lettered and what
is still in the spool, with nothing lost.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bridge.health import Health
from bridge.models import Batch, Reading
from bridge.push.batching import Batcher
from bridge.push.client import PushClient
from bridge.push.pusher import Pusher
from bridge.spool.store import SpoolStore
from bridge.spool.thread import SpoolThread
from bridge.telemetry import Metrics
from tests.stages.conftest import Cloud, eventually, reading, reopened, running, sample


def _pusher(
    client: PushClient, spool: SpoolThread, metrics: Metrics, health: Health
) -> tuple[Pusher, asyncio.Queue[Batch]]:
    queue: asyncio.Queue[Batch] = asyncio.Queue()
    pusher = Pusher(
        queue=queue,
        send=client.push,
        spool=spool,
        metrics=metrics,
        health=health,
        max_in_flight=4,
        retry_initial=0.01,
        retry_max=0.05,
        retry_after_max=0.2,
        rng=random.Random(5),
    )
    return pusher, queue


async def _queue(
    spool: SpoolThread, queue: asyncio.Queue[Batch], readings: list[Reading], per_batch: int
) -> None:
    """Commit ``readings`` and queue them in batches of ``per_batch`` entries."""
    rows = await spool.put(readings, [])
    batcher = Batcher(
        max_devices=per_batch, max_bytes=1 << 20, window_secs=3600, linger_secs=0, clock=lambda: 0
    )
    for row in rows:
        for batch in batcher.add(row):
            await queue.put(batch)
    for batch in batcher.flush():
        await queue.put(batch)


def _meters(n: int, start: int = 0) -> list[Reading]:
    return [reading(i, f"m{i}") for i in range(start, start + n)]


async def test_a_success_answer_in_pieces_is_read_whole_and_not_sent_again(
    client: PushClient, spool: SpoolThread, cloud: Cloud, metrics: Metrics, health: Health
) -> None:
    """Test that a "success" answer arriving in pieces is one success (stored once).

    A "success" answer arriving in eight pieces is one success: the cloud stores
    the batch once (a client reading only the first piece retried it: stored twice).
    """
    cloud.stub.set_faults({"answer_pieces": 8, "piece_delay_ms": 20})
    pusher, queue = _pusher(client, spool, metrics, health)
    async with running(pusher, spool):
        await _queue(spool, queue, _meters(3), per_batch=10)
        await eventually(
            lambda: sample(metrics, "bridge_readings_delivered_total") == 3, message="delivery"
        )

    assert (1, 3) == (cloud.stub.stats()["requests"], len(cloud.devices()))


async def test_an_error_answer_in_pieces_keeps_its_code(
    client: PushClient, spool: SpoolThread, store: SpoolStore, cloud: Cloud, metrics: Metrics,
    health: Health,
) -> None:  # fmt: skip
    """Test that a refusal split over several pieces is still read as its Code.

    A refusal split over several pieces is still read as its Code: the poisoned
    entry is dead-lettered as InvalidParameter, the others are delivered.
    """
    cloud.stub.set_faults({"answer_pieces": 5, "piece_delay_ms": 10, "poison_point": "poison"})
    readings = [*_meters(3), reading(3, "m3", poison="1")]
    pusher, queue = _pusher(client, spool, metrics, health)
    async with running(pusher, spool):
        await _queue(spool, queue, readings, per_batch=10)
        await eventually(lambda: not store.fetch_after(0, 10), message="every row settled")

    with reopened(store.path) as settled:
        dead = [(d.reason, d.device_id) for d in settled.dead_letters()]
    assert ([("InvalidParameter", "m3")], 3) == (dead, len(cloud.devices()))


@pytest.fixture
async def elsewhere() -> AsyncIterator[tuple[str, list[str]]]:
    """Another host, where a redirect points: its URL and the headers of what it received."""
    seen: list[str] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.path} {dict(request.headers)}")
        return web.json_response({"requestId": "x", "data": "success"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}/api/v1/data/increment/push", seen
    finally:
        await server.close()


@pytest.mark.parametrize("status", [307, 302])
async def test_a_redirect_is_never_followed_and_pauses_delivery(
    client: PushClient, spool: SpoolThread, store: SpoolStore, cloud: Cloud, metrics: Metrics,
    health: Health, elsewhere: tuple[str, list[str]], status: int,
) -> None:  # fmt: skip
    """Test that a 3xx answer is a configuration problem: nothing delivered, readings kept.

    A 3xx answer is a configuration problem: the signed request (token, key id,
    body) goes nowhere else, nothing counts as delivered, the bridge is not ready and keeps
    the readings until the endpoint answers properly.
    """
    location, seen = elsewhere
    cloud.stub.set_faults({"redirect_status": status, "redirect_location": location})
    pusher, queue = _pusher(client, spool, metrics, health)
    async with running(pusher, spool):
        await _queue(spool, queue, _meters(2), per_batch=10)
        await eventually(lambda: "cloud" in health.problems, message="not ready")
        problem = health.problems["cloud"]
        kept = len(store.fetch_after(0, 10))
        delivered = sample(metrics, "bridge_readings_delivered_total")
        cloud.stub.set_faults({"redirect_status": 0})
        pusher.resume_now()
        await eventually(lambda: len(cloud.devices()) == 2, message="delivery after the fix")

    assert ([], 2, 0.0) == (seen, kept, delivered)
    assert problem.endswith(f"config: {status}")


@pytest.mark.parametrize(
    "faults",
    [
        {"refuse_status": 200, "refuse_body": '{"requestId": "r", "data": "fail"}'},
        {"refuse_status": 413, "refuse_body": "<html>Request Entity Too Large</html>"},
        {"refuse_status": 400, "refuse_code": "InvalidSomethingNew"},
    ],
    ids=["200-data-fail", "413-from-a-gateway", "400-unlisted-code"],
)
async def test_an_unknown_refusal_of_some_entries_never_holds_back_the_rest(
    client: PushClient, spool: SpoolThread, store: SpoolStore, cloud: Cloud, metrics: Metrics,
    health: Health, faults: dict[str, object],
) -> None:  # fmt: skip
    """Test that an unlisted per-entry refusal is retried, then split down to the bad entries.

    Requests carrying a "bad" entry, refused in a way nobody listed, are retried a
    few times and then split: every good reading arrives, only the bad entries are
    dead-lettered (with the answer), and no worker is held forever (old: 0 of 200 arrived).
    """
    cloud.stub.set_faults({**faults, "refuse_point": "bad"})
    readings = _meters(200)
    for n in (7, 61, 122, 180):
        readings[n] = reading(n, f"m{n}", bad="1")
    pusher, queue = _pusher(client, spool, metrics, health)
    async with running(pusher, spool):
        await _queue(spool, queue, readings, per_batch=25)
        await eventually(lambda: not store.fetch_after(0, 300), within=30, message="settled")

    with reopened(store.path) as settled:
        dead = sorted(str(d.device_id) for d in settled.dead_letters())
    delivered = {str(d["deviceId"]) for d in cloud.devices()}
    assert ["m122", "m180", "m61", "m7"] == dead
    assert {f"m{n}" for n in range(200)} - {"m7", "m61", "m122", "m180"} == delivered


@pytest.mark.parametrize(
    "faults",
    [
        {"refuse_status": 404, "refuse_code": "InvalidAction.NotFound"},
        {"refuse_status": 400, "refuse_code": "InvalidVersion"},
        {"refuse_status": 400, "refuse_code": "InvalidSomethingNew"},
        {"refuse_status": 200, "refuse_body": '{"requestId": "r", "data": "fail"}'},
    ],
    ids=["endpoint-action", "endpoint-version", "unlisted-code", "200-data-fail"],
)
async def test_a_refusal_of_every_request_pauses_and_keeps_every_reading(
    client: PushClient, spool: SpoolThread, store: SpoolStore, cloud: Cloud, metrics: Metrics,
    health: Health, faults: dict[str, object],
) -> None:  # fmt: skip
    """Test that a refusal of every request alike dead-letters nothing and keeps every reading.

    When the cloud refuses every request alike (an endpoint-level code, or an
    unknown refusal that follows no entry), nothing is dead-lettered: the bridge is not ready,
    keeps every reading, and delivers them all once the cloud accepts again (old: every
    reading dead-lettered in 2N-1 requests while ready).
    """
    cloud.stub.set_faults(faults)
    pusher, queue = _pusher(client, spool, metrics, health)
    async with running(pusher, spool):
        await _queue(spool, queue, _meters(8), per_batch=8)
        await eventually(lambda: "cloud" in health.problems, message="not ready")
        await eventually(
            lambda: sample(metrics, "bridge_push_requests_total", outcome="refused",
                           code=str(faults.get("refuse_code") or faults["refuse_status"])) >= 1
            or sample(metrics, "bridge_push_requests_total", outcome="config",
                      code=str(faults.get("refuse_code"))) >= 1,
            message="refusals",
        )  # fmt: skip
        await asyncio.sleep(0.5)
        kept = len(store.fetch_after(0, 10))
        dead = sum(store.stats().dead_letters.values())
        cloud.stub.set_faults({"refuse_status": 0})
        pusher.resume_now()
        await eventually(lambda: len(cloud.devices()) == 8, within=20, message="delivery")

    assert (8, 0) == (kept, dead)
    assert health.ready


async def test_garbage_and_huge_answers_are_retried_without_holding_memory(
    client: PushClient, spool: SpoolThread, cloud: Cloud, metrics: Metrics, health: Health
) -> None:
    """Test that a huge garbage 500 answer is read only to 64 KiB and the batch retried.

    A 500 answer of 8 MiB of garbage is read no further than 64 KiB, retried, and
    the batch delivered once the cloud is sane again.
    """
    cloud.stub.set_faults(
        {"refuse_status": 500, "refuse_body": "\x00garbage", "refuse_body_size": 8 << 20}
    )
    pusher, queue = _pusher(client, spool, metrics, health)
    async with running(pusher, spool):
        await _queue(spool, queue, _meters(2), per_batch=10)
        await eventually(
            lambda: sample(metrics, "bridge_push_requests_total", outcome="retry", code="500") >= 2,
            message="retries",
        )
        cloud.stub.set_faults({"refuse_status": 0})
        await eventually(lambda: len(cloud.devices()) == 2, message="delivery")


@pytest.mark.parametrize("retry_after", ["inf", "1e12", "nan", "-5", "soon"])
async def test_an_absurd_retry_after_never_puts_a_worker_to_sleep_for_good(
    client: PushClient, spool: SpoolThread, cloud: Cloud, metrics: Metrics, health: Health,
    retry_after: str,
) -> None:  # fmt: skip
    """Test that absurd x-acs-retry-after values are cut to cloud.retry_after_max_secs.

    x-acs-retry-after values like inf or 1e12 are cut to cloud.retry_after_max_secs
    (0.2 s here): the batch arrives soon after the throttling ends.
    """
    cloud.stub.set_faults({"throttle_rate": 1.0, "retry_after_raw": retry_after})
    pusher, queue = _pusher(client, spool, metrics, health)
    async with running(pusher, spool):
        await _queue(spool, queue, _meters(1), per_batch=10)
        await eventually(
            lambda: sample(metrics, "bridge_push_requests_total", outcome="throttled",
                           code="Throttling.User") >= 2,
            message="two throttled answers",
        )  # fmt: skip
        cloud.stub.set_faults({"throttle_rate": 0.0})
        await eventually(cloud.devices, within=3, message="delivery within 3 s")


async def test_a_reused_nonce_is_signed_again_without_a_hot_loop(
    client: PushClient, spool: SpoolThread, cloud: Cloud, metrics: Metrics, health: Health
) -> None:
    """Test that SignatureNonceUsed is re-signed at once and repeated refusals back off.

    SignatureNonceUsed is answered by signing again at once, and repeated refusals
    back off: one second of them costs a handful of requests (old: 7,172 in 3 s).
    """
    cloud.stub.set_faults({"refuse_status": 400, "refuse_code": "SignatureNonceUsed"})
    pusher, queue = _pusher(client, spool, metrics, health)
    async with running(pusher, spool):
        await _queue(spool, queue, _meters(1), per_batch=10)
        await asyncio.sleep(1.0)
        requests = cloud.stub.stats()["requests"]
        cloud.stub.set_faults({"refuse_status": 0})
        await eventually(cloud.devices, message="delivery")

    assert 2 <= requests <= 40
