#!/usr/bin/env bash
# .ci/container.sh: build the sdtune image with podman on a machine without Docker or a registry.
#
#   .ci/container.sh setup                 install podman & co. if missing, check that a container runs,
#                                          make the Debian base image if missing (cached by tag)
#   .ci/container.sh build <context> <tag> build <context>/docker/Dockerfile on that base with the CPU torch
#                                          wheel (copied into <context>/docker/) instead of CUDA torch
#   .ci/container.sh test-image            setup, then build the image tests/test_container.py uses
#                                          ($TEST_TAG) from this checkout, labelled with inputs-hash
#   .ci/container.sh inputs-hash           print the hash of what test-image would build from now
#                                          (the build context and build args; offline, builds nothing)
#   .ci/container.sh env                   print the environment lines podman needs here (eval-able)
#   .ci/container.sh test-env              the same for the tests: containers get no network at all
#                                          (containers.conf netns = "none", so docker/run's too)
#
# setup, build and test-image need the network (apt, a Debian mirror, PyPI): .ci/run calls test-image
# before `make test`; the tests never do. They only use $TEST_TAG if it exists and its label matches
# inputs-hash, and skip otherwise, naming the command that builds it.
#
# Exit status 3 means "containers cannot run on this machine"; the last line of output says why
# (.ci/run then goes on without the image, and the container tests skip).
#
# What this machine needs (checked on the CI machine; DESIGN.md, "Notes on this environment"): the runc runtime, low default
# ulimits (the CI sandbox lacks CAP_SYS_RESOURCE, so runc cannot raise them), a base image made locally
# with debootstrap (no registry is reachable), and the host CA bundle as a build secret for HTTPS to PyPI.
set -euo pipefail

BASE_IMAGE=${SDTUNE_CI_BASE_IMAGE:-localhost/sdtune-ci-base:bookworm}
TEST_TAG=${SDTUNE_CI_TEST_TAG:-localhost/sdtune-ci:test}
INPUTS_LABEL=org.sdtune.ci.inputs
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEBIAN_MIRROR=${SDTUNE_CI_DEBIAN_MIRROR:-}  # empty: debootstrap's own default mirror
TORCH_VERSION=${SDTUNE_CI_TORCH_VERSION:-2.13.0+cpu}
# The index the host's pip uses (empty: pip's default), so the build reaches what this machine reaches.
INDEX_URL=${SDTUNE_CI_INDEX_URL:-$(python3 -m pip config get global.index-url 2>/dev/null || true)}
STATE=${SDTUNE_CI_STATE:-/var/tmp/sdtune-ci}
CA_BUNDLE=${SDTUNE_CI_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
APT_PACKAGES="podman buildah runc catatonit uidmap debootstrap"

cannot() {
    printf 'containers cannot run here: %s\n' "$*"
    exit 3
}

log() {
    printf '[container.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2
}

write_conf() {
    mkdir -p "$STATE"
    cat >"$STATE/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]

[engine]
runtime = "runc"
EOF
    # The tests' containers: the same, with no network namespace but loopback. docker/run passes no
    # --network, so the default here is what its containers get.
    sed 's/^\[containers\]$/[containers]\nnetns = "none"/' "$STATE/containers.conf" >"$STATE/containers-offline.conf"
    export CONTAINERS_CONF="$STATE/containers.conf"
}

install_deps() {
    local missing=()
    for tool in podman buildah runc debootstrap; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    [ "${SDTUNE_CONTAINER_INSTALL:-1}" = 1 ] || cannot "missing ${missing[*]} and SDTUNE_CONTAINER_INSTALL=0"
    [ "$(id -u)" = 0 ] || cannot "missing ${missing[*]}; installing them needs root (apt-get install $APT_PACKAGES)"
    command -v apt-get >/dev/null 2>&1 || cannot "missing ${missing[*]} and no apt-get to install them"
    log "apt-get install $APT_PACKAGES"
    local t0=$SECONDS
    # shellcheck disable=SC2086  # a list of package names
    if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $APT_PACKAGES; } >"$STATE/apt.log" 2>&1; then
        tail -n 5 "$STATE/apt.log" >&2
        cannot "apt-get install $APT_PACKAGES failed (log: $STATE/apt.log)"
    fi
    log "installed in $((SECONDS - t0)) s"
}

make_base() {
    if podman image exists "$BASE_IMAGE"; then
        log "base image $BASE_IMAGE is cached"
        return 0
    fi
    [ "$(id -u)" = 0 ] || cannot "making the base image with debootstrap needs root"
    local t0=$SECONDS root
    root=$(mktemp -d "${TMPDIR:-/tmp}/sdtune-rootfs.XXXXXX")
    log "debootstrap bookworm (minbase) from ${DEBIAN_MIRROR:-the default mirror}"
    if ! debootstrap --variant=minbase bookworm "$root" ${DEBIAN_MIRROR:+"$DEBIAN_MIRROR"} >"$STATE/debootstrap.log" 2>&1; then
        tail -n 5 "$STATE/debootstrap.log" >&2
        rm -rf "$root"
        cannot "debootstrap failed (log: $STATE/debootstrap.log)"
    fi
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | podman import --quiet - "$BASE_IMAGE" >/dev/null
    rm -rf "$root"
    log "base image $BASE_IMAGE made in $((SECONDS - t0)) s"
}

