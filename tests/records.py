"""Helpers that build what a session leaves to the control plane when it ends.

Tests of recording (buffering, batching, outages, log lines) need records, not sessions: these
make one without a gateway, a worker or audio.
"""

from __future__ import annotations

import time
import uuid

from asrd.control import SessionRecord


def session_record(
    appkey: str,
    session_id: str,
    *,
    task_id: str | None = None,
    started_at: float | None = None,
    language: str = "en-US",
    audio_s: float = 1.0,
    code: int = 20000000,
    text: str | None = None,
) -> SessionRecord:
    """A finished session as long as its audio, with ``text`` as its one final sentence
    (none without it) and a new random task id unless ``task_id`` is given. It starts now
    unless ``started_at`` is given: records meant for one usage row should share one, or
    midnight UTC may fall between them."""
    sentences = [] if text is None else [{"index": 1, "begin_time": 0, "time": 900, "text": text}]
    return SessionRecord(
        task_id=task_id or uuid.uuid4().hex,
        session_id=session_id,
        appkey=appkey,
        language=language,
        started_at=time.time() if started_at is None else started_at,
        duration_s=audio_s,
        audio_s=audio_s,
        code=code,
        reason="completed" if code == 20000000 else "failed",
        sentences=sentences,
    )
