"""The control plane kept in Redis: app keys, tokens, signed links, routing, quotas, records.

:class:`Store` is trio-native. :mod:`asrd.store.redisstore` is the only module that imports
``redis``: redis-py's asyncio client runs on one asyncio loop in a dedicated thread (the
pattern of :mod:`asrd.bus.natsbus`), and redis exceptions become :class:`StoreError`
subclasses there and nowhere else. The Redis key layout is in :mod:`asrd.store.keys`.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from asrd.config import Config
from asrd.control import ControlPlane, StaticControlPlane
from asrd.errors import ServerError

Arg = str | bytes | int | float


class StoreError(ServerError):
    """Redis answered with an error (a bug or a foreign value in our keys): 50000000."""


class StoreUnavailable(StoreError):
    """Redis is unreachable or did not answer in time: 50000000, retry later."""


class StoreNotServing(StoreUnavailable):
    """Redis answers but refuses to serve us for now (a read-only replica, MASTERDOWN, memory
    full): an outage too, but one that reads may not end."""


@dataclass(frozen=True)
class Script:
    """A Lua script run with EVALSHA (loaded on first use)."""

    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())


class Store(Protocol):
    """Redis commands, awaited from trio. Replies are decoded to str."""

    @property
    def url(self) -> str:
        """Where the store lives, without credentials (for messages)."""
        ...

    @property
    def errors(self) -> int:
        """Commands that failed so far (StoreUnavailable or StoreError), for /metrics."""
        ...

    async def execute(self, *args: Arg) -> Any:
        """One command, e.g. ``execute("HGETALL", key)``."""

    async def pipeline(
        self, commands: Sequence[Sequence[Arg]], *, transaction: bool = False
    ) -> list[Any]:
        """Several commands in one round trip (MULTI/EXEC when ``transaction``)."""

    async def eval(self, script: Script, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        """Run a Lua script atomically."""


@asynccontextmanager
async def open_control_plane(config: Config) -> AsyncIterator[ControlPlane]:
    """The Redis control plane when ``[redis] url`` is set, else the static one."""
    if not config.redis.url:
        yield StaticControlPlane(config)
        return
    from asrd.store.plane import open_redis_control_plane

    async with open_redis_control_plane(config) as plane:
        yield plane
