"""The meter simulator: realistic readings, topics, malformed messages and a real run."""

from __future__ import annotations

import itertools
import json
import math
import random
import re
import signal
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from bridge.tools.simulate import (
    POINTS,
    Message,
    MessageKind,
    SimulationOptions,
    encode_json_reading,
    main,
    message_ticks,
    meter_readings,
    per_point_meters,
)
from tests.support import Mosquitto, Subscriber, wait_until

START = 1_700_000_000
DECIMALS = {"Ua": 2, "Ub": 2, "Uc": 2, "Ia": 2, "Ib": 2, "Ic": 2, "F": 2, "Ep_imp": 2, "Ep_exp": 2}
DECIMALS |= {"P": 3, "Q": 3, "COSQ": 3}


def readings(
    meter: int = 1, count: int = 500, interval: float = 5.0, seed: int = 1
) -> list[dict[str, str]]:
    """The first ``count`` readings of one simulated meter."""
    stream = meter_readings(meter, START, interval, random.Random(seed))
    return list(itertools.islice(stream, count))


def run_simulator(port: int, *args: str) -> subprocess.Popen[str]:
    """Start ``python -m bridge simulate`` (``energy-bridge simulate``) against the test broker."""
    argv = [sys.executable, "-m", "bridge", "simulate", "--port", str(port), *args]
    return subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )


def finish(proc: subprocess.Popen[str], timeout: float = 30) -> tuple[int, dict[str, Any], str]:
    """Wait for the simulator; return exit code, parsed summary line and stderr."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"simulator did not finish in {timeout}s: {err[-2000:]}")
    lines = out.strip().splitlines()
    assert lines, f"no summary on stdout; stderr: {err[-2000:]}"
    return proc.returncode, json.loads(lines[-1]), err


@pytest.mark.parametrize("meter", [1, 2, 3])
def test_simulate_energy_counter_never_decreases(meter: int) -> None:
    """Test that Ep_imp only goes up, by about P times the time step, and Ep_exp never drops."""
    values = readings(meter)
    imported = [Decimal(r["Ep_imp"]) for r in values]
    exported = [Decimal(r["Ep_exp"]) for r in values]

    assert all(b >= a for a, b in itertools.pairwise(imported))
    assert all(b >= a for a, b in itertools.pairwise(exported))
    expected_gain = sum(float(r["P"]) * 5 / 3600 for r in values[1:])
    assert float(imported[-1] - imported[0]) == pytest.approx(expected_gain, abs=0.02)


def test_simulate_power_consistent_with_voltage_current_and_power_factor() -> None:
    """Test that P and Q match the sum of U·I·cosφ and U·I·sinφ over the phases."""
    for reading in readings(count=300) + readings(meter=2, count=300):
        s_kva = sum(float(reading[f"U{p}"]) * float(reading[f"I{p}"]) for p in "abc") / 1000
        cos_phi = float(reading["COSQ"])
        assert float(reading["P"]) == pytest.approx(s_kva * cos_phi, rel=1e-3, abs=1e-3)
        sin_phi = math.sqrt(1 - cos_phi**2)
        assert float(reading["Q"]) == pytest.approx(s_kva * sin_phi, rel=1e-3, abs=1e-3)


def test_simulate_values_in_realistic_ranges() -> None:
    """Test that voltages, frequency and power factor stay in a three-phase meter's ranges."""
    for reading in readings(count=1000):
        for phase in "abc":
            assert 216.2 <= float(reading[f"U{phase}"]) <= 243.8
            assert 0 < float(reading[f"I{phase}"]) < 200
        assert 49.95 <= float(reading["F"]) <= 50.05
        assert 0.85 <= float(reading["COSQ"]) <= 0.99


def test_simulate_values_are_fixed_decimal_number_text() -> None:
    """Test that every value is JSON number text with its fixed number of decimals."""
    for reading in readings(count=200):
        assert ["ts", *POINTS] == list(reading)
        assert re.fullmatch(r"\d{10}", reading["ts"])
        for point, decimals in DECIMALS.items():
            assert re.fullmatch(rf"\d+\.\d{{{decimals}}}", reading[point]), (point, reading)
        parsed = json.loads(encode_json_reading(reading), parse_float=str, parse_int=str)
        assert reading == parsed


@pytest.mark.parametrize(("interval", "step"), [(5.0, 5), (1.0, 1), (0.25, 1), (0.0, 1)])
def test_simulate_timestamps_give_each_reading_its_own_second(interval: float, step: int) -> None:
    """Test that ts starts at the start time and rises by the interval, at least one second."""
    stamps = [int(r["ts"]) for r in readings(count=50, interval=interval)]
    assert stamps[0] == START
    assert all(b - a >= step for a, b in itertools.pairwise(stamps))
    if interval >= 1:
        assert [START + int(k * interval) for k in range(50)] == stamps


def test_simulate_per_point_meters_spread_evenly() -> None:
    """Test that the per-point share picks evenly spread meters."""
    assert frozenset({10, 20, 30, 40, 50}) == per_point_meters(50, 0.1)
    assert frozenset() == per_point_meters(50, 0.0)
    assert frozenset(range(1, 6)) == per_point_meters(5, 1.0)


