#!/usr/bin/env bash
# The GPU benchmark of the embed stage (benchmarks/bench_gpu.py), for a GPU server that may
# have no network. When wheels/ (or $WHEELS) holds the bundle from `make wheels`, it is installed into
# $SITE (default /tmp/site) with --no-index and put on PYTHONPATH with the source tree;
# otherwise the server's Python must already have every dependency.
#
#   bash benchmarks/gpu.sh                  # at most 8 minutes on one H100; results in $OUT if set
#   bash benchmarks/gpu.sh --smoke --device cpu   # every section, tiny model, on a CPU
#
# Two parts, each with a hard stop: bench_gpu.py's sections (budget 270 s, stop at 300 s), then the
# reference size end to end (bench_fullscale.py: synth, qc, crops, embed with ViT-L/16 of random
# weights, fit, submit; stop at FULLSCALE_TIMEOUT, default 170 s; FULLSCALE=0 skips it, --smoke too).
#
# PYTHON picks the interpreter (default python3); other arguments go to bench_gpu.py.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
PYPATH=$PWD
WHEELS=${WHEELS:-wheels}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS/ into $SITE (no index)"
    if ! "$PY" -m pip --version >/dev/null 2>&1; then
        # No pip: a wheel is a zip of what goes on the path, so unpack them instead.
        echo "warning: $PY has no pip; unpacking the wheels into $SITE" >&2
        "$PY" - "$SITE" "$WHEELS"/*.whl <<'PYEOF' && PYPATH=$SITE:$PYPATH
import sys, zipfile
for wheel in sys.argv[2:]:
    zipfile.ZipFile(wheel).extractall(sys.argv[1])
PYEOF
    elif "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "$WHEELS"/*.whl; then
        PYPATH=$SITE:$PYPATH
    else  # e.g. wheels for another Python: `make wheels WHEELS_PYTHON=3.x` with this server's version
        echo "warning: pip refused $WHEELS/ (see above); going on with $PY's own packages" >&2
    fi
fi
export PYTHONPATH=$PYPATH${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c 'import histoembed.stages.embed' || echo "warning: histoembed.stages.embed does not import; see above" >&2
# The ray section starts a local Ray instance, which binds to the machine's network address unless
# it runs in a network namespace with loopback alone: as root, the benchmark runs in one.
NETNS=()
if unshare -n sh -c 'ip link set lo up' 2>/dev/null; then
    NETNS=(unshare -n sh -c 'ip link set lo up && exec "$0" "$@"')
fi
# A hard stop a little past the script's own budget: results are written after every section.
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    timeout -k 10 "${GPU_BENCH_TIMEOUT:-300}" ${NETNS[@]+"${NETNS[@]}"} "$PY" benchmarks/bench_gpu.py --out "$OUT" "$@" 2>&1 \
        | tee "$OUT/gpu_bench.log"
else
    timeout -k 10 "${GPU_BENCH_TIMEOUT:-300}" ${NETNS[@]+"${NETNS[@]}"} "$PY" benchmarks/bench_gpu.py "$@" 2>&1
fi
case " $* " in *" --smoke "*) FULLSCALE=0 ;; esac
if [ "${FULLSCALE:-1}" != 0 ]; then
    echo "[fullscale] the five commands on 691 + 477 generated images, ViT-L/16 of random weights"
    timeout -k 10 "${FULLSCALE_TIMEOUT:-170}" "$PY" benchmarks/bench_fullscale.py --encoder vit-l \
        --out "${TMPDIR:-/tmp}/histoembed-fullscale" ${OUT:+--json "$OUT/fullscale.json"} 2>&1 \
        | tee ${OUT:+"$OUT/fullscale.log"}
fi
