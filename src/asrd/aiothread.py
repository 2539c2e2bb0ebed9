"""One asyncio event loop in a dedicated thread, awaited from trio.

nats-py and redis.asyncio are asyncio libraries. design.md §3 measured the ways to call them
from trio: a private loop thread costs ~2x less than trio-asyncio per call and patches nothing
process-wide. The bus and the store each own one; they convert their library's exceptions
around :meth:`AsyncioThread.run`, so this module knows nothing of either.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import trio

T = TypeVar("T")
UNWIND_S = 2.0  # on closing, the loop's tasks get this long to finish cancelling


class AsyncioThread:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.trio_token = trio.lowlevel.current_trio_token()

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and await its result (or exception) from trio.

        Cancelling the trio side cancels the asyncio task. A cancelled asyncio task raises
        ``concurrent.futures.CancelledError`` here.
        """
        fut: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        done = trio.Event()
        token = self.trio_token

        def wake(_: object) -> None:
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass

        fut.add_done_callback(wake)
        try:
            await done.wait()
        except trio.Cancelled:
            fut.cancel()
            raise
        return fut.result()


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    loop.run_forever()


@asynccontextmanager
async def open_asyncio_thread(name: str) -> AsyncIterator[AsyncioThread]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=_run_loop, args=(loop,), name=name, daemon=True)
    thread.start()
    try:
        yield AsyncioThread(loop)
    finally:
        unwound = asyncio.run_coroutine_threadsafe(_cancel_pending(UNWIND_S), loop)
        await trio.to_thread.run_sync(concurrent.futures.wait, [unwound], UNWIND_S + 1)
        loop.call_soon_threadsafe(loop.stop)
        await trio.to_thread.run_sync(thread.join, 3.0)
        if not thread.is_alive():
            # Its selector and self-pipe now, not when the collector finds the loop in some
            # other thread (seen at exit as "ValueError: Invalid file descriptor: -1").
            loop.close()


async def _cancel_pending(timeout: float) -> None:
    """Cancel the loop's tasks and let them unwind: one still pending when the loop stops (a
    connect cancelled a moment ago) is reported at exit as "Task was destroyed but it is
    pending!" by asyncio's logger."""
    tasks = asyncio.all_tasks() - {asyncio.current_task()}
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=timeout)
