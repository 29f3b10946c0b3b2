# Shared by the scripts: a project virtualenv in .venv with alchemium installed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
ensure_venv() {
    local extras="$1"
    if [ ! -x .venv/bin/python ]; then
        "$PY" -m venv .venv
        .venv/bin/python -m pip install --quiet --upgrade pip
    fi
    .venv/bin/python -m pip install --quiet -e ".[$extras]"
}
