"""Node-RED as the benchmark's anchor: the flow a plant engineer would write, run for real.

The flow (written as JSON by :func:`flow` at run time, no editor involved)::

    mqtt in (QoS 1, persistent session) -> json -> function "to entry"
        -> join (500 messages or 1 s) -> function "sign" -> http request -> function "check"
                                              ^                                   | not 200/success
                                              +------------ delay 1 s <-----------+

* **mqtt in**: MQTT v5 (as the bridge), fixed client id, clean start off and a session expiry
  of an hour, so the broker keeps the session and queues readings while Node-RED is down (the
  ``backlog`` scenario); subscription ``meters/+/+/telemetry`` at QoS 1. Node-RED acknowledges
  each PUBLISH when it arrives (mqtt.js), not after delivery: it has no spool.
* **to entry**: the Energy Expert entry ``{deviceId, recordTime, data}``: ``deviceId`` from the
  topic, ``recordTime`` = ``ts`` in UTC+8 (Asia/Shanghai, the bridge's default timezone), every
  other point as ``String(value)``. JavaScript numbers do not keep the text they arrived with, so
  ``5.10`` becomes ``"5.1"`` (the bridge keeps ``"5.10"``); nothing else differs.
* **sign**: the ``PushDeviceData`` body ``{"deviceType": "1", "devices": [...]}`` and the
  ACS3-HMAC-SHA256 signature with node's ``crypto`` (:data:`SIGN_JS`, checked against
  ``bridge/push/signing.py`` and a vendor-SDK capture in the tests): the stand-in cloud verifies
  every request exactly as the cloud does. A fresh date and nonce on every attempt.
* **http request**: POST to the same cloud stub as the bridge, keep-alive on (the faster
  setting), no concurrency bound (Node-RED sends each message at once).
* **check**: 200 with ``"data": "success"`` is done; anything else (throttling, errors) waits
  1 s in a delay node and goes back to **sign** (re-signed). Without it, the 10 % throttling
  scenario would lose 10 % of the readings.

Next to it: a status node on **mqtt in** records when the MQTT connection came up, and
``GET /bench/ready`` answers ``{"connectedAt": epoch seconds or 0}``: the moment a backlog
drain is timed from (the bridge's ``/readyz``).

:func:`ensure_installed` installs ``node-red@4`` with npm into
``~/.cache/energy-bridge/node-red`` (``$XDG_CACHE_HOME`` respected, ``ENERGY_BRIDGE_NODE_RED_DIR``
overrides) when it is not there yet.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

__all__ = [
    "CLIENT_ID",
    "ENTRY_JS",
    "SIGN_JS",
    "NodeRed",
    "cache_dir",
    "ensure_installed",
    "flow",
    "installed_version",
    "settings_js",
]

CLIENT_ID = "bench-nodered"
PACKAGE = "node-red@4"
_TOPIC = "meters/+/+/telemetry"

SIGN_JS = r"""
function signPush(crypto, keyId, secret, headers, body) {
    // ACS3-HMAC-SHA256 (signature V3), as bridge/push/signing.py: every header is signed
    // except authorization, content-length, accept-encoding and connection.
    const out = {};
    for (const name of Object.keys(headers)) out[name.toLowerCase()] = String(headers[name]);
    delete out["authorization"];
    const bodySha = crypto.createHash("sha256").update(body, "utf8").digest("hex");
    out["x-acs-content-sha256"] = bodySha;
    const unsigned = ["authorization", "content-length", "accept-encoding", "connection"];
    const names = Object.keys(out).filter((n) => !unsigned.includes(n)).sort();
    const canonical = "POST\n/api/v1/data/increment/push\n\n"
        + names.map((n) => n + ":" + out[n].trim() + "\n").join("")
        + "\n" + names.join(";") + "\n" + bodySha;
    const stringToSign = "ACS3-HMAC-SHA256\n"
        + crypto.createHash("sha256").update(canonical, "utf8").digest("hex");
    const sig = crypto.createHmac("sha256", secret).update(stringToSign, "utf8").digest("hex");
    out["authorization"] = "ACS3-HMAC-SHA256 Credential=" + keyId
        + ",SignedHeaders=" + names.join(";") + ",Signature=" + sig;
    return out;
}
"""
"""The signing function of the flow's **sign** node (a plain function of node's ``crypto``)."""

ENTRY_JS = r"""
const p = msg.payload;
const data = {};
for (const key in p) {
    if (key !== "ts") data[key] = String(p[key]);
}
// recordTime: local plant time in Asia/Shanghai (UTC+8, no daylight saving), as the bridge.
const recordTime = new Date((p.ts + 8 * 3600) * 1000).toISOString().slice(0, 19).replace("T", " ");
msg.payload = {deviceId: msg.topic.split("/")[2], recordTime: recordTime, data: data};
return msg;
"""
"""The **to entry** function: one reading -> one Energy Expert ``devices[]`` entry."""

_SIGN_BODY_JS = r"""
let body = msg.pushBody;
if (body === undefined) {
    body = JSON.stringify({deviceType: "1", devices: msg.payload});
    msg.pushBody = body;
}
const date = new Date().toISOString().slice(0, 19) + "Z";
msg.headers = signPush(crypto, env.get("ALIBABA_CLOUD_ACCESS_KEY_ID"),
    env.get("ALIBABA_CLOUD_ACCESS_KEY_SECRET"), {
        "host": CLOUD_HOST,
        "accept": "application/json",
        "content-type": "application/json; charset=utf-8",
        "user-agent": "node-red-flow",
        "x-acs-action": "PushDeviceData",
        "x-acs-version": "2022-09-23",
        "x-acs-date": date,
        "x-acs-signature-nonce": crypto.randomBytes(16).toString("hex"),
    }, body);
