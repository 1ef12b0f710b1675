"""The broker configuration and dynamic-security ACLs, against a real private Mosquitto.

"Nothing was delivered" is proven without waiting for time to pass: after the message
that must not arrive, a message that must arrive (a barrier) is sent; Mosquitto handles
messages in order, so once the barrier is in, the other one would have been too.
"""

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from fleet import dynsec, inventory, protocol
from fleet.broker_admin import BrokerAdmin
from fleet.db import Repository
from fleet.embedded import BROKER_CONFIG, RENDERED_KEYS, Mosquitto
from fleet.errors import BrokerAdminError
from fleet.protocol import MessageKind, desired_topic, terminal_topic
from fleet.settings import FleetSettings
from tests.conftest import CONTROLLER_PASSWORD, CONTROLLER_USERNAME, TERMINAL_SECRET
from tests.mqtt_probe import Probe

SUCCESS = 0x00
NO_MATCHING_SUBSCRIBERS = 0x10
GRANTED_QOS1 = 0x01
NOT_AUTHORIZED = 0x87
PACKET_TOO_LARGE = 0x95
ADMINISTRATIVE_ACTION = 0x98


def admin(broker: Mosquitto) -> BrokerAdmin:
    return BrokerAdmin(
        broker.host,
        broker.port,
        dynsec.admin_username(CONTROLLER_USERNAME),
        CONTROLLER_PASSWORD,
        reserved_usernames=dynsec.reserved_usernames(CONTROLLER_USERNAME),
    )


async def provision(
    broker: Mosquitto, tids: Sequence[str], groups: dict[str, Sequence[str]] | None = None
) -> None:
    async with admin(broker) as broker_admin:
        await broker_admin.ensure_terminals(tids, TERMINAL_SECRET)
        for group, members in (groups or {}).items():
            await broker_admin.ensure_group(group)
            await broker_admin.add_to_group(group, members)


@pytest.fixture
def probes(broker: Mosquitto) -> Iterator[list[Probe]]:
    """Connections made by a test; all closed at its end."""
    made: list[Probe] = []
    yield made
    for probe in made:
        probe.close()


@pytest.fixture
def connect(broker: Mosquitto, probes: list[Probe]):
    """Open a connection that must succeed: ``connect(username, password=..., **kw)``."""

    def _connect(username: str, password: str | None = None, **kwargs: object) -> Probe:
        if password is None:
            password = (
                CONTROLLER_PASSWORD
                if username == CONTROLLER_USERNAME
                else protocol.derive_terminal_password(TERMINAL_SECRET, username)
            )
        probe = Probe(broker.host, broker.port, username, password, **kwargs)  # type: ignore[arg-type]
        probes.append(probe)
        assert probe.connect().value == SUCCESS
        return probe

    return _connect


def _settings(text: str) -> list[tuple[str, str]]:
    pairs = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            key, _, value = stripped.partition(" ")
            pairs.append((key, value.strip()))
    return pairs


def test_rendered_config_differs_only_in_local_keys(broker: Mosquitto) -> None:
    committed = _settings(BROKER_CONFIG.read_text())
    rendered = _settings(broker.config_file.read_text())
    assert [kv for kv in committed if kv[0] not in RENDERED_KEYS] == [
        kv for kv in rendered if kv[0] not in RENDERED_KEYS
    ]
    assert dict(rendered)["listener"] == f"{broker.port} 127.0.0.1"
    assert ("user", "root") not in committed
    # The production choices the tests rely on are in the committed file itself.
    settings = dict(committed)
    assert settings["allow_anonymous"] == "false"
    assert settings["use_username_as_clientid"] == "true"
    assert int(settings["max_packet_size"]) > protocol.MAX_PAYLOAD_BYTES


def test_controller_logs_in_with_the_python_made_password_hash(broker: Mosquitto, connect) -> None:
    controller = connect(CONTROLLER_USERNAME)
    assert controller.subscribe(terminal_topic("+", MessageKind.EVENTS)).value == GRANTED_QOS1
    wrong = Probe(broker.host, broker.port, CONTROLLER_USERNAME, "not-the-password")
    try:
        assert wrong.connect().value == NOT_AUTHORIZED
    finally:
        wrong.close()
    anonymous = Probe(broker.host, broker.port, "", "")
    try:
        assert anonymous.connect().is_failure
    finally:
        anonymous.close()


