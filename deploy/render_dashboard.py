"""Render the Grafana dashboard to a PNG from a real run, without Grafana.

    .venv/bin/pip install -e '.[render,test]'
    .venv/bin/python deploy/render_dashboard.py --out docs/dashboard.png [--seconds 90]

Starts, each as its own process on 127.0.0.1 and free ports: a private Mosquitto, the cloud
stub (answering some pushes 503 or 429 and refusing entries that carry the ``poison`` point),
the bridge, ``energy-bridge simulate`` (200 meters, one reading a second each, every 500th
message malformed) and a real ``prometheus`` scraping the bridge every 2 s, with the scrape job
and alert rules of ``deploy/prometheus`` (the ``bridge.testing.Prometheus`` helper).
During the run a few readings with the poison point are published (dead letters, devices that
fall silent), the cloud has an outage for a fifth of the run (lag and spool grow, then drain)
and the broker is restarted once (MQTT reconnect). Then every query of every panel of
``deploy/grafana/dashboards/energy-bridge.json`` is sent to ``/api/v1/query_range`` over the
run (``$__rate_interval`` = 10 s, ``$instance`` = the variable's "All" value) and the answers
are drawn with matplotlib on the dashboard's own grid (``gridPos``), with its titles, legends
(``legendFormat``, last and max), units, thresholds, value mappings, stacking and overrides,
in Grafana's dark theme. Stat and gauge panels also get a faint sparkline of the run. The
bridge's spool is limited to 4 MiB (``--spool-max-mib``) so that the spool panels show something.
``--save FILE`` keeps the answers; ``--replay FILE`` draws them again without running anything.

Needs ``mosquitto`` and ``prometheus`` on PATH (Debian/Ubuntu: ``apt-get install -y mosquitto
prometheus``) and a checkout (it reads ``deploy/``). Every process is killed at the end; the
work directory (configs, logs, Prometheus data) is a temporary one unless ``--workdir`` is given.
Exit status 0 when every panel drew data, 1 when some panel had none (the PNG is written anyway),
2 when prometheus or matplotlib is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

try:
    import matplotlib.dates as mdates
    import numpy as np
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyBboxPatch, Wedge
    from matplotlib.ticker import FuncFormatter, MaxNLocator
except ImportError as exc:  # the optional "render" extra
    print(f"render-dashboard: {exc}; .venv/bin/pip install -e '.[render]'", file=sys.stderr)
    raise SystemExit(2) from exc

ROOT = Path(__file__).resolve().parents[1]
# The checkout's ``bridge`` package, also when the project is not installed.
sys.path.insert(0, str(ROOT))

from bridge.testing import (  # noqa: E402 - needs the checkout on sys.path
    LOOPBACK,
    BridgeProcess,
    Mosquitto,
    Prometheus,
    Publisher,
    StubProcess,
    free_port,
    telemetry_payload,
    wait_until,
    write_bridge_config,
)

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "energy-bridge.json"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"

POISON = "poison"
RATE_INTERVAL = "10s"

# Grafana's dark theme.
CANVAS = "#111217"
PANEL = "#181b1f"
BORDER = "#2b2f36"
TEXT = "#ccccdc"
TEXT_DIM = "#8e8ea0"
GRID = "#25282e"
NAMED_COLORS = {
    "green": "#73BF69",
    "yellow": "#FADE2A",
    "red": "#F2495C",
    "orange": "#FF9830",
    "blue": "#5794F2",
    "purple": "#B877D9",
    "transparent": "#00000000",
}
# Grafana's "palette-classic".
CLASSIC = [
    "#7EB26D",
    "#EAB839",
    "#6ED0E0",
    "#EF843C",
    "#E24D42",
    "#1F78C1",
    "#BA43A9",
    "#705DA0",
    "#508642",
    "#CCA300",
    "#447EBC",
    "#C15C17",
    "#890F02",
    "#0A437C",
    "#6D1F62",
    "#584477",
    "#B7DBAB",
    "#F4D598",
    "#70DBED",
    "#F9BA8F",
]

# Layout, in pixels (the figure is drawn at 100 dpi).
WIDTH = 1600
MARGIN = 8
HEADER = 46
UNIT = 34  # one gridPos height unit
GAP = 6


def log(message: str) -> None:
    """A progress line on stderr."""
    print(f"render-dashboard: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The run


class ScrapingPrometheus(Prometheus):
    """The tests' Prometheus helper, scraping (and evaluating rules) every ``interval`` s."""

    def __init__(self, workdir: Path, executable: str, *, targets: list[str], interval: int):
        """Describe the server; see :class:`bridge.testing.Prometheus`."""
        super().__init__(workdir, executable, targets=targets, config=PROMETHEUS_CONFIG)
        self.interval = interval

    def config(self) -> dict[str, Any]:
        """deploy/prometheus/prometheus.yml with ``interval``-second scrapes and evaluation."""
        config = super().config()
        every = f"{self.interval}s"
        config["global"] = {"scrape_interval": every, "evaluation_interval": every}
        for job in config["scrape_configs"]:
            job.update(scrape_interval=every, scrape_timeout=every)
        return config


