"""``POST /token`` on the gateway: an app trades its key's secret for an access token.

Request: credentials as HTTP Basic auth (``Authorization: Basic base64(appkey:secret)``) or
as a JSON body ``{"appkey": ..., "secret": ...}``; the body may ask for a shorter lifetime,
``{"ttl_s": 600}``. Answer ``200`` with ``{"token", "appkey", "expires_at" (unix s),
"expires_in" (s)}``, else a JSON ``{"error", "code"}`` with 400 (among others a ``ttl_s``
that is not 1 to ``[redis] token_ttl_s``: refused, never cut down), 401 (unknown key, wrong
secret, disabled key), 404 (no Redis control plane), 405, 411, 413 or 503 (Redis
unreachable: retry).

The gateway hands requests for :data:`TOKEN_PATH` to :func:`token_endpoint`.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import trio

from asrd.errors import AsrdError, ClientError, ServerError
from asrd.handshake import RequestHead, http_response
from asrd.store.repo import TokenInfo

TOKEN_PATH = "/token"
MAX_BODY_BYTES = 8192
BODY_TIMEOUT_S = 10.0

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    411: "Length Required",
    413: "Content Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@runtime_checkable
class TokenIssuer(Protocol):
    async def issue_token_with_secret(
        self, appkey: str, secret: str, ttl_s: int | None = None
    ) -> tuple[str, TokenInfo]: ...


class _HttpError(Exception):
    def __init__(self, status: int, reason: str, code: int = 40000000) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.code = code


def _json(status: int, body: dict[str, Any]) -> tuple[int, bytes]:
    return status, json.dumps(body).encode()


def _header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def _credentials(
    headers: Sequence[tuple[bytes, bytes]], body: bytes
) -> tuple[str, str, int | None]:
    data: dict[str, Any] = {}
    if body.strip():
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):  # RecursionError: nesting beyond the limit
            raise _HttpError(400, "the body must be a JSON object") from None
        if not isinstance(data, dict):
            raise _HttpError(400, "the body must be a JSON object")
    ttl = data.get("ttl_s")
    if ttl is not None and (not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < 1):
        raise _HttpError(400, "ttl_s must be a positive integer (seconds)")
    auth = _header(headers, b"authorization")
    if auth is not None:
        scheme, _, value = auth.strip().partition(b" ")
        if scheme.lower() != b"basic":
            raise _HttpError(401, "use HTTP Basic auth: base64(appkey:secret)", 40000001)
        try:
            appkey, sep, secret = (
                base64.b64decode(value.strip(), validate=True).decode().partition(":")
            )
        except (binascii.Error, UnicodeDecodeError):
            raise _HttpError(400, "malformed Basic credentials") from None
        if not sep:
            raise _HttpError(400, "malformed Basic credentials: expected appkey:secret")
        return appkey, secret, ttl
    key, password = data.get("appkey"), data.get("secret")
    if not isinstance(key, str) or not isinstance(password, str):
        raise _HttpError(401, "credentials missing: Basic auth or JSON {appkey, secret}", 40000001)
    return key, password, ttl


async def handle_token_request(
    control: object, method: str, headers: Sequence[tuple[bytes, bytes]], body: bytes
) -> tuple[int, bytes]:
    """Answer a token request: ``(HTTP status, JSON body)``. Never raises AsrdError."""
    try:
        if not isinstance(control, TokenIssuer):
            raise _HttpError(404, "POST /token needs the Redis control plane ([redis] url)")
        if method != "POST":
            raise _HttpError(405, "use POST")
        appkey, secret, ttl = _credentials(headers, body)
        token, info = await control.issue_token_with_secret(appkey, secret, ttl)
    except _HttpError as exc:
        return _json(exc.status, {"error": exc.reason, "code": exc.code})
    except ClientError as exc:
        status = 401 if exc.code in (40000001, 40020105) else 400
        return _json(status, {"error": exc.reason, "code": exc.code})
    except ServerError as exc:
        return _json(503, {"error": exc.reason, "code": exc.code})
    except AsrdError as exc:
        return _json(500, {"error": exc.reason, "code": exc.code})
    return _json(
        200,
        {
            "token": token,
            "appkey": info.appkey,
            "expires_at": int(info.expires_at),
            "expires_in": round(info.expires_at - info.issued_at),
        },
    )


async def read_body(stream: trio.abc.ReceiveStream, head: RequestHead, already: bytes) -> bytes:
    """The request body after ``head`` (``already``: bytes read past the head)."""
    if (head.header(b"transfer-encoding") or b"").strip():
        raise _HttpError(411, "send the body with a Content-Length")
    raw = head.header(b"content-length")
    try:
        length = int(raw) if raw is not None else 0
    except ValueError:
        raise _HttpError(400, "bad Content-Length") from None
    if length < 0:
        raise _HttpError(400, "bad Content-Length")
    if length > MAX_BODY_BYTES:
        raise _HttpError(413, f"body larger than {MAX_BODY_BYTES} bytes")
    body = already
    with trio.move_on_after(BODY_TIMEOUT_S):
        while len(body) < length:
            data = await stream.receive_some(length - len(body))
            if not data:
                break
            body += data
    if len(body) < length:
        raise _HttpError(400, "incomplete body")
    return body[:length]


async def token_endpoint(
    control: object, stream: trio.abc.ReceiveStream, head: RequestHead, already: bytes
) -> tuple[bytes, bool]:
    """The whole HTTP response to a request for :data:`TOKEN_PATH`, and whether the request's
    body was read (else the caller drains it, so that closing does not reset the answer)."""
    read = False
    try:
        body = await read_body(stream, head, already)
        read = True
        status, payload = await handle_token_request(control, head.method, head.headers, body)
    except _HttpError as exc:
        status, payload = _json(exc.status, {"error": exc.reason, "code": exc.code})
    response = http_response(status, _REASONS.get(status, "Error"), payload, "application/json")
    return response, read
