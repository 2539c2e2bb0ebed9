"""The Redis key layout, in one place (README.md "Redis key layout" documents it).

Every key starts with ``[redis] key_prefix`` (default ``asrd:``), so several deployments can
share one Redis. asrd runs against a single Redis (or a Sentinel-managed primary), not a
Redis Cluster: its Lua scripts touch keys of different app keys in one call.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "asrd:"

    def app(self, appkey: str) -> str:
        """HASH: id, status, secret_sha256, link_key, languages, max_sessions,
        record_transcripts, description, created_at."""
        return f"{self.prefix}app:{appkey}"

    @property
    def apps(self) -> str:
        """SET of every app key."""
        return f"{self.prefix}apps"

    def token(self, token_sha256: str) -> str:
        """STRING (JSON {appkey, app_id, issued_at, expires_at}) with the token's TTL; named
        by the SHA-256 of the token, so reading Redis does not reveal usable tokens."""
        return f"{self.prefix}token:{token_sha256}"

    def nonce(self, appkey: str, nonce: str) -> str:
        """STRING, set once when a signed link is used; TTL 2 x link_ttl_s + NONCE_CLOCK_SKEW_S."""
        return f"{self.prefix}nonce:{appkey}:{nonce}"

    def slots(self, appkey: str) -> str:
        """ZSET session_id -> expiry (ms, Redis clock): the key's running sessions."""
        return f"{self.prefix}slots:{appkey}"

    @property
    def config(self) -> str:
        """STRING: the live configuration document (JSON, asrd.config.DynamicConfig)."""
        return f"{self.prefix}config"

    @property
    def config_rev(self) -> str:
        """STRING integer, incremented on every change of :attr:`config` (polled)."""
        return f"{self.prefix}config:rev"

    def usage(self, appkey: str) -> str:
        """HASH ``<YYYY-MM-DD>:<counter>`` -> integer; counters: sessions, errors, audio_ms,
        duration_ms, lost_transcripts."""
        return f"{self.prefix}usage:{appkey}"

    @property
    def usage_apps(self) -> str:
        """SET of the app keys that have usage (deleted keys included)."""
        return f"{self.prefix}usage:apps"

    def transcript(self, task_id: str, session_id: str) -> str:
        """STRING: one session's JSON transcript record; expires after the retention. One key
        per session: a task id (the client's) may be used again, and must not keep older
        transcripts alive."""
        return f"{self.prefix}transcript:{task_id}:{session_id}"

    def task_transcripts(self, task_id: str) -> str:
        """ZSET session_id -> end time (ms): the transcripts of a task id, trimmed to the
        retention; expires a retention after its last write."""
        return f"{self.prefix}task-transcripts:{task_id}"

    def transcripts(self, appkey: str) -> str:
        """ZSET ``<task_id>:<session_id>`` -> end time (ms): the key's transcripts, trimmed to
        the retention."""
        return f"{self.prefix}app-transcripts:{appkey}"

    def batch(self, writer: str, seq: int) -> str:
        """STRING marker of a written record batch (a retried batch is not counted twice)."""
        return f"{self.prefix}batch:{writer}:{seq}"
