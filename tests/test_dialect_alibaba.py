"""The Alibaba NLS codec, driven with messages shaped like the official SDKs send them."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asrd.dialects.alibaba import AlibabaCodec, LocalProtocolError
from asrd.errors import (
    AlreadyStopping,
    AsrdError,
    InvalidDirective,
    InvalidMessage,
    InvalidParameter,
    UnknownNamespace,
    UnsupportedSampleRate,
)
from asrd.events import (
    AudioReceived,
    ControlRequested,
    ResultChanged,
    SentenceBegin,
    SentenceEnd,
    StartRequested,
    StopRequested,
    TaskFailed,
    TranscriptionCompleted,
    TranscriptionStarted,
    Word,
)
from asrd.params import SessionParams, WordFilter

TASK = uuid.uuid4().hex
APPKEY = "7LWI6OabGIPty0Fr"
CONTEXT = {"sdk": {"name": "nls-python-sdk", "version": "0.0.1", "language": "python"}}
HEX32 = re.compile(r"[0-9a-f]{32}")
HEADER_KEYS = {"namespace", "name", "status", "message_id", "task_id", "status_text"}

_ABSENT: Any = object()


def command(
    name: str,
    payload: Any = _ABSENT,
    *,
    task_id: Any = TASK,
    namespace: Any = "SpeechTranscriber",
    **header: Any,
) -> str:
    """A command exactly as nls.SpeechTranscriber builds it (json.dumps, default separators)."""
    message: dict[str, Any] = {
        "header": {
            "message_id": uuid.uuid4().hex,
            "task_id": task_id,
            "namespace": namespace,
            "name": name,
            "appkey": APPKEY,
            **header,
        }
    }
    if payload is not _ABSENT:
        message["payload"] = payload
    message["context"] = CONTEXT
    return json.dumps(message)


def sdk_start(**ex: Any) -> str:
    """nls.SpeechTranscriber.start(): five fixed keys, then ``ex`` merged into the payload."""
    payload = {
        "format": "pcm",
        "sample_rate": 16000,
        "enable_intermediate_result": False,
        "enable_punctuation_prediction": False,
        "enable_inverse_text_normalization": False,
    }
    payload.update(ex)
    return command("StartTranscription", payload)


def sdk_stop() -> str:
    return command("StopTranscription")  # no payload key at all, like the Python and Go SDKs


def started(**ex: Any) -> AlibabaCodec:
    codec = AlibabaCodec()
    codec.receive_text(sdk_start(**ex))
    codec.render(TranscriptionStarted(session_id=uuid.uuid4().hex))
    return codec


def params_of(**payload: Any) -> SessionParams:
    event = AlibabaCodec().receive_text(command("StartTranscription", payload))
    assert isinstance(event, StartRequested)
    return event.params


def decode(frame: str) -> dict[str, Any]:
    message = json.loads(frame)
    assert isinstance(message, dict)
    return message


def assert_header(message: dict[str, Any], name: str) -> None:
    header = message["header"]
    assert set(header) == HEADER_KEYS
    assert header["namespace"] == "SpeechTranscriber"
    assert header["name"] == name
    assert header["status"] == 20000000 and type(header["status"]) is int
    assert HEX32.fullmatch(header["message_id"])
    assert header["task_id"] == TASK
    assert header["status_text"] == "Gateway:SUCCESS:Success."


# --- the happy path ---------------------------------------------------------------------------


def test_python_sdk_conversation() -> None:
    codec = AlibabaCodec()
    assert codec.task_id == "" and codec.params is None and not codec.closed

    start = codec.receive_text(sdk_start(enable_intermediate_result=True))
    assert start == StartRequested(
        task_id=TASK,
        appkey=APPKEY,
        params=SessionParams(enable_intermediate_result=True),
    )
    assert codec.task_id == TASK
    assert codec.params == start.params

    reply = decode(codec.render(TranscriptionStarted(session_id="ab" * 16)))
    assert_header(reply, "TranscriptionStarted")
    assert reply["payload"] == {"session_id": "ab" * 16}

    assert codec.receive_binary(b"\x00\x01" * 320) == AudioReceived(b"\x00\x01" * 320)

    reply = decode(codec.render(SentenceBegin(index=1, time_ms=880)))
    assert_header(reply, "SentenceBegin")
    assert reply["payload"] == {"index": 1, "time": 880}

    reply = decode(codec.render(ResultChanged(index=1, time_ms=1200, text="north wind")))
    assert_header(reply, "TranscriptionResultChanged")
    assert reply["payload"] == {
        "index": 1,
        "time": 1200,
        "result": "north wind",
        "status": 20000000,
    }

    assert isinstance(codec.receive_text(sdk_stop()), StopRequested)

    end = SentenceEnd(index=1, time_ms=2520, begin_time_ms=880, text="north wind.", confidence=0.87)
    reply = decode(codec.render(end))
    assert_header(reply, "SentenceEnd")
    assert reply["payload"] == {
        "index": 1,
        "time": 2520,
        "begin_time": 880,
        "result": "north wind.",
        "confidence": 0.87,
        "status": 20000000,
    }

    reply = decode(codec.render(TranscriptionCompleted()))
    assert_header(reply, "TranscriptionCompleted")
    assert "payload" not in reply
    assert codec.closed


def test_sdk_payload_defaults_and_extras_ignored() -> None:
    """The SDK merges ``ex`` into the payload; keys we do not know must not fail the start."""
    codec = AlibabaCodec()
    event = codec.receive_text(
        sdk_start(enable_ner=0, enbale_gender_detect=1, nested={"a": [1, None]}, ch=1)
    )
    assert isinstance(event, StartRequested)
    assert event.params == SessionParams()


def test_start_without_payload_gives_defaults() -> None:
    event = AlibabaCodec().receive_text(command("StartTranscription"))
    assert isinstance(event, StartRequested) and event.params == SessionParams()
    event = AlibabaCodec().receive_text(command("StartTranscription", None))
    assert isinstance(event, StartRequested) and event.params == SessionParams()


def test_start_without_appkey_gives_empty_appkey() -> None:
    text = json.dumps(
        {
            "header": {
                "message_id": uuid.uuid4().hex,
                "task_id": TASK,
                "namespace": "SpeechTranscriber",
                "name": "StartTranscription",
            }
        }
    )
    event = AlibabaCodec().receive_text(text)
    assert isinstance(event, StartRequested) and event.appkey == ""


def test_ids_in_upper_case_are_accepted_and_echoed() -> None:
    task = TASK.upper()
    codec = AlibabaCodec()
    codec.receive_text(command("StartTranscription", {}, task_id=task))
    assert codec.task_id == task
    assert decode(codec.render(TranscriptionStarted("s")))["header"]["task_id"] == task


def test_empty_audio_frame_is_passed_on() -> None:
    assert started().receive_binary(b"") == AudioReceived(b"")


# --- StartTranscription parameters ------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"format": "PCM"}, {"format": "pcm"}),
        ({"format": "Wav"}, {"format": "wav"}),
        ({"sample_rate": 8000}, {"sample_rate": 8000}),
        ({"sample_rate": "8000"}, {"sample_rate": 8000}),
        ({"sample_rate": 16000.0}, {"sample_rate": 16000}),
        ({"language": "en-US"}, {"language": "en-US"}),
        ({"enable_intermediate_result": True}, {"enable_intermediate_result": True}),
        ({"enable_punctuation_prediction": True}, {"enable_punctuation_prediction": True}),
        ({"enable_inverse_text_normalization": True}, {"enable_inverse_text_normalization": True}),
        ({"enable_words": True}, {"enable_words": True}),
        ({"max_sentence_silence": 200}, {"max_sentence_silence_ms": 200}),
        ({"max_sentence_silence": 6000}, {"max_sentence_silence_ms": 6000}),
        ({"max_sentence_silence": "1200"}, {"max_sentence_silence_ms": 1200}),
        ({"max_sentence_silence": 500.0}, {"max_sentence_silence_ms": 500}),
        (
            {"enable_semantic_sentence_detection": True},
            {"enable_semantic_sentence_detection": True},
        ),
        ({"speech_noise_threshold": -1}, {"speech_noise_threshold": -1.0}),
        ({"speech_noise_threshold": 0.35}, {"speech_noise_threshold": 0.35}),
        ({"speech_noise_threshold": "1"}, {"speech_noise_threshold": 1.0}),
        ({"disfluency": True}, {"disfluency": True}),
        ({"vocabulary_id": "vocab-1"}, {"vocabulary_id": "vocab-1"}),
        ({"customization_id": "model-1"}, {"customization_id": "model-1"}),
        ({"enable_ignore_sentence_timeout": True}, {"enable_ignore_sentence_timeout": True}),
        ({"session_id": "my-session"}, {"session_id": "my-session"}),
        # "" and null mean "not set"
        ({"vocabulary_id": "", "session_id": "", "language": ""}, {}),
        ({"format": None, "sample_rate": None, "enable_words": None}, {}),
        ({"special_word_filter": ""}, {}),
        ({"special_word_filter": "null"}, {}),
        # context is not part of the payload, and a payload-level one is just an unknown key
        ({"context": {"sdk": {}}}, {}),
    ],
)
def test_start_payload_maps_onto_session_params(
    payload: dict[str, Any], expected: dict[str, Any]
) -> None:
    assert params_of(**payload) == SessionParams(**expected)


@pytest.mark.parametrize("value", [True, "true", "TRUE", "True", 1])
def test_booleans_accept_true_and_its_string(value: Any) -> None:
    assert params_of(enable_words=value).enable_words is True


@pytest.mark.parametrize("value", [False, "false", "FALSE", 0])
def test_booleans_accept_false_and_its_string(value: Any) -> None:
    assert params_of(enable_words=value).enable_words is False


@pytest.mark.parametrize("value", [2, -1, 1.0, "1", "yes", "on", "", [], {}])
def test_booleans_reject_everything_else(value: Any) -> None:
    with pytest.raises(InvalidParameter) as caught:
        params_of(enable_punctuation_prediction=value)
    assert caught.value.code == 40000003
    assert "enable_punctuation_prediction" in caught.value.reason
    assert "true or false" in caught.value.reason


@pytest.mark.parametrize("fmt", ["opus", "opu", "speex", "amr", "mp3", "aac", "OPUS", "junk", ""])
def test_unsupported_formats(fmt: str) -> None:
    with pytest.raises(InvalidParameter) as caught:
        params_of(format=fmt)
    assert caught.value.code == 40000003
    assert "not supported" in caught.value.reason
    assert "pcm, wav" in caught.value.reason


def test_format_of_wrong_type() -> None:
    with pytest.raises(InvalidParameter, match="format must be a string"):
        params_of(format=16)


@pytest.mark.parametrize("rate", [44100, 48000, 0, -16000, 22050, "44100", 10**40])
def test_unsupported_sample_rates(rate: Any) -> None:
    with pytest.raises(UnsupportedSampleRate) as caught:
        params_of(sample_rate=rate)
    assert caught.value.code == 41010101
    assert "sample_rate" in caught.value.reason and "8000 or 16000" in caught.value.reason


@pytest.mark.parametrize("rate", ["abc", True, 16000.5, [16000], "16k"])
def test_ill_typed_sample_rate(rate: Any) -> None:
    with pytest.raises(InvalidParameter, match="sample_rate must be an integer 8000 or 16000"):
        params_of(sample_rate=rate)


@pytest.mark.parametrize("value", [100, 199, 6001, -1, "abc", True, 800.5, "8_00", [800], 10**30])
def test_bad_max_sentence_silence(value: Any) -> None:
    with pytest.raises(InvalidParameter) as caught:
        params_of(max_sentence_silence=value)
    assert caught.value.code == 40000003
    assert "max_sentence_silence must be an integer from 200 to 6000 ms" in caught.value.reason


@pytest.mark.parametrize("value", [2, -1.5, 1.0001, "x", True, "nan", "inf", "-Infinity", 10**400])
def test_bad_speech_noise_threshold(value: Any) -> None:
    with pytest.raises(InvalidParameter) as caught:
        params_of(speech_noise_threshold=value)
    assert "speech_noise_threshold must be a number from -1.0 to 1.0" in caught.value.reason


@pytest.mark.parametrize("key", ["vocabulary_id", "customization_id", "session_id", "language"])
@pytest.mark.parametrize("value", [1, True, ["x"], {"a": 1}, "\ud800"])
def test_bad_string_params(key: str, value: Any) -> None:
    with pytest.raises(InvalidParameter) as caught:
        params_of(**{key: value})
    assert key in caught.value.reason


@pytest.mark.parametrize(
    "text", ["0_1", "-0_1", "\u0661", "\uff11", "0x1", "1_0e-1", "nan", "1e999", ". 5"]
)
def test_speech_noise_threshold_text_is_ascii_decimal(text: str) -> None:
    """float() alone takes "0_1" as 1.0 and Arabic-Indic "\u0661" as 1.0: a typo that must fail
    loudly (like "8_00" for an integer), not become the strongest noise setting."""
    with pytest.raises(InvalidParameter, match="speech_noise_threshold must be a number"):
        params_of(speech_noise_threshold=text)


@pytest.mark.parametrize(
    ("text", "value"), [(" 0.5 ", 0.5), ("-.25", -0.25), ("+1", 1.0), ("1e-1", 0.1), ("-1.", -1.0)]
)
def test_speech_noise_threshold_decimal_text(text: str, value: float) -> None:
    assert params_of(speech_noise_threshold=text).speech_noise_threshold == value


@pytest.mark.parametrize("language", ["en-US", "zh_CN", "EN", "x" * 64])
def test_language_names_a_pool(language: str) -> None:
    assert params_of(language=language).language == language


@pytest.mark.parametrize(
    "language", ["en US", "en.US", "*", ">", "en-US\n", "fr\r\nPUB x 0", "x" * 65, "français"]
)
def test_language_that_is_no_subject_token_is_an_invalid_parameter(language: str) -> None:
    """Without a routing table the language is the pool and so a NATS subject token: a bad one
    must be the client's 40000003 here, not a bus error (50000000: retry) further in."""
    with pytest.raises(InvalidParameter) as caught:
        params_of(language=language)
    assert caught.value.code == 40000003
    assert caught.value.reason.startswith("language must be 1 to 64 of A-Z a-z 0-9 _ -")
    with pytest.raises(ValueError):
        SessionParams(language=language)


