"""``python -m bench``: run the scenarios, print one JSON line per scenario, then the machine.

Each line holds the median of ``--repeat`` repetitions (``runs_readings_per_s`` lists each
readings/s; ``lost`` and ``duplicated`` are totals over all repetitions and must be 0). See
``bench/__init__.py`` for the scenarios and ``bench/scenarios.py`` for the definitions.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from bench import against as against_mod
from bench import nodered
from bench.profile import top_functions
from bench.scenarios import Options, Scenarios

SCENARIOS = ("live", "backlog", "spool", "fixed_rate", "slow_cloud")
ON_REQUEST = ("replicas",)
"""Scenarios run only when named in ``--scenarios`` (``replicas``: one line per ``--replicas``)."""
AGAINST_SCENARIOS = against_mod.SCENARIOS
_SUMMED = ("lost", "duplicated")
_DIGITS = {
    "ratio_bridge_to_bare": 3,
    "bridge_cpu_s_per_100k": 2,
    "bridges_cpu_s_per_100k": 2,
    "stub_cpu_s_per_100k": 2,
    "broker_cpu_s_per_100k": 2,
    "startup_s": 2,
    "spool_commit_ms_mean": 1,
    "push_ms_mean": 1,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="End-to-end benchmark of energy-bridge: Mosquitto -> bridge -> cloud stub.",
    )
    parser.add_argument("--readings", type=int, default=100_000, help="readings per scenario")
    parser.add_argument("--meters", type=int, default=200, help="meters the readings come from")
    parser.add_argument(
        "--spool-readings", type=int, default=1_000_000, help="readings in the spool scenario"
    )
    parser.add_argument("--repeat", type=int, default=3, help="repetitions; medians are printed")
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS + ON_REQUEST)}"
        f" (default: {','.join(SCENARIOS)}; with --against: {','.join(AGAINST_SCENARIOS)})",
    )
    parser.add_argument(
        "--replicas",
        default="1,2,3",
        help="replicas scenario: bridges in one share group, one line per count"
        " (default %(default)s)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 10k readings, 20 meters, spool 50k, 1 repetition (under a minute)",
    )
    parser.add_argument(
        "--rate", type=float, default=None, help="fixed_rate target (default: half of live)"
    )
    parser.add_argument(
        "--synchronous",
        choices=("full", "normal"),
        default="full",
        help="the bridge's spool.synchronous (default %(default)s)",
    )
    parser.add_argument(
        "--protocol",
        choices=("v5", "v311"),
        default="v5",
        help="the bridge's mqtt.protocol (default %(default)s)",
    )
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=None,
        help="the bridge's cloud.max_in_flight (default: the bridge's own default)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="any other bridge setting, repeatable (e.g. mqtt.receive_maximum=16384)",
    )
    parser.add_argument(
        "--linger-secs",
        type=float,
        default=0.2,
        help="the bridge's batch.linger_secs (default %(default)s)",
    )
    parser.add_argument(
        "--connections", type=int, default=1, help="publisher connections (default %(default)s)"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="also run one live (and one spool, if selected) repetition under py-spy; "
        "collapsed stacks into DIR, top functions printed",
    )
    parser.add_argument(
        "--against",
        choices=("node-red",),
        default=None,
        help="run the same scenarios through a Node-RED flow too, interleaved, and print both "
        "and the ratio (installs node-red@4 with npm into ~/.cache/energy-bridge/node-red once; "
        "scenarios: " + ",".join(AGAINST_SCENARIOS) + ")",
    )
    parser.add_argument(
        "--publish-rate",
        type=float,
        default=30_000.0,
        help="with --against: the generator's pace in readings/s for live, slow_cloud and "
        "throttled, the same for every system (0: flat out; default %(default)g)",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="keep run files here")
    parser.add_argument(
        "--max-minutes", type=float, default=60.0, help="abort the whole run after this long"
    )
    return parser


def _overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["mqtt.receive_maximum=16384"]`` -> ``{"mqtt": {"receive_maximum": 16384}}``."""
    result: dict[str, Any] = {}
    for item in items:
        path, sep, raw = item.partition("=")
        keys = path.strip().split(".")
        if not sep or not all(keys):
            raise ValueError(f"--set {item!r}: expected SECTION.KEY=VALUE")
        node = result
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = yaml.safe_load(raw)
    return result


