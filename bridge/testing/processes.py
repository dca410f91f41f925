"""Real-process helpers shared by the demo, the benchmark and the tests.

Public on purpose (like a ``testing`` module of fakes): :class:`Mosquitto` (a private broker on
a free loopback port), :class:`StubProcess` (``energy-bridge cloud-stub`` as a child process,
with a client of its ``/_stub`` API) and :class:`BridgeProcess` (``energy-bridge run``).

Every helper is a small class with one lifecycle: construct (nothing runs), ``start()``, use,
``stop()``/``terminate()``/``kill()``, possibly ``start()`` again. Everything listens on
127.0.0.1 and a free port, never on the system broker's 1883. Children are also killed when
the parent exits (``atexit``) or dies (``PR_SET_PDEATHSIG`` on Linux), so a crashed run leaves
nothing behind. Waiting is always on a condition with a deadline (:func:`wait_until`).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Final, Self, TypeVar

import yaml

__all__ = [
    "LOOPBACK",
    "TEST_ENV",
    "BridgeProcess",
    "Mosquitto",
    "StubProcess",
    "deep_merge",
    "free_port",
    "parse_metrics",
    "port_accepts",
    "wait_until",
    "write_bridge_config",
]

LOOPBACK: Final = "127.0.0.1"
MOSQUITTO_CANDIDATES: Final = ("mosquitto", "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
_SYSTEM_BROKER_PORT: Final = 1883
_STUB_LISTENING = re.compile(r"cloud-stub listening on (http://(\S+):(\d+))")

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# Small utilities


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (bind to port 0).

    Another process may take it before it is used; :class:`Mosquitto` retries on a new port
    when the bind fails.
    """
    for _ in range(20):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((LOOPBACK, 0))
            port: int = sock.getsockname()[1]
        if port != _SYSTEM_BROKER_PORT:
            return port
    raise RuntimeError("no free port found")


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float,
    interval: float = 0.05,
    message: str | Callable[[], str] = "condition",
) -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns something truthy.

    Args:
        predicate: the condition; exceptions it raises propagate.
        timeout: seconds before giving up.
        interval: seconds between calls.
        message: what is awaited, for the failure message; a callable is called only then,
            so it can describe the state at the time of failure.

    Returns:
        The predicate's first truthy result.

    Raises:
        AssertionError: the predicate stayed falsy for ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(
                f"timed out after {timeout:g}s waiting for {text} (last: {result!r})"
            )
        time.sleep(interval)


def port_accepts(host: str, port: int, timeout: float = 0.2) -> bool:
    """Return whether a TCP connection to ``host:port`` succeeds right now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc.strerror}>"
    return "\n".join(text.splitlines()[-lines:])


def deep_merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``base`` with ``overrides`` merged in: mappings merge, anything else replaces."""
    merged = dict(base)
    for key, value in overrides.items():
        current = merged.get(key)
        if isinstance(current, Mapping) and isinstance(value, Mapping):
            merged[key] = deep_merge(current, value)
        else:
            merged[key] = value
    return merged


# ---------------------------------------------------------------------------------------------
# Child processes: one base class that owns the Popen, the log file and the cleanup


_LIVE: weakref.WeakSet[_ChildProcess] = weakref.WeakSet()


def _kill_leftovers() -> None:
    for child in list(_LIVE):
        child.kill()


atexit.register(_kill_leftovers)


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    # Linux: have the kernel SIGKILL the child when the test process dies, even by SIGKILL.
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


