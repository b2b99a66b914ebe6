#!/usr/bin/env python3
"""GPU speed figures for README.md, in one run on a machine with an NVIDIA GPU (torch installed).

Part 1, attention alone, one sequence, one layer: ./runcu -m bench on a random one-layer model of
the layer's shape (random:...,layers=1), whose `cache_ms` is the time a step spends in the KV cache
(the new token's append and the attention over the whole context), against PyTorch's
scaled_dot_product_attention on an fp16 cache of the same shape, timed in the same job with CUDA
events.  Shapes: LLaMA-2-7B's layer (32 heads x 128) and SmolLM2-135M's (9 query / 3 kv heads x
64); contexts 4K, 16K, 64K, 128K; our fp16, cq4, cq2, cq1.
Part 2, end to end: ./runcu -m bench tokens/s against context for SmolLM2-135M's shape with fp32,
fp16, cq2 and cq1 caches (fp32 weights; the real model up to its 8K context when --smollm names
it and its centroid files, a random model of its shape beyond), next to Hugging Face
transformers' generate with the same weights (fp32, its default sdpa attention) on the same GPU.
Part 3, the CUDA graph's effect: the same end-to-end bench (SmolLM2's shape, random weights) with
every step replayed from its graph (the default) and with its kernels launched one by one
(RUNCU_GRAPHS=0), at 1K and 16K, fp32 and cq1.
Part 4 (needs --smollm): the real model against the random one of its shape, side by side, at 1K
and 8K, fp32, fp16 and cq1, 5 rounds, median tokens/s: whether part 2's random rows stand for it.

Prints a table last; writes results/gpu_bench.json and results/gpu_bench.png (or --out DIR).
Usage: python3 scripts/bench_gpu.py [--parts 1,2,3,4] [--smollm models/smollm2-135m-instruct.bin]
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import export as E  # noqa: E402  (the default centroid file names, CQ type names)

RUNCU = os.path.join(ROOT, "runcu")
SHAPES = {  # layer shapes: random: model keys
    "llama2-7b": "dim=4096,heads=32,kv_heads=32,hidden=64,vocab=256",
    "smollm2-135m": "dim=576,heads=9,kv_heads=3,hidden=64,vocab=256,theta=100000",
}
TYPES = ["fp16", "cq4", "cq2", "cq1"]


def bench(model, ctx, spec, steps=4, batch=1, env=None):
    cmd = [RUNCU, model, "-m", "bench", "-l", str(ctx), "-n", str(steps), "-k", spec, "-b", str(batch)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, **(env or {})))
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    return {k: v for k, v in (kv.split("=", 1) for kv in p.stdout.split())}


def sdpa_us(heads, kv_heads, hs, ctx, reps=50):
    import torch
    import torch.nn.functional as F
    q = torch.randn(1, heads, 1, hs, device="cuda", dtype=torch.float16)
    k = torch.randn(1, kv_heads, ctx, hs, device="cuda", dtype=torch.float16)
    v = torch.randn(1, kv_heads, ctx, hs, device="cuda", dtype=torch.float16)
    gqa = heads != kv_heads
    for _ in range(5):
        F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000)
    times.sort()
    return times[len(times) // 2]


def part1(results, contexts):
    rows = []
    for shape, keys in SHAPES.items():
        heads = int(keys.split("heads=")[1].split(",")[0])
        kvh = int(keys.split("kv_heads=")[1].split(",")[0])
        hs = int(keys.split("dim=")[1].split(",")[0]) // heads
        for ctx in contexts:
            sd = sdpa_us(heads, kvh, hs, ctx)
            fp16_bytes = 2 * kvh * hs * 2 * ctx
            row = {"shape": shape, "context": ctx, "sdpa_us": sd, "sdpa_GBps": fp16_bytes / sd / 1e3}
            for t in TYPES:
                f = bench("random:%s,layers=1,seq_len=%d" % (keys, ctx), ctx, t, steps=2)
                if "error" in f:
                    row[t] = {"error": f["error"]}
                    continue
                us = 1000 * float(f["cache_ms"])
                kv_bytes = float(f["kv_bytes_per_token"]) * ctx
                row[t] = {"us": us, "GBps": kv_bytes / us / 1e3, "vs_sdpa": sd / us}
            rows.append(row)
            print(json.dumps(row), flush=True)
    results["attention"] = rows


SMOLLM_CFG = dict(dim=576, hidden_dim=1536, n_layers=30, n_heads=9, n_kv_heads=3, head_size=64,
                  vocab_size=49152, seq_len=8192, rope_theta=100000.0, norm_eps=1e-5, bos_id=1, eos_id=2,
                  shared_classifier=1)


def hf_tokens_per_s(ctx, checkpoint=None, new=16):
    """transformers' generate on SmolLM2's shape, fp32, sdpa attention: decode tokens/s after a
    prompt of ctx - new tokens (the time of `new` tokens minus that of one, over new - 1)."""
    import torch
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import hf_agreement as H
    from transformers import LlamaForCausalLM
    if checkpoint:
        cfg, w = H.load_checkpoint(checkpoint)
        cfg = dict(cfg, seq_len=max(ctx, cfg["seq_len"]))
        model = H.hf_model(cfg, w, device="cuda")
    else:
        cfg = dict(SMOLLM_CFG, seq_len=max(ctx, 8192))
        model = LlamaForCausalLM(H.hf_config(cfg)).to("cuda").eval()
    model.config._attn_implementation = "sdpa"  # eager attention would hold a (ctx x ctx) matrix per head
    ids = torch.randint(3, cfg["vocab_size"], (1, ctx - new), device="cuda")
    with torch.no_grad():
        def run(n):
            torch.cuda.synchronize()
            t0 = time.time()
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            torch.cuda.synchronize()
            return time.time() - t0
        run(2)
        t1, tn = run(1), run(new)
    del model
    torch.cuda.empty_cache()
    return (new - 1) / (tn - t1)


def centroids_beside(checkpoint, t):
    """The default centroid file of CQ type t ("cq2", "cq1") next to a checkpoint, as ./run names it."""
    return E.default_centroid_path(checkpoint, *E.CQ_ALIASES[t])


def part2(results, contexts, smollm):
    rows = []
    for ctx in contexts:
        row = {"context": ctx}
        for t in ["fp32", "fp16", "cq2", "cq1"]:
            real = smollm and ctx <= 8192 and (t.startswith("fp") or os.path.exists(centroids_beside(smollm, t)))
            model = smollm if real else "random:smollm2-135m,seq_len=%d" % max(ctx, 8192)
            f = bench(model, ctx, t, steps=32)
            row[t] = {"tok_s": float(f["tok_per_s"]), "real_model": bool(real)} if "error" not in f else f
        try:
            row["transformers"] = {"tok_s": hf_tokens_per_s(ctx, smollm if smollm and ctx <= 8192 else None)}
        except Exception as e:  # out of memory at long contexts, say
            row["transformers"] = {"error": repr(e)[:200]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    results["end_to_end"] = rows


def part3(results, contexts=(1024, 16384)):
    rows = []
    for ctx in contexts:
        for t in ["fp32", "cq1"]:
            model = "random:smollm2-135m,seq_len=%d" % max(ctx, 8192)
            on, off = bench(model, ctx, t, steps=32), bench(model, ctx, t, steps=32, env={"RUNCU_GRAPHS": "0"})
            row = {"context": ctx, "type": t, "graph_tok_s": float(on.get("tok_per_s", "nan")),
                   "launches_tok_s": float(off.get("tok_per_s", "nan"))}
            rows.append(row)
            print(json.dumps(row), flush=True)
    results["graphs"] = rows


def part4(results, smollm, contexts=(1024, 8192), rounds=5):
    rows = []
    for ctx in contexts:
        for t in ["fp32", "fp16", "cq1"]:
            real, rand = [], []
            for _ in range(rounds):  # alternating, so that a slow spell of the machine hits both
                for runs, model in ((real, smollm), (rand, "random:smollm2-135m,seq_len=8192")):
                    f = bench(model, ctx, t, steps=64)
                    if "error" in f:
                        raise SystemExit("error: part 4, %s -k %s: %s" % (model, t, f["error"]))
                    runs.append(float(f["tok_per_s"]))
            row = {"context": ctx, "type": t, "real_tok_s": sorted(real)[rounds // 2],
                   "random_tok_s": sorted(rand)[rounds // 2], "real_runs": real, "random_runs": rand}
            rows.append(row)
            print(json.dumps(row), flush=True)
    results["real_vs_random"] = rows


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, shape in zip(axes[:2], SHAPES):
        rows = [r for r in results.get("attention", []) if r["shape"] == shape]
        for t in TYPES:
            pts = [(r["context"], r[t]["vs_sdpa"]) for r in rows if "vs_sdpa" in r.get(t, {})]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=t)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title("attention, one layer of %s" % shape)
        ax.set_xlabel("context")
        ax.set_ylabel("speed-up over SDPA fp16")
        ax.legend()
    ax = axes[2]
    rows = results.get("end_to_end", [])
    for t in ["fp32", "fp16", "cq2", "cq1", "transformers"]:
        pts = [(r["context"], r[t]["tok_s"]) for r in rows if "tok_s" in r.get(t, {})]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=t if t != "transformers" else "transformers generate")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M end to end (fp32 weights)")
    ax.set_xlabel("context")
    ax.set_ylabel("tokens/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(results):
    lines = []
    for r in results.get("attention", []):
        cells = ["%s %dK: SDPA %.0f us" % (r["shape"], r["context"] // 1024, r["sdpa_us"])]
        for t in TYPES:
            c = r.get(t, {})
            cells.append("%s %.0f us %.2fx" % (t, c["us"], c["vs_sdpa"]) if "us" in c else "%s -" % t)
        lines.append(" | ".join(cells))
    for r in results.get("end_to_end", []):
        cells = ["e2e %dK" % (r["context"] // 1024)]
        for t in ["fp32", "fp16", "cq2", "cq1", "transformers"]:
            c = r.get(t, {})
            cells.append("%s %.0f tok/s" % (t, c["tok_s"]) if "tok_s" in c else "%s -" % t)
        lines.append(" | ".join(cells))
    for r in results.get("graphs", []):
        lines.append("graph %dK %s: %.0f tok/s with the step's graph, %.0f launching one by one (%.2fx)" % (
            r["context"] // 1024, r["type"], r["graph_tok_s"], r["launches_tok_s"], r["graph_tok_s"] / r["launches_tok_s"]))
    for r in results.get("real_vs_random", []):
        lines.append("real model %dK %s: %.0f tok/s, random weights %.0f (median of %d)" % (
            r["context"] // 1024, r["type"], r["real_tok_s"], r["random_tok_s"], len(r["real_runs"])))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="1,2,3")
    ap.add_argument("--contexts", default="4096,16384,65536,131072")
    ap.add_argument("--e2e-contexts", default="1024,2048,4096,8192,16384,32768,65536")
    ap.add_argument("--smollm", help="converted SmolLM2 .bin (with its .4c8b.cent and .8c8b.cent beside it)")
    ap.add_argument("--out", default=os.path.join(ROOT, "results"))
    ap.add_argument("--merge", help="an earlier gpu_bench.json whose parts this run keeps unless it reruns them")
    args = ap.parse_args()
    parts = args.parts.split(",")
    if "4" in parts and not (args.smollm and os.path.exists(centroids_beside(args.smollm, "cq1"))):
        raise SystemExit("error: part 4 needs --smollm MODEL.bin with MODEL.8c8b.cent beside it")
    os.makedirs(args.out, exist_ok=True)
    results = json.load(open(args.merge)) if args.merge else {}
    results["device"] = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                       capture_output=True, text=True).stdout.strip()
    if "1" in parts:
        part1(results, [int(x) for x in args.contexts.split(",")])
    if "2" in parts:
        part2(results, [int(x) for x in args.e2e_contexts.split(",")], args.smollm)
    if "3" in parts:
        part3(results)
    if "4" in parts:
        part4(results, args.smollm)
    with open(os.path.join(args.out, "gpu_bench.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(results, os.path.join(args.out, "gpu_bench.png"))
    print("\n" + results["device"] + "\n" + table(results))


if __name__ == "__main__":
    main()
