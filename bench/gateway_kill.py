"""What new connections see while one of several gateway processes is killed.

    .venv/bin/python bench/gateway_kill.py [--kills 8] [--window 0.3]

Runs a real nats-server, a load-test worker and ``asrd gateway`` with ``[server] processes =
2`` on one port. Each round SIGKILLs one gateway process and, for ``--window`` seconds from the
kill, opens one connection after another (``GET /readyz``), printing those that did not get
200: when (ms after the kill), the killed process's state then (``R``, ``Z`` or gone, and its
thread count) and what the client got. It prints ``net.ipv4.tcp_migrate_req`` first: with 0 a
connection that the kernel queued on the dying process's socket is reset; with 1 it is handed
to the other process. Results are recorded in docs/resilience.md.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.servers import nats_server, spawn, start_worker, stop

from asrd.bench.procs import children_of
from asrd.children import free_port

MIGRATE_REQ = Path("/proc/sys/net/ipv4/tcp_migrate_req")


def state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return f"{stat}/{len(os.listdir(f'/proc/{pid}/task'))} threads"
    except OSError:
        return "gone"


def probe(port: int, timeout: float) -> str:
    """One connection: ``ok`` when /readyz answers 200, else what happened."""
    with socket.socket() as s:
        s.settimeout(timeout)
        try:
            s.connect(("127.0.0.1", port))
            s.sendall(b"GET /readyz HTTP/1.1\r\nHost: asrd\r\n\r\n")
            answer = s.recv(100)
        except TimeoutError:
            return "timeout"
        except OSError as e:
            return type(e).__name__
    return "ok" if answer.startswith(b"HTTP/1.1 200") else f"answer {answer[:20]!r}"


def serving(port: int, gateway: int) -> bool:
    return len(children_of(gateway)) == 2 and probe(port, 0.5) == "ok"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--kills", type=int, default=8)
    ap.add_argument("--window", type=float, default=0.3, help="s of probing after each kill")
    args = ap.parse_args()
    migrate = MIGRATE_REQ.read_text().strip() if MIGRATE_REQ.exists() else "absent"
    print(f"net.ipv4.tcp_migrate_req = {migrate}")
    with nats_server() as (_nats, url, _port):
        worker = start_worker(url, "kill-en", 4, "--engine", "loadtest")
        port = free_port()
        config = Path(f"/tmp/asrd-gateway-kill-{os.getpid()}.toml")
        config.write_text(
            f'[server]\nport = {port}\nprocesses = 2\ndefault_language = "kill-en"\n\n'
            f'[nats]\nurl = "{url}"\n'
        )
        argv = [sys.executable, "-m", "asrd", "--log-level", "error", "gateway"]
        gateway = spawn([*argv, "--config", str(config)])
        lost = total = 0
        try:
            for kill in range(args.kills):
                deadline = time.monotonic() + 60
                while not serving(port, gateway.pid):
                    if time.monotonic() > deadline:
                        sys.exit("the gateway processes did not come (back) up within 60 s")
                    time.sleep(0.1)
                time.sleep(1.0)  # both listening for a while
                victim = children_of(gateway.pid)[0]
                os.kill(victim, signal.SIGKILL)
                t0 = time.monotonic()
                failed, n = [], 0
                while (at := time.monotonic() - t0) < args.window:
                    seen = state(victim)
                    n += 1
                    if (outcome := probe(port, 2.0)) != "ok":
                        failed.append(f"{at * 1000:.0f} ms ({seen}): {outcome}")
                lost, total = lost + len(failed), total + n
                print(f"kill {kill + 1}: {n} connections, {len(failed)} not served", *failed)
                while victim in children_of(gateway.pid):
                    time.sleep(0.05)
        finally:
            stop(gateway, timeout=20)
            stop(worker)
            config.unlink()
    print(f"{lost} of {total} connections not served over {args.kills} kills")


if __name__ == "__main__":
    main()
