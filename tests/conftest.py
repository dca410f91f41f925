"""Shared fixtures: a private mosquitto, the cloud stub and bridge processes.

Every process fixture kills what it started in a ``finally`` (also when the test failed) and,
when the test failed, prints the tail of each process's log into the test report.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

# Make ``tests.support`` importable however pytest is started (``pytest``, ``python -m
# pytest``, from another directory): the repository root goes first on sys.path.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.support import (  # noqa: E402 - needs the sys.path entry above
    BridgeFactory,
    BridgeProcess,
    Mosquitto,
    MosquittoFactory,
    StubFactory,
    StubProcess,
    free_port,
    write_bridge_config,
)

_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()

# Set by coverage (patch = ["subprocess"]) when scripts/test measures this run and its children.
_MEASURED = "COVERAGE_PROCESS_CONFIG" in os.environ


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Remember each phase's report so fixtures can tell whether the test failed."""
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


def _test_failed(request: pytest.FixtureRequest) -> bool:
    reports = request.node.stash.get(_REPORTS, {})
    return any(report.failed for report in reports.values())


def _report_logs(request: pytest.FixtureRequest, *processes: Any) -> None:
    if _test_failed(request):
        for process in processes:
            print(process.describe())


@pytest.fixture
def mosquitto_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[MosquittoFactory]:
    """Make private brokers with custom options; all are killed at teardown."""
    brokers: list[Mosquitto] = []

    def make(
        *,
        persistence: bool = True,
        max_inflight: int | None = None,
        max_queued_messages: int = 0,
        extra_conf: str = "",
        start: bool = True,
    ) -> Mosquitto:
        broker = Mosquitto(
            tmp_path / f"mosquitto-{len(brokers)}",
            persistence=persistence,
            max_inflight=max_inflight,
            max_queued_messages=max_queued_messages,
            extra_conf=extra_conf,
        )
        brokers.append(broker)
        return broker.start() if start else broker

    try:
        yield make
    finally:
        _report_logs(request, *brokers)
        for broker in brokers:
            broker.kill()


@pytest.fixture
def mosquitto(mosquitto_factory: MosquittoFactory) -> Mosquitto:
    """A started private mosquitto with persistence on, on 127.0.0.1 and a free port."""
    return mosquitto_factory()


@pytest.fixture
def stub_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[StubFactory]:
    """Make cloud stubs with extra CLI arguments (``"--error-rate", "0.2"``); killed at teardown."""
    stubs: list[StubProcess] = []

    def make(*args: str, env: dict[str, str] | None = None, start: bool = True) -> StubProcess:
        stub = StubProcess(tmp_path / f"stub-{len(stubs)}", args=args, env=env)
        stubs.append(stub)
        return stub.start() if start else stub

    try:
        yield make
    finally:
        _report_logs(request, *stubs)
        for stub in stubs:
            stub.kill()


@pytest.fixture
def stub(stub_factory: StubFactory) -> StubProcess:
    """A started cloud stub with default settings (key ``testid``/``testsecret``)."""
    return stub_factory()


@pytest.fixture
def bridge_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[BridgeFactory]:
    """Make bridge processes; each gets its own directory, spool and metrics port.

    By default a bridge talks to the ``mosquitto`` and ``stub`` fixtures (requested only when
    needed), is started and waited on until ``/readyz`` answers 200. Pass ``config`` to reuse
    a config file, ``start=False`` or ``ready_timeout=None`` to do those steps yourself, and
    config sections as keyword arguments (deep-merged), e.g. ``batch={"max_devices": 5}``.
    All bridges are killed at teardown; a failed test prints their log tails.
    """
    bridges: list[BridgeProcess] = []

    def make(
        *,
        mqtt_port: int | None = None,
        cloud_url: str | None = None,
        config: Path | None = None,
        env: dict[str, str] | None = None,
        start: bool = True,
        ready_timeout: float | None = 30.0,
        **overrides: Any,
    ) -> BridgeProcess:
        workdir = tmp_path / f"bridge-{len(bridges)}"
        if config is None:
            if mqtt_port is None:
                mqtt_port = request.getfixturevalue("mosquitto").port
            if cloud_url is None:
                cloud_url = request.getfixturevalue("stub").url
            config = write_bridge_config(
                workdir,
                mqtt_port=mqtt_port,
                cloud_url=cloud_url,
                http_port=free_port(),
                **overrides,
            )
        bridge = BridgeProcess(config, workdir=workdir, env=env)
        bridges.append(bridge)
        if start:
            bridge.start()
            if ready_timeout is not None:
                bridge.wait_ready(ready_timeout)
        return bridge

    try:
        yield make
    finally:
        _report_logs(request, *bridges)
        for bridge in bridges:
            _stop_bridge(bridge)


@pytest.fixture(autouse=True)
def _untraced_when_timing(request: pytest.FixtureRequest) -> Iterator[None]:
    """Run a test marked ``timing`` without coverage tracing, in this process and its children.

    Tracing every call in the bridge (and in the test's own publisher) more than halves its
    throughput (the 60 s outage test published its backlog in 142 s instead of under 60); a test
    that asserts a rate or a duration would then measure the tracer. Autouse fixtures are set up
    first, so the processes the test's fixtures start already lack COVERAGE_PROCESS_CONFIG.
    """
    if not _MEASURED or request.node.get_closest_marker("timing") is None:
        yield
        return
    import coverage  # noqa: PLC0415 - only when scripts/test measures this run

    current = coverage.Coverage.current()
    config = os.environ.pop("COVERAGE_PROCESS_CONFIG")
    if current is not None:
        current.stop()
    try:
        yield
    finally:
        if current is not None:
            current.start()
        os.environ["COVERAGE_PROCESS_CONFIG"] = config


def _stop_bridge(bridge: BridgeProcess) -> None:
    """Kill a bridge at teardown; under coverage, SIGTERM it first so it writes its data.

    A SIGKILLed process saves no coverage data, and most tests leave their bridges running.
    The clean exit gets a few seconds (it may be waiting on a cloud stub that is already
    gone); after that the kill is what it always was. Timing inside the test is unchanged.
    """
    if _MEASURED and bridge.running:
        with contextlib.suppress(TimeoutError):
            bridge.terminate(timeout=5)
    bridge.kill()
