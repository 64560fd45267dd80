# shellcheck shell=bash
# Sourced by every script here. Points podman at a configuration and an image
# store that live entirely under $CONTAINER_ROOT (a temporary directory), so
# nothing under /etc/containers or /var/lib/containers is read or changed.
#
#   CONTAINER_ROOT  config, image storage, logs, the shared data directory
#                   (default /tmp/alembic-sqlite-lock-containers)
#   BASE_IMAGE      the locally built Debian base image
#   APP_IMAGE       the Flask example's image

CONTAINER_ROOT="${CONTAINER_ROOT:-/tmp/alembic-sqlite-lock-containers}"
BASE_IMAGE="${BASE_IMAGE:-localhost/alembic-sqlite-lock-base:bookworm}"
APP_IMAGE="${APP_IMAGE:-localhost/alembic-sqlite-lock-flask:latest}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CONTAINER_ROOT BASE_IMAGE APP_IMAGE REPO_ROOT
export CONTAINERS_CONF="$CONTAINER_ROOT/conf/containers.conf"
export CONTAINERS_STORAGE_CONF="$CONTAINER_ROOT/conf/storage.conf"
export CONTAINERS_REGISTRIES_CONF="$CONTAINER_ROOT/conf/registries.conf"

# Every podman call is bounded (PM_TIMEOUT seconds, default 120). TMPDIR only
# for podman (layer blobs go there): a chroot'ed command would not find it.
pm() {
    TMPDIR="$CONTAINER_ROOT/tmp" timeout --kill-after=10 "${PM_TIMEOUT:-120}" podman "$@"
}

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }
log() { printf '[%s] %s\n' "$(basename "$0")" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