def test_simulate_per_point_topics_carry_bare_values() -> None:
    """Test that per-point meters publish each point as a bare value on its own topic."""
    options = SimulationOptions(meters=20, per_point_fraction=0.1, device_type="1")
    tick = next(message_ticks(options, START, random.Random(5)))

    by_meter: dict[int, list[Message]] = {}
    for message in tick:
        by_meter.setdefault(message.meter, []).append(message)
    assert set(range(1, 21)) == set(by_meter)
    for meter, messages in by_meter.items():
        if meter in (10, 20):
            device = f"meter-{meter:04d}"
            expected_topics = [f"meters/1/{device}/points/{point}" for point in POINTS]
            assert expected_topics == [m.topic for m in messages]
            assert all(m.kind is MessageKind.POINT for m in messages)
            assert all(re.fullmatch(rb"\d+\.\d{2,3}", m.payload) for m in messages)
        else:
            (message,) = messages
            assert f"meters/1/meter-{meter:04d}/telemetry" == message.topic
            assert MessageKind.JSON is message.kind
            assert str(START) == json.loads(message.payload, parse_int=str)["ts"]


@pytest.mark.parametrize("every", [2, 7, 100])
def test_simulate_malformed_messages_at_requested_rate(every: int) -> None:
    """Test that exactly every N-th message is malformed and no reading is dropped for it."""
    options = SimulationOptions(meters=13, malformed_every=every, per_point_fraction=0.2)
    ticks = list(itertools.islice(message_ticks(options, START, random.Random(3)), 20))
    stream = [message for tick in ticks for message in tick]

    positions = [i + 1 for i, m in enumerate(stream) if m.kind is MessageKind.MALFORMED]
    assert list(range(every, len(stream) + 1, every)) == positions
    good = [m for m in stream if m.kind is not MessageKind.MALFORMED]
    assert 20 * (11 + 2 * len(POINTS)) == len(good)


def test_simulate_malformed_payloads_are_not_readable() -> None:
    """Test that each malformed payload is bad UTF-8, bad JSON, or JSON but not an object."""
    options = SimulationOptions(meters=5, malformed_every=3)
    ticks = itertools.islice(message_ticks(options, START, random.Random(8)), 30)
    bad = [m for tick in ticks for m in tick if m.kind is MessageKind.MALFORMED]
    assert len(bad) > 30

    for message in bad:
        assert message.topic.endswith("/telemetry")
        try:
            parsed = json.loads(message.payload.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        assert not isinstance(parsed, dict)
        assert not (isinstance(parsed, list) and any(isinstance(x, dict) for x in parsed))


def test_simulate_same_seed_gives_same_messages() -> None:
    """Test that the message stream is a pure function of the seed."""
    options = SimulationOptions(meters=8, malformed_every=5)

    def first_ticks(seed: int) -> list[Message]:
        ticks = itertools.islice(message_ticks(options, START, random.Random(seed)), 5)
        return [m for tick in ticks for m in tick]

    assert first_ticks(42) == first_ticks(42)
    assert first_ticks(42) != first_ticks(43)


def test_simulate_rejects_invalid_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    """Test that invalid options exit with status 2 and a message, without connecting."""
    assert main(["--meters", "0", "--port", "1"]) == 2
    assert "--meters must be at least 1" in capsys.readouterr().err
    assert main(["--max-inflight", "70000", "--port", "1"]) == 2
    assert main(["--malformed-every", "1", "--port", "1"]) == 2
    with pytest.raises(ValueError, match="malformed_every"):
        next(message_ticks(SimulationOptions(malformed_every=1), START, random.Random(1)))


def test_simulate_run_publishes_the_count_it_reports(mosquitto: Mosquitto) -> None:
    """Test that a real run publishes exactly the messages its summary line reports."""
    options = SimulationOptions(meters=5, per_point_fraction=0.2, malformed_every=10)
    ticks = itertools.islice(message_ticks(options, START, random.Random(1)), 4)
    expected = [m for tick in ticks for m in tick]
    expected_malformed = sum(m.kind is MessageKind.MALFORMED for m in expected)

    with Subscriber(mosquitto.host, mosquitto.port, ["meters/#"]) as subscriber:
        proc = run_simulator(
            mosquitto.port,
            *("--meters", "5", "--count", "4", "--interval", "0", "--seed", "1"),
            *("--per-point-fraction", "0.2", "--malformed-every", "10", "--max-inflight", "3"),
        )
        code, summary, err = finish(proc)
        received = subscriber.wait_for(len(expected))

    assert code == 0, err
    assert {
        "published": len(expected),
        "malformed": expected_malformed,
        "meters": 5,
        "readings": 20,
        "unacked": 0,
    } == summary
    assert sorted(m.topic for m in expected) == sorted(topic for topic, _ in received)


def test_simulate_stops_on_sigterm_and_reports(mosquitto: Mosquitto) -> None:
    """Test that SIGTERM stops an endless run cleanly with a summary of what was published."""
    with Subscriber(mosquitto.host, mosquitto.port, ["meters/#"]) as subscriber:
        proc = run_simulator(
            mosquitto.port, "--meters", "3", "--interval", "0.05", "--per-point-fraction", "0"
        )
        try:
            wait_until(lambda: len(subscriber.messages) >= 30, timeout=20, message="30 messages")
        finally:
            proc.send_signal(signal.SIGTERM)
        code, summary, err = finish(proc)
        wait_until(
            lambda: len(subscriber.messages) >= summary["published"],
            timeout=10,
            message="every published message at the subscriber",
        )

    assert code == 0, err
    assert summary["published"] == len(subscriber.messages)
    assert summary["published"] % 3 == 0
    assert summary["published"] == summary["readings"]


def test_simulate_duration_ends_run(mosquitto: Mosquitto) -> None:
    """Test that --duration ends an otherwise endless run and progress goes to stderr."""
    proc = run_simulator(mosquitto.port, "--meters", "2", "--interval", "0.1", "--duration", "1.5")

    code, summary, err = finish(proc)

    assert code == 0, err
    assert 0 < summary["published"] <= 2 * 16
    assert re.search(r"published \d+ \(\d+/s\)", err)
