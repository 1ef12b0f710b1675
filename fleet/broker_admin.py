"""Provision terminals and groups in Mosquitto's dynamic-security plugin at run time.

Commands go to ``$CONTROL/dynamic-security/v1`` in batches; the plugin answers every
batch with one message on ``.../response`` holding one response per command, each
carrying back the command's ``correlationData``, which is how answers find their
callers. "Already exists" answers count as success, so every call is idempotent.

Costs on mosquitto 2.0 to know about:

* adding a client to, or removing it from, a group disconnects that client if it is
  online (dynsec's way of enforcing new ACLs);
* the plugin rewrites its whole JSON file after *every* command, so bulk operations are
  quadratic: about 17 s for 1000 new terminals (two commands each), 30 s for the next
  1000. Terminals known up front are better written into the file before the broker
  starts (`fleet.dynsec.bootstrap_document` takes them).
"""

import asyncio
import contextlib
import itertools
import json
import logging
import secrets
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any, Final, Self

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fleet import dynsec, protocol
from fleet.errors import BrokerAdminError
from fleet.settings import FleetSettings

logger = logging.getLogger(__name__)

#: Commands per request message at most.
BATCH_MAX_COMMANDS: Final = 200
# Request messages must stay under the broker's max_packet_size (16384 bytes).
_BATCH_MAX_BYTES: Final = 12_000
# Batches awaiting their answer at once; aiomqtt warns beyond 10 pending publishes.
_PIPELINE: Final = 8
# Errors that mean "the state is already what was asked for".
_BENIGN_MARKER: Final = "already"

Command = dict[str, Any]


