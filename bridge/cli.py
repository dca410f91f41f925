"""The ``energy-bridge`` command: run, check, cloud-stub, simulate, demo, dlq, session, spool."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from bridge import __version__
from bridge.errors import (
    BridgeError,
    ConfigError,
    CredentialsMalformedError,
    MappingError,
    MessageSkipped,
)

if TYPE_CHECKING:
    from bridge.config import Settings
    from bridge.intake.registry import Registry

__all__ = ["main"]


def _load(config: Path | None) -> Any:
    from bridge.config import load_settings  # noqa: PLC0415 - keep `--help` fast

    return load_settings(config)


def _run(args: argparse.Namespace) -> int:
    from bridge.app import App  # noqa: PLC0415
    from bridge.logs import setup_logging  # noqa: PLC0415

    settings = _load(args.config)
    setup_logging(settings.log.level, settings.log.format.value)
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        runner: Any = asyncio.run
    else:
        runner = uvloop.run
    runner(App(settings).run())
    return 0


def _masked(settings: Any) -> dict[str, Any]:
    doc: dict[str, Any] = settings.model_dump(mode="json")
    if doc["mqtt"].get("password") is not None:
        doc["mqtt"]["password"] = "****"  # noqa: S105 - the mask, not a password
    return doc


def _check(args: argparse.Namespace) -> int:
    from bridge.credentials import CredentialsProvider  # noqa: PLC0415
    from bridge.intake.registry import Registry  # noqa: PLC0415

    settings = _load(args.config)
    # A bad registry file stops `run`: fail here the same way, naming the file and line.
    registry = Registry.from_settings(settings.registry)
    warnings = _warnings(settings)
    creds = CredentialsProvider(settings.cloud.credentials)
    out: dict[str, Any] = {"settings": _masked(settings), "credentials": creds.describe()}
    if registry is not None:
        out["registry"] = {"file": str(registry.path), "entries": len(registry)}
    if warnings:
        out["warnings"] = warnings
    status = 0
    try:
        creds.check_format()
    except CredentialsMalformedError as exc:
        # `run` refuses to start with these: say so, and fail.
        out["errors"] = [str(exc)]
        status = 1
    if args.sample is not None:
        topic, payload = args.sample
        out["sample"], rejected = _sample(settings, registry, topic, payload)
        if rejected:
            status = 1
    sys.stdout.write(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() + "\n")
    return status


def _warnings(settings: Settings) -> list[str]:
    """One line for each risky setting `check` reports (none of them stops `run`)."""
    from bridge.config import has_daylight_saving, per_point_warning  # noqa: PLC0415

    warnings: list[str] = []
    if settings.mqtt.tls.insecure:
        warnings.append("mqtt.tls.insecure is on: the broker's certificate is NOT verified")
    if not settings.cloud.verify_tls:
        warnings.append("cloud.verify_tls is off: the cloud endpoint is NOT verified")
    if settings.cloud.plain_http_beyond_loopback:
        warnings.append("cloud.endpoint is plain http: credentials-signed data travels unencrypted")
    if has_daylight_saving(settings.timezone):
        warnings.append(
            f"timezone {settings.timezone} has daylight saving time: recordTime is local time"
            " without an offset, so when the clocks go back two readings an hour apart get the"
            " same recordTime (and when they go forward an hour of recordTimes never occurs);"
            " use a zone without DST, e.g. Asia/Shanghai (UTC+8, most likely the API's own)"
            " or UTC"
        )
    if (shared := per_point_warning(settings)) is not None:
        warnings.append(shared)
    if settings.cloud.endpoint == "http://127.0.0.1:8080":
        warnings.append("cloud.endpoint is the default local stand-in (energy-bridge cloud-stub)")
    return warnings


def _sample(
    settings: Settings, registry: Registry | None, topic: str, payload: str
) -> tuple[dict[str, Any], bool]:
    """What `check --sample` shows for one message, and whether the message was rejected.

    The message is mapped as `run` would map it (the registry applied): its readings with each
    point's source and the push bodies they make, or the skip or rejection reason.
    """
    from bridge.intake.mapping import Mapper  # noqa: PLC0415

    mapper = Mapper(
        settings.routes, settings.timezone, max_payload_bytes=settings.mqtt.max_payload_bytes
    )
    route = mapper.route_of(topic.encode())
    try:
        traced = mapper.explain(topic.encode(), payload.encode(), time.time())
        if registry is not None:
            # The registry keeps order and length (or refuses the message as a whole).
            renamed = registry.apply([r for r, _ in traced])
            traced = [(r, sources) for r, (_, sources) in zip(renamed, traced, strict=True)]
    except MappingError as exc:
        return {"route": route, "rejected": {"reason": exc.reason, "detail": exc.detail}}, True
    except MessageSkipped as exc:
        return {"route": route, "skipped": {"reason": exc.reason, "detail": exc.detail}}, False
    from bridge.models import NO_DEVICE_ID_TYPES, build_body, serialize_entry  # noqa: PLC0415

    bodies: dict[str, list[bytes]] = {}
    shown = []
    for r, sources in traced:
        shown.append(
            {
                "deviceType": r.device_type,
                "deviceId": r.device_id,
                "recordTime": r.record_time,
                "points": {
                    name: {"value": value, "from": sources.get(name, "?")}
                    for name, value in r.data.items()
                },
            }
        )
        device_id = None if r.device_type in NO_DEVICE_ID_TYPES else r.device_id
        bodies.setdefault(r.device_type, []).append(
            serialize_entry(device_id, r.record_time, r.data_json)
        )
    return {
        "route": route,
        "readings": shown,
        "push_bodies": [orjson.loads(build_body(t, e)) for t, e in bodies.items()],
    }, False


def _delegate(module: str) -> tuple[Any, Any]:
    mod = importlib.import_module(module)
    return mod.add_arguments, mod.run_from_args


_DELEGATED = (
    ("cloud-stub", "bridge.tools.cloud_stub", "run a local stand-in for the push API"),
    ("simulate", "bridge.tools.simulate", "publish simulated three-phase meter readings"),
    ("demo", "bridge.tools.demo", "run mosquitto, the stub, the simulator and the bridge together"),
    ("dlq", "bridge.spool.dlq", "list, show, replay or purge dead letters"),
    ("session", "bridge.intake.drain", "drain a gone replica's MQTT session into this spool"),
    ("spool", "bridge.spool.drain", "push another replica's spool file to the cloud"),
)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; ``command`` limits which tools' options are loaded."""
    parser = argparse.ArgumentParser(
        prog="energy-bridge",
        description="Deliver meter readings from MQTT to Alibaba Cloud Energy Expert.",
    )
    parser.add_argument("--version", action="version", version=f"energy-bridge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the bridge")
    p.add_argument("--config", type=Path, help="YAML config file (default: built-in defaults)")
    p.set_defaults(func=_run)

    p = sub.add_parser("check", help="validate the config and print the effective settings")
    p.add_argument("--config", type=Path, help="YAML config file")
    p.add_argument(
        "--sample",
        nargs=2,
        metavar=("TOPIC", "PAYLOAD"),
        help="print the readings this message would become (each point with the path it came"
        " from) and their push body, or why it is rejected",
    )
    p.set_defaults(func=_check)

    for name, module, help_text in _DELEGATED:
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(module=module)
        # Import a tool's module only when that tool runs (or its help is asked for): `run`
        # should not pay for loading the stub, the simulator and the demo.
        if command in {name, None}:
            add_arguments, _ = _delegate(module)
            add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``energy-bridge`` and ``python -m bridge``."""
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    try:
        if hasattr(args, "func"):
            return int(args.func(args))
        _, run_from_args = _delegate(args.module)
        return int(run_from_args(args))
    except ConfigError as exc:
        sys.stderr.write(f"energy-bridge: configuration error: {exc}\n")
        return 2
    except BridgeError as exc:
        sys.stderr.write(f"energy-bridge: {exc}\n")
        return 1
    except KeyboardInterrupt:
        return 130
