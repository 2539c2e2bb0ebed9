"""The Redis control plane of a gateway: admission, live routing, slots and records.

What a session costs Redis: one round trip for its token and app key (two for a signed
link: the key, then the nonce) and one Lua call for its slot when it starts; nothing while it
runs but a shared refresh of every running slot each ``slot_refresh_s``; its usage and
transcript are written in batches by a background task after it ends.

When Redis goes away:

- running sessions continue (nothing on their path touches Redis);
- a new session is admitted only when its token (or app key) was validated against Redis in
  the last ``cache_ttl_s``, and the key's concurrency limit is then enforced on this gateway
  alone; signed links (whose single use only Redis can guarantee) and every other session
  get 50000000, with a log line;
- records are kept in memory (``buffer_records`` of them); beyond that the oldest lose their
  transcript, and their usage is folded into per-key-and-day counters, so no session goes
  uncounted and every dropped transcript is counted (``lost_transcripts`` in ``asrd usage``);
- when Redis answers again, slots are re-registered by the next refresh and the buffer is
  written; nobody has to restart anything.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import NoReturn, TypeVar

import trio

from asrd import logs
from asrd.config import Config, DynamicConfig, RoutingConfig
from asrd.control import Admission, ConnectInfo, SessionRecord, route_language
from asrd.errors import (
    SUCCESS,
    AppKeyTokenMismatch,
    AsrdError,
    AuthError,
    ClientError,
    InvalidParameter,
    ServerError,
    TooManyRequests,
    UnknownAppKey,
)
from asrd.store import StoreError, StoreNotServing, StoreUnavailable, signing
from asrd.store.redisstore import open_redis_store
from asrd.store.repo import AppKey, RecordItem, Repository, TokenInfo, day_of

log = logging.getLogger(__name__)
_NO_LINK_KEY = "00" * 32  # checked against for an unknown appkey: the same work, the same "no"
# What a client is told while Redis is away (the log says which Redis and why).
UNREACHABLE = "the control plane (Redis) is unreachable; retry in a few seconds"

V = TypeVar("V")

MAX_CACHED = 100_000
_NO_HASH = "0" * 64  # validated tokens and app keys kept for outages
FLUSH_RETRY_S = 1.0


@dataclass(slots=True)
class _Running:
    appkey: str
    language: str
    pool: str


class RateLimitedLog:
    """At most one line per ``interval_s``; says how many were suppressed."""

    def __init__(self, logger: logging.Logger, interval_s: float = 1.0) -> None:
        self._log = logger
        self._interval_s = interval_s
        self._last = -1e9
        self._suppressed = 0

    def warning(self, msg: str, *args: object) -> None:
        self._emit(logging.WARNING, msg, *args)

    def error(self, msg: str, *args: object) -> None:
        self._emit(logging.ERROR, msg, *args)

    def _emit(self, level: int, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self._interval_s:
            self._suppressed += 1
            return
        if self._suppressed:
            msg += f" ({self._suppressed} similar lines suppressed)"
            self._suppressed = 0
        self._last = now
        self._log.log(level, msg, *args)


class ConfigWatcher:
    """Polls the live configuration's revision; loads the document when it changes."""

    def __init__(self, repo: Repository) -> None:
        self._repo = repo
        self._rev: str | None = None  # None: never loaded
        self._failing = False  # the last answer was an error reply (logged)

    async def poll(self) -> tuple[bool, DynamicConfig | None]:
        """``(changed, document)``; raises StoreError (StoreUnavailable when Redis is away).
        An invalid document is logged and ignored (the previous configuration stays).

        An error reply (a foreign value under the keys) is logged here, when it starts and
        when it ends: the poll runs twice a second, and its caller keeps its configuration
        meanwhile."""
        try:
            changed, doc = await self._poll()
        except StoreUnavailable:
            raise
        except StoreError as exc:
            if not self._failing:
                self._failing = True
                log.error(
                    "reading the live configuration (%s, %s) failed; the routing in use stays "
                    "until it can be read: %s",
                    self._repo.keys.config_rev,
                    self._repo.keys.config,
                    exc,
                )
            raise
        if self._failing:
            self._failing = False
            log.warning("the live configuration can be read again")
        return changed, doc

    async def _poll(self) -> tuple[bool, DynamicConfig | None]:
        rev = await self._repo.config_rev()
        if rev == self._rev:
            return False, None
        state = await self._repo.load_config()
        self._rev = state.rev
        if state.error:
            log.error("ignoring the live configuration in Redis: %s", state.error)
            return False, None
        return True, state.doc


