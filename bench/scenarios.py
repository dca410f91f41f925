"""The benchmark scenarios: one method per scenario, one repetition per call.

Every repetition starts from nothing: a fresh Mosquitto (persistence off, unlimited queues,
no inflight limit for v5 clients), a fresh cloud stub and a fresh bridge with a new spool, so
no session, queue or spool row of an earlier repetition is in the way. The bare paho
subscriber gets a broker of its own in the same repetition, right after the bridge, so both
see the machine in the same state and their ratio means something on a noisy machine.

Times are ``time.time()`` in every process (one machine, one clock). Definitions:

* ``readings_per_s``: ``live``, ``fixed_rate``, ``slow_cloud``: readings / (last acceptance by
  the stub - first publish). ``backlog``, ``spool``: readings / (last acceptance - the moment
  the restarted bridge answered ``/readyz`` 200, i.e. was connected to the broker with its
  spool open); the Python start-up before that is reported apart as ``startup_s``.
* latency: per reading, its first acceptance by the stub - the start of the socket write
  that carried its PUBLISH. In ``backlog`` it includes the time the reading waited in the
  broker while the bridge was down; ``spool`` has none (nothing was published).
* ``bridge_cpu_s_per_100k``: utime+stime of the bridge process (all threads) over the
  measured span, per 100,000 readings; ``bridge_loop_busy_pct``: CPU of the bridge's main
  thread (the event loop) over the same span, in percent of one core;
  ``bridge_peak_rss_mb``: ``VmHWM`` at the end; ``stub_`` / ``broker_cpu_s_per_100k``: the
  same for the stub and Mosquitto (is the machine, rather than the bridge, the limit?).
* ``lost``: readings never accepted by the stub; ``duplicated``: accepted more than once.
"""

from __future__ import annotations

import contextlib
import shutil
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.bare import BareSubscriber
from bench.loadgen import PublishResult, Workload, publish
from bench.proc import cpu_seconds, peak_rss_bytes, thread_cpu_seconds
from bench.profile import PySpy
from bench.spoolfill import fill_spool
from bench.stub import BenchStub
from bridge.config import CloudSettings
from bridge.testing import (
    BridgeProcess,
    Mosquitto,
    deep_merge,
    free_port,
    wait_until,
    write_bridge_config,
)

__all__ = ["Options", "Scenarios"]

_NO_LATENCY: dict[str, float | None] = {"p50": None, "p99": None, "max": None}


@dataclass(frozen=True, slots=True)
class Options:
    """What the run was asked for (see ``python -m bench --help``)."""

    readings: int
    meters: int
    spool_readings: int
    connections: int
    synchronous: str
    linger_secs: float
    protocol: str
    max_in_flight: int | None
    bridge_overrides: dict[str, Any]
    workdir: Path


def _percentile(ordered: list[float], fraction: float) -> float:
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def _latency_ms(latencies: list[float]) -> dict[str, float | None]:
    if not latencies:
        return dict(_NO_LATENCY)
    ordered = sorted(latencies)
    return {
        "p50": round(_percentile(ordered, 0.50) * 1000, 1),
        "p99": round(_percentile(ordered, 0.99) * 1000, 1),
        "max": round(ordered[-1] * 1000, 1),
    }


def _get_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:  # noqa: S310 - loopback
            return bool(response.status == 200)
    except OSError:
        return False


@dataclass(slots=True)
class _Rig:
    """The processes of one repetition; :meth:`close` stops whatever was started."""

    workdir: Path
    mosquitto: Mosquitto | None = None
    stub: BenchStub | None = None
    bridge: BridgeProcess | None = None
    bare: BareSubscriber | None = None

    def close(self) -> None:
        if self.bridge is not None and self.bridge.running:
            with contextlib.suppress(TimeoutError):
                self.bridge.terminate(30)
        for proc in (self.bridge, self.stub, self.mosquitto):
            if proc is not None:
                proc.kill()
        if self.bare is not None:
            self.bare.kill()


