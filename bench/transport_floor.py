"""The transport's own CPU floor: what the stack's libraries cost per frame before asrd code.

No asrd session, segmenter, journal, engine or wire format runs here. N clients in one
process each send one audio frame per frame period, as ``asrd bench`` does, to a server in
another process, and read its replies: one 330-byte JSON text (the size of an Alibaba
TranscriptionResultChanged) per ``--reply-every`` frames, as the gateway sends partial results.
Each process reports its CPU per frame over the same window; the clients also report the
round-trip lag of the replies (send time of a frame to receipt of the reply it caused).

``--transport``:

* ``websocket`` (the default): a bare trio-websocket server that reads each message and
  replies itself. Its CPU per frame, times frames per second, is the least gateway CPU per
  audio-second any code on trio-websocket can reach.
* ``tcp``: the same over plain trio TCP streams, with no WebSocket framing: what trio itself
  costs per frame (a wakeup, a ``recv``, a task switch). No lag (the replies are unframed).
* ``wsproto``: the same WebSocket server without trio-websocket: one task per connection
  reads the socket, feeds wsproto and replies inline (no reader task, no channel hop to the
  reader of the message). What trio-websocket's own design costs per frame, beside the
  ``websocket`` figure.
* ``relay``: the whole path of the stack, doing nothing. The WebSocket server publishes each
  frame to NATS (:mod:`asrd.bus.natsbus`, nats-py on its asyncio thread), a worker process
  reads them and publishes the replies, and the server relays each reply to its WebSocket. A
  private nats-server carries it. This is the least CPU the client, gateway, workers and
  nats-server of any service on trio, trio-websocket and nats-py need per audio-second, and
  the least lag they add.

    .venv/bin/python bench/transport_floor.py --sessions 100 --reply-every 2
    .venv/bin/python bench/transport_floor.py --sessions 100 --reply-every 2 --transport tcp
    .venv/bin/python bench/transport_floor.py --sessions 500 --reply-every 2 --transport relay
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import struct
import subprocess
import sys
import time
from collections.abc import Sequence

import trio
import trio_websocket
import wsproto
import wsproto.events

from asrd.bench.stats import percentile
from asrd.bus.natsbus import open_nats_bus
from asrd.children import free_port, nats_server_binary
from asrd.config import NatsConfig
from asrd.procfs import read_proc

WARMUP_S = 3.0  # every process measures from this long after the server is ready
REPLY = (
    '{"header":{"namespace":"SpeechTranscriber","name":"TranscriptionResultChanged",'
    '"status":20000000,"message_id":"0123456789abcdef0123456789abcdef",'
    '"task_id":"0123456789abcdef0123456789abcdef","status_text":"Gateway:SUCCESS:Success."},'
    '"payload":{"index":1,"time":1234,"result":"placeholder words of a partial result",'
    '"confidence":0.0,"words":[]}}'
)
STAMP = 16  # a reply starts with its frame's send time: 8 bytes of float64, in hex
IN, OUT = "floor.in", "floor.out"


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _reply(frame: bytes | bytearray) -> str:
    """The reply to ``frame``: its send stamp, then the rest of the 330-byte result."""
    return bytes(frame[:8]).hex() + REPLY[STAMP:]


async def _measure(counter: list[int], seconds: float) -> tuple[int, float, float]:
    """Frames counted and CPU used over the window (WARMUP_S from now, for ``seconds``), and
    when the window opened (``time.monotonic()``)."""
    await trio.sleep(WARMUP_S)
    cpu0, n0, opened = _cpu_s(), counter[0], time.monotonic()
    await trio.sleep(seconds)
    return counter[0] - n0, _cpu_s() - cpu0, opened


# --- server ----------------------------------------------------------------------------------


async def serve(
    port: int, reply_every: int, seconds: float, transport: str, frame: int, nats_url: str
) -> None:
    count = [0]
    sessions = 0

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        n = 0
        with contextlib.suppress(trio_websocket.ConnectionClosed):
            while True:
                message = await ws.get_message()
                count[0] += 1
                n += 1
                if reply_every and n % reply_every == 0:
                    await ws.send_message(_reply(message))  # type: ignore[arg-type]

    async def tcp_handler(stream: trio.SocketStream) -> None:
        n = 0
        pending = 0  # bytes of the current frame read so far
        reply = REPLY.encode()
        with contextlib.suppress(trio.BrokenResourceError):
            while data := await stream.receive_some(65536):
                pending += len(data)
                while pending >= frame:
                    pending -= frame
                    count[0] += 1
                    n += 1
                    if reply_every and n % reply_every == 0:
                        await stream.send_all(reply)

    async def wsproto_handler(stream: trio.SocketStream) -> None:
        conn = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
        n = 0
        parts: list[bytes] = []
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while data := await stream.receive_some(65536):
                conn.receive_data(data)
                out = b""
                for event in conn.events():
                    if isinstance(event, wsproto.events.Request):
                        out += conn.send(wsproto.events.AcceptConnection())
                    elif isinstance(event, wsproto.events.BytesMessage):
                        parts.append(bytes(event.data))
                        if not event.message_finished:
                            continue
                        message = b"".join(parts)
                        parts.clear()
                        count[0] += 1
                        n += 1
                        if reply_every and n % reply_every == 0:
                            out += conn.send(wsproto.events.TextMessage(_reply(message)))
                    elif isinstance(event, wsproto.events.CloseConnection):
                        out += conn.send(event.response())
                    elif isinstance(event, wsproto.events.Ping):
                        out += conn.send(event.response())
                if out:
                    await stream.send_all(out)

    async with contextlib.AsyncExitStack() as stack:
        bus = None
        if transport == "relay":
            bus = await stack.enter_async_context(open_nats_bus(NatsConfig(), nats_url))

        async def relay_handler(request: trio_websocket.WebSocketRequest) -> None:
            nonlocal sessions
            assert bus is not None
            ws = await request.accept()
            sessions += 1
            subject = f"{IN}.{sessions}"
            results = await bus.subscribe(f"{OUT}.{sessions}")

            async def forward() -> None:
                async for msg in results:
                    await ws.send_message(msg.data.decode())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(forward)
                with contextlib.suppress(trio_websocket.ConnectionClosed):
                    while True:
                        message = await ws.get_message()
                        count[0] += 1
                        bus.publish(subject, message)  # type: ignore[arg-type]
                nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            if transport == "tcp":
                await nursery.start(trio.serve_tcp, tcp_handler, port)
            elif transport == "wsproto":
                await nursery.start(trio.serve_tcp, wsproto_handler, port)
            else:
                serve_ws = relay_handler if transport == "relay" else handler
                await nursery.start(
                    trio_websocket.serve_websocket, serve_ws, "127.0.0.1", port, None
                )
            print("ready", flush=True)
            frames, cpu, _ = await _measure(count, seconds)
            print(f"{frames} {cpu:.3f}", flush=True)
            nursery.cancel_scope.cancel()


async def relay_worker(nats_url: str, reply_every: int) -> None:
    """Reads every session's frames from one wildcard subscription; replies every K-th.
    Runs until it is terminated: nats-server's and this process's CPU are read from outside."""
    count = [0]
    per_session: dict[str, int] = {}
    async with open_nats_bus(NatsConfig(), nats_url) as bus:
        frames = await bus.subscribe(f"{IN}.*", max_pending=65536)
        await bus.flush()

        async def work() -> None:
            async for msg in frames:
                count[0] += 1
                session = msg.subject[len(IN) + 1 :]
                n = per_session[session] = per_session.get(session, 0) + 1
                if reply_every and n % reply_every == 0:
                    bus.publish(f"{OUT}.{session}", _reply(msg.data).encode())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(work)
            print("ready", flush=True)
            await trio.sleep_forever()


# --- clients ---------------------------------------------------------------------------------


async def clients(
    port: int, sessions: int, frame_ms: int, seconds: float, transport: str
) -> tuple[int, float, list[float]]:
    """Frames sent and CPU used over the server's window, and the replies' lags (s) in it."""
    sent = [0]
    replies: list[tuple[float, float]] = []  # (received, sent) in time.monotonic()

    async def one_tcp(i: int) -> None:
        frame = bytes(32 * frame_ms)  # 16 kHz, 16-bit mono
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream, trio.open_nursery() as nursery:

            async def drain() -> None:
                with contextlib.suppress(trio.BrokenResourceError):
                    while await stream.receive_some(65536):
                        pass
                nursery.cancel_scope.cancel()  # the server has measured and gone

            nursery.start_soon(drain)
            await trio.sleep(i * frame_ms / 1000 / sessions)
            due = trio.current_time()
            with contextlib.suppress(trio.BrokenResourceError):
                while True:
                    await stream.send_all(frame)
                    sent[0] += 1
                    due += frame_ms / 1000
                    await trio.sleep_until(due)
            nursery.cancel_scope.cancel()

    async def one(i: int) -> None:
        frame = bytearray(32 * frame_ms)
        async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port}/") as ws:

            async def drain(done: trio.CancelScope) -> None:
                try:
                    while True:
                        reply = await ws.get_message()
                        (t,) = struct.unpack("<d", bytes.fromhex(str(reply)[:STAMP]))
                        replies.append((time.monotonic(), t))
                except trio_websocket.ConnectionClosed:
                    done.cancel()  # the server has measured and gone

            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain, nursery.cancel_scope)
                await trio.sleep(i * frame_ms / 1000 / sessions)  # spread the sends
                due = trio.current_time()
                while True:
                    frame[:8] = struct.pack("<d", time.monotonic())
                    try:
                        await ws.send_message(bytes(frame))
                    except trio_websocket.ConnectionClosed:
                        nursery.cancel_scope.cancel()
                        return
                    sent[0] += 1
                    due += frame_ms / 1000
                    await trio.sleep_until(due)

    with trio.move_on_after(seconds + WARMUP_S + 2.0):
        async with trio.open_nursery() as nursery:
            for i in range(sessions):
                nursery.start_soon(one_tcp if transport == "tcp" else one, i)
            frames, cpu, opened = await _measure(sent, seconds)
    lags = [got - t for got, t in replies if opened <= got <= opened + seconds]
    return frames, cpu, lags


# --- main ------------------------------------------------------------------------------------


def _spawn(role: str, args: Sequence[str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--role", role, *args], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise SystemExit(f"the {role} process did not start")
    return proc


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=100)
    p.add_argument("--frame-ms", type=int, default=100)
    p.add_argument("--reply-every", type=int, default=2, help="0: never reply")
    p.add_argument("--seconds", type=float, default=20.0, help="measured time")
    p.add_argument("--port", type=int, default=0, help="the server's port (default: a free one)")
    p.add_argument(
        "--transport", choices=("websocket", "wsproto", "tcp", "relay"), default="websocket"
    )
    p.add_argument("--role", choices=("main", "server", "worker"), default="main")
    p.add_argument("--nats-url", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    frame = 32 * a.frame_ms
    if a.role == "server":
        trio.run(serve, a.port, a.reply_every, a.seconds, a.transport, frame, a.nats_url)
        return 0
    if a.role == "worker":
        trio.run(relay_worker, a.nats_url, a.reply_every)
        return 0

    port = a.port or free_port()
    common = ["--reply-every", str(a.reply_every), "--seconds", str(a.seconds)]
    with contextlib.ExitStack() as stack:
        nats = worker = None
        if a.transport == "relay":
            nats_port = free_port()
            nats = subprocess.Popen(
                [nats_server_binary(), "-a", "127.0.0.1", "-p", str(nats_port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            stack.callback(nats.wait)
            stack.callback(nats.terminate)
            time.sleep(0.5)
            common += ["--nats-url", f"nats://127.0.0.1:{nats_port}"]
            worker = _spawn("worker", common)
            stack.callback(worker.wait)
            stack.callback(worker.terminate)
        server = _spawn("server", [*common, "--port", str(port), "--transport", a.transport])
        stack.callback(server.wait)
        others = [proc for proc in (worker, nats) if proc is not None]
        before = [read_proc(proc.pid) for proc in others]
        c_frames, c_cpu, lags = trio.run(
            clients, port, a.sessions, a.frame_ms, a.seconds, a.transport
        )
        after = [read_proc(proc.pid) for proc in others]
        assert server.stdout is not None
        frames, cpu = server.stdout.readline().split()

    per_s = 1000 / a.frame_ms / 1000  # frames per audio-second, in ms per us
    name = {
        "tcp": "trio TCP",
        "websocket": "trio-websocket",
        "wsproto": "wsproto on trio",
        "relay": "relay",
    }[a.transport]
    print(
        f"bare {name}, {a.sessions} sessions, {a.frame_ms} ms frames, a reply every "
        f"{a.reply_every or 'never'} frames, {int(frames)} frames in {a.seconds:g} s:"
    )
    rows = [("server", float(cpu) / int(frames)), ("clients", c_cpu / c_frames)]
    # Read from outside over the clients' whole run, warm-up included.
    run_frames = a.sessions * (1000 / a.frame_ms) * (a.seconds + WARMUP_S + 2.0)
    for label, b, e in zip(("relay worker", "nats-server"), before, after, strict=False):
        if b is not None and e is not None:
            rows.append((label, (e.cpu_s - b.cpu_s) / run_frames))
    for label, s in rows:
        us = s * 1e6
        print(f"  {label:<13} {us:5.0f} us CPU per frame = {us * per_s:.2f} ms per audio-second")
    if len(rows) > 2:
        total = sum(s for _, s in rows) * 1e6 * per_s
        print(
            f"  {'all':<13} {total:.2f} ms per audio-second: {total * a.sessions / 1000:.2f} cores"
        )
    if lags:
        ms = sorted(x * 1000 for x in lags)
        stats = " / ".join(f"{percentile(ms, q):.0f}" for q in (50, 95, 99))
        print(
            f"  round-trip lag p50 / p95 / p99 / max: {stats} / {ms[-1]:.0f} ms ({len(ms)} replies)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
