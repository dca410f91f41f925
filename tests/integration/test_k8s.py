"""The Kubernetes manifests (``deploy/k8s/``) are valid and agree with the code they deploy.

Built-in kinds are validated offline against the Kubernetes JSON schemas shipped by the
``kubernetes-validate`` package; the Prometheus Operator's kinds (ServiceMonitor,
PrometheusRule), for which no schema is packaged, are checked field by field here. Then the
manifests are held to the CLI (the container runs a real subcommand with real flags), the
settings (the ConfigMap and the env load as the bridge loads them; the grace period covers
``shutdown_grace_secs``), each other (selectors, ports, names) and the alert rules file.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from bridge.cli import build_parser
from bridge.config import HOSTNAME_PLACEHOLDER, Settings
from tests.support.deploy_files import (
    ALERTS,
    DEPLOY,
    command_option,
    deployment_environment,
    image_env,
    load_yaml,
    subcommands,
)

K8S = DEPLOY / "k8s"
KUBERNETES_VERSION = "1.30.0"
"""The oldest Kubernetes release still commonly run (ACK, EKS, GKE): the manifests use nothing
newer."""
BUILT_IN = {"ConfigMap", "Secret", "Service", "StatefulSet", "PodDisruptionBudget"}
OPERATOR = {"ServiceMonitor", "PrometheusRule"}
NAME = "energy-bridge"


def manifests() -> dict[str, dict[str, Any]]:
    """Every resource of ``deploy/k8s/`` by kind (the kustomization excluded)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            assert document["kind"] not in found, f"two {document['kind']}s"
            found[document["kind"]] = document
    return found


def pod(resources: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The StatefulSet's pod spec."""
    spec: dict[str, Any] = resources["StatefulSet"]["spec"]["template"]["spec"]
    return spec


def container(resources: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The bridge container."""
    (only,) = pod(resources)["containers"]
    return dict(only)


def config_text(resources: dict[str, dict[str, Any]]) -> str:
    """The bridge.yaml the ConfigMap holds."""
    return str(resources["ConfigMap"]["data"]["bridge.yaml"])


def plain_env(resources: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The container's env entries that have a literal value."""
    return {e["name"]: e["value"] for e in container(resources)["env"] if "value" in e}


def settings_in_pod(resources: dict[str, dict[str, Any]], tmp_path: Path) -> Settings:
    """The settings a replica starts with: image ENV, the pod's env, then the ConfigMap."""
    from bridge.config import load_settings  # noqa: PLC0415

    config = tmp_path / "bridge.yaml"
    config.write_text(config_text(resources), encoding="utf-8")
    with deployment_environment({**image_env(), **plain_env(resources)}):
        return load_settings(config)


def test_kustomization_lists_every_manifest() -> None:
    """Test that kustomization.yaml names exactly the manifest files of deploy/k8s/."""
    listed = load_yaml(K8S / "kustomization.yaml")["resources"]
    files = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert files == sorted(listed)
    assert BUILT_IN | OPERATOR == set(manifests())


@pytest.mark.parametrize("kind", sorted(BUILT_IN))
def test_built_in_kinds_validate_against_the_kubernetes_schemas(kind: str) -> None:
    """Test that each built-in resource is valid for Kubernetes (strict: no unknown fields)."""
    kubernetes_validate.validate(manifests()[kind], KUBERNETES_VERSION, strict=True)


def test_schema_validation_catches_a_mistake() -> None:
    """Test that the schema check is not vacuous: a misspelt field is refused."""
    broken = manifests()["StatefulSet"]
    broken["spec"]["replica"] = broken["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_statefulset_gives_each_replica_an_identity_a_spool_and_time_to_stop(
    tmp_path: Path,
) -> None:
    """Test that the pod name is the client id, the spool is on the volume, the grace fits.

    The grace period covers shutdown_grace_secs with room for the unsubscribe.
    """
    resources = manifests()
    settings = settings_in_pod(resources, tmp_path)
    statefulset = resources["StatefulSet"]
    assert settings.mqtt.share_group
    raw = yaml.safe_load(config_text(resources))
    assert HOSTNAME_PLACEHOLDER in raw["mqtt"]["client_id"]
    grace = pod(resources)["terminationGracePeriodSeconds"]
    assert grace >= settings.shutdown_grace_secs + 10
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container(resources)["volumeMounts"]}
    assert settings.spool.path.parent == Path(mounts[claim["metadata"]["name"]])
    assert ["ReadWriteOnce"] == claim["spec"]["accessModes"]
    assert statefulset["spec"]["replicas"] >= 2
    assert NAME == statefulset["spec"]["serviceName"]
    # The image's user must be able to write the volume.
    security = pod(resources)["securityContext"]
    assert (10001, 10001) == (security["runAsUser"], security["fsGroup"])


def test_container_runs_a_real_subcommand_with_the_mounted_config(tmp_path: Path) -> None:
    """Test that the container's args parse as `energy-bridge run --config FILE` on the mount.

    FILE is where the ConfigMap is mounted; the drain commands in the comments parse too.
    """
    resources = manifests()
    args = container(resources)["args"]
    assert "run" == args[0]
    parsed = build_parser("run").parse_args(args)
    config = Path(command_option(args, "--config"))
    mounts = {m["name"]: m["mountPath"] for m in container(resources)["volumeMounts"]}
    assert str(config.parent) == mounts["config"]
    assert "bridge.yaml" in resources["ConfigMap"]["data"]
    assert config == parsed.config
    text = (K8S / "statefulset.yaml").read_text(encoding="utf-8")
    for line in re.findall(r"energy-bridge ((?:session|spool) drain .+)", text):
        words = line.split()
        build_parser(words[0]).parse_args(words)
    assert {"session", "spool"} <= set(subcommands(build_parser()))


def test_env_names_settings_and_credentials_from_the_secret() -> None:
    """Test that every ENERGY_BRIDGE_* variable is a setting and credentials come from the Secret.

    The Secret's keys are the variable names the bridge reads.
    """
    resources = manifests()
    env = container(resources)["env"]
    with deployment_environment(plain_env(resources)):
        Settings()  # refuses unknown or invalid ENERGY_BRIDGE_* variables
    from_secret = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env if "valueFrom" in e}
    assert {"ALIBABA_CLOUD_ACCESS_KEY_ID", "ALIBABA_CLOUD_ACCESS_KEY_SECRET"} == set(from_secret)
    secret = resources["Secret"]
    for name, ref in from_secret.items():
        assert (secret["metadata"]["name"], name) == (ref["name"], ref["key"])
        assert ref["key"] in secret["stringData"]
    assert not any("SECRET" in k or "PASSWORD" in k for k in plain_env(resources))