@dataclasses.dataclass
class Run:
    """What was recorded: the time range and every panel's query answers."""

    start: float
    end: float
    step: int
    # panel id -> one list of matrix results per target (None: the query failed)
    answers: dict[int, list[list[dict[str, Any]] | None]] = dataclasses.field(default_factory=dict)
    errors: list[str] = dataclasses.field(default_factory=list)


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Replace ``$name`` and ``${name}`` / ``${name:format}`` by their values."""

    def replace(match: re.Match[str]) -> str:
        name = match["braced"] or match["plain"]
        if name not in variables:
            raise KeyError(f"unknown dashboard variable ${name} in {expr}")
        return variables[name]

    return re.sub(r"\$\{(?P<braced>\w+)(?::\w+)?\}|\$(?P<plain>\w+)", replace, expr)


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, with the panels of collapsed rows after their row."""
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def query_panels(prometheus: Prometheus, dashboard: dict[str, Any], run: Run) -> None:
    """Send every target of every panel to ``query_range`` over the run; fill ``run``."""
    variables = {
        "__rate_interval": RATE_INTERVAL,
        "__interval": f"{run.step}s",
        "__range": f"{math.ceil(run.end - run.start)}s",
    }
    for variable in dashboard.get("templating", {}).get("list", []):
        variables[variable["name"]] = variable.get("allValue") or ".*"
    for panel in all_panels(dashboard):
        answers: list[list[dict[str, Any]] | None] = []
        for target in panel.get("targets", []):
            expr = substitute(target["expr"], variables)
            try:
                data = prometheus.api(
                    "query_range",
                    query=expr,
                    start=f"{run.start:.3f}",
                    end=f"{run.end:.3f}",
                    step=str(run.step),
                )
            except AssertionError as exc:  # the helper asserts on an error answer
                run.errors.append(f"{panel['title']}: {expr}: {exc}")
                answers.append(None)
                continue
            answers.append(list(data["result"]))
        run.answers[panel["id"]] = answers


def scraped(prometheus: Prometheus) -> bool:
    """Whether Prometheus has scraped the bridge successfully."""
    result = prometheus.query(f'up{{job="{prometheus.job}"}}')
    return bool(result) and result[0]["value"][1] == "1"


def publish_poison(broker: Mosquitto, n: int) -> None:
    """One reading with the poison point from a device of its own (``poison-N``)."""
    topic = f"meters/1/poison-{n}/telemetry"
    with Publisher(broker.host, broker.port) as publisher:
        publisher.publish(topic, telemetry_payload(n, int(time.time()), **{POISON: 1}))


@contextlib.contextmanager
def simulator(broker: Mosquitto, args: argparse.Namespace, workdir: Path) -> Iterator[None]:
    """``energy-bridge simulate`` against ``broker`` while inside; killed on the way out."""
    argv = [sys.executable, "-m", "bridge", "simulate", "--host", LOOPBACK]
    argv += ["--port", str(broker.port), "--meters", str(args.meters), "--interval", "1"]
    argv += ["--malformed-every", "500", "--seed", "7"]
    # Its own directory: in ``workdir``, the bridge's directory would shadow the package.
    (workdir / "simulate").mkdir(parents=True, exist_ok=True)
    with (workdir / "simulate" / "simulate.log").open("ab") as output:
        proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module, fixed argv
            argv, cwd=workdir / "simulate", stdin=subprocess.DEVNULL, stdout=output, stderr=output
        )
        try:
            yield
        finally:
            proc.kill()
            proc.wait(10)


