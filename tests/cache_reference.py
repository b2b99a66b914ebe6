#!/usr/bin/python3
"""Independent numpy reference of run.c's quantized KV caches (tests/test_cache.py).

Written from README.md, ../shared/docs/CQ.md and the cache semantics documented in run.c's
section "5. The KV cache"; it shares no code with run.c.  The model around the cache is the
float64 maths of reference.py, token by token; every quantizer works in float32 the way the
C code does, and every token, the current one included, is read back THROUGH the cache.

What each type stores (kv vector = n_kv_heads*head_size channels; keys rotated by RoPE before
they are stored, except for CQ, which codes the pre-RoPE key and rotates the decoded
centroid to the key's position when it is read):
  fp32, fp16                 the vector, or its IEEE half rounding
  q8                         blocks of 32 channels: scale = half(absmax/127), int8 codes
  q4 q2 q1                   blocks of 32 channels: half scale and half minimum, 4/2/1-bit codes
  kivi4 kivi2                keys per channel over blocks of 32 positions (quantized when the
                             block's last position arrives, full precision until then),
                             values as q4 / q2
  cq<c>c<b>b                 per group of c channels the index of the nearest of 2^b centroids
With a window of N (-w N) the newest N positions (t > pos - N) are read in full precision.

Quantization decisions (a rounding to half, a code, a nearest centroid) can flip between two
programs whose inputs differ in the last bits.  The reference records each decision that lies
closer than THRESHOLD to its boundary (the distance is expressed as the perturbation of the
input, relative to the largest magnitude of the vector it came from) together with the other
choice, and `match_logits` uses them to explain a mismatching logits row by such a near-tie
flip, never by loosening the tolerance.
"""

import math
import re
import struct

import numpy as np

import reference as R

F32 = np.float32
QBLOCK = 32
THRESHOLD = 1e-4      # near-tie: the input would have to move by less than this (relative)

CQCB_MAGIC = 0x42435143  # bytes "CQCB"
CQCB_VERSION = 1
CQCB_HEADER_BYTES = 64

SCALAR_BITS = {"q8": 8, "q4": 4, "q2": 2, "q1": 1, "kivi4": 4, "kivi2": 2}
NAMED_CQ = {"cq4": (2, 8), "cq2": (4, 8), "cq1": (8, 8)}
PLAIN_TYPES = ("fp32", "fp16", "q8", "q4", "q2", "q1", "kivi4", "kivi2")


# ----------------------------------------------------------------------------
# cache types

class KVType:
    def __init__(self, name, kind, c=0, b=0):
        self.name, self.kind, self.c, self.b = name, kind, c, b

    @property
    def is_cq(self):
        return self.kind == "cq"

    @property
    def n_centroids(self):
        return 1 << self.b

    def __repr__(self):
        return "KVType(%s)" % self.name


def parse_type(name):
    """One type name -> KVType (ValueError for anything run.c rejects by name)."""
    if name in PLAIN_TYPES:
        return KVType(name, name)
    if name in NAMED_CQ:
        c, b = NAMED_CQ[name]
        return KVType(name, "cq", c, b)
    m = re.fullmatch(r"cq(\d+)c(\d+)b", name)
    if not m:
        raise ValueError("unknown type %r" % name)
    c, b = int(m.group(1)), int(m.group(2))
    if c < 1 or c & (c - 1) or not 1 <= b <= 16:
        raise ValueError("bad CQ type %r" % name)
    return KVType(name, "cq", c, b)


def parse_spec(spec):
    """"K" or "K:V" -> (key type, value type)."""
    k, _, v = spec.partition(":")
    return parse_type(k), parse_type(v if v else k)


def type_bits(t):
    """Bits per channel of a stored token (scales and minima included)."""
    if t.is_cq:
        return t.b / t.c
    return {"fp32": 32.0, "fp16": 16.0, "q8": 8.0 + 16.0 / QBLOCK, "q4": 5.0, "kivi4": 5.0,
            "q2": 3.0, "kivi2": 3.0, "q1": 2.0}[t.kind]


def spec_bits(spec):
    k, v = parse_spec(spec)
    return (type_bits(k) + type_bits(v)) / 2


