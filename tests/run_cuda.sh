#!/usr/bin/env bash
# The suite on a borrowed GPU machine, from the repo root:  bash tests/run_cuda.sh
#
# The machine: python3 with a CUDA torch preinstalled, no network, no chromium, runs as
# root. Nothing is pip-installed from an index and the package itself is not installed:
#   1. the wheels carried in .whl/ (the dependencies the image lacks) go to /tmp/site;
#      on 2026-11-27 (an image with Python 3.12 and torch 2.11+cu130) that was fastapi,
#      starlette, pydantic, pydantic-core, annotated-types, annotated-doc,
#      typing-inspection, typing-extensions, opentelemetry-api, uvicorn, websockets,
#      orjson, plotly and pytest-timeout, at the versions in the dev venv, fetched with
#        python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#          --implementation cp --platform manylinux2014_x86_64 -d .whl NAME==VERSION
#      (13 MB; .whl/ is git-ignored, so pass it in the device tool's carry);
#   2. /tmp/pkg/layerscope/{trainer,server,web} are symlinks to this checkout, with a
#      dist-info (so importlib.metadata knows layerscope's version) and a `layerscope`
#      command on PATH; PYTHONPATH=/tmp/pkg:/tmp/site, inherited by every subprocess;
#   3. what the machine is (GPU, torch, CUDA, package versions) -> $OUT/env.log;
#   4. pytest tests/trainer tests/test_example.py, where the `device` fixture's cuda
#      cases run -> $OUT/pytest.log (+ pytest.xml);
#   5. benchmarks/overhead.py on CUDA -> $OUT/overhead.log;
#   6. tests/server (no browser; launched trainers pick CUDA) while time is left
#      -> $OUT/pytest-server.log (+ pytest-server.xml).
# Every step runs even if an earlier one failed; each has a wall-clock cap, and the whole
# script ends by DEADLINE_S (default 420 s). Exits with the first non-zero pytest status.
#
# Knobs (environment): PYTHON (python3), OUT (log folder; default /tmp/run_cuda_logs),
# MAXFAIL (10; `-x` stops at the first failure and hides the rest of a one-shot run),
# DEADLINE_S (420), TRAINER_CAP_S (240), TRAINER_ARGS (more pytest arguments for step 4,
# e.g. "-k cuda" for the CUDA cases alone), BENCH_CAP_S (120), SERVER_TESTS (1; 0 skips),
# BENCH_STEPS (300), BENCH_ARGS (--no-peers; empty to include TensorBoard).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
PY=$(command -v "${PYTHON:-python3}") || { echo "no ${PYTHON:-python3}"; exit 2; }
LOGS=${OUT:-/tmp/run_cuda_logs}
mkdir -p "$LOGS"
rm -f "$LOGS"/{env,pytest,overhead,pytest-server}.{log,xml}
DEADLINE_S=${DEADLINE_S:-420}
MAXFAIL=${MAXFAIL:-10}
export PYTHONUNBUFFERED=1 PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
unset LAYERSCOPE_SERVER

log() {  # log FILE: stdin to stdout and to $LOGS/FILE
  tee -a "$LOGS/$1"
}

