#!/usr/bin/env python3
"""Perplexity and KL divergence of every KV-cache type on SmolLM2 (WikiText-2), batched.

What it measures: for each row of the quality table (fp32, fp16, q8, q4, q2, q1, kivi4, kivi2,
cq4, cq2, cq8c10b and cq1 with Fisher and with uniform centroids, and cq1 with a 128-token
full-precision window) the numbers `./run MODEL -m ppl --ids -l L -k TYPE [-w N] [-c FILE] --kl`
prints: scored tokens, mean NLL, perplexity, mean KL(p_fp32 || p_type), bits per channel and
KV-cache bytes per token.  The text is cut as run.c cuts it: windows [bos] + chunk of L-1 ids,
each from an empty cache, every chunk id scored.

How: run.c decodes token by token; this script runs a whole window at once (torch, CPU or GPU)
and reproduces what each query reads from the cache.  Quantizing a token's key or value does
not depend on the query, so every key and value of a window is computed once in full
precision and once as the cache reads it back; the only query-dependent choices are
  * KIVI keys: a block of 32 positions is quantized once its last position has arrived, so
    query p reads key t quantized iff 32*(t//32)+31 <= p, else in full precision;
  * the window (-w N): query p reads key/value t in full precision iff t > p - N;
and they become (query, key) masks: scores = where(full, q.k_full, q.k_quant), and the value
sum is split the same way.  Every token attends through the cache, itself included.  Keys of
non-CQ types are rotated (RoPE) and then quantized; CQ codes the pre-RoPE key (nearest
centroid, first index on ties) and rotates the decoded centroid with run.c's coarse x fine
(cos, sin) tables.  Everything is float32 (TF32 off), as in run.c; log-probabilities and KL
are taken in float64 as run.c does.  Where run.c's -Ofast build rounds differently from the
plain C expressions, this script follows the build (measured with gcc 12 on x86-64): RoPE
tables from the C library's powf(theta, -2i/hs) and sincosf (ctypes), fused multiply-adds in
the rotations and the CQ distances, a product with the float 1/127 (q8) or 1/levels (q4/q2/q1
rows) for the scales.  These only decide float near-ties; see --check.

--check compares with ./run (token by token) on a sample; it prints the relative differences
per row and exits non-zero on failure.  Part A runs the given model: rows that read nothing
quantized must agree to --tol (1e-5); the quantized rows agree to 1e-5 until a decision within
float noise of its boundary goes the other way, after which the two decodes drift apart the
way ./run drifts from itself between 1 and 2 threads (both are shown); they are marked
flip-limited and only held to --flip-bound.  Part B runs a small model with the same attention
shape whose keys and values are exact in float32: no decision can differ, and every row must
agree to 1e-5 (NLL, KL) and 1e-4 (every logits row).

Usage:
  python3 scripts/smollm_quality.py --model smol.bin --tokenizer smol_tok.bin \\
      --centroids FISHER_DIR UNIFORM_DIR [--device cuda] [--windows N] [-l 2048] \\
      [--rows fp32,cq1/fisher,cq1/uniform/w128] --json out.json
  python3 scripts/smollm_quality.py ... --check        # agreement with ./run on a sample
  python3 scripts/smollm_quality.py --plot out.png --json out.json   # figure from a result
Text: --ids FILE (whitespace-separated ids) or --text FILE (default: WikiText-2 test split),
tokenized with `./run MODEL -z TOKENIZER -m encode`.  Centroid files ("CQCB", README.md) are
found by their header (c, b, Fisher or uniform, model fingerprint) in the directories or files
given to --centroids (default: the checkpoint's directory).
Rows: TYPE[/fisher|/uniform][/wN], e.g. q4, cq2/uniform, cq1/fisher/w128; TYPE may be
KEYTYPE:VALUETYPE as for ./run -k (cq1:fp32), with one CQ configuration per row.
"""
import argparse
import dataclasses
import glob
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import export as E  # noqa: E402  (checkpoint and centroid files, CQ type names)

DEFAULT_TEXT = os.path.join(os.path.dirname(ROOT), "shared", "data", "wikitext2-test.raw.txt")

QBLOCK = 32          # channels per block (q types), positions per block (KIVI keys)
ROPE_FINE = 32       # run.c's coarse/fine RoPE tables for CQ keys
# on the CPU, large temporaries are computed in slices of at most this many floats (16 MB):
# glibc serves bigger blocks with fresh mmaps, whose page faults then dominate the run time
T_CHUNK_FLOATS = 1 << 22
SCALAR_BITS = {"q8": 8, "q4": 4, "q2": 2, "q1": 1, "kivi4": 4, "kivi2": 2}
# rows the exact model of --check runs besides the table's (a window on the other kinds of type)
EXACT_EXTRA_ROWS = ("fp16/w64", "q4/w64", "kivi2/w64", "cq4/fisher/w64", "cq2/uniform/w200")
DEFAULT_ROWS = ("fp32 fp16 q8 q4 q2 q1 kivi4 kivi2 cq4/fisher cq4/uniform cq2/fisher cq2/uniform "
                "cq8c10b/fisher cq8c10b/uniform cq1/fisher cq1/uniform cq1/fisher/w128 "
                "cq1/uniform/w128 cq4:cq2/fisher cq2:cq1/fisher cq1:fp32/fisher "
                "fp32:cq1/fisher").split()


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------
# checkpoint and centroid files: export.py's readers and writers

def load_checkpoint(path):
    """(cfg dict, weights) of a checkpoint export.py reads (CQKV or llama2.c); weights are
    float32 numpy arrays named as in export.TENSOR_ORDER ("classifier" is the embedding when
    shared)."""
    try:
        cfg, w = E.load_checkpoint(path)
    except E.ExportError as e:
        sys.exit("error: %s" % e)
    return dataclasses.asdict(cfg), w


def export_config(cfg):
    """The export.Config of a cfg dict (for export.write_checkpoint)."""
    return E.Config(**{f.name: cfg[f.name] for f in dataclasses.fields(E.Config) if f.name in cfg})


def fingerprint(w):
    """run.c's model fingerprint of the checkpoint (export.model_fingerprint)."""
    return E.model_fingerprint(w["wk"])


def read_centroid_header(path):
    """export.read_centroids' header of a centroid file, with its path; None if it is not one."""
    try:
        h, _ = E.read_centroids(path)
    except E.ExportError:
        return None
    return dict(h, path=path, weighting="fisher" if h["weighting"] == 1 else "uniform")


def find_centroids(places, cfg, fp):
    """{(c, b, 'fisher'|'uniform'): header dict} of the centroid files made for this model."""
    files = []
    for p in places:
        files += sorted(glob.glob(os.path.join(p, "*.cent"))) if os.path.isdir(p) else [p]
    found = {}
    for path in files:
        h = read_centroid_header(path)
        if (h is None or h["fingerprint"] != fp or h["n_layers"] != cfg["n_layers"]
                or h["n_kv_heads"] != cfg["n_kv_heads"] or h["head_size"] != cfg["head_size"]):
            continue
        key = (h["c"], h["b"], h["weighting"])
        if key in found:
            log("note: %s and %s both hold %dc%db %s centroids; using the first" % (
                found[key]["path"], path, *key))
            continue
        found[key] = h
    return found