class _ChildProcess:
    """A child process with a log file; the shared part of every process helper."""

    name = "process"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        # log_path is the log to read when debugging; output_path receives stdout/stderr.
        # They are the same file except for mosquitto, which writes its own log.
        self.log_path = workdir / f"{self.name}.log"
        self.output_path = self.log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._peak_rss_kb = 0

    @property
    def pid(self) -> int | None:
        """The process id while started, else ``None``."""
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        """Whether the process has been started and has not exited."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """Exit status of the last run (negative: killed by that signal); ``None`` if running."""
        return None if self._proc is None else self._proc.poll()

    def _spawn(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdout: int | IO[bytes] | None = None,
    ) -> subprocess.Popen[bytes]:
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self._close_log()
        self._log = self.output_path.open("ab")
        self._log.write(f"==== {time.strftime('%H:%M:%S')} start: {' '.join(argv)}\n".encode())
        self._log.flush()
        self._proc = subprocess.Popen(
            list(argv),
            cwd=self.workdir,
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
            stdout=self._log if stdout is None else stdout,
            stderr=self._log,
            # Only from the main thread: the kernel signals the child when the *thread* that
            # forked it ends, which for a worker thread can be long before the test ends.
            preexec_fn=_die_with_parent  # noqa: PLW1509 - no other threads touched in the child
            if sys.platform.startswith("linux")
            and threading.current_thread() is threading.main_thread()
            else None,
        )
        _LIVE.add(self)
        return self._proc

    def _signal_and_wait(self, sig: signal.Signals, timeout: float) -> int | None:
        self._remember_peak_rss()
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                if sig == signal.SIGKILL:
                    raise
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(10)
                self._close_log()
                raise TimeoutError(
                    f"{self.name} did not exit within {timeout}s of {sig.name}; killed it"
                ) from None
        self._close_log()
        return proc.returncode

    def _remember_peak_rss(self) -> None:
        if self.running and self.pid is not None:
            with contextlib.suppress(OSError, ValueError):
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        self._peak_rss_kb = max(self._peak_rss_kb, int(line.split()[1]))

    @property
    def peak_rss_mb(self) -> float:
        """Peak resident set size (``VmHWM``) over every run of this process so far, MiB."""
        self._remember_peak_rss()
        return round(self._peak_rss_kb / 1024, 1)

    def kill(self) -> int | None:
        """SIGKILL the process (if running) and reap it; return its exit status."""
        return self._signal_and_wait(signal.SIGKILL, 10.0)

    def _log_paths(self) -> list[Path]:
        if self._log is not None:
            self._log.flush()
        return list(dict.fromkeys([self.output_path, self.log_path]))

    def log_text(self) -> str:
        """The whole log (every run so far)."""
        texts = []
        for path in self._log_paths():
            with contextlib.suppress(FileNotFoundError):
                texts.append(path.read_text(encoding="utf-8", errors="replace"))
        return "\n".join(texts)

    def log_tail(self, lines: int = 60) -> str:
        """The last ``lines`` lines of the log."""
        return "\n".join(_tail(path, lines) for path in self._log_paths() if path.exists())

    def describe(self, lines: int = 60) -> str:
        """A block for failure reports: name, state and the tail of the log."""
        state = "running" if self.running else f"exited {self.returncode}"
        return f"---- {self.name} ({state}) {self.log_path} ----\n{self.log_tail(lines)}"

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def _ensure_alive(self, what: str) -> bool:
        """Return ``True`` while the process runs; raise once it has exited."""
        if self._proc is not None and self._proc.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with {self._proc.returncode} while {what}\n{self.describe()}"
            )
        return True


def _find_mosquitto() -> str:
    for candidate in MOSQUITTO_CANDIDATES:
        path = candidate if os.path.isabs(candidate) else shutil.which(candidate)
        if path and os.access(path, os.X_OK):
            return path
    raise FileNotFoundError("mosquitto not found on PATH nor in /usr/sbin; install mosquitto")


# ---------------------------------------------------------------------------------------------
# mosquitto


class Mosquitto(_ChildProcess):
    """A private mosquitto broker on 127.0.0.1 and a free port, configured for tests.

    Lifecycle: ``Mosquitto(workdir, ...)`` writes nothing; :meth:`start` writes
    ``mosquitto.conf`` and waits until the port accepts connections; :meth:`stop` (SIGTERM,
    persistence written) or :meth:`kill` (SIGKILL, at most ``autosave_interval`` lost);
    :meth:`restart` keeps the port and the persistence directory. :meth:`pause` /
    :meth:`resume` freeze the broker (SIGSTOP/SIGCONT) to simulate a hung broker.
    """

    name = "mosquitto"

    def __init__(
        self,
        workdir: Path,
        *,
        persistence: bool = True,
        max_inflight: int | None = None,
        max_queued_messages: int = 0,
        extra_conf: str = "",
        port: int | None = None,
    ) -> None:
        """Describe the broker; nothing runs until :meth:`start`.

        Args:
            workdir: directory for the config, the log and the persistence file.
            persistence: save sessions and queued messages in ``workdir/data/`` (autosave 1 s).
            max_inflight: ``max_inflight_messages`` (broker default 20 when ``None``).
            max_queued_messages: per-client queue limit; 0 = unlimited (with
                ``max_queued_bytes 0``).
            extra_conf: lines appended to the generated config.
            port: a fixed port; a free one when ``None``.
        """
        super().__init__(workdir)
        # mosquitto writes its own log (log_dest file); its stdout/stderr go to a second file.
        self.output_path = workdir / "mosquitto.out"
        self.persistence = persistence
        self.max_inflight = max_inflight
        self.max_queued_messages = max_queued_messages
        self.extra_conf = extra_conf
        self.host = LOOPBACK
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self.conf_path = workdir / "mosquitto.conf"
        self.data_dir = workdir / "data"
        self.executable = _find_mosquitto()

    @property
    def url(self) -> str:
        """``mqtt://127.0.0.1:PORT``."""
        return f"mqtt://{self.host}:{self.port}"

    @property
    def db_path(self) -> Path:
        """The persistence file (exists after the first save)."""
        return self.data_dir / "mosquitto.db"

    def config_text(self) -> str:
        """The configuration :meth:`start` writes."""
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            # Running as root, mosquitto would switch to user 'mosquitto', which cannot write
            # into the test's temp dir.
            "user root",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp_format %H:%M:%S",
            f"max_queued_messages {self.max_queued_messages}",
            "max_queued_bytes 0",
        ]
        if self.max_inflight is not None:
            lines.append(f"max_inflight_messages {self.max_inflight}")
        if self.persistence:
            lines += [
                "persistence true",
                f"persistence_location {self.data_dir}/",
                "autosave_interval 1",
            ]
        else:
            lines.append("persistence false")
        if self.extra_conf:
            lines.append(self.extra_conf)
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 10.0) -> Mosquitto:
        """Start the broker and wait until its port accepts TCP connections.

        When the port was picked here and the bind fails (someone took it meanwhile), a new
        free port is tried, up to three times.

        Raises:
            RuntimeError: mosquitto exited (the message holds the tail of its log).
            AssertionError: the port did not open within ``timeout`` seconds.
        """
        for attempt in range(3):
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self.conf_path.write_text(self.config_text(), encoding="utf-8")
            # mosquitto writes its own log file; our log only gets what it prints before that.
            self._spawn([self.executable, "-c", str(self.conf_path)])
            try:
                wait_until(
                    lambda: self._ensure_alive("starting") and port_accepts(self.host, self.port),
                    timeout,
                    message=lambda: f"mosquitto on port {self.port}\n{self.describe()}",
                )
            except RuntimeError:
                if (
                    self._fixed_port
                    or attempt == 2
                    or "Address already in use" not in (self.log_text())
                ):
                    raise
                self.port = free_port()
                continue
            except BaseException:
                self.kill()
                raise
            return self
        raise AssertionError("unreachable")  # pragma: no cover

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM and wait: mosquitto saves its persistence file on a clean exit."""
        return self._signal_and_wait(signal.SIGTERM, timeout)

    def restart(self, *, hard: bool = False, timeout: float = 10.0) -> Mosquitto:
        """Stop (SIGKILL when ``hard``) and start again on the same port and data dir."""
        if hard:
            self.kill()
        else:
            self.stop(timeout)
        self._fixed_port = True  # clients know this port now: never move it
        return self.start(timeout)

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP): connections stay open, nothing is answered."""
        if self._proc is not None and self.running:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Unfreeze the broker after :meth:`pause` (SIGCONT)."""
        if self._proc is not None and self.running:
            self._proc.send_signal(signal.SIGCONT)

    def kill(self) -> int | None:
        """SIGKILL the broker (also when paused) and reap it."""
        self.resume()
        return super().kill()

    def __enter__(self) -> Mosquitto:
        """Start."""
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        """Kill (a test broker needs no clean stop)."""
        self.kill()


# ---------------------------------------------------------------------------------------------
# HTTP helpers (sync, stdlib)


def _http(
    method: str, url: str, body: Any = None, timeout: float = 10.0
) -> tuple[int, bytes, Mapping[str, str]]:
    """Send a request; return status, body and headers (also for 4xx/5xx answers)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)  # noqa: S310 - loopback
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def _json_ok(method: str, url: str, body: Any = None, timeout: float = 10.0) -> Any:
    status, raw, _ = _http(method, url, body, timeout)
    if not 200 <= status < 300:
        raise AssertionError(f"{method} {url} -> {status}: {raw[:500]!r}")
    return json.loads(raw) if raw.strip() else None


