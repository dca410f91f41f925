"""The cloud stub as the benchmark runs it: ``bridge.tools.cloud_stub`` plus acceptance times.

The stub stores, for every accepted entry, the time it accepted it (``StoredEntry.received_at``),
but ``/_stub/received`` does not return that time. Latency publish -> cloud acceptance needs
it, so the benchmark runs the same :class:`bridge.tools.cloud_stub.CloudStub` (same checks:
signature, nonce, body shape; same flags) in this wrapper process, which adds one read-only route::

    GET /_bench/times?since=K  ->  {"seq": [...], "t": [...], "next": K2}

``seq`` is each entry's ``seq`` data point and ``t`` its acceptance time (epoch seconds, the
stub's ``time.time()``, comparable with the publisher's on the same machine). With ``--no-keep``
nothing is stored; then only ``/_stub/stats`` (``entries_accepted``, ``duplicates``,
``last_request_time``) tells how the run went.

Run as ``python -m bench.stub [cloud-stub flags]``; :class:`BenchStub` does that as a child
process with the :class:`bridge.testing.StubProcess` interface (``stats()``, ``stop()``...).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import signal
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from bridge.testing import StubProcess
from bridge.tools import cloud_stub

__all__ = ["BenchStub", "main"]

REPO_ROOT = Path(__file__).resolve().parents[1]
_TIMES_PATH = "/_bench/times"


def _times_middleware(stub: cloud_stub.CloudStub) -> Any:
    # A middleware, not a route: the stub's app ends with a catch-all route that would answer
    # any path added after it.
    @web.middleware
    async def bench_times(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path != _TIMES_PATH:
            return await handler(request)
        since = int(request.query.get("since", "0"))
        page = list(itertools.islice(stub.entries, since, None))
        seqs = [int(entry.data.get("seq", "-1")) for entry in page]
        times = [entry.received_at for entry in page]
        body = orjson.dumps({"seq": seqs, "t": times, "next": since + len(page)})
        return web.Response(body=body, content_type="application/json")

    return bench_times


async def _serve(options: cloud_stub.StubOptions) -> None:
    stub = cloud_stub.CloudStub(options)
    app = stub.make_app()
    app.middlewares.append(_times_middleware(stub))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, options.host, options.port)
        await site.start()
        port = runner.addresses[0][1]
        # The line bridge.testing.StubProcess waits for.
        print(f"cloud-stub listening on http://{options.host}:{port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the stub with the bench route until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m bench.stub")
    cloud_stub.add_arguments(parser)
    options = cloud_stub.options_from_args(parser.parse_args(argv))
    try:
        import uvloop  # noqa: PLC0415 - optional; the stub should cost as little CPU as it can
    except ImportError:
        asyncio.run(_serve(options))
    else:
        uvloop.run(_serve(options))
    return 0


class BenchStub(StubProcess):
    """:class:`bridge.testing.StubProcess` running ``python -m bench.stub`` instead.

    Args:
        workdir: directory for the log.
        args: cloud-stub flags (``--no-keep``, ``--latency-ms 200`` ...).
    """

    name = "bench-stub"
    command = ("bench.stub",)

    def __init__(self, workdir: Path, *, args: Sequence[str] = ()) -> None:
        pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        super().__init__(workdir, args=args, env={"PYTHONPATH": pythonpath})

    def times(self) -> tuple[list[int], list[float]]:
        """Every stored entry's ``seq`` and acceptance time, in acceptance order."""
        seqs: list[int] = []
        times: list[float] = []
        since = 0
        while True:
            url = f"{self.url}{_TIMES_PATH}?since={since}"
            with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 - loopback
                page = orjson.loads(response.read())
            seqs += page["seq"]
            times += page["t"]
            if page["next"] == since:
                return seqs, times
            since = page["next"]


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
