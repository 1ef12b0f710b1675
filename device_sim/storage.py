"""A terminal's flash: two software slots (A/B), the boot control block, the local data.

A power loss keeps what is here and loses the rest of the terminal's state (the terminal
keeps a few more notes on flash: its event `seq`, the attempts it took, its groups and
the install journal). The bootloader follows the A/B rules of Android's `boot_control`
and Mender's dual root file systems:

- Switching slots is one atomic write of the boot control block (`active`, `confirmed`,
  `tries`): after a power loss the switch either happened or did not, nothing between.
- A switch makes the new slot active and unconfirmed with one boot try. A boot into an
  unconfirmed slot uses its try; finding it still unconfirmed with no try left means its
  first start or its self-test never finished, so the bootloader falls back to the other
  slot, which was confirmed.
- The local data store (pending offline transactions, local configuration) is rewritten
  only while a complete backup of it exists, and a boot restores it from that backup
  whenever the live copy is incomplete or the boot fell back to the old release.
"""

import copy
import dataclasses
import enum
import hashlib
import json
from collections.abc import Mapping
from typing import Any

Data = dict[str, Any]
Versions = Mapping[str, str]


def checksum(data: Data) -> str:
    """Return the SHA-256 of a data store's canonical JSON."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def empty_store() -> Data:
    """The data store a freshly started release creates before migrating into it."""
    return {"pending_txns": [], "config": {}}


class StorageError(AssertionError):
    """Flash was used against the rules: a bug in the simulator, never a simulated fault."""


class Boot(enum.Enum):
    """Which slot a boot started, and why."""

    #: The active slot, confirmed.
    NORMAL = "normal"
    #: A new slot's first start (its one try).
    FIRST = "first"
    #: The new slot never confirmed: back on the old one, data restored from the backup.
    FELL_BACK = "fell_back"


@dataclasses.dataclass(frozen=True, slots=True)
class Backup:
    """A complete copy of the data store and its checksum."""

    data: Data
    checksum: str


class Flash:
    """Slots, boot control block, data store and backup of one terminal.

    Slot contents are version maps shared with whoever passed them in: they are replaced,
    never changed in place. An inactive slot being written holds None (not bootable).
    """

    __slots__ = ("_slots", "active", "backup", "confirmed", "data", "data_complete", "tries")

    def __init__(self, versions: Versions, data: Data) -> None:
        """Factory state: both slots hold the factory release, the active one confirmed."""
        self._slots: list[Versions | None] = [versions, versions]
        self.active = 0
        self.confirmed = True
        self.tries = 0
        self.data = data
        self.data_complete = True
        self.backup: Backup | None = None

    @property
    def versions(self) -> Versions:
        """The release in the active slot."""
        versions = self._slots[self.active]
        if versions is None:
            raise StorageError("the active slot is not a complete image")
        return versions

    @property
    def inactive(self) -> Versions | None:
        """The release in the inactive slot (None while being written, or torn)."""
        return self._slots[1 - self.active]

    # -- backup ---------------------------------------------------------------------------

    def start_backup(self) -> None:
        """Begin rewriting the backup area: until `finish_backup`, there is no backup."""
        self.backup = None

    def finish_backup(self) -> None:
        """The backup area holds a complete copy of the (complete) data store."""
        if not self.data_complete:
            raise StorageError("backing up an incomplete data store")
        self.backup = Backup(copy.deepcopy(self.data), checksum(self.data))

    def discard_backup(self) -> None:
        """Free the backup once the update is over."""
        self.backup = None

    def restore_data(self) -> None:
        """Copy the backup over the live data store."""
        backup = self.backup
        if backup is None or checksum(backup.data) != backup.checksum:
            raise StorageError("no complete backup to restore the data from")
        self.data = copy.deepcopy(backup.data)
        self.data_complete = True

    # -- slots ----------------------------------------------------------------------------

    def start_write(self) -> None:
        """Begin writing the inactive slot: it is not bootable until `finish_write`."""
        self._slots[1 - self.active] = None

    def finish_write(self, versions: Versions) -> None:
        """The inactive slot holds a complete, verified image of `versions`."""
        self._slots[1 - self.active] = versions

    def switch(self) -> None:
        """Point the boot control block at the inactive slot: unconfirmed, one try."""
        if self.inactive is None:
            raise StorageError("switching to an incomplete slot")
        if self.backup is None:
            raise StorageError("switching without a backup of the data")
        self.active = 1 - self.active
        self.confirmed = False
        self.tries = 1

    def boot(self) -> Boot:
        """Pick the slot to start as the bootloader does, and repair the data store."""
        if self.confirmed:
            outcome = Boot.NORMAL
        elif self.tries > 0:
            self.tries -= 1
            outcome = Boot.FIRST
        else:
            self.active = 1 - self.active
            self.confirmed = True
            outcome = Boot.FELL_BACK
        if outcome is Boot.FELL_BACK or not self.data_complete:
            # The old release cannot read what the new one may have written.
            self.restore_data()
        return outcome

    def start_migration(self) -> None:
        """The new release's first start replaces the data store with its own, empty one."""
        if self.backup is None:
            raise StorageError("migrating without a backup of the data")
        self.data = empty_store()
        self.data_complete = False

    def finish_migration(self) -> None:
        """The new store holds everything the old one did."""
        self.restore_data()

    def confirm(self) -> None:
        """The new slot passed its self-test: it is good from now on."""
        self.confirmed = True
        self.tries = 0

    def roll_back(self) -> None:
        """The unconfirmed slot failed its self-test: back to the other one, and its data."""
        if self.confirmed:
            raise StorageError("rolling back a confirmed slot")
        self.active = 1 - self.active
        self.confirmed = True
        self.tries = 0
        self.restore_data()

    def consistent(self) -> bool:
        """Tell whether the terminal is settled: a complete, confirmed slot and whole data."""
        return self._slots[self.active] is not None and self.confirmed and self.data_complete
