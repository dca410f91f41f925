"""End-to-end benchmark of energy-bridge: ``python -m bench`` (not part of the test run).

It starts its own Mosquitto on a free loopback port, the cloud stub and the bridge as separate
processes, publishes numbered readings with a raw-socket MQTT publisher (:mod:`bench.loadgen`,
far faster than the bridge) and prints one JSON line per scenario:

* ``live``: the bridge runs; readings are published as fast as possible;
* ``backlog``: the readings wait in the broker's queue for the bridge's persistent session
  when the bridge starts; the drain is timed;
* ``spool``: the spool already holds ``--spool-readings`` readings and the cloud is up;
* ``fixed_rate``: published at half the live maximum; the latency percentiles are the point;
* ``slow_cloud``: like ``live``, the cloud answering after 200 ms;
* ``replicas`` (only when named: ``--scenarios replicas --replicas 1,2,3``): like ``live`` with
  N bridges in one share group (``mqtt.share_group``), one line per N with each one's share.

The same load also goes through a bare paho subscriber that only counts (:mod:`bench.bare`),
in the same repetition, and ``ratio_bridge_to_bare`` relates the two. ``--against node-red``
runs the same scenarios (plus ``throttled``) through a Node-RED 4 flow as well, interleaved with
the bridge, and prints both and the ratio (:mod:`bench.against`, :mod:`bench.nodered`).
Results and how to read them: ``docs/performance.md``.
"""
