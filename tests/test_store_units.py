"""Fast tests of the control plane's pure parts: signing, routing, config, the token endpoint."""

from __future__ import annotations

import base64
import json
from functools import partial
from typing import Any

import pytest
from pydantic import ValidationError

from asrd.config import (
    Config,
    ConfigError,
    DynamicConfig,
    RedisConfig,
    RoutingConfig,
    load_config,
)
from asrd.control import ConnectInfo, StaticControlPlane, embedded_routing, route_language
from asrd.errors import AuthError, InvalidParameter, ServerError
from asrd.store import signing
from asrd.store.cli import _get_path, _set_path
from asrd.store.http import handle_token_request
from asrd.store.redisstore import redacted
from asrd.store.repo import RecordItem, TokenInfo, valid_appkey

# --- signed links: the documented test vector (README.md) ----------------------------------

SECRET = "asrd-example-secret"
VECTOR_KEY = "58d07fbd72da509f72c26de8e01dd751072c62d14d56c0e81099e92d0f05a0c5"
VECTOR_SIG = "e6ab018e3a9c1cc6d410d33223e0b07748499bed7c49d55a3c4b7c67f5bc84db"


def test_signing_test_vector() -> None:
    assert signing.derive_link_key(SECRET) == VECTOR_KEY
    assert signing.string_to_sign(
        "GET", "/ws/v1", "demo-app", "1700000000", "8f14e45fceea167a"
    ) == ("asrd-link-v1\nGET\n/ws/v1\ndemo-app\n1700000000\n8f14e45fceea167a")
    sig = signing.link_signature(
        VECTOR_KEY, "GET", "/ws/v1", "demo-app", "1700000000", "8f14e45fceea167a"
    )
    assert sig == VECTOR_SIG
    url = signing.sign_url(
        "ws://127.0.0.1:8080/ws/v1",
        appkey="demo-app",
        secret=SECRET,
        ts=1700000000,
        nonce="8f14e45fceea167a",
    )
    assert url == (
        "ws://127.0.0.1:8080/ws/v1?appkey=demo-app&ts=1700000000&nonce=8f14e45fceea167a"
        f"&sig={VECTOR_SIG}"
    )


def _query(url: str) -> dict[str, str]:
    from urllib.parse import parse_qsl, urlsplit

    return dict(parse_qsl(urlsplit(url).query))


def test_check_link_refuses_wrong_signature_and_stale_or_future_ts() -> None:
    url = signing.sign_url("ws://h/ws/v1?x=1", appkey="a", secret=SECRET, ts=1000, nonce="n" * 16)
    query = _query(url)
    assert query["x"] == "1"  # other parameters are kept
    link = signing.parse_link(query)
    assert link is not None
    check = partial(signing.check_link, method="GET", path="/ws/v1", ttl_s=120)
    check(link, VECTOR_KEY, now=1000 + 120)
    check(link, VECTOR_KEY, now=1000 - 120)
    with pytest.raises(AuthError, match=r"expired.*121 s old"):
        check(link, VECTOR_KEY, now=1000 + 121)
    with pytest.raises(AuthError, match="in the future"):
        check(link, VECTOR_KEY, now=1000 - 121)
    other_key = signing.derive_link_key("another secret")
    with pytest.raises(AuthError, match="wrong signature"):
        check(link, other_key, now=1000)
    with pytest.raises(AuthError, match="wrong signature"):  # signed for another path
        signing.check_link(link, VECTOR_KEY, method="GET", path="/other", now=1000, ttl_s=120)
    for field in ("appkey", "ts", "nonce"):  # every signed field matters
        tampered = dict(query, **{field: query[field] + "0"})
        bad = signing.parse_link(tampered)
        assert bad is not None
        with pytest.raises(AuthError, match="wrong signature"):
            check(bad, VECTOR_KEY, now=1000)


def test_parse_link_names_what_is_wrong() -> None:
    assert signing.parse_link({"token": "t"}) is None
    with pytest.raises(AuthError, match="missing ts, nonce"):
        signing.parse_link({"sig": "0" * 64, "appkey": "a"})
    good = {"appkey": "a", "ts": "1", "nonce": "abcdefgh", "sig": "0" * 64}
    with pytest.raises(AuthError, match="nonce"):
        signing.parse_link({**good, "nonce": "short"})
    with pytest.raises(AuthError, match="ts"):
        signing.parse_link({**good, "ts": "yesterday"})
    with pytest.raises(AuthError, match="64 hex"):
        signing.parse_link({**good, "sig": "xyz"})
    for key in ("ts", "nonce", "sig"):  # "$" of a pattern also matches before a final newline
        with pytest.raises(AuthError, match=key if key != "sig" else "64 hex"):
            signing.parse_link({**good, key: good[key] + "\n"})