class RedisControlPlane:
    def __init__(self, config: Config, repo: Repository) -> None:
        self._config = config
        self._rc = config.redis
        self._repo = repo
        self.writer_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.routing: RoutingConfig = config.routing
        self.available = True
        self._writes_refused = False  # the outage, if any, is one of refused writes
        self._watcher = ConfigWatcher(repo)
        self._running: dict[str, _Running] = {}  # slot (session id) -> session
        self._releases: set[tuple[str, str]] = set()  # (appkey, slot) to give back
        self._releasing: list[tuple[str, str]] = []  # ... and those on their way to Redis
        self._records: collections.deque[RecordItem] = collections.deque()
        self._overflow: dict[tuple[str, str], RecordItem] = {}  # (appkey, day) -> counters
        self._inflight: tuple[str, list[RecordItem]] | None = None
        self._seq = 0
        self._wake = trio.Event()
        self._app_cache: dict[str, tuple[AppKey, float]] = {}
        self._token_cache: dict[str, tuple[TokenInfo, float]] = {}
        self.lost_transcripts = 0  # dropped from the full buffer (counted in usage)
        self.refused_unavailable = 0
        self.served_from_cache = 0
        self.redis_reconnects = 0  # reachable again after being marked unreachable
        self._refusals = RateLimitedLog(log)
        self._drops = RateLimitedLog(log)
        self._write_errors = RateLimitedLog(log, interval_s=60.0)

    # --- ControlPlane ------------------------------------------------------------------------

    async def admit(
        self, connect: ConnectInfo, *, appkey: str, language: str | None, session_id: str
    ) -> Admission:
        with self._told_to_clients():
            return await self._admit(connect, appkey, language, session_id)

    @contextmanager
    def _told_to_clients(self) -> Iterator[None]:
        """What a client learns of a Redis failure: that Redis is away (retry), or that the
        control plane failed. Not our Redis's address or its reply: those go to the log."""
        try:
            yield
        except StoreUnavailable as exc:
            self._mark_down(exc)
            raise StoreUnavailable(UNREACHABLE) from exc
        except StoreError as exc:
            log.error("control plane: %s", exc.reason)
            raise ServerError(
                "the control plane failed (a Redis error, logged); retry later"
            ) from exc

    async def _admit(
        self, connect: ConnectInfo, appkey: str, language: str | None, session_id: str
    ) -> Admission:
        link = signing.parse_link(connect.query)
        if link is not None:
            app = await self._check_link(connect, link, appkey)
            confirmed = True
        else:
            app, confirmed = await self._check_token(connect.token, appkey)
        lang, pool = route_language(self.routing, self._config.server.default_language, language)
        if app.languages and lang not in app.languages:
            raise InvalidParameter(
                f"language {lang!r} is not allowed for appkey {appkey!r} "
                f"(allowed: {', '.join(app.languages)})"
            )
        await self._take_slot(app, session_id, confirmed)
        self._running[session_id] = _Running(app.appkey, lang, pool)
        return Admission(
            appkey=app.appkey,
            pool=pool,
            language=lang,
            record_transcript=app.record_transcripts,
            slot=session_id,
        )

    async def finish(self, admission: Admission, record: SessionRecord) -> None:
        try:
            running = self._running.pop(admission.slot, None)
            if admission.slot:
                self._releases.add((admission.appkey, admission.slot))
            self._append(self._item(admission, record, running))
            self._wake.set()
        except Exception:
            log.exception("recording session %s failed", record.session_id)

    async def issue_token_with_secret(
        self, appkey: str, secret: str, ttl_s: int | None = None
    ) -> tuple[str, TokenInfo]:
        """``POST /token``: a token for the holder of ``appkey``'s secret, for ``ttl_s``
        seconds (default: ``[redis] token_ttl_s``). A longer ``ttl_s`` is refused, as by
        ``asrd token --ttl``, not cut down: an app that asked for 2 h, got 1 h and did not
        read ``expires_in`` would find its token refused an hour before it expected."""
        longest = self._rc.token_ttl_s
        if ttl_s is not None and not 1 <= ttl_s <= longest:
            raise ClientError(f"ttl_s must be 1 to {longest} (seconds): no token lasts longer")
        with self._told_to_clients():
            return await self._issue_token_with_secret(appkey, secret, ttl_s or longest)

    async def _issue_token_with_secret(
        self, appkey: str, secret: str, ttl_s: int
    ) -> tuple[str, TokenInfo]:
        app = await self._repo.get_app(appkey)
        # Compare even for an unknown key, so timing does not tell which keys exist.
        matches = signing.secret_matches(secret, app.secret_sha256 if app else _NO_HASH)
        if app is None or not matches:
            raise AuthError("invalid appkey or secret")
        if not app.active:
            raise AuthError(f"appkey {appkey!r} is disabled")
        return await self._repo.issue_token(app, ttl_s)

    # --- admission -------------------------------------------------------------------------

    async def _check_token(self, token: str | None, appkey: str) -> tuple[AppKey, bool]:
        """The app key a token opens; ``(app, False)`` when served from the cache."""
        if not token:
            raise AuthError(
                "token missing: send it as the X-NLS-Token header or ?token=, or use a signed link"
            )
        digest = signing.sha256_hex(token)
        try:
            info, app = await self._repo.lookup(token, appkey)
        except StoreUnavailable as exc:
            self._mark_down(exc)
            cached = self._cached(digest, appkey)
            if cached is None:
                self._refuse(appkey, "its token was not validated recently")
            self.served_from_cache += 1
            return cached, False
        self._mark_up()
        try:
            _check_token_answer(info, app, appkey)
        except AsrdError:
            # Redis said no: what the cache remembers must not open a session in an outage.
            self._token_cache.pop(digest, None)
            if app is None or not app.active:
                self._app_cache.pop(appkey, None)
            else:  # the key as it is now: created again, the tokens of its old self no longer match
                _remember(self._app_cache, appkey, (app, time.monotonic()))
            raise
        assert info is not None and app is not None
        now = time.monotonic()
        _remember(self._token_cache, digest, (info, now))
        _remember(self._app_cache, appkey, (app, now))
        return app, True

    def _cached(self, digest: str, appkey: str) -> AppKey | None:
        """In an outage, the app key a token validated within ``cache_ttl_s`` opens, or None
        (the client may retry). What the cache knows for good, a token that has expired since
        or that belongs to another appkey, is the client's error, not a retry."""
        if self._rc.cache_ttl_s <= 0:
            return None
        now = time.monotonic()
        tok = self._token_cache.get(digest)
        entry = self._app_cache.get(appkey)
        if tok is None:
            return None
        info, seen = tok
        if info.expires_at <= time.time():  # a token's expiry never moves
            raise AuthError("token invalid or expired")
        if info.appkey != appkey:
            raise AppKeyTokenMismatch(f"the token does not belong to appkey {appkey!r}")
        if entry is None:
            return None
        app, app_seen = entry
        fresh = now - min(seen, app_seen) <= self._rc.cache_ttl_s
        if fresh and info.app_id == app.id and app.active:
            return app
        return None

    async def _check_link(
        self, connect: ConnectInfo, link: signing.SignedLink, appkey: str
    ) -> AppKey:
        if link.appkey != appkey:
            raise AppKeyTokenMismatch(
                f"the signed link is for appkey {link.appkey!r}, the command names {appkey!r}"
            )
        try:
            app = await self._repo.get_app(appkey)
        except StoreUnavailable as exc:
            self._mark_down(exc)
            self._refuse(appkey, "signed links need Redis to be used only once")
        self._mark_up()
        if app is None:
            # As for a wrong signature, so that links do not tell which keys exist.
            self._app_cache.pop(appkey, None)
            signing.link_signature(
                _NO_LINK_KEY, connect.method, connect.path, link.appkey, link.ts, link.nonce
            )
            raise AuthError("signed link: wrong signature")
        signing.check_link(
            link,
            app.link_key,
            method=connect.method,
            path=connect.path,
            now=time.time(),
            ttl_s=self._rc.link_ttl_s,
        )
        if not app.active:
            self._app_cache.pop(appkey, None)
            raise AuthError(f"appkey {appkey!r} is disabled")
        try:
            first_use = await self._repo.use_nonce(appkey, link.nonce)
        except StoreUnavailable as exc:
            self._mark_down(exc)
            self._refuse(appkey, "signed links need Redis to be used only once")
        if not first_use:
            raise AuthError(
                "signed link: already used (its nonce was seen before); sign a new link "
                "for every connection"
            )
        _remember(self._app_cache, appkey, (app, time.monotonic()))
        return app

    async def _take_slot(self, app: AppKey, session_id: str, confirmed: bool) -> None:
        if confirmed:
            try:
                taken = await self._repo.take_slot(app.appkey, session_id, app.max_sessions)
            except StoreUnavailable as exc:
                self._mark_down(exc)
                self._releases.add((app.appkey, session_id))  # in case the script ran
                if self._rc.cache_ttl_s <= 0:
                    self._refuse(app.appkey, "no concurrency slot could be taken")
            except BaseException:
                # Cancelled (the client left) while the script may have run.
                self._releases.add((app.appkey, session_id))
                self._wake.set()
                raise
            else:
                self._mark_up(wrote=True)
                if not taken:
                    raise TooManyRequests(
                        f"appkey {app.appkey!r} already runs its limit of {app.max_sessions} "
                        "concurrent sessions"
                    )
                return
        # Redis is away: the limit holds on this gateway only; the slot is registered in
        # Redis by the first refresh after it returns.
        mine = sum(1 for r in self._running.values() if r.appkey == app.appkey)
        if app.max_sessions and mine >= app.max_sessions:
            raise TooManyRequests(
                f"appkey {app.appkey!r} already runs its limit of {app.max_sessions} "
                "concurrent sessions"
            )
        self._releases.discard((app.appkey, session_id))

    def _refuse(self, appkey: str, why: str) -> NoReturn:
        self.refused_unavailable += 1
        self._refusals.warning(
            "refusing a session of appkey %r with 50000000: Redis at %s is unreachable and %s",
            appkey,
            self._repo.store.url,
            why,
        )
        raise StoreUnavailable(UNREACHABLE)

    # --- records ---------------------------------------------------------------------------

    def _item(
        self, admission: Admission, record: SessionRecord, running: _Running | None
    ) -> RecordItem:
        failed = record.code != SUCCESS
        item = RecordItem(
            appkey=admission.appkey,
            day=day_of(record.started_at),
            sessions=1,
            errors=1 if failed else 0,
            audio_ms=round(record.audio_s * 1000),
            duration_ms=round(record.duration_s * 1000),
            task_id=record.task_id,
            session_id=record.session_id,
            ended_ms=round((record.started_at + record.duration_s) * 1000),
        )
        if admission.record_transcript and record.task_id:
            item.doc = json.dumps(
                {
                    "task_id": record.task_id,
                    "session_id": record.session_id,
                    "appkey": admission.appkey,
                    "language": running.language if running else record.language,
                    "pool": admission.pool,
                    "started_at": record.started_at,
                    "ended_at": record.started_at + record.duration_s,
                    "duration_s": record.duration_s,
                    "audio_s": record.audio_s,
                    "code": record.code,
                    "reason": record.reason,
                    "params": record.params,
                    "sentences": record.sentences,
                    "gateway": self.writer_id,
                },
                separators=(",", ":"),
            )
        return item

    def _append(self, item: RecordItem) -> None:
        self._records.append(item)
        while len(self._records) > self._rc.buffer_records:
            old = self._records.popleft()
            if old.doc:
                self.lost_transcripts += 1
                # Pushed out by a later session's end, in that session's task: the line is
                # about the earlier one, and carries its ids.
                with logs.about(old.session_id, old.task_id):
                    self._drops.warning(
                        "record buffer full (%d records, Redis at %s unreachable): the "
                        "transcript of task %s is dropped; its usage is kept and it is counted "
                        "in lost_transcripts (%d so far)",
                        self._rc.buffer_records,
                        self._repo.store.url,
                        old.task_id,
                        self.lost_transcripts,
                    )
            key = (old.appkey, old.day)
            agg = self._overflow.get(key)
            if agg is None:
                agg = self._overflow[key] = RecordItem(old.appkey, old.day)
            agg.fold(old)

    @property
    def pending(self) -> int:
        """Records not yet written to Redis."""
        inflight = len(self._inflight[1]) if self._inflight else 0
        return len(self._records) + len(self._overflow) + inflight

    async def _flush(self) -> None:
        """Give back slots and write records; raises StoreUnavailable (then retried)."""
        if self._releases:
            # Out of the set before the round-trip: a refresh that re-adds one of these slots
            # meanwhile queues it again, and that must survive this batch's reply.
            batch = list(self._releases)
            self._releases.difference_update(batch)
            self._releasing = batch
            try:
                await self._repo.release_slots(batch)
            except BaseException:
                self._releases.update(batch)
                raise
            finally:
                self._releasing = []
        while self._inflight is not None or self._records or self._overflow:
            if self._inflight is None:
                items = list(self._overflow.values())
                self._overflow.clear()
                while self._records and len(items) < 100:
                    items.append(self._records.popleft())
                self._seq += 1
                self._inflight = (self._repo.keys.batch(self.writer_id, self._seq), items)
            marker, items = self._inflight
            await self._repo.write_batch(marker, items)
            self._inflight = None

    # --- background tasks ------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self._poll_config()
        except StoreUnavailable as exc:
            log.warning("live configuration not loaded: %s", exc)
        except StoreError:
            pass  # logged by the watcher
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._config_loop)
            nursery.start_soon(self._refresh_loop)
            nursery.start_soon(self._flush_loop)
            task_status.started()

    async def _poll_config(self) -> None:
        try:
            changed, doc = await self._watcher.poll()
        except StoreUnavailable as exc:
            self._mark_down(exc)
            raise
        self._mark_up()
        if changed:
            routing = doc.routing if doc is not None else self._config.routing
            if routing != self.routing:
                log.info(
                    "routing changed: languages %s, default %s",
                    dict(routing.languages) or "(each names its pool)",
                    routing.default_language or self._config.server.default_language,
                )
                self.routing = routing

    async def _config_loop(self) -> None:
        while True:
            await trio.sleep(self._rc.config_poll_s)
            try:
                await self._poll_config()
            except StoreError:
                pass  # logged when it starts: by _mark_down, or the watcher for an error reply

    async def _refresh_loop(self) -> None:
        while True:
            await trio.sleep(self._rc.slot_refresh_s)
            await self._refresh_once()

    async def _refresh_once(self) -> None:
        running: dict[str, list[str]] = {}
        for slot, r in self._running.items():
            running.setdefault(r.appkey, []).append(slot)
        if not running:
            return  # nothing to refresh: no word from Redis either way
        try:
            await self._repo.refresh_slots(running)
        except StoreUnavailable as exc:
            self._mark_down(exc)
        except StoreError as exc:
            log.error("refreshing concurrency slots failed: %s", exc)
        else:
            self._mark_up(wrote=True)
        finally:
            # A session that ended during the round-trip may have had its slot given back
            # before the refresh re-added it, which would then count for slot_ttl_s: give it
            # back again, after the refresh (a release is idempotent).
            ended = [(a, slot) for a, slots in running.items() for slot in slots]
            ended = [(a, slot) for a, slot in ended if slot not in self._running]
            if ended:
                self._releases.update(ended)
                self._wake.set()

    async def _flush_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            wrote = bool(self._releases or self.pending)  # else Redis is not asked anything
            try:
                await self._flush()
            except StoreUnavailable as exc:
                self._mark_down(exc)
                await trio.sleep(FLUSH_RETRY_S)
                self._wake.set()
            except StoreError as exc:
                # Nothing of the batch was written (repo.WRITE_BATCH checks first); it waits,
                # with the records after it, until the key the message names is fixed.
                self._write_errors.error("writing session records failed, retrying: %s", exc)
                await trio.sleep(FLUSH_RETRY_S)
                self._wake.set()
            else:
                if wrote:
                    self._mark_up(wrote=True)

    def _mark_down(self, exc: Exception) -> None:
        # A Redis that refuses writes still answers reads: only a write may then end the outage,
        # or each read would end it and the next write start it again, twice a second.
        self._writes_refused = isinstance(exc, StoreNotServing)
        if self.available:
            self.available = False
            log.error(
                "%s. Running sessions continue; new sessions are admitted only for tokens "
                "validated in the last %g s (others get 50000000); records are buffered "
                "(up to %d)",
                exc,
                self._rc.cache_ttl_s,
                self._rc.buffer_records,
            )

    @property
    def redis_errors(self) -> int:
        return self._repo.store.errors

    def _mark_up(self, *, wrote: bool = False) -> None:
        """Redis answered; ``wrote``: it took a write."""
        if not self.available and (wrote or not self._writes_refused):
            self.available = True
            self.redis_reconnects += 1
            log.warning(
                "Redis at %s is reachable again; writing %d buffered records",
                self._repo.store.url,
                self.pending,
            )
            self._wake.set()

    async def aclose(self, timeout_s: float = 3.0) -> None:
        """Give back every slot still held and write what is buffered (bounded time)."""
        for slot, r in self._running.items():
            self._releases.add((r.appkey, slot))
        self._running.clear()
        with trio.move_on_after(timeout_s):
            try:
                await self._flush()
            except StoreError as exc:
                log.debug("final flush failed: %s", exc)
        if self.pending or self._releases:
            log.error(
                "%d session records could not be written to Redis at %s before exit and are "
                "lost (%d slots expire by themselves)",
                self.pending,
                self._repo.store.url,
                len(self._releases),
            )


