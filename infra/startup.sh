#!/usr/bin/env bash
# Startup script of the sdtune VM (runs as root on every boot; each step is skipped once done).
#   1. wait for the NVIDIA driver (the Deep Learning VM image installs it on first boot); if the GPU
#      stays unusable, stop with an error (journal and /etc/motd) and no docker runner, rather than
#      leave a VM whose stages would silently train on the CPU
#   2. install Docker (if the image lacks it) and the NVIDIA container toolkit
#   3. install DVC (pinned, with GCS support) in /opt/dvc, linked into /usr/local/bin: DVC runs on the
#      host (docker/run puts only each stage in the image); the Deep Learning VM image lacks it
#   4. clone the repository at the configured ref and build the sdtune:latest image
#   5. set SDTUNE_RUNNER=docker for every login, so `dvc repro` runs each stage in the image
# Settings come from instance metadata written by Terraform: sdtune-repo-url, sdtune-repo-ref,
# sdtune-bucket. Log: journalctl -u google-startup-scripts (or the serial console output).
# SDTUNE_STARTUP_ROOT (unset on the VM) prefixes every path the script writes, so that
# tests/test_infra.py can run it with stand-in commands in a scratch directory.
set -euo pipefail

ROOT=${SDTUNE_STARTUP_ROOT:-}
SRC=$ROOT/opt/sdtune
STATE=$ROOT/var/lib/sdtune-startup
mkdir -p "$STATE"

log() { printf 'sdtune-startup: %s\n' "$*"; }

# The GPU cannot be used: say so in the journal and at every login (/etc/motd), withdraw the docker
# runner a previous boot may have set up, and exit non-zero (google-startup-scripts logs the status).
gpu_unusable() {
    local why=$1
    printf 'sdtune-startup: ERROR: the GPU is unusable: %s\n' "$why" >&2
    rm -f "$ROOT/etc/profile.d/sdtune.sh"
    if [ -f "$ROOT/etc/environment" ]; then
        sed -i '/^SDTUNE_RUNNER=/d' "$ROOT/etc/environment"
    fi
    motd_clear
    printf 'sdtune: ERROR: the GPU is unusable, so SDTUNE_RUNNER=docker is not set: %s\n' "$why" >>"$ROOT/etc/motd"
    exit 1
}
motd_clear() {
    if [ -f "$ROOT/etc/motd" ]; then
        sed -i '/^sdtune: /d' "$ROOT/etc/motd"
    fi
}

metadata() {
    curl -fsS --retry 5 -H "Metadata-Flavor: Google" \
        "http://metadata.google.internal/computeMetadata/v1/instance/attributes/$1"
}

# Every apt-get waits up to 10 minutes for the dpkg lock, which unattended-upgrades holds for a while
# after the first boot, instead of failing (and ending the script under set -e).
apt_get() {
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -q "$@"
}
# apt-get update, retried: the lists lock (apt-daily's update) may be held too.
apt_updated=
apt_update() {
    local try
    for try in 1 2 3 4 5; do
        if apt_get update; then
            apt_updated=1
            return 0
        fi
        log "apt-get update failed (try $try of 5); retrying in 30 s"
        sleep 30
    done
    return 1
}
# Installs from package lists read by this boot's apt-get update (the image's may be months old).
apt_install() {
    [ -n "$apt_updated" ] || apt_update
    apt_get install -y --no-install-recommends "$@"
}

repo_url=$(metadata sdtune-repo-url)
repo_ref=$(metadata sdtune-repo-ref)
bucket=$(metadata sdtune-bucket)

# 1. The driver: the image installs it on first boot (metadata install-nvidia-driver=True).
for _ in $(seq 1 60); do
    nvidia-smi >/dev/null 2>&1 && break
    log "waiting for the NVIDIA driver"
    sleep 10
done
if ! nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; then
    gpu_unusable "nvidia-smi fails after 10 minutes (Secure Boot loads only a signed NVIDIA driver: if this image's is unsigned, set secure_boot = false in Terraform and apply; see infra/README.md)"
fi

# 2. Docker and the NVIDIA container toolkit (NVIDIA's apt repository, signed by its key).
if ! command -v docker >/dev/null 2>&1; then
    log "installing docker.io"
    apt_install docker.io
    systemctl enable --now docker
fi
# The Dockerfile uses RUN --mount, which needs BuildKit (the buildx plugin).
if ! docker buildx version >/dev/null 2>&1; then
    log "installing docker-buildx"
    apt_install docker-buildx || apt_install docker-buildx-plugin
