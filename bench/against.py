"""``python -m bench --against node-red``: energy-bridge and a Node-RED flow, side by side.

Both systems take the same load from the same generator (:mod:`bench.loadgen`, paced at
``--publish-rate``, default 30,000 readings/s, so that it does not take the whole machine in
bursts), through a private Mosquitto of the same configuration, into the same cloud stub
(:mod:`bench.stub`, which verifies every signature). Repetitions are interleaved: Node-RED,
energy-bridge, the bare paho subscriber (``live`` and ``backlog`` only), then again. Every
repetition starts from nothing (fresh broker, stub, consumer). The flow: :mod:`bench.nodered`.

Scenarios (N readings from ``--meters`` meters):

* ``live``: the consumer runs; the readings are published at the pace;
* ``backlog``: the consumer's persistent session holds N readings, then the consumer starts;
  timed from its MQTT connection (Node-RED: the flow's status node; the bridge: ``/readyz``);
* ``spool``: energy-bridge only (Node-RED has no spool): ``--spool-readings`` in the spool;
* ``fixed_rate``: both at half the slower system's median ``live`` rate of this run; the
  latency percentiles (publish -> accepted by the stub) are the point;
* ``slow_cloud``: ``live`` with the stub answering every request after 200 ms;
* ``throttled``: ``live`` with the stub answering 10 % of the requests 429 ``Throttling.User``.

Per system and scenario: readings/s, CPU seconds per 100k readings and percent of one core over
the measured span for every process (the consumer, Mosquitto, the stub, the generator, i.e. the
bench process itself), the whole machine's busy share (other users included), peak RSS
(``VmHWM``), lost and duplicated (from the ``seq`` of every entry the stub stored).

Output: one JSON line per scenario (medians of ``--repeat``; lost/duplicated are totals), then
a Markdown table, then the machine line. Exit status 1 when anything was lost or duplicated.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bench import nodered
from bench.bare import BareSubscriber
from bench.loadgen import PublishResult, Workload, publish
from bench.proc import cpu_seconds
from bench.scenarios import Scenarios, _get_ok
from bench.stub import BenchStub
from bridge.testing import TEST_ENV, BridgeProcess, Mosquitto, free_port, wait_until

__all__ = ["SCENARIOS", "Against", "table"]

SCENARIOS = ("live", "backlog", "spool", "fixed_rate", "slow_cloud", "throttled")
SYSTEMS = ("node_red", "bridge")
_STUB_ARGS: dict[str, tuple[str, ...]] = {
    "slow_cloud": ("--latency-ms", "200"),
    "throttled": ("--throttle-rate", "0.1", "--seed", "10"),
}
_PROCESSES = ("consumer", "broker", "stub", "generator")


class _Consumer(Protocol):
    """What the runner needs of a system under test."""

    @property
    def pid(self) -> int | None: ...

    @property
    def running(self) -> bool: ...

    def spawn(self) -> float:
        """Start the process (do not wait); return the start time."""
        ...

    def wait_ready(self) -> float:
        """Wait until its MQTT connection is up; return when that happened."""
        ...

    def stop(self) -> None: ...

    def kill(self) -> None: ...

    def peak_rss_mb(self) -> float: ...

    def describe(self) -> str: ...


class _NodeRedConsumer:
    def __init__(self, red: nodered.NodeRed) -> None:
        self.red = red

    @property
    def pid(self) -> int | None:
        return self.red.pid

    @property
    def running(self) -> bool:
        return self.red.running

    def spawn(self) -> float:
        started = time.time()
        self.red.start()
        return started

    def wait_ready(self) -> float:
        return self.red.wait_connected()

    def stop(self) -> None:
        self.red.stop()

    def kill(self) -> None:
        self.red.kill()

    def peak_rss_mb(self) -> float:
        return self.red.peak_rss_mb()

    def describe(self) -> str:
        return f"---- node-red ----\n{self.red.log_tail()}"


class _BridgeConsumer:
    def __init__(self, bridge: BridgeProcess) -> None:
        self.bridge = bridge

    @property
    def pid(self) -> int | None:
        return self.bridge.pid

    @property
    def running(self) -> bool:
        return self.bridge.running

    def spawn(self) -> float:
        started = time.time()
        self.bridge.start()
        return started

    def wait_ready(self) -> float:
        bridge = self.bridge
        url = f"{bridge.http_url}/readyz"

        def ready() -> bool:
            if not bridge.running:
                raise RuntimeError(f"the bridge exited while starting\n{bridge.describe()}")
            return _get_ok(url)

        wait_until(ready, 60, interval=0.005, message="bridge /readyz")
        return time.time()

    def stop(self) -> None:
        self.bridge.terminate(30)

    def kill(self) -> None:
        self.bridge.kill()

    def peak_rss_mb(self) -> float:
        return self.bridge.peak_rss_mb

    def describe(self) -> str:
        return self.bridge.describe()


def _machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine from ``/proc/stat``."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])
    return total - idle, total


class _Meter:
    """CPU of every process of a repetition, and of the whole machine, over a span.

    A thread samples every process's CPU time every 10 ms from construction, so that a span
    can begin at a moment known only afterwards (a backlog drain begins when the consumer's
    MQTT connection came up, which Node-RED reports through its busy event loop).
    """

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = {name: pid for name, pid in pids.items() if pid}
        self.samples: list[tuple[float, dict[str, float], tuple[float, float]]] = []
        self._stop = threading.Event()
        self._sample()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        cpu = {}
        for name, pid in self.pids.items():
            with contextlib.suppress(OSError, ValueError):
                cpu[name] = cpu_seconds(pid)
        self.samples.append((time.time(), cpu, _machine_busy()))

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self._sample()

    def stop(self, readings: int, since: float | None = None) -> dict[str, Any]:
        """Figures from ``since`` (epoch seconds; construction when ``None``) to now."""
        self._stop.set()
        self._thread.join(5)
        self._sample()
        start = self.samples[0]
        if since is not None:
            start = max(
                (s for s in self.samples if s[0] <= since), key=lambda s: s[0], default=start
            )
        end = self.samples[-1]
        wall = end[0] - start[0]
        figures: dict[str, Any] = {"span_s": wall}
        for name in self.pids:
            if name not in start[1] or name not in end[1]:
                continue
            used = end[1][name] - start[1][name]
            figures[f"{name}_cpu_s_per_100k"] = used / readings * 100_000
            figures[f"{name}_cpu_pct"] = 100 * used / wall if wall > 0 else 0.0
        d_total = end[2][1] - start[2][1]
        figures["machine_busy_pct"] = (
            100 * (end[2][0] - start[2][0]) / d_total if d_total > 0 else 0.0
        )
        return figures


@dataclass(slots=True)
class _Rig:
    workdir: Path
    mosquitto: Mosquitto | None = None
    stub: BenchStub | None = None
    consumer: _Consumer | None = None
    bare: BareSubscriber | None = None

    def close(self) -> None:
        if self.consumer is not None:
            with contextlib.suppress(Exception):
                self.consumer.kill()
        if self.bare is not None:
            self.bare.kill()
        for proc in (self.stub, self.mosquitto):
            if proc is not None:
                proc.kill()


class Against:
    """Runs the side-by-side repetitions; one method call is one repetition of one system.

    Args:
        scenarios: the bridge benchmark (its options, bridge config and ``spool`` scenario).
        publish_rate: the generator's pace, readings/s (``None``: flat out).
        red_js: Node-RED's ``red.js`` (from :func:`bench.nodered.ensure_installed`); ``None``
            when only the bridge side runs (the test of the bridge anchor).
    """

    def __init__(
        self, scenarios: Scenarios, *, publish_rate: float | None, red_js: Path | None
    ) -> None:
        self.scenarios = scenarios
        self.options = scenarios.options
        self.publish_rate = publish_rate
        self.red_js = red_js
        self.live_rates: dict[str, list[float]] = {name: [] for name in SYSTEMS}

    # -- building blocks --------------------------------------------------------------------

    def _rig(self, system: str, scenario: str, stub_args: tuple[str, ...] = ()) -> _Rig:
        rig = _Rig(self.scenarios._dir(f"{system}-{scenario}"))
        try:
            rig.mosquitto = self.scenarios._mosquitto(rig.workdir)
            rig.stub = BenchStub(rig.workdir, args=stub_args).start()
            rig.consumer = self._consumer(system, rig)
        except BaseException:
            rig.close()
            raise
        return rig

    def _consumer(self, system: str, rig: _Rig) -> _Consumer:
        assert rig.mosquitto is not None
        assert rig.stub is not None
        if system == "bridge":
            bridge = self.scenarios._bridge(rig)  # type: ignore[arg-type]
            return _BridgeConsumer(bridge)
        if self.red_js is None:
            raise RuntimeError("Node-RED is not installed")
        red = nodered.NodeRed(
            rig.workdir / "node-red",
            mqtt_port=rig.mosquitto.port,
            cloud_url=rig.stub.url,
            port=free_port(),
            env={**os.environ, **TEST_ENV},
            red_js=self.red_js,
        )
        return _NodeRedConsumer(red)

    def _workload(self) -> Workload:
        return self.scenarios._workload()

    def _publish(self, port: int, workload: Workload, rate: float | None) -> PublishResult:
        return publish("127.0.0.1", port, workload, connections=self.options.connections, rate=rate)

    @staticmethod
    def _wait_accepted(stub: BenchStub, count: int, consumer: _Consumer) -> None:
        timeout = 120 + count / 2000

        def done() -> bool:
            if not consumer.running:
                raise RuntimeError(f"the consumer exited\n{consumer.describe()}")
            return bool(stub.stats()["entries_accepted"] >= count)

        wait_until(
            done,
            timeout,
            interval=0.05,
            message=lambda: f"{count} entries at the stub ({stub.stats()})",
        )

    def _finish(
        self,
        rig: _Rig,
        meter: _Meter,
        workload: Workload,
        published: PublishResult,
        since: float | None = None,
    ) -> dict[str, Any]:
        assert rig.stub is not None
        assert rig.consumer is not None
        self._wait_accepted(rig.stub, workload.readings, rig.consumer)
        figures = meter.stop(workload.readings, since)
        figures["peak_rss_mb"] = rig.consumer.peak_rss_mb()
        stats = Scenarios._settled_stats(rig.stub)
        account = Scenarios._accounting(workload, published, rig.stub)
        figures.update(
            latency_ms=account["latency_ms"],
            lost=account["lost"],
            duplicated=max(account["duplicated"], stats["duplicates"]),
            requests=stats["requests"],
            refused=stats["rejected_total"],
            last_accepted=account["last_accepted"],
        )
        return figures

    def _pids(self, rig: _Rig) -> dict[str, int | None]:
        assert rig.consumer is not None
        assert rig.stub is not None
        assert rig.mosquitto is not None
        return {
            "consumer": rig.consumer.pid,
            "broker": rig.mosquitto.pid,
            "stub": rig.stub.pid,
            "generator": os.getpid(),
        }

    # -- one repetition of one system -------------------------------------------------------

    def streaming(self, system: str, scenario: str, rate: float | None = None) -> dict[str, Any]:
        """``live``, ``fixed_rate`` (``rate`` given), ``slow_cloud`` or ``throttled``."""
        workload = self._workload()
        rig = self._rig(system, scenario, _STUB_ARGS.get(scenario, ()))
        try:
            assert rig.consumer is not None
            assert rig.mosquitto is not None
            started = rig.consumer.spawn()
            ready = rig.consumer.wait_ready()
            meter = _Meter(self._pids(rig))
            published = self._publish(
                rig.mosquitto.port, workload, self.publish_rate if rate is None else rate
            )
            figures = self._finish(rig, meter, workload, published)
        finally:
            rig.close()
        figures["readings_per_s"] = workload.readings / (
            figures.pop("last_accepted") - published.first_send
        )
        figures["startup_s"] = ready - started
        figures["publish_rate"] = published.rate
        if scenario == "live":
            self.live_rates[system].append(figures["readings_per_s"])
        if rate is not None:
            figures["target_rate"] = rate
        return figures

    def backlog(self, system: str) -> dict[str, Any]:
        """The consumer's persistent session holds the readings; time the drain."""
        workload = self._workload()
        rig = self._rig(system, "backlog")
        try:
            assert rig.consumer is not None
            assert rig.mosquitto is not None
            # First start: the broker creates the persistent session (fixed client id).
            rig.consumer.spawn()
            rig.consumer.wait_ready()
            rig.consumer.stop()
            published = self._publish(rig.mosquitto.port, workload, None)
            started = rig.consumer.spawn()
            meter = _Meter(self._pids(rig))
            ready = rig.consumer.wait_ready()
            figures = self._finish(rig, meter, workload, published, since=ready)
        finally:
            rig.close()
        figures["readings_per_s"] = workload.readings / (figures.pop("last_accepted") - ready)
        figures["startup_s"] = ready - started
        return figures

    def spool(self) -> dict[str, Any]:
        """energy-bridge only: the spool holds ``spool_readings``; drain it."""
        run = self.scenarios.spool()
        return {
            "readings_per_s": run["readings_per_s"],
            "startup_s": run["startup_s"],
            "consumer_cpu_s_per_100k": run["bridge_cpu_s_per_100k"],
            "broker_cpu_s_per_100k": run.get("broker_cpu_s_per_100k"),
            "stub_cpu_s_per_100k": run.get("stub_cpu_s_per_100k"),
            "peak_rss_mb": run["bridge_peak_rss_mb"],
            "latency_ms": run["latency_ms"],
            "lost": run["lost"],
            "duplicated": run["duplicated"],
            "requests": run["requests"],
        }

    def bare(self, scenario: str) -> dict[str, Any]:
        """The bare paho subscriber under the same load (paced as the systems), own broker."""
        workload = self._workload()
        rig = _Rig(self.scenarios._dir(f"bare-{scenario}"))
        try:
            rig.mosquitto = self.scenarios._mosquitto(rig.workdir)
            rig.bare = BareSubscriber(rig.mosquitto.port, workload.readings)
            if scenario == "backlog":
                rig.bare.setup_session()
                self._publish(rig.mosquitto.port, workload, None)
                rig.bare.start(wait_subscribed=False)
                result = rig.bare.result()
                start = float(result["connected"])
            else:
                rig.bare.start()
                published = self._publish(rig.mosquitto.port, workload, self.publish_rate)
                result = rig.bare.result()
                start = published.first_send
            if result["count"] < workload.readings:
                raise RuntimeError(f"bare subscriber counted only {result['count']}")
        finally:
            rig.close()
        return {"readings_per_s": workload.readings / (float(result["last"]) - start)}

    def live_max(self, system: str) -> None:
        """One ``live`` repetition (for ``fixed_rate`` when ``live`` was not selected)."""
        self.streaming(system, "live")

    def fixed_rate_target(self) -> float:
        """Half the slower system's median ``live`` rate of this run."""
        for system in SYSTEMS:
            if system == "node_red" and self.red_js is None:
                continue
            if not self.live_rates[system]:
                self.live_max(system)
        medians = [statistics.median(v) for v in self.live_rates.values() if v]
        return round(min(medians) / 2)


