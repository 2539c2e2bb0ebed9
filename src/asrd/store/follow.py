"""Workers follow the live routing: ``[routing] workers`` in Redis may move a worker to
another pool without a restart (``asrd config set routing.workers.spare en-US``).

A worker is known by the pool it was started with (``[worker] pool``); the live routing maps
that name to the pool it serves now. Sessions already running on it are not touched: only
its claim subscription (and the pool in its heartbeats) changes.
"""

from __future__ import annotations

import logging
from typing import Protocol

import trio

from asrd.config import Config, RoutingConfig
from asrd.metrics import WorkerMetrics
from asrd.store import StoreError, StoreUnavailable
from asrd.store.plane import ConfigWatcher
from asrd.store.redisstore import open_redis_store
from asrd.store.repo import Repository

log = logging.getLogger(__name__)


class PoolServer(Protocol):
    metrics: WorkerMetrics

    async def set_pool(self, pool: str) -> None:
        """Serve claims of ``pool`` from now on (running sessions continue)."""


def worker_pool(routing: RoutingConfig, started_as: str) -> str:
    return routing.workers.get(started_as, started_as)


async def follow_worker_pool(
    config: Config,
    worker: PoolServer,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Poll the live routing every ``config_poll_s`` and move ``worker`` when it says so."""
    started_as = config.worker.pool
    async with open_redis_store(config.redis) as store:
        watcher = ConfigWatcher(Repository(store, config.redis))
        task_status.started()
        reachable = True
        reconnects = 0
        worker.metrics.redis_errors.fn = lambda: store.errors
        worker.metrics.redis_reconnects.fn = lambda: reconnects
        while True:
            try:
                changed, doc = await watcher.poll()
            except StoreUnavailable as exc:
                if reachable:
                    log.warning("%s: keeping the current pool until it is back", exc)
                reachable = False
            except StoreError:
                pass  # an error reply: logged by the watcher when it starts and ends
            else:
                if not reachable:
                    log.warning("Redis at %s is reachable again", store.url)
                    reconnects += 1
                reachable = True
                if changed:
                    routing = doc.routing if doc is not None else config.routing
                    await worker.set_pool(worker_pool(routing, started_as))
            await trio.sleep(config.redis.config_poll_s)
