"""Mosquitto dynamic-security: roles, ACLs, password hashes and the bootstrap file.

The broker's identities live in the dynamic-security plugin's JSON file. `write_bootstrap`
writes its initial content (the controller identities and the ``terminal`` role), so no
``mosquitto_ctrl`` run is needed; `fleet.broker_admin` adds terminals and groups at run time
with the ACLs defined here.

Access model (``{tid}`` is the terminal's username, which is also its client id because
the broker runs with ``use_username_as_clientid``):

* default: deny publish, subscribe and *receive*; a client only gets what a role grants.
  Receive is denied too so that removing a terminal from a group stops deliveries on its
  existing subscription at once, and a subscription that slipped past a subscribe ACL
  still delivers nothing.
* role ``terminal.{tid}`` (one per terminal, as dynsec 2.0 has no ``%u`` substitution)
  publish ``fleet/v1/t/{tid}/{events,heartbeat,presence,hello}``, subscribe and receive
  ``fleet/v1/t/{tid}/cmd``; plus the shared, ACL-less marker role ``terminal``.
* role ``group.{group}`` (one per group, via a dynsec group): subscribe and receive
  ``fleet/v1/g/{group}/#``.
* role ``controller``: everything under ``fleet/#`` (also as a shared subscription,
  ``$share/{group}/fleet/...``, for cluster mode) and the dynamic-security API. Each
  controller replica has its own identity with this role.
"""

import base64
import hashlib
import json
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from fleet import protocol

TERMINAL_ROLE: Final = "terminal"
CONTROLLER_ROLE: Final = "controller"
CONTROL_TOPIC: Final = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC: Final = "$CONTROL/dynamic-security/v1/response"
#: Shared subscriptions of fleet topics, any group name (cluster mode, `fleet.mqtt`).
#: Mosquitto 2.0 checks a subscribe ACL against the whole filter, ``$share/{group}/``
#: included, so ``fleet/#`` alone refuses them (0x87; tests/test_cluster.py).
SHARED_FLEET: Final = "$share/+/fleet/#"
#: Suffix of the controller's second identity; see `admin_username`.
ADMIN_SUFFIX: Final = "-admin"

# What dynsec itself uses when it hashes a password (mosquitto 2.0: 12-byte salt,
# PBKDF2-HMAC-SHA512, 64-byte hash); 101 iterations is its default, kept for parity.
_SALT_BYTES: Final = 12
_DEFAULT_ITERATIONS: Final = 101

Acl = dict[str, Any]


def admin_username(controller_username: str) -> str:
    """Return the username `fleet.broker_admin.BrokerAdmin` connects with.

    The broker replaces client ids by usernames, so two connections with the controller's
    username would take over each other's session; the admin connection therefore has
    its own identity with the same role and password.
    """
    return controller_username + ADMIN_SUFFIX


def reserved_usernames(controller_username: str) -> frozenset[str]:
    """Usernames that must never be provisioned as terminals."""
    return frozenset({controller_username, admin_username(controller_username)})


def hash_password(
    password: str, *, salt: bytes | None = None, iterations: int = _DEFAULT_ITERATIONS
) -> dict[str, Any]:
    """Return a dynsec client's password fields for a plain-text password.

    Args:
        password: The plain-text password.
        salt: 12 bytes of salt; random when omitted.
        iterations: PBKDF2 iterations.

    Returns:
        The ``password``, ``salt`` and ``iterations`` fields of a dynsec client entry.
    """
    salt = secrets.token_bytes(_SALT_BYTES) if salt is None else salt
    if len(salt) != _SALT_BYTES:
        raise ValueError(f"dynsec salts are {_SALT_BYTES} bytes")
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return {
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": iterations,
    }


def _acl(acltype: str, topic: str) -> Acl:
    return {"acltype": acltype, "topic": topic, "priority": 0, "allow": True}


def terminal_role(terminal_id: str) -> str:
    """Name of the role that holds one terminal's ACLs."""
    return f"{TERMINAL_ROLE}.{terminal_id}"


def terminal_acls(terminal_id: str) -> list[Acl]:
    """ACLs of one terminal's role: its own topics only.

    Mosquitto 2.0's dynamic-security plugin does not substitute ``%u``/``%c`` in ACL
    topics (checked on 2.0.11), so every terminal gets a role of its own with literal
    topics instead of one shared role with a pattern.
    """
    own = f"{protocol.TOPIC_ROOT}/t/{terminal_id}"
    sends = [
        protocol.MessageKind.EVENTS,
        protocol.MessageKind.HEARTBEAT,
        protocol.MessageKind.PRESENCE,
        protocol.MessageKind.HELLO,
    ]
    cmd = f"{own}/{protocol.MessageKind.CMD.value}"
    return [
        *(_acl("publishClientSend", f"{own}/{kind.value}") for kind in sends),
        # Literal: a wildcard subscription is never a terminal's business.
        _acl("subscribeLiteral", cmd),
        _acl("publishClientReceive", cmd),
    ]


