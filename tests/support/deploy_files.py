"""Readers of the deployment files and of what the bridge really exports.

The files: Dockerfile, docker-compose.yml, the Prometheus config, alert rules and the Grafana
dashboard. They serve the tests that keep those files true to the code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from prometheus_client.metrics import MetricWrapperBase

from bridge.config import Settings, load_settings
from bridge.telemetry import Metrics

__all__ = [
    "ALERTS",
    "DASHBOARD",
    "DASHBOARD_PROVIDERS",
    "DATASOURCES",
    "DEPLOY",
    "ENV_PREFIX",
    "PROMETHEUS_CONFIG",
    "ROOT",
    "SERVICES",
    "SYNTHETIC_SERIES",
    "TARGET_LABELS",
    "Instruction",
    "Mount",
    "PromQLRefs",
    "alert_rules",
    "bridge_env",
    "built_services",
    "command_of",
    "command_option",
    "compose",
    "dashboard",
    "dashboard_panels",
    "deployment_environment",
    "dockerfile",
    "effective_settings",
    "env_instruction",
    "environment_of",
    "exec_form",
    "exported_series",
    "healthcheck_command",
    "host_path",
    "image_env",
    "last",
    "load_yaml",
    "mount_at",
    "mounts_of",
    "parse_dockerfile",
    "promql_refs",
    "published_ports",
    "service",
    "subcommands",
    "unknown_references",
    "variable_queries",
]

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "energy-bridge.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "energy-bridge.yml"

SERVICES = {"mosquitto", "cloud-stub", "bridge", "simulator", "prometheus", "grafana"}
ENV_PREFIX = "ENERGY_BRIDGE_"


# ---------------------------------------------------------------------------------------------
# Reading the files


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction: ``keyword`` upper-cased, ``args`` with continuations joined."""

    keyword: str
    args: str


def parse_dockerfile(text: str) -> list[Instruction]:
    r"""Split a Dockerfile into instructions (comments dropped, ``\`` continuations joined)."""
    instructions: list[Instruction] = []
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # Docker drops comment lines, also inside a continued instruction
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        keyword, _, args = logical.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
        logical = ""
    assert not logical, f"Dockerfile ends inside a continued line: {logical!r}"
    return instructions


def exec_form(args: str) -> list[str]:
    """The JSON (exec) form of ENTRYPOINT/CMD/VOLUME; fails on the shell form."""
    value = json.loads(args)
    assert isinstance(value, list), f"not the exec (JSON array) form: {args!r}"
    assert all(isinstance(item, str) for item in value), args
    return value


def env_instruction(args: str) -> dict[str, str]:
    """``ENV a=1 b="x y"`` (or the legacy ``ENV a 1``) as a mapping."""
    words = shlex.split(args)
    if "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    return dict(word.split("=", 1) for word in words)


@cache
def dockerfile() -> tuple[Instruction, ...]:
    """The repository's Dockerfile, parsed."""
    return tuple(parse_dockerfile((ROOT / "Dockerfile").read_text(encoding="utf-8")))


def last(keyword: str) -> Instruction:
    """The last instruction with this keyword (the one in effect)."""
    found = [i for i in dockerfile() if i.keyword == keyword]
    assert found, f"the Dockerfile has no {keyword}"
    return found[-1]


def image_env() -> dict[str, str]:
    """Every ENV the image sets."""
    env: dict[str, str] = {}
    for instruction in dockerfile():
        if instruction.keyword == "ENV":
            env.update(env_instruction(instruction.args))
    return env


def healthcheck_command() -> list[str]:
    """The image's HEALTHCHECK command (exec form), without its options."""
    match = re.fullmatch(r"(?:--\S+\s+)*CMD\s+(?P<cmd>.+)", last("HEALTHCHECK").args)
    assert match, f"HEALTHCHECK is not 'CMD [...]': {last('HEALTHCHECK').args!r}"
    return exec_form(match["cmd"])


@cache
def _compose_cached() -> str:
    return (ROOT / "docker-compose.yml").read_text(encoding="utf-8")


def compose() -> dict[str, Any]:
    """docker-compose.yml, parsed (a fresh copy each call)."""
    document = yaml.safe_load(_compose_cached())
    assert isinstance(document, dict)
    return document


def service(name: str) -> dict[str, Any]:
    """One compose service."""
    services = compose()["services"]
    assert name in services, f"docker-compose.yml has no service {name!r}"
    return dict(services[name])


def built_services() -> list[str]:
    """The services built from this repository (``build: .``)."""
    return sorted(
        name
        for name, spec in compose()["services"].items()
        if spec.get("build") in {".", "./"}
        or (isinstance(spec.get("build"), dict) and spec["build"].get("context") in {".", "./"})
    )