def test_a_signed_link_with_an_empty_sig_is_named_as_such() -> None:
    """``sig=`` was dropped with the query's empty values: the client was told its token was
    missing, though it sent a signed link."""
    from asrd.handshake import parse_head

    head = parse_head(b"GET /ws/v1?appkey=a&ts=1&nonce=abcdefgh&sig= HTTP/1.1\r\nHost: x")
    with pytest.raises(AuthError, match="signed link: missing sig"):
        signing.parse_link(head.query_dict())


def test_an_appkey_ends_where_its_characters_do() -> None:
    assert valid_appkey("my-app.v2_1") and not valid_appkey("my-app\n")
    assert not valid_appkey("") and not valid_appkey("x" * 65)


def test_secrets_are_checked_against_their_hash() -> None:
    secret = signing.new_secret()
    assert len(base64.urlsafe_b64decode(secret + "=")) == 32
    stored = signing.sha256_hex(secret)
    assert secret not in stored
    assert signing.secret_matches(secret, stored)
    assert not signing.secret_matches(secret + "x", stored)


def test_secrets_and_tokens_can_follow_an_option_on_the_command_line() -> None:
    # One base64url draw in 64 begins with "-", which argparse takes for an option.
    values = [signing.new_secret() for _ in range(1000)] + [
        signing.new_token() for _ in range(1000)
    ]
    assert not [v for v in values if v.startswith("-")]
    assert len(base64.urlsafe_b64decode(signing.new_token())) == 24


# --- routing and configuration ---------------------------------------------------------------


def test_route_language() -> None:
    empty = RoutingConfig()
    assert route_language(empty, "en-US", None) == ("en-US", "en-US")
    assert route_language(empty, "en-US", "fr") == ("fr", "fr")  # the language names its pool
    table = RoutingConfig.model_validate(
        {"default_language": "en-GB", "languages": {"en-GB": "english", "fr": "french"}}
    )
    assert route_language(table, "en-US", None) == ("en-GB", "english")
    assert route_language(table, "en-US", "fr") == ("fr", "french")
    with pytest.raises(InvalidParameter, match=r"unknown language 'de'.*en-GB, fr") as exc:
        route_language(table, "en-US", "de")
    assert exc.value.code == 40000003


def test_serve_routes_only_the_language_of_its_own_workers() -> None:
    served = embedded_routing(load_config(None)).routing
    assert served.languages == {"en-US": "en-US"}
    assert route_language(served, "en-US", None) == ("en-US", "en-US")
    with pytest.raises(InvalidParameter, match=r"unknown language 'fr'.*en-US"):
        route_language(served, "en-US", "fr")
    # the pool its workers were moved to
    moved = load_config(None, worker={"pool": "spare"}, routing={"workers": {"spare": "en-GB"}})
    assert embedded_routing(moved).routing.languages == {"en-GB": "en-GB"}
    # a table of its own, or a shared NATS that may carry other pools: as configured
    table = load_config(None, routing={"languages": {"fr": "french"}})
    assert embedded_routing(table).routing == table.routing
    shared = load_config(None, nats={"url": "nats://127.0.0.1:4222"})
    assert not embedded_routing(shared).routing.languages


async def test_static_control_plane_routes_from_config() -> None:
    config = load_config(
        None, routing={"languages": {"en-GB": "english", "fr": "french"}, "default_language": "fr"}
    )
    plane = StaticControlPlane(config)
    connect = ConnectInfo("GET", "/ws/v1", {}, None)
    admission = await plane.admit(connect, appkey="a", language="en-GB", session_id="s")
    assert (admission.pool, admission.language) == ("english", "en-GB")
    # No language asked for: the routing's default, which the session records as its own
    # (it recorded [server] default_language, which may name no pool at all).
    admission = await plane.admit(connect, appkey="a", language=None, session_id="s")
    assert (admission.pool, admission.language) == ("french", "fr")
    with pytest.raises(InvalidParameter):
        await plane.admit(connect, appkey="a", language="xx", session_id="s")


def test_routing_names_must_be_subject_tokens() -> None:
    for bad in ("a.b", "a b", "*", ">", "", "x" * 65):
        with pytest.raises(ValidationError):
            RoutingConfig.model_validate({"languages": {"en": bad}})
    with pytest.raises(ValidationError):
        DynamicConfig.model_validate({"routing": {}, "server": {}})  # only live sections


def test_redis_config_bounds() -> None:
    assert RedisConfig().link_ttl_s == 120 and RedisConfig().url == ""
    with pytest.raises(ValidationError, match="slot_refresh_s"):
        RedisConfig(slot_ttl_s=4, slot_refresh_s=3)
    with pytest.raises(ValidationError):
        RedisConfig(config_poll_s=2)  # changes must be picked up within a second
    # With Redis every session is authenticated, so a public address is allowed.
    cfg = load_config(None, server={"host": "0.0.0.0"}, redis={"url": "redis://r:6379/0"})
    assert cfg.server.host == "0.0.0.0"
    assert Config().redis.url == ""  # the default is the embedded control plane


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://u:secret@r:6379/0", "must start with redis://"),
        ("redis://:secret@r:port/0", "port is not a number"),
    ],
)
def test_a_redis_url_that_is_none_is_a_config_error_without_its_password(
    url: str, why: str
) -> None:
    """A config error (status 2) naming the key, not a failure to reach Redis later (1); and
    the message, which reaches logs, does not repeat the value given."""
    with pytest.raises(ConfigError, match=why) as info:
        load_config(None, redis={"url": url})
    assert "redis.url" in str(info.value) and "secret" not in str(info.value)
    for ok in ("redis://r:6379/0", "rediss://:pw@r/1", "unix:///run/redis.sock"):
        assert load_config(None, redis={"url": ok}).redis.url == ok


