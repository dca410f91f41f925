"""Write `prometheusrule.yaml` from `deploy/prometheus/alerts.yml`, the one source of the rules.

python deploy/k8s/sync_rules.py          # rewrite it
python deploy/k8s/sync_rules.py --check  # exit 1 if it differs (the tests check it too)
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ALERTS = HERE.parent / "prometheus" / "alerts.yml"
TARGET = HERE / "prometheusrule.yaml"
HEADER = """\
# GENERATED from deploy/prometheus/alerts.yml by deploy/k8s/sync_rules.py: edit that file and
# run the script. The same rules, for the Prometheus Operator (monitoring.coreos.com/v1);
# tests/integration/test_k8s.py checks that they are equal.
"""


def render() -> str:
    """The PrometheusRule document holding every group of the alert rules file."""
    groups = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
    document = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "energy-bridge",
            "labels": {"app.kubernetes.io/name": "energy-bridge"},
        },
        "spec": {"groups": groups},
    }
    return HEADER + yaml.safe_dump(document, sort_keys=False, width=100, allow_unicode=True)


def main() -> int:
    """Rewrite the file, or with ``--check`` report whether it is up to date."""
    text = render()
    if "--check" in sys.argv[1:]:
        if TARGET.read_text(encoding="utf-8") != text:
            sys.stderr.write(f"{TARGET} is out of date: run {Path(__file__).name}\n")
            return 1
        return 0
    TARGET.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
