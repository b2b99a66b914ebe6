#!/usr/bin/env bash
# make test-cuda: the GPU program checked on a machine with an NVIDIA GPU, from a fresh clone.
#   1. the pytest suite against ./runcu; tests of CPU-only cache types expect its clean error, and
#      tests/test_cuda.py compares it with ./run (logits, greedy tokens, perplexities)
#   2. compute-sanitizer memcheck, racecheck and initcheck on a short run of each GPU cache type
# The last lines are a summary.  Environment: CQ_SHARED (the shared test data, default
# ../shared), CQ_SMOLLM (a converted SmolLM2-135M .bin with its .tok beside it), LOGS (where the
# full logs go, default out/test-cuda), TEST_CUDA_SUITE=0 (the sanitizers only).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
LOGS=${LOGS:-out/test-cuda}
mkdir -p "$LOGS"
SHARED=${CQ_SHARED:-../shared}
export CQ_SHARED=$SHARED
t() { printf '[%s] %s\n' "$(date +%T)" "$*"; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || { echo "error: no NVIDIA GPU here"; exit 1; }
t "build"
make -s run runcu || exit 1

t "1. the test suite against ./runcu"
jobs=$(nproc); [ "$jobs" -gt 16 ] && jobs=16
xdist=; $PY -c "import xdist" 2>/dev/null && xdist="-n $jobs"
if [ "${TEST_CUDA_SUITE:-1}" = 1 ]; then
    # one OpenMP thread for ./run, the reference: 16 test processes with a team of 16 each would spin;
    # -rP keeps what passing tests print (the GPU-against-CPU figures) in the log
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} RUN_BIN=$PWD/runcu REF_BIN=$PWD/run $PY -m pytest -q -rsP $xdist -p no:cacheprovider tests >"$LOGS/pytest.log" 2>&1
    suite_rc=$?
else
    echo "not run (TEST_CUDA_SUITE=0)" >"$LOGS/pytest.log"; suite_rc=0
fi
suite=$(grep -E '^[0-9]+ (passed|failed)|passed|failed' "$LOGS/pytest.log" | tail -n 1)
cpu_only=$(grep -c "is CPU-only: the GPU program's clean error was checked" "$LOGS/pytest.log")
grep -E '^(FAILED|ERROR)' "$LOGS/pytest.log" | head -n 20

t "2. compute-sanitizer (the three tools side by side)"
M=$SHARED/models/stories260K.bin
if [ -f "$M" ]; then  # a copy of stories260K with random codebooks for the CQ types run below
    san=$(mktemp -d)
    ln -s "$(realpath "$M")" "$san/stories.bin"
    M=$san/stories.bin
    $PY - "$M" <<'PYTHON' || exit 1
import sys
sys.path.insert(0, "tests")
import cache_reference as CR
import reference as R
cfg, w = R.read_checkpoint(sys.argv[1])
for c, b in [(2, 8), (4, 8), (8, 8), (8, 10)]:
    CR.write_centroids(CR.default_centroid_path(sys.argv[1], c, b), cfg, w, c, b, CR.random_codebooks(cfg, c, b, 7, scale=0.3))
PYTHON
fi
sanitize() {  # tool: one line per run into $LOGS/sanitizer_<tool>.rows
    local tool=$1 rows="$LOGS/sanitizer_$1.rows" spec w log rc
    : >"$rows"
    for run in fp32:0 fp16:0 cq4:0 cq1:0 cq8c10b:0 cq2:fp16:0 cq1:6 fp16:6; do
        spec=${run%:*} w=${run##*:} log="$LOGS/sanitizer_${tool}_${spec/:/-}_w$w.log"
        if [ -f "$M" ]; then
            compute-sanitizer --tool $tool --error-exitcode 9 ./runcu "$M" -z "$SHARED/models/tok512.bin" \
                -k $spec -w $w -t 0 -n 12 >"$log" 2>&1
        else  # no shared data: a random model (CQ gets random codebooks)
            compute-sanitizer --tool $tool --error-exitcode 9 ./runcu random:dim=64,hidden=128,heads=8,kv_heads=4,layers=2,vocab=64,seq_len=64 \
                -m bench -k $spec -w $w -l 40 -n 4 >"$log" 2>&1
        fi
        rc=$?
        printf '%-9s %-9s -w %d  exit %d  %s\n' $tool $spec $w $rc "$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" | tail -n 1)" >>"$rows"
    done
    # the attention kernels' vector paths, several blocks per kv head, the bench fill: head size
    # 64 (SmolLM2's), and 128 (LLaMA-2-7B's, where cq2's 128 KB key codebook is staged)
    sanitize_shape $tool smollm2 random:smollm2-135m,layers=2,seq_len=1024,vocab=512 cq1:fp16
    sanitize_shape $tool hs128 random:dim=512,hidden=1024,heads=4,kv_heads=4,layers=1,vocab=512,seq_len=1024 cq2
}
sanitize_shape() {  # tool name model spec: one bench run of 700 positions, a line into $LOGS/sanitizer_<tool>.rows
    local log="$LOGS/sanitizer_$1_$2-shape.log" rc
    compute-sanitizer --tool $1 --error-exitcode 9 ./runcu $3 -m bench -k $4 -l 700 -n 2 >"$log" 2>&1
    rc=$?
    printf '%-9s %-9s %s shape, 700 positions  exit %d  %s\n' $1 $4 $2 $rc "$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" | tail -n 1)" >>"$LOGS/sanitizer_$1.rows"
}
if command -v compute-sanitizer >/dev/null; then
    for tool in memcheck racecheck initcheck; do sanitize $tool & done
    wait
    cat "$LOGS"/sanitizer_*.rows >"$LOGS/sanitizer.txt"
else
    echo "compute-sanitizer not found: not run" >"$LOGS/sanitizer.txt"
fi
san_rc=0
grep -qv " exit 0 " "$LOGS/sanitizer.txt" && san_rc=1

echo
echo "== make test-cuda summary =="
nvidia-smi --query-gpu=name --format=csv,noheader
echo "pytest (RUN_BIN=./runcu): $suite (exit $suite_rc); CPU-only type tests that checked the clean error: $cpu_only"
grep -E "test_cuda.py" "$LOGS/pytest.log" | grep -E "FAILED|ERROR" | head -n 10
cat "$LOGS/sanitizer.txt"
[ $suite_rc -eq 0 ] && [ $san_rc -eq 0 ] && echo "ALL PASSED" || { echo "FAILURES (logs in $LOGS)"; exit 1; }
