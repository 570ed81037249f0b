#!/usr/bin/env bash
# The whole test suite on a fresh machine: a venv with the package and its test
# extras, Debian's chromium for the browser tests, then pytest: with arguments, one pytest
# run with them; without, the whole suite in two processes side by side (see below).
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
if [ "$#" -gt 0 ]; then
  exec .venv/bin/python -m pytest "$@"
fi
# The whole suite: the browser tests (tests/web, mostly waiting on Chromium, a server and
# launched trainers) run in a second pytest process beside the rest, so the two cores
# are both busy; its output follows the first's. (One process cannot hold both:
# Playwright's sync API leaves an event loop running that the asyncio tests trip on.)
WEB_LOG=$(mktemp)
trap 'rm -f "$WEB_LOG"' EXIT
.venv/bin/python -m pytest -p no:cacheprovider tests/web >"$WEB_LOG" 2>&1 &
WEB_PID=$!
status=0
.venv/bin/python -m pytest --ignore=tests/web || status=$?
web_status=0
wait "$WEB_PID" || web_status=$?
echo
echo "== tests/web (run beside the rest) =="
cat "$WEB_LOG"
[ "$status" -ne 0 ] && exit "$status"
exit "$web_status"
