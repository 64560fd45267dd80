#!/usr/bin/env bash
# Install podman + runc (and debootstrap, for the base image) from Debian's
# packages, and write a podman configuration that works in this sandbox.
# Idempotent: installed packages are not fetched again; the config is rewritten.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
[ "$(id -u)" = 0 ] || die "must run as root (rootful podman, debootstrap)"

t0=$(now)
PKGS=(podman runc conmon catatonit uidmap debootstrap)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing from the machine's apt sources: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    timeout 300 apt-get update -qq
    timeout 600 apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
log "TIMING install_packages=$(elapsed "$t0")s"

mkdir -p "$CONTAINER_ROOT"/{conf,storage,run,tmp,libpod-tmp,cni}

# Storage driver: overlay if root may mount one here, else vfs (slower, ~5x disk).
driver="${STORAGE_DRIVER:-}"
if [ -z "$driver" ]; then
    d="$CONTAINER_ROOT/tmp/overlay-probe"; rm -rf "$d"; mkdir -p "$d"/{l,u,w,m}
    if timeout 10 mount -t overlay overlay -o "lowerdir=$d/l,upperdir=$d/u,workdir=$d/w" "$d/m" 2>/dev/null; then
        umount "$d/m"; driver=overlay
    else
        driver=vfs
    fi
    rm -rf "$d"
fi

cat > "$CONTAINERS_STORAGE_CONF" <<CONF
[storage]
driver = "$driver"
graphroot = "$CONTAINER_ROOT/storage"
runroot = "$CONTAINER_ROOT/run"
CONF

# The sandbox refuses to raise any resource limit, even for root, and podman asks
# for nofile=1048576 by default: give containers the limits we already have.
# podman lowers its own RLIMIT_NPROC to 32768 before starting runc, hence the cap.
nofile=$(ulimit -Hn); [ "$nofile" = unlimited ] && nofile=1048576
nproc=$(ulimit -Hu);  [ "$nproc" = unlimited ] && nproc=32768
[ "$nproc" -gt 32768 ] && nproc=32768

cat > "$CONTAINERS_CONF" <<CONF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
# host network: no bridge, no iptables; builds reach the apt mirror and the
# package index exactly as the host does
netns = "host"
# no journald here
log_driver = "k8s-file"

[network]
network_config_dir = "$CONTAINER_ROOT/cni"

[engine]
# crun 1.8 refuses this machine's hybrid cgroup v1+v2 layout; runc works with
# cgroupfs (no systemd running)
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$CONTAINER_ROOT/events.log"
tmp_dir = "$CONTAINER_ROOT/libpod-tmp"
image_copy_tmp_dir = "$CONTAINER_ROOT/tmp"
CONF

# No image registry is used: never resolve a short name remotely.
cat > "$CONTAINERS_REGISTRIES_CONF" <<'CONF'
unqualified-search-registries = []
short-name-mode = "permissive"
CONF

PM_TIMEOUT=60 pm info --format 'podman {{.Version.Version}}, runtime {{.Host.OCIRuntime.Name}}, storage {{.Store.GraphDriverName}} at {{.Store.GraphRoot}}, ulimits nofile='"$nofile"' nproc='"$nproc" \
    || die "podman info failed"
log "TIMING install_engine=$(elapsed "$t0")s"
