#!/usr/bin/env python3
"""Speed figures for README.md, measured side by side in one run (this machine is shared and
noisy: compare within one run, never across runs).

Part 1, stories260K (-t 0 -n 200, median of --repeats runs, "achieved tok/s"): ./run (OpenMP,
the default build) with 1 and 2 threads, ./run-noomp, and llama2.c's run.c built with its
Makefile's `-Ofast -fopenmp -march=native` when --llama2c names that file (no package registry
carries llama2.c, so it cannot be fetched here; without it the table shows the figures
measured on this machine that ../shared/docs/llama2c-compat.md records: 7,100 tok/s with 1
thread, 5,100 with 2).
Part 2, a random model shaped like stories15M (dim 288, 6 layers, 6 heads, hidden 768,
vocab 32000): decode tokens/s at a 256-token context, 1 and 2 threads.
Part 3, a random model shaped like SmolLM2-135M (random:smollm2-135m: dim 576, 30 layers, 9 heads,
3 kv heads, hidden 1536, vocab 49152; random codebooks): `-m bench` for fp32, q4, cq1, cq2, cq4 at
contexts 1K, 4K and 16K with 1 and 2 threads; tokens/s, the share of a step spent in the KV cache,
and the ratio to fp32.  --rounds rounds run every type once, side by side; the figures are
medians over the rounds, the ratio the median of the ratios within a round (their range in
brackets).  --old BIN times another build the same way in the same rounds (before and after a
change).

Usage: .venv/bin/python scripts/bench.py [--parts 1,2,3] [--llama2c PATH/run.c] [--old BIN] [--out DIR]
"""
import argparse
import os
import re
import statistics
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHARED = os.path.join(os.path.dirname(ROOT), "shared", "models")


def sh(cmd, threads=None, check=True):
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if check and p.returncode != 0:
        sys.exit("failed: %s\n%s" % (" ".join(cmd), p.stderr[-2000:]))
    return p


def achieved(p):
    m = re.search(r"achieved tok/s: ([0-9.]+)", p.stderr)
    return float(m.group(1)) if m else float("nan")


def fields(line):
    return {k: v for k, v in (kv.split("=", 1) for kv in line.split())}


def part1(args, rows):
    model, tok = os.path.join(SHARED, "stories260K.bin"), os.path.join(SHARED, "tok512.bin")
    if not os.path.exists(model):
        print("part 1 skipped: %s not found" % model, file=sys.stderr)
        return
    builds = [("run (OpenMP)", os.path.join(ROOT, "run"), [1, 2]), ("run-noomp", os.path.join(ROOT, "run-noomp"), [1])]
    if args.llama2c:
        exe = os.path.join(args.out, "llama2c_run")
        sh(["gcc", "-Ofast", "-fopenmp", "-march=native", args.llama2c, "-lm", "-o", exe])
        builds.append(("llama2.c (OpenMP)", exe, [1, 2]))
    for name, exe, thread_counts in builds:
        for t in thread_counts:
            speeds = [achieved(sh([exe, model, "-z", tok, "-t", "0", "-n", "200"], threads=t))
                      for _ in range(args.repeats)]
            rows.append(("stories260K -n 200", name, t, "%.0f tok/s" % statistics.median(speeds)))
            print(rows[-1], file=sys.stderr)
    if not args.llama2c:
        rows.append(("stories260K -n 200", "llama2.c (documented)", 1, "7100 tok/s"))
        rows.append(("stories260K -n 200", "llama2.c (documented)", 2, "5100 tok/s"))


def part2(args, rows):
    path = "random:dim=288,hidden=768,layers=6,heads=6,kv_heads=6,vocab=32000,seq_len=256"  # stories15M's shape
    for t in (1, 2):
        out = sh([os.path.join(ROOT, "run"), path, "-m", "bench", "-l", "256", "-n", "64"], threads=t).stdout
        f = fields(out.strip().splitlines()[-1])
        rows.append(("stories15M shape, ctx 256", "run fp32", t, "%s tok/s" % f["tok_per_s"]))
        print(rows[-1], file=sys.stderr)


def part3(args, rows):
    model = args.model or "random:smollm2-135m,seq_len=%d" % max(int(x) for x in args.contexts.split(","))
    programs = [("run", os.path.join(ROOT, "run"))] + ([("old", args.old)] if args.old else [])
    types = args.types.split(",")
    for ctx in (int(x) for x in args.contexts.split(",")):
        for t in (int(x) for x in args.threads.split(",")):
            # rounds: every type (and program) once per round, side by side, so that each ratio to
            # fp32 pairs two runs a few seconds apart; medians over the rounds (the machine is shared)
            tps = {(name, kv): [] for name, _ in programs for kv in types}
            share = {key: [] for key in tps}
            for _ in range(args.rounds):
                for name, exe in programs:
                    for kv in types:
                        out = sh([exe, model, "-m", "bench", "-l", str(ctx), "-n", str(args.steps), "-k", kv],
                                 threads=t).stdout
                        f = fields(out.strip().splitlines()[-1])
                        tps[name, kv].append(float(f["tok_per_s"]))
                        # (builds before the Decoder interface called these attention_ms, ms_per_token)
                        cache, step = f.get("cache_ms", f.get("attention_ms")), f.get("ms_per_step", f.get("ms_per_token"))
                        share[name, kv].append(float(cache) / float(step))
            for name, _ in programs:
                base = (name, types[0])
                for kv in types:
                    ratios = [a / b for a, b in zip(tps[name, kv], tps[base])]
                    text = "%.2f tok/s, %.0f%% in KV cache, %.2fx %s" % (
                        statistics.median(tps[name, kv]), 100 * statistics.median(share[name, kv]),
                        statistics.median(ratios), types[0])
                    if kv != types[0]:
                        text += " (rounds %.2f-%.2f)" % (min(ratios), max(ratios))
                    rows.append(("SmolLM2 shape, ctx %d" % ctx, "%s %s" % (name, kv), t, text))
                    print(rows[-1], file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="1,2,3")
    ap.add_argument("--llama2c", help="path to llama2.c's run.c, built and run side by side")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--contexts", default="1024,4096,16384")
    ap.add_argument("--types", default="fp32,q4,cq1,cq2,cq4")
    ap.add_argument("--threads", default="1,2", help="part 3: thread counts")
    ap.add_argument("--steps", type=int, default=16, help="part 3: decode steps timed per run (-m bench -n)")
    ap.add_argument("--rounds", type=int, default=3, help="part 3: rounds of side-by-side runs (medians)")
    ap.add_argument("--model", help="part 3: a checkpoint file instead of the random: model (for --old builds)")
    ap.add_argument("--old", help="part 3: another build of run, timed side by side (e.g. before a change)")
    ap.add_argument("--out", default=os.path.join(ROOT, "out", "bench"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for exe in ("run", "run-noomp"):
        if not os.path.exists(os.path.join(ROOT, exe)):
            sys.exit("error: build first: make run run-noomp")
    rows = []
    parts = {"1": part1, "2": part2, "3": part3}
    for p in args.parts.split(","):
        parts[p](args, rows)
    print("| benchmark | program | threads | result |\n|---|---|---:|---|")
    for r in rows:
        print("| %s | %s | %d | %s |" % r)


if __name__ == "__main__":
    main()