def record(args: argparse.Namespace, workdir: Path, prometheus_path: str) -> Run:
    """Run the whole stack for ``args.seconds``, then query every panel over the run."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    with contextlib.ExitStack() as stack:
        broker = Mosquitto(workdir / "mosquitto")
        stack.callback(broker.kill)
        broker.start()
        stub = StubProcess(
            workdir / "cloud-stub",
            args=[
                *("--error-rate", "0.05", "--throttle-rate", "0.03", "--latency-ms", "20"),
                *("--poison-point", POISON, "--seed", "7", "--no-keep"),
            ],
        )
        stack.callback(stub.kill)
        stub.start()
        config = write_bridge_config(
            workdir / "bridge",
            mqtt_port=broker.port,
            cloud_url=stub.url,
            http_port=free_port(),
            spool={"max_bytes": args.spool_max_mib * 1024 * 1024},
            metrics={"device_silent_after_secs": 15},
        )
        bridge = BridgeProcess(config)
        stack.callback(bridge.kill)
        bridge.start().wait_ready()
        prometheus = ScrapingPrometheus(
            workdir / "prometheus", prometheus_path, targets=[bridge.http_listen], interval=2
        )
        stack.callback(prometheus.kill)
        prometheus.start()
        wait_until(lambda: scraped(prometheus), 30, interval=0.5, message="the first scrape")
        log(
            f"mosquitto :{broker.port}, stub {stub.url}, bridge {bridge.http_url}, "
            f"prometheus {prometheus.url}; running for {args.seconds:g} s"
        )

        start = time.time()
        seconds = args.seconds
        events: list[tuple[float, str, Callable[[], object]]] = [
            (0.30 * seconds, "cloud outage begins", lambda: stub.set_faults(outage=True)),
            (0.50 * seconds, "cloud outage ends", lambda: stub.set_faults(outage=False)),
        ]
        if args.broker_restart:
            events.append((0.75 * seconds, "broker restart", broker.restart))
        poison_every = 6.0
        poisoned = 0
        next_progress = 10.0
        with simulator(broker, args, workdir):
            while (elapsed := time.time() - start) < seconds:
                while events and events[0][0] <= elapsed:
                    _, what, action = events.pop(0)
                    log(f"t={elapsed:4.0f}s {what}")
                    action()
                if poisoned * poison_every + 3 <= elapsed and broker.running:
                    publish_poison(broker, poisoned)
                    poisoned += 1
                if elapsed >= next_progress:
                    metrics = bridge.metrics()
                    log(
                        f"t={elapsed:4.0f}s delivered "
                        f"{metrics.get('bridge_readings_delivered_total', 0):.0f}, spool "
                        f"{metrics.get('bridge_spool_readings', 0):.0f}, lag "
                        f"{metrics.get('bridge_spool_oldest_reading_age_seconds', 0):.1f}s"
                    )
                    next_progress += 10.0
                time.sleep(0.25)
            # Two more scrapes, so the last seconds of the run are in Prometheus.
            time.sleep(4)
            end = time.time()
        run = Run(start=math.floor(start), end=math.ceil(end), step=prometheus.interval)
        query_panels(prometheus, dashboard, run)
    return run


# ---------------------------------------------------------------------------------------------
# Formatting values like Grafana


def _g(value: float) -> str:
    text = f"{value:.3g}"
    return text if "e" not in text else f"{value:.0f}"


def _scaled(value: float, base: float, suffixes: Sequence[str]) -> str:
    magnitude = abs(value)
    index = 0
    while magnitude >= base and index < len(suffixes) - 1:
        magnitude /= base
        value /= base
        index += 1
    return f"{_g(value)}{suffixes[index]}"


def format_value(value: float, unit: str | None) -> str:
    """``value`` in Grafana's ``unit`` (the few units the dashboard uses)."""
    if value is None or not math.isfinite(value):
        return "-"
    if unit == "s":
        magnitude = abs(value)
        if magnitude == 0:
            return "0 s"
        if magnitude < 1e-3:
            return f"{_g(value * 1e6)} µs"
        if magnitude < 1:
            return f"{_g(value * 1e3)} ms"
        if magnitude < 60:
            return f"{_g(value)} s"
        if magnitude < 3600:
            return f"{_g(value / 60)} min"
        return f"{_g(value / 3600)} hour"
    if unit == "bytes":
        return _scaled(value, 1024, [" B", " KiB", " MiB", " GiB", " TiB"])
    if unit == "percentunit":
        return f"{_g(value * 100)}%"
    if unit == "cps":
        return _scaled(value, 1000, [" c/s", "K c/s", "M c/s"])
    if unit == "reqps":
        return _scaled(value, 1000, [" req/s", "K req/s", "M req/s"])
    return _scaled(value, 1000, ["", " K", " Mil", " Bil"])