def load_codebooks(path, cfg, c, b):
    """(L, 2, G, 2^b, c) float32 codebooks of a centroid file (keys before RoPE, values)."""
    try:
        h, cb = E.read_centroids(path)
    except E.ExportError as e:
        sys.exit("error: %s" % e)
    if (h["c"], h["b"], h["n_layers"], h["n_kv_heads"], h["head_size"]) != (
            c, b, cfg["n_layers"], cfg["n_kv_heads"], cfg["head_size"]):
        sys.exit("error: %s does not hold %dc%db centroids for this model" % (path, c, b))
    return cb


# ------------------------------------------------------------------------------------------
# cache types and rows

class KVType:
    def __init__(self, name):
        self.name = name
        if name in ("fp32", "fp16") or name in SCALAR_BITS:
            self.kind, self.c, self.b = name, 0, 0
        else:
            try:
                self.c, self.b = E.parse_cq_type(name)
            except E.ExportError:
                raise ValueError("unknown cache type %r" % name) from None
            self.kind = "cq"

    @property
    def bits(self):   # bits per channel, as run.c's kv_type_bits
        return {"fp32": 32.0, "fp16": 16.0, "q8": 8 + 16 / QBLOCK, "q4": 5.0, "kivi4": 5.0, "q2": 3.0,
                "kivi2": 3.0, "q1": 2.0}.get(self.kind) or self.b / self.c


class Row:
    """One row of the table: a cache type for keys and values (TYPE, or KEYTYPE:VALUETYPE as
    run.c's -k takes it), centroids, a window.  Keys and values may use two CQ configurations
    (cq2:cq1); each side then reads its own centroid file."""

    def __init__(self, spec):
        parts = spec.split("/")
        names = parts[0].split(":")
        if len(names) > 2:
            raise ValueError("bad row %r" % spec)
        self.ktype, self.vtype = KVType(names[0]), KVType(names[-1])
        self.name = names[0] if names[0] == names[-1] else parts[0]
        self.cqs = []                                # the distinct CQ configurations (c, b)
        for t in (self.ktype, self.vtype):
            if t.kind == "cq" and (t.c, t.b) not in self.cqs:
                self.cqs.append((t.c, t.b))
        self.is_fp32 = self.ktype.kind == self.vtype.kind == "fp32"
        self.bits = (self.ktype.bits + self.vtype.bits) / 2
        self.weighting, self.window = None, 0
        for p in parts[1:]:
            if p in ("fisher", "uniform"):
                self.weighting = p
            elif re.fullmatch(r"w\d+", p):
                self.window = int(p[1:])
            else:
                raise ValueError("bad row %r" % spec)
        if self.cqs and self.weighting is None:
            self.weighting = "fisher"
        if not self.cqs:
            self.weighting = None
        if self.is_fp32:
            self.window = 0          # run.c ignores -w for fp32
        self.id = "/".join([self.name] + ([self.weighting] if self.weighting else [])
                           + (["w%d" % self.window] if self.window else []))
        self.files = {}              # (c, b) -> centroid file

    @property
    def cq(self):
        """The CQ configuration of a row with one (None without CQ; the keys' with two)."""
        return self.ktype if self.ktype.kind == "cq" else self.vtype if self.vtype.kind == "cq" else None

    @property
    def centroid_file(self):
        """The centroid file of a row with one CQ configuration."""
        return self.files.get(self.cqs[0]) if len(self.cqs) == 1 else None

    @centroid_file.setter
    def centroid_file(self, path):
        for key in self.cqs:
            self.files[key] = path

    def file_for(self, t):
        return self.files[(t.c, t.b)]


# ------------------------------------------------------------------------------------------
# float32 building blocks, as run.c computes them

def _libm():
    """glibc's libm through ctypes (None where it cannot be loaded)."""
    try:
        import ctypes
        import ctypes.util
        m = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
        f, pf = ctypes.c_float, ctypes.POINTER(ctypes.c_float)
        m.powf.restype, m.powf.argtypes = f, [f, f]
        m.sincosf.restype, m.sincosf.argtypes = None, [f, pf, pf]
        return m
    except (OSError, AttributeError):
        return None


