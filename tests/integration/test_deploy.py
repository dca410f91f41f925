"""The deployment files agree with the code they deploy.

``docker-compose.yml`` and the ``Dockerfile`` are checked against the CLI (every container runs
a real subcommand with real flags), the settings (every ``ENERGY_BRIDGE_*`` variable is a
setting with a valid value) and each other (service names, ports, volumes, health checks);
the Prometheus config and alert rules and the Grafana provisioning and dashboard are checked
against the metrics the bridge really exports. None of this needs Docker. The last test runs
the bridge container's command line outside Docker, with the environment compose gives it.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath

import pytest
from pydantic import BaseModel

from bridge.cli import build_parser
from bridge.config import Settings
from bridge.push.retry import Outcome
from bridge.tools.cloud_stub import DEFAULT_KEY, options_from_args
from tests.support import (
    LOOPBACK,
    START_TS,
    Mosquitto,
    Publisher,
    StubFactory,
    free_port,
    parse_metrics,
    telemetry_payload,
    wait_until,
)
from tests.support.deploy_files import (
    ALERTS,
    DASHBOARD,
    DASHBOARD_PROVIDERS,
    DATASOURCES,
    DEPLOY,
    ENV_PREFIX,
    PROMETHEUS_CONFIG,
    ROOT,
    SERVICES,
    alert_rules,
    bridge_env,
    built_services,
    command_of,
    command_option,
    compose,
    dashboard,
    dashboard_panels,
    dockerfile,
    effective_settings,
    environment_of,
    exec_form,
    healthcheck_command,
    host_path,
    last,
    load_yaml,
    mount_at,
    promql_refs,
    published_ports,
    service,
    subcommands,
    unknown_references,
    variable_queries,
)

# ---------------------------------------------------------------------------------------------
# The helpers above must catch mistakes, or every check below passes vacuously.


def test_promql_refs_finds_metrics_and_labels_and_skips_the_rest() -> None:
    """Test that the PromQL reader finds metric and label names, not functions or numbers."""
    refs = promql_refs(
        'histogram_quantile(0.99, sum by (le) (rate(a_bucket{instance=~"$x", q="1"}[5m])))'
        " / on (job) group_left b_total offset 1h > 1e-3 and bool up"
    )
    assert {"a_bucket", "b_total", "up"} == refs.metrics
    assert {"le", "instance", "q", "job"} == refs.labels
    assert (("instance", "=~", "$x"), ("q", "=", "1")) == refs.matchers


def test_unknown_references_flags_misspelled_metrics_and_labels() -> None:
    """Test that a metric or label the bridge does not export is reported."""
    assert [] == unknown_references("sum by (reason) (rate(bridge_messages_rejected_total[5m]))")
    assert ["unknown metric 'bridge_messages_rejected'"] == unknown_references(
        "rate(bridge_messages_rejected[5m])"
    )
    assert ["unknown label 'cause'"] == unknown_references(
        "sum by (cause) (rate(bridge_messages_rejected_total[5m]))"
    )


# ---------------------------------------------------------------------------------------------
# docker-compose.yml and the Dockerfile


def test_compose_defines_the_whole_stack() -> None:
    """Test that compose runs the broker, stub, bridge, simulator, Prometheus and Grafana."""
    assert SERVICES == set(compose()["services"])
    assert ["bridge", "cloud-stub", "simulator"] == built_services()
    assert service("mosquitto")["image"].startswith("eclipse-mosquitto:2")
    assert service("prometheus")["image"].startswith("prom/prometheus")
    assert service("grafana")["image"].startswith("grafana/grafana")


def test_compose_publishes_ports_on_loopback_only() -> None:
    """Test that every published port is bound to 127.0.0.1, never to all interfaces."""
    published = {name: published_ports(name) for name in compose()["services"]}
    assert {
        "mosquitto": [(LOOPBACK, 1883, 1883)],
        "bridge": [(LOOPBACK, 9108, 9108)],
        "prometheus": [(LOOPBACK, 9090, 9090)],
        "grafana": [(LOOPBACK, 3000, 3000)],
        "cloud-stub": [],
        "simulator": [],
    } == published


def test_compose_keeps_spool_and_broker_data_on_named_volumes() -> None:
    """Test that the spool and mosquitto's persistence live on declared named volumes."""
    declared = set(compose().get("volumes") or {})
    spool_dir = str(PurePosixPath(effective_settings().spool.path).parent)
    assert [spool_dir] == exec_form(last("VOLUME").args)
    spool = mount_at("bridge", spool_dir)
    assert (False, True) == (spool.is_bind, spool.source in declared), spool
    conf = (ROOT / "mosquitto" / "mosquitto.conf").read_text(encoding="utf-8")
    assert re.search(r"^persistence true$", conf, re.MULTILINE)
    location = re.search(r"^persistence_location (\S+)$", conf, re.MULTILINE)
    assert location, "mosquitto.conf sets no persistence_location"
    data = mount_at("mosquitto", location[1])
    assert (False, True) == (data.is_bind, data.source in declared), data
    config = mount_at("mosquitto", "/mosquitto/config/mosquitto.conf")
    assert (ROOT / "mosquitto" / "mosquitto.conf", True) == (host_path(config), config.read_only)
    for name, target in (("prometheus", "/prometheus"), ("grafana", "/var/lib/grafana")):
        mount = mount_at(name, target)
        assert (False, True) == (mount.is_bind, mount.source in declared), mount