def _remember(cache: dict[str, V], key: str, value: V) -> None:
    cache.pop(key, None)
    cache[key] = value
    if len(cache) > MAX_CACHED:
        del cache[next(iter(cache))]  # the least recently validated


@asynccontextmanager
async def open_redis_control_plane(config: Config) -> AsyncIterator[RedisControlPlane]:
    async with open_redis_store(config.redis) as store:
        plane = RedisControlPlane(config, Repository(store, config.redis))
        async with trio.open_nursery() as nursery:
            await nursery.start(plane.run)
            log.info("control plane: Redis at %s", store.url)
            try:
                yield plane
            finally:
                nursery.cancel_scope.cancel()
                with trio.CancelScope(shield=True):
                    await plane.aclose()


def _check_token_answer(info: TokenInfo | None, app: AppKey | None, appkey: str) -> None:
    """Raise why Redis's answer about a token and the appkey it was sent with opens nothing."""
    if info is None:
        raise AuthError("token invalid, expired or revoked")
    if app is None:
        raise UnknownAppKey(f"appkey {appkey!r} does not exist")
    if info.appkey != appkey:
        raise AppKeyTokenMismatch(f"the token does not belong to appkey {appkey!r}")
    if info.app_id != app.id:
        raise AuthError("token invalid: its appkey was deleted and created again")
    if not app.active:
        raise AuthError(f"appkey {appkey!r} is disabled")
