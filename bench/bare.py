"""The reference consumer: a bare paho-mqtt 2.x QoS 1 subscriber that only counts messages.

It takes the same load as the bridge in the same run, so ``bridge / bare`` is a ratio that
holds on a noisy machine where absolute rates do not. It connects like the bridge does
(MQTT v5, fixed client id, clean start off, session expiry, QoS 1 subscription to
``meters/+/+/telemetry``), lets paho acknowledge each message as it arrives, and does nothing
else with it.

Run as a separate process (``python -m bench.bare --port P --count N``); it prints one JSON
line when subscribed and one when done::

    {"event": "subscribed", "t": ...}
    {"event": "done", "count": N, "connected": t, "first": t, "last": t}

``--setup-only`` subscribes and disconnects at once: the broker keeps the session, and queues
what is published meanwhile for the next connection (the ``backlog`` scenario).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

__all__ = ["BareSubscriber", "main"]

REPO_ROOT = Path(__file__).resolve().parents[1]


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    # Linux: the kernel kills the child when the benchmark dies, even by SIGKILL.
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _emit(**event: Any) -> None:
    print(json.dumps(event), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Subscribe, count ``--count`` messages (or only set up the session), print, exit."""
    parser = argparse.ArgumentParser(prog="python -m bench.bare")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--client-id", default="bench-bare")
    parser.add_argument("--topic", default="meters/+/+/telemetry")
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--setup-only", action="store_true")
    args = parser.parse_args(argv)

    state = {"count": 0, "connected": 0.0, "first": 0.0, "last": 0.0}
    target = args.count

    def on_connect(client: paho.Client, *_: object) -> None:
        state["connected"] = time.time()
        client.subscribe(args.topic, qos=1)

    def on_subscribe(client: paho.Client, *_: object) -> None:
        _emit(event="subscribed", t=time.time())
        if args.setup_only:
            client.disconnect()

    def on_message(client: paho.Client, _userdata: object, _message: paho.MQTTMessage) -> None:
        count = state["count"] + 1
        state["count"] = count
        if count == 1:
            state["first"] = time.time()
        if count == target:
            state["last"] = time.time()
            client.disconnect()

    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=args.client_id,
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 3600
    client.connect(args.host, args.port, keepalive=60, clean_start=False, properties=props)
    timer = threading.Timer(args.timeout, client.disconnect)
    timer.daemon = True
    timer.start()
    client.loop_forever()
    timer.cancel()
    if not args.setup_only:
        _emit(event="done", **state)
    return 0


class BareSubscriber:
    """``python -m bench.bare`` as a child process.

    Args:
        port: the broker's port (on 127.0.0.1).
        count: messages to wait for.
        client_id: the session's client id.
        timeout: seconds the child waits for ``count`` messages before giving up.
    """

    def __init__(
        self, port: int, count: int, *, client_id: str = "bench-bare", timeout: float = 300.0
    ) -> None:
        self.argv = [
            sys.executable,
            "-m",
            "bench.bare",
            "--port",
            str(port),
            "--count",
            str(count),
            "--client-id",
            client_id,
            "--timeout",
            str(timeout),
        ]
        self.timeout = timeout
        self._proc: subprocess.Popen[str] | None = None
        self._lines: list[dict[str, Any]] = []
        self._subscribed = threading.Event()
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        return None if self._proc is None else self._proc.pid

    def _spawn(self, extra: Sequence[str] = ()) -> None:
        pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        self._lines = []
        self._subscribed.clear()
        self._proc = subprocess.Popen(
            [*self.argv, *extra],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONPATH": pythonpath},
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - the child runs no thread before exec
        )
        assert self._proc.stdout is not None
        self._reader = threading.Thread(
            target=self._pump, args=(self._proc.stdout,), name="bare-stdout", daemon=True
        )
        self._reader.start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            event = json.loads(line)
            self._lines.append(event)
            if event.get("event") == "subscribed":
                self._subscribed.set()

    def _reap(self) -> None:
        """After the child's exit: let the reader finish, then close the pipe it read."""
        if self._reader is not None:
            self._reader.join(5)
        if self._proc is not None and self._proc.stdout is not None:
            self._proc.stdout.close()

    def setup_session(self) -> None:
        """Create the persistent session (subscribe, disconnect) and wait for the exit."""
        self._spawn(["--setup-only"])
        assert self._proc is not None
        self._proc.wait(30)
        self._reap()

    def start(self, *, wait_subscribed: bool = True) -> float:
        """Start counting; return when subscribed (or at once); the return is the start time."""
        started = time.time()
        self._spawn()
        if wait_subscribed and not self._subscribed.wait(30):
            self.kill()
            raise TimeoutError("the bare subscriber did not subscribe within 30 s")
        return started

    def result(self) -> dict[str, Any]:
        """Wait for the child to finish; return its ``done`` line."""
        assert self._proc is not None
        self._proc.wait(self.timeout + 30)
        self._reap()
        done = [line for line in self._lines if line.get("event") == "done"]
        if not done:
            raise RuntimeError(f"the bare subscriber exited {self._proc.returncode} without result")
        return done[-1]

    def kill(self) -> None:
        """Kill the child if it still runs."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(10)
            self._reap()


if __name__ == "__main__":
    raise SystemExit(main())
