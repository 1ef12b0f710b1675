"""`Flag`: an `asyncio.Event` that costs nothing until someone waits on it.

An `asyncio.Event` allocates a `collections.deque` for its waiters as it is built, about
760 bytes, and a simulated terminal and its link hold several events that hardly ever
have a waiter. At 15,000 terminals in one process that came to tens of megabytes. A
`Flag` is two slots; the list of its waiters exists only while someone waits.
"""

import asyncio


class Flag:
    """The part of `asyncio.Event` the simulator uses: `set`, `clear`, `is_set`, `wait`.

    As with an event, a waiter woken by `set` returns even if the flag was cleared
    before it ran.
    """

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        """A cleared flag with no waiters."""
        self._set = False
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        """Tell whether the flag is set."""
        return self._set

    def set(self) -> None:
        """Set the flag and wake every waiter."""
        if self._set:
            return
        self._set = True
        waiters, self._waiters = self._waiters, None
        for future in waiters or ():
            if not future.done():
                future.set_result(None)

    def clear(self) -> None:
        """Clear the flag: `wait` blocks again until the next `set`."""
        self._set = False

    async def wait(self) -> None:
        """Return once the flag is set (at once if it is)."""
        if self._set:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = [future]
        else:
            self._waiters.append(future)
        try:
            await future
        finally:
            # `set` has dropped the list it woke; a cancelled waiter leaves on its own.
            waiters = self._waiters
            if waiters is not None and future in waiters:
                waiters.remove(future)
                if not waiters:
                    self._waiters = None
