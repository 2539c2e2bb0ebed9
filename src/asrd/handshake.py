"""Sans-IO handling of the HTTP request head that opens every connection.

The official Alibaba Python SDK sends two ``Sec-WebSocket-Key`` (and two
``Sec-WebSocket-Version``) headers and checks ``Sec-WebSocket-Accept`` against the FIRST key,
while wsproto answers the LAST one. :func:`dedupe_head` keeps the first of
each so the SDK's handshake succeeds. Requests that are not WebSocket upgrades (health checks)
are recognised here too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

MAX_HEAD_BYTES = 16 * 1024
_SINGLE = (b"sec-websocket-key", b"sec-websocket-version")


class HeadError(Exception):
    """The request head is malformed or too large."""


@dataclass(frozen=True, slots=True)
class RequestHead:
    method: str
    target: str
    headers: tuple[tuple[bytes, bytes], ...]  # lower-cased names

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    def query_dict(self) -> dict[str, str]:
        """The first value of each query parameter, percent-decoded; empty ones too (a signed
        link's ``sig=`` is then "missing sig", not taken for no signed link at all)."""
        query = parse_qs(urlsplit(self.target).query, keep_blank_values=True)
        return {k: v[0] for k, v in query.items()}

    def query(self, key: str) -> str | None:
        values = parse_qs(urlsplit(self.target).query).get(key)
        return values[0] if values else None

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    @property
    def is_websocket(self) -> bool:
        upgrade = self.header(b"upgrade") or b""
        return upgrade.strip().lower() == b"websocket"

    def upgrade_error(self) -> tuple[int, str] | None:
        """``(status, reason)`` if this WebSocket upgrade cannot be accepted, else None.

        The checks wsproto makes, made first here: wsproto answers such a request itself, but
        trio-websocket then never hands the connection back, and its handler would wait for
        good (a task and its buffers per bad request)."""
        if self.method != "GET":
            return 400, f"a WebSocket upgrade must be GET, not {self.method[:16]}"
        connection = (self.header(b"connection") or b"").lower().split(b",")
        if b"upgrade" not in (token.strip() for token in connection):
            return 400, "missing header 'Connection: Upgrade'"
        version = self.header(b"sec-websocket-version")
        if version != b"13":
            return 426 if version else 400, "only WebSocket version 13 is supported"
        if not self.header(b"sec-websocket-key"):
            return 400, "missing header 'Sec-WebSocket-Key'"
        host = self.header(b"host")
        if host is None:
            return 400, "missing header 'Host'"
        try:
            host.decode("idna")  # as wsproto does: a host it cannot decode would raise there
        except UnicodeError:
            return 400, "malformed header 'Host'"
        return None


def split_head(buffer: bytes) -> tuple[bytes, bytes] | None:
    """``(head, rest)`` once the head is complete, else None (read more)."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > MAX_HEAD_BYTES:
            raise HeadError(f"request head larger than {MAX_HEAD_BYTES} bytes")
        return None
    return buffer[: end + 4], buffer[end + 4 :]


def parse_head(head: bytes) -> RequestHead:
    lines = head.split(b"\r\n")
    try:
        method, target, _version = lines[0].decode("ascii").split(" ", 2)
    except (UnicodeDecodeError, ValueError) as exc:
        raise HeadError("malformed request line") from exc
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            raise HeadError("malformed header line")
        headers.append((name.strip().lower(), value.strip()))
    try:
        urlsplit(target)  # checked once here: RequestHead's properties split it again
    except ValueError as exc:  # e.g. "http://[::1/x": an unclosed IPv6 bracket
        raise HeadError(f"malformed request target: {exc}") from exc
    return RequestHead(method, target, tuple(headers))


def dedupe_head(head: bytes) -> bytes:
    """Drop the second and later copies of headers that must occur once."""
    seen: set[bytes] = set()
    out = []
    for line in head.split(b"\r\n"):
        name = line.partition(b":")[0].strip().lower()
        if name in _SINGLE:
            if name in seen:
                continue
            seen.add(name)
        out.append(line)
    return b"\r\n".join(out)


def http_response(
    status: int,
    reason: str,
    body: bytes,
    content_type: str = "text/plain",
    *,
    headers: Sequence[str] = (),
    head_only: bool = False,
) -> bytes:
    """The whole response; ``head_only`` for a HEAD request: GET's headers (Content-Length of
    the body) without the body."""
    lines = [f"Content-Type: {content_type}", f"Content-Length: {len(body)}", *headers]
    head = f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{h}\r\n" for h in lines)
    return (head + "Connection: close\r\n\r\n").encode() + (b"" if head_only else body)
