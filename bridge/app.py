"""The service: builds the stages, runs them in one TaskGroup, drains them in order.

Stages and the data between them::

    MqttSource --Inbound--> Ingest --(group commit)--> Spool
                              |  ack after commit        |
                              +--rows--> Feeder <--page--+
                                          | Batcher
                                          v
                                   queue[Batch] --> Pusher --signed POST--> cloud
                                                      |
                                                      +--delete / dead-letter--> Spool

Shutdown (SIGTERM/SIGINT): stop reading MQTT -> commit and ack what was received ->
disconnect -> close open batches -> let queued and in-flight pushes finish within
``shutdown_grace_secs`` -> commit completions -> close the spool. Whatever did not reach the
cloud stays in the spool for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time

from bridge.config import Settings
from bridge.credentials import CredentialsProvider
from bridge.health import SPOOL_FULL, Health, HealthServer
from bridge.intake.ingest import Ingest
from bridge.intake.mapping import REASONS, Mapper
from bridge.intake.mqtt import MqttSource
from bridge.models import Batch
from bridge.push.batching import Batcher
from bridge.push.client import PushClient
from bridge.push.feeder import Feeder
from bridge.push.pusher import Pusher
from bridge.spool.store import Spool
from bridge.spool.thread import SpoolWriter
from bridge.telemetry import Metrics

__all__ = ["App"]

log = logging.getLogger("bridge.app")


class App:
    """One running bridge. ``await App(settings).run()`` until a signal or :meth:`stop`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.health = Health(self.metrics)
        self.credentials = CredentialsProvider(settings.cloud.credentials)
        self._stop = asyncio.Event()
        self._pusher: Pusher | None = None
        self.http_port: int | None = None

    def stop(self) -> None:
        """Begin a graceful shutdown."""
        self._stop.set()

    def reload(self) -> None:
        """SIGHUP: re-read credentials (files or environment) on the next request."""
        log.info("reloading credentials", extra={"source": self.credentials.source})
        self.credentials.reload()
        if self._pusher is not None:
            self._pusher.resume_now()

    async def run(self) -> None:
        """Run until stopped; see the module docstring for the shutdown order."""
        s = self.settings
        loop = asyncio.get_running_loop()
        for sig, handler in (
            (signal.SIGTERM, self.stop),
            (signal.SIGINT, self.stop),
            (signal.SIGHUP, self.reload),
        ):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, handler)

        spool = await asyncio.to_thread(
            Spool.open,
            s.spool.path,
            max_bytes=s.spool.max_bytes,
            synchronous=s.spool.synchronous.value,
            dead_letter_max_bytes=s.spool.dead_letter_max_bytes,
        )
        self.metrics.spool_max_bytes.set(s.spool.max_bytes)
        writer = SpoolWriter(spool, self.metrics)
        mapper = Mapper(s.routes, s.timezone, max_payload_bytes=s.mqtt.max_payload_bytes)
        self.metrics.precreate(routes=[r.topic for r in s.routes], reasons=REASONS)
        queue: asyncio.Queue[Batch] = asyncio.Queue(maxsize=max(2, 2 * s.cloud.max_in_flight))
        batcher = Batcher(
            max_devices=s.batch.max_devices,
            max_bytes=s.batch.max_bytes,
            window_secs=s.batch.window_secs,
            linger_secs=s.batch.linger_secs,
            # Enough to fill every request in flight twice over and to take two group commits
            # in memory (else live readings are read back from the spool); more costs memory.
            max_pending=max(
                2 * s.batch.max_devices * s.cloud.max_in_flight,
                2 * min(s.spool.commit_max_rows, s.mqtt.receive_maximum),
            ),
            clock=time.time,
        )
        feeder = Feeder(writer=writer, batcher=batcher, queue=queue)
        ingest: Ingest | None = None

        def on_message(inbound: object, token: object) -> None:
            assert ingest is not None  # noqa: S101
            ingest.on_message(inbound, token)  # type: ignore[arg-type]

        source = MqttSource(s.mqtt, mapper.subscriptions, on_message, self.metrics, self.health)
        ingest = Ingest(
            mapper=mapper,
            writer=writer,
            feeder=feeder,
            ack=source.ack,
            pause=source.pause,
            resume=source.resume,
            metrics=self.metrics,
            health=self.health,
            commit_max=s.spool.commit_max_rows,
            # The broker should never send more than receive_maximum unacknowledged, but
            # mosquitto 2.0 does when it resumes a session with a queued backlog (measured:
            # 16,000 in flight at 4,096): stop reading the socket past this many.
            high_water=max(1_000, 2 * s.mqtt.receive_maximum),
            max_tracked_devices=s.metrics.max_tracked_devices,
        )
        if s.mqtt.tls.enabled and s.mqtt.tls.insecure:
            log.warning("INSECURE: mqtt.tls.insecure is on, the broker is not verified")
        if not s.cloud.verify_tls:
            log.warning("INSECURE: cloud.verify_tls is off, the cloud endpoint is not verified")
        server = HealthServer(
            host=s.http.host, port=s.http.port, health=self.health, metrics=self.metrics
        )
        await server.start()
        self.http_port = server.bound_port
        log.info(
            "energy-bridge started",
            extra={
                "broker": f"{s.mqtt.host}:{s.mqtt.port}",
                "endpoint": s.cloud.endpoint,
                "spool": str(s.spool.path),
                "routes": [r.topic for r in s.routes],
            },
        )
        async with PushClient(
            endpoint=s.cloud.endpoint,
            credentials=self.credentials,
            user_agent=s.cloud.user_agent,
            timeout_secs=s.cloud.request_timeout_secs,
            connect_timeout_secs=s.cloud.connect_timeout_secs,
            verify_tls=s.cloud.verify_tls,
            max_connections=s.cloud.max_in_flight,
        ) as client:
            pusher = Pusher(
                queue=queue,
                send=client.push,
                writer=writer,
                metrics=self.metrics,
                health=self.health,
                max_in_flight=s.cloud.max_in_flight,
                max_bytes=s.batch.max_bytes,
                retry_initial=s.cloud.retry_initial_secs,
                retry_max=s.cloud.retry_max_secs,
                on_credentials_problem=self.credentials.reload,
            )
            self._pusher = pusher
            try:
                async with asyncio.TaskGroup() as tg:
                    t_writer = tg.create_task(writer.run(), name="spool-writer")
                    t_ingest = tg.create_task(ingest.run(), name="ingest")
                    t_feeder = tg.create_task(feeder.run(), name="feeder")
                    t_pusher = tg.create_task(pusher.run(), name="pusher")
                    t_source = tg.create_task(source.run(), name="mqtt-source")
                    t_stats = tg.create_task(self._stats_loop(writer, ingest, feeder), name="stats")
                    await self._stop.wait()
                    log.info("shutting down", extra={"grace_secs": s.shutdown_grace_secs})
                    deadline = time.monotonic() + s.shutdown_grace_secs
                    # 1. stop taking messages; commit and ack what arrived (bounded: a full
                    #    spool leaves them unacknowledged, with the broker)
                    source.pause()
                    ingest.stop()
                    await asyncio.wait({t_ingest}, timeout=max(1.0, s.shutdown_grace_secs))
                    t_ingest.cancel()
                    await source.stop()
                    t_source.cancel()
                    # 2. close open batches into the queue; 3. let queued and in-flight
                    #    pushes finish. Both within the grace period: with the cloud down the
                    #    queue never drains, and every reading is in the spool anyway.
                    feeder.stop()
                    await asyncio.wait({t_feeder}, timeout=max(0.0, deadline - time.monotonic()))
                    t_feeder.cancel()
                    while not pusher.idle and time.monotonic() < deadline:  # noqa: ASYNC110
                        await asyncio.sleep(0.05)  # polling a condition of several stages
                    if not pusher.idle:
                        log.warning("grace period over; undelivered readings stay in the spool")
                    t_pusher.cancel()
                    t_stats.cancel()
                    # 4. commit the completions, then the writer returns
                    writer.close()
                    await t_writer
            finally:
                await server.stop()
                await asyncio.to_thread(writer.shutdown)
        log.info("energy-bridge stopped")

    async def _stats_loop(self, writer: SpoolWriter, ingest: Ingest, feeder: Feeder) -> None:
        m = self.metrics
        silent_after = self.settings.metrics.device_silent_after_secs
        while True:
            self.health.last_loop_tick = time.monotonic()
            now = time.time()
            m.devices_seen.set(len(ingest.last_seen))
            m.devices_silent.set(ingest.silent_devices(silent_after, now))
            try:
                stats = await writer.stats()
            except Exception:
                log.exception("spool stats failed")
            else:
                if stats.last_id > writer.last_id:
                    writer.last_id = stats.last_id
                    feeder.notice_rows(stats.last_id)
                m.spool_readings.set(stats.readings)
                m.spool_bytes.set(stats.used_bytes)
                m.dead_letters.set(stats.dead_letters)
                m.spool_oldest_age.set(
                    0
                    if stats.oldest_received_at is None
                    else max(0.0, time.time() - stats.oldest_received_at)
                )
                if stats.full:
                    m.spool_full.set(1)
                    self.health.set("spool", SPOOL_FULL)
                elif writer.full_reason is None and "spool" in self.health.problems:
                    self.health.set("spool", None)
                    m.spool_full.set(0)
            await asyncio.sleep(1.0)
