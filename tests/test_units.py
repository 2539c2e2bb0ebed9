"""Fast unit tests of the gateway's pure parts: config, auth, handshake, wire, sentences, bus."""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from asrd import logs, wire
from asrd import remote as remote_module
from asrd import worker as worker_module
from asrd.auth import StaticAuthenticator
from asrd.bus import (
    Msg,
    NoResponders,
    Subscription,
    claim_subject,
    heartbeat_subject,
    session_in,
    session_out,
)
from asrd.bus.memory import InMemoryBus
from asrd.bus.natsbus import next_tick
from asrd.clientstream import ClientStream
from asrd.config import AuthConfig, ConfigError, WorkerConfig, load_config
from asrd.engines.loadtest import LoadtestEngine
from asrd.errors import (
    AppKeyTokenMismatch,
    AuthError,
    BusError,
    ClientError,
    EngineFailed,
    ServerError,
    TooManyRequests,
    UnknownAppKey,
)
from asrd.events import ResultChanged, SentenceBegin, SentenceEnd
from asrd.handshake import HeadError, dedupe_head, parse_head, split_head
from asrd.params import SessionParams, WordFilter
from asrd.registry import WorkerRegistry
from asrd.remote import BUSY_WAIT_S, RemoteRecognizer
from asrd.sentences import SentenceTracker
from asrd.worker import STALL_S, Worker

# --- config -------------------------------------------------------------------------------


def test_shipped_config_toml_equals_the_defaults() -> None:
    assert load_config("config.toml") == load_config(None)


def test_gateway_metrics_ports_must_exist_for_every_process(tmp_path: Any) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[server]\nprocesses = 4\nmetrics_port = 65533\n")
    with pytest.raises(ConfigError, match="metrics_port 65533 \\+ 4 processes passes 65535"):
        load_config(path)
    path.write_text("[server]\nprocesses = 3\nmetrics_port = 65533\n")
    assert load_config(path).server.processes == 3


def test_worker_metrics_ports_must_exist_for_every_process() -> None:
    with pytest.raises(ConfigError, match="metrics_port 65534 \\+ 3 processes passes 65535"):
        load_config(None, worker={"processes": 3, "metrics_port": 65534})
    assert load_config(None, worker={"processes": 2, "metrics_port": 65534}).worker.processes == 2


def test_the_longest_sentence_must_fit_the_failover_journal() -> None:
    """Else such a sentence ends its session with 40000000 before it is force-closed."""
    with pytest.raises(ConfigError, match="raise journal_max_bytes or lower max_sentence_ms"):
        load_config(None, segmentation={"max_sentence_ms": 600_000})
    cfg = load_config(
        None, segmentation={"max_sentence_ms": 600_000}, server={"journal_max_bytes": 20_000_000}
    )
    assert cfg.segmentation.max_sentence_ms == 600_000


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("worker", "pool", "en US"),
        ("worker", "pool", "en.US"),
        ("server", "default_language", "en>"),
        ("nats", "subject_prefix", "a b"),
        ("nats", "subject_prefix", "asrd."),
        ("nats", "subject_prefix", "*"),
    ],
)
def test_names_that_become_nats_subjects_are_checked(section: str, key: str, value: str) -> None:
    """A pool, language or prefix with a space, '*' or '>' would make subjects NATS refuses or
    matches wildly: refused at start with the key named."""
    with pytest.raises(ConfigError, match=key):
        load_config(None, **{section: {key: value}})


def test_names_that_are_fine_subject_tokens_are_accepted() -> None:
    cfg = load_config(None, worker={"pool": "zh_CN-8k"}, nats={"subject_prefix": "site1.asrd"})
    assert (cfg.worker.pool, cfg.nats.subject_prefix) == ("zh_CN-8k", "site1.asrd")


def test_defaults_follow_the_protocol() -> None:
    cfg = load_config(None)
    assert cfg.server.idle_timeout_s == 10.0
    assert cfg.server.host == "127.0.0.1"


def test_auth_off_is_refused_on_a_public_address() -> None:
    with pytest.raises(ConfigError, match="loopback"):
        load_config(None, server={"host": "0.0.0.0"})
    cfg = load_config(None, server={"host": "0.0.0.0"}, auth={"enabled": True})
    assert cfg.server.host == "0.0.0.0"


def test_unknown_key_and_out_of_range_are_named(tmp_path: pytest.TempPathFactory) -> None:
    path = tmp_path / "c.toml"  # type: ignore[operator]
    path.write_text("[server]\nport = 99999\n")
    with pytest.raises(ConfigError, match="port"):
        load_config(path)
    path.write_text("[server]\nportt = 1\n")
    with pytest.raises(ConfigError, match="portt"):
        load_config(path)
    with pytest.raises(ConfigError, match="frame_ms"):
        load_config(None, segmentation={"frame_ms": 25})


# --- auth ---------------------------------------------------------------------------------


async def test_static_auth_codes() -> None:
    auth = StaticAuthenticator(
        AuthConfig.model_validate(
            {
                "enabled": True,
                "apps": [{"appkey": "a", "tokens": ["ta"]}, {"appkey": "b", "tokens": ["tb"]}],
            }
        )
    )
    await auth.authorize("ta", "a")
    with pytest.raises(AuthError) as e1:
        await auth.authorize(None, "a")
    assert e1.value.code == 40000001
    with pytest.raises(AuthError):
        await auth.authorize("nope", "a")
    with pytest.raises(UnknownAppKey) as e2:
        await auth.authorize("ta", "zzz")
    assert e2.value.code == 40020105
    with pytest.raises(AppKeyTokenMismatch) as e3:
        await auth.authorize("ta", "b")
    assert e3.value.code == 40020106
    await StaticAuthenticator(AuthConfig()).authorize(None, "anything")


async def test_static_auth_token_listed_under_several_apps_opens_each() -> None:
    """A token listed under two apps opened only the last one's sessions (40020106 for the
    first): each listing replaced the one before."""
    auth = StaticAuthenticator(
        AuthConfig.model_validate(
            {
                "enabled": True,
                "apps": [
                    {"appkey": "a", "tokens": ["shared"]},
                    {"appkey": "b", "tokens": ["shared", "tb"]},
                    {"appkey": "c", "tokens": ["tc"]},
                ],
            }
        )
    )
    await auth.authorize("shared", "a")
    await auth.authorize("shared", "b")
    with pytest.raises(AppKeyTokenMismatch):
        await auth.authorize("shared", "c")


# --- handshake ----------------------------------------------------------------------------