def test_compose_services_have_health_checks() -> None:
    """Test that each service has a health check that fits it, and dependencies wait on them."""
    for name in ("mosquitto", "cloud-stub", "prometheus", "grafana"):
        check = service(name).get("healthcheck") or {}
        assert check.get("test"), f"{name} has no healthcheck"
        assert not check.get("disable"), name
    # The bridge uses the image's check; the other containers of that image must not, since
    # they do not serve /readyz (the simulator serves nothing to probe at all).
    assert "healthcheck" not in service("bridge")
    assert "/readyz" in " ".join(healthcheck_command())
    assert {"disable": True} == service("simulator")["healthcheck"]
    for name in compose()["services"]:
        depends = service(name).get("depends_on") or {}
        if isinstance(depends, dict):
            for dependency, how in depends.items():
                if how.get("condition") == "service_healthy":
                    has_check = dependency == "bridge" or "test" in (
                        service(dependency).get("healthcheck") or {}
                    )
                    assert has_check, f"{name} waits for {dependency} to be healthy: no check"
    assert "service_healthy" == service("simulator")["depends_on"]["bridge"]["condition"]


def test_dockerfile_entrypoint_is_the_energy_bridge_command() -> None:
    """Test that the image runs the package's ``energy-bridge`` script, ``run`` by default."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "bridge.cli:main" == pyproject["project"]["scripts"]["energy-bridge"]
    assert ["energy-bridge"] == exec_form(last("ENTRYPOINT").args)
    assert ["run"] == exec_form(last("CMD").args)


def test_dockerfile_base_image_is_pinned_to_an_exact_version() -> None:
    """Test that the base image is pinned to one Python patch release on one Debian release.

    The base image is one exact Python 3.11 patch release on one Debian release
    (``python:3.11.N-slim-bookworm``, optionally with a digest), not a tag that moves.
    """
    base = last("FROM").args
    assert re.fullmatch(r"python:3\.11\.[0-9]+-slim-bookworm(@sha256:[0-9a-f]{64})?", base), base


def test_dockerfile_runs_as_a_non_root_user() -> None:
    """Test that the image's final USER is a numeric, non-zero uid and gid."""
    user = last("USER").args
    uid, _, gid = user.partition(":")
    assert re.fullmatch(r"[1-9][0-9]*", uid), f"USER {user}: use a numeric non-root uid"
    assert re.fullmatch(r"|[1-9][0-9]*", gid), f"USER {user}: use a numeric non-root gid"
    keywords = [i.keyword for i in dockerfile()]
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN")
    assert f"--uid {uid}" in " ".join(i.args for i in dockerfile() if i.keyword == "RUN")


