#!/usr/bin/env bash
# `make container-test`: the Flask example in 3 containers at once, each gunicorn
# with 4 workers, all migrating one SQLite file in a shared bind-mounted directory.
#
# From a fresh machine it installs podman from Debian's packages and builds the
# base image with debootstrap first (no image registry is involved). It passes only
# when every container is up (all 12 workers booted and answered /health with 200),
# every migration was applied exactly once (log lines and the demo chain's data
# migration), and every worker logged how it found the work. The containers are
# always stopped and removed. Every step is bounded with `timeout`.
#
#   N=3 WORKERS=4 READY_TIMEOUT=120 CONTAINER_ROOT=/tmp/... containers/test.sh
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$HERE/env.sh"

N="${N:-3}"
WORKERS="${WORKERS:-4}"
READY_TIMEOUT="${READY_TIMEOUT:-120}"
RUN="$CONTAINER_ROOT/last-run"   # logs and the shared data directory, kept for a look
NAMES=(); for i in $(seq 1 "$N"); do NAMES+=("alembic-flask-$i"); done
CONMON_PIDS=()
T0=$(now)
STEP="start"
RESULT=""
CHILD=""
exec 3>&1  # the summary goes here even if a trap fires inside a redirected command

remove_containers() {
    local ids p deadline
    # The store is private to these scripts: remove every container in it, including
    # the working containers an interrupted build leaves (--external).
    ids=$(PM_TIMEOUT=30 pm ps -aq --external 2>/dev/null || true)
    # shellcheck disable=SC2086
    [ -z "$ids" ] || PM_TIMEOUT=60 pm rm -f -t 10 $ids >/dev/null 2>&1 || true
    # conmon outlives `podman rm` briefly: wait (bounded) so nothing started here
    # stays running; kill by pid only as a last resort.
    deadline=$(( $(date +%s) + 15 ))
    for p in "${CONMON_PIDS[@]}"; do
        while kill -0 "$p" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.2; done
        if kill -0 "$p" 2>/dev/null; then log "conmon $p still alive, killing it"; kill "$p" || true; fi
    done
    CONMON_PIDS=()
}
finish() {
    local rc=$?
    trap - EXIT INT TERM
    if command -v podman >/dev/null && [ -f "$CONTAINERS_CONF" ]; then remove_containers; fi
    [ -n "$RESULT" ] || RESULT="FAIL at step '$STEP' (exit $rc)"
    [ "$rc" = 0 ] || case "$RESULT" in FAIL*) ;; *) RESULT="FAIL at step '$STEP' (exit $rc)" ;; esac
    echo "container-test: $RESULT in $(elapsed "$T0") s (logs: $RUN)" >&3
    exit "$rc"
}
on_signal() {
    if [ -n "$CHILD" ]; then kill -TERM "$CHILD" 2>/dev/null || true; fi
    exit "$1"
}
trap finish EXIT
trap 'on_signal 130' INT
trap 'on_signal 143' TERM
step() { STEP="$1"; log "== $1"; }
# Run a long step under `timeout SECONDS`, in the background: bash runs a trap only
# after a foreground command returns, but interrupts `wait` at once. On INT/TERM the
# trap passes TERM to `timeout`, which passes it on to the whole step.
bounded() {
    local rc=0
    timeout --kill-after=10 "$@" &
    CHILD=$!
    wait "$CHILD" || rc=$?
    CHILD=""
    return "$rc"
}

step "install engine"
bounded 1200 "$HERE/install-engine.sh"

step "build base image"
bounded 1200 "$HERE/build-base.sh"

# A fresh run directory; stale containers of an interrupted run go first.
remove_containers
rm -rf "$RUN"; mkdir -p "$RUN/data" "$RUN/logs"

step "build app image"
t=$(now)
# Build context: this repository's files as git sees them (tracked and untracked,
# minus .gitignore'd: no .venv, caches or databases).
ctx="$CONTAINER_ROOT/context"; rm -rf "$ctx"; mkdir -p "$ctx"
if git -C "$REPO_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$REPO_ROOT" ls-files -z --cached --others --exclude-standard \
        | timeout 60 tar -C "$REPO_ROOT" --ignore-failed-read --null -c -T - \
        | timeout 60 tar -x -C "$ctx"
