"""Coverage-guided fuzzing of the configuration loader (atheris).

Any file gives settings or a ConfigError that names the problem; nothing else, and never a
secret in the message.

    .venv/bin/python tests/fuzz/fuzz_config.py tests/fuzz/corpus/config -max_total_time=600

Each input is written as the config file (on /dev/shm when it exists) and loaded with
:func:`bridge.config.load_settings`, with a broker password in the environment's stead: a
message that quotes ``fuzz-secret`` is a crash.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from bridge.config import load_settings
    from bridge.errors import ConfigError

SECRET = "fuzz-secret"
_DIR = Path(tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
_FILE = _DIR / "bridge.yaml"


def check(data: bytes) -> None:
    """One input: load it as the config file."""
    # Every input also carries a password, so that a message quoting the file leaks it.
    _FILE.write_bytes(data + f"\n# mqtt: {{password: {SECRET}}}\n".encode())
    try:
        load_settings(_FILE)
    except ConfigError as exc:
        if SECRET in str(exc):
            raise AssertionError(f"a config error shows the secret: {exc}") from exc


def main() -> None:
    """Run libFuzzer over :func:`check` with the command line's options."""
    for name in [n for n in os.environ if n.startswith("ENERGY_BRIDGE_")]:
        del os.environ[name]
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
