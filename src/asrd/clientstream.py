"""The byte stream under a client's WebSocket: what trio-websocket does not guard.

- The request head, already read (and rewritten) by the gateway, is handed back first.
- A write cut off part-way refuses every later write: the client would read the next frame
  (the session's ``TaskFailed``, the close) as the rest of the torn one.
- The client's frames are counted and paced. trio-websocket answers pings, takes pongs and
  joins fragments in its reader task, out of the session's sight, at 20-25 µs a frame: one
  client flooding empty pings used to take 80% of the gateway's core. Reading is paused
  (TCP backpressure) once a client is past ``FRAME_BURST`` frames ahead of ``FRAMES_PER_S``.
  The session paces audio and commands by their own measure on top (asrd.session).
"""

from __future__ import annotations

import trio

from asrd.pacing import Pacer

# Above the most a session's own limit lets through (1,000 10-ms audio frames a second at
# 10x), with room for the pings and pongs of a WebSocket library. A flood at this rate costs
# 2-3% of a core, 11% for pings (each answered with a pong; docs/resilience.md).
FRAMES_PER_S = 2000.0
FRAME_BURST = 4000


class FrameCounter:
    """Counts the frames in a client's WebSocket bytes by their headers alone (RFC 6455
    §5.2), skipping payloads: no unmasking, no validation (wsproto does both)."""

    def __init__(self) -> None:
        self._skip = 0  # payload bytes of the current frame still to come
        self._head = b""  # the start of a frame header split across reads

    def feed(self, data: bytes) -> int:
        """The number of frames whose header completes in ``data``."""
        if self._skip >= len(data):
            self._skip -= len(data)
            return 0
        if self._skip:
            data, self._skip = data[self._skip :], 0
        if self._head:
            data, self._head = self._head + data, b""
        frames = 0
        i, n = 0, len(data)
        while n - i >= 2:
            length = data[i + 1] & 0x7F
            size = 2 + (2 if length == 126 else 8 if length == 127 else 0)
            if data[i + 1] & 0x80:
                size += 4  # the masking key
            if n - i < size:
                break
            if length == 126:
                length = int.from_bytes(data[i + 2 : i + 4], "big")
            elif length == 127:
                length = int.from_bytes(data[i + 2 : i + 10], "big")
            frames += 1
            i += size + length
        if i > n:
            self._skip = i - n
        else:
            self._head = data[i:]
        return frames


class ClientStream(trio.abc.Stream):
    """A client's TCP stream, for trio-websocket: see the module docstring."""

    def __init__(self, stream: trio.abc.Stream, head: bytes, early: bytes) -> None:
        """``head``: the request head to hand back; ``early``: frames read along with it."""
        self._stream = stream
        self._prefix = head + early
        self._torn = False
        self._frames = FrameCounter()
        self._early = early
        self._pacer = Pacer(FRAMES_PER_S, FRAME_BURST)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            data, self._prefix = self._prefix, b""
            frames, self._early = self._frames.feed(self._early), b""
        else:
            data = bytes(await self._stream.receive_some(max_bytes))
            frames = self._frames.feed(data)
        if frames:
            await self._pacer.take(frames)
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._torn:
            raise trio.BrokenResourceError("an earlier write was cut off part-way")
        # Cancelled before a byte is written, the stream is whole; from here on it is not
        # until the write completes (no checkpoint between this one and the first write).
        await trio.lowlevel.checkpoint_if_cancelled()
        self._torn = True
        await self._stream.send_all(data)
        self._torn = False

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()