def color(name: str | None, fallback: str = TEXT) -> str:
    """A Grafana color name (or hex) as hex."""
    if not name:
        return fallback
    return NAMED_COLORS.get(name, name)


def readable_on(background: str) -> str:
    """White or near-black text, whichever reads better on ``background``."""
    red, green, blue = (int(background.lstrip("#")[i : i + 2], 16) / 255 for i in (0, 2, 4))
    luminance = 0.2126 * red + 0.7152 * green + 0.0722 * blue
    return "#111217" if luminance > 0.6 else "#ffffff"


# ---------------------------------------------------------------------------------------------
# Series


@dataclasses.dataclass
class Series:
    """One line: its display name, values on the run's time grid, and field overrides."""

    name: str
    values: np.ndarray
    color: str
    unit: str | None
    fill_opacity: float = 0.1
    dashes: tuple[float, float] | None = None
    bars: bool = False
    right_axis: bool = False

    @property
    def last(self) -> float:
        """The last value that is a number (Grafana's ``lastNotNull``)."""
        finite = self.values[~np.isnan(self.values)]
        return float(finite[-1]) if finite.size else math.nan

    @property
    def max(self) -> float:
        """The largest value."""
        finite = self.values[~np.isnan(self.values)]
        return float(finite.max()) if finite.size else math.nan


def legend_name(legend_format: str, metric: dict[str, str]) -> str:
    """``legendFormat`` with ``{{label}}`` filled in; the label set when there is none."""
    if legend_format and legend_format != "__auto":
        text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: metric.get(m[1], ""), legend_format)
        return " ".join(text.split())
    labels = ", ".join(f'{k}="{v}"' for k, v in sorted(metric.items()) if k != "__name__")
    return f"{metric.get('__name__', '')}{{{labels}}}"


def build_series(panel: dict[str, Any], answers: list[Any], grid: np.ndarray) -> list[Series]:
    """The panel's series on ``grid``, with its colors and overrides applied."""
    defaults = panel.get("fieldConfig", {}).get("defaults", {})
    custom = defaults.get("custom", {})
    series: list[Series] = []
    step = float(grid[1] - grid[0]) if grid.size > 1 else 1.0
    for target, result in zip(panel.get("targets", []), answers, strict=True):
        for item in result or []:
            values = np.full(grid.shape, np.nan)
            for timestamp, text in item["values"]:
                index = round((float(timestamp) - grid[0]) / step)
                if 0 <= index < grid.size:
                    values[index] = float(text)
            series.append(
                Series(
                    name=legend_name(target.get("legendFormat", ""), item["metric"]),
                    values=values,
                    color=CLASSIC[len(series) % len(CLASSIC)],
                    unit=defaults.get("unit"),
                    fill_opacity=custom.get("fillOpacity", 10) / 100,
                    bars=custom.get("drawStyle") == "bars",
                )
            )
    for override in panel.get("fieldConfig", {}).get("overrides", []):
        matcher = override["matcher"]
        for one in series:
            if matcher["id"] == "byName":
                matches = one.name == matcher["options"]
            elif matcher["id"] == "byRegexp":
                matches = re.search(matcher["options"], one.name) is not None
            else:
                matches = False
            if matches:
                apply_override(one, override["properties"])
    return series


def apply_override(series: Series, properties: list[dict[str, Any]]) -> None:
    """Apply the override properties the dashboard uses to one series."""
    for prop in properties:
        key = prop["id"]
        value: Any = prop.get("value")  # a JSON value whose shape depends on the key
        if key == "color" and value.get("mode") == "fixed":
            series.color = color(value.get("fixedColor"))
        elif key == "unit":
            series.unit = value
        elif key == "custom.axisPlacement":
            series.right_axis = value == "right"
        elif key == "custom.fillOpacity":
            series.fill_opacity = value / 100
        elif key == "custom.drawStyle":
            series.bars = value == "bars"
        elif key == "custom.lineStyle" and value.get("fill") == "dash":
            dash = value.get("dash", [10, 10])
            series.dashes = (dash[0] / 2, dash[1] / 2)


# ---------------------------------------------------------------------------------------------
# Drawing


