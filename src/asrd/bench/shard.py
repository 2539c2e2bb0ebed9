"""One client process of a split load: ``python -m asrd.bench.shard < plan.json > results.json``.

``asrd bench --processes K`` starts K of these with a share of the sessions each (same start
schedule, same clock: ``time.monotonic`` is machine-wide on Linux) and merges their results.
"""

from __future__ import annotations

import json
import sys
import time

import trio

from asrd.bench.load import LoadPlan, run_load


def main() -> int:
    plan = LoadPlan.from_json(sys.stdin.read())
    cpu0 = time.process_time()
    results = trio.run(run_load, plan)
    out = {"cpu_s": time.process_time() - cpu0, "results": [r.to_dict() for r in results]}
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
