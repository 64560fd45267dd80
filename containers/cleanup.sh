#!/usr/bin/env bash
# Remove every container, image and file these scripts made under
# $CONTAINER_ROOT. The Debian packages stay installed. Idempotent.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"

if [ -f "$CONTAINERS_CONF" ] && command -v podman >/dev/null; then
    # stops containers, unmounts layers, deletes images and storage
    PM_TIMEOUT=120 pm system reset --force >/dev/null 2>&1 || true
fi
if [ -d "$CONTAINER_ROOT" ]; then  # mounts a killed podman left behind
    awk -v r="$CONTAINER_ROOT/" 'index($2, r) == 1 {print $2}' /proc/mounts | sort -r \
        | while read -r m; do timeout 10 umount -l "$m" || true; done
fi
rm -rf "$CONTAINER_ROOT"
log "removed $CONTAINER_ROOT"
