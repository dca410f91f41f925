"""The service: builds the stages, runs them in one TaskGroup, stops them in reverse order.

Stages and the data between them::

    MqttSource --receive--> Ingest --(group commit)--> SpoolThread
         ^                    |  ack after commit         |
         +------ack-----------+--rows--> Feeder <--page---+
                                          | Batcher
                                          v
                                   queue[Batch] --> Pusher --signed POST--> cloud
                                                      |
                                                      +--delete / dead-letter--> SpoolThread

Every stage has the same lifecycle (:mod:`bridge.stage`): built from the cloud end back to the
broker, run together, stopped from the broker end on. Shutdown (SIGTERM/SIGINT): with
``mqtt.share_group``, leave the group first (unsubscribe, take in what the broker had assigned)
-> stop reading MQTT -> commit and ack what was received -> disconnect -> close open batches
-> let queued and in-flight pushes finish within ``shutdown_grace_secs`` -> commit completions
-> close the spool -> stop serving health. Whatever did not reach the cloud stays in the spool
for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
from dataclasses import dataclass

from bridge.config import PayloadFormat, Settings, per_point_warning
from bridge.credentials import CredentialsProvider
from bridge.errors import ConfigError
from bridge.health import Health, HealthServer
from bridge.intake.ingest import Ingest
from bridge.intake.mapping import REASONS, Mapper
from bridge.intake.mqtt import MqttSource
from bridge.intake.presets import SKIP_REASONS as PRESET_SKIP_REASONS
from bridge.intake.registry import Registry
from bridge.intake.sparkplug_route import REJECT_REASONS, SKIP_REASONS, SparkplugIntake
from bridge.push.client import PushClient
from bridge.push.delivery import build_delivery, push_client
from bridge.push.feeder import Feeder
from bridge.push.pusher import Pusher
from bridge.spool.lock import SpoolLock
from bridge.spool.store import SpoolStore
from bridge.spool.thread import SpoolThread
from bridge.stage import Stage
from bridge.telemetry import Metrics

__all__ = ["App"]

log = logging.getLogger("bridge.app")


@dataclass(slots=True)
class _Pipeline:
    """The stages of one running bridge, in the order data flows through them."""

    source: MqttSource
    ingest: Ingest
    feeder: Feeder
    pusher: Pusher
    spool: SpoolThread
    server: HealthServer

    @property
    def stop_order(self) -> list[Stage]:
        """Broker end first: nothing new comes in while the rest finishes what it holds."""
        return [self.ingest, self.source, self.feeder, self.pusher, self.spool, self.server]


class App:
    """One running bridge. ``await App(settings).run()`` until a signal or :meth:`stop`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.health = Health(self.metrics)
        self.credentials = CredentialsProvider(settings.cloud.credentials)
        self.identity = {
            "client_id": settings.mqtt.client_id,
            "hostname": socket.gethostname(),
            "share_group": settings.mqtt.share_group or "",
        }
        self.metrics.replica_info.info(self.identity)
        self._stop = asyncio.Event()
        self._pusher: Pusher | None = None
        self._ingest: Ingest | None = None
        self._registry: Registry | None = None
        self._reloading: asyncio.Task[None] | None = None

    def stop(self) -> None:
        """Begin a graceful shutdown."""
        self._stop.set()

    def reload(self) -> None:
        """SIGHUP: re-read the credentials and the device registry on their next use.

        Credentials come from files or the environment on the next request; a bad registry file
        keeps the previous table.
        """
        log.info("reloading credentials", extra={"source": self.credentials.source})
        self.credentials.reload()
        if self._pusher is not None:
            self._pusher.resume_now()
        if self.settings.registry.file is not None and (
            self._reloading is None or self._reloading.done()
        ):
            self._reloading = asyncio.get_running_loop().create_task(
                self._reload_registry(), name="registry-reload"
            )

    def load_registry(self) -> Registry | None:
        """Read ``registry.file`` (``None`` when none is configured).

        Raises:
            ConfigError: the file cannot be read or a line is wrong (the message names it).
        """
        return Registry.from_settings(self.settings.registry)

    async def _reload_registry(self) -> None:
        try:
            registry = await asyncio.to_thread(self.load_registry)
        except ConfigError as exc:
            self.metrics.registry_reloads.labels("failed").inc()
            log.error(  # noqa: TRY400 - the message says it all; no traceback
                "device registry not reloaded: the previous table stays",
                extra={"error": exc.message},
            )
            return
        self._registry = registry
        if self._ingest is not None:
            self._ingest.registry = registry
        self.metrics.registry_reloads.labels("ok").inc()
        log.info(
            "device registry reloaded",
            extra={"file": str(self.settings.registry.file), "entries": len(registry or ())},
        )

    async def run(self) -> None:
        """Build the stages, run them until stopped, stop them (see the module docstring).

        Raises:
            CredentialsMalformedError: a credentials file or variable can never work (a line
                break inside); missing credentials do not stop the start.
            SpoolLockedError: another bridge runs on this spool (nothing was started).
        """
        self.credentials.check_format()
        self._registry = self.load_registry()
        if self._registry is not None:
            log.info(
                "device registry loaded",
                extra={"file": str(self._registry.path), "entries": len(self._registry)},
            )
        # One bridge per spool, checked before anything starts: two would push every row.
        with SpoolLock(self.settings.spool.path):
            await self._run()
        log.info("energy-bridge stopped")

    async def _run(self) -> None:
        self._handle_signals()
        s = self.settings
        async with push_client(self.settings.cloud, self.credentials) as client:
            pipeline = await self._build(client)
            self._pusher = pipeline.pusher
            self._ingest = pipeline.ingest
            self._log_start()
            async with asyncio.TaskGroup() as tg:
                tasks = {
                    stage: tg.create_task(stage.run(), name=type(stage).__name__)
                    for stage in pipeline.stop_order
                }
                await self._stop.wait()
                log.info("shutting down", extra={"grace_secs": s.shutdown_grace_secs})
                deadline = time.monotonic() + s.shutdown_grace_secs
                if s.mqtt.share_group is not None:
                    # A shared member that disconnects keeps receiving its share, queued in
                    # its session (mosquitto): leave the group first, and take in what the
                    # broker had already assigned to us, within half the grace period.
                    await pipeline.source.leave_share_group(
                        time.monotonic() + max(1.0, s.shutdown_grace_secs / 2)
                    )
                # Stop reading, so the source's inbox is all ingest has left to commit.
                pipeline.source.pause()
                for stage in pipeline.stop_order:
                    # Ingest gets at least a second to commit and ack what already arrived.
                    floor = 1.0 if stage is pipeline.ingest else 0.0
                    await stage.stop(max(deadline, time.monotonic() + floor))
                    tasks[stage].cancel()

    async def _build(self, client: PushClient) -> _Pipeline:
        """The stages, from the cloud end back to the broker (each needs the next one)."""
        s = self.settings
        store = await asyncio.to_thread(
            SpoolStore.open,
            s.spool.path,
            max_bytes=s.spool.max_bytes,
            synchronous=s.spool.synchronous.value,
            dead_letter_max_bytes=s.spool.dead_letter_max_bytes,
        )
        aliases = await asyncio.to_thread(store.sparkplug_aliases)
        server = HealthServer(
            host=s.http.host,
            port=s.http.port,
            health=self.health,
            metrics=self.metrics,
            identity=self.identity,
        )
        await server.start()
        spool = SpoolThread(store, self.metrics, self.health)
        delivery = build_delivery(
            s,
            client=client,
            spool=spool,
            metrics=self.metrics,
            health=self.health,
            on_credentials_problem=self.credentials.reload,
            # Two group commits in memory, else live readings are read back from the spool.
            min_pending=2 * min(s.spool.commit_max_rows, s.mqtt.receive_maximum),
        )
        feeder, pusher = delivery.feeder, delivery.pusher
        mapper = Mapper(s.routes, s.timezone, max_payload_bytes=s.mqtt.max_payload_bytes)
        source = MqttSource(s.mqtt, mapper.subscriptions, self.metrics, self.health)

        def request_rebirth(topic: str, payload: bytes) -> bool:
            sent = source.publish(topic, payload)
            if sent:
                self.metrics.sparkplug_rebirths.inc()
                log.info("sparkplug rebirth requested", extra={"topic": topic})
            return sent

        sparkplug = SparkplugIntake(s.routes, s.timezone, publish=request_rebirth)
        sparkplug.load(aliases)
        self.metrics.precreate(
            routes=[*(t for r in s.routes for t in r.topics), *sparkplug.labels],
            reasons=(*REASONS, *REJECT_REASONS, "unknown_device"),
            skip_reasons=(
                *(PRESET_SKIP_REASONS if any(r.format.preset for r in s.routes) else ()),
                *(SKIP_REASONS if sparkplug else ()),
            ),
        )
        ingest = Ingest(
            mapper=mapper,
            spool=spool,
            feeder=feeder,
            source=source,
            metrics=self.metrics,
            commit_max=s.spool.commit_max_rows,
            # The broker should never send more than receive_maximum unacknowledged, but
            # mosquitto 2.0 does when it resumes a session with a queued backlog (measured:
            # 16,000 in flight at 4,096): stop reading the socket past this many.
            high_water=max(1_000, 2 * s.mqtt.receive_maximum),
            silent_after_secs=s.metrics.device_silent_after_secs,
            max_tracked_devices=s.metrics.max_tracked_devices,
            sparkplug=sparkplug,
            registry=self._registry,
        )
        return _Pipeline(source, ingest, feeder, pusher, spool, server)

    def _handle_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig, handler in (
            (signal.SIGTERM, self.stop),
            (signal.SIGINT, self.stop),
            (signal.SIGHUP, self.reload),
        ):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, handler)

    def _log_start(self) -> None:
        s = self.settings
        if s.mqtt.tls.enabled and s.mqtt.tls.insecure:
            log.warning("INSECURE: mqtt.tls.insecure is on, the broker is not verified")
        if not s.cloud.verify_tls:
            log.warning("INSECURE: cloud.verify_tls is off, the cloud endpoint is not verified")
        if s.cloud.plain_http_beyond_loopback:
            log.warning(
                "INSECURE: cloud.endpoint is plain http to a host that is not this machine:"
                " readings and signed requests travel unencrypted",
                extra={"endpoint": s.cloud.endpoint},
            )
        log.info(
            "energy-bridge started",
            extra={
                "broker": f"{s.mqtt.host}:{s.mqtt.port}",
                "endpoint": s.cloud.endpoint,
                "spool": str(s.spool.path),
                "routes": [
                    *(t for r in s.routes for t in r.topics),
                    *(r.subscription for r in s.routes if r.format is PayloadFormat.SPARKPLUG_B),
                ],
                "client_id": s.mqtt.client_id,
                "share_group": s.mqtt.share_group,
            },
        )
        if s.mqtt.share_group is not None and (warning := per_point_warning(s)):
            log.warning(warning)
