#!/usr/bin/env bash
# The SmolLM2 figures of README.md, on a machine with a CUDA GPU (torch and transformers
# installed, no network needed):
#   stage 1: convert the GGUF, learn CQ centroids on WikiText-2 valid (16 x 2048 tokens, Fisher
#            and uniform; cq4 cq2 cq1 cq8c10b), compare with Hugging Face transformers
#   stage 2: check the batched evaluator against ./run's token-by-token decode on a sample,
#            then the quality table over the whole WikiText-2 test split (windows of 2048)
# Usage: scripts/smollm_gpu.sh STAGE OUTDIR GGUF TEST_IDS VALID_IDS
# (the id files come from ./run -m encode -f on the two WikiText-2 files, BOS dropped)
set -euo pipefail
cd "$(dirname "$0")/.."
stage=$1 out=$2 gguf=$3 test_ids=$4 valid_ids=$5
PY=${PYTHON:-python3}
M=models/smollm2-135m-instruct
mkdir -p "$out" models
t() { printf '\n[%s] %s\n' "$(date +%T)" "$*"; }

if [ "$stage" = 1 ]; then
    t "build ./run"
    make -s run
    t "convert"
    [ -f $M.bin ] || $PY export.py model "$gguf" -o $M.bin
    [ -f $M.tok ] || $PY export.py tokenizer "$gguf" -o $M.tok
    for w in fisher uniform; do
        t "centroids ($w)"
        flag=; [ $w = uniform ] && flag=--uniform
        mkdir -p models/cent_$w
        $PY export.py centroids $M.bin --calib "$valid_ids" --ids --seqs 16 --seq-len 2048 \
            --types cq4,cq2,cq1,cq8c10b --device cuda -o models/cent_$w -q $flag 2>&1 | tee "$out/centroids_$w.log"
    done
    t "agreement with Hugging Face transformers"
    $PY scripts/hf_agreement.py --model $M.bin --ids "$test_ids" -l 2048 --device cuda 2>&1 | tee "$out/hf_agreement.log"
fi

if [ "$stage" = 2 ]; then
    t "batched evaluator vs ./run, on a sample"
    $PY scripts/smollm_quality.py --model $M.bin --ids "$test_ids" --centroids models/cent_fisher models/cent_uniform \
        --check 2>&1 | tee "$out/quality_check.log" || echo "CHECK FAILED (see quality_check.log)"
    t "quality table, whole test split"
    $PY scripts/smollm_quality.py --model $M.bin --ids "$test_ids" --centroids models/cent_fisher models/cent_uniform \
        --device cuda --json "$out/smollm_quality.json" 2>&1 | tee "$out/quality.log"
fi
t "done"
