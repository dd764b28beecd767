#!/usr/bin/env bash
# Installs a real Label Studio server into its own virtual environment for the end-to-end tests of the
# ML backend. Label Studio pins many of its own dependencies (Django, DRF, ...), so it must never share
# the project's environment. Idempotent: re-running only verifies the install.
#
# Result: $TINYSAM_LS_VENV (default /opt/tinysam-ls/venv) with `label-studio` and `label-studio-sdk`;
# tests find it there (or through TINYSAM_LS_VENV) and skip with a clear reason when it is absent.
set -euo pipefail

LS_VERSION="${TINYSAM_LS_VERSION:-1.23.2}"
VENV="${TINYSAM_LS_VENV:-/opt/tinysam-ls/venv}"
# A data directory with the database already migrated and the test user created: migrating a fresh
# SQLite database takes minutes, copying this template takes milliseconds. Test-only credentials; the
# server only ever listens on 127.0.0.1.
TEMPLATE="$(dirname "$VENV")/template"
TEST_USER="admin@example.com"
TEST_PASSWORD="tinysam-e2e"
TEST_TOKEN="0123456789abcdef0123456789abcdef01234567"

make_template() {
    [ -f "$TEMPLATE/label_studio.sqlite3" ] && return 0
    local work port pid
    work="$(mktemp -d)"
    port="$("$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    env LABEL_STUDIO_BASE_DATA_DIR="$work/data" LATEST_VERSION_CHECK=false SENTRY_DSN= FRONTEND_SENTRY_DSN= \
        "$VENV/bin/label-studio" start --no-browser --internal-host 127.0.0.1 -p "$port" \
        --username "$TEST_USER" --password "$TEST_PASSWORD" --user-token "$TEST_TOKEN" \
        --enable-legacy-api-token >"$work/ls.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 600); do
        if "$VENV/bin/python" - "$port" "$TEST_TOKEN" <<'PY' 2>/dev/null; then break; fi
import sys, urllib.request
req = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/api/projects",
                             headers={"Authorization": f"Token {sys.argv[2]}"})
assert urllib.request.urlopen(req, timeout=2).status == 200
PY
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -30 "$work/ls.log"; echo "label-studio exited while preparing the template" >&2; return 1
        fi
        sleep 2
    done
    kill "$pid"; wait "$pid" 2>/dev/null || true
    if [ ! -f "$work/data/label_studio.sqlite3" ]; then
        tail -30 "$work/ls.log"; echo "label-studio did not create its database" >&2; return 1
    fi
    rm -rf "$TEMPLATE"
    mv "$work/data" "$TEMPLATE"
    rm -rf "$work"
    echo "label-studio data template ready in $TEMPLATE"
}

pick_python() {
    # Label Studio 1.23 supports CPython 3.10-3.13; prefer the interpreter already on PATH.
    for candidate in python3.12 python3.11 python3.13 python3.10 python3; do
        if command -v "$candidate" >/dev/null 2>&1 && "$candidate" - <<'PY' >/dev/null 2>&1
import sys, venv, ensurepip  # noqa: F401  (both must exist to create a venv with pip)
assert (3, 10) <= sys.version_info[:2] <= (3, 13)
PY
        then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

if [ -x "$VENV/bin/label-studio" ] && "$VENV/bin/python" -c "import label_studio, label_studio_sdk" 2>/dev/null; then
    installed="$("$VENV/bin/python" -c 'import label_studio; print(label_studio.__version__)')"
    if [ "$installed" = "$LS_VERSION" ]; then
        echo "label-studio $installed already installed in $VENV"
        make_template || echo "warning: no data template; the end-to-end test will migrate a fresh database" >&2
        exit 0
    fi
fi

if ! PY="$(pick_python)"; then
    # Fresh Debian 12: python3 exists but venv/ensurepip live in a separate package.
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq python3 python3-venv python3-pip >/dev/null
    PY="$(pick_python)"
fi

mkdir -p "$(dirname "$VENV")"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "label-studio==$LS_VERSION"
"$VENV/bin/python" -c "import label_studio, label_studio_sdk; print('label-studio', label_studio.__version__, 'installed in $VENV')"
make_template || echo "warning: no data template; the end-to-end test will migrate a fresh database" >&2
