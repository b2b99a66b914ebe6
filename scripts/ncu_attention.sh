#!/usr/bin/env bash
# Nsight Compute counts of the attention kernel, on a machine with an NVIDIA GPU and ncu: one
# profiled launch per (layer shape, context, cache type), the shapes of scripts/bench_gpu.py's
# part 1 (a one-layer random model; the launch is a decode step's attention over the context).
# For each: the kernel's time, instructions, shared-memory wavefronts and bank conflicts, DRAM
# bytes, issue-slot use and active warps; and for cq1 at 64K the full warp-stall sections.
# Usage: scripts/ncu_attention.sh [OUTDIR]   (default results/; writes ncu_attention.log and
# ncu_attention.csv, prints a table last).  Needs ./runcu (make runcu).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-results}
mkdir -p "$out"
log=$out/ncu_attention.log csv=$out/ncu_attention.csv
: >"$log"
echo "shape,context,type,metric,value" >"$csv"
M=gpu__time_duration.sum,smsp__inst_executed.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum
M=$M,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum,dram__bytes_read.sum
M=$M,smsp__issue_active.avg.pct_of_peak_sustained_active,sm__warps_active.avg.pct_of_peak_sustained_active
LLAMA=dim=4096,heads=32,kv_heads=32,hidden=64,vocab=256
SMOLLM=dim=576,heads=9,kv_heads=3,hidden=64,vocab=256,theta=100000
profile() {  # shape-name model-keys context type [extra ncu args]
    local name=$1 keys=$2 ctx=$3 type=$4
    shift 4
    ncu --kernel-name regex:attention_kernel --launch-skip 1 --launch-count 1 "$@" \
        ./runcu random:$keys,layers=1,seq_len=$ctx -m bench -l $ctx -n 2 -k $type
}
for run in llama:65536:{fp16,cq4,cq2,cq1,fp16:cq1} llama:4096:{fp16,cq1} smollm:65536:{fp16,cq1}; do
    name=${run%%:*} rest=${run#*:}
    ctx=${rest%%:*} type=${rest#*:}
    keys=$LLAMA; [ $name = smollm ] && keys=$SMOLLM
    echo "== $name $ctx $type" >>"$log"
    profile $name $keys $ctx $type --csv --print-units base --metrics $M 2>>"$log" | tee -a "$log" |
        python3 -c '
import csv, sys
rows = [r for r in csv.reader(sys.stdin) if len(r) > 3]
at = [n for n, r in enumerate(rows) if "Metric Name" in r]
if at:
    head = rows[at[0]]
    i, j = head.index("Metric Name"), head.index("Metric Value")
    for r in rows[at[0] + 1:]:
        print("%s,%s,%s,%s,%s" % (sys.argv[1], sys.argv[2], sys.argv[3], r[i], r[j].replace(",", "")))
' $name $ctx $type >>"$csv"
done
echo "== llama 65536 cq1: warp states, memory and occupancy sections" >>"$log"
profile llama $LLAMA 65536 cq1 --section WarpStateStats --section MemoryWorkloadAnalysis_Tables \
    --section Occupancy --section LaunchStats --section SpeedOfLight >>"$log" 2>&1
python3 - "$csv" <<'PYTHON'
import collections, csv, sys
t = collections.OrderedDict()
for r in csv.DictReader(open(sys.argv[1])):
    t.setdefault((r["shape"], r["context"], r["type"]), {})[r["metric"]] = float(r["value"] or "nan")
print("%-7s %6s %-9s %9s %8s %9s %8s %9s %6s %6s" % ("shape", "ctx", "type", "us", "Minst", "Mwavefr", "Mconfl",
                                                     "DRAM MB", "issue%", "warps%"))
for (shape, ctx, typ), m in t.items():
    g = lambda k: m.get(k, float("nan"))
    print("%-7s %6s %-9s %9.1f %8.1f %9.1f %8.1f %9.1f %6.1f %6.1f" % (
        shape, ctx, typ, g("gpu__time_duration.sum") / 1e3, g("smsp__inst_executed.sum") / 1e6,
        g("l1tex__data_pipe_lsu_wavefronts_mem_shared.sum") / 1e6,
        g("l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum") / 1e6, g("dram__bytes_read.sum") / 1e6,
        g("smsp__issue_active.avg.pct_of_peak_sustained_active"),
        g("sm__warps_active.avg.pct_of_peak_sustained_active")))
PYTHON
