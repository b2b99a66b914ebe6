#!/usr/bin/env bash
# The SmolLM2 figures of README.md in one command, on a machine with a CUDA GPU (torch, and
# transformers only for scripts/hf_agreement.py; no network needed):
#   1. build ./run, convert the GGUF, encode WikiText-2 test and valid with ./run -m encode;
#   2. learn CQ codebooks (cq4 cq2 cq1 cq8c10b) on 16 x 2048 tokens of valid: Fisher, uniform,
#      and Fisher with weighted k-means++ seeding (--seeding weighted, the earlier default, a
#      comparison), the three at
#      once; each reports its weighted k-means objective per Lloyd iteration on the
#      calibration tokens, and at the end on 4 x 2048 held-out tokens of the test split;
#   3. the quality table over the whole test split (windows of 2048) with every row of
#      README.md's table, the mixed rows cq2:cq1 and cq4:cq2, the split rows cq1:fp32 and
#      fp32:cq1, and two rows with the current token read in full precision (cq1 and cq2
#      with -w 1, a comparison), and its plot; then cq1 and cq2 with the weighted-seeding
#      codebooks (printed only); with --check, scripts/smollm_quality.py --check (the
#      batched evaluator against ./run's token-by-token decode on one short window) beside it.
# Usage: scripts/smollm_gpu.sh OUTDIR GGUF DATADIR [--check]
#   DATADIR holds wikitext2-test.raw.txt and wikitext2-valid.tokens.txt (../shared/data).
#   Big files (checkpoint, ids, centroids) go to $SMOLLM_WORK (default /tmp/smollm); OUTDIR
#   gets at most 8 files: gpu.log, centroids_{fisher,uniform,fisher_weighted}.json,
#   smollm_quality.json, smollm_quality.png, smollm2-135m-instruct.8c8b.cent (the Fisher cq1
#   codebooks for centroids/) and, with --check, quality_check.log.
# For a dry run elsewhere: SMOLLM_DEVICE=cpu SMOLLM_SEQS=2 SMOLLM_SEQ_LEN=64 SMOLLM_WINDOWS=1
# SMOLLM_LEN=64 (calibration sequences and their length, windows evaluated and their length).
# GGUF files need the 'gguf' package: if python3 lacks it, a wheel in .whl/ is installed
# into $SMOLLM_WORK/site.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 3 ] || { echo "usage: $0 OUTDIR GGUF DATADIR [--check]" >&2; exit 1; }
out=$1 gguf=$2 data=$3 check=${4:-}
W=${SMOLLM_WORK:-/tmp/smollm}
PY=${PYTHON:-python3}
DEV=${SMOLLM_DEVICE:-cuda} SEQS=${SMOLLM_SEQS:-16} SEQ_LEN=${SMOLLM_SEQ_LEN:-2048}
WINDOWS=${SMOLLM_WINDOWS:-0} LEN=${SMOLLM_LEN:-2048}
M=$W/smollm2-135m-instruct
mkdir -p "$out" "$W"
for f in "$gguf" "$data/wikitext2-test.raw.txt" "$data/wikitext2-valid.tokens.txt"; do
    [ -f "$f" ] || { echo "error: $f not found" >&2; exit 1; }
done
exec > >(tee "$out/gpu.log") 2>&1
start=$(date +%s)
t() { printf '\n[%s, %d s] %s\n' "$(date +%T)" $(( $(date +%s) - start )) "$*"; }
export PYTHONUNBUFFERED=1

if ! $PY -c "import gguf" 2>/dev/null; then
    t "installing gguf from .whl/"
    $PY -m pip install -q --no-index --no-deps --no-compile --target "$W/site" .whl/gguf-*.whl
    export PYTHONPATH="$W/site${PYTHONPATH:+:$PYTHONPATH}"
fi
t "build ./run"
make -s run
t "convert"
$PY export.py model "$gguf" -o $M.bin
$PY export.py tokenizer "$gguf" -o $M.tok
for split in test:wikitext2-test.raw.txt valid:wikitext2-valid.tokens.txt; do
    # ./run prints the BOS id first; export.py and the evaluator add their own
    ./run $M.bin -z $M.tok -m encode -f "$data/${split#*:}" | cut -d' ' -f2- > $W/${split%%:*}.ids
done
wc -w $W/test.ids $W/valid.ids

t "centroids: Fisher, uniform, Fisher with weighted seeding (three processes on the GPU)"
common="--calib $W/valid.ids --ids --seqs $SEQS --seq-len $SEQ_LEN --types cq4,cq2,cq1,cq8c10b
        --heldout $W/test.ids --heldout-seqs 4 --device $DEV -q"
pids=()
for run in fisher:"" uniform:--uniform fisher_weighted:"--seeding weighted"; do
    name=${run%%:*}
    mkdir -p $W/cent_$name
    $PY export.py centroids $M.bin $common ${run#*:} -o $W/cent_$name \
        --stats "$out/centroids_$name.json" > $W/centroids_$name.log 2>&1 &
    pids+=($!)
done
fail=0
for p in "${pids[@]}"; do wait $p || fail=1; done
for name in fisher uniform fisher_weighted; do
    echo "--- $name"; cat $W/centroids_$name.log
done
[ $fail = 0 ] || { echo "error: export.py centroids failed (see above)" >&2; exit 1; }
cp $W/cent_fisher/smollm2-135m-instruct.8c8b.cent "$out/"
$PY scripts/smollm_quality.py --objectives "$out/centroids_fisher.json" \
    "$out/centroids_fisher_weighted.json" "$out/centroids_uniform.json"

Q="$PY scripts/smollm_quality.py --model $M.bin --ids $W/test.ids -l $LEN --windows $WINDOWS"
Q="$Q --centroids $W/cent_fisher $W/cent_uniform"
if [ "$check" = --check ]; then
    t "check: batched evaluator vs ./run on one window of 128 tokens (in the background)"
    $Q --check > "$out/quality_check.log" 2>&1 &
    check_pid=$!
fi
t "quality table, whole test split"
$Q --rows "$($PY scripts/smollm_quality.py --list-rows),cq1/fisher/w1,cq2/fisher/w1" --device $DEV \
    --json "$out/smollm_quality.json"
$PY scripts/smollm_quality.py --plot "$out/smollm_quality.png" --json "$out/smollm_quality.json" ||
    echo "PLOT FAILED (matplotlib missing?); the table is in smollm_quality.json"
t "cq1 and cq2 with the weighted-seeding Fisher codebooks"
$PY scripts/smollm_quality.py --model $M.bin --ids $W/test.ids -l $LEN --windows $WINDOWS \
    --centroids $W/cent_fisher_weighted --rows fp32,cq2/fisher,cq1/fisher --device $DEV
if [ "$check" = --check ]; then
    t "check"
    if wait $check_pid; then tail -n 3 "$out/quality_check.log"; else
        tail -n 40 "$out/quality_check.log"; echo "CHECK FAILED (see quality_check.log)"; fi
fi
t "done"
$PY scripts/smollm_quality.py --summary "$out/smollm_quality.json"