def command_of(name: str) -> list[str]:
    """A built service's command (the image's CMD when compose sets none)."""
    command = service(name).get("command")
    if command is None:
        return exec_form(last("CMD").args)
    return shlex.split(command) if isinstance(command, str) else list(command)


def environment_of(name: str) -> dict[str, str]:
    """A service's ``environment`` as a mapping (list or mapping syntax)."""
    env = service(name).get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(key): "" if value is None else str(value) for key, value in env.items()}


def bridge_env() -> dict[str, str]:
    """What the bridge process sees from the deployment: the image's ENV, then compose's."""
    return {**image_env(), **environment_of("bridge")}


@dataclass(frozen=True)
class Mount:
    """One entry of a service's ``volumes``."""

    source: str
    target: str
    read_only: bool

    @property
    def is_bind(self) -> bool:
        """A host path (``./x``, ``/x``), not a named volume."""
        return self.source.startswith((".", "/", "~"))


def mounts_of(name: str) -> list[Mount]:
    """A service's volumes (short or long syntax)."""
    mounts = []
    for entry in service(name).get("volumes") or []:
        if isinstance(entry, str):
            parts = entry.split(":")
            mode = parts[2] if len(parts) > 2 else ""
            mounts.append(Mount(parts[0], parts[1], "ro" in mode.split(",")))
        else:
            mounts.append(
                Mount(entry["source"], entry["target"], bool(entry.get("read_only", False)))
            )
    return mounts


def mount_at(name: str, target: str) -> Mount:
    """The mount of a service at ``target``."""
    found = [m for m in mounts_of(name) if PurePosixPath(m.target) == PurePosixPath(target)]
    assert found, f"{name} mounts nothing at {target}: {mounts_of(name)}"
    return found[0]


def host_path(mount: Mount) -> Path:
    """The repository path a bind mount refers to."""
    assert mount.is_bind, f"{mount} is not a bind mount"
    return (ROOT / mount.source).resolve()


def published_ports(name: str) -> list[tuple[str | None, int, int]]:
    """``(host_ip, host_port, container_port)`` of each published port."""
    ports = []
    for entry in service(name).get("ports") or []:
        if isinstance(entry, dict):
            ports.append((entry.get("host_ip"), int(entry["published"]), int(entry["target"])))
            continue
        text = str(entry).split("/")[0]
        parts = text.rsplit(":", 2)
        if len(parts) == 3:
            ports.append((parts[0], int(parts[1]), int(parts[2])))
        elif len(parts) == 2:
            ports.append((None, int(parts[0]), int(parts[1])))
        else:
            ports.append((None, int(parts[0]), int(parts[0])))
    return ports


def command_option(command: list[str], option: str) -> str:
    """The value of ``--option VALUE`` or ``--option=VALUE`` in a command."""
    for index, word in enumerate(command):
        if word == option:
            return command[index + 1]
        if word.startswith(option + "="):
            return word.split("=", 1)[1]
    raise AssertionError(f"{option} not in {command}")


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The subcommands of ``parser`` (``energy-bridge``'s) and their parsers."""
    # argparse has no public accessor for its subparsers.
    for action in parser._actions:  # noqa: SLF001
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            return dict(action.choices)
    raise AssertionError("energy-bridge has no subcommands")


def load_yaml(path: Path) -> Any:
    """A YAML file of the repository, parsed."""
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@contextlib.contextmanager
def deployment_environment(env: Mapping[str, str]) -> Iterator[None]:
    """Replace every ``ENERGY_BRIDGE_*`` variable of this process by ``env``'s, temporarily."""
    saved = {key: value for key, value in os.environ.items() if key.startswith(ENV_PREFIX)}
    try:
        for key in saved:
            del os.environ[key]
        os.environ.update({k: v for k, v in env.items() if k.startswith(ENV_PREFIX)})
        yield
    finally:
        for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
            del os.environ[key]
        os.environ.update(saved)


def effective_settings() -> Settings:
    """The settings the bridge container starts with (defaults + image ENV + compose env)."""
    with deployment_environment(bridge_env()):
        return load_settings(None)


# ---------------------------------------------------------------------------------------------
# What the bridge exports, and what PromQL expressions refer to


@cache
def exported_series() -> dict[str, frozenset[str]]:
    """Every series name the bridge exports, with its label names.

    Taken from a fresh :class:`~bridge.telemetry.Metrics` registry: counters export
    ``NAME_total``, histograms ``NAME_bucket`` (with ``le``), ``NAME_sum`` and ``NAME_count``,
    gauges ``NAME``, infos ``NAME_info``. (``_created`` series exist too, but a dashboard has no
    business with them.)
    """
    metrics = Metrics()
    # The label names of metrics not yet observed: prometheus_client exports no sample (and
    # no public accessor) for a labelled metric before its first labels() call.
    labels_of: dict[str, set[str]] = {
        wrapper._name: set(wrapper._labelnames)  # noqa: SLF001
        for wrapper in vars(metrics).values()
        if isinstance(wrapper, MetricWrapperBase)
    }
    suffixes = {
        "counter": ("_total",),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count"),
        "info": ("_info",),
        "summary": ("", "_sum", "_count"),
    }
    series: dict[str, frozenset[str]] = {}
    for family in metrics.registry.collect():
        labels = labels_of.get(family.name, set())
        for sample in family.samples:
            labels |= set(sample.labels)
        for suffix in suffixes[family.type]:
            extra = {"le"} if suffix == "_bucket" else set()
            series[family.name + suffix] = frozenset(labels | extra)
    return series


# Series Prometheus adds to every scrape target.
SYNTHETIC_SERIES: dict[str, frozenset[str]] = {
    "up": frozenset(),
    "scrape_duration_seconds": frozenset(),
}
# Labels Prometheus adds to every scraped series.
TARGET_LABELS = frozenset({"job", "instance"})

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{([^}]*)\}")
_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*(\"(?:[^\"\\]|\\.)*\")")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", re.IGNORECASE
)
_DURATION = re.compile(r"(?<![\w:.])\d+(?:ms|s|m|h|d|w|y)(?![\w:])")
_NUMBER = re.compile(
    r"(?<![\w:.])(?:0x[0-9a-f]+|(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)(?![\w:])", re.IGNORECASE
)
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
    | {"group_left", "group_right", "atan2", "inf", "nan"}
)


