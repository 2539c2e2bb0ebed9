#!/bin/bash
# Boot Debian 12 with systemd as PID 1 in a systemd-nspawn container, install asrd there as
# systemd/README.md says, and check what the units claim (README, "Verified under systemd").
#
#   systemd/verify-in-container.sh [DIR]        default DIR: /tmp/asrd-systemd-verify
#
# A developer tool, not part of the test suite: it runs as root, needs debootstrap and
# systemd-nspawn (apt-get install debootstrap systemd-container), a Debian mirror and PyPI,
# about 2 GB in DIR, and 10 minutes. It installs the committed HEAD of this checkout (git
# clone, as the README does). The container has a network of its own (loopback only) once
# booted, so its ports do not meet the host's. It prints each command with its output and
# ends with "ALL CHECKS PASSED", or with the first check that failed (status 1); the
# container is stopped either way. DIR/base keeps the debootstrapped system for the next run.
# REUSE=1: boot DIR/root as the last run left it (no new installation). WITHOUT_STOP_ORDER=1:
# the gateway unit is installed without After=asrd-worker@0.service, a control run in which
# the check of the stop with a session running must fail.
set -euo pipefail

DIR=${1:-/tmp/asrd-systemd-verify}
REPO=$(cd "$(dirname "$0")/.." && pwd)
MIRROR=${MIRROR:-http://deb.debian.org/debian}
MACHINE=asrd-verify
ROOT=$DIR/root
WAV=/opt/asrd/tests/data/sense_and_sensibility_01_austen_64kb-0880.wav
WAV_REF="he was not an ill disposed young man"

[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 2; }
for tool in debootstrap systemd-nspawn nsenter git; do
    command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 2; }
done

fail() { echo "CHECK FAILED: $*"; exit 1; }
section() { printf '\n==== %s\n' "$*"; }

# --- 1. a Debian 12 root file system, with the packages the README's steps use -----------
mkdir -p "$DIR"
if [ ! -x "$DIR/base/usr/bin/python3" ]; then
    rm -rf "$DIR/base"
    debootstrap --variant=minbase \
        --include=systemd,systemd-sysv,dbus,python3,python3-venv,git,nats-server,ca-certificates,procps,iproute2 \
        bookworm "$DIR/base" "$MIRROR"
fi
nspawn=(systemd-nspawn --quiet --register=no --keep-unit --machine="$MACHINE" -D "$ROOT")
if [ -n "${REUSE:-}" ] && [ -x "$ROOT/opt/asrd/.venv/bin/asrd" ]; then
    echo "REUSE: the installation of the last run, as it was left"
else
rm -rf "$ROOT"
cp -a "$DIR/base" "$ROOT"
echo "$MACHINE" >"$ROOT/etc/hostname"

# --- 2. systemd/README.md, "Install", steps 1 to 4 (no systemd needed yet: not booted) -----
section "install (README steps 1-4, in the container's file system, network of the host)"
# pip checks PyPI's certificate against the host's CA bundle (a proxy's CA, where there is one).
HOST_CA=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
"${nspawn[@]}" --bind-ro="$REPO:/src" --bind-ro="$HOST_CA:/run/host-ca.crt" \
    --setenv=PIP_CERT=/run/host-ca.crt --pipe /bin/bash -euxo pipefail <<'INSTALL'
random() { tr -dc A-Za-z0-9 </dev/urandom | head -c 32; }

# 1.
useradd --system --user-group --home-dir /nonexistent --shell /usr/sbin/nologin asrd
# 2.
git clone -q /src /opt/asrd
python3 -m venv /opt/asrd/.venv
/opt/asrd/.venv/bin/pip install -q --disable-pip-version-check /opt/asrd
/opt/asrd/.venv/bin/python -m compileall -q /opt/asrd/.venv
# 3. (apt-get install nats-server: done by debootstrap; the boot starts it, no restart needed)
install -d -m 0755 /etc/nats
install -m 0644 /opt/asrd/deploy/nats-server.conf /etc/nats/asrd.conf
(umask 077; printf 'ASRD_NATS_GATEWAY_PASSWORD=%s\nASRD_NATS_WORKER_PASSWORD=%s\n' \
    "$(random)" "$(random)" >/etc/nats/asrd.env)
