"""The Node-RED anchor of the benchmark: the generated flow, and its JavaScript run with ``node``.

The signing code of the flow's **sign** node must produce what ``bridge/push/signing.py``
produces and what the vendor SDK captured; the tests run it with the ``node`` on PATH (Node.js
is installed in CI; without it these tests fail, they do not skip).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from bench.nodered import ENTRY_JS, SIGN_JS, flow, settings_js
from bridge.push.signing import (
    PUSH_PATH,
    Credentials,
    canonical_request,
    parse_authorization,
    push_headers,
    signature,
    string_to_sign,
)
from tests.support import load_push_vector

_RUNNER = r"""
const crypto = require("crypto");
const input = JSON.parse(require("fs").readFileSync(0, "utf8"));
const signPush = new Function(input.sign_js + "\nreturn signPush;")();
const out = {signed: [], nodes: []};
for (const c of input.sign) out.signed.push(signPush(crypto, c.keyId, c.secret, c.headers, c.body));
for (const n of input.nodes) {
    const env = {get: (name) => input.env[name]};
    const flowContext = {get: () => undefined, set: () => undefined};
    const run = new Function("msg", "env", "crypto", "flow", "node", n.func);
    out.nodes.push(run(n.msg, env, crypto, flowContext, {}));
}
process.stdout.write(JSON.stringify(out));
"""

_FLOW = flow(mqtt_port=18830, cloud_url="http://127.0.0.1:18080")
_BY_ID = {node["id"]: node for node in _FLOW}


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("these tests need Node.js: `node` is not on PATH (install Node.js 18+)")
    return node


def _run_js(payload: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run(
        [_node(), "-e", _RUNNER],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _chain(start: str) -> list[str]:
    types = []
    node_id: str | None = start
    while node_id is not None:
        node = _BY_ID[node_id]
        types.append(node["type"])
        wires = node.get("wires") or [[]]
        node_id = wires[0][0] if wires[0] else None
    return types


def test_flow_is_json_with_unique_ids_and_wires_to_existing_nodes() -> None:
    """Test that the flow survives JSON, every id is unique and every wire has a target."""
    assert json.loads(json.dumps(_FLOW)) == _FLOW
    ids = [node["id"] for node in _FLOW]
    assert len(ids) == len(set(ids))
    for node in _FLOW:
        for output in node.get("wires", []):
            for target in output:
                assert target in _BY_ID, f"{node['id']} wires to missing {target}"
        if "z" in node:
            assert _BY_ID[node["z"]]["type"] == "tab"


def test_flow_is_the_plant_engineers_chain() -> None:
    """Test mqtt in -> json -> function -> join -> function -> http request -> check."""
    assert _chain("mqtt-in") == [
        "mqtt in",
        "json",
        "function",
        "join",
        "function",
        "http request",
        "function",
    ]
    assert _BY_ID["check"]["wires"][1] == ["retry-delay"]
    assert _BY_ID["retry-delay"]["wires"] == [["sign"]]


def test_flow_keeps_a_persistent_qos1_session_and_joins_500_or_1s() -> None:
    """Test the settings the scenarios depend on."""
    broker = _BY_ID["bench-broker"]
    assert broker["cleansession"] is False
    assert broker["clientid"] == "bench-nodered"
    assert broker["protocolVersion"] == "5"
    assert int(broker["sessionExpiry"]) > 0
    assert broker["autoUnsubscribe"] is False
    assert broker["port"] == "18830"
    assert _BY_ID["mqtt-in"]["qos"] == "1"
    join = _BY_ID["join"]
    assert (join["mode"], join["build"], join["count"], join["timeout"]) == (
        "custom",
        "array",
        "500",
        "1",
    )
    assert _BY_ID["push"]["url"] == "http://127.0.0.1:18080" + PUSH_PATH


def test_settings_js_names_the_flow_file(tmp_path: Path) -> None:
    """Test that settings.js is a CommonJS module with the flow file and a loopback port."""
    text = settings_js(port=1880, flow_file=tmp_path / "flows.json", user_dir=tmp_path)
    assert text.startswith("module.exports = ")
    settings = json.loads(text.removeprefix("module.exports = ").rstrip().rstrip(";"))
    assert settings["flowFile"] == str(tmp_path / "flows.json")
    assert settings["uiHost"] == "127.0.0.1"
    assert settings["uiPort"] == 1880


def test_sign_js_reproduces_the_vendor_capture_and_the_bridge() -> None:
    """Test that SIGN_JS signs as the SDK and as bridge/push/signing.py do, byte for byte.

    A captured SDK request is signed as the SDK did, a bridge request as the bridge does.
    """
    vector = load_push_vector("push_v3_ak")
    captured = dict(vector["headers"])
    captured_authorization = captured.pop("authorization")
    body = (
        b'{"deviceType":"1","devices":[{"deviceId":"m-1",'
        b'"recordTime":"2026-12-07 10:00:00","data":{"P":"1.50"}}]}'
    )
    bridge = push_headers(
        host="127.0.0.1:18080",
        body=body,
        credentials=Credentials("testid", "testsecret"),
        user_agent="energy-bridge/test",
        now=datetime(2026, 12, 7, 2, 0, 0, tzinfo=UTC),
        nonce="0123456789abcdef",
    )
    unsigned = {k: v for k, v in bridge.items() if k != "authorization"}
    result = _run_js(
        {
            "sign_js": SIGN_JS,
            "sign": [
                {
                    "keyId": "testid",
                    "secret": "testsecret",
                    "headers": captured,
                    "body": vector["body_text"],
                },
                {
                    "keyId": "testid",
                    "secret": "testsecret",
                    "headers": unsigned,
                    "body": body.decode(),
                },
                {"keyId": "testid", "secret": "wrong", "headers": unsigned, "body": body.decode()},
            ],
            "nodes": [],
            "env": {},
        }
    )
    from_vector, from_bridge, wrong_secret = result["signed"]
    assert from_vector["authorization"] == captured_authorization
    assert from_bridge["authorization"] == bridge["authorization"]
    assert from_bridge["x-acs-content-sha256"] == bridge["x-acs-content-sha256"]
    assert wrong_secret["authorization"] != bridge["authorization"]


def test_flow_functions_build_entries_and_a_request_the_stub_accepts() -> None:
    """Test that the flow's function code turns readings into entries and a batch a signed body.

    The signature verifies the way the cloud stub verifies it.
    """
    reading = {"ts": 1796601600, "Ua": 220.5, "PF": 0.85, "seq": 7}
    entry_msg = {"topic": "meters/1/meter-0007/telemetry", "payload": reading}
    result = _run_js(
        {
            "sign_js": SIGN_JS,
            "sign": [],
            "nodes": [
                {"func": ENTRY_JS, "msg": entry_msg},
                {"func": _BY_ID["sign"]["func"], "msg": {"payload": [{"deviceId": "x"}]}},
            ],
            "env": {
                "ALIBABA_CLOUD_ACCESS_KEY_ID": "testid",
                "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "testsecret",
            },
        }
    )
    entry, request = result["nodes"]
    # 1796601600 is 2026-12-07 00:00:00 UTC, 08:00:00 in Asia/Shanghai.
    assert entry["payload"] == {
        "deviceId": "meter-0007",
        "recordTime": "2026-12-07 08:00:00",
        "data": {"Ua": "220.5", "PF": "0.85", "seq": "7"},
    }
    body = request["payload"].encode()
    assert json.loads(body) == {"deviceType": "1", "devices": [{"deviceId": "x"}]}
    assert request["pushBody"] == request["payload"]
    headers = request["headers"]
    assert headers["host"] == "127.0.0.1:18080"
    key_id, names, claimed = parse_authorization(headers["authorization"])
    assert key_id == "testid"
    assert {"host", "x-acs-date", "x-acs-signature-nonce", "x-acs-content-sha256"} <= set(names)
    body_sha256 = hashlib.sha256(body).hexdigest()
    assert headers["x-acs-content-sha256"] == body_sha256
    canonical = canonical_request("POST", PUSH_PATH, {}, headers, names, body_sha256)
    assert signature("testsecret", string_to_sign(canonical)) == claimed


def test_combine_ratios_and_table_print_both_systems() -> None:
    """Test medians, totals, the bridge ÷ Node-RED ratios and the table rows."""
    from bench.against import combine, ratios, table  # noqa: PLC0415 - keeps the header short

    def run(rate: float, cpu: float, lost: int) -> dict[str, Any]:
        return {
            "readings_per_s": rate,
            "consumer_cpu_s_per_100k": cpu,
            "consumer_cpu_pct": 50.0,
            "machine_busy_pct": 90.0,
            "peak_rss_mb": 100.0 if cpu < 8 else 250.0,
            "latency_ms": {"p50": 10.0, "p99": 20.0, "max": 30.0},
            "lost": lost,
            "duplicated": 0,
        }

    red = combine([run(1000, 10, 0), run(3000, 10, 0), run(2000, 10, 0)])
    bridge = combine([run(3000, 5, 0), run(4000, 5, 1), run(5000, 5, 0)])
    assert red["readings_per_s"] == 2000
    assert red["runs_readings_per_s"] == [1000, 3000, 2000]
    assert bridge["lost"] == 1
    assert ratios(bridge, red) == {"readings_per_s": 2.0, "cpu_s_per_100k": 0.5, "peak_rss": 0.4}
    lines: list[dict[str, Any]] = [
        {
            "scenario": "live",
            "node_red": red,
            "bridge": bridge,
            "ratio_bridge_to_node_red": ratios(bridge, red),
            "bare_paho_readings_per_s": 9000,
        },
        {"scenario": "spool", "node_red": None, "bridge": bridge},
    ]
    text = table(lines)
    assert "| live | Node-RED | **2,000** (1,000 · 3,000 · 2,000) | 10.00 |" in text
    assert "2.00x · 0.50x · 0.40x" in text
    assert "| live | bare paho (counts only) | 9,000 |" in text
    assert "| spool | Node-RED | n/a (Node-RED has no spool) |" in text
