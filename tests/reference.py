#!/usr/bin/python3
"""Independent numpy reference for the C inference program (run.c).

Everything here is written from the format descriptions in README.md and
../shared/docs/llama2c-compat.md; it shares no code with run.c.

Contents
  * checkpoint I/O: the legacy llama2.c layout (7 int32 header, negative vocab
    = separate classifier) and the project's "CQKV" version-1 layout
  * random_model(): small random checkpoints for tests, and a fast streaming
    writer (write_random_checkpoint) for benchmark-size models
  * forward(): full causal forward pass over a token sequence in float64,
    returning the logits of every position; greedy generation; perplexity
  * the llama2.c tokenizer (load, encode, decode, safe-print rules) and
    random_tokenizer()
  * llama2.c's sampler (xorshift* RNG, multinomial, top-p)
  * a CLI:  make-model OUT.bin [...]   and   make-tokenizer OUT.bin --vocab N

Usage: /usr/bin/python3 tests/reference.py make-model OUT.bin --dim 576 \
          --hidden 1536 --layers 30 --heads 9 --kv-heads 3 --vocab 49152 \
          --seq-len 16384 [--legacy] [--seed N]
"""

import argparse
import math
import os
import struct
import sys

import numpy as np

CQKV_MAGIC = 0x564B5143  # bytes "CQKV" little-endian
CQKV_VERSION = 1
CQKV_HEADER_BYTES = 256

# order of the tensors in both layouts (legacy puts RoPE tables before the classifier)
LAYER_TENSORS = ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3")


# ----------------------------------------------------------------------------
# configuration and shapes

def make_config(dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len,
                head_size=None, rope_theta=10000.0, norm_eps=1e-5, bos_id=1, eos_id=2,
                shared_classifier=True, tokenizer_kind=0, chat_template=0):
    """Build a config dict; float fields are rounded to float32 as they are stored."""
    if head_size is None:
        if dim % n_heads:
            raise ValueError("dim must be divisible by n_heads when head_size is not given")
        head_size = dim // n_heads
    return dict(dim=int(dim), hidden_dim=int(hidden_dim), n_layers=int(n_layers),
                n_heads=int(n_heads), n_kv_heads=int(n_kv_heads),
                vocab_size=int(vocab_size), seq_len=int(seq_len), head_size=int(head_size),
                rope_theta=float(np.float32(rope_theta)), norm_eps=float(np.float32(norm_eps)),
                bos_id=int(bos_id), eos_id=int(eos_id),
                shared_classifier=bool(shared_classifier),
                tokenizer_kind=int(tokenizer_kind), chat_template=int(chat_template))


def tensor_shapes(cfg):
    """Ordered list of (name, shape) of the stored weight tensors (no RoPE tables)."""
    D, F, L = cfg["dim"], cfg["hidden_dim"], cfg["n_layers"]
    H, KVH, hs, V = cfg["n_heads"], cfg["n_kv_heads"], cfg["head_size"], cfg["vocab_size"]
    shapes = [
        ("token_embedding", (V, D)),
        ("attn_norm", (L, D)),
        ("wq", (L, H * hs, D)),
        ("wk", (L, KVH * hs, D)),
        ("wv", (L, KVH * hs, D)),
        ("wo", (L, D, H * hs)),
        ("ffn_norm", (L, D)),
        ("w1", (L, F, D)),
        ("w2", (L, D, F)),
        ("w3", (L, F, D)),
        ("final_norm", (D,)),
    ]
    if not cfg["shared_classifier"]:
        shapes.append(("classifier", (V, D)))
    return shapes


def legacy_compatible(cfg):
    return (cfg["head_size"] * cfg["n_heads"] == cfg["dim"]
            and cfg["rope_theta"] == 10000.0
            and cfg["norm_eps"] == float(np.float32(1e-5))
            and cfg["bos_id"] == 1 and cfg["eos_id"] == 2
            and cfg["tokenizer_kind"] == 0 and cfg["chat_template"] == 0)


def classifier(cfg, w):
    return w["token_embedding"] if cfg["shared_classifier"] else w["classifier"]


# ----------------------------------------------------------------------------
# checkpoint headers

def legacy_header(cfg):
    if not legacy_compatible(cfg):
        raise ValueError("config cannot be expressed in the legacy llama2.c format")
    v = cfg["vocab_size"] if cfg["shared_classifier"] else -cfg["vocab_size"]
    return struct.pack("<7i", cfg["dim"], cfg["hidden_dim"], cfg["n_layers"], cfg["n_heads"],
                       cfg["n_kv_heads"], v, cfg["seq_len"])


