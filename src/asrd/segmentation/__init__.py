"""Gateway-side sentence segmentation: voice detection and the utterance state machine."""

from .segmenter import (
    Segmenter,
    SegmenterConfig,
    SegmentEvent,
    UtteranceAudio,
    UtteranceEnded,
    UtterancePaused,
    UtteranceStarted,
)
from .vad import (
    BatchVoiceDetector,
    VoiceDetector,
    WebrtcVad,
    energy_gate_dbfs,
    webrtc_mode,
)

__all__ = [
    "BatchVoiceDetector",
    "SegmentEvent",
    "Segmenter",
    "SegmenterConfig",
    "UtteranceAudio",
    "UtteranceEnded",
    "UtterancePaused",
    "UtteranceStarted",
    "VoiceDetector",
    "WebrtcVad",
    "energy_gate_dbfs",
    "webrtc_mode",
]
