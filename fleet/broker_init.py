"""One-shot broker initialisation: write the dynamic-security bootstrap file if absent.

``python -m fleet.broker_init PATH`` writes the file that Mosquitto's dynamic-security
plugin loads from ``plugin_opt_config_file`` (see broker_config/mosquitto.conf), with the
controller identities of ``FLEET_MQTT_USERNAME`` and ``FLEET_MQTT_PASSWORD`` (see
`fleet.dynsec.bootstrap_document`). docker-compose runs it before the broker starts, on
the broker's data volume.

An existing file is kept as it is: the plugin rewrites it after every change, so it holds
the terminals and groups provisioned since, and overwriting it would revoke them all.
Changing the controller's password later is therefore a dynamic-security command, not a
new bootstrap.

Like `fleet.__main__`, this is an entry point and reads its settings from the environment.
"""

import argparse
import logging
import sys
from pathlib import Path

from fleet import dynsec
from fleet.settings import FleetSettings

logger = logging.getLogger("fleet.broker_init")


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m fleet.broker_init``."""
    parser = argparse.ArgumentParser(
        prog="python -m fleet.broker_init",
        description="Write Mosquitto's dynamic-security bootstrap file unless it exists.",
    )
    parser.add_argument(
        "path",
        type=Path,
        help="the plugin's JSON file, as seen from this process (its directory must exist)",
    )
    parser.add_argument(
        "--replica",
        action="append",
        default=[],
        metavar="USERNAME",
        help="another controller identity (cluster mode: one per further replica), with "
        "the controller's role and password; repeatable",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Write the bootstrap file at the given path unless one is there; 0 on success."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    path: Path = args.path
    if path.exists():
        logger.info("%s exists; kept as it is", path)
        return 0
    if not path.parent.is_dir():
        logger.error("%s is not a directory (is the broker's data volume mounted?)", path.parent)
        return 1
    settings = FleetSettings()
    try:
        dynsec.write_bootstrap(
            path, settings.mqtt_username, settings.mqtt_password, replicas=args.replica
        )
    except OSError as exc:
        logger.error("cannot write %s: %s", path, exc)  # noqa: TRY400 - the reason is enough
        return 1
    logger.info(
        "wrote %s with the controller identities %s",
        path,
        ", ".join(sorted(dynsec.reserved_usernames(settings.mqtt_username) | set(args.replica))),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