def group_role(group: str) -> str:
    """Name of the role that lets a dynsec group's members read the group's topics."""
    return f"group.{group}"


def group_acls(group: str) -> list[Acl]:
    """ACLs of a group's role: subscribe to and receive ``fleet/v1/g/{group}/#`` only."""
    topics = f"{protocol.TOPIC_ROOT}/g/{group}/#"
    return [_acl("subscribePattern", topics), _acl("publishClientReceive", topics)]


def controller_acls() -> list[Acl]:
    """ACLs of the ``controller`` role: all fleet topics and the dynsec API."""
    # All protocol versions, so a v2 rollout does not need an ACL change first.
    fleet = "fleet/#"
    return [
        _acl("publishClientSend", fleet),
        _acl("publishClientReceive", fleet),
        _acl("subscribePattern", fleet),
        _acl("subscribePattern", SHARED_FLEET),
        _acl("publishClientSend", "$CONTROL/dynamic-security/#"),
        _acl("subscribeLiteral", RESPONSE_TOPIC),
        _acl("publishClientReceive", RESPONSE_TOPIC),
    ]


def bootstrap_document(
    controller_username: str,
    controller_password: str,
    *,
    terminals: Sequence[str] = (),
    terminal_secret: str = "",
    replicas: Sequence[str] = (),
) -> dict[str, Any]:
    """Return the initial dynamic-security document.

    Args:
        controller_username: The controller's broker username (``FLEET_MQTT_USERNAME``).
        controller_password: Its password; the admin identity gets the same one.
        replicas: More controller usernames, with the same role and password: one per
            further replica of a cluster, since the broker makes the client id the
            username (``use_username_as_clientid``) and replicas need their own.
        terminals: Terminal ids to provision up front, exactly as
            `fleet.broker_admin.BrokerAdmin.ensure_terminals` would, but without the
            plugin's per-command file rewrite (which makes bulk provisioning slow).
        terminal_secret: The secret terminal passwords are derived from.
    """
    reserved = reserved_usernames(controller_username) | set(replicas)
    if any(tid in reserved or not protocol.is_valid_id(tid) for tid in terminals):
        raise ValueError("terminal ids must be valid and not the controller's usernames")
    clients = [
        {
            "username": name,
            "textname": "fleet controller",
            "roles": [{"rolename": CONTROLLER_ROLE}],
            **hash_password(controller_password),
        }
        for name in (controller_username, admin_username(controller_username), *replicas)
    ]
    clients += [
        {
            "username": tid,
            "roles": [{"rolename": TERMINAL_ROLE}, {"rolename": terminal_role(tid)}],
            **hash_password(protocol.derive_terminal_password(terminal_secret, tid)),
        }
        for tid in terminals
    ]
    terminal_roles = [
        {"rolename": terminal_role(tid), "acls": terminal_acls(tid)} for tid in terminals
    ]
    return {
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": False,
            "subscribe": False,
            "unsubscribe": True,
        },
        "clients": clients,
        "groups": [],
        "roles": [
            {"rolename": CONTROLLER_ROLE, "acls": controller_acls()},
            # Shared by every terminal identity: marks it as a terminal; fleet-wide terminal
            # ACLs would go here. The per-terminal ACLs are in `terminal_role` roles.
            {"rolename": TERMINAL_ROLE, "acls": []},
            *terminal_roles,
        ],
    }


def write_bootstrap(
    path: Path,
    controller_username: str,
    controller_password: str,
    *,
    terminals: Sequence[str] = (),
    terminal_secret: str = "",
    replicas: Sequence[str] = (),
) -> None:
    """Write the initial dynamic-security file, readable by its owner only.

    Args:
        path: Where the plugin's ``plugin_opt_config_file`` points.
        controller_username: The controller's broker username.
        controller_password: The controller's broker password.
        terminals: Terminal ids to provision up front (see `bootstrap_document`).
        terminal_secret: The secret terminal passwords are derived from.
        replicas: More controller usernames (see `bootstrap_document`).
    """
    document = bootstrap_document(
        controller_username,
        controller_password,
        terminals=terminals,
        terminal_secret=terminal_secret,
        replicas=replicas,
    )
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(document, handle, indent=2)
    tmp.replace(path)