def test_probes_service_and_monitor_use_the_metrics_port(tmp_path: Path) -> None:
    """Test that the probes, the headless Service and the ServiceMonitor reach http.listen's port.

    Each uses the bridge's paths.
    """
    resources = manifests()
    settings = settings_in_pod(resources, tmp_path)
    (port,) = container(resources)["ports"]
    assert (settings.http.port, "0.0.0.0") == (port["containerPort"], settings.http.host)
    c = container(resources)
    assert ("/readyz", port["name"]) == (
        c["readinessProbe"]["httpGet"]["path"],
        c["readinessProbe"]["httpGet"]["port"],
    )
    assert ("/healthz", port["name"]) == (
        c["livenessProbe"]["httpGet"]["path"],
        c["livenessProbe"]["httpGet"]["port"],
    )
    service = resources["Service"]
    assert "None" == service["spec"]["clusterIP"]
    (service_port,) = service["spec"]["ports"]
    assert (settings.http.port, port["name"]) == (service_port["port"], service_port["targetPort"])
    monitor = resources["ServiceMonitor"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (service_port["name"], "/metrics") == (endpoint["port"], endpoint["path"])


def test_selectors_match_the_pods() -> None:
    """Test that the StatefulSet, Service, PodDisruptionBudget and monitor select the replicas.

    The ServiceMonitor selects the Service, the others the replicas' pods.
    """
    resources = manifests()
    labels = resources["StatefulSet"]["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict[str, str], target: dict[str, str]) -> bool:
        return all(target.get(k) == v for k, v in selector.items())

    assert selects(resources["StatefulSet"]["spec"]["selector"]["matchLabels"], labels)
    assert selects(resources["Service"]["spec"]["selector"], labels)
    assert selects(resources["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"], labels)
    assert 1 == resources["PodDisruptionBudget"]["spec"]["maxUnavailable"]
    service_labels = resources["Service"]["metadata"]["labels"]
    assert selects(resources["ServiceMonitor"]["spec"]["selector"]["matchLabels"], service_labels)


def test_operator_kinds_have_the_structure_the_operator_reads() -> None:
    """Test ServiceMonitor and PrometheusRule by the fields of the operator's v1 CRDs."""
    resources = manifests()
    for kind in OPERATOR:
        document = resources[kind]
        assert {"apiVersion", "kind", "metadata", "spec"} == set(document)
        assert "monitoring.coreos.com/v1" == document["apiVersion"]
        assert NAME == document["metadata"]["name"]
    monitor = resources["ServiceMonitor"]["spec"]
    assert {"selector", "endpoints"} == set(monitor)
    allowed_endpoint = {"port", "path", "interval", "scrapeTimeout", "relabelings"}
    for endpoint in monitor["endpoints"]:
        assert set(endpoint) <= allowed_endpoint
        assert re.fullmatch(r"\d+[smh]", endpoint["interval"])
    rules = resources["PrometheusRule"]["spec"]
    assert {"groups"} == set(rules)
    for group in rules["groups"]:
        assert set(group) <= {"name", "interval", "rules"}
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "record", "expr", "for", "labels", "annotations"}
            assert ("alert" in rule) != ("record" in rule)


def test_prometheusrule_holds_exactly_the_alert_rules_file() -> None:
    """Test that the PrometheusRule is deploy/prometheus/alerts.yml, regenerated unchanged."""
    assert load_yaml(ALERTS)["groups"] == manifests()["PrometheusRule"]["spec"]["groups"]
    result = subprocess.run(
        [sys.executable, str(K8S / "sync_rules.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert 0 == result.returncode, result.stderr
