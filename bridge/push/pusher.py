"""The pusher: workers that deliver batches with bounded, adaptive concurrency.

Per batch: flag its rows as sent, then attempt until the cloud gives a final answer.
Completions (delete, dead-letter) are handed to the spool and never awaited here: they ride its
next transaction, are retried until they commit, and are committed before shutdown ends.

* success -> delete the rows;
* transient / throttled -> back off (full jitter, honouring ``x-acs-retry-after`` up to
  ``cloud.retry_after_max_secs``) and retry; throttling also halves the concurrency limit
  (AIMD: +1 per limit's worth of successes); a reused nonce is signed again at once, then
  with backoff;
* credentials / config / clock -> keep everything, pause all workers, report not ready;
* payload (a code that names entries) -> split the batch to isolate the bad entries,
  dead-letter only those;
* refused for a reason nobody placed -> a few retries, then split as for payload; if every
  part is refused alike and nothing else gets through, the request is the problem: pause,
  not ready, keep the data.
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
_REFUSAL_RETRIES = 3
"""Attempts a refusal the classifier cannot place gets before the batch is split."""
_PAUSING = frozenset({Outcome.CREDENTIALS, Outcome.CONFIG, Outcome.CLOCK})


def _cuts(batch: Batch, refusal: PushResult) -> list[tuple[int, int]]:
    """Where to split a refused batch: around the entry the cloud names, else in halves."""
    match = _ENTRY_INDEX.search(refusal.message)
    if match and 0 <= int(match.group(1)) < batch.size:
        index = int(match.group(1))
        cuts = [(0, index), (index, index + 1), (index + 1, batch.size)]
        return [(start, stop) for start, stop in cuts if start < stop]
    half = batch.size // 2
    return [(0, half), (half, batch.size)]


class AdaptiveLimit:
    """Concurrency limit between 1 and ``maximum``: TCP's slow start and AIMD, in requests.

    It opens while latency is the constraint and closes on throttling. It starts at
    ``initial``. While requests wait for a slot (the limit, not the supply of batches, is what
    holds delivery back) each success adds one, doubling the limit every round trip, up to
    ``threshold``; past it each success adds ``1 / limit`` (one per round trip). Throttling
    halves the limit and sets the threshold there, so after a throttle the limit creeps back
    rather than doubling into the cloud's quota again. A cloud that answers slowly but without
    throttling therefore gets up to ``maximum`` requests at a time, and one that throttles gets
    about what it accepts.
    """

    def __init__(self, maximum: int, metrics: Metrics, *, initial: int | None = None) -> None:
        """Start at ``initial`` (default: ``maximum``) concurrent requests."""
        self.maximum = maximum
        self.limit = float(min(maximum, initial if initial is not None else maximum))
        self.threshold = float(maximum)
        self.in_flight = 0
        self._waiting = 0
        self._cond = asyncio.Condition()
        self._metrics = metrics
        metrics.concurrency_limit.set(self.limit)

    async def __aenter__(self) -> None:
        """Wait until fewer than ``limit`` requests are in flight, then count this one."""
        async with self._cond:
            # Requests waiting for a slot are the demand beyond the limit that opens it.
            self._waiting += 1
            try:
                await self._cond.wait_for(lambda: self.in_flight < int(self.limit))
            finally:
                self._waiting -= 1
            self.in_flight += 1
        self._metrics.requests_in_flight.set(self.in_flight)

    async def __aexit__(self, *exc: object) -> None:
        """Count this request out and wake the waiters."""
        async with self._cond:
            self.in_flight -= 1
            self._cond.notify_all()
        self._metrics.requests_in_flight.set(self.in_flight)

    def on_success(self) -> None:
        """Open up when requests had to wait for a slot: +1 below the threshold, else +1/limit.

        Without waiting requests the limit stays where it is.
        """
        if not self._waiting:
            return
        step = 1.0 if self.limit < self.threshold else 1.0 / self.limit
        self.limit = min(float(self.maximum), self.limit + step)
        self._metrics.concurrency_limit.set(self.limit)

    def on_throttle(self) -> None:
        """Multiplicative decrease; the threshold of the next opening is where it ended."""
        self.limit = max(1.0, self.limit / 2.0)
        self.threshold = max(1.0, self.limit)
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
        max_in_flight: hard upper bound of concurrent requests (one worker each).
        initial_in_flight: where the adaptive limit starts (default: ``max_in_flight``).
        retry_initial, retry_max: backoff parameters, seconds.
        retry_after_max: the longest ``x-acs-retry-after`` honoured, seconds.
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
        initial_in_flight: int | None = None,
        retry_initial: float,
        retry_max: float,
        retry_after_max: float = 60.0,
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
        self._retry_after_max = retry_after_max
        self._deliveries = 0
        self._on_credentials_problem = on_credentials_problem
        self._rng = rng or random.Random()
        self.limit = AdaptiveLimit(max_in_flight, metrics, initial=initial_in_flight)
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
        refusal = await self._until_answer(batch)
        if refusal is not None:
            await self._isolate(batch, refusal, proven=False)

    def _count_redelivered(self, done: asyncio.Future[int]) -> None:
        if not done.cancelled() and done.exception() is None and done.result():
            self._metrics.readings_redelivered.inc(done.result())

    async def _until_answer(self, batch: Batch) -> PushResult | None:
        """Attempt until the batch is delivered (``None``) or refused (the refusal).

        Everything that is not about the batch's content is waited out here: transient
        failures and throttling with backoff, a reused nonce by signing again, clock,
        credentials and configuration problems by pausing every worker (not ready). A refusal
        the classifier cannot place is retried :data:`_REFUSAL_RETRIES` times first (it may
        be a passing fault), so one odd answer never splits a batch.
        """
        attempt = 0
        refused = 0
        nonce_reused = 0
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
                self._succeeded(batch)
                return None
            if outcome is Outcome.PAYLOAD:
                return result
            if outcome is Outcome.REFUSED:
                refused += 1
                if refused > _REFUSAL_RETRIES:
                    return result
            self._note_failure(outcome, result, batch)
            if result.failure is Failure.TIMEOUT:
                # The service may have stored it; the retry can be a duplicate.
                self._metrics.readings_redelivered.inc(len(batch.rids))
            if outcome is Outcome.SIGN_AGAIN:
                nonce_reused += 1
                if nonce_reused == 1:
                    continue  # a fresh nonce and date come with every attempt
            elif outcome is Outcome.THROTTLED:
                self.limit.on_throttle()
            elif outcome in _PAUSING:
                self._pause_all(outcome)
                continue
            await asyncio.sleep(
                backoff(
                    attempt,
                    initial=self._retry_initial,
                    cap=self._retry_max,
                    retry_after=self._capped(result.retry_after),
                    rng=self._rng,
                )
            )

    def _capped(self, retry_after: float | None) -> float | None:
        """The server's ``x-acs-retry-after``, never more than ``retry_after_max``."""
        return None if retry_after is None else min(retry_after, self._retry_after_max)

    def _pause_all(self, outcome: Outcome) -> None:
        """Pause every worker, longer with each strike, until a success or :meth:`resume_now`."""
        self._pause.strikes += 1
        self._pause.extend(
            backoff(
                self._pause.strikes,
                initial=max(1.0, self._retry_initial),
                cap=max(60.0, self._retry_max),
                rng=self._rng,
            )
        )
        if outcome is Outcome.CREDENTIALS:
            self._on_credentials_problem()

    def _succeeded(self, batch: Batch) -> None:
        self._deliveries += 1
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
        self._metrics.e2e_latency.observe_ages(batch.received_ats)

    async def _isolate(self, batch: Batch, refusal: PushResult, *, proven: bool) -> None:
        """Find which entries of a refused batch carry the refusal; dead-letter only those.

        The batch is cut where the cloud names an entry (``devices[i]``), else halved, and the
        parts are sent. An entry alone is dead-lettered when the refusal is known to follow
        entries: a code that names entries, a part of the same batch that was delivered
        (``proven``), or other batches delivered meanwhile. When every part is refused alike
        and nothing else gets through, the request is the problem, not an entry: delivery
        pauses (not ready) and the batch is kept and sent again.
        """
        deliveries = self._deliveries
        while True:
            entry_fault = (
                proven
                or self._deliveries > deliveries
                or classify(refusal.status, refusal.code, success_body=False) is Outcome.PAYLOAD
            )
            if batch.size == 1:
                if entry_fault:
                    self._dead_letter(batch, refusal)
                    return
            else:
                parts = [batch.slice(start, stop) for start, stop in _cuts(batch, refusal)]
                refusals = [await self._until_answer(part) for part in parts]
                refused = [(p, r) for p, r in zip(parts, refusals, strict=True) if r is not None]
                alike = len(refused) == len(parts) and all(
                    r.label == refusal.label for _, r in refused
                )
                if not alike or entry_fault or self._deliveries > deliveries:
                    for part, part_refusal in refused:
                        await self._isolate(
                            part, part_refusal, proven=proven or len(refused) < len(parts)
                        )
                    return
            # The request itself is refused: keep the data, pause, not ready, send it again.
            self._note_failure(Outcome.REFUSED, refusal, batch, request_level=True)
            self._pause_all(Outcome.REFUSED)
            again = await self._until_answer(batch)
            if again is None:
                return
            refusal = again

    def _dead_letter(self, batch: Batch, refusal: PushResult) -> None:
        reason = refusal.code or f"HTTP {refusal.status}"
        dead = [DeadLetter(rid, reason, refusal.message[:500]) for rid in batch.rids]
        self._spool.complete(dead=dead)
        self._metrics.readings_dead_lettered.labels(refusal.label).inc(len(dead))
        log.error(
            "entry refused by the cloud, dead-lettered",
            extra={
                "code": refusal.code,
                "status": refusal.status,
                "error": refusal.message[:300],
                "request_id": refusal.request_id,
                "readings": len(dead),
            },
        )

    def _note_failure(
        self, outcome: Outcome, result: PushResult, batch: Batch, *, request_level: bool = False
    ) -> None:
        """Readiness and one throttled log line for a failed attempt."""
        if outcome in _PAUSING:
            # A stable reason (the code, not the message, which may quote a per-request
            # hash), so the transition is logged once; the details go to the failure log.
            reason = f"cloud refuses our {outcome.value}: {result.label}"
            if result.failure is Failure.NO_CREDENTIALS:
                # Nothing was sent: the message says which file or variable to fix (never a
                # secret), and stays the same for as long as that problem does.
                reason = f"no usable credentials: {result.message}"
            self._health.set("cloud", reason)
        elif request_level:
            self._health.set(
                "cloud", f"cloud refuses every request alike: {result.label} (data kept)"
            )
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