class _Meter:
    """CPU of the bridge (and its event-loop thread), the stub and the broker over a span."""

    def __init__(self, rig: _Rig) -> None:
        assert rig.bridge is not None
        assert rig.bridge.pid is not None
        self.bridge = rig.bridge
        self.pid = rig.bridge.pid
        self._others = {
            "stub": rig.stub.pid if rig.stub is not None else None,
            "broker": rig.mosquitto.pid if rig.mosquitto is not None else None,
        }
        self._start_others = {n: cpu_seconds(p) for n, p in self._others.items() if p}
        self._start_wall = time.monotonic()
        self._start_loop = thread_cpu_seconds(self.pid, self.pid)
        self._start = cpu_seconds(self.pid)

    def stop(self, readings: int) -> dict[str, float]:
        """The figures since construction, per 100k ``readings`` where it says so."""
        bridge = cpu_seconds(self.pid) - self._start
        loop = thread_cpu_seconds(self.pid, self.pid) - self._start_loop
        wall = time.monotonic() - self._start_wall
        figures = {
            "bridge_cpu_s_per_100k": bridge / readings * 100_000,
            "bridge_loop_busy_pct": 100 * loop / wall,
            "bridge_peak_rss_mb": peak_rss_bytes(self.pid) / 2**20,
        }
        for name, pid in self._others.items():
            if pid:
                used = cpu_seconds(pid) - self._start_others[name]
                figures[f"{name}_cpu_s_per_100k"] = used / readings * 100_000
        # The bridge's own view (since it started): how long spool transactions and push
        # requests took on average.
        metrics = self.bridge.metrics()
        for label, name in (
            ("spool_commit", "bridge_spool_commit_seconds"),
            ("push", "bridge_push_latency_seconds"),
        ):
            count = metrics.get(f"{name}_count", 0.0)
            total = metrics.get(f"{name}_sum", 0.0)
            figures[f"{label}_ms_mean"] = 1000 * total / count if count else 0.0
        # Every spool transaction (bridge_spool_commits_total counts only those with new
        # readings in them).
        figures["spool_transactions"] = metrics.get("bridge_spool_commit_seconds_count", 0.0)
        return figures


