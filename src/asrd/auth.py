"""Who may open a session: app keys and tokens.

The embedded default reads them from ``[auth]`` in config.toml. The check happens when the
``StartTranscription`` arrives, because Alibaba clients put the appkey only in commands.
"""

from __future__ import annotations

import hmac
from typing import Protocol

from asrd.config import AuthConfig
from asrd.errors import AppKeyTokenMismatch, AuthError, UnknownAppKey


class Authenticator(Protocol):
    async def authorize(self, token: str | None, appkey: str) -> None:
        """Return if ``token`` may open a session for ``appkey``; raise an AuthError else."""


class StaticAuthenticator:
    def __init__(self, config: AuthConfig) -> None:
        self.enabled = config.enabled
        # token -> the appkeys it opens: one token may be listed under several apps (as an
        # Alibaba token serves every appkey of its account)
        self._tokens: dict[str, set[str]] = {}
        self._appkeys = {app.appkey for app in config.apps}
        for app in config.apps:
            for token in app.tokens:
                self._tokens.setdefault(token, set()).add(app.appkey)

    async def authorize(self, token: str | None, appkey: str) -> None:
        if not self.enabled:
            return
        if not token:
            raise AuthError("token missing: send it as the X-NLS-Token header or ?token=")
        owners: set[str] | None = None
        for known, apps in self._tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                owners = apps
        if owners is None:
            raise AuthError("token invalid or expired")
        if appkey not in self._appkeys:
            raise UnknownAppKey(f"appkey {appkey!r} does not exist")
        if appkey not in owners:
            raise AppKeyTokenMismatch(f"the token does not belong to appkey {appkey!r}")