def test_long_language_is_not_quoted_whole() -> None:
    with pytest.raises(InvalidParameter) as caught:
        params_of(language="a." * 30_000)
    assert len(caught.value.reason) < 200


def test_first_bad_key_in_table_order_is_reported() -> None:
    with pytest.raises(InvalidParameter, match=r"^format"):
        params_of(max_sentence_silence=1, format="mp3")


# --- special_word_filter ----------------------------------------------------------------------

FILTER = {
    "system_reserved_filter": True,
    "filter_with_empty": {"word_list": ["um", "uh"]},
    "filter_with_signed": {"word_list": ["damn"]},
}
EXPECTED_FILTER = WordFilter(system_reserved_filter=True, remove=("um", "uh"), mask=("damn",))


def test_word_filter_as_object() -> None:
    assert params_of(special_word_filter=FILTER).special_word_filter == EXPECTED_FILTER


def test_word_filter_as_json_string() -> None:
    """Alibaba's own documentation sends the filter as a string holding the JSON object."""
    text = json.dumps(FILTER)
    assert params_of(special_word_filter=text).special_word_filter == EXPECTED_FILTER


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({}, WordFilter()),
        ({"filter_with_empty": {"word_list": ["a"]}}, WordFilter(remove=("a",))),
        ({"filter_with_signed": {"word_list": ["b"], "x": 1}, "y": 2}, WordFilter(mask=("b",))),
        ({"filter_with_empty": None, "filter_with_signed": {}}, WordFilter()),
        ({"filter_with_empty": {"word_list": None}}, WordFilter()),
        ({"filter_with_empty": {"word_list": ["", "a", ""]}}, WordFilter(remove=("a",))),
        (  # blank entries match nothing and do not count towards the 32
            {"filter_with_empty": {"word_list": [" "] * 40 + [" a "]}},
            WordFilter(remove=("a",)),
        ),
        ({"system_reserved_filter": "false"}, WordFilter()),
        ({"system_reserved_filter": None}, WordFilter()),
        (
            {
                "filter_with_empty": {"word_list": ["w"] * 16},
                "filter_with_signed": {"word_list": ["v"] * 16},
            },
            WordFilter(remove=("w",) * 16, mask=("v",) * 16),
        ),
    ],
)
def test_word_filter_variants(value: dict[str, Any], expected: WordFilter) -> None:
    assert params_of(special_word_filter=value).special_word_filter == expected


