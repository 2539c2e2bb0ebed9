"""Session parameters, the dialect-neutral form of what a client asks for.

Each dialect maps its own keys onto :class:`SessionParams`; validation errors become
:class:`asrd.errors.InvalidParameter` in the dialect, never further in.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

SUPPORTED_FORMATS = ("pcm", "wav")
SUPPORTED_SAMPLE_RATES = (8000, 16000)
# A language names an engine pool, and without a routing table the pool IS the language: it
# becomes a NATS subject token (claim subject). Same characters as config's ``Name``.
LANGUAGE_CHARS = r"[A-Za-z0-9_-]{1,64}"
Language = Annotated[str, StringConstraints(pattern=rf"^{LANGUAGE_CHARS}$")]


class WordFilter(BaseModel):
    """Alibaba's ``special_word_filter``: words removed, or masked with ``*``."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    system_reserved_filter: bool = False
    remove: tuple[str, ...] = ()  # filter_with_empty.word_list
    mask: tuple[str, ...] = ()  # filter_with_signed.word_list


class SessionParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["pcm", "wav"] = "pcm"
    sample_rate: Literal[8000, 16000] = 16000
    language: Language | None = None  # None: the gateway's default
    enable_intermediate_result: bool = False
    enable_punctuation_prediction: bool = False
    enable_inverse_text_normalization: bool = False
    enable_words: bool = False
    max_sentence_silence_ms: int = Field(default=800, ge=200, le=6000)
    enable_semantic_sentence_detection: bool = False
    speech_noise_threshold: float | None = Field(default=None, ge=-1.0, le=1.0)
    disfluency: bool = False
    special_word_filter: WordFilter | None = None
    vocabulary_id: str | None = None
    customization_id: str | None = None
    enable_ignore_sentence_timeout: bool = False
    session_id: str | None = None
