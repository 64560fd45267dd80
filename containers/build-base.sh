#!/usr/bin/env bash
# Build $BASE_IMAGE -- Debian 12 minbase + python3, venv, pip, CA certificates --
# with debootstrap from this machine's own apt mirror, then `podman import`.
# No image registry is involved. Idempotent: does nothing when the image exists
# (FORCE=1 rebuilds).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
[ "$(id -u)" = 0 ] || die "must run as root"
[ -f "$CONTAINERS_CONF" ] || die "run install-engine.sh first"

if [ "${FORCE:-0}" != 1 ] && PM_TIMEOUT=30 pm image exists "$BASE_IMAGE"; then
    log "$BASE_IMAGE exists (FORCE=1 rebuilds)"
    exit 0
fi

# The first enabled URI serving Debian suite $1, from deb822 *.sources files or
# one-line *.list files: the mirror this machine already uses, read at run time.
apt_uri() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk -v s="$1" 'BEGIN{RS=""; IGNORECASE=1}
            /(^|\n)Enabled:[ \t]*no/ {next}
            { if (!match($0, /(^|\n)Suites:[^\n]*/)) next
              n = split(substr($0, RSTART, RLENGTH), w, /[ \t\n]+/)
              hit = 0; for (i = 1; i <= n; i++) if (w[i] == s) hit = 1
              if (hit && match($0, /(^|\n)URIs:[ \t]*[^ \t\n]+/)) {
                u = substr($0, RSTART, RLENGTH); sub(/.*URIs:[ \t]*/, "", u); print u; exit } }' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        awk -v s="$1" '$1=="deb" { i=2; if ($2 ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                                    if ($(i+1)==s) { print $i; exit } }' "$f"
    done
}
MIRROR="${DEBIAN_MIRROR:-$(apt_uri bookworm | head -1)}"
[ -n "$MIRROR" ] || die "no bookworm source in /etc/apt/sources.list*; set DEBIAN_MIRROR"
SECURITY="${DEBIAN_SECURITY_MIRROR:-$(apt_uri bookworm-security | head -1)}"
SECURITY="${SECURITY:-${MIRROR%/debian}/debian-security}"

# The package index pip uses on this host (empty: pip's default). Only http(s)
# indexes are forwarded; file:// ones do not exist inside the image.
pip_get() { timeout 30 python3 -m pip config get "$1" 2>/dev/null || true; }
INDEX_URL="${PIP_INDEX_URL:-$(pip_get global.index-url)}"
EXTRA_URLS=""
for u in ${PIP_EXTRA_INDEX_URL:-$(pip_get global.extra-index-url)}; do
    case "$u" in http://*|https://*) EXTRA_URLS="$EXTRA_URLS $u" ;; esac
done
log "apt: $MIRROR (security: $SECURITY); pip: ${INDEX_URL:-default index}${EXTRA_URLS:+, extra:$EXTRA_URLS}"

t0=$(now)
ROOTFS="$CONTAINER_ROOT/rootfs"
rm -rf "$ROOTFS"
log "debootstrap (about 45 s idle, up to 150 s on a busy machine) ..."
timeout 900 debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$ROOTFS" "$MIRROR" > "$CONTAINER_ROOT/debootstrap.log" 2>&1 \
    || { tail -20 "$CONTAINER_ROOT/debootstrap.log" >&2; die "debootstrap failed ($CONTAINER_ROOT/debootstrap.log)"; }
log "TIMING debootstrap=$(elapsed "$t0")s"

cat > "$ROOTFS/etc/apt/sources.list" <<CONF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb $SECURITY bookworm-security main
CONF

# CAs this host trusts beyond Debian's: this sandbox re-signs outgoing TLS with its
# own CA, so pip in the image fails certificate checks without them.
if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$ROOTFS/usr/local/share/ca-certificates/"
    timeout 60 chroot "$ROOTFS" update-ca-certificates >/dev/null 2>&1 || die "update-ca-certificates failed"
fi
{
    echo "[global]"
    if [ -n "$INDEX_URL" ]; then echo "index-url = $INDEX_URL"; fi
    if [ -n "$EXTRA_URLS" ]; then echo "extra-index-url =$EXTRA_URLS"; fi
    echo "cert = /etc/ssl/certs/ca-certificates.crt"
    echo "timeout = 60"
    echo "disable-pip-version-check = true"
} > "$ROOTFS/etc/pip.conf"

timeout 60 chroot "$ROOTFS" apt-get clean
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin \
       "$ROOTFS"/var/log/*.log "$ROOTFS"/tmp/* "$ROOTFS"/root/.cache

t1=$(now)
tar --numeric-owner -C "$ROOTFS" -c . \
  | PM_TIMEOUT=300 pm import --quiet \
      --change 'ENV LANG=C.UTF-8' --change 'ENV PYTHONUNBUFFERED=1' \
      --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
rm -rf "$ROOTFS"
PM_TIMEOUT=120 pm image prune -f >/dev/null 2>&1 || true  # an old base FORCE=1 untagged
log "TIMING import=$(elapsed "$t1")s"

PM_TIMEOUT=60 pm run --rm "$BASE_IMAGE" python3 -m pip --version >/dev/null \
    || die "smoke test of $BASE_IMAGE failed"
log "TIMING build_base=$(elapsed "$t0")s"
