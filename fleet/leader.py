"""Leadership among controller replicas: one PostgreSQL session-level advisory lock.

Design note. What must happen once (the campaign runner, maintenance) runs only on the
replica that holds the lock ``try_leader_lock`` on a connection of its own, outside the
pool; every replica ingests and serves. The lock lives exactly as long as that session:
a leader that exits or crashes closes its socket and PostgreSQL releases the lock at once;
a leader cut off from the database loses it when the server notices the dead connection
(TCP keepalives and ``tcp_user_timeout``, set on the session below, bound that).

Fencing, with ``lease`` = ``leader_lease_s``:

* the leader confirms every ``lease / 4`` that its session still holds the lock, and steps
  down (`leading` clears) once its last confirmation is ``lease`` old, whether or not the
  check has answered: a hung connection fences it as surely as a failed one;
* a replica that takes the lock waits ``lease`` before it leads. The lock was free, so
  the old leader's session had ended, after its last confirmation: by then the old leader
  has stepped down.

What remains: this holds for a process that runs. One frozen mid-tick (a stopped VM, a
long pause) loses the lock (its idle session is ended after a lease) but does not look at
its clock until it resumes, and statements it had already sent still execute. The
runner's decisions are guarded state transitions and its commands are idempotent for
terminals, so such an overlap repeats work rather than corrupting it.

This module is the database boundary for its own connection, as `fleet.db.repository`
is for the pool: asyncpg's exceptions end here.
"""

import asyncio
import logging
import math

import asyncpg
from prometheus_client import Gauge

from fleet.db.repository import QUERIES

logger = logging.getLogger(__name__)

LEADING = Gauge("fleet_leader", "1 while this replica leads (runs the campaign runner).")


class _LockLostError(Exception):
    """The lock connection answers, but its session no longer holds the lock."""


#: Failures of the lock connection; each one ends this term (or this attempt).
_LOST = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError, _LockLostError)


class Leadership:
    """Compete for the leader lock; `leading` is set while this replica may decide."""

    def __init__(self, dsn: str, *, lease_s: float, name: str) -> None:
        """Prepare; nothing connects until `run`.

        Args:
            dsn: The fleet database.
            lease_s: See the module docstring (``leader_lease_s``).
            name: This replica, for ``pg_stat_activity`` and the logs.
        """
        self._dsn = dsn
        self._lease_s = lease_s
        self._check_s = lease_s / 4
        self.name = name
        #: Set while this replica leads; cleared on stepping down.
        self.leading = asyncio.Event()
        #: Set while this replica does not lead (the complement of `leading`).
        self.following = asyncio.Event()
        self.following.set()
        #: Terms led so far, counted when they begin.
        self.terms = 0
        #: When the lock was last known held (loop time a confirming query was sent).
        self._confirmed = 0.0

    @property
    def application_name(self) -> str:
        """How the lock connection shows in ``pg_stat_activity``."""
        return f"fleet-leader {self.name}"

    async def run(self, stop: asyncio.Event) -> None:
        """Take the lock, lead, and take it again after a loss, until `stop` is set.

        Leaving closes the lock connection, which hands the lock over.
        """
        while not stop.is_set():
            try:
                conn = await self._connect()
            except _LOST as exc:
                logger.warning(
                    "leader lock connection failed: %s", exc, extra={"action": "leader_unavailable"}
                )
                await _wait(stop, self._check_s)
                continue
            try:
                if await self._acquire(conn, stop):
                    await self._lead(conn, stop)
            except _LOST as exc:
                logger.warning(
                    "leader lock connection lost: %s", exc, extra={"action": "leader_unavailable"}
                )
            finally:
                self._step_down(stopping=stop.is_set())
                conn.terminate()

    async def _connect(self) -> asyncpg.Connection:
        # Server-side detection of a dead client, so the lock of a leader cut off from the
        # database is released in about a lease rather than after the OS default (hours).
        idle_s = max(1, math.ceil(self._lease_s))
        return await asyncpg.connect(
            self._dsn,
            timeout=max(self._lease_s, 5.0),
            server_settings={
                "application_name": self.application_name,
                "tcp_keepalives_idle": str(idle_s),
                "tcp_keepalives_interval": "1",
                "tcp_keepalives_count": "3",
                "tcp_user_timeout": str(idle_s * 1000),
                # A frozen leader (SIGSTOP, a paused VM or container, a stuck loop) still
                # answers keepalives from its kernel; its silence ends the session instead.
                # A live leader is never idle that long: it checks every lease / 4.
                "idle_session_timeout": str(max(1000, math.ceil(self._lease_s * 1000))),
            },
        )

    async def _acquire(self, conn: asyncpg.Connection, stop: asyncio.Event) -> bool:
        """Try for the lock until it is ours (True) or `stop` is set (False)."""
        while not stop.is_set():
            sent = self._now()
            if await conn.fetchval(QUERIES["try_leader_lock"], timeout=self._lease_s):
                self._confirmed = sent
                logger.info(
                    "leader lock taken; leading in %.1f s",
                    self._lease_s,
                    extra={"action": "leader_lock_taken"},
                )
                # The fence: whoever led before has stepped down by the end of this wait.
                return not await self._confirm_until(conn, stop, self._now() + self._lease_s)
            await _wait(stop, self._check_s)
        return False

    async def _lead(self, conn: asyncpg.Connection, stop: asyncio.Event) -> None:
        self.terms += 1
        self.following.clear()
        self.leading.set()
        LEADING.set(1)
        logger.info("leading", extra={"action": "leader_elected"})
        await self._confirm_until(conn, stop, math.inf)

    async def _confirm_until(
        self, conn: asyncpg.Connection, stop: asyncio.Event, until: float
    ) -> bool:
        """Confirm the lock every check interval until `until`; True if `stop` came first.

        Raises:
            TimeoutError: no confirmation for a lease (the caller steps down).
        """
        loop = asyncio.get_running_loop()
        while not stop.is_set() and self._now() < until:
            sent = self._now()
            # From the last confirmation, carried from the lock's taking into the term: the
            # lease never restarts without a fresh answer.
            async with asyncio.timeout_at(self._confirmed + self._lease_s):
                held = await conn.fetchval(QUERIES["holds_leader_lock"])
            if not held:
                raise _LockLostError
            # Held when the query was sent at the latest; the lease counts from there.
            self._confirmed = sent
            await _wait(stop, max(0.0, min(sent + self._check_s, until) - loop.time()))
        return stop.is_set()

    def _step_down(self, *, stopping: bool = False) -> None:
        if self.leading.is_set():
            # Handing over on a stop is the normal end of a term; anything else is news.
            level = logging.INFO if stopping else logging.WARNING
            logger.log(level, "stepped down", extra={"action": "leader_stepped_down"})
        self.leading.clear()
        self.following.set()
        LEADING.set(0)

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()


async def _wait(event: asyncio.Event, seconds: float) -> None:
    """Wait until `event` is set or `seconds` have passed, whichever comes first."""
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        pass
