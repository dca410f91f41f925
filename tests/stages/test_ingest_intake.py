"""Ingest with a Sparkplug B route and a device registry, a fake MQTT source, a real spool.

Alias changes are committed with their messages before the ack, also when the message itself is
rejected; skipped messages are acked and counted; the registry applies to every route.
"""

from __future__ import annotations

import asyncio
import time

from bridge.config import PayloadFormat, Route
from bridge.intake.ingest import Ingest
from bridge.intake.mapping import Mapper
from bridge.intake.registry import Registry, RegistryEntry
from bridge.intake.sparkplug_route import SparkplugIntake
from bridge.models import Batch
from bridge.push.batching import Batcher
from bridge.push.feeder import Feeder
from bridge.spool.store import SpoolStore
from bridge.spool.thread import SpoolThread
from bridge.telemetry import Metrics
from tests.stages.conftest import eventually, reopened, running, sample
from tests.stages.test_ingest_stage import FakeSource
from tests.support.sparkplug import DOUBLE, FLOAT, INT64, spb

T_MS = 1_700_000_000_000


async def test_ingest_commits_sparkplug_aliases_with_their_messages_and_applies_the_registry(
    spool: SpoolThread, store: SpoolStore, metrics: Metrics
) -> None:
    """Test that the commit precedes the ack and holds readings, aliases and no skipped message.

    The commit holds the node's readings under the registry's id, the aliases of a DBIRTH whose
    readings the registry rejected (unknown_device), and no trace of a skipped NDEATH but its
    ack and its count.
    """
    routes = [Route(), Route(format=PayloadFormat.SPARKPLUG_B, device_type="1")]
    source = FakeSource()
    queue: asyncio.Queue[Batch] = asyncio.Queue()
    batcher = Batcher(
        max_devices=10, max_bytes=1 << 20, window_secs=60, linger_secs=1, clock=time.time
    )
    ingest = Ingest(
        mapper=Mapper(routes, "Asia/Shanghai", max_payload_bytes=1024),
        spool=spool,
        feeder=Feeder(spool=spool, batcher=batcher, queue=queue),
        source=source,
        metrics=metrics,
        commit_max=100,
        high_water=100,
        sparkplug=SparkplugIntake(routes, "Asia/Shanghai"),
        registry=Registry({"edge-1": RegistryEntry("EE-1")}, reject_unknown=True),
    )
    async with running(ingest):
        source.publish(
            "spBv1.0/g/NBIRTH/edge-1",
            spb({"name": "T", "alias": 1, "datatype": DOUBLE, "double_value": 1.5}, timestamp=T_MS),
            1,
        )
        source.publish(
            "spBv1.0/g/DBIRTH/edge-1/meter-1",
            spb({"name": "V", "alias": 2, "datatype": FLOAT, "float_value": 2.5}, timestamp=T_MS),
            2,
        )
        source.publish(
            "spBv1.0/g/NDEATH/edge-1", spb({"name": "bdSeq", "datatype": INT64, "long_value": 0}), 3
        )
        source.publish("meters/1/m-1/telemetry", b'{"ts": 1700000000, "Ua": 1}', 4)
        await asyncio.sleep(0.2)
        before_commit = list(source.acked)  # the spool stage is not running yet
        async with running(spool):
            await eventually(lambda: len(source.acked) == 4, message="4 acks")

    with reopened(store.path) as stored:
        assert (
            [],
            [("EE-1", {"T": "1.5"})],
            ["unknown_device", "unknown_device"],
            [("g/edge-1", 1, "T", DOUBLE), ("g/edge-1", 2, "V", FLOAT)],
        ) == (
            before_commit,
            [(r.reading.device_id, r.reading.data) for r in stored.fetch_after(0, 10)],
            [d.reason for d in stored.dead_letters()],
            stored.sparkplug_aliases(),
        )
    assert 1.0 == sample(metrics, "bridge_messages_skipped_total", reason="sparkplug_ndeath")