@pytest.mark.parametrize(
    ("value", "complaint"),
    [
        (
            {
                "filter_with_empty": {"word_list": ["w"] * 17},
                "filter_with_signed": {"word_list": ["v"] * 16},
            },
            "33 words; at most 32",
        ),
        ({"filter_with_signed": {"word_list": ["x"] * 33}}, "at most 32"),
        ({"filter_with_empty": {"word_list": "um,uh"}}, "word_list must be a list"),
        ({"filter_with_empty": {"word_list": ["ok", 3]}}, "must be a string"),
        ({"filter_with_empty": ["um"]}, "filter_with_empty must be an object"),
        ({"system_reserved_filter": 2}, "system_reserved_filter must be true or false"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('"a string in a string"', "must be a JSON object"),
        (17, "must be a JSON object"),
        ([], "must be a JSON object"),
    ],
)
def test_bad_word_filters(value: Any, complaint: str) -> None:
    with pytest.raises(InvalidParameter) as caught:
        params_of(special_word_filter=value)
    assert "special_word_filter" in caught.value.reason
    assert complaint in caught.value.reason


# --- malformed messages -----------------------------------------------------------------------


def raw(header: Any, **rest: Any) -> str:
    return json.dumps({"header": header, **rest})


def good_header(**changes: Any) -> dict[str, Any]:
    header = {
        "message_id": uuid.uuid4().hex,
        "task_id": TASK,
        "namespace": "SpeechTranscriber",
        "name": "StartTranscription",
        "appkey": APPKEY,
    }
    header.update(changes)
    return {k: v for k, v in header.items() if v is not _ABSENT}


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "not valid JSON"),
        ("StartTranscription", "not valid JSON"),
        ("{'header': {}}", "not valid JSON"),
        ('{"header": {"name": NaN}}', "not valid JSON"),
        ('{"a": Infinity}', "not valid JSON"),
        ("[" * 100_000, "larger than"),
        ("[" * 20_000 + "]" * 20_000, "not valid JSON"),  # nesting deeper than the recursion limit
        ('{"x": ' + "9" * 5000 + "}", "not valid JSON"),  # beyond int_max_str_digits
        ("[]", "must hold a JSON object"),
        ('"header"', "must hold a JSON object"),
        ("null", "must hold a JSON object"),
        ("42", "must hold a JSON object"),
        ("{}", "header must be a JSON object"),
        (raw(None), "header must be a JSON object"),
        (raw([good_header()]), "header must be a JSON object"),
        (raw("StartTranscription"), "header must be a JSON object"),
        (raw(good_header(name=_ABSENT)), "header.name"),
        (raw(good_header(name=7)), "header.name"),
        (raw(good_header(namespace=_ABSENT)), "header.namespace"),
        (raw(good_header(namespace=["SpeechTranscriber"])), "header.namespace"),
        (raw(good_header(appkey=12)), "header.appkey"),
        (raw(good_header(appkey="k" * 129)), "header.appkey is longer than 128"),
        (raw(good_header(message_id=_ABSENT)), "header.message_id"),
        (raw(good_header(message_id="1234")), "header.message_id"),
        (raw(good_header(message_id=str(uuid.uuid4()))), "header.message_id"),  # dashed form
        (raw(good_header(message_id="g" * 32)), "header.message_id"),
        (raw(good_header(message_id="a" * 33)), "header.message_id"),
        (raw(good_header(message_id=12345678901234567890123456789012)), "header.message_id"),
        (raw(good_header(task_id=_ABSENT)), "header.task_id"),
        (raw(good_header(task_id="")), "header.task_id"),
        (raw(good_header(task_id="a" * 31)), "header.task_id"),
        (raw(good_header(task_id=None)), "header.task_id"),
        (raw(good_header(task_id="a" * 31 + "\n")), "header.task_id"),
        (raw(good_header(), payload=[]), "payload must be a JSON object"),
        (raw(good_header(), payload="format=pcm"), "payload must be a JSON object"),
    ],
)
def test_invalid_messages(text: str, complaint: str) -> None:
    with pytest.raises(InvalidMessage) as caught:
        AlibabaCodec().receive_text(text)
    assert caught.value.code == 40000002
    assert complaint in caught.value.reason


