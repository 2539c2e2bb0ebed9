"""Configuration: frozen pydantic models loaded from TOML.

Every limit has a name, a unit (in its name) and a bound. Sub-configs are handed to the parts
that need them; there are no module-level globals.
"""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from asrd.params import LANGUAGE_CHARS, Language


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# A language or pool name: one NATS subject token (pools name claim subjects).
Name = Language
# Where a pocketsphinx worker's final results come from (asrd.engines.pocketsphinx).
FinalPass = Literal["batch", "live", "adaptive"]
# NATS subject tokens joined by dots: every subject asrd uses starts with it.
SubjectPrefix = Annotated[
    str, StringConstraints(pattern=rf"^{LANGUAGE_CHARS}(\.{LANGUAGE_CHARS}){{0,7}}$")
]


class ServerConfig(_Model):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    max_sessions: int = Field(default=1000, ge=1, le=100_000)
    idle_timeout_s: float = Field(default=10.0, gt=0, le=3600)
    max_session_s: float = Field(default=4 * 3600.0, gt=0, le=7 * 86400)
    max_frame_bytes: int = Field(default=64 * 1024, ge=640, le=16 * 1024 * 1024)
    max_text_bytes: int = Field(default=64 * 1024, ge=1024, le=1024 * 1024)
    shutdown_grace_s: float = Field(default=10.0, ge=0, le=3600)
    send_timeout_s: float = Field(default=10.0, gt=0, le=600)  # client not reading results
    max_audio_speed: float = Field(default=10.0, ge=1.0, le=1000.0)  # x real time, sustained
    audio_burst_s: float = Field(default=30.0, ge=0.0, le=3600.0)  # audio accepted at once
    failover_timeout_s: float = Field(default=10.0, gt=0, le=600)
    journal_max_bytes: int = Field(default=16 * 1024 * 1024, ge=64 * 1024, le=1024**3)
    claim_timeout_s: float = Field(default=2.0, gt=0, le=60)
    worker_timeout_s: float = Field(default=1.0, gt=0, le=60)
    default_language: Name = "en-US"
    # Gateway processes forked by `asrd gateway`, all listening on `port` (asrd.reuseport): one
    # event loop uses one core. Each has its own sessions and metrics; max_sessions is per process.
    processes: int = Field(default=1, ge=1, le=256)
    # > 0: gateway process i also serves /metrics, /healthz and /readyz on metrics_port + i, so
    # that a scrape reaches every process (one on `port` reaches whichever process accepts it).
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=0, ge=0, le=65535)

    @model_validator(mode="after")
    def _metrics_ports_exist(self) -> ServerConfig:
        if self.metrics_port and self.metrics_port + self.processes - 1 > 65535:
            raise ValueError(
                f"metrics_port {self.metrics_port} + {self.processes} processes passes 65535"
            )
        return self


class NatsConfig(_Model):
    url: str = ""  # empty: `asrd serve` starts a private nats-server child
    subject_prefix: SubjectPrefix = "asrd"
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds_file: str | None = None
    # Publishes are collected for this long and written to the socket together: one wakeup
    # of the NATS thread and one write per batch instead of per audio frame. 5 ms instead of 2
    # cost 8% less CPU per stream and halved the lag p99 near capacity (docs/benchmarks.md).
    publish_batch_ms: float = Field(default=5.0, ge=0, le=50)


# Decoders per worker process: pocketsphinx's are ~91 MB each; the load-test engine's are a few
# KB, and one process holding every session costs the least: 1 x 512 decoders took 15-20% less
# CPU than 2 x 256 at 500 streams (docs/benchmarks.md, "575 streams"). The bound only guards
# against a typing error.
MAX_DECODERS = 1024


