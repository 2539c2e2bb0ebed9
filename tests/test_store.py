"""The Redis control plane end to end: a real redis-server, real nats-server and pocketsphinx
workers, two gateways sharing Redis, and the ``asrd`` commands an operator would type.

Waits are for events (a reply, a count reaching a value) under hang guards, never timed.
"""

from __future__ import annotations

import base64
import json
import logging
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket

from asrd.bus.natsbus import open_nats_bus
from asrd.children import free_port
from asrd.cli import main
from asrd.client import TranscribeError, open_transcription, pcm_chunks
from asrd.config import Config, DynamicConfig, RedisConfig, RoutingConfig, WorkerConfig
from asrd.control import Admission, ConnectInfo
from asrd.engines.base import EngineFull, EngineWord, Hypothesis, Recognizer
from asrd.errors import AppKeyTokenMismatch, AuthError
from asrd.gateway import Gateway
from asrd.handshake import parse_head, split_head
from asrd.metrics import WorkerMetrics
from asrd.store import StoreUnavailable, signing
from asrd.store.follow import follow_worker_pool
from asrd.store.http import TOKEN_PATH, handle_token_request, token_endpoint
from asrd.store.plane import RedisControlPlane, open_redis_control_plane
from asrd.store.redisstore import open_redis_store
from asrd.store.repo import ConfigState, RecordItem, Repository, day_of
from asrd.worker import Worker
from tests.audio_fixtures import load_clip, silence
from tests.conftest import Nats, Pool
from tests.records import session_record
from tests.servers import redis_server, stop, wait_port
from tests.test_observability import get, metric, raw_exchange

pytestmark = pytest.mark.integration
GUARD_S = 120  # hang guards, not speed thresholds
RATE = 16000


# --- servers, gateways, clients ----------------------------------------------------------------


@pytest.fixture
def redis_url() -> Iterator[str]:
    with redis_server() as (_, url):
        yield url


class RedisProcess:
    """A redis-server with an append-only file: it can be stopped and started again on the
    same port with its data (as an operator restarting Redis would)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="asrd-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen(
            [
                binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--dir",
                self.dir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port, self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)  # SIGTERM: Redis writes its append-only file and exits
            self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def restartable_redis() -> Iterator[RedisProcess]:
    redis = RedisProcess()
    try:
        yield redis
    finally:
        redis.close()


@dataclass
class RedisGateway:
    gateway: Gateway
    url: str
    port: int
    plane: RedisControlPlane


def gateway_config(nats_url: str, pool: Pool, redis_url: str, **redis: Any) -> Config:
    return Config.model_validate(
        {
            "server": {"port": 0, "default_language": pool.name},
            "nats": {"url": nats_url},
            "redis": {"url": redis_url, **redis},
        }
    )


@asynccontextmanager
async def open_redis_gateway(
    nats_url: str, pool: Pool, redis_url: str, **redis: Any
) -> AsyncIterator[RedisGateway]:
    config = gateway_config(nats_url, pool, redis_url, **redis)
    async with (
        open_nats_bus(config.nats, nats_url, name="test-gateway") as bus,
        open_redis_control_plane(config) as plane,
    ):
        gw = Gateway(config, bus, plane)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(partial(gw.serve, wait_for_workers=len(pool.workers)))
            yield RedisGateway(gw, f"ws://127.0.0.1:{port}/ws/v1", port, plane)
            gw.stop_requested.set()


@asynccontextmanager
async def open_repo(url: str, **redis: Any) -> AsyncIterator[Repository]:
    config = RedisConfig(url=url, **redis)
    async with open_redis_store(config) as store:
        yield Repository(store, config)


def exit_status(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse refused an argument
        return int(exc.code or 0)


async def asrd(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Run an ``asrd`` command (it calls trio.run, so in a thread); its exit status and stdout."""
    status, out, _ = await asrd_err(capsys, *argv)
    return status, out


