"""The lifecycle every stage of the pipeline shares.

A stage is built (nothing runs), then ``await stage.run()`` works until the stage is asked to
stop; ``await stage.stop(deadline)`` asks it to finish what it holds and return, and waits for
that until ``deadline`` (a :func:`time.monotonic` instant). ``stop`` is idempotent and never
raises; if ``run`` has not returned by the deadline the caller cancels its task. The app builds
the stages from the cloud end back to the broker and stops them in the reverse order (see
:mod:`bridge.app`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Protocol

__all__ = ["Finished", "Stage"]


class Stage(Protocol):
    """What the app needs of each stage."""

    async def run(self) -> None:
        """Work until stopped (or cancelled)."""
        ...

    async def stop(self, deadline: float) -> None:
        """Finish what is held and let :meth:`run` return; wait for that until ``deadline``."""
        ...


class Finished:
    """Set when a stage's :meth:`Stage.run` has returned; awaited by its ``stop``."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def set(self) -> None:
        """``run`` has returned (call in its ``finally``)."""
        self._event.set()

    @property
    def is_set(self) -> bool:
        """Whether ``run`` has returned."""
        return self._event.is_set()

    async def wait(self, deadline: float) -> bool:
        """Wait until set or ``deadline`` (monotonic); returns whether it was set."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), max(0.0, deadline - time.monotonic()))
        return self._event.is_set()