# ---------------------------------------------------------------------------------------------
# the cloud stub


class StubProcess(_ChildProcess):
    """``python -m bridge cloud-stub`` as a child process, and a client of its ``/_stub`` API.

    Lifecycle: :meth:`start` (waits for the ``cloud-stub listening on http://HOST:PORT``
    line), use, :meth:`stop` (SIGTERM) or :meth:`kill`; :meth:`restart` keeps the port.
    """

    name = "cloud-stub"
    command: Sequence[str] = ("bridge", "cloud-stub")
    """What runs after ``python -m`` (a subclass may run a wrapper of the stub instead)."""

    def __init__(
        self,
        workdir: Path,
        *,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        port: int = 0,
    ) -> None:
        """Describe the stub; nothing runs until :meth:`start`.

        Args:
            workdir: directory for the log.
            args: extra CLI arguments (``--error-rate 0.1``, ``--key ID:SECRET`` ...).
            env: extra environment variables (e.g. ``ENERGY_BRIDGE_STUB_KEYS``).
            port: a fixed port; ``0`` lets the stub pick one (kept on restart).
        """
        super().__init__(workdir)
        self.args = list(args)
        self.env = dict(env or {})
        self.port = port
        self.host = LOOPBACK
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:PORT`` (the bridge's ``cloud.endpoint``)."""
        if not self.port:
            raise RuntimeError("the stub has not been started yet")
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> Self:
        """Start the stub and wait for its ``listening`` line on stdout.

        Raises:
            RuntimeError: the stub exited first (with the tail of its log).
            AssertionError: no ``listening`` line within ``timeout`` seconds.
        """
        argv = [sys.executable, "-m", *self.command, "--host", self.host]
        argv += ["--port", str(self.port), *self.args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self._ready.clear()
        proc = self._spawn(argv, env=env, stdout=subprocess.PIPE)
        assert proc.stdout is not None
        self._reader = threading.Thread(
            target=self._pump, args=(proc.stdout,), name="stub-stdout", daemon=True
        )
        self._reader.start()
        try:
            wait_until(
                lambda: self._ensure_alive("starting") and self._ready.is_set(),
                timeout,
                message=lambda: f"'cloud-stub listening on' line\n{self.describe()}",
            )
        except BaseException:
            self.kill()
            raise
        return self

    def _pump(self, stream: IO[bytes]) -> None:
        # Copies the stub's stdout into the log (so the pipe never fills up) and watches for
        # the line that tells where it listens.
        log = self._log
        for raw in iter(stream.readline, b""):
            if log is not None and not log.closed:
                with contextlib.suppress(ValueError):
                    log.write(raw)
                    log.flush()
            match = _STUB_LISTENING.search(raw.decode("utf-8", "replace"))
            if match and not self._ready.is_set():
                self.host, self.port = match.group(2), int(match.group(3))
                self._ready.set()
        stream.close()

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM and wait."""
        code = self._signal_and_wait(signal.SIGTERM, timeout)
        self._join_reader()
        return code

    def kill(self) -> int | None:
        """SIGKILL and reap."""
        code = super().kill()
        self._join_reader()
        return code

    def _join_reader(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=5)
            self._reader = None

    def restart(self, timeout: float = 20.0) -> Self:
        """Stop and start again on the same port. Its memory (received, stats) starts empty."""
        self.stop()
        return self.start(timeout)

    # -- the /_stub control API ------------------------------------------------------------

    def received(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Every ``devices[]`` entry the stub accepted, oldest first.

        Each entry is ``{"deviceType", "deviceId", "recordTime", "data"}``. Follows the
        ``?since=K`` paging (``next``/``more`` in each answer) until the stub has no more.
        """
        entries: list[dict[str, Any]] = []
        since = 0
        while True:
            page = _json_ok("GET", f"{self.url}/_stub/received?since={since}", timeout=timeout)
            if not isinstance(page, dict) or not isinstance(page.get("entries"), list):
                raise TypeError(f"unexpected /_stub/received answer: {page!r:.300}")
            entries.extend(page["entries"])
            next_since = int(page.get("next", since + len(page["entries"])))
            if not page.get("more") or next_since <= since:
                return entries
            since = next_since

    def stats(self) -> dict[str, Any]:
        """The stub's counters (``GET /_stub/stats``)."""
        result = _json_ok("GET", f"{self.url}/_stub/stats")
        assert isinstance(result, dict), result
        return result

    def set_faults(self, **faults: Any) -> Any:
        """Change fault injection at run time (``POST /_stub/faults``), e.g. ``error_rate=0.2``."""
        return _json_ok("POST", f"{self.url}/_stub/faults", faults)

    def reset(self) -> Any:
        """Forget everything received and clear the faults (``POST /_stub/reset``)."""
        return _json_ok("POST", f"{self.url}/_stub/reset", {})

    def __enter__(self) -> StubProcess:
        """Start."""
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        """Kill."""
        self.kill()


# ---------------------------------------------------------------------------------------------
# the bridge


TEST_ENV: Final = {
    "ALIBABA_CLOUD_ACCESS_KEY_ID": "testid",
    "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "testsecret",
    "PYTHONUNBUFFERED": "1",
}
"""Environment every test bridge gets on top of ``os.environ``."""


def write_bridge_config(
    tmp_path: Path,
    *,
    mqtt_port: int,
    cloud_url: str,
    http_port: int,
    filename: str = "bridge.yaml",
    **overrides: Any,
) -> Path:
    """Write a bridge config for tests to ``tmp_path/filename`` and return its path.

    The base: broker at 127.0.0.1:``mqtt_port`` with a unique client id, the cloud at
    ``cloud_url`` (4 in flight, retries from 0.1 s to 2 s), 0.2 s linger, the spool in
    ``tmp_path/spool.db``, metrics on 127.0.0.1:``http_port``. ``overrides`` are sections
    deep-merged over it, e.g. ``batch={"max_devices": 10}``, ``routes=[...]``.
    """
    base: dict[str, Any] = {
        "mqtt": {
            "host": LOOPBACK,
            "port": mqtt_port,
            "client_id": f"bridge-test-{secrets.token_hex(4)}",
        },
        "cloud": {
            "endpoint": cloud_url,
            "max_in_flight": 4,
            "retry_initial_secs": 0.1,
            "retry_max_secs": 2,
        },
        "batch": {"linger_secs": 0.2},
        "spool": {"path": str(tmp_path / "spool.db")},
        "http": {"listen": f"{LOOPBACK}:{http_port}"},
    }
    path = tmp_path / filename
    tmp_path.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(deep_merge(base, overrides), sort_keys=False), "utf-8")
    return path


_SAMPLE = re.compile(r"^(?P<key>[a-zA-Z_:][a-zA-Z0-9_:]*(?:\{.*\})?)\s+(?P<value>\S+)")


def parse_metrics(text: str) -> dict[str, float]:
    """Parse Prometheus text exposition into ``{"name{labels}": value}``, summing repeats.

    The key is the sample's name plus its label block exactly as written (``name`` alone when
    it has none); comments and timestamps are dropped.
    """
    samples: dict[str, float] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            raise ValueError(f"not a Prometheus sample line: {line!r}")
        key = match["key"]
        samples[key] = samples.get(key, 0.0) + float(match["value"])
    return samples


class BridgeProcess(_ChildProcess):
    """``python -m bridge run --config PATH`` as a child process.

    Lifecycle: :meth:`start`, :meth:`wait_ready`, use (:meth:`metrics`, :meth:`log_text`),
    :meth:`terminate` (SIGTERM: the bridge drains and exits) or :meth:`kill` (SIGKILL: a
    crash); :meth:`start` again resumes from the same spool and MQTT session.
    """

    name = "bridge"

    def __init__(
        self,
        config_path: Path,
        *,
        workdir: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """Describe the bridge; nothing runs until :meth:`start`.

        Args:
            config_path: the YAML config (see :func:`write_bridge_config`).
            workdir: directory for the log; the config's directory when ``None``.
            env: extra environment on top of ``os.environ`` and :data:`TEST_ENV`.
        """
        super().__init__(workdir or config_path.parent)
        self.config_path = config_path
        self.env = dict(env or {})
        config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
        self.http_listen: str = config.get("http", {}).get("listen", "127.0.0.1:9108")

    @property
    def http_url(self) -> str:
        """``http://HOST:PORT`` of the metrics and health endpoint."""
        return f"http://{self.http_listen}"

    def start(self) -> BridgeProcess:
        """Start the bridge (does not wait; see :meth:`wait_ready`)."""
        argv = [sys.executable, "-m", "bridge", "run", "--config", str(self.config_path)]
        self._spawn(argv, env={**os.environ, **TEST_ENV, **self.env})
        return self

    def wait_ready(self, timeout: float = 30.0) -> BridgeProcess:
        """Poll ``/readyz`` until it answers 200.

        Raises:
            RuntimeError: the bridge exited (with the tail of its log).
            AssertionError: not ready within ``timeout`` seconds.
        """

        def ready() -> bool:
            self._ensure_alive("waiting for /readyz")
            try:
                status, _, _ = _http("GET", f"{self.http_url}/readyz", timeout=2.0)
            except OSError:
                return False
            return status == 200

        wait_until(ready, timeout, interval=0.1, message=lambda: f"/readyz\n{self.describe()}")
        return self

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        """GET ``path`` from the bridge's HTTP endpoint; return status and body."""
        status, body, _ = _http("GET", f"{self.http_url}{path}", timeout=timeout)
        return status, body

    def metrics(self) -> dict[str, float]:
        """``/metrics`` parsed by :func:`parse_metrics`."""
        status, body = self.get("/metrics")
        if status != 200:
            raise AssertionError(f"/metrics -> {status}: {body[:300]!r}")
        return parse_metrics(body.decode())

    def metric(self, name: str, **labels: str) -> float:
        """Sum of every sample of ``name`` whose labels include ``labels`` (0 if none)."""
        wanted = [f'{key}="{value}"' for key, value in labels.items()]
        total = 0.0
        for key, value in self.metrics().items():
            sample_name, _, label_block = key.partition("{")
            if sample_name == name and all(part in label_block for part in wanted):
                total += value
        return total

    def terminate(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait for a clean exit; return the exit status.

        Raises:
            TimeoutError: the bridge did not exit in time (it is killed first).
        """
        return self._signal_and_wait(signal.SIGTERM, timeout)

    def restart(self, timeout: float = 30.0) -> BridgeProcess:
        """:meth:`terminate` then :meth:`start` (same config, spool and MQTT session)."""
        self.terminate(timeout)
        return self.start()

    def __enter__(self) -> BridgeProcess:
        """Start."""
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        """Kill."""
        self.kill()
