"""Coverage-guided fuzzing of the mapping (atheris).

Any topic and payload bytes give readings that obey the API's rules, or a MappingError with
a known reason; nothing else, ever.

    .venv/bin/python tests/fuzz/fuzz_mapping.py tests/fuzz/corpus/mapping -max_total_time=600

Each input is split into a route choice, a topic and a payload. A crash (any other exception,
or a reading that breaks an invariant) makes libFuzzer stop and write the input to
``crash-*``; run the target with that file as argument to reproduce it.
"""

from __future__ import annotations

import sys
from decimal import Decimal

import atheris

with atheris.instrument_imports():
    from bridge.config import NonNumeric, PayloadFormat, PointSource, Route
    from bridge.errors import MappingError
    from bridge.intake.mapping import REASONS, Mapper

ROUTES = [
    Route(),
    Route(topic="meters/{deviceType}/{deviceId}/{point}", format=PayloadFormat.VALUE),
    Route(
        topic="inv/{deviceId}",
        device_type="15",
        time_key="time",
        renames={"a": "b"},
        scale={"b": "0.001", "c": "1000"},
    ),
    Route(topic="plant/{deviceId}/data", device_type="1", scale={"Ep_imp": "0.001"}),
    # The generic mapping: records, ids and times by path, named points, sums and scales.
    # Validated from the configuration's form: a point may be a bare path string.
    Route.model_validate(
        {
            "topic": "gw/{deviceId}/data",
            "device_type": "1",
            "records": "reported.meters",
            "device_id": "addr",
            "time": "timestamp",
            "time_format": "%Y%m%d%H%M%S",
            "align_secs": 60,
            "points": {
                "Ua": "Ua",
                "Ia": "ENERGY.Current[0]",
                "Ic": "ENERGY.Current[-1]",
                "P": PointSource(path="ENERGY.Power", scale="0.001"),
                "Ep_imp": PointSource(sum=["ENERGY.Total[0]", "ENERGY.Total[1]", '"em:0".t']),
                "F": "$.f",
            },
            "on_bad_time": "receive_time",
        }
    ),
    Route(
        topic="all/meters",
        device_type="1",
        device_id="$.id",
        time="$.ts",
        max_age_days=30,
        ignore=["state", "unit"],
        on_non_numeric=NonNumeric.SKIP,
        renames={"a": "Ua"},
    ),
    Route(
        topic="pp/{deviceId}/{point}",
        device_type="1",
        format=PayloadFormat.VALUE,
        time="at",
        align_secs=900,
    ),
]
TOPIC_PREFIXES = [
    b"meters/1/m-1/telemetry",
    b"meters/15/s/telemetry",
    b"meters/1/m/Ua",
    b"inv/x",
    b"plant/p/data",
    b"gw/g/data",
    b"all/meters",
    b"pp/m/Ua",
    b"",  # a topic from the input itself
]
MAPPER = Mapper(ROUTES, "Asia/Shanghai", max_payload_bytes=4096, max_points=50, max_readings=20)


def check(data: bytes) -> None:
    """One input: map it and check what comes out."""
    fdp = atheris.FuzzedDataProvider(data)
    prefix = TOPIC_PREFIXES[fdp.ConsumeIntInRange(0, len(TOPIC_PREFIXES) - 1)]
    topic = prefix or fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 80))
    received_at = fdp.ConsumeFloatInRange(0.0, 5e9) if fdp.ConsumeBool() else 1.7e9
    payload = fdp.ConsumeBytes(fdp.remaining_bytes())
    try:
        readings = MAPPER.map(topic, payload, received_at)
        traced = MAPPER.explain(topic, payload, received_at)
    except MappingError as exc:
        if exc.reason not in REASONS or len(exc.detail) > 400:
            raise AssertionError(f"unexpected rejection {exc.reason!r}: {exc.detail!r}") from exc
        return
    if not readings:
        raise AssertionError("no readings and no rejection")
    if [r for r, _ in traced] != readings or any(set(r.data) != set(s) for r, s in traced):
        raise AssertionError("explain() disagrees with map()")
    for reading in readings:
        if not reading.data or not reading.device_type.isdigit():
            raise AssertionError(f"bad reading {reading!r}")
        if len(reading.record_time) != 19:
            raise AssertionError(f"bad recordTime {reading.record_time!r}")
        for name, value in reading.data.items():
            name.encode()
            if not Decimal(value).is_finite():
                raise AssertionError(f"bad value {name}={value!r}")
        reading.data_json.decode()


def main() -> None:
    """Run libFuzzer over :func:`check` with the command line's options."""
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
