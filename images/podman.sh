# Sourced by images/build.sh and images/smoke.sh: podman with its own configuration and storage under
# the cache, /etc left untouched. runc with cgroupfs (crun fails on hybrid cgroup hosts) and rlimits
# that need no CAP_SYS_RESOURCE. Sets IMAGE_CACHE.
IMAGE_CACHE="${WRPO_IMAGE_CACHE:-${WRPO_CACHE:-$HOME/.cache/wrpo}/images}"
mkdir -p "${IMAGE_CACHE}/podman"
export CONTAINERS_CONF="${IMAGE_CACHE}/podman/containers.conf"
export CONTAINERS_STORAGE_CONF="${IMAGE_CACHE}/podman/storage.conf"
cat >"${CONTAINERS_CONF}" <<CONF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
cat >"${CONTAINERS_STORAGE_CONF}" <<CONF
[storage]
driver = "overlay"
graphroot = "${IMAGE_CACHE}/podman/storage"
runroot = "${IMAGE_CACHE}/podman/run"
CONF