def test_compose_runs_real_subcommands_with_real_flags(capsys: pytest.CaptureFixture[str]) -> None:
    """Test that each container of the image runs a subcommand the CLI has, with flags it takes."""
    known = subcommands(build_parser())
    for name in [*built_services(), "<image CMD>"]:
        command = exec_form(last("CMD").args) if name.startswith("<") else command_of(name)
        assert command[:1] in [[k] for k in known], f"{name}: {command} not in {sorted(known)}"
        parser = build_parser(command[0])
        # Exact flags only: an abbreviation works today and breaks when a longer flag appears.
        subcommands(parser)[command[0]].allow_abbrev = False
        try:
            parser.parse_args(command)
        except SystemExit:
            pytest.fail(f"{name}: energy-bridge {shlex.join(command)}: {capsys.readouterr().err}")


def test_compose_cloud_stub_keeps_a_bounded_number_of_entries() -> None:
    """Test that the compose stack's long-running stub keeps a bounded number of entries.

    The compose stack's stub, which runs for days, keeps (and fingerprints for
    duplicate counting) only a bounded number of the entries it accepts.
    """
    command = command_of("cloud-stub")
    options = options_from_args(build_parser(command[0]).parse_args(command), {})
    assert options.keep_max is not None
    assert 1 <= options.keep_max <= 100_000


def test_compose_services_point_at_each_other() -> None:
    """Test that host names and ports in the commands and settings are the services' own."""
    settings = effective_settings()
    conf = (ROOT / "mosquitto" / "mosquitto.conf").read_text(encoding="utf-8")
    listener = re.search(r"^listener (\d+)", conf, re.MULTILINE)
    assert listener, "mosquitto.conf has no listener"
    assert ("mosquitto", int(listener[1])) == (settings.mqtt.host, settings.mqtt.port)
    simulator = command_of("simulator")
    assert ("mosquitto", listener[1]) == (
        command_option(simulator, "--host"),
        command_option(simulator, "--port"),
    )
    stub = command_of("cloud-stub")
    assert "0.0.0.0" == command_option(stub, "--host")
    assert f"http://cloud-stub:{command_option(stub, '--port')}" == settings.cloud.endpoint


def test_compose_bridge_environment_names_real_settings() -> None:
    """Test that every ENERGY_BRIDGE_* variable of the image and the bridge is a setting."""
    for key in sorted(bridge_env()):
        if not key.startswith(ENV_PREFIX):
            continue
        model: type[BaseModel] | None = Settings
        path = key.removeprefix(ENV_PREFIX).lower().split("__")
        for depth, part in enumerate(path):
            assert model is not None, f"{key}: {'.'.join(path[:depth])} has no sub-keys"
            assert part in model.model_fields, f"{key}: no setting {'.'.join(path[: depth + 1])}"
            annotation = model.model_fields[part].annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                model = annotation  # a section
            else:
                model = None
        assert model is None, f"{key} names a whole section, not a setting"
    settings = effective_settings()  # every value is valid, too
    assert ("0.0.0.0", 9108) == (settings.http.host, settings.http.port)
    assert {"meters/+/+/telemetry", "meters/+/+/points/+"} == {
        route.subscription for route in settings.routes
    }


def test_compose_bridge_credentials_are_the_stub_default_key() -> None:
    """Test that the bridge signs with the key the stub accepts when given none."""
    env = environment_of("bridge")
    assert (DEFAULT_KEY.access_key_id, DEFAULT_KEY.access_key_secret) == (
        env["ALIBABA_CLOUD_ACCESS_KEY_ID"],
        env["ALIBABA_CLOUD_ACCESS_KEY_SECRET"],
    )
    assert "--key" not in command_of("cloud-stub")