async def asrd_err(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """:func:`asrd`, with stderr."""
    capsys.readouterr()
    status = await trio.to_thread.run_sync(exit_status, list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def start_command(task_id: str, appkey: str, **payload: Any) -> str:
    return json.dumps(
        {
            "header": {
                "message_id": uuid.uuid4().hex,
                "task_id": task_id,
                "namespace": "SpeechTranscriber",
                "name": "StartTranscription",
                "appkey": appkey,
            },
            "payload": payload,
        }
    )


async def start_reply(
    url: str, appkey: str, token: str | None = None, **payload: Any
) -> dict[str, Any]:
    """Send StartTranscription; the server's answer (TranscriptionStarted or TaskFailed)."""
    headers = [(b"X-NLS-Token", token.encode())] if token else []
    with trio.fail_after(GUARD_S):
        async with trio_websocket.open_websocket_url(url, extra_headers=headers) as ws:
            await ws.send_message(start_command(uuid.uuid4().hex, appkey, **payload))
            reply: dict[str, Any] = json.loads(await ws.get_message())
            return reply


def status_of(reply: dict[str, Any]) -> int:
    header = reply["header"]
    return 20000000 if header["name"] == "TranscriptionStarted" else int(header["status"])


async def started(url: str, appkey: str, token: str | None = None, **payload: Any) -> bool:
    reply = await start_reply(url, appkey, token, **payload)
    assert reply["header"]["name"] in ("TranscriptionStarted", "TaskFailed"), reply
    return bool(reply["header"]["name"] == "TranscriptionStarted")


async def eventually(check: Callable[[], Awaitable[bool]], poll_s: float = 0.1) -> None:
    with trio.fail_after(GUARD_S):
        while not await check():  # noqa: ASYNC110 - state in other processes and in Redis
            await trio.sleep(poll_s)


@asynccontextmanager
async def held_session(
    url: str, appkey: str, token: str | None
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A started session kept open; leaving hangs up (no Stop)."""
    headers = [(b"X-NLS-Token", token.encode())] if token else []
    async with trio_websocket.open_websocket_url(
        url, extra_headers=headers, connect_timeout=GUARD_S, disconnect_timeout=GUARD_S
    ) as ws:
        await ws.send_message(start_command(uuid.uuid4().hex, appkey))
        with trio.fail_after(GUARD_S):
            reply = json.loads(await ws.get_message())
        assert reply["header"]["name"] == "TranscriptionStarted", reply
        yield ws


@dataclass
class LiveSession:
    """A session that streams silence at real time until :meth:`finish`, then a clip and Stop."""

    url: str
    appkey: str
    token: str | None
    pcm: bytes
    events: list[dict[str, Any]] = field(default_factory=list)
    task_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    go: trio.Event = field(default_factory=trio.Event)
    done: trio.Event = field(default_factory=trio.Event)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        headers = [(b"X-NLS-Token", self.token.encode())] if self.token else []
        try:
            async with trio_websocket.open_websocket_url(self.url, extra_headers=headers) as ws:
                await ws.send_message(start_command(self.task_id, self.appkey))
                first = json.loads(await ws.get_message())
                assert first["header"]["name"] == "TranscriptionStarted", first
                task_status.started()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._receive, ws, nursery.cancel_scope)
                    while not self.go.is_set():
                        await ws.send_message(silence(100, RATE))
                        await trio.sleep(0.1)
                    for i in range(0, len(self.pcm), 3200):
                        await ws.send_message(self.pcm[i : i + 3200])
                    stop = json.loads(start_command(self.task_id, self.appkey))
                    stop["header"]["name"] = "StopTranscription"
                    del stop["payload"]
                    await ws.send_message(json.dumps(stop))
                    await trio.sleep_forever()
        finally:
            self.done.set()

    async def _receive(
        self, ws: trio_websocket.WebSocketConnection, scope: trio.CancelScope
    ) -> None:
        while True:
            msg = json.loads(await ws.get_message())
            self.events.append(msg)
            if msg["header"]["name"] in ("TranscriptionCompleted", "TaskFailed"):
                scope.cancel()
                return

    async def finish(self) -> list[dict[str, Any]]:
        self.go.set()
        with trio.fail_after(GUARD_S):
            await self.done.wait()
        return self.events


def text_of(events: list[dict[str, Any]]) -> str:
    return " ".join(e["payload"]["result"] for e in events if e["header"]["name"] == "SentenceEnd")


def clip() -> bytes:
    return load_clip("0880") + silence(1200, RATE)


async def transcribe(url: str, appkey: str, token: str) -> tuple[str, list[dict[str, Any]]]:
    """A whole session; its task id and events."""
    events = []
    with trio.fail_after(GUARD_S):
        async with open_transcription(
            url, pcm_chunks(clip()), RATE, token=token, appkey=appkey, realtime=False
        ) as tr:
            async for event in tr:
                events.append(event)
    assert events[-1]["header"]["name"] == "TranscriptionCompleted", events[-1]
    return events[0]["header"]["task_id"], events


async def redis_dump(url: str) -> str:
    """Every key and value in Redis, as text."""
    async with open_repo(url) as repo:
        out = []
        for key in await repo.store.execute("KEYS", "*"):
            kind = await repo.store.execute("TYPE", key)
            if kind == "string":
                value: Any = await repo.store.execute("GET", key)
            elif kind == "hash":
                value = await repo.store.execute("HGETALL", key)
            elif kind == "set":
                value = await repo.store.execute("SMEMBERS", key)
            else:
                value = await repo.store.execute("ZRANGE", key, 0, -1, "WITHSCORES")
            out.append(f"{key} {value}")
        return "\n".join(out)


# --- 1. app keys ----------------------------------------------------------------------------


async def test_key_lifecycle_with_the_cli(
    nats: Nats, pool: Pool, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    r = ("--redis-url", redis_url)
    status, out = await asrd(capsys, "keys", "create", "app1", "--max-sessions", "3", "--json", *r)
    assert status == 0
    created = json.loads(out)
    secret = created["secret"]
    assert created["status"] == "active" and created["max_sessions"] == 3
    assert len(secret) >= 43
    # Redis holds a hash of the secret, never the secret.
    assert secret not in await redis_dump(redis_url)
    assert signing.sha256_hex(secret) in await redis_dump(redis_url)
    status, out, err = await asrd_err(capsys, "keys", "create", "app1", *r)
    assert status == 1 and "already exists" in err  # a conflict, as not found is: not 2
    assert not out  # no new secret, and the key keeps its own
    assert signing.sha256_hex(secret) in await redis_dump(redis_url)
    status, _ = await asrd(capsys, "keys", "create", "apps", *r)
    assert status == 2  # reserved: its usage hash would be the set of all keys with usage

    status, out = await asrd(capsys, "keys", "list", "--json", *r)
    assert [k["appkey"] for k in json.loads(out)] == ["app1"]
    assert "secret" not in out and "link_key" not in out

    for ttl in ("0", "3601"):  # beyond [redis] token_ttl_s, or none at all
        status, _ = await asrd(capsys, "token", "app1", "--ttl", ttl, *r)
        assert status == 2
    status, out = await asrd(capsys, "token", "app1", "--ttl", "60", "--json", *r)
    assert 55 <= json.loads(out)["expires_at"] - time.time() <= 60
    assert json.loads(out)["expires_in"] == 60  # as POST /token answers
    status, out = await asrd(capsys, "token", "app1", "--json", *r)
    token = json.loads(out)["token"]
    async with open_redis_gateway(nats.url, pool, redis_url) as gw:
        assert await started(gw.url, "app1", token)

        assert (await asrd(capsys, "keys", "disable", "app1", *r))[0] == 0
        reply = await start_reply(gw.url, "app1", token)
        assert status_of(reply) == 40000001 and "disabled" in reply["header"]["status_text"]
        status, _ = await asrd(capsys, "token", "app1", *r)
        assert status == 1  # no tokens for a disabled key

        assert (await asrd(capsys, "keys", "enable", "app1", *r))[0] == 0
        assert await started(gw.url, "app1", token)

        status, out = await asrd(
            capsys, "keys", "update", "app1", "--transcripts", "off", "--max-sessions", "5", *r
        )
        assert status == 0
        status, out = await asrd(capsys, "keys", "show", "app1", "--json", *r)
        shown = json.loads(out)
        assert shown["record_transcripts"] is False and shown["max_sessions"] == 5
        assert shown["active"] == 0

        assert (await asrd(capsys, "keys", "delete", "app1", *r))[0] == 0
        assert status_of(await start_reply(gw.url, "app1", token)) == 40020105
        assert (await asrd(capsys, "keys", "show", "app1", *r))[0] == 1
        # A key created again under the same name does not revive the old tokens.
        assert (await asrd(capsys, "keys", "create", "app1", *r))[0] == 0
        reply = await start_reply(gw.url, "app1", token)
        assert status_of(reply) == 40000001


async def test_languages_of_a_key_must_be_languages(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A --languages that names none allowed every language: the opposite of restricting."""
    r = ("--redis-url", redis_url)
    for value in ("", ",", " , ", "en US", "en-US,a.b"):
        assert (await asrd(capsys, "keys", "create", "k", "--languages", value, *r))[0] == 2
    assert (await asrd(capsys, "keys", "show", "k", *r))[0] == 1  # never created
    status, out = await asrd(capsys, "keys", "create", "k", "--languages", "en-US", "--json", *r)
    assert status == 0 and json.loads(out)["languages"] == ["en-US"]
    for value in ("", ","):
        assert (await asrd(capsys, "keys", "update", "k", "--languages", value, *r))[0] == 2
    status, out = await asrd(capsys, "keys", "show", "k", "--json", *r)
    assert json.loads(out)["languages"] == ["en-US"]
    assert (await asrd(capsys, "keys", "update", "k", "--all-languages", *r))[0] == 0
    status, out = await asrd(capsys, "keys", "show", "k", "--json", *r)
    assert json.loads(out)["languages"] == []


async def test_commands_missing_what_to_act_on_are_invalid_input(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """README: status 2 for invalid input; these said 1, as for a failure."""
    r = ("--redis-url", redis_url)
    assert (await asrd(capsys, "token", *r))[0] == 2
    assert (await asrd(capsys, "transcript", *r))[0] == 2
    for limit in ("0", "-1"):  # Redis: LIMIT 0 0 lists nothing, LIMIT 0 -1 everything
        assert (await asrd(capsys, "transcript", "--appkey", "k", "--limit", limit, *r))[0] == 2
    # an empty --revoke is a token that does not exist, not a missing APPKEY
    status, _, err = await asrd_err(capsys, "token", "--revoke", "", *r)
    assert status == 1 and "no such token" in err
    # options that would be ignored
    status, _, err = await asrd_err(capsys, "token", "k", "--revoke", "t", *r)
    assert status == 2 and "takes no APPKEY" in err
    for option in (("--limit", "5"), ("--since", "2026-01-01")):
        status, _, err = await asrd_err(capsys, "transcript", "0" * 32, *option, *r)
        assert status == 2 and "--appkey" in err


async def test_not_found_already_exists_and_redis_unreachable_fail_with_1(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """README: 1 for a command that failed on what Redis holds or on Redis itself, whichever
    keys or config command it is; 2 is for invalid input only."""
    r = ("--redis-url", redis_url)
    assert (await asrd(capsys, "keys", "create", "there", *r))[0] == 0
    failing = [
        ("keys", "create", "there"),
        ("keys", "show", "nope"),
        ("keys", "update", "nope", "--max-sessions", "1"),
        ("keys", "disable", "nope"),
        ("keys", "enable", "nope"),
        ("keys", "delete", "nope"),
        ("token", "nope"),
        ("token", "--revoke", "made-up"),
        ("config", "get", "routing.languages"),  # no live configuration at all
        ("config", "unset", "routing.languages"),
        ("transcript", "0" * 32),
    ]
    for argv in failing:
        status, _, err = await asrd_err(capsys, *argv, *r)
        assert status == 1 and err.startswith("asrd: "), (argv, status, err)
    down = ("--redis-url", f"redis://127.0.0.1:{free_port()}/0")
    for argv in [
        ("keys", "list"),
        ("keys", "create", "new"),
        ("keys", "show", "there"),
        ("keys", "delete", "there"),
        ("token", "there"),
        ("config", "show"),
        ("config", "set", "routing.default_language", "en-GB"),
        ("config", "reset"),
        ("usage",),
        ("transcript", "0" * 32),
    ]:
        status, _, err = await asrd_err(capsys, *argv, *down)
        assert status == 1 and "unreachable" in err, (argv, status, err)


# --- 2. tokens --------------------------------------------------------------------------------


async def token_server(
    plane: RedisControlPlane, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serves TOKEN_PATH exactly as the gateway's hook does (read head, token_endpoint)."""

    async def handler(stream: trio.SocketStream) -> None:
        buffer = b""
        while (parts := split_head(buffer)) is None:
            buffer += await stream.receive_some(4096)
        head = parse_head(parts[0])
        assert head.path == TOKEN_PATH
        await stream.send_all((await token_endpoint(plane, stream, head, parts[1]))[0])
        await stream.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(trio.serve_listeners, handler, listeners))
        task_status.started(listeners[0].socket.getsockname()[1])


def post_token(port: int, appkey: str, secret: str, body: bytes = b"") -> tuple[int, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{TOKEN_PATH}",
        data=body,
        method="POST",
        headers={
            "Authorization": "Basic " + base64.b64encode(f"{appkey}:{secret}".encode()).decode(),
            "Content-Type": "application/json",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=GUARD_S) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def test_a_token_request_with_a_body_too_large_gets_its_answer(
    nats: Nats, pool: Pool, redis_url: str
) -> None:
    """413 (and 411) are answered before the body is read: the gateway drains it before it
    closes, or the close would be a reset that loses the answer."""
    async with open_redis_gateway(nats.url, pool, redis_url) as gw:
        head = b"POST " + TOKEN_PATH.encode()
        answer = await trio.to_thread.run_sync(raw_exchange, gw.port, head, 256 * 1024)
        assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"].startswith("body larger")


async def test_tokens_expire_are_revoked_and_belong_to_their_key(
    nats: Nats, pool: Pool, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async with open_repo(redis_url) as repo:
        app_a, secret_a = await repo.create_app("app-a")
        app_b, _ = await repo.create_app("app-b")
        short, info = await repo.issue_token(app_a, 1)
        assert info.expires_at - info.issued_at == 1
        token_b, _ = await repo.issue_token(app_b, 600)
    async with open_redis_gateway(nats.url, pool, redis_url) as gw:
        assert await started(gw.url, "app-a", short)

        async def refused() -> bool:
            return status_of(await start_reply(gw.url, "app-a", short)) == 40000001

        await eventually(refused)  # expired (Redis dropped it after its TTL)

        missing = await start_reply(gw.url, "app-a", None)
        assert status_of(missing) == 40000001
        assert "token missing" in missing["header"]["status_text"]
        assert status_of(await start_reply(gw.url, "app-a", "made-up")) == 40000001
        foreign = await start_reply(gw.url, "app-a", token_b)  # app-b's token
        assert status_of(foreign) == 40020106
        assert status_of(await start_reply(gw.url, "nobody", token_b)) == 40020105

        # POST /token: the app trades its secret for a token, usable as ?token=
        async with trio.open_nursery() as nursery:
            port = await nursery.start(token_server, gw.plane)
            code, body = await trio.to_thread.run_sync(post_token, port, "app-a", secret_a)
            assert code == 200 and body["appkey"] == "app-a"
            assert body["expires_in"] == 3600
            assert await started(f"{gw.url}?token={body['token']}", "app-a", None)
            code, body = await trio.to_thread.run_sync(
                post_token, port, "app-a", secret_a, b'{"ttl_s": 60}'
            )
            assert code == 200 and body["expires_in"] == 60
            code, body = await trio.to_thread.run_sync(post_token, port, "app-a", "wrong")
            assert code == 401 and body["code"] == 40000001
            code, body = await trio.to_thread.run_sync(post_token, port, "nobody", secret_a)
            assert code == 401
            nursery.cancel_scope.cancel()

        # `asrd token` issues; `asrd token --revoke` revokes at once.
        status, out = await asrd(capsys, "token", "app-a", "--redis-url", redis_url)
        token = out.strip()
        assert status == 0 and await started(gw.url, "app-a", token)
        status, _ = await asrd(capsys, "token", "--revoke", token, "--redis-url", redis_url)
        assert status == 0
        revoked = await start_reply(gw.url, "app-a", token)
        assert status_of(revoked) == 40000001
        assert "revoked" in revoked["header"]["status_text"]


async def test_a_token_request_for_longer_than_token_ttl_s_is_refused_not_cut_down(
    redis_url: str,
) -> None:
    """POST /token with a ttl_s beyond [redis] token_ttl_s got a token of token_ttl_s, with
    200: an app that did not read expires_in held a token shorter than it asked for."""
    config = Config.model_validate({"redis": {"url": redis_url, "token_ttl_s": 600}})
    async with open_repo(redis_url) as repo:
        _, secret = await repo.create_app("long")
    credentials = [(b"authorization", b"Basic " + base64.b64encode(f"long:{secret}".encode()))]
    async with open_redis_control_plane(config) as plane:
        for ttl in (601, 86400):
            body = json.dumps({"ttl_s": ttl}).encode()
            status, answer = await handle_token_request(plane, "POST", credentials, body)
            assert status == 400, answer
            assert "ttl_s must be 1 to 600" in json.loads(answer)["error"]
        status, answer = await handle_token_request(plane, "POST", credentials, b'{"ttl_s": 600}')
        assert status == 200 and json.loads(answer)["expires_in"] == 600
        status, answer = await handle_token_request(plane, "POST", credentials, b"")
        assert status == 200 and json.loads(answer)["expires_in"] == 600  # the default
        async with open_repo(redis_url) as repo:
            assert len(await repo.store.execute("KEYS", repo.keys.token("*"))) == 2


# --- 3. signed links --------------------------------------------------------------------------


async def test_signed_link_is_single_use_and_checked(
    nats: Nats, pool: Pool, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async with open_repo(redis_url) as repo:
        _, secret = await repo.create_app("linked")
        await repo.create_app("other")
    async with open_redis_gateway(nats.url, pool, redis_url, link_ttl_s=120) as gw:
        status, out = await asrd(
            capsys, "sign-url", gw.url, "--appkey", "linked", "--secret", secret
        )
        link = out.strip()
        assert status == 0 and "sig=" in link
        assert await started(link, "linked")

        replay = await start_reply(link, "linked")
        assert status_of(replay) == 40000001
        assert "already used" in replay["header"]["status_text"]

        stale = signing.sign_url(gw.url, appkey="linked", secret=secret, ts=int(time.time()) - 600)
        reply = await start_reply(stale, "linked")
        assert status_of(reply) == 40000001 and "expired" in reply["header"]["status_text"]

        forged = signing.sign_url(gw.url, appkey="linked", secret="not-the-secret")
        reply = await start_reply(forged, "linked")
        assert status_of(reply) == 40000001
        assert "wrong signature" in reply["header"]["status_text"]
        # A link cannot probe which keys exist: an unknown one gets the same answer.
        probe = signing.sign_url(gw.url, appkey="nosuchkey", secret="guess")
        reply = await start_reply(probe, "nosuchkey")
        assert status_of(reply) == 40000001
        assert reply["header"]["status_text"] == "signed link: wrong signature"

        fresh = signing.sign_url(gw.url, appkey="linked", secret=secret)
        assert status_of(await start_reply(fresh, "other")) == 40020106  # header names another
        # ... and that refusal did not use the link up.
        assert await started(fresh, "linked")


async def test_sign_url_refuses_what_no_gateway_would_accept(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, secret = "ws://127.0.0.1:1/ws/v1", "s" * 43
    for bad in (
        ("--appkey", "my app"),
        ("--appkey", "apps"),
        ("--ts", "-5"),
        ("--ts", str(10**12)),
    ):
        options = {"--appkey": "my-app", "--ts": "1700000000"} | dict([bad])
        argv = [a for kv in options.items() for a in kv]
        status, out = await asrd(capsys, "sign-url", url, "--secret", secret, *argv)
        assert (status, out) == (2, ""), bad
    status, out = await asrd(
        capsys, "sign-url", url, "--secret", secret, "--appkey", "my-app", "--ts", "0"
    )
    assert status == 0 and "&ts=0&" in out


# --- 4. dynamic routing --------------------------------------------------------------------


async def test_routing_change_is_picked_up_live_without_disturbing_sessions(
    nats: Nats, pool: Pool, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async with open_repo(redis_url) as repo:
        app, _ = await repo.create_app("router")
        token, _ = await repo.issue_token(app, 3600)
    r = ("--redis-url", redis_url)
    async with open_redis_gateway(nats.url, pool, redis_url) as gw:
        # No routing table yet: a language names its pool, and nobody serves "fr".
        assert status_of(await start_reply(gw.url, "router", token, language="fr")) == 50000000
        live = LiveSession(gw.url, "router", token, clip())
        async with trio.open_nursery() as nursery:
            await nursery.start(live.run)

            status, _ = await asrd(
                capsys, "config", "set", "routing.languages", json.dumps({pool.name: pool.name}), *r
            )
            assert status == 0

            async def fr_unknown() -> bool:
                reply = await start_reply(gw.url, "router", token, language="fr")
                return status_of(reply) == 40000003

            await eventually(fr_unknown)
            reply = await start_reply(gw.url, "router", token, language="fr")
            assert "unknown language 'fr'" in reply["header"]["status_text"]

            assert (await asrd(capsys, "config", "set", "routing.languages.fr", pool.name, *r))[
                0
            ] == 0
            await eventually(partial(started, gw.url, "router", token, language="fr"))

            # An invalid value is refused by the same model that validates config.toml.
            status, _ = await asrd(capsys, "config", "set", "routing.languages.de", "a.b", *r)
            assert status == 2
            status, _ = await asrd(capsys, "config", "set", "routing", "{}", *r)
            assert status == 2  # not section.key: invalid input too
            status, out = await asrd(capsys, "config", "get", "routing.languages", *r)
            assert json.loads(out) == {pool.name: pool.name, "fr": pool.name}

            # The session that ran through all of this is undisturbed.
            events = await live.finish()
            assert events[-1]["header"]["name"] == "TranscriptionCompleted", events[-1]
            assert "man" in text_of(events)

        assert (await asrd(capsys, "config", "reset", *r))[0] == 0

        async def back_to_toml() -> bool:  # no table again: "fr" names a pool nobody serves
            reply = await start_reply(gw.url, "router", token, language="fr")
            return status_of(reply) == 50000000

        await eventually(back_to_toml)


class FakeRecognizer:
    final_cost = 0.0
    early_final = False
    state = ""

    def start(self) -> None:
        pass

    def accept(self, pcm: bytes) -> None:
        pass

    def partial(self) -> Hypothesis | None:
        return None

    def pause(self) -> None:
        pass

    def finish(self) -> Hypothesis:
        return Hypothesis(
            "hello world", (EngineWord("hello", 0, 300), EngineWord("world", 300, 600)), 0.9
        )


class FakeEngine:
    name = "fake"
    early_final = False

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.taken = 0

    def acquire(self, sample_rate: int, *, partials: bool = True, state: str = "") -> Recognizer:
        if self.taken >= self.capacity:
            raise EngineFull("full")
        self.taken += 1
        return FakeRecognizer()

    def release(self, recognizer: Recognizer) -> None:
        self.taken -= 1


async def test_workers_follow_the_live_routing(nats: Nats, pool: Pool, redis_url: str) -> None:
    """A worker started as pool "spare-q" is moved to "live-q" by the live routing, and a
    language routed to "live-q" reaches it, with no restart of anything."""
    async with open_repo(redis_url) as repo:
        app, _ = await repo.create_app("mover")
        token, _ = await repo.issue_token(app, 3600)
        await repo.save_config(
            DynamicConfig(routing=RoutingConfig(languages={pool.name: pool.name, "zz": "live-q"}))
        )
        config = gateway_config(nats.url, pool, redis_url).model_copy(
            update={"worker": WorkerConfig(pool="spare-q", decoders=1)}
        )
        async with (
            open_nats_bus(config.nats, nats.url, name="test-worker") as bus,
            open_redis_gateway(nats.url, pool, redis_url) as gw,
            trio.open_nursery() as nursery,
        ):
            worker = Worker(config.worker, config.nats.subject_prefix, bus, FakeEngine(1))
            await nursery.start(worker.run)
            await nursery.start(follow_worker_pool, config, worker)
            # "zz" is routed, but no worker serves "live-q" yet.
            assert status_of(await start_reply(gw.url, "mover", token, language="zz")) == 50000000

            await repo.save_config(
                DynamicConfig(
                    routing=RoutingConfig(
                        languages={pool.name: pool.name, "zz": "live-q"},
                        workers={"spare-q": "live-q"},
                    )
                )
            )

            async def moved() -> bool:
                return worker.config.pool == "live-q"

            await eventually(moved)
            events: list[dict[str, Any]] = []
            with trio.fail_after(GUARD_S):
                while True:
                    try:
                        async with open_transcription(
                            gw.url,
                            pcm_chunks(clip()),
                            RATE,
                            token=token,
                            appkey="mover",
                            realtime=False,
                            params={"language": "zz"},
                        ) as tr:
                            events = [e async for e in tr]
                        break
                    except TranscribeError as exc:  # the gateway has not heard its beat yet
                        assert exc.code == 50000000, exc
                        await trio.sleep(0.1)
            assert "hello world" in text_of(events).lower()
            nursery.cancel_scope.cancel()


async def test_a_worker_following_the_routing_counts_redis_errors_and_reconnects(
    nats: Nats, pool: Pool, restartable_redis: RedisProcess
) -> None:
    """The worker's /metrics: failed Redis commands while Redis is away, a reconnect after."""
    redis = restartable_redis
    redis.start()
    config = gateway_config(nats.url, pool, redis.url, config_poll_s=0.1).model_copy(
        update={"worker": WorkerConfig(pool="follow-q", decoders=1)}
    )
    async with (
        open_nats_bus(config.nats, nats.url, name="test-worker") as bus,
        trio.open_nursery() as nursery,
    ):
        worker = Worker(config.worker, config.nats.subject_prefix, bus, FakeEngine(1))
        await nursery.start(follow_worker_pool, config, worker)

        def sample(name: str) -> float:
            return metric(worker.metrics.registry.render().decode(), name)

        await trio.sleep(0.5)  # a few polls
        errors0 = sample("asrd_redis_errors_total")  # 0 unless Redis was still LOADING
        reconnects0 = sample("asrd_redis_reconnects_total")
        redis.stop()

        async def failing() -> bool:
            return sample("asrd_redis_errors_total") >= errors0 + 2

        await eventually(failing)
        assert sample("asrd_redis_reconnects_total") == reconnects0
        redis.start()

        async def reconnected() -> bool:
            return sample("asrd_redis_reconnects_total") > reconnects0

        await eventually(reconnected)
        nursery.cancel_scope.cancel()


async def test_config_commands_on_an_invalid_stored_document(
    redis_url: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Gateways ignore such a document and keep their routing: ``show`` said there was none
    and config.toml applied (status 0), ``set`` silently replaced it with the one key set."""
    r = ("--redis-url", redis_url)
    stored = '{"routing": {"languages": 5, "default_language": "en-GB"}}'
    await set_stored_config(redis_url, stored)
    for argv in (
        ("show",),
        ("get", "routing.default_language"),
        ("set", "routing.workers.spare", "en-US"),
        ("unset", "routing.default_language"),
    ):
        status, out, err = await asrd_err(capsys, "config", *argv, *r)
        assert (status, out) == (1, ""), argv
        assert "invalid" in err and "config.toml" not in err
    async with open_repo(redis_url) as repo:
        assert await repo.store.execute("GET", repo.keys.config) == stored  # untouched
    # load and reset replace it
    (tmp_path / "live.toml").write_text('[routing]\ndefault_language = "en-GB"\n')
    assert (await asrd(capsys, "config", "load", str(tmp_path / "live.toml"), *r))[0] == 0
    status, out = await asrd(capsys, "config", "get", "routing.default_language", *r)
    assert (status, json.loads(out)) == (0, "en-GB")
    await set_stored_config(redis_url, "not json")
    assert (await asrd(capsys, "config", "reset", *r))[0] == 0
    status, out = await asrd(capsys, "config", "show", *r)
    assert (status, out) == (0, "")


async def set_stored_config(url: str, raw: str) -> None:
    async with open_repo(url) as repo:
        await repo.store.execute("SET", repo.keys.config, raw)


async def test_a_config_change_between_the_read_and_the_write_is_kept(
    redis_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``set`` and ``unset`` read the document, change one key and write it back: another
    change landing in between was overwritten (the revision counted it, the document lost
    it). Now the write is refused and the command redoes its change on the new document."""
    r = ("--redis-url", redis_url)
    read = Repository.load_config
    races: list[DynamicConfig] = []

    async def read_then_race(repo: Repository) -> ConfigState:
        state = await read(repo)
        if races:
            await repo.save_config(races.pop())  # another operator's change lands now
        return state

    monkeypatch.setattr(Repository, "load_config", read_then_race)
    races.append(DynamicConfig(routing=RoutingConfig(languages={"a": "pa"})))
    assert (await asrd(capsys, "config", "set", "routing.languages.b", "pb", *r))[0] == 0
    async with open_repo(redis_url) as repo:
        state = await read(repo)
    assert state.doc is not None and state.doc.routing.languages == {"a": "pa", "b": "pb"}
    assert state.rev == "2"

    races.append(DynamicConfig(routing=RoutingConfig(languages={"a": "pa", "b": "pb", "c": "pc"})))
    assert (await asrd(capsys, "config", "unset", "routing.languages.a", *r))[0] == 0
    async with open_repo(redis_url) as repo:
        state = await read(repo)
    assert state.doc is not None and state.doc.routing.languages == {"b": "pb", "c": "pc"}
    assert state.rev == "4"


async def test_concurrent_config_changes_all_land(redis_url: str) -> None:
    """Changes of different keys at once (operators, scripts): every one is kept, and the
    revision counts each of them."""
    n = 8

    def setting(i: int) -> Callable[[ConfigState], DynamicConfig]:
        def change(state: ConfigState) -> DynamicConfig:
            languages = state.doc.routing.languages if state.doc else {}
            return DynamicConfig(routing=RoutingConfig(languages={**languages, f"l{i}": f"p{i}"}))

        return change

    async with open_repo(redis_url) as repo, trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(repo.change_config, setting(i))
    async with open_repo(redis_url) as repo:
        state = await repo.load_config()
    assert state.doc is not None
    assert state.doc.routing.languages == {f"l{i}": f"p{i}" for i in range(n)}
    assert state.rev == str(n)


@pytest.mark.parametrize("action", [("set", "routing.default_language", "xx"), ("reset",)])
async def test_a_foreign_config_rev_fails_a_change_before_anything_is_written(
    redis_url: str, capsys: pytest.CaptureFixture[str], action: tuple[str, ...]
) -> None:
    """A revision that cannot count (not an integer, or not a string) fails the change, and
    the document is untouched: stored without its revision bumped, no gateway would see it."""
    r = ("--redis-url", redis_url)
    stored = '{"routing": {"default_language": "en-GB"}}'
    await set_stored_config(redis_url, stored)
    async with open_repo(redis_url) as repo:
        for foreign in (
            ("SET", repo.keys.config_rev, "x1"),
            ("HSET", repo.keys.config_rev, "a", "1"),
        ):
            await repo.store.execute("DEL", repo.keys.config_rev)
            await repo.store.execute(*foreign)
            status, _, err = await asrd_err(capsys, "config", *action, *r)
            assert status == 1 and repo.keys.config_rev in err, err
            assert await repo.store.execute("GET", repo.keys.config) == stored


async def break_live_config(repo: Repository, key: str) -> None:
    """A foreign value (a hash) under ``key``, with a revision the pollers have not seen."""
    await repo.store.execute("DEL", key)
    await repo.store.execute("HSET", key, "a", "1")
    if key != repo.keys.config_rev:
        await repo.store.execute("INCR", repo.keys.config_rev)


async def repair_live_config(repo: Repository, key: str) -> None:
    """As an operator would: the foreign value removed, the revision past any seen."""
    await repo.store.execute("DEL", key)
    await repo.store.execute("SET", repo.keys.config_rev, "100")


def warnings_and_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("foreign", ["config_rev", "config"])
async def test_an_unreadable_live_config_is_logged_once_and_the_routing_kept(
    redis_url: str, caplog: pytest.LogCaptureFixture, foreign: str
) -> None:
    """A foreign value under the live configuration's keys failed every config poll (twice a
    second) with an ERROR line. One line when it starts, one when it ends; the routing loaded
    last stays, and the polls go on: a change saved after the repair is picked up."""
    config = Config.model_validate({"redis": {"url": redis_url, "config_poll_s": 0.05}})
    caplog.set_level(logging.INFO, logger="asrd.store")
    good = RoutingConfig(languages={"en-US": "en-US"})
    async with open_repo(redis_url) as repo:
        key = getattr(repo.keys, foreign)
        await repo.save_config(DynamicConfig(routing=good))
        async with open_redis_control_plane(config) as plane:
            assert plane.routing == good
            errors0 = plane.redis_errors
            await break_live_config(repo, key)

            async def polled_a_while() -> bool:
                return plane.redis_errors >= errors0 + 10

            await eventually(polled_a_while, poll_s=0.01)
            assert plane.routing == good and plane.available
            await repair_live_config(repo, key)
            await repo.save_config(DynamicConfig(routing=RoutingConfig(default_language="en-US")))

            async def changed() -> bool:
                return plane.routing.default_language == "en-US"

            await eventually(changed, poll_s=0.01)
    lines = warnings_and_errors(caplog)
    assert len(lines) == 2, lines
    assert key in lines[0] and "WRONGTYPE" in lines[0], lines
    assert "read again" in lines[1], lines


class PoolRecorder:
    def __init__(self) -> None:
        self.metrics = WorkerMetrics()
        self.pools: list[str] = []

    async def set_pool(self, pool: str) -> None:
        self.pools.append(pool)


async def test_a_worker_logs_an_unreadable_live_config_once(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """As the gateway: a worker following the routing logged every poll of a foreign value."""
    config = Config.model_validate(
        {"redis": {"url": redis_url, "config_poll_s": 0.05}, "worker": {"pool": "spare"}}
    )
    caplog.set_level(logging.INFO, logger="asrd.store")
    worker = PoolRecorder()
    async with open_repo(redis_url) as repo, trio.open_nursery() as nursery:
        await nursery.start(follow_worker_pool, config, worker)

        async def first_poll() -> bool:
            return worker.pools == ["spare"]

        await eventually(first_poll, poll_s=0.01)
        errors = worker.metrics.redis_errors.fn
        assert errors is not None
        errors0 = errors()
        await break_live_config(repo, repo.keys.config_rev)

        async def polled_a_while() -> bool:
            return errors() >= errors0 + 10

        await eventually(polled_a_while, poll_s=0.01)
        await repair_live_config(repo, repo.keys.config_rev)
        await repo.save_config(DynamicConfig(routing=RoutingConfig(workers={"spare": "live"})))

        async def moved() -> bool:
            return worker.pools[-1:] == ["live"]

        await eventually(moved, poll_s=0.01)
        nursery.cancel_scope.cancel()
    lines = warnings_and_errors(caplog)
    assert len(lines) == 2, lines
    assert repo.keys.config_rev in lines[0] and "read again" in lines[1], lines


# --- 5. admission across gateways ----------------------------------------------------------------


async def test_concurrency_limit_holds_across_two_gateways_and_slots_come_back(
    nats: Nats, pool: Pool, redis_url: str
) -> None:
    async with open_repo(redis_url) as repo:
        app, _ = await repo.create_app("limited", max_sessions=2)
        token, _ = await repo.issue_token(app, 3600)
        async with (
            open_redis_gateway(nats.url, pool, redis_url) as gw1,
            open_redis_gateway(nats.url, pool, redis_url) as gw2,
        ):
            async with held_session(gw1.url, "limited", token):
                async with held_session(gw2.url, "limited", token):
                    for gw in (gw1, gw2):
                        reply = await start_reply(gw.url, "limited", token)
                        assert status_of(reply) == 40000005, reply
                        assert "limit of 2" in reply["header"]["status_text"]
                    assert await repo.active_sessions("limited") == 2
                # gw2's session hung up: its slot is free for either gateway.
                await eventually(partial(started, gw1.url, "limited", token))

            async def none_active() -> bool:
                return await repo.active_sessions("limited") == 0

            # Every way a session ended (hang-up, refusal) gave its slot back (a hang-up is
            # noticed a moment later: hence eventually), and so does a completed one.
            await eventually(none_active)
            await transcribe(gw2.url, "limited", token)
            await eventually(none_active)
            assert await repo.store.execute("ZCARD", repo.keys.slots("limited")) == 0


def start_gateway_process(config: Path) -> subprocess.Popen[bytes]:
    """`asrd gateway` as its own process, to be killed."""
    argv = [sys.executable, "-m", "asrd", "--log-level", "warning", "gateway"]
    return subprocess.Popen([*argv, "--config", str(config)])


async def test_a_crashed_gateways_slots_expire(
    nats: Nats, pool: Pool, redis_url: str, tmp_path: Path
) -> None:
    port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[server]\nport = {port}\ndefault_language = "{pool.name}"\n'
        f'[nats]\nurl = "{nats.url}"\n'
        f'[redis]\nurl = "{redis_url}"\nslot_ttl_s = 10.0\nslot_refresh_s = 2.0\n'
    )
    async with open_repo(redis_url) as repo:
        app, _ = await repo.create_app("crashy", max_sessions=1)
        token, _ = await repo.issue_token(app, 3600)
        proc = start_gateway_process(config)
        try:
            await trio.to_thread.run_sync(wait_port, port, proc)
            url = f"ws://127.0.0.1:{port}/ws/v1"
            with pytest.raises(trio_websocket.ConnectionClosed):
                async with held_session(url, "crashy", token) as ws:
                    proc.send_signal(signal.SIGKILL)  # no finish(), no release: only expiry
                    proc.wait()
                    with trio.fail_after(GUARD_S):
                        await ws.get_message()
        finally:
            stop(proc)
        async with open_redis_gateway(nats.url, pool, redis_url) as gw:
            reply = await start_reply(gw.url, "crashy", token)
            assert status_of(reply) == 40000005  # the dead gateway's slot still counts ...
            await eventually(partial(started, gw.url, "crashy", token))  # ... until it expires


# --- 6, 7. usage and transcripts ----------------------------------------------------------------


async def test_usage_and_transcripts_survive_a_gateway_restart(
    nats: Nats, pool: Pool, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    r = ("--redis-url", redis_url)
    async with open_repo(redis_url) as repo:
        app_a, _ = await repo.create_app("rec-a")
        app_b, _ = await repo.create_app("rec-b", record_transcripts=False)
        token_a, _ = await repo.issue_token(app_a, 3600)
        token_b, _ = await repo.issue_token(app_b, 3600)
    async with open_redis_gateway(nats.url, pool, redis_url) as gw:
        task_a, events_a = await transcribe(gw.url, "rec-a", token_a)
        async with held_session(gw.url, "rec-a", token_a):
            pass  # hangs up: an error outcome (40010004)
        task_b, _ = await transcribe(gw.url, "rec-b", token_b)
    # The gateway is gone (it wrote its records on the way out); a new one starts.
    async with open_redis_gateway(nats.url, pool, redis_url):
        status, out = await asrd(capsys, "usage", "--json", *r)
        assert status == 0
        rows = {row["appkey"]: row for row in json.loads(out)}
        today = datetime.now(UTC).date().isoformat()
        assert rows["rec-a"]["day"] == today
        assert rows["rec-a"]["sessions"] == 2 and rows["rec-a"]["errors"] == 1
        assert abs(rows["rec-a"]["audio_s"] - len(clip()) / (2 * RATE)) < 0.01
        assert rows["rec-b"]["sessions"] == 1 and rows["rec-b"]["errors"] == 0
        tomorrow = (datetime.now(UTC).date() + timedelta(days=1)).isoformat()
        status, out = await asrd(
            capsys, "usage", "--appkey", "rec-a", "--since", tomorrow, "--json", *r
        )
        assert json.loads(out) == []
        status, out = await asrd(capsys, "usage", *r)  # the table form
        assert "rec-a" in out and "rec-b" in out

        status, out = await asrd(capsys, "transcript", task_a, "--json", *r)
        assert status == 0
        (doc,) = json.loads(out)
        assert doc["appkey"] == "rec-a" and doc["code"] == 20000000
        assert doc["language"] == pool.name and doc["pool"] == pool.name
        assert doc["params"]["sample_rate"] == RATE
        assert [s["text"] for s in doc["sentences"]] == [
            e["payload"]["result"] for e in events_a if e["header"]["name"] == "SentenceEnd"
        ]
        assert all(s["begin_time"] < s["time"] for s in doc["sentences"])
        status, out = await asrd(capsys, "transcript", task_a, *r)
        assert "20000000" in out and doc["sentences"][0]["text"] in out

        status, out = await asrd(capsys, "transcript", "--appkey", "rec-a", "--json", *r)
        listed = json.loads(out)
        assert {d["code"] for d in listed} == {20000000, 40010004}
        assert task_a in {d["task_id"] for d in listed}

        status, _ = await asrd(capsys, "transcript", task_b, *r)
        assert status == 1  # recording is off for rec-b
        async with open_repo(redis_url) as repo:
            key = repo.keys.transcript(task_a, doc["session_id"])
            ttl = await repo.store.execute("TTL", key)
            assert 0 < ttl <= 30 * 86400  # the retention


async def test_a_task_id_used_again_keeps_no_older_transcript_past_the_retention(
    redis_url: str,
) -> None:
    """The task id is the client's, and nothing makes it unique: the transcripts of its
    sessions shared one hash, whose expiry every new session pushed back, so an older
    transcript was kept as long as the id kept being used."""
    task = "7a5c" * 8

    def item(appkey: str, session_id: str) -> RecordItem:
        now = time.time()
        doc = {"task_id": task, "session_id": session_id, "appkey": appkey, "started_at": now}
        return RecordItem(
            appkey=appkey,
            day=day_of(now),
            sessions=1,
            task_id=task,
            session_id=session_id,
            ended_ms=int(now * 1000),
            doc=json.dumps({**doc, "ended_at": now, "sentences": []}),
        )

    async with open_repo(redis_url, transcript_retention_days=2 / 86400) as repo:  # 2 s
        await repo.write_batch(f"asrd:batch:reuse:{task}:0", [item("first", "a1")])
        for n in range(1, 4):  # used again, by another key's client, every second
            await trio.sleep(1.0)
            await repo.write_batch(f"asrd:batch:reuse:{task}:{n}", [item("other", f"b{n}")])
        kept = [d["session_id"] for d in await repo.transcript(task)]
        assert "a1" not in kept and kept[-1] == "b3", kept
        assert await repo.transcripts("first") == []
        assert [d["session_id"] for d in await repo.transcripts("other", limit=2)] == ["b3", "b2"]


# --- 8. Redis goes away -----------------------------------------------------------------------


async def test_redis_stop_and_start_during_live_sessions(
    nats: Nats,
    pool: Pool,
    restartable_redis: RedisProcess,
    caplog: pytest.LogCaptureFixture,
) -> None:
    redis = restartable_redis
    redis.start()
    async with open_repo(redis.url) as repo:
        app, secret = await repo.create_app("steady", max_sessions=5)
        cached_token, _ = await repo.issue_token(app, 3600)
        other_token, _ = await repo.issue_token(app, 3600)
        revoked_token, _ = await repo.issue_token(app, 3600)
    async with open_redis_gateway(
        nats.url, pool, redis.url, slot_ttl_s=4.0, slot_refresh_s=1.0
    ) as gw:

        async def redis_metrics() -> tuple[float, float]:
            """(asrd_redis_errors_total, asrd_redis_reconnects_total) from /metrics."""
            status, text = await trio.to_thread.run_sync(get, f"http://127.0.0.1:{gw.port}/metrics")
            assert status == 200
            names = ("asrd_redis_errors_total", "asrd_redis_reconnects_total")
            return metric(text, names[0]), metric(text, names[1])

        assert await started(gw.url, "steady", cached_token)  # validated: now cached
        # Validated, then revoked: Redis's "no" must also clear the cache, or the token would
        # open sessions again as soon as Redis goes away.
        assert await started(gw.url, "steady", revoked_token)
        async with open_repo(redis.url) as repo:
            assert await repo.revoke_token(revoked_token)
        assert status_of(await start_reply(gw.url, "steady", revoked_token)) == 40000001
        errors0, reconnects0 = await redis_metrics()  # 0, 0 unless Redis was still LOADING

        async def recorded(n: int) -> bool:
            return sum(row.sessions for row in await repo.usage("steady")) == n

        async with open_repo(redis.url) as repo:
            await eventually(partial(recorded, 2))
        live = LiveSession(gw.url, "steady", cached_token, clip())
        async with trio.open_nursery() as nursery:
            await nursery.start(live.run)
            caplog.set_level(logging.WARNING, logger="asrd.store.plane")
            redis.stop()

            # A token never validated here is refused with the transient code and a log line.
            async def refused() -> bool:
                return status_of(await start_reply(gw.url, "steady", other_token)) == 50000000

            await eventually(refused)
            assert not gw.plane.available
            errors, reconnects = await redis_metrics()
            assert errors > errors0 and reconnects == reconnects0
            assert any("unreachable" in rec.getMessage() for rec in caplog.records)
            assert any(
                "refusing a session of appkey 'steady' with 50000000" in rec.getMessage()
                for rec in caplog.records
            )
            # Signed links need Redis (single use): refused too.
            link = signing.sign_url(gw.url, appkey="steady", secret=secret)
            assert status_of(await start_reply(link, "steady")) == 50000000
            # So does POST /token.
            status, _ = await handle_token_request(
                gw.plane, "POST", [], json.dumps({"appkey": "steady", "secret": secret}).encode()
            )
            assert status == 503
            # A token validated a moment ago is served from the cache; a revoked one is not.
            assert await started(gw.url, "steady", cached_token)
            assert status_of(await start_reply(gw.url, "steady", revoked_token)) == 50000000

            # The session that was running when Redis went away completes normally.
            events = await live.finish()
            assert events[-1]["header"]["name"] == "TranscriptionCompleted", events[-1]
            assert "man" in text_of(events)

            async def buffered() -> bool:  # the cached session and the live one
                return gw.plane.pending == 2

            await eventually(buffered)
            nursery.cancel_scope.cancel()

        redis.start()  # same port, same data

        async def flushed() -> bool:
            return gw.plane.available and gw.plane.pending == 0

        await eventually(flushed)
        assert any("reachable again" in rec.getMessage() for rec in caplog.records)
        assert (await redis_metrics())[1] > reconnects0
        async with open_repo(redis.url) as repo:
            (row,) = await repo.usage("steady")
            assert row.sessions == 4 and row.lost_transcripts == 0
            assert (await repo.transcript(live.task_id))[0]["code"] == 20000000
            assert await started(gw.url, "steady", other_token)  # everything works again

            async def slots_free() -> bool:
                return await repo.active_sessions("steady") == 0

            await eventually(slots_free)


async def test_tokens_of_a_deleted_and_recreated_key_stay_refused_in_an_outage() -> None:
    """A gateway that learns from Redis that a key was created again (a token of the old one
    refused) must not let the old key's other cached tokens in once Redis is away."""
    with redis_server() as (proc, url):
        config = Config.model_validate({"redis": {"url": url}})
        async with open_repo(url) as repo:
            app, _ = await repo.create_app("again", max_sessions=5)
            first, _ = await repo.issue_token(app, 3600)
            second, _ = await repo.issue_token(app, 3600)
        async with open_redis_control_plane(config) as plane:

            async def admit(token: str, session_id: str) -> None:
                connect = ConnectInfo("GET", "/ws/v1", {}, token)
                await plane.admit(connect, appkey="again", language=None, session_id=session_id)

            await admit(first, "a")
            await admit(second, "b")  # both cached
            async with open_repo(url) as repo:
                assert await repo.delete_app("again")
                await repo.create_app("again", max_sessions=5)
            with pytest.raises(AuthError, match="deleted and created again"):
                await admit(first, "c")
            stop(proc)  # Redis goes away
            with pytest.raises(StoreUnavailable):
                await admit(second, "d")


async def test_in_an_outage_a_cached_token_expired_or_of_another_key_is_the_clients_error() -> None:
    """The cache knows these for good: they got 50000000, which tells a client to retry
    what can never succeed."""
    with redis_server() as (proc, url):
        config = Config.model_validate({"redis": {"url": url}})
        async with open_repo(url) as repo:
            app, _ = await repo.create_app("mine", max_sessions=5)
            await repo.create_app("theirs", max_sessions=5)
            brief, _ = await repo.issue_token(app, 1)
            lasting, _ = await repo.issue_token(app, 3600)
        async with open_redis_control_plane(config) as plane:

            async def admit(token: str, appkey: str, session_id: str) -> None:
                connect = ConnectInfo("GET", "/ws/v1", {}, token)
                await plane.admit(connect, appkey=appkey, language=None, session_id=session_id)

            with pytest.raises(AppKeyTokenMismatch):
                await admit(lasting, "theirs", "a")
            await admit(brief, "mine", "b")
            await admit(lasting, "mine", "c")  # both cached
            stop(proc)  # Redis goes away
            await trio.sleep(1.5)  # the brief token expires
            with pytest.raises(AuthError, match="expired"):
                await admit(brief, "mine", "d")
            with pytest.raises(AppKeyTokenMismatch):
                await admit(lasting, "theirs", "e")
            await admit(lasting, "mine", "f")  # the cache serves what it vouches for
            with pytest.raises(StoreUnavailable):  # a token it never saw: retry later
                await admit("unknown-token", "mine", "g")


async def test_redis_error_replies_reach_no_client_and_read_only_is_an_outage(
    nats: Nats, pool: Pool, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A foreign value in one of our keys makes Redis answer an error: the client gets
    50000000 with no Redis address or reply text in it (the log has them). A Redis that turned
    read-only (a failover left us on a replica), or that answers MASTERDOWN, is handled like an
    outage: a token validated a moment ago still opens sessions."""
    async with open_repo(redis_url) as repo:
        app, _ = await repo.create_app("fine")
        token, _ = await repo.issue_token(app, 3600)
        broken, _ = await repo.create_app("broken")
        broken_token, _ = await repo.issue_token(broken, 3600)
        await repo.store.execute("DEL", repo.keys.app("broken"))
        await repo.store.execute("SET", repo.keys.app("broken"), "not a hash")
    async with open_redis_gateway(nats.url, pool, redis_url) as gw:
        caplog.set_level(logging.ERROR, logger="asrd.store.plane")
        reply = await start_reply(gw.url, "broken", broken_token)
        assert status_of(reply) == 50000000
        text = reply["header"]["status_text"]
        assert "control plane failed" in text and "redis://" not in text and "WRONGTYPE" not in text
        assert any("WRONGTYPE" in r.getMessage() for r in caplog.records)

        assert await started(gw.url, "fine", token)  # validated: now cached
        async with open_repo(redis_url) as repo:
            # "yes": a read-only replica; "no": one that lost its master serves nothing
            # (MASTERDOWN)
            for stale_data in ("yes", "no"):
                await repo.store.execute("CONFIG", "SET", "replica-serve-stale-data", stale_data)
                await repo.store.execute("REPLICAOF", "127.0.0.1", str(free_port()))
                try:
                    assert await started(gw.url, "fine", token)
                    assert not gw.plane.available
                finally:
                    await repo.store.execute("REPLICAOF", "NO", "ONE")
                    await repo.store.execute("CONFIG", "SET", "replica-serve-stale-data", "yes")


async def test_a_read_only_redis_is_one_outage_until_it_takes_writes_again(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A replica answers the config polls (reads) twice a second: each used to end the outage
    ("reachable again", a reconnect counted) and the next write to start it again (an ERROR
    line). Only a write ends it: here the buffered record, once Redis takes writes again."""
    config = Config.model_validate({"redis": {"url": redis_url}})
    caplog.set_level(logging.WARNING, logger="asrd.store.plane")
    record = session_record("read-only", "ro1")
    async with open_redis_control_plane(config) as plane, open_repo(redis_url) as repo:
        await repo.store.execute("REPLICAOF", "127.0.0.1", str(free_port()))
        try:
            await plane.finish(Admission(appkey="read-only", pool="en-US", slot="ro1"), record)

            async def away() -> bool:  # the record's first write was refused
                return not plane.available

            await eventually(away)
            for _ in range(6):  # three seconds of config polls, each answered
                await plane._poll_config()
                await trio.sleep(0.5)
            assert not plane.available and plane.redis_reconnects == 0 and plane.pending == 1
        finally:
            await repo.store.execute("REPLICAOF", "NO", "ONE")

        async def written() -> bool:
            return plane.available and plane.pending == 0

        await eventually(written)
        assert plane.redis_reconnects == 1
        assert [row.sessions for row in await repo.usage("read-only")] == [1]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]  # the outage, once


async def test_records_wait_whole_while_a_foreign_value_blocks_their_keys(
    redis_url: str, nats: Nats, pool: Pool, caplog: pytest.LogCaptureFixture
) -> None:
    """A value of another type under one of our keys makes Redis refuse a write. Nothing of the
    batch is written (a half-written batch would be skipped as written on the retry): the
    records wait, the log names the key, and all of them arrive once it is removed."""
    config = gateway_config(nats.url, pool, redis_url)
    async with open_repo(redis_url) as repo:
        foreign = repo.keys.usage("blocked")
        await repo.store.execute("SET", foreign, "someone else's")
    caplog.set_level(logging.ERROR, logger="asrd.store.plane")
    async with open_redis_control_plane(config) as plane:
        now = time.time()
        for i, appkey in enumerate(["fine", "blocked", "fine"]):
            admission = Admission(appkey=appkey, pool=pool.name, slot=f"s{i}")
            record = session_record(
                appkey, f"s{i}", started_at=now, language=pool.name, text=f"s{i}"
            )
            await plane.finish(admission, record)

        async def logged() -> bool:
            return any(foreign in r.getMessage() for r in caplog.records)

        await eventually(logged)
        async with open_repo(redis_url) as repo:
            assert await repo.usage("fine") == []  # not half of the batch
            assert plane.pending == 3
            await repo.store.execute("DEL", foreign)

            async def flushed() -> bool:
                return plane.pending == 0

            await eventually(flushed)
            assert [row.sessions for row in await repo.usage("fine")] == [2]
            assert [row.sessions for row in await repo.usage("blocked")] == [1]


async def test_a_slot_given_back_during_a_refresh_is_not_brought_back(
    redis_url: str, nats: Nats, pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refresh re-adds every running slot in one round-trip. A session that ends meanwhile
    can have its slot given back first; the refresh then brought it back, and the key counted
    one session too many (refusing one under its limit) until the slot expired. Even when the
    answer to that release comes back after the refresh's."""
    config = gateway_config(nats.url, pool, redis_url)
    async with open_repo(redis_url) as repo:
        app, _ = await repo.create_app("racing")
        token, _ = await repo.issue_token(app, 3600)
    async with open_redis_control_plane(config) as plane:
        connect = ConnectInfo("GET", "/ws/v1", {}, token)
        admission = await plane.admit(connect, appkey="racing", language=None, session_id="s1")
        real_refresh = plane._repo.refresh_slots

        async def refresh_racing_a_release(running: dict[str, list[str]]) -> None:
            record = session_record("racing", "s1", language=pool.name)
            await plane.finish(admission, record)  # the session ends during the round-trip
            with trio.fail_after(GUARD_S):
                await given_back.wait()  # and its slot is given back first
            await real_refresh(running)

        async def release_answered_late(slots: list[tuple[str, str]]) -> None:
            """Redis gives the slot back at once; its answer comes after the refresh's."""
            await real_release(slots)
            given_back.set()
            await refreshed.wait()

        given_back, refreshed = trio.Event(), trio.Event()
        real_release = plane._repo.release_slots
        monkeypatch.setattr(plane._repo, "refresh_slots", refresh_racing_a_release)
        monkeypatch.setattr(plane._repo, "release_slots", release_answered_late)
        await plane._refresh_once()
        refreshed.set()
        with trio.fail_after(GUARD_S):
            while plane._releases or plane._releasing:  # noqa: ASYNC110 - all given back
                await trio.sleep(0.01)
        assert await plane._repo.active_sessions("racing") == 0


async def test_records_beyond_the_buffer_are_counted_not_lost(
    restartable_redis: RedisProcess, nats: Nats, pool: Pool
) -> None:
    """Redis is down from the start; a buffer of two records takes five sessions: the usage
    of all five arrives, and the three transcripts that did not fit are counted."""
    redis = restartable_redis
    config = gateway_config(nats.url, pool, redis.url, buffer_records=2)
    async with open_redis_control_plane(config) as plane:
        started_at = time.time()
        for i in range(5):
            admission = Admission(appkey="buffered", pool=pool.name, slot=f"s{i}")
            record = session_record(
                "buffered",
                f"s{i}",
                task_id=f"{i:032x}",
                started_at=started_at,
                language=pool.name,
                audio_s=1.5,
                code=20000000 if i % 2 == 0 else 40000004,
                text=f"s{i}",
            )
            await plane.finish(admission, record)
        assert plane.lost_transcripts == 3
        redis.start()

        async def flushed() -> bool:
            return plane.pending == 0

        await eventually(flushed)
    async with open_repo(redis.url) as repo:
        (row,) = await repo.usage("buffered")
        assert (row.sessions, row.errors, row.lost_transcripts) == (5, 2, 3)
        assert row.audio_s == pytest.approx(7.5)
        kept = await repo.transcripts("buffered")
        assert sorted(d["task_id"] for d in kept) == [f"{3:032x}", f"{4:032x}"]
