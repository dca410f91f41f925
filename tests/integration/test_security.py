"""Security properties on real processes: secrets stay secret, TLS verifies, HTTP stays local.

* The AccessKey secret, the STS token and the broker password never appear in the bridge's
  log, ``/metrics``, ``/readyz``, ``energy-bridge check`` output or the cloud stub's log, also
  not while the broker refuses the password or the cloud refuses the secret.
* With ``mqtt.tls`` the bridge verifies the broker's certificate and host name; it refuses a
  broker whose certificate another CA signed or that was issued for another name, and
  ``mqtt.tls.insecure`` (which skips both) is warned about by ``check``.
* The metrics and health endpoint binds to 127.0.0.1 by default.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from tests.support import (
    LOOPBACK,
    START_TS,
    BridgeFactory,
    BridgeProcess,
    Mosquitto,
    MosquittoFactory,
    Publisher,
    StubFactory,
    StubProcess,
    free_port,
    iter_telemetry,
    port_accepts,
    telemetry_payload,
    wait_until,
    write_bridge_config,
)

pytestmark = pytest.mark.integration


# Recognisable values: any of them (or a 10-character piece of one) in an output is a leak.
KEY_ID = "LTAI5tEnergyBridgeTestId"
SECRET = "AKSECRET-7d3f0c9b41e2a865"
WRONG_SECRET = "WRONGSECRET-5c2e8a1f9d07"
TOKEN = "STSTOKEN-c0ffee1e55b0a7d2e9f4"
MQTT_USER = "bridge-user"
MQTT_PASSWORD = "MQTTPASS-93b1e07c4fd2"
WRONG_MQTT_PASSWORD = "WRONGMQTTPASS-1a6d4e"
METER_USER = "meter-user"
METER_PASSWORD = "METERPASS-2f8c5b9e01"
SECRETS = (SECRET, WRONG_SECRET, TOKEN, MQTT_PASSWORD, WRONG_MQTT_PASSWORD)
# The cloud stub's default key, for the tests that are not about credentials.
_TEST_CREDENTIALS = {
    "ALIBABA_CLOUD_ACCESS_KEY_ID": "testid",
    "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "testsecret",
}


# ---------------------------------------------------------------------------------------------
# helpers


def _clean_env(**extra: str) -> dict[str, str]:
    """``os.environ`` without any bridge setting or cloud credential, plus ``extra``."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("ENERGY_BRIDGE_", "ALIBABA_CLOUD_"))
    }
    return {**env, **extra}


def _run_check(*args: str, env: dict[str, str], cwd: Path | None = None) -> tuple[int, str]:
    """Run ``energy-bridge check ARGS``; return its exit status and stdout + stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "bridge", "check", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return proc.returncode, proc.stdout + proc.stderr


def _leaks(text: str, values: Iterable[str] = SECRETS, piece: int = 10) -> list[str]:
    """Every secret of which ``text`` holds a ``piece``-character slice (or the whole)."""
    found = []
    for value in values:
        slices = {value[i : i + piece] for i in range(len(value) - piece + 1)} | {value}
        if any(part in text for part in slices):
            found.append(value)
    return found


def _readyz(bridge: BridgeProcess) -> tuple[int, dict[str, Any]]:
    status, body = bridge.get("/readyz")
    return status, json.loads(body)


def _problem(bridge: BridgeProcess, condition: str) -> str:
    """The /readyz reason for ``condition``, ``""`` while there is none (a predicate).

    Also ``""`` while the bridge is starting and does not answer HTTP yet.
    """
    try:
        status, body = _readyz(bridge)
    except OSError:
        return ""
    return body.get("problems", {}).get(condition, "") if status == 503 else ""


def _seqs(stub: StubProcess) -> set[int]:
    return {int(e["data"]["seq"]) for e in stub.received() if "seq" in e["data"]}


def _publish_as(
    host: str, port: int, username: str, password: str, items: list[tuple[str, bytes]]
) -> int:
    """Publish ``items`` with QoS 1 as ``username``; return how many the broker acknowledged."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"test-auth-pub-{secrets.token_hex(4)}",
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    client.username_pw_set(username, password)
    connected = threading.Event()
    failures: list[str] = []

    def on_connect(*args: Any) -> None:
        reason: ReasonCode = args[3]
        if reason.is_failure:
            failures.append(str(reason))
        connected.set()

    def on_publish(*args: Any) -> None:
        reason: ReasonCode = args[3]
        if reason.is_failure:
            failures.append(str(reason))

    client.on_connect = on_connect
    client.on_publish = on_publish
    client.connect(host, port)
    client.loop_start()
    try:
        assert connected.wait(10), "no CONNACK"
        assert [] == failures
        infos = [client.publish(topic, payload, qos=1) for topic, payload in items]
        for info in infos:
            info.wait_for_publish(30)
        assert [] == failures
        return sum(info.is_published() for info in infos)
    finally:
        client.disconnect()
        client.loop_stop()