# ---------------------------------------------------------------------------------------------
# Prometheus


def test_prometheus_scrapes_the_bridge_service_and_loads_the_rules() -> None:
    """Test that Prometheus scrapes the bridge service on its metrics port and loads alerts.yml."""
    config = load_yaml(PROMETHEUS_CONFIG)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["energy-bridge"]
    port = effective_settings().http.port
    assert [f"bridge:{port}"] == [t for c in job["static_configs"] for t in c["targets"]]
    assert port in [container for _, _, container in published_ports("bridge")]
    assert "5s" == job["scrape_interval"]
    assert "/metrics" == job.get("metrics_path", "/metrics")
    command = service("prometheus")["command"]
    config_path = PurePosixPath(command_option(command, "--config.file"))
    assert PROMETHEUS_CONFIG == host_path(mount_at("prometheus", str(config_path)))
    for rule_file in config["rule_files"]:
        in_container = config_path.parent / rule_file
        assert ALERTS == host_path(mount_at("prometheus", str(in_container)))


REQUIRED_ALERTS = {
    "EnergyBridgeDown": "up",
    "EnergyBridgeLagGrowing": "bridge_spool_oldest_reading_age_seconds",
    "EnergyBridgeSpoolNearFull": "bridge_spool_max_bytes",
    "EnergyBridgeCloudCredentialsOrConfig": "bridge_push_requests_total",
    "EnergyBridgeBrokerDisconnected": "bridge_mqtt_connected",
    "EnergyBridgeRejectsSpiking": "bridge_messages_rejected_total",
}


def test_alert_rules_are_complete_and_explained() -> None:
    """Test that the required alerts exist, each with a severity, summary and description."""
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), names
    assert set(REQUIRED_ALERTS) <= set(names)
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert len(rule["annotations"]["description"].split()) >= 10, rule["alert"]
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
    by_name = {rule["alert"]: rule for rule in rules}
    for name, metric in REQUIRED_ALERTS.items():
        assert metric in promql_refs(by_name[name]["expr"]).metrics, name
    assert "5m" == by_name["EnergyBridgeLagGrowing"]["for"]
    assert "1m" == by_name["EnergyBridgeBrokerDisconnected"]["for"]


def test_alert_rules_use_only_exported_metrics() -> None:
    """Test that every metric and label an alert rule names is one the bridge exports."""
    problems = {
        rule["alert"]: unknown_references(rule["expr"])
        for rule in alert_rules()
        if unknown_references(rule["expr"])
    }
    assert {} == problems


def test_alert_rules_match_real_push_outcomes() -> None:
    """Test that ``outcome`` matchers in the rules name outcomes the pusher really reports."""
    outcomes = {outcome.value for outcome in Outcome}
    seen = set()
    for rule in alert_rules():
        for label, _, value in promql_refs(rule["expr"]).matchers:
            if label == "outcome":
                seen |= set(value.split("|"))
    assert {"credentials", "config"} <= seen
    assert set() == seen - outcomes


# ---------------------------------------------------------------------------------------------
# Grafana


def test_dashboard_is_valid_grafana_json() -> None:
    """Test that the dashboard is schema 39, laid out on the grid, every query on the datasource."""
    document = dashboard()
    assert 39 == document["schemaVersion"]
    assert "energy-bridge" == document["uid"]
    assert document["title"]
    panels = dashboard_panels(document)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), ids
    cells: dict[tuple[int, int], str] = {}
    datasource = load_yaml(DATASOURCES)["datasources"][0]
    for panel in panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] < grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]
        if panel["type"] == "row":
            continue
        assert {"type": "prometheus", "uid": datasource["uid"]} == panel["datasource"]
        targets = panel["targets"]
        assert targets, f"{panel['title']} has no query"
        assert len({t["refId"] for t in targets}) == len(targets), panel["title"]
        for target in targets:
            assert target["expr"].strip(), panel["title"]
            assert panel["datasource"] == target["datasource"], panel["title"]