@dataclasses.dataclass
class Box:
    """A rectangle in figure pixels, origin top left."""

    x: float
    y: float
    w: float
    h: float


class Canvas:
    """A matplotlib figure addressed in pixels from the top left."""

    def __init__(self, figure: Figure, width: float, height: float) -> None:
        """Wrap ``figure`` of ``width`` x ``height`` pixels."""
        self.figure = figure
        self.width = width
        self.height = height

    def rect(self, box: Box) -> tuple[float, float, float, float]:
        """``box`` as (left, bottom, width, height) figure fractions."""
        return (
            box.x / self.width,
            1 - (box.y + box.h) / self.height,
            box.w / self.width,
            box.h / self.height,
        )

    def fill(self, box: Box, facecolor: str, edgecolor: str = "none", radius: float = 3) -> None:
        """A rounded rectangle."""
        left, bottom, width, height = self.rect(box)
        self.figure.add_artist(
            FancyBboxPatch(
                (left, bottom),
                width,
                height,
                boxstyle=f"round,pad=0,rounding_size={radius / self.width}",
                transform=self.figure.transFigure,
                facecolor=facecolor,
                edgecolor=edgecolor,
                linewidth=0.8,
                zorder=0,
            )
        )

    def text(self, x: float, y: float, text: str, **kwargs: Any) -> None:
        """Text at pixel ``(x, y)``; ``va`` defaults to top."""
        kwargs.setdefault("va", "top")
        kwargs.setdefault("color", TEXT)
        self.figure.text(x / self.width, 1 - y / self.height, text, **kwargs)

    def axes(self, box: Box) -> Axes:
        """New axes filling ``box``."""
        return self.figure.add_axes(self.rect(box))


def style_axes(ax: Axes) -> None:
    """Grafana-like axes: no frame, faint grid, dim tick labels."""
    ax.set_facecolor("none")
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.grid(True, color=GRID, linewidth=0.8)
    ax.set_axisbelow(True)
    ax.tick_params(colors=TEXT_DIM, labelsize=7.5, length=0, pad=3)


def fit(text: str, width_px: float, size: float) -> str:
    """Cut ``text`` with an ellipsis to about ``width_px`` at font ``size`` (rough)."""
    chars = max(4, int(width_px / (size * 0.6)))
    return text if len(text) <= chars else text[: chars - 1] + "…"


