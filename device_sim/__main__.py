"""Command line: ``python -m device_sim --scenario fleet.toml --start 0 --count 12500``.

Runs a slice of a simulated fleet until ``--duration`` elapses or SIGINT/SIGTERM arrives,
then prints the report as JSON on stdout and a summary for people on stderr. The fleet
comes from a scenario file (docs/simulator.md), from the options below, or both: each
option given overrides the scenario's key, and ``--set key.path=value`` overrides any
key. Several processes share one fleet by id range (``--start``/``--count``).

Exit status: 0, or 2 for a bad scenario or options, 3 when a terminal's local data did
not survive.
"""

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from device_sim.config import SimConfig
from device_sim.fleet import Simulator
from device_sim.report import render_summary
from device_sim.scenario import ScenarioError, load_scenario, merge, parse_setting

logger = logging.getLogger(__name__)


def _pairs(text: str, sep: str) -> dict[str, str]:
    result: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, found, value = item.partition(sep)
        if not found:
            raise argparse.ArgumentTypeError(f"expected key{sep}value, got {item!r}")
        result[key] = value
    return result


def _models(text: str) -> dict[str, float]:
    try:
        return {name: float(weight) for name, weight in _pairs(text, ":").items()}
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _versions(text: str) -> dict[str, str]:
    return _pairs(text, "=")


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _broker(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected host:port, got {text!r}")
    return host, int(port)


def _setting(text: str) -> dict[str, Any]:
    try:
        return parse_setting(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


#: Options that override a key: (flag, the key's path, type, help). Defaults are the
#: models' own (shown in --help), so that an option left out never hides the scenario.
_OVERRIDES: list[tuple[str, tuple[str, ...], Any, str]] = [
    ("--count", ("count",), int, "terminals in this process"),
    ("--start", ("start",), int, "number of the first terminal"),
    ("--prefix", ("id_prefix",), str, "terminal id prefix"),
    ("--digits", ("id_digits",), int, "digits after the prefix"),
    ("--secret", ("secret",), str, "provisioning secret"),
    ("--groups", ("groups",), _csv, "comma-separated groups"),
    ("--models", ("models",), _models, "name:weight,..."),
    ("--versions", ("initial_versions",), _versions, "package=version,..."),
    ("--merchants", ("merchants",), _csv, "merchant ids, in turn"),
    ("--timezones", ("timezones",), _csv, "time zones to pick from"),
    ("--seed", ("seed",), int, "RNG seed"),
    ("--connect-concurrency", ("connect_concurrency",), int, "CONNECTs in flight at most"),
    ("--heartbeat-s", ("timing", "heartbeat_s"), float, ""),
    ("--download-bps", ("timing", "download_bps"), int, ""),
    ("--install-s", ("timing", "install_s"), float, ""),
    ("--reboot-s", ("timing", "reboot_s"), float, ""),
    ("--self-test-s", ("timing", "self_test_s"), float, ""),
    ("--busy-probability", ("timing", "busy_probability"), float, ""),
    ("--busy-s", ("timing", "busy_s"), float, ""),
    (
        "--postpone-probability",
        ("timing", "postpone_probability"),
        float,
        "chance the merchant postpones an attempt that may be postponed",
    ),
    ("--drop-rate", ("faults", "download_drop_rate"), float, ""),
    ("--corrupt-rate", ("faults", "corrupt_rate"), float, ""),
    ("--truncate-rate", ("faults", "truncate_rate"), float, ""),
    ("--install-fail-rate", ("faults", "install_fail_rate"), float, ""),
    ("--self-test-fail-rate", ("faults", "self_test_fail_rate"), float, ""),
    ("--self-test-fail-models", ("faults", "self_test_fail_models"), _csv, ""),
    (
        "--self-test-fail-versions",
        ("faults", "self_test_fail_versions"),
        _versions,
        "package=version,...: releases whose self-test fails",
    ),
    (
        "--bricked-versions",
        ("faults", "bricked_versions"),
        _versions,
        "package=version,...: releases that never come back after the reboot",
    ),
    (
        "--degraded-versions",
        ("faults", "degraded_versions"),
        _versions,
        "package=version,...: releases with a raised card transaction error rate",
    ),
    ("--txn-error-rate", ("faults", "txn_error_rate"), float, ""),
    ("--degraded-error-rate", ("faults", "degraded_error_rate"), float, ""),
    ("--power-loss-rate", ("faults", "power_loss_rate"), float, "per package install"),
]


def _default(path: tuple[str, ...]) -> object:
    model: Any = SimConfig()
    for part in path:
        model = getattr(model, part)
    return model


def _shown(value: object) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "none"
    if isinstance(value, list | set | frozenset):
        return ",".join(sorted(map(str, value))) or "none"
    return str(value)


def build_parser() -> argparse.ArgumentParser:
    """Return the CLI's argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m device_sim",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--scenario", type=Path, default=None, help="TOML scenario file (docs/simulator.md)"
    )
    p.add_argument(
        "--set",
        dest="settings",
        type=_setting,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any scenario key, e.g. faults.corrupt_rate=0.1 (a TOML value)",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="validate, print the resulting configuration as JSON, and exit",
    )
    p.add_argument(
        "--broker", type=_broker, default=None, help="host:port (default 127.0.0.1:1883)"
    )
    for flag, path, kind, text in _OVERRIDES:
        shown = _shown(_default(path))
        p.add_argument(
            flag,
            dest="/".join(path),
            metavar=path[-1].upper(),
            type=kind,
            default=None,
            help=f"{text}{'; ' if text else ''}scenario key {'.'.join(path)} (default {shown})",
        )
    p.add_argument(
        "--group-rule",
        choices=["round_robin", "all", "random", "by_model", "by_timezone"],
        default=None,
        help="how terminals map to groups (default round_robin)",
    )
    p.add_argument(
        "--heartbeat-only",
        action="store_true",
        default=None,
        help="never update: ignore desired states",
    )
    p.add_argument(
        "--duration", type=float, default=None, help="seconds to run; default: until signalled"
    )
    p.add_argument("--log-level", default="WARNING")
    return p


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The keys the options override, as nested tables (options left out are absent)."""
    found: dict[str, Any] = {}
    for _, path, _, _ in _OVERRIDES:
        value = getattr(args, "/".join(path))
        if value is not None:
            for part in reversed(path):
                value = {part: value}
            found = merge(found, value)
    if args.broker is not None:
        found["broker_host"], found["broker_port"] = args.broker
    if args.group_rule is not None:
        found["group_rule"] = args.group_rule
    if args.heartbeat_only:
        found["heartbeat_only"] = True
    for setting in args.settings:
        found = merge(found, setting)
    return found


def config_from_args(args: argparse.Namespace) -> SimConfig:
    """Turn parsed arguments (and the scenario they name) into a `SimConfig`.

    Raises:
        ScenarioError: the scenario, or an option, is not valid.
    """
    return load_scenario(args.scenario, overrides_from_args(args))


async def _run(config: SimConfig, duration: float | None) -> Simulator:
    simulator = Simulator(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    timer = loop.call_later(duration, stop.set) if duration is not None else None
    try:
        await simulator.run(stop)
    finally:
        if timer is not None:
            timer.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return simulator


def main(argv: list[str] | None = None) -> int:
    """Run the simulator and print its report; return the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    try:
        config = config_from_args(args)
    except ScenarioError as exc:
        print(f"invalid scenario:\n{exc}", file=sys.stderr)
        return 2
    if args.check:
        print(config.model_dump_json(indent=2))
        return 0
    simulator = None
    with contextlib.suppress(KeyboardInterrupt):
        simulator = asyncio.run(_run(config, args.duration))
    if simulator is None:
        return 1
    report = simulator.report()
    print(json.dumps(report, indent=2, sort_keys=True))
    print(render_summary(report), file=sys.stderr)
    return 0 if report["integrity"]["ok"] else 3


if __name__ == "__main__":
    sys.exit(main())