mkdir -p /etc/systemd/system/nats-server.service.d
printf '[Service]\nEnvironmentFile=/etc/nats/asrd.env\nExecStart=\nExecStart=%s\n' \
    '/usr/sbin/nats-server -c /etc/nats/asrd.conf' >/etc/systemd/system/nats-server.service.d/asrd.conf
# 4.
install -d -m 0750 -g asrd /etc/asrd
install -m 0640 -g asrd /opt/asrd/deploy/gateway.toml /etc/asrd/config.toml
install -m 0640 -g asrd /opt/asrd/deploy/worker.toml /etc/asrd/worker.toml
# the "editor" step: the passwords of /etc/nats/asrd.env, and a client token
. /etc/nats/asrd.env
sed -i "s/^password = .*/password = \"$ASRD_NATS_GATEWAY_PASSWORD\"/" /etc/asrd/config.toml
sed -i "s/^password = .*/password = \"$ASRD_NATS_WORKER_PASSWORD\"/" /etc/asrd/worker.toml
sed -i "s/^tokens = .*/tokens = [\"$(random)\"]/" /etc/asrd/config.toml
INSTALL
fi

# --- boot it --------------------------------------------------------------------------------
section "boot"
"${nspawn[@]}" --private-network -b </dev/null >"$DIR/console.log" 2>&1 &
NSPAWN=$!
LEADER=
cleanup() {
    if [ -n "$LEADER" ] && kill -0 "$LEADER" 2>/dev/null; then
        nsenter -t "$LEADER" -a -- systemctl poweroff || kill -TERM "$NSPAWN" || true
    else
        kill -TERM "$NSPAWN" 2>/dev/null || true  # it shuts the container down in order
    fi
    wait "$NSPAWN" 2>/dev/null || true
}
trap cleanup EXIT
# Its PID 1: the child of systemd-nspawn once that has become systemd.
for _ in $(seq 150); do
    LEADER=$(ps -o pid= --ppid "$NSPAWN" | tr -d ' ' | head -1 || true)
    [ -n "$LEADER" ] && [ "$(cat "/proc/$LEADER/comm" 2>/dev/null)" = systemd ] && break
    LEADER=
    sleep 0.2
done
[ -n "$LEADER" ] || fail "systemd-nspawn booted no systemd: $(cat "$DIR/console.log")"

# A command in the container (its namespaces; run by us, not by its systemd).
ct() {
    nsenter -t "$LEADER" -a -- env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
        SYSTEMD_PAGER= SYSTEMD_COLORS=0 "$@"
}
# Show a command and its output, as the evidence.
show() {
    echo "# $*"
    ct "$@" 2>&1
}
prop() { ct systemctl show -P "$2" "$1"; }
now() { ct date +%s.%N; }
seconds() { awk "BEGIN { printf \"%.1f\", $2 - $1 }"; }
# Wait up to $1 s for a shell condition (run in the container) to hold.
wait_for() {
    local guard=$1
    shift
    local i
    for i in $(seq $((guard * 5))); do
        ct sh -c "$*" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    fail "not within ${guard} s: $*"
}
journal_since() { ct journalctl --no-pager -o short-precise --since "@$1" "${@:2}"; }

wait_for 60 "test -S /run/systemd/private"
state=$(ct systemctl is-system-running --wait || true)
echo "system: $state"
show systemctl --version
show systemctl --failed --no-legend
show systemctl is-active nats-server.service
echo "# cat /etc/asrd/config.toml   (secrets elided)"
ct sed -E 's/(password|tokens) = .*/\1 = .../' /etc/asrd/config.toml

GW=asrd-gateway.service
WK=asrd-worker@0.service
. <(ct cat /etc/asrd/config.toml | sed -n 's/^tokens = \["\(.*\)"\]/TOKEN=\1/p')
transcribe() { ct /opt/asrd/.venv/bin/asrd transcribe --token "$TOKEN" --appkey my-app "$@"; }
# The output of asrd transcribe against a reference: a word error rate below 0.5 (pocketsphinx
# with its small default model gets some words wrong; the tests take the same bound).
check_transcript() {
    ct /opt/asrd/.venv/bin/python -c '
import sys
from asrd.wer import wer
hyp = " ".join(line.split("] ", 1)[-1] for line in sys.argv[1].splitlines())
rate = wer([sys.argv[2]], [hyp])
print(f"word error rate {rate:.2f} against: {sys.argv[2]}")
sys.exit(rate >= 0.5)' "$1" "$2" || fail "not the words spoken"
}