def test_text_frame_size_limit_counts_utf8_bytes() -> None:
    codec = AlibabaCodec(max_text_bytes=1000)
    start = json.loads(sdk_start())
    start["payload"]["pad"] = "é" * 450  # 900 bytes, 450 characters
    text = json.dumps(start, ensure_ascii=False)
    assert len(text) < 1000 < len(text.encode())
    with pytest.raises(InvalidMessage, match="larger than 1000 bytes"):
        codec.receive_text(text)
    start["payload"]["pad"] = "é" * 100
    assert isinstance(codec.receive_text(json.dumps(start, ensure_ascii=False)), StartRequested)


def test_unknown_namespace() -> None:
    with pytest.raises(UnknownNamespace) as caught:
        AlibabaCodec().receive_text(command("StartTranscription", {}, namespace="SpeechRecognizer"))
    assert caught.value.code == 40010001
    assert "SpeechRecognizer" in caught.value.reason


def test_unknown_namespace_after_start() -> None:
    codec = started()
    with pytest.raises(UnknownNamespace):
        codec.receive_text(command("StopTranscription", namespace="Default"))


@pytest.mark.parametrize("name", ["StartRecognition", "stoptranscription", "RunSynthesis", ""])
def test_unknown_directive(name: str) -> None:
    with pytest.raises(InvalidDirective) as caught:
        started().receive_text(command(name))
    assert caught.value.code == 40010003
    assert repr(name) in caught.value.reason