# ---- 1. wheels -> /tmp/site ----
SITE=/tmp/site
if compgen -G ".whl/*.whl" >/dev/null; then
  echo "installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into $SITE"
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" .whl/*.whl; then
    echo "pip install failed; unpacking the wheels instead"  # a wheel is a zip of its files
    mkdir -p "$SITE"
    for w in .whl/*.whl; do "$PY" -m zipfile -e "$w" "$SITE" || echo "could not unpack $w"; done
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "no .whl/ here: using only what the image has"
fi

# ---- 2. the package from this checkout -> /tmp/pkg ----
PKG=/tmp/pkg
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n 1)
rm -rf "$PKG"
mkdir -p "$PKG/layerscope" "$PKG/layerscope-${VERSION}.dist-info" "$PKG/bin"
: >"$PKG/layerscope/__init__.py"
for sub in trainer server web; do ln -s "$ROOT/$sub" "$PKG/layerscope/$sub"; done
printf 'Metadata-Version: 2.1\nName: layerscope\nVersion: %s\n' "$VERSION" \
  >"$PKG/layerscope-${VERSION}.dist-info/METADATA"
printf '[console_scripts]\nlayerscope = layerscope.server.cli:main\n' \
  >"$PKG/layerscope-${VERSION}.dist-info/entry_points.txt"
printf '#!/bin/sh\nexec "%s" -m layerscope.server "$@"\n' "$PY" >"$PKG/bin/layerscope"
chmod +x "$PKG/bin/layerscope"
export PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$PKG/bin:$PATH"

# ---- 3. the machine ----
{
  echo "== $(date -u +%FT%TZ) $(uname -m) $(nproc) cores, PYTHONPATH=$PYTHONPATH"
  nvidia-smi -L || echo "nvidia-smi failed"
  "$PY" - <<'EOF'
import importlib.metadata as md
import sys
import traceback

print("python", sys.version.split()[0], sys.executable)
try:
    import torch

    print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn",
          torch.backends.cudnn.version(), "available", torch.cuda.is_available(),
          "devices", torch.cuda.device_count())
    if torch.cuda.is_available():
        print("device 0:", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
except Exception:
    traceback.print_exc()
names = ["layerscope", "fastapi", "starlette", "pydantic", "pydantic-core", "uvicorn",
         "websockets", "orjson", "plotly", "narwhals", "opentelemetry-api", "typing-extensions",
         "anyio", "httpx", "httpcore", "h11", "uvloop", "jinja2", "numpy", "scikit-learn",
         "scipy", "psutil", "pytest", "pytest-timeout", "pluggy"]
for name in names:
    try:
        dist = md.distribution(name)
        print(f"  {name:<20} {dist.version:<12} {dist.locate_file('')}")
    except md.PackageNotFoundError:
        print(f"  {name:<20} MISSING")
for mod in ("layerscope.trainer.watch", "layerscope.trainer.experiment",
            "layerscope.server.app", "layerscope.server.pages"):
    try:
        __import__(mod)
        print("import", mod, "ok")
    except Exception:
        print("import", mod, "FAILED")
        traceback.print_exc()
print("layerscope.trainer from", getattr(sys.modules.get("layerscope.trainer"), "__file__", None))
EOF
} 2>&1 | log env.log

# ---- 4. trainer tests (cuda cases included) ----
remaining() { echo $((DEADLINE_S - SECONDS)); }
cap() {  # cap WANTED: WANTED, or what is left before the deadline if that is less
  local left
  left=$(remaining)
  if [ "$1" -lt "$left" ]; then echo "$1"; else echo "$left"; fi
}
pytest_run() {  # pytest_run NAME CAP PATHS...: pytest under a wall-clock cap; returns its status
  local name=$1 limit=$2
  shift 2
  echo "== pytest $* (cap ${limit}s, maxfail $MAXFAIL, at ${SECONDS}s)"
  timeout -k 15 "$limit" "$PY" -m pytest -q -p no:cacheprovider --timeout=120 \
    --maxfail="$MAXFAIL" --durations=10 --junitxml="$LOGS/$name.xml" "$@" 2>&1 | log "$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 124 ] && echo "pytest $name hit its ${limit}s cap and was stopped" | log "$name.log"
  # Which cuda cases ran: proof that the device fixture did its job on this machine.
  "$PY" - "$LOGS/$name.xml" <<'EOF' 2>&1 | log "$name.log"
import sys
import xml.etree.ElementTree as ET

try:
    cases = list(ET.parse(sys.argv[1]).iter("testcase"))
except Exception as exc:  # no report: pytest was killed before writing it
    sys.exit(f"no junit report ({exc})")
cuda = [c for c in cases if "cuda" in c.get("name", "")]
def outcome(c):
    for tag in ("failure", "error", "skipped"):
        if c.find(tag) is not None:
            return tag
    return "passed"
counts = {}
for c in cuda:
    counts[outcome(c)] = counts.get(outcome(c), 0) + 1
print(f"cuda cases: {len(cuda)} of {len(cases)} tests: {counts}")
for c in cuda:
    if outcome(c) != "passed":
        print(f"  {outcome(c)}: {c.get('classname')}::{c.get('name')}")
EOF
  echo "== pytest $name exit $rc (at ${SECONDS}s)" | log "$name.log"
  return "$rc"
}
# shellcheck disable=SC2086
pytest_run pytest "$(cap "${TRAINER_CAP_S:-240}")" ${TRAINER_ARGS:-} tests/trainer tests/test_example.py
status=$?

# ---- 5. overhead benchmark on CUDA ----
BENCH_STEPS=${BENCH_STEPS:-300}
BENCH_ARGS=${BENCH_ARGS---no-peers}  # set but empty: peers included
BENCH_CAP=$(cap "${BENCH_CAP_S:-120}")
if [ "$BENCH_CAP" -ge 20 ]; then
  # BENCH_ARGS: "--no-peers" skips TensorBoard (the only peer the GPU image has)
  echo "== benchmarks/overhead.py --device cuda --steps $BENCH_STEPS $BENCH_ARGS (cap ${BENCH_CAP}s)" | log overhead.log
  # shellcheck disable=SC2086
  timeout -k 10 "$BENCH_CAP" "$PY" benchmarks/overhead.py --device cuda --steps "$BENCH_STEPS" $BENCH_ARGS \
    2>&1 | log overhead.log
  echo "== overhead exit ${PIPESTATUS[0]} (at ${SECONDS}s)" | log overhead.log
else
  echo "== overhead benchmark skipped: ${BENCH_CAP}s left" | log overhead.log
fi

# ---- 6. server tests, while time is left ----
SERVER_CAP=$(remaining)
if [ "${SERVER_TESTS:-1}" = 0 ]; then
  echo "== tests/server skipped (SERVER_TESTS=0)"
elif [ "$SERVER_CAP" -ge 90 ]; then
  pytest_run pytest-server "$SERVER_CAP" tests/server
  server_status=$?
  [ "$status" -eq 0 ] && status=$server_status
else
  echo "== tests/server skipped: ${SERVER_CAP}s left before the ${DEADLINE_S}s deadline" \
    | log pytest-server.log
fi

# ---- the gist again at the end, where a truncated output tail still shows it ----
echo
echo "== summary (full logs in $LOGS)"
for f in pytest pytest-server; do
  [ -f "$LOGS/$f.log" ] && grep -E '^(FAILED|ERROR) |[0-9]+ (passed|failed|error)|^cuda cases|^  (failure|error|skipped): |hit its|^== pytest .* exit' "$LOGS/$f.log"
done
[ -f "$LOGS/overhead.log" ] && grep -E -A3 "own cost|^peak memory|^== overhead|Error" "$LOGS/overhead.log"
echo "== done in ${SECONDS}s, exit $status"
exit "$status"