# --- 3. the checks ---------------------------------------------------------------------------
section "README step 5: enable and start; start returns after READY=1"
ct install -m 0644 /opt/asrd/systemd/asrd-gateway.service /opt/asrd/systemd/asrd-worker@.service \
    /opt/asrd/systemd/asrd.target /etc/systemd/system/
if [ -n "${WITHOUT_STOP_ORDER:-}" ]; then
    echo "WITHOUT_STOP_ORDER: After=asrd-worker@0.service taken out of the installed gateway unit"
    ct sed -i '/^After=asrd-worker@0.service$/d' /etc/systemd/system/asrd-gateway.service
    ! ct grep -q asrd-worker@0 /etc/systemd/system/asrd-gateway.service || fail "still ordered"
fi
show systemctl daemon-reload
show systemctl enable asrd.target asrd-gateway.service
show systemctl enable asrd-worker@0.service
t0=$(now)
show systemctl start asrd.target
t1=$(now)
echo "systemctl start asrd.target took $(seconds "$t0" "$t1") s"
for unit in $GW $WK; do
    s=$(ct systemctl is-active $unit || true)
    echo "$unit: $s"
    [ "$s" = active ] || fail "$unit is $s right after systemctl start"
done
show systemctl status --no-pager -n 0 $GW $WK
for unit in $GW $WK; do
    text=$(prop $unit StatusText)
    echo "$unit StatusText=$text"
    [ -n "$text" ] || fail "$unit has no status line"
done

section "the logs of the start: no warning"
for unit in $GW $WK; do
    show journalctl --no-pager -b -u $unit -p warning
    [ -z "$(ct journalctl --no-pager -q -b -u $unit -p warning)" ] || fail "warnings at start"
done

section "a transcription through the gateway"
echo "# asrd transcribe --token ... --appkey my-app $WAV"
out=$(transcribe "$WAV")
echo "$out"
check_transcript "$out" "$WAV_REF"
echo "StatusText after it: $(prop $GW StatusText)"

section "gateway watchdog: SIGSTOP -> SIGABRT after WatchdogSec=10, restarted"
pid=$(prop $GW MainPID)
restarts=$(prop $GW NRestarts)
t0=$(now)
echo "$(ct date +%T.%N): kill -STOP $pid"
ct kill -STOP "$pid"
wait_for 60 "[ \$(systemctl show -P MainPID $GW) != $pid ] && systemctl is-active -q $GW"
journal_since "$t0" -u $GW | grep -E 'Watchdog|SIGABRT|code=|Scheduled restart|Started|Main process' || true
[ "$(prop $GW NRestarts)" -gt "$restarts" ] || fail "NRestarts did not grow"
journal_since "$t0" -u $GW | grep -q "Watchdog timeout" || fail "no watchdog timeout in the journal"
journal_since "$t0" -u $GW | grep -q "SIGABRT\|status=6/ABRT" || fail "not killed by SIGABRT"
echo "new MainPID $(prop $GW MainPID), NRestarts $(prop $GW NRestarts)"

section "worker watchdog: SIGSTOP of a worker process -> its asrd worker kills and forks it again"
main=$(prop $WK MainPID)
child=$(ct pgrep -P "$main" | head -1)
echo "asrd worker main pid $main, its processes: $(ct pgrep -P "$main" | tr '\n' ' ')"
t0=$(now)
echo "$(ct date +%T.%N): kill -STOP $child"
ct kill -STOP "$child"
wait_for 150 "! kill -0 $child 2>/dev/null && [ \$(pgrep -P $main | wc -l) -ge 2 ]"
journal_since "$t0" -u $WK | grep -E "pid $child|process [0-9]+ started|Watchdog" || true
echo "asrd worker main pid $(prop $WK MainPID) (was $main), its processes: $(ct pgrep -P "$main" | tr '\n' ' ')"
[ "$(prop $WK MainPID)" = "$main" ] || fail "the unit was restarted, not the one process"
ct journalctl --no-pager -q -u $WK -p warning --since "@$t0" | grep -q "stopped pinging" ||
    fail "asrd's warning is not at priority warning in the journal"
out=$(transcribe --fast "$WAV")
echo "transcription afterwards: $out"
check_transcript "$out" "$WAV_REF"

