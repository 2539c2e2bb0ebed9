"""One port for several gateway processes: a listening socket per process, with SO_REUSEPORT.

A gateway process is one event loop, so it uses at most one core. ``[server] processes = N``
runs N of them behind the same port. Each binds its own listening socket with SO_REUSEPORT,
and the kernel spreads new connections evenly over the sockets by a hash of their addresses.
One socket inherited by all processes would also work, but every process would wake for
every connection, and the first to wake (often the same idle one) would take it.

The parent reserves the port before it forks: it binds (without listening) a socket per
address, so port 0 becomes one port that every process then binds, and no other program can
take the port while a process is being forked again. (Another program of the same user that
also sets SO_REUSEPORT could: two gateways configured on one port would share it.) A bound
socket that does not listen receives no connections. A process that stops listening (it
drains, or dies) takes its socket out of the kernel's choice: new connections go to the
others, or are refused once none listens.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import trio

__all__ = ["Reservation", "listen", "reserve"]

_BACKLOG = 0xFFFF  # the kernel caps it at net.core.somaxconn, as trio.open_tcp_listeners does


@dataclass(frozen=True)
class Reservation:
    """The addresses (one port) that every gateway process listens on."""

    sockets: tuple[socket.socket, ...]

    @property
    def port(self) -> int:
        return int(self.sockets[0].getsockname()[1])

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


def _socket(family: int, *, reuse_address: bool) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    if reuse_address:  # as trio does for a listener
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:  # as trio does: one socket per family
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    return sock


def reserve(host: str, port: int) -> Reservation:
    """Bind (not listen) a socket per address of ``host``, all on one port (``port`` or a free
    one). Raises OSError as ``bind`` does, e.g. when the port is in use."""
    infos = socket.getaddrinfo(
        host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    try:
        for family, _, _, _, address in dict.fromkeys(infos):
            # Not SO_REUSEADDR: with it, another program could bind and listen while none of
            # ours listens. SO_REUSEPORT alone still lets us bind over TIME_WAIT connections.
            sock = _socket(family, reuse_address=False)
            sockets.append(sock)
            if sockets[1:]:  # the port the first one got
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return Reservation(tuple(sockets))


async def listen(reservation: Reservation) -> list[trio.SocketListener]:
    """This process's own listening sockets on the reserved addresses."""
    listeners: list[trio.SocketListener] = []
    try:
        for reserved in reservation.sockets:
            sock = trio.socket.from_stdlib_socket(_socket(reserved.family, reuse_address=True))
            try:
                await sock.bind(reserved.getsockname())
                sock.listen(_BACKLOG)
            except BaseException:
                sock.close()
                raise
            listeners.append(trio.SocketListener(sock))
    except BaseException:
        for listener in listeners:
            listener.socket.close()
        raise
    return listeners
