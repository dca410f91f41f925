"""Bounded fuzzer runs: any crash fails the test with the input that caused it.

Each runs for a bounded time (``FUZZ_SECONDS``, default 45) on a copy of the corpus kept in
``tests/fuzz/corpus``.

Longer runs, to grow the corpus (then minimise it with ``-merge=1`` and commit it)::

    .venv/bin/python tests/fuzz/fuzz_mapping.py tests/fuzz/corpus/mapping -max_total_time=1800
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SECONDS = int(os.environ.get("FUZZ_SECONDS", "45"))
# The fuzzer is guided by atheris' own instrumentation; coverage.py's tracer on top of it (when
# scripts/test measures child processes) slows it until it cannot finish its bounded run.
UNMEASURED_ENV = {
    k: v
    for k, v in os.environ.items()
    if k not in {"COVERAGE_PROCESS_CONFIG", "COVERAGE_PROCESS_START"}
}


@pytest.mark.parametrize("target", ["mapping", "config", "packets"])
def test_fuzzer_finds_no_crash_in_a_bounded_run(target: str, tmp_path: Path) -> None:
    """Test that a bounded libFuzzer run finds no crash and no disagreement with paho.

    libFuzzer, guided by coverage from the kept corpus, finds no input that makes
    the mapping, the config loader or the PUBLISH reader fail other than by their own error (a
    reason, a key, a malformed packet), or makes the reader disagree with paho.
    """
    corpus = tmp_path / "corpus"
    shutil.copytree(HERE / "corpus" / target, corpus)
    seeds = len(list(corpus.iterdir()))
    proc = subprocess.run(
        [
            sys.executable,
            str(HERE / f"fuzz_{target}.py"),
            str(corpus),
            f"-max_total_time={SECONDS}",
            "-print_final_stats=1",
            f"-artifact_prefix={tmp_path}/",
            "-rss_limit_mb=1024",
            "-timeout=10",
        ],
        env=UNMEASURED_ENV,
        capture_output=True,
        text=True,
        timeout=SECONDS + 120,
        check=False,
    )
    crashes = {p.name: base64.b64encode(p.read_bytes()).decode() for p in tmp_path.glob("*-*")}
    runs = [
        line
        for line in proc.stderr.splitlines()
        if line.startswith("stat::number_of_executed_units")
    ]
    grown = len(list(corpus.iterdir()))
    print(f"\nfuzz {target}: {runs} from {seeds} seeds in {SECONDS} s; corpus now {grown}")
    assert (0, {}) == (proc.returncode, crashes), proc.stderr[-3000:]