def draw_timeseries(
    canvas: Canvas, box: Box, panel: dict[str, Any], series: list[Series], times: np.ndarray
) -> None:
    """A Grafana time series panel: lines (or bars), stacking, two axes, a table legend."""
    defaults = panel.get("fieldConfig", {}).get("defaults", {})
    custom = defaults.get("custom", {})
    legend_row = 13
    # A table legend of one column, or of several side by side when the series are many.
    columns = 1
    while legend_row * (math.ceil(len(series) / columns) + 1) > box.h * 0.4 and columns < 3:
        columns += 1
    per_column = max(1, math.ceil(len(series) / columns))
    legend_h = legend_row * (per_column + 1) + 6
    right = any(one.right_axis for one in series)
    plot = Box(box.x + 50, box.y + 30, box.w - 50 - (56 if right else 14), 0)
    plot.h = box.h - 30 - 20 - legend_h
    ax = canvas.axes(plot)
    style_axes(ax)
    axes = {False: ax}
    if right:
        twin = ax.twinx()
        style_axes(twin)
        twin.grid(False)
        axes[True] = twin
    stacked = custom.get("stacking", {}).get("mode") == "normal"
    step_after = custom.get("lineInterpolation") == "stepAfter"
    width_days = (times[1] - times[0]) / np.timedelta64(1, "D") * 0.8 if times.size > 1 else 0.0
    base = {False: np.zeros(times.shape), True: np.zeros(times.shape)}
    for one in series:
        target = axes[one.right_axis]
        values = one.values
        lower = base[one.right_axis]
        if stacked:
            values = lower + np.nan_to_num(values)
            base[one.right_axis] = values
        if one.bars:
            target.bar(
                times,
                np.nan_to_num(one.values),
                width=width_days,
                color=one.color,
                alpha=0.8,
                zorder=3,
            )
            continue
        drawstyle = "steps-post" if step_after else "default"
        (line,) = target.plot(
            times, values, color=one.color, linewidth=1.2, drawstyle=drawstyle, zorder=3
        )
        if one.dashes:
            line.set_dashes(one.dashes)
        if one.fill_opacity > 0:
            target.fill_between(
                times,
                lower if stacked else 0,
                values,
                where=~np.isnan(values),
                step="post" if step_after else None,
                color=one.color,
                alpha=one.fill_opacity,
                linewidth=0,
                zorder=2,
            )
    for is_right, target in axes.items():
        members = [one for one in series if one.right_axis == is_right]
        unit = members[0].unit if members else defaults.get("unit")
        tops = [float(np.nanmax(base[is_right]))] if stacked and members else []
        tops += [one.max for one in members if math.isfinite(one.max)]
        bottoms = [np.nanmin(one.values) for one in members if math.isfinite(one.max)]
        low = min([0.0, *bottoms]) if "axisSoftMin" in custom else min(bottoms, default=0.0)
        high = defaults.get("max", max(tops, default=0.0))
        if high <= low:
            high = low + 1
        target.set_ylim(low, high + (high - low) * 0.06)
        target.yaxis.set_major_locator(MaxNLocator(4, min_n_ticks=2))
        target.yaxis.set_major_formatter(
            FuncFormatter(lambda value, _pos, unit=unit: format_value(value, unit))
        )
    ax.set_xlim(times[0], times[-1])
    locator = mdates.AutoDateLocator(minticks=3, maxticks=6)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
    # The legend: a table with the last and the largest value, as in the dashboard.
    top = plot.y + plot.h + 20
    column_w = (box.w - 10) / columns
    for column in range(columns):
        left = box.x + column * column_w
        last_x, max_x = left + column_w - 66, left + column_w - 8
        members = series[column * per_column : (column + 1) * per_column]
        if not members:
            continue
        canvas.text(last_x, top, "Last *", ha="right", fontsize=7, color=TEXT_DIM)
        canvas.text(max_x, top, "Max", ha="right", fontsize=7, color=TEXT_DIM)
        for row, one in enumerate(members, start=1):
            y = top + row * legend_row
            canvas.fill(Box(left + 10, y + 4, 12, 3), one.color, radius=1)
            name = fit(one.name, last_x - left - 86, 7)
            canvas.text(left + 27, y, name, fontsize=7)
            canvas.text(last_x, y, format_value(one.last, one.unit), ha="right", fontsize=7)
            canvas.text(max_x, y, format_value(one.max, one.unit), ha="right", fontsize=7)
    if not any(math.isfinite(one.max) for one in series):
        canvas.text(
            plot.x + plot.w / 2,
            plot.y + plot.h / 2,
            "No data",
            ha="center",
            va="center",
            fontsize=11,
            color=TEXT_DIM,
        )


def threshold_color(panel: dict[str, Any], value: float) -> str:
    """The color of the highest threshold step at or below ``value``."""
    steps = panel.get("fieldConfig", {}).get("defaults", {}).get("thresholds", {}).get("steps", [])
    chosen = "green"
    for step in steps:
        if step.get("value") is None or (math.isfinite(value) and value >= step["value"]):
            chosen = step["color"]
    return color(chosen)


def mapped(panel: dict[str, Any], value: float) -> tuple[str, str] | None:
    """``(text, color)`` of a value mapping that matches ``value``, if any."""
    for mapping in panel.get("fieldConfig", {}).get("defaults", {}).get("mappings", []):
        if mapping.get("type") != "value" or not math.isfinite(value):
            continue
        for key, result in mapping.get("options", {}).items():
            if float(key) == value:
                return result.get("text", key), color(result.get("color"))
    return None


def sparkline(
    canvas: Canvas,
    box: Box,
    values: np.ndarray,
    times: np.ndarray,
    *,
    tint: str,
    low: float | None = None,
    high: float | None = None,
) -> None:
    """A faint area chart of the run across ``box`` (stat and gauge panels)."""
    ax = canvas.axes(box)
    ax.set_axis_off()
    ax.set_facecolor("none")
    finite = values[~np.isnan(values)]
    if finite.size == 0:
        return
    bottom = min(0.0, float(finite.min())) if low is None else low
    top = float(finite.max()) if high is None else high
    if top <= bottom:
        top = bottom + 1
    ax.set_ylim(bottom, top + (top - bottom) * 0.1)
    ax.set_xlim(times[0], times[-1])
    ax.plot(times, values, color=tint, linewidth=1.1, alpha=0.85)
    ax.fill_between(
        times, bottom, values, where=~np.isnan(values), color=tint, alpha=0.18, linewidth=0
    )


