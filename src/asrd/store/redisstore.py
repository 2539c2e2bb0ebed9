"""Redis behind the trio-native :class:`~asrd.store.Store` interface.

redis-py's asyncio client runs on one asyncio loop in a dedicated thread (design.md §3: about
145 µs per awaited round trip, against 240 µs through trio-asyncio, which also patches asyncio
process-wide). This is the only module that imports ``redis``; its exceptions become
:class:`~asrd.store.StoreUnavailable` (connection lost, timeout) or
:class:`~asrd.store.StoreError` (an error reply) here and nowhere else.

Commands fail fast when Redis is away: connect and socket timeouts are ``[redis] timeout_s``
and a failed command is retried once at once (a pooled connection broken by a Redis restart is
replaced), never with a back-off that would hold a client's StartTranscription for seconds.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import AsyncIterator, Coroutine, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.exceptions
import trio
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from asrd.aiothread import AsyncioThread, open_asyncio_thread
from asrd.config import RedisConfig
from asrd.store import Arg, Script, StoreError, StoreNotServing, StoreUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")


def redacted(url: str) -> str:
    """``url`` without its password, in the user part or as ``?password=`` (for logs and
    messages)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "<a Redis URL that does not parse>"
    netloc = parts.netloc
    if parts.password is not None:
        host = parts.hostname or ""
        if ":" in host:  # IPv6
            host = f"[{host}]"
        if port is not None:
            host = f"{host}:{port}"
        netloc = (f"{parts.username}:***@" if parts.username else ":***@") + host
    query = "&".join(
        "password=***" if item.lower().startswith("password=") else item
        for item in parts.query.split("&")
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


# Error replies of a Redis that is up but cannot take writes for a while (a failover leaves
# clients on a read-only replica, or on one that lost its master and answers MASTERDOWN;
# maxmemory is reached): handled as an outage, with the cache.
_NOT_SERVING = (
    redis.exceptions.ReadOnlyError,
    redis.exceptions.MasterDownError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.TryAgainError,
)


class RedisStore:
    def __init__(self, thread: AsyncioThread, client: Redis, url: str) -> None:
        self._thread = thread
        self._client = client
        self._url = redacted(url)
        self.errors = 0

    @property
    def url(self) -> str:
        return self._url

    # --- trio side -------------------------------------------------------------------------

    async def execute(self, *args: Arg) -> Any:
        return await self._call(self._execute(*args))

    async def pipeline(
        self, commands: Sequence[Sequence[Arg]], *, transaction: bool = False
    ) -> list[Any]:
        return await self._call(self._pipeline(commands, transaction))

    async def eval(self, script: Script, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        return await self._call(self._eval(script, keys, args))

    async def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the asyncio thread; redis exceptions become StoreError here, and
        are counted (``errors``, for /metrics)."""
        try:
            return await self._thread.run(coro)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            self.errors += 1
            raise StoreUnavailable(f"Redis at {self._url} unreachable: {exc}") from exc
        except _NOT_SERVING as exc:  # a replica promoted, memory full: like an outage, for now
            self.errors += 1
            raise StoreNotServing(f"Redis at {self._url} cannot serve us now: {exc}") from exc
        except (TimeoutError, OSError, concurrent.futures.CancelledError) as exc:
            self.errors += 1
            raise StoreUnavailable(f"Redis at {self._url} unreachable: {exc!r}") from exc
        except redis.exceptions.RedisError as exc:
            self.errors += 1
            raise StoreError(f"Redis at {self._url}: {exc}") from exc

    # --- asyncio side ----------------------------------------------------------------------

    async def _execute(self, *args: Arg) -> Any:
        return await self._client.execute_command(*args)  # type: ignore[no-untyped-call]

    async def _pipeline(self, commands: Sequence[Sequence[Arg]], transaction: bool) -> list[Any]:
        pipe = self._client.pipeline(transaction=transaction)
        for command in commands:
            pipe.execute_command(*command)
        return list(await pipe.execute())

    async def _eval(self, script: Script, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        try:
            return await self._execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            return await self._execute("EVAL", script.source, len(keys), *keys, *args)

    async def _close(self) -> None:
        await self._client.aclose()


@asynccontextmanager
async def open_redis_store(
    config: RedisConfig, url: str | None = None
) -> AsyncIterator[RedisStore]:
    """A Redis client on a private asyncio thread. Connects lazily: opening never fails
    because Redis is away; the first command does (:class:`StoreUnavailable`)."""
    url = url or config.url
    if not url:
        raise StoreError("no Redis configured: set [redis] url or --redis-url")
    async with open_asyncio_thread("asrd-redis") as thread:
        try:
            pool = BlockingConnectionPool.from_url(
                url,
                max_connections=config.max_connections,
                timeout=config.timeout_s,
                socket_timeout=config.timeout_s,
                socket_connect_timeout=config.timeout_s,
                retry=Retry(NoBackoff(), 1),
                decode_responses=True,
            )
        except ValueError as exc:
            raise StoreError(f"bad Redis URL {redacted(url)!r}: {exc}") from exc
        store = RedisStore(thread, Redis.from_pool(pool), url)
        try:
            yield store
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(3):
                try:
                    await store._call(store._close())
                except StoreError:
                    pass
