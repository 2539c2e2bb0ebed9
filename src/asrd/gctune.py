"""How long-running asrd processes (gateways, workers) use the cyclic garbage collector.

Measured in docs/benchmarks.md ("Garbage collection", "The workers' growth"):

* Python's default gen-0 threshold (700) collects many times a second under load, and a
  gen-2 collection stops every session of a gateway at once: GC took 10% of a loaded
  gateway's CPU. So what exists at start-up is frozen out of collections, and the threshold
  is raised.
* With the raised threshold a full collection almost never comes, and CPython empties its
  free lists (tuples, floats, lists, dicts...) only at the end of one. Kept, they hold
  memory the allocator cannot give back: without full collections a load-test worker's RSS
  grew 3.5-4.2 MB (7-8%) in 12 minutes, still rising; with one every 30 s, 0.1-0.2 MB. Those
  collections found no garbage at all: what they freed was the free lists. So workers run
  one every :data:`FULL_COLLECTION_INTERVAL_S`: 2-6 ms of CPU each. A gateway does not. It
  tracks far more objects (trio's tasks and coroutines of its sessions): at 80 sessions a
  full collection took 37-77 ms, a pause of every session. Its RSS grows less with them,
  but stayed within 5% after a 5-minute warm-up without them.
"""

from __future__ import annotations

import gc

import trio

__all__ = ["FULL_COLLECTION_INTERVAL_S", "GEN0_THRESHOLD", "collect_periodically", "tune"]

GEN0_THRESHOLD = 10_000  # the default, 700, collects many times a second under load
FULL_COLLECTION_INTERVAL_S = 60.0


def tune() -> None:
    """Freeze what exists now and raise the thresholds; call once, before any fork (the
    frozen objects are never written by a collection, so their pages stay shared)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GEN0_THRESHOLD, 50, 100)


async def collect_periodically(interval_s: float = FULL_COLLECTION_INTERVAL_S) -> None:
    """Run a full collection every ``interval_s``, for ever: it empties the free lists."""
    while True:
        await trio.sleep(interval_s)
        gc.collect()
