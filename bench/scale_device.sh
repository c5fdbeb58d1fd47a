#!/usr/bin/env bash
# The scale benchmark on a many-core machine (issue 11): real Parallax
# engines at 64, 256 and 1024, ipyparallel beside them up to 256, and the
# load generator at 1000, driven by the stock ipyparallel Client.
#
# Prepared here, run there as one command. The machine has Python 3.12 and
# no network, so `make device-bundle` puts what it needs in .device/ (git-
# ignored): the stripped `parallax` binary and the wheels of ipyparallel
# and its dependencies at the venv's versions (together ~55 MB, under the
# 64 MiB a device run carries). Then, with the device tool:
#
#   run(command="bash bench/scale_device.sh", carry=[".device"], timeout_s=570)
#
# Each step writes its markdown and JSON to $OUT (or ./device-out) as soon
# as it ends, so a run cut short still returns the steps that finished.
# SCALE_ENGINES, SCALE_IPP, SCALE_FAKE and SCALE_REPEAT override the counts;
# SCALE_HUB_THREADS (default 8) and SCALE_ENGINES_T (1024) the run with more
# hub threads;
# PYTHON picks the interpreter (default python3).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUNDLE=$PWD/.device
[ -x "$BUNDLE/parallax" ] || { echo "no $BUNDLE/parallax: run 'make device-bundle' first" >&2; exit 2; }
SITE=$(mktemp -d /tmp/parallax-device-site.XXXXXX)
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$BUNDLE"/whl/*.whl \
  || { echo "installing the wheels failed" >&2; exit 2; }
export PYTHONPATH=$SITE PATH=$SITE/bin:$PATH PARALLAX_BIN=$BUNDLE/parallax PYTHONUNBUFFERED=1
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
{
  echo "host: $(nproc) cores, $(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo)," \
       "$(uname -sr), open files $(ulimit -n), $("$PY" --version 2>&1)"
  "$PY" -c 'import ipyparallel, zmq; print("ipyparallel", ipyparallel.__version__, "pyzmq", zmq.__version__)'
} | tee "$OUT/host.txt"

step() {  # step NAME ARGS...: one bench_scale run, its report kept under $OUT
  local name=$1; shift
  echo "== $name: bench_scale.py $*"
  "$PY" bench/bench_scale.py "$@" > "$OUT/$name.md" 2> "$OUT/$name.log"
  local rc=$?
  cat "$OUT/$name.md"
  # the JSON bench_scale wrote last (bench/results/scale-*.json)
  cp "$(ls -t bench/results/scale-*.json 2>/dev/null | head -1)" "$OUT/$name.json" 2>/dev/null
  echo "== $name: exit $rc"
}

REPEAT=${SCALE_REPEAT:-10}
step parallax --engines "${SCALE_ENGINES:-64,256,1024}" --kinds parallax --fake '' --fake-lean '' --repeat "$REPEAT"
step fake --engines '' --fake "${SCALE_FAKE:-1000}" --fake-lean '' --repeat "$REPEAT"
# the hub's worker threads (default 2): do more spread the broadcast over the cores?
HT=${SCALE_HUB_THREADS:-8}
step parallax-t$HT --engines "${SCALE_ENGINES_T:-1024}" --kinds parallax --fake '' --fake-lean '' \
  --repeat "$REPEAT" --hub-threads "$HT"
step fake-t$HT --engines '' --fake "${SCALE_FAKE:-1000}" --fake-lean '' --repeat "$REPEAT" --hub-threads "$HT"
step ipyparallel --engines "${SCALE_IPP:-64,256}" --kinds ipyparallel --ipp-max 100000 --fake '' --fake-lean '' \
  --repeat "$REPEAT" --timeout 150
rm -rf "$SITE"