def _mosquitto_passwd(path: Path, user: str, password: str) -> None:
    exe = shutil.which("mosquitto_passwd")
    if exe is None:
        pytest.fail("mosquitto_passwd not found on PATH: install the mosquitto package")
    create = [] if path.exists() else ["-c"]
    subprocess.run(
        [exe, "-b", *create, str(path), user, password],
        check=True,
        capture_output=True,
        timeout=30,
    )


# ---------------------------------------------------------------------------------------------
# 6. secrets


def test_secrets_never_appear_in_logs_metrics_or_check_output(
    mosquitto_factory: MosquittoFactory,
    stub_factory: StubFactory,
    bridge_factory: BridgeFactory,
    tmp_path: Path,
) -> None:
    """Test that the secret, the STS token and the broker password are never printed.

    A full run with a password-protected broker and an STS key at the stub: first the broker
    refuses a wrong password (fixed in the password file, re-read on reconnect), then the
    cloud refuses a wrong secret, then a restart with the right secret delivers; bad messages
    are rejected on the way; ``check`` runs with every variant, the broker password also
    inline in the YAML and in the environment. Then every output is searched.
    """
    passwd = tmp_path / "mosquitto.passwd"
    _mosquitto_passwd(passwd, MQTT_USER, MQTT_PASSWORD)
    _mosquitto_passwd(passwd, METER_USER, METER_PASSWORD)
    broker = mosquitto_factory(extra_conf=f"allow_anonymous false\npassword_file {passwd}")
    # The keys go through the environment: the harness logs the stub's command line.
    stub = stub_factory(env={"ENERGY_BRIDGE_STUB_KEYS": f"{KEY_ID}:{SECRET}:{TOKEN}"})
    password_file = tmp_path / "mqtt-password"
    password_file.write_text(WRONG_MQTT_PASSWORD + "\n", encoding="utf-8")
    wrong_env = {
        "ALIBABA_CLOUD_ACCESS_KEY_ID": KEY_ID,
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET": WRONG_SECRET,
        "ALIBABA_CLOUD_SECURITY_TOKEN": TOKEN,
    }
    bridge = bridge_factory(
        mqtt_port=broker.port,
        cloud_url=stub.url,
        ready_timeout=None,
        env=wrong_env,
        mqtt={
            "username": MQTT_USER,
            "password_file": str(password_file),
            "reconnect_min_secs": 0.2,
            "reconnect_max_secs": 1,
        },
        log={"level": "DEBUG"},
        shutdown_grace_secs=1,
    )
    outputs: dict[str, str] = {}

    def collect(phase: str) -> None:
        outputs[f"{phase} /metrics"] = bridge.get("/metrics")[1].decode()
        outputs[f"{phase} /readyz"] = bridge.get("/readyz")[1].decode()

    # Phase 1: the broker refuses the password.
    wait_until(
        lambda: "Not authorized" in _problem(bridge, "mqtt"),
        30,
        message="/readyz naming the refused broker login",
    )
    collect("wrong broker password")
    password_file.write_text(MQTT_PASSWORD + "\n", encoding="utf-8")
    wait_until(lambda: bridge.metric("bridge_mqtt_connected") == 1, 30, message="broker login")

    # Phase 2: the cloud refuses the secret; a bad message is rejected meanwhile.
    items = list(iter_telemetry([f"meter-{i:02d}" for i in range(10)], 10, START_TS))
    sent = _publish_as(
        broker.host,
        broker.port,
        METER_USER,
        METER_PASSWORD,
        [*items[:50], ("meters/1/meter-00/telemetry", b'{"ts": 1700000000, "Ua": 22')],
    )
    assert 51 == sent
    wait_until(lambda: "credentials" in _problem(bridge, "cloud"), 30, message="cloud refusal")
    wait_until(
        lambda: stub.stats()["rejected"].get("SignatureDoesNotMatch", 0) >= 2,
        30,
        message="refused requests",
    )
    collect("wrong secret")
    config = bridge.config_path
    outputs["check, wrong secret"] = _run_check(
        "--config", str(config), env=_clean_env(**wrong_env)
    )[1]
    assert 0 == bridge.terminate(30)

    # Phase 3: the right secret delivers everything.
    right_env = {**wrong_env, "ALIBABA_CLOUD_ACCESS_KEY_SECRET": SECRET}
    bridge.env.update(right_env)
    bridge.start()
    bridge.wait_ready(30)
    sent = _publish_as(
        broker.host,
        broker.port,
        METER_USER,
        METER_PASSWORD,
        [*items[50:], ("meters/1/meter-00/telemetry", b'{"ts": 1700000000, "Ua": NaN}')],
    )
    assert 51 == sent
    wait_until(lambda: len(_seqs(stub)) >= 100, 30, message="every reading")
    wait_until(
        lambda: bridge.metric("bridge_messages_rejected_total") == 1, 10, message="the reject"
    )
    collect("right secret")
    status, text = _run_check("--config", str(config), env=_clean_env(**right_env))
    assert 0 == status, text
    outputs["check, right secret"] = text
    checked = json.loads(text)
    assert f"env: AccessKey id {KEY_ID}, secret ****, STS token set" == checked["credentials"]
    outputs["check --sample"] = _run_check(
        "--config",
        str(config),
        "--sample",
        "meters/1/m-1/telemetry",
        '{"ts": 1700000000, "Ua": "x"}',
        env=_clean_env(**right_env),
    )[1]
    # The broker password written inline in the YAML, and given in the environment.
    inline = tmp_path / "inline.yaml"
    document = yaml.safe_load(config.read_text(encoding="utf-8"))
    document["mqtt"] = {**document["mqtt"], "password": MQTT_PASSWORD}
    del document["mqtt"]["password_file"]
    inline.write_text(yaml.safe_dump(document), encoding="utf-8")
    status, text = _run_check("--config", str(inline), env=_clean_env(**right_env))
    assert 0 == status, text
    assert "****" == json.loads(text)["settings"]["mqtt"]["password"]
    outputs["check, inline password"] = text
    outputs["check, password in the environment"] = _run_check(
        "--config",
        str(config),
        env=_clean_env(**right_env, ENERGY_BRIDGE_MQTT__PASSWORD=MQTT_PASSWORD),
    )[1]
    # A configuration error next to the password.
    document["mqtt"]["port"] = "not-a-port"
    inline.write_text(yaml.safe_dump(document), encoding="utf-8")
    status, text = _run_check("--config", str(inline), env=_clean_env(**right_env))
    assert 2 == status, text
    outputs["check, config error"] = text
    outputs["check, malformed JSON in the environment"] = _run_check(
        env=_clean_env(ENERGY_BRIDGE_MQTT=f'{{"password": "{MQTT_PASSWORD}",'), cwd=tmp_path
    )[1]
    assert 0 == bridge.terminate(30)

    outputs["bridge log"] = bridge.log_text()
    outputs["cloud-stub log"] = stub.log_text()
    # Sanity: the outputs are real, and the credentials were really used and refused.
    assert 100 == len(_seqs(stub))
    assert stub.stats()["rejected"]["SignatureDoesNotMatch"] >= 2
    assert "Not authorized" in outputs["bridge log"]
    assert "SignatureDoesNotMatch" in outputs["bridge log"]
    assert "message rejected, dead-lettered" in outputs["bridge log"]
    assert KEY_ID in outputs["check, right secret"]
    assert "bridge_readings_delivered_total 100.0" in outputs["right secret /metrics"]
    leaks = {name: _leaks(text) for name, text in outputs.items()}
    assert {name: [] for name in outputs} == leaks