async def test_terminal_publishes_only_to_its_own_topics(broker: Mosquitto, connect) -> None:
    await provision(broker, ["t1", "t2"])
    controller = connect(CONTROLLER_USERNAME)
    controller.subscribe("fleet/v1/#")
    t1 = connect("t1")

    assert t1.publish(terminal_topic("t1", MessageKind.EVENTS), b"1").value == SUCCESS
    for kind in (MessageKind.HEARTBEAT, MessageKind.PRESENCE, MessageKind.HELLO):
        assert t1.publish(terminal_topic("t1", kind), b"ok").value == SUCCESS
    assert t1.publish(terminal_topic("t2", MessageKind.EVENTS), b"x").value == NOT_AUTHORIZED
    assert t1.publish(terminal_topic("t1", MessageKind.CMD), b"x").value == NOT_AUTHORIZED
    assert t1.publish(terminal_topic("t2", MessageKind.CMD), b"x").value == NOT_AUTHORIZED
    assert t1.publish(desired_topic("A"), b"x", retain=True).value == NOT_AUTHORIZED
    assert t1.publish(terminal_topic("t1", MessageKind.EVENTS), b"2").value == SUCCESS

    barrier = terminal_topic("t1", MessageKind.EVENTS)
    controller.wait_message(barrier)
    controller.wait_for(lambda: [m.payload for m in controller.messages][-1:] == [b"2"])
    assert [(m.topic, m.payload) for m in controller.messages] == [
        (barrier, b"1"),
        (terminal_topic("t1", MessageKind.HEARTBEAT), b"ok"),
        (terminal_topic("t1", MessageKind.PRESENCE), b"ok"),
        (terminal_topic("t1", MessageKind.HELLO), b"ok"),
        (barrier, b"2"),
    ]


async def test_terminal_cannot_subscribe_to_others_topics(broker: Mosquitto, connect) -> None:
    await provision(broker, ["t1", "t2"], {"B": ["t2"]})
    t1 = connect("t1")
    for topic in (
        terminal_topic("t2", MessageKind.CMD),
        terminal_topic("+", MessageKind.CMD),
        terminal_topic("t2", MessageKind.EVENTS),
        "fleet/v1/#",
        "#",
        desired_topic("B"),
        desired_topic("+"),
    ):
        assert t1.subscribe(topic).value == NOT_AUTHORIZED, topic
    assert t1.subscribe(terminal_topic("t1", MessageKind.CMD)).value == GRANTED_QOS1

    controller = connect(CONTROLLER_USERNAME)
    controller.publish(terminal_topic("t2", MessageKind.CMD), b"for t2")
    controller.publish(desired_topic("B"), b"for B")
    controller.publish(terminal_topic("t1", MessageKind.CMD), b"barrier")
    t1.wait_message(terminal_topic("t1", MessageKind.CMD))
    assert t1.topics() == [terminal_topic("t1", MessageKind.CMD)]


async def test_group_member_receives_its_groups_retained_state_only(
    broker: Mosquitto, connect
) -> None:
    await provision(broker, ["t1", "t2"], {"A": ["t1"], "B": ["t2"]})
    controller = connect(CONTROLLER_USERNAME)
    assert controller.publish(desired_topic("A"), b"state A", retain=True).value in {
        SUCCESS,
        NO_MATCHING_SUBSCRIBERS,
    }
    controller.publish(desired_topic("B"), b"state B", retain=True)

    t1 = connect("t1")
    assert t1.subscribe(desired_topic("B")).value == NOT_AUTHORIZED
    assert t1.subscribe(desired_topic("A")).value == GRANTED_QOS1
    assert t1.subscribe(terminal_topic("t1", MessageKind.CMD)).value == GRANTED_QOS1
    retained = t1.wait_message(desired_topic("A"))
    assert (retained.payload, retained.retain) == (b"state A", True)
    controller.publish(desired_topic("B"), b"state B2", retain=True)
    controller.publish(terminal_topic("t1", MessageKind.CMD), b"barrier")
    t1.wait_message(terminal_topic("t1", MessageKind.CMD))
    assert t1.topics() == [desired_topic("A"), terminal_topic("t1", MessageKind.CMD)]


async def test_removed_member_stops_receiving_on_its_kept_subscription(
    broker: Mosquitto, connect
) -> None:
    await provision(broker, ["t1"], {"A": ["t1"]})
    t1 = connect("t1", session_expiry_s=600)
    t1.subscribe(desired_topic("A"))
    t1.subscribe(terminal_topic("t1", MessageKind.CMD))

    async with admin(broker) as broker_admin:
        await broker_admin.remove_from_group("A", ["t1"])
    # dynsec disconnects a client whose group membership changed.
    assert t1.wait_disconnected().value == ADMINISTRATIVE_ACTION

    # The session, with its subscription to A, survives; the receive ACL stops delivery.
    again = connect("t1", clean_start=False, session_expiry_s=600)
    controller = connect(CONTROLLER_USERNAME)
    controller.publish(desired_topic("A"), b"after removal", retain=True)
    controller.publish(terminal_topic("t1", MessageKind.CMD), b"barrier")
    again.wait_message(terminal_topic("t1", MessageKind.CMD))
    assert again.topics() == [terminal_topic("t1", MessageKind.CMD)]
    assert again.subscribe(desired_topic("A")).value == NOT_AUTHORIZED