class BrokerAdmin:
    """Async context manager: a controller connection to the dynamic-security API."""

    def __init__(
        self,
        host: str,
        port: int,
        username: str,
        password: str,
        *,
        reserved_usernames: Iterable[str] = (),
        timeout_s: float = 120.0,
        client_id: str | None = None,
        dynamic_security: bool = True,
    ) -> None:
        """Prepare (not open) the connection.

        Args:
            host: Broker host.
            port: Broker port.
            username: A broker identity with the ``controller`` role; not the one the
                ingest session uses (see `fleet.dynsec.admin_username`).
            password: Its password.
            reserved_usernames: Names that must never become terminals.
            timeout_s: How long one batch may wait for the broker's answer; the broker
                works through pipelined batches one after another, so this covers
                several batches' work.
            client_id: The MQTT client id; the username by default.
            dynamic_security: False where the broker reads identities and ACLs from the
                fleet database itself (EMQX, deploy/emqx/): then nothing is sent to a
                dynamic-security plugin, and only `publish` reaches the broker.
        """
        self.host = host
        self.port = port
        self.username = username
        self._password = password
        self._reserved = frozenset(reserved_usernames) | {username}
        self._timeout_s = timeout_s
        self._client: aiomqtt.Client | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[Command]] = {}
        self._prefix = secrets.token_hex(4)
        self._counter = itertools.count()
        self._window = asyncio.Semaphore(_PIPELINE)
        self._client_id = client_id or username
        self._dynamic_security = dynamic_security

    @classmethod
    def from_settings(cls, settings: FleetSettings) -> Self:
        """Connect as the controller's admin identity described by the settings."""
        if settings.broker_acl == "database":
            # The controller's own identity, under a client id of its own: the broker
            # lets it use any, and its sessions must not take over ingest's.
            return cls(
                settings.mqtt_host,
                settings.mqtt_port,
                settings.mqtt_username,
                settings.mqtt_password,
                reserved_usernames=dynsec.reserved_usernames(settings.mqtt_username),
                client_id=f"{settings.mqtt_client_id or settings.mqtt_username}-admin",
                dynamic_security=False,
            )
        return cls(
            settings.mqtt_host,
            settings.mqtt_port,
            dynsec.admin_username(settings.mqtt_username),
            settings.mqtt_password,
            reserved_usernames=dynsec.reserved_usernames(settings.mqtt_username),
        )

    async def __aenter__(self) -> Self:
        """Connect, subscribe to the response topic and start reading answers."""
        client = aiomqtt.Client(
            self.host,
            self.port,
            username=self.username,
            password=self._password,
            identifier=self._client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=True,
            logger=logger,
        )
        try:
            await client.__aenter__()
        except (aiomqtt.MqttError, OSError, TimeoutError) as exc:
            raise BrokerAdminError("connect", str(exc)) from exc
        self._client = client
        if not self._dynamic_security:
            return self
        try:
            _check_granted(await client.subscribe(dynsec.RESPONSE_TOPIC, qos=1))
        except BaseException:
            self._client = None
            await client.__aexit__(None, None, None)
            raise
        self._reader = asyncio.create_task(self._read(client), name="broker-admin-reader")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop reading and disconnect; pending calls fail.

        Raises:
            BrokerAdminError: the disconnect failed (only when nothing else is raised).
        """
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        if self._client is not None:
            client, self._client = self._client, None
            try:
                await client.__aexit__(exc_type, exc, tb)
            except (aiomqtt.MqttError, OSError) as failed:
                if exc is None:
                    raise BrokerAdminError("disconnect", str(failed)) from failed
                logger.warning("broker admin disconnect failed too: %s", failed)

    async def _read(self, client: aiomqtt.Client) -> None:
        try:
            await self._read_responses(client)
        except aiomqtt.MqttError as exc:
            # Taken over (another session with our client id) or dropped: callers fail
            # now rather than at their timeout.
            lost = BrokerAdminError("connection", f"lost the broker connection: {exc}")
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(lost)

    async def _read_responses(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            if not message.topic.matches(dynsec.RESPONSE_TOPIC):
                continue
            try:
                body = json.loads(bytes(message.payload))
                responses = body["responses"]
            except (TypeError, ValueError, KeyError):
                logger.warning("unreadable dynsec response: %.200r", message.payload)
                continue
            for response in responses:
                future = self._pending.pop(str(response.get("correlationData")), None)
                if future is None:
                    logger.warning("dynsec response without a caller: %.200r", response)
                elif not future.done():
                    future.set_result(response)

    async def execute(self, commands: Sequence[Command]) -> list[Command]:
        """Run dynamic-security commands in batches and return their responses in order.

        Args:
            commands: Commands as the plugin documents them (``{"command": ..., ...}``).

        Returns:
            One response per command; benign "already exists" errors included.

        Raises:
            BrokerAdminError: a command failed (other than "already exists"), or the broker
                did not answer in time.
        """
        if not self._dynamic_security:
            # The broker asks the fleet database, which the caller has already changed.
            return [{"command": command["command"]} for command in commands]
        batches = list(_batches(commands))
        results = await asyncio.gather(*(self._send_limited(batch) for batch in batches))
        responses = [response for batch in results for response in batch]
        for command, response in zip(commands, responses, strict=True):
            error = response.get("error")
            if error and _BENIGN_MARKER not in str(error):
                raise BrokerAdminError(str(command["command"]), str(error))
        return responses

    async def _send_limited(self, batch: list[Command]) -> list[Command]:
        # FIFO semaphore: batches reach the broker in order, so a command may depend on
        # one in an earlier batch (createClient on its createRole).
        async with self._window:
            return await self._send(batch)

    async def _send(self, batch: list[Command]) -> list[Command]:
        if self._client is None:
            raise BrokerAdminError(batch[0]["command"], "not connected")
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Command]] = []
        tagged = []
        for command in batch:
            tag = f"{self._prefix}-{next(self._counter)}"
            future: asyncio.Future[Command] = loop.create_future()
            self._pending[tag] = future
            futures.append(future)
            tagged.append({**command, "correlationData": tag})
        payload = json.dumps({"commands": tagged}, separators=(",", ":"))
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._client.publish(
                    dynsec.CONTROL_TOPIC, payload, qos=1, timeout=self._timeout_s
                )
                return list(await asyncio.gather(*futures))
        except (TimeoutError, aiomqtt.MqttError):
            raise BrokerAdminError(
                str(batch[0]["command"]), f"no answer within {self._timeout_s:.0f}s"
            ) from None
        finally:
            for command in tagged:
                self._pending.pop(command["correlationData"], None)

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        expiry_s: int | None = None,
    ) -> None:
        """Publish as the controller (for operator commands that must reach terminals)."""
        if self._client is None:
            raise BrokerAdminError("publish", "not connected")
        properties = None
        if expiry_s is not None:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.MessageExpiryInterval = expiry_s
        await self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)

    def _check_ids(self, tids: Iterable[str]) -> list[str]:
        checked = list(tids)
        for tid in checked:
            if not protocol.is_valid_id(tid):
                raise ValueError(f"invalid terminal id {tid!r}")
            if tid in self._reserved:
                raise ValueError(f"{tid!r} is a reserved broker username")
        return checked

    async def ensure_terminals(self, tids: Sequence[str], secret: str) -> None:
        """Create broker identities for terminals that do not have one yet.

        Each gets username = client id = terminal id, the password
        `fleet.protocol.derive_terminal_password` derives, the shared ``terminal`` role
        and a role of its own with its topics' ACLs. An existing identity is left as it
        is (its password is not reset).

        Raises:
            ValueError: an id is not a valid terminal id, or is reserved.
            BrokerAdminError: the broker refused a command.
        """
        commands: list[Command] = []
        for tid in self._check_ids(tids):
            role = dynsec.terminal_role(tid)
            commands += [
                {"command": "createRole", "rolename": role, "acls": dynsec.terminal_acls(tid)},
                {
                    "command": "createClient",
                    "username": tid,
                    "password": protocol.derive_terminal_password(secret, tid),
                    "roles": [{"rolename": dynsec.TERMINAL_ROLE}, {"rolename": role}],
                },
            ]
        await self.execute(commands)
        logger.info("ensured %d terminal identities", len(commands) // 2)

    async def ensure_group(self, group: str) -> None:
        """Create a group whose members may subscribe to and receive its topics only.

        Raises:
            ValueError: the name is not a valid group name.
            BrokerAdminError: the broker refused a command.
        """
        if not protocol.is_valid_id(group):
            raise ValueError(f"invalid group name {group!r}")
        role = dynsec.group_role(group)
        await self.execute(
            [
                {"command": "createRole", "rolename": role, "acls": dynsec.group_acls(group)},
                {"command": "createGroup", "groupname": group, "roles": [{"rolename": role}]},
            ]
        )

    async def add_to_group(self, group: str, tids: Sequence[str]) -> None:
        """Make terminals members of a group; online ones are disconnected by the broker.

        Raises:
            BrokerAdminError: the group or a terminal does not exist.
        """
        await self.execute(
            [
                {"command": "addGroupClient", "groupname": group, "username": tid}
                for tid in self._check_ids(tids)
            ]
        )

    async def remove_from_group(self, group: str, tids: Sequence[str]) -> None:
        """Remove terminals from a group; deliveries of its topics stop at once.

        Raises:
            BrokerAdminError: the group or a terminal does not exist.
        """
        await self.execute(
            [
                {"command": "removeGroupClient", "groupname": group, "username": tid}
                for tid in self._check_ids(tids)
            ]
        )

    async def disable_terminal(self, tid: str) -> None:
        """Refuse a terminal's logins from now on and disconnect it if online.

        Raises:
            BrokerAdminError: the terminal does not exist.
        """
        if not self._dynamic_security:
            raise BrokerAdminError(
                "disableClient", "this broker reads identities from the fleet database"
            )
        await self.execute([{"command": "disableClient", "username": self._check_ids([tid])[0]}])


def _check_granted(granted: Sequence[object]) -> None:
    codes = [int(getattr(code, "value", code)) for code in granted]  # type: ignore[call-overload]
    if any(code >= 0x80 for code in codes):
        raise BrokerAdminError("subscribe", f"response topic refused: {codes}")


def _batches(commands: Sequence[Command]) -> Iterable[list[Command]]:
    batch: list[Command] = []
    size = 0
    for command in commands:
        # Rough size with room for the correlation tag added later.
        cost = len(json.dumps(command, separators=(",", ":"))) + 40
        if batch and (len(batch) >= BATCH_MAX_COMMANDS or size + cost > _BATCH_MAX_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(command)
        size += cost
    if batch:
        yield batch
