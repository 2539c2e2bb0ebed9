"""Secrets, tokens and signed links: pure functions, no I/O (README.md, "Authentication").

An app key's secret is 32 random bytes (base64url). Redis never holds it: it keeps
``secret_sha256`` (to check the secret presented to ``POST /token``) and ``link_key``, a key
derived from the secret with HMAC, to check signed links. SHA-256 rather than scrypt/PBKDF2:
the secret has 256 random bits, not a password's few, so guessing it from its hash is
hopeless anyway, while a deliberately slow hash would cost CPU on every token request.

A signed link carries ``appkey``, ``ts`` (unix seconds), ``nonce`` and ``sig`` as query
parameters::

    link_key = HMAC-SHA256(key = secret (UTF-8), message = "asrd-link-v1")
    string_to_sign = "asrd-link-v1\\n" + METHOD + "\\n" + path + "\\n" + appkey + "\\n"
                     + ts + "\\n" + nonce
    sig = lowercase hex of HMAC-SHA256(key = link_key, message = string_to_sign (UTF-8))
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from asrd.errors import AuthError

LINK_VERSION = "asrd-link-v1"
LINK_PARAMS = ("appkey", "ts", "nonce", "sig")
_NONCE = re.compile(r"[A-Za-z0-9_-]{8,64}")
_TS = re.compile(r"[0-9]{1,12}")
_SIG = re.compile(r"[0-9a-f]{64}")


def _urlsafe(nbytes: int) -> str:
    """Random base64url text that never begins with "-".

    Secrets and tokens are pasted after options (``--secret S``, ``token --revoke T``);
    argparse reads a value that begins with "-" as another option, so one draw in 64 failed.
    """
    while True:
        value = secrets.token_urlsafe(nbytes)
        if not value.startswith("-"):
            return value


def new_secret() -> str:
    return _urlsafe(32)


def new_token() -> str:
    return _urlsafe(24)


def new_nonce() -> str:
    return secrets.token_hex(16)


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def derive_link_key(secret: str) -> str:
    """The key that signs links, as hex (what Redis keeps)."""
    return hmac.new(secret.encode(), LINK_VERSION.encode(), hashlib.sha256).hexdigest()


def secret_matches(secret: str, stored_sha256: str) -> bool:
    return hmac.compare_digest(sha256_hex(secret), stored_sha256)


def string_to_sign(method: str, path: str, appkey: str, ts: str, nonce: str) -> str:
    return "\n".join((LINK_VERSION, method.upper(), path, appkey, ts, nonce))


def link_signature(
    link_key_hex: str, method: str, path: str, appkey: str, ts: str, nonce: str
) -> str:
    message = string_to_sign(method, path, appkey, ts, nonce).encode()
    return hmac.new(bytes.fromhex(link_key_hex), message, hashlib.sha256).hexdigest()


def sign_url(
    url: str,
    *,
    appkey: str,
    secret: str,
    ts: int | None = None,
    nonce: str | None = None,
    method: str = "GET",
) -> str:
    """``url`` with ``appkey``, ``ts``, ``nonce`` and ``sig`` added to its query."""
    parts = urlsplit(url)
    stamp = str(int(time.time()) if ts is None else ts)
    nonce = nonce or new_nonce()
    if not _NONCE.fullmatch(nonce):
        raise ValueError("nonce: 8 to 64 characters of A-Z a-z 0-9 _ -")
    sig = link_signature(derive_link_key(secret), method, parts.path, appkey, stamp, nonce)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in LINK_PARAMS]
    query += [("appkey", appkey), ("ts", stamp), ("nonce", nonce), ("sig", sig)]
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), parts.fragment))


@dataclass(frozen=True, slots=True)
class SignedLink:
    appkey: str
    ts: str
    nonce: str
    sig: str


def parse_link(query: dict[str, str]) -> SignedLink | None:
    """The signed link in a query, None when there is none; AuthError when malformed."""
    if "sig" not in query:
        return None
    missing = [k for k in LINK_PARAMS if not query.get(k)]
    if missing:
        raise AuthError(f"signed link: missing {', '.join(missing)}")
    link = SignedLink(query["appkey"], query["ts"], query["nonce"], query["sig"].lower())
    if not _TS.fullmatch(link.ts):
        raise AuthError("signed link: ts must be unix seconds")
    if not _NONCE.fullmatch(link.nonce):
        raise AuthError("signed link: nonce must be 8 to 64 characters of A-Z a-z 0-9 _ -")
    if not _SIG.fullmatch(link.sig):
        raise AuthError("signed link: sig must be 64 hex digits (HMAC-SHA256)")
    return link


def check_link(
    link: SignedLink, link_key_hex: str, *, method: str, path: str, now: float, ttl_s: int
) -> None:
    """Raise AuthError unless the signature is right and ``ts`` is within ``ttl_s`` of now.

    The single use of the nonce is checked by the caller, against Redis.
    """
    expected = link_signature(link_key_hex, method, path, link.appkey, link.ts, link.nonce)
    if not hmac.compare_digest(expected, link.sig):
        raise AuthError("signed link: wrong signature")
    skew = int(now) - int(link.ts)
    if abs(skew) > ttl_s:
        when = f"{skew} s old" if skew > 0 else f"{-skew} s in the future"
        raise AuthError(f"signed link: expired (ts is {when}; links are valid for {ttl_s} s)")
