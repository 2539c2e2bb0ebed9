"""Configuration: frozen pydantic models loaded from TOML.

Every limit has a name, a unit (in its name) and a bound. Sub-configs are handed to the parts
that need them; there are no module-level globals.
"""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ServerConfig(_Model):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    max_sessions: int = Field(default=1000, ge=1, le=100_000)
    idle_timeout_s: float = Field(default=10.0, gt=0, le=3600)
    max_session_s: float = Field(default=4 * 3600.0, gt=0, le=7 * 86400)
    max_frame_bytes: int = Field(default=64 * 1024, ge=640, le=16 * 1024 * 1024)
    max_text_bytes: int = Field(default=64 * 1024, ge=1024, le=1024 * 1024)
    shutdown_grace_s: float = Field(default=10.0, ge=0, le=3600)
    claim_timeout_s: float = Field(default=2.0, gt=0, le=60)
    worker_timeout_s: float = Field(default=1.0, gt=0, le=60)
    default_language: str = "en-US"


class NatsConfig(_Model):
    url: str = ""  # empty: `asrd serve` starts a private nats-server child
    subject_prefix: str = "asrd"
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds_file: str | None = None


class WorkerConfig(_Model):
    processes: int = Field(default=0, ge=0, le=256)  # 0: one per core (asrd serve)
    engine: str = "pocketsphinx"
    pool: str = "en-US"  # the pool (language) this worker serves
    decoders: int = Field(default=3, ge=1, le=64)
    final_pass: Literal["batch", "live"] = "batch"  # see engines/pocketsphinx.py
    partial_interval_ms: int = Field(default=200, ge=50, le=5000)
    heartbeat_interval_s: float = Field(default=0.25, gt=0, le=10)
    session_idle_timeout_s: float = Field(default=5.0, gt=0, le=3600)


class SegmentationConfig(_Model):
    frame_ms: int = Field(default=30)
    preroll_ms: int = Field(default=300, ge=0, le=2000)
    max_sentence_ms: int = Field(default=60_000, ge=1000, le=600_000)

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


class Config(_Model):
    server: ServerConfig = ServerConfig()
    nats: NatsConfig = NatsConfig()
    worker: WorkerConfig = WorkerConfig()
    segmentation: SegmentationConfig = SegmentationConfig()
    auth: AuthConfig = AuthConfig()

    @model_validator(mode="after")
    def _auth_off_only_on_loopback(self) -> Config:
        if not self.auth.enabled and not is_loopback(self.server.host):
            raise ValueError(
                f"refusing to listen on {self.server.host!r} with [auth] enabled = false: "
                "authentication may be off only on a loopback address (127.0.0.1, ::1, localhost)"
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
        raise ConfigError(f"invalid configuration: {exc}") from exc
