"""``energy-bridge spool drain --path FILE``: push another replica's spool file to the cloud.

For a replica that is gone for good but whose disk survived (its volume can be mounted
elsewhere): the readings it had committed, and acknowledged to the broker, live only in its
spool. This command takes that file's lock (so no bridge runs on it meanwhile, and it refuses
a file a live bridge holds), then runs the push half of the pipeline on it: feeder, batcher
and pusher exactly as ``run`` does, which delete a row only when the cloud said ``"success"``
and move rows the cloud refuses to that file's dead letters. It ends when the file holds no
reading, or at ``--timeout`` with what is left still in the file (run it again).

Safe beside a running bridge: it touches only the given file, and serves no HTTP port.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import orjson

from bridge.config import Settings, load_settings
from bridge.credentials import CredentialsProvider
from bridge.errors import ConfigError, SpoolLockedError
from bridge.health import Health
from bridge.push.delivery import build_delivery, push_client
from bridge.spool.lock import SpoolLock
from bridge.spool.store import SpoolStore
from bridge.spool.thread import SpoolThread
from bridge.stage import Stage
from bridge.telemetry import Metrics

__all__ = ["add_arguments", "drain_spool", "run_from_args"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``spool`` command's actions to ``parser``."""
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser(
        "drain", help="push every reading of a stopped replica's spool file to the cloud"
    )
    p.add_argument("--config", type=Path, help="YAML config (cloud, batch settings)")
    p.add_argument("--path", type=Path, required=True, help="the spool file to drain")
    p.add_argument(
        "--timeout", type=float, default=600.0, help="give up after this long (default 600)"
    )


async def drain_spool(settings: Settings, path: Path, *, give_up_secs: float) -> dict[str, object]:
    """Push every reading of the spool at ``path``; returns the report.

    Raises:
        SpoolLockedError: a bridge runs on that spool.
        SpoolError: the file cannot be opened as a spool.
    """
    s = settings
    credentials = CredentialsProvider(s.cloud.credentials)
    credentials.check_format()
    metrics = Metrics()
    health = Health(metrics)
    with SpoolLock(path):
        store = await asyncio.to_thread(
            SpoolStore.open,
            path,
            max_bytes=s.spool.max_bytes,
            synchronous=s.spool.synchronous.value,
        )
        spool = SpoolThread(store, metrics, health, stats_interval=0.5)
        before = await spool.stats()
        async with push_client(s.cloud, credentials) as client:
            delivery = build_delivery(
                s,
                client=client,
                spool=spool,
                metrics=metrics,
                health=health,
                on_credentials_problem=credentials.reload,
            )
            stages: list[Stage] = [delivery.feeder, delivery.pusher, spool]
            after = before
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(stage.run()) for stage in stages]
                deadline = time.monotonic() + give_up_secs
                while time.monotonic() < deadline:
                    after = await spool.stats()
                    if after.readings == 0:
                        break
                    await asyncio.sleep(0.2)
                stop_by = time.monotonic() + s.shutdown_grace_secs
                for stage, task in zip(stages, tasks, strict=True):
                    await stage.stop(stop_by)
                    task.cancel()
    left = after.readings
    refused = after.dead_letters.get("cloud", 0) - before.dead_letters.get("cloud", 0)
    return {
        "path": str(path),
        "readings_before": before.readings,
        "delivered": before.readings - left - refused,
        "dead_lettered": refused,
        "left": left,
        "problems": dict(health.problems),
    }


def run_from_args(args: argparse.Namespace) -> int:
    """Run ``spool drain``; prints one JSON report, returns 0 when the file holds no reading."""
    settings = load_settings(args.config)
    path: Path = args.path
    if not path.exists():
        raise ConfigError("", f"no spool at {path}")
    try:
        report = asyncio.run(drain_spool(settings, path, give_up_secs=args.timeout))
    except SpoolLockedError as exc:
        raise SpoolLockedError(
            f"{exc}: a running bridge delivers its own spool; drain only the spool of a"
            " replica that is stopped"
        ) from None
    sys.stdout.write(orjson.dumps(report).decode() + "\n")
    return 0 if report["left"] == 0 else 1