async def test_another_terminals_username_with_own_password_is_refused(broker: Mosquitto) -> None:
    await provision(broker, ["t1", "t2"])
    own_password = protocol.derive_terminal_password(TERMINAL_SECRET, "t1")
    impostor = Probe(broker.host, broker.port, "t2", own_password)
    try:
        assert impostor.connect().value == NOT_AUTHORIZED
    finally:
        impostor.close()


async def test_client_id_is_replaced_by_username(broker: Mosquitto, connect) -> None:
    await provision(broker, ["t1", "t2"])
    victim = connect("t1")
    attacker = connect("t2", client_id="t1")
    # The victim's session was not taken over: it is still connected and can publish.
    assert victim.publish(terminal_topic("t1", MessageKind.EVENTS), b"x").value in {
        SUCCESS,
        NO_MATCHING_SUBSCRIBERS,
    }
    assert not victim.disconnected
    # The attacker's client id is really "t2": another "t2" login takes its session over.
    connect("t2", client_id="something-else")
    # Mosquitto 2.0.11 just closes the old connection, without a DISCONNECT 0x8E.
    attacker.wait_disconnected()
    assert "Client t2 already connected, closing old connection." in broker.log_file.read_text()
    assert not victim.disconnected


async def test_admin_connection_does_not_take_over_the_controllers_session(
    broker: Mosquitto, connect
) -> None:
    controller = connect(CONTROLLER_USERNAME)
    await provision(broker, ["t1"])
    assert controller.publish(terminal_topic("t1", MessageKind.CMD), b"x").value in {
        SUCCESS,
        NO_MATCHING_SUBSCRIBERS,
    }
    assert not controller.disconnected


async def test_oversized_payload_reaches_ingest_but_huge_one_disconnects(
    broker: Mosquitto, connect
) -> None:
    await provision(broker, ["t1"])
    controller = connect(CONTROLLER_USERNAME)
    controller.subscribe(terminal_topic("+", MessageKind.EVENTS))
    t1 = connect("t1")
    topic = terminal_topic("t1", MessageKind.EVENTS)

    too_large_for_protocol = b"x" * (protocol.MAX_PAYLOAD_BYTES + 1000)
    assert t1.publish(topic, too_large_for_protocol).value == SUCCESS
    assert controller.wait_message(topic).payload == too_large_for_protocol

    t1.client.publish(topic, b"x" * 20_000, qos=1)
    assert t1.wait_disconnected().value == PACKET_TOO_LARGE


async def test_broker_admin_is_idempotent_and_raises_typed_errors(
    broker: Mosquitto, connect
) -> None:
    tids = [f"term-{i:04d}" for i in range(150)]
    async with admin(broker) as broker_admin:
        await broker_admin.ensure_terminals(tids, TERMINAL_SECRET)
        await broker_admin.ensure_terminals(tids, TERMINAL_SECRET)
        await broker_admin.ensure_group("A")
        await broker_admin.ensure_group("A")
        await broker_admin.add_to_group("A", tids)
        await broker_admin.add_to_group("A", tids[:3])

        with pytest.raises(BrokerAdminError) as raised:
            await broker_admin.add_to_group("no-such-group", tids[:1])
        assert (raised.value.command, raised.value.error) == ("addGroupClient", "Group not found")
        with pytest.raises(ValueError, match="reserved"):
            await broker_admin.ensure_terminals([CONTROLLER_USERNAME], TERMINAL_SECRET)
        with pytest.raises(ValueError, match="invalid"):
            await broker_admin.ensure_terminals(["a/b"], TERMINAL_SECRET)

        responses = await broker_admin.execute([{"command": "getGroup", "groupname": "A"}])
        members = {c["username"] for c in responses[0]["data"]["group"]["clients"]}
        assert members == set(tids)

    last = connect(tids[-1])
    async with admin(broker) as broker_admin:
        await broker_admin.disable_terminal(tids[-1])
    assert last.wait_disconnected() is not None
    refused = Probe(
        broker.host,
        broker.port,
        tids[-1],
        protocol.derive_terminal_password(TERMINAL_SECRET, tids[-1]),
    )
    try:
        assert refused.connect().value == NOT_AUTHORIZED
    finally:
        refused.close()


