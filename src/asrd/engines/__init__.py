"""Speech engines: pools of recognizers that run inside worker processes.

Engine modules are imported lazily by :func:`create_engine`, so a worker only loads the
libraries (and models) of the engine it serves.
"""

from __future__ import annotations

from typing import Any

from asrd.engines.base import Engine, EngineFull, EngineWord, Hypothesis, Recognizer

__all__ = [
    "ENGINE_NAMES",
    "Engine",
    "EngineFull",
    "EngineWord",
    "Hypothesis",
    "Recognizer",
    "create_engine",
]

ENGINE_NAMES = ("pocketsphinx", "loadtest")


def create_engine(name: str, *, decoders: int, **options: Any) -> Engine:
    """Build the engine called ``name`` with ``decoders`` preloaded recognizers.

    ``options`` are engine specific (for pocketsphinx: decoder configuration keys such as
    ``hmm``, ``lm``, ``dict`` or ``cmninit``). Raises ValueError for an unknown name.
    """
    if name == "pocketsphinx":
        from asrd.engines.pocketsphinx import PocketsphinxEngine

        return PocketsphinxEngine(decoders=decoders, **options)
    if name == "loadtest":
        # Placeholder text at near-zero CPU, for benchmarks of the gateway path (asrd bench).
        from asrd.engines.loadtest import LoadtestEngine

        return LoadtestEngine(decoders=decoders, **options)
    raise ValueError(f"unknown engine {name!r}; known: {', '.join(ENGINE_NAMES)}")