class WorkerConfig(_Model):
    # Worker processes forked by one `asrd worker` (or `asrd serve`) after it loaded the
    # engine, sharing its model (asrd.prefork); 0: one per core.
    processes: int = Field(default=0, ge=0, le=256)
    engine: str = "pocketsphinx"
    pool: Name = "en-US"  # the pool (language) this worker serves
    decoders: int = Field(default=3, ge=1, le=MAX_DECODERS)
    # At most this many of those processes decode at once (asrd.cpugate); 0: one per core.
    decode_slots: int = Field(default=0, ge=0, le=256)
    # Worker processes under the kernel's SCHED_BATCH policy: their wake-ups do not preempt
    # each other's decodes (asrd.cpugate.batch_policy).
    sched_batch: bool = True
    final_pass: FinalPass = "adaptive"  # see engines/pocketsphinx.py
    # With a batch final pass ("batch"; "adaptive" before 2 s of speech): run it once a pause
    # reaches the gateway's [segmentation] pause_hint_ms, not when the sentence closes.
    early_final: bool = True
    # Engine-specific settings, e.g. pocketsphinx decoder options ({"maxhmmpf": 5000, "beam":
    # 1e-48, "hmm": "/path/to/model"}): passed to the engine as they are.
    engine_options: dict[str, str | int | float | bool] = Field(default_factory=dict)
    partial_interval_ms: int = Field(default=200, ge=50, le=5000)
    heartbeat_interval_s: float = Field(default=0.25, gt=0, le=10)
    session_idle_timeout_s: float = Field(default=5.0, gt=0, le=3600)
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=0, ge=0, le=65535)  # 0: no /metrics endpoint

    @field_validator("engine_options")
    @classmethod
    def _no_worker_settings(
        cls, options: dict[str, str | int | float | bool]
    ) -> dict[str, str | int | float | bool]:
        # The worker passes these itself: in engine_options they would be given twice.
        if taken := sorted(options.keys() & {"decoders", "final_pass", "early_final"}):
            raise ValueError(f"{', '.join(taken)}: set in [worker] itself, not engine_options")
        return options

    @model_validator(mode="after")
    def _metrics_ports_exist(self) -> WorkerConfig:
        last = self.metrics_port + max(self.processes, 1) - 1
        if self.metrics_port and last > 65535:
            raise ValueError(
                f"metrics_port {self.metrics_port} + {self.processes} processes passes 65535"
            )
        return self


class SegmentationConfig(_Model):
    frame_ms: int = Field(default=30)
    preroll_ms: int = Field(default=300, ge=0, le=2000)
    max_sentence_ms: int = Field(default=60_000, ge=1000, le=600_000)
    # Of a pause, what goes to the engine before speech resumes (asrd.segmentation).
    trailing_silence_ms: int = Field(default=300, ge=0, le=6000)
    # A pause this long (at least trailing_silence_ms) lets a worker start the final pass.
    pause_hint_ms: int = Field(default=500, ge=0, le=6000)

    @model_validator(mode="after")
    def _frame(self) -> SegmentationConfig:
        if self.frame_ms not in (10, 20, 30):
            raise ValueError("segmentation.frame_ms must be 10, 20 or 30 (webrtcvad frame sizes)")
        return self


class AppConfig(_Model):
    appkey: str
    tokens: tuple[str, ...] = ()


class AuthConfig(_Model):
    enabled: bool = False
    apps: tuple[AppConfig, ...] = ()


class RoutingConfig(_Model):
    """Which engine pool serves a language. Kept in config.toml, or live in Redis.

    With no ``languages`` a session's language names its pool (``asrd serve`` with its own
    nats-server fills it: control.embedded_routing); with some, only those languages are
    served and any other gets TaskFailed 40000003.
    """

    default_language: Name | None = None  # None: [server] default_language
    languages: dict[Name, Name] = Field(default_factory=dict, max_length=10_000)  # lang -> pool
    # Live reassignment of workers: the pool a worker was started with ([worker] pool) ->
    # the pool it serves now. Workers not named here serve the pool they were started with.
    workers: dict[Name, Name] = Field(default_factory=dict, max_length=10_000)


class DynamicConfig(_Model):
    """The configuration document kept in Redis (``asrd config``): sections of config.toml
    that gateways and workers pick up live. When present it replaces those sections."""

    routing: RoutingConfig = RoutingConfig()