# --- state machine ----------------------------------------------------------------------------


def test_start_twice() -> None:
    codec = started()
    with pytest.raises(InvalidMessage, match="received twice"):
        codec.receive_text(sdk_start())


def test_start_after_stop() -> None:
    codec = started()
    codec.receive_text(sdk_stop())
    with pytest.raises(InvalidMessage, match="received twice"):
        codec.receive_text(sdk_start())


@pytest.mark.parametrize(
    "text",
    [
        command("StopTranscription"),
        command("ControlTranscriber", {"max_sentence_silence": 500}),
        command("ControlTranscription", {}),
    ],
)
def test_commands_before_start(text: str) -> None:
    with pytest.raises(InvalidMessage, match="before StartTranscription") as caught:
        AlibabaCodec().receive_text(text)
    assert caught.value.code == 40000002


def test_audio_before_start() -> None:
    with pytest.raises(InvalidMessage, match="audio") as caught:
        AlibabaCodec().receive_binary(b"\x00" * 640)
    assert caught.value.code == 40000002


def test_audio_after_stop() -> None:
    codec = started()
    codec.receive_text(sdk_stop())
    with pytest.raises(InvalidMessage, match="audio"):
        codec.receive_binary(b"\x00" * 640)


def test_stop_twice() -> None:
    codec = started()
    codec.receive_text(sdk_stop())
    with pytest.raises(AlreadyStopping) as caught:
        codec.receive_text(sdk_stop())
    assert caught.value.code == 40010005


def test_stop_may_carry_a_payload() -> None:
    """The Node SDK sends ``payload: {}``; the content of a stop payload is ignored."""
    codec = started()
    assert isinstance(codec.receive_text(command("StopTranscription", {})), StopRequested)
    codec = started()
    assert isinstance(codec.receive_text(command("StopTranscription", "junk")), StopRequested)


def test_audio_may_arrive_before_transcription_started_was_sent() -> None:
    codec = AlibabaCodec()
    codec.receive_text(sdk_start())
    assert codec.receive_binary(b"ab") == AudioReceived(b"ab")


def test_task_id_must_not_change() -> None:
    codec = started()
    other = uuid.uuid4().hex
    with pytest.raises(InvalidMessage, match="differs from the session's") as caught:
        codec.receive_text(command("StopTranscription", task_id=other))
    assert caught.value.code == 40000002
    assert codec.task_id == TASK


def test_nothing_is_received_after_the_task_ended() -> None:
    codec = started()
    codec.receive_text(sdk_stop())
    codec.render(TranscriptionCompleted())
    with pytest.raises(InvalidMessage, match="after the task ended"):
        codec.receive_text(command("ControlTranscriber", {}))
    with pytest.raises(InvalidMessage):
        codec.receive_binary(b"\x00\x00")


def test_task_id_is_known_for_the_failure_of_a_bad_start() -> None:
    codec = AlibabaCodec()
    with pytest.raises(UnsupportedSampleRate) as caught:
        codec.receive_text(sdk_start(sample_rate=44100))
    assert codec.task_id == TASK
    assert codec.params is None
    failed = decode(codec.render(TaskFailed(caught.value.code, caught.value.reason)))
    assert failed["header"]["task_id"] == TASK
    assert failed["header"]["status"] == 41010101


def test_task_id_stays_empty_when_the_header_is_bad() -> None:
    codec = AlibabaCodec()
    with pytest.raises(InvalidMessage):
        codec.receive_text(raw(good_header(message_id="nope")))
    assert codec.task_id == ""


