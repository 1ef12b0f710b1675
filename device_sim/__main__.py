"""Command line: ``python -m device_sim --count 1000 --broker 127.0.0.1:1883 --secret ...``.

Runs until ``--duration`` elapses or SIGINT/SIGTERM arrives, then prints the report as
JSON on stdout.
"""

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys

from device_sim.config import Faults, SimConfig, Timing
from device_sim.fleet import Simulator

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


def build_parser() -> argparse.ArgumentParser:
    """Return the CLI's argument parser."""
    t, f, c = Timing(), Faults(), SimConfig()
    p = argparse.ArgumentParser(prog="python -m device_sim", description=__doc__)
    p.add_argument("--count", type=int, default=c.count, help="terminals in this process")
    p.add_argument("--start", type=int, default=c.start, help="number of the first terminal")
    p.add_argument("--prefix", default=c.id_prefix, help="terminal id prefix")
    p.add_argument("--digits", type=int, default=c.id_digits, help="digits after the prefix")
    p.add_argument("--broker", type=_broker, default=("127.0.0.1", 1883), help="host:port")
    p.add_argument("--secret", default=c.secret, help="provisioning secret")
    p.add_argument("--groups", type=_csv, default=c.groups, help="comma-separated groups")
    p.add_argument(
        "--group-rule",
        choices=["round_robin", "all"],
        default=c.group_rule,
        help="one group per terminal in turn, or every group for each",
    )
    p.add_argument("--models", type=_models, default=c.models, help="name:weight,...")
    p.add_argument(
        "--versions", type=_versions, default=c.initial_versions, help="package=version,..."
    )
    p.add_argument("--merchants", type=_csv, default=[], help="merchant ids, in turn")
    p.add_argument("--timezones", type=_csv, default=c.timezones, help="time zones to pick")
    p.add_argument("--seed", type=int, default=c.seed, help="RNG seed")
    p.add_argument(
        "--connect-concurrency",
        type=int,
        default=c.connect_concurrency,
        help="CONNECTs in flight at most",
    )
    p.add_argument(
        "--heartbeat-only", action="store_true", help="never update: ignore desired states"
    )
    p.add_argument("--heartbeat-s", type=float, default=t.heartbeat_s)
    p.add_argument("--download-bps", type=int, default=t.download_bps)
    p.add_argument("--install-s", type=float, default=t.install_s)
    p.add_argument("--reboot-s", type=float, default=t.reboot_s)
    p.add_argument("--self-test-s", type=float, default=t.self_test_s)
    p.add_argument("--busy-probability", type=float, default=t.busy_probability)
    p.add_argument("--busy-s", type=float, default=t.busy_s)
    p.add_argument(
        "--postpone-probability",
        type=float,
        default=t.postpone_probability,
        help="chance the merchant postpones an attempt that may be postponed",
    )
    p.add_argument("--drop-rate", type=float, default=f.download_drop_rate)
    p.add_argument("--corrupt-rate", type=float, default=f.corrupt_rate)
    p.add_argument("--install-fail-rate", type=float, default=f.install_fail_rate)
    p.add_argument("--self-test-fail-rate", type=float, default=f.self_test_fail_rate)
    p.add_argument("--self-test-fail-models", type=_csv, default=[])
    p.add_argument(
        "--self-test-fail-versions",
        type=_versions,
        default={},
        help="package=version,...: releases whose self-test fails",
    )
    p.add_argument(
        "--bricked-versions",
        type=_versions,
        default={},
        help="package=version,...: releases that never boot",
    )
    p.add_argument(
        "--degraded-versions",
        type=_versions,
        default={},
        help="package=version,...: releases with a raised card transaction error rate",
    )
    p.add_argument("--txn-error-rate", type=float, default=f.txn_error_rate)
    p.add_argument("--degraded-error-rate", type=float, default=f.degraded_error_rate)
    p.add_argument(
        "--duration", type=float, default=None, help="seconds to run; default: until signalled"
    )
    p.add_argument("--log-level", default="WARNING")
    return p


def config_from_args(args: argparse.Namespace) -> SimConfig:
    """Turn parsed arguments into a `SimConfig`."""
    host, port = args.broker
    return SimConfig(
        count=args.count,
        start=args.start,
        id_prefix=args.prefix,
        id_digits=args.digits,
        models=args.models,
        initial_versions=args.versions,
        groups=args.groups,
        group_rule=args.group_rule,
        merchants=args.merchants,
        timezones=args.timezones,
        broker_host=host,
        broker_port=port,
        secret=args.secret,
        connect_concurrency=args.connect_concurrency,
        heartbeat_only=args.heartbeat_only,
        seed=args.seed,
        timing=Timing(
            heartbeat_s=args.heartbeat_s,
            download_bps=args.download_bps,
            install_s=args.install_s,
            reboot_s=args.reboot_s,
            self_test_s=args.self_test_s,
            busy_probability=args.busy_probability,
            busy_s=args.busy_s,
            postpone_probability=args.postpone_probability,
        ),
        faults=Faults(
            download_drop_rate=args.drop_rate,
            corrupt_rate=args.corrupt_rate,
            install_fail_rate=args.install_fail_rate,
            self_test_fail_rate=args.self_test_fail_rate,
            self_test_fail_models=frozenset(args.self_test_fail_models),
            self_test_fail_versions=args.self_test_fail_versions,
            bricked_versions=args.bricked_versions,
            degraded_versions=args.degraded_versions,
            txn_error_rate=args.txn_error_rate,
            degraded_error_rate=args.degraded_error_rate,
        ),
    )


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
    except ValueError as exc:
        print(f"invalid configuration: {exc}", file=sys.stderr)
        return 2
    simulator = None
    with contextlib.suppress(KeyboardInterrupt):
        simulator = asyncio.run(_run(config, args.duration))
    if simulator is None:
        return 1
    report = simulator.report()
    print(json.dumps(report, indent=2, sort_keys=True))
    return 0 if report["integrity"]["ok"] else 3


if __name__ == "__main__":
    sys.exit(main())
