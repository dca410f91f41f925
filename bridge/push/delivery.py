"""The delivery half of the pipeline, built one way for ``run`` and ``spool drain``.

spool -> :class:`~bridge.push.feeder.Feeder` -> :class:`~bridge.push.batching.Batcher` -> queue
-> :class:`~bridge.push.pusher.Pusher` -> :class:`~bridge.push.client.PushClient`. The sizes that
bound its memory (the queue, the batcher's pending readings) follow the adaptive limit's start,
not its maximum: batches beyond it wait in the spool, not in memory.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from bridge.config import CloudSettings, Settings
from bridge.credentials import CredentialsProvider
from bridge.health import Health
from bridge.models import Batch
from bridge.push.batching import Batcher
from bridge.push.client import PushClient
from bridge.push.feeder import Feeder
from bridge.push.pusher import Pusher
from bridge.spool.thread import SpoolThread
from bridge.telemetry import Metrics

__all__ = ["Delivery", "build_delivery", "push_client"]


def push_client(cloud: CloudSettings, credentials: CredentialsProvider) -> PushClient:
    """The HTTP client for ``cloud``: one connection per request the limit may allow."""
    return PushClient(
        endpoint=cloud.endpoint,
        credentials=credentials,
        user_agent=cloud.user_agent,
        timeout_secs=cloud.request_timeout_secs,
        connect_timeout_secs=cloud.connect_timeout_secs,
        verify_tls=cloud.verify_tls,
        max_connections=cloud.max_in_flight,
    )


@dataclass(frozen=True, slots=True)
class Delivery:
    """The stages that take readings from the spool to the cloud."""

    feeder: Feeder
    pusher: Pusher
    queue: asyncio.Queue[Batch]


def build_delivery(
    settings: Settings,
    *,
    client: PushClient,
    spool: SpoolThread,
    metrics: Metrics,
    health: Health,
    on_credentials_problem: Callable[[], None],
    min_pending: int = 0,
) -> Delivery:
    """Wire feeder, batcher, queue and pusher as ``settings`` say.

    Args:
        settings: the bridge's settings (``cloud`` and ``batch`` are read).
        client: sends one signed request.
        spool: where the readings are, and where completions go.
        metrics: where the stages count what they do.
        health: where the pusher reports the cloud's condition.
        on_credentials_problem: called when the cloud refuses the credentials.
        min_pending: the least the batcher may hold in memory (``run`` passes two group
            commits, so live readings are handed over instead of read back from the spool).
    """
    cloud, batch = settings.cloud, settings.batch
    start_in_flight = min(cloud.initial_in_flight, cloud.max_in_flight)
    queue: asyncio.Queue[Batch] = asyncio.Queue(maxsize=max(2, 2 * start_in_flight))
    pusher = Pusher(
        queue=queue,
        send=client.push,
        spool=spool,
        metrics=metrics,
        health=health,
        max_in_flight=cloud.max_in_flight,
        initial_in_flight=start_in_flight,
        retry_initial=cloud.retry_initial_secs,
        retry_max=cloud.retry_max_secs,
        retry_after_max=cloud.retry_after_max_secs,
        on_credentials_problem=on_credentials_problem,
    )
    batcher = Batcher(
        max_devices=batch.max_devices,
        max_bytes=batch.max_bytes,
        window_secs=batch.window_secs,
        linger_secs=batch.linger_secs,
        # Enough to fill every request in flight at the start twice over; more costs memory.
        max_pending=max(2 * batch.max_devices * start_in_flight, min_pending),
        clock=time.time,
    )
    return Delivery(Feeder(spool=spool, batcher=batcher, queue=queue), pusher, queue)
