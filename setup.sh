#!/usr/bin/env bash
# Install adgrid's CPU stack into .venv (idempotent) and Debian's Fashion-MNIST package.
# Usage: ./setup.sh            (then: .venv/bin/python bench.py grids/demo.yaml)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

# Real Fashion-MNIST without a download: Debian's dataset-fashion-mnist (60,000 / 10,000 IDX files).
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  ( $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 ||
    { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } ) ||
    echo "note: could not install Debian's dataset-fashion-mnist (the Fashion-MNIST grid needs it or torchvision's files)"
fi

stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/python -m pip install -q -r requirements.txt
  echo "$want" > "$stamp"
fi
echo "adgrid: environment ready in .venv"