def test_dashboard_queries_use_only_exported_metrics() -> None:
    """Test that every metric and label a panel or variable queries is one the bridge exports."""
    document = dashboard()
    expressions = [
        (panel["title"], target["expr"])
        for panel in dashboard_panels(document)
        for target in panel.get("targets", [])
    ]
    expressions += [("variable", query) for query in variable_queries(document)]
    problems = {
        f"{title}: {expr}": unknown_references(expr)
        for title, expr in expressions
        if unknown_references(expr)
    }
    assert {} == problems


def test_dashboard_shows_what_operators_need() -> None:
    """Test that throughput, lag, spool, latency, push, MQTT, reject and health panels exist."""
    referenced: set[str] = set()
    for panel in dashboard_panels(dashboard()):
        for target in panel.get("targets", []):
            referenced |= promql_refs(target["expr"]).metrics
    required = {
        "bridge_messages_received_total",
        "bridge_readings_delivered_total",
        "bridge_spool_oldest_reading_age_seconds",
        "bridge_spool_readings",
        "bridge_spool_bytes",
        "bridge_spool_max_bytes",
        "bridge_push_latency_seconds_bucket",
        "bridge_end_to_end_latency_seconds_bucket",
        "bridge_push_requests_total",
        "bridge_push_retries_total",
        "bridge_push_concurrency_limit",
        "bridge_push_requests_in_flight",
        "bridge_mqtt_connected",
        "bridge_mqtt_reconnects_total",
        "bridge_messages_rejected_total",
        "bridge_readings_dead_lettered_total",
        "bridge_ready",
        "bridge_devices_seen",
        "bridge_devices_silent",
    }
    assert set() == required - referenced


