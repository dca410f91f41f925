"""The batcher: partitions, merging, flush triggers, ordering, memory pressure, request bodies."""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.models import Batch, BatchKey, Reading, SpooledReading, build_body, serialize_entry
from bridge.push.batching import Batcher, split_entries

T0 = 1631097600  # 2021-09-08 18:40:00 in Asia/Shanghai; a multiple of 60
START = 1000.0  # the fake monotonic clock's first reading


class FakeClock:
    """A monotonic clock that only moves when told to."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        """The time the test last set or advanced to."""
        return self.now

    def advance(self, secs: float) -> None:
        """Move the clock ``secs`` seconds forward."""
        self.now += secs


def _record_time(ts: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts + 8 * 3600))


def _item(
    rid: int,
    device_id: str | None = "meter-0001",
    *,
    device_type: str = "1",
    ts: int = T0,
    data: dict[str, str] | None = None,
    received_at: float | None = None,
) -> SpooledReading:
    reading = Reading(
        device_type=device_type,
        device_id=device_id,
        record_ts=ts,
        record_time=_record_time(ts),
        data={"P": "6.62"} if data is None else data,
        received_at=START + rid if received_at is None else received_at,
    )
    return SpooledReading(rid, reading)


def _batcher(clock: FakeClock | None = None, **overrides: float) -> Batcher:
    options: dict[str, float] = {
        "max_devices": 100,
        "max_bytes": 512 * 1024,
        "window_secs": 60,
        "linger_secs": 1.0,
        "max_pending": 50_000,
    }
    options.update(overrides)
    return Batcher(
        max_devices=int(options["max_devices"]),
        max_bytes=int(options["max_bytes"]),
        window_secs=int(options["window_secs"]),
        linger_secs=options["linger_secs"],
        max_pending=int(options["max_pending"]),
        clock=clock or FakeClock(),
    )


def _add_all(batcher: Batcher, items: list[SpooledReading]) -> list[Batch]:
    return [batch for item in items for batch in batcher.add(item)]


def _devices(batch: Batch) -> list[dict[str, Any]]:
    devices: list[dict[str, Any]] = json.loads(batch.body)["devices"]
    return devices


def _device_ids(batch: Batch) -> list[object]:
    return [device.get("deviceId") for device in _devices(batch)]


# -- partitions -----------------------------------------------------------------------------


def test_batching_device_types_never_share_a_batch() -> None:
    """Test that readings of two device types in the same window go to separate batches."""
    batcher = _batcher()
    _add_all(batcher, [_item(1, "m1", device_type="1"), _item(2, "m2", device_type="2")])

    batches = batcher.flush()

    expected = [
        (BatchKey("1", T0 // 60), "1", [[1]]),
        (BatchKey("2", T0 // 60), "2", [[2]]),
    ]
    assert expected == [(b.key, json.loads(b.body)["deviceType"], b.entry_rids) for b in batches]


def test_batching_windows_never_share_a_batch() -> None:
    """Test that readings in two recordTime windows go to separate batches, one window shares."""
    batcher = _batcher(window_secs=60)
    _add_all(
        batcher,
        [
            _item(1, "m1", ts=T0),
            _item(2, "m2", ts=T0 + 59),
            _item(3, "m3", ts=T0 + 60),
        ],
    )

    batches = batcher.flush()

    expected = [(BatchKey("1", T0 // 60), [1, 2]), (BatchKey("1", T0 // 60 + 1), [3])]
    assert expected == [(b.key, b.rids) for b in batches]


def test_batching_window_follows_window_secs() -> None:
    """Test that the window number is record_ts // window_secs."""
    batcher = _batcher(window_secs=300)
    _add_all(batcher, [_item(1, "m1", ts=T0), _item(2, "m2", ts=T0 + 299)])

    (batch,) = batcher.flush()

    expected = (BatchKey("1", T0 // 300), [1, 2])
    assert expected == (batch.key, batch.rids)


# -- merging --------------------------------------------------------------------------------


def test_batching_merge_same_device_and_time_later_values_win() -> None:
    """Test that readings of one device at one recordTime merge, later values winning per point."""
    batcher = _batcher()
    _add_all(
        batcher,
        [
            _item(1, "m1", data={"P": "1.0", "Q": "2.0"}),
            _item(2, "m2", data={"P": "9.9"}),
            _item(3, "m1", data={"P": "3.0", "F": "50.00"}),
        ],
    )

    (batch,) = batcher.flush()

    expected_devices = [
        {
            "deviceId": "m1",
            "recordTime": "2021-09-08 18:40:00",
            "data": {"P": "3.0", "Q": "2.0", "F": "50.00"},
        },
        {"deviceId": "m2", "recordTime": "2021-09-08 18:40:00", "data": {"P": "9.9"}},
    ]
    assert expected_devices == _devices(batch)
    expected_rids = [[1, 3], [2]]
    assert expected_rids == batch.entry_rids


def test_batching_same_device_different_times_stay_separate() -> None:
    """Test that one device's readings at two recordTimes in one window are two entries."""
    batcher = _batcher()
    _add_all(batcher, [_item(1, "m1", ts=T0), _item(2, "m1", ts=T0 + 10)])

    (batch,) = batcher.flush()

    expected = [([1], "2021-09-08 18:40:00"), ([2], "2021-09-08 18:40:10")]
    actual = [
        (rids, device["recordTime"])
        for rids, device in zip(batch.entry_rids, _devices(batch), strict=True)
    ]
    assert expected == actual


def test_batching_merged_entry_carries_every_received_at() -> None:
    """Test that a batch keeps every merged reading's received_at, per entry."""
    batcher = _batcher()
    _add_all(
        batcher,
        [
            _item(1, "m1", received_at=50.0),
            _item(2, "m1", received_at=40.0),
            _item(3, "m2", received_at=60.0),
        ],
    )

    (batch,) = batcher.flush()

    expected = ([50.0, 40.0, 60.0], [[50.0, 40.0], [60.0]])
    assert expected == (batch.received_ats, batch.entry_received)


# -- flush triggers -------------------------------------------------------------------------


def test_batching_max_devices_closes_the_batch_from_add() -> None:
    """Test that the reading that makes max_devices entries returns the closed batch from add."""
    batcher = _batcher(max_devices=3)

    first = _add_all(batcher, [_item(1, "m1"), _item(2, "m2")])
    closed = batcher.add(_item(3, "m3"))

    expected: tuple[list[Batch], list[list[int]], int, int] = ([], [[1, 2, 3]], 0, 0)
    actual = (first, [b.rids for b in closed], batcher.open_batches, batcher.pending)
    assert expected == actual


def test_batching_merged_readings_do_not_count_towards_max_devices() -> None:
    """Test that max_devices counts entries, so merged readings of one device keep it open."""
    batcher = _batcher(max_devices=2)

    closed = _add_all(batcher, [_item(1, "m1"), _item(2, "m1"), _item(3, "m1")])
    open_batches = batcher.open_batches

    expected: tuple[list[Batch], int, list[list[list[int]]]] = ([], 1, [[[1, 2, 3]]])
    assert expected == (closed, open_batches, [b.entry_rids for b in batcher.flush()])


def test_batching_max_bytes_is_never_exceeded() -> None:
    """Test that many readings are cut into several batches, each body within max_bytes."""
    max_bytes = 1024
    batcher = _batcher(max_bytes=max_bytes)
    items = [_item(i, f"meter-{i:04d}", data={"P": "6.62", "Ua": "220.1"}) for i in range(1, 61)]

    batches = _add_all(batcher, items) + batcher.flush()

    assert len(batches) > 1
    assert all(len(b.body) <= max_bytes for b in batches)
    expected = list(range(1, 61))
    assert expected == [rid for b in batches for rid in b.rids]


def test_batching_max_bytes_closes_the_batch_from_add() -> None:
    """Test that reaching about max_bytes returns batches from add before any flush."""
    max_bytes = 1024
    batcher = _batcher(max_bytes=max_bytes)
    items = [_item(i, f"meter-{i:04d}", data={"P": "6.62" * 20}) for i in range(1, 31)]

    closed = _add_all(batcher, items)

    assert closed
    assert all(len(b.body) <= max_bytes for b in closed)


def test_batching_oversized_entry_goes_alone() -> None:
    """Test that an entry larger than max_bytes is sent alone and its neighbours are not."""
    max_bytes = 300
    batcher = _batcher(max_bytes=max_bytes)
    items = [
        _item(1, "small-1"),
        _item(2, "huge", data={"P": "1" * 600}),
        _item(3, "small-2"),
    ]

    batches = _add_all(batcher, items) + batcher.flush()

    expected = [([1], True), ([2], False), ([3], True)]
    assert expected == [(b.rids, len(b.body) <= max_bytes) for b in batches]


def test_batching_split_entries_packs_in_order_up_to_max_bytes() -> None:
    """Test that split_entries fills each body up to exactly max_bytes, keeping entry order."""
    key = BatchKey("1", 7)
    entries = [
        (serialize_entry(f"m{i}", "2021-09-08 18:40:00", b'{"P":"1"}'), [i], [float(i)])
        for i in range(1, 6)
    ]
    two = len(build_body("1", [entries[0][0], entries[1][0]]))

    batches = split_entries(key, entries, two)

    expected = [(key, [1, 2], two), (key, [3, 4], two), (key, [5], len(batches[2].body))]
    assert expected == [(b.key, b.rids, len(b.body)) for b in batches]
    assert len(batches[2].body) < two


def test_batching_split_entries_oversized_entry_alone() -> None:
    """Test that split_entries gives an entry larger than max_bytes a batch of its own."""
    key = BatchKey("1", 7)
    small = serialize_entry("m1", "2021-09-08 18:40:00", b'{"P":"1"}')
    big = serialize_entry("m2", "2021-09-08 18:40:00", orjson.dumps({"P": "1" * 200}))
    max_bytes = len(build_body("1", [small, small]))

    batches = split_entries(
        key, [(small, [1], [1.0]), (big, [2], [2.0]), (small, [3], [3.0])], max_bytes
    )

    expected = [[small], [big], [small]]
    assert expected == [b.entries for b in batches]


def test_batching_linger_due_before_and_after() -> None:
    """Test that due() returns nothing before linger_secs and the batch once it has passed."""
    clock = FakeClock()
    batcher = _batcher(clock, linger_secs=1.0)
    batcher.add(_item(1, "m1"))

    clock.now = START + 0.999
    early = batcher.due()
    clock.now = START + 1.0
    late = batcher.due()
    again = batcher.due()

    expected: tuple[list[Batch], list[list[int]], list[Batch], int] = ([], [[1]], [], 0)
    assert expected == (early, [b.rids for b in late], again, batcher.open_batches)


def test_batching_due_returns_every_expired_batch_and_keeps_the_rest() -> None:
    """Test that due() closes all batches past their linger time and only those."""
    clock = FakeClock()
    batcher = _batcher(clock, linger_secs=1.0)
    batcher.add(_item(1, "a", device_type="1"))
    batcher.add(_item(2, "b", device_type="2"))
    clock.advance(0.5)
    batcher.add(_item(3, "c", device_type="3"))
    clock.advance(0.5)

    due = batcher.due()

    expected = ([[1], [2]], 1, START + 0.5 + 1.0)
    assert expected == ([b.rids for b in due], batcher.open_batches, batcher.next_deadline())


def test_batching_linger_counts_from_the_first_reading() -> None:
    """Test that later readings in the same batch do not push its deadline back."""
    clock = FakeClock()
    batcher = _batcher(clock, linger_secs=1.0)
    batcher.add(_item(1, "m1"))
    clock.advance(0.9)
    batcher.add(_item(2, "m2"))
    clock.advance(0.1)

    due = batcher.due()

    expected = [[1, 2]]
    assert expected == [b.rids for b in due]


def test_batching_next_deadline_is_the_earliest_open_batch() -> None:
    """Test that next_deadline() is the first open batch's opening time plus linger_secs."""
    clock = FakeClock()
    batcher = _batcher(clock, linger_secs=2.0)
    empty = batcher.next_deadline()
    batcher.add(_item(1, "m1", device_type="1"))
    clock.advance(1.5)
    batcher.add(_item(2, "m2", device_type="2"))

    first = batcher.next_deadline()
    clock.advance(0.5)
    due = batcher.due()
    second = batcher.next_deadline()
    clock.advance(1.5)
    batcher.due()
    last = batcher.next_deadline()

    expected = (None, START + 2.0, [BatchKey("1", T0 // 60)], START + 1.5 + 2.0, None)
    assert expected == (empty, first, [b.key for b in due], second, last)


def test_batching_flush_returns_everything() -> None:
    """Test that flush() closes and returns every open batch, then there is nothing left."""
    batcher = _batcher()
    _add_all(
        batcher,
        [
            _item(1, "m1", device_type="1"),
            _item(2, "m2", device_type="2"),
            _item(3, "m3", device_type="1", ts=T0 + 60),
            _item(4, "m4", device_type="1"),
        ],
    )

    batches = batcher.flush()

    expected: tuple[list[list[int]], int, int, float | None, list[Batch]]
    expected = ([[1, 4], [2], [3]], 0, 0, None, [])
    actual = (
        [b.rids for b in batches],
        batcher.open_batches,
        batcher.pending,
        batcher.next_deadline(),
        batcher.flush(),
    )
    assert expected == actual


# -- ordering -------------------------------------------------------------------------------


def test_batching_entries_keep_arrival_order() -> None:
    """Test that entries are in arrival order, a merged entry staying where it first arrived."""
    batcher = _batcher()
    _add_all(
        batcher,
        [_item(1, "c"), _item(2, "a"), _item(3, "b"), _item(4, "a"), _item(5, "d")],
    )

    (batch,) = batcher.flush()

    expected = (["c", "a", "b", "d"], [[1], [2, 4], [3], [5]])
    assert expected == (_device_ids(batch), batch.entry_rids)


def test_batching_flush_orders_batches_by_when_their_partition_opened() -> None:
    """Test that flush() returns batches in the order their current open batch was opened."""
    batcher = _batcher(max_devices=2)
    _add_all(
        batcher,
        [
            _item(1, "a", device_type="2"),
            _item(2, "b", device_type="1"),
            _item(3, "c", device_type="1", ts=T0 - 60),
            _item(4, "d", device_type="2"),  # closes the type 2 batch (max_devices)
            _item(5, "e", device_type="2"),  # reopens type 2, now the newest partition
        ],
    )

    batches = batcher.flush()

    expected = [
        (BatchKey("1", T0 // 60), [2]),
        (BatchKey("1", T0 // 60 - 1), [3]),
        (BatchKey("2", T0 // 60), [5]),
    ]
    assert expected == [(b.key, b.rids) for b in batches]


# -- memory pressure ------------------------------------------------------------------------


def test_batching_memory_pressure_closes_the_oldest_batches_early() -> None:
    """Test that passing max_pending closes the oldest batches until half of it is pending."""
    clock = FakeClock()
    batcher = _batcher(clock, max_pending=4)
    closed: list[Batch] = []
    for item in [
        _item(1, "a", device_type="1"),
        _item(2, "b", device_type="2"),
        _item(3, "c", device_type="3"),
        _item(4, "d", device_type="3"),
        _item(5, "e", device_type="1"),
    ]:
        closed += batcher.add(item)
        clock.advance(0.1)

    expected = (
        [(BatchKey("1", T0 // 60), [1, 5]), (BatchKey("2", T0 // 60), [2])],
        2,
        1,
    )
    actual = ([(b.key, b.rids) for b in closed], batcher.pending, batcher.open_batches)
    assert expected == actual


def test_batching_no_memory_pressure_at_max_pending() -> None:
    """Test that exactly max_pending readings held in open batches closes nothing."""
    batcher = _batcher(max_pending=3)

    closed = _add_all(
        batcher, [_item(1, "a", device_type="1"), _item(2, "b", device_type="2"), _item(3, "c")]
    )

    expected: tuple[list[Batch], int] = ([], 3)
    assert expected == (closed, batcher.pending)


# -- the serialized body --------------------------------------------------------------------


@pytest.mark.parametrize("device_type", ["15", "16"])
def test_batching_types_15_and_16_omit_device_id(device_type: str) -> None:
    """Test that entries of types 15/16 carry no deviceId even when the reading has one."""
    batcher = _batcher()
    batcher.add(_item(1, "site-1", device_type=device_type))

    (batch,) = batcher.flush()

    expected = [{"recordTime": "2021-09-08 18:40:00", "data": {"P": "6.62"}}]
    assert expected == _devices(batch)
    assert b"deviceId" not in batch.body


@pytest.mark.parametrize("device_type", ["1", "12", "13", "17"])
def test_batching_other_types_keep_device_id(device_type: str) -> None:
    """Test that every other type, system_id types included, carries its deviceId."""
    batcher = _batcher()
    batcher.add(_item(1, "sys-1", device_type=device_type))

    (batch,) = batcher.flush()

    expected = ["sys-1"]
    assert expected == _device_ids(batch)


def test_batching_body_is_byte_identical_to_orjson() -> None:
    """Test that a batch body is exactly orjson.dumps of {deviceType, devices}."""
    batcher = _batcher()
    _add_all(
        batcher,
        [
            _item(1, "m1", data={"Ua": "220.1", "P": "6.62"}),
            _item(2, 'm\u00e9ter "2"', data={"Ep_imp": "123456.78"}, ts=T0 + 5),
        ],
    )

    (batch,) = batcher.flush()

    expected = orjson.dumps(
        {
            "deviceType": "1",
            "devices": [
                {
                    "deviceId": "m1",
                    "recordTime": "2021-09-08 18:40:00",
                    "data": {"Ua": "220.1", "P": "6.62"},
                },
                {
                    "deviceId": 'm\u00e9ter "2"',
                    "recordTime": "2021-09-08 18:40:05",
                    "data": {"Ep_imp": "123456.78"},
                },
            ],
        }
    )
    assert expected == batch.body
    expected_keys = ["deviceType", "devices"]
    assert expected_keys == list(json.loads(batch.body))


def test_batching_body_entries_are_the_serialized_entries() -> None:
    """Test that a batch's entries are the exact bytes joined into its body."""
    batcher = _batcher()
    _add_all(batcher, [_item(1, "m1"), _item(2, "m2")])

    (batch,) = batcher.flush()

    assert build_body("1", batch.entries) == batch.body
    assert [orjson.dumps(device) for device in _devices(batch)] == batch.entries


def test_batching_values_are_kept_as_exact_strings() -> None:
    """Test that values leave as the exact text they came in with, never reformatted."""
    data = {"F": "50.00", "Ep_imp": "123456.780", "P": "1e3", "Q": "-0", "Ua": "0.1000000000000001"}
    batcher = _batcher()
    batcher.add(_item(1, "m1", data=data))

    (batch,) = batcher.flush()

    assert [data] == [device["data"] for device in _devices(batch)]
    assert b'"F":"50.00"' in batch.body
    assert b'"Ep_imp":"123456.780"' in batch.body


def test_batching_build_body_with_no_entries() -> None:
    """Test that an empty body is still the exact {deviceType, devices} object."""
    expected = orjson.dumps({"deviceType": "1", "devices": []})
    assert expected == build_body("1", [])


def test_batching_serialize_entry_omits_device_id_for_none() -> None:
    """Test that serialize_entry writes deviceId, recordTime, data in order, deviceId optional."""
    with_id = serialize_entry("m1", "2021-09-08 18:40:00", b'{"P":"1"}')
    without = serialize_entry(None, "2021-09-08 18:40:00", b'{"P":"1"}')

    expected = (
        b'{"deviceId":"m1","recordTime":"2021-09-08 18:40:00","data":{"P":"1"}}',
        b'{"recordTime":"2021-09-08 18:40:00","data":{"P":"1"}}',
    )
    assert expected == (with_id, without)


# -- models ---------------------------------------------------------------------------------


def test_batching_batch_rids_and_size() -> None:
    """Test that Batch.rids flattens entry_rids in order and Batch.size counts entries."""
    batch = Batch.of(BatchKey("1", 1), [b"{}", b"{}"], [[3, 1], [2]], [[1.0, 2.0], [3.0]])

    expected = ([3, 1, 2], 2, [1.0, 2.0, 3.0])
    assert expected == (batch.rids, batch.size, batch.received_ats)


def test_batching_batch_slice_keeps_each_entry_and_its_times() -> None:
    """Test that a slice of a batch carries exactly its entries, row ids and arrival times.

    A slice of a batch carries exactly its entries, row ids and arrival times, and
    a body of just those entries (how a refused batch is split).
    """
    batcher = _batcher()
    _add_all(
        batcher,
        [
            _item(1, "m1", received_at=10.0),
            _item(2, "m2", received_at=20.0),
            _item(3, "m3", received_at=30.0),
        ],
    )
    (batch,) = batcher.flush()

    part = batch.slice(1, 3)

    expected = ([2, 3], [20.0, 30.0], build_body("1", batch.entries[1:]))
    assert expected == (part.rids, part.received_ats, part.body)


def test_batching_types_without_device_id_keep_their_sources_apart() -> None:
    """Test that type 15/16 readings from two sources at one recordTime never merge.

    Readings of types 15/16 from two sources at the same recordTime never merge
    into one entry (they go out in separate requests, each without a deviceId).
    """
    batcher = _batcher()
    _add_all(
        batcher,
        [
            _item(1, "site-a", device_type="15", data={"P": "1"}),
            _item(2, "site-b", device_type="15", data={"P": "2"}),
            _item(3, "site-a", device_type="15", data={"Q": "3"}),
        ],
    )

    batches = batcher.flush()

    expected = [[{"P": "1", "Q": "3"}], [{"P": "2"}]]
    assert expected == sorted(
        ([d["data"] for d in _devices(b)] for b in batches), key=lambda ds: ds[0]["P"]
    )
    assert all("deviceId" not in d for b in batches for d in _devices(b))


def test_batching_batch_key_is_a_hashable_value() -> None:
    """Test that equal BatchKeys are one dict key and a BatchKey cannot be changed."""
    keys = {BatchKey("1", 5): "a", BatchKey("1", 5): "b", BatchKey("2", 5): "c"}

    expected = {BatchKey("1", 5): "b", BatchKey("2", 5): "c"}
    assert expected == keys
    with pytest.raises(AttributeError):
        BatchKey("1", 5).window = 6  # type: ignore[misc]


# -- property -------------------------------------------------------------------------------

_readings = st.lists(
    st.tuples(
        st.sampled_from(["1", "2", "15"]),  # device type
        st.sampled_from(["m1", "m2", "m3", "m4", "m5"]),  # device id
        st.integers(min_value=0, max_value=180),  # seconds after T0
        st.dictionaries(
            st.sampled_from(["P", "Q", "Ua", "Ep_imp"]),
            st.sampled_from(["0", "6.62", "50.00", "-1.5", "123456.780", "1" * 40]),
            min_size=1,
        ),
        st.sampled_from([0.0, 0.0, 0.4, 2.0]),  # clock advance before the reading
        st.booleans(),  # call due() after the reading
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(
    readings=_readings,
    max_devices=st.integers(min_value=1, max_value=6),
    max_bytes=st.integers(min_value=150, max_value=1500),
    max_pending=st.integers(min_value=1, max_value=25),
)
def test_batching_property_every_row_in_exactly_one_entry(
    readings: list[tuple[str, str, int, dict[str, str], float, bool]],
    max_devices: int,
    max_bytes: int,
    max_pending: int,
) -> None:
    """Test that any reading sequence ends with each row in one entry of one valid batch."""
    clock = FakeClock()
    batcher = _batcher(clock, max_devices=max_devices, max_bytes=max_bytes, max_pending=max_pending)
    by_rid: dict[int, Reading] = {}
    batches: list[Batch] = []
    for rid, (device_type, device_id, offset, data, advance, tick) in enumerate(readings, 1):
        clock.advance(advance)
        item = _item(rid, device_id, device_type=device_type, ts=T0 + offset, data=data)
        by_rid[rid] = item.reading
        batches += batcher.add(item)
        if tick:
            batches += batcher.due()
    batches += batcher.flush()

    seen = Counter(rid for b in batches for group in b.entry_rids for rid in group)
    expected_counts = dict.fromkeys(by_rid, 1)
    assert expected_counts == dict(seen)
    assert not batcher.pending
    expected_keys = ["deviceType", "devices"]
    for batch in batches:
        body = json.loads(batch.body)
        assert expected_keys == list(body)
        assert batch.key.device_type == body["deviceType"]
        assert orjson.dumps(body) == batch.body
        assert len(batch.entry_rids) == len(body["devices"]) == batch.size
        assert 1 <= batch.size <= max_devices
        assert batch.size == 1 or len(batch.body) <= max_bytes
        pairs = [(d.get("deviceId"), d["recordTime"]) for d in body["devices"]]
        assert len(set(pairs)) == len(pairs)
        for group, device in zip(batch.entry_rids, body["devices"], strict=True):
            for rid in group:
                reading = by_rid[rid]
                source = reading.device_id if reading.device_type in {"15", "16"} else None
                assert batch.key == BatchKey(reading.device_type, reading.record_ts // 60, source)
                assert reading.record_time == device["recordTime"]
            # later values win: each point holds the value of the last reading that had it
            expected: dict[str, str] = {}
            for rid in group:
                expected.update(by_rid[rid].data)
            assert expected == device["data"]


def test_batching_backlog_read_back_from_the_spool_is_due_at_once() -> None:
    """Test that linger counts from a reading's arrival, so an old backlog does not wait."""
    clock = FakeClock()
    batcher = _batcher(clock, linger_secs=60.0)
    batcher.add(_item(1, "m1", received_at=START - 3600))  # received an hour ago

    expected = [[1]]
    assert expected == [b.rids for b in batcher.due()]


def _held(rid: int, data: dict[str, str], hold_until: float) -> SpooledReading:
    item = _item(rid, data=data, received_at=START)
    item.reading.hold_until = hold_until
    return item


def test_batching_held_readings_wait_for_their_window_and_merge_once() -> None:
    """Test that readings with hold_until stay open until that time plus linger, then merge.

    The partial messages of one device and aligned time merge into one entry sent once.
    """
    clock = FakeClock()
    batcher = _batcher(clock, linger_secs=1.0)
    batcher.add(_held(1, {"Ua": "230.1"}, START + 60))
    clock.advance(30)
    batcher.add(_held(2, {"Ia": "1.5"}, START + 60))
    early = batcher.due()
    deadline = batcher.next_deadline()
    clock.advance(31)
    (batch,) = batcher.due()

    assert ([], START + 61) == (early, deadline)
    assert [[1, 2]] == batch.entry_rids
    assert {"Ua": "230.1", "Ia": "1.5"} == json.loads(batch.entries[0])["data"]


def test_batching_held_readings_are_closed_on_flush() -> None:
    """Test that a shutdown flush closes held batches too (their rows are in the spool)."""
    clock = FakeClock()
    batcher = _batcher(clock)
    batcher.add(_held(1, {"Ua": "1"}, START + 3600))

    assert [[1]] == [b.rids for b in batcher.flush()]


def test_batching_held_batch_is_not_closed_when_full_and_split_at_its_end() -> None:
    """Test that a held batch past max_devices stays open and is split when its window closes.

    Closing it early would send its entries half merged; at the window's end it is split into
    requests of max_devices entries.
    """
    clock = FakeClock()
    batcher = _batcher(clock, max_devices=2, linger_secs=1.0)
    early: list[Batch] = []
    for rid, device in enumerate(["a", "b", "c", "a", "b", "c"], start=1):
        item = _item(rid, device, data={f"p{rid}": "1"}, received_at=START)
        item.reading.hold_until = START + 60
        early += batcher.add(item)
    clock.advance(61)
    batches = batcher.due()

    assert [] == early
    assert [[[1, 4], [2, 5]], [[3, 6]]] == [b.entry_rids for b in batches]
    assert {"p1": "1", "p4": "1"} == json.loads(batches[0].entries[0])["data"]


def test_batching_held_merges_do_not_count_as_pending() -> None:
    """Test that readings merged into a held entry do not count towards max_pending.

    So the partial messages of a window are not closed early under memory pressure.
    """
    batcher = _batcher(max_pending=2)
    closed: list[Batch] = []
    for rid in range(1, 6):
        item = _item(rid, "a", data={f"p{rid}": "1"}, received_at=START)
        item.reading.hold_until = START + 60
        closed += batcher.add(item)

    assert ([], 1) == (closed, batcher.pending)
    assert [[1, 2, 3, 4, 5]] == [b.rids for b in batcher.flush()]
    assert 0 == batcher.pending
