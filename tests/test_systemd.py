"""systemd integration: the unit files, the sd_notify protocol, NATS with authentication.

The notification protocol is checked against fake ``$NOTIFY_SOCKET``s (a datagram socket
bound in a temporary directory, and an abstract one), the watchdog cadence on trio's
``MockClock``, and the real ``asrd gateway`` / ``asrd worker`` processes end to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
import trio

from asrd import reuseport, sdnotify
from asrd.bench.procs import children_of
from asrd.children import free_port, nats_server_binary
from asrd.client import open_transcription, pcm_chunks
from asrd.config import NatsConfig, ServerConfig, load_config
from asrd.wer import wer
from tests.audio_fixtures import load_clip, silence, transcripts
from tests.conftest import Nats, Pool, open_gateway
from tests.servers import read_until, start_worker, stop, wait_port

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
DEPLOY = ROOT / "deploy"
UNIT_FILES = ("asrd-gateway.service", "asrd-worker@.service", "asrd.target")
INSTALLED_ASRD = "/opt/asrd/.venv/bin/asrd"
GUARD_S = 120  # a hang guard, not a speed threshold


# --- the unit files ------------------------------------------------------------------------


def unit_settings(path: Path) -> dict[str, dict[str, list[str]]]:
    """``[section] -> key -> values`` of a unit file (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def analyzable_units(tmp_path: Path) -> Path:
    """The units in a scratch directory, with ExecStart pointing at this checkout's asrd.

    systemd-analyze insists that the ExecStart binary exists; the units name the path of an
    installation (/opt/asrd), which this machine need not have.
    """
    asrd = Path(sys.executable).with_name("asrd")
    assert os.access(asrd, os.X_OK), asrd
    directory = tmp_path / "units"
    directory.mkdir()
    for name in UNIT_FILES:
        text = (UNITS / name).read_text()
        (directory / name).write_text(text.replace(INSTALLED_ASRD, str(asrd)))
    return directory


def systemd_analyze(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("systemd-analyze")
    assert binary, "systemd-analyze is missing: install the Debian package 'systemd'"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "SYSTEMD_LOG_LEVEL": "info",
        "SYSTEMD_LOG_COLOR": "0",
        "SYSTEMD_LOG_LOCATION": "0",
        "SYSTEMD_PAGER": "",
        "LANG": "C.UTF-8",
    }
    return subprocess.run(
        [binary, *args],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=GUARD_S,
        check=False,
    )


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    directory = analyzable_units(tmp_path)
    # A template is verified through instances (%i expands then).
    names = [
        "asrd-gateway.service",
        "asrd-worker@0.service",
        "asrd-worker@7.service",
        "asrd.target",
    ]
    result = systemd_analyze(directory, "verify", "--man=no", *names)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and result.stdout == ""  # not even a warning


def test_verify_would_catch_a_broken_unit(tmp_path: Path) -> None:
    """The check above is not vacuous: a typo in a key is reported."""
    directory = analyzable_units(tmp_path)
    unit = directory / "asrd-gateway.service"
    unit.write_text(unit.read_text().replace("WatchdogSec=", "WatchdogSecs="))
    result = systemd_analyze(directory, "verify", "--man=no", "asrd-gateway.service")
    assert "WatchdogSecs" in result.stderr


def test_units_are_hardened(tmp_path: Path) -> None:
    directory = analyzable_units(tmp_path)
    for name in ("asrd-gateway.service", "asrd-worker@0.service"):
        # exposure <= 2.0 of 10 ("OK"); the units score about 1.4
        result = systemd_analyze(
            directory, "security", "--offline=true", "--man=no", "--threshold=20", name
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Overall exposure level" in result.stdout


@pytest.mark.parametrize("name", ["asrd-gateway.service", "asrd-worker@.service"])
def test_service_settings(name: str) -> None:
    unit = unit_settings(UNITS / name)
    service = unit["Service"]

    def one(key: str) -> str:
        assert len(service.get(key, [])) == 1, key
        return service[key][0]

    command = "gateway" if "gateway" in name else "worker"
    argv = one("ExecStart").split()
    assert argv[:2] == [INSTALLED_ASRD, command] and "--config" in argv
    assert one("Type") == "notify" and one("NotifyAccess") == "main"
    assert int(one("WatchdogSec")) >= 10
    assert one("Restart") == "on-failure" and one("RestartPreventExitStatus") == "2"
    assert one("KillSignal") == "SIGTERM"
    # room for the drain: shutdown_grace_s, then 3 s of forced stop, then closing NATS
    assert int(one("TimeoutStopSec")) >= ServerConfig().shutdown_grace_s + 15
    assert one("User") == "asrd" and one("NoNewPrivileges") == "yes"
    assert one("CapabilityBoundingSet") == "" and one("ProtectSystem") == "strict"
    for key in ("ProtectHome", "PrivateTmp", "PrivateDevices", "MemoryDenyWriteExecute"):
        assert one(key) == "yes", key
    assert set(one("RestrictAddressFamilies").split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert unit["Unit"]["PartOf"] == ["asrd.target"]
    assert unit["Install"]["WantedBy"] == ["asrd.target"]
    if command == "worker":  # [worker] sched_batch: the filter refuses the process the call
        assert one("CPUSchedulingPolicy") == "batch"
        assert "@resources" in " ".join(service["SystemCallFilter"])
    if command == "gateway":
        assert int(one("LimitNOFILE")) >= 10 * ServerConfig().max_sessions
        # stops before the workers: its sessions drain while they still serve them
        after = " ".join(unit["Unit"]["After"]).split()
        assert "asrd-worker@0.service" in after, after


def test_target_pulls_in_only_the_units_enabled_here() -> None:
    """A machine with only asrd-worker@0 enabled must not start a gateway with the target."""
    target = unit_settings(UNITS / "asrd.target")
    assert "Wants" not in target["Unit"] and "Requires" not in target["Unit"]
    assert target["Install"]["WantedBy"] == ["multi-user.target"]
    for name in ("asrd-gateway.service", "asrd-worker@.service"):
        assert unit_settings(UNITS / name)["Install"]["WantedBy"] == ["asrd.target"]


def test_sysctl_file_sets_settings_this_kernel_has() -> None:
    """systemd-sysctl skips a key the kernel lacks with only a log line: a typo would go
    unnoticed on the machine it was meant for."""
    settings = {}
    for raw in (UNITS / "sysctl.d" / "60-asrd.conf").read_text().splitlines():
        if raw.strip() and not raw.lstrip().startswith(("#", ";")):
            key, _, value = raw.partition("=")
            settings[key.strip()] = value.strip()
    assert settings == {"net.ipv4.tcp_migrate_req": "1"}
    for key in settings:
        assert Path("/proc/sys", *key.split(".")).is_file(), key


def test_example_configurations_are_valid_and_match_nats_users() -> None:
    conf = (DEPLOY / "nats-server.conf").read_text()
    users = dict(re.findall(r'user: "([^"]+)", password: \$(\w+)', conf))
    gateway = load_config(DEPLOY / "gateway.toml")
    worker = load_config(DEPLOY / "worker.toml")
    assert gateway.auth.enabled and gateway.server.host == "0.0.0.0"
    assert {gateway.nats.user, worker.nats.user} == set(users) == {"asrd-gateway", "asrd-worker"}
    assert gateway.nats.subject_prefix == worker.nats.subject_prefix == "asrd"


# --- the notification protocol ---------------------------------------------------------------


@dataclass
class NotifySocket:
    """A fake systemd notification socket; it learns each sender's pid, as systemd does."""

    sock: socket.socket
    address: str  # the value of $NOTIFY_SOCKET
    received: list[str] = field(default_factory=list)
    senders: list[int] = field(default_factory=list)  # pid of each received datagram

    def _recv(self, flags: int = 0) -> str:
        data, ancillary, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(12), flags)
        pid = 0
        for level, kind, value in ancillary:
            if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS):
                pid = struct.unpack("iII", value[:12])[0]
        self.received.append(data.decode())
        self.senders.append(pid)
        return self.received[-1]

    def drain(self) -> list[str]:
        """Datagrams that arrived so far (non-blocking)."""
        got = []
        while True:
            try:
                got.append(self._recv(socket.MSG_DONTWAIT))
            except BlockingIOError:
                break
        return got

    async def receive(self) -> str:
        await trio.lowlevel.wait_readable(self.sock)
        return self._recv()

    async def wait_for(self, line: str) -> None:
        """Receive until a datagram carries ``line``."""
        while line not in (await self.receive()).split("\n"):
            pass


@contextmanager
def notify_socket(kind: str) -> Iterator[NotifySocket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    with sock, tempfile.TemporaryDirectory(prefix="asrd-sd-") as tmp:
        if kind == "abstract":
            name = f"asrd-test-{secrets.token_hex(8)}"
            sock.bind("\0" + name)
            address = "@" + name
        else:
            address = os.path.join(tmp, "notify")  # short: AF_UNIX paths end at 107 bytes
            sock.bind(address)
        yield NotifySocket(sock, address)


@pytest.fixture(params=["path", "abstract"])
def fake_systemd(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[NotifySocket]:
    for key in sdnotify.ENVIRONMENT_KEYS:
        monkeypatch.delenv(key, raising=False)
    with notify_socket(request.param) as ns:
        monkeypatch.setenv("NOTIFY_SOCKET", ns.address)
        yield ns


JOURNAL_SCRIPT = """
import logging, sys
from asrd import logs
logs.setup("debug", json_lines=sys.argv[1] == "json")
for level in ("debug", "info", "warning", "error", "critical"):
    getattr(logging.getLogger("asrd"), level)(level)
logs.fatal("the reason")
"""


def stderr_lines(tmp_path: Path, journal: str, *args: str) -> list[str]:
    """What JOURNAL_SCRIPT writes to stderr, a file; ``journal``: "this" sets
    ``$JOURNAL_STREAM`` to that file's device:inode, as systemd does, "other" to another's."""
    err = tmp_path / "stderr"
    err.touch()
    st = (err if journal == "this" else tmp_path).stat()
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    with err.open("w") as stderr:
        subprocess.run(
            [sys.executable, "-c", JOURNAL_SCRIPT, *args],
            env=env,
            stderr=stderr,
            timeout=GUARD_S,
            check=True,
        )
    return err.read_text().splitlines()


@pytest.mark.parametrize("form", ["text", "json"])
def test_lines_to_the_journal_carry_their_syslog_priority(tmp_path: Path, form: str) -> None:
    """journald stores a line that starts with <N> at priority N: asrd's warnings and errors
    were all stored at info (6), and ``journalctl -p warning`` showed none (seen under
    systemd)."""
    lines = stderr_lines(tmp_path, "this", form)
    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>", "<2>", "<2>"]
    if form == "json":  # journald strips the prefix: the message is the JSON line
        levels = [json.loads(line[3:])["level"] for line in lines]
        assert levels == ["debug", "info", "warning", "error", "critical", "critical"]
    else:
        assert lines[2].endswith(" WARNING asrd: warning")
        assert lines[5] == "<2>asrd: the reason"


def test_no_priority_prefix_when_stderr_is_not_the_journal(tmp_path: Path) -> None:
    """A child's stderr that is not the journal stream, though it inherited the variable."""
    lines = stderr_lines(tmp_path, "other", "text")
    assert len(lines) == 6 and not any(line.startswith("<") for line in lines)
    assert lines[5] == "asrd: the reason"


def test_without_notify_socket_everything_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in sdnotify.ENVIRONMENT_KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.ready() is False and sdnotify.stopping() is False
    assert sdnotify.watchdog_interval() is None
    trio.run(sdnotify.watchdog_loop, lambda: True)  # returns at once


def test_ready_status_stopping_reach_the_socket(fake_systemd: NotifySocket) -> None:
    assert sdnotify.ready("listening on port 8080")
    assert sdnotify.status("3 sessions\nrunning")
    assert sdnotify.extend_timeout(2.5)
    assert sdnotify.reloading()
    assert sdnotify.ready()
    assert sdnotify.stopping("draining")
    got = fake_systemd.drain()
    assert got[:3] == [
        "READY=1\nSTATUS=listening on port 8080",
        "STATUS=3 sessions running",  # one line: STATUS= must not contain a newline
        "EXTEND_TIMEOUT_USEC=2500000",
    ]
    assert re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=[0-9]+", got[3])
    assert got[4:] == ["READY=1", "STOPPING=1\nSTATUS=draining"]


def test_an_unreachable_socket_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    with tempfile.TemporaryDirectory(prefix="asrd-sd-") as tmp:
        monkeypatch.setenv("NOTIFY_SOCKET", os.path.join(tmp, "nobody-listens"))
        assert sdnotify.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")  # a kind we do not speak
    assert sdnotify.notify("READY=1") is False


@pytest.mark.parametrize(
    ("usec", "pid", "interval"),
    [
        ("10000000", None, 5.0),
        ("10000000", "self", 5.0),
        ("10000000", "1", None),  # meant for another process (we inherited it)
        ("0", None, None),
        ("ten", None, None),
        (None, None, None),
    ],
)
def test_watchdog_interval_is_half_the_period_for_our_pid_only(
    fake_systemd: NotifySocket,
    monkeypatch: pytest.MonkeyPatch,
    usec: str | None,
    pid: str | None,
    interval: float | None,
) -> None:
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()) if pid == "self" else pid)
    assert sdnotify.watchdog_interval() == interval


def test_child_environ_drops_the_notification_variables(fake_systemd: NotifySocket) -> None:
    env = sdnotify.child_environ({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1", "PATH": "/bin"})
    assert env == {"PATH": "/bin"}


async def test_watchdog_pings_every_half_period_while_healthy(
    fake_systemd: NotifySocket, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.abc.Clock
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")  # ping every 1 s
    healthy = True
    per_second: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sdnotify.watchdog_loop, lambda: healthy)
        await trio.sleep(0.5)  # sample between pings (they fall on whole seconds)
        for second in range(30):
            healthy = not 10 <= second < 20  # NATS lost for 10 s
            await trio.sleep(1.0)
            got = fake_systemd.drain()
            assert set(got) <= {"WATCHDOG=1"}
            per_second.append(len(got))
        nursery.cancel_scope.cancel()
    # The first sample holds the ping at start and the one 1 s later.
    assert per_second == [2] + [1] * 9 + [0] * 10 + [1] * 10


@dataclass
class Health:
    healthy: bool = True
    text: str = "0 sessions"


async def test_watchdog_reports_status_changes(
    fake_systemd: NotifySocket, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.abc.Clock
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    state = Health()
    loop = partial(sdnotify.watchdog_loop, lambda: state.healthy, describe=lambda: state.text)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loop)
        await trio.sleep(2.5)
        state.text = "2 sessions"
        await trio.sleep(1.0)
        state.healthy, state.text = False, "NATS disconnected"
        await trio.sleep(2.0)
        nursery.cancel_scope.cancel()
    assert fake_systemd.drain() == [
        "WATCHDOG=1\nSTATUS=0 sessions",
        "WATCHDOG=1",
        "WATCHDOG=1",
        "WATCHDOG=1\nSTATUS=2 sessions",
        "STATUS=NATS disconnected",  # no ping while unhealthy
    ]


async def test_no_watchdog_for_another_pid(
    fake_systemd: NotifySocket, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.abc.Clock
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getppid()))
    with trio.move_on_after(10):
        await sdnotify.watchdog_loop(lambda: True)
    assert fake_systemd.drain() == []


# --- the real processes ----------------------------------------------------------------------


def asrd_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "asrd", "--log-level", "info", *args]


def spawn_notifying(
    argv: list[str], ns: NotifySocket, watchdog_s: float = 1.0
) -> subprocess.Popen[bytes]:
    """Start ``argv`` as systemd would: $NOTIFY_SOCKET, and a watchdog (1 s by default)."""
    env = {k: v for k, v in os.environ.items() if k not in sdnotify.ENVIRONMENT_KEYS}
    env |= {"NOTIFY_SOCKET": ns.address, "WATCHDOG_USEC": str(int(watchdog_s * 1_000_000))}
    return subprocess.Popen(argv, env=env)


async def wait_exit(proc: subprocess.Popen[bytes] | subprocess.Popen[str]) -> int:
    with trio.fail_after(GUARD_S):
        while proc.poll() is None:  # noqa: ASYNC110 - a child process, no trio handle
            await trio.sleep(0.05)
    return proc.returncode


async def http_get(port: int, path: str) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := await stream.receive_some(4096):
            data += chunk
        return data


async def test_gateway_process_notifies_ready_watchdog_and_stopping(
    nats: Nats, tmp_path: Path
) -> None:
    port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(f'[server]\nport = {port}\n\n[nats]\nurl = "{nats.url}"\n')
    with notify_socket("path") as ns:
        proc = spawn_notifying(asrd_argv("gateway", "--config", str(config)), ns)
        try:
            with trio.fail_after(GUARD_S):
                await ns.wait_for("READY=1")
            # READY=1 came only once the port accepts connections and NATS is connected.
            assert (await http_get(port, "/readyz")).startswith(b"HTTP/1.1 200")
            with trio.fail_after(GUARD_S):
                # where it listens stays in the status, with the sessions counted
                await ns.wait_for(f"STATUS=listening on port {port}; 0 sessions")
                for _ in range(2):
                    await ns.wait_for("WATCHDOG=1")
            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(GUARD_S):
                await ns.wait_for("STOPPING=1")
            assert await wait_exit(proc) == 0
        finally:
            stop(proc)
    ready = next(i for i, m in enumerate(ns.received) if "READY=1" in m.split("\n"))
    assert f"listening on port {port}" in ns.received[ready]


async def test_serve_notifies_from_its_main_process_only(tmp_path: Path) -> None:
    """`asrd serve` reports READY once its workers are up; its children never notify."""
    port = free_port()
    config = tmp_path / "serve.toml"
    config.write_text(f"[server]\nport = {port}\n\n[worker]\ndecoders = 1\n")
    with notify_socket("path") as ns:
        proc = spawn_notifying(asrd_argv("serve", "--config", str(config), "--workers", "1"), ns)
        try:
            with trio.fail_after(GUARD_S):
                await ns.wait_for("READY=1")
            assert ns.senders[-1] == proc.pid, "a child process reported READY=1"
            assert (await http_get(port, "/readyz")).startswith(b"HTTP/1.1 200")
            proc.send_signal(signal.SIGTERM)
            assert await wait_exit(proc) == 0
        finally:
            stop(proc)
        ns.drain()
    assert any("STOPPING=1" in m.split("\n") for m in ns.received)
    # NotifyAccess=main: systemd would reject (and log) a datagram from the worker child.
    assert set(ns.senders) == {proc.pid}, list(zip(ns.senders, ns.received, strict=True))


PREFORK_SCRIPT = """
import os, sys, time
from asrd import reuseport, sdnotify
from asrd.prefork import run_forked

forks = [0]
if sys.argv[1] == "forkfail":  # the supervisor's first fork again fails (EAGAIN)
    import errno
    real_fork = os.fork

    def fork():
        forks[0] += 1
        if forks[0] == 3:
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        return real_fork()

    os.fork = fork

def target(index):
    if sys.argv[1] == "fail":
        return 3
    if sys.argv[1] == "forkfail" and index == 0 and forks[0] == 1:  # its first fork only
        sdnotify.ready()
        time.sleep(0.5)
        return 1
    if sys.argv[1] == "mask":  # what a child starts with: no signal blocked, default handlers
        import signal
        blocked = sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))
        term = signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        os.write(1, f"mask {index} {blocked} {term}\\n".encode())
        sdnotify.ready()
        time.sleep(60)  # until the test stops the family
        return 0
    if sys.argv[1] == "crash" and index == 0:
        sdnotify.ready()
        time.sleep(0.5)  # the family is ready by then: this is a crash after the start
        return 1
    if sys.argv[1] == "noabort":  # wedged, and SIGABRT does not end it (it handles it)
        import signal
        signal.signal(signal.SIGABRT, signal.SIG_IGN)
    if sys.argv[1] == "stopped":  # the first of each index stops (SIGSTOP); the next is healthy
        import pathlib, signal
        marker = pathlib.Path(sys.argv[2], str(index))
        sdnotify.ready()
        os.write(1, f"started {index} {os.getpid()}\\n".encode())
        if not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGSTOP)
        while True:
            sdnotify.notify("WATCHDOG=1")
            time.sleep(0.1)
    sdnotify.ready()  # and never a WATCHDOG=1: a wedged child
    os.write(1, f"started {index} {os.getpid()}\\n".encode())  # one write: no interleaving
    time.sleep(3600 if sys.argv[1] == "noabort" else 60)
    return 0

sys.exit(run_forked(2, target))
"""


def test_prefork_fails_with_the_status_of_a_child_that_fails_at_start() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PREFORK_SCRIPT, "fail"],
        capture_output=True,
        text=True,
        timeout=GUARD_S,
    )
    assert result.returncode == 3, result.stderr
    assert "exited with 3 at start" in result.stderr


