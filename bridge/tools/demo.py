"""``energy-bridge demo``: the whole picture on one machine, with real parts.

Starts a private Mosquitto (on a free loopback port, never touching a broker on 1883), the
cloud stand-in (``cloud-stub``), the meter simulator and the bridge, each as its own process;
prints live progress every two seconds; on Ctrl-C (or after ``--duration``) stops the meters,
lets the bridge deliver what it holds, and prints a summary that reconciles every message.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bridge.testing import (
    LOOPBACK,
    BridgeProcess,
    Mosquitto,
    StubProcess,
    free_port,
    port_accepts,
)

__all__ = ["add_arguments", "run_from_args"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``demo`` command's options to ``parser``."""
    parser.add_argument("--meters", type=int, default=200, help="simulated meters (%(default)s)")
    parser.add_argument(
        "--interval", type=float, default=1.0, help="seconds between readings of a meter"
    )
    parser.add_argument("--duration", type=float, default=None, help="stop after SECS seconds")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep spool, configs and logs here"
    )
    parser.add_argument(
        "--install-mosquitto",
        action="store_true",
        help="install mosquitto with apt-get when it is missing (needs root)",
    )
    parser.add_argument(
        "--cloud-error-rate", type=float, default=0.02, help="share of pushes the stub fails"
    )


def _ensure_mosquitto(install: bool) -> str | None:
    """Return a problem sentence, or ``None`` when mosquitto can be run."""
    for candidate in ("mosquitto", "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if shutil.which(candidate) or Path(candidate).is_file():
            return None
    if not install:
        return (
            "mosquitto is not installed. Install it with:\n"
            "    sudo apt-get install -y mosquitto\n"
            "or run the demo with --install-mosquitto (as root)."
        )
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "--install-mosquitto needs root and apt-get; run: sudo apt-get install -y mosquitto"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "mosquitto"]):
        subprocess.run(argv, check=True, env=env)  # noqa: S603 - fixed argv
    # Debian starts the system service on install; the demo uses its own broker regardless.
    return None


def _metric(metrics: dict[str, float], name: str) -> float:
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


class _Progress:
    def __init__(self) -> None:
        self.last: dict[str, float] = {}
        self.last_time = time.monotonic()

    def line(self, metrics: dict[str, float]) -> str:
        now = time.monotonic()
        dt = max(now - self.last_time, 1e-6)
        received = _metric(metrics, "bridge_messages_received_total")
        delivered = _metric(metrics, "bridge_readings_delivered_total")
        rate_in = (received - self.last.get("in", 0.0)) / dt
        rate_out = (delivered - self.last.get("out", 0.0)) / dt
        self.last = {"in": received, "out": delivered}
        self.last_time = now
        errors = sum(
            v
            for k, v in metrics.items()
            if k.startswith("bridge_push_requests_total{") and 'outcome="success"' not in k
        )
        return (
            f"in {rate_in:7.0f}/s  out {rate_out:7.0f}/s  "
            f"received {received:8.0f}  delivered {delivered:8.0f}  "
            f"spooled {_metric(metrics, 'bridge_spool_readings'):6.0f}  "
            f"lag {_metric(metrics, 'bridge_spool_oldest_reading_age_seconds'):5.1f}s  "
            f"rejected {_metric(metrics, 'bridge_messages_rejected_total'):4.0f}  "
            f"push errors {errors:4.0f}"
        )


