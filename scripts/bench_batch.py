#!/usr/bin/env python3
"""Batched decoding throughput on the GPU: the paper's figure (fp16 cache against CQ), rerun.

For each cache type, B sequences decode one token per step together at context L (positions
0 .. L-n-1 of every cache filled with random keys and values, not timed; ./runcu -m bench -b B).
B doubles from 1 until the device memory is full; then the largest B that fits is found exactly
(bisection, with short runs that only need to start), and timed too.  Tokens/s at each B, and
at the peak where the step's time goes: the weights' products and the rest (step time minus the
time in the cache), the cache's append (CQ: with encoding), and its attention.
Shapes: LLaMA-2-7B (random weights in bf16: random:llama2-7b,bf16) at context 4,096, and
SmolLM2-135M's (random:smollm2-135m,bf16) at 8,192.  Also attention alone at batch 16 and
context 64K for LLaMA-2-7B's layer shape, against PyTorch's fp16 SDPA in the same job.

Prints a table last; writes results/batch_bench.json and results/batch_bench.png (or --out DIR).
Usage: python3 scripts/bench_batch.py [--shapes llama2-7b,smollm2-135m] [--types fp16,cq4,cq2,cq1,cq8c10b]
All of it takes longer than the device's 10 minutes a command; in parts (with --merge):
  python3 scripts/bench_batch.py --shapes llama2-7b --types fp16,cq4,cq2,cq1            (~5 min)
  python3 scripts/bench_batch.py --shapes llama2-7b --types cq8c10b --no-attention \
      --merge results/batch_bench.json                                                   (~3 min)
  python3 scripts/bench_batch.py --shapes smollm2-135m --no-attention \
      --merge results/batch_bench.json                                                   (~4 min)
"""
import argparse
import json
import os
import re
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNCU = os.path.join(ROOT, "runcu")
SHAPES = {"llama2-7b": ("random:llama2-7b,bf16", 4096), "smollm2-135m": ("random:smollm2-135m,bf16", 8192)}


def bench(model, ctx, spec, batch, steps=4):
    cmd = [RUNCU, model, "-m", "bench", "-l", str(ctx), "-n", str(steps), "-k", spec, "-b", str(batch)]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        err = (p.stderr.strip().splitlines() or ["?"])[-1]
        if "out of GPU memory" in err:
            return None
        raise SystemExit("failed: %s\n%s" % (" ".join(cmd), p.stderr[-2000:]))
    f = {k: v for k, v in (kv.split("=", 1) for kv in p.stdout.split())}
    m = re.search(r"append \(with CQ encoding\) ([0-9.]+) ms", p.stderr)
    f["append_ms"] = m.group(1) if m else "nan"
    f["run_s"] = time.time() - t0  # the whole process: set-up, fill and the timed steps
    return f


def sweep(shape, spec, budget_s):
    model, ctx = SHAPES[shape]
    t0, rows, b, last_fit = time.time(), [], 1, 0

    def timed(batch):  # one timed run at the sweep's context; None: out of memory
        f = bench(model, ctx, spec, batch)
        if f is not None:
            rows.append({"batch": batch, "tok_s": float(f["tok_per_s"]), "ms_per_step": float(f["ms_per_step"]),
                         "cache_ms": float(f["cache_ms"]), "append_ms": float(f["append_ms"]),
                         "run_s": round(f["run_s"], 1)})
            print(json.dumps({"shape": shape, "type": spec, **rows[-1]}), flush=True)
        return f

    while time.time() - t0 < budget_s:
        f = timed(b)
        if f is None:
            break
        last_fit, b = b, 2 * b
    lo, hi = last_fit, b  # lo fits, hi does not (or was not tried within the budget)
    if f is None:
        while hi - lo > 1 and time.time() - t0 < budget_s:  # probes: start, one step at a short context
            mid = (lo + hi) // 2
            if bench(model, 2, spec, mid, steps=1) is None:
                hi = mid
            else:
                lo = mid
        if lo != last_fit:
            f = timed(lo)
    exact = hi - lo == 1 and f is not None
    print("%s %s: max batch %d%s after %.0f s" % (shape, spec, lo, "" if exact else " (not exact)", time.time() - t0), flush=True)
    return {"context": ctx, "rows": rows, "max_batch": lo, "max_batch_exact": exact}


