"""A synchronous MQTT v5 test client that records every acknowledgement it gets."""

import threading
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

WAIT_S = 10.0


class Probe:
    """One MQTT v5 connection; waits are bounded and event-driven, never sleeps."""

    def __init__(
        self,
        host: str,
        port: int,
        username: str,
        password: str,
        *,
        client_id: str = "",
        clean_start: bool = True,
        session_expiry_s: int = 0,
    ) -> None:
        self.host, self.port = host, port
        self.clean_start = clean_start
        self.session_expiry_s = session_expiry_s
        # No automatic reconnect: a test must see every disconnect, and a reconnecting
        # client would take its session back from the one the test connected next.
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or username,
            protocol=mqtt.MQTTv5,
            reconnect_on_failure=False,
        )
        self.client.username_pw_set(username, password)
        self._cond = threading.Condition()
        self.connack: ReasonCode | None = None
        self.disconnect_reason: ReasonCode | None = None
        self.disconnected = False
        self.pubacks: dict[int, ReasonCode] = {}
        self.subacks: dict[int, list[ReasonCode]] = {}
        self.messages: list[mqtt.MQTTMessage] = []
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    # callbacks run on paho's network thread
    def _on_connect(self, _c: Any, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        with self._cond:
            self.connack = rc
            self._cond.notify_all()

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        with self._cond:
            self.disconnected = True
            self.disconnect_reason = rc
            self._cond.notify_all()

    def _on_publish(self, _c: Any, _u: Any, mid: int, rc: ReasonCode, _p: Any) -> None:
        with self._cond:
            self.pubacks[mid] = rc
            self._cond.notify_all()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, rcs: list[ReasonCode], _p: Any) -> None:
        with self._cond:
            self.subacks[mid] = rcs
            self._cond.notify_all()

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()

    def wait_for(self, predicate: Any, what: str = "condition") -> None:
        """Wait until `predicate()` holds (checked on every callback)."""
        self._wait(predicate, what)

    def _wait(self, predicate: Any, what: str) -> None:
        with self._cond:
            if not self._cond.wait_for(predicate, timeout=WAIT_S):
                raise TimeoutError(what)

    def connect(self) -> ReasonCode:
        """Connect and return the CONNACK reason code (success or refusal)."""
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = self.session_expiry_s
        self.client.connect(
            self.host, self.port, keepalive=30, clean_start=self.clean_start, properties=properties
        )
        self.client.loop_start()
        self._wait(lambda: self.connack is not None or self.disconnected, "CONNACK")
        assert self.connack is not None
        return self.connack

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> ReasonCode:
        """Publish at QoS 1 and return the PUBACK reason code."""
        info = self.client.publish(topic, payload, qos=1, retain=retain, properties=properties)
        self._wait(lambda: info.mid in self.pubacks, f"PUBACK of {topic}")
        return self.pubacks[info.mid]

    def subscribe(self, topic: str) -> ReasonCode:
        """Subscribe at QoS 1 and return the SUBACK reason code."""
        _, mid = self.client.subscribe(topic, qos=1)
        self._wait(lambda: mid in self.subacks, f"SUBACK of {topic}")
        return self.subacks[mid][0]

    def wait_message(self, topic: str) -> mqtt.MQTTMessage:
        """Wait for a message on `topic` and return it."""
        self._wait(lambda: any(m.topic == topic for m in self.messages), f"message on {topic}")
        return next(m for m in self.messages if m.topic == topic)

    def wait_disconnected(self) -> ReasonCode | None:
        """Wait until the broker closes the connection; return its reason, if any."""
        self._wait(lambda: self.disconnected, "disconnect")
        return self.disconnect_reason

    def topics(self) -> list[str]:
        """Topics of the messages received so far, in order."""
        with self._cond:
            return [m.topic for m in self.messages]

    def close(self) -> None:
        """Disconnect (if connected) and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()
