#!/bin/sh
# Reruns every measurement of docs/benchmarks.md on this machine; the JSON reports go to
# $OUT (default bench/results/). Takes about an hour and a half on 2 cores, most of it the
# capacity searches and the soak run. Rerun it whenever the hot path changes
# (session.py, remote.py, bus/, segmentation/, dialects/, worker.py, engines/).
#
#   sh bench/run-benchmarks.sh            # everything
#   STEPS="baseline loadtest" sh bench/run-benchmarks.sh
#
# Every run first waits (up to QUIET s) for the machine to be idle, and records how much
# CPU anything else used meanwhile ("machine_load.other_cores" in each report).
set -eu
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
PY=${PY:-.venv/bin/python}
QUIET=${QUIET:-600}
STEPS=${STEPS:-"baseline loadtest loadtest-capacity pocketsphinx idle soak"}
SOAK_S=${SOAK_S:-1200}
mkdir -p "$OUT"
bench() { $PY -m asrd --log-level warning bench --quiet-wait "$QUIET" --retry-noisy "${RETRY:-3}" "$@"; }
LOADTEST="--spawn --engine loadtest --workers 8 --decoders 64"

for step in $STEPS; do
  case $step in
  baseline)
    bench --engine-baseline -o "$OUT/baseline.json" ;;
  loadtest)
    for n in ${LOADTEST_NS:-50 100 150 200 300 500}; do
      bench $LOADTEST -n $n --duration 60 --ramp 10 -o "$OUT/loadtest-$n.json"
    done ;;
  loadtest-capacity)
    bench $LOADTEST --find-capacity --start 50 --lag-limit-ms 100 --duration 60 --ramp 10 \
      -o "$OUT/loadtest-capacity.json" ;;
  pocketsphinx)
    # final_pass "live": finals from the streaming search (no extra pass)
    for d in 3 4 5; do
      bench --spawn --engine pocketsphinx --workers 2 --decoders $d --final-pass live \
        --engine-baseline --find-capacity --start 2 --duration 60 --ramp 5 \
        -o "$OUT/pocketsphinx-live-2x$d-capacity.json"
    done
    # final_pass "batch" (the default): a full-utterance pass per sentence, which holds the
    # worker's event loop; real time by a relaxed lag limit
    bench --spawn --engine pocketsphinx --workers 2 --decoders 3 --engine-baseline \
      --find-capacity --start 2 --lag-limit-ms 2000 --duration 60 --ramp 5 \
      -o "$OUT/pocketsphinx-batch-2x3-capacity.json" ;;
  idle)
    bench $LOADTEST --idle-sessions 500 -o "$OUT/idle-500.json" ;;
  soak)
    bench $LOADTEST -n "${SOAK_SESSIONS:-120}" --duration "$SOAK_S" --ramp 10 \
      --sample-interval 5 -o "$OUT/soak-loadtest.json" ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
