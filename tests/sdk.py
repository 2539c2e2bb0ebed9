"""Drive the official Alibaba NLS Python SDK (`nls`) from tests.

The SDK is thread-based, so tests run it with ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import nls


@dataclass
class SdkRun:
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    error: dict[str, Any] | None = None
    closed: bool = False
    completed: threading.Event = field(default_factory=threading.Event)

    def names(self) -> list[str]:
        return [name for name, _ in self.events]

    def sentences(self) -> list[dict[str, Any]]:
        return [msg["payload"] for name, msg in self.events if name == "SentenceEnd"]

    def text(self) -> str:
        return " ".join(s["result"] for s in self.sentences() if s["result"])


def transcribe(
    url: str,
    pcm: bytes,
    *,
    sample_rate: int = 16000,
    token: str = "test-token",
    appkey: str = "default",
    frame_bytes: int = 3200,
    speed: float = 0.0,  # 0: as fast as possible; 1.0: real time; 2.0: twice real time
    intermediate: bool = True,
    ex: dict[str, Any] | None = None,
    aformat: str = "pcm",
    timeout: int = 60,
) -> SdkRun:
    run = SdkRun()

    def record(name: str) -> Any:
        def cb(message: str, *args: Any) -> None:
            run.events.append((name, json.loads(message)))

        return cb

    def on_error(message: str, *args: Any) -> None:
        run.error = json.loads(message)
        run.completed.set()

    def on_close(*args: Any) -> None:
        run.closed = True
        run.completed.set()

    def on_completed(message: str, *args: Any) -> None:
        run.events.append(("TranscriptionCompleted", json.loads(message)))
        run.completed.set()

    t = nls.NlsSpeechTranscriber(
        url=url,
        token=token,
        appkey=appkey,
        on_start=record("TranscriptionStarted"),
        on_sentence_begin=record("SentenceBegin"),
        on_sentence_end=record("SentenceEnd"),
        on_result_changed=record("TranscriptionResultChanged"),
        on_completed=on_completed,
        on_error=on_error,
        on_close=on_close,
    )
    try:
        ok = t.start(
            aformat=aformat,
            sample_rate=sample_rate,
            enable_intermediate_result=intermediate,
            timeout=timeout,
            ex=ex,
        )
        if ok is False or run.error is not None:
            return run
        step = frame_bytes / (2 * sample_rate)
        t0 = time.monotonic()
        for i, off in enumerate(range(0, len(pcm), frame_bytes)):
            if run.error is not None:
                return run
            t.send_audio(pcm[off : off + frame_bytes])
            if speed:
                delay = t0 + (i + 1) * step / speed - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
        t.stop(timeout=timeout)
        run.completed.wait(timeout)
    finally:
        t.shutdown()
    return run