def draw_stat(
    canvas: Canvas, box: Box, panel: dict[str, Any], series: list[Series], times: np.ndarray
) -> None:
    """A stat panel with ``colorMode: background``: one colored box per value."""
    if not series:
        canvas.text(
            box.x + box.w / 2,
            box.y + box.h / 2,
            "No data",
            ha="center",
            va="center",
            fontsize=11,
            color=TEXT_DIM,
        )
        return
    inner = Box(box.x + 6, box.y + 26, box.w - 12, box.h - 32)
    width = (inner.w - GAP * (len(series) - 1)) / len(series)
    for index, one in enumerate(series):
        cell = Box(inner.x + index * (width + GAP), inner.y, width, inner.h)
        value = one.last
        text, background = format_value(value, one.unit), threshold_color(panel, value)
        if (hit := mapped(panel, value)) is not None:
            text, background = hit
        canvas.fill(cell, background, radius=2)
        foreground = readable_on(background)
        sparkline(
            canvas,
            Box(cell.x, cell.y + cell.h * 0.5, cell.w, cell.h * 0.5),
            one.values,
            times,
            tint=foreground,
        )
        label_gap = 0
        if len(series) > 1:
            canvas.text(
                cell.x + cell.w / 2, cell.y + 6, one.name, ha="center", fontsize=8, color=foreground
            )
            label_gap = 8
        size = 22 if len(text) <= 8 else 16
        canvas.text(
            cell.x + cell.w / 2,
            cell.y + cell.h * 0.42 + label_gap,
            text,
            ha="center",
            va="center",
            fontsize=size,
            fontweight="bold",
            color=foreground,
        )


def draw_gauge(
    canvas: Canvas, box: Box, panel: dict[str, Any], series: list[Series], times: np.ndarray
) -> None:
    """A gauge: the value arc, the threshold band outside it, the value in the middle."""
    defaults = panel.get("fieldConfig", {}).get("defaults", {})
    low, high = float(defaults.get("min", 0)), float(defaults.get("max", 100))
    start, span = 210.0, 240.0  # degrees: the arc opens at the bottom

    def angle(v: float) -> float:
        share = 0.0 if not math.isfinite(v) else min(1.0, max(0.0, (v - low) / (high - low)))
        return start - span * share

    inner = Box(box.x + 6, box.y + 26, box.w - 12, box.h - 32)
    width = inner.w / max(1, len(series))
    for index, one in enumerate(series):
        cell = Box(inner.x + index * width, inner.y, width, inner.h)
        value = one.last
        tint = threshold_color(panel, value)
        sparkline(
            canvas,
            Box(cell.x, cell.y + cell.h * 0.72, cell.w, cell.h * 0.28),
            one.values,
            times,
            tint=tint,
            low=low,
        )
        size = min(cell.w, cell.h * 1.25)
        ax = canvas.axes(Box(cell.x + (cell.w - size) / 2, cell.y, size, size * 0.8))
        ax.set_axis_off()
        ax.set_xlim(-1.1, 1.1)
        ax.set_ylim(-0.65, 1.1)
        ax.set_aspect("equal")
        ax.add_patch(Wedge((0, 0), 0.86, start - span, start, width=0.2, color="#2c3038"))
        if math.isfinite(value):
            ax.add_patch(Wedge((0, 0), 0.86, angle(value), start, width=0.2, color=tint))
        steps = defaults.get("thresholds", {}).get("steps", [])
        for number, step in enumerate(steps):
            begin = low if step.get("value") is None else float(step["value"])
            end = steps[number + 1]["value"] if number + 1 < len(steps) else high
            ax.add_patch(
                Wedge((0, 0), 1.0, angle(end), angle(begin), width=0.07, color=color(step["color"]))
            )
        ax.text(
            0,
            0.05,
            format_value(value, one.unit),
            ha="center",
            va="center",
            fontsize=12.5,
            fontweight="bold",
            color=tint,
        )