msg.method = "POST";
msg.payload = body;
return msg;
"""

_CHECK_JS = r"""
if (msg.statusCode === 200 && msg.payload && msg.payload.data === "success") {
    return [msg, null];
}
flow.set("retries", (flow.get("retries") || 0) + 1);
return [null, msg];
"""

_STATUS_JS = r"""
if (msg.status && String(msg.status.text || "").endsWith("connected")
        && !String(msg.status.text).endsWith("disconnected")) {
    flow.set("connectedAt", Date.now() / 1000);
}
return null;
"""

_READY_JS = r"""
msg.payload = {connectedAt: flow.get("connectedAt") || 0, retries: flow.get("retries") || 0};
return msg;
"""


def cache_dir() -> Path:
    """Where the bench keeps its own Node-RED installation."""
    override = os.environ.get("ENERGY_BRIDGE_NODE_RED_DIR")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "energy-bridge" / "node-red"


def _red_js(root: Path) -> Path:
    return root / "node_modules" / "node-red" / "red.js"


def installed_version(root: Path | None = None) -> str | None:
    """The Node-RED version installed in the cache, ``None`` when it is not there."""
    package = (root or cache_dir()) / "node_modules" / "node-red" / "package.json"
    try:
        return str(json.loads(package.read_text(encoding="utf-8"))["version"])
    except (OSError, ValueError, KeyError):
        return None


def node_version() -> str | None:
    """``node --version`` without the ``v``, ``None`` when Node.js is not on PATH."""
    node = shutil.which("node")
    if node is None:
        return None
    done = subprocess.run([node, "--version"], capture_output=True, text=True, check=False)
    return done.stdout.strip().lstrip("v") or None


def ensure_installed(root: Path | None = None) -> Path:
    """Install ``node-red@4`` with npm into ``root`` (the cache) unless it is there already.

    Returns:
        The path of ``red.js``.

    Raises:
        RuntimeError: Node.js or npm is missing, or npm failed (its output is in the message).
    """
    root = root or cache_dir()
    red = _red_js(root)
    if red.exists():
        return red
    npm = shutil.which("npm")
    if shutil.which("node") is None or npm is None:
        raise RuntimeError(
            "--against node-red needs Node.js (18 or later) and npm on PATH to install Node-RED"
        )
    root.mkdir(parents=True, exist_ok=True)
    print(f"bench: installing {PACKAGE} into {root} (once)", file=sys.stderr, flush=True)
    done = subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--omit=dev", "--prefix", str(root), PACKAGE],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if done.returncode != 0 or not red.exists():
        raise RuntimeError(f"npm install {PACKAGE} failed:\n{done.stdout}\n{done.stderr}")
    return red


def flow(*, mqtt_port: int, cloud_url: str, client_id: str = CLIENT_ID) -> list[dict[str, Any]]:
    """The flow as Node-RED's flow file holds it (see the module docstring).

    Args:
        mqtt_port: the broker's port on 127.0.0.1.
        cloud_url: the cloud stub's base URL (``http://127.0.0.1:PORT``).
        client_id: the MQTT client id of the persistent session.
    """
    host = urlsplit(cloud_url).netloc
    sign_code = f"const CLOUD_HOST = {json.dumps(host)};\n{SIGN_JS}\n{_SIGN_BODY_JS}"
    crypto_lib = [{"var": "crypto", "module": "crypto"}]
    tab = "bench-tab"

    def node(node_id: str, kind: str, x: int, y: int, **props: Any) -> dict[str, Any]:
        return {"id": node_id, "type": kind, "z": tab, "x": x, "y": y, **props}

    def function(node_id: str, name: str, code: str, wires: list[list[str]], **props: Any) -> Any:
        return node(
            node_id,
            "function",
            0,
            0,
            name=name,
            func=code,
            outputs=len(wires),
            timeout=0,
            noerr=0,
            initialize="",
            finalize="",
            libs=props.pop("libs", []),
            wires=wires,
            **props,
        )

    return [
        {"id": tab, "type": "tab", "label": "energy-bridge bench", "disabled": False, "info": ""},
        {
            "id": "bench-broker",
            "type": "mqtt-broker",
            "name": "bench broker",
            "broker": "127.0.0.1",
            "port": str(mqtt_port),
            "clientid": client_id,
            "autoConnect": True,
            "usetls": False,
            "protocolVersion": "5",
            "keepalive": "60",
            "cleansession": False,
            "sessionExpiry": "3600",
            "autoUnsubscribe": False,
            "birthTopic": "",
            "closeTopic": "",
            "willTopic": "",
        },
        node(
            "mqtt-in",
            "mqtt in",
            100,
            100,
            name="meters",
            topic=_TOPIC,
            qos="1",
            datatype="utf8",
            broker="bench-broker",
            nl=False,
            rap=True,
            rh=0,
            inputs=0,
            wires=[["json"]],
        ),
        node(
            "json",
            "json",
            250,
            100,
            name="",
            property="payload",
            action="obj",
            pretty=False,
            wires=[["to-entry"]],
        ),
        function("to-entry", "to entry", ENTRY_JS, [["join"]]),
        node(
            "join",
            "join",
            550,
            100,
            name="500 or 1 s",
            mode="custom",
            build="array",
            property="payload",
            propertyType="msg",
            key="topic",
            joiner="\\n",
            joinerType="str",
            useparts=False,
            accumulate=False,
            timeout="1",
            count="500",
            reduceRight=False,
            reduceExp="",
            reduceInit="",
            reduceInitType="",
            reduceFixup="",
            wires=[["sign"]],
        ),
        function("sign", "sign", sign_code, [["push"]], libs=crypto_lib),
        node(
            "push",
            "http request",
            850,
            100,
            name="PushDeviceData",
            method="use",
            ret="obj",
            paytoqs="ignore",
            url=f"{cloud_url}/api/v1/data/increment/push",
            tls="",
            persist=True,
            proxy="",
            insecureHTTPParser=False,
            authType="",
            senderr=False,
            headers=[],
            wires=[["check"]],
        ),
        function("check", "check", _CHECK_JS, [[], ["retry-delay"]]),
        node(
            "retry-delay",
            "delay",
            1000,
            200,
            name="retry in 1 s",
            pauseType="delay",
            timeout="1",
            timeoutUnits="seconds",
            rate="1",
            nbRateUnits="1",
            rateUnits="second",
            randomFirst="1",
            randomLast="5",
            randomUnits="seconds",
            drop=False,
            allowrate=False,
            outputs=1,
            wires=[["sign"]],
        ),
        node("status", "status", 100, 300, name="", scope=["mqtt-in"], wires=[["connected"]]),
        function("connected", "connected at", _STATUS_JS, [[]]),
        node(
            "ready-in",
            "http in",
            100,
            400,
            name="",
            url="/bench/ready",
            method="get",
            upload=False,
            swaggerDoc="",
            wires=[["ready"]],
        ),
        function("ready", "ready", _READY_JS, [["ready-out"]]),
        node("ready-out", "http response", 500, 400, name="", statusCode="", headers={}, wires=[]),
    ]


def settings_js(*, port: int, flow_file: Path, user_dir: Path) -> str:
    """A ``settings.js`` for one run: loopback only, quiet logs, the flow file given."""
    settings = {
        "uiHost": "127.0.0.1",
        "uiPort": port,
        "flowFile": str(flow_file),
        "userDir": str(user_dir),
        "flowFilePretty": True,
        "credentialSecret": False,
        "functionExternalModules": True,
        "logging": {"console": {"level": "warn", "metrics": False, "audit": False}},
        "editorTheme": {"projects": {"enabled": False}, "tours": False},
        "telemetry": {"enabled": False},
        "diagnostics": {"enabled": False},
        "runtimeState": {"enabled": False},
    }
    return f"module.exports = {json.dumps(settings, indent=2)};\n"


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class NodeRed:
    """One Node-RED process running :func:`flow` (``node red.js --settings ...``).

    Args:
        workdir: holds ``settings.js``, ``flows.json``, the user dir and the log.
        mqtt_port: the broker's port.
        cloud_url: the cloud stub's base URL.
        port: Node-RED's HTTP port (``/bench/ready``, the editor).
        env: environment for the process (credentials for the **sign** node).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        mqtt_port: int,
        cloud_url: str,
        port: int,
        env: dict[str, str],
        red_js: Path | None = None,
    ) -> None:
        self.workdir = workdir
        self.port = port
        self.env = env
        self.red_js = red_js or _red_js(cache_dir())
        self.log_path = workdir / "node-red.log"
        user_dir = workdir / "node-red-user"
        user_dir.mkdir(parents=True, exist_ok=True)
        flow_file = workdir / "flows.json"
        flow_file.write_text(
            json.dumps(flow(mqtt_port=mqtt_port, cloud_url=cloud_url), indent=1), encoding="utf-8"
        )
        self.settings_path = workdir / "settings.js"
        self.settings_path.write_text(
            settings_js(port=port, flow_file=flow_file, user_dir=user_dir), encoding="utf-8"
        )
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._peak_kb = 0

    @property
    def pid(self) -> int | None:
        """The process id while started."""
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        """Started and not exited."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> NodeRed:
        """Start Node-RED (does not wait; see :meth:`connected_at`)."""
        node = shutil.which("node")
        if node is None:
            raise RuntimeError("node (Node.js) is not on PATH")
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            [node, str(self.red_js), "--settings", str(self.settings_path)],
            cwd=self.workdir,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            preexec_fn=_die_with_parent  # noqa: PLW1509 - no threads touched in the child
            if threading.current_thread() is threading.main_thread()
            else None,
        )
        return self

    def state(self) -> dict[str, Any] | None:
        """``GET /bench/ready``: ``connectedAt`` (0 until connected) and ``retries``."""
        url = f"http://127.0.0.1:{self.port}/bench/ready"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as response:
                return dict(json.loads(response.read()))
        except (OSError, ValueError):
            return None

    def wait_connected(self, timeout: float = 90.0) -> float:
        """Poll every 5 ms until the flow's MQTT connection is up; return when it came up."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"Node-RED exited while starting\n{self.log_tail()}")
            state = self.state()
            if state and state.get("connectedAt"):
                return float(state["connectedAt"])
            time.sleep(0.005)
        raise TimeoutError(f"Node-RED did not connect within {timeout} s\n{self.log_tail()}")

    def peak_rss_mb(self) -> float:
        """``VmHWM`` of the node process (remembered across stops), MiB."""
        self._remember_peak()
        return self._peak_kb / 1024

    def _remember_peak(self) -> None:
        if self.running and self.pid is not None:
            with contextlib.suppress(OSError, ValueError):
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        self._peak_kb = max(self._peak_kb, int(line.split()[1]))

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (Node-RED closes its nodes: the MQTT session stays), SIGKILL after timeout."""
        self._remember_peak()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        """SIGKILL if running and reap."""
        self._remember_peak()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 40) -> str:
        """The end of Node-RED's output."""
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""