# --- ControlTranscriber / ControlTranscription ------------------------------------------------


@pytest.mark.parametrize("name", ["ControlTranscriber", "ControlTranscription"])
def test_control_changes(name: str) -> None:
    codec = started(enable_intermediate_result=True)
    payload = {
        "max_sentence_silence": 1500,
        "enable_intermediate_result": False,
        "enable_words": True,
        "enable_punctuation_prediction": "true",
        "enable_inverse_text_normalization": True,
        "disfluency": True,
        "speech_noise_threshold": -0.2,
        "special_word_filter": json.dumps(FILTER),
    }
    event = codec.receive_text(command(name, payload))
    changes: dict[str, Any] = {
        "max_sentence_silence_ms": 1500,
        "enable_intermediate_result": False,
        "enable_words": True,
        "enable_punctuation_prediction": True,
        "enable_inverse_text_normalization": True,
        "disfluency": True,
        "speech_noise_threshold": -0.2,
        "special_word_filter": EXPECTED_FILTER,
    }
    assert event == ControlRequested(changes)
    assert codec.params == SessionParams(**changes)


@pytest.mark.parametrize(
    "payload",
    [
        _ABSENT,
        None,
        [],
        "max_sentence_silence=500",
        17,
        {},
        {"vad_model": "farfield", "format": "opus", "sample_rate": 8000, "session_id": "x"},
        {
            "max_sentence_silence": 100,
            "enable_words": 7,
            "disfluency": "maybe",
            "speech_noise_threshold": 5,
            "special_word_filter": {"filter_with_empty": {"word_list": ["x"] * 40}},
            "enable_intermediate_result": None,
        },
    ],
)
def test_control_junk_is_tolerated(payload: Any) -> None:
    codec = started()
    before = codec.params
    assert codec.receive_text(command("ControlTranscriber", payload)) == ControlRequested({})
    assert codec.params == before


def test_control_keeps_the_valid_keys_of_a_mixed_payload() -> None:
    codec = started()
    event = codec.receive_text(
        command(
            "ControlTranscription",
            {"max_sentence_silence": "abc", "enable_words": True, "noise": 3},
        )
    )
    assert event == ControlRequested({"enable_words": True})


def test_control_while_stopping_changes_nothing() -> None:
    codec = started()
    codec.receive_text(sdk_stop())
    event = codec.receive_text(command("ControlTranscriber", {"enable_words": True}))
    assert event == ControlRequested({})
    assert codec.params is not None and not codec.params.enable_words


def test_control_enabling_words_changes_rendering() -> None:
    codec = started()
    partial = ResultChanged(1, 100, "hi", words=(Word("hi", 0, 100),))
    assert "words" not in decode(codec.render(partial))["payload"]
    codec.receive_text(command("ControlTranscriber", {"enable_words": True}))
    words = decode(codec.render(partial))["payload"]["words"]
    assert words == [{"text": "hi", "startTime": 0, "endTime": 100}]


# --- rendering --------------------------------------------------------------------------------


def test_transcription_started_echoes_the_clients_session_id() -> None:
    codec = AlibabaCodec()
    codec.receive_text(sdk_start(session_id="client-chosen"))
    reply = decode(codec.render(TranscriptionStarted(session_id="ours")))
    assert reply["payload"] == {"session_id": "client-chosen"}


def test_transcription_started_uses_ours_without_a_client_session_id() -> None:
    codec = AlibabaCodec()
    codec.receive_text(sdk_start())
    assert decode(codec.render(TranscriptionStarted("ours")))["payload"] == {"session_id": "ours"}


def test_result_changed_with_words_and_confidence() -> None:
    codec = started(enable_words=True)
    event = ResultChanged(
        index=2,
        time_ms=3000,
        text="hello world",
        words=(Word("hello", 2100, 2400), Word("world", 2450, 2900)),
        confidence=0.5,
    )
    assert decode(codec.render(event))["payload"] == {
        "index": 2,
        "time": 3000,
        "result": "hello world",
        "status": 20000000,
        "words": [
            {"text": "hello", "startTime": 2100, "endTime": 2400},
            {"text": "world", "startTime": 2450, "endTime": 2900},
        ],
        "confidence": 0.5,
    }


def test_result_changed_with_words_enabled_but_none_yet() -> None:
    codec = started(enable_words=True)
    assert decode(codec.render(ResultChanged(1, 10, "")))["payload"]["words"] == []


def test_sentence_end_words_timeout_and_stash_result() -> None:
    codec = started(
        enable_words=True,
        enable_intermediate_result=True,
        enable_semantic_sentence_detection=True,
    )
    event = SentenceEnd(
        index=3,
        time_ms=9000,
        begin_time_ms=4000,
        text="a very long sentence",
        confidence=0.9,
        words=(Word("a", 4000, 4100),),
        timed_out=True,
    )
    assert decode(codec.render(event))["payload"] == {
        "index": 3,
        "time": 9000,
        "begin_time": 4000,
        "result": "a very long sentence",
        "confidence": 0.9,
        "status": 51040104,
        "words": [{"text": "a", "startTime": 4000, "endTime": 4100}],
        "stash_result": {"sentenceId": 4, "beginTime": 9000, "text": "", "currentTime": 9000},
    }


