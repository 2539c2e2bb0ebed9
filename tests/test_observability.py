"""/metrics, /healthz, /readyz on the gateway and on workers; JSON logs with session ids."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import mmap
import os
import socket
import subprocess
import sys
import time
import urllib.request
from functools import partial
from pathlib import Path
from typing import Any

import nats as nats_py
import pytest
import trio
import trio.testing

from asrd import logs, wire
from asrd.bus.natsbus import open_nats_bus
from asrd.children import free_port, worker_argv
from asrd.client import open_transcription, pcm_chunks
from asrd.config import Config
from asrd.control import StaticControlPlane
from asrd.gateway import Gateway
from asrd.metrics import WorkerMetrics
from asrd.procfs import read_proc
from tests.audio_fixtures import DATA_DIR, load_clip, read_wav, silence
from tests.conftest import Nats, Pool, RunningGateway, open_gateway
from tests.records import session_record
from tests.servers import read_until, start_worker, stop

GUARD_S = 120


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


@pytest.mark.integration
async def test_gateway_metrics_and_health(gateway: RunningGateway) -> None:
    base = f"http://127.0.0.1:{gateway.port}"
    pcm = load_clip("0880") + silence(1000, 16000)
    with trio.fail_after(GUARD_S):
        async with open_transcription(
            gateway.url,
            pcm_chunks(pcm),
            16000,
            token="t",
            appkey="default",
            realtime=False,
            params={"enable_intermediate_result": True},
        ) as tr:
            async for _ in tr:
                pass
        # The client has its TranscriptionCompleted before the gateway has closed the
        # session and counted its outcome: wait for the gateway to have no session left.
        await gateway.gateway.state.idle.wait()
    status, text = await trio.to_thread.run_sync(get, base + "/metrics")
    assert status == 200
    assert metric(text, 'asrd_sessions_total{code="20000000"}') >= 1
    assert metric(text, "asrd_audio_seconds_total") > 3.0
    assert metric(text, "asrd_partial_lag_seconds_count") > 0
    assert metric(text, "asrd_endpointing_seconds_count") >= 1
    assert metric(text, "asrd_workers_alive") == 2
    assert metric(text, "asrd_decoders_total") == 4
    assert metric(text, "asrd_redis_errors_total") == 0  # no Redis configured
    assert metric(text, "process_open_fds") > 3  # the listener, NATS, the metrics socket
    assert (await trio.to_thread.run_sync(get, base + "/healthz"))[0] == 200
    assert (await trio.to_thread.run_sync(get, base + "/readyz"))[0] == 200
    assert (await trio.to_thread.run_sync(get, base + "/nope"))[0] == 404
    gateway.gateway.draining = True  # what SIGTERM does first: load balancers see not-ready
    assert (await trio.to_thread.run_sync(get, base + "/readyz"))[0] == 503
    gateway.gateway.draining = False
    # The same answers as on the metrics ports (tests/test_httpserve.py): HEAD, 405, and a
    # body nobody reads drained before the close, so that no RST loses the answer.
    head = await trio.to_thread.run_sync(raw_exchange, gateway.port, b"HEAD /healthz", b"")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n"), head
    posted = await trio.to_thread.run_sync(raw_exchange, gateway.port, b"POST /metrics", 65536)
    assert posted.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n"), posted[:200]
    assert b"\r\nAllow: GET, HEAD\r\n" in posted


@pytest.mark.integration
async def test_readyz_is_503_until_the_gateway_listens(nats: Nats) -> None:
    """As ``asrd serve`` does, the gateway opens its port once its workers are up; meanwhile
    its metrics port must not call it ready (a load balancer would send clients to a closed
    port)."""
    port = free_port()
    config = Config.model_validate(
        {
            "server": {"port": port, "default_language": "nobody-serves-it"},
            "nats": {"url": nats.url},
        }
    )
    async with open_nats_bus(config.nats, nats.url, name="test-readyz") as bus:
        gw = Gateway(config, bus, StaticControlPlane(config))
        readyz = gw.health_routes()["/readyz"]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(gw.serve, wait_for_workers=1))
            with trio.fail_after(GUARD_S):
                while not bus.connected:  # noqa: ASYNC110 - no event to wait on
                    await trio.sleep(0.01)
            await trio.sleep(0.2)  # serving, waiting for the workers
            assert readyz() == (503, b"not ready\n")
            with pytest.raises(OSError):  # nothing listens yet
                await trio.open_tcp_stream("127.0.0.1", port)
            gw.stop_requested.set()
            nursery.cancel_scope.cancel()


async def test_free_decoders_leave_out_draining_workers() -> None:
    """A draining worker takes no claims: its free decoders are none a session can get, and
    counted, they hid a pool running out of decoders during a rolling restart."""
    from asrd.bus import heartbeat_subject
    from asrd.bus.memory import InMemoryBus

    config = Config()
    bus = InMemoryBus()
    gw = Gateway(config, bus, StaticControlPlane(config))
    async with trio.open_nursery() as nursery:
        await nursery.start(gw.registry.run)
        subject = heartbeat_subject(config.nats.subject_prefix)
        bus.publish(subject, wire.Heartbeat("w1", "en-US", "x", 4, 3).encode())
        bus.publish(subject, wire.Heartbeat("w2", "en-US", "x", 4, 4, draining=True).encode())
        await trio.testing.wait_all_tasks_blocked()
        text = gw.state.metrics.registry.render().decode()
        nursery.cancel_scope.cancel()
    assert metric(text, "asrd_decoders_free") == 3
    assert metric(text, "asrd_decoders_total") == 8


def raw_exchange(port: int, request_line: bytes, body: bytes | int) -> bytes:
    """One HTTP/1.1 request with a body of ``body`` bytes, read to EOF (ConnectionResetError
    if the server closes with the body unread)."""
    data = bytes(body) if isinstance(body, int) else body
    head = request_line + b" HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(data)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + data)
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
        return response


@pytest.mark.integration
def test_worker_metrics_endpoint(nats: Nats) -> None:
    port = free_port()
    worker = start_worker(nats.url, "it-metrics", 1, "--metrics-port", str(port))
    try:
        deadline = time.monotonic() + GUARD_S
        while True:
            try:
                status, text = get(f"http://127.0.0.1:{port}/metrics")
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert status == 200
        assert metric(text, "asrd_worker_decoders_total") == 1
        assert metric(text, "asrd_worker_decoders_free") == 1
        # The worker's own process, not ours: its RSS as seen from outside (pocketsphinx's
        # model makes it far larger than a bare Python).
        outside = read_proc(worker.pid)
        assert outside is not None and outside.rss_kb > 50_000
        rss = metric(text, "process_resident_memory_bytes")
        assert 0.8 < rss / (outside.rss_kb * 1024) < 1.25
        assert metric(text, "process_cpu_seconds_total") <= outside.cpu_s
        assert get(f"http://127.0.0.1:{port}/readyz")[0] == 200
    finally:
        stop(worker)


@pytest.mark.integration
async def test_the_final_pass_runs_at_the_pause_over_real_nats(nats: Nats) -> None:
    """A client streaming in real time: the gateway hints the pause that closes the
    sentence, over a real nats-server, and the `asrd worker` runs the batch final pass then;
    its /metrics counts the pass used, and the final is the sentence's. With the default
    final pass (adaptive), a sentence that ends within the session's first 2 s of speech
    gets the batch pass: ``cards/001.wav``, 1.1 s."""
    port = free_port()
    worker = start_worker(nats.url, "it-early", 1, "--metrics-port", str(port))
    try:
        events = []
        with trio.fail_after(GUARD_S):
            async with (
                open_gateway(nats.url, Pool("it-early", [worker], 1)) as gw,
                open_transcription(
                    gw.url,
                    pcm_chunks(read_wav(DATA_DIR / "cards" / "001.wav")[0] + silence(1500, 16000)),
                    16000,
                    token="t",
                    appkey="default",
                    realtime=True,
                ) as tr,
            ):
                events = [event async for event in tr]
        ends = [e["payload"]["result"] for e in events if e["header"]["name"] == "SentenceEnd"]
        assert len(ends) == 1 and "10 of clubs" in ends[0].lower(), ends  # ITN on
        _, text = await trio.to_thread.run_sync(get, f"http://127.0.0.1:{port}/metrics")
        assert metric(text, 'asrd_worker_early_final_passes_total{outcome="used"}') == 1
    finally:
        stop(worker)


def test_exposition_keeps_every_digit_and_escapes_labels() -> None:
    """``:g`` kept six digits: a total past 1e6 moved in steps, and rate() showed plateaus."""
    from asrd.metrics import Counter, Gauge, Histogram

    total = Counter("t_total", "a total", ["code"])
    total.inc(1234567.8, 'a"b\\c\nd')
    total.inc(40, 'a"b\\c\nd')
    assert list(total.render())[-1] == 't_total{code="a\\"b\\\\c\\nd"} 1234607.8'
    audio = Counter("a_total", "a sum of floats")
    for _ in range(1315):
        audio.inc(0.01)
    assert list(audio.render())[-1] == "a_total 13.15"
    hist = Histogram("h_seconds", "a histogram", [0.1, 1.0])
    for _ in range(3):
        hist.observe(123456.789)
    assert "h_seconds_sum 370370.367" in "\n".join(hist.render())
    reconnects = Gauge("r_total", "read from a library", lambda: 3, kind="counter")
    assert list(reconnects.render()) == [
        "# HELP r_total read from a library",
        "# TYPE r_total counter",
        "r_total 3",
    ]


def test_process_metrics_follow_this_process() -> None:
    """The standard process_* and python_gc_* metrics (each scrape reads them afresh):
    memory, CPU, file descriptors and collections move when the process uses more."""
    registry = WorkerMetrics().registry

    def scrape() -> str:
        return registry.render().decode()

    gc.collect()  # earlier tests' garbage is freed now, not between the scrapes compared
    before = scrape()
    # Fresh pages of its own, resident only once written: a bytearray may reuse memory an
    # earlier test freed that the allocator kept resident, and then RSS does not move.
    ballast = mmap.mmap(-1, 64 << 20)
    for i in range(0, len(ballast), mmap.PAGESIZE):
        ballast[i] = 1
    spin_until = time.process_time() + 0.3
    while time.process_time() < spin_until:
        pass
    gc.collect()
    closed = scrape()  # (the collection may close sockets earlier tests left to it)
    with open(os.devnull) as _a, open(os.devnull) as _b:
        after = scrape()
    full = 'python_gc_collections_total{generation="2"}'
    assert metric(after, full) > metric(before, full)
    grown = metric(after, "process_resident_memory_bytes") - metric(
        before, "process_resident_memory_bytes"
    )
    assert grown > 60 << 20
    assert metric(after, "process_virtual_memory_bytes") >= metric(
        after, "process_resident_memory_bytes"
    )
    assert (
        metric(after, "process_cpu_seconds_total") - metric(before, "process_cpu_seconds_total")
        >= 0.25
    )
    assert metric(after, "process_open_fds") == metric(closed, "process_open_fds") + 2
    assert metric(after, "process_max_fds") >= metric(after, "process_open_fds")
    # Seconds since the epoch (not since boot, not clock ticks): this test process
    # started before now, and within the last day.
    started = metric(after, "process_start_time_seconds")
    assert time.time() - 86400 < started <= time.time()
    assert "# TYPE process_cpu_seconds_total counter" in after
    ballast.close()


@pytest.mark.integration
def test_a_workers_lines_about_a_session_carry_its_ids(nats: Nats) -> None:
    """The claim brings the client's task id; a session's failure is then logged with both
    ids as fields, not only inside the message."""
    sid, task = "ab" * 16, "cd" * 16

    async def claim_then_send_junk() -> None:
        nc = await nats_py.connect(nats.url)
        claim = wire.Claim(sid, 16000, False, task_id=task).encode()
        reply = await nc.request("asrd.claim.log-ids", claim, timeout=GUARD_S)
        assert wire.decode_claim_reply(reply.data).ok
        await nc.publish(f"asrd.session.{sid}.in", b"\x01\x00")  # no valid input message
        await nc.flush()
        await nc.close()

    argv = ["--log-json", "worker", "--processes", "1", "--engine", "loadtest"]
    argv += ["--pool", "log-ids", "--nats-url", nats.url]
    proc = subprocess.Popen(
        [sys.executable, "-m", "asrd", *argv], stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stderr is not None
        read_until(proc.stderr, "serving pool")
        asyncio.run(claim_then_send_junk())
        line = json.loads(read_until(proc.stderr, sid)[-1])
    finally:
        stop(proc)
    assert line["message"].startswith(f"session {sid} failed: malformed"), line
    assert (line["session_id"], line["task_id"]) == (sid, task), line


class _JsonLines(logging.Handler):
    """Formats each record as it is emitted, in the emitting task's context, as the
    gateway's own handler does."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logs.JsonFormatter())
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@pytest.mark.integration
async def test_trio_websockets_lines_about_a_session_carry_its_ids(
    gateway: RunningGateway,
) -> None:
    """trio-websocket reads each connection in a task it starts before the session's own,
    outside the session's context: its debug lines (one per frame) had no ids."""
    handler = _JsonLines()
    ws_log = logging.getLogger("trio-websocket")
    level = ws_log.level
    ws_log.addHandler(handler)
    ws_log.setLevel(logging.DEBUG)
    try:
        with trio.fail_after(GUARD_S):
            async with open_transcription(
                gateway.url,
                pcm_chunks(silence(500, 16000)),
                16000,
                token="t",
                appkey="default",
                realtime=False,
            ) as tr:
                async for _ in tr:
                    pass
            await gateway.gateway.state.idle.wait()
    finally:
        ws_log.removeHandler(handler)
        ws_log.setLevel(level)
    server = [line for line in handler.lines if line["message"].startswith("server-")]
    # From the first message on: the upgrade request comes before the session exists.
    first = next(i for i, line in enumerate(server) if "TextMessage" in line["message"])
    assert len(server) - first > 10, server  # Start, 5 frames, Stop, close, results
    assert [line for line in server[first:] if len(line.get("session_id", "")) != 32] == []