SDK_HEAD = (
    b"GET /ws/v1?token=abc HTTP/1.1\r\nUpgrade: websocket\r\nHost: 127.0.0.1:1\r\n"
    b"Origin: http://127.0.0.1:1\r\nSec-WebSocket-Key: FIRSTKEYFIRSTKEY00000==\r\n"
    b"Sec-WebSocket-Version: 13\r\nConnection: Upgrade\r\nX-NLS-Token: tok\r\n"
    b"Sec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def test_dedupe_keeps_the_first_key_like_the_sdk_expects() -> None:
    head = parse_head(dedupe_head(SDK_HEAD))
    keys = [v for k, v in head.headers if k == b"sec-websocket-key"]
    assert keys == [b"FIRSTKEYFIRSTKEY00000=="]
    assert [v for k, v in head.headers if k == b"sec-websocket-version"] == [b"13"]
    assert head.is_websocket and head.path == "/ws/v1" and head.query("token") == "abc"
    assert head.header(b"x-nls-token") == b"tok"


def test_split_head_waits_for_the_blank_line_and_bounds_size() -> None:
    assert split_head(SDK_HEAD[:50]) is None
    head, rest = split_head(SDK_HEAD + b"\x81\x00") or (b"", b"")
    assert head == SDK_HEAD and rest == b"\x81\x00"
    with pytest.raises(HeadError):
        split_head(b"x" * 20000)
    with pytest.raises(HeadError):
        parse_head(b"\xff\xfe\r\n\r\n")
    with pytest.raises(HeadError, match="request target"):  # urlsplit's ValueError
        parse_head(b"GET http://[::1/metrics HTTP/1.1\r\nHost: x\r\n\r\n")


# --- wire ---------------------------------------------------------------------------------


def test_wire_round_trips() -> None:
    assert wire.decode_input(wire.encode_audio(7, b"\x01\x02")) == wire.AudioIn(7, b"\x01\x02")
    assert wire.decode_input(wire.encode_control("end", 3)) == wire.ControlIn("end", 3)
    r = wire.Result(True, 2, 1500, "hello", (("hello", 10, 400),), 0.75)
    assert wire.decode_output(r.encode()) == r
    f = wire.Failure(50000000, "boom")
    assert wire.decode_output(f.encode()) == f
    c = wire.Claim("s" * 32, 8000, True)
    assert wire.decode_claim(c.encode()) == c
    c = wire.Claim("s" * 32, 8000, True, epoch=2, task_id="t" * 32)
    assert wire.decode_claim(c.encode()) == c
    c = wire.Claim("s" * 32, 8000, True, progress=True)
    assert wire.decode_claim(c.encode()) == c
    older = b'{"session_id":"s","sample_rate":8000,"partials":true,"epoch":0}'  # no task_id
    assert wire.decode_claim(older) == wire.Claim("s", 8000, True)
    for task_id in ('"a.b"', "7", '"' + "t" * 129 + '"'):  # logged: ids only
        with pytest.raises(BusError, match="task_id"):
            wire.decode_claim(
                b'{"session_id":"s","sample_rate":8000,"task_id":%s}' % task_id.encode()
            )
    hb = wire.Heartbeat("w1", "en-US", "pocketsphinx", 3, 1)
    assert wire.decode_heartbeat(hb.encode()) == hb


def test_wire_carries_a_sessions_engine_state_from_final_to_claim() -> None:
    r = wire.Result(True, 2, 1500, "hi", (("hi", 10, 400),), 0.75, 1, state="cmn:40,3")
    assert wire.decode_output(r.encode()) == r
    assert b"state" not in wire.Result(True, 2, 1500, "hi", (), 0.7).encode()  # none: no key
    c = wire.Claim("s", 8000, True, state="cmn:40,3")
    assert wire.decode_claim(c.encode()) == c
    for bad in ("7", '["x"]', '"' + "x" * (wire.MAX_STATE_CHARS + 1) + '"'):
        with pytest.raises(BusError, match="state"):
            wire.decode_claim(b'{"session_id":"s","sample_rate":8000,"state":%s}' % bad.encode())
        with pytest.raises(BusError, match="state"):
            wire.decode_output(b'{"type":"final","utt":1,"text":"","state":%s}' % bad.encode())


async def test_a_failover_claim_carries_the_state_of_the_last_final(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The worker taking a session over starts from the engine state the last final result
    left, as the worker before it did: so its results are what that one's would have been."""
    bus = InMemoryBus()
    registry = WorkerRegistry(bus, "asrd", timeout_s=1.0)
    claims = await bus.subscribe(claim_subject("asrd", "en-US"), queue="q")
    states: list[str] = []

    async def worker() -> None:
        async for msg in claims:
            states.append(wire.decode_claim(msg.data).state)
            bus.publish(msg.reply, wire.ClaimReply(True, f"w{len(states)}").encode())

    async with trio.open_nursery() as nursery:
        await nursery.start(registry.run)
        nursery.start_soon(worker)
        link = _link(bus, registry, "s1")
        await link.open()
        link.begin(1)
        link.end(1)
        link.finalized(1, "cmn:40,3")
        link.begin(2)
        await link._failover("test")
        link.finalized(2, "cmn:41,2")
        await link._failover("test")
        assert states == ["", "cmn:40,3", "cmn:41,2"]
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("junk", [b"", b"{", b"[1]", b'{"type":"partial"}', b"A\x00", b'{"ok":1}'])
def test_wire_junk_is_a_bus_error(junk: bytes) -> None:
    for decode in (wire.decode_output, wire.decode_input, wire.decode_heartbeat, wire.decode_claim):
        try:
            decode(junk)
        except BusError:
            pass


@pytest.mark.parametrize(
    "junk",
    [
        b'{"worker_id":"w","pool":"p","capacity":1e400}',  # int(inf): OverflowError
        b'{"session_id":"s","sample_rate":1e400}',
        b'{"type":"final","utt":1e400,"text":""}',
        b'{"type":"end","utt":-1e400}',
        b"[" * 100_000,  # deeper than the recursion limit
    ],
)
def test_wire_absurd_numbers_and_nesting_are_bus_errors(junk: bytes) -> None:
    for decode in (wire.decode_output, wire.decode_input, wire.decode_heartbeat, wire.decode_claim):
        with pytest.raises(BusError):
            decode(junk)


@pytest.mark.parametrize("session_id", ["", "a b", "*", ">", "a.b", "x" * 129, 7])
def test_a_claim_whose_session_id_is_no_subject_token_is_malformed(session_id: object) -> None:
    """It would make the worker subscribe to a subject NATS refuses, or to every session's."""
    claim = wire._dumps({"session_id": session_id, "sample_rate": 16000})
    with pytest.raises(BusError, match="session_id"):
        wire.decode_claim(claim)


def test_a_heartbeat_pause_is_bounded() -> None:
    """A pause of infinity (or NaN) would keep a dead worker alive for ever."""
    beat = b'{"worker_id":"w","pool":"p","grace_s":%s}'
    assert wire.decode_heartbeat(beat % b"Infinity").grace_s == 0.0
    assert wire.decode_heartbeat(beat % b"NaN").grace_s == 0.0
    assert wire.decode_heartbeat(beat % b"-5").grace_s == 0.0
    assert wire.decode_heartbeat(beat % b"1e9").grace_s == wire.MAX_GRACE_S
    assert wire.decode_heartbeat(beat % b"2.5").grace_s == 2.5


def test_heartbeats_are_due_on_the_grid_of_their_interval() -> None:
    """Ticks of 0.25 s on the monotonic clock: the next after now, never the same twice, and
    none made up for after a stall."""
    assert next_tick(10.03, 0.25, 0) == 41  # the first: 10.25 s
    assert next_tick(10.2499999, 0.25, 41) == 42  # run a moment early: not 41 again
    assert next_tick(10.26, 0.25, 41) == 42  # a little late: still 10.5 s, not 10.51
    assert next_tick(11.1, 0.25, 42) == 45  # held up 0.6 s: 11.25 s, the missed ones skipped


async def test_the_registry_survives_junk_and_a_flood_of_heartbeats() -> None:
    """One gateway's registry task ends the gateway if it dies: a hostile beat or a burst that
    overflows its subscription must cost nothing but a warning."""
    bus = InMemoryBus()
    registry = WorkerRegistry(bus, "asrd", timeout_s=1.0)
    subject = heartbeat_subject("asrd")
    async with trio.open_nursery() as nursery:
        await nursery.start(registry.run)
        bus.publish(subject, b'{"worker_id":"w","pool":"p","capacity":1e400}')
        for _ in range(5000):  # more than the subscription holds, with no checkpoint between
            bus.publish(subject, wire.Heartbeat("w1", "en-US", "x", 1, 1).encode())
        await trio.testing.wait_all_tasks_blocked()
        bus.publish(subject, wire.Heartbeat("w2", "en-US", "x", 1, 1).encode())
        await trio.testing.wait_all_tasks_blocked()
        assert "w2" in {b.worker_id for b in registry.alive("en-US")}
        nursery.cancel_scope.cancel()


async def test_a_worker_that_stops_cleanly_is_forgotten_without_a_warning(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """A drained worker's last heartbeat says it leaves: gateways forget it at once. Its beats
    just stopped before, and every gateway warned a timeout later that it was dead, as for a
    crash; a beat sent before the goodbye but read after it must not bring it back."""
    bus = InMemoryBus()
    registry = WorkerRegistry(bus, "asrd", timeout_s=1.0)
    worker = Worker(WorkerConfig(decoders=2), "asrd", bus, LoadtestEngine(2))
    caplog.set_level(logging.INFO, logger="asrd")
    async with trio.open_nursery() as nursery:
        await nursery.start(registry.run)
        await nursery.start(worker.run)
        await trio.sleep(0.5)
        assert [b.worker_id for b in registry.alive("en-US")] == [worker.id]
        late = wire.Heartbeat(worker.id, "en-US", "loadtest", 2, 2).encode()
        await worker.drain()
        await worker.leave()
        await trio.testing.wait_all_tasks_blocked()
        assert registry.alive("en-US") == []
        bus.publish(heartbeat_subject("asrd"), late)  # one sent before, read after
        await trio.sleep(5)  # far beyond the timeout
        assert registry.alive("en-US") == []
        nursery.cancel_scope.cancel()
    messages = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "asrd.registry"]
    assert (logging.INFO, f"engine worker {worker.id} left") in messages
    assert not [m for level, m in messages if level >= logging.WARNING], messages


async def test_a_worker_heard_again_long_after_it_left_is_up_again(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The goodbye is remembered for one timeout, not for ever."""
    bus = InMemoryBus()
    registry = WorkerRegistry(bus, "asrd", timeout_s=1.0)
    subject = heartbeat_subject("asrd")
    beat = wire.Heartbeat("w", "en-US", "x", 1, 1)
    async with trio.open_nursery() as nursery:
        await nursery.start(registry.run)
        bus.publish(subject, beat.encode())
        bus.publish(subject, dataclasses.replace(beat, leaving=True).encode())
        await trio.sleep(0.1)
        bus.publish(subject, beat.encode())
        await trio.sleep(0.1)
        assert registry.alive("en-US") == []
        await trio.sleep(2)
        bus.publish(subject, beat.encode())
        await trio.sleep(0.1)
        assert [b.worker_id for b in registry.alive("en-US")] == ["w"]
        nursery.cancel_scope.cancel()


class _SlowSubscribeBus(InMemoryBus):
    """Subscribing takes a round trip, as on NATS: a task switch can happen in between."""

    async def subscribe(self, subject: str, **kw: Any) -> Any:
        await trio.sleep(0.001)
        return await super().subscribe(subject, **kw)


def _claim_subscriptions(bus: InMemoryBus, subject: str) -> int:
    return sum(pattern == subject for pattern, _, _ in bus._subs)


async def test_a_worker_survives_bad_claims_and_keeps_one_claim_subscription(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Two sessions ending together once left two claim subscriptions (claims reached a full
    worker); a claim with a bad session id or an absurd rate once ended the worker."""
    bus = _SlowSubscribeBus()
    worker = Worker(WorkerConfig(decoders=2), "asrd", bus, LoadtestEngine(2))
    subject = claim_subject("asrd", worker.config.pool)
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.run)
        for junk in (
            b'{"session_id":"a b","sample_rate":16000}',
            b'{"session_id":"x","sample_rate":1e400}',
        ):
            bus.publish(subject, junk)
        for sid in ("a", "b"):
            reply = await bus.request(subject, wire.Claim(sid, 16000, False).encode(), 2)
            assert wire.decode_claim_reply(reply).ok
        assert _claim_subscriptions(bus, subject) == 0  # full
        for sid in ("a", "b"):
            bus.publish(session_in("asrd", sid), wire.encode_control("close"))
        await trio.sleep(1)
        assert _claim_subscriptions(bus, subject) == 1
        for sid in ("c", "d"):
            reply = await bus.request(subject, wire.Claim(sid, 16000, False).encode(), 2)
            assert wire.decode_claim_reply(reply).ok
        assert _claim_subscriptions(bus, subject) == 0
        with pytest.raises(NoResponders):
            await bus.request(subject, wire.Claim("e", 16000, False).encode(), 2)
        nursery.cancel_scope.cancel()


# --- sentence tracker ---------------------------------------------------------------------


def _final(utt: int, text: str, words: tuple[tuple[str, int, int], ...] = ()) -> wire.Result:
    return wire.Result(True, utt, 1000, text, words, 0.8)


def test_tracker_orders_sentences_and_offsets_times() -> None:
    t = SentenceTracker(SessionParams(enable_intermediate_result=True, enable_words=True))
    assert t.begin(1, 1200, 900) == [SentenceBegin(1, 1200)]
    t.end(1, 3000, False)
    assert t.begin(2, 3500, 3200) == []  # held back until sentence 1 is final
    partial = wire.Result(False, 1, 400, "he", (("he", 300, 500),), 0.5)
    out = t.result(partial)
    assert isinstance(out[0], ResultChanged) and out[0].time_ms == 1300
    assert out[0].words[0].start_ms == 1200
    out = t.result(_final(1, "he was", (("he", 300, 500), ("was", 500, 800))))
    assert [type(e) for e in out] == [SentenceEnd, SentenceBegin]
    end = out[0]
    assert isinstance(end, SentenceEnd)
    assert (end.index, end.time_ms, end.begin_time_ms) == (1, 3000, 1200)
    assert [(w.start_ms, w.end_ms) for w in end.words] == [(1200, 1400), (1400, 1700)]
    assert out[1] == SentenceBegin(2, 3500)
    assert t.result(_final(1, "again")) == []  # a replayed duplicate is dropped
    assert not t.idle
    t.end(2, 5000, True)
    out = t.result(_final(2, ""))
    assert isinstance(out[0], SentenceEnd) and out[0].timed_out and t.idle


def test_tracker_never_sends_a_partial_that_covers_less_than_the_last() -> None:
    """After a failover the new worker decodes the sentence again from its start, and its
    first partials covered less audio than those the client had: their time went back."""
    t = SentenceTracker(SessionParams(enable_intermediate_result=True))
    t.begin(1, 1200, 900)
    (first,) = t.result(wire.Result(False, 1, 2000, "he was not", (), 0.0))
    assert isinstance(first, ResultChanged) and first.time_ms == 2900
    for audio_ms in (1000, 2000):  # the new worker, catching up
        assert t.result(wire.Result(False, 1, audio_ms, "he", (), 0.0)) == []
    (caught_up,) = t.result(wire.Result(False, 1, 2500, "he was not here", (), 0.0))
    assert isinstance(caught_up, ResultChanged) and caught_up.time_ms == 3400


def test_tracker_keeps_words_within_their_sentence() -> None:
    """The engine hears the 300 ms lead-in too: a word it places before the sentence's
    begin_time starts at begin_time (one wholly inside the lead-in lasts 1 ms there)."""
    t = SentenceTracker(SessionParams(enable_intermediate_result=True, enable_words=True))
    t.begin(1, 1200, 900)
    t.end(1, 3000, False)
    (partial,) = t.result(
        wire.Result(False, 1, 600, "uh he", (("uh", 100, 250), ("he", 250, 500)), 0.5)
    )
    assert isinstance(partial, ResultChanged)
    assert [(w.start_ms, w.end_ms) for w in partial.words] == [(1200, 1201), (1200, 1400)]
    out = t.result(_final(1, "he was", (("he", 280, 500), ("was", 500, 800))))
    end = out[0]
    assert isinstance(end, SentenceEnd)
    assert [(w.start_ms, w.end_ms) for w in end.words] == [(1200, 1400), (1400, 1700)]


def test_tracker_keeps_an_engines_word_times_within_the_audio_it_had() -> None:
    """README: word "times stay within the sentence". An engine's word that ended after its
    sentence (its audio) or before it started went to the client as the engine wrote it."""
    t = SentenceTracker(SessionParams(enable_intermediate_result=True, enable_words=True))
    t.begin(1, 1000, 700)  # the engine hears stream 700..3000
    words = (("a", 500, 300), ("b", 2000, 99_000_000), ("c", 5000, 6000))
    (partial,) = t.result(wire.Result(False, 1, 1500, "a b c", words, 0.0))
    assert isinstance(partial, ResultChanged)  # 1500 ms of audio heard: up to 2200
    assert [(w.start_ms, w.end_ms) for w in partial.words] == [
        (1200, 1200),
        (2200, 2200),
        (2200, 2200),
    ]
    t.end(1, 3000, False)
    (end,) = t.result(wire.Result(True, 1, 2300, "a b c", words, 0.9))
    assert isinstance(end, SentenceEnd)
    assert [(w.start_ms, w.end_ms) for w in end.words] == [(1200, 1200), (2700, 3000), (3000, 3000)]


def test_tracker_filters_and_punctuates_text_that_comes_without_words() -> None:
    """An engine that sends no word times still gets the client's filters and punctuation:
    a special_word_filter that let profanity through for some engines is no filter."""
    params = SessionParams(
        enable_intermediate_result=True,
        enable_words=True,
        disfluency=True,
        special_word_filter=WordFilter(system_reserved_filter=True, remove=("secret",)),
        enable_punctuation_prediction=True,
    )
    t = SentenceTracker(params)
    t.begin(1, 100, 0)
    (partial,) = t.result(wire.Result(False, 1, 900, "um damn", (), 0.0))
    assert isinstance(partial, ResultChanged) and (partial.text, partial.words) == ("****.", ())
    t.end(1, 2000, False)
    (end,) = t.result(_final(1, "um  damn the secret plan"))
    assert isinstance(end, SentenceEnd) and (end.text, end.words) == ("**** the plan.", ())


@pytest.mark.parametrize(
    ("sent", "reported"), [(float("nan"), 0.0), (-0.5, 0.0), (0.25, 0.25), (1.5, 1.0)]
)
def test_tracker_confidence_is_within_0_and_1(sent: float, reported: float) -> None:
    t = SentenceTracker(SessionParams())
    t.begin(1, 0, 0)
    t.end(1, 1000, False)
    received = wire.decode_output(wire.Result(True, 1, 1000, "a", (), sent).encode())
    assert isinstance(received, wire.Result)  # NaN crosses the bus as NaN
    (end,) = t.result(received)
    assert isinstance(end, SentenceEnd) and end.confidence == reported


def test_tracker_sends_a_partial_only_when_the_text_the_client_sees_changed() -> None:
    """README: partials come "when the text changed"; after disfluency removal or a word
    filter, the engine's new text may read as the last one, or as nothing."""
    t = SentenceTracker(SessionParams(enable_intermediate_result=True, disfluency=True))
    t.begin(1, 0, 0)
    sent = []
    for text in ("um", "hello", "hello uh", "hello there"):
        words = tuple((w, i * 100, i * 100 + 90) for i, w in enumerate(text.split()))
        for e in t.result(wire.Result(False, 1, 300 * len(words), text, words, 0.0)):
            assert isinstance(e, ResultChanged)
            sent.append((e.text, e.time_ms))
    assert sent == [("hello", 300), ("hello there", 600)]


def test_tracker_drops_partials_unless_asked() -> None:
    t = SentenceTracker(SessionParams())
    t.begin(1, 0, 0)
    assert t.result(wire.Result(False, 1, 400, "he", (), 0.5)) == []


# --- in-memory bus ------------------------------------------------------------------------


async def test_memory_bus_queue_groups_and_requests() -> None:
    bus = InMemoryBus()
    a = await bus.subscribe("x.*", queue="q")
    b = await bus.subscribe("x.*", queue="q")
    for _ in range(4):
        bus.publish("x.y", b"m")
    assert len(a._recv._state.data) == 2 and len(b._recv._state.data) == 2
    with pytest.raises(NoResponders):
        await bus.request("nobody", b"", 1)

    async def responder() -> None:
        msg = await a.receive()
        while msg.reply == "":
            msg = await a.receive()
        bus.publish(msg.reply, b"pong")

    async with trio.open_nursery() as n:
        n.start_soon(responder)
        await bus.unsubscribe(b)
        assert await bus.request("x.z", b"ping", 5) == b"pong"


async def test_slow_subscription_overflows_with_a_clear_error() -> None:
    bus = InMemoryBus()
    sub = await bus.subscribe("s", max_pending=2)
    for _ in range(3):
        bus.publish("s", b"m")
    await sub.receive()
    await sub.receive()
    with pytest.raises(BusError, match="fell too far behind"):
        await sub.receive()


# --- worker ---------------------------------------------------------------------------------


async def test_worker_frees_the_decoder_of_a_silent_gateway(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A session whose gateway sends nothing for session_idle_timeout_s gets its decoder
    back, and the worker says so (a gateway alive after all moves the session); one that
    keeps talking (keepalives) does not."""
    bus = InMemoryBus()
    config = WorkerConfig(engine="loadtest", decoders=2, session_idle_timeout_s=4.0)
    worker = Worker(config, "asrd", bus, LoadtestEngine(2))
    given_back = await bus.subscribe(session_out("asrd", "silent"))
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.run)
        for sid in ("silent", "talking"):
            reply = wire.decode_claim_reply(
                await bus.request(
                    claim_subject("asrd", "en-US"), wire.Claim(sid, 16000, True).encode(), 1
                )
            )
            assert reply.ok
        assert worker.free == 0
        start = trio.current_time()
        with trio.fail_after(30):
            while "silent" in worker.sessions:
                bus.publish(session_in("asrd", "talking"), wire.encode_control("keepalive"))
                await trio.sleep(0.5)
        # freed after 4 s of silence, give or take the 1 s check interval
        assert 4.0 <= trio.current_time() - start <= 5.5
        assert set(worker.sessions) == {"talking"} and worker.free == 1
        with trio.fail_after(5):
            assert wire.decode_output((await given_back.receive()).data) == wire.Handoff(0)
        nursery.cancel_scope.cancel()


async def test_a_session_whose_messages_wait_for_the_worker_is_not_silent() -> None:
    """A long final pass keeps the event loop from reading a session's input for longer than
    session_idle_timeout_s: what waits there is the gateway talking, not silence. (The
    session was freed, and its gateway, told nothing, waited for results for good.)"""
    bus = InMemoryBus()
    worker = Worker(WorkerConfig(decoders=1), "asrd", bus, LoadtestEngine(1))
    inbox = Subscription(session_in("asrd", "s"), 16)
    served = worker_module._Served(wire.Claim("s", 16000, False), inbox)
    worker.sessions["s"] = served
    inbox.deliver(Msg(inbox.subject, wire.encode_control("keepalive")))
    served.last_heard = 0.0
    worker._free_silent(now=100.0, idle_s=5.0)
    assert not served.silent and not served.scope.cancel_called and served.last_heard == 100.0
    inbox._recv.receive_nowait()  # read: now the gateway has said nothing for 5 s
    worker._free_silent(now=105.0, idle_s=5.0)
    assert served.silent and served.scope.cancel_called


class _NoRepliesBus(InMemoryBus):
    """Answers to requests cannot be sent (the link dropped just then)."""

    def publish(self, subject: str, data: bytes, reply: str = "") -> None:
        if subject.startswith("nowhere"):
            raise BusError("NATS outbox is full")
        super().publish(subject, data, reply)


async def test_a_workers_lines_about_a_claim_or_a_silent_gateway_carry_the_session_ids(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """Logged by the claim loop and the silence timer, not by the session's own task: they
    carry the session and task ids under --log-json all the same."""
    caplog.handler.setFormatter(logs.JsonFormatter())
    bus = _NoRepliesBus()
    config = WorkerConfig(decoders=1, session_idle_timeout_s=4.0)
    worker = Worker(config, "asrd", bus, LoadtestEngine(1))
    claim = wire.Claim("s1", 16000, False, task_id="t1")
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.run)
        bus.publish(claim_subject("asrd", "en-US"), claim.encode(), reply="nowhere")
        with trio.fail_after(30):
            while worker.metrics.claims.values.get(("accepted",)) != 1:  # noqa: ASYNC110
                await trio.sleep(0.5)  # taken (the fake engine has no event to wait on)
            while worker.sessions:  # noqa: ASYNC110 - freed for silence
                await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    lines = [json.loads(line) for line in caplog.text.splitlines()]
    said = {line["message"].split(":")[0]: line for line in lines if "s1" in line["message"]}
    assert set(said) == {"claim of session s1 not answered", "session s1"}, lines
    for line in said.values():
        assert (line.get("session_id"), line.get("task_id")) == ("s1", "t1"), line


async def claimed(bus: InMemoryBus, claim: wire.Claim) -> None:
    """Claim a session of pool en-US on the in-memory bus; the worker must take it."""
    reply = await bus.request(claim_subject("asrd", "en-US"), claim.encode(), 1)
    assert wire.decode_claim_reply(reply).ok


class _StepRecorder:
    """A fake recognizer that notes the size of each accept() and what else ran between;
    its final pass costs what its engine's does."""

    state = ""

    def __init__(self, log: list[str], final_cost: float = 0.0, early_final: bool = False) -> None:
        self.log = log
        self.heard = 0
        self.final_cost = final_cost
        self.early_final = early_final

    def start(self) -> None:
        self.log.append("start")

    def accept(self, pcm: bytes) -> None:
        self.log.append(f"accept {len(pcm)}")
        self.heard += len(pcm)

    def partial(self) -> Any:
        from asrd.engines.base import Hypothesis

        return Hypothesis(f"heard {self.heard}", (), 0.0)

    def pause(self) -> None:
        self.log.append("pause")

    def finish(self) -> Any:
        from asrd.engines.base import EMPTY_HYPOTHESIS

        self.log.append("finish")
        return EMPTY_HYPOTHESIS


class _StepEngine:
    name = "steps"
    capacity = 1
    final_cost = 0.0
    early_final = False

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def acquire(self, sample_rate: int, *, partials: bool = True, state: str = "") -> Any:
        return _StepRecorder(self.log, self.final_cost, self.early_final)

    def release(self, recognizer: Any) -> None:
        pass


async def test_worker_decodes_a_long_message_in_steps_with_heartbeats_between() -> None:
    """A sentence's first message carries its pre-roll (a replay's can be seconds long): the
    worker decodes it 100 ms at a time and lets its other tasks run in between, so its event
    loop keeps showing progress to the heartbeat (which stops when the loop is stuck)."""
    log: list[str] = []
    bus = InMemoryBus()
    config = WorkerConfig(decoders=1, heartbeat_interval_s=1e-6)  # a tick is always due
    worker = Worker(config, "asrd", bus, _StepEngine(log))
    progress: list[float] = []
    record = _StepRecorder.accept

    def accept(self: _StepRecorder, pcm: bytes) -> None:
        progress.append(worker._progress)
        record(self, pcm)

    async with trio.open_nursery() as nursery:
        await nursery.start(worker.run)
        await claimed(bus, wire.Claim("s", 16000, False))
        inbox = session_in("asrd", "s")
        bus.publish(inbox, wire.encode_control("begin", 1))
        bus.publish(inbox, wire.encode_audio(1, bytes(32000)))  # 1 s at 16 kHz
        bus.publish(inbox, wire.encode_control("end", 1))
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(_StepRecorder, "accept", accept)
            with trio.fail_after(5):
                while "finish" not in log:  # noqa: ASYNC110 - the fake engine has no event
                    await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    # the event loop ran its heartbeat task between the steps
    assert len(progress) == 10 and len(set(progress)) > 1
    steps = [e for e in log if e.startswith("accept")]
    assert steps == ["accept 3200"] * 10


def test_passes_thrown_away_at_pauses_stay_within_a_share_of_the_audio() -> None:
    """A session may run its final pass at a pause while its passes thrown away have decoded
    at most EARLY_WASTE_BUDGET times its audio; a pass used costs nothing extra."""
    early = worker_module.EarlyFinals()
    assert early.allowed()  # the first always may
    early.heard(1000)
    early.ran(1000)
    assert early.heard(500)  # speech resumed: thrown away
    assert not early.heard(500)
    assert (early.audio, early.voided) == (2000, 1000)
    assert not early.allowed()  # 1000 > 0.25 * 2000
    early.heard(2000)
    assert early.allowed()  # 1000 <= 0.25 * 4000
    early.ran(3000)
    assert early.ended()  # the pause closed the sentence: used, nothing thrown away
    assert not early.ended()
    assert early.voided == 1000 and early.allowed()
    early.ran(100)
    early.ended()  # a restarted utterance forgets it too
    assert not early.heard(10)


async def test_a_worker_runs_the_final_pass_at_a_pause_unless_more_input_waits() -> None:
    """An engine with an early final pass asks for pause hints in its claim reply, and runs
    the pass on one. Input already waiting behind the hint means the speech resumed (the
    pass would be void) or the sentence ended (the pass runs at its end anyway): no pass."""
    log: list[str] = []
    bus = InMemoryBus()
    engine = _StepEngine(log)
    engine.early_final = True
    engine.final_cost = 1.0  # CPU s per audio s: what is announced is the audio's length
    worker = Worker(WorkerConfig(decoders=1), "asrd", bus, engine)
    announced: list[float] = []  # the audio seconds of each final pass announced
    pause = worker._pause

    def announce(pause_s: float) -> Any:
        announced.append(pause_s)
        return pause(pause_s)

    worker._pause = announce  # type: ignore[method-assign]
    inbox = session_in("asrd", "s")
    frame = bytes(3200)

    async def logged(entry: str, times: int) -> None:
        with trio.fail_after(5):
            while log.count(entry) < times:  # noqa: ASYNC110 - the fake engine has no event
                await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        await nursery.start(worker.run)
        claim = wire.Claim("s", 16000, False)
        reply = await bus.request(claim_subject("asrd", "en-US"), claim.encode(), 1)
        assert wire.decode_claim_reply(reply).pauses
        # With no utterance open (utt 0), a pause or an end is about nothing: ignored.
        bus.publish(inbox, wire.encode_control("pause", 0))
        bus.publish(inbox, wire.encode_control("end", 0))
        bus.publish(inbox, wire.encode_control("begin", 1))
        bus.publish(inbox, wire.encode_audio(1, frame))
        bus.publish(inbox, wire.encode_control("pause", 1))  # nothing behind it: a pass
        await logged("pause", 1)
        bus.publish(inbox, wire.encode_control("end", 1))
        await logged("finish", 1)
        bus.publish(inbox, wire.encode_control("begin", 2))
        bus.publish(inbox, wire.encode_audio(2, frame))
        bus.publish(inbox, wire.encode_control("pause", 2))  # with audio behind it
        bus.publish(inbox, wire.encode_audio(2, frame))
        bus.publish(inbox, wire.encode_control("end", 2))
        await logged("finish", 2)
        nursery.cancel_scope.cancel()
    first = ["start", "accept 3200", "pause", "finish"]
    assert log == [*first, "start", "accept 3200", "accept 3200", "finish"]
    assert worker.metrics.early_finals.values == {("used",): 1}
    # The pass is announced where it runs: at the pause, or at the end without one.
    assert announced == [0.1, 0.0, 0.2]


async def test_a_worker_asks_the_recognizer_whether_a_pass_is_due() -> None:
    """An engine whose sessions stop making a separate final pass (pocketsphinx's adaptive
    pass, once calibrated) still asks for pause hints; the worker runs a pass at one, and
    announces a final's pass, only as the session's recognizer stands."""
    log: list[str] = []
    bus = InMemoryBus()
    engine = _StepEngine(log)
    engine.early_final, engine.final_cost = True, 1.0
    worker = Worker(WorkerConfig(decoders=1), "asrd", bus, engine)
    announced: list[float] = []
    pause = worker._pause

    def announce(pause_s: float) -> Any:
        announced.append(pause_s)
        return pause(pause_s)

    worker._pause = announce  # type: ignore[method-assign]
    finish = _StepRecorder.finish

    def calibrated(self: _StepRecorder) -> Any:
        self.final_cost, self.early_final = 0.1, False  # the first final measured the channel
        return finish(self)

    inbox = session_in("asrd", "s")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_StepRecorder, "finish", calibrated)
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            await claimed(bus, wire.Claim("s", 16000, False))
            for utt in (1, 2):
                bus.publish(inbox, wire.encode_control("begin", utt))
                bus.publish(inbox, wire.encode_audio(utt, bytes(32000)))
                bus.publish(inbox, wire.encode_control("pause", utt))
                with trio.fail_after(5):  # taken, so the hint had nothing behind it
                    while worker.sessions["s"].inbox.pending:  # noqa: ASYNC110
                        await trio.sleep(0.01)
                bus.publish(inbox, wire.encode_control("end", utt))
                with trio.fail_after(5):
                    while log.count("finish") < utt:  # noqa: ASYNC110 - no event to wait on
                        await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert log.count("pause") == 1  # the second utterance's hint: no pass
    assert announced == [1.0, 0.0, pytest.approx(0.1)]  # at the pause, none at its end; live


async def test_a_worker_behind_decodes_what_waits_before_its_next_partial() -> None:
    """Audio that piled up (a sentence's pre-roll, a busy core) is decoded before the next
    partial, which then covers all of it: made earlier, it would be stale when it arrived.
    Not for ever: no more than MAX_PARTIAL_DEFER_MS of audio goes without one."""
    log: list[str] = []
    bus = InMemoryBus()
    worker = Worker(WorkerConfig(decoders=1), "asrd", bus, _StepEngine(log))
    results = await bus.subscribe(session_out("asrd", "s"))
    inbox = session_in("asrd", "s")
    frame = bytes(3200)  # 100 ms at 16 kHz; partials every 200 ms of audio by default

    async def decoded(finishes: int) -> None:
        with trio.fail_after(5):
            while log.count("finish") < finishes:  # noqa: ASYNC110 - the fake has no event
                await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        await nursery.start(worker.run)
        await claimed(bus, wire.Claim("s", 16000, True))
        # 2 s of audio waiting at once, then the end of the sentence
        bus.publish(inbox, wire.encode_control("begin", 1))
        for _ in range(20):
            bus.publish(inbox, wire.encode_audio(1, frame))
        bus.publish(inbox, wire.encode_control("end", 1))
        await decoded(1)
        # in real time: each frame decoded before the next arrives
        bus.publish(inbox, wire.encode_control("begin", 2))
        for _ in range(4):
            bus.publish(inbox, wire.encode_audio(2, frame))
            await trio.testing.wait_all_tasks_blocked()
        bus.publish(inbox, wire.encode_control("end", 2))
        await decoded(2)
        nursery.cancel_scope.cancel()
    partials = []
    while True:
        try:
            item = wire.decode_output(results._recv.receive_nowait().data)
        except trio.WouldBlock:
            break
        if isinstance(item, wire.Result) and not item.final:
            partials.append((item.utt, item.audio_ms))
    defer_ms = worker_module.MAX_PARTIAL_DEFER_MS
    # behind: one partial, forced once the deferral reached its bound, none just before the end
    assert partials == [(1, 200 + defer_ms), (2, 200), (2, 400)]


async def test_worker_takes_claims_again_after_a_burst_overflowed_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Claims beyond the backlog are lost (their gateways time out), but the worker must
    subscribe afresh rather than stop taking claims for good."""
    monkeypatch.setattr(worker_module, "CLAIM_BACKLOG", 2)
    bus = InMemoryBus()
    worker = Worker(WorkerConfig(decoders=1), "asrd", bus, LoadtestEngine(1))
    subject = claim_subject("asrd", "en-US")
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.run)
        for _ in range(5):  # delivered at once, before the claim loop runs: 3 too many
            bus.publish(subject, b"not a claim", reply="nobody")
        await trio.testing.wait_all_tasks_blocked()  # the worker noticed the overflow
        with trio.fail_after(5):
            reply = await bus.request(subject, wire.Claim("after", 16000, False).encode(), 1)
        assert wire.decode_claim_reply(reply).ok
        assert set(worker.sessions) == {"after"}
        nursery.cancel_scope.cancel()


def _link(
    bus: InMemoryBus, registry: WorkerRegistry, session_id: str, journal_max_bytes: int = 1 << 20
) -> RemoteRecognizer:
    return RemoteRecognizer(
        bus,
        registry,
        prefix="asrd",
        session_id=session_id,
        task_id="t" * 32,
        pool="en-US",
        sample_rate=16000,
        partials=False,
        claim_timeout_s=2.0,
        failover_timeout_s=10.0,
        journal_max_bytes=journal_max_bytes,
    )


def test_a_full_journal_blames_the_client_only_for_a_sentence_too_long() -> None:
    """The replay journal holds audio not yet final. Filled by one open sentence (possible
    only with enable_ignore_sentence_timeout) it is the client's doing: 40000000. Filled by
    sentences the engine has not finished, it is the server's: 50000000."""
    bus = InMemoryBus()
    registry = WorkerRegistry(bus, "asrd", timeout_s=1.0)
    frame = bytes(64 * 1024)
    long_sentence = _link(bus, registry, "s1")
    long_sentence.begin(1)
    with pytest.raises(ClientError, match="sentence longer than 1048576 bytes"):
        for _ in range(17):
            long_sentence.audio(1, frame)
    behind = _link(bus, registry, "s2")
    with pytest.raises(EngineFailed, match="fell more than 1048576 bytes of audio behind"):
        for utt in range(1, 6):
            behind.begin(utt)
            for _ in range(4):
                behind.audio(utt, frame)
            behind.end(utt)  # never finalised: the engine is behind


def test_the_journal_gives_the_cyclic_collector_nothing_to_examine() -> None:
    """A message journaled is an object the collector tracks, examined in every young
    collection that finds it alive: at 450 streams a tuple per message made most of a
    gateway's young generation, each collection a pause of every session of 15-80 ms
    (docs/benchmarks.md). Finalising still forgets exactly the utterances up to the one
    given, and their bytes."""
    bus = InMemoryBus()
    link = _link(bus, WorkerRegistry(bus, "asrd", timeout_s=1.0), "s1")
    for utt in (1, 2, 3):
        link.begin(utt)
        for _ in range(10):
            link.audio(utt, bytes(3200))
        link.end(utt)
    assert len(link.journal) == 36
    assert not any(gc.is_tracked(entry) for entry in link.journal)
    link.finalized(2)
    assert link.journal[0] == wire.encode_control("begin", 3) and len(link.journal) == 12
    assert link._journal_bytes == sum(len(data) for data in link.journal)
    link.finalized(3)
    assert link.journal == [] and link._journal_bytes == 0


async def _results_loop(link: RemoteRecognizer, failures: list[wire.Failure]) -> None:
    """A session's results loop, as far as flow control needs it."""
    assert link.results is not None
    async for msg in link.results:
        item = wire.decode_output(msg.data)
        if isinstance(item, wire.Progress):
            link.progressed(item)
        elif isinstance(item, wire.Failure):
            failures.append(item)
        elif isinstance(item, wire.Result) and item.final:
            link.finalized(item.utt)


@asynccontextmanager
async def _served_link(
    worker: Worker, registry: WorkerRegistry, **link: Any
) -> AsyncIterator[tuple[RemoteRecognizer, list[wire.Failure]]]:
    """A session's link to ``worker``, opened, its results loop running; the failures the
    worker sent it."""
    failures: list[wire.Failure] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(registry.run)
        await nursery.start(worker.run)
        opened = _link(worker.bus, registry, "s1", **link)  # type: ignore[arg-type]
        await opened.open()
        nursery.start_soon(_results_loop, opened, failures)
        yield opened, failures
        nursery.cancel_scope.cancel()


async def _push_flat_out(
    link: RemoteRecognizer,
    *,
    sentences: int,
    frames: int,
    frame: bytes,
    each: Callable[[], None] = lambda: None,
) -> None:
    """Sentences sent as a session does for a client that pushes audio as fast as it can:
    no pause but the flow control's. ``each`` runs after every frame."""
    for utt in range(1, sentences + 1):
        link.begin(utt)
        for _ in range(frames):
            link.audio(utt, frame)
            each()
            if link.engine_behind:
                await link.wait_for_engine()
        link.end(utt)


async def test_a_client_faster_than_its_worker_is_held_to_the_flow_control_window() -> None:
    """Audio pushed with no pause but the flow control's, through a real worker: each link
    waits while more than ENGINE_WINDOW of its messages are unacknowledged, and the worker
    acknowledges every PROGRESS_EVERY. The worker's input of a session holds 4096 messages:
    without flow control it overflowed, and the session ended "fell too far behind"."""
    bus = InMemoryBus()
    registry = WorkerRegistry(bus, "asrd", timeout_s=1.0)
    log: list[str] = []
    worker = Worker(WorkerConfig(decoders=1), "asrd", bus, _StepEngine(log))
    peak = 0
    async with _served_link(worker, registry) as (link, failures):

        def note_peak() -> None:
            nonlocal peak
            if "s1" in worker.sessions:
                peak = max(peak, worker.sessions["s1"].inbox.pending)

        # 10 sentences of 500 frames: 5,020 messages
        await _push_flat_out(link, sentences=10, frames=500, frame=bytes(320), each=note_peak)
        with trio.fail_after(5):
            while log.count("finish") < 10:  # noqa: ASYNC110 - the fake engine has no event
                await trio.sleep(0.01)
    assert not failures
    assert log.count("accept 320") == 5000
    assert remote_module.ENGINE_WINDOW - 2 <= peak <= remote_module.ENGINE_WINDOW + 1


async def test_a_client_sending_large_frames_is_held_before_its_journal_fills() -> None:
    """Flow control counts messages, and a client's frame may be 64 KiB (2 s of audio): 512
    of them are 32 MiB, twice the replay journal (16 MiB), which holds every message the
    engine has not finished. Such a client must wait for its worker too, not end with
    "the engine fell more than 16777216 bytes of audio behind"."""
    bus = InMemoryBus()
    registry = WorkerRegistry(bus, "asrd", timeout_s=1.0)
    log: list[str] = []
    worker = Worker(WorkerConfig(decoders=1), "asrd", bus, _StepEngine(log))
    frame = bytes(64 * 1024)
    journal = 16 * 1024 * 1024  # the default
    async with _served_link(worker, registry, journal_max_bytes=journal) as (link, failures):
        # 30 sentences of 20 frames (41 s): 660 messages, 39 MiB
        await _push_flat_out(link, sentences=30, frames=20, frame=frame)
        with trio.fail_after(5):
            while log.count("finish") < 30:  # noqa: ASYNC110 - the fake engine has no event
                await trio.sleep(0.01)
    assert not failures
    assert log.count("finish") == 30


async def test_a_worker_reports_progress_only_to_a_gateway_that_asks_for_it() -> None:
    """A gateway older than flow control ends the session on a result type it does not know
    (BusError "unknown result type 'progress'"): a worker sends progress reports, and offers
    them in its claim reply, only when the claim asks for them. Workers and gateways are
    upgraded one at a time, in either order."""
    bus = InMemoryBus()
    worker = Worker(WorkerConfig(decoders=1), "asrd", bus, _StepEngine([]))
    subject = claim_subject("asrd", "en-US")
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.run)
        for sid, asked in (("old", False), ("new", True)):
            results = await bus.subscribe(session_out("asrd", sid))
            claim = json.loads(wire.Claim(sid, 16000, False).encode())  # as an older gateway's
            if asked:
                claim["progress"] = True
            reply = wire.decode_claim_reply(
                await bus.request(subject, json.dumps(claim).encode(), 1)
            )
            assert reply.ok and reply.progress == (worker_module.PROGRESS_EVERY if asked else 0)
            inbox = session_in("asrd", sid)
            bus.publish(inbox, wire.encode_control("begin", 1))
            for _ in range(2 * worker_module.PROGRESS_EVERY):
                bus.publish(inbox, wire.encode_audio(1, bytes(320)))
            bus.publish(inbox, wire.encode_control("end", 1))
            with trio.fail_after(5):
                items = [wire.decode_output((await results.receive()).data)]
                while not isinstance(items[-1], wire.Result):
                    items.append(wire.decode_output((await results.receive()).data))
            progress = [i.received for i in items if isinstance(i, wire.Progress)]
            assert progress == ([64, 128] if asked else [])
            bus.publish(inbox, wire.encode_control("close"))  # its decoder for the next claim
            await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()


async def test_a_session_waits_out_a_pause_its_worker_announced(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A worker announces a final pass that will silence it (grace_s, up to 600 s): its
    heartbeats stop and it acknowledges nothing meanwhile, and the registry keeps it alive.
    A session waiting for it then waits out the pause too; ENGINE_STALL_S counts after it.
    It ended 60 s into a 100-s pass with 50000000 "acknowledged none"."""
    bus = InMemoryBus()
    registry = WorkerRegistry(bus, "asrd", timeout_s=1.0)
    log: list[str] = []
    engine = _StepEngine(log)
    engine.final_cost = 25.0  # 6 s of audio: a pause of 150 s announced (grace 301 s)
    record = _StepRecorder.finish

    def finish(self: _StepRecorder) -> Any:
        autojump_clock.jump(100.0)  # the pass holds the event loop: no beat, no report
        return record(self)

    worker = Worker(WorkerConfig(decoders=1), "asrd", bus, engine)
    async with _served_link(worker, registry) as (link, failures):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(_StepRecorder, "finish", finish)
            # 2 sentences of 600 frames (6 s)
            await _push_flat_out(link, sentences=2, frames=600, frame=bytes(320))
            with trio.fail_after(300):
                while log.count("finish") < 2:  # noqa: ASYNC110 - the fake engine has no event
                    await trio.sleep(0.01)
    assert not failures


async def test_a_session_waiting_for_its_worker_waits_out_its_failover(
    autojump_clock: trio.abc.Clock,
) -> None:
    """failover_timeout_s may be up to 600 s: a session that was waiting for its worker when
    the worker went waits for the failover, which has its own deadline, and not only for
    ENGINE_STALL_S. It ended 60 s into a 90-s failover with 50000000 "acknowledged none"."""
    bus = InMemoryBus()
    registry = WorkerRegistry(bus, "asrd", timeout_s=1.0)
    subject = claim_subject("asrd", "en-US")

    async def answer(claims: Subscription) -> None:
        msg = await claims.receive()
        bus.publish(msg.reply, wire.ClaimReply(True, "w1", progress=64).encode())

    async with trio.open_nursery() as nursery:
        await nursery.start(registry.run)
        link = _link(bus, registry, "s1")
        link._failover_timeout_s = 120.0
        claims = await bus.subscribe(subject, queue=worker_module.CLAIM_QUEUE)
        nursery.start_soon(answer, claims)
        await link.open()
        await bus.unsubscribe(claims)  # the pool's only worker is gone, for 90 s
        for _ in range(remote_module.ENGINE_WINDOW + 1):
            link.audio(0, b"x")
        waited = trio.Event()

        async def wait() -> None:
            await link.wait_for_engine()
            waited.set()

        nursery.start_soon(wait)
        nursery.start_soon(link._failover, "test")
        await trio.sleep(90)
        assert not waited.is_set()
        claims = await bus.subscribe(subject, queue=worker_module.CLAIM_QUEUE)
        nursery.start_soon(answer, claims)
        with trio.fail_after(1):
            await waited.wait()
        assert link.failovers == 1 and not link.engine_behind
        nursery.cancel_scope.cancel()


async def test_flow_control_counts_only_the_current_claim_and_needs_a_reporting_worker(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A worker that does not say it reports progress (an engine of another make) gets no
    flow control, as before. Progress of an older claim counts for nothing; a worker that
    acknowledges nothing for ENGINE_STALL_S ends the session instead of stalling it."""
    bus = InMemoryBus()
    registry = WorkerRegistry(bus, "asrd", timeout_s=1.0)
    subject = claim_subject("asrd", "en-US")
    claims = await bus.subscribe(subject, queue=worker_module.CLAIM_QUEUE)
    window = remote_module.ENGINE_WINDOW

    async def answer(progress: int) -> None:
        msg = await claims.receive()
        bus.publish(msg.reply, wire.ClaimReply(True, "w1", progress=progress).encode())

    async with trio.open_nursery() as nursery:
        await nursery.start(registry.run)
        foreign = _link(bus, registry, "s1")
        nursery.start_soon(answer, 0)
        await foreign.open()
        for _ in range(window * 2):
            foreign.audio(0, b"x")
        assert not foreign.engine_behind

        link = _link(bus, registry, "s2")
        nursery.start_soon(answer, 64)
        await link.open()
        for _ in range(window + 1):
            link.audio(0, b"x")
        assert link.engine_behind
        link.progressed(wire.Progress(64, epoch=1))  # not the current claim's
        assert link.engine_behind
        link.progressed(wire.Progress(64, epoch=0))
        assert not link.engine_behind
        for _ in range(64):
            link.audio(0, b"x")
        start = trio.current_time()
        with pytest.raises(EngineFailed, match="acknowledged none of 513 messages for 60 s"):
            await link.wait_for_engine()
        assert trio.current_time() - start == pytest.approx(remote_module.ENGINE_STALL_S)
        # After a pause the worker announced (100 s), the 60 s count from its end, and the
        # error says how long the session waited in all.
        start = trio.current_time()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(registry, "paused_until", lambda worker_id: start + 100.0)
            with pytest.raises(EngineFailed, match="acknowledged none of 513 messages for 160 s"):
                await link.wait_for_engine()

        # A session waiting for its worker moves on once another worker took it over: both
        # count afresh from the new claim, and the replay (merged into 64 KiB messages) counts.
        async def wait() -> None:
            await link.wait_for_engine()
            waited.set()

        waited = trio.Event()
        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        assert not waited.is_set()
        nursery.start_soon(answer, 64)
        await link._failover("test")
        await waited.wait()
        assert not link.engine_behind and len(link._unacked) == 1  # 577 bytes: one message
        nursery.cancel_scope.cancel()


async def test_a_claim_nobody_answers_is_sent_again_under_a_new_epoch(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A member of the claim queue group that never answers (a worker that died or hangs,
    still subscribed) costs the session one claim timeout, not the session."""
    bus = InMemoryBus()
    registry = WorkerRegistry(bus, "asrd", timeout_s=1.0)
    subject = claim_subject("asrd", "en-US")
    silent = await bus.subscribe(subject, queue=worker_module.CLAIM_QUEUE)  # first in turn
    session_input = await bus.subscribe(session_in("asrd", "s1"))
    worker = Worker(WorkerConfig(decoders=1), "asrd", bus, LoadtestEngine(1))
    async with trio.open_nursery() as nursery:
        await nursery.start(registry.run)
        await nursery.start(worker.run)
        link = _link(bus, registry, "s1")
        start = trio.current_time()
        await link.open()
        assert trio.current_time() - start == pytest.approx(2.0, abs=0.1)  # one timeout
        assert link.worker_id == worker.id and link.epoch == 1
        assert wire.decode_claim((await silent.receive()).data).epoch == 0
        # The close for whoever took the lost claim went out before the second claim.
        close = wire.decode_input((await session_input.receive()).data)
        assert isinstance(close, wire.ControlIn) and close.kind == "close"
        nursery.cancel_scope.cancel()


async def test_claims_of_a_failover_that_went_unanswered_are_all_void(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A failover claims again after a round of claims nobody answered. A worker may still take
    any of them late: each goes out under its own epoch, so none is the claim finally served
    (the round's last one and the next round's first once shared one, and a worker that took
    the one late decoded the session beside the other, its results accepted)."""
    bus = InMemoryBus()
    registry = WorkerRegistry(bus, "asrd", timeout_s=1.0)
    claims = await bus.subscribe(claim_subject("asrd", "en-US"), queue="q")
    session_input = await bus.subscribe(session_in("asrd", "s1"))
    epochs: list[int] = []

    async def slow_worker() -> None:  # answers only the fourth claim in time
        async for msg in claims:
            epochs.append(wire.decode_claim(msg.data).epoch)
            if len(epochs) == 4:
                bus.publish(msg.reply, wire.ClaimReply(True, "w1").encode())

    async with trio.open_nursery() as nursery:
        await nursery.start(registry.run)
        nursery.start_soon(slow_worker)
        link = _link(bus, registry, "s1")
        link.worker_id = "w0"  # serving the session until now, under epoch 0
        await link._failover("test")
        assert epochs == [1, 2, 3, 4], epochs
        assert link.worker_id == "w1" and link.epoch == 4
        # A close went out after each claim nobody answered (and one for w0 first).
        closes = 0
        while session_input.pending:
            closes += wire.decode_input(session_input._recv.receive_nowait().data) == (
                wire.ControlIn("close", 0)
            )
        assert closes == 4
        nursery.cancel_scope.cancel()


async def test_a_replay_of_many_small_frames_fits_the_workers_input(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A journal of more messages than a worker's input holds (4096: 20 s of 5 ms frames)
    is replayed with its audio merged, so the new worker is not 'too far behind' at once."""
    bus = InMemoryBus()
    registry = WorkerRegistry(bus, "asrd", timeout_s=1.0)
    worker = Worker(WorkerConfig(decoders=1), "asrd", bus, LoadtestEngine(1))
    async with trio.open_nursery() as nursery:
        await nursery.start(registry.run)
        await nursery.start(worker.run)
        link = _link(bus, registry, "s1")
        await link.open()
        link._paused = True  # as during a failover: the journal grows, nothing is sent
        link.begin(1)
        for _ in range(5000):  # 5 ms frames: 25 s, within the journal's 1 MiB
            link.audio(1, bytes(160))
        await link._failover("test")
        link.end(1)
        assert link.results is not None
        with trio.fail_after(30):
            item = wire.decode_output((await link.results.receive()).data)
            while isinstance(item, wire.Result) and not item.final:
                item = wire.decode_output((await link.results.receive()).data)
        assert isinstance(item, wire.Result) and item.final, item
        assert item.audio_ms == 5000 * 5
        nursery.cancel_scope.cancel()


def test_replayed_audio_is_merged_per_utterance_and_in_order() -> None:
    journal = [
        wire.encode_control("begin", 1),
        wire.encode_audio(1, b"ab"),
        wire.encode_audio(1, b"cd"),
        wire.encode_control("end", 1),
        wire.encode_control("begin", 2),
        wire.encode_audio(2, b"ef"),
    ]
    assert list(remote_module._replay(journal)) == [
        wire.encode_control("begin", 1),
        wire.encode_audio(1, b"abcd"),
        wire.encode_control("end", 1),
        wire.encode_control("begin", 2),
        wire.encode_audio(2, b"ef"),
    ]
    big = [wire.encode_audio(1, bytes(40_000)) for _ in range(3)]
    assert [len(m) for m in remote_module._replay(big)] == [5 + 40_000] * 3


class _SlowInputBus(InMemoryBus):
    """Subscribing to a session's input takes ``delay_s`` (a round trip to NATS, a loaded
    worker); with ``once``, only the first subscription."""

    def __init__(self, delay_s: float, *, once: bool = False) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.once = once
        self.slowed = False

    async def subscribe(self, subject: str, **kw: Any) -> Any:
        if subject.endswith(".in") and not (self.once and self.slowed):
            self.slowed = True
            await trio.sleep(self.delay_s)
        return await super().subscribe(subject, **kw)


async def test_a_claim_taken_while_the_worker_starts_draining_is_refused(
    autojump_clock: trio.abc.Clock,
) -> None:
    """drain() hands back the sessions it sees; one whose claim was half-way (subscribing) when
    it began would be missed and hold the drain up. It is refused instead: the gateway claims
    another worker."""
    bus = _SlowInputBus(0.001)
    worker = Worker(WorkerConfig(decoders=1), "asrd", bus, LoadtestEngine(1))
    subject = claim_subject("asrd", worker.config.pool)
    replies: list[wire.ClaimReply] = []

    async def claim() -> None:
        raw = await bus.request(subject, wire.Claim("s1", 16000, False).encode(), 2)
        replies.append(wire.decode_claim_reply(raw))

    async with trio.open_nursery() as nursery:
        await nursery.start(worker.run)
        nursery.start_soon(claim)
        await trio.sleep(0.0005)  # the worker is subscribing to the session's input now
        start = trio.current_time()
        await worker.drain()
        assert trio.current_time() - start < 0.1
        await trio.sleep(0.01)
        assert [r.ok for r in replies] == [False] and "draining" in replies[0].reason
        assert worker.free == 1 and not worker.sessions
        nursery.cancel_scope.cancel()


class _ReconnectingBus(InMemoryBus):
    """An in-memory bus whose reconnect count a test can raise."""

    reconnect_count = 0

    @property
    def reconnects(self) -> int:
        return self.reconnect_count


async def test_a_worker_whose_own_link_reconnected_hands_its_sessions_back() -> None:
    """What the gateway sent while only the worker's link was down is lost, and the gateway
    does not know: the worker gives the session back (handoff), and the gateway replays its
    journal to whichever worker claims it next."""
    log: list[str] = []
    bus = _ReconnectingBus()
    worker = Worker(WorkerConfig(decoders=1), "asrd", bus, _StepEngine(log))
    results = await bus.subscribe(session_out("asrd", "s"))
    inbox = session_in("asrd", "s")
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.run)
        await claimed(bus, wire.Claim("s", 16000, False, epoch=3))
        bus.publish(inbox, wire.encode_control("begin", 1))
        bus.publish(inbox, wire.encode_audio(1, bytes(3200)))
        with trio.fail_after(5):
            while "accept 3200" not in log:  # noqa: ASYNC110 - the fake engine has no event
                await trio.sleep(0.01)
        bus.reconnect_count = 1  # the worker's link dropped and came back
        bus.publish(inbox, wire.encode_audio(1, bytes(3200)))  # the first message after it
        with trio.fail_after(5):
            answer = wire.decode_output((await results.receive()).data)
            while worker.sessions:  # noqa: ASYNC110 - the session task ends on its own
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert answer == wire.Handoff(3)
    assert log.count("accept 3200") == 1 and worker.free == 1


async def test_a_reconnect_while_claiming_is_followed_by_a_replay(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The bus reconnects while the first claim is on its way (messages may be lost): the
    session must fail over and replay, not distrust every result for the rest of its life."""
    bus = _ReconnectingBus()
    registry = WorkerRegistry(bus, "asrd", timeout_s=1.0)
    claims = await bus.subscribe(claim_subject("asrd", "en-US"), queue="q")

    async def fake_worker() -> None:
        async for msg in claims:
            if not bus.reconnect_count:
                bus.reconnect_count = 1  # the link dropped and came back meanwhile
            assert msg.reply
            bus.publish(msg.reply, wire.ClaimReply(True, "w1").encode())

    async def beats() -> None:
        while True:
            bus.publish(
                heartbeat_subject("asrd"), wire.Heartbeat("w1", "en-US", "x", 1, 0).encode()
            )
            await trio.sleep(0.25)

    async with trio.open_nursery() as nursery:
        await nursery.start(registry.run)
        nursery.start_soon(fake_worker)
        nursery.start_soon(beats)
        link = _link(bus, registry, "s1")
        await link.open()
        nursery.start_soon(link.watch_loop)
        await trio.sleep(3)
        assert link.failovers == 1
        assert link.current(wire.Result(True, 1, 100, "hi", (), 1.0, link.epoch))
        nursery.cancel_scope.cancel()


async def test_a_worker_that_answered_a_claim_too_late_lets_go(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The claim timed out and went to another worker; the first one took it anyway, after the
    gateway's close. The keepalives carry the new epoch: it lets go, and the session is
    decoded once."""
    bus = _SlowInputBus(3.0, once=True)
    registry = WorkerRegistry(bus, "asrd", timeout_s=1.0)
    workers = [Worker(WorkerConfig(decoders=1), "asrd", bus, LoadtestEngine(1)) for _ in "ab"]
    async with trio.open_nursery() as nursery:
        await nursery.start(registry.run)
        for w in workers:
            await nursery.start(w.run)
        await trio.sleep(0.5)
        link = _link(bus, registry, "s1")
        await link.open()
        nursery.start_soon(link.watch_loop)
        assert link.epoch == 1
        await trio.sleep(10)
        assert [list(w.sessions) for w in workers].count(["s1"]) == 1
        assert [w.id for w in workers if w.sessions] == [link.worker_id]
        nursery.cancel_scope.cancel()


async def test_a_claim_older_than_the_one_served_is_void(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Claims of one session can reach a worker out of order: one left in a drained claim
    subscription is read after the next subscription took a newer one. The older claim is
    void; it once restarted the session under its epoch, whose results the gateway drops,
    and the next keepalive (newer epoch) then ended it: the session hung, decoded by nobody."""
    bus = InMemoryBus()
    worker = Worker(WorkerConfig(decoders=2), "asrd", bus, LoadtestEngine(2))
    results = await bus.subscribe(session_out("asrd", "s"))
    inbox = session_in("asrd", "s")
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.run)
        await claimed(bus, wire.Claim("s", 16000, False, epoch=2))
        served = worker.sessions["s"]
        stale = wire.Claim("s", 16000, False, epoch=1).encode()
        reply = await bus.request(claim_subject("asrd", "en-US"), stale, 1)
        assert not wire.decode_claim_reply(reply).ok
        assert worker.sessions["s"] is served and worker.free == 1
        bus.publish(inbox, wire.encode_control("keepalive", epoch=2))
        bus.publish(inbox, wire.encode_control("begin", 1))
        bus.publish(inbox, wire.encode_audio(1, bytes(3200)))
        bus.publish(inbox, wire.encode_control("end", 1))
        with trio.fail_after(5):
            final = wire.decode_output((await results.receive()).data)
        assert isinstance(final, wire.Result) and final.final and final.epoch == 2
        assert worker.sessions["s"] is served
        nursery.cancel_scope.cancel()


async def test_claims_of_one_session_read_from_two_claim_subscriptions_leave_one_served(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A drained claim subscription is still read while the next one takes claims. Two claims
    of one session, one from each, must not both get a decoder: the newer one is served."""
    bus = _SlowInputBus(1.0, once=True)
    engine = LoadtestEngine(2)
    worker = Worker(WorkerConfig(decoders=2), "asrd", bus, engine)
    results = await bus.subscribe(session_out("asrd", "s"))
    subject = claim_subject("asrd", "en-US")
    drained = Subscription(subject, 16)
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.run)
        nursery.start_soon(worker._claim_loop, drained)
        drained.deliver(Msg(subject, wire.Claim("s", 16000, False, epoch=1).encode()))
        await trio.sleep(0.5)  # that claim's worker is subscribing to the session's input
        await claimed(bus, wire.Claim("s", 16000, False, epoch=2))
        await trio.sleep(1)
        assert worker.sessions["s"].claim.epoch == 2 and engine.available == 1
        inbox = session_in("asrd", "s")
        for data in (wire.encode_control("begin", 1), wire.encode_control("end", 1)):
            bus.publish(inbox, data)
        await trio.sleep(1)
        final = wire.decode_output(results._recv.receive_nowait().data)
        assert isinstance(final, wire.Result) and final.final and final.epoch == 2
        assert not results.pending  # decoded once
        nursery.cancel_scope.cancel()


async def test_a_session_ended_during_a_failover_claim_frees_the_claimed_decoder(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The session ends (the client hung up) while a failover's claim is on its way. The
    claim must still be waited for: cancelled, the session's close went out before the worker
    listened, and the worker held a decoder for nobody until its silence timeout."""
    bus = _SlowInputBus(1.0)
    registry = WorkerRegistry(bus, "asrd", timeout_s=1.0)
    config = WorkerConfig(decoders=2, session_idle_timeout_s=3600)
    worker = Worker(config, "asrd", bus, LoadtestEngine(2))
    async with trio.open_nursery() as nursery:
        await nursery.start(registry.run)
        await nursery.start(worker.run)
        link = _link(bus, registry, "s1")
        await link.open()
        with trio.move_on_after(0.5):  # the session ends: the failover's claim is half-way
            await link._failover("test")
        await link.aclose()
        with trio.fail_after(60):  # virtual time: far below the silence timeout
            while worker.metrics.claims.values.get(("accepted",)) != 2:  # noqa: ASYNC110
                await trio.sleep(0.1)  # the failover's claim taken (no event to wait on)
            while worker.sessions:  # noqa: ASYNC110 - the session task ends on its own
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()


async def test_a_session_ended_during_a_claim_sends_no_further_claim(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The claim on its way is waited for, but none is sent after it once the session ended."""
    bus = InMemoryBus()
    registry = WorkerRegistry(bus, "asrd", timeout_s=1.0)
    silent = await bus.subscribe(claim_subject("asrd", "en-US"), queue=worker_module.CLAIM_QUEUE)
    link = _link(bus, registry, "s1")
    with trio.move_on_after(1):  # the client hangs up during the first claim
        await link.open()
    assert trio.current_time() == pytest.approx(2.0)  # that claim's timeout, not three
    assert silent.pending == 1 and link.epoch == 1  # and a close for whoever takes it late


async def test_a_late_busy_answer_does_not_cost_the_free_decoders_of_other_workers(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A worker too loaded to answer at once says "busy" only after the claim's wait for a
    decoder is over. The claim goes on to a worker with a free decoder, not to 40000005."""
    bus = InMemoryBus()
    registry = WorkerRegistry(bus, "asrd", timeout_s=1.0)
    subject = claim_subject("asrd", "en-US")
    loaded = await bus.subscribe(subject, queue=worker_module.CLAIM_QUEUE)  # first in turn
    worker = Worker(WorkerConfig(decoders=1), "asrd", bus, LoadtestEngine(1))

    async def answer_busy_late() -> None:
        msg = await loaded.receive()
        await trio.sleep(BUSY_WAIT_S + 0.5)
        await bus.unsubscribe(loaded)  # full: a worker leaves the group before it answers
        busy = wire.ClaimReply(False, "loaded", TooManyRequests.code, "worker is full")
        bus.publish(msg.reply, busy.encode())

    async with trio.open_nursery() as nursery:
        await nursery.start(registry.run)
        await nursery.start(worker.run)
        nursery.start_soon(answer_busy_late)
        link = _link(bus, registry, "s3")
        start = trio.current_time()
        await link.open()
        assert link.worker_id == worker.id
        assert trio.current_time() - start > BUSY_WAIT_S
        nursery.cancel_scope.cancel()


async def test_claims_refused_busy_end_in_40000005_once_each_worker_said_so(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A worker that keeps answering "busy" (it never leaves the group) still ends the claim:
    after the wait, once per alive worker, not forever."""
    bus = InMemoryBus()
    registry = WorkerRegistry(bus, "asrd", timeout_s=1.0)
    subject = claim_subject("asrd", "en-US")
    stuck = await bus.subscribe(subject, queue=worker_module.CLAIM_QUEUE)
    refused_at: list[float] = []

    async def always_busy() -> None:
        while True:
            msg = await stuck.receive()
            refused_at.append(trio.current_time())
            busy = wire.ClaimReply(False, "stuck", TooManyRequests.code, "worker is full")
            bus.publish(msg.reply, busy.encode())

    async with trio.open_nursery() as nursery:
        await nursery.start(registry.run)
        for worker_id in ("stuck", "other"):  # the pool has two workers alive
            beat = wire.Heartbeat(worker_id, "en-US", "loadtest", 1, 0, False, 0.0)
            bus.publish(heartbeat_subject("asrd"), beat.encode())
        nursery.start_soon(always_busy)
        start = trio.current_time()
        with pytest.raises(TooManyRequests, match="busy"):
            await _link(bus, registry, "s4").open()
        nursery.cancel_scope.cancel()
    # Every 50 ms during the wait; past it, once more for each of the two workers and the
    # refusal that ends the claim.
    late = [t for t in refused_at if t >= start + BUSY_WAIT_S]
    assert len(refused_at) > len(late) > 0 and len(late) == 3


async def test_claims_nobody_answers_end_in_a_server_error(
    autojump_clock: trio.abc.Clock,
) -> None:
    bus = InMemoryBus()
    registry = WorkerRegistry(bus, "asrd", timeout_s=1.0)
    silent = await bus.subscribe(claim_subject("asrd", "en-US"), queue=worker_module.CLAIM_QUEUE)
    start = trio.current_time()
    with pytest.raises(ServerError, match="answered 3 claims of 2 s"):
        await _link(bus, registry, "s2").open()
    assert trio.current_time() - start == pytest.approx(6.0, abs=0.1)
    epochs = [wire.decode_claim(silent._recv.receive_nowait().data).epoch for _ in range(3)]
    assert epochs == [0, 1, 2]


def test_worker_heartbeat_stops_when_its_event_loop_is_stuck() -> None:
    """The periodic beat is made on the bus's thread; it vouches for the event loop only while
    the loop keeps ticking (or within a pause it announced)."""
    worker = Worker(WorkerConfig(decoders=1), "asrd", InMemoryBus(), LoadtestEngine(1))
    now = time.monotonic()
    worker._progress = now
    beat = worker._regular_beat()
    assert beat is not None and wire.decode_heartbeat(beat).worker_id == worker.id
    worker._progress = now - STALL_S - 1  # stuck
    assert worker._regular_beat() is None
    worker._pause_until = now + 30  # ... unless it announced a long final pass
    assert wire.decode_heartbeat(worker._regular_beat() or b"").grace_s > 25


@pytest.mark.parametrize("ended_by", ["end", "begin"])
async def test_the_grace_of_a_final_pass_ends_with_the_pass(ended_by: str) -> None:
    """The pause is announced generously (twice the estimate, plus a second), so a worker
    killed after the pass would be covered by what is left of it for seconds: the beats
    announce it only while the pass runs. An utterance restarted by a replay's ``begin``
    (a foreign gateway may send one) has its pass thrown away, but it costs as much."""
    log: list[str] = []
    engine = _StepEngine(log)
    engine.final_cost = 0.5  # as pocketsphinx's batch pass: 3 s of audio -> 4 s announced
    bus = InMemoryBus()
    worker = Worker(WorkerConfig(decoders=1), "asrd", bus, engine)
    results = await bus.subscribe(session_out("asrd", "s"))
    during: list[float] = []
    finish = _StepRecorder.finish

    def timed_finish(self: _StepRecorder) -> Any:
        during.append(wire.decode_heartbeat(worker._heartbeat()).grace_s)
        return finish(self)

    async with trio.open_nursery() as nursery:
        await nursery.start(worker.run)
        await claimed(bus, wire.Claim("s", 16000, False))
        inbox = session_in("asrd", "s")
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(_StepRecorder, "finish", timed_finish)
            for message in (
                wire.encode_control("begin", 1),
                wire.encode_audio(1, bytes(3 * 32000)),
                wire.encode_control(ended_by, 1 if ended_by == "end" else 2),
                wire.encode_control("end", 2),  # an empty utterance: no pause
            ):
                bus.publish(inbox, message)
            with trio.fail_after(5):
                while not isinstance(  # the one result, after every pass
                    wire.decode_output((await results.receive()).data), wire.Result
                ):
                    pass
        after = wire.decode_heartbeat(worker._heartbeat()).grace_s
        nursery.cancel_scope.cancel()
    assert during[0] > 3.5 and after == 0.0, (during, after)


async def test_the_worker_counts_audio_it_decodes_also_without_a_final() -> None:
    """asrd_worker_audio_seconds_total, "audio decoded", counted only utterances that ended
    in a final: one restarted by a replay, or cut off by a close, was decoded for nothing."""
    log: list[str] = []
    bus = InMemoryBus()
    worker = Worker(WorkerConfig(decoders=1), "asrd", bus, _StepEngine(log))
    results = await bus.subscribe(session_out("asrd", "s"))
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.run)
        await claimed(bus, wire.Claim("s", 16000, False))
        inbox = session_in("asrd", "s")
        for message in (
            wire.encode_control("begin", 1),
            wire.encode_audio(1, bytes(32000)),  # 1 s, then restarted: no final
            wire.encode_control("begin", 2),
            wire.encode_audio(2, bytes(16000)),  # 0.5 s, with a final
            wire.encode_control("end", 2),
        ):
            bus.publish(inbox, message)
        with trio.fail_after(5):
            while not isinstance(wire.decode_output((await results.receive()).data), wire.Result):
                pass
        nursery.cancel_scope.cancel()
    assert worker.metrics.audio.values[()] == pytest.approx(1.5)
    assert worker.metrics.utterances.values[()] == 1


class _FaultyEngine(_StepEngine):
    """Raises once, in acquire() or release(), as an engine with a bug might."""

    capacity = 2

    def __init__(self, log: list[str]) -> None:
        super().__init__(log)
        self.fails_in = ""  # "acquire" or "release": raise there next

    def _fail(self, where: str) -> None:
        if self.fails_in == where:
            self.fails_in = ""
            raise RuntimeError(f"bug in {where}")

    def acquire(self, sample_rate: int, *, partials: bool = True, state: str = "") -> Any:
        self._fail("acquire")
        return super().acquire(sample_rate, partials=partials)

    def release(self, recognizer: Any) -> None:
        self._fail("release")


@pytest.mark.parametrize("fails_in", ["acquire", "release"])
async def test_an_engine_error_taking_or_giving_back_a_decoder_ends_one_session_only(
    fails_in: str, autojump_clock: trio.abc.Clock
) -> None:
    """An exception of the engine's acquire() or release() escaped into the worker's nursery
    and ended the worker, with every session it served; now it ends the one session."""
    bus = InMemoryBus()
    engine = _FaultyEngine([])
    worker = Worker(WorkerConfig(decoders=2), "asrd", bus, engine)
    subject = claim_subject("asrd", "en-US")
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.run)
        await claimed(bus, wire.Claim("other", 16000, False))
        engine.fails_in = fails_in
        reply = wire.decode_claim_reply(
            await bus.request(subject, wire.Claim("s", 16000, False).encode(), 1)
        )
        if fails_in == "acquire":
            assert (reply.ok, reply.code) == (False, 50000000)
            assert "bug in acquire" in reply.reason
        else:
            assert reply.ok
            bus.publish(session_in("asrd", "s"), wire.encode_control("close"))
            await trio.sleep(1)
        assert set(worker.sessions) == {"other"}
        await claimed(bus, wire.Claim("next", 16000, False))  # the worker still serves
        assert set(worker.sessions) == {"other", "next"}
        nursery.cancel_scope.cancel()


def test_services_freeze_startup_objects_and_collect_less_often() -> None:
    import gc

    from asrd import gctune

    before = gc.get_threshold()
    try:
        gctune.tune()
        assert gc.get_freeze_count() > 1000  # the imported modules' objects
        assert gc.get_threshold()[0] == gctune.GEN0_THRESHOLD > before[0]
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_tuning_again_thaws_what_the_last_tuning_froze() -> None:
    """The load generator tunes before each run of a capacity search: what the last run
    froze and has since become garbage must still be found."""
    import gc
    import weakref

    from asrd import gctune

    class Node:
        pass

    before = gc.get_threshold()
    try:
        node = Node()
        node.self = node  # type: ignore[attr-defined]
        cycle = weakref.ref(node)
        gctune.tune()  # frozen while alive
        del node
        gc.collect()
        assert cycle() is not None  # frozen objects are not examined ...
        gctune.tune()
        assert cycle() is None  # ... until the next tuning thaws them
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_free_lists_are_emptied_without_examining_any_object() -> None:
    """What the gateway runs every minute: the free lists go, as after a full collection,
    but the collector looks at nothing (so a loaded gateway does not pause)."""
    import gc
    import sys
    import weakref

    from asrd import gctune

    class Node:
        pass

    gc.disable()  # no automatic collection in between
    try:
        node = Node()
        node.self = node  # type: ignore[attr-defined]
        cycle = weakref.ref(node)
        del node  # garbage that only the collector can find
        tuples = [tuple([i]) for i in range(5000)]
        del tuples  # 2,000 of them stay allocated, on the 1-tuple free list
        full = gc.get_stats()[2]["collections"]
        blocks = sys.getallocatedblocks()
        gctune.empty_free_lists()
        assert blocks - sys.getallocatedblocks() >= 2000
        assert gc.get_stats()[2]["collections"] == full + 1
        assert cycle() is not None  # not examined ...
        assert gc.get_freeze_count() == 0  # ... and nothing left frozen
        gctune.full_collection()
        assert cycle() is None  # a worker's full collection does examine it
        assert gc.get_stats()[2]["collections"] == full + 2
    finally:
        gc.enable()


async def test_free_lists_are_emptied_every_minute(autojump_clock: trio.abc.Clock) -> None:
    from asrd import gctune

    start = trio.current_time()
    runs: list[float] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gctune.periodically, lambda: runs.append(trio.current_time() - start))
        await trio.sleep(gctune.FREE_LISTS_INTERVAL_S * 3 + 1)
        nursery.cancel_scope.cancel()
    assert [round(t) for t in runs] == [60, 120, 180]


async def test_a_write_cut_off_part_way_refuses_every_later_write() -> None:
    """A frame torn by a cancelled write must not be followed by another frame (the
    session's TaskFailed), which the client would read as the rest of the torn one."""
    inner, client = trio.testing.lockstep_stream_pair()
    stream = ClientStream(inner, b"", b"")
    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as scope:

            async def read_part() -> None:
                assert await client.receive_some(3) == b"012"  # the client takes 3 bytes...
                scope.cancel()  # ...and the write is cancelled (a timeout, a shutdown)

            nursery.start_soon(read_part)
            await stream.send_all(b"0123456789")
    with pytest.raises(trio.BrokenResourceError, match="cut off part-way"):
        await stream.send_all(b"TaskFailed")


async def test_a_write_cancelled_before_its_first_byte_leaves_the_stream_whole() -> None:
    inner, client = trio.testing.lockstep_stream_pair()
    stream = ClientStream(inner, b"", b"")
    with trio.CancelScope() as scope:
        scope.cancel()
        await stream.send_all(b"never")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.send_all, b"TaskFailed")
        assert await client.receive_some(100) == b"TaskFailed"


def client_frames(*events: Any) -> bytes:
    """Masked client frames, as wsproto (a real client's library) writes them."""
    from wsproto.connection import Connection, ConnectionType

    conn = Connection(ConnectionType.CLIENT)
    return b"".join(conn.send(event) for event in events)


def test_the_frame_counter_counts_frames_of_every_length_however_they_are_split() -> None:
    from wsproto.events import BytesMessage, Ping, Pong, TextMessage

    from asrd.clientstream import FrameCounter

    sizes = (0, 1, 125, 126, 127, 65535, 65536, 70000)
    data = client_frames(
        *(BytesMessage(bytes(n)) for n in sizes),
        Ping(b""),
        Pong(b"x"),
        TextMessage("{}"),
        BytesMessage(b"ab", message_finished=False),
        BytesMessage(b"cd"),  # a continuation frame
    )
    frames = len(sizes) + 5
    assert FrameCounter().feed(data) == frames
    for step in (1, 2, 3, 7, 100, 4096):
        counter = FrameCounter()
        assert sum(counter.feed(data[i : i + step]) for i in range(0, len(data), step)) == frames


async def test_a_client_flooding_frames_is_read_no_faster_than_the_frame_rate(
    autojump_clock: trio.abc.Clock,
) -> None:
    """20,000 empty pings: a burst of 4,000, the rest at 2,000 a second, 8 s in all."""
    from wsproto.events import Ping

    from asrd.clientstream import FRAME_BURST, FRAMES_PER_S

    pings = client_frames(*(Ping(b"") for _ in range(20_000)))
    send, receive = trio.testing.memory_stream_one_way_pair()
    await send.send_all(pings)
    stream = ClientStream(receive, b"GET / HTTP/1.1\r\n\r\n", b"")  # type: ignore[arg-type]
    start = trio.current_time()
    read = len(await stream.receive_some())  # the head
    while read < len(pings) + 18:
        read += len(await stream.receive_some(4096))
    expected = (20_000 - FRAME_BURST) / FRAMES_PER_S
    assert expected - 0.1 <= trio.current_time() - start <= expected + 0.1


async def test_an_asyncio_thread_closes_its_loop_when_it_ends() -> None:
    from asrd.aiothread import open_asyncio_thread

    async def answer() -> int:
        return 42

    async with open_asyncio_thread("test-loop") as thread:
        assert await thread.run(answer()) == 42
    assert thread.loop.is_closed()


class _FullOutboxBus(InMemoryBus):
    """Publishing a session's results fails, as it does when NATS is away long enough for the
    outbox to fill."""

    full = False

    def publish(self, subject: str, data: bytes, reply: str = "") -> None:
        if self.full and subject.endswith(".out"):
            raise BusError("NATS outbox is full (the server is unreachable or too slow)")
        super().publish(subject, data, reply)


async def test_a_session_whose_last_word_cannot_be_sent_ends_alone(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A final that cannot be published ends its session, and so does its failure, which
    cannot be published either: that used to escape into the worker's nursery and end the
    worker, with every other session it served."""
    bus = _FullOutboxBus()
    worker = Worker(WorkerConfig(decoders=3), "asrd", bus, LoadtestEngine(3))
    inbox = session_in("asrd", "s")
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.run)
        await claimed(bus, wire.Claim("other", 16000, False))
        await claimed(bus, wire.Claim("s", 16000, False))
        bus.full = True
        bus.publish(inbox, wire.encode_control("begin", 1))
        bus.publish(inbox, wire.encode_audio(1, bytes(3200)))
        bus.publish(inbox, wire.encode_control("end", 1))
        await trio.sleep(1)
        assert set(worker.sessions) == {"other"}
        bus.full = False
        await claimed(bus, wire.Claim("next", 16000, False))  # the worker still serves
        assert set(worker.sessions) == {"other", "next"}
        nursery.cancel_scope.cancel()
