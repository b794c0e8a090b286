#!/usr/bin/env bash
# Creates .venv at the repo root and installs the project (host + dev extras) into it.
# Idempotent: re-installs only when pyproject.toml or this script changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
stamp="$venv/.quantune-edge-installed"

# System tools for deployment tests, the emulated ARM board and the report test (Debian packages, root only).
need=()
command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh-keygen >/dev/null 2>&1 || need+=(openssh-client)
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || need+=(debootstrap)
[ -e /usr/libexec/qemu-binfmt/aarch64-binfmt-P ] || command -v qemu-aarch64-static >/dev/null 2>&1 || need+=(qemu-user-static)
command -v update-binfmts >/dev/null 2>&1 || [ -x /usr/sbin/update-binfmts ] || need+=(binfmt-support)
command -v chromium >/dev/null 2>&1 || need+=(chromium)  # renders report.html in a test
if [ "${#need[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing Debian packages: ${need[*]} ..." >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null && apt-get install -y -qq "${need[@]}" >/dev/null \
            || { echo "error: apt-get install ${need[*]} failed" >&2; exit 1; }
    else
        echo "note: deployment tests, the emulated ARM board and the report test need: ${need[*]} (apt-get install as root)" >&2
    fi
fi
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
