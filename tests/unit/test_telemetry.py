"""The bulk end-to-end latency histogram exposes what a prometheus_client Histogram would."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bridge.telemetry import AgeHistogram

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600)


def _samples(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    text = generate_latest(registry).decode()
    return {
        (sample.name, sample.labels.get("le", "")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.name.endswith("_created")
    }


@given(st.lists(st.sampled_from([0.0, *BUCKETS]) | st.floats(0, 10_000), max_size=50))
def test_age_histogram_matches_prometheus_histogram_for_any_ages(ages: list[float]) -> None:
    """Test that bucket counts, count and sum equal a prometheus_client Histogram's.

    The Histogram is fed the same ages one at a time; an age equal to a bound counts in that
    bucket.
    """
    reference, bulk = CollectorRegistry(), CollectorRegistry()
    histogram = Histogram("age_seconds", "ages", buckets=BUCKETS, registry=reference)
    for age in ages:
        histogram.observe(age)
    ages_histogram = AgeHistogram("age_seconds", "ages", BUCKETS, bulk)
    now = 1_800_000_000.0
    half = len(ages) // 2
    ages_histogram.observe_ages([now - age for age in ages[:half]], now=now)
    ages_histogram.observe_ages([now - age for age in ages[half:]], now=now)

    expected, actual = _samples(reference), _samples(bulk)
    assert expected.keys() == actual.keys()
    for key, value in expected.items():
        if key[0].endswith("_sum"):
            assert abs(value - actual[key]) <= 1e-6 * max(1.0, abs(value))
        else:
            assert value == actual[key], key


def test_age_histogram_refuses_unsorted_buckets() -> None:
    """Buckets out of order are a programming error caught at construction."""
    with pytest.raises(ValueError, match="ascending"):
        AgeHistogram("x_seconds", "x", (1, 0.5), CollectorRegistry())