def run_from_args(args: argparse.Namespace) -> int:
    """Run the demo until Ctrl-C or ``--duration``; print a reconciling summary."""
    problem = _ensure_mosquitto(args.install_mosquitto)
    if problem:
        print(f"demo: {problem}", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="energy-bridge-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    stop = {"now": False}

    def on_signal(_signum: int, _frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    broker = Mosquitto(workdir / "mosquitto", persistence=True)
    stub = StubProcess(
        workdir / "cloud-stub",
        args=["--error-rate", str(args.cloud_error_rate), "--latency-ms", "20"],
    )
    http_port = 9108 if not port_accepts(LOOPBACK, 9108) else free_port()
    simulator: subprocess.Popen[bytes] | None = None
    bridge: BridgeProcess | None = None
    try:
        broker.start()
        stub.start()
        config_path = workdir / "bridge.yaml"
        config: dict[str, Any] = {
            "mqtt": {"host": LOOPBACK, "port": broker.port, "client_id": "energy-bridge-demo"},
            "routes": [
                {"topic": "meters/{deviceType}/{deviceId}/telemetry"},
                {"topic": "meters/{deviceType}/{deviceId}/points/{point}", "format": "value"},
            ],
            "cloud": {"endpoint": stub.url, "max_in_flight": 4},
            "batch": {"linger_secs": 1.0},
            "spool": {"path": str(workdir / "spool.db")},
            "http": {"listen": f"{LOOPBACK}:{http_port}"},
            "log": {"format": "text"},
        }
        config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        bridge = BridgeProcess(config_path, workdir=workdir / "bridge")
        bridge.start().wait_ready(30)
        sim_out = (workdir / "simulator.out").open("wb")
        sim_err = (workdir / "simulator.log").open("wb")
        simulator = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [
                sys.executable,
                "-m",
                "bridge",
                "simulate",
                "--port",
                str(broker.port),
                "--meters",
                str(args.meters),
                "--interval",
                str(args.interval),
                "--malformed-every",
                "997",
            ],
            stdout=sim_out,
            stderr=sim_err,
            stdin=subprocess.DEVNULL,
        )
        print(
            f"demo running in {workdir}\n"
            f"  mosquitto   127.0.0.1:{broker.port}\n"
            f"  cloud stub  {stub.url}  (fails {args.cloud_error_rate:.0%} of pushes on purpose)\n"
            f"  bridge      metrics {bridge.http_url}/metrics  health {bridge.http_url}/readyz\n"
            f"  simulator   {args.meters} meters, one reading each every {args.interval:g}s\n"
            "Ctrl-C stops the meters, lets the bridge deliver what it holds, and prints a summary.",
            flush=True,
        )
        progress = _Progress()
        started = time.monotonic()
        while not stop["now"]:
            if args.duration is not None and time.monotonic() - started >= args.duration:
                break
            time.sleep(2.0)
            with contextlib.suppress(OSError, AssertionError):
                print(progress.line(bridge.metrics()), flush=True)
        print("\nstopping the meters ...", flush=True)
        simulator.send_signal(signal.SIGTERM)
        simulator.wait(30)
        sim_out.close()
        sim_err.close()
        summary = json.loads((workdir / "simulator.out").read_text() or "{}")
        published = int(summary.get("published", 0))
        # Let the bridge take in and deliver everything (bounded).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            m = bridge.metrics()
            if (
                _metric(m, "bridge_messages_received_total") >= published
                and _metric(m, "bridge_spool_readings") == 0
            ):
                break
            time.sleep(0.5)
        m = bridge.metrics()
        stub_stats = stub.stats()
        received = _metric(m, "bridge_messages_received_total")
        rejected = _metric(m, "bridge_messages_rejected_total")
        accepted = _metric(m, "bridge_readings_accepted_total")
        delivered = _metric(m, "bridge_readings_delivered_total")
        dead = _metric(m, "bridge_readings_dead_lettered_total")
        spooled = _metric(m, "bridge_spool_readings")
        lost = published - received
        print(
            "\nsummary\n"
            f"  messages published by the meters  {published:9d}"
            f"  (malformed on purpose: {summary.get('malformed', 0)})\n"
            f"  messages received by the bridge   {received:9.0f}\n"
            f"    rejected and dead-lettered      {rejected:9.0f}\n"
            f"    readings accepted into spool    {accepted:9.0f}\n"
            f"  readings delivered to the cloud   {delivered:9.0f}"
            f"  (stub stored {stub_stats.get('entries_accepted', 0)} entries: per-point"
            " messages merge into one)\n"
            f"  readings refused by the cloud     {dead:9.0f}\n"
            f"  readings still in the spool       {spooled:9.0f}\n"
            f"  push requests failed and retried  "
            f"{_metric(m, 'bridge_push_retries_total'):9.0f}\n"
            f"  lost                              {lost:9.0f}\n"
            f"  received = accepted + rejected: {received == accepted + rejected}; "
            f"accepted = delivered + refused + spooled: {accepted == delivered + dead + spooled}"
            f"\nlogs and spool kept in {workdir}",
            flush=True,
        )
        return 0 if lost == 0 else 1
    finally:
        if simulator is not None and simulator.poll() is None:
            simulator.kill()
        if bridge is not None:
            with contextlib.suppress(Exception):
                bridge.terminate(20)
            bridge.kill()
        stub.kill()
        broker.stop()
