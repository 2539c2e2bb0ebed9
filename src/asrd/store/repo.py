"""The control plane's objects on Redis: app keys, tokens, nonces, slots, the live
configuration, usage and transcript records. Trio-native, over any :class:`Store`.

Everything that must be atomic across gateways and commands (taking a concurrency slot,
creating a key, writing a batch of records exactly once, changing the live configuration) is
one Lua script.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from typing import Any, Literal

from asrd.config import DynamicConfig, RedisConfig
from asrd.errors import InvalidParameter
from asrd.store import Script, Store, StoreError, signing
from asrd.store.keys import Keys

APPKEY_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# Its usage hash would be Keys.usage_apps, the set of all keys with usage.
RESERVED_APPKEYS = frozenset({"apps"})
Status = Literal["active", "disabled"]


def valid_appkey(appkey: str) -> bool:
    return bool(APPKEY_RE.fullmatch(appkey)) and appkey not in RESERVED_APPKEYS


class AppKeyExists(InvalidParameter):
    """:meth:`Repository.create_app` of a name already taken: a conflict with what Redis
    holds, not a malformed name, so ``asrd keys create`` fails with 1 (as for a key not
    found), not with 2 (invalid input)."""


@dataclass(frozen=True, slots=True)
class AppKey:
    appkey: str
    id: str  # random per creation: tokens of a deleted and re-created key stay invalid
    status: Status
    secret_sha256: str
    link_key: str
    languages: tuple[str, ...]  # empty: every language
    max_sessions: int  # concurrent sessions across all gateways; 0: no limit
    record_transcripts: bool
    description: str
    created_at: float

    @property
    def active(self) -> bool:
        return self.status == "active"

    def public(self) -> dict[str, Any]:
        """What may be shown: everything but the secret's hash and the link key."""
        return {
            "appkey": self.appkey,
            "status": self.status,
            "languages": list(self.languages),
            "max_sessions": self.max_sessions,
            "record_transcripts": self.record_transcripts,
            "description": self.description,
            "created_at": self.created_at,
        }

    def to_hash(self) -> dict[str, str]:
        return {
            "id": self.id,
            "status": self.status,
            "secret_sha256": self.secret_sha256,
            "link_key": self.link_key,
            "languages": json.dumps(list(self.languages)),
            "max_sessions": str(self.max_sessions),
            "record_transcripts": "1" if self.record_transcripts else "0",
            "description": self.description,
            "created_at": repr(self.created_at),
        }

    @classmethod
    def from_hash(cls, appkey: str, h: dict[str, str]) -> AppKey:
        try:
            status = h["status"]
            if status not in ("active", "disabled"):
                raise ValueError(f"status {status!r}")
            return cls(
                appkey=appkey,
                id=h["id"],
                status=status,  # type: ignore[arg-type]
                secret_sha256=h["secret_sha256"],
                link_key=h["link_key"],
                languages=tuple(json.loads(h.get("languages", "[]"))),
                max_sessions=int(h.get("max_sessions", "0")),
                record_transcripts=h.get("record_transcripts", "1") == "1",
                description=h.get("description", ""),
                created_at=float(h.get("created_at", "0")),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise StoreError(f"app key {appkey!r} is malformed in Redis: {exc!r}") from exc


@dataclass(frozen=True, slots=True)
class TokenInfo:
    appkey: str
    app_id: str
    issued_at: float
    expires_at: float


@dataclass(slots=True)
class RecordItem:
    """Usage counters of one app key and day, with at most one session's transcript."""

    appkey: str
    day: str  # YYYY-MM-DD, UTC, of the session's start
    sessions: int = 0
    errors: int = 0
    audio_ms: int = 0
    duration_ms: int = 0
    lost_transcripts: int = 0
    task_id: str = ""
    session_id: str = ""
    ended_ms: int = 0
    doc: str = ""  # the transcript record as JSON; empty: none

    def fold(self, other: RecordItem) -> None:
        """Add ``other``'s counters; its transcript, if any, is counted as lost."""
        self.sessions += other.sessions
        self.errors += other.errors
        self.audio_ms += other.audio_ms
        self.duration_ms += other.duration_ms
        self.lost_transcripts += other.lost_transcripts + (1 if other.doc else 0)


@dataclass(frozen=True, slots=True)
class UsageRow:
    appkey: str
    day: str
    sessions: int = 0
    errors: int = 0
    audio_s: float = 0.0
    duration_s: float = 0.0
    lost_transcripts: int = 0


@dataclass(frozen=True, slots=True)
class ConfigState:
    rev: str  # "" when never set
    doc: DynamicConfig | None  # None: no document in Redis
    error: str = ""  # set when the stored document does not validate
    raw: dict[str, Any] = field(default_factory=dict)


USAGE_COUNTERS = ("sessions", "errors", "audio_ms", "duration_ms", "lost_transcripts")

# --- Lua scripts ----------------------------------------------------------------------------

CREATE_APP = Script(
    """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""
)

UPDATE_APP = Script(
    """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""
)

# KEYS[1] slots zset; ARGV: session id, limit (0: none), ttl ms. Returns 1 when taken.
TAKE_SLOT = Script(
    """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local limit = tonumber(ARGV[2])
if limit > 0 and not redis.call('ZSCORE', KEYS[1], ARGV[1])
   and redis.call('ZCARD', KEYS[1]) >= limit then
  return 0
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl)
return 1
"""
)

# KEYS: slots zsets; ARGV[1] ttl ms, ARGV[2] JSON list (per key) of session-id lists.
REFRESH_SLOTS = Script(
    """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local members = cjson.decode(ARGV[2])
for i, key in ipairs(KEYS) do
  for _, m in ipairs(members[i]) do
    redis.call('ZADD', key, now + ttl, m)
  end
  redis.call('PEXPIRE', key, ttl)
end
return 1
"""
)

COUNT_SLOTS = Script(
    """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
"""
)

# KEYS[1] batch marker, KEYS[2] usage apps set, then per item its usage hash, transcript
# string, task's transcripts zset and key's transcripts zset. ARGV[1] marker ttl s, ARGV[2]
# retention s, ARGV[3] JSON items.
# Returns 0 when the batch was written before (a retry after a lost reply). A key holding a
# value of another type is an error before anything is written: a script's writes are not
# undone when a later command fails, and the retry would then skip the rest as written.
WRITE_BATCH = Script(
    """
local items = cjson.decode(ARGV[3])
local want = {[2] = 'set'}
for i = 1, #items do
  local k = 4 * i - 1
  want[k], want[k + 1], want[k + 2], want[k + 3] = 'hash', 'string', 'zset', 'zset'
end
for k, t in pairs(want) do
  local have = redis.call('TYPE', KEYS[k]).ok
  if have ~= 'none' and have ~= t then
    return redis.error_reply('WRONGTYPE ' .. KEYS[k] .. ' holds a ' .. have .. ', not a ' .. t)
  end
end
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end
local retention = tonumber(ARGV[2])
for i, it in ipairs(items) do
  local k = 4 * i - 1
  local usage, tr, task, app = KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  local d = it.day .. ':'
  for _, c in ipairs({'sessions', 'errors', 'audio_ms', 'duration_ms', 'lost_transcripts'}) do
    if it[c] ~= '0' then redis.call('HINCRBY', usage, d .. c, it[c]) end
  end
  redis.call('SADD', KEYS[2], it.appkey)
  if it.doc ~= '' then
    local gone = tonumber(it.ended_ms) - retention * 1000
    redis.call('SET', tr, it.doc, 'EX', retention)
    redis.call('ZADD', task, it.ended_ms, it.session_id)
    redis.call('ZREMRANGEBYSCORE', task, '-inf', gone)
    redis.call('EXPIRE', task, retention)
    redis.call('ZADD', app, it.ended_ms, it.task_id .. ':' .. it.session_id)
    redis.call('ZREMRANGEBYSCORE', app, '-inf', gone)
  end
end
return 1
"""
)

# KEYS[1] config, KEYS[2] config:rev; ARGV[1] the document ('': delete it), ARGV[2] if given
# the revision it was made from: when another change came since, nothing is written and the
# reply is nil (the caller reads again and redoes its change). Returns the new revision. The
# revision is bumped before the write: a foreign value there fails the script (naming the key)
# before anything is written, as a script's writes are not undone; the document is never
# changed without the revision the gateways poll.
SAVE_CONFIG = Script(
    """
local function refused(reply) return redis.error_reply(reply.err .. ' (' .. KEYS[2] .. ')') end
local old = redis.pcall('GET', KEYS[2])
if type(old) == 'table' then return refused(old) end
if ARGV[2] and (old or '') ~= ARGV[2] then return false end
local rev = redis.pcall('INCR', KEYS[2])
if type(rev) == 'table' then return refused(rev) end
if ARGV[1] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
return rev
"""
)

# Each time a change of the live configuration is redone, another one was saved: only a storm
# of them (a script gone wrong) exhausts this.
CONFIG_ATTEMPTS = 10
BATCH_MARKER_TTL_S = 86400
NONCE_CLOCK_SKEW_S = 60  # gateways' clocks may differ by this much without a link replayed
MAX_BATCH = 100


def day_of(unix_s: float) -> str:
    return datetime.fromtimestamp(unix_s, UTC).date().isoformat()


class Repository:
    def __init__(self, store: Store, config: RedisConfig) -> None:
        self.store = store
        self.keys = Keys(config.key_prefix)
        self.config = config

    # --- app keys --------------------------------------------------------------------------

    async def create_app(
        self,
        appkey: str | None = None,
        *,
        max_sessions: int = 10,
        languages: Sequence[str] = (),
        record_transcripts: bool = True,
        description: str = "",
    ) -> tuple[AppKey, str]:
        """Create a key; returns it and its secret (shown once, never stored)."""
        appkey = appkey or secrets.token_hex(8)
        if not valid_appkey(appkey):
            raise InvalidParameter(
                "appkey: 1 to 64 characters of A-Z a-z 0-9 _ . -, and not "
                + ", ".join(sorted(RESERVED_APPKEYS))
            )
        if max_sessions < 0:
            raise InvalidParameter("max_sessions must be >= 0 (0: no limit)")
        secret = signing.new_secret()
        app = AppKey(
            appkey=appkey,
            id=secrets.token_hex(8),
            status="active",
            secret_sha256=signing.sha256_hex(secret),
            link_key=signing.derive_link_key(secret),
            languages=tuple(languages),
            max_sessions=max_sessions,
            record_transcripts=record_transcripts,
            description=description,
            created_at=time.time(),
        )
        fields = [x for kv in app.to_hash().items() for x in kv]
        created = await self.store.eval(
            CREATE_APP, [self.keys.app(appkey), self.keys.apps], [appkey, *fields]
        )
        if not created:
            raise AppKeyExists(f"appkey {appkey!r} already exists")
        return app, secret

    async def get_app(self, appkey: str) -> AppKey | None:
        if not valid_appkey(appkey):
            return None
        h = await self.store.execute("HGETALL", self.keys.app(appkey))
        return AppKey.from_hash(appkey, h) if h else None

    async def list_apps(self) -> list[AppKey]:
        names = sorted(await self.store.execute("SMEMBERS", self.keys.apps))
        if not names:
            return []
        hashes = await self.store.pipeline([("HGETALL", self.keys.app(n)) for n in names])
        return [AppKey.from_hash(n, h) for n, h in zip(names, hashes, strict=True) if h]

    async def update_app(
        self,
        appkey: str,
        *,
        status: Status | None = None,
        max_sessions: int | None = None,
        languages: Sequence[str] | None = None,
        record_transcripts: bool | None = None,
        description: str | None = None,
    ) -> AppKey | None:
        """Change some fields; None when the key does not exist."""
        changes: dict[str, str] = {}
        if status is not None:
            changes["status"] = status
        if max_sessions is not None:
            if max_sessions < 0:
                raise InvalidParameter("max_sessions must be >= 0 (0: no limit)")
            changes["max_sessions"] = str(max_sessions)
        if languages is not None:
            changes["languages"] = json.dumps(list(languages))
        if record_transcripts is not None:
            changes["record_transcripts"] = "1" if record_transcripts else "0"
        if description is not None:
            changes["description"] = description
        if not valid_appkey(appkey):
            return None
        if changes:
            fields = [x for kv in changes.items() for x in kv]
            if not await self.store.eval(UPDATE_APP, [self.keys.app(appkey)], fields):
                return None
        return await self.get_app(appkey)

    async def delete_app(self, appkey: str) -> bool:
        """Delete a key (its tokens die with it; its usage and transcripts are kept)."""
        if not valid_appkey(appkey):
            return False
        deleted, _, _ = await self.store.pipeline(
            [
                ("DEL", self.keys.app(appkey)),
                ("SREM", self.keys.apps, appkey),
                ("DEL", self.keys.slots(appkey)),
            ],
            transaction=True,
        )
        return bool(deleted)

    # --- tokens ----------------------------------------------------------------------------

    async def issue_token(self, app: AppKey, ttl_s: int) -> tuple[str, TokenInfo]:
        token = signing.new_token()
        now = time.time()
        info = TokenInfo(app.appkey, app.id, now, now + ttl_s)
        await self.store.execute(
            "SET", self.keys.token(signing.sha256_hex(token)), json.dumps(asdict(info)), "EX", ttl_s
        )
        return token, info

    async def revoke_token(self, token: str) -> bool:
        return bool(await self.store.execute("DEL", self.keys.token(signing.sha256_hex(token))))

    async def lookup(self, token: str, appkey: str) -> tuple[TokenInfo | None, AppKey | None]:
        """The token and the app key named in a Start command, in one round trip."""
        if not valid_appkey(appkey):
            raw = await self.store.execute("GET", self.keys.token(signing.sha256_hex(token)))
            return _token_info(raw), None
        raw, h = await self.store.pipeline(
            [
                ("GET", self.keys.token(signing.sha256_hex(token))),
                ("HGETALL", self.keys.app(appkey)),
            ]
        )
        return _token_info(raw), (AppKey.from_hash(appkey, h) if h else None)

    # --- signed links ----------------------------------------------------------------------

    async def use_nonce(self, appkey: str, nonce: str) -> bool:
        """True the first time a link's nonce is seen, False on replay.

        Kept for the link's whole window (2 x link_ttl_s) plus NONCE_CLOCK_SKEW_S: a gateway
        whose clock is behind still takes a link that expired on a faster one."""
        ttl = 2 * self.config.link_ttl_s + NONCE_CLOCK_SKEW_S
        return bool(
            await self.store.execute("SET", self.keys.nonce(appkey, nonce), "1", "NX", "EX", ttl)
        )

    # --- concurrency slots -----------------------------------------------------------------

    def _slot_ttl_ms(self) -> int:
        return int(self.config.slot_ttl_s * 1000)

    async def take_slot(self, appkey: str, session_id: str, limit: int) -> bool:
        return bool(
            await self.store.eval(
                TAKE_SLOT, [self.keys.slots(appkey)], [session_id, limit, self._slot_ttl_ms()]
            )
        )

    async def refresh_slots(self, running: dict[str, list[str]]) -> None:
        if not running:
            return
        appkeys = sorted(running)
        await self.store.eval(
            REFRESH_SLOTS,
            [self.keys.slots(k) for k in appkeys],
            [self._slot_ttl_ms(), json.dumps([running[k] for k in appkeys])],
        )

    async def release_slots(self, slots: Iterable[tuple[str, str]]) -> None:
        commands = [("ZREM", self.keys.slots(appkey), sid) for appkey, sid in slots]
        if commands:
            await self.store.pipeline(commands)

    async def active_sessions(self, appkey: str) -> int:
        return int(await self.store.eval(COUNT_SLOTS, [self.keys.slots(appkey)], []))

    # --- live configuration ----------------------------------------------------------------

    async def config_rev(self) -> str:
        return str(await self.store.execute("GET", self.keys.config_rev) or "")

    async def load_config(self) -> ConfigState:
        """The document with the revision it is at (read in one transaction)."""
        rev, raw = await self.store.pipeline(
            [("GET", self.keys.config_rev), ("GET", self.keys.config)], transaction=True
        )
        rev = str(rev or "")
        if raw is None:
            return ConfigState(rev, None)
        try:
            data = json.loads(raw)
            return ConfigState(rev, DynamicConfig.model_validate(data), raw=data)
        except ValueError as exc:  # json and pydantic errors
            return ConfigState(rev, None, error=str(exc))

    async def save_config(self, doc: DynamicConfig | None) -> str:
        """Store (None: delete) the live configuration; returns the new revision."""
        return str(await self._save_config(doc))

    async def change_config(
        self, change: Callable[[ConfigState], DynamicConfig]
    ) -> tuple[str, DynamicConfig] | None:
        """Save ``change(stored configuration)``; returns the new revision and document.

        Written only if no other change came since the read (it would be lost): else read
        again and ``change`` made again, up to CONFIG_ATTEMPTS times (then None, nothing
        saved)."""
        for _ in range(CONFIG_ATTEMPTS):
            state = await self.load_config()
            doc = change(state)
            rev = await self._save_config(doc, if_rev=state.rev)
            if rev is not None:
                return str(rev), doc
        return None

    async def _save_config(
        self, doc: DynamicConfig | None, *, if_rev: str | None = None
    ) -> int | None:
        """The new revision; None when ``if_rev`` is no longer the stored revision."""
        value = "" if doc is None else doc.model_dump_json(exclude_defaults=True)
        args = [value] if if_rev is None else [value, if_rev]
        rev: int | None = await self.store.eval(
            SAVE_CONFIG, [self.keys.config, self.keys.config_rev], args
        )
        return rev

    # --- usage and transcripts -------------------------------------------------------------

    async def write_batch(self, marker: str, items: Sequence[RecordItem]) -> bool:
        """Write usage counters and transcripts atomically, once per ``marker``."""
        keys = [marker, self.keys.usage_apps]
        for it in items:
            keys += [
                self.keys.usage(it.appkey),
                self.keys.transcript(it.task_id, it.session_id),
                self.keys.task_transcripts(it.task_id),
                self.keys.transcripts(it.appkey),
            ]
        payload = [{k: str(v) for k, v in asdict(it).items()} for it in items]
        retention_s = max(1, int(self.config.transcript_retention_days * 86400))
        return bool(
            await self.store.eval(
                WRITE_BATCH, keys, [BATCH_MARKER_TTL_S, retention_s, json.dumps(payload)]
            )
        )

    async def usage(self, appkey: str | None = None, since: date | None = None) -> list[UsageRow]:
        if appkey is not None:
            names = [appkey]
        else:
            names = sorted(await self.store.execute("SMEMBERS", self.keys.usage_apps))
        if not names:
            return []
        hashes = await self.store.pipeline([("HGETALL", self.keys.usage(n)) for n in names])
        rows = []
        first = since.isoformat() if since else ""
        for name, h in zip(names, hashes, strict=True):
            days: dict[str, dict[str, int]] = {}
            for f, v in h.items():
                day, _, counter = f.partition(":")
                if counter in USAGE_COUNTERS and day >= first:
                    days.setdefault(day, {})[counter] = int(v)
            for day in sorted(days):
                c = days[day]
                rows.append(
                    UsageRow(
                        appkey=name,
                        day=day,
                        sessions=c.get("sessions", 0),
                        errors=c.get("errors", 0),
                        audio_s=c.get("audio_ms", 0) / 1000,
                        duration_s=c.get("duration_ms", 0) / 1000,
                        lost_transcripts=c.get("lost_transcripts", 0),
                    )
                )
        return sorted(rows, key=lambda r: (r.day, r.appkey))

    async def transcript(self, task_id: str) -> list[dict[str, Any]]:
        """Every recorded session of ``task_id`` (normally one), oldest first."""
        sessions = await self.store.execute("ZRANGE", self.keys.task_transcripts(task_id), 0, -1)
        docs = await self._docs([self.keys.transcript(task_id, s) for s in sessions])
        return sorted(docs, key=lambda d: d.get("started_at", 0))

    async def transcripts(
        self, appkey: str, *, since: date | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        """The key's transcripts, newest first."""
        low = "-inf"
        if since is not None:
            low = str(
                int(datetime(since.year, since.month, since.day, tzinfo=UTC).timestamp() * 1000)
            )
        members = await self.store.execute(
            "ZREVRANGEBYSCORE", self.keys.transcripts(appkey), "+inf", low, "LIMIT", 0, limit
        )
        keys = []
        for member in members:
            task_id, _, session_id = member.rpartition(":")  # session ids are hex
            keys.append(self.keys.transcript(task_id, session_id))
        docs = await self._docs(keys)
        return sorted(docs, key=lambda d: d.get("ended_at", 0), reverse=True)

    async def _docs(self, keys: list[str]) -> list[dict[str, Any]]:
        """The transcript records still kept under ``keys`` (an index may outlive a record)."""
        if not keys:
            return []
        values = await self.store.execute("MGET", *keys)
        return [json.loads(v) for v in values if v is not None]


def _token_info(raw: str | None) -> TokenInfo | None:
    if raw is None:
        return None
    try:
        return TokenInfo(**json.loads(raw))
    except (ValueError, TypeError) as exc:
        raise StoreError(f"malformed token record in Redis: {exc!r}") from exc
