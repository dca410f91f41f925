"""The pusher: workers that deliver batches with bounded, adaptive concurrency.

Per batch: flag its rows as sent, then attempt until the cloud gives a final answer.
Completions (delete, dead-letter) are handed to the spool and never awaited here: they ride its
next transaction, are retried until they commit, and are committed before shutdown ends.

* success -> delete the rows;
* transient / throttled -> back off (full jitter, honouring ``x-acs-retry-after``) and retry;
  throttling also halves the concurrency limit (AIMD: +1 per limit's worth of successes);
* credentials / config / clock -> keep everything, pause all workers, report not ready;
* payload -> split the batch to isolate the bad entries, dead-letter only those.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable

from bridge.health import Health
from bridge.logs import Throttled
from bridge.models import Batch
from bridge.push.client import PushResult
from bridge.push.retry import Failure, Outcome, backoff, classify
from bridge.spool.store import DeadLetter
from bridge.spool.thread import SpoolThread
from bridge.stage import Finished
from bridge.telemetry import Metrics

__all__ = ["AdaptiveLimit", "Pusher"]

log = logging.getLogger("bridge.push")

_ENTRY_INDEX = re.compile(r"devices\[(\d+)\]")


class AdaptiveLimit:
    """AIMD concurrency limit between 1 and ``maximum``."""

    def __init__(self, maximum: int, metrics: Metrics) -> None:
        self.maximum = maximum
        self.limit = float(maximum)
        self.in_flight = 0
        self._cond = asyncio.Condition()
        self._metrics = metrics
        metrics.concurrency_limit.set(self.limit)

    async def __aenter__(self) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: self.in_flight < int(self.limit))
            self.in_flight += 1
        self._metrics.requests_in_flight.set(self.in_flight)

    async def __aexit__(self, *exc: object) -> None:
        async with self._cond:
            self.in_flight -= 1
            self._cond.notify_all()
        self._metrics.requests_in_flight.set(self.in_flight)

    def on_success(self) -> None:
        """Additive increase: about +1 per ``limit`` successes."""
        self.limit = min(float(self.maximum), self.limit + 1.0 / self.limit)
        self._metrics.concurrency_limit.set(self.limit)

    def on_throttle(self) -> None:
        """Multiplicative decrease."""
        self.limit = max(1.0, self.limit / 2.0)
        self._metrics.concurrency_limit.set(self.limit)


class _Pause:
    """A pause every worker honours before sending (credentials/config failures).

    :meth:`clear` ends it at once for every waiting worker (credentials reloaded, or a
    request succeeded).
    """

    def __init__(self) -> None:
        self.until = 0.0
        self.strikes = 0
        self._cleared = asyncio.Event()

    def extend(self, delay: float) -> None:
        self.until = max(self.until, time.monotonic() + delay)
        self._cleared.clear()

    def clear(self) -> None:
        self.until = 0.0
        self.strikes = 0
        self._cleared.set()

    async def wait(self) -> None:
        delay = self.until - time.monotonic()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._cleared.wait(), delay)


class Pusher:
    """Delivers batches from ``queue`` with up to ``max_in_flight`` concurrent requests.

    Args:
        queue: closed batches from the feeder.
        send: one signed attempt (``PushClient.push``).
        spool: the spool, for completions.
        metrics, health: observability.
        max_in_flight: hard upper bound of concurrent requests.
        retry_initial, retry_max: backoff parameters, seconds.
        on_credentials_problem: called to refresh credentials after an auth failure.
    """

    def __init__(
        self,
        *,
        queue: asyncio.Queue[Batch],
        send: Callable[[bytes], Awaitable[PushResult]],
        spool: SpoolThread,
        metrics: Metrics,
        health: Health,
        max_in_flight: int,
        retry_initial: float,
        retry_max: float,
        on_credentials_problem: Callable[[], None] = lambda: None,
        rng: random.Random | None = None,
    ) -> None:
        self._queue = queue
        self._send = send
        self._spool = spool
        self._metrics = metrics
        self._health = health
        self._max_in_flight = max_in_flight
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._on_credentials_problem = on_credentials_problem
        self._rng = rng or random.Random()
        self.limit = AdaptiveLimit(max_in_flight, metrics)
        self._pause = _Pause()
        self._busy = 0
        self._workers: list[asyncio.Task[None]] = []
        self._finished = Finished()
        self._failures_log = Throttled(log)

    def resume_now(self) -> None:
        """End a credentials/config pause at once (after SIGHUP reloaded the credentials)."""
        self._pause.clear()

    @property
    def idle(self) -> bool:
        """No batch queued or being delivered."""
        return self._busy == 0 and self._queue.empty()

    async def run(self) -> None:
        """Run ``max_in_flight`` workers until stopped."""
        try:
            async with asyncio.TaskGroup() as tg:
                self._workers = [
                    tg.create_task(self._worker(), name=f"push-worker-{n}")
                    for n in range(self._max_in_flight)
                ]
        finally:
            self._finished.set()

    async def stop(self, deadline: float) -> None:
        """Let queued and in-flight batches finish until ``deadline``, then stop the workers.

        What is not delivered by then stays in the spool for the next start.
        """
        with contextlib.suppress(TimeoutError):
            # Every batch taken from the queue is marked done once final (or cancelled).
            await asyncio.wait_for(self._queue.join(), max(0.0, deadline - time.monotonic()))
        if not self.idle:
            log.warning("grace period over; undelivered readings stay in the spool")
        for worker in self._workers:
            worker.cancel()
        await self._finished.wait(time.monotonic() + 5.0)

    async def _worker(self) -> None:
        while True:
            batch = await self._queue.get()
            self._busy += 1
            try:
                await self._deliver(batch)
            finally:
                self._busy -= 1
                self._queue.task_done()

    async def _deliver(self, batch: Batch) -> None:
        self._metrics.batch_devices.observe(batch.size)
        self._metrics.batch_bytes.observe(len(batch.body))
        # Not awaited: the flag rides the next spool transaction, and the worker goes on to
        # send. (A crash before that commit only makes a later resend go uncounted.)
        self._spool.mark_sent(batch.rids).add_done_callback(self._count_redelivered)
        await self._attempt_until_final(batch)

    def _count_redelivered(self, done: asyncio.Future[int]) -> None:
        if not done.cancelled() and done.exception() is None and done.result():
            self._metrics.readings_redelivered.inc(done.result())

    async def _attempt_until_final(self, batch: Batch) -> None:
        attempt = 0
        while True:
            await self._pause.wait()
            attempt += 1
            if attempt > 1:
                self._metrics.push_retries.inc()
            async with self.limit:
                result = await self._send(batch.body)
            outcome = classify(
                result.status, result.code, success_body=result.success, failure=result.failure
            )
            self._metrics.push_requests.labels(outcome.value, result.label).inc()
            if result.status or result.failure is Failure.TIMEOUT:
                # Timeouts count: leaving them out would flatter the latency when the cloud is
                # at its slowest.
                self._metrics.push_latency.observe(result.elapsed)
            if outcome is Outcome.SUCCESS:
                await self._succeeded(batch)
                return
            if outcome is Outcome.PAYLOAD:
                await self._isolate(batch, result)
                return
            self._note_failure(outcome, result, batch)
            if result.failure is Failure.TIMEOUT:
                # The service may have stored it; the retry can be a duplicate.
                self._metrics.readings_redelivered.inc(len(batch.rids))
            if outcome is Outcome.SIGN_AGAIN:
                continue  # a fresh nonce and date come with every attempt
            if outcome is Outcome.THROTTLED:
                self.limit.on_throttle()
            if outcome in {Outcome.CREDENTIALS, Outcome.CONFIG, Outcome.CLOCK}:
                self._pause.strikes += 1
                delay = backoff(
                    self._pause.strikes,
                    initial=max(1.0, self._retry_initial),
                    cap=max(60.0, self._retry_max),
                    rng=self._rng,
                )
                self._pause.extend(delay)
                if outcome is Outcome.CREDENTIALS:
                    self._on_credentials_problem()
                continue
            await asyncio.sleep(
                backoff(
                    attempt,
                    initial=self._retry_initial,
                    cap=self._retry_max,
                    retry_after=result.retry_after,
                    rng=self._rng,
                )
            )

    async def _succeeded(self, batch: Batch) -> None:
        self.limit.on_success()
        if self._pause.strikes:
            self._pause.clear()
        if "cloud" in self._health.problems:
            # Recovered: the next failure of any kind deserves a line at once.
            self._failures_log.reset()
            self._health.set("cloud", None)
        rids = batch.rids
        self._spool.complete(delivered=rids)
        self._metrics.readings_delivered.inc(len(rids))
        now = time.time()
        observe = self._metrics.e2e_latency.observe
        for received in batch.received_ats:
            observe(now - received)

    async def _isolate(self, batch: Batch, result: PushResult) -> None:
        """Split a refused batch until the refused entries stand alone; dead-letter those."""
        if batch.size == 1:
            dead = [
                DeadLetter(rid, result.code or "InvalidParameter", result.message[:500])
                for rid in batch.rids
            ]
            self._spool.complete(dead=dead)
            self._metrics.readings_dead_lettered.labels(result.code or "payload").inc(len(dead))
            log.error(
                "entry refused by the cloud, dead-lettered",
                extra={
                    "code": result.code,
                    "error": result.message[:300],
                    "request_id": result.request_id,
                    "readings": len(dead),
                },
            )
            return
        # When the service names the entry, cut there; otherwise halve.
        match = _ENTRY_INDEX.search(result.message)
        cut = batch.size // 2
        if match and 0 <= int(match.group(1)) < batch.size:
            index = int(match.group(1))
            parts = [(0, index), (index, index + 1), (index + 1, batch.size)]
        else:
            parts = [(0, cut), (cut, batch.size)]
        for start, stop in parts:
            if start < stop:
                await self._attempt_until_final(batch.slice(start, stop))

    def _note_failure(self, outcome: Outcome, result: PushResult, batch: Batch) -> None:
        """Readiness and one throttled log line for a failed attempt."""
        if outcome in {Outcome.CREDENTIALS, Outcome.CONFIG, Outcome.CLOCK}:
            # A stable reason (the code, not the message, which may quote a per-request
            # hash), so the transition is logged once; the details go to the failure log.
            reason = f"cloud refuses our {outcome.value}: {result.label}"
            if result.failure is Failure.NO_CREDENTIALS:
                # Nothing was sent: the message says which file or variable to fix (never a
                # secret), and stays the same for as long as that problem does.
                reason = f"no usable credentials: {result.message}"
            self._health.set("cloud", reason)
        # One log line per distinct problem per minute, not one per request.
        self._failures_log.log(
            f"{outcome.value}|{result.label}",
            logging.WARNING,
            "push failed, will retry",
            {
                "outcome": outcome.value,
                "code": result.code,
                "status": result.status,
                "error": result.message[:300],
                "request_id": result.request_id,
                "devices": batch.size,
            },
        )