def spec_bytes_per_token(spec, cfg):
    """Cache bytes per token over all layers, keys and values (codebooks, window excluded)."""
    k, v = parse_spec(spec)
    kv_dim = cfg["n_kv_heads"] * cfg["head_size"]
    return (type_bits(k) + type_bits(v)) / 8.0 * kv_dim * cfg["n_layers"]


# ----------------------------------------------------------------------------
# centroid files ("CQCB" version 1, README.md)

def fingerprint(w):
    """Sum mod 2^64 of the layer-0 wk tensor read as little-endian uint32 words."""
    words = np.ascontiguousarray(w["wk"][0], dtype="<f4").view("<u4")
    return int(words.astype(np.uint64).sum(dtype=np.uint64))


def n_groups(cfg, c):
    return cfg["n_kv_heads"] * cfg["head_size"] // c


def random_codebooks(cfg, c, b, seed, scale=1.0):
    """(L, 2, G, 2^b, c) float32 standard normal centroids (times scale)."""
    rng = np.random.default_rng(seed)
    shape = (cfg["n_layers"], 2, n_groups(cfg, c), 1 << b, c)
    return (scale * rng.standard_normal(shape)).astype(F32)


def centroid_header(n_layers, n_kv_heads, head_size, c, b, fp, weighting=0, n_tokens=0,
                    magic=CQCB_MAGIC, version=CQCB_VERSION):
    h = struct.pack("<Iiiiiiiiq", magic, version, n_layers, n_kv_heads, head_size, c, b,
                    weighting, n_tokens)
    h += struct.pack("<Q", fp % (1 << 64))
    assert len(h) == 48
    return h + b"\0" * (CQCB_HEADER_BYTES - len(h))


def write_centroids(path, cfg, w, c, b, codebooks, **header):
    """Write a centroid file for model (cfg, w); header fields can be overridden
    (n_layers, n_kv_heads, head_size, c, b, fp, weighting, n_tokens, magic, version)."""
    cb = np.ascontiguousarray(codebooks, dtype="<f4")
    assert cb.shape == (cfg["n_layers"], 2, n_groups(cfg, c), 1 << b, c), cb.shape
    fields = dict(n_layers=cfg["n_layers"], n_kv_heads=cfg["n_kv_heads"],
                  head_size=cfg["head_size"], c=c, b=b, fp=fingerprint(w))
    fields.update(header)
    with open(path, "wb") as f:
        f.write(centroid_header(**fields))
        f.write(cb.tobytes())


def default_centroid_path(model_path, c, b):
    s = str(model_path)
    if len(s) > 4 and s.endswith(".bin"):
        s = s[:-4]
    return "%s.%dc%db.cent" % (s, c, b)


# ----------------------------------------------------------------------------
# float32 building blocks

