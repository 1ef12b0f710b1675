"""`Draws`: the values of `random.Random(seed)`, without holding its 2.5 KB state idle.

A Mersenne Twister's state is 624 words, about 2.9 KB with its object, and each
terminal has its own so that a run is reproducible terminal by terminal. Most terminals
draw only a few `random()` values in their life (the heartbeat phase, a reconnect's
jitter), so `Draws` keeps the seed and a count instead, and builds the generator for a
draw by seeding it and replaying the draws taken so far. Once a terminal has drawn
`_REPLAY_MAX` values, or asks for anything but `random()`, the generator is kept. Either
way the values are exactly those of `random.Random(seed)`, in the same order.
"""

import random
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")

#: Replays are this short at most: seeding and replaying costs about 12 microseconds.
_REPLAY_MAX = 8


class Draws:
    """The draws a terminal makes: `random`, `choice` and `randrange` of one seed."""

    __slots__ = ("_rng", "_seed", "_taken")

    def __init__(self, seed: str) -> None:
        """Draw from `random.Random(seed)`; nothing is built until the first draw."""
        self._seed = seed
        # While `_rng` is None: how many `random()` values were drawn so far.
        self._taken = 0
        self._rng: random.Random | None = None

    def _generator(self) -> random.Random:
        rng = self._rng
        if rng is None:
            rng = random.Random(self._seed)
            for _ in range(self._taken):
                rng.random()
        return rng

    def _kept(self) -> random.Random:
        if self._rng is None:
            self._rng = self._generator()
        return self._rng

    def random(self) -> float:
        """The next float in [0, 1)."""
        if self._rng is not None:
            return self._rng.random()
        rng = self._generator()
        self._taken += 1
        if self._taken >= _REPLAY_MAX:
            self._rng = rng
        return rng.random()

    def choice(self, items: Sequence[T]) -> T:
        """One of `items`, as `random.Random.choice` picks it."""
        return self._kept().choice(items)

    def randrange(self, start: int, stop: int | None = None) -> int:
        """A number in [start, stop) (or [0, start)), as `random.Random.randrange` draws it."""
        return self._kept().randrange(start, stop)
