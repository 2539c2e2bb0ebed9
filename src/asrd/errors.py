"""The one exception hierarchy of asrd.

Every error that can end a session is an :class:`AsrdError` carrying a status code. The codes
are Alibaba NLS status codes (README, "Status codes") because that is the richest vocabulary of the
protocols we speak; other dialects translate them to their own codes at their edge.
Exceptions of third-party libraries are converted into these at exactly one place each
(the bus for nats, the store for redis, the session's websocket edge for trio-websocket).
"""

from __future__ import annotations


class AsrdError(Exception):
    """Base of every asrd error; ``code`` is the status sent to the client."""

    code: int = 50000000

    def __init__(self, reason: str, *, code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        if code is not None:
            self.code = code


# --- the peer (client) broke the protocol or sent bad input --------------------------------


class ClientError(AsrdError):
    """Something the client sent is wrong; retrying the same thing will fail again."""

    code = 40000000


class AuthError(ClientError):
    code = 40000001


class InvalidMessage(ClientError):
    """Bad JSON, bad ids, or a message that is not allowed in the current state."""

    code = 40000002


class InvalidParameter(ClientError):
    code = 40000003


class IdleTimeout(ClientError):
    code = 40000004


class TooManyRequests(ClientError):
    """Concurrency limit: no free decoder, too many sessions on this gateway or app key."""

    code = 40000005


class BadWavHeader(ClientError):
    code = 40000009


class UnknownNamespace(ClientError):
    code = 40010001


class InvalidDirective(ClientError):
    code = 40010003


class ClientDisconnected(ClientError):
    """Recorded only: there is nobody left to send it to."""

    code = 40010004


class AlreadyStopping(ClientError):
    code = 40010005


class UnknownAppKey(ClientError):
    code = 40020105


class AppKeyTokenMismatch(ClientError):
    code = 40020106


class UnsupportedSampleRate(ClientError):
    code = 41010101


# --- we (or a part of our system) failed ----------------------------------------------------


class ServerError(AsrdError):
    """Transient failure on our side; the client may retry."""

    code = 50000000


class BusError(ServerError):
    """NATS is unreachable or a request on it failed."""


class EngineFailed(ServerError):
    """The engine worker serving a session died or reported an error."""


class NoWorkers(ServerError):
    """No engine worker of the requested pool is alive."""


class ShuttingDown(ServerError):
    """The server is stopping and ends the session."""


class ChildExited(ServerError):
    """A child process that ``asrd serve`` cannot do without (nats-server, asrd worker)
    exited: the command stops rather than serve without it."""


class CannotListen(ServerError):
    """A port the command must serve on is in use, or not ours to bind: it stops with this
    reason rather than a traceback."""


# Status codes that are not errors.
SUCCESS = 20000000
SENTENCE_TIMEOUT = 51040104
