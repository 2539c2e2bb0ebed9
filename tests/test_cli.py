"""The README's tour as a test: `asrd serve` in one process, `asrd transcribe` in another."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket

from asrd.children import free_port
from asrd.client import start_message
from asrd.wer import wer
from tests.audio_fixtures import LIBRIVOX, transcripts
from tests.conftest import Nats
from tests.servers import alive, read_until

pytestmark = pytest.mark.integration
GUARD_S = 120


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


async def _start_with_language(url: str, language: str) -> dict[str, Any]:
    """The server's answer to a StartTranscription asking for ``language``."""
    async with trio_websocket.open_websocket_url(url) as ws:
        start = start_message(uuid.uuid4().hex, "default", 16000, {"language": language})
        await ws.send_message(json.dumps(start))
        with trio.fail_after(GUARD_S):
            answer: dict[str, Any] = json.loads(await ws.get_message())
        return answer


def test_serve_then_transcribe_then_sigterm_leaves_no_orphans(tmp_path: Path) -> None:
    port = free_port()
    # no config.toml in tmp_path: the documented defaults
    serve = spawn_asrd(tmp_path, "serve", "--port", str(port), "--workers", "1")
    try:
        assert serve.stderr is not None
        lines = read_until(serve.stderr, "gateway listening on")
        assert f"ws://127.0.0.1:{port}/ws/v1" in lines[-1], lines
        kids = children_of(serve.pid)
        assert len(kids) == 2  # nats-server and one worker

        clip = LIBRIVOX["0880"]
        url = f"ws://127.0.0.1:{port}/ws/v1"
        text = subprocess.run(
            [sys.executable, "-m", "asrd", "transcribe", "--fast", "--url", url, str(clip)],
            capture_output=True,
            text=True,
            timeout=GUARD_S,
            check=True,
        ).stdout
        assert text.startswith("[")  # "[0.27-3.90] He was not ..."
        hyp = " ".join(line.split("] ", 1)[1] for line in text.splitlines())
        assert wer([transcripts()["0880"]], [hyp]) < 0.5

        events = subprocess.run(
            [
                sys.executable,
                "-m",
                "asrd",
                "transcribe",
                "--fast",
                "--json",
                "--url",
                url,
                str(clip),
            ],
            capture_output=True,
            text=True,
            timeout=GUARD_S,
            check=True,
        ).stdout.splitlines()
        names = [json.loads(e)["header"]["name"] for e in events]
        assert names[0] == "TranscriptionStarted" and names[-1] == "TranscriptionCompleted"
        assert "SentenceEnd" in names

        # `asrd transcribe --json ... | head -1`: the reader goes away after the first event.
        head = subprocess.Popen(
            [sys.executable, "-m", "asrd", "transcribe", "--json", "--url", url, str(clip)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert head.stdout is not None and head.stderr is not None
        first = read_until(head.stdout, "")[0]
        assert json.loads(first)["header"]["name"] == "TranscriptionStarted"
        head.stdout.close()  # real time: the next event comes a good while later
        assert head.wait(GUARD_S) == 141
        assert "Traceback" not in head.stderr.read()

        # Its own workers serve en-US only: another language is an invalid parameter at once,
        # not a server error that a client would retry.
        failed = trio.run(_start_with_language, url, "fr-FR")
        assert failed["header"]["name"] == "TaskFailed"
        assert failed["header"]["status"] == 40000003, failed
        assert (
            "'fr-FR'" in failed["header"]["status_text"]
            and "en-US" in failed["header"]["status_text"]
        )

        bad = subprocess.run(
            [sys.executable, "-m", "asrd", "transcribe", "--url", url, str(tmp_path / "nope.wav")],
            capture_output=True,
            text=True,
            timeout=GUARD_S,
        )
        assert bad.returncode == 2 and bad.stderr

        serve.send_signal(signal.SIGTERM)
        assert serve.wait(GUARD_S) == 0
        deadline = time.monotonic() + GUARD_S
        while any(alive(k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [k for k in kids if alive(k)]
        # The worker stops before its nats-server, so it leaves NATS without a lost connection,
        # and a process's own close of its NATS connection is no warning.
        stopping = serve.stderr.read()
        assert "received SIGTERM" in stopping, stopping
        assert "NATS error" not in stopping and "NATS disconnected" not in stopping, stopping
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()


def test_refuses_public_address_without_auth(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "asrd", "serve", "--host", "0.0.0.0", "--port", "0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=GUARD_S,
        env={**os.environ},
    )
    assert result.returncode == 2
    assert "loopback" in result.stderr


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def spawn_asrd(cwd: Path, *argv: str, sigint_ignored: bool = False) -> subprocess.Popen[str]:
    """``asrd ARGV`` running in ``cwd``, its log (stderr) piped for reading; with
    ``sigint_ignored``, started as a shell starts a background job: SIGINT ignored."""
    return subprocess.Popen(
        [sys.executable, "-m", "asrd", *argv],
        cwd=cwd,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_ignore_sigint if sigint_ignored else None,
    )


def run_asrd(cwd: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "asrd", *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=GUARD_S,
    )


def test_ctrl_c_while_the_commands_load_ends_with_130(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building the parser imports every command's module (0.3 s, numpy among them): a
    Ctrl-C then printed a traceback, where one a moment later ends quietly with 130."""
    from asrd import cli

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["serve"]) == 130


def test_an_unknown_log_level_is_refused_not_ignored(tmp_path: Path) -> None:
    result = run_asrd(tmp_path, "--log-level", "verbose", "config", "show")
    assert result.returncode == 2 and "--log-level" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "asrd", "config", "show"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=GUARD_S,
        env={**os.environ, "ASRD_LOG_LEVEL": "verbose"},
    )
    assert result.returncode == 2 and "ASRD_LOG_LEVEL" in result.stderr


def test_worker_refuses_engine_options_its_engine_does_not_know(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("[worker]\nengine_options = { nonesuch = 1 }\n")
    result = run_asrd(
        tmp_path, "worker", "--config", "config.toml", "--nats-url", "nats://127.0.0.1:1"
    )
    assert result.returncode == 2, result.stderr
    assert "[worker] engine 'pocketsphinx'" in result.stderr
    assert "nonesuch" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("key", ["final_pass", "decoders"])
def test_worker_refuses_its_own_settings_in_engine_options(tmp_path: Path, key: str) -> None:
    """They were passed to the engine twice: a TypeError traceback, not a config error."""
    (tmp_path / "config.toml").write_text(f'[worker]\nengine_options = {{ {key} = "live" }}\n')
    result = run_asrd(
        tmp_path, "worker", "--config", "config.toml", "--nats-url", "nats://127.0.0.1:1"
    )
    assert result.returncode == 2, result.stderr
    assert f"{key}: set in [worker] itself" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_stops_when_its_worker_cannot_start(tmp_path: Path) -> None:
    """The worker child exits at start (an engine option it does not know): serve says so and
    stops, instead of waiting five minutes for workers that will never come."""
    (tmp_path / "config.toml").write_text(
        "[server]\nport = 0\n\n[worker]\nprocesses = 1\nengine_options = { nonesuch = 1 }\n"
    )
    result = run_asrd(tmp_path, "serve", "--config", "config.toml")
    assert result.returncode == 1, result.stderr
    assert re.search(r"asrd: asrd worker \(pid \d+\) exited with status 2", result.stderr)
    assert "Traceback" not in result.stderr


def _signal_serve_waiting_for_workers(tmp_path: Path, signum: int) -> tuple[int, str]:
    """``signum`` to an ``asrd serve`` whose workers are not up yet (they serve another pool,
    so they never count): its status and stderr."""
    (tmp_path / "config.toml").write_text(
        '[server]\nport = 0\n\n[worker]\nprocesses = 1\nengine = "loadtest"\npool = "other"\n'
    )
    proc = spawn_asrd(tmp_path, "serve", "--config", "config.toml")
    try:
        assert proc.stderr is not None
        read_until(proc.stderr, "serving pool 'other'")  # the worker is up (in the wrong pool)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=GUARD_S)
    finally:
        proc.kill()
    return proc.returncode, err


def test_serve_stopped_while_waiting_for_workers_stops(tmp_path: Path) -> None:
    """SIGTERM while the workers are not up yet: serve stops at once rather than after the
    wait, and never reports itself ready."""
    status, err = _signal_serve_waiting_for_workers(tmp_path, signal.SIGTERM)
    assert status == 1, err
    assert "asrd: stopped before the engine workers came up" in err
    assert "listening" not in err and "Traceback" not in err


def test_ctrl_c_while_serve_waits_for_its_workers_ends_with_130(tmp_path: Path) -> None:
    """README: a Ctrl-C before it serves stops it at once with status 130. While it waited
    for its workers (loading the engine: most of its start) it ended with 1 and "asrd:
    stopped before the engine workers came up", as for a failure."""
    status, err = _signal_serve_waiting_for_workers(tmp_path, signal.SIGINT)
    assert status == 130, err
    assert "stopped before" not in err and "listening" not in err and "Traceback" not in err


def test_forked_workers_that_cannot_reach_nats_fail_as_one_worker_does(tmp_path: Path) -> None:
    argv = ["--processes", "2", "--engine", "loadtest", "--nats-url", "nats://127.0.0.1:1"]
    result = run_asrd(tmp_path, "worker", *argv)
    assert result.returncode == 1, result.stderr
    assert "asrd: cannot connect to NATS at nats://127.0.0.1:1" in result.stderr
    assert "exited with 1 at start" in result.stderr
    assert "Traceback" not in result.stderr


def test_under_log_json_every_line_of_a_failing_gateway_is_json(tmp_path: Path) -> None:
    """A log collector parses each line: the reason the process ends is a JSON line too, and
    nothing else follows it (nats-py's cancelled connect is unwound, not reported by asyncio
    as a task destroyed while pending)."""
    argv = ["--log-json", "gateway", "--port", "0", "--nats-url", "nats://127.0.0.1:1"]
    result = run_asrd(tmp_path, *argv)
    assert result.returncode == 1, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    assert lines[-1]["level"] == "critical", lines
    assert lines[-1]["message"].startswith("cannot connect to NATS at nats://127.0.0.1:1")
    assert not [line for line in lines if line["logger"] == "asyncio"], lines


@pytest.mark.parametrize("sched_batch", [True, False])
def test_forked_workers_decode_under_sched_batch(
    tmp_path: Path, nats: Nats, sched_batch: bool
) -> None:
    """Every thread of each forked worker process (its NATS thread too), so that a worker's
    wake-up does not preempt another's decode; not the parent, which only supervises them."""
    (tmp_path / "c.toml").write_text(f"[worker]\nsched_batch = {str(sched_batch).lower()}\n")
    argv = ["worker", "--config", "c.toml", "--processes", "2", "--engine", "loadtest"]
    proc = spawn_asrd(tmp_path, *argv, "--nats-url", nats.url)
    try:
        assert proc.stderr is not None
        for _ in range(2):
            read_until(proc.stderr, "serving pool")
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert len(children) == 2, children
        want = os.SCHED_BATCH if sched_batch else os.SCHED_OTHER
        for child in children:
            threads = [int(t) for t in os.listdir(f"/proc/{child}/task")]
            assert len(threads) > 1, threads  # the event loop's and NATS's at least
            assert [os.sched_getscheduler(t) for t in threads] == [want] * len(threads)
        assert os.sched_getscheduler(proc.pid) == os.SCHED_OTHER
    finally:
        proc.terminate()
        proc.wait(GUARD_S)


@pytest.mark.parametrize("which", ["gateway port", "gateway metrics port", "worker metrics port"])
def test_a_port_in_use_ends_the_command_with_a_reason(
    tmp_path: Path, nats: Nats, which: str
) -> None:
    """Not an ExceptionGroup traceback (70 lines, none of them JSON under --log-json)."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        (tmp_path / "c.toml").write_text(
            f"[server]\nport = {port if which == 'gateway port' else 0}\n"
            + (f"metrics_port = {port}\n" if which == "gateway metrics port" else "")
        )
        if which.startswith("gateway"):
            argv = ["gateway", "--config", "c.toml", "--nats-url", nats.url]
        else:
            argv = ["worker", "--processes", "1", "--engine", "loadtest", "--nats-url", nats.url]
            argv += ["--metrics-port", str(port)]
        result = run_asrd(tmp_path, "--log-json", *argv)
    assert result.returncode == 1, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    assert lines[-1]["level"] == "critical", lines
    assert re.fullmatch(
        rf"cannot listen on 127\.0\.0\.1:{port}: Address already in use", lines[-1]["message"]
    ), lines[-1]


@contextlib.contextmanager
def gateway_with_a_session(
    tmp_path: Path, nats: Nats, processes: int
) -> Iterator[tuple[subprocess.Popen[str], socket.socket, list[str]]]:
    """`asrd gateway` with ``processes`` processes, listening, and a WebSocket connection to it
    (a session to drain); the log read so far. Killed if the test leaves it running."""
    port = free_port()
    argv = ["gateway", "--port", str(port), "--nats-url", nats.url]
    proc = spawn_asrd(tmp_path, *argv, "--processes", str(processes))
    try:
        assert proc.stderr is not None
        log: list[str] = []
        for _ in range(processes):
            log += read_until(proc.stderr, "gateway listening")
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(
                b"GET /ws/v1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n"
            )
            assert sock.recv(200).startswith(b"HTTP/1.1 101")
            yield proc, sock, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("processes", [1, 2])
def test_a_second_ctrl_c_stops_a_draining_gateway_with_130(
    tmp_path: Path, nats: Nats, processes: int
) -> None:
    """The first starts the drain; the second, trio's KeyboardInterrupt wrapped in the
    nurseries' exception group, used to end in a traceback and status 1. With forked gateway
    processes the parent kept the second from them: the drain ran on to its end, and the
    command ended with 0."""
    with gateway_with_a_session(tmp_path, nats, processes) as (proc, _, _):
        assert proc.stderr is not None
        proc.send_signal(signal.SIGINT)
        read_until(proc.stderr, "draining: 1 session running")  # the process that has it
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=GUARD_S)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]


@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.parametrize(
    ("signum", "status"),
    [pytest.param(signal.SIGTERM, 0, id="SIGTERM"), pytest.param(signal.SIGHUP, 129, id="SIGHUP")],
)
def test_a_second_stop_signal_lets_a_draining_gateway_finish(
    tmp_path: Path, nats: Nats, processes: int, signum: signal.Signals, status: int
) -> None:
    """`systemctl kill` sends its signal to every process of the unit, so a forked gateway
    process gets one from systemd and one from its parent. The second SIGTERM killed a
    draining process at once (one process too, on a second `kill`), cutting its sessions off.
    SIGHUP, Python's default, killed it at the first, and ended with a status that systemd's
    Restart=on-failure takes for a clean stop: the unit stayed down. It now drains as for
    SIGTERM and ends with 129, so that systemd starts it again."""
    with gateway_with_a_session(tmp_path, nats, processes) as (proc, sock, log):
        assert proc.stderr is not None
        pids = [proc.pid, *children_of(proc.pid)]
        proc.send_signal(signum)
        log += read_until(proc.stderr, "draining: 1 session running")  # the process that has it
        for pid in pids:  # as systemd's kill does
            try:
                os.kill(pid, signum)
            except ProcessLookupError:  # the process with no session to drain
                pass
        sock.close()  # the client hangs up: its session ends, and the drain with it
        _, err = proc.communicate(timeout=GUARD_S)
    log += err.splitlines()
    assert proc.returncode == status, log[-20:]
    assert sum("gateway stopped" in line for line in log) == processes, log[-20:]


@pytest.mark.parametrize("processes", [1, 2])
def test_sighup_stops_a_worker_to_be_started_again(
    tmp_path: Path, nats: Nats, processes: int
) -> None:
    """As the gateway's (above): a drain, then 129, which systemd's Restart=on-failure
    restarts; Python's default had it die at once, in a way systemd takes for a clean stop."""
    argv = ["worker", "--engine", "loadtest", "--nats-url", nats.url]
    proc = spawn_asrd(tmp_path, *argv, "--processes", str(processes))
    try:
        assert proc.stderr is not None
        for _ in range(processes):
            read_until(proc.stderr, "serving pool")
        proc.send_signal(signal.SIGHUP)
        _, err = proc.communicate(timeout=GUARD_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 129, err[-3000:]
    assert err.count("received SIGHUP: stopping, to end with status 129") == processes, err


@pytest.mark.parametrize("sigint_ignored", [False, True])
def test_ctrl_c_while_the_gateway_connects_to_nats_ends_with_130(
    tmp_path: Path, sigint_ignored: bool
) -> None:
    """Also when started with SIGINT ignored, as a shell starts a background job: it ignored
    a SIGINT then, and caught the first one later but not the second."""
    argv = ("gateway", "--port", "0", "--nats-url", "nats://127.0.0.1:1")
    proc = spawn_asrd(tmp_path, *argv, sigint_ignored=sigint_ignored)
    assert proc.stderr is not None
    read_until(proc.stderr, "NATS error")  # nats-py retries
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=GUARD_S)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]


def test_a_ctrl_c_while_starting_comes_at_a_checkpoint_not_mid_code() -> None:
    """trio's own delivery raises KeyboardInterrupt wherever the main thread is, once inside
    trio itself as the gateway connected to NATS (a TypeError and a traceback in CI, not 130).
    Until the stop task takes SIGINT over, a task of ours raises it, at a checkpoint."""
    from asrd.cli import _ctrl_c_at_checkpoints, _run_command

    steps = []

    async def starting() -> int:
        os.kill(os.getpid(), signal.SIGINT)  # the handler runs before the next line
        steps.append("the line after the signal")
        await trio.sleep(GUARD_S)  # a checkpoint: the interrupt ends the start here
        steps.append("never")
        return 0

    assert _run_command(lambda: trio.run(_ctrl_c_at_checkpoints, starting)) == 130
    assert steps == ["the line after the signal"]


def test_under_log_json_a_failing_transcribe_says_why_in_json(tmp_path: Path) -> None:
    """Its reasons went to stderr as plain ``asrd transcribe: ...`` text even then."""
    result = run_asrd(tmp_path, "--log-json", "transcribe", "missing.wav")
    assert result.returncode == 2, result.stderr
    (line,) = [json.loads(line) for line in result.stderr.splitlines()]
    assert line["level"] == "critical" and line["message"].startswith("cannot read missing.wav")
    with wave.open(str(tmp_path / "a.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(bytes(3200))
    url = f"ws://127.0.0.1:{free_port()}/ws/v1"
    result = run_asrd(tmp_path, "--log-json", "transcribe", "--url", url, "a.wav")
    assert result.returncode == 1, result.stderr
    (line,) = [json.loads(line) for line in result.stderr.splitlines()]
    assert "failed with status 50000000: cannot connect" in line["message"]


def test_gateway_processes_that_cannot_reach_nats_fail_and_serve_runs_one(
    tmp_path: Path,
) -> None:
    (tmp_path / "c.toml").write_text(
        '[server]\nport = 0\nprocesses = 2\n\n[nats]\nurl = "nats://127.0.0.1:1"\n'
        '\n[worker]\nprocesses = 1\nengine = "loadtest"\n'
    )
    result = run_asrd(tmp_path, "gateway", "--config", "c.toml")
    assert result.returncode == 1, result.stderr
    assert "asrd: cannot connect to NATS at nats://127.0.0.1:1" in result.stderr
    assert re.search(r"gateway process \d exited with 1 at start", result.stderr)
    assert "Traceback" not in result.stderr
    # `asrd serve` runs one gateway process in its own process, and says so.
    result = run_asrd(tmp_path, "serve", "--config", "c.toml")
    assert "asrd serve runs one gateway process; [server] processes = 2" in result.stderr
    assert result.returncode == 1, result.stderr
