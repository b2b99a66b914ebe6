#!/usr/bin/env python3
"""Questions about CQ's codebooks and its error, answered on SmolLM2 (meant for the GPU).

Each variant learns codebooks from the same calibration activations as `export.py centroids`
(its collect_kv and learn_codebooks: 16 x 2048 tokens by default, Fisher-weighted) next to the
plain Fisher ones, and smollm_quality.py's batched evaluator (run.c's semantics) scores both on
the first --windows windows of 2048 tokens.  Prints a Markdown table (perplexity, KL).

  rotate-half  Which channels should a key group couple?  run.c groups c contiguous channels
               of llama2.c's interleaved layout (a key group holds c/2 whole RoPE pairs); the
               paper grouped contiguous channels of Hugging Face's rotate-half layout
               (../shared/docs/CQ.md, section 5), where a key group holds one channel from
               each of c RoPE pairs of neighbouring frequencies.  Values are laid out alike in
               both.  The evaluator permutes the pre-RoPE key into Hugging Face's order before
               coding it and the decoded key back before RoPE.  run.c implements only the
               interleaved grouping.
  clip99       Do a few calibration tokens with huge squared gradients (the first position
               of each sequence, mostly) steer the weighted k-means?  The squared gradients
               are clipped at their 99th percentile per (layer, K/V, channel) before the group
               weights are summed.  The script first prints what share of the Fisher weight
               the first positions and the top 1 % of tokens carry.
  split        Which half of the cache costs the perplexity?  The plain Fisher codebooks with
               only the keys coded (values in full precision, run.c's -k cq1:fp32) and only the
               values coded (-k fp32:cq1).
  seeds        How much do the k-means++ draws move the result?  The Fisher codebooks learned
               again with --n-seeds seeds of the plain seeding (the default; seed 0 is the
               plain Fisher row) and of the weighted one (export.py --seeding weighted).
  no-bos       Does the BOS that opens every calibration sequence matter?  The Fisher
               codebooks learned from 16 x 2048 tokens of the same text cut without a BOS
               (each sequence starts inside the text; its first token is the attention sink).
  drop-first   Do the first positions' huge weights steer the codebooks?  The same
               activations with the Fisher weight of each sequence's first token set to 0.
  first-exact  How much of it comes from the first position alone (the BOS token that opens
               every window, an attention sink that most queries read)?  The plain Fisher
               codebooks with position 0's key and value read in full precision.  Not a cache
               type of run.c: a measurement of where the error sits.

Usage: python3 scripts/centroid_experiments.py --model M.bin --calib VALID_IDS --ids TEST_IDS
           [--variants rotate-half,clip99,split,first-exact,seeds,no-bos,drop-first] [--n-seeds 3]
           [--types cq1,cq2,cq4] [--windows 32]
           [--device cuda] [--json OUT]
(the id files as for scripts/smollm_gpu.sh: ./run -m encode output, BOS dropped)
"""
import argparse
import itertools
import json
import math
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import export as E  # noqa: E402
import smollm_quality as Q  # noqa: E402


def hf_order(n_kv_heads, head_size):
    """Index list: position i of the Hugging Face (rotate-half) order holds interleaved
    channel perm[i].  Within a head, HF channel j < hs/2 is channel 2j, hs/2 + j is 2j + 1."""
    half = head_size // 2
    head = [2 * j for j in range(half)] + [2 * j + 1 for j in range(half)]
    return [h * head_size + i for h in range(n_kv_heads) for i in head]