else
    timeout 60 tar -C "$REPO_ROOT" --exclude-vcs --exclude='.venv*' --exclude='*cache' \
        --exclude='*.db' -c . | timeout 60 tar -x -C "$ctx"
fi
TMPDIR="$CONTAINER_ROOT/tmp" bounded 900 podman build --network host \
    --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$APP_IMAGE" \
    -f "$ctx/examples/flask_app/Containerfile" "$ctx" > "$RUN/build.log" 2>&1 \
    || { tail -30 "$RUN/build.log" >&2; die "image build failed ($RUN/build.log)"; }
PM_TIMEOUT=120 pm image prune -f >/dev/null 2>&1 || true  # what a rebuild left untagged
log "TIMING app_image=$(elapsed "$t")s"

step "start $N containers at once"
# Host network (see install-engine.sh): each gunicorn binds its own free port.
read -r -a PORTS <<<"$(timeout 10 python3 -c "
import socket
socks = [socket.socket() for _ in range($N)]
for s in socks: s.bind(('127.0.0.1', 0))
print(*[s.getsockname()[1] for s in socks])")"
t=$(now)
pids=()
for i in "${!NAMES[@]}"; do
    PM_TIMEOUT=60 pm run -d --name "${NAMES[$i]}" --network host \
        -e "BIND=127.0.0.1:${PORTS[$i]}" -e "WORKERS=$WORKERS" \
        -v "$RUN/data:/data" "$APP_IMAGE" >/dev/null &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || die "podman run failed"; done
for n in "${NAMES[@]}"; do
    CONMON_PIDS+=("$(PM_TIMEOUT=20 pm inspect -f '{{.State.ConmonPid}}' "$n")")
done
log "TIMING podman_run=$(elapsed "$t")s"

step "wait until every worker answers /health"
pairs=(); for i in "${!NAMES[@]}"; do pairs+=("${NAMES[$i]}=${PORTS[$i]}"); done
ready=0
bounded $((READY_TIMEOUT + 30)) python3 "$HERE/check.py" health "${pairs[@]}" \
    --workers "$WORKERS" --deadline "$READY_TIMEOUT" --out "$RUN/health.json" || ready=$?
log "TIMING ready=$(elapsed "$t")s"

step "check logs and database"
: > "$RUN/checks.txt"
for n in "${NAMES[@]}"; do
    PM_TIMEOUT=30 pm logs "$n" > "$RUN/logs/$n.log" 2>&1 || true
    state=$(PM_TIMEOUT=20 pm inspect -f '{{.State.Status}}' "$n" || echo unknown)
    if [ "$state" = running ]; then echo "PASS: $n is running"; else echo "FAIL: $n is $state"; fi \
        | tee -a "$RUN/checks.txt"
done
verified=0
timeout 60 python3 "$HERE/check.py" verify --pids "$RUN/health.json" --logs "$RUN/logs" \
    --db "$RUN/data/app.db" --versions "$REPO_ROOT/alembic/versions" --workers "$WORKERS" \
    | tee -a "$RUN/checks.txt" || verified=$?
failed=$(grep -c '^FAIL' "$RUN/checks.txt" || true)
if [ "$ready" != 0 ] || [ "$verified" != 0 ] || [ "$failed" != 0 ]; then
    for n in "${NAMES[@]}"; do echo "--- last lines of $n"; tail -15 "$RUN/logs/$n.log"; done >&2
    RESULT="FAIL ($failed of $(grep -c -E '^(PASS|FAIL)' "$RUN/checks.txt") checks failed)"
    exit 1
fi

step "stop"
t=$(now)
PM_TIMEOUT=60 pm stop -t 10 "${NAMES[@]}" >/dev/null
remove_containers
log "TIMING stop=$(elapsed "$t")s"
RESULT="PASS ($(grep -c '^PASS' "$RUN/checks.txt") checks: $N containers x $WORKERS workers, each migration applied once)"
