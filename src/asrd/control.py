"""The control plane as the gateway sees it: who may open a session, on which engine pool,
and what is recorded when it ends.

``StaticControlPlane`` serves the embedded default from config.toml; the Redis-backed control
plane (``asrd.store``) implements the same :class:`ControlPlane` for fleets of gateways.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from asrd.auth import StaticAuthenticator
from asrd.config import Config, RoutingConfig
from asrd.errors import InvalidParameter


@dataclass(frozen=True, slots=True)
class ConnectInfo:
    """What the client presented when it connected (for tokens and signed links)."""

    method: str
    path: str  # without the query
    query: dict[str, str]
    token: str | None  # X-NLS-Token header, else ?token=


@dataclass(frozen=True, slots=True)
class Admission:
    """A granted session: the pool to claim a worker from, and what to record."""

    appkey: str
    pool: str
    record_transcript: bool = True
    language: str = ""  # the language served: the one asked for, or the routing's default
    slot: str = ""  # the concurrency slot to give back (implementation-defined)


@dataclass(slots=True)
class SessionRecord:
    """Everything known about a session when it ends."""

    task_id: str
    session_id: str
    appkey: str
    language: str
    started_at: float  # unix time
    duration_s: float
    audio_s: float
    code: int  # 20000000 when completed, else the error code
    reason: str
    params: dict[str, Any] = field(default_factory=dict)
    # {"index", "begin_time", "time", "text", "confidence"} per final sentence
    sentences: list[dict[str, Any]] = field(default_factory=list)


class ControlPlane(Protocol):
    async def admit(
        self, connect: ConnectInfo, *, appkey: str, language: str | None, session_id: str
    ) -> Admission:
        """Authorise, route the language to a pool and take a concurrent-session slot.

        Raises the AsrdError to send (40000001, 40020105, 40020106, 40000005, unknown
        language, 50000000 when the store is unreachable, ...).
        """

    async def finish(self, admission: Admission, record: SessionRecord) -> None:
        """Give the slot back and record usage (and the transcript). Must not raise."""


def route_language(
    routing: RoutingConfig, default_language: str, language: str | None
) -> tuple[str, str]:
    """``(language, pool)`` of a session asking for ``language`` (None: the default).

    Raises InvalidParameter (40000003) for a language the routing does not serve.
    """
    lang = language or routing.default_language or default_language
    if not routing.languages:
        return lang, lang  # no routing table: the language names its pool
    pool = routing.languages.get(lang)
    if pool is None:
        known = ", ".join(sorted(routing.languages)[:20])
        raise InvalidParameter(f"unknown language {lang!r}: this service serves {known}")
    return lang, pool


def embedded_routing(config: Config) -> Config:
    """``asrd serve``'s routing: with its private nats-server, the only workers are the ones
    it starts, so the languages it serves are known: the pool they serve. Routed as a table,
    any other language gets 40000003 at Start, where "a language names its pool" would wait for
    a worker that cannot come and fail with 50000000, an error a client retries. An explicit
    ``[routing] languages``, or a shared NATS (``[nats] url``), keeps its own routing."""
    routing = config.routing
    if config.nats.url or routing.languages:
        return config
    pool = routing.workers.get(config.worker.pool, config.worker.pool)
    languages = {pool: pool}
    return config.model_copy(
        update={"routing": routing.model_copy(update={"languages": languages})}
    )


class StaticControlPlane:
    """Keys and tokens from ``[auth]``, routing from ``[routing]``; nothing is recorded."""

    def __init__(self, config: Config) -> None:
        self._auth = StaticAuthenticator(config.auth)
        self._routing = config.routing
        self._default_language = config.server.default_language

    async def admit(
        self, connect: ConnectInfo, *, appkey: str, language: str | None, session_id: str
    ) -> Admission:
        await self._auth.authorize(connect.token, appkey)
        lang, pool = route_language(self._routing, self._default_language, language)
        # records nothing
        return Admission(appkey=appkey, pool=pool, record_transcript=False, language=lang)

    async def finish(self, admission: Admission, record: SessionRecord) -> None:
        return None