section "kill -9 of the gateway: restarted after RestartSec=2"
pid=$(prop $GW MainPID)
t0=$(now)
echo "$(ct date +%T.%N): kill -KILL $pid"
ct kill -KILL "$pid"
wait_for 30 "[ \$(systemctl show -P MainPID $GW) != $pid ] && systemctl is-active -q $GW"
journal_since "$t0" -u $GW | grep -E 'code=|Scheduled restart|Started|Starting' || true

section "a bad configuration: exit status 2, not restarted"
ct cp -p /etc/asrd/config.toml /etc/asrd/config.toml.good
ct sed -i 's/^\[server\]$/&\nno_such_key = 1/' /etc/asrd/config.toml
t0=$(now)
show systemctl restart $GW || true
restarts=$(prop $GW NRestarts)  # a restart by hand counts from 0 again
sleep 5  # two RestartSec
journal_since "$t0" -u $GW | grep -v '^--' || true
show systemctl show -p ActiveState -p Result -p ExecMainStatus -p NRestarts $GW
[ "$(prop $GW ExecMainStatus)" = 2 ] || fail "exit status is not 2"
[ "$(prop $GW ActiveState)" = failed ] || fail "not failed"
[ "$(prop $GW NRestarts)" = "$restarts" ] || fail "it was restarted"
journal_since "$t0" -u $GW | grep -q "Scheduled restart" && fail "a restart was scheduled"
ct mv /etc/asrd/config.toml.good /etc/asrd/config.toml
show systemctl start $GW

section "SIGHUP: drain, exit 129, restarted by Restart=on-failure"
for unit in $GW $WK; do
    pid=$(prop $unit MainPID)
    t0=$(now)
    show systemctl kill -s HUP $unit
    wait_for 60 "[ \$(systemctl show -P MainPID $unit) != $pid ] && systemctl is-active -q $unit"
    journal_since "$t0" -u $unit | grep -E 'SIGHUP|code=|status=|Scheduled restart|Started' || true
    journal_since "$t0" -u $unit | grep -q "status=129" || fail "$unit did not end with 129"
done
show systemctl reload $GW || true

section "systemctl restart asrd.target: returns once both are ready again"
gw=$(prop $GW MainPID)
wk=$(prop $WK MainPID)
t0=$(now)
show systemctl restart asrd.target
t1=$(now)
echo "systemctl restart asrd.target took $(seconds "$t0" "$t1") s"
show systemctl is-active $GW $WK
[ "$(ct systemctl is-active $GW $WK | sort -u)" = active ] || fail "not active after restart"
[ "$(prop $GW MainPID)" != "$gw" ] && [ "$(prop $WK MainPID)" != "$wk" ] || fail "not restarted"

# The session running when the stop begins: two sentences with 1.5 s of silence between them
# (above max_sentence_silence, 800 ms by default), 7.8 s of audio in all (under
# shutdown_grace_s), in real time, the stop during the first. It must get both sentences and
# end 20000000 within shutdown_grace_s of the stop. (A session of one sentence passes even
# when the workers stop with the gateway: a draining worker finishes the utterance in
# progress before it hands the session back, and only the next one has no worker left.)
STOP_WAV=/var/tmp/asrd-two-sentences.wav
STOP_REFS=("$WAV_REF" "he might even have been made amiable himself")
GRACE=10  # [server] shutdown_grace_s of deploy/gateway.toml
ct /usr/bin/python3 -c '
import sys, wave
with wave.open(sys.argv[1], "wb") as out:
    for i, name in enumerate(sys.argv[2:]):
        with wave.open(name) as w:
            if i == 0:
                out.setparams(w.getparams())
            else:  # 1.5 s of silence
                out.writeframes(bytes(w.getsampwidth() * int(1.5 * w.getframerate())))
            out.writeframes(w.readframes(w.getnframes()))
