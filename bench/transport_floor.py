"""The WebSocket transport's own CPU floor: what a bare trio-websocket server costs per frame.

No asrd code runs in the server: it accepts connections and reads messages, and with
``--reply-every K`` sends one 330-byte JSON text (the size of an Alibaba
TranscriptionResultChanged) per K frames received, as the gateway does for partial results.
N clients in another process each send one audio frame per frame period, as ``asrd bench``
does. The server's CPU per frame, times frames per second, is the least gateway CPU per
audio-second any code on trio-websocket can reach (docs/benchmarks.md).

``--transport tcp`` does the same over plain trio TCP streams, with no WebSocket framing:
what trio itself costs per frame (a wakeup, a ``recv``, a task switch), so that the rest
is trio-websocket's and wsproto's.

    .venv/bin/python bench/transport_floor.py --sessions 100 --reply-every 2
    .venv/bin/python bench/transport_floor.py --sessions 100 --reply-every 2 --transport tcp
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import subprocess
import sys

import trio
import trio_websocket

REPLY = (
    '{"header":{"namespace":"SpeechTranscriber","name":"TranscriptionResultChanged",'
    '"status":20000000,"message_id":"0123456789abcdef0123456789abcdef",'
    '"task_id":"0123456789abcdef0123456789abcdef","status_text":"Gateway:SUCCESS:Success."},'
    '"payload":{"index":1,"time":1234,"result":"placeholder words of a partial result",'
    '"confidence":0.0,"words":[]}}'
)


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def serve(
    port: int, reply_every: int, warmup_s: float, measure_s: float, transport: str, frame: int
) -> None:
    count = 0

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        nonlocal count
        ws = await request.accept()
        n = 0
        try:
            while True:
                await ws.get_message()
                count += 1
                n += 1
                if reply_every and n % reply_every == 0:
                    await ws.send_message(REPLY)
        except trio_websocket.ConnectionClosed:
            pass

    async def tcp_handler(stream: trio.SocketStream) -> None:
        nonlocal count
        n = 0
        pending = 0  # bytes of the current frame read so far
        reply = REPLY.encode()
        with contextlib.suppress(trio.BrokenResourceError):
            while data := await stream.receive_some(65536):
                pending += len(data)
                while pending >= frame:
                    pending -= frame
                    count += 1
                    n += 1
                    if reply_every and n % reply_every == 0:
                        await stream.send_all(reply)

    async with trio.open_nursery() as nursery:
        if transport == "tcp":
            await nursery.start(trio.serve_tcp, tcp_handler, port)
        else:
            await nursery.start(trio_websocket.serve_websocket, handler, "127.0.0.1", port, None)
        print("ready", flush=True)
        await trio.sleep(warmup_s)
        cpu0, n0 = _cpu_s(), count
        await trio.sleep(measure_s)
        cpu, n = _cpu_s() - cpu0, count - n0
        print(f"{n} {cpu:.3f}", flush=True)
        nursery.cancel_scope.cancel()


async def clients(port: int, sessions: int, frame_ms: int, seconds: float, transport: str) -> None:
    frame = bytes(32 * frame_ms)  # 16 kHz, 16-bit mono

    async def one_tcp(i: int) -> None:
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
                    due += frame_ms / 1000
                    await trio.sleep_until(due)
            nursery.cancel_scope.cancel()

    async def one(i: int) -> None:
        async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port}/") as ws:

            async def drain(done: trio.CancelScope) -> None:
                try:
                    while True:
                        await ws.get_message()
                except trio_websocket.ConnectionClosed:
                    done.cancel()  # the server has measured and gone

            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain, nursery.cancel_scope)
                await trio.sleep(i * frame_ms / 1000 / sessions)  # spread the sends
                due = trio.current_time()
                while True:
                    try:
                        await ws.send_message(frame)
                    except trio_websocket.ConnectionClosed:
                        nursery.cancel_scope.cancel()
                        return
                    due += frame_ms / 1000
                    await trio.sleep_until(due)

    with trio.move_on_after(seconds):
        async with trio.open_nursery() as nursery:
            for i in range(sessions):
                nursery.start_soon(one_tcp if transport == "tcp" else one, i)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=100)
    p.add_argument("--frame-ms", type=int, default=100)
    p.add_argument("--reply-every", type=int, default=2, help="0: never reply")
    p.add_argument("--seconds", type=float, default=20.0, help="measured time")
    p.add_argument("--port", type=int, default=18765)
    p.add_argument("--transport", choices=("websocket", "tcp"), default="websocket")
    p.add_argument("--role", choices=("main", "server"), default="main", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.role == "server":
        trio.run(serve, a.port, a.reply_every, 3.0, a.seconds, a.transport, 32 * a.frame_ms)
        return 0
    role = ["--role", "server", "--port", str(a.port), "--reply-every", str(a.reply_every)]
    role += ["--transport", a.transport, "--frame-ms", str(a.frame_ms)]
    server = subprocess.Popen(
        [sys.executable, __file__, *role, "--seconds", str(a.seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    server.stdout.readline()  # ready
    trio.run(clients, a.port, a.sessions, a.frame_ms, a.seconds + 5.0, a.transport)
    frames, cpu = server.stdout.readline().split()
    server.wait()
    per_frame_us = float(cpu) / int(frames) * 1e6
    per_audio_s_ms = per_frame_us * (1000 / a.frame_ms) / 1000
    print(
        f"bare {'trio TCP' if a.transport == 'tcp' else 'trio-websocket'} server, "
        f"{a.sessions} sessions, {a.frame_ms} ms frames, "
        f"a reply every {a.reply_every or 'never'} frames: {int(frames)} frames in "
        f"{a.seconds:g} s, {per_frame_us:.0f} us CPU per frame = "
        f"{per_audio_s_ms:.2f} ms per audio-second"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