def test_malformed_environment_setting_is_a_clean_configuration_error(tmp_path: Path) -> None:
    """Test that a malformed JSON setting in the environment names the key, exit status 2."""
    status, text = _run_check(
        env=_clean_env(ENERGY_BRIDGE_ROUTES='[{"topic": "meters/{deviceType}/{deviceId}"'),
        cwd=tmp_path,
    )
    assert 2 == status, text
    assert text.startswith("energy-bridge: configuration error: routes"), text
    assert "Traceback" not in text


# ---------------------------------------------------------------------------------------------
# 7. TLS to the broker


def _openssl(*args: str, cwd: Path) -> None:
    exe = shutil.which("openssl")
    if exe is None:
        pytest.fail("openssl not found on PATH: install openssl to generate the test certificates")
    result = subprocess.run(
        [exe, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    assert 0 == result.returncode, f"openssl {' '.join(args)}:\n{result.stderr}"


_EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def _make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA: return (certificate, key)."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    _openssl(
        "req",
        "-x509",
        *_EC_KEY,
        "-keyout",
        str(key),
        "-out",
        str(cert),
        "-days",
        "2",
        "-subj",
        f"/CN=energy-bridge test {name}",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )
    return cert, key


def _make_server_cert(
    directory: Path, name: str, ca: tuple[Path, Path], alt_names: str
) -> tuple[Path, Path]:
    """A server certificate for ``alt_names`` signed by ``ca``: return (certificate, key)."""
    cert, key, csr = (directory / f"{name}{ext}" for ext in (".crt", ".key", ".csr"))
    extensions = directory / f"{name}.ext"
    extensions.write_text(
        f"subjectAltName={alt_names}\n"
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n",
        encoding="ascii",
    )
    _openssl(
        "req", "-new", *_EC_KEY, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca[0]),
        "-CAkey",
        str(ca[1]),
        "-set_serial",
        str(int.from_bytes(os.urandom(8), "big")),
        "-days",
        "2",
        "-extfile",
        str(extensions),
        "-out",
        str(cert),
        cwd=directory,
    )
    return cert, key


