#!/usr/bin/env bash
# Install adgrid's CPU stack into .venv (idempotent) and Debian's Fashion-MNIST package.
# Usage: ./setup.sh [--test]   (then: .venv/bin/python bench.py grids/demo.yaml)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
apt_install() {  # apt_install PACKAGE WHY: best effort, a note where apt is unavailable
  command -v apt-get >/dev/null || { echo "note: no apt-get; install $1 by hand ($2)"; return 0; }
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$1" >/dev/null 2>&1 ||
    { $SUDO apt-get update -q >/dev/null 2>&1 &&
      $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$1" >/dev/null 2>&1; } ||
    echo "note: could not install Debian's $1 ($2)"
}

# Real Fashion-MNIST without a download: Debian's dataset-fashion-mnist (60,000 / 10,000 IDX files).
[ -d /usr/share/datasets/fashion-mnist ] ||
  apt_install dataset-fashion-mnist "the Fashion-MNIST grid needs it or torchvision's files"
# --test: what the test suite needs beyond Python (headless Chromium renders report.html).
if [ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null; then
  apt_install chromium "the report's browser test is skipped without it"
fi

stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  # pip byte-compiles on one core, ~100 s of a ~200 s install here; compileall does it on all cores
  # (a run imports ~4,500 modules, torch's and ray's included, so compiling lazily saves nothing)
  .venv/bin/python -m pip install -q --no-compile -r requirements.txt
  .venv/bin/python -m compileall -q -j 0 .venv/lib/python*/site-packages >/dev/null 2>&1 || true
  echo "$want" > "$stamp"
fi
echo "adgrid: environment ready in .venv"