def test_a_forked_child_starts_with_no_signal_blocked() -> None:
    """SIGTERM is blocked across the fork (so that one sent to a child before it resets the
    parent's handlers is not lost) and must be unblocked in the child, or it could not stop."""
    proc = subprocess.Popen(
        [sys.executable, "-c", PREFORK_SCRIPT, "mask"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        lines = sorted(proc.stdout.readline().strip() for _ in range(2))
        proc.send_signal(signal.SIGTERM)  # reaches the children: they can be stopped
        assert proc.wait(GUARD_S) == 0
    finally:
        stop(proc)
    assert lines == ["mask 0 [] True", "mask 1 [] True"]


SIGTERM_AT_START_SCRIPT = """
import logging, os, signal, sys, time
from asrd.prefork import run_forked

logging.basicConfig(level=logging.INFO)
parent = os.getpid()
install = signal.signal
sent = []

def install_then_sigterm(signum, handler):
    old = install(signum, handler)
    if signum == signal.SIGCHLD and os.getpid() == parent and not sent:
        sent.append(True)  # once: every handler of the supervisor is in place
        os.kill(parent, signal.SIGTERM)
    return old

signal.signal = install_then_sigterm

def target(index):
    time.sleep(60)  # not ready and not stopped: the family fails when this returns
    return 0

sys.exit(run_forked(1, target))
"""


def test_prefork_stops_on_a_sigterm_that_comes_as_it_starts() -> None:
    """SIGTERM just after the supervisor's handlers are in place: its handler does nothing,
    so the signal was lost when the wakeup pipe was set only after them."""
    result = subprocess.run(
        [sys.executable, "-c", SIGTERM_AT_START_SCRIPT],
        capture_output=True,
        text=True,
        timeout=GUARD_S,
    )
    assert result.returncode == 0, result.stderr
    assert "received SIGTERM: stopping" in result.stderr


DRAINING_SCRIPT = """
import os, sys, trio
from asrd.cli import _Stop, _stop_on_signals
from asrd.prefork import run_forked

async def serve():
    stop = _Stop(trio.Event())
    async with trio.open_nursery() as nursery:
        await nursery.start(_stop_on_signals, stop)
        os.write(1, f"started {os.getpid()}\\n".encode())
        await stop.event.wait()
        os.write(1, b"draining\\n")
        await trio.sleep_forever()  # a drain that does not end (wedged, or very long)

def target(index):
    trio.run(serve)
    return 0

sys.exit(run_forked(1, target, stop_timeout_s=3600))
"""


def test_a_draining_child_dies_with_its_parent() -> None:
    """A forked process that stops takes a second SIGTERM as nothing new, so its parent-death
    signal (SIGTERM) did nothing once it drained: killed in the middle of the drain (`asrd
    serve` kills a worker that overran it), the parent left the process running for good."""

    def running(pid: int) -> bool:  # a zombie has ended, its parent not yet told
        with contextlib.suppress(OSError):
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        return False

    argv = [sys.executable, "-c", DRAINING_SCRIPT]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    child = 0
    try:
        assert proc.stdout is not None
        child = int(read_until(proc.stdout, "started")[-1].split()[1])
        proc.send_signal(signal.SIGTERM)
        read_until(proc.stdout, "draining")
        proc.kill()
        proc.wait(GUARD_S)
        deadline = time.monotonic() + GUARD_S
        while running(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not running(child)
    finally:
        stop(proc)
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)


SLOW_STOP_SCRIPT = """
import pathlib, signal, sys, time
def on_term(signum, frame):
    if sys.argv[2] == "drain":
        time.sleep(1.0)  # a drain that takes a while
        sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
pathlib.Path(sys.argv[1]).touch()
while True:
    time.sleep(1)
"""


async def stop_started_child(tmp_path: Path, mode: str, stop_timeout_s: float) -> int:
    """Start a child that handles SIGTERM (``drain``: exits 1 s later; ``ignore``: never),
    stop it through its nursery, and return its exit status."""
    from asrd.children import start_child

    ready = tmp_path / "ready"
    argv = [sys.executable, "-c", SLOW_STOP_SCRIPT, str(ready), mode]
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            proc = await start_child(nursery, argv, "slow", stop_timeout_s=stop_timeout_s)
            # once it exists, the handler is in place: SIGTERM reaches it
            while not ready.exists():  # noqa: ASYNC110 - a file, no event to wait on
                await trio.sleep(0.02)
            nursery.cancel_scope.cancel()
    return proc.wait()


async def test_a_child_gets_its_stop_timeout_to_drain(tmp_path: Path) -> None:
    """`asrd serve` gives its worker child the time of the worker's drain: a child still
    finishing its work after SIGTERM is not killed before ``stop_timeout_s``."""
    assert await stop_started_child(tmp_path, "drain", stop_timeout_s=GUARD_S) == 0


async def test_a_child_that_does_not_stop_is_killed_after_its_stop_timeout(
    tmp_path: Path,
) -> None:
    assert await stop_started_child(tmp_path, "ignore", stop_timeout_s=0.5) == -signal.SIGKILL


def spawn_prefork(mode: str) -> subprocess.Popen[str]:
    argv = [sys.executable, "-c", PREFORK_SCRIPT, mode]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


async def test_prefork_waits_longer_each_time_a_child_dies_again_soon() -> None:
    """A child that dies soon after each fork is forked again after 1, 2, 4 s ...: a fault that
    kills it at once is not retried every second for good."""
    proc = spawn_prefork("crash")
    delays: list[str] = []
    try:
        assert proc.stderr is not None
        with trio.fail_after(GUARD_S):
            while len(delays) < 3:
                line = await trio.to_thread.run_sync(proc.stderr.readline)
                assert line, "prefork ended"
                if "exited with 1: starting it again in" in line:
                    delays.append(line.rsplit(" in ", 1)[1].strip())
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc) == 0
    finally:
        stop(proc)
    assert delays == ["1 s", "2 s", "4 s"]


def test_prefork_forks_again_later_when_a_fork_fails() -> None:
    """A fork that fails (EAGAIN, ENOMEM) when a child is forked again is tried again later;
    it used to end the supervisor and kill the siblings that were serving."""
    argv = [sys.executable, "-c", PREFORK_SCRIPT, "forkfail"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        errors = read_until(proc.stderr, "could not be forked")
        started = read_until(proc.stdout, "started 0")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(GUARD_S) == 0
    finally:
        stop(proc)
    assert [x.split()[:2] for x in started] == [["started", "1"], ["started", "0"]]
    assert not [x for x in errors if "process 1" in x], errors  # its sibling served on


def spawn_wedged_children(ns: NotifySocket, *args: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in sdnotify.ENVIRONMENT_KEYS}
    env |= {"NOTIFY_SOCKET": ns.address, "WATCHDOG_USEC": "1000000"}
    argv = [sys.executable, "-c", PREFORK_SCRIPT, *args]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


async def read_starts(proc: subprocess.Popen[bytes], count: int) -> list[int]:
    """The pids of the first ``count`` children ``proc`` (PREFORK_SCRIPT) started."""
    assert proc.stdout is not None
    started: list[int] = []
    with trio.fail_after(GUARD_S):
        while len(started) < count:
            line = await trio.to_thread.run_sync(
                proc.stdout.readline,
                abandon_on_cancel=True,  # or fail_after waits
            )
            started.append(int(line.split()[2]))
    return started


@pytest.mark.parametrize("mode", ["hang", "noabort"])
async def test_prefork_kills_and_forks_again_a_child_that_stops_pinging(mode: str) -> None:
    """``noabort``: a child that SIGABRT does not end (stopped, or handling it) gets SIGKILL a
    watchdog period later; it used to stay, its slot never forked again."""
    with notify_socket("abstract") as ns:
        proc = spawn_wedged_children(ns, mode)
        try:
            started = await read_starts(proc, 4)  # two, then each again after its watchdog kill
            assert len(set(started)) == 4
            proc.send_signal(signal.SIGTERM)
            assert await wait_exit(proc) == 0
        finally:
            stop(proc)
        ns.drain()
    assert sum("READY=1" in m.split("\n") for m in ns.received) == 1
    assert any("WATCHDOG=1" in m.split("\n") for m in ns.received)
    assert set(ns.senders) == {proc.pid}


async def test_prefork_continues_a_stopped_child_it_aborts(tmp_path: Path) -> None:
    """A stopped child (SIGSTOP, a debugger) ends on the watchdog's SIGABRT, as systemd's
    stopped main process does: SIGCONT follows it. It used to stay stopped until the SIGKILL
    a watchdog period later, its slot dead twice as long (seen under systemd)."""
    with notify_socket("abstract") as ns:
        proc = spawn_wedged_children(ns, "stopped", str(tmp_path))
        try:
            started = await read_starts(proc, 4)  # two stopped, then each forked again
            assert len(set(started)) == 4
            proc.send_signal(signal.SIGTERM)
            assert await wait_exit(proc) == 0
            assert proc.stderr is not None
            log = proc.stderr.read().decode()
        finally:
            stop(proc)
    for pid in started[:2]:
        assert f"(pid {pid}) exited with {128 + signal.SIGABRT}" in log, log
    assert "did not end on SIGABRT" not in log


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def shared_kb(pid: int) -> int:
    """Resident memory ``pid`` shares with other processes (smaps_rollup Shared_*)."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0])
    return fields["Shared_Clean"] + fields["Shared_Dirty"]


async def heard_workers(
    nats_url: str, pool: str, want: int, exclude: frozenset[str] | set[str] = frozenset()
) -> set[str]:
    """Ids of ``want`` workers of ``pool`` (not in ``exclude``) heard sending heartbeats."""
    from asrd import wire
    from asrd.bus import heartbeat_subject
    from asrd.bus.natsbus import open_nats_bus

    seen: set[str] = set()
    async with open_nats_bus(NatsConfig(), nats_url, name="test-heartbeats") as bus:
        sub = await bus.subscribe(heartbeat_subject("asrd"), max_pending=1024)
        with trio.fail_after(GUARD_S):
            while len(seen) < want:
                beat = wire.decode_heartbeat((await sub.receive()).data)
                if beat.pool == pool and beat.worker_id not in exclude:
                    seen.add(beat.worker_id)
    return seen


async def test_forked_workers_share_the_model_serve_and_are_supervised(
    nats: Nats, tmp_path: Path
) -> None:
    """One `asrd worker --processes 2`: two workers on the bus that share one loaded model,
    READY=1 from the parent only once both serve, and a killed one is forked again. One decode
    slot (asrd.cpugate) makes the two take turns."""
    config = tmp_path / "asrd.toml"
    config.write_text("[worker]\ndecode_slots = 1\n")
    argv = asrd_argv(
        "worker", "--config", str(config), "--nats-url", nats.url, "--pool", "fork-en",
        "--decoders", "1", "--processes", "2",
    )  # fmt: skip
    with notify_socket("abstract") as ns:
        # The parent kills a child silent for a watchdog period: a busy 2-core machine must
        # not look like a wedged worker.
        proc = spawn_notifying(argv, ns, watchdog_s=20.0)
        try:
            with trio.fail_after(GUARD_S):
                await ns.wait_for("READY=1")
            kids = children_of(proc.pid)
            assert len(kids) == 2
            workers = await heard_workers(nats.url, "fork-en", 2)
            assert {int(w.split("-")[-2]) for w in workers} == set(kids)
            # A decoder is ~91 MB of model; a worker that loaded its own shares only libraries.
            for kid in kids:
                assert shared_kb(kid) > 64 * 1024, shared_kb(kid)
            with trio.fail_after(GUARD_S):
                await ns.wait_for("WATCHDOG=1")  # the parent pings systemd for the family

            # Both processes decode: two concurrent sessions take both decoders.
            pool = Pool("fork-en", [proc, proc], 1)
            pcm = load_clip("0930") + silence(1000, 16000)
            texts: list[str] = []
            async with open_gateway(nats.url, pool) as gw:

                async def one() -> None:
                    async with open_transcription(
                        gw.url, pcm_chunks(pcm), 16000, token="t", appkey="default", realtime=False
                    ) as tr:
                        events = [e async for e in tr]
                    assert events[-1]["header"]["name"] == "TranscriptionCompleted"
                    texts.append(
                        " ".join(
                            e["payload"]["result"]
                            for e in events
                            if e["header"]["name"] == "SentenceEnd"
                        )
                    )

                with trio.fail_after(GUARD_S):
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(one)
                        nursery.start_soon(one)
            reference = transcripts()["0930"]
            assert len(texts) == 2
            for text in texts:
                assert wer([reference], [text]) <= 0.2, text

            # A worker process that dies is forked again from the loaded engine.
            os.kill(kids[0], signal.SIGKILL)
            (new_worker,) = await heard_workers(nats.url, "fork-en", 1, exclude=workers)
            now = children_of(proc.pid)
            assert len(now) == 2 and kids[0] not in now and kids[1] in now
            assert int(new_worker.split("-")[-2]) in now

            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(GUARD_S):
                await ns.wait_for("STOPPING=1")
            assert await wait_exit(proc) == 0
            assert not any(alive(kid) for kid in now)
        finally:
            stop(proc)
        ns.drain()
    assert sum("READY=1" in m.split("\n") for m in ns.received) == 1
    assert set(ns.senders) == {proc.pid}, "a forked process reported to systemd itself"


# --- gateway processes sharing one port --------------------------------------------------------


async def test_reserved_port_spreads_connections_over_every_listening_process() -> None:
    """asrd.reuseport: each listener gets a share of the connections; the reservation holds
    the port but takes none; with no listener left, connections are refused."""
    reservation = reuseport.reserve("127.0.0.1", 0)
    try:
        port = reservation.port
        with pytest.raises(OSError):  # nobody else can take the port
            socket.create_server(("127.0.0.1", port))
        listeners = [await reuseport.listen(reservation) for _ in range(2)]
        accepted = [0, 0]

        async def accept(i: int) -> None:
            while True:
                stream = await listeners[i][0].accept()
                accepted[i] += 1
                await stream.aclose()

        async with trio.open_nursery() as nursery:
            for i in range(2):
                nursery.start_soon(accept, i)
            with trio.fail_after(GUARD_S):
                for _ in range(40):
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                    await stream.receive_some(1)  # EOF once accepted and closed
                    await stream.aclose()
            nursery.cancel_scope.cancel()
        assert sum(accepted) == 40 and min(accepted) > 0, accepted
        for pair in listeners:
            await pair[0].aclose()
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", port)
    finally:
        reservation.close()


def two_free_ports() -> int:
    """A port p such that p and p + 1 were both free."""
    for _ in range(100):
        port = free_port()
        with contextlib.suppress(OSError), socket.create_server(("127.0.0.1", port + 1)):
            return port
    raise AssertionError("no two consecutive free ports")


async def scrape(port: int) -> dict[str, float]:
    """``{sample name with labels: value}`` from /metrics on ``port``."""
    body = (await http_get(port, "/metrics")).split(b"\r\n\r\n", 1)[1].decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in body.splitlines()
        if line and not line.startswith("#")
    }


async def sessions_ended(port: int) -> float:
    samples = await scrape(port)
    return sum(v for k, v in samples.items() if k.startswith("asrd_sessions_total"))


async def test_gateway_processes_share_the_port_and_are_supervised(
    nats: Nats, tmp_path: Path
) -> None:
    """`[server] processes = 2`: both processes take sessions on one port, each reports its
    own metrics, a killed one is forked again while the other serves, and SIGTERM closes the
    port."""
    worker = start_worker(nats.url, "gwp-en", 24, "--engine", "loadtest")
    port, metrics = free_port(), two_free_ports()
    config = tmp_path / "gateway.toml"
    config.write_text(
        f"[server]\nport = {port}\nprocesses = 2\nmetrics_port = {metrics}\n"
        f'default_language = "gwp-en"\n\n[nats]\nurl = "{nats.url}"\n'
    )
    pcm = load_clip("0930") + silence(1000, 16000)

    async def sessions(n: int) -> None:
        async def one() -> None:
            async with open_transcription(
                f"ws://127.0.0.1:{port}/ws/v1", pcm_chunks(pcm), 16000, token="t",
                appkey="default", realtime=False,
            ) as tr:  # fmt: skip
                events = [e async for e in tr]
            assert events[-1]["header"]["name"] == "TranscriptionCompleted"

        with trio.fail_after(GUARD_S):
            async with trio.open_nursery() as nursery:
                for _ in range(n):
                    nursery.start_soon(one)

    async def ended(index: int, want: float) -> None:
        """Until process ``index`` answers on its metrics port and counted ``want`` sessions."""
        with trio.fail_after(GUARD_S):
            while True:
                with contextlib.suppress(OSError):
                    if await sessions_ended(metrics + index) >= want:
                        return
                await trio.sleep(0.05)

    with notify_socket("abstract") as ns:
        proc = spawn_notifying(asrd_argv("gateway", "--config", str(config)), ns, watchdog_s=20)
        try:
            with trio.fail_after(GUARD_S):
                await ns.wait_for("READY=1")
            kids = children_of(proc.pid)
            assert len(kids) == 2
            await heard_workers(nats.url, "gwp-en", 1)
            with trio.fail_after(GUARD_S):  # every gateway process hears the worker too
                for i in range(2):
                    while (await scrape(metrics + i)).get("asrd_workers_alive", 0) < 1:  # noqa: ASYNC110
                        await trio.sleep(0.05)

            # 20 connections: the kernel gives each process some (all to one: p = 2 ** -19).
            await sessions(20)
            counts = [await sessions_ended(metrics + i) for i in range(2)]
            with trio.fail_after(GUARD_S):
                while sum(counts) < 20:  # a process counts a session just after its client
                    await trio.sleep(0.05)
                    counts = [await sessions_ended(metrics + i) for i in range(2)]
            assert sum(counts) == 20 and min(counts) > 0, counts
            for i in range(2):  # every process is also reachable for health checks
                assert (await http_get(metrics + i, "/readyz")).startswith(b"HTTP/1.1 200")

            # One dies: its socket goes with it, and the other takes every new session.
            os.kill(kids[0], signal.SIGKILL)
            with trio.fail_after(GUARD_S):
                while alive(kids[0]):  # noqa: ASYNC110 - another process
                    await trio.sleep(0.01)
            await sessions(6)
            # ... and it is forked again, and serves metrics on its port again.
            with trio.fail_after(GUARD_S):
                while len(now := children_of(proc.pid)) < 2 or kids[0] in now:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            assert kids[1] in now
            await ended(0, 0)

            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(GUARD_S):
                await ns.wait_for("STOPPING=1")
            assert await wait_exit(proc) == 0
            assert not any(alive(kid) for kid in now)
            with pytest.raises(OSError):  # the port closed with the last process
                await trio.open_tcp_stream("127.0.0.1", port)
        finally:
            stop(proc)
            stop(worker)
        ns.drain()
    assert sum("READY=1" in m.split("\n") for m in ns.received) == 1
    assert set(ns.senders) == {proc.pid}, "a forked process reported to systemd itself"


async def test_ctrl_c_lets_the_sessions_of_gateway_processes_finish(
    nats: Nats, tmp_path: Path
) -> None:
    """A terminal's Ctrl-C (SIGINT to the whole process group) reaches each forked process
    once, through the parent: the processes drain, and a running session completes."""
    worker = start_worker(nats.url, "cc-en", 2, "--engine", "loadtest")
    port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[server]\nport = {port}\nprocesses = 2\ndefault_language = "cc-en"\n'
        f'\n[nats]\nurl = "{nats.url}"\n'
    )
    argv = asrd_argv("gateway", "--config", str(config))
    # A session of its own, as a terminal's foreground job has a process group of its own.
    proc = subprocess.Popen(  # noqa: ASYNC220 - as spawn_notifying does
        argv, start_new_session=True, stderr=subprocess.PIPE, text=True
    )
    try:
        await heard_workers(nats.url, "cc-en", 1)
        with trio.fail_after(GUARD_S):
            while len(children_of(proc.pid)) < 2 or not await ready(port):  # noqa: ASYNC110
                await trio.sleep(0.05)
        await trio.sleep(1.0)  # both processes hear the worker too
        pcm = load_clip("0930") + silence(1000, 16000)  # 4.3 s, sent in real time
        with trio.fail_after(GUARD_S):
            async with open_transcription(
                f"ws://127.0.0.1:{port}/ws/v1", pcm_chunks(pcm), 16000, token="t",
                appkey="default", realtime=True,
            ) as tr:  # fmt: skip
                await trio.sleep(0.5)
                os.killpg(proc.pid, signal.SIGINT)
                events = [e async for e in tr]
        assert events[-1]["header"]["name"] == "TranscriptionCompleted", events[-1]
        assert await wait_exit(proc) == 0
        assert proc.stderr is not None
        log = proc.stderr.read()
        assert log.count("gateway stopped") == 2, log
    finally:
        stop(proc)
        stop(worker)


async def ready(port: int) -> bool:
    try:
        return (await http_get(port, "/readyz")).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def test_gateway_processes_fail_clearly_on_a_port_in_use(nats: Nats, tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        config = tmp_path / "gateway.toml"
        config.write_text(f'[server]\nport = {port}\nprocesses = 2\n[nats]\nurl = "{nats.url}"\n')
        result = subprocess.run(
            asrd_argv("gateway", "--config", str(config)),
            capture_output=True,
            text=True,
            timeout=GUARD_S,
        )
    assert result.returncode == 1
    assert f"asrd: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


# --- NATS with authentication ------------------------------------------------------------------


@dataclass
class AuthNats:
    url: str
    gateway: NatsConfig
    worker: NatsConfig


@contextmanager
def nats_with_deploy_config() -> Iterator[AuthNats]:
    """nats-server running deploy/nats-server.conf as shipped (only the port is ours)."""
    port = free_port()
    gateway_password, worker_password = secrets.token_hex(16), secrets.token_hex(16)
    env = {
        **os.environ,
        "ASRD_NATS_GATEWAY_PASSWORD": gateway_password,
        "ASRD_NATS_WORKER_PASSWORD": worker_password,
    }
    argv = [nats_server_binary(), "-c", str(DEPLOY / "nats-server.conf")]
    proc = subprocess.Popen(
        [*argv, "-a", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, proc)
        gateway = load_config(DEPLOY / "gateway.toml").nats.model_copy(
            update={"password": gateway_password}
        )
        worker = load_config(DEPLOY / "worker.toml").nats.model_copy(
            update={"password": worker_password}
        )
        yield AuthNats(f"nats://127.0.0.1:{port}", gateway, worker)
    finally:
        stop(proc)


async def nats_violations(url: str, user: str, password: str, pub: str, sub: str) -> list[str]:
    """Publish to ``pub`` and subscribe to ``sub`` as ``user``; the errors NATS reports."""
    errors: list[str] = []

    async def error_cb(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(url, user=user, password=password, error_cb=error_cb)
    try:
        await nc.publish(pub, b"forged")
        await nc.subscribe(sub)
        await nc.flush()
        async with asyncio.timeout(GUARD_S):
            while len(errors) < 2:  # noqa: ASYNC110 - they arrive asynchronously
                await asyncio.sleep(0.01)
    finally:
        await nc.close()
    return sorted(e.lower() for e in errors)  # nats-py lowercases some of them


async def nats_rejects(url: str, **credentials: str) -> str:
    async def quiet(exc: Exception) -> None:
        pass

    with pytest.raises(nats.errors.Error) as info:
        await nats.connect(
            url, allow_reconnect=False, connect_timeout=5, error_cb=quiet, **credentials
        )
    return str(info.value)


def test_nats_admits_only_the_two_users_each_on_its_side() -> None:
    with nats_with_deploy_config() as server:
        gw, wk = server.gateway, server.worker
        assert gw.user and gw.password and wk.user and wk.password

        async def main() -> None:
            assert "Authorization Violation" in await nats_rejects(server.url)
            assert "Authorization Violation" in await nats_rejects(
                server.url, user=gw.user or "", password="wrong"
            )
            # a gateway cannot forge results, a worker cannot inject audio or claims
            errors = await nats_violations(
                server.url,
                gw.user or "",
                gw.password or "",
                "asrd.session.s1.out",
                "asrd.session.*.in",
            )
            assert errors == [
                'nats: permissions violation for publish to "asrd.session.s1.out"',
                'nats: permissions violation for subscription to "asrd.session.*.in"',
            ]
            errors = await nats_violations(
                server.url, wk.user or "", wk.password or "", "asrd.session.s1.in", "_INBOX.>"
            )
            assert errors == [
                'nats: permissions violation for publish to "asrd.session.s1.in"',
                'nats: permissions violation for subscription to "_inbox.>"',
            ]
            errors = await nats_violations(
                server.url, wk.user or "", wk.password or "", "asrd.claim.en-US", "asrd.heartbeat"
            )
            assert len(errors) == 2 and all("permissions violation" in e for e in errors)

        asyncio.run(main())


@asynccontextmanager
async def worker_process(
    tmp_path: Path, nats_url: str, nats_config: NatsConfig, pool: str
) -> AsyncIterator[tuple[subprocess.Popen[bytes], NotifySocket]]:
    """An `asrd worker` logging in with ``nats_config``; entered once it reported READY=1."""
    config = tmp_path / "worker.toml"
    config.write_text(
        f'[nats]\nuser = "{nats_config.user}"\npassword = "{nats_config.password}"\n\n'
        f'[worker]\npool = "{pool}"\ndecoders = 1\nprocesses = 1\n'
    )
    with notify_socket("abstract") as ns:
        argv = asrd_argv("worker", "--config", str(config), "--nats-url", nats_url)
        proc = spawn_notifying(argv, ns)
        try:
            with trio.fail_after(GUARD_S):
                await ns.wait_for("READY=1")
            yield proc, ns
        finally:
            stop(proc)


async def test_worker_and_gateway_with_nats_credentials_complete_a_session(
    tmp_path: Path,
) -> None:
    with nats_with_deploy_config() as server:
        async with worker_process(tmp_path, server.url, server.worker, "auth-en") as (proc, ns):
            pool = Pool("auth-en", [proc], 1)
            gateway_nats: dict[str, Any] = {
                "user": server.gateway.user,
                "password": server.gateway.password,
            }
            async with open_gateway(server.url, pool, nats=gateway_nats) as gw:
                events = []
                pcm = load_clip("0930") + silence(1000, 16000)
                with trio.fail_after(GUARD_S):
                    async with open_transcription(
                        gw.url, pcm_chunks(pcm), 16000, token="t", appkey="default", realtime=False
                    ) as tr:
                        events = [e async for e in tr]
            assert events[-1]["header"]["name"] == "TranscriptionCompleted"
            text = " ".join(
                e["payload"]["result"] for e in events if e["header"]["name"] == "SentenceEnd"
            )
            assert text.strip()
            # the worker served it, and stops cleanly on SIGTERM
            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(GUARD_S):
                await ns.wait_for("STOPPING=1")
            assert await wait_exit(proc) == 0