class Scenarios:
    """Runs repetitions of each scenario; every method returns one repetition's figures."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self._run = 0
        self._spool_template: Path | None = None
        self._spool_workload: Workload | None = None
        self.live_rates: list[float] = []
        self.fill_seconds = 0.0

    # -- building blocks --------------------------------------------------------------------

    def _dir(self, name: str) -> Path:
        self._run += 1
        path = self.options.workdir / f"{self._run:03d}-{name}"
        path.mkdir(parents=True)
        return path

    def _workload(self, readings: int | None = None) -> Workload:
        n = self.options.readings if readings is None else readings
        # Each meter's k-th reading is k seconds after base_ts; all of them lie in the past.
        return Workload(n, self.options.meters, int(time.time()) - n // self.options.meters - 60)

    def _mosquitto(self, workdir: Path) -> Mosquitto:
        # v5 clients (the bridge by default, the bare subscriber) bring their own Receive
        # Maximum; a v3.1.1 bridge gets the same 4096 from max_inflight_messages.
        inflight = 4096 if self.options.protocol == "v311" else 0
        return Mosquitto(
            workdir / "mosquitto", persistence=False, max_inflight=inflight, max_queued_messages=0
        ).start()

    def _bridge(
        self,
        rig: _Rig,
        *,
        spool_path: Path | None = None,
        workdir: Path | None = None,
        **overrides: Any,
    ) -> BridgeProcess:
        assert rig.mosquitto is not None
        assert rig.stub is not None
        options = self.options
        workdir = workdir or rig.workdir
        sections: dict[str, Any] = {
            "mqtt": {"client_id": "bench-bridge", "protocol": options.protocol},
            # The bridge's own default unless asked (the test base config pins 4 in flight).
            "cloud": {
                "max_in_flight": options.max_in_flight
                or CloudSettings.model_fields["max_in_flight"].default,
                "initial_in_flight": CloudSettings.model_fields["initial_in_flight"].default,
            },
            "batch": {"max_devices": 500, "linger_secs": options.linger_secs},
            "spool": {
                "path": str(spool_path or workdir / "spool.db"),
                "synchronous": options.synchronous,
                "max_bytes": 1 << 40,
            },
            "log": {"level": "WARNING"},
        }
        sections = deep_merge(deep_merge(sections, options.bridge_overrides), overrides)
        config = write_bridge_config(
            workdir,
            mqtt_port=rig.mosquitto.port,
            cloud_url=rig.stub.url,
            http_port=free_port(),
            **sections,
        )
        return BridgeProcess(config, workdir=workdir)

    @staticmethod
    def _start_ready(bridge: BridgeProcess, timeout: float = 60.0) -> tuple[float, float]:
        """Start the bridge; return (start time, ready time), ready polled every 5 ms."""
        started = time.time()
        bridge.start()
        url = f"{bridge.http_url}/readyz"

        def ready() -> bool:
            if not bridge.running:
                raise RuntimeError(f"the bridge exited while starting\n{bridge.describe()}")
            return _get_ok(url)

        wait_until(ready, timeout, interval=0.005, message="bridge /readyz")
        return started, time.time()

    @staticmethod
    def _wait_accepted(stub: BenchStub, count: int, bridge: BridgeProcess) -> None:
        """Wait until the stub accepted ``count`` entries."""
        timeout = 120 + count / 2000  # a bridge at 2,000 readings/s still finishes

        def done() -> bool:
            if not bridge.running:
                raise RuntimeError(f"the bridge exited\n{bridge.describe()}")
            return bool(stub.stats()["entries_accepted"] >= count)

        wait_until(
            done,
            timeout,
            interval=0.05,
            message=lambda: f"{count} entries at the stub ({stub.stats()})",
        )

    @staticmethod
    def _settled_stats(stub: BenchStub) -> dict[str, Any]:
        # A duplicate would come after the last new entry: give it a moment to show up.
        time.sleep(0.5)
        return stub.stats()

    def _publish(self, port: int, workload: Workload, rate: float | None = None) -> PublishResult:
        return publish("127.0.0.1", port, workload, connections=self.options.connections, rate=rate)

    @staticmethod
    def _accounting(
        workload: Workload, published: PublishResult, stub: BenchStub
    ) -> dict[str, Any]:
        """Lost, duplicated, latency and the last acceptance time from the stub's times."""
        seqs, times = stub.times()
        first: dict[int, float] = {}
        for seq, accepted in zip(seqs, times, strict=True):
            if seq not in first:
                first[seq] = accepted
        lost = sum(1 for seq in range(workload.readings) if seq not in first)
        latencies = [t - published.sent_at(seq) for seq, t in first.items()]
        return {
            "lost": lost,
            "duplicated": len(seqs) - len(first),
            "latency_ms": _latency_ms(latencies),
            "last_accepted": max(times) if times else 0.0,
        }

    def _bare_live(self, workload: Workload) -> float:
        """Readings/s of the bare subscriber under the same flat-out load (own broker)."""
        rig = _Rig(self._dir("bare-live"))
        try:
            rig.mosquitto = self._mosquitto(rig.workdir)
            rig.bare = BareSubscriber(rig.mosquitto.port, workload.readings)
            rig.bare.start()
            published = self._publish(rig.mosquitto.port, workload)
            result = rig.bare.result()
            if result["count"] < workload.readings:
                raise RuntimeError(f"bare subscriber counted only {result['count']}")
            return workload.readings / (float(result["last"]) - published.first_send)
        finally:
            rig.close()

    def _bare_backlog(self, workload: Workload) -> float:
        """Readings/s of the bare subscriber draining the same backlog (own broker)."""
        rig = _Rig(self._dir("bare-backlog"))
        try:
            rig.mosquitto = self._mosquitto(rig.workdir)
            rig.bare = BareSubscriber(rig.mosquitto.port, workload.readings)
            rig.bare.setup_session()
            self._publish(rig.mosquitto.port, workload)
            rig.bare.start(wait_subscribed=False)
            result = rig.bare.result()
            if result["count"] < workload.readings:
                raise RuntimeError(f"bare subscriber counted only {result['count']}")
            return workload.readings / (float(result["last"]) - float(result["connected"]))
        finally:
            rig.close()

    @staticmethod
    def _ratio(bridge_rate: float, bare_rate: float) -> float:
        return bridge_rate / bare_rate if bare_rate else 0.0

    # -- scenarios --------------------------------------------------------------------------

    def _streaming(
        self,
        name: str,
        *,
        rate: float | None = None,
        stub_args: tuple[str, ...] = (),
        profile: Path | None = None,
    ) -> dict[str, Any]:
        """Publish to a running bridge (flat out, or at ``rate``) and measure to the cloud."""
        workload = self._workload()
        rig = _Rig(self._dir(name))
        try:
            rig.mosquitto = self._mosquitto(rig.workdir)
            rig.stub = BenchStub(rig.workdir, args=stub_args).start()
            rig.bridge = self._bridge(rig)
            self._start_ready(rig.bridge)
            assert rig.bridge.pid is not None
            spy = None if profile is None else PySpy(rig.bridge.pid, profile).start()
            if spy is not None:
                time.sleep(1.0)  # py-spy attaches
            meter = _Meter(rig)
            published = self._publish(rig.mosquitto.port, workload, rate)
            self._wait_accepted(rig.stub, workload.readings, rig.bridge)
            figures = meter.stop(workload.readings)
            if spy is not None:
                spy.stop()
            stats = self._settled_stats(rig.stub)
            account = self._accounting(workload, published, rig.stub)
        finally:
            rig.close()
        span = account["last_accepted"] - published.first_send
        return {
            "readings_per_s": workload.readings / span,
            "publish_rate": published.rate,
            "latency_ms": account["latency_ms"],
            **figures,
            "lost": account["lost"],
            "duplicated": max(account["duplicated"], stats["duplicates"]),
            "requests": stats["requests"],
        }

    def live(self) -> dict[str, Any]:
        """Bridge running, readings published as fast as the load generator can."""
        figures = self._streaming("live")
        self.live_rates.append(figures["readings_per_s"])
        bare = self._bare_live(self._workload())
        figures["bare_readings_per_s"] = bare
        figures["ratio_bridge_to_bare"] = self._ratio(figures["readings_per_s"], bare)
        return figures

    def live_max(self) -> float:
        """The bridge's live rate (one repetition, no bare run) for ``fixed_rate``."""
        rate = float(self._streaming("live")["readings_per_s"])
        self.live_rates.append(rate)
        return rate

    def profiled_live(self, out: Path) -> dict[str, Any]:
        """One ``live`` repetition with py-spy sampling the bridge into ``out``."""
        return self._streaming("live-profiled", profile=out)

    def fixed_rate(self, rate: float) -> dict[str, Any]:
        """Bridge running, readings published at ``rate`` per second; latency is the point."""
        figures = self._streaming("fixed-rate", rate=rate)
        figures["target_rate"] = rate
        return figures

    def slow_cloud(self) -> dict[str, Any]:
        """As ``live``, with a cloud that takes 200 ms per request."""
        figures = self._streaming("slow-cloud", stub_args=("--latency-ms", "200"))
        bare = self._bare_live(self._workload())
        figures["bare_readings_per_s"] = bare
        figures["ratio_bridge_to_bare"] = self._ratio(figures["readings_per_s"], bare)
        return figures

    def backlog(self) -> dict[str, Any]:
        """Readings queued in the broker for the bridge's session; time the drain."""
        workload = self._workload()
        rig = _Rig(self._dir("backlog"))
        try:
            rig.mosquitto = self._mosquitto(rig.workdir)
            rig.stub = BenchStub(rig.workdir).start()
            rig.bridge = self._bridge(rig)
            # First start: the broker creates the bridge's persistent session (fixed client id).
            self._start_ready(rig.bridge)
            rig.bridge.terminate(30)
            published = self._publish(rig.mosquitto.port, workload)
            started, ready = self._start_ready(rig.bridge)
            meter = _Meter(rig)
            self._wait_accepted(rig.stub, workload.readings, rig.bridge)
            figures = meter.stop(workload.readings)
            stats = self._settled_stats(rig.stub)
            account = self._accounting(workload, published, rig.stub)
        finally:
            rig.close()
        rate = workload.readings / (account["last_accepted"] - ready)
        bare = self._bare_backlog(workload)
        return {
            "readings_per_s": rate,
            "startup_s": ready - started,
            "latency_ms": account["latency_ms"],
            **figures,
            "lost": account["lost"],
            "duplicated": max(account["duplicated"], stats["duplicates"]),
            "requests": stats["requests"],
            "bare_readings_per_s": bare,
            "ratio_bridge_to_bare": self._ratio(rate, bare),
        }

    def spool_template(self) -> tuple[Path, Workload, float]:
        """The pre-filled spool file (written once per run, copied for each repetition)."""
        if self._spool_template is None or self._spool_workload is None:
            workload = self._workload(self.options.spool_readings)
            path = self.options.workdir / "spool-template.db"
            self.fill_seconds = fill_spool(path, workload)
            self._spool_template, self._spool_workload = path, workload
        return self._spool_template, self._spool_workload, self.fill_seconds

    def profiled_spool(self, out: Path) -> dict[str, Any]:
        """One ``spool`` repetition with py-spy sampling the bridge into ``out``."""
        return self.spool(profile=out)

    def spool(self, profile: Path | None = None) -> dict[str, Any]:
        """The spool holds ``spool_readings`` readings and the cloud is reachable: drain it."""
        template, workload, _ = self.spool_template()
        rig = _Rig(self._dir("spool" if profile is None else "spool-profiled"))
        spool_path = rig.workdir / "spool.db"
        shutil.copyfile(template, spool_path)
        try:
            rig.mosquitto = self._mosquitto(rig.workdir)
            rig.stub = BenchStub(rig.workdir, args=("--no-keep",)).start()
            rig.bridge = self._bridge(rig, spool_path=spool_path)
            started, ready = self._start_ready(rig.bridge)
            assert rig.bridge.pid is not None
            # The drain is under way already: py-spy misses its first moments.
            spy = None if profile is None else PySpy(rig.bridge.pid, profile).start()
            meter = _Meter(rig)
            self._wait_accepted(rig.stub, workload.readings, rig.bridge)
            figures = meter.stop(workload.readings)
            if spy is not None:
                spy.stop()
            stats = self._settled_stats(rig.stub)
        finally:
            rig.close()
        # With --no-keep the stub keeps no per-entry times; its last request is the last
        # acceptance (nothing is refused in this scenario).
        rate = workload.readings / (stats["last_request_time"] - ready)
        accepted_once = stats["entries_accepted"] - stats["duplicates"]
        return {
            "readings_per_s": rate,
            "startup_s": ready - started,
            "latency_ms": dict(_NO_LATENCY),
            **figures,
            "lost": max(0, workload.readings - accepted_once),
            "duplicated": stats["duplicates"],
            "requests": stats["requests"],
        }

    def replicas(self, count: int) -> dict[str, Any]:
        """Run ``count`` bridges in one share group (``mqtt.share_group``) on one broker.

        Readings are published flat out; the result is readings/s to the cloud and each
        replica's share.
        """
        workload = self._workload()
        rig = _Rig(self._dir(f"replicas-{count}"))
        bridges: list[BridgeProcess] = []
        try:
            rig.mosquitto = self._mosquitto(rig.workdir)
            rig.stub = BenchStub(rig.workdir).start()
            for index in range(count):
                bridge = self._bridge(
                    rig,
                    workdir=rig.workdir / f"replica-{index}",
                    mqtt={"client_id": f"bench-replica-{index}", "share_group": "bench"},
                )
                bridges.append(bridge)
                self._start_ready(bridge)
            pids = [b.pid for b in bridges if b.pid is not None]
            others = [p for p in (rig.stub.pid, rig.mosquitto.pid) if p is not None]
            cpu_before = [cpu_seconds(p) for p in pids + others]
            published = self._publish(rig.mosquitto.port, workload)
            self._wait_accepted(rig.stub, workload.readings, bridges[0])
            cpu = [cpu_seconds(p) - b for p, b in zip(pids + others, cpu_before, strict=True)]
            shares = [int(b.metric("bridge_messages_received_total")) for b in bridges]
            stats = self._settled_stats(rig.stub)
            account = self._accounting(workload, published, rig.stub)
        finally:
            for bridge in bridges:
                with contextlib.suppress(TimeoutError):
                    bridge.terminate(30)
                bridge.kill()
            rig.close()
        per_100k = 100_000 / workload.readings
        return {
            "readings_per_s": workload.readings / (account["last_accepted"] - published.first_send),
            "publish_rate": published.rate,
            "shares": shares,
            "latency_ms": account["latency_ms"],
            "bridges_cpu_s_per_100k": sum(cpu[:count]) * per_100k,
            "stub_cpu_s_per_100k": cpu[count] * per_100k,
            "broker_cpu_s_per_100k": cpu[-1] * per_100k,
            "lost": account["lost"],
            "duplicated": max(account["duplicated"], stats["duplicates"]),
            "requests": stats["requests"],
        }