@dataclass(frozen=True)
class PromQLRefs:
    """What one PromQL expression refers to."""

    metrics: frozenset[str]
    labels: frozenset[str]
    matchers: tuple[tuple[str, str, str], ...]  # (label, operator, value)


def promql_refs(expr: str) -> PromQLRefs:
    """The metric names, label names and label matchers of a PromQL expression.

    Good enough for the expressions of dashboards and alert rules: strings, ranges, numbers
    and durations are removed, identifiers followed by ``(`` are functions or aggregations,
    grouping clauses (``by (...)``, ``on (...)``) and ``{...}`` hold label names.
    """
    matchers = tuple(
        (label, op, json.loads(value))
        for block in _MATCHERS.findall(expr)
        for label, op, value in _MATCHER.findall(block)
    )
    text = _STRING.sub(" ", expr)
    labels = {label for label, _, _ in matchers}
    for group in _GROUPING.findall(text):
        labels |= {part.strip() for part in group.split(",") if part.strip()}
    text = _GROUPING.sub(" ", text)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _DURATION.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    metrics = set()
    for match in _IDENTIFIER.finditer(text):
        name = match.group()
        if name.lower() in _KEYWORDS or text[match.end() :].lstrip().startswith("("):
            continue
        metrics.add(name)
    return PromQLRefs(frozenset(metrics), frozenset(labels), matchers)


def unknown_references(expr: str) -> list[str]:
    """Problems with the metric and label names ``expr`` uses (empty when all are real)."""
    known = {**exported_series(), **SYNTHETIC_SERIES}
    refs = promql_refs(expr)
    problems = [f"unknown metric {name!r}" for name in sorted(refs.metrics - set(known))]
    allowed = set(TARGET_LABELS)
    for name in refs.metrics & set(known):
        allowed |= known[name]
    problems += [f"unknown label {label!r}" for label in sorted(refs.labels - allowed)]
    if not refs.metrics:
        problems.append("refers to no metric")
    return problems


def dashboard() -> dict[str, Any]:
    """The Grafana dashboard JSON."""
    document = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


def dashboard_panels(document: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, also those inside (collapsed) rows."""
    panels = []
    for panel in document.get("panels", []):
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def variable_queries(document: dict[str, Any]) -> list[str]:
    """The metric selectors of the dashboard's query variables (``label_values(SEL, label)``)."""
    selectors = []
    for variable in document.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query)
        match = re.fullmatch(r"\s*label_values\((.+),\s*([A-Za-z_]\w*)\s*\)\s*", text)
        assert match, f"variable {variable.get('name')}: unsupported query {text!r}"
        selectors.append(f"sum by ({match[2]}) ({match[1]})")
    return selectors


def alert_rules() -> list[dict[str, Any]]:
    """Every rule of deploy/prometheus/alerts.yml."""
    document = load_yaml(ALERTS)
    return [rule for group in document["groups"] for rule in group["rules"]]