def draw(run: Run, out: Path) -> int:
    """Draw the dashboard from ``run`` into ``out``; return how many panels drew data."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    panels = all_panels(dashboard)
    bottom = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    height = HEADER + bottom * UNIT + MARGIN
    figure = Figure(figsize=(WIDTH / 100, height / 100), dpi=100, facecolor=CANVAS)
    canvas = Canvas(figure, WIDTH, height)
    grid = np.arange(run.start, run.end + run.step / 2, run.step, dtype=float)
    times = (grid * 1000).astype("datetime64[ms]")
    started = datetime.fromtimestamp(run.start, UTC)
    canvas.text(MARGIN + 4, 14, dashboard.get("title", "dashboard"), fontsize=15, fontweight="bold")
    canvas.text(
        WIDTH - MARGIN - 4,
        12,
        f"{started:%Y-%m-%d %H:%M:%S} to {datetime.fromtimestamp(run.end, UTC):%H:%M:%S} UTC "
        f"({run.end - run.start:.0f} s) · real bridge under simulated load, real Prometheus "
        f"scraping every {run.step} s · the dashboard's own queries",
        ha="right",
        fontsize=8.5,
        color=TEXT_DIM,
    )
    canvas.text(WIDTH - MARGIN - 4, 28, "Bridge: All", ha="right", fontsize=8.5, color=TEXT_DIM)
    column = (WIDTH - 2 * MARGIN) / 24
    with_data = 0
    for panel in panels:
        pos = panel["gridPos"]
        box = Box(
            MARGIN + pos["x"] * column + GAP / 2,
            HEADER + pos["y"] * UNIT + GAP / 2,
            pos["w"] * column - GAP,
            pos["h"] * UNIT - GAP,
        )
        if panel["type"] == "row":
            canvas.text(
                box.x,
                box.y + box.h / 2,
                f"⌄  {panel['title']}",
                va="center",
                fontsize=10.5,
                fontweight="bold",
            )
            continue
        canvas.fill(box, PANEL, edgecolor=BORDER)
        canvas.text(box.x + 8, box.y + 8, panel["title"], fontsize=9.5, fontweight="bold")
        series = build_series(panel, run.answers.get(panel["id"], []), grid)
        if panel["type"] == "stat":
            draw_stat(canvas, box, panel, series, times)
        elif panel["type"] == "gauge":
            draw_gauge(canvas, box, panel, series, times)
        else:
            draw_timeseries(canvas, box, panel, series, times)
        if any(math.isfinite(one.max) for one in series):
            with_data += 1
        else:
            log(f"panel without data: {panel['title']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100, facecolor=CANVAS)
    return with_data


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=ROOT / "docs" / "dashboard.png", help="the PNG to write"
    )
    parser.add_argument("--seconds", type=float, default=90.0, help="length of the run (90)")
    parser.add_argument("--meters", type=int, default=200, help="simulated meters (200)")
    parser.add_argument(
        "--spool-max-mib", type=int, default=4, help="the bridge's spool.max_bytes in MiB (4)"
    )
    parser.add_argument(
        "--no-broker-restart",
        dest="broker_restart",
        action="store_false",
        help="do not restart the broker at three quarters of the run",
    )
    parser.add_argument("--workdir", type=Path, help="keep configs, logs and data here")
    parser.add_argument("--save", type=Path, help="also write the query answers to this JSON")
    parser.add_argument(
        "--replay", type=Path, help="draw from answers saved by --save instead of running"
    )
    args = parser.parse_args(argv)
    if args.seconds < 30:
        parser.error("--seconds must be at least 30")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run, query, draw; see the module docstring for the exit status."""
    args = parse_args(argv)
    if args.replay is not None:
        document = json.loads(args.replay.read_text(encoding="utf-8"))
        answers = {int(key): value for key, value in document.pop("answers").items()}
        run = Run(**document, answers=answers)
    else:
        prometheus_path = shutil.which("prometheus")
        if prometheus_path is None:
            log("prometheus is not on PATH: apt-get install -y prometheus")
            return 2
        with contextlib.ExitStack() as stack:
            if args.workdir is None:
                workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="render-")))
            else:
                workdir = args.workdir.resolve()
                workdir.mkdir(parents=True, exist_ok=True)
            run = record(args, workdir, prometheus_path)
        if args.save is not None:
            args.save.write_text(json.dumps(dataclasses.asdict(run)), encoding="utf-8")
    for error in run.errors:
        log(f"query failed: {error}")
    with_data = draw(run, args.out)
    total = sum(1 for p in all_panels(json.loads(DASHBOARD.read_text())) if p["type"] != "row")
    log(f"wrote {args.out}: {with_data} of {total} panels with data")
    return 0 if with_data == total and not run.errors else 1


if __name__ == "__main__":
    sys.exit(main())
