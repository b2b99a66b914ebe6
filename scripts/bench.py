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
Part 3, a random model shaped like SmolLM2-135M (dim 576, 30 layers, 9 heads, 3 kv heads,
hidden 1536, vocab 49152, seq_len 16384): `-m bench` for fp32, q4, cq1, cq2, cq4 at contexts
1K, 4K and 16K with 1 and 2 threads; tokens/s, the share of a step spent in the KV cache, and
the ratio to fp32.  --rounds rounds run every type once, side by side; the figures are medians
over the rounds, the ratio the median of the ratios within a round (their range in brackets).  CQ codebooks are random:
the work per step does not depend on them.  With 2 threads each run also says where the host had
put the two CPUs (`core_rtt_ns` of -m bench: near below NEAR_NS, far above; README.md, "Two
placements"), and each ratio is given again per placement.

Usage: /usr/bin/python3 scripts/bench.py [--parts 1,2,3] [--llama2c PATH/run.c] [--out DIR]
"""
import argparse
import os
import re
import statistics
import struct
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import reference  # noqa: E402  (random checkpoints and tokenizers)

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
    path = os.path.join(args.out, "stories15M-shape.bin")
    if not os.path.exists(path):
        cfg = reference.make_config(288, 768, 6, 6, 6, 32000, 256)
        reference.write_random_checkpoint(path, cfg, seed=1)
    for t in (1, 2):
        out = sh([os.path.join(ROOT, "run"), path, "-m", "bench", "-l", "256", "-n", "64"], threads=t).stdout
        f = fields(out.strip().splitlines()[-1])
        rows.append(("stories15M shape, ctx 256", "run fp32", t, "%s tok/s" % f["tok_per_s"]))
        print(rows[-1], file=sys.stderr)


def random_centroids(model_path, c, b, seed=0):
    """A CQ centroid file with random codebooks for model_path (its fingerprint included)."""
    raw = np.memmap(model_path, dtype=np.uint8, mode="r")
    h = np.frombuffer(raw[:256].tobytes(), dtype=np.int32)
    dim, _, layers, heads, kv_heads, vocab, _, hs = (int(x) for x in h[2:10])
    kv_dim = kv_heads * hs
    off = 256 + 4 * (vocab * dim + layers * dim + layers * heads * hs * dim)
    wk0 = np.frombuffer(raw[off:off + 4 * kv_dim * dim].tobytes(), dtype=np.uint32)
    fingerprint = int(wk0.astype(np.uint64).sum()) % (1 << 64)
    books = np.random.default_rng(seed).standard_normal((layers, 2, kv_dim // c, 1 << b, c)).astype(np.float32)
    header = struct.pack("<I7iqQ", 0x42435143, 1, layers, kv_heads, hs, c, b, 0, 0, fingerprint)
    with open(model_path[:-4] + ".%dc%db.cent" % (c, b), "wb") as f:
        f.write(header + b"\0" * (64 - len(header)) + books.tobytes())


NEAR_NS = 150  # core_rtt_ns below this: the two CPUs are neighbours (about 55 ns here), above: far (about 350)


def place(rtts):
    """A run's placement from the core round trips it measured before and after its timed steps."""
    if not rtts or max(rtts) <= 0:
        return "n/a"
    if max(rtts) < NEAR_NS:
        return "near"
    return "far" if min(rtts) >= NEAR_NS else "mixed"


def by_placement(tps, placement, base_tps, base_placement):
    """'; near 1.52x (3/4 runs), far 1.30x (2/1)': per placement, the median tok/s of the runs
    that had it over the base type's median in the same placement (the placement changes within a
    round, so runs are sorted one by one; runs that changed placement while timed are left out)."""
    parts = []
    for name in ("near", "far"):
        mine = [x for x, p in zip(tps, placement) if p == name]
        base = [x for x, p in zip(base_tps, base_placement) if p == name]
        if mine and base:
            parts.append("%s %.2fx (%d/%d runs)" % (name, statistics.median(mine) / statistics.median(base),
                                                    len(mine), len(base)))
    return "; by placement: " + ", ".join(parts) if parts else ""


def part3(args, rows):
    path = os.path.join(args.out, "smollm2-shape.bin")
    if not os.path.exists(path):
        cfg = reference.make_config(576, 1536, 30, 9, 3, 49152, 16384)
        reference.write_random_checkpoint(path, cfg, seed=2)
        for c in (2, 4, 8):
            random_centroids(path, c, 8)
    types = args.types.split(",")
    for ctx in (int(x) for x in args.contexts.split(",")):
        for t in (int(x) for x in args.threads.split(",")):
            # rounds: every type once per round, side by side, so that each ratio to fp32 pairs
            # two runs a few seconds apart; medians over the rounds (the machine is shared)
            tps, share = {kv: [] for kv in types}, {kv: [] for kv in types}
            placement = {kv: [] for kv in types}  # per run: "near", "far", "mixed" or "n/a" (see place())
            for _ in range(args.rounds):
                for kv in types:
                    out = sh([os.path.join(ROOT, "run"), path, "-m", "bench", "-l", str(ctx), "-n", str(args.steps),
                              "-k", kv], threads=t).stdout
                    f = fields(out.strip().splitlines()[-1])
                    tps[kv].append(float(f["tok_per_s"]))
                    share[kv].append(float(f["attention_ms"]) / float(f["ms_per_token"]))
                    placement[kv].append(place([float(x) for x in f["core_rtt_ns"].split(",")]))
            base = types[0]
            for kv in types:
                ratios = [a / b for a, b in zip(tps[kv], tps[base])]
                text = "%.2f tok/s, %.0f%% in KV cache, %.2fx %s" % (
                    statistics.median(tps[kv]), 100 * statistics.median(share[kv]), statistics.median(ratios), base)
                if kv != base:
                    text += " (rounds %.2f-%.2f)" % (min(ratios), max(ratios))
                    if t > 1:
                        text += by_placement(tps[kv], placement[kv], tps[base], placement[base])
                rows.append(("SmolLM2 shape, ctx %d" % ctx, "run %s" % kv, t, text))
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
