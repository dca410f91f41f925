"""A private Prometheus on a free loopback port, for the dashboard tests and renderer.

Real queries against a real bridge's metrics, with the deployment's own rules.
"""

from __future__ import annotations

import contextlib
import copy
import json
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from bridge.testing.processes import LOOPBACK, free_port, port_accepts, wait_until

__all__ = ["Prometheus"]


class Prometheus:
    """``prometheus`` on 127.0.0.1 and a free port, storage in ``workdir``, one scrape job.

    Lifecycle: construct (nothing runs), :meth:`start` (writes the config, waits for
    ``/-/ready``), query, :meth:`kill`.
    """

    def __init__(
        self,
        workdir: Path,
        executable: str,
        *,
        targets: list[str],
        config: Path,
        job: str = "energy-bridge",
    ) -> None:
        """Describe the server; nothing runs until :meth:`start`.

        Args:
            workdir: where the config, the data and the log go.
            executable: the ``prometheus`` binary.
            targets: ``host:port`` of each bridge to scrape.
            config: the deployment's ``prometheus.yml``, whose job ``job`` and rule files are
                used (with 1 s intervals and ``targets`` instead of its own).
            job: the scrape job to keep.
        """
        self.workdir = workdir
        self.executable = executable
        self.targets = targets
        self.source_config = config
        self.job = job
        self.port = free_port()
        self.config_path = workdir / "prometheus.yml"
        self.log_path = workdir / "prometheus.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{LOOPBACK}:{self.port}"

    def config(self) -> dict[str, Any]:
        """The source config with 1 s intervals, our targets and absolute rule paths."""
        config: dict[str, Any] = copy.deepcopy(
            yaml.safe_load(self.source_config.read_text(encoding="utf-8"))
        )
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        config["rule_files"] = [
            str((self.source_config.parent / rule_file).resolve())
            for rule_file in config["rule_files"]
        ]
        (job,) = [job for job in config["scrape_configs"] if job["job_name"] == self.job]
        job.update(scrape_interval="1s", scrape_timeout="1s")
        job["static_configs"] = [{"targets": self.targets}]
        config["scrape_configs"] = [job]
        return config

    def start(self, timeout: float = 30.0) -> Prometheus:
        """Start and wait until ``/-/ready`` answers 200."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config()), encoding="utf-8")
        argv = [
            self.executable,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address={LOOPBACK}:{self.port}",
        ]
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                argv, cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )

        def ready() -> bool:
            self._ensure_alive()
            if not port_accepts(LOOPBACK, self.port):
                return False
            return self._status("/-/ready") == 200

        wait_until(ready, timeout, interval=0.1, message=lambda: f"/-/ready\n{self.describe()}")
        return self

    def _ensure_alive(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise RuntimeError(f"prometheus exited\n{self.describe()}")

    def _status(self, path: str) -> int:
        try:
            with urllib.request.urlopen(self.url + path, timeout=2) as response:  # noqa: S310
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    def api(self, path: str, **params: str) -> Any:
        """GET ``/api/v1/PATH`` and return its ``data``; fails on an error answer."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
        assert body.get("status") == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query: the result vector (``[{"metric": {...}, "value": [t, "v"]}]``)."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", f"{expr}: {data['resultType']}"
        return list(data["result"])

    def alert_states(self) -> dict[str, str]:
        """Active alerts: name -> ``pending`` or ``firing`` (the most advanced one)."""
        states: dict[str, str] = {}
        for alert in self.api("alerts")["alerts"]:
            name = alert["labels"]["alertname"]
            if states.get(name) != "firing":
                states[name] = alert["state"]
        return states

    def describe(self) -> str:
        """State and log tail, for failure messages."""
        running = self._proc is not None and self._proc.poll() is None
        tail = ""
        with contextlib.suppress(OSError):
            tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])
        return f"---- prometheus ({'running' if running else 'stopped'}) ----\n{tail}"

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(10)