def _tls_listener(cert: tuple[Path, Path], ca: Path) -> str:
    return f"cafile {ca}\ncertfile {cert[0]}\nkeyfile {cert[1]}\ntls_version tlsv1.2\n"


def _client_id(bridge: BridgeProcess) -> str:
    document = yaml.safe_load(bridge.config_path.read_text(encoding="utf-8"))
    return str(document["mqtt"]["client_id"])


def test_tls_to_the_broker_verifies_the_server(
    mosquitto_factory: MosquittoFactory,
    stub: StubProcess,
    bridge_factory: BridgeFactory,
    tmp_path: Path,
) -> None:
    """Test that TLS to the broker delivers, verifies the CA and the name, and warns if off.

    One broker, three listeners: TLS with a certificate for 127.0.0.1/localhost (the main
    port), TLS with a certificate of the same CA for another name, and plain TCP for the test
    publisher. Bridges: the right CA delivers; another CA, or the right CA but the wrong name,
    never connect (not ready, the log says why); ``insecure: true`` connects despite the wrong
    CA and ``check`` warns about it.
    """
    pki = tmp_path / "pki"
    pki.mkdir()
    ca = _make_ca(pki, "ca")
    other_ca = _make_ca(pki, "other-ca")
    server = _make_server_cert(pki, "server", ca, "IP:127.0.0.1,DNS:localhost")
    wrong_name = _make_server_cert(pki, "elsewhere", ca, "DNS:broker.elsewhere.example")
    wrong_name_port, plain_port = free_port(), free_port()
    broker = mosquitto_factory(
        extra_conf=_tls_listener(server, ca[0])
        + f"listener {wrong_name_port} {LOOPBACK}\n"
        + _tls_listener(wrong_name, ca[0])
        + f"listener {plain_port} {LOOPBACK}\n"
    )
    wait_until(lambda: port_accepts(LOOPBACK, plain_port), 10, message="the plain listener")

    # The right CA: connects and delivers.
    verified = bridge_factory(
        mqtt_port=broker.port, mqtt={"tls": {"enabled": True, "ca_file": str(ca[0])}}
    )
    items = list(iter_telemetry([f"meter-{i:02d}" for i in range(20)], 150, START_TS))
    with Publisher(LOOPBACK, plain_port) as pub:
        pub.publish_many(items[:2_000])
    wait_until(lambda: len(_seqs(stub)) >= 2_000, 30, message="readings over TLS")
    assert 0 == verified.terminate(30)
    assert set(range(2_000)) == _seqs(stub)
    status, text = _run_check(
        "--config", str(verified.config_path), env=_clean_env(**_TEST_CREDENTIALS)
    )
    assert 0 == status, text
    assert "tls" not in " ".join(json.loads(text).get("warnings", []))

    # Another CA, and the right CA for the wrong name: never connected.
    refusals = {}
    for name, port, ca_file in (
        ("other CA", broker.port, other_ca[0]),
        ("wrong name", wrong_name_port, ca[0]),
    ):
        bridge = bridge_factory(
            mqtt_port=port,
            ready_timeout=None,
            mqtt={
                "tls": {"enabled": True, "ca_file": str(ca_file)},
                "reconnect_min_secs": 0.2,
                "reconnect_max_secs": 0.5,
            },
        )

        def verification_failed(b: BridgeProcess = bridge) -> str:
            problem = _problem(b, "mqtt")
            return problem if "CERTIFICATE_VERIFY_FAILED" in problem else ""

        refusals[name] = wait_until(
            verification_failed,
            30,
            message=f"{name}: /readyz naming the failed verification",
        )
        assert "CERTIFICATE_VERIFY_FAILED" in bridge.log_text()
        assert 0 == bridge.metric("bridge_mqtt_connected")
        assert 503 == _readyz(bridge)[0]
        assert _client_id(bridge) not in broker.log_text()
        bridge.kill()
    # mosquitto sends its CA along: the chain ends in a CA the bridge does not trust.
    assert "self-signed certificate in certificate chain" in refusals["other CA"]
    assert "IP address mismatch" in refusals["wrong name"]

    # insecure: connects despite the wrong CA; check warns.
    insecure = bridge_factory(
        mqtt_port=broker.port,
        mqtt={"tls": {"enabled": True, "ca_file": str(other_ca[0]), "insecure": True}},
    )
    with Publisher(LOOPBACK, plain_port) as pub:
        pub.publish_many(items[2_000:])
    wait_until(lambda: len(_seqs(stub)) >= 3_000, 30, message="readings over unverified TLS")
    status, text = _run_check(
        "--config", str(insecure.config_path), env=_clean_env(**_TEST_CREDENTIALS)
    )
    assert 0 == status, text
    warnings = json.loads(text).get("warnings", [])
    assert any("mqtt.tls.insecure" in w and "NOT verified" in w for w in warnings), warnings
    assert set(range(3_000)) == _seqs(stub)