async def test_restart_keeps_retained_messages_and_identities(broker: Mosquitto) -> None:
    await provision(broker, ["t1"], {"A": ["t1"]})
    controller = Probe(broker.host, broker.port, CONTROLLER_USERNAME, CONTROLLER_PASSWORD)
    controller.connect()
    controller.publish(desired_topic("A"), b"kept", retain=True)
    controller.close()
    old_pid = broker.pid

    broker.restart()

    assert broker.pid != old_pid
    t1 = Probe(
        broker.host,
        broker.port,
        "t1",
        protocol.derive_terminal_password(TERMINAL_SECRET, "t1"),
    )
    try:
        assert t1.connect().value == SUCCESS
        t1.subscribe(desired_topic("A"))
        assert t1.wait_message(desired_topic("A")).payload == b"kept"
    finally:
        t1.close()


def test_bootstrap_file_is_private_and_has_the_controller_identities(broker: Mosquitto) -> None:
    assert broker.dynsec_file.stat().st_mode & 0o077 == 0
    document = json.loads(Path(broker.dynsec_file).read_text())
    usernames = {client["username"] for client in document["clients"]}
    assert {CONTROLLER_USERNAME, dynsec.admin_username(CONTROLLER_USERNAME)} <= usernames
    assert document["defaultACLAccess"] == {
        "publishClientSend": False,
        "publishClientReceive": False,
        "subscribe": False,
        "unsubscribe": True,
    }


def test_terminals_in_the_bootstrap_file_get_the_same_acls(tmp_path: Path) -> None:
    server = Mosquitto(controller_username=CONTROLLER_USERNAME)
    tids = [f"boot-{i:04d}" for i in range(2000)]
    server.start(tmp_path, CONTROLLER_PASSWORD, terminals=tids, terminal_secret=TERMINAL_SECRET)
    probe = Probe(
        server.host,
        server.port,
        tids[0],
        protocol.derive_terminal_password(TERMINAL_SECRET, tids[0]),
    )
    try:
        assert probe.connect().value == SUCCESS
        own = probe.publish(terminal_topic(tids[0], MessageKind.EVENTS), b"x")
        assert own.value == NO_MATCHING_SUBSCRIBERS
        other = probe.publish(terminal_topic(tids[1], MessageKind.EVENTS), b"x")
        assert other.value == NOT_AUTHORIZED
        assert probe.subscribe(terminal_topic(tids[0], MessageKind.CMD)).value == GRANTED_QOS1
    finally:
        probe.close()
        server.stop()


async def test_with_acls_in_the_database_provisioning_sends_the_broker_nothing_but_commands(
    broker: Mosquitto, repo: Repository, connect
) -> None:
    """`broker_acl = database` (EMQX reads the fleet database): no dynamic-security calls.

    Against Mosquitto, which does keep dynamic security, that shows as a terminal the
    database knows but the broker does not; the groups command still reaches terminals.
    """
    settings = FleetSettings(
        mqtt_host=broker.host,
        mqtt_port=broker.port,
        mqtt_username=CONTROLLER_USERNAME,
        mqtt_password=CONTROLLER_PASSWORD,
        broker_acl="database",
    )
    async with BrokerAdmin.from_settings(settings) as via_dynsec_too:
        pass  # the controller's own identity logs in; no response topic is needed
    assert via_dynsec_too.username == CONTROLLER_USERNAME
    async with BrokerAdmin(
        broker.host,
        broker.port,
        dynsec.admin_username(CONTROLLER_USERNAME),
        CONTROLLER_PASSWORD,
    ) as real:
        await real.ensure_terminals(["K1"], TERMINAL_SECRET)
    # Watched by the admin identity: on Mosquitto the client id is the username, and the
    # database-mode admin logs in as the controller itself.
    watcher = connect(dynsec.admin_username(CONTROLLER_USERNAME), password=CONTROLLER_PASSWORD)
    assert watcher.subscribe(terminal_topic("+", MessageKind.CMD)).value == GRANTED_QOS1
    async with BrokerAdmin.from_settings(settings) as admin:
        await inventory.provision_terminals(
            repo, admin, [{"id": "D1"}, {"id": "K1"}], TERMINAL_SECRET
        )
        await inventory.create_group(repo, admin, "eu")
        await inventory.assign_group(repo, admin, "eu", ["K1"])
        with pytest.raises(BrokerAdminError):
            await admin.disable_terminal("K1")
    # The groups command went out as the controller ...
    message = watcher.wait_message(terminal_topic("K1", MessageKind.CMD))
    assert json.loads(message.payload)["groups"] == ["eu"]
    # ... but D1 exists only in the database, so Mosquitto refuses it.
    stranger = Probe(
        broker.host, broker.port, "D1", protocol.derive_terminal_password(TERMINAL_SECRET, "D1")
    )
    try:
        assert stranger.connect().value == NOT_AUTHORIZED
    finally:
        stranger.close()