def rope_table(cfg):
    """cos, sin (seq_len, hs/2) float32, from the float expressions of llama2.c:
    freq = 1.0f / powf(theta, (2*i) / (float)hs); angle = t * freq; cosf(angle), sinf(angle)."""
    hs, S = cfg["head_size"], cfg["seq_len"]
    theta = F32(cfg["rope_theta"])
    i = np.arange(hs // 2)
    expo = (2 * i).astype(F32) / F32(hs)                               # float32 division
    powf = (np.float64(theta) ** expo.astype(np.float64)).astype(F32)   # rounded power
    freq = F32(1.0) / powf
    angle = np.arange(S).astype(F32)[:, None] * freq[None, :]          # float32 product
    return (np.cos(angle.astype(np.float64)).astype(F32),
            np.sin(angle.astype(np.float64)).astype(F32))


def rope_f32(x, cos_t, sin_t):
    """Rotate a kv vector (float32, heads of hs channels back to back) to one position;
    pairs (2i, 2i+1) of each head, in float32."""
    half = cos_t.shape[0]
    v = np.asarray(x, dtype=F32).reshape(-1, half, 2)
    a, b = v[:, :, 0], v[:, :, 1]
    out = np.empty_like(v)
    out[:, :, 0] = a * cos_t - b * sin_t
    out[:, :, 1] = a * sin_t + b * cos_t
    return out.reshape(-1)


def round_away(r):
    """C roundf (halfway cases away from zero), exact in float32."""
    t = np.trunc(r)
    frac = np.abs(r - t)
    return t + np.where(frac >= F32(0.5), np.sign(r), F32(0.0)).astype(r.dtype)


class Decisions:
    """Collects near-tie decisions and applies forced choices (overrides: id -> choice)."""

    def __init__(self, overrides=None, threshold=THRESHOLD):
        self.overrides = dict(overrides or {})
        self.threshold = threshold
        self.near = []    # (margin, id, alternative)

    def choose(self, did, default, alt, margin):
        if alt is not None and margin < self.threshold:
            self.near.append((float(margin), did, alt))
        return self.overrides.get(did, default)


def half_round(v, did, per_unit, dec):
    """IEEE half of the float32 v, as a decision.  per_unit converts a change of v into the
    relative input perturbation used for margins."""
    v = F32(v)
    h = np.float16(v)
    hv = F32(h)
    alt = None
    margin = np.inf
    if hv != v and np.isfinite(hv):
        other = np.nextafter(h, np.float16(np.inf) if v > hv else np.float16(-np.inf))
        if np.isfinite(other):
            mid = (float(hv) + float(other)) / 2
            margin = abs(float(v) - mid) * per_unit
            alt = other
    return np.float16(dec.choose(did, h, alt, margin))


def _code_decisions(r, code, lo_code, hi_code, unit, did, dec):
    """Per-element rounding decisions of r -> code: each element whose r lies within the
    threshold of a rounding boundary gets the other rounding as its alternative.
    unit: input perturbation (relative) per unit of r."""
    frac = np.abs(r - np.trunc(r)).astype(np.float64)
    margin = np.abs(frac - 0.5) * unit
    idx = set(np.nonzero(margin < dec.threshold)[0].tolist())
    if dec.overrides:     # a forced choice applies even where this run's margin is larger
        for key in dec.overrides:
            if key[:-1] == did and isinstance(key[-1], int):
                idx.add(key[-1])
    for i in sorted(idx):
        fl = math.floor(float(r[i]))
        a, b2 = fl, fl + 1
        c0 = int(code[i])
        alt = min(max(b2 if c0 == a else a, lo_code), hi_code)
        code[i] = dec.choose(did + (i,), c0, alt if alt != c0 else None, margin[i])
    return code


def quantize_q8(x, did, mag, dec):
    """Symmetric 8-bit block (n <= 32 float32 values) -> dequantized float32 values."""
    amax = np.max(np.abs(x))
    scale = half_round(amax / F32(127.0), did + ("scale",), 127.0 / mag, dec)
    s = F32(scale)
    inv = F32(1.0) / s if s > 0 else F32(0.0)
    r = (x * inv).astype(F32)
    code = np.clip(round_away(r), -127, 127).astype(np.int64)
    code = _code_decisions(r, code, -127, 127, float(s) / mag, did + ("code",), dec)
    return (s * code.astype(F32)).astype(F32)


def quantize_asym(x, bits, did, mag, dec):
    """Asymmetric block of `bits`-bit codes (n <= 32 float32 values, any stride done by
    the caller) -> dequantized float32 values."""
    levels = (1 << bits) - 1
    lo, hi = np.min(x), np.max(x)
    scale = half_round((hi - lo) / F32(levels), did + ("scale",), levels / mag, dec)
    mn = half_round(lo, did + ("min",), 1.0 / mag, dec)
    s, m = F32(scale), F32(mn)
    inv = F32(1.0) / s if s > 0 else F32(0.0)
    r = ((x - m) * inv).astype(F32)
    code = np.clip(round_away(r), 0, levels).astype(np.int64)
    code = _code_decisions(r, code, 0, levels, float(s) / mag, did + ("code",), dec)
    return (m + s * code.astype(F32)).astype(F32)


def quantize_row(x, kind, did, dec):
    """A q8/q4/q2/q1 (or KIVI value) row: blocks of 32 consecutive channels."""
    bits = SCALAR_BITS[kind]
    mag = max(float(np.max(np.abs(x))), 1e-30)
    out = np.empty_like(x)
    for b0 in range(0, x.shape[0], QBLOCK):
        blk = x[b0:b0 + QBLOCK]
        bd = did + (b0 // QBLOCK,)
        out[b0:b0 + QBLOCK] = (quantize_q8(blk, bd, mag, dec) if bits == 8
                               else quantize_asym(blk, bits, bd, mag, dec))
    return out


def cq_encode(x, cb, did, mag, dec):
    """x (G, c) float32, cb (G, K, c) float32 -> codes (G,) of the nearest centroids
    (argmin ||C||^2 - 2 x.C, first index on ties)."""
    cb64 = cb.astype(np.float64)
    G, K = cb.shape[0], cb.shape[1]
    d = np.einsum("gkc,gkc->gk", cb64, cb64) - 2.0 * np.einsum("gc,gkc->gk", x.astype(np.float64), cb64)
    codes = np.argmin(d, axis=1)                  # first index among equal minima
    if K == 1:
        return codes
    g = np.arange(G)
    best = codes
    d2 = d.copy()
    d2[g, best] = np.inf
    second = np.argmin(d2, axis=1)
    gap = d[g, second] - d[g, best]
    # x must move by about gap / (2 |C_best - C_second|) to swap the two
    dist = np.linalg.norm(cb64[g, best] - cb64[g, second], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        margin = np.where(dist > 0, gap / (2.0 * dist * mag), np.inf)
    todo = set(np.nonzero(margin < dec.threshold)[0].tolist())
    if dec.overrides:
        todo.update(key[-1] for key in dec.overrides if key[:-1] == did)
    for gi in sorted(todo):
        alt = int(second[gi]) if dist[gi] > 0 else None
        codes[gi] = dec.choose(did + (gi,), int(codes[gi]), alt, margin[gi])
    return codes


# ----------------------------------------------------------------------------
# one store (keys or values)

class Store:
    def __init__(self, t, is_key, cfg, window, codebooks, cos, sin, dec):
        """codebooks: (L, G, K, c) float32 of this side (CQ only)."""
        self.t, self.is_key, self.dec = t, is_key, dec
        self.cos, self.sin = cos, sin
        L, S = cfg["n_layers"], cfg["seq_len"]
        self.KD = cfg["n_kv_heads"] * cfg["head_size"]
        self.window = window if t.kind != "fp32" else 0
        self.full = np.zeros((L, S, self.KD), F32)   # fp32 (keys rotated): window, KIVI recent
        self.deq = np.zeros((L, S, self.KD), F32)    # what the quantized storage reads back
        self.codebooks = codebooks
        self.codes = {}                               # (layer, pos) -> CQ codes

    def put(self, layer, pos, x, did):
        """x: float32 kv vector (keys before RoPE)."""
        t, dec = self.t, self.dec
        rot = rope_f32(x, self.cos[pos], self.sin[pos]) if self.is_key else x.astype(F32)
        self.full[layer, pos] = rot
        if t.kind == "fp32":
            self.deq[layer, pos] = rot
        elif t.kind == "fp16":
            self.deq[layer, pos] = rot.astype(np.float16).astype(F32)
        elif t.is_cq:
            cb = self.codebooks[layer]                       # (G, K, c)
            G = cb.shape[0]
            mag = max(float(np.max(np.abs(x))), 1e-30)
            codes = cq_encode(x.reshape(G, t.c).astype(F32), cb, did, mag, dec)
            self.codes[(layer, pos)] = codes
            decoded = cb[np.arange(G), codes].reshape(-1)
            self.deq[layer, pos] = (rope_f32(decoded, self.cos[pos], self.sin[pos])
                                    if self.is_key else decoded)
        elif t.kind.startswith("kivi") and self.is_key:
            if pos % QBLOCK == QBLOCK - 1:                   # the block is complete
                blk = self.full[layer, pos - QBLOCK + 1:pos + 1]      # (32, KD)
                mag = max(float(np.max(np.abs(blk))), 1e-30)
                bits = SCALAR_BITS[t.kind]
                for ch in range(self.KD):
                    self.deq[layer, pos - QBLOCK + 1:pos + 1, ch] = quantize_asym(
                        blk[:, ch].copy(), bits, did + ("kivi", ch), mag, dec)
        else:
            self.deq[layer, pos] = quantize_row(rot, t.kind, did, dec)

    def read(self, layer, pos):
        """(pos+1, KD) float32: what attention at `pos` reads for positions 0..pos."""
        n = pos + 1
        out = self.deq[layer, :n].copy()
        if self.t.kind.startswith("kivi") and self.is_key:
            done = (n // QBLOCK) * QBLOCK           # positions of finished blocks
            out[done:] = self.full[layer, done:n]
        if self.window:
            lo = max(0, pos - self.window + 1)
            out[lo:] = self.full[layer, lo:n]
        return out


# ----------------------------------------------------------------------------
# the decode loop

class CacheDecoder:
    """Token-at-a-time forward pass (float64 model) through a quantized KV cache."""

    def __init__(self, cfg, w64, ktype, vtype, window=0, codebooks=None, dec=None, rope=None,
                 capture=False):
        """w64: float64 weights (dict).  codebooks: (L, 2, G, K, c) float32 for a CQ side
        (a dict {'k': ..., 'v': ...} when keys and values use different CQ configurations)."""
        self.cfg, self.w = cfg, w64
        self.dec = dec if dec is not None else Decisions()
        cos, sin = rope if rope is not None else rope_table(cfg)
        self.cos, self.sin = cos, sin

        def side(t, i):
            if not t.is_cq:
                return None
            cb = codebooks[("k", "v")[i]] if isinstance(codebooks, dict) else codebooks
            return np.asarray(cb[:, i], dtype=F32)

        self.k = Store(ktype, True, cfg, window, side(ktype, 0), cos, sin, self.dec)
        self.v = Store(vtype, False, cfg, window, side(vtype, 1), cos, sin, self.dec)
        self.cls = w64["token_embedding"] if cfg["shared_classifier"] else w64["classifier"]
        self.pos = 0
        self.capture = capture
        self.captured = []       # (pos, layer, k pre-RoPE float32, v float32)
        self.tag = 0             # row number prefix of decision ids

    def step(self, token):
        cfg, w = self.cfg, self.w
        H, KVH, hs = cfg["n_heads"], cfg["n_kv_heads"], cfg["head_size"]
        eps, pos, group = cfg["norm_eps"], self.pos, H // KVH
        cq = self.cos[pos].astype(np.float64)
        sq = self.sin[pos].astype(np.float64)
        x = w["token_embedding"][token].copy()
        for l in range(cfg["n_layers"]):
            h = R.rmsnorm(x, w["attn_norm"][l], eps)
            q = (w["wq"][l] @ h).reshape(H, hs // 2, 2)
            qr = np.empty_like(q)
            qr[:, :, 0] = q[:, :, 0] * cq - q[:, :, 1] * sq
            qr[:, :, 1] = q[:, :, 0] * sq + q[:, :, 1] * cq
            qr = qr.reshape(H, hs)
            k = (w["wk"][l] @ h).astype(F32)
            v = (w["wv"][l] @ h).astype(F32)
            if self.capture:
                self.captured.append((pos, l, k.copy(), v.copy()))
            self.k.put(l, pos, k, (self.tag, l, "k"))
            self.v.put(l, pos, v, (self.tag, l, "v"))
            K = self.k.read(l, pos).astype(np.float64).reshape(pos + 1, KVH, hs)
            V = self.v.read(l, pos).astype(np.float64).reshape(pos + 1, KVH, hs)
            Kh = np.repeat(K, group, axis=1)                # query head j reads kv head j//group
            Vh = np.repeat(V, group, axis=1)
            s = np.einsum("thd,hd->ht", Kh, qr) / math.sqrt(hs)
            s -= s.max(axis=1, keepdims=True)
            p = np.exp(s)
            p /= p.sum(axis=1, keepdims=True)
            att = np.einsum("ht,thd->hd", p, Vh).reshape(H * hs)
            x = x + w["wo"][l] @ att
            h = R.rmsnorm(x, w["ffn_norm"][l], eps)
            a = w["w1"][l] @ h
            b = w["w3"][l] @ h
            x = x + w["w2"][l] @ ((a / (1.0 + np.exp(-a))) * b)
        x = R.rmsnorm(x, w["final_norm"], eps)
        self.pos += 1
        return self.cls @ x


def to64(w):
    return {k: np.asarray(v, dtype=np.float64) for k, v in w.items()}


def ppl_logits(cfg, w, stream, spec, L=None, window=0, codebooks=None, overrides=None,
               capture=False, w64=None, rope=None):
    """The logits rows run.c's ppl mode writes (--logits) for a token stream, windows of
    length L, cache type spec ("K" or "K:V").  Returns (rows float64, Decisions, captured)
    where captured lists (row, layer, k, v) when capture is set."""
    if L is None:
        L = cfg["seq_len"]
    ktype, vtype = parse_spec(spec)
    w64 = w64 if w64 is not None else to64(w)
    rope = rope if rope is not None else rope_table(cfg)
    dec = Decisions(overrides)
    rows, captured = [], []
    row = 0
    for win in R.ppl_windows(stream, L, cfg["bos_id"]):
        d = CacheDecoder(cfg, w64, ktype, vtype, window, codebooks, dec, rope, capture)
        for tok in win:
            d.tag = row
            rows.append(d.step(tok))
            row += 1
        captured += [(row - len(win) + p, l, k, v) for (p, l, k, v) in d.captured]
    return np.array(rows), dec, captured


# ----------------------------------------------------------------------------
# comparison that tells float noise on a near tie from a real difference

def row_errors(got, ref):
    """Per row: max |got - ref| / max |ref|."""
    return np.max(np.abs(got - ref), axis=1) / np.maximum(np.max(np.abs(ref), axis=1), 1e-30)


def match_logits(got, compute, tol, max_flips=6, max_tries=16, exact_ties=False):
    """Compares the program's logits `got` with the reference compute(overrides) ->
    (rows, Decisions).  When a row differs by more than tol, the near-tie decisions made
    at or before that row are flipped one at a time (smallest margin first); a flip is kept
    when it moves the first bad row later.  exact_ties: the inputs are exact (both programs
    quantize the same numbers), so a decision exactly on its boundary (margin 0: a true tie)
    is never flipped, it must go the documented way.  Returns (ref_rows, flips,
    first_bad_row or None); flips lists (decision id, margin) of the accepted flips."""
    overrides = {}
    ref, dec = compute(overrides)[:2]
    if ref.shape != got.shape:
        return ref, [], 0
    flips = []

    def first_bad(r):
        bad = np.nonzero(row_errors(got, r) > tol)[0]
        return int(bad[0]) if len(bad) else None

    bad = first_bad(ref)
    while bad is not None and len(flips) < max_flips:
        cands = sorted((m, did, alt) for (m, did, alt) in dec.near
                       if did[0] <= bad and did not in overrides
                       and not (exact_ties and m == 0))[:max_tries]
        for m, did, alt in cands:
            ov = dict(overrides)
            ov[did] = alt
            ref2, dec2 = compute(ov)[:2]
            bad2 = first_bad(ref2)
            if bad2 is None or bad2 > bad:
                overrides, ref, dec, bad = ov, ref2, dec2, bad2
                flips.append((did, m))
                break
        else:
            break
    return ref, flips, bad


# ----------------------------------------------------------------------------
# models whose keys and values are exact in float32

EXACT_EPS = 2.0 ** 40


def exact_kv_model(seed, dim, n_layers, n_heads, n_kv_heads, head_size, vocab_size, seq_len,
                   hidden_dim=None):
    """A random model whose keys and values are computed without any rounding, in any
    order of summation, so that a C program and this reference quantize the very same
    numbers (only the RoPE rotation of keys can differ in the last bit).

    How: norm_eps = 2^40, so that mean(x^2) + eps is exactly 2^40 in float32 and every RMS
    norm is an exact scaling by 2^-20.  The residual stream is split into halves: the first
    holds the embedding (entries +-1) and is never written again (the rows of wo and w2
    that would write it are zero); the second receives the attention and feed-forward
    outputs.  wk and wv read only the first half, with small dyadic weights (a multiple of
    2^16 times an integer in [-8, 8]) and power-of-two norm weights, so keys and values
    are short dyadic numbers: exact.  Queries, the feed-forward block and the classifier
    read everything, so every layer's attention (and so every layer's cache) reaches the
    logits; keys and values depend on the token only, not on its context."""
    D = dim
    F = hidden_dim or 2 * D
    cfg, w = R.random_model(seed, D, F, n_layers, n_heads, n_kv_heads, vocab_size, seq_len,
                            head_size=head_size, shared_classifier=False, norm_eps=EXACT_EPS)
    rng = np.random.default_rng(seed + 7919)
    A = D // 2
    big = 2.0 ** 20
    H, KVH, hs, V = n_heads, n_kv_heads, head_size, vocab_size
    w["token_embedding"][:, :A] = rng.choice([-1.0, 1.0], size=(V, A))
    w["token_embedding"][:, A:] = 0.5 * rng.standard_normal((V, D - A))
    for l in range(n_layers):
        w["attn_norm"][l, :A] = 2.0 ** rng.integers(-1, 2, size=A)
        for name in ("wk", "wv"):
            m = np.zeros((KVH * hs, D))
            m[:, :A] = rng.integers(-8, 9, size=(KVH * hs, A)) * 2.0 ** 16
            w[name][l] = m
        w["wq"][l] = rng.standard_normal((H * hs, D)) * big / math.sqrt(D)
        w["wo"][l, :A] = 0.0
        w["w1"][l] = rng.standard_normal((F, D)) * big / math.sqrt(D)
        w["w3"][l] = rng.standard_normal((F, D)) * big / math.sqrt(D)
        w["w2"][l] *= 0.25           # keeps the residual stream (not normalized here) small
        w["w2"][l, :A] = 0.0
    w["classifier"] = (rng.standard_normal((V, D)) * 2.0 * big / math.sqrt(D))
    w = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in w.items()}
    return cfg, w


def tie_model(seed, bits, dim=32, n_heads=2, n_kv_heads=2, head_size=16, vocab_size=64,
              seq_len=48):
    """A one-layer exact_kv_model whose VALUES put many quantization codes exactly halfway
    between two levels, for the scalar types of `bits` bits (8: q8, else q4/q2/q1 and
    KIVI values): ties must go away from zero (roundf), as run.c documents.

    Values are integers times u = 1/128 (the embedding's first column is +1 for every token,
    so it acts as a bias).  Per block of 32 channels:
      8 bits: channel 0 is 254u, so scale = half(254u/127) = 1/64 exactly; the other channels
              are odd multiples of u below it, so x / scale = odd / 2.
      else:   channel 0 is the minimum lo, channel 1 lo + 2u*levels, so scale = 2u = 1/64
              and min = lo exactly; the others are lo + odd multiples of u: (x - min)/scale
              = odd / 2."""
    cfg, w = exact_kv_model(seed, dim, 1, n_heads, n_kv_heads, head_size, vocab_size, seq_len)
    rng = np.random.default_rng(seed + 104729)
    A = dim // 2
    KD = n_kv_heads * head_size
    w["token_embedding"][:, 0] = 1.0
    w["attn_norm"][0, :A] = 1.0
    # h_i = 2^-20 s_i (s_0 = 1); wv entries n * 2^13 give v = sum_i n_i s_i / 128
    n = np.zeros((KD, dim))
    levels = (1 << bits) - 1
    for b0 in range(0, KD, QBLOCK):
        nb = min(QBLOCK, KD - b0)
        if bits == 8:
            n[b0, 0] = 254
            for j in range(b0 + 1, b0 + nb):
                n[j, 0] = 2 * rng.integers(-75, 75) + 1           # odd, |.| <= 149
                cols = rng.choice(np.arange(1, A), size=4, replace=False)
                n[j, cols] = 2 * rng.integers(-2, 3, size=4)      # even, |sum| <= 32
        else:
            lo = 2 * rng.integers(-20, 20)
            n[b0, 0] = lo
            n[b0 + 1, 0] = lo + 2 * levels
            for j in range(b0 + 2, b0 + nb):
                if levels == 1:
                    n[j, 0] = lo + 1
                    continue
                o = 2 * rng.integers(0, levels) + 1                 # odd in [1, 2 levels - 1]
                n[j, 0] = lo + o
                room = min(o - 1, 2 * levels - 1 - o) // 2          # keep it inside (lo, hi)
                if room > 0:
                    col = rng.integers(1, A)
                    n[j, col] = 2 * rng.integers(0, room + 1)
    w["wv"][0] = (n * 2.0 ** 13).astype(np.float32)
    return cfg, w