def test_refused_tls_handshake_is_logged_once_a_minute(
    mosquitto_factory: MosquittoFactory,
    stub: StubProcess,
    bridge_factory: BridgeFactory,
    tmp_path: Path,
) -> None:
    """Test that a broker refusing every handshake gives one warning line, not one per try.

    The README: "repeated identical failures are folded into one line a minute".
    """
    pki = tmp_path / "pki"
    pki.mkdir()
    ca = _make_ca(pki, "ca")
    other_ca = _make_ca(pki, "other-ca")
    server = _make_server_cert(pki, "server", ca, "IP:127.0.0.1,DNS:localhost")
    broker = mosquitto_factory(extra_conf=_tls_listener(server, ca[0]))
    bridge = bridge_factory(
        mqtt_port=broker.port,
        ready_timeout=None,
        mqtt={
            "tls": {"enabled": True, "ca_file": str(other_ca[0])},
            "reconnect_min_secs": 0.2,
            "reconnect_max_secs": 0.5,
        },
    )
    # mosquitto words a refused handshake differently by version and buffers its log file, so
    # count the connection attempts it logged, however late they are written.
    wait_until(
        lambda: broker.log_text().count("New connection from 127.0.0.1") >= 5,
        90,
        interval=0.5,
        message="five refused handshakes",
    )
    warnings = [
        event
        for event in (
            json.loads(line) for line in bridge.log_text().splitlines() if line.startswith("{")
        )
        if event["level"] == "warning" and "CERTIFICATE_VERIFY_FAILED" in json.dumps(event)
    ]
    # One "not ready" transition plus at most one line about the failing attempts.
    assert len(warnings) <= 2, [event["event"] for event in warnings]