def cqkv_header(cfg, magic=CQKV_MAGIC, version=CQKV_VERSION):
    h = struct.pack("<Ii8iffiiiii", magic, version,
                    cfg["dim"], cfg["hidden_dim"], cfg["n_layers"], cfg["n_heads"],
                    cfg["n_kv_heads"], cfg["vocab_size"], cfg["seq_len"], cfg["head_size"],
                    cfg["rope_theta"], cfg["norm_eps"], cfg["bos_id"], cfg["eos_id"],
                    1 if cfg["shared_classifier"] else 0, cfg["tokenizer_kind"],
                    cfg["chat_template"])
    assert len(h) == 68
    return h + b"\0" * (CQKV_HEADER_BYTES - len(h))


def rope_tables(cfg):
    """The two obsolete (seq_len, head_size/2) tables of the legacy format (cos, sin)."""
    hs = cfg["head_size"]
    freqs = 1.0 / (10000.0 ** (np.arange(0, hs, 2, dtype=np.float64)[: hs // 2] / hs))
    ang = np.outer(np.arange(cfg["seq_len"], dtype=np.float64), freqs)
    return np.cos(ang).astype("<f4"), np.sin(ang).astype("<f4")


# ----------------------------------------------------------------------------
# checkpoint reading / writing

def write_checkpoint(path, cfg, w, legacy=False):
    """Write weights `w` (dict of arrays, shapes as tensor_shapes) in either format."""
    with open(path, "wb") as f:
        f.write(legacy_header(cfg) if legacy else cqkv_header(cfg))
        for name, shape in tensor_shapes(cfg):
            if name == "classifier" and legacy:
                continue
            a = np.asarray(w[name])
            if a.shape != shape:
                raise ValueError("%s: shape %s, expected %s" % (name, a.shape, shape))
            f.write(np.ascontiguousarray(a, dtype="<f4").tobytes())
        if legacy:
            c, s = rope_tables(cfg)
            f.write(c.tobytes())
            f.write(s.tobytes())
            if not cfg["shared_classifier"]:
                f.write(np.ascontiguousarray(w["classifier"], dtype="<f4").tobytes())


def read_checkpoint(path):
    """Read a checkpoint in either format.  Returns (cfg, weights); weights are float32."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 28:
        raise ValueError("file too small for a header")
    magic = struct.unpack_from("<I", data, 0)[0]
    if magic == CQKV_MAGIC:
        if len(data) < CQKV_HEADER_BYTES:
            raise ValueError("truncated CQKV header")
        (_, version, dim, hidden, L, H, KVH, V, S, hs, theta, eps, bos, eos, shared, tk,
         ct) = struct.unpack_from("<Ii8iffiiiii", data, 0)
        if version != CQKV_VERSION:
            raise ValueError("unsupported CQKV version %d" % version)
        cfg = make_config(dim, hidden, L, H, KVH, V, S, head_size=hs, rope_theta=theta,
                          norm_eps=eps, bos_id=bos, eos_id=eos, shared_classifier=bool(shared),
                          tokenizer_kind=tk, chat_template=ct)
        off = CQKV_HEADER_BYTES
        legacy = False
    else:
        dim, hidden, L, H, KVH, V, S = struct.unpack_from("<7i", data, 0)
        cfg = make_config(dim, hidden, L, H, KVH, abs(V), S, shared_classifier=V > 0)
        off = 28
        legacy = True
    _check_config(cfg)
    w = {}
    for name, shape in tensor_shapes(cfg):
        if name == "classifier" and legacy:
            off += 4 * cfg["seq_len"] * (cfg["head_size"] // 2) * 2  # skip RoPE tables
        n = int(np.prod(shape))
        if off + 4 * n > len(data):
            raise ValueError("truncated checkpoint at tensor %s" % name)
        w[name] = np.frombuffer(data, dtype="<f4", count=n, offset=off).reshape(shape)
        off += 4 * n
    return cfg, w


def _check_config(cfg):
    for k in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
              "seq_len", "head_size"):
        if cfg[k] <= 0:
            raise ValueError("bad config value %s=%d" % (k, cfg[k]))
    if cfg["n_heads"] % cfg["n_kv_heads"]:
        raise ValueError("n_kv_heads must divide n_heads")
    if cfg["head_size"] % 2:
        raise ValueError("head_size must be even")


# ----------------------------------------------------------------------------
# random models

def _init_scales(cfg):
    """Standard deviation of every tensor's random init (norm weights handled apart)."""
    D, F, H, hs = cfg["dim"], cfg["hidden_dim"], cfg["n_heads"], cfg["head_size"]
    return {
        "token_embedding": 2.0 / math.sqrt(D),   # shared classifier -> logits std ~2
        "wq": 1.0 / math.sqrt(D), "wk": 1.0 / math.sqrt(D), "wv": 1.0 / math.sqrt(D),
        "wo": 1.0 / math.sqrt(H * hs),
        "w1": 1.0 / math.sqrt(D), "w3": 1.0 / math.sqrt(D), "w2": 1.0 / math.sqrt(F),
        "classifier": 2.0 / math.sqrt(D),
    }


def random_model(seed, dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len,
                 head_size=None, shared_classifier=True, rope_theta=10000.0, norm_eps=1e-5,
                 bos_id=1, eos_id=2, tokenizer_kind=0, chat_template=0):
    """Small random model: returns (cfg, weights) with float32 weights."""
    cfg = make_config(dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len,
                      head_size=head_size, rope_theta=rope_theta, norm_eps=norm_eps,
                      bos_id=bos_id, eos_id=eos_id, shared_classifier=shared_classifier,
                      tokenizer_kind=tokenizer_kind, chat_template=chat_template)
    _check_config(cfg)
    rng = np.random.default_rng(seed)
    scales = _init_scales(cfg)
    w = {}
    for name, shape in tensor_shapes(cfg):
        if name.endswith("norm"):
            a = 1.0 + 0.2 * rng.standard_normal(shape)
        else:
            a = scales[name] * rng.standard_normal(shape)
        w[name] = a.astype(np.float32)
    return cfg, w


def write_random_checkpoint(path, cfg, seed=0, legacy=False, chunk_floats=1 << 22):
    """Stream a random checkpoint to disk without holding it in memory (for big models)."""
    rng = np.random.default_rng(seed)
    scales = _init_scales(cfg)
    with open(path, "wb") as f:
        f.write(legacy_header(cfg) if legacy else cqkv_header(cfg))

        def emit(name, shape):
            n = int(np.prod(shape))
            done = 0
            while done < n:
                m = min(chunk_floats, n - done)
                a = rng.standard_normal(m, dtype=np.float32)
                if name.endswith("norm"):
                    a *= np.float32(0.2)
                    a += np.float32(1.0)
                else:
                    a *= np.float32(scales[name])
                f.write(a.astype("<f4", copy=False).tobytes())
                done += m

        for name, shape in tensor_shapes(cfg):
            if name == "classifier" and legacy:
                continue
            emit(name, shape)
        if legacy:
            c, s = rope_tables(cfg)
            f.write(c.tobytes())
            f.write(s.tobytes())
            if not cfg["shared_classifier"]:
                emit("classifier", (cfg["vocab_size"], cfg["dim"]))


# ----------------------------------------------------------------------------
# forward pass (float64)

def rmsnorm(x, weight, eps):
    ms = np.mean(x * x, axis=-1, keepdims=True)
    return x * (1.0 / np.sqrt(ms + eps)) * weight


def rope(x, positions, hs, theta):
    """Rotate pairs (2i, 2i+1) of every head.  x: (T, heads, hs)."""
    i2 = np.arange(0, hs, 2, dtype=np.float64)
    freq = theta ** (-i2 / hs)                              # (hs/2,)
    ang = positions[:, None].astype(np.float64) * freq[None, :]   # (T, hs/2)
    c = np.cos(ang)[:, None, :]
    s = np.sin(ang)[:, None, :]
    x0 = x[..., 0::2]
    x1 = x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * c - x1 * s
    out[..., 1::2] = x0 * s + x1 * c
    return out


def forward(cfg, w, tokens):
    """Logits (T, vocab) float64 for every position of `tokens` (positions 0..T-1)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    T = len(tokens)
    if T == 0:
        return np.zeros((0, cfg["vocab_size"]))
    if T > cfg["seq_len"]:
        raise ValueError("sequence longer than seq_len")
    H, KVH, hs = cfg["n_heads"], cfg["n_kv_heads"], cfg["head_size"]
    eps, theta = cfg["norm_eps"], cfg["rope_theta"]
    f64 = lambda a: np.asarray(a, dtype=np.float64)
    x = f64(w["token_embedding"])[tokens]          # (T, D)
    pos = np.arange(T)
    group = H // KVH
    causal = np.triu(np.ones((T, T), dtype=bool), k=1)   # True above the diagonal: masked
    for l in range(cfg["n_layers"]):
        h = rmsnorm(x, f64(w["attn_norm"][l]), eps)
        q = (h @ f64(w["wq"][l]).T).reshape(T, H, hs)
        k = (h @ f64(w["wk"][l]).T).reshape(T, KVH, hs)
        v = (h @ f64(w["wv"][l]).T).reshape(T, KVH, hs)
        q = rope(q, pos, hs, theta)
        k = rope(k, pos, hs, theta)
        kh = np.repeat(k, group, axis=1)               # query head j reads kv head j // group
        vh = np.repeat(v, group, axis=1)
        scores = np.einsum("thd,shd->hts", q, kh) / math.sqrt(hs)
        scores[:, causal] = -np.inf
        scores -= scores.max(axis=-1, keepdims=True)
        p = np.exp(scores)
        p /= p.sum(axis=-1, keepdims=True)
        att = np.einsum("hts,shd->thd", p, vh).reshape(T, H * hs)
        x = x + att @ f64(w["wo"][l]).T
        h = rmsnorm(x, f64(w["ffn_norm"][l]), eps)
        a = h @ f64(w["w1"][l]).T
        b = h @ f64(w["w3"][l]).T
        x = x + ((a / (1.0 + np.exp(-a))) * b) @ f64(w["w2"][l]).T
    x = rmsnorm(x, f64(w["final_norm"]), eps)
    return x @ f64(classifier(cfg, w)).T


def log_softmax(logits):
    m = logits.max(axis=-1, keepdims=True)
    z = logits - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def ppl_windows(stream, L, bos):
    """The windows [bos] + chunk of README.md for a token stream and window length L."""
    if L < 2:
        raise ValueError("window length must be >= 2")
    stream = list(stream)
    return [[bos] + stream[i:i + L - 1] for i in range(0, len(stream), L - 1)]


def perplexity(cfg, w, stream, L=None):
    """Returns (nll_mean, ppl, n_tokens, logits_rows) following README.md's ppl windows.

    logits_rows: float64 array with one row per forward step, windows concatenated."""
    if L is None:
        L = cfg["seq_len"]
    total = 0.0
    n = 0
    rows = []
    for win in ppl_windows(stream, L, cfg["bos_id"]):
        lg = forward(cfg, w, win)
        rows.append(lg)
        lp = log_softmax(lg)
        for j in range(1, len(win)):
            total -= lp[j - 1, win[j]]
            n += 1
    mean = total / n
    return mean, math.exp(mean), n, np.concatenate(rows, axis=0)


class Decoder:
    """Token-at-a-time forward pass with a KV cache (float64); same maths as forward()."""

    def __init__(self, cfg, w):
        self.cfg = cfg
        self.w = {k: np.asarray(v, dtype=np.float64) for k, v in w.items()}
        self.cls = self.w["token_embedding"] if cfg["shared_classifier"] else self.w["classifier"]
        L, KVH, hs = cfg["n_layers"], cfg["n_kv_heads"], cfg["head_size"]
        self.kc = np.zeros((L, cfg["seq_len"], KVH, hs))
        self.vc = np.zeros((L, cfg["seq_len"], KVH, hs))
        self.pos = 0

    def step(self, token):
        cfg, w = self.cfg, self.w
        H, KVH, hs = cfg["n_heads"], cfg["n_kv_heads"], cfg["head_size"]
        eps, theta = cfg["norm_eps"], cfg["rope_theta"]
        pos = self.pos
        if pos >= cfg["seq_len"]:
            raise ValueError("context full")
        P = np.array([pos])
        group = H // KVH
        x = w["token_embedding"][token].copy()
        for l in range(cfg["n_layers"]):
            h = rmsnorm(x, w["attn_norm"][l], eps)
            q = rope((w["wq"][l] @ h).reshape(1, H, hs), P, hs, theta)[0]
            self.kc[l, pos] = rope((w["wk"][l] @ h).reshape(1, KVH, hs), P, hs, theta)[0]
            self.vc[l, pos] = (w["wv"][l] @ h).reshape(KVH, hs)
            K = self.kc[l, :pos + 1]           # (pos+1, KVH, hs)
            V = self.vc[l, :pos + 1]
            att = np.empty(H * hs)
            for j in range(H):
                s = K[:, j // group, :] @ q[j] / math.sqrt(hs)
                s = np.exp(s - s.max())
                s /= s.sum()
                att[j * hs:(j + 1) * hs] = s @ V[:, j // group, :]
            x = x + w["wo"][l] @ att
            h = rmsnorm(x, w["ffn_norm"][l], eps)
            a = w["w1"][l] @ h
            b = w["w3"][l] @ h
            x = x + w["w2"][l] @ ((a / (1.0 + np.exp(-a))) * b)
        x = rmsnorm(x, w["final_norm"], eps)
        self.pos += 1
        return self.cls @ x


def greedy_generate(cfg, w, prompt_ids, steps, bos=None):
    """llama2.c's generation loop with temperature 0.

    prompt_ids begins with BOS (bos: default the config's bos_id).  Returns (ids, margins) where ids are the tokens the
    loop emits (prompt tokens after the first, then argmax tokens; stops before a BOS)
    and margins[i] is top1 - top2 of the logits that chose ids[i] when it was sampled
    (None for forced prompt tokens)."""
    if bos is None:
        bos = cfg["bos_id"]
    if steps <= 0 or steps > cfg["seq_len"]:
        steps = cfg["seq_len"]
    dec = Decoder(cfg, w)
    token = prompt_ids[0]
    out, margins = [], []
    for pos in range(steps):
        lg = dec.step(token)
        if pos < len(prompt_ids) - 1:
            nxt, margin = prompt_ids[pos + 1], None
        else:
            nxt = int(np.argmax(lg))
            srt = np.sort(lg)
            margin = float(srt[-1] - srt[-2])
        if nxt == bos:   # llama2.c stops on BOS
            break
        out.append(nxt)
        margins.append(margin)
        token = nxt
    return out, margins


# ----------------------------------------------------------------------------
# llama2.c sampler

class XorShiftRng:
    MASK = (1 << 64) - 1

    def __init__(self, seed):
        self.state = seed & self.MASK

    def u32(self):
        s = self.state
        s ^= s >> 12
        s ^= (s << 25) & self.MASK
        s ^= s >> 27
        self.state = s
        return ((s * 0x2545F4914F6CDD1D) & self.MASK) >> 32

    def f32(self):
        return np.float32(self.u32() >> 8) / np.float32(16777216.0)


def softmax_f32(x):
    """Softmax in float32 with a sequential sum, as a plain C loop does it."""
    x = np.asarray(x, dtype=np.float32)
    e = np.exp(x - x.max()).astype(np.float32)
    s = np.cumsum(e, dtype=np.float32)[-1]
    return (e / s).astype(np.float32)


def sample_token(logits, temperature, topp, rng):
    """llama2.c sample(): logits float32 (vocab,).  Advances rng when temperature > 0."""
    logits = np.asarray(logits, dtype=np.float32)
    n = len(logits)
    if n == 1:
        return 0
    if temperature == 0.0:
        return int(np.argmax(logits))        # first index wins ties
    if np.abs(logits.astype(np.float64)).max() / temperature < np.finfo(np.float32).max / 4:
        probs = softmax_f32(logits / np.float32(temperature))
    else:   # logit / temperature would overflow float32: exp((x - max) / t) in float64
        z = (logits.astype(np.float64) - logits.max()) / np.float64(np.float32(temperature))
        e = np.where(z < -200, 0.0, np.exp(np.maximum(z, -200))).astype(np.float32)
        probs = (e.astype(np.float64) / e.astype(np.float64).sum()).astype(np.float32)
    coin = rng.f32()
    if topp <= 0 or topp >= 1:
        cdf = np.cumsum(probs, dtype=np.float32)
        hit = np.nonzero(coin < cdf)[0]
        return int(hit[0]) if len(hit) else n - 1
    cutoff = (np.float32(1.0) - np.float32(topp)) / np.float32(n - 1)
    idx = np.nonzero(probs >= cutoff)[0]
    if len(idx) == 0:                       # no token reaches the cut-off: all are candidates
        idx = np.arange(n)
    # descending probability; equal probabilities keep ascending index (stable sort)
    order = idx[np.argsort(-probs[idx], kind="stable")]
    p = probs[order]
    cum = np.cumsum(p, dtype=np.float32)
    over = np.nonzero(cum > np.float32(topp))[0]
    last = int(over[0]) if len(over) else len(order) - 1
    r = coin * cum[last]
    cdf = cum[: last + 1]
    hit = np.nonzero(r < cdf)[0]
    return int(order[hit[0]]) if len(hit) else int(order[last])


def replay_sampling(step_logits, prompt_ids, steps, seq_len, temperature, topp, seed, bos=1):
    """Run llama2.c's generate loop over precomputed per-step logits (e.g. the ones
    written by ./run --logits).  step_logits[pos] are the logits of forward step pos.
    Returns the emitted ids (as greedy_generate)."""
    if steps <= 0 or steps > seq_len:
        steps = seq_len
    rng = XorShiftRng(seed)
    out = []
    for pos in range(steps):
        if pos < len(prompt_ids) - 1:
            nxt = prompt_ids[pos + 1]
        else:
            if pos >= len(step_logits):
                raise IndexError("not enough logits rows for step %d" % pos)
            nxt = sample_token(step_logits[pos], temperature, topp, rng)
        if nxt == bos:
            break
        out.append(nxt)
    return out


# ----------------------------------------------------------------------------
# tokenizer (llama2.c sentencepiece-style BPE by scores)

class Tokenizer:
    def __init__(self, pieces, scores, max_token_length=None):
        self.pieces = [bytes(p) for p in pieces]
        self.scores = [float(np.float32(s)) for s in scores]
        self.max_token_length = (max(len(p) for p in self.pieces)
                                 if max_token_length is None else max_token_length)
        self.lookup = {}
        for i, p in enumerate(self.pieces):
            self.lookup.setdefault(p, i)

    @property
    def vocab_size(self):
        return len(self.pieces)

    # -- files
    @classmethod
    def load(cls, path, vocab_size=None):
        """Read tokenizer.bin; vocab_size None reads entries until the end of the file."""
        with open(path, "rb") as f:
            data = f.read()
        if len(data) < 4:
            raise ValueError("truncated tokenizer")
        (mtl,) = struct.unpack_from("<I", data, 0)
        off = 4
        pieces, scores = [], []
        while (vocab_size is None and off < len(data)) or \
                (vocab_size is not None and len(pieces) < vocab_size):
            if off + 8 > len(data):
                raise ValueError("truncated tokenizer at entry %d" % len(pieces))
            score, n = struct.unpack_from("<fi", data, off)
            off += 8
            if n < 0 or off + n > len(data):
                raise ValueError("truncated tokenizer at entry %d" % len(pieces))
            pieces.append(data[off:off + n])
            scores.append(score)
            off += n
        return cls(pieces, scores, mtl)

    def save(self, path):
        with open(path, "wb") as f:
            f.write(struct.pack("<I", self.max_token_length))
            for p, s in zip(self.pieces, self.scores):
                f.write(struct.pack("<fi", s, len(p)))
                f.write(p)

    # -- encoding
    def byte_fallback(self, char):
        """Ids of a character that is no piece: its bytes' <0xHH> pieces (ids b+3 in llama2.c's
        vocabularies) or, when one of them is missing, a single <unk> (id 0), as sentencepiece
        does without byte fallback."""
        ids = [self.lookup.get(b"<0x%02X>" % b) for b in char]
        return [0] if None in ids else ids

    def encode(self, text, bos=True, eos=False):
        """llama2.c encode(): text (str or bytes) -> list of ids."""
        if isinstance(text, str):
            text = text.encode("utf-8")
        ids = []
        if bos:
            ids.append(1)
        if len(text) > 0:                          # dummy prefix
            ids.extend([self.lookup[b" "]] if b" " in self.lookup else self.byte_fallback(b" "))
        # split into code points the way llama2.c does: a new buffer starts at every
        # byte that is not a continuation byte; at most 4 bytes per buffer
        buf = bytearray()
        for i, c in enumerate(text):
            if (c & 0xC0) != 0x80:
                buf = bytearray()
            buf.append(c)
            nxt = text[i + 1] if i + 1 < len(text) else 0
            if (nxt & 0xC0) == 0x80 and len(buf) < 4:
                continue
            tid = self.lookup.get(bytes(buf))
            if tid is not None:
                ids.append(tid)
            else:
                ids.extend(self.byte_fallback(bytes(buf)))
            buf = bytearray()
        # merge the best-scoring adjacent pair until none merges (leftmost wins ties).
        # This is llama2.c's rescan-everything loop; the pair scores are kept in an array
        # (recomputed only next to a merge) so that the rescan is one argmax.
        NONE = -np.inf

        def pair_score(i):
            if ids[i] < 0 or ids[i + 1] < 0:
                return NONE, -1
            tid = self.lookup.get(self.pieces[ids[i]] + self.pieces[ids[i + 1]])
            return (NONE, -1) if tid is None else (self.scores[tid], tid)

        pairs = [pair_score(i) for i in range(len(ids) - 1)]
        sc = np.array([p[0] for p in pairs], dtype=np.float64)
        pid = [p[1] for p in pairs]
        while len(sc) > 0:
            i = int(np.argmax(sc))           # first index among equal maxima
            if not sc[i] > -1e10:            # llama2.c: best_score starts at -1e10, strict >
                break
            ids[i:i + 2] = [pid[i]]
            sc = np.delete(sc, i)
            del pid[i]
            for j in (i - 1, i):
                if 0 <= j < len(ids) - 1:
                    sc[j], pid[j] = pair_score(j)
        if eos:
            ids.append(2)
        return ids

    # -- decoding
    def decode_piece(self, prev, tok, bos=1):
        """Bytes llama2.c's decode()+safe_printf() print for token `tok` after `prev`."""
        piece = self.pieces[tok]
        # C strings: a piece is only read up to its first NUL byte
        z = piece.find(b"\0")
        if z >= 0:
            piece = piece[:z]
        if prev == bos and piece[:1] == b" ":
            piece = piece[1:]
        byte = _parse_byte_piece(piece)
        if byte is not None:
            piece = bytes([byte]) if byte != 0 else b""
        if len(piece) == 0:
            return b""
        if len(piece) == 1:
            c = piece[0]
            printable = 0x20 <= c <= 0x7E
            space = c in (0x20, 0x09, 0x0A, 0x0B, 0x0C, 0x0D)
            if not (printable or space):
                return b""
        return piece

    def decode(self, ids, first_prev=1, bos=1):
        """Bytes printed for the emitted ids, each decoded after its predecessor."""
        out = bytearray()
        prev = first_prev
        for t in ids:
            out += self.decode_piece(prev, t, bos)
            prev = t
        return bytes(out)


_HEX = b"0123456789abcdefABCDEF"


def _parse_byte_piece(piece):
    """What sscanf(piece, "<0x%02hhX>", &b) == 1 accepts: "<0x" then 1-2 hex digits
    (the closing '>' is not needed for the conversion to count)."""
    if not piece.startswith(b"<0x") or len(piece) < 4 or piece[3] not in _HEX:
        return None
    digits = piece[3:4]
    if len(piece) > 4 and piece[4] in _HEX:
        digits = piece[3:5]
    return int(digits, 16)


_BPE_TEXT = (
    "Once upon a time there was a small dog who lived near the river. Every morning the dog "
    "ran along the bank and looked at the boats. One day a girl named Mia came to the river "
    "with her father. She threw a red ball into the water and the dog jumped in to get it. "
    "They played together until the sun went down, and then they walked home happily. "
    "The quick brown fox jumps over the lazy dog. She said, \"I want to play with you!\" "
    "He was sad, but his mother told him that everything would be fine. "
    "Caf\u00e9 cr\u00e8me, gr\u00fc\u00dfe, 10 \u20ac, \u4e2d\u6587."
)


def _bpe_merges(text, n):
    """Up to n merges learned greedily (most frequent adjacent pair) from text."""
    words = [[ch.encode("utf-8") for ch in " " + w] for w in text.split(" ")]
    merges = []
    while len(merges) < n:
        counts = {}
        for wd in words:
            for a, b in zip(wd, wd[1:]):
                counts[(a, b)] = counts.get((a, b), 0) + 1
        if not counts:
            break
        (a, b), c = max(counts.items(), key=lambda kv: (kv[1], kv[0]))
        if c < 2:
            break
        merges.append(a + b)
        for k, wd in enumerate(words):
            out, i = [], 0
            while i < len(wd):
                if i + 1 < len(wd) and wd[i] == a and wd[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(wd[i])
                    i += 1
            words[k] = out
    return merges


def random_tokenizer(vocab_size, seed=0, extra_chars=("\u00e9", "\u00fc", "\u00df", "\u20ac",
                                                      "\u4e2d", "\u6587", "\U0001F600")):
    """A valid llama2.c tokenizer: <unk>, <s>, </s>, 256 byte pieces, then merged pieces
    (first ones learned by a tiny BPE on a built-in English text, so merges fire on
    ordinary text, then random concatenations), then single characters (ASCII letters,
    punctuation and a few multibyte chars).  Scores are distinct; every merged piece is
    the concatenation of two earlier pieces, so merges are reachable."""
    if vocab_size < 259 + 2:
        raise ValueError("vocab_size must be at least 261")
    rng = np.random.default_rng(seed)
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [b"<0x%02X>" % b for b in range(256)]
    scores = [0.0] * len(pieces)
    singles = [b" "] + [bytes([c]) for c in
                        b"etaoinshrdlucmfwypvbgkjqxzETAOINSHRDLUCMFWYPVBGKJQXZ.,!?'\"\n0123456789"]
    singles += [c.encode("utf-8") for c in extra_chars]
    base = []
    seen = set(pieces)
    for s in singles:
        if len(pieces) + len(base) >= vocab_size:
            break
        if s not in seen:
            seen.add(s)
            base.append(s)
    n_merged = vocab_size - len(pieces) - len(base)
    merged = [m for m in _bpe_merges(_BPE_TEXT, n_merged // 2) if m not in seen]
    seen.update(merged)
    pool = list(base) + list(merged)
    filler = 0
    while len(merged) < n_merged:
        # draw candidate pairs in batches; the pool grows between batches
        ia = rng.integers(len(pool), size=4096)
        ib = rng.integers(len(pool), size=4096)
        added = 0
        for x, y in zip(ia.tolist(), ib.tolist()):
            m = pool[x] + pool[y]
            if len(m) > 16 or m in seen:
                continue
            seen.add(m)
            merged.append(m)
            added += 1
            if len(merged) == n_merged:
                break
        pool.extend(merged[len(merged) - added:])
        if added == 0:            # (only for absurd sizes) unique filler pieces
            while len(merged) < n_merged:
                m = b"#%d#" % filler
                filler += 1
                if m not in seen:
                    seen.add(m)
                    merged.append(m)
    # scores: sentencepiece-like -rank; merged pieces ranked in order, with a little random
    # shuffling among the random ones; single characters last (lowest scores)
    n_bpe = min(len(merged), n_merged // 2)
    ranks = list(range(n_bpe)) + list(n_bpe + rng.permutation(len(merged) - n_bpe))
    pieces += merged
    scores += [-float(1 + r) for r in ranks]
    pieces += base
    scores += [-float(len(merged) + 1 + i) for i in range(len(base))]
    assert len(pieces) == vocab_size == len(scores)
    return Tokenizer(pieces, scores)


def write_byte_level_tokenizer(path, pieces, merges, specials=(), pretokenizer=0, ranges=()):
    """run.c's byte-level BPE file (README "Tokenizers"): the pieces with score 0, then "BPE1",
    the pre-tokenizer, merges as (left id, right id) in rank order, special-token ids and the
    (first, last, class) Unicode ranges (1 letter, 2 number, 3 white space)."""
    with open(path, "wb") as f:
        f.write(struct.pack("<I", max(len(p) for p in pieces)))
        for p in pieces:
            f.write(struct.pack("<fi", 0.0, len(p)) + bytes(p))
        f.write(struct.pack("<Iii", 0x31455042, pretokenizer, len(merges)))
        for a, b in merges:
            f.write(struct.pack("<ii", a, b))
        f.write(struct.pack("<i", len(specials)) + b"".join(struct.pack("<i", s) for s in specials))
        f.write(struct.pack("<i", len(ranges)))
        for a, b, c in ranges:
            f.write(struct.pack("<IIi", a, b, c))


def ascii_class_ranges():
    """The ASCII part of the Unicode table: letters, digits, and the white space of GPT-2's \\s."""
    return [(0x09, 0x0D, 3), (0x20, 0x20, 3), (0x30, 0x39, 2), (0x41, 0x5A, 1), (0x61, 0x7A, 1)]


# ----------------------------------------------------------------------------
# CLI

def _cli(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-model", help="write a random checkpoint")
    m.add_argument("out")
    m.add_argument("--dim", type=int, default=64)
    m.add_argument("--hidden", type=int, default=None, help="hidden_dim (default 4*dim)")
    m.add_argument("--layers", type=int, default=2)
    m.add_argument("--heads", type=int, default=4)
    m.add_argument("--kv-heads", type=int, default=None, help="(default = heads)")
    m.add_argument("--vocab", type=int, default=512)
    m.add_argument("--seq-len", type=int, default=256)
    m.add_argument("--head-size", type=int, default=None)
    m.add_argument("--rope-theta", type=float, default=10000.0)
    m.add_argument("--norm-eps", type=float, default=1e-5)
    m.add_argument("--separate-classifier", action="store_true")
    m.add_argument("--legacy", action="store_true", help="legacy llama2.c format")
    m.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("make-tokenizer", help="write a random llama2.c tokenizer")
    t.add_argument("out")
    t.add_argument("--vocab", type=int, required=True)
    t.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("encode", help="print the ids of a text (BOS first)")
    e.add_argument("tokenizer")
    e.add_argument("text")
    e.add_argument("--vocab", type=int, default=None)
    a = ap.parse_args(argv)
    if a.cmd == "make-model":
        cfg = make_config(a.dim, a.hidden if a.hidden else 4 * a.dim, a.layers, a.heads,
                          a.kv_heads if a.kv_heads else a.heads, a.vocab, a.seq_len,
                          head_size=a.head_size, rope_theta=a.rope_theta, norm_eps=a.norm_eps,
                          shared_classifier=not a.separate_classifier)
        _check_config(cfg)
        write_random_checkpoint(a.out, cfg, seed=a.seed, legacy=a.legacy)
        print("wrote %s (%d bytes)" % (a.out, os.path.getsize(a.out)))
    elif a.cmd == "make-tokenizer":
        random_tokenizer(a.vocab, a.seed).save(a.out)
        print("wrote %s" % a.out)
    elif a.cmd == "encode":
        tok = Tokenizer.load(a.tokenizer, a.vocab)
        print(" ".join(map(str, tok.encode(a.text))))
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