def test_json_log_lines_carry_session_and_task_ids() -> None:
    formatter = logs.JsonFormatter()
    record = logging.LogRecord("asrd.session", logging.INFO, __file__, 1, "hello %s", ("x",), None)
    token = logs.current.set(logs.LogContext("s" * 32, "t" * 32))
    try:
        line = json.loads(formatter.format(record))
    finally:
        logs.current.reset(token)
    assert line["message"] == "hello x"
    assert line["session_id"] == "s" * 32 and line["task_id"] == "t" * 32
    assert json.loads(formatter.format(record)).get("session_id") is None


@pytest.mark.integration
def test_under_log_json_the_worker_of_serve_writes_json_too(tmp_path: Path) -> None:
    """`asrd --log-json serve` starts its worker with the same logging options: the worker's
    lines, a session's among them, were plain text, without the ids as fields."""
    (tmp_path / "config.toml").write_text(
        '[server]\nport = 0\n\n[worker]\nprocesses = 1\nengine = "loadtest"\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "asrd", "--log-json", "serve", "--config", "config.toml"],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        lines = read_until(proc.stderr, "gateway listening on")
        if not any("serving pool" in line for line in lines):
            lines += read_until(proc.stderr, "serving pool")
    finally:
        stop(proc)
    worker = [line for line in lines if "serving pool" in line]
    assert worker[0].startswith("{"), worker
    assert json.loads(worker[0])["logger"] == "asrd.worker", worker


def test_a_worker_of_serve_gets_the_log_options_of_serve(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(logs, "_options", [])
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        logs.setup("debug", json_lines=True)
        argv = worker_argv(None, "nats://127.0.0.1:4222")
    finally:
        root.handlers[:], root.level = handlers, level
    command = argv.index("worker")
    assert argv[3:command] == ["--log-level", "debug", "--log-json"], argv


async def test_a_transcript_dropped_from_the_buffer_is_logged_with_its_own_ids(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The record buffer overflows while a later session ends (Redis away): the line saying
    which transcript is dropped carries the ids of the session it was, not of the one whose
    end pushed it out."""
    from asrd.control import Admission
    from asrd.store.plane import open_redis_control_plane

    config = Config.model_validate(
        {"redis": {"url": f"redis://127.0.0.1:{free_port()}", "buffer_records": 1}}
    )
    caplog.handler.setFormatter(logs.JsonFormatter())
    async with open_redis_control_plane(config) as plane:
        for i in range(2):
            sid, task = f"{i}" * 32, f"{i + 5}" * 32
            record = session_record("k", sid, task_id=task, text="hi")
            with logs.about(sid, task):  # as the session's own task calls it
                await plane.finish(Admission(appkey="k", pool="en-US", slot=sid), record)
        assert plane.lost_transcripts == 1
    lines = [json.loads(line) for line in caplog.text.splitlines()]
    (dropped,) = [line for line in lines if "is dropped" in line["message"]]
    assert f"task {'5' * 32}" in dropped["message"], dropped
    assert (dropped["session_id"], dropped.get("task_id")) == ("0" * 32, "5" * 32), dropped
