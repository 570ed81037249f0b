#!/usr/bin/env bash
# The whole test suite on a fresh machine: a venv with the package and its test
# extras, Debian's chromium for the browser tests, then pytest (arguments pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(command -v python3.11 || command -v python3)
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch first and pinned: 2.13.0 is the CPU wheel CI installs; a bare `torch` would pull a CUDA build.
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e '.[test]'
if [ ! -x /usr/bin/chromium ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium
fi
exec .venv/bin/python -m pytest "$@"
