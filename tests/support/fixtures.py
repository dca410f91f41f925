"""Signatures of the process fixtures, for annotating test arguments.

The fixtures themselves live in ``tests/conftest.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from bridge.testing import BridgeProcess, Mosquitto, StubProcess

__all__ = ["BridgeFactory", "MosquittoFactory", "StubFactory"]


class MosquittoFactory(Protocol):
    """The ``mosquitto_factory`` fixture: private brokers with custom options."""

    def __call__(
        self,
        *,
        persistence: bool = True,
        max_inflight: int | None = None,
        max_queued_messages: int = 0,
        extra_conf: str = "",
        start: bool = True,
    ) -> Mosquitto:
        """Create (and by default start) a broker that is killed at teardown."""
        ...


class StubFactory(Protocol):
    """The ``stub_factory`` fixture: cloud stubs with extra CLI arguments."""

    def __call__(
        self, *args: str, env: dict[str, str] | None = None, start: bool = True
    ) -> StubProcess:
        """Create (and by default start) a cloud stub that is killed at teardown."""
        ...


class BridgeFactory(Protocol):
    """The ``bridge_factory`` fixture: bridge processes wired to the test broker and stub."""

    def __call__(
        self,
        *,
        mqtt_port: int | None = None,
        cloud_url: str | None = None,
        config: Path | None = None,
        env: dict[str, str] | None = None,
        start: bool = True,
        ready_timeout: float | None = 30.0,
        **overrides: Any,
    ) -> BridgeProcess:
        """Create (and by default start and await) a bridge that is killed at teardown."""
        ...