fi
if ! command -v nvidia-ctk >/dev/null 2>&1; then
    log "installing the NVIDIA container toolkit"
    apt_install ca-certificates curl gnupg
    keyring=/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg
    mkdir -p "$ROOT/usr/share/keyrings" "$ROOT/etc/apt/sources.list.d"
    curl -fsSL https://nvidia.github.io/libnvidia-container/gpgkey | gpg --batch --yes --dearmor -o "$ROOT$keyring"
    curl -fsSL https://nvidia.github.io/libnvidia-container/stable/deb/nvidia-container-toolkit.list |
        sed "s#deb https://#deb [signed-by=$keyring] https://#" >"$ROOT/etc/apt/sources.list.d/nvidia-container-toolkit.list"
    apt_update # NVIDIA's repository, just added
    apt_install nvidia-container-toolkit
fi
if [ ! -f "$STATE/docker-runtime-configured" ]; then
    nvidia-ctk runtime configure --runtime=docker
    systemctl restart docker
    touch "$STATE/docker-runtime-configured"
fi

# 3. DVC on the host, in its own venv; the versions are docker/requirements.lock's (the tested ones).
DVC_VERSION=3.67.1
DVC_GS_VERSION=3.1.0
if [ "$("$ROOT/opt/dvc/bin/dvc" --version 2>/dev/null || true)" != "$DVC_VERSION" ]; then
    log "installing dvc $DVC_VERSION in /opt/dvc"
    apt_install python3-venv
    rm -rf "$ROOT/opt/dvc"
    python3 -m venv "$ROOT/opt/dvc"
    "$ROOT/opt/dvc/bin/pip" install --quiet --disable-pip-version-check "dvc[gs]==$DVC_VERSION" "dvc-gs==$DVC_GS_VERSION"
fi
mkdir -p "$ROOT/usr/local/bin"
ln -sfn /opt/dvc/bin/dvc "$ROOT/usr/local/bin/dvc"

# 4. The image: built at the first boot, and again only when the repo_ref metadata changes. Not
#    when the branch it names has moved: a Spot VM restarting after a preemption would rebuild with
#    other library versions, under which every checkpoint and cache item is another run's.
#    To rebuild from your clone: docker build --file docker/Dockerfile --tag sdtune:latest .
if [ "$(cat "$STATE/image-ref" 2>/dev/null || true)" != "$repo_ref" ] ||
    ! docker image inspect sdtune:latest >/dev/null 2>&1; then
    command -v git >/dev/null 2>&1 || apt_install git
    if [ ! -d "$SRC/.git" ]; then
        git clone --quiet "$repo_url" "$SRC"
    fi
    git -C "$SRC" fetch --quiet --tags origin "$repo_ref"
    git -C "$SRC" checkout --quiet --detach FETCH_HEAD
    commit=$(git -C "$SRC" rev-parse HEAD)
    log "building sdtune:latest from $repo_url at $repo_ref ($commit)"
    DOCKER_BUILDKIT=1 docker build --file "$SRC/docker/Dockerfile" --tag sdtune:latest --label "org.opencontainers.image.revision=$commit" "$SRC"
    printf '%s\n' "$commit" >"$STATE/image-commit"
    printf '%s\n' "$repo_ref" >"$STATE/image-ref"
fi
commit=$(cat "$STATE/image-commit")
if docker run --rm --gpus all sdtune:latest python -c "import torch; assert torch.cuda.is_available()"; then
    log "sdtune:latest sees the GPU(s)"
else
    gpu_unusable "torch in sdtune:latest sees no GPU under docker run --gpus all (nvidia-smi works on the host: check the NVIDIA container toolkit, and that the driver is new enough for the image's CUDA)"
fi

# 5. Every login shell (and PAM sessions) runs the stages in the image.
mkdir -p "$ROOT/etc/profile.d"
cat >"$ROOT/etc/profile.d/sdtune.sh" <<EOF
# Written by the sdtune startup script.
export SDTUNE_RUNNER=docker
export SDTUNE_IMAGE=sdtune:latest
export SDTUNE_DVC_REMOTE=gs://$bucket/dvc
EOF
if ! grep -qs '^SDTUNE_RUNNER=' "$ROOT/etc/environment"; then
    printf 'SDTUNE_RUNNER=docker\n' >>"$ROOT/etc/environment"
fi
motd_clear
log "ready: SDTUNE_RUNNER=docker, image sdtune:latest ($commit), DVC remote gs://$bucket/dvc"