def test_config_paths() -> None:
    data: dict[str, Any] = {}
    _set_path(data, "routing.languages.en-GB", "english")
    _set_path(data, "routing.default_language", "en-GB")
    assert _get_path(data, "routing.languages") == {"en-GB": "english"}
    assert DynamicConfig.model_validate(data).routing.languages == {"en-GB": "english"}
    _set_path(data, "routing.languages.en-GB", None, remove=True)
    assert data["routing"]["languages"] == {}


def test_record_items_fold_counts_lost_transcripts() -> None:
    agg = RecordItem("a", "2025-01-01")
    agg.fold(RecordItem("a", "2025-01-01", sessions=1, errors=1, audio_ms=500, doc="{}"))
    agg.fold(RecordItem("a", "2025-01-01", sessions=1, audio_ms=250))
    assert (agg.sessions, agg.errors, agg.audio_ms, agg.lost_transcripts) == (2, 1, 750, 1)


# --- POST /token ---------------------------------------------------------------------------


class FakeIssuer:
    def __init__(self, fail: Exception | None = None) -> None:
        self.calls: list[tuple[str, str, int | None]] = []
        self.fail = fail

    async def issue_token_with_secret(
        self, appkey: str, secret: str, ttl_s: int | None = None
    ) -> tuple[str, TokenInfo]:
        self.calls.append((appkey, secret, ttl_s))
        if self.fail is not None:
            raise self.fail
        return "tok", TokenInfo(appkey, "id", 1000.0, 1000.0 + (ttl_s or 3600))


def _basic(user: str, password: str) -> tuple[bytes, bytes]:
    return b"authorization", b"Basic " + base64.b64encode(f"{user}:{password}".encode())


async def test_token_request_credentials_and_answers() -> None:
    issuer = FakeIssuer()
    status, body = await handle_token_request(issuer, "POST", [_basic("app", "s:e:c")], b"")
    assert status == 200
    assert json.loads(body) == {
        "token": "tok",
        "appkey": "app",
        "expires_at": 4600,
        "expires_in": 3600,
    }
    assert issuer.calls[-1] == ("app", "s:e:c", None)  # the secret may contain ':'
    payload = json.dumps({"appkey": "app", "secret": "sec", "ttl_s": 60}).encode()
    status, body = await handle_token_request(issuer, "POST", [], payload)
    assert status == 200 and json.loads(body)["expires_in"] == 60
    cases = [
        ("GET", [_basic("a", "b")], b"", 405),
        ("POST", [], b"", 401),
        ("POST", [], b"not json", 400),
        ("POST", [], b'{"appkey": "a", "secret": "b", "ttl_s": -1}', 400),
        ("POST", [(b"authorization", b"Bearer x")], b"", 401),
        ("POST", [(b"authorization", b"Basic !!!")], b"", 400),
    ]
    for method, headers, raw, expected in cases:
        status, body = await handle_token_request(issuer, method, headers, raw)
        assert status == expected, (method, headers, raw, body)
        assert json.loads(body)["error"]
    status, _ = await handle_token_request(object(), "POST", [_basic("a", "b")], b"")
    assert status == 404  # the static control plane issues no tokens
    bad = FakeIssuer(AuthError("invalid appkey or secret"))
    status, body = await handle_token_request(bad, "POST", [_basic("a", "b")], b"")
    assert status == 401 and json.loads(body)["code"] == 40000001
    down = FakeIssuer(ServerError("Redis unreachable"))
    status, body = await handle_token_request(down, "POST", [_basic("a", "b")], b"")
    assert status == 503 and json.loads(body)["code"] == 50000000


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://u:pw@h/0", "redis://u:***@h/0"),
        ("redis://h:6379/0?password=s3cret&db=1", "redis://h:6379/0?password=***&db=1"),
        ("redis://u:pw@[::1]:6379/0", "redis://u:***@[::1]:6379/0"),
        ("redis://:pw@h:notaport/0", "<a Redis URL that does not parse>"),
    ],
)
def test_redis_urls_are_shown_without_passwords(url: str, shown: str) -> None:
    assert redacted(url) == shown


async def test_a_token_request_nested_too_deep_is_a_bad_request() -> None:
    status, body = await handle_token_request(FakeIssuer(), "POST", [], b"[" * 100_000)
    assert status == 400 and json.loads(body)["error"]
