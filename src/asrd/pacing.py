"""Slowing a client down instead of refusing it: a token bucket that sleeps.

A session paces its audio by audio-seconds (asrd.session), a client's stream its WebSocket
frames by count (asrd.clientstream). While the caller sleeps it reads nothing from the
client's socket, so TCP pushes back on the client: no buffer grows and nobody gets an error.
"""

from __future__ import annotations

import math

import trio

# A caller ahead of its allowance by less than this is not slowed yet: one sleep per 50 ms of
# lead instead of one per message (a wake-up costs about as much as reading a frame).
SLOW_DOWN_AFTER_S = 0.05


class Pacer:
    """Lets ``rate`` units a second through, after a burst of ``burst`` units."""

    def __init__(self, rate: float, burst: float) -> None:
        self._rate = rate
        self._burst_s = burst / rate
        # When what was taken so far is due at ``rate``: never earlier than a burst before
        # now, so that time spent below the rate earns no credit beyond the burst.
        self._due = -math.inf

    async def take(self, units: float) -> None:
        now = trio.current_time()
        self._due = max(self._due, now - self._burst_s) + units / self._rate
        if self._due > now + SLOW_DOWN_AFTER_S:
            await trio.sleep(self._due - now)
