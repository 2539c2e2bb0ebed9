"""End-to-end: real nats-server, real pocketsphinx worker processes, the gateway, real clients.

Every test streams real LibriVox recordings and checks what a user would check: event order,
field types, stream times, WER against the reference transcripts, and error codes.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from functools import partial
from typing import Any

import pocketsphinx
import pytest
import trio
import trio_websocket

from asrd.client import open_transcription, pcm_chunks
from asrd.engines.pocketsphinx import DECODER_DEFAULTS
from asrd.wer import wer
from tests import sdk
from tests.audio_fixtures import LIBRIVOX, Clip, assemble, load_clip, silence, transcripts
from tests.conftest import Nats, Pool, RunningGateway, open_gateway

pytestmark = pytest.mark.integration

CLIPS = sorted(LIBRIVOX)
GUARD_S = 120  # a hang guard, not a speed threshold


def offline_wer() -> float:
    """The reference: each whole clip decoded in one call by a fresh pocketsphinx decoder."""
    refs, hyps = [], []
    for name in CLIPS:
        decoder = pocketsphinx.Decoder(loglevel="ERROR", **DECODER_DEFAULTS)
        decoder.start_utt()
        decoder.process_raw(load_clip(name), full_utt=True)
        decoder.end_utt()
        hyps.append(decoder.hyp().hypstr if decoder.hyp() else "")
        refs.append(transcripts()[name])
    return wer(refs, hyps)


async def transcribe(
    url: str, pcm: bytes, rate: int = 16000, *, frame_ms: int = 100, **params: Any
) -> list[dict[str, Any]]:
    events = []
    with trio.fail_after(GUARD_S):
        async with open_transcription(
            url,
            pcm_chunks(pcm),
            rate,
            token="t",
            appkey="default",
            realtime=False,
            frame_ms=frame_ms,
            params=params,
        ) as tr:
            async for event in tr:
                events.append(event)
    return events


def finals(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e["payload"] for e in events if e["header"]["name"] == "SentenceEnd"]


def text_of(events: list[dict[str, Any]]) -> str:
    return " ".join(p["result"] for p in finals(events) if p["result"])


def check_order(names: list[str], indexes: list[int | None]) -> None:
    """Started, then per sentence Begin (Changed...) End, then Completed."""
    assert names[0] == "TranscriptionStarted" and names[-1] == "TranscriptionCompleted"
    expected_index = 1
    state = "between"
    for name, index in zip(names[1:-1], indexes[1:-1], strict=True):
        if name == "SentenceBegin":
            assert state == "between" and index == expected_index
            state = "in"
        elif name == "TranscriptionResultChanged":
            assert state == "in" and index == expected_index
        elif name == "SentenceEnd":
            assert state == "in" and index == expected_index
            state, expected_index = "between", expected_index + 1
        else:
            raise AssertionError(f"unexpected {name}")
    assert state == "between"


# --- the official SDK -------------------------------------------------------------------


async def test_official_sdk_streams_librivox_with_correct_events_and_wer(
    gateway: RunningGateway,
) -> None:
    """The whole corpus through the official Alibaba SDK, one clip per session."""
    refs, hyps = [], []
    for name in CLIPS:
        pcm = silence(500, 16000) + load_clip(name) + silence(1000, 16000)
        run = await trio.to_thread.run_sync(
            partial(sdk.transcribe, gateway.url, pcm, speed=4.0, ex={"enable_words": True})
        )
        assert run.error is None, run.error
        names = run.names()
        check_order(names, [m.get("payload", {}).get("index") for _, m in run.events])
        assert "TranscriptionResultChanged" in names
        for _, msg in run.events:
            header = msg["header"]
            assert type(header["status"]) is int and header["status"] == 20000000
            assert header["namespace"] == "SpeechTranscriber"
            assert len(header["message_id"]) == 32
        for s in run.sentences():
            assert isinstance(s["index"], int) and isinstance(s["time"], int)
            assert isinstance(s["begin_time"], int) and s["begin_time"] < s["time"]
            assert isinstance(s["confidence"], float) and 0.0 <= s["confidence"] <= 1.0
            assert s["status"] == 20000000
            for w in s["words"]:
                assert set(w) == {"text", "startTime", "endTime"}
                assert s["begin_time"] <= w["startTime"] < w["endTime"] <= s["time"]
        refs.append(transcripts()[name])
        hyps.append(run.text())
    streamed = wer(refs, hyps)
    reference = offline_wer()
    assert streamed <= reference + 0.02, (streamed, reference, hyps)


async def test_confidence_is_derived_from_the_decoder(gateway: RunningGateway) -> None:
    values = set()
    for name in CLIPS[:3]:
        events = await transcribe(gateway.url, load_clip(name) + silence(1000, 16000))
        values |= {p["confidence"] for p in finals(events)}
    assert len(values) >= 2  # not a constant


async def test_sdk_control_message_and_stop_without_payload(gateway: RunningGateway) -> None:
    pcm, _ = assemble([silence(300, 16000), Clip(load_clip("0880")), silence(1500, 16000)], 16000)

    def run() -> sdk.SdkRun:
        result = sdk.SdkRun()
        import nls

        t = nls.NlsSpeechTranscriber(
            url=gateway.url,
            token="x",
            appkey="default",
            on_sentence_end=lambda m, *a: result.events.append(("SentenceEnd", json.loads(m))),
            on_completed=lambda m, *a: result.events.append(("TranscriptionCompleted", {})),
            on_error=lambda m, *a: setattr(result, "error", json.loads(m)),
        )
        t.start(aformat="pcm", sample_rate=16000)
        t.ctrl(max_sentence_silence=400, junk_key={"nested": [1, 2]})
        for i in range(0, len(pcm), 3200):
            t.send_audio(pcm[i : i + 3200])
        t.stop()
        t.shutdown()
        return result

    result = await trio.to_thread.run_sync(run)
    assert result.error is None
    assert [n for n, _ in result.events][-1] == "TranscriptionCompleted"
    assert "man" in " ".join(m["payload"]["result"] for n, m in result.events if n == "SentenceEnd")


# --- times, rates, formats --------------------------------------------------------------


async def test_sentence_times_match_known_speech_positions(gateway: RunningGateway) -> None:
    pcm, spans = assemble(
        [
            silence(1000, 16000),
            Clip(load_clip("0880")),
            silence(2000, 16000),
            Clip(load_clip("0930")),
            silence(1500, 16000),
        ],
        16000,
    )
    events = await transcribe(gateway.url, pcm, enable_words=True, max_sentence_silence=800)
    begins = [e["payload"] for e in events if e["header"]["name"] == "SentenceBegin"]
    ends = finals(events)
    assert len(begins) == len(ends) == 2
    for begin, end, (start_ms, stop_ms) in zip(begins, ends, spans, strict=True):
        # The clips open with ~0.2-0.4 s of room tone before the first word.
        assert start_ms <= begin["time"] <= start_ms + 600
        assert end["begin_time"] == begin["time"]
        assert stop_ms - 500 <= end["time"] <= stop_ms + 1000
        assert end["words"][0]["startTime"] >= start_ms
        assert end["words"][-1]["endTime"] <= stop_ms + 100


async def test_8khz_and_wav_format(gateway: RunningGateway) -> None:
    import io
    import wave

    pcm8 = load_clip("0880", 8000) + silence(1000, 8000)
    events = await transcribe(gateway.url, pcm8, 8000)
    assert wer([transcripts()["0880"]], [text_of(events)]) < 0.6
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(load_clip("0930") + silence(1000, 16000))
    events = await transcribe(gateway.url, buf.getvalue(), format="wav")
    assert wer([transcripts()["0930"]], [text_of(events)]) < 0.5


async def test_max_sentence_length_force_closes_unless_ignored(nats: Nats, pool: Pool) -> None:
    pcm = load_clip("0870") + silence(1000, 16000)  # 7 s of continuous speech
    async with open_gateway(nats.url, pool, segmentation={"max_sentence_ms": 3000}) as gw:
        closed = finals(await transcribe(gw.url, pcm))
        assert closed[0]["status"] == 51040104 and len(closed) >= 2
        whole = finals(await transcribe(gw.url, pcm, enable_ignore_sentence_timeout=True))
        assert [p["status"] for p in whole] == [20000000]


async def test_a_client_faster_than_its_engine_goes_at_the_engine_pace(
    nats: Nats, pool: Pool
) -> None:
    """Audio pushed far faster than pocketsphinx decodes it, in 10 ms frames (100 messages
    per second of audio), is read only as fast as the worker acknowledges it, and every
    sentence comes back. The worker holds at most 4096 messages of a session's input: a
    client that outran it for long used to end with 50000000 "fell too far behind"."""
    pcm = b"".join(load_clip(name) + silence(900, 16000) for name in CLIPS)  # 27 s
    fast = {"max_audio_speed": 1000.0, "audio_burst_s": 3600.0}
    async with open_gateway(nats.url, pool, server=fast) as gw:
        events = await transcribe(gw.url, pcm, frame_ms=10)
        waits = gw.gateway.state.metrics.engine_waits.values.get((), 0.0)
    assert events[-1]["header"]["name"] == "TranscriptionCompleted"
    assert waits > 0  # 2,700 messages against a window of 512: the client was held back
    refs = [transcripts()[name] for name in CLIPS]
    assert wer([" ".join(refs)], [text_of(events)]) < 0.4


# --- concurrency and isolation ----------------------------------------------------------


async def test_as_many_sessions_as_decoders_all_complete(
    gateway: RunningGateway, pool: Pool
) -> None:
    solo = {
        name: text_of(await transcribe(gateway.url, load_clip(name) + silence(900, 16000)))
        for name in CLIPS[: pool.capacity]
    }
    together: dict[str, str] = {}

    async def one(name: str) -> None:
        together[name] = text_of(
            await transcribe(gateway.url, load_clip(name) + silence(900, 16000))
        )

    async with trio.open_nursery() as nursery:
        for name in solo:
            nursery.start_soon(one, name)
    assert together == solo


async def raw_session(
    url: str,
    messages: list[str | bytes],
    token: str | None = "t",
    stop_at: tuple[str, ...] = ("TaskFailed", "TranscriptionStarted"),
) -> dict[str, Any]:
    """Send raw frames; return the first TaskFailed or TranscriptionStarted the server sent."""
    headers = [(b"X-NLS-Token", token.encode())] if token else []
    with trio.fail_after(GUARD_S):
        async with trio_websocket.open_websocket_url(url, extra_headers=headers) as ws:
            for m in messages:
                await ws.send_message(m)
            last: dict[str, Any] = {}
            try:
                while True:
                    last = json.loads(await ws.get_message())
                    if last["header"]["name"] in stop_at:
                        return last
            except trio_websocket.ConnectionClosed:
                return last


def command(
    name: str, task_id: str, payload: dict[str, Any] | None = None, appkey: str = "default"
) -> str:
    msg: dict[str, Any] = {
        "header": {
            "message_id": uuid.uuid4().hex,
            "task_id": task_id,
            "namespace": "SpeechTranscriber",
            "name": name,
            "appkey": appkey,
        }
    }
    if payload is not None:
        msg["payload"] = payload
    return json.dumps(msg)


BAD_INPUTS: dict[str, tuple[list[str | bytes], int]] = {
    "non-json": (["{not json"], 40000002),
    "unknown name": ([command("DanceTranscription", "a" * 32)], 40010003),
    "audio before start": ([b"\x00\x01" * 100], 40000002),
    "wrong sample rate": (
        [command("StartTranscription", "b" * 32, {"sample_rate": 44100})],
        41010101,
    ),
    "unsupported format": ([command("StartTranscription", "c" * 32, {"format": "opus"})], 40000003),
    "stop before start": ([command("StopTranscription", "d" * 32)], 40000002),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
async def test_bad_input_gets_its_code_and_spares_a_concurrent_session(
    gateway: RunningGateway, case: str
) -> None:
    messages, code = BAD_INPUTS[case]
    pcm = load_clip("0880") + silence(1000, 16000)
    alone = text_of(await transcribe(gateway.url, pcm))
    results: dict[str, Any] = {}

    async def good() -> None:
        results["good"] = text_of(await transcribe(gateway.url, pcm))

    async def bad() -> None:
        results["bad"] = await raw_session(gateway.url, messages)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(good)
        nursery.start_soon(bad)
    failed = results["bad"]
    assert failed["header"]["name"] == "TaskFailed"
    assert failed["header"]["namespace"] == "Default"
    assert failed["header"]["status"] == code
    assert failed["header"]["status_text"]
    assert results["good"] == alone


async def test_auth_codes(nats: Nats, pool: Pool) -> None:
    auth = {
        "enabled": True,
        "apps": [{"appkey": "app1", "tokens": ["tok1"]}, {"appkey": "app2", "tokens": ["tok2"]}],
    }
    start = partial(command, "StartTranscription", "e" * 32, {})
    async with open_gateway(nats.url, pool, auth=auth) as gw:
        assert (await raw_session(gw.url, [start(appkey="app1")], token=None))["header"][
            "status"
        ] == 40000001
        assert (await raw_session(gw.url, [start(appkey="app1")], token="wrong"))["header"][
            "status"
        ] == 40000001
        assert (await raw_session(gw.url, [start(appkey="nope")], token="tok1"))["header"][
            "status"
        ] == 40020105
        assert (await raw_session(gw.url, [start(appkey="app2")], token="tok1"))["header"][
            "status"
        ] == 40020106
        # the token may also come as ?token=
        ok = await raw_session(gw.url + "?token=tok1", [start(appkey="app1")], token=None)
        assert ok["header"]["name"] == "TranscriptionStarted"
        events = await transcribe_with_token(gw.url, "tok1", "app1")
        assert events[-1]["header"]["name"] == "TranscriptionCompleted"


async def transcribe_with_token(url: str, token: str, appkey: str) -> list[dict[str, Any]]:
    out = []
    async with open_transcription(
        url, pcm_chunks(load_clip("0930")), 16000, token=token, appkey=appkey, realtime=False
    ) as tr:
        async for e in tr:
            out.append(e)
    return out


# --- capacity and teardown paths --------------------------------------------------------


@pytest.fixture(scope="module")
def one_decoder(nats: Nats) -> Iterator[Pool]:
    from tests.servers import start_worker, stop

    worker = start_worker(nats.url, "it-one", 1)
    yield Pool("it-one", [worker], 1)
    stop(worker)


async def test_all_decoders_busy_gets_40000005_and_hangup_frees_the_slot(
    nats: Nats, one_decoder: Pool
) -> None:
    async with open_gateway(nats.url, one_decoder) as gw:
        async with trio_websocket.open_websocket_url(gw.url) as holder:
            await holder.send_message(command("StartTranscription", "f" * 32, {}))
            assert (
                json.loads(await holder.get_message())["header"]["name"] == "TranscriptionStarted"
            )
            with trio.fail_after(GUARD_S):
                busy = await raw_session(gw.url, [command("StartTranscription", "0" * 32, {})])
            assert busy["header"]["status"] == 40000005
            # hang up abruptly (no Stop): the decoder must come back
            await holder._stream.aclose()
        with trio.fail_after(GUARD_S):
            while True:
                reply = await raw_session(gw.url, [command("StartTranscription", "1" * 32, {})])
                if reply["header"]["name"] == "TranscriptionStarted":
                    break
                assert reply["header"]["status"] == 40000005
                await trio.sleep(0.1)


async def test_idle_client_gets_40000004(nats: Nats, pool: Pool) -> None:
    async with open_gateway(nats.url, pool, server={"idle_timeout_s": 0.5}) as gw:
        start = command("StartTranscription", "2" * 32, {})
        reply = await raw_session(gw.url, [start], stop_at=("TaskFailed",))
        assert reply["header"]["status"] == 40000004


async def test_server_shutdown_fails_running_sessions_clearly(nats: Nats, pool: Pool) -> None:
    async with open_gateway(nats.url, pool, server={"shutdown_grace_s": 0}) as gw:
        async with trio_websocket.open_websocket_url(gw.url) as ws:
            await ws.send_message(command("StartTranscription", "3" * 32, {}))
            assert json.loads(await ws.get_message())["header"]["name"] == "TranscriptionStarted"
            gw.gateway.stop_requested.set()
            with trio.fail_after(GUARD_S):
                msg = json.loads(await ws.get_message())
            assert msg["header"]["name"] == "TaskFailed" and msg["header"]["status"] == 50000000
            assert "shutting down" in msg["header"]["status_text"]