def _median(values: list[Any]) -> Any:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _combine(name: str, runs: list[dict[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
    """One scenario line: medians of the repetitions' figures, totals for lost/duplicated."""
    line: dict[str, Any] = {"scenario": name, **extra}
    keys = list(dict.fromkeys(k for run in runs for k in run))
    for key in keys:
        values = [run.get(key) for run in runs]
        if key in _SUMMED:
            line[key] = sum(v or 0 for v in values)
        elif isinstance(values[0], list):
            line[key] = values  # one list per repetition (the replicas' shares)
        elif isinstance(values[0], dict):
            line[key] = {sub: _median([v.get(sub) for v in values if v]) for sub in values[0]}
        else:
            value = _median(values)
            digits = _DIGITS.get(key, 1 if key.endswith("_mb") else 0)
            line[key] = None if value is None else round(value, digits) if digits else round(value)
    line["runs_readings_per_s"] = [round(run["readings_per_s"]) for run in runs]
    return line


def _machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                model = text.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mosquitto = subprocess.run(
            ["mosquitto", "-h"], capture_output=True, text=True, timeout=5, check=False
        ).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        mosquitto = "unknown"
    return {
        "machine": {
            "nproc": os.cpu_count(),
            "cpu_model": model,
            "python": platform.python_version(),
            "mosquitto": mosquitto,
            "kernel": platform.release(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            # Other work on the machine (a shared box): the 1/5/15-minute load at the end.
            "loadavg": [round(x, 2) for x in os.getloadavg()],
        }
    }


def _bridge_code() -> dict[str, Any]:
    """Which bridge code ran: the git commit and a hash of the ``bridge/`` sources as found.

    The bridge is started afresh for every repetition, so sources edited during a run would
    mix versions; comparing this at the start and the end detects it.
    """
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted((root / "bridge").rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "bridge"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "unknown", ""
    return {
        "commit": commit or "unknown",
        "bridge_dirty": bool(dirty),
        "bridge_sha256": digest.hexdigest()[:16],
    }


def _emit(line: dict[str, Any]) -> None:
    print(json.dumps(line), flush=True)


def _watchdog(minutes: float) -> None:
    def expire() -> None:
        print(f"bench: aborted after --max-minutes {minutes:g}", file=sys.stderr, flush=True)
        # Children are killed by the kernel (PR_SET_PDEATHSIG) when this process exits.
        os._exit(3)

    timer = threading.Timer(minutes * 60, expire)
    timer.daemon = True
    timer.start()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return the exit status (1 if anything was lost or duplicated)."""
    args = _parser().parse_args(argv)
    if args.quick:
        args.readings, args.meters, args.spool_readings, args.repeat = 10_000, 20, 50_000, 1
    if min(args.readings, args.meters, args.spool_readings, args.repeat, args.connections) < 1:
        print("bench: sizes, --repeat and --connections must be at least 1", file=sys.stderr)
        return 2
    known = AGAINST_SCENARIOS if args.against else SCENARIOS + ON_REQUEST
    if args.against and args.scenarios == ",".join(SCENARIOS):
        args.scenarios = ",".join(AGAINST_SCENARIOS)
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = sorted(set(names) - set(known))
    if unknown:
        print(f"bench: unknown scenario(s): {', '.join(unknown)}", file=sys.stderr)
        return 2
    try:
        overrides = _overrides(args.set)
    except ValueError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    _watchdog(args.max_minutes)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="energy-bridge-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    options = Options(
        readings=args.readings,
        meters=args.meters,
        spool_readings=args.spool_readings,
        connections=args.connections,
        synchronous=args.synchronous,
        linger_secs=args.linger_secs,
        protocol=args.protocol,
        max_in_flight=args.max_in_flight,
        bridge_overrides=overrides,
        workdir=workdir,
    )
    bench = Scenarios(options)
    common = {
        "readings": args.readings,
        "meters": args.meters,
        "repeat": args.repeat,
        "synchronous": args.synchronous,
        "protocol": args.protocol,
        "max_in_flight": args.max_in_flight,
        **({"set": args.set} if args.set else {}),
    }
    failed = False
    started = time.monotonic()
    code = _bridge_code()
    if args.against:
        red_js = nodered.ensure_installed()
        common["node_red"] = nodered.installed_version()
        common["node"] = nodered.node_version()
        common["publish_rate"] = args.publish_rate or None
        runner = against_mod.Against(bench, publish_rate=args.publish_rate or None, red_js=red_js)
        try:
            lines = against_mod.run(
                runner, sorted(names, key=AGAINST_SCENARIOS.index), args.repeat, _emit, common
            )
        finally:
            if args.workdir is None:
                shutil.rmtree(workdir, ignore_errors=True)
        failed = any(
            (line[s] or {}).get("lost") or (line[s] or {}).get("duplicated")
            for line in lines
            for s in against_mod.SYSTEMS
        )
        print(against_mod.table(lines), flush=True)
        return _finish(started, code, failed)
    try:
        for name in sorted(names, key=(SCENARIOS + ON_REQUEST).index):
            extra = dict(common)
            run: Callable[[], dict[str, Any]]
            if name == "replicas":
                for count in [int(n) for n in args.replicas.split(",") if n.strip()]:
                    runs = [bench.replicas(count) for _ in range(args.repeat)]
                    line = _combine(name, runs, {**extra, "replicas": count})
                    failed |= bool(line.get("lost") or line.get("duplicated"))
                    _emit(line)
                continue
            if name == "fixed_rate":
                rate = args.rate
                if rate is None:
                    if not bench.live_rates:
                        bench.live_max()  # the live maximum this machine reaches now
                    rate = round(statistics.median(bench.live_rates) / 2)
                run = functools.partial(bench.fixed_rate, float(rate))
            elif name == "spool":
                _, _, fill = bench.spool_template()
                extra.update(readings=args.spool_readings, spool_fill_s=round(fill, 1))
                run = bench.spool
            else:
                run = getattr(bench, name)
            runs = [run() for _ in range(args.repeat)]
            line = _combine(name, runs, extra)
            failed |= bool(line.get("lost") or line.get("duplicated"))
            _emit(line)
        if args.profile is not None:
            args.profile.mkdir(parents=True, exist_ok=True)
            profiled = {"live": bench.profiled_live, "spool": bench.profiled_spool}
            for name in [n for n in ("live", "spool") if n in names] or ["live"]:
                out = args.profile / f"bridge-{name}.txt"
                figures = profiled[name](out)
                _emit(
                    {
                        "profile": name,
                        "stacks": str(out),
                        "readings_per_s_under_profiler": round(figures["readings_per_s"]),
                        **top_functions(out),
                    }
                )
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return _finish(started, code, failed)


def _finish(started: float, code: dict[str, Any], failed: bool) -> int:
    """Print the machine line; return the exit status."""
    machine = _machine()
    machine["machine"]["bench_seconds"] = round(time.monotonic() - started)
    end_code = _bridge_code()
    machine["code"] = code
    if end_code["bridge_sha256"] != code["bridge_sha256"]:
        machine["code"]["changed_during_run"] = end_code
        print(
            "bench: bridge/ sources changed during the run: figures mix versions", file=sys.stderr
        )
    _emit(machine)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
