#!/usr/bin/env bash
# Creates .venv at the repo root and installs the project (host + dev extras) into it.
# Idempotent: re-installs only when pyproject.toml or this script changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
stamp="$venv/.quantune-edge-installed"
want="$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/quantune-edge" ]; then
    exit 0
fi
py=""
for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)'; then
        py="$cand"; break
    fi
done
if [ -z "$py" ]; then
    echo "error: Python 3.11 is required (onnx2tf 1.29 / TensorFlow 2.19 pins); none found on PATH" >&2
    exit 1
fi
echo "setting up $venv (first run takes a minute) ..." >&2
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip setuptools wheel
"$venv/bin/python" -m pip install --quiet -e ".[host,dev]"
echo "$want" > "$stamp"