# ---------------------------------------------------------------------------------------------
# 8. the HTTP endpoint


def _decode_address(text: str) -> tuple[str, int]:
    """``/proc/net/tcp{,6}`` local_address (``0100007F:238C``) -> ("127.0.0.1", 9108)."""
    address, port = text.split(":")
    raw = bytes.fromhex(address)
    # The kernel prints each 32-bit word in host (little-endian) order.
    swapped = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(swapped)), int(port, 16)


def _listening(pid: int) -> set[tuple[str, int]]:
    """The TCP addresses the process ``pid`` listens on."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = set()
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text(encoding="ascii").splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A = LISTEN
                found.add(_decode_address(local))
    return found


def _non_loopback_address() -> str | None:
    """A local IPv4 address that is not loopback, if the machine has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent by connect()
        except OSError:
            return None
        address: str = sock.getsockname()[0]
    return None if ipaddress.ip_address(address).is_loopback else address


def test_http_endpoint_binds_to_loopback_by_default(
    mosquitto: Mosquitto, stub: StubProcess, bridge_factory: BridgeFactory, tmp_path: Path
) -> None:
    """Test that by default /metrics listens on 127.0.0.1:9108 and on no other address."""
    status, text = _run_check(env=_clean_env(**_TEST_CREDENTIALS), cwd=tmp_path)
    assert 0 == status, text
    assert "127.0.0.1:9108" == json.loads(text)["settings"]["http"]["listen"]

    workdir = tmp_path / "default-http"
    config = write_bridge_config(
        workdir, mqtt_port=mosquitto.port, cloud_url=stub.url, http_port=free_port()
    )
    document = yaml.safe_load(config.read_text(encoding="utf-8"))
    del document["http"]
    config.write_text(yaml.safe_dump(document), encoding="utf-8")
    if port_accepts(LOOPBACK, 9108):
        pytest.fail("port 9108 is taken by another process: the default cannot be tested")
    bridge = bridge_factory(config=config)
    assert "127.0.0.1:9108" == bridge.http_listen
    pid = bridge.pid
    assert pid is not None
    assert {(LOOPBACK, 9108)} == _listening(pid)
    assert 200 == bridge.get("/healthz")[0]
    other = _non_loopback_address()
    if other is not None:
        assert not port_accepts(other, 9108), f"/metrics answers on {other}:9108"
    with Publisher(mosquitto.host, mosquitto.port) as pub:
        pub.publish("meters/1/meter-01/telemetry", telemetry_payload(0, START_TS))
    wait_until(lambda: {0} == _seqs(stub), 30, message="the reading")


def _insecure_warnings(bridge: BridgeProcess) -> list[str]:
    return [
        event["event"]
        for event in (
            json.loads(line) for line in bridge.log_text().splitlines() if line[:1] == "{"
        )
        if event["level"] == "warning" and event["event"].startswith("INSECURE")
    ]


def test_plain_http_endpoint_beyond_loopback_is_warned_at_start(
    mosquitto: Mosquitto, stub: StubProcess, bridge_factory: BridgeFactory
) -> None:
    """Test that `run` warns once at start for a plain-http endpoint off loopback.

    `run` logs one WARNING at start for an http:// endpoint whose host is not a
    loopback address, and none for the loopback stub.

    The remote endpoint is a documentation address (RFC 5737) that is never contacted: nothing
    is published, so the bridge has nothing to push.
    """
    remote = bridge_factory(cloud_url="http://192.0.2.10:8080", log={"format": "json"})
    local = bridge_factory(log={"format": "json"})
    wait_until(lambda: "energy-bridge started" in local.log_text(), 10, message="the start line")
    remote_warnings, local_warnings = _insecure_warnings(remote), _insecure_warnings(local)
    remote.kill()

    expected = (
        "INSECURE: cloud.endpoint is plain http to a host that is not this machine: readings"
        " and signed requests travel unencrypted"
    )
    assert ([expected], []) == (remote_warnings, local_warnings)