@pytest.mark.parametrize(
    ("given", "sent"), [(0.25, 0.25), (1.5, 1.0), (-0.1, 0.0), (float("nan"), 0.0), (1, 1.0)]
)
def test_confidence_is_a_float_in_unit_range(given: float, sent: float) -> None:
    codec = started()
    payload = decode(codec.render(SentenceEnd(1, 10, 0, "x", confidence=given)))["payload"]
    assert payload["confidence"] == sent and type(payload["confidence"]) is float
    payload = decode(codec.render(ResultChanged(1, 10, "x", confidence=given)))["payload"]
    assert payload["confidence"] == sent


def test_numpy_numbers_from_an_engine_render_as_json_numbers() -> None:
    import numpy

    np: Any = numpy  # numpy scalars where the events say int and float: on purpose

    codec = started(enable_words=True)
    event = SentenceEnd(
        index=np.int64(1),
        time_ms=np.int32(500),
        begin_time_ms=np.int64(100),
        text="x",
        confidence=np.float32(0.5),
        words=(Word("x", np.int64(100), np.int64(400)),),
    )
    payload = decode(codec.render(event))["payload"]
    assert payload["index"] == 1 and payload["time"] == 500 and payload["confidence"] == 0.5
    assert payload["words"] == [{"text": "x", "startTime": 100, "endTime": 400}]


def test_render_is_compact_and_keeps_unicode() -> None:
    codec = started()
    frame = codec.render(ResultChanged(1, 10, "北京的天气"))
    assert "北京的天气" in frame
    assert ", " not in frame and ": " not in frame


def test_every_message_id_is_new() -> None:
    codec = started()
    ids = {decode(codec.render(SentenceBegin(i, i)))["header"]["message_id"] for i in range(50)}
    assert len(ids) == 50


def test_every_status_is_a_json_integer() -> None:
    codec = started(enable_words=True, enable_semantic_sentence_detection=True)
    frames = [
        codec.render(SentenceBegin(1, 0)),
        codec.render(ResultChanged(1, 10, "a", confidence=0.1)),
        codec.render(SentenceEnd(1, 20, 0, "a", 0.2, timed_out=True)),
    ]
    codec.receive_text(sdk_stop())
    frames.append(codec.render(TranscriptionCompleted()))
    for frame in frames:
        message = decode(frame)
        assert type(message["header"]["status"]) is int
        if "status" in message.get("payload", {}):
            assert type(message["payload"]["status"]) is int
    for frame in frames:
        assert re.search(r'"status":\d+[,}]', frame)


def test_task_failed_shape() -> None:
    codec = started()
    failed = decode(codec.render(TaskFailed(code=40000004, reason="idle for 10 s")))
    assert failed == {
        "header": {
            "namespace": "Default",
            "name": "TaskFailed",
            "status": 40000004,
            "message_id": failed["header"]["message_id"],
            "task_id": TASK,
            "status_text": "idle for 10 s",
        }
    }
    assert HEX32.fullmatch(failed["header"]["message_id"])
    assert codec.closed


def test_task_failed_before_any_command_has_an_empty_task_id() -> None:
    codec = AlibabaCodec()
    failed = decode(codec.render(TaskFailed(40000001, "token missing")))
    assert failed["header"]["task_id"] == ""
    assert failed["header"]["namespace"] == "Default"
    assert failed["header"]["status"] == 40000001
    assert "payload" not in failed


def test_task_failed_while_stopping() -> None:
    codec = started()
    codec.receive_text(sdk_stop())
    assert (
        decode(codec.render(TaskFailed(50000000, "engine died")))["header"]["name"] == "TaskFailed"
    )


def test_task_failed_reason_is_made_sendable() -> None:
    frame = AlibabaCodec().render(TaskFailed(40000002, "bad \ud800 text"))
    frame.encode()  # would raise on a lone surrogate


def test_results_may_be_flushed_while_stopping() -> None:
    codec = started()
    codec.receive_text(sdk_stop())
    codec.render(SentenceBegin(1, 0))
    codec.render(ResultChanged(1, 10, "x"))
    codec.render(SentenceEnd(1, 20, 0, "x", 1.0))
    codec.render(TranscriptionCompleted())


def test_transcription_started_may_follow_an_early_stop() -> None:
    """A hand-written client may send Start, audio and Stop without waiting for the reply."""
    codec = AlibabaCodec()
    codec.receive_text(sdk_start())
    codec.receive_text(sdk_stop())
    codec.render(TranscriptionStarted("s"))
    codec.render(TranscriptionCompleted())


@pytest.mark.parametrize(
    "event",
    [
        TranscriptionStarted("s"),
        SentenceBegin(1, 0),
        ResultChanged(1, 0, ""),
        SentenceEnd(1, 0, 0, "", 1.0),
        TranscriptionCompleted(),
    ],
)
def test_nothing_but_task_failed_before_start(event: Any) -> None:
    with pytest.raises(LocalProtocolError, match="before StartTranscription"):
        AlibabaCodec().render(event)


@pytest.mark.parametrize(
    "event", [SentenceBegin(1, 0), ResultChanged(1, 0, ""), SentenceEnd(1, 0, 0, "", 1.0)]
)
def test_no_results_before_transcription_started(event: Any) -> None:
    codec = AlibabaCodec()
    codec.receive_text(sdk_start())
    with pytest.raises(LocalProtocolError, match="before TranscriptionStarted"):
        codec.render(event)


