"""Readiness state and the HTTP endpoint: ``/healthz``, ``/readyz``, ``/metrics``.

Readiness is a set of named conditions (``mqtt``, ``spool``, ``cloud``); the bridge is ready when
none reports a problem. Every transition is logged once, with its reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bridge.telemetry import Metrics

__all__ = ["SPOOL_FULL", "Health", "HealthServer"]

SPOOL_FULL = "spool full: MQTT messages are not acknowledged until there is room again"
"""The readiness reason while the spool refuses new readings (one stable text, so the
transition is logged once; the numbers go to the log line and the metrics)."""

log = logging.getLogger("bridge.health")


class Health:
    """Named readiness conditions; ``problems`` maps a condition to why it is not ready."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self.problems: dict[str, str] = {}
        self.last_loop_tick = time.monotonic()
        metrics.ready.set(0)

    def set(self, condition: str, problem: str | None) -> None:
        """Record that ``condition`` is fine (``None``) or not ready because of ``problem``."""
        before = self.problems.get(condition)
        if problem == before:
            return
        was_ready = self.ready
        self._metrics.not_ready.labels(condition).set(0 if problem is None else 1)
        if problem is None:
            del self.problems[condition]
            log.info("condition cleared", extra={"condition": condition, "was": before})
        else:
            self.problems[condition] = problem
            log.warning("not ready", extra={"condition": condition, "reason": problem})
        if was_ready != self.ready:
            log.info("readiness changed", extra={"ready": self.ready, "problems": self.problems})
        self._metrics.ready.set(1 if self.ready else 0)

    @property
    def ready(self) -> bool:
        """True when no condition reports a problem."""
        return not self.problems


class HealthServer:
    """Serves health and metrics on ``host:port`` (loopback by default).

    A stage like the others: :meth:`start` binds (so a port in use fails the start), :meth:`run`
    serves and ticks the liveness clock once a second, :meth:`stop` stops serving.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        health: Health,
        metrics: Metrics,
        identity: Mapping[str, str] | None = None,
    ) -> None:
        # Which replica answers (client id, host name, share group): several stand behind
        # one Service, and /readyz alone should tell which one is not ready.
        self._identity = dict(identity or {})
        self._host = host
        self._port = port
        self._health = health
        self._metrics = metrics
        self._runner: web.AppRunner | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        """Bind and start serving."""
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics_view)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        # The port actually bound (``port: 0``): TCPSite has no public accessor for its server.
        server: Any = site._server  # noqa: SLF001
        sockets = getattr(server, "sockets", None)
        port = int(sockets[0].getsockname()[1]) if sockets else self._port
        log.info("http listening", extra={"listen": f"{self._host}:{port}"})

    async def run(self) -> None:
        """Serve until stopped; tick the liveness clock (``/healthz``) once a second."""
        while not self._stopped.is_set():
            self._health.last_loop_tick = time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), 1.0)

    async def stop(self, deadline: float) -> None:
        """Stop serving (at once: there is nothing to finish)."""
        self._stopped.set()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def _healthz(self, _request: web.Request) -> web.Response:
        # The loop answered this request, so it is responsive; also report how late the
        # periodic tick is, which exposes a loop blocked by long synchronous work.
        lag = time.monotonic() - self._health.last_loop_tick
        status = 200 if lag < 30 else 503
        return web.json_response(
            {"alive": status == 200, "tick_lag_secs": round(lag, 3)}, status=status
        )

    async def _readyz(self, _request: web.Request) -> web.Response:
        replica = {"replica": self._identity} if self._identity else {}
        if self._health.ready:
            return web.json_response({"ready": True, **replica})
        return web.json_response(
            {"ready": False, "problems": self._health.problems, **replica}, status=503
        )

    async def _metrics_view(self, _request: web.Request) -> web.Response:
        body = await asyncio.to_thread(generate_latest, self._metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