' "$STOP_WAV" "$WAV" /opt/asrd/tests/data/sense_and_sensibility_01_austen_64kb-0930.wav
session_during() {
    echo "# asrd transcribe --json $STOP_WAV &   (two sentences, 7.8 s in real time;"
    echo "#   1.5 s after the server's TranscriptionStarted, in the first sentence: $*)"
    (   # every line of the client with the time it came (the host's clock is the container's)
        set +e
        transcribe --json "$STOP_WAV" 2>&1 |
            while IFS= read -r line; do printf '%s %s\n' "$(date +%s.%N)" "$line"; done
        exit "${PIPESTATUS[0]}"
    ) >"$DIR/drained.txt" &
    local client=$!
    local i
    for i in $(seq 100); do
        grep -q '"TranscriptionStarted"' "$DIR/drained.txt" && break
        sleep 0.1
    done
    sleep 1.5
    t0=$(now)
    show "$@"
    t1=$(now)
    echo "$* took $(seconds "$t0" "$t1") s"
    stopped_at_return=$(ct systemctl is-active $GW $WK | tr '\n' ' ' || true)
    echo "right after it: $stopped_at_return"
    # stopped: inactive (or failed), not deactivating; TimeoutStopSec=30, and more
    wait_for 40 "[ -z \"\$(systemctl is-active $GW $WK | grep -vx -e inactive -e failed)\" ]"
    echo "both inactive after $(seconds "$t0" "$(now)") s"
    local rc=0
    wait "$client" || rc=$?
    echo "the client ended with $rc; its events (seconds after the stop, name, status, result):"
    ct /opt/asrd/.venv/bin/python -c '
import json, sys
from asrd.wer import wer
t0, grace, refs = float(sys.argv[2]), float(sys.argv[3]), sys.argv[4:]
events, failures = [], []
for line in sys.argv[1].splitlines():
    at, _, text = line.partition(" ")
    try:
        event = json.loads(text)
    except ValueError:
        print(f"  {float(at) - t0:+6.2f}  {text}")
        continue
    header, payload = event["header"], event.get("payload") or {}
    events.append((float(at) - t0, header["name"], header["status"], payload.get("result")))
    if events[-1][1] != "TranscriptionResultChanged":
        print("  %+6.2f  %s %s  %s" % (events[-1][0], events[-1][1], events[-1][2], events[-1][3] or ""))
ends = [e for e in events if e[1] == "SentenceEnd" and e[3]]
begins = [e for e in events if e[1] == "SentenceBegin"]
if not (begins and begins[0][0] < 0 and ends and ends[0][0] > 0):
    failures.append("the stop did not come during the first sentence")
if len(ends) != len(refs):
    failures.append(f"{len(ends)} sentences, not {len(refs)}")
for end, ref in zip(ends, refs):
    rate = wer([ref], [end[3]])
    print(f"  word error rate {rate:.2f} against: {ref}")
    if rate >= 0.5:
        failures.append(f"not the words spoken: {end[3]!r}")
last = events[-1] if events else (0, "nothing", 0, None)
if (last[1], last[2]) != ("TranscriptionCompleted", 20000000):
    failures.append(f"it ended with {last[1]} {last[2]}, not TranscriptionCompleted 20000000")
elif last[0] > grace:
    failures.append(f"it ended {last[0]:.1f} s after the stop, after shutdown_grace_s")
print("\n".join(failures) or f"both sentences, 20000000, {last[0]:.1f} s after the stop")
sys.exit(bool(failures))' "$(cat "$DIR/drained.txt")" "$t0" "$GRACE" "${STOP_REFS[@]}" || rc=failed
    journal_since "$t0" -u $GW -u $WK | grep -Ev '^--' || true
    [ "$rc" != failed ] ||
        fail "the session running during the stop did not get all its sentences in the drain"
    [ "$rc" = 0 ] || fail "the client ended with $rc"
    left=$(ct pgrep -u asrd || true)
    [ -z "$left" ] || fail "processes left: $left"
    echo "processes of user asrd left: none"
}

section "systemctl stop asrd.target: the drain (sessions get shutdown_grace_s), no process left"
session_during systemctl stop asrd.target
echo "(systemctl stop asrd.target returned before the units had stopped: it waits for the"
echo " target's own job, which is ordered before theirs)"

section "the stop that waits: systemctl stop asrd.target asrd-gateway.service 'asrd-worker@*'"
show systemctl start asrd.target
session_during systemctl stop asrd.target asrd-gateway.service 'asrd-worker@*.service'
[ "$stopped_at_return" = "inactive inactive " ] || fail "it returned before the units stopped"

section "systemd-analyze security"
for unit in $GW $WK; do
    ct systemd-analyze security --no-pager $unit | tail -1 | sed "s/^/$unit: /"
done

section "the logs: the warnings of the whole run (the faults above), and no traceback"
show journalctl --no-pager -b -u $GW -p warning
show journalctl --no-pager -b -u $WK -p warning
if ct journalctl --no-pager -b -u $GW -u $WK | grep -E "Traceback|Permission denied|Operation not permitted|SIGSYS"; then
    fail "tracebacks or denials in the journal"
fi

section "ALL CHECKS PASSED"
