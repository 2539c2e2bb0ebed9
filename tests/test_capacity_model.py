"""bench/capacity_model.py: the fluid model behind "Why not 90%" in docs/benchmarks.md."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from asrd.bench.corpus import Playlist, default_data_dir, load_corpus

ROOT = Path(__file__).resolve().parent.parent


def _model() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "capacity_model", ROOT / "bench/capacity_model.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["capacity_model"] = module
    spec.loader.exec_module(module)
    return module


def test_work_under_the_cores_waits_for_nothing_and_over_them_piles_up() -> None:
    m = _model()
    steps = int(10 / m.STEP_S)
    one = np.ones((1, steps), dtype=bool)
    assert m.worst_p95_lag_s(one, 0.5, 1.0, 0.05) == pytest.approx(0.05, abs=0.011)
    # A session runs on one core at most, however many there are.
    assert m.worst_p95_lag_s(one, 1.5, 2.0, 0.05) > 4.0
    two = np.ones((2, steps), dtype=bool)
    assert m.worst_p95_lag_s(two, 0.45, 1.0, 0.05) == pytest.approx(0.05, abs=0.011)
    # 0.5 of a core short: after t seconds each session waits 0.25 t of work on half a core.
    assert m.worst_p95_lag_s(two, 0.75, 1.0, 0.0) == pytest.approx(0.95 * 10 * 0.25 / 0.5, rel=0.05)


def test_the_schedule_is_the_bench_sessions() -> None:
    m = _model()
    corpus = load_corpus(default_data_dir())
    active, fed, stream = m.schedule(corpus, 3, 6.0, 20.0, 1500)
    playlists = [
        Playlist.build(corpus, first=k, min_duration_s=20.0, gap_ms=1500) for k in range(3)
    ]
    assert stream == pytest.approx(sum(p.duration_s for p in playlists))
    speech = sum((i.end_ms - i.start_ms) / 1000 + m.TRAILING_S for p in playlists for i in p.items)
    assert fed == pytest.approx(speech)
    assert active.sum() * m.STEP_S == pytest.approx(speech, abs=0.1)
    # Session 1 starts 2 s after session 0 (6 s of ramp over 3), with its 300 ms lead-in.
    assert not active[1, : int(2.3 / m.STEP_S) - 1].any() and active[1, int(2.35 / m.STEP_S)]