# -- combining and printing -----------------------------------------------------------------


def _median(values: list[Any]) -> Any:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of the repetitions (totals for lost/duplicated), and each run's readings/s."""
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for run in runs for k in run):
        values = [run.get(key) for run in runs]
        if key in {"lost", "duplicated"}:
            out[key] = sum(v or 0 for v in values)
        elif isinstance(values[0], dict):
            out[key] = {sub: _median([v.get(sub) for v in values if v]) for sub in values[0]}
        else:
            value = _median(values)
            out[key] = None if value is None else round(float(value), 2)
    out["runs_readings_per_s"] = [round(run["readings_per_s"]) for run in runs]
    return out


def ratios(bridge: dict[str, Any], red: dict[str, Any]) -> dict[str, float | None]:
    """Bridge ÷ Node-RED for readings/s, CPU per 100k and peak RSS."""

    def ratio(key: str) -> float | None:
        a, b = bridge.get(key), red.get(key)
        return round(a / b, 2) if a and b else None

    return {
        "readings_per_s": ratio("readings_per_s"),
        "cpu_s_per_100k": ratio("consumer_cpu_s_per_100k"),
        "peak_rss": ratio("peak_rss_mb"),
    }


def _num(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _cpu_cell(line: dict[str, Any]) -> str:
    parts = []
    for name, short in zip(_PROCESSES, ("self", "mosq", "stub", "gen"), strict=True):
        pct = line.get(f"{name}_cpu_pct")
        if pct is not None:
            parts.append(f"{short} {pct:.0f}")
    busy = line.get("machine_busy_pct")
    if busy is not None:
        parts.append(f"box {busy:.0f}")
    return " · ".join(parts) if parts else "-"


def table(lines: list[dict[str, Any]]) -> str:
    """The scenario lines as one Markdown table (Node-RED row, bridge row, ratio)."""
    head = (
        "| scenario | system | readings/s (runs) | CPU s/100k | CPU % of a core: self · mosq · "
        "stub · gen · box (of 200) | peak RSS MB | latency p50 / p99 ms | lost | dup |"
        " bridge ÷ Node-RED (rate · CPU · RSS) |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for line in lines:
        ratio = line.get("ratio_bridge_to_node_red") or {}
        ratio_cell = (
            " · ".join(
                f"{ratio.get(k):.2f}x" if ratio.get(k) else "-"
                for k in ("readings_per_s", "cpu_s_per_100k", "peak_rss")
            )
            if ratio
            else "-"
        )
        for system, label in (("node_red", "Node-RED"), ("bridge", "energy-bridge")):
            figures = line.get(system)
            name = line["scenario"] + (
                f" ({line['target_rate']:,.0f}/s)" if line.get("target_rate") else ""
            )
            if figures is None:
                note = "n/a (Node-RED has no spool)" if line["scenario"] == "spool" else "not run"
                rows.append(f"| {name} | {label} | {note} | | | | | | | |")
                continue
            runs = " · ".join(f"{r:,}" for r in figures.get("runs_readings_per_s", []))
            latency = figures.get("latency_ms") or {}
            lat = (
                f"{_num(latency.get('p50'))} / {_num(latency.get('p99'))}"
                if latency.get("p50") is not None
                else "-"
            )
            rows.append(
                f"| {name} | {label} | **{_num(figures['readings_per_s'])}** ({runs}) | "
                f"{_num(figures.get('consumer_cpu_s_per_100k'), 2)} | {_cpu_cell(figures)} | "
                f"{_num(figures.get('peak_rss_mb'), 1)} | {lat} | {figures['lost']} | "
                f"{figures['duplicated']} | {ratio_cell if system == 'bridge' else ''} |"
            )
        bare = line.get("bare_paho_readings_per_s")
        if bare:
            rows.append(
                f"| {line['scenario']} | bare paho (counts only) | {_num(bare)} | | | | | | | |"
            )
    return head + "\n".join(rows) + "\n"


def run(
    against: Against,
    names: list[str],
    repeat: int,
    emit: Callable[[dict[str, Any]], None],
    common: dict[str, Any],
) -> list[dict[str, Any]]:
    """Run the scenarios, interleaved per repetition; emit and return one line per scenario."""
    with_red = against.red_js is not None
    lines = []
    for name in names:
        per_system: dict[str, list[dict[str, Any]]] = {s: [] for s in SYSTEMS}
        bare: list[float] = []
        target = against.fixed_rate_target() if name == "fixed_rate" else None
        for _ in range(repeat):
            if name == "spool":
                per_system["bridge"].append(against.spool())
                continue
            for system in SYSTEMS:
                if system == "node_red" and not with_red:
                    continue
                if name == "backlog":
                    per_system[system].append(against.backlog(system))
                else:
                    per_system[system].append(against.streaming(system, name, target))
            if name in {"live", "backlog"}:
                bare.append(against.bare(name)["readings_per_s"])
        line: dict[str, Any] = {"scenario": name, **common}
        if name == "spool":
            line["readings"] = against.options.spool_readings
        if target is not None:
            line["target_rate"] = target
        for system in SYSTEMS:
            line[system] = combine(per_system[system]) if per_system[system] else None
        if bare:
            line["bare_paho_readings_per_s"] = round(statistics.median(bare))
        if line["node_red"] and line["bridge"]:
            line["ratio_bridge_to_node_red"] = ratios(line["bridge"], line["node_red"])
        emit(line)
        lines.append(line)
    return lines