check_runs() {
    local out
    # Before the base image exists, `podman info` tells whether storage and runtime work at all.
    if ! out=$(podman info --format '{{.Host.OCIRuntime.Name}}' 2>&1); then
        cannot "podman info failed: $(printf '%s' "$out" | tail -n 1)"
    fi
}

check_container() {
    local out
    if ! out=$(podman run --rm --pull=never --network none "$BASE_IMAGE" /bin/true 2>&1); then
        cannot "podman run failed: $(printf '%s' "$out" | tail -n 1)"
    fi
}

torch_wheel() {
    # The CPU wheel, wherever this machine's pip finds it (a local find-links dir, a mirror), else the
    # PyTorch CPU index. Never the multi-GB CUDA build.
    local dest=$1 spec="torch==$TORCH_VERSION"
    local opts=(download --quiet --no-deps --only-binary :all: --python-version 3.11
        --implementation cp --platform manylinux_2_28_x86_64 --dest "$dest")
    python3 -m pip "${opts[@]}" "$spec" 2>/dev/null ||
        python3 -m pip "${opts[@]}" --index-url https://download.pytorch.org/whl/cpu "$spec"
}

context() {
    # What .dockerignore lets through of the files the Dockerfile uses, copied to $1 (no torch wheel).
    local dest=$1 name names=()
    for name in pyproject.toml README.md .dockerignore sdtune docker; do
        [ ! -e "$ROOT/$name" ] || names+=("$name")
    done
    tar -C "$ROOT" -c --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' --exclude='*.whl' \
        "${names[@]}" | tar -C "$dest" -x
}

hash_of() {
    # The build context's paths and contents, the torch pin and the base image's id, in one sha256.
    local ctx=$1 base
    base=$(podman image inspect --format '{{.Id}}' "$BASE_IMAGE" 2>/dev/null || echo missing)
    {
        printf 'torch %s\nbase %s\n' "$TORCH_VERSION" "$base"
        (cd "$ctx" && find . -type f ! -name 'torch-*.whl' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum)
    } | sha256sum | cut -d' ' -f1
}

inputs_hash() {
    local ctx hash
    ctx=$(mktemp -d "${TMPDIR:-/tmp}/sdtune-context.XXXXXX")
    context "$ctx"
    hash=$(hash_of "$ctx")
    rm -rf "$ctx"
    echo "$hash"
}

build() {
    local ctx=$1 tag=$2 t0=$SECONDS
    shift 2
    [ -f "$ctx/docker/Dockerfile" ] || { echo "no $ctx/docker/Dockerfile" >&2; exit 2; }
    ls "$ctx"/docker/torch-*.whl >/dev/null 2>&1 || torch_wheel "$ctx/docker"
    local args=(build --pull=never --layers
        --file "$ctx/docker/Dockerfile" --tag "$tag"
        --build-arg "BASE_IMAGE=$BASE_IMAGE"
        --build-arg "TORCH_VERSION=$TORCH_VERSION"
        --build-arg "TORCH_INDEX_URL=$INDEX_URL"
        "$@")
    if [ -s "$CA_BUNDLE" ]; then
        args+=(--secret "id=ca_bundle,src=$CA_BUNDLE")
    fi
    log "podman ${args[*]} $ctx"
    podman "${args[@]}" "$ctx"
    log "image $tag built in $((SECONDS - t0)) s"
}

setup() {
    install_deps
    check_runs
    make_base
    check_container
    echo "ready: base $BASE_IMAGE, CONTAINERS_CONF=$CONTAINERS_CONF"
}

mkdir -p "$STATE"
write_conf
case ${1:-} in
    setup)
        setup
        ;;
    build)
        [ "$#" -eq 3 ] || { echo "usage: $0 build <context> <tag>" >&2; exit 2; }
        build "$2" "$3"
        ;;
    test-image)
        setup
        ctx=$(mktemp -d "${TMPDIR:-/tmp}/sdtune-context.XXXXXX")
        trap 'rm -rf "$ctx"' EXIT
        context "$ctx"
        hash=$(hash_of "$ctx")  # before build() adds the torch wheel (the pin stands for it)
        build "$ctx" "$TEST_TAG" --label "$INPUTS_LABEL=$hash"
        echo "ready: $TEST_TAG ($INPUTS_LABEL=$hash)"
        ;;
    inputs-hash)
        inputs_hash
        ;;
    env)
        printf 'export CONTAINERS_CONF=%q\n' "$CONTAINERS_CONF"
        ;;
    test-env)
        printf 'export CONTAINERS_CONF=%q\n' "$STATE/containers-offline.conf"
        ;;
    *)
        echo "usage: $0 setup | build <context> <tag> | test-image | inputs-hash | env | test-env" >&2
        exit 2
        ;;
esac