class RedisConfig(_Model):
    """The Redis control plane (app keys, tokens, routing, quotas, usage, transcripts)."""

    url: str = ""  # empty: no Redis; keys and routing come from config.toml
    key_prefix: str = Field(default="asrd:", max_length=64)

    @field_validator("url")
    @classmethod
    def _redis_url(cls, url: str) -> str:
        # Checked here, so that a typo is a configuration error (status 2) for every command,
        # not a failure to reach Redis.
        if url:
            parts = urlsplit(url)
            if parts.scheme not in ("redis", "rediss", "unix"):
                raise ValueError("must start with redis://, rediss:// or unix://")
            try:
                parts.port  # noqa: B018 - it raises for a port that is no number
            except ValueError:
                raise ValueError("its port is not a number from 0 to 65535") from None
        return url

    timeout_s: float = Field(default=1.0, gt=0, le=60)  # connect and per-command
    max_connections: int = Field(default=32, ge=1, le=10_000)
    token_ttl_s: int = Field(default=3600, ge=1, le=30 * 86400)  # default and maximum
    link_ttl_s: int = Field(default=120, ge=1, le=3600)  # signed links: |now - ts| window
    slot_ttl_s: float = Field(default=30.0, ge=1, le=3600)  # a crashed gateway's slots expire
    slot_refresh_s: float = Field(default=5.0, gt=0, le=600)
    config_poll_s: float = Field(default=0.5, gt=0, le=1.0)  # routing changes picked up
    cache_ttl_s: float = Field(default=60.0, ge=0, le=3600)  # keys/tokens usable in an outage
    transcript_retention_days: float = Field(default=30.0, gt=0, le=3650)
    buffer_records: int = Field(default=10_000, ge=1, le=1_000_000)  # held while Redis is away

    @model_validator(mode="after")
    def _refresh_before_expiry(self) -> RedisConfig:
        if self.slot_refresh_s * 2 > self.slot_ttl_s:
            raise ValueError(
                "redis.slot_refresh_s must be at most half of redis.slot_ttl_s, "
                "or running sessions lose their slots between two refreshes"
            )
        return self


class Config(_Model):
    server: ServerConfig = ServerConfig()
    nats: NatsConfig = NatsConfig()
    worker: WorkerConfig = WorkerConfig()
    segmentation: SegmentationConfig = SegmentationConfig()
    auth: AuthConfig = AuthConfig()
    routing: RoutingConfig = RoutingConfig()
    redis: RedisConfig = RedisConfig()

    @model_validator(mode="after")
    def _auth_off_only_on_loopback(self) -> Config:
        # With Redis every session needs a token or a signed link: [auth] does not apply.
        if not self.auth.enabled and not self.redis.url and not is_loopback(self.server.host):
            raise ValueError(
                f"refusing to listen on {self.server.host!r} with [auth] enabled = false: "
                "authentication may be off only on a loopback address (127.0.0.1, ::1, localhost)"
            )
        return self

    @model_validator(mode="after")
    def _a_sentence_fits_the_journal(self) -> Config:
        # The failover journal keeps a sentence's audio until its final: a sentence the
        # segmenter lets run must fit, at 16 kHz (32 bytes a millisecond), or it ends its
        # session with 40000000 before max_sentence_ms force-closes it.
        seg = self.segmentation
        need = (seg.max_sentence_ms + seg.preroll_ms) * 32
        if need > self.server.journal_max_bytes:
            raise ValueError(
                f"a sentence of segmentation.max_sentence_ms = {seg.max_sentence_ms} (plus "
                f"preroll_ms = {seg.preroll_ms}) takes {need} bytes of audio at 16 kHz, more "
                f"than server.journal_max_bytes = {self.server.journal_max_bytes} keeps: raise "
                "journal_max_bytes or lower max_sentence_ms"
            )
        return self


class ConfigError(Exception):
    """The configuration file or an override is invalid; the message says which key and why."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_config(path: str | Path | None = None, **overrides: dict[str, Any]) -> Config:
    """Read TOML (or defaults when ``path`` is None) and apply per-section overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
    for section, values in overrides.items():
        data.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration: {_describe(exc)}") from None


def _describe(exc: ValidationError) -> str:
    """Each error as ``section.key: why``, without the value given: it may be a password (or
    a URL that holds one), and the message ends up in logs."""
    return "; ".join(
        f"{'.'.join(str(part) for part in e['loc']) or 'config'}: {e['msg']}"
        for e in exc.errors(include_url=False, include_input=False)
    )