def sdpa_batch_us(batch, heads, hs, ctx, reps=20):
    import torch
    import torch.nn.functional as F
    q = torch.randn(batch, heads, 1, hs, device="cuda", dtype=torch.float16)
    k = torch.randn(batch, heads, ctx, hs, device="cuda", dtype=torch.float16)
    v = torch.randn(batch, heads, ctx, hs, device="cuda", dtype=torch.float16)
    for _ in range(3):
        F.scaled_dot_product_attention(q, k, v)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        F.scaled_dot_product_attention(q, k, v)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000)
    del q, k, v
    torch.cuda.empty_cache()
    return sorted(times)[len(times) // 2]


def attention_b16(types):
    ctx, model = 65536, "random:dim=4096,heads=32,kv_heads=32,hidden=64,vocab=256,layers=1,seq_len=65536"
    row = {"batch": 16, "context": ctx, "sdpa_us": sdpa_batch_us(16, 32, 128, ctx)}
    for t in types:
        f = bench(model, ctx, t, 16, steps=1)
        row[t] = {"us": 1000 * float(f["cache_ms"]), "vs_sdpa": row["sdpa_us"] / (1000 * float(f["cache_ms"]))} if f else None
    print(json.dumps(row), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="llama2-7b,smollm2-135m")
    ap.add_argument("--types", default="fp16,cq4,cq2,cq1,cq8c10b")
    ap.add_argument("--budget", type=float, default=300,
                    help="seconds per (shape, type) sweep, a guard: a sweep that runs out stops early (not exact)")
    ap.add_argument("--out", default=os.path.join(ROOT, "results"))
    ap.add_argument("--merge", help="an earlier batch_bench.json whose sweeps this run adds to (or replaces)")
    ap.add_argument("--no-attention", action="store_true", help="skip the batch-16 attention row (keep --merge's)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    types = args.types.split(",")
    results = {"device": subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                        capture_output=True, text=True).stdout.strip(), "sweeps": {}}
    if args.merge:  # sweeps measured in an earlier run (the device is lent for minutes at a time)
        with open(args.merge) as f:
            old = json.load(f)
        for key, sw in old.get("sweeps", {}).items():  # each sweep keeps the device it ran on
            results["sweeps"][key] = dict(sw, device=sw.get("device", old.get("device")))
        results["attention_b16_64k"] = old.get("attention_b16_64k")
    if not args.no_attention:
        results["attention_b16_64k"] = attention_b16(["fp16"] + [t for t in types if t not in ("fp16", "cq8c10b")])
    for shape in args.shapes.split(","):
        for t in types:
            results["sweeps"]["%s %s" % (shape, t)] = dict(sweep(shape, t, args.budget), device=results["device"])
    shapes = sorted({k.split()[0] for k in results["sweeps"]}, key=list(SHAPES).index)
    types = [t for t in ["fp16", "cq4", "cq2", "cq1", "cq8c10b"] if any(k.endswith(" " + t) for k in results["sweeps"])]
    with open(os.path.join(args.out, "batch_bench.json"), "w") as f:
        json.dump(results, f, indent=1)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    def device_of(shape):  # the device(s) its sweeps ran on
        return " + ".join(sorted({s["device"] for k, s in results["sweeps"].items() if k.split()[0] == shape}))

    fig, axes = plt.subplots(1, len(shapes), figsize=(7 * len(shapes), 4.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for t in types:
            s = results["sweeps"].get("%s %s" % (shape, t))
            if not s:
                continue
            pts = sorted((r["batch"], r["tok_s"]) for r in s["rows"])
            if pts:
                ax.plot(*zip(*pts), marker="o", label="%s (max batch %d)" % (t, s["max_batch"]))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch (sequences decoded together)")
        ax.set_ylabel("tokens/s")
        ax.set_title("%s, context %d, bf16 weights, %s" % (shape, SHAPES[shape][1], device_of(shape)))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "batch_bench.png"), dpi=110)
    print("\n" + results["device"])
    a = results["attention_b16_64k"] or {"sdpa_us": float("nan")}
    print("attention, LLaMA-2-7B layer, batch 16, 64K: SDPA fp16 %.0f us | " % a["sdpa_us"] +
          " | ".join("%s %.0f us %.2fx" % (t, v["us"], v["vs_sdpa"]) for t, v in a.items() if isinstance(v, dict) and v))
    for shape in shapes:
        print("%s sweeps on %s" % (shape, device_of(shape)))
        base = None
        for t in types:
            s = results["sweeps"].get("%s %s" % (shape, t))
            if not s:
                continue
            if not s["rows"]:
                print("%s %s: no run fit" % (shape, t))
                continue
            peak = max(s["rows"], key=lambda r: r["tok_s"])
            base = base or (peak["tok_s"], s["max_batch"]) if t == "fp16" else base
            rel = " (%.2fx fp16's peak, max batch %.1fx)" % (peak["tok_s"] / base[0], s["max_batch"] / base[1]) if base else ""
            att = peak["cache_ms"] - peak["append_ms"]
            print("%s %-8s peak %8.0f tok/s at batch %4d; max batch %d%s%s; at the peak a step %.1f ms: "
                  "weights and the rest %.1f, append %.1f, attention %.1f" % (
                      shape, t, peak["tok_s"], peak["batch"], s["max_batch"], "" if s["max_batch_exact"] else " (not exact)",
                      rel, peak["ms_per_step"], peak["ms_per_step"] - peak["cache_ms"], peak["append_ms"], att))


if __name__ == "__main__":
    main()
