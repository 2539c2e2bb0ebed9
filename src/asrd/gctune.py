"""How asrd processes (gateways, workers, the bench's load generator) use the cyclic garbage
collector.

Measured in docs/benchmarks.md ("Garbage collection", "The workers' growth", "Free lists
emptied without a pause", "575 streams"):

* Python's default gen-0 threshold (700) collects many times a second under load, and a
  gen-2 collection stops every session of a gateway at once: GC took 10% of a loaded
  gateway's CPU. So what exists at start-up is frozen out of collections, and the threshold
  is raised.
* With the raised threshold a full collection almost never comes, and CPython empties its
  free lists (tuples, floats, lists, dicts...) only at the end of one. Kept, they hold
  memory the allocator cannot give back: without full collections a load-test worker's RSS
  grew 3.5-4.2 MB (7-8%) in 12 minutes, still rising; with one every 30 s, 0.1-0.2 MB. Those
  collections found no garbage at all: what they freed was the free lists.
* So every process empties them every :data:`FREE_LISTS_INTERVAL_S`. A worker runs a full
  collection (:func:`full_collection`, 2-6 ms of CPU). A gateway tracks ten times as many
  objects (trio's tasks and coroutines of its sessions): a full collection there took
  10-25 ms at 80 sessions on a fast day and 37-77 ms on a slow one, a pause of every
  session. It runs :func:`empty_free_lists` instead, a collection of nothing (0.9-1.7 ms):
  of two gateway processes sharing 140 streams, the one that ran it grew 2.9 MB in 11
  minutes, the one that did not 7.5 MB.
* The threshold counts allocations less deallocations, so tracked objects that a session
  makes per audio frame and keeps for seconds let the young generation grow far past it as
  they die: with a tuple per frame in two places, a gateway at 450 streams collected 31,000-
  67,000 young objects every few seconds, a pause of every session of 8-85 ms. So what a
  session keeps per frame holds nothing the collector tracks (``asrd.remote``'s journal,
  ``asrd.session``'s arrival times): one such collection every 14-15 s instead
  ("SCHED_BATCH on the AMD machine, the stack at rest, and young collections").
* The load generator of ``asrd bench`` tunes itself the same way before each run: with
  Python's defaults it paused for gen-2 collections of 56-163 ms, up to twelve times a
  minute at 400 sessions, and every partial it received during one was measured that much
  later ("575 streams").
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import trio

__all__ = [
    "FREE_LISTS_INTERVAL_S",
    "GEN0_THRESHOLD",
    "empty_free_lists",
    "full_collection",
    "periodically",
    "tune",
]

GEN0_THRESHOLD = 10_000  # the default, 700, collects many times a second under load
FREE_LISTS_INTERVAL_S = 60.0


def tune() -> None:
    """Freeze what exists now and raise the thresholds; call before any fork (the frozen
    objects are never written by a collection, so their pages stay shared).

    Calling it again (the load generator does, before each run) first thaws what the last
    call froze, so garbage among those objects is still found."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    gc.set_threshold(GEN0_THRESHOLD, 50, 100)


def full_collection() -> None:
    """Look for garbage everywhere, then empty the free lists."""
    gc.collect()


def empty_free_lists() -> None:
    """Empty the free lists without looking at a single object: with everything frozen, a
    full collection has nothing to examine, and what it still does is its last step.

    About 1 ms in a gateway with 80 sessions. The price: the objects frozen by :func:`tune`
    come back among the collected ones, so the rare gen-2 collection that the thresholds let
    through examines them too, and a forked gateway's copy of them stops being shared when
    it does.
    """
    gc.freeze()
    try:
        gc.collect()
    finally:
        gc.unfreeze()


async def periodically(
    action: Callable[[], None], interval_s: float = FREE_LISTS_INTERVAL_S
) -> None:
    """Run ``action`` every ``interval_s``, for ever."""
    while True:
        await trio.sleep(interval_s)
        action()
