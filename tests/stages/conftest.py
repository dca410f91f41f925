"""In-process stages against real, cheap neighbours (SQLite spool, stub over loopback HTTP).

The spool is SQLite in a temp dir; the cloud stand-in is served over real HTTP on loopback
(signatures checked as the cloud does) to the real push client. Each test takes seconds and
names the stage that failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp.test_utils import TestServer

from bridge.config import CredentialsSettings
from bridge.credentials import ENV_ID, ENV_SECRET, CredentialsProvider
from bridge.health import Health
from bridge.models import Reading
from bridge.push.client import PushClient
from bridge.spool.store import SpoolStore
from bridge.spool.thread import SpoolThread
from bridge.stage import Stage
from bridge.telemetry import Metrics
from bridge.tools.cloud_stub import DEFAULT_KEY, CloudStub, StubOptions

T = TypeVar("T")

T0 = 1_631_097_600  # 2021-09-08 18:40:00 in Asia/Shanghai


def reading(n: int, device_id: str = "meter-1", **data: str) -> Reading:
    """Reading ``n`` of ``device_id``: one second apart, points ``data`` or ``{"seq": n}``."""
    return Reading(
        "1",
        device_id,
        T0 + n,
        f"2021-09-08 18:{40 + n // 60:02d}:{n % 60:02d}",
        data or {"seq": str(n)},
        1000.0 + n,
    )


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    """The current value of one series (0 when it does not exist yet)."""
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def eventually(
    check: Callable[[], T | Awaitable[T]], within: float = 10.0, message: str = ""
) -> T:
    """Poll ``check`` until it returns something truthy; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {message or check}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(*stages: Stage) -> AsyncIterator[None]:
    """Run ``stages`` while inside; stop them in the given order on the way out."""
    tasks = [asyncio.create_task(stage.run()) for stage in stages]
    try:
        yield
    finally:
        deadline = time.monotonic() + 5.0
        for stage, task in zip(stages, tasks, strict=True):
            await stage.stop(deadline)
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        errors = [e for e in errors if not isinstance(e, asyncio.CancelledError)]
        assert [] == errors


@contextlib.contextmanager
def reopened(path: Path) -> Iterator[SpoolStore]:
    """The spool file at ``path`` opened again (after the stage closed it), closed on exit."""
    store = SpoolStore.open(path, max_bytes=1 << 30)
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def metrics() -> Metrics:
    """A fresh registry per test."""
    return Metrics()


@pytest.fixture
def health(metrics: Metrics) -> Health:
    """Readiness conditions backed by ``metrics``."""
    return Health(metrics)


@pytest.fixture
def spool_path(tmp_path: Path) -> Path:
    """Where the test's spool file lives."""
    return tmp_path / "spool.db"


@pytest.fixture
def store(spool_path: Path) -> Iterator[SpoolStore]:
    """A real SQLite spool with room to spare (closed by the spool stage, or here)."""
    opened = SpoolStore.open(spool_path, max_bytes=1 << 30)
    yield opened
    with contextlib.suppress(Exception):
        opened.close()


@pytest.fixture
def spool(store: SpoolStore, metrics: Metrics, health: Health) -> SpoolThread:
    """The spool stage over ``store`` (not running: tests run it with :func:`running`)."""
    return SpoolThread(store, metrics, health, stats_interval=0.05)


@pytest.fixture
def credentials(monkeypatch: pytest.MonkeyPatch) -> CredentialsProvider:
    """The stub's default key, from the vendor's environment variables."""
    monkeypatch.setenv(ENV_ID, DEFAULT_KEY.access_key_id)
    monkeypatch.setenv(ENV_SECRET, DEFAULT_KEY.access_key_secret)
    return CredentialsProvider(CredentialsSettings())


@dataclass
class Cloud:
    """The cloud stand-in served in-process, and where."""

    stub: CloudStub
    url: str

    def devices(self) -> list[dict[str, Any]]:
        """Every entry the stub accepted, as the API names its fields."""
        return [entry.to_json() for entry in self.stub.entries]


@pytest.fixture
async def cloud() -> AsyncIterator[Cloud]:
    """The cloud stand-in, served in-process over real HTTP on 127.0.0.1."""
    stub = CloudStub(StubOptions(seed=1))
    server = TestServer(stub.make_app(), host="127.0.0.1")
    await server.start_server()
    try:
        yield Cloud(stub, f"http://127.0.0.1:{server.port}")
    finally:
        await server.close()


@pytest.fixture
async def client(cloud: Cloud, credentials: CredentialsProvider) -> AsyncIterator[PushClient]:
    """The push client aimed at the in-process stub (1 s timeout)."""
    async with PushClient(
        endpoint=cloud.url,
        credentials=credentials,
        user_agent="energy-bridge-test",
        timeout_secs=1.0,
        connect_timeout_secs=1.0,
        verify_tls=True,
        max_connections=4,
    ) as opened:
        yield opened