class Experiments(Q.Evaluator):
    """The batched evaluator, with CQ key groups taken in another channel order (rows whose
    centroid file is in permuted_files) or position 0 read in full precision (rows whose id is
    in first_exact)."""

    def __init__(self, cfg, w, device, order):
        super().__init__(cfg, w, device)
        self.perm = torch.tensor(order, device=self.dev)
        self.inverse = torch.argsort(self.perm)
        self.permuted_files = set()
        self.first_exact = set()

    def masks(self, row, T):
        mk, mv = super().masks(row, T)
        if row.id not in self.first_exact:
            return mk, mv
        first = (torch.arange(T, device=self.dev) == 0)[None, :].expand(T, T)
        return (first if mk is None else mk | first), (first if mv is None else mv | first)

    def stored(self, row, is_key, layer, x, xr, T):
        if not (is_key and row.ktype.kind == "cq" and row.centroid_file in self.permuted_files):
            return super().stored(row, is_key, layer, x, xr, T)
        c, b = row.ktype.c, row.ktype.b
        cb, sq = self.codebook(row.centroid_file, c, b)
        cb, sq = cb[layer, 0], sq[layer, 0]
        G = cb.shape[0]
        codes = Q.cq_encode(x[:, self.perm].reshape(T, G, c), cb, sq)
        dec = cb[torch.arange(G, device=self.dev)[None, :], codes].reshape(T, -1)[:, self.inverse]
        hs = self.cfg["head_size"]
        d = dec.view(T, -1, hs)
        swapped = d.view(T, -1, hs // 2, 2).flip(-1).reshape(d.shape)
        return Q.fma(d, self.cos2[:T, None, :], swapped * self.sin2[:T, None, :]).reshape(T, -1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True, help="calibration token ids (whitespace-separated)")
    ap.add_argument("--ids", required=True, help="evaluation token ids (whitespace-separated)")
    ap.add_argument("--types", default="cq1,cq2,cq4")
    ap.add_argument("--variants", default="rotate-half,clip99,split,first-exact")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--n-seeds", type=int, default=3, help="seeds per seeding (variant seeds)")
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("-l", "--length", type=int, default=2048)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json")
    args = ap.parse_args()
    t_start = time.time()
    E.PROGRESS.enabled = sys.stderr.isatty()  # the k-means progress line, on a terminal only

    cfg, weights = E.load_checkpoint(args.model)
    model = E.TorchLlama(cfg, weights, dtype=torch.float32, device=args.device)
    seqs = E.calibration_sequences_from_text(args.calib, None, cfg, args.seqs,
                                             min(args.seq_len, cfg.seq_len), ids=True)
    acts, g2 = E.collect_kv(model, seqs, fisher=True)
    variants = args.variants.split(",")
    if "no-bos" in variants:  # the same text, cut into sequences of seq_len tokens without BOS
        n = min(args.seq_len, cfg.seq_len)
        stream = [int(t) for t in open(args.calib).read().split()][:args.seqs * n]
        raw = [E.np.array(stream[i * n:(i + 1) * n], dtype=E.np.int64) for i in range(len(stream) // n)]
        acts_nb, g2_nb = E.collect_kv(model, raw, fisher=True)
        acts_nb, g2_nb = acts_nb.to(args.device), g2_nb.to(args.device)
    del model
    acts, g2 = acts.to(args.device), g2.to(args.device)
    n_tokens = sum(len(s) for s in seqs)
    print(f"calibration: {len(seqs)} sequences, {n_tokens} tokens, {time.time() - t_start:.1f} s",
          flush=True)
    order = hf_order(cfg.n_kv_heads, cfg.head_size)
    first = torch.tensor([0] + list(itertools.accumulate(len(x) for x in seqs[:-1])))  # each sequence's first token
    if "clip99" in variants:  # where the Fisher weight sits: first positions, top 1 % of tokens
        starts = torch.zeros(acts.shape[2], dtype=torch.bool)
        starts[first] = True
        for kv, name in enumerate("KV"):
            per_token = g2[:, kv].sum(-1).double()  # (L, N): summed over channels
            top = per_token.sort(dim=1, descending=True).values
            k1 = max(1, per_token.shape[1] // 100)
            print(f"Fisher weight of {name}: first positions ({int(starts.sum())} tokens) "
                  f"{(per_token[:, starts.to(per_token.device)].sum() / per_token.sum()):.3f} of the "
                  f"total, top 1 % of tokens {(top[:, :k1].sum() / per_token.sum()):.3f}", flush=True)
    fp = E.model_fingerprint(weights["wk"])
    tmp = tempfile.mkdtemp(prefix="centroids.")
    files = {}
    for name in args.types.split(","):
        kvt = Q.KVType(name)
        c, b = kvt.c, kvt.b
        runs = [("fisher", 0, E.SEEDING)] + [(v, 0, E.SEEDING) for v in variants
                                          if v in ("rotate-half", "clip99", "no-bos", "drop-first")]
        if "seeds" in variants:
            runs += [(f"{seeding} seed {s}", s, seeding) for seeding in E.SEEDINGS
                     for s in range(args.n_seeds) if (s, seeding) != (0, E.SEEDING)]
        for variant, seed, seeding in runs:
            a, g = acts, g2
            if variant == "rotate-half":  # keys (index 0 of the K/V axis) in HF channel order
                a, g = acts.clone(), g2.clone()
                a[:, 0] = acts[:, 0][..., order]
                g[:, 0] = g2[:, 0][..., order]
            elif variant == "clip99":
                cap = g2.kthvalue(int(0.99 * g2.shape[2]), dim=2, keepdim=True).values  # per (layer, K/V, channel)
                g = torch.minimum(g2, cap)
            elif variant == "no-bos":
                a, g = acts_nb, g2_nb
            elif variant == "drop-first":
                g = g2.clone()
                g[:, :, first] = 0
            t0 = time.time()
            cb, st = E.learn_codebooks(a, g, cfg, c, b, 100, seed, f"{name} {variant}", E.PROGRESS,
                                       seeding=seeding)
            path = os.path.join(tmp, f"{name}.{variant.replace(' ', '_')}.cent")
            E.write_centroids(path, cb, cfg.n_kv_heads, cfg.head_size, 1, a.shape[2], fp)
            files[(name, variant)] = path
            print(f"{name} {variant}: plain relative MSE of keys "
                  f"{st['sse'][0] / st['var'][0]:.4f}, values {st['sse'][1] / st['var'][1]:.4f}; "
                  f"weighted objective K {st['obj'][0]:.6g} V {st['obj'][1]:.6g}; "
                  f"{time.time() - t0:.1f} s", flush=True)
    del acts, g2

    qcfg, w = Q.load_checkpoint(args.model)  # the evaluator's form of the same checkpoint
    ev = Experiments(qcfg, w, args.device, order)
    rows, labels = [Q.Row("fp32")], {"fp32": ("fp32", "-")}

    def add(spec, path, variant, label):
        r = Q.Row(spec)
        r.id = f"{r.id}/{variant}"
        r.centroid_file = path
        rows.append(r)
        labels[r.id] = (label, variant)
        return r

    for (name, variant), path in files.items():
        for window in (0, 128) if name == "cq1" and "seed" not in variant else (0,):
            w_spec, w_label = (f"/w{window}", f", {window}-token window") if window else ("", "")
            add(f"{name}/fisher{w_spec}", path, variant, name + w_label)
            if variant == "rotate-half":
                ev.permuted_files.add(path)
            if variant == "fisher" and "first-exact" in variants:
                ev.first_exact.add(add(f"{name}/fisher{w_spec}", path, "first-exact", name + w_label).id)
        if variant == "fisher" and "split" in variants:
            add(f"{name}:fp32/fisher", path, "fisher", f"{name} keys, fp32 values")
            add(f"fp32:{name}/fisher", path, "fisher", f"fp32 keys, {name} values")
    ids = [int(t) for t in open(args.ids).read().split()]
    wins = Q.windows_of(ids, args.length, qcfg["bos_id"])[:args.windows]
    totals = Q.evaluate(ev, rows, wins)
    res = Q.results(qcfg, rows, totals)
    print(f"\n{len(wins)} windows of {args.length}, {res[0]['tokens']} scored tokens; "
          f"Fisher centroids from {n_tokens} calibration tokens\n")
    print("| cache | centroids / variant | ppl | KL |\n|---|---|---:|---:|")
    for r in res:
        cache, grouping = labels[r["id"]]
        print(f"| {cache} | {grouping} | {r['ppl']:.3f} | {r['kl']:.4f} |")
    print(f"\ntotal {time.time() - t_start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(windows=len(wins), tokens=res[0]["tokens"], rows=res,
                           labels={k: list(v) for k, v in labels.items()}), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