def rope_tables(cfg, mode="libm"):
    """Exact (cos, sin) (S, hs/2) and CQ's coarse x fine (cos2, sin2) (S, hs), float32, numpy.

    run.c's rope_angle is freq = 1.0f / powf(theta, (2i) / (float)hs); angle = t * freq;
    cosf(angle), sinf(angle).  Built with -Ofast, gcc turns 1/powf(x, y) into powf(x, -y) and
    the two calls into one sincosf; both differ from the correctly rounded values in the last
    bits, and an ulp of freq grows to ~1e-5 in cos at position 2000.  mode 'libm' calls the
    C library's powf and sincosf (ctypes) the way the compiled run.c does; 'exact' uses
    correctly rounded float32 values (for a C library that ctypes cannot load)."""
    hs, S = cfg["head_size"], cfg["seq_len"]
    f32 = np.float32
    half_ = hs // 2
    expo = (2 * np.arange(half_)).astype(f32) / f32(hs)
    libm = _libm() if mode == "libm" else None
    if libm is not None:
        freq = np.array([libm.powf(f32(cfg["rope_theta"]), -e) for e in expo.tolist()], dtype=f32)
    else:
        freq = f32(1.0) / (np.float64(f32(cfg["rope_theta"])) ** expo.astype(np.float64)).astype(f32)

    def cos_sin(t):
        ang = t.astype(f32)[:, None] * freq[None, :]          # float32 product
        if libm is None:
            return np.cos(ang.astype(np.float64)).astype(f32), np.sin(ang.astype(np.float64)).astype(f32)
        import ctypes
        s, c = ctypes.c_float(), ctypes.c_float()
        cs, sn = np.empty_like(ang), np.empty_like(ang)
        flat_c, flat_s = cs.reshape(-1), sn.reshape(-1)
        for j, a in enumerate(ang.reshape(-1).tolist()):
            libm.sincosf(a, ctypes.byref(s), ctypes.byref(c))
            flat_c[j], flat_s[j] = c.value, s.value
        return cs, sn

    cos, sin = cos_sin(np.arange(S))
    # rope_cos2_sin2: position t = 32a + b from e^{iw 32a} * e^{iw b}, in float32; -Ofast
    # contracts cc*cf - sc*sf and sc*cf + cc*sf into fused multiply-adds (the first product fused)
    ca, sa = cos_sin(np.arange(S // ROPE_FINE + 1) * ROPE_FINE)
    cb, sb = cos_sin(np.arange(ROPE_FINE))
    t = np.arange(S)
    A, B = ca[t // ROPE_FINE], sa[t // ROPE_FINE]
    C, Dd = cb[t % ROPE_FINE], sb[t % ROPE_FINE]
    c2 = fma_np(A, C, -(B * Dd))               # cos of the sum (both lanes of a pair)
    s2 = fma_np(B, C, A * Dd)                  # sin of the sum; lane 0 gets -sin
    cos2 = np.repeat(c2, 2, axis=1)
    sin2 = np.stack([-s2, s2], axis=2).reshape(S, hs)
    return cos, sin, cos2, sin2


def fma_np(a, b, c):
    """float32 fused multiply-add a*b + c (one rounding; via float64, where a*b is exact)."""
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)


def fma(a, b, c):
    """torch float32 fused multiply-add a*b + c, as an FMA instruction rounds it."""
    return (a.double() * b.double() + c.double()).float()


def rope(x, cos, sin):
    """Rotate pairs (2i, 2i+1) of x (T, heads, hs) by the (T, hs/2) cos/sin, as run.c's
    rope_rotate compiles with -Ofast: a*c - b*s and a*s + b*c with the first product fused."""
    a, b = x[..., 0::2], x[..., 1::2]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.stack([fma(a, c, -(b * s)), fma(a, s, b * c)], dim=-1).reshape(x.shape)


def round_away(r):
    """C roundf: halfway cases away from zero (torch.round rounds them to even)."""
    t = torch.trunc(r)
    return t + torch.where((r - t).abs() >= 0.5, torch.sign(r), torch.zeros_like(r))


def half(x):
    return x.to(torch.float16).to(torch.float32)


def quant_sym8(x, dim):
    """q8 blocks along `dim`: half scale = amax/127 (which -Ofast compiles as a product with
    the float 1/127), int8 codes -> dequantized float32."""
    scale = half(x.abs().amax(dim=dim, keepdim=True) * float(np.float32(1.0 / 127.0)))
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    return scale * torch.clamp(round_away(x * inv), -127, 127)


def quant_asym(x, bits, dim, recip):
    """Asymmetric blocks along `dim`: half scale = (hi - lo) / levels and half minimum,
    `bits`-bit codes.  recip: the scale is (hi - lo) times the float 1/levels, as -Ofast
    compiles run.c's row quantizer (1/levels hoisted out of the loop over blocks; its KIVI
    path divides)."""
    levels = (1 << bits) - 1
    lo, hi = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    scale = half((hi - lo) * float(np.float32(1.0 / levels)) if recip else (hi - lo) / levels)
    mn = half(lo)
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    return fma(scale, torch.clamp(round_away((x - mn) * inv), 0, levels), mn)   # min + scale*code


def quant_rows(x, bits):
    """Per token, blocks of 32 consecutive channels (a shorter last block if kv_dim is not a
    multiple of 32).  x: (T, KD)."""
    f = (lambda y: quant_sym8(y, -1)) if bits == 8 else (lambda y: quant_asym(y, bits, -1, True))
    T, KD = x.shape
    full = KD // QBLOCK * QBLOCK
    parts = [f(x[:, :full].reshape(T, -1, QBLOCK)).reshape(T, full)] if full else []
    if full < KD:
        parts.append(f(x[:, full:]))
    return torch.cat(parts, dim=1)


def quant_kivi_keys(x, bits):
    """KIVI keys: per channel over blocks of 32 positions; positions of the unfinished last
    block stay as they are (every query reads them in full precision anyway)."""
    T, KD = x.shape
    done = T // QBLOCK * QBLOCK
    out = x.clone()
    if done:
        out[:done] = quant_asym(x[:done].reshape(-1, QBLOCK, KD), bits, 1, False).reshape(done, KD)
    return out


def cq_encode(x, cb, sqnorm):
    """Nearest centroid per group: argmin_j (||C_j||^2 - 2 x.C_j) in float32, first index on
    ties.  x (T, G, c), cb (G, K, c), sqnorm (G, K) -> codes (T, G).  The dot products come
    from a batched matrix product, summed in another order than run.c's encoder: that decides
    only float near-ties (a gap of a few ulps between two centroids), see --check."""
    G, K = cb.shape[0], cb.shape[1]
    xt, cbt = x.transpose(0, 1), cb.transpose(1, 2)
    step = T_CHUNK_FLOATS // (G * K) if x.device.type == "cpu" else x.shape[0]   # CPU: < 32 MB temporaries
    out = [torch.argmin(torch.baddbmm(sqnorm[:, None, :], xt[:, t0:t0 + step], cbt, alpha=-2.0), dim=2)
           for t0 in range(0, x.shape[0], max(step, 1))]
    return torch.cat(out, dim=1).T


# ------------------------------------------------------------------------------------------
# the model with a cache

class Evaluator:
    def __init__(self, cfg, w, device):
        self.cfg, self.dev = cfg, torch.device(device)
        t = lambda a: torch.from_numpy(np.array(a, dtype=np.float32)).to(self.dev)   # a copy of the memmap
        self.w = {k: t(v) for k, v in w.items()}
        self.cls = self.w["token_embedding"] if cfg["shared_classifier"] else self.w["classifier"]
        cos, sin, cos2, sin2 = rope_tables(cfg)
        self.cos, self.sin, self.cos2, self.sin2 = t(cos), t(sin), t(cos2), t(sin2)
        self.codebooks = {}       # path -> (cb (L, 2, G, K, c), sqnorm (L, 2, G, K)) on the device

    def codebook(self, path, c, b):
        if path not in self.codebooks:
            cb = torch.from_numpy(load_codebooks(path, self.cfg, c, b)).to(self.dev)
            sq = torch.zeros(cb.shape[:-1], dtype=torch.float32, device=self.dev)
            for i in range(c):    # ||C||^2 summed in run.c's order, fused multiply-adds
                sq = fma(cb[..., i], cb[..., i], sq)
            self.codebooks[path] = (cb, sq)
        return self.codebooks[path]

    def stored(self, row, is_key, layer, x, xr, T):
        """What the quantized storage of a row reads back for x (T, KD): None when that is x
        itself (fp32).  x is the pre-RoPE key or the value, xr the rotated key (or the value)."""
        t = row.ktype if is_key else row.vtype
        kind = t.kind
        if kind == "fp32":
            return None
        if kind == "fp16":
            return half(xr)
        if kind == "cq":
            c, b = t.c, t.b
            cb, sq = self.codebook(row.file_for(t), c, b)
            cb, sq = cb[layer, 0 if is_key else 1], sq[layer, 0 if is_key else 1]
            G = cb.shape[0]
            codes = cq_encode(x.reshape(T, G, c), cb, sq)
            dec = cb[torch.arange(G, device=self.dev)[None, :], codes].reshape(T, -1)
            if not is_key:
                return dec
            hs = self.cfg["head_size"]
            if c == 1:        # c = 1 splits RoPE pairs: run.c decodes and rotates with the exact table
                return rope(dec.view(T, -1, hs), self.cos[:T], self.sin[:T]).reshape(T, -1)
            d = dec.view(T, -1, hs)
            swapped = d.view(T, -1, hs // 2, 2).flip(-1).reshape(d.shape)
            return fma(d, self.cos2[:T, None, :], swapped * self.sin2[:T, None, :]).reshape(T, -1)
        bits = SCALAR_BITS[kind]
        if kind.startswith("kivi") and is_key:
            return quant_kivi_keys(xr, bits)
        return quant_rows(xr, bits)

    def masks(self, row, T):
        """(keys, values) bool (T, T) masks: True where query p reads position t in full
        precision, or None where it never does."""
        p = torch.arange(T, device=self.dev)[:, None]
        t = torch.arange(T, device=self.dev)[None, :]
        win = (t > p - row.window) if row.window else None
        mk = win if row.ktype.kind != "fp32" else None
        mv = win if row.vtype.kind != "fp32" else None
        if row.ktype.kind.startswith("kivi"):
            kivi = (t // QBLOCK) * QBLOCK + QBLOCK - 1 > p
            mk = kivi if mk is None else (mk | kivi)
        return mk, mv

    @torch.no_grad()
    def forward(self, tokens, row, capture=None):
        """Logits (T, V) float32 of every position of `tokens` (a window from an empty cache).
        capture: a list that receives (pre-RoPE keys, values) (T, KD) of every layer."""
        cfg, w = self.cfg, self.w
        T = len(tokens)
        H, KVH, hs = cfg["n_heads"], cfg["n_kv_heads"], cfg["head_size"]
        R, eps = H // KVH, cfg["norm_eps"]
        scale = 1.0 / math.sqrt(hs)
        cos, sin = self.cos[:T], self.sin[:T]
        causal = torch.ones(T, T, dtype=torch.bool, device=self.dev).tril()
        mk, mv = self.masks(row, T)
        qstep = max(1, T_CHUNK_FLOATS // (H * T)) if self.dev.type == "cpu" else T

        def rmsnorm(x, weight):
            ss = 1.0 / torch.sqrt((x * x).sum(-1, keepdim=True) / x.shape[-1] + eps)
            return weight * (ss * x)

        def heads(x):                    # (T, KVH*hs) -> (KVH, 1, T, hs)
            return x.view(T, KVH, hs).permute(1, 0, 2).unsqueeze(1)

        x = w["token_embedding"][torch.as_tensor(tokens, device=self.dev)]
        for l in range(cfg["n_layers"]):
            h = rmsnorm(x, w["attn_norm"][l])
            q = rope((h @ w["wq"][l].T).view(T, H, hs), cos, sin)
            k = h @ w["wk"][l].T                                       # before RoPE
            v = h @ w["wv"][l].T
            if capture is not None:
                capture.append((k, v))
            kr = rope(k.view(T, KVH, hs), cos, sin).reshape(T, KVH * hs)
            kq = self.stored(row, True, l, k, kr, T)
            vq = self.stored(row, False, l, v, v, T)
            qh = q.view(T, KVH, R, hs).permute(1, 2, 0, 3)             # query head = kvh*R + r
            kf_t, v_h = heads(kr).transpose(-1, -2), heads(v)
            kq_t = heads(kq).transpose(-1, -2) if kq is not None else None
            vq_h = heads(vq) if vq is not None else None
            o = torch.empty(KVH, R, T, hs, device=self.dev)
            for a in range(0, T, qstep):                               # blocks of queries
                z = slice(a, min(a + qstep, T))
                qz = qh[:, :, z]
                s_full = (qz @ kf_t) * scale if kq is None or mk is not None else None
                s_q = (qz @ kq_t) * scale if kq is not None else None
                s = s_full if s_q is None else s_q if mk is None else torch.where(mk[z], s_full, s_q)
                p = torch.softmax(s.masked_fill(~causal[z], float("-inf")), dim=-1)
                if vq is None:
                    o[:, :, z] = p @ v_h
                elif mv is None:
                    o[:, :, z] = p @ vq_h
                else:
                    zero = torch.zeros((), dtype=p.dtype, device=self.dev)
                    o[:, :, z] = torch.where(mv[z], p, zero) @ v_h + torch.where(mv[z], zero, p) @ vq_h
            x = x + o.permute(2, 0, 1, 3).reshape(T, H * hs) @ w["wo"][l].T
            h = rmsnorm(x, w["ffn_norm"][l])
            a, b = h @ w["w1"][l].T, h @ w["w3"][l].T
            x = x + (a / (1.0 + torch.exp(-a)) * b) @ w["w2"][l].T
        x = rmsnorm(x, w["final_norm"])
        return x @ self.cls.T


def logprobs64(logits):
    return torch.log_softmax(logits.to(torch.float64), dim=-1)


def score(logits, targets, ref=None, chunk=512):
    """(sum of NLL, sum of KL(p_ref || p)) over rows, in float64 (KL 0 without ref)."""
    nll = kl = 0.0
    tg = torch.as_tensor(targets, device=logits.device)
    for i in range(0, logits.shape[0], chunk):
        lq = logprobs64(logits[i:i + chunk])
        nll -= float(lq.gather(1, tg[i:i + chunk, None]).sum())
        if ref is not None:
            lp = logprobs64(ref[i:i + chunk])
            kl += float((lp.exp() * (lp - lq)).sum())
    return nll, kl


def windows_of(ids, L, bos):
    """run.c's ppl windows: (input tokens, targets) per chunk of L-1 ids.  The window's last
    token is only ever a target, so its own forward step (unscored) is left out."""
    out = []
    for s in range(0, len(ids), L - 1):
        chunk = ids[s:s + L - 1]
        out.append(([bos] + chunk[:-1], chunk))
    return out


def evaluate(ev, rows, windows, on_logits=None):
    """{row id: totals} over the windows; fp32 runs first in every window (KL reference)."""
    totals = {r.id: dict(tokens=0, nll=0.0, kl=0.0, seconds=0.0) for r in rows}
    ref_row = Row("fp32")
    t_start = time.time()
    for wi, (inp, tgt) in enumerate(windows):
        t_win = t0 = time.time()
        ref = ev.forward(inp, ref_row)
        sync(ev.dev)
        t_ref = time.time() - t0
        for r in rows:
            t0 = time.time()
            is_ref = r.is_fp32
            logits = ref if is_ref else ev.forward(inp, r)
            nll, kl = score(logits, tgt, None if is_ref else ref)
            sync(ev.dev)
            tot = totals[r.id]
            tot["tokens"] += len(tgt)
            tot["nll"] += nll
            tot["kl"] += kl
            tot["seconds"] += time.time() - t0 + (t_ref if is_ref else 0.0)
            if on_logits:
                on_logits(r, wi, logits)
        el = time.time() - t_start
        fp = totals.get("fp32")
        log("window %d/%d (%d tokens): %.1f s; total %.0f s, eta %.0f s%s" % (
            wi + 1, len(windows), len(tgt), time.time() - t_win, el, el / (wi + 1) * (len(windows) - wi - 1),
            "; fp32 ppl so far %.4f" % math.exp(fp["nll"] / fp["tokens"]) if fp else ""))
    return totals


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def results(cfg, rows, totals):
    kv_dim = cfg["n_kv_heads"] * cfg["head_size"]
    fp32_bytes = 2 * 4 * kv_dim * cfg["n_layers"]
    out = []
    for r in rows:
        t = totals[r.id]
        n = t["tokens"]
        nbytes = 2 * r.bits / 8 * kv_dim * cfg["n_layers"]
        out.append(dict(id=r.id, type=r.name, centroids=r.weighting, centroid_files=sorted(set(r.files.values())),
                        window=r.window, bits_per_channel=r.bits, kv_bytes_per_token=nbytes,
                        ratio_fp32=nbytes / fp32_bytes, tokens=n, nll=t["nll"] / n,
                        ppl=math.exp(t["nll"] / n), kl=max(t["kl"] / n, 0.0),
                        seconds=t["seconds"]))
    return out


def markdown(res):
    lines = ["| cache | centroids | window | bits/channel | KV bytes/token | ppl | KL | tokens |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in res:
        lines.append("| %s | %s | %d | %g | %g | %.3f | %.4f | %d |" % (
            r["type"], r["centroids"] or "-", r["window"], round(r["bits_per_channel"], 3),
            round(r["kv_bytes_per_token"], 1), r["ppl"], r["kl"], r["tokens"]))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# agreement with ./run (--check)
#
# Quantizing is discontinuous: a value within float noise of a rounding boundary (a half
# midpoint, a code boundary, two nearly equidistant centroids) can go either way, and this
# script's float32 sums are not run.c's (-Ofast, other summation orders).  On a real model such
# near-tie flips happen every few tokens for fp16 and the scalar types, and each flip moves the
# later logits a little, which causes further flips: the quantized rows then differ by more
# than 1e-5 although both programs do the same thing (run.c differs from itself as much between
# 1 and 2 OpenMP threads).  So --check has two parts:
#   A. the real model: every row against ./run; rows that read nothing quantized must agree to
#      --tol, the others are "exact" when they do and "flip-limited" when they stay within
#      --flip-bound, reported next to the spread of ./run itself (1 vs 2 threads) and the first
#      row where the logits part (> 1e-4);
#   B. an "exact" model with the real model's attention shape whose keys and values are exact
#      in float32 (see exact_model): both programs quantize the same numbers, so every row must
#      agree to --tol (NLL and KL) and every logits row to 1e-4.

def run_decodes(args, model, rows, ids_file, L, threads, tmp):
    """./run -m ppl --logits for every row, args.jobs // threads processes at a time, each with
    OMP_NUM_THREADS=threads.  Returns {row id: (printed key=value dict, logits path)}."""
    out, running, queue, n = {}, [], list(rows), 0
    while queue or running:
        while queue and len(running) < max(1, args.jobs // threads):
            r = queue.pop(0)
            path = os.path.join(tmp, "logits.%d.%d" % (threads, n))
            n += 1
            m = model
            if len(r.cqs) == 2:   # run.c's -c names one file: two go under its default names
                m = os.path.join(tmp, "twocq%d.%d.bin" % (threads, n))  # one name per call and row
                os.symlink(os.path.abspath(model), m)
                for (c, b), f in r.files.items():
                    os.symlink(os.path.abspath(f), "%s.%dc%db.cent" % (m[:-4], c, b))
            cmd = [args.run_bin, m, "-m", "ppl", "-f", ids_file, "--ids", "-l", str(L),
                   "-k", r.name, "-w", str(r.window), "--logits", path]
            if r.centroid_file:
                cmd += ["-c", r.centroid_file]
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
            running.append((r, path, p))
        r, path, p = running.pop(0)
        so, se = p.communicate()
        if p.returncode != 0:
            sys.exit("error: ./run failed for %s: %s" % (r.id, se.strip()))
        out[r.id] = (dict(kv.split("=", 1) for kv in so.split()), path)
    return out


def logits_windows(path, V, wins):
    """run.c's --logits rows of each window, scored rows only (a window of a chunk of n ids
    writes n + 1 rows)."""
    a = np.fromfile(path, dtype="<f4").reshape(-1, V)
    out, at = [], 0
    for _, tgt in wins:
        out.append(a[at:at + len(tgt)])
        at += len(tgt) + 1
    if at != a.shape[0]:
        sys.exit("error: %s: %d logits rows, expected %d" % (path, a.shape[0], at))
    return out


def run_scores(dec, rid, V, wins):
    """(mean NLL, mean KL vs the same decode's fp32 row) of one ./run row, in float64, from its
    logits (run.c prints them with 6 decimals only); its printed NLL is checked against them."""
    rows, ref = logits_windows(dec[rid][1], V, wins), logits_windows(dec["fp32"][1], V, wins)
    nll = kl = 0.0
    for (_, tgt), lg, rf in zip(wins, rows, ref):
        a, b = score(torch.from_numpy(lg), tgt, None if rid == "fp32" else torch.from_numpy(rf))
        nll, kl = nll + a, kl + b
    n = sum(len(t) for _, t in wins)
    printed = dec[rid][0]
    if int(printed["tokens"]) != n or abs(float(printed["nll"]) - nll / n) > 2e-6:
        sys.exit("error: ./run printed tokens=%s nll=%s for %s; its logits give %d, %.6f"
                 % (printed["tokens"], printed["nll"], rid, n, nll / n))
    return nll / n, max(kl / n, 0.0)


def compare(args, model, cfg, ev, rows, ids, L, n_windows, second):
    """Runs ./run (and, with `second`, ./run with 2 threads) and the batched evaluator on the
    first n_windows windows of length L.  Returns one dict per row."""
    V = cfg["vocab_size"]
    sample = ids[:n_windows * (L - 1)]
    wins = windows_of(sample, L, cfg["bos_id"])
    todo = ([] if any(r.id == "fp32" for r in rows) else [Row("fp32")]) + list(rows)
    tmp = tempfile.mkdtemp(prefix="cqcheck")
    ids_file = os.path.join(tmp, "ids.txt")
    with open(ids_file, "w") as f:
        f.write(" ".join(map(str, sample)) + "\n")
    t0 = time.time()
    dec1 = run_decodes(args, model, todo, ids_file, L, 1, tmp)
    log("  ./run, 1 thread: %.0f s" % (time.time() - t0))
    dec2 = None
    if second:
        t0 = time.time()
        dec2 = run_decodes(args, model, todo, ids_file, L, 2, tmp)
        log("  ./run, 2 threads: %.0f s" % (time.time() - t0))
    lerr, first = {}, {}
    offsets = np.cumsum([0] + [len(t) for _, t in wins])

    def on_logits(r, wi, lg):   # max over rows of max|diff| / max|logit|, batched vs ./run
        c = torch.from_numpy(logits_windows(dec1[r.id][1], V, wins)[wi]).to(lg.device)
        e = ((c - lg).abs().amax(1) / c.abs().amax(1)).cpu()
        lerr[r.id] = max(lerr.get(r.id, 0.0), float(e.max()))
        bad = torch.nonzero(e > 1e-4)
        if len(bad) and r.id not in first:
            first[r.id] = int(offsets[wi] + bad[0, 0])

    t0 = time.time()
    tot = evaluate(ev, todo, wins, on_logits=on_logits)
    log("  batched: %.1f s" % (time.time() - t0))
    n = len(sample)
    out = []
    for r in todo:
        c_nll, c_kl = run_scores(dec1, r.id, V, wins)
        b_nll, b_kl = tot[r.id]["nll"] / n, max(tot[r.id]["kl"] / n, 0.0)
        e = dict(row=r, tokens=n, nll_run=c_nll, nll=b_nll, kl_run=c_kl, kl=b_kl,
                 rel_nll=abs(b_nll - c_nll) / abs(c_nll), logit_err=lerr[r.id], first_bad=first.get(r.id),
                 rel_kl=abs(b_kl - c_kl) / max(c_kl, args.kl_floor))
        if dec2:
            c2_nll, c2_kl = run_scores(dec2, r.id, V, wins)
            e["rel_nll_run2"] = abs(c2_nll - c_nll) / abs(c_nll)
            e["rel_kl_run2"] = abs(c2_kl - c_kl) / max(c_kl, args.kl_floor)
        out.append(e)
    for f in os.listdir(tmp):    # logits, ids and the links of two-configuration rows
        os.remove(os.path.join(tmp, f))
    os.rmdir(tmp)
    return out


def print_comparison(title, entries, verdicts, second):
    print("\n" + title + "\n")
    head = "| row | tokens | nll ./run | nll batched | rel. diff nll | kl ./run | kl batched | rel. diff kl"
    head += " | ./run 1 vs 2 threads: nll, kl" if second else ""
    print(head + " | max logit diff | first row > 1e-4 | verdict |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if second else "") + "---:|---:|---|")
    for e, v in zip(entries, verdicts):
        print("| %s | %d | %.6f | %.6f | %.1e | %.6g | %.6g | %.1e |%s %.1e | %s | %s |" % (
            e["row"].id, e["tokens"], e["nll_run"], e["nll"], e["rel_nll"], e["kl_run"], e["kl"],
            e["rel_kl"], " %.1e, %.1e |" % (e["rel_nll_run2"], e["rel_kl_run2"]) if second else "",
            e["logit_err"], "-" if e["first_bad"] is None else e["first_bad"], v))


def exact_model(real, seed=11, dim=64, n_layers=3, vocab=512, seq_len=512):
    """(cfg, weights): a small random model with the real model's heads, kv heads, head size and
    RoPE theta whose keys and values are exact in float32 in any order of summation (the idea
    of tests/cache_reference.py's exact_kv_model).  norm_eps = 2^40, so mean(x^2) + eps is 2^40
    and every RMS norm is an exact scaling by 2^-20; the first half of the residual stream holds
    +-1 embedding entries and is never written (the rows of wo and w2 that would write it are
    zero); wk and wv read only that half, with weights n * 2^16 (|n| <= 8) and power-of-two
    norm weights, so keys and values are short dyadic numbers.  Queries, the feed-forward block
    and the classifier read everything (scaled by 2^20 to undo the norm)."""
    H, KVH, hs = real["n_heads"], real["n_kv_heads"], real["head_size"]
    D, F, L, V, A = dim, 2 * dim, n_layers, vocab, dim // 2
    rng = np.random.default_rng(seed)
    nrm = lambda *s: rng.standard_normal(s)
    big = 2.0 ** 20
    w = {"token_embedding": np.concatenate([rng.choice([-1.0, 1.0], (V, A)), 0.5 * nrm(V, D - A)], 1),
         "attn_norm": 1 + 0.2 * nrm(L, D), "wq": nrm(L, H * hs, D) * big / math.sqrt(D),
         "wk": np.zeros((L, KVH * hs, D)), "wv": np.zeros((L, KVH * hs, D)),
         "wo": nrm(L, D, H * hs) / math.sqrt(H * hs), "ffn_norm": 1 + 0.2 * nrm(L, D),
         "w1": nrm(L, F, D) * big / math.sqrt(D), "w2": nrm(L, D, F) * 0.25 / math.sqrt(F),
         "w3": nrm(L, F, D) * big / math.sqrt(D), "final_norm": 1 + 0.2 * nrm(D),
         "classifier": nrm(V, D) * 0.25 * big / math.sqrt(D)}
    w["attn_norm"][:, :A] = 2.0 ** rng.integers(-1, 2, (L, A))
    for name in ("wk", "wv"):
        w[name][:, :, :A] = rng.integers(-8, 9, (L, KVH * hs, A)) * 2.0 ** 16
    w["wo"][:, :A] = 0.0
    w["w2"][:, :A] = 0.0
    w = {k: v.astype(np.float32) for k, v in w.items()}
    cfg = dict(dim=D, hidden_dim=F, n_layers=L, n_heads=H, n_kv_heads=KVH, vocab_size=V, seq_len=seq_len,
               head_size=hs, rope_theta=real["rope_theta"], norm_eps=2.0 ** 40, bos_id=1, eos_id=2,
               shared_classifier=False)
    return cfg, w


def write_checkpoint(path, cfg, w):
    """CQKV version 1 (export.write_checkpoint)."""
    E.write_checkpoint(path, export_config(cfg), w)


def write_centroids(path, cfg, w, c, b, weighting, codebooks):
    """CQCB version 1 (export.write_centroids); codebooks (L, 2, G, 2^b, c)."""
    E.write_centroids(path, codebooks, cfg["n_kv_heads"], cfg["head_size"],
                      1 if weighting == "fisher" else 0, 0, fingerprint(w))


def grid_without_ties(C, X, g):
    """Moves centroids of C (G, K, c) by steps of 1/8 until every vector of X (G, N, c) has a
    single nearest centroid.  Grid data: every distance is exact, so a gap between the nearest
    and the second nearest is either 0 or at least 2^-7, far above the float noise of a
    program whose keys and values are off by a few ulps (see check)."""
    for _ in range(200):
        d = (C * C).sum(-1)[:, None, :] - 2 * np.einsum("gnc,gkc->gnk", X, C)      # exact
        best = d.min(axis=2, keepdims=True)
        n_best = (d == best).sum(axis=2)
        if (n_best == 1).all():
            return C
        for gi, ni in zip(*np.nonzero(n_best > 1)):
            j = g.choice(np.nonzero(d[gi, ni] == best[gi, ni, 0])[0][1:])
            C[gi, j, g.integers(C.shape[2])] += g.choice([-0.125, 0.125])
        C = np.clip(C, -31.875, 31.875)
    sys.exit("error: could not remove the ties of a test codebook")


def tie_probe_codebook(X, K, c):
    """Codebooks (G, K, c) in which up to K/2 of the data vectors x of each group lie exactly
    halfway between two centroids x + u and x - u (u = 1/8 on the first channel): exact ties,
    which the first index must win.  A program whose keys and values are not exact breaks them
    at random."""
    G = X.shape[0]
    C = np.full((G, K, c), 31.875)
    u = np.zeros(c)
    u[0] = 0.125
    for gi in range(G):
        xs = np.unique(X[gi], axis=0)[:K // 2]
        C[gi, 0:2 * len(xs):2] = xs + u
        C[gi, 1:2 * len(xs):2] = xs - u
    return C


def exact_check_setup(args, real_cfg, rows, tmp):
    """The exact model, its checkpoint, random ids and centroid files for the CQ rows:
    centroids drawn from the model's own keys and values plus noise (a different draw for
    'fisher' and 'uniform'), on a grid of 1/8 below 32 (with keys and values that are multiples
    of 1/32 below 32, every distance is exact in float32 in any order of summation), without
    ties on the sample.  Adds the row 'cq4/tie-probe' (tie_probe_codebook).
    Returns (path, cfg, evaluator, rows, ids)."""
    cfg, w = exact_model(real_cfg)
    path = os.path.join(tmp, "exact.bin")
    write_checkpoint(path, cfg, w)
    rng = np.random.default_rng(5)
    L1 = args.exact_len - 1
    ids = rng.integers(0, cfg["vocab_size"], 2 * L1).tolist()
    ev = Evaluator(cfg, w, args.device)
    data = None                 # per layer (keys, values) (N, KD) of every position of the sample
    for s in range(0, len(ids), L1):
        acts = []
        ev.forward([cfg["bos_id"]] + ids[s:s + L1], Row("fp32"), capture=acts)
        acts = [(k.cpu().double().numpy(), v.cpu().double().numpy()) for k, v in acts]
        data = acts if data is None else [(np.concatenate([a, k]), np.concatenate([b, v]))
                                          for (a, b), (k, v) in zip(data, acts)]
    probe = Row("cq4/fisher")
    probe.id = "cq4/tie-probe"
    out = []
    for r in list(rows) + [probe]:
        r2 = Row(r.id) if r is not probe else probe
        for c, b in r2.cqs:
            tag = "probe" if r2 is probe else r2.weighting
            cent = r2.files[(c, b)] = os.path.join(tmp, "exact.%dc%db.%s.cent" % (c, b, tag))
            if not os.path.exists(cent):
                g = np.random.default_rng(1000 * c + b + (0 if tag == "fisher" else 500))
                cbs = []
                for layer in data:
                    for x in layer:
                        X = x.reshape(x.shape[0], -1, c).transpose(1, 0, 2)                 # (G, N, c)
                        if r2 is probe:
                            cbs.append(tie_probe_codebook(X, 1 << b, c))
                            continue
                        pick = X[:, g.integers(0, X.shape[1], 1 << b)]                       # (G, K, c)
                        cen = pick + 0.25 * X.std() * g.standard_normal(pick.shape)
                        cen = np.clip(np.round(cen * 8) / 8, -31.875, 31.875)
                        cbs.append(grid_without_ties(cen, X, g))
                write_centroids(cent, cfg, w, c, b, "fisher" if tag == "probe" else tag,
                                np.stack(cbs).reshape(cfg["n_layers"], 2, *cbs[0].shape))
        out.append(r2)
    return path, cfg, ev, out, ids


def check(args, cfg, ev, rows, ids):
    ok = True
    if not args.check_exact_only:
        log("check A: %s, %d window(s) of %d tokens" % (args.model, args.check_windows, args.check_len))
        ent = compare(args, args.model, cfg, ev, rows, ids, args.check_len, args.check_windows, True)
        verdicts = []
        for e in ent:
            r = e["row"]
            lossless = r.is_fp32 or r.window >= args.check_len   # no quantized read
            if e["rel_nll"] <= args.tol and e["rel_kl"] <= args.tol:
                verdicts.append("exact")
            elif not lossless and e["rel_nll"] <= args.flip_bound:
                verdicts.append("flip-limited")
            else:
                verdicts.append("FAIL")
        ok &= "FAIL" not in verdicts
        print_comparison("A. %s: %d window(s) of %d tokens; tolerance %g (KL relative to max(kl, %g)); rows "
                         "with near-tie flips (verdict flip-limited) must stay within %g" % (os.path.basename(args.model),
                         args.check_windows, args.check_len, args.tol, args.kl_floor, args.flip_bound),
                         ent, verdicts, True)
    tmp = tempfile.mkdtemp(prefix="cqexact")
    log("check B: exact model (keys and values exact in float32), 2 windows of %d tokens" % args.exact_len)
    extra = [Row(s) for s in EXACT_EXTRA_ROWS if s not in [r.id for r in rows]]
    path, xcfg, xev, xrows, xids = exact_check_setup(args, cfg, list(rows) + extra, tmp)
    ent = compare(args, path, xcfg, xev, xrows, xids, args.exact_len, 2, False)
    strict = lambda e: e["rel_nll"] <= args.tol and e["rel_kl"] <= args.tol and e["logit_err"] <= 1e-4
    # The probe tells whether this build of ./run computes the exact model's keys and values
    # exactly: its -Ofast RMS norm uses an approximate 1/sqrt (rsqrtss and a Newton step),
    # which gives 2^-20 exactly on some CPUs and not on others.  Where it does not, keys and
    # values are off by a few ulps; the tie-free CQ rows must still agree (their decisions
    # have margins far above that), while the other types' roundings (exact ties at .5 on
    # grid data, half roundings of rotated keys) may go either way: flip-limited, as in part A.
    exact_kv = strict(next(e for e in ent if e["row"].id == "cq4/tie-probe"))
    verdicts = []
    for e in ent:
        if strict(e):
            verdicts.append("exact")
        elif e["row"].id == "cq4/tie-probe":
            verdicts.append("ties broken: keys/values not exact in ./run")
        elif not exact_kv and not e["row"].cq and not e["row"].is_fp32 and e["rel_nll"] <= args.flip_bound:
            verdicts.append("flip-limited")
        else:
            verdicts.append("FAIL")
    ok &= "FAIL" not in verdicts
    print_comparison("B. exact model (%d layers, %d/%d heads x %d, keys and values exact in float32): 2 windows "
                     "of %d tokens; tolerance %g, logits 1e-4" % (xcfg["n_layers"], xcfg["n_heads"],
                     xcfg["n_kv_heads"], xcfg["head_size"], args.exact_len, args.tol), ent, verdicts, False)
    print("\ncq4/tie-probe: data vectors exactly halfway between two centroids; ./run %s" % (
        "keeps every tie (first index): it computes the exact model's keys and values exactly, and every row "
        "must agree" if exact_kv else "breaks ties: this build's keys and values are not exact (approximate "
        "1/sqrt in the RMS norm), so only fp32 and the tie-free CQ rows are held to the tolerance"))
    for f in os.listdir(tmp):
        os.remove(os.path.join(tmp, f))
    os.rmdir(tmp)
    print("\ncheck: %s" % ("PASS" if ok else "FAIL"))
    return ok


# ------------------------------------------------------------------------------------------
# figure

def plot(json_path, out_png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(json_path) as f:
        data = json.load(f)
    rows = data["rows"]

    def series(pred):
        pts = sorted((r["bits_per_channel"], r["ppl"], r["kl"], r["type"]) for r in rows if pred(r))
        return pts

    groups = [
        ("scalar (fp16, q8, q4, q2, q1)", lambda r: r["type"] in ("fp16", "q8", "q4", "q2", "q1") and not r["window"], "o-", "C0"),
        ("KIVI", lambda r: r["type"].startswith("kivi") and not r["window"], "s-", "C1"),
        ("CQ Fisher", lambda r: r["centroids"] == "fisher" and not r["window"] and ":" not in r["type"], "^-", "C2"),
        ("CQ uniform", lambda r: r["centroids"] == "uniform" and not r["window"] and ":" not in r["type"], "v-", "C3"),
        ("CQ, keys:values of two types", lambda r: r["centroids"] and ":" in r["type"], "P", "C7"),
        ("CQ Fisher, window", lambda r: r["centroids"] == "fisher" and r["window"], "^", "C4"),
        ("CQ uniform, window", lambda r: r["centroids"] == "uniform" and r["window"], "v", "C5"),
        ("scalar/KIVI, window", lambda r: r["centroids"] is None and r["window"], "D", "C6"),
    ]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    for label, pred, style, color in groups:
        pts = series(pred)
        if not pts:
            continue
        x = [p[0] for p in pts]
        ax1.plot(x, [p[1] for p in pts], style, color=color, label=label)
        kl = [(p[0], p[2]) for p in pts if p[2] > 0]
        if kl:
            ax2.plot([a for a, _ in kl], [b for _, b in kl], style, color=color, label=label)
        for p in pts:
            ax1.annotate(p[3] + ("" if "window" not in label else "/w"), (p[0], p[1]), fontsize=7,
                         textcoords="offset points", xytext=(3, 3))
    fp32 = [r for r in rows if r["type"] == "fp32"]
    if fp32:
        ax1.axhline(fp32[0]["ppl"], color="k", ls="--", lw=0.8, label="fp32 cache (%.3f)" % fp32[0]["ppl"])
    for ax, name in ((ax1, "perplexity"), (ax2, "mean KL(p_fp32 || p_cache)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("bits per channel")
        ax.set_ylabel(name)
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=7)
    fig.suptitle("%s on %s: windows of %s tokens, %s scored" % (
        os.path.basename(data.get("model", "")), data.get("text", "?"), data.get("window_length"), data.get("tokens")))
    fig.tight_layout()
    fig.savefig(out_png, dpi=130)
    log("wrote %s" % out_png)


def summary(json_path):
    """The short table printed last by scripts/smollm_gpu.sh."""
    with open(json_path) as f:
        data = json.load(f)
    rows = data["rows"]
    ref = next((r["ppl"] for r in rows if r["id"] == "fp32"), None)
    print("%s: %d windows of %d, %d scored tokens" % (data.get("text"), data["windows"],
                                                      data["window_length"], data["tokens"]))
    print("| row | bits/channel | ppl | vs fp32 | KL |\n|---|---:|---:|---:|---:|")
    for r in rows:
        rel = "" if ref is None or r["id"] == "fp32" else "%+.1f %%" % (100 * (r["ppl"] / ref - 1))
        print("| %s | %g | %.3f | %s | %.4f |" % (r["id"], round(r["bits_per_channel"], 3), r["ppl"], rel, r["kl"]))


def objectives(paths):
    """The weighted k-means objective of every type in export.py centroids --stats files: on
    the calibration tokens (after the seeding, after some Lloyd iterations, final) and on the
    held-out tokens (Fisher-weighted, and the plain relative MSE), keys and values."""
    marks = (0, 1, 2, 5, 10, 20, 50, 100)
    print("| run | type | K/V | seeding | after 1 | 2 | 5 | 10 | 20 | 50 | 100 iterations | final "
          "| held-out | held-out plain rel. MSE | Lloyd iterations |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for path in paths:
        with open(path) as f:
            rep = json.load(f)
        run = rep["weighting"] + (", %s seeding" % rep["seeding"] if rep["weighting"] == "fisher" else "")
        for name, st in rep["types"].items():
            h = st["history"]
            for kv in range(2):
                cells = ["%.5g" % h[min(m, len(h) - 1)][kv] for m in marks]
                held = st.get("held_obj")
                print("| %s | %s | %s | %s | %.5g | %s | %s | %s |" % (
                    run, name, "KV"[kv], " | ".join(cells), st["obj"][kv],
                    "%.5g" % held[kv] if held else "-",
                    "%.4f" % (st["held_sse"][kv] / st["held_var"][kv]) if held else "-",
                    "%d..%d" % (min(st["iters"]), max(st["iters"]))))


# ------------------------------------------------------------------------------------------

def token_ids(args):
    if args.ids:
        with open(args.ids) as f:
            return [int(t) for t in f.read().split()]
    if not args.tokenizer:
        sys.exit("error: --text needs --tokenizer (or give --ids)")
    out = subprocess.run([args.run_bin, args.model, "-z", args.tokenizer, "-m", "encode", "-f", args.text],
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit("error: ./run encode failed: %s" % out.stderr.strip())
    return [int(t) for t in out.stdout.split()][1:]      # drop the BOS it prints first


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint (CQKV), e.g. smol.bin")
    ap.add_argument("--tokenizer", help="tokenizer.bin for ./run encode (with --text)")
    ap.add_argument("--text", default=DEFAULT_TEXT, help="evaluation text (default WikiText-2 test)")
    ap.add_argument("--ids", help="file of whitespace-separated token ids instead of --text")
    ap.add_argument("--centroids", nargs="+", help="centroid files or directories of *.cent files "
                    "(default: the checkpoint's directory)")
    ap.add_argument("--rows", help="comma-separated rows (default: the whole table): " + ",".join(DEFAULT_ROWS))
    ap.add_argument("--list-rows", action="store_true", help="print the default rows (comma-separated) and exit")
    ap.add_argument("--summary", metavar="RESULTS.json", help="print a short table of a --json result and exit")
    ap.add_argument("--objectives", nargs="+", metavar="STATS.json",
                    help="print the k-means objectives of export.py centroids --stats files and exit")
    ap.add_argument("--skip-missing", action="store_true", help="skip CQ rows without a centroid file")
    ap.add_argument("-l", "--length", type=int, default=2048, help="window length (2048)")
    ap.add_argument("--windows", type=int, default=0, help="evaluate the first N windows only (default all)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default all cores)")
    ap.add_argument("--json", help="write results here (with --plot: read them from here)")
    ap.add_argument("--run-bin", default=os.path.join(ROOT, "run"), help="./run binary")
    ap.add_argument("--check", action="store_true", help="compare with ./run on a sample and exit")
    ap.add_argument("--check-len", type=int, default=128, help="--check window length (128)")
    ap.add_argument("--check-windows", type=int, default=1, help="--check windows (1)")
    ap.add_argument("--flip-bound", type=float, default=0.25,
                    help="--check: relative NLL bound for rows with near-tie flips (0.25; a gross-error guard: "
                         "q1 moved by 5-10 %% between ./run and this script on 127 tokens)")
    ap.add_argument("--exact-len", type=int, default=300, help="--check: window length on the exact model (300)")
    ap.add_argument("--check-exact-only", action="store_true", help="--check: the exact model only")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="--check: ./run processes at once")
    ap.add_argument("--tol", type=float, default=1e-5, help="--check relative tolerance (1e-5)")
    ap.add_argument("--kl-floor", type=float, default=1e-3,
                    help="--check: KL differences are relative to max(kl, this) (1e-3)")
    ap.add_argument("--plot", metavar="OUT.png", help="plot the --json results and exit")
    args = ap.parse_args()

    if args.list_rows:
        print(",".join(DEFAULT_ROWS))
        return
    if args.summary:
        summary(args.summary)
        return
    if args.objectives:
        objectives(args.objectives)
        return
    if args.plot:
        if not args.json:
            sys.exit("error: --plot needs --json RESULTS")
        plot(args.json, args.plot)
        return
    if not args.model:
        sys.exit("error: --model is required")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if hasattr(torch, "set_float32_matmul_precision"):
        torch.set_float32_matmul_precision("highest")
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg, w = load_checkpoint(args.model)
    rows, seen = [], set()
    for spec in (args.rows.split(",") if args.rows else DEFAULT_ROWS):
        try:
            r = Row(spec.strip())
        except ValueError as e:
            sys.exit("error: --rows: %s" % e)
        if r.id not in seen:
            seen.add(r.id)
            rows.append(r)
    cents = find_centroids(args.centroids or [os.path.dirname(os.path.abspath(args.model))], cfg, fingerprint(w))
    keep = []
    for r in rows:
        missing = [(c, b) for c, b in r.cqs if (c, b, r.weighting) not in cents]
        if missing:
            msg = "no %s centroid file for %s (%dc%db) among %s" % (
                r.weighting, r.id, *missing[0], args.centroids or "the checkpoint's directory")
            if args.skip_missing:
                log("skipping " + msg)
                continue
            sys.exit("error: " + msg)
        for c, b in r.cqs:
            r.files[(c, b)] = cents[(c, b, r.weighting)]["path"]
        keep.append(r)
    rows = keep
    ids = token_ids(args)
    log("%s: %d layers, dim %d, %d/%d heads x %d; %d ids; device %s" % (
        args.model, cfg["n_layers"], cfg["dim"], cfg["n_heads"], cfg["n_kv_heads"], cfg["head_size"],
        len(ids), args.device))
    ev = Evaluator(cfg, w, args.device)

    if args.check:
        sys.exit(0 if check(args, cfg, ev, rows, ids) else 1)

    wins = windows_of(ids, args.length, cfg["bos_id"])
    if args.windows:
        wins = wins[:args.windows]
    t0 = time.time()
    totals = evaluate(ev, rows, wins)
    res = results(cfg, rows, totals)
    print(markdown(res))
    el = time.time() - t0
    log("%d windows, %.1f s (%.2f s per window)" % (len(wins), el, el / max(len(wins), 1)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=os.path.abspath(args.model), text=os.path.basename(args.ids or args.text),
                           window_length=args.length, windows=len(wins),
                           tokens=sum(len(t) for _, t in wins), device=str(ev.dev),
                           torch=torch.__version__, seconds=el, rows=res), f, indent=1)
        log("wrote %s" % args.json)


if __name__ == "__main__":
    main()