def test_grafana_provisioning_matches_compose() -> None:
    """Test that Grafana gets the Prometheus service as datasource and loads the dashboard."""
    datasources = load_yaml(DATASOURCES)["datasources"]
    assert 1 == len(datasources)
    source = datasources[0]
    assert ("prometheus", "prometheus", "http://prometheus:9090") == (
        source["uid"],
        source["type"],
        source["url"],
    )
    assert 9090 in [container for _, _, container in published_ports("prometheus")]
    provisioning = mount_at("grafana", "/etc/grafana/provisioning")
    assert (DEPLOY / "grafana" / "provisioning") == host_path(provisioning)
    assert provisioning.read_only
    (provider,) = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    assert "file" == provider["type"]
    dashboards = mount_at("grafana", provider["options"]["path"])
    assert DASHBOARD.parent == host_path(dashboards)
    env = environment_of("grafana")
    assert ("true", "Viewer") == (
        env["GF_AUTH_ANONYMOUS_ENABLED"],
        env["GF_AUTH_ANONYMOUS_ORG_ROLE"],
    )
    home = PurePosixPath(env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert PurePosixPath(provider["options"]["path"]) / DASHBOARD.name == home


# ---------------------------------------------------------------------------------------------
# The container's command line, outside Docker


def _energy_bridge_executable() -> str:
    """The ``energy-bridge`` console script of this interpreter's environment."""
    candidate = Path(sys.executable).parent / "energy-bridge"
    if not candidate.exists():
        pytest.fail(f"{candidate} not found: install the project (pip install -e .)")
    return str(candidate)


def _without_options(words: list[str], options: set[str]) -> list[str]:
    """``words`` without the given ``--option VALUE`` pairs."""
    kept: list[str] = []
    skip = False
    for word in words:
        if skip:
            skip = False
        elif word in options:
            skip = True
        elif word.split("=", 1)[0] not in options:
            kept.append(word)
    return kept


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - loopback
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def _metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/metrics", timeout=5) as response:
        return parse_metrics(response.read().decode())


@pytest.mark.integration
def test_container_command_line_runs_outside_docker(
    mosquitto: Mosquitto, stub_factory: StubFactory, tmp_path: Path
) -> None:
    """Test that ``energy-bridge run`` with the compose environment gets ready and delivers.

    Broker, cloud, spool and listen address are pointed at this test's own; every other
    variable is the image's and compose's. The stub runs with compose's flags, so the
    credentials, the routes and the image's own health check command are exercised too.
    """
    stub = stub_factory(*_without_options(command_of("cloud-stub")[1:], {"--host", "--port"}))
    http_port = free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith((ENV_PREFIX, "ALIBABA_CLOUD_"))
    }
    env |= bridge_env()
    env |= {
        "ENERGY_BRIDGE_MQTT__HOST": LOOPBACK,
        "ENERGY_BRIDGE_MQTT__PORT": str(mosquitto.port),
        "ENERGY_BRIDGE_CLOUD__ENDPOINT": stub.url,
        "ENERGY_BRIDGE_SPOOL__PATH": str(tmp_path / "spool" / "spool.db"),
        "ENERGY_BRIDGE_HTTP__LISTEN": f"{LOOPBACK}:{http_port}",
    }
    (tmp_path / "spool").mkdir()
    argv = [_energy_bridge_executable(), *command_of("bridge")]
    log_path = tmp_path / "bridge.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            argv, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )

    def describe() -> str:
        state = "running" if proc.poll() is None else f"exited {proc.returncode}"
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
        return f"{shlex.join(argv)} ({state})\n{tail}"

    def ready() -> bool:
        assert proc.poll() is None, describe()
        return _get(f"http://{LOOPBACK}:{http_port}/readyz") == 200

    try:
        wait_until(ready, 30, interval=0.1, message=lambda: f"/readyz 200\n{describe()}")
        check = healthcheck_command()
        check[0] = sys.executable if check[0] in {"python", "python3"} else check[0]
        result = subprocess.run(check, env=env, capture_output=True, timeout=30, check=False)
        assert 0 == result.returncode, result.stderr.decode(errors="replace")
        with Publisher(mosquitto.host, mosquitto.port) as pub:
            pub.publish("meters/1/compose-1/telemetry", telemetry_payload(0, START_TS))
            pub.publish("meters/1/compose-2/points/Ua", b'{"value": 226.10, "ts": 1700000000}')
        wait_until(
            lambda: int(stub.stats()["entries_accepted"]) >= 2,
            30,
            message=lambda: f"both readings at the stub\n{describe()}",
        )
        assert [("compose-1", "0"), ("compose-2", None)] == sorted(
            (e["deviceId"], e["data"].get("seq")) for e in stub.received()
        )
        # One tick of compose's simulator (its flags, this broker): the bridge's routes take
        # every topic it publishes, JSON telemetry and per-point alike.
        simulate = _without_options(command_of("simulator"), {"--host", "--port"})
        simulate += ["--host", LOOPBACK, "--port", str(mosquitto.port), "--count", "1"]
        result = subprocess.run(
            [argv[0], *simulate], env=env, capture_output=True, timeout=60, check=False
        )
        assert 0 == result.returncode, result.stderr.decode(errors="replace")
        meters = int(command_option(simulate, "--meters"))

        def settled() -> dict[str, float]:
            metrics = _metrics(http_port)
            done = metrics["bridge_devices_seen"] == 2 + meters
            return metrics if done and metrics["bridge_spool_readings"] == 0 else {}

        metrics = wait_until(settled, 30, message=lambda: f"{meters} meters seen\n{describe()}")
        rejected = {
            k: v for k, v in metrics.items() if k.startswith("bridge_messages_rejected_total")
        }
        assert {} == {k: v for k, v in rejected.items() if v}
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            raise
    assert 0 == code, describe()