def test_transcription_started_only_once() -> None:
    codec = started()
    with pytest.raises(LocalProtocolError, match="already sent"):
        codec.render(TranscriptionStarted("again"))


def test_completed_only_after_stop() -> None:
    codec = started()
    with pytest.raises(LocalProtocolError, match="before StopTranscription"):
        codec.render(TranscriptionCompleted())
    assert not codec.closed


@pytest.mark.parametrize("last", [TranscriptionCompleted(), TaskFailed(50000000, "x")])
@pytest.mark.parametrize(
    "event",
    [SentenceBegin(2, 0), TranscriptionCompleted(), TaskFailed(50000000, "again")],
)
def test_nothing_is_rendered_after_the_task_ended(last: Any, event: Any) -> None:
    codec = started()
    codec.receive_text(sdk_stop())
    codec.render(last)
    assert codec.closed
    with pytest.raises(LocalProtocolError, match="ended"):
        codec.render(event)


def test_local_protocol_error_is_a_server_error() -> None:
    assert issubclass(LocalProtocolError, AsrdError)
    assert LocalProtocolError("x").code == 50000000


# --- fuzzing ----------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
# Mostly the session's task id, so that sequences get past their first command.
hex_ids = st.one_of(
    st.just(TASK), st.just(TASK), st.just(TASK), st.just(uuid.uuid4().hex), st.text(max_size=33)
)
names = st.sampled_from(
    [
        "StartTranscription",
        "StopTranscription",
        "ControlTranscriber",
        "ControlTranscription",
        "Bogus",
    ]
)
payload_keys = st.sampled_from(
    [
        "format",
        "sample_rate",
        "language",
        "enable_intermediate_result",
        "enable_words",
        "max_sentence_silence",
        "speech_noise_threshold",
        "disfluency",
        "special_word_filter",
        "vocabulary_id",
        "session_id",
        "other",
    ]
)
payload_values = (
    json_values
    | st.sampled_from(["pcm", "WAV", "true", "false", "800", "nan", "{}", "[]"])
    | st.sampled_from([8000, 16000, 200, 6000, 0.5, -1])
    | st.fixed_dictionaries(
        {},
        optional={
            "filter_with_empty": st.fixed_dictionaries(
                {"word_list": st.lists(st.text(max_size=5) | json_values, max_size=40)}
            ),
            "filter_with_signed": json_values,
            "system_reserved_filter": json_values,
        },
    ).map(lambda d: json.dumps(d) if len(d) % 2 else d)
)
commands = st.builds(
    lambda name, namespace, task_id, message_id, payload, drop: json.dumps(
        {
            k: v
            for k, v in {
                "header": {
                    "message_id": message_id,
                    "task_id": task_id,
                    "namespace": namespace,
                    "name": name,
                    "appkey": "k",
                },
                "payload": payload,
                "context": {},
            }.items()
            if k != drop
        }
    ),
    names,
    st.one_of(st.just("SpeechTranscriber"), st.just("SpeechTranscriber"), json_values),
    st.one_of(hex_ids, json_values),
    st.one_of(st.just(uuid.uuid4().hex), st.just(uuid.uuid4().hex), hex_ids, json_values),
    st.dictionaries(payload_keys, payload_values, max_size=6) | json_values,
    st.sampled_from([None, "payload", "header"]),
)


# Well-formed headers with random names and payloads: these reach the state machine.
well_formed = st.builds(
    command, names, st.dictionaries(payload_keys, payload_values, max_size=4) | json_values
)


def feed(codec: AlibabaCodec, text: str) -> None:
    try:
        codec.receive_text(text)
    except AsrdError as exc:
        assert isinstance(exc.code, int) and isinstance(exc.reason, str) and exc.reason
        codec.render(TaskFailed(exc.code, exc.reason)).encode()


@settings(max_examples=300)
@given(st.text(max_size=200))
def test_fuzz_random_text(text: str) -> None:
    feed(AlibabaCodec(), text)


@settings(max_examples=300)
@given(json_values)
def test_fuzz_random_json(value: Any) -> None:
    feed(AlibabaCodec(), json.dumps(value))


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.booleans(),
    st.lists(well_formed | commands | st.binary(max_size=8), min_size=1, max_size=6),
)
def test_fuzz_command_sequences(start_first: bool, frames: list[str | bytes]) -> None:
    codec = AlibabaCodec()
    for frame in [sdk_start(), *frames] if start_first else frames:
        if codec.closed:
            break
        if isinstance(frame, bytes):
            try:
                codec.receive_binary(frame)
            except AsrdError as exc:
                codec.render(TaskFailed(exc.code, exc.reason))
        else:
            feed(codec, frame)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(payload_keys, payload_values, max_size=8))
def test_fuzz_start_payloads(payload: dict[str, Any]) -> None:
    codec = AlibabaCodec()
    try:
        event = codec.receive_text(command("StartTranscription", payload))
    except AsrdError:
        return
    assert isinstance(event, StartRequested)
    assert isinstance(event.params, SessionParams)
    codec.render(TranscriptionStarted("s")).encode()
