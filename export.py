#!/usr/bin/env python3
"""export.py: offline tools for the CQ (Coupled Quantization) KV-cache project.

It needs Python 3 with numpy and torch (Debian's python3-numpy and python3-torch, or any
torch build; a CUDA build for --device cuda), plus the PyPI packages gguf (to read GGUF files)
and tokenizers (tests only). `make deps` makes a .venv with all of them, so:

  .venv/bin/python export.py model SRC -o MODEL.bin
  .venv/bin/python export.py tokenizer SRC -o TOKENIZER.bin
  .venv/bin/python export.py centroids MODEL.bin -z TOKENIZER.bin --calib TEXTFILE [options]
  .venv/bin/python export.py centroids MODEL.bin --calib IDS --ids [options]
  .venv/bin/python export.py centroids MODEL.bin --self N [options]

model: converts a GGUF file (LLaMA architecture; F32/F16/Q8_0/Q4_0/Q4_1... tensors), a Hugging
Face directory, a Meta directory or a llama2.c file to a float32 CQKV checkpoint (section 7).
tokenizer: writes run.c's tokenizer file from a sentencepiece .model, a tokenizer.json or the
metadata of a GGUF file; byte-level BPE vocabularies get the merge and Unicode tables run.c needs.

centroids: learns CQ codebooks, one "CQCB" file (README.md) per CQ type, from calibration
activations: the PRE-RoPE keys and the values of every layer, in the checkpoint's interleaved
channel order, grouped into contiguous groups of c channels (section 8).
  --calib TEXTFILE  the text is tokenized once (llama2.c tokenizer.bin, BOS-free stream with
                    the dummy prefix at its start) and cut into --seqs sequences, each BOS +
                    min(--seq-len, seq_len) - 1 consecutive tokens (fewer if the text is short;
                    said on stderr). --ids: the file holds token ids instead (needed for
                    byte-level BPE models such as SmolLM2: `./run MODEL -z TOK -m encode -f
                    TEXT` prints them, BOS first; drop that one).
  --self N          N tokens sampled from the model itself (temperature 1 from BOS, --seed),
                    sequences of min(--seq-len, seq_len) tokens.
  --types LIST      cq1 (8c8b), cq2 (4c8b), cq4 (2c8b), or cq<c>c<b>b with c a power of two
                    dividing head_size and 1 <= b <= 16. Default cq1,cq2,cq4.
  weights           Fisher-guided by default: the loss is the SUM over the sequence of the
                    next-token cross-entropies; a token's weight for a group is the sum of the
                    squared gradients of that loss w.r.t. the group's c activations (a mean
                    loss scales every weight alike and gives the same codebooks).
                    --uniform: all weights 1.
  k-means           per (layer, K/V, group), 2^b centroids, k-means++ seeding (--seeding) and
                    up to --iters Lloyd iterations (stops when no assignment changes); --seed
                    fixes it (section 5).
  --heldout FILE    also codes --heldout-seqs sequences of FILE (text, or ids with --ids) with
                    the learned codebooks and reports the objective there (with Fisher weights
                    of those tokens, also for --uniform): a codebook fitted too closely to the
                    calibration tokens shows it.
  output            CHECKPOINT minus its extension + ".<c>c<b>b.cent" (".<c>c<b>b.uniform.cent"
                    with --uniform), or inside the directory -o, or the file -o (one type).
  stdout            per type: final weighted objective (also relative to the weighted variance),
                    plain relative MSE, Lloyd iterations, seconds, the held-out figures; then
                    the total time. --stats FILE writes them as JSON, with the objective after
                    every Lloyd iteration.
Activations are collected once and serve every requested type.

Speed: a small model (llama2.c's stories260K, cq1+cq2+cq4) takes well under a minute on one CPU
thread. A 135M model (SmolLM2: 30 layers, kv_dim 192, 16 x 2048 calibration tokens) wants a GPU
(--device cuda): its forward and backward passes take seconds there, and all (layer, K/V)
k-means problems of a type are solved as one batch. On a CPU, torch's matrix products may use
a slow reference BLAS (Debian's build does), so the model's linear layers run as 1x1
convolutions (oneDNN), and k-means prunes its distance work with Hamerly's bounds.

The file is organised in sections (tests import the functions):
  1. errors and small helpers
  2. checkpoint I/O       load_checkpoint, write_checkpoint, model_fingerprint
  3. tokenizer            Tokenizer (llama2.c tokenizer.bin, BPE by scores), write_tokenizer
  4. torch model          TorchLlama, kv_and_grads, fisher_weights, collect_kv, generate
  5. k-means              kmeanspp_init, kmeans_batched, weighted_kmeans
  6. centroid files       parse_cq_type, default_centroid_path, write_centroids, read_centroids
  7. model and tokenizer  convert_gguf, convert_hf, convert_meta, cmd_model, tokenizer_from_*,
                          cmd_tokenizer
  8. the centroids command  calibration_sequences_from_text, learn_codebooks, cmd_centroids
  9. command line         build_parser, main (new subcommands go here)
"""

import argparse
import contextlib
import json
import heapq
import math
import os
import re
import struct
import sys
import time
from dataclasses import dataclass

# OpenMP threads that spin while waiting made torch erratic on a machine shared with other
# work (the same k-means took 5 s or 40 s); passive waiting must be chosen before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    import numpy as np
    import torch
    import torch.nn.functional as F
except ImportError as _e:  # e.g. a python3 without them first on PATH
    sys.exit(f"error: export.py needs numpy and torch ({_e}): run it with a Python that has "
             "them, e.g. .venv/bin/python after `make deps`")


# =============================================================================================
# 1. Errors and small helpers
# =============================================================================================

class ExportError(Exception):
    """A user-facing error: main() prints it as one "error: ..." line and exits with 1."""


def log(msg):
    """Notes and timings of the work go to stderr (results go to stdout)."""
    PROGRESS.done()
    print(msg, file=sys.stderr, flush=True)


class Progress:
    """A one-line text progress indicator on stderr ("\\r" rewrites), silent when disabled."""

    def __init__(self, enabled=True):
        self.enabled = enabled
        self.width = 0

    def show(self, msg):
        if not self.enabled:
            return
        pad = max(0, self.width - len(msg))
        sys.stderr.write("\r" + msg + " " * pad)
        sys.stderr.flush()
        self.width = len(msg)

    def done(self):
        if self.enabled and self.width:
            sys.stderr.write("\r" + " " * self.width + "\r")
            sys.stderr.flush()
        self.width = 0


PROGRESS = Progress()  # the one progress line of the command (main() clears it on errors)


def file_size(path, what):
    try:
        return os.path.getsize(path)
    except OSError as e:
        raise ExportError(f"cannot open {what} '{path}': {e.strerror}") from None


def check_output_file(path):
    """Refuses an -o that cannot be written, before any conversion work."""
    if os.path.isdir(path):
        raise ExportError(f"-o '{path}' is a directory: name the file to write (e.g. "
                          f"{os.path.join(path, 'out.bin')})")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ExportError(f"cannot write '{path}': the directory '{parent}' does not exist "
                          "(create it, or choose another -o)")
    if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ExportError(f"cannot write '{path}': permission denied (choose another -o)")


@contextlib.contextmanager
def output_file(path, mode="wb"):
    """open(path, mode) for writing; a failed open or write is an ExportError and leaves no
    partial file behind."""
    try:
        with open(path, mode) as f:
            yield f
    except OSError as e:
        try:
            os.remove(path)
        except OSError:
            pass
        raise ExportError(f"cannot write '{path}': {e.strerror or e}") from None


# =============================================================================================
# 2. Checkpoint I/O
#
# Three layouts are read (all float32, little-endian):
#   - "CQKV" version 1 (README.md): 256-byte header, tensors in the order of TENSOR_ORDER;
#   - llama2.c legacy ("v0"): 7 int32 header, same order, plus two obsolete RoPE tables after
#     final_norm; a negative vocab_size means a separate classifier at the end;
#   - llama2.c "version 1" (magic "ak42"): 256-byte header, norms first, then the matrices.
# Every layout is turned into one Config and one dict of numpy arrays named as in TENSOR_ORDER,
# per-layer tensors stacked as (n_layers, out, in). weights["classifier"] always exists (it is
# the embedding when shared).
# =============================================================================================

CQKV_MAGIC = 0x564B5143       # bytes "CQKV"
LLAMA2C_V1_MAGIC = 0x616B3432  # "ak42" (file bytes "24ka")
CQKV_HEADER = 256
LEGACY_HEADER = 28

TENSOR_ORDER = ["token_embedding", "attn_norm", "wq", "wk", "wv", "wo", "ffn_norm",
                "w1", "w2", "w3", "final_norm", "classifier"]


@dataclass
class Config:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    head_size: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    bos_id: int = 1
    eos_id: int = 2
    shared_classifier: int = 1
    tokenizer_kind: int = 0
    chat_template: int = 0
    fmt: str = "cqkv"  # where it came from: "cqkv", "legacy" or "llama2c-v1"

    @property
    def q_dim(self):
        return self.n_heads * self.head_size

    @property
    def kv_dim(self):
        return self.n_kv_heads * self.head_size


def tensor_shapes(cfg):
    """Shapes of the tensors named in TENSOR_ORDER (classifier included even when shared)."""
    L, D, F_, V = cfg.n_layers, cfg.dim, cfg.hidden_dim, cfg.vocab_size
    return {
        "token_embedding": (V, D), "attn_norm": (L, D),
        "wq": (L, cfg.q_dim, D), "wk": (L, cfg.kv_dim, D), "wv": (L, cfg.kv_dim, D),
        "wo": (L, D, cfg.q_dim), "ffn_norm": (L, D),
        "w1": (L, F_, D), "w2": (L, D, F_), "w3": (L, F_, D),
        "final_norm": (D,), "classifier": (V, D),
    }


def _check_config(cfg, path):
    def bad(msg):
        raise ExportError(f"checkpoint '{path}': {msg}")
    for name in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
                 "seq_len", "head_size"):
        if getattr(cfg, name) <= 0:
            bad(f"{name} = {getattr(cfg, name)} in the header must be positive "
                "(not a checkpoint, or a different format?)")
    if cfg.n_heads % cfg.n_kv_heads:
        bad(f"n_heads {cfg.n_heads} is not a multiple of n_kv_heads {cfg.n_kv_heads}")
    if cfg.head_size % 2:
        bad(f"head_size {cfg.head_size} is odd (RoPE needs pairs)")
    if not (cfg.rope_theta > 0 and cfg.norm_eps > 0):
        bad(f"rope_theta {cfg.rope_theta} and norm_eps {cfg.norm_eps} must be positive")
    if not (0 <= cfg.bos_id < cfg.vocab_size and 0 <= cfg.eos_id < cfg.vocab_size):
        bad(f"bos_id {cfg.bos_id} / eos_id {cfg.eos_id} outside the vocabulary")
    if cfg.shared_classifier not in (0, 1):
        bad(f"shared_classifier = {cfg.shared_classifier}, expected 0 or 1")


def _read_tensors(path, cfg, offset, order, size, extra_floats_after=None):
    """Maps the float32 tensors named in `order` starting at byte `offset`; checks the size.

    extra_floats_after: (name, count) of floats to skip after tensor `name` (legacy RoPE tables).
    """
    shapes = tensor_shapes(cfg)
    total = sum(int(np.prod(shapes[n])) for n in order)
    if extra_floats_after:
        total += extra_floats_after[1]
    expected = offset + 4 * total
    if size != expected:
        raise ExportError(
            f"checkpoint '{path}' has {size} bytes but its header ({cfg.fmt} format: dim "
            f"{cfg.dim}, hidden {cfg.hidden_dim}, {cfg.n_layers} layers, {cfg.n_heads} heads, "
            f"{cfg.n_kv_heads} kv heads, vocab {cfg.vocab_size}, seq_len {cfg.seq_len}) implies "
            f"{expected} bytes")
    data = np.memmap(path, dtype="<f4", mode="r", offset=offset, shape=(total,))
    out, pos = {}, 0
    for name in order:
        n = int(np.prod(shapes[name]))
        out[name] = np.array(data[pos:pos + n], dtype=np.float32).reshape(shapes[name])
        pos += n
        if extra_floats_after and name == extra_floats_after[0]:
            pos += extra_floats_after[1]
    del data
    if "classifier" not in out:
        out["classifier"] = out["token_embedding"]
    return out


def load_checkpoint(path):
    """Reads a CQKV, llama2.c legacy or llama2.c version-1 checkpoint -> (Config, weights)."""
    size = file_size(path, "checkpoint")
    try:
        with open(path, "rb") as f:
            head = f.read(CQKV_HEADER)
    except OSError as e:
        raise ExportError(f"cannot read checkpoint '{path}': {e.strerror}") from None
    if len(head) < LEGACY_HEADER:
        raise ExportError(f"checkpoint '{path}' is too small ({size} bytes) to hold a header")
    magic = struct.unpack_from("<I", head, 0)[0]

    if magic == CQKV_MAGIC:
        if len(head) < CQKV_HEADER:
            raise ExportError(f"checkpoint '{path}': truncated CQKV header")
        version = struct.unpack_from("<i", head, 4)[0]
        if version != 1:
            raise ExportError(f"checkpoint '{path}': CQKV version {version} is not supported "
                              "(only 1)")
        ints = struct.unpack_from("<8i", head, 8)
        theta, eps = struct.unpack_from("<2f", head, 40)
        bos, eos, shared, tok_kind, chat = struct.unpack_from("<5i", head, 48)
        cfg = Config(*ints, rope_theta=theta, norm_eps=eps, bos_id=bos, eos_id=eos,
                     shared_classifier=shared, tokenizer_kind=tok_kind, chat_template=chat,
                     fmt="cqkv")
        _check_config(cfg, path)
        order = TENSOR_ORDER if not cfg.shared_classifier else TENSOR_ORDER[:-1]
        return cfg, _read_tensors(path, cfg, CQKV_HEADER, order, size)

    if magic == LLAMA2C_V1_MAGIC:
        version = struct.unpack_from("<i", head, 4)[0]
        if version != 1:
            raise ExportError(f"checkpoint '{path}': llama2.c export version {version} is not "
                              "supported (version 2 is int8-quantized; use a float32 export)")
        dim, hidden, L, H, KVH, V, T = struct.unpack_from("<7i", head, 8)
        shared = head[36]
        cfg = Config(dim, hidden, L, H, KVH, V, T, head_size=dim // max(H, 1),
                     shared_classifier=int(shared), fmt="llama2c-v1")
        _check_legacy_dims(cfg, path)
        order = ["attn_norm", "ffn_norm", "final_norm", "token_embedding", "wq", "wk", "wv",
                 "wo", "w1", "w2", "w3"] + ([] if shared else ["classifier"])
        return cfg, _read_tensors(path, cfg, CQKV_HEADER, order, size)

    # llama2.c legacy: 7 int32, negative vocab_size = separate classifier at the end
    dim, hidden, L, H, KVH, V, T = struct.unpack_from("<7i", head, 0)
    why = _legacy_header_problem(dim, hidden, L, H, KVH, V, T)
    if why:  # no magic and no sensible llama2.c header: a text file, random bytes, ...
        raise ExportError(
            f"'{path}' is not a checkpoint: it has no CQKV, llama2.c v1 or GGUF magic, and its first "
            f"28 bytes read as a llama2.c header give dim {dim}, hidden_dim {hidden}, n_layers {L}, "
            f"n_heads {H}, n_kv_heads {KVH}, vocab_size {V}, seq_len {T} ({why}); give a CQKV, "
            "llama2.c or GGUF file, or a Hugging Face or Meta directory")
    cfg = Config(dim, hidden, L, H, KVH, abs(V), T, head_size=dim // H if H > 0 else 0,
                 shared_classifier=int(V > 0), fmt="legacy")
    _check_legacy_dims(cfg, path)
    order = TENSOR_ORDER[:-1] + ([] if V > 0 else ["classifier"])
    rope_tables = 2 * cfg.seq_len * (cfg.head_size // 2)
    return cfg, _read_tensors(path, cfg, LEGACY_HEADER, order, size,
                              extra_floats_after=("final_norm", rope_tables))


def _legacy_header_problem(dim, hidden, L, H, KVH, V, T):
    """Why these 7 ints cannot be a llama2.c header (run.c's limits), or None."""
    if min(dim, hidden, L, H, KVH, T) <= 0 or V == 0 or V == -2**31:
        return "sizes must be positive"
    if dim > 1 << 16 or hidden > 1 << 18 or L > 1024 or H > 1024 or abs(V) > 1 << 22 or T > 1 << 22:
        return "implausibly large"
    if dim % H:
        return "dim is not a multiple of n_heads"
    if H % KVH:
        return "n_heads is not a multiple of n_kv_heads"
    if (dim // H) % 2:
        return "the head size is odd"
    return None


def _check_legacy_dims(cfg, path):
    if cfg.n_heads <= 0 or cfg.dim <= 0 or cfg.dim % cfg.n_heads:
        raise ExportError(f"checkpoint '{path}': dim {cfg.dim} is not a positive multiple of "
                          f"n_heads {cfg.n_heads} (not a llama2.c checkpoint?)")
    _check_config(cfg, path)


def write_checkpoint(path, cfg, weights, fmt="cqkv"):
    """Writes a checkpoint in the CQKV (README.md) or llama2.c legacy layout.

    weights: dict with the names of TENSOR_ORDER and the shapes of tensor_shapes(cfg);
    "classifier" is written only when cfg.shared_classifier == 0.
    """
    shapes = tensor_shapes(cfg)
    for name in TENSOR_ORDER:
        if name == "classifier" and cfg.shared_classifier:
            continue
        if tuple(np.shape(weights[name])) != shapes[name]:
            raise ExportError(f"tensor {name} has shape {np.shape(weights[name])}, "
                              f"expected {shapes[name]}")
    with output_file(path) as f:
        if fmt == "cqkv":
            head = struct.pack("<Ii8i2f5i", CQKV_MAGIC, 1, cfg.dim, cfg.hidden_dim, cfg.n_layers,
                               cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size, cfg.seq_len,
                               cfg.head_size, cfg.rope_theta, cfg.norm_eps, cfg.bos_id,
                               cfg.eos_id, cfg.shared_classifier, cfg.tokenizer_kind,
                               cfg.chat_template)
            f.write(head + bytes(CQKV_HEADER - len(head)))
        elif fmt == "legacy":
            if cfg.q_dim != cfg.dim or cfg.rope_theta != 10000.0 or cfg.norm_eps != 1e-5 \
                    or cfg.bos_id != 1 or cfg.eos_id != 2:
                raise ExportError("the legacy llama2.c format needs n_heads*head_size == dim, "
                                  "theta 10000, eps 1e-5, bos 1, eos 2")
            vocab = cfg.vocab_size if cfg.shared_classifier else -cfg.vocab_size
            f.write(struct.pack("<7i", cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads,
                                cfg.n_kv_heads, vocab, cfg.seq_len))
        else:
            raise ValueError(f"unknown checkpoint format {fmt!r}")
        for name in TENSOR_ORDER:
            if name == "classifier" and cfg.shared_classifier:
                continue
            f.write(np.ascontiguousarray(weights[name], dtype="<f4").tobytes())
            if name == "final_norm" and fmt == "legacy":
                # the obsolete RoPE tables llama2.c readers skip; written as llama2.c did
                hs = cfg.head_size
                freqs = 1.0 / (10000.0 ** (np.arange(0, hs, 2)[: hs // 2] / hs))
                ang = np.outer(np.arange(cfg.seq_len), freqs)
                f.write(np.cos(ang).astype("<f4").tobytes())
                f.write(np.sin(ang).astype("<f4").tobytes())


def model_fingerprint(wk):
    """README.md fingerprint: sum mod 2^64 of the layer-0 wk tensor read as uint32 words."""
    words = np.ascontiguousarray(wk[0], dtype="<f4").view("<u4")
    return int(words.astype(np.uint64).sum(dtype=np.uint64))  # uint64 sums wrap mod 2^64


# =============================================================================================
# 3. Tokenizer: llama2.c's tokenizer.bin (sentencepiece-style BPE by scores)
#
# File: uint32 max_token_length, then per id: float32 score, int32 length, bytes. Encoding as
# llama2.c's encode(): optional BOS, the dummy-prefix piece " " (text not empty), each UTF-8
# code point -> its piece or one byte piece (<0xHH> = id byte+3) per byte (one <unk>, id 0,
# if the vocabulary lacks one of those byte pieces, as run.c does), then repeatedly
# merge the adjacent pair whose concatenation is a piece of highest score (leftmost on ties).
#
# Speed (documented shortcut, still exact): llama2.c's merge loop is O(n^2) in the text length.
# Here the symbol stream is cut before every symbol " " when no piece holds a space anywhere
# but at its start (true for sentencepiece vocabularies, checked at load time). No merge can
# then cross a cut, and greedy merging inside one piece does not depend on the other pieces,
# so encoding piece by piece gives exactly the whole-text result. Pieces ("words") repeat a
# lot and are cached; inside a piece a heap finds the best pair (O(m log m)). Without a safe
# cut the whole text is one piece: still exact, just uncached.
# =============================================================================================

# llama2.c's grouping of bytes into "code points": a non-continuation byte starts a group,
# which takes up to 3 following continuation bytes; stray continuation bytes group up to 4.
BPE1_MAGIC = 0x31455042  # "BPE1": the byte-level tables after the pieces (run.c's tokenizer format)
_CODEPOINT_RE = re.compile(rb"[^\x80-\xbf][\x80-\xbf]{0,3}|[\x80-\xbf]{1,4}")


class Tokenizer:
    def __init__(self, path, vocab_size):
        size = file_size(path, "tokenizer")
        with open(path, "rb") as f:
            data = f.read()
        if size < 4:
            raise ExportError(f"tokenizer '{path}' is too small")
        self.max_token_length = struct.unpack_from("<I", data, 0)[0]
        pieces, scores, pos = [], [], 4
        for i in range(vocab_size):
            if pos + 8 > len(data):
                raise ExportError(f"tokenizer '{path}' holds only {i} pieces but the model's "
                                  f"vocabulary has {vocab_size} (wrong tokenizer?)")
            score, n = struct.unpack_from("<fi", data, pos)
            pos += 8
            if n < 0 or pos + n > len(data):
                raise ExportError(f"tokenizer '{path}': piece {i} has a bad length {n}")
            pieces.append(data[pos:pos + n])
            scores.append(score)
            pos += n
        if pos + 4 <= len(data) and struct.unpack_from("<I", data, pos)[0] == BPE1_MAGIC:
            raise ExportError(f"tokenizer '{path}' is a byte-level BPE one (GPT-2 style), which only "
                              "./run encodes: `./run MODEL -z TOKENIZER -m encode -f TEXT | cut -d' ' "
                              "-f2- > IDS`, then pass IDS with --ids")
        if pos != len(data):
            raise ExportError(f"tokenizer '{path}' has {len(data) - pos} bytes left after "
                              f"{vocab_size} pieces: it belongs to a larger vocabulary "
                              "(wrong tokenizer for this model?)")
        self.pieces, self.scores = pieces, scores
        self.lookup = {}
        for i, p in enumerate(pieces):
            self.lookup.setdefault(p, i)  # first id wins if a piece is duplicated
        self.space_id = self.lookup.get(b" ")
        # cutting before " " is exact only if no piece holds a space after its first byte
        self.cut_at_space = self.space_id is not None and not any(
            p.find(b" ", 1) >= 0 for p in pieces)
        self._cache = {}

    def encode(self, text, bos=True, eos=False, bos_id=1, eos_id=2):
        """Token ids of `text` (str or bytes), exactly as llama2.c's encode()."""
        return list(self.iter_encode(text, bos=bos, eos=eos, bos_id=bos_id, eos_id=eos_id))

    def iter_encode(self, text, bos=True, eos=False, bos_id=1, eos_id=2):
        """Generator version of encode(): yields ids word by word (stop it early for a prefix)."""
        if isinstance(text, str):
            text = text.encode("utf-8")
        if bos:
            yield bos_id
        if text:
            symbols = []
            for cp in [b" "] + _CODEPOINT_RE.findall(text):  # the dummy prefix first
                i = self.lookup.get(cp)
                if i is not None:
                    symbols.append(i)
                else:  # run.c's rule: the <0xHH> byte pieces, or one <unk> (id 0) without them
                    byte_ids = [self.lookup.get(b"<0x%02X>" % b) for b in cp]
                    symbols.extend([0] if None in byte_ids else byte_ids)
            start = 0
            for k in range(1, len(symbols) + 1):
                if k == len(symbols) or (self.cut_at_space and symbols[k] == self.space_id):
                    yield from self._merge_cached(tuple(symbols[start:k]))
                    start = k
        if eos:
            yield eos_id

    def _merge_cached(self, syms):
        out = self._cache.get(syms)
        if out is None:
            out = self._merge(list(syms))
            if len(syms) <= 64:
                self._cache[syms] = out
        return out

    def _merge(self, syms):
        """Greedy BPE of llama2.c (best score first, leftmost on ties) with a heap.

        Symbols form a linked list; heap entries (-score, left position, left id, right id)
        go stale when either side changes and are then skipped. The left position of a merged
        symbol stays its left part's, so positions keep the list order and "smallest position
        among the best scores" is exactly llama2.c's leftmost tie rule.
        """
        n = len(syms)
        if n < 2:
            return tuple(syms)
        pieces, scores, lookup = self.pieces, self.scores, self.lookup
        nxt = list(range(1, n + 1))     # linked list over positions; n = end
        prv = list(range(-1, n - 1))
        alive = [True] * n

        def entry(i):
            """Heap entry for merging the symbol at i with its right neighbour, or None."""
            j = nxt[i]
            if j >= n:
                return None
            m = lookup.get(pieces[syms[i]] + pieces[syms[j]])
            if m is None or not scores[m] > -1e10:  # llama2.c: best_score starts at -1e10
                return None
            return (-scores[m], i, syms[i], syms[j], m)

        heap = [e for e in map(entry, range(n - 1)) if e is not None]
        heapq.heapify(heap)
        while heap:
            _, i, left, right, m = heapq.heappop(heap)
            j = nxt[i] if alive[i] else n
            if j >= n or syms[i] != left or syms[j] != right:
                continue  # stale: one side has merged since
            syms[i] = m
            alive[j] = False
            nxt[i] = nxt[j]
            if nxt[j] < n:
                prv[nxt[j]] = i
            for p in (prv[i], i):  # the two pairs that now involve the merged symbol
                e = entry(p) if p >= 0 else None
                if e is not None:
                    heapq.heappush(heap, e)
        out, i = [], 0
        while i < n:
            out.append(syms[i])
            i = nxt[i]
        return tuple(out)


def write_tokenizer(path, pieces, scores):
    """Writes a llama2.c tokenizer.bin (pieces: list of bytes, scores: list of floats)."""
    with output_file(path) as f:
        f.write(struct.pack("<I", max((len(p) for p in pieces), default=0)))
        for p, s in zip(pieces, scores):
            f.write(struct.pack("<fi", s, len(p)))
            f.write(p)


# =============================================================================================
# 4. The model in torch (float32 by default; float64 for the gradient tests)
#
# Same arithmetic as llama2.c's forward pass, batched over sequences and positions: RMSNorm,
# RoPE on interleaved pairs (2i, 2i+1) with angle pos * theta^(-2i/head_size), grouped-query
# attention (query head h reads kv head h // (n_heads/n_kv_heads)), causal softmax scaled by
# 1/sqrt(head_size), SwiGLU FFN, final norm, classifier.
# =============================================================================================

def linear(x, W):
    """x @ W.T. On the CPU in float32 as a 1x1 convolution: Debian's torch build has a generic
    (reference) BLAS, a few GFLOP/s, while convolutions go through oneDNN, 10-40x faster for
    the model's matrix sizes (autograd works the same)."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available():
        y = F.conv1d(x.reshape(-1, x.shape[-1]).T[None], W[:, :, None])  # (1, out, rows)
        return y[0].T.reshape(*x.shape[:-1], W.shape[0])
    return x @ W.T


class TorchLlama:
    def __init__(self, cfg, weights, dtype=torch.float32, device="cpu"):
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)

        def t(name):
            return torch.as_tensor(np.asarray(weights[name]), dtype=dtype, device=self.device)

        self.w = {name: t(name) for name in TENSOR_ORDER if name != "classifier"}
        shared = cfg.shared_classifier or "classifier" not in weights
        self.w["classifier"] = self.w["token_embedding"] if shared else t("classifier")
        hs = cfg.head_size
        # float32 frequencies like llama2.c (powf) so positions map to the same angles
        i = torch.arange(0, hs, 2, dtype=torch.float32)
        self.inv_freq = 1.0 / torch.pow(torch.tensor(cfg.rope_theta, dtype=torch.float32),
                                        i / hs)

        self._tables = self._rope_tables(0, cfg.seq_len)  # once, for generation's steps

    def _rope_tables(self, start, T):
        pos = torch.arange(start, start + T, dtype=torch.float32)
        ang = pos[:, None] * self.inv_freq[None, :]  # float32 product, as llama2.c
        return (torch.cos(ang.double()).to(self.dtype).to(self.device),
                torch.sin(ang.double()).to(self.dtype).to(self.device))

    def rope_tables(self, start, T):
        """cos and sin (T, head_size/2) of the RoPE angles of positions start..start+T-1."""
        if start + T <= self._tables[0].shape[0]:
            return self._tables[0][start:start + T], self._tables[1][start:start + T]
        return self._rope_tables(start, T)

    @staticmethod
    def rope(x, cos, sin):
        """x: (B, T, heads, hs); rotates pairs (2i, 2i+1) by the angles of cos/sin (T, hs/2)."""
        x0, x1 = x[..., 0::2], x[..., 1::2]
        c, s = cos[None, :, None, :], sin[None, :, None, :]
        return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)

    def rmsnorm(self, x, weight):
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + self.cfg.norm_eps) * weight

    def new_cache(self, batch, max_len):
        shape = (batch, self.cfg.n_kv_heads, max_len, self.cfg.head_size)
        return [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                 torch.zeros(shape, dtype=self.dtype, device=self.device))
                for _ in range(self.cfg.n_layers)]

    def forward(self, tokens, start_pos=0, cache=None, kv_offsets=None, capture=None):
        """tokens: (B, T) long -> logits (B, T, vocab).

        kv_offsets: per layer (dk, dv) of shape (B, T, kv_dim) or None, added to the PRE-RoPE
            keys and to the values (zeros with requires_grad give dL/dk and dL/dv; small
            numbers give finite differences).
        capture: a list that receives per layer (k, v), the pre-RoPE keys and the values
            (B, T, kv_dim), detached.
        cache: from new_cache(); positions start_pos .. start_pos+T-1 are written into it and
            attention reads positions 0 .. start_pos+T-1 (incremental generation).
        """
        cfg, w = self.cfg, self.w
        B, T = tokens.shape
        H, KVH, hs = cfg.n_heads, cfg.n_kv_heads, cfg.head_size
        cos, sin = self.rope_tables(start_pos, T)
        S = start_pos + T
        qpos = torch.arange(start_pos, S, device=self.device)
        kpos = torch.arange(S, device=self.device)
        causal = kpos[None, :] <= qpos[:, None]  # (T, S): key position <= query position
        x = w["token_embedding"][tokens]
        for l in range(cfg.n_layers):
            xn = self.rmsnorm(x, w["attn_norm"][l])
            q = linear(xn, w["wq"][l])
            k = linear(xn, w["wk"][l])
            v = linear(xn, w["wv"][l])
            if kv_offsets is not None and kv_offsets[l] is not None:
                k = k + kv_offsets[l][0]
                v = v + kv_offsets[l][1]
            if capture is not None:
                capture.append((k.detach(), v.detach()))
            q = self.rope(q.view(B, T, H, hs), cos, sin).transpose(1, 2)    # (B, H, T, hs)
            k = self.rope(k.view(B, T, KVH, hs), cos, sin).transpose(1, 2)  # (B, KVH, T, hs)
            v = v.view(B, T, KVH, hs).transpose(1, 2)
            if cache is not None:
                kc, vc = cache[l]
                kc[:, :, start_pos:S] = k
                vc[:, :, start_pos:S] = v
                k, v = kc[:, :, :S], vc[:, :, :S]
            if H != KVH:
                k = k.repeat_interleave(H // KVH, dim=1)
                v = v.repeat_interleave(H // KVH, dim=1)
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(hs)
            scores = scores.masked_fill(~causal, float("-inf"))
            att = torch.softmax(scores, dim=-1) @ v                       # (B, H, T, hs)
            x = x + linear(att.transpose(1, 2).reshape(B, T, H * hs), w["wo"][l])
            h = self.rmsnorm(x, w["ffn_norm"][l])
            x = x + linear(F.silu(linear(h, w["w1"][l])) * linear(h, w["w3"][l]), w["w2"][l])
        x = self.rmsnorm(x, w["final_norm"])
        return linear(x, w["classifier"])

    def loss(self, tokens, **kw):
        """Next-token cross-entropy SUMMED over all predicted positions of all sequences.

        A sum (not a mean) so that each token's gradient does not depend on how many tokens
        share its batch; the Fisher weighting is scale-free anyway.
        """
        logits = self.forward(tokens, **kw)
        V = logits.shape[-1]
        return F.cross_entropy(logits[:, :-1].reshape(-1, V), tokens[:, 1:].reshape(-1),
                               reduction="sum")


def kv_and_grads(model, tokens):
    """For a batch (B, T) of sequences: per layer (k, v, dL/dk, dL/dv), each (B, T, kv_dim).

    k are the pre-RoPE keys, v the values, L the summed next-token loss of model.loss().
    """
    B, T = tokens.shape
    kvd = model.cfg.kv_dim
    offs = [(torch.zeros(B, T, kvd, dtype=model.dtype, device=model.device, requires_grad=True),
             torch.zeros(B, T, kvd, dtype=model.dtype, device=model.device, requires_grad=True))
            for _ in range(model.cfg.n_layers)]
    cap = []
    loss = model.loss(tokens, kv_offsets=offs, capture=cap)
    loss.backward()
    return [(k, v, dk.grad, dv.grad) for (k, v), (dk, dv) in zip(cap, offs)]


def group_weights(grad, c):
    """Fisher weight per token and channel group: sum of squared grads over the group's c
    channels. grad: (..., kv_dim) -> (..., kv_dim // c)."""
    g2 = grad * grad
    return g2.reshape(*g2.shape[:-1], g2.shape[-1] // c, c).sum(-1)


def fisher_weights(model, tokens, c):
    """Per layer (K weights, V weights), each (B, T, kv_dim // c), for a batch of sequences."""
    return [(group_weights(dk, c), group_weights(dv, c))
            for _, _, dk, dv in kv_and_grads(model, tokens)]


def collect_kv(model, seqs, fisher=True, progress=None, max_batch_floats=1 << 28):
    """Runs the model on every sequence (list of 1-D int arrays, each starting with BOS).

    Returns (acts, g2): acts float32 (n_layers, 2, N, kv_dim) with the pre-RoPE keys [.., 0]
    and values [.., 1] of all N tokens (sequences back to back); g2 the squared gradients of
    the summed loss w.r.t. those activations (same shape), or None when fisher is False.
    Sequences of equal length are batched; attention scores of a batch are kept under about
    max_batch_floats floats.
    """
    cfg = model.cfg
    N = sum(len(s) for s in seqs)
    acts = torch.empty(cfg.n_layers, 2, N, cfg.kv_dim, dtype=torch.float32)
    g2 = torch.empty_like(acts) if fisher else None
    pos, i = 0, 0
    while i < len(seqs):
        T = len(seqs[i])
        per_seq = cfg.n_heads * T * T * cfg.n_layers * 2
        bmax = max(1, max_batch_floats // per_seq)
        j = i
        while j < len(seqs) and j - i < bmax and len(seqs[j]) == T:
            j += 1
        tok = torch.as_tensor(np.stack(seqs[i:j]), dtype=torch.long, device=model.device)
        n = tok.numel()
        if fisher:
            for l, (k, v, dk, dv) in enumerate(kv_and_grads(model, tok)):
                acts[l, 0, pos:pos + n] = k.reshape(n, -1).float().cpu()
                acts[l, 1, pos:pos + n] = v.reshape(n, -1).float().cpu()
                g2[l, 0, pos:pos + n] = (dk * dk).reshape(n, -1).float().cpu()
                g2[l, 1, pos:pos + n] = (dv * dv).reshape(n, -1).float().cpu()
        else:
            cap = []
            with torch.no_grad():
                model.forward(tok, capture=cap)
            for l, (k, v) in enumerate(cap):
                acts[l, 0, pos:pos + n] = k.reshape(n, -1).float().cpu()
                acts[l, 1, pos:pos + n] = v.reshape(n, -1).float().cpu()
        pos += n
        i = j
        if progress:
            progress.show(f"calibration forward{'/backward' if fisher else ''}: "
                          f"{i}/{len(seqs)} sequences")
    if progress:
        progress.done()
    return acts, g2


@torch.no_grad()
def generate(model, n_seqs, length, seed=0, temperature=1.0, progress=None):
    """Samples n_seqs sequences of `length` tokens, each BOS + length-1 sampled tokens, in one
    batch with a KV cache; plain multinomial sampling at `temperature` (no top-p), with a torch
    generator on the model's device seeded with `seed`. A sampled BOS does not stop a sequence
    (the model continues as after a document boundary). Returns int64 numpy (n_seqs, length)."""
    dev = model.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    out = torch.empty(n_seqs, length, dtype=torch.long, device=dev)
    out[:, 0] = model.cfg.bos_id
    cache = model.new_cache(n_seqs, length)
    for pos in range(length - 1):
        logits = model.forward(out[:, pos:pos + 1], start_pos=pos, cache=cache)[:, -1]
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        out[:, pos + 1] = torch.multinomial(probs, 1, generator=gen)[:, 0]
        if progress and (pos % 16 == 0 or pos == length - 2):
            progress.show(f"generating calibration text: {pos + 2}/{length} positions "
                          f"x {n_seqs} sequences")
    if progress:
        progress.done()
    return out.cpu().numpy()


# =============================================================================================
# 5. Weighted k-means
#
# Many independent problems of the same size (all channel groups of one layer's K or V) are
# solved together as a batch: X (G, n, c), weights w (G, n), k centroids each.
#   - k-means++ initialisation: each new centroid is a point drawn with probability
#     proportional to its squared distance to the nearest centroid so far (the first one
#     uniformly); the weights do not enter the draw. Drawing by weight times distance
#     (seeding="weighted", the textbook choice for weighted data) spends the centroids on the
#     few heavily weighted calibration tokens and codes held-out text worse (docs/NOTES-codebooks.md).
#     The random numbers of the draws are given per problem, so that batching problems together
#     does not change the result;
#   - Lloyd iterations: assignment to the nearest centroid, centroid = weighted mean of its
#     points; stop when no assignment changes, or after `iters` updates;
#   - distances ||x||^2 - 2 x.C + ||C||^2 via batched float32 matrix products, in chunks
#     bounding the (G, chunk, k) distance block. The data are centred per group first so that
#     the expansion does not lose precision to a large common offset;
#   - Hamerly's bounds skip most of that work after the first iterations: per point, u = the
#     distance to its own centroid (recomputed exactly, it is also the objective) and l = a
#     lower bound on the distance to every other centroid (the second-nearest distance, minus
#     the largest centroid move since). If u < l the assignment cannot change. Results are
#     those of plain Lloyd iterations (up to float rounding on exact ties).
#   - a cluster without points is re-seeded at the point with the largest weighted distance
#     to its centroid (distinct points for several empty clusters; none if every point already
#     sits on a centroid). A cluster whose points all have zero weight takes their plain mean
#     (it does not matter for the objective).
# Fewer distinct points than k just gives duplicate centroids; k > n is allowed.
# =============================================================================================

SEEDINGS = ("plain", "weighted")
SEEDING = "plain"  # see the section comment


def _sample_rows(p, fallback, u):
    """One index per row of p (G, n), drawn with probability proportional to p (fallback
    rows used where p sums to 0); u (G,) float64 uniform numbers in [0, 1) decide the draws.
    Float64 cumulative sums."""
    cs = torch.cumsum(p, dim=1, dtype=torch.float64)
    empty = cs[:, -1] <= 0
    if bool(empty.any()):
        cs = torch.where(empty[:, None], torch.cumsum(fallback, dim=1, dtype=torch.float64), cs)
    idx = torch.searchsorted(cs, u.to(p.device)[:, None] * cs[:, -1:], right=True)[:, 0]
    return idx.clamp_(max=p.shape[1] - 1)


def _sqdist_to(Xt, y):
    """Squared distances of the points Xt (G, c, n) to one point per group y (G, c) -> (G, n).
    Channel-major so that the sum runs over whole rows (summing a tiny last dim is slow)."""
    d = Xt - y[:, :, None]
    return (d * d).sum(1)


def kmeanspp_init(X, Xt, w, k, uniforms, seeding="plain"):
    """k-means++ seeding of X (G, n, c), Xt its (G, c, n) copy: each new centroid is a point
    drawn with probability proportional to its squared distance to the nearest centroid so far
    ("plain"), or to w times that distance ("weighted"); the first one uniformly ("plain") or
    in proportion to w.  uniforms: (k, G) float64 numbers in [0, 1), one per draw."""
    G, n, c = X.shape
    rows = torch.arange(G, device=X.device)
    ones = torch.ones_like(w)
    fallback = ones if seeding == "plain" else torch.where((w.sum(1) > 0)[:, None], w, ones)
    C = X.new_empty(G, k, c)
    idx = _sample_rows(fallback, fallback, uniforms[0])
    C[:, 0] = X[rows, idx]
    D = _sqdist_to(Xt, C[:, 0])
    for j in range(1, k):
        idx = _sample_rows(D if seeding == "plain" else w * D, fallback, uniforms[j])
        C[:, j] = X[rows, idx]
        torch.minimum(D, _sqdist_to(Xt, C[:, j]), out=D)
    return C


def _sqdist_own(Xt, C, a):
    """Exact squared distance of every point to its own centroid: Xt (G, c, n), C (G, k, c),
    a (G, n) -> (G, n)."""
    G, c, n = Xt.shape
    own = torch.gather(C.transpose(1, 2), 2, a[:, None, :].expand(G, c, n))
    d = Xt - own
    return (d * d).sum(1)


def _nearest_two(X, C, chunk_elems=None):
    """Nearest and second-nearest centroids by the expansion: X (G, m, c), C (G, k, c) ->
    (index (G, m), d1 (G, m), d2 (G, m)) with d1/d2 = squared distance minus ||x||^2.
    The (G, chunk, k) distance blocks hold about chunk_elems floats (default: 16 MB on the
    CPU, where smaller blocks stay in cache; 512 MB on a GPU, to launch fewer kernels)."""
    if chunk_elems is None:
        chunk_elems = 1 << 22 if X.device.type == "cpu" else 1 << 27
    G, m, c = X.shape
    k = C.shape[1]
    Ct = (-2.0 * C).transpose(1, 2).contiguous()  # (G, c, k)
    Cn = (C * C).sum(-1)[:, None, :]                # (G, 1, k)
    a = torch.empty(G, m, dtype=torch.long, device=X.device)
    d1 = X.new_empty(G, m)
    d2 = X.new_empty(G, m)
    step = max(1, chunk_elems // max(1, G * k))
    for s in range(0, m, step):
        d = torch.baddbmm(Cn, X[:, s:s + step], Ct)  # ||C||^2 - 2 x.C
        v1, i1 = d.min(-1)
        a[:, s:s + step], d1[:, s:s + step] = i1, v1
        if k > 1:
            d.scatter_(-1, i1[..., None], float("inf"))
            d2[:, s:s + step] = d.min(-1).values
        else:
            d2[:, s:s + step] = float("inf")
    return a, d1, d2


def _nearest_two_masked(X, x2, C, mask):
    """_nearest_two for the points where mask (G, n) is true; returns flat (gi, ii, a, dist1,
    dist2) with true distances (not squared) for those points, in mask.nonzero() order.
    Each group's selected points are packed to the front of a (groups, count, c) block so one
    batched product serves many groups; groups go in buckets of counts within a factor of 2
    (a group with few candidates is not padded to the count of the busiest one, which matters
    when hundreds of problems are batched and most have converged)."""
    gi, ii = mask.nonzero(as_tuple=True)
    counts = mask.sum(1)
    rank = (torch.cumsum(mask.long(), dim=1) - 1)[gi, ii]
    level = torch.where(counts > 0, torch.ceil(torch.log2(counts.double())).long(),
                        torch.full_like(counts, -1))
    a = torch.empty_like(gi)
    d1 = X.new_empty(gi.shape[0])
    d2 = X.new_empty(gi.shape[0])
    for lv in torch.unique(level).tolist():
        if lv < 0:
            continue
        groups = torch.nonzero(level == lv)[:, 0]
        slot = torch.full_like(counts, -1)
        slot[groups] = torch.arange(len(groups), device=X.device)
        pick = slot[gi] >= 0                            # the candidates of these groups
        pg, pr = slot[gi[pick]], rank[pick]
        Xp = X.new_zeros(len(groups), int(counts[groups].max()), X.shape[2])
        Xp[pg, pr] = X[gi[pick], ii[pick]]
        ab, b1, b2 = _nearest_two(Xp, C[groups])
        a[pick], d1[pick], d2[pick] = ab[pg, pr], b1[pg, pr], b2[pg, pr]
    x2s = x2[gi, ii]
    return gi, ii, a, (d1 + x2s).clamp_(min=0).sqrt_(), (d2 + x2s).clamp_(min=0).sqrt_()


def _update_centroids(X, w, a, dist2, C_old):
    """Weighted means of the clusters; empty clusters re-seeded (see the section comment)."""
    G, n, c = X.shape
    k = C_old.shape[1]
    dev = X.device
    flat = (a + k * torch.arange(G, device=dev)[:, None]).reshape(-1)
    wd = w.double().reshape(-1)
    wsum = torch.zeros(G * k, dtype=torch.float64, device=dev).index_add_(0, flat, wd)
    sums = torch.zeros(G * k, c, dtype=torch.float64, device=dev).index_add_(
        0, flat, X.double().reshape(-1, c) * wd[:, None])
    count = torch.bincount(flat, minlength=G * k)
    C = (sums / wsum.clamp(min=1e-300)[:, None]).to(X.dtype)
    C = torch.where((wsum > 0)[:, None], C, C_old.reshape(-1, c))
    zero_w = (wsum <= 0) & (count > 0)
    if bool(zero_w.any()):  # clusters whose points all have zero weight: plain mean
        psum = torch.zeros(G * k, c, dtype=torch.float64, device=dev).index_add_(
            0, flat, X.double().reshape(-1, c))
        pmean = (psum / count.clamp(min=1)[:, None]).to(X.dtype)
        C = torch.where(zero_w[:, None], pmean, C)
    C = C.reshape(G, k, c)
    empty = (count == 0).reshape(G, k)
    if bool(empty.any()):
        m = min(int(empty.sum(1).max()), n)
        score = w * dist2                               # weighted distance to own centroid
        top_s, top_i = score.topk(m, dim=1)             # (G, m), best first
        gi, ji = empty.nonzero(as_tuple=True)
        r = (torch.cumsum(empty.long(), dim=1) - 1)[gi, ji] % m
        ok = top_s[gi, r] > 0                           # nothing to gain from a zero score
        gi, ji, r = gi[ok], ji[ok], r[ok]
        C[gi, ji] = X[gi, top_i[gi, r]]
    return C


def seeding_uniforms(k, G, seed):
    """The (k, G) float64 uniform numbers of the k-means++ draws of G problems, from `seed`."""
    return torch.rand(k, G, generator=torch.Generator().manual_seed(int(seed)),
                      dtype=torch.float64)


def kmeans_batched(X, w, k, iters=100, seed=0, progress=None, seeding=SEEDING, uniforms=None):
    """Weighted k-means on G independent problems at once.

    X: (G, n, c) float tensor; w: (G, n) non-negative weights (or None: all 1).
    seeding: "plain" or "weighted" k-means++ (kmeanspp_init); its random numbers are
    `uniforms` (k, G) if given, else seeding_uniforms(k, G, seed).
    Returns (C (G, k, c), a (G, n) long, history (t+1, G) float64), where history[0] is the
    weighted objective sum_i w_i ||x_i - C[a_i]||^2 after the k-means++ initialisation and
    history[j] after j Lloyd updates. `a` assigns every point to its nearest centroid in C.
    progress: optional callable(iteration, n_changed) called after each update.
    """
    if seeding not in SEEDINGS:
        raise ValueError(f"seeding must be one of {SEEDINGS}, not {seeding!r}")
    X = torch.as_tensor(X).float()
    G, n, c = X.shape
    dev = X.device
    w = torch.ones(G, n, device=dev) if w is None else torch.as_tensor(w).float().to(dev)
    if uniforms is None:
        uniforms = seeding_uniforms(k, G, seed)
    mu = X.mean(1, keepdim=True)
    X = X - mu                                           # centring: see the section comment
    Xt = X.transpose(1, 2).contiguous()                  # (G, c, n) for elementwise work
    x2 = (Xt * Xt).sum(1)
    wd = w.double()

    C = kmeanspp_init(X, Xt, w, k, uniforms, seeding)
    a, d1, d2 = _nearest_two(X, C)
    lower = (d2 + x2).clamp_(min=0).sqrt_()
    dist2 = _sqdist_own(Xt, C, a)                        # exact squared distance to own
    history = [(wd * dist2).sum(1)]
    for it in range(iters):
        C_new = _update_centroids(X, w, a, dist2, C)
        shift = (C_new - C).norm(dim=-1).max(1).values  # largest centroid move per group
        C = C_new
        lower -= shift[:, None]
        dist2 = _sqdist_own(Xt, C, a)
        cand = dist2.sqrt() >= lower                    # may have a nearer centroid now
        changed = 0
        if bool(cand.any()):
            gi, ii, a_new, _, l_new = _nearest_two_masked(X, x2, C, cand)
            moved = a_new != a[gi, ii]
            changed = int(moved.sum())
            a[gi, ii] = a_new
            lower[gi, ii] = l_new
            if changed:
                dist2 = _sqdist_own(Xt, C, a)
        history.append((wd * dist2).sum(1))
        if progress:
            progress(it + 1, changed)
        if changed == 0:
            break
    return C + mu, a, torch.stack(history)


def weighted_kmeans(X, w, k, iters=100, seed=0, seeding=SEEDING):
    """One weighted k-means problem: X (n, c), w (n,) or None -> (centroids (k, c) float32
    numpy, assignments (n,) int64 numpy, objective history list of floats; see kmeans_batched)."""
    X = torch.as_tensor(np.asarray(X, dtype=np.float32))
    w = None if w is None else torch.as_tensor(np.asarray(w, dtype=np.float32))[None]
    C, a, hist = kmeans_batched(X[None], w, k, iters=iters, seed=seed, seeding=seeding)
    return C[0].numpy(), a[0].numpy(), hist[:, 0].tolist()


# =============================================================================================
# 6. Centroid files ("CQCB" version 1, README.md)
# =============================================================================================

CENT_MAGIC = 0x42435143  # bytes "CQCB"
CENT_HEADER = 64
CQ_ALIASES = {"cq4": (2, 8), "cq2": (4, 8), "cq1": (8, 8)}
_CQ_RE = re.compile(r"cq(\d+)c(\d+)b")


def parse_cq_type(name, head_size=None):
    """'cq1' / 'cq2' / 'cq4' / 'cq<c>c<b>b' -> (c, b); checks c against head_size if given."""
    if name in CQ_ALIASES:
        c, b = CQ_ALIASES[name]
    else:
        m = _CQ_RE.fullmatch(name)
        if not m:
            raise ExportError(f"unknown CQ type '{name}' (expected cq1, cq2, cq4 or "
                              "cq<c>c<b>b such as cq8c10b)")
        c, b = int(m.group(1)), int(m.group(2))
    if c < 1 or c & (c - 1):
        raise ExportError(f"CQ type '{name}': c = {c} channels per group must be a power of two")
    if not 1 <= b <= 16:
        raise ExportError(f"CQ type '{name}': b = {b} bits per code must be in 1..16")
    if head_size is not None and head_size % c:
        raise ExportError(f"CQ type '{name}': c = {c} does not divide head_size {head_size}")
    return c, b


def default_centroid_path(checkpoint, c, b, uniform=False):
    """Checkpoint path minus its extension, plus '.<c>c<b>b.cent' or '.<c>c<b>b.uniform.cent'."""
    base = os.path.splitext(checkpoint)[0]
    return f"{base}.{c}c{b}b{'.uniform' if uniform else ''}.cent"


def write_centroids(path, codebooks, n_kv_heads, head_size, weighting, n_tokens, fingerprint):
    """codebooks: (n_layers, 2, n_groups, 2^b, c) float32; weighting 1 = Fisher, 0 = uniform."""
    cb = np.ascontiguousarray(codebooks, dtype="<f4")
    L, two, G, K, c = cb.shape
    b = K.bit_length() - 1
    if two != 2 or K != 1 << b or G * c != n_kv_heads * head_size:
        raise ValueError(f"bad codebook shape {cb.shape}")
    head = struct.pack("<Ii6iqQ", CENT_MAGIC, 1, L, n_kv_heads, head_size, c, b,
                       int(weighting), int(n_tokens), int(fingerprint) % (1 << 64))
    with open(path, "wb") as f:
        f.write(head + bytes(CENT_HEADER - len(head)))
        f.write(cb.tobytes())


def read_centroids(path):
    """-> (header dict, codebooks float32 (n_layers, 2, n_groups, 2^b, c)); checks the size."""
    size = file_size(path, "centroid file")
    with open(path, "rb") as f:
        data = f.read()
    if size < CENT_HEADER:
        raise ExportError(f"centroid file '{path}' is too small")
    magic, version, L, kvh, hs, c, b, weighting, n_tokens, fp = \
        struct.unpack_from("<Ii6iqQ", data, 0)
    if magic != CENT_MAGIC or version != 1:
        raise ExportError(f"'{path}' is not a CQCB version 1 centroid file")
    if min(L, kvh, hs, c) <= 0 or hs % c or not 1 <= b <= 16:
        raise ExportError(f"centroid file '{path}': bad header")
    G = kvh * hs // c
    shape = (L, 2, G, 1 << b, c)
    if size != CENT_HEADER + 4 * int(np.prod(shape)):
        raise ExportError(f"centroid file '{path}' has {size} bytes, its header implies "
                          f"{CENT_HEADER + 4 * int(np.prod(shape))}")
    header = dict(magic=magic, version=version, n_layers=L, n_kv_heads=kvh, head_size=hs,
                  c=c, b=b, weighting=weighting, n_tokens=n_tokens, fingerprint=fp)
    cb = np.frombuffer(data, dtype="<f4", offset=CENT_HEADER).reshape(shape).astype(np.float32)
    return header, cb


# =============================================================================================
# 7. Converting checkpoints and tokenizers (the model and tokenizer commands)
#
# Sources: GGUF files of LLaMA-architecture models (F32/F16/Q8_0/Q4_0/Q4_1... dequantized by
# the `gguf` package), Hugging Face directories (config.json + *.safetensors or
# pytorch_model*.bin), Meta's consolidated.*.pth + params.json, llama2.c files. Everything is
# written as a float32 CQKV checkpoint.
#
# q/k row order: RoPE rotates pairs. Meta's checkpoints, llama2.c and GGUF (llama.cpp permutes
# on conversion) pair channels (2i, 2i+1) of a head; Hugging Face pairs (i, i + hs/2)
# ("rotate-half"). Within a head, HF channel j < hs/2 is our 2j and HF channel hs/2 + j is our
# 2j + 1, so HF rows are reordered with hf_to_interleaved() below; the tests check it against
# a forward pass written directly in the rotate-half convention.
# =============================================================================================

def hf_to_interleaved(w, n_heads, head_size):
    """Rows of a q or k projection from HF's rotate-half layout to the interleaved one."""
    w = np.asarray(w, dtype=np.float32)
    return w.reshape(n_heads, 2, head_size // 2, -1).transpose(0, 2, 1, 3).reshape(w.shape)


def interleaved_to_hf(w, n_heads, head_size):
    """The inverse of hf_to_interleaved (used to load our weights into transformers)."""
    w = np.asarray(w, dtype=np.float32)
    return w.reshape(n_heads, head_size // 2, 2, -1).transpose(0, 2, 1, 3).reshape(w.shape)


def _stack(tensors, L, name):
    return np.stack([np.asarray(tensors(name.format(l)), dtype=np.float32) for l in range(L)])


def _need(mapping, key, what):
    if key not in mapping:
        raise ExportError(f"{what}: '{key}' is missing")
    return mapping[key]


def _gguf_field(reader, name, default=None):
    import gguf
    f = reader.fields.get(name)
    if f is None:
        return default
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        if f.types[1] == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]) for i in f.data]
        return [f.parts[i][0].item() for i in f.data]
    if f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    return f.parts[f.data[0]][0].item()


def _open_gguf(path):
    try:
        import gguf
    except ImportError:
        raise ExportError("reading GGUF files needs the 'gguf' package (make deps installs it "
                          "into .venv; run export.py with .venv/bin/python)") from None
    try:
        return gguf.GGUFReader(path)
    except OSError as e:
        raise ExportError(f"cannot read GGUF file '{path}': {e.strerror or e}") from None
    except (ValueError, struct.error, IndexError, KeyError):
        # the reader's own words are numpy's ("cannot reshape array of size ...")
        raise ExportError(f"'{path}' ({os.path.getsize(path)} bytes) is a truncated or corrupt GGUF "
                          "file: its metadata or tensors run past the end of the file or do not "
                          "parse; download or convert it again") from None


def chat_template_kind(template):
    """0: Llama-2 [INST] (also the default), 1: ChatML."""
    return 1 if template and "<|im_start|>" in template else 0


def convert_gguf(path, seq_len=None):
    import gguf
    from gguf.quants import dequantize
    r = _open_gguf(path)
    arch = _gguf_field(r, "general.architecture")
    if arch != "llama":
        raise ExportError(f"'{path}': architecture '{arch}' is not LLaMA")
    tensors = {t.name: t for t in r.tensors}

    def get(name):
        t = _need(tensors, name, f"GGUF '{path}'")
        try:
            a = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ExportError(f"'{path}': tensor {name} has type {t.tensor_type.name}, "
                              "which the gguf package cannot dequantize") from None
        return np.asarray(a, dtype=np.float32).reshape(list(reversed(t.shape.tolist())))

    field = lambda n, d=None: _gguf_field(r, "llama." + n, d)  # noqa: E731
    for name in ("embedding_length", "attention.head_count", "feed_forward_length", "block_count"):
        if not isinstance(field(name), int) or field(name) <= 0:
            raise ExportError(f"'{path}': the GGUF metadata has no positive integer llama.{name} "
                              "(a corrupt file, or not a LLaMA model)")
    n_heads, dim = field("attention.head_count"), field("embedding_length")
    tokens = _gguf_field(r, "tokenizer.ggml.tokens") or []
    cfg = Config(dim=dim, hidden_dim=field("feed_forward_length"), n_layers=field("block_count"),
                 n_heads=n_heads, n_kv_heads=field("attention.head_count_kv", n_heads),
                 vocab_size=len(tokens) or field("vocab_size"),
                 seq_len=seq_len or field("context_length", 2048),
                 head_size=field("rope.dimension_count", dim // n_heads),
                 rope_theta=float(field("rope.freq_base", 10000.0)),
                 norm_eps=float(field("attention.layer_norm_rms_epsilon", 1e-5)),
                 bos_id=_gguf_field(r, "tokenizer.ggml.bos_token_id", 1),
                 eos_id=_gguf_field(r, "tokenizer.ggml.eos_token_id", 2),
                 shared_classifier=int("output.weight" not in tensors),
                 tokenizer_kind=int(_gguf_field(r, "tokenizer.ggml.model") == "gpt2"),
                 chat_template=chat_template_kind(_gguf_field(r, "tokenizer.chat_template")))
    L = cfg.n_layers
    w = {"token_embedding": get("token_embd.weight"), "final_norm": get("output_norm.weight")}
    names = {"attn_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v",
             "wo": "attn_output", "ffn_norm": "ffn_norm", "w1": "ffn_gate", "w2": "ffn_down",
             "w3": "ffn_up"}
    for ours, theirs in names.items():
        w[ours] = np.stack([get(f"blk.{l}.{theirs}.weight") for l in range(L)])
        PROGRESS.show(f"reading {theirs}")
    w["classifier"] = w["token_embedding"] if cfg.shared_classifier else get("output.weight")
    return cfg, w


def _read_safetensors(path):
    """name -> float32 array from a .safetensors file (F32, F16, BF16), without the package."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        base = 8 + n
    data = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        raw = np.asarray(data[base + a:base + b])
        dtype = info["dtype"]
        if dtype == "F32":
            x = raw.view("<f4")
        elif dtype == "F16":
            x = raw.view("<f2").astype(np.float32)
        elif dtype == "BF16":
            x = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            raise ExportError(f"'{path}': tensor {name} has dtype {dtype} (F32, F16, BF16 read)")
        out[name] = x.reshape(info["shape"])
    return out


def _torch_load(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except TypeError:  # torch without weights_only
        return torch.load(path, map_location="cpu")


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot read '{path}': {e}") from None


def convert_hf(directory, seq_len=None):
    cfg_path = os.path.join(directory, "config.json")
    hc = _read_json(cfg_path)
    tensors = {}
    files = sorted(os.listdir(directory))
    for name in files:
        if name.endswith(".safetensors"):
            tensors.update(_read_safetensors(os.path.join(directory, name)))
    if not tensors:
        for name in files:
            if name.startswith("pytorch_model") and name.endswith(".bin"):
                tensors.update({k: v.float().numpy() for k, v in _torch_load(os.path.join(directory, name)).items()})
    if not tensors:
        raise ExportError(f"'{directory}' has neither *.safetensors nor pytorch_model*.bin")
    H = _need(hc, "num_attention_heads", cfg_path)
    D = _need(hc, "hidden_size", cfg_path)
    eos = hc.get("eos_token_id", 2)
    template = None
    tk_path = os.path.join(directory, "tokenizer_config.json")
    if os.path.exists(tk_path):
        with open(tk_path) as f:
            template = json.load(f).get("chat_template")
    tok_json = os.path.join(directory, "tokenizer.json")
    byte_level = os.path.exists(tok_json) and "ByteLevel" in open(tok_json, encoding="utf-8").read()
    cfg = Config(dim=D, hidden_dim=_need(hc, "intermediate_size", cfg_path),
                 n_layers=_need(hc, "num_hidden_layers", cfg_path), n_heads=H,
                 n_kv_heads=hc.get("num_key_value_heads") or H,
                 vocab_size=_need(hc, "vocab_size", cfg_path),
                 seq_len=seq_len or hc.get("max_position_embeddings", 2048),
                 head_size=hc.get("head_dim") or D // H,
                 rope_theta=float(hc.get("rope_theta", 10000.0)),
                 norm_eps=float(hc.get("rms_norm_eps", 1e-6)),  # LlamaConfig's default
                 bos_id=hc.get("bos_token_id", 1) if hc.get("bos_token_id") is not None else 1,
                 eos_id=(eos[0] if isinstance(eos, list) else eos) if eos is not None else 2,
                 shared_classifier=int(bool(hc.get("tie_word_embeddings", False)) or "lm_head.weight" not in tensors),
                 tokenizer_kind=int(byte_level), chat_template=chat_template_kind(template))
    if hc.get("rope_scaling"):
        log("warning: rope_scaling in config.json is ignored (plain RoPE)")
    g = lambda n: _need(tensors, n, f"'{directory}'")  # noqa: E731
    L, hs = cfg.n_layers, cfg.head_size
    p = "model.layers.{}."
    w = {"token_embedding": g("model.embed_tokens.weight"), "final_norm": g("model.norm.weight"),
         "attn_norm": _stack(g, L, p + "input_layernorm.weight"),
         "wq": np.stack([hf_to_interleaved(g(p.format(l) + "self_attn.q_proj.weight"), cfg.n_heads, hs) for l in range(L)]),
         "wk": np.stack([hf_to_interleaved(g(p.format(l) + "self_attn.k_proj.weight"), cfg.n_kv_heads, hs) for l in range(L)]),
         "wv": _stack(g, L, p + "self_attn.v_proj.weight"), "wo": _stack(g, L, p + "self_attn.o_proj.weight"),
         "ffn_norm": _stack(g, L, p + "post_attention_layernorm.weight"),
         "w1": _stack(g, L, p + "mlp.gate_proj.weight"), "w2": _stack(g, L, p + "mlp.down_proj.weight"),
         "w3": _stack(g, L, p + "mlp.up_proj.weight")}
    w["classifier"] = w["token_embedding"] if cfg.shared_classifier else g("lm_head.weight")
    return cfg, {k: np.asarray(v, dtype=np.float32) for k, v in w.items()}


def convert_meta(directory, seq_len=None):
    pj = _read_json(os.path.join(directory, "params.json"))
    shards = sorted(n for n in os.listdir(directory) if n.startswith("consolidated.") and n.endswith(".pth"))
    if not shards:
        raise ExportError(f"'{directory}' has no consolidated.*.pth")
    parts = [_torch_load(os.path.join(directory, n)) for n in shards]

    def g(name):  # model-parallel shards: rows split for column-parallel, columns for row-parallel
        xs = [_need(p, name, f"'{directory}'").float().numpy() for p in parts]
        if len(xs) == 1 or xs[0].ndim == 1:
            return xs[0]
        axis = 1 if name.endswith(("attention.wo.weight", "feed_forward.w2.weight", "tok_embeddings.weight")) else 0
        if name == "tok_embeddings.weight" and xs[0].shape[1] == pj["dim"]:
            axis = 0  # Llama 3 splits the vocabulary (VocabParallelEmbedding), Llama 2 the dim
        return np.concatenate(xs, axis=axis)

    H, D = pj["n_heads"], pj["dim"]
    emb = g("tok_embeddings.weight")
    w1 = g("layers.0.feed_forward.w1.weight")
    cfg = Config(dim=D, hidden_dim=w1.shape[0], n_layers=pj["n_layers"], n_heads=H,
                 n_kv_heads=pj.get("n_kv_heads") or H, vocab_size=emb.shape[0],
                 seq_len=seq_len or pj.get("max_seq_len", 2048), head_size=D // H,
                 rope_theta=float(pj.get("rope_theta", 10000.0)), norm_eps=float(pj.get("norm_eps", 1e-5)))
    L = cfg.n_layers
    w = {"token_embedding": emb, "final_norm": g("norm.weight"), "classifier": g("output.weight")}
    for ours, theirs in {"attn_norm": "attention_norm", "wq": "attention.wq", "wk": "attention.wk",
                         "wv": "attention.wv", "wo": "attention.wo", "ffn_norm": "ffn_norm",
                         "w1": "feed_forward.w1", "w2": "feed_forward.w2", "w3": "feed_forward.w3"}.items():
        w[ours] = np.stack([g(f"layers.{l}.{theirs}.weight") for l in range(L)])
    cfg.shared_classifier = int(np.array_equal(w["classifier"], w["token_embedding"]))
    return cfg, {k: np.asarray(v, dtype=np.float32) for k, v in w.items()}


def detect_source(src):
    if os.path.isdir(src):
        if os.path.exists(os.path.join(src, "config.json")):
            return "hf"
        if os.path.exists(os.path.join(src, "params.json")):
            return "meta"
        raise ExportError(f"'{src}': a directory without config.json (Hugging Face) or params.json (Meta)")
    try:
        with open(src, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ExportError(f"cannot read '{src}': {e.strerror}") from None
    if magic == b"GGUF":
        return "gguf"
    return "llama2c"


def cmd_model(args):
    t0 = time.time()
    kind = args.source or detect_source(args.src) if os.path.exists(args.src) else None
    if kind is None:
        raise ExportError(f"cannot open '{args.src}': no such file or directory")
    check_output_file(args.output)
    convert = {"gguf": convert_gguf, "hf": convert_hf, "meta": convert_meta,
               "llama2c": lambda p, seq_len=None: load_checkpoint(p)}[kind]
    cfg, w = convert(args.src, seq_len=args.seq_len) if kind != "llama2c" else convert(args.src)
    if args.seq_len:
        cfg.seq_len = args.seq_len
    if args.tokenizer_kind is not None:
        cfg.tokenizer_kind = args.tokenizer_kind
    if args.chat_template is not None:
        cfg.chat_template = args.chat_template
    _check_config(cfg, args.src)
    PROGRESS.show(f"writing {args.output}")
    write_checkpoint(args.output, cfg, w, fmt="cqkv")
    PROGRESS.done()
    log(f"{args.output}: {kind} -> CQKV, dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads}/{cfg.n_kv_heads} "
        f"heads of {cfg.head_size}, vocab {cfg.vocab_size}, context {cfg.seq_len}, theta {cfg.rope_theta:g}, "
        f"tokenizer kind {cfg.tokenizer_kind}, chat template {cfg.chat_template} ({time.time() - t0:.1f} s)")


# ---- tokenizers ----------------------------------------------------------------------------

def _byte_level_alphabet():
    """GPT-2's map from bytes to the printable characters byte-level vocabularies are written in."""
    keep = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


# Unicode's White_Space property (what \s matches in the regex engines of HF tokenizers).
_WHITE_SPACE = [(0x9, 0xD), (0x20, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680),
                (0x2000, 0x200A), (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F),
                (0x3000, 0x3000)]


def unicode_class_ranges():
    """(first, last, class) ranges: 1 letters (L*), 2 numbers (N*), 3 white space."""
    import unicodedata
    space = set()
    for a, b in _WHITE_SPACE:
        space.update(range(a, b + 1))
    ranges = []
    for cp in range(0x110000):
        cat = unicodedata.category(chr(cp))
        cls = 3 if cp in space else 1 if cat[0] == "L" else 2 if cat[0] == "N" else 0
        if cls == 0:
            continue
        if ranges and ranges[-1][2] == cls and ranges[-1][1] == cp - 1:
            ranges[-1][1] = cp
        else:
            ranges.append([cp, cp, cls])
    return ranges


def write_byte_level_tokenizer(path, pieces, merges, specials, pretokenizer):
    """run.c's byte-level BPE file: llama2.c's layout (scores 0) plus the "BPE1" tables."""
    write_tokenizer(path, pieces, [0.0] * len(pieces))
    ranges = unicode_class_ranges()
    with output_file(path, "ab") as f:
        f.write(struct.pack("<Iii", BPE1_MAGIC, pretokenizer, len(merges)))
        f.write(np.asarray(merges, dtype="<i4").reshape(-1).tobytes())
        f.write(struct.pack("<i", len(specials)) + np.asarray(specials, dtype="<i4").tobytes())
        f.write(struct.pack("<i", len(ranges)))
        for a, b, c in ranges:
            f.write(struct.pack("<IIi", a, b, c))


def _byte_level_pieces(tokens, special):
    """Vocabulary strings (GPT-2 alphabet) -> raw bytes; special tokens stay as written."""
    alphabet = _byte_level_alphabet()
    out = []
    for i, t in enumerate(tokens):
        if i in special or any(ch not in alphabet for ch in t):
            out.append(t.encode("utf-8"))
        else:
            out.append(bytes(alphabet[ch] for ch in t))
    return out


def _merge_ids(merges, index, where):
    out = []
    for m in merges:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        if a not in index or b not in index:
            raise ExportError(f"{where}: merge '{a} {b}' names a token outside the vocabulary")
        out.append((index[a], index[b]))
    return out


def _llama2c_pieces(tokens, bos_id, eos_id):
    """Sentencepiece pieces as llama2.c's tokenizer export writes them: the word-boundary mark
    becomes a space, BOS and EOS become "\\n<s>\\n" and "\\n</s>\\n"."""
    out = []
    for i, t in enumerate(tokens):
        if i == bos_id:
            t = "\n<s>\n"
        elif i == eos_id:
            t = "\n</s>\n"
        out.append(t.replace("\u2581", " ").encode("utf-8"))
    return out


def tokenizer_from_gguf(path, out):
    r = _open_gguf(path)
    model = _gguf_field(r, "tokenizer.ggml.model")
    tokens = [t.decode("utf-8") for t in _gguf_field(r, "tokenizer.ggml.tokens") or []]
    if not tokens:
        raise ExportError(f"'{path}' has no tokenizer.ggml.tokens")
    if model == "llama":
        scores = _gguf_field(r, "tokenizer.ggml.scores") or [0.0] * len(tokens)
        pieces = _llama2c_pieces(tokens, _gguf_field(r, "tokenizer.ggml.bos_token_id", 1),
                                 _gguf_field(r, "tokenizer.ggml.eos_token_id", 2))
        write_tokenizer(out, pieces, scores)
        return "sentencepiece", len(pieces)
    if model == "gpt2":
        types = _gguf_field(r, "tokenizer.ggml.token_type") or [1] * len(tokens)
        special = [i for i, t in enumerate(types) if t in (3, 4)]  # CONTROL, USER_DEFINED
        index = {t: i for i, t in enumerate(tokens)}
        merges = _merge_ids([m.decode("utf-8") for m in _gguf_field(r, "tokenizer.ggml.merges") or []], index, path)
        pre = _gguf_field(r, "tokenizer.ggml.pre", "gpt2")
        if pre not in ("gpt2", "smollm", "starcoder", "default"):
            raise ExportError(f"'{path}': pre-tokenizer '{pre}' is not implemented (gpt2, smollm, starcoder are)")
        write_byte_level_tokenizer(out, _byte_level_pieces(tokens, set(special)), merges, special,
                                   1 if pre in ("smollm", "starcoder") else 0)
        return "byte-level BPE (%s)" % pre, len(tokens)
    raise ExportError(f"'{path}': tokenizer model '{model}' is not supported (llama, gpt2 are)")


def _byte_level_pretokenizer(pre, path):
    """run.c's pre-tokenizer number for a tokenizer.json pre_tokenizer, or an error: only GPT-2's
    ByteLevel (its own regex, no prefix space), optionally after Digits(individual_digits), is
    implemented, and anything else would silently encode differently."""
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [st.get("type") for st in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else None
    ok = byte_level is not None and byte_level.get("use_regex", True) and not byte_level.get("add_prefix_space", False)
    if kinds == ["ByteLevel"] and ok:
        return 0
    if kinds == ["Digits", "ByteLevel"] and ok and steps[0].get("individual_digits"):
        return 1
    raise ExportError(f"'{path}': pre-tokenizer {json.dumps(pre)} is not implemented in run.c "
                      "(ByteLevel with its own regex and no prefix space, optionally after "
                      "Digits(individual_digits=true), is)")


def tokenizer_from_hf_json(path, out):
    tj = _read_json(path)
    m = tj.get("model") or {}
    if m.get("type") != "BPE":
        raise ExportError(f"'{path}': model type {m.get('type')} (only BPE is supported)")
    vocab = dict(m["vocab"])
    for a in tj.get("added_tokens", []):
        vocab.setdefault(a["content"], a["id"])
    n = max(vocab.values()) + 1
    tokens = [""] * n
    for t, i in vocab.items():
        tokens[i] = t
    index = {t: i for i, t in enumerate(tokens)}
    merges = _merge_ids(m.get("merges", []), index, path)
    pre = tj.get("pre_tokenizer") or {}
    if "ByteLevel" in json.dumps(pre):
        # added tokens, special or not, are matched verbatim before pre-tokenization, as HF does
        special = sorted(a["id"] for a in tj.get("added_tokens", []))
        write_byte_level_tokenizer(out, _byte_level_pieces(tokens, set(special)), merges, special,
                                   _byte_level_pretokenizer(pre, path))
        return "byte-level BPE", n
    # sentencepiece-style BPE (Llama 2's tokenizer.json): rank order becomes the score
    scores = [0.0] * n
    for rank, (a, b) in enumerate(merges):
        merged = index.get(tokens[a] + tokens[b])
        if merged is not None and scores[merged] == 0.0:
            scores[merged] = -float(rank + 1)
    bos = next((a["id"] for a in tj.get("added_tokens", []) if a["content"] == "<s>"), 1)
    eos = next((a["id"] for a in tj.get("added_tokens", []) if a["content"] == "</s>"), 2)
    write_tokenizer(out, _llama2c_pieces(tokens, bos, eos), scores)
    return "sentencepiece-style BPE", n


def _protobuf_fields(buf):
    """(field number, wire type, value) of a protobuf message; enough for sentencepiece."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ExportError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ExportError("truncated protobuf")
        yield field, wire, value


def _varint(buf, pos):
    shift = value = 0
    while True:
        if pos >= len(buf):
            raise ExportError("truncated protobuf")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos


def tokenizer_from_sentencepiece(path, out):
    """A sentencepiece .model (ModelProto: field 1 = pieces {1 piece, 2 score, 3 type})."""
    with open(path, "rb") as f:
        data = f.read()
    tokens, scores, types = [], [], []
    try:
        for field, wire, value in _protobuf_fields(data):
            if field != 1 or wire != 2:
                continue
            piece, score, kind = "", 0.0, 1
            for f2, w2, v2 in _protobuf_fields(value):
                if f2 == 1:
                    piece = v2.decode("utf-8")
                elif f2 == 2 and w2 == 5:
                    score = struct.unpack("<f", v2)[0]
                elif f2 == 3 and w2 == 0:
                    kind = v2
            tokens.append(piece); scores.append(score); types.append(kind)
    except (ExportError, UnicodeDecodeError, struct.error) as e:
        raise ExportError(f"'{path}' is not a sentencepiece model: {e}") from None
    if not tokens:
        raise ExportError(f"'{path}' holds no sentencepiece pieces")
    control = [i for i, k in enumerate(types) if k == 3]  # <s>, </s>
    bos = next((i for i in control if tokens[i] == "<s>"), 1)
    eos = next((i for i in control if tokens[i] == "</s>"), 2)
    write_tokenizer(out, _llama2c_pieces(tokens, bos, eos), scores)
    return "sentencepiece", len(tokens)


def cmd_tokenizer(args):
    src = args.src
    if not os.path.exists(src):
        raise ExportError(f"cannot open '{src}': no such file or directory")
    if os.path.isdir(src):
        for name in ("tokenizer.model", "tokenizer.json"):
            if os.path.exists(os.path.join(src, name)):
                src = os.path.join(src, name)
                break
        else:
            raise ExportError(f"'{args.src}' has neither tokenizer.model nor tokenizer.json")
    check_output_file(args.output)
    try:
        with open(src, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ExportError(f"cannot read '{src}': {e.strerror}") from None
    if magic == b"GGUF":
        kind, n = tokenizer_from_gguf(src, args.output)
    elif src.endswith(".json"):
        kind, n = tokenizer_from_hf_json(src, args.output)
    else:
        kind, n = tokenizer_from_sentencepiece(src, args.output)
    log(f"{args.output}: {kind} tokenizer, {n} pieces, from {src}")


# =============================================================================================
# 8. The centroids command
# =============================================================================================

def calibration_sequences_from_text(path, tokenizer, cfg, n_seqs, length, ids=False):
    """n_seqs sequences of `length` tokens: BOS + consecutive chunks of length-1 tokens of the
    text's token stream (the whole text encoded as one string: one dummy prefix, at its start;
    only the prefix that is needed is encoded). Fewer if the text is too short (said on
    stderr). ids=True: the file holds whitespace-separated token ids instead."""
    size = file_size(path, "calibration text")
    need = n_seqs * (length - 1)
    with open(path, "rb") as f:
        data = f.read()
    if ids:
        try:
            stream = [int(t) for t in data.split()[:need]]
        except ValueError:
            raise ExportError(f"'{path}' should hold whitespace-separated token ids") from None
        bad = [t for t in stream if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ExportError(f"'{path}': token id {bad[0]} outside the vocabulary")
    else:
        stream = []
        for t in tokenizer.iter_encode(data, bos=False):
            stream.append(t)
            if len(stream) >= need:
                break
    if not stream:
        raise ExportError(f"calibration text '{path}' gives no tokens")
    chunk = length - 1
    n_full = len(stream) // chunk
    if n_full >= n_seqs:
        seqs = [stream[i * chunk:(i + 1) * chunk] for i in range(n_seqs)]
    elif n_full > 0:
        log(f"note: calibration text '{path}' ({size} bytes) gives only {len(stream)} tokens: "
            f"using {n_full} sequences of {length} tokens instead of {n_seqs}")
        seqs = [stream[i * chunk:(i + 1) * chunk] for i in range(n_full)]
    else:
        log(f"note: calibration text '{path}' gives only {len(stream)} tokens: using one "
            f"sequence of {len(stream) + 1} tokens")
        seqs = [stream]
    return [np.array([cfg.bos_id] + s, dtype=np.int64) for s in seqs]


def problem_seed(seed, layer, kv):
    """The k-means++ seed of one (layer, K/V) problem, so that the result does not depend on
    how problems are batched."""
    return int(np.random.SeedSequence([int(seed), layer, kv]).generate_state(1)[0])


def code_with(X, C):
    """Nearest-centroid coding of X (G, n, c) with C (G, k, c): (codes (G, n), exact squared
    errors (G, n) float64).  Both are centred on X's mean first (distances do not change)."""
    mu = X.mean(1, keepdim=True)
    Xc, Cc = X - mu, C - mu
    a = _nearest_two(Xc, Cc)[0]
    err = ((Xc.double() - torch.gather(Cc, 1, a[..., None].expand(-1, -1, X.shape[2])).double())
           ** 2).sum(-1)
    return a, err


def learn_codebooks(acts, g2, cfg, c, b, iters, seed, tag, progress, seeding=SEEDING,
                    heldout=None, batch=None):
    """Learns (n_layers, 2, n_groups, 2^b, c) codebooks from activations (n_layers, 2, N,
    kv_dim) and squared grads (same shape, or None for uniform weights).

    The (layer, K/V) problems are solved `batch` at a time (default: all of them on a GPU,
    where one batched problem costs little more than one; one at a time on the CPU, where the
    work is what counts); each has its own seed (problem_seed), so the result is the same.
    heldout: optional (acts, g2) of other tokens, coded with the learned codebooks (g2 None:
    the weighted figures use unit weights).

    Returns (codebooks, stats); stats sums over layers and groups, for K [0] and V [1]:
    "obj" the final weighted objective sum w ||x - C[a]||^2, "wvar" the weighted total
    variance sum w ||x - weighted mean||^2, "sse" and "var" the same unweighted, "history"
    the objective after the seeding and after each Lloyd iteration ([K, V] per iteration; a
    problem that has converged keeps its final value), "iters" the Lloyd iterations of every
    batch, and with heldout "held_obj", "held_sse", "held_var" as "obj", "sse", "var" on it.
    """
    L, _, N, kvd = acts.shape
    G, K = kvd // c, 1 << b
    out = np.empty((L, 2, G, K, c), dtype=np.float32)
    stats = {"obj": [0.0, 0.0], "wvar": [0.0, 0.0], "sse": [0.0, 0.0], "var": [0.0, 0.0],
             "iters": [], "history": []}
    if heldout is not None:
        stats.update(held_obj=[0.0, 0.0], held_sse=[0.0, 0.0], held_var=[0.0, 0.0])
    problems = [(l, kv) for l in range(L) for kv in range(2)]
    histories = []
    if batch is None:
        batch = len(problems) if acts.device.type == "cuda" else 1
    for p0 in range(0, len(problems), batch):
        part = problems[p0:p0 + batch]
        X = torch.cat([acts[l, kv].reshape(N, G, c).transpose(0, 1) for l, kv in part])
        w = None if g2 is None else torch.cat([group_weights(g2[l, kv], c).T for l, kv in part])
        uniforms = torch.cat([seeding_uniforms(K, G, problem_seed(seed, l, kv))
                              for l, kv in part], dim=1)
        where = (f"layer {part[0][0] + 1}/{L} {'KV'[part[0][1]]}" if len(part) == 1 else
                 f"{len(part)} (layer, K/V) problems")

        def report(it, changed):
            progress.show(f"[{tag}] {where}: iteration {it}/{iters}, "
                          f"{changed} assignments changed")

        progress.show(f"[{tag}] {where}: k-means++ seeding")
        C, a, hist = kmeans_batched(X, w, K, iters=iters, progress=report, seeding=seeding,
                                    uniforms=uniforms)
        stats["iters"].append(len(hist) - 1)
        Xd = X.double()
        ww = torch.ones_like(Xd[..., 0]) if w is None else w.double()
        wmean = (ww[..., None] * Xd).sum(1, keepdim=True) / ww.sum(1)[:, None, None]
        err = ((Xd - C.double()[torch.arange(X.shape[0], device=X.device)[:, None], a]) ** 2).sum(-1)
        per = lambda t: t.reshape(len(part), -1).sum(1).tolist()  # noqa: E731  per problem
        obj, wvar = per(hist[-1]), per((ww * ((Xd - wmean) ** 2).sum(-1)).sum(1))
        sse, var = per(err.sum(1)), per(((Xd - Xd.mean(1, keepdim=True)) ** 2).sum((1, 2)))
        hist = hist.reshape(hist.shape[0], len(part), G).sum(2)
        if heldout is not None:
            Nh = heldout[0].shape[2]
            Xh = torch.cat([heldout[0][l, kv].reshape(Nh, G, c).transpose(0, 1) for l, kv in part])
            wh = (torch.ones(Xh.shape[:2], dtype=torch.float64, device=Xh.device)
                  if heldout[1] is None else
                  torch.cat([group_weights(heldout[1][l, kv], c).T for l, kv in part]).double())
            _, herr = code_with(Xh, C)
            h_obj, h_sse = per((wh * herr).sum(1)), per(herr.sum(1))
            h_var = per(((Xh.double() - Xh.double().mean(1, keepdim=True)) ** 2).sum((1, 2)))
        for i, (l, kv) in enumerate(part):
            out[l, kv] = C[i * G:(i + 1) * G].cpu().numpy()
            stats["obj"][kv] += obj[i]
            stats["wvar"][kv] += wvar[i]
            stats["sse"][kv] += sse[i]
            stats["var"][kv] += var[i]
            if heldout is not None:
                stats["held_obj"][kv] += h_obj[i]
                stats["held_sse"][kv] += h_sse[i]
                stats["held_var"][kv] += h_var[i]
            histories.append((kv, hist[:, i].tolist()))
    steps = max(len(h) for _, h in histories)
    for t in range(steps):   # a problem that stopped earlier keeps its final value
        stats["history"].append([sum(h[min(t, len(h) - 1)] for k2, h in histories if k2 == kv)
                                 for kv in range(2)])
    progress.done()
    return out, stats


def _ratio(x, y):
    return x / y if y > 0 else 0.0


def cmd_centroids(args):
    t_start = time.time()
    # check the type spellings before any work
    types = []
    for name in ",".join(args.types or ["cq1,cq2,cq4"]).split(","):
        name = name.strip()
        if name and name not in [t[0] for t in types]:
            types.append((name,) + parse_cq_type(name))
    if not types:
        raise ExportError("no CQ type given (--types cq1,cq2,cq4)")
    if args.iters < 0 or args.seqs < 1 or args.seq_len < 2:
        raise ExportError("--iters must be >= 0, --seqs >= 1 and --seq-len >= 2")
    if args.self_tokens is not None and args.self_tokens < 2:
        raise ExportError("--self needs at least 2 tokens")
    if args.calib is not None and not args.ids and args.tokenizer is None:
        raise ExportError("--calib TEXTFILE needs the tokenizer (-z TOKENIZER)")
    if args.device != "cpu" and not torch.cuda.is_available():
        raise ExportError(f"device '{args.device}' requested but torch sees no CUDA device")
    if args.heldout is not None and not args.ids and args.tokenizer is None:
        raise ExportError("--heldout TEXTFILE needs the tokenizer (-z TOKENIZER)")
    if args.heldout_seqs < 1:
        raise ExportError("--heldout-seqs must be >= 1")
    if args.stats and not os.access(os.path.dirname(args.stats) or ".", os.W_OK):
        raise ExportError(f"cannot write '{args.stats}': directory missing or not writable")
    torch.backends.cuda.matmul.allow_tf32 = False  # the distances need float32 products

    cfg, weights = load_checkpoint(args.checkpoint)
    for name, c, b in types:
        parse_cq_type(name, cfg.head_size)
    most = max(types, key=lambda t: t[2])  # k-means needs a token for each centroid
    if args.self_tokens is not None and args.self_tokens < 1 << most[2]:
        raise ExportError(f"--self {args.self_tokens} gives too few tokens for {most[0]}: its "
                          f"{1 << most[2]} centroids per group need at least {1 << most[2]} "
                          f"calibration tokens (use --self {max(1 << most[2], 4096)} or more)")

    # output paths (checked before the long work)
    outputs = []
    for name, c, b in types:
        default = default_centroid_path(args.checkpoint, c, b, args.uniform)
        if args.output is None:
            path = default
        elif os.path.isdir(args.output) or args.output.endswith(os.sep):
            if not os.path.isdir(args.output):
                raise ExportError(f"output directory '{args.output}' does not exist")
            path = os.path.join(args.output, os.path.basename(default))
        else:
            if len(types) > 1:
                raise ExportError("-o names a file but several types are requested: give a "
                                  "directory or one type")
            parent = os.path.dirname(args.output) or "."
            if not os.path.isdir(parent):
                raise ExportError(f"output directory '{parent}' does not exist")
            path = args.output
        if not os.access(os.path.dirname(path) or ".", os.W_OK):
            raise ExportError(f"cannot write '{path}': directory not writable (choose another "
                              "with -o)")
        outputs.append(path)

    length = min(args.seq_len, cfg.seq_len)
    model = TorchLlama(cfg, weights, dtype=torch.float32, device=args.device)
    progress = PROGRESS
    progress.enabled = not args.quiet

    # calibration tokens
    t0 = time.time()
    if args.self_tokens is not None:
        n_seqs = -(-args.self_tokens // length)  # the last one shorter if need be
        gen = generate(model, n_seqs, min(length, args.self_tokens), seed=args.seed,
                       progress=progress)
        seqs = [row for row in gen]
        seqs[-1] = seqs[-1][:args.self_tokens - (n_seqs - 1) * length]
        if len(seqs[-1]) < 2:
            seqs.pop()
        source = f"--self: sampled from the model (temperature 1, seed {args.seed})"
    else:
        tok = None if args.ids else Tokenizer(args.tokenizer, cfg.vocab_size)
        if tok is not None and cfg.tokenizer_kind != 0:
            raise ExportError("this checkpoint uses tokenizer kind "
                              f"{cfg.tokenizer_kind} (GPT-2 byte-level BPE), which export.py "
                              "cannot encode yet: use --ids with pre-tokenized ids, or --self")
        seqs = calibration_sequences_from_text(args.calib, tok, cfg, args.seqs, length,
                                               ids=args.ids)
        source = f"{args.calib}"
    held_seqs = None
    if args.heldout is not None:
        tok = None if args.ids else Tokenizer(args.tokenizer, cfg.vocab_size)
        held_seqs = calibration_sequences_from_text(args.heldout, tok, cfg, args.heldout_seqs,
                                                    length, ids=args.ids)
    n_tokens = sum(len(s) for s in seqs)
    if n_tokens < 1 << most[2]:
        raise ExportError(f"the calibration gives {n_tokens} tokens, too few for {most[0]}: its "
                          f"{1 << most[2]} centroids per group need at least {1 << most[2]} "
                          "tokens (give a longer --calib text, more --seqs or a larger --seq-len)")
    t_tok = time.time() - t0
    log(f"calibration: {len(seqs)} sequences, {n_tokens} tokens ({source}), {t_tok:.1f} s")

    # activations (and gradients) once for all types
    t0 = time.time()
    fisher = not args.uniform
    acts, g2 = collect_kv(model, seqs, fisher=fisher, progress=progress)
    heldout = None
    if held_seqs is not None:  # Fisher weights there too, so that both runs can be compared
        heldout = collect_kv(model, held_seqs, fisher=True, progress=progress)
    del model
    t_act = time.time() - t0
    log(f"activations{' + Fisher gradients' if fisher else ''}: {cfg.n_layers} layers x "
        f"{n_tokens} tokens x kv_dim {cfg.kv_dim}, {t_act:.1f} s"
        + (f"; held-out: {sum(len(s) for s in held_seqs)} tokens of {args.heldout}"
           if held_seqs else ""))
    if args.device != "cpu":
        acts = acts.to(args.device)
        g2 = g2.to(args.device) if g2 is not None else None
        if heldout is not None:
            heldout = tuple(t.to(args.device) for t in heldout)

    fp = model_fingerprint(weights["wk"])
    report = {"weighting": "uniform" if args.uniform else "fisher", "seeding": args.seeding,
              "seed": args.seed, "calibration_tokens": n_tokens, "types": {}}
    if held_seqs:
        report["heldout_tokens"] = sum(len(s) for s in held_seqs)
    for (name, c, b), path in zip(types, outputs):
        t0 = time.time()
        cb, st = learn_codebooks(acts, g2, cfg, c, b, args.iters, args.seed, name, progress,
                                 seeding=args.seeding, heldout=heldout)
        try:
            write_centroids(path, cb, cfg.n_kv_heads, cfg.head_size, 0 if args.uniform else 1,
                            n_tokens, fp)
        except OSError as e:
            raise ExportError(f"cannot write '{path}': {e.strerror}") from None
        dt = time.time() - t0
        it = st["iters"]
        print(f"{name} ({c}c{b}b, {'uniform' if args.uniform else 'Fisher'}): "
              f"weighted objective K {st['obj'][0]:.5g} V {st['obj'][1]:.5g}, relative to the "
              f"weighted variance K {_ratio(st['obj'][0], st['wvar'][0]):.4f} "
              f"V {_ratio(st['obj'][1], st['wvar'][1]):.4f}; plain relative MSE "
              f"K {_ratio(st['sse'][0], st['var'][0]):.4f} "
              f"V {_ratio(st['sse'][1], st['var'][1]):.4f}; Lloyd iterations "
              f"{min(it)}..{max(it)} (mean {sum(it) / len(it):.0f}); {dt:.1f} s -> {path}",
              flush=True)
        if heldout is not None:
            print(f"  held-out: Fisher-weighted objective K {st['held_obj'][0]:.5g} "
                  f"V {st['held_obj'][1]:.5g}; plain relative MSE "
                  f"K {_ratio(st['held_sse'][0], st['held_var'][0]):.4f} "
                  f"V {_ratio(st['held_sse'][1], st['held_var'][1]):.4f}", flush=True)
        report["types"][name] = dict(c=c, b=b, file=path, seconds=dt, **st)
    if args.stats:
        try:
            with open(args.stats, "w") as f:
                json.dump(report, f, indent=1)
        except OSError as e:
            raise ExportError(f"cannot write '{args.stats}': {e.strerror}") from None
    print(f"total {time.time() - t_start:.1f} s (calibration tokens {t_tok:.1f} s, "
          f"activations {t_act:.1f} s)", flush=True)


# =============================================================================================
# 9. Command line
# =============================================================================================

class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # one "error: ..." line (argparse would print the usage first)
        self.exit(2, f"error: {message} (see {self.prog} -h)\n")


def build_parser():
    p = _Parser(prog="export.py", description="Offline tools for the CQ KV-cache project.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    c = sub.add_parser(
        "centroids", help="learn CQ centroid files from calibration activations",
        description="Learn CQ codebooks (README.md 'CQCB' files) for the given CQ types from "
        "the pre-RoPE keys and values of every layer on calibration tokens, with Fisher "
        "(squared-gradient) weights unless --uniform.")
    c.add_argument("checkpoint", help="model checkpoint (CQKV or llama2.c format)")
    c.add_argument("-z", "--tokenizer", help="tokenizer.bin (needed with --calib text)")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--calib", metavar="TEXTFILE", help="calibration text file")
    src.add_argument("--self", dest="self_tokens", metavar="N", type=int,
                     help="calibrate on N tokens sampled from the model itself (temperature "
                     "1 from BOS, seed --seed, sequences of min(--seq-len, seq_len) tokens)")
    c.add_argument("--ids", action="store_true",
                   help="the --calib file holds whitespace-separated token ids (no tokenizer)")
    c.add_argument("--types", action="append", default=None, metavar="LIST",
                   help="comma-separated CQ types: cq1 (8c8b), cq2 (4c8b), cq4 (2c8b) or "
                   "cq<c>c<b>b such as cq8c10b (default cq1,cq2,cq4)")
    c.add_argument("--uniform", action="store_true",
                   help="plain k-means (all weights 1) instead of Fisher-guided")
    c.add_argument("--seqs", type=int, default=16, help="calibration sequences (16)")
    c.add_argument("--seq-len", type=int, default=2048,
                   help="tokens per sequence, capped at the model's seq_len (2048)")
    c.add_argument("--iters", type=int, default=100, help="max Lloyd iterations (100)")
    c.add_argument("--seed", type=int, default=0, help="seed for k-means++ and --self (0)")
    c.add_argument("--seeding", choices=SEEDINGS, default=SEEDING,
                   help="k-means++ draws in proportion to the squared distance (plain, the "
                   "default) or to the weight times it (weighted)")
    c.add_argument("--heldout", metavar="FILE",
                   help="also code these tokens (text, or ids with --ids) with the learned "
                   "codebooks and report the objective there")
    c.add_argument("--heldout-seqs", type=int, default=4,
                   help="held-out sequences of --seq-len tokens (4)")
    c.add_argument("--stats", metavar="JSON",
                   help="write the objectives (per type; per Lloyd iteration too) to this file")
    c.add_argument("--device", default="cpu", help="torch device: cpu (default) or cuda")
    c.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (1: on a small machine shared with other work "
                   "a second thread gained little and sometimes slowed things down badly)")
    c.add_argument("-o", "--output", metavar="OUTDIR_OR_FILE",
                   help="output directory (default names inside) or file (one type only); "
                   "default: next to the checkpoint")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress line on stderr")
    c.set_defaults(func=cmd_centroids)

    m = sub.add_parser(
        "model", help="convert a checkpoint to the CQKV format (float32)",
        description="Convert a GGUF file (LLaMA architecture), a Hugging Face directory "
        "(config.json + safetensors or pytorch_model.bin), a Meta directory (params.json + "
        "consolidated.*.pth) or a llama2.c file to a float32 CQKV checkpoint; q/k rows are "
        "reordered into the interleaved RoPE layout where needed.")
    m.add_argument("src", help="GGUF file, llama2.c file, or Hugging Face / Meta directory")
    m.add_argument("-o", "--output", required=True, help="the CQKV checkpoint to write")
    m.add_argument("--source", choices=["gguf", "hf", "meta", "llama2c"], help="default: detected")
    m.add_argument("--seq-len", type=int, help="context length to record (default: the source's)")
    m.add_argument("--tokenizer-kind", type=int, choices=[0, 1], help="override: 0 sentencepiece-style, 1 byte-level BPE")
    m.add_argument("--chat-template", type=int, choices=[0, 1], help="override: 0 Llama-2 [INST], 1 ChatML")
    m.set_defaults(func=cmd_model)

    t = sub.add_parser(
        "tokenizer", help="write a tokenizer file for run.c (-z)",
        description="Write llama2.c's tokenizer.bin format (plus the byte-level BPE tables for "
        "GPT-2-style vocabularies) from a sentencepiece .model, a Hugging Face tokenizer.json "
        "(or a directory holding either) or the metadata of a GGUF file.")
    t.add_argument("src", help="tokenizer.model, tokenizer.json, a directory, or a GGUF file")
    t.add_argument("-o", "--output", required=True, help="the tokenizer file to write")
    t.set_defaults(func=cmd_tokenizer)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(max(1, args.threads))
    try:
        args.func(args)
    except ExportError as e:
        PROGRESS.done()
        sys.stderr.write(f"error: {e}\n")
        return 1
    except OSError as e:  # a file that vanished or failed mid-way; the usual cases are caught earlier
        PROGRESS.done()
        sys.stderr.write(f"error: {e.filename or 'I/O'}: {e.strerror or e}\n")
        return 1
    except KeyboardInterrupt:
        PROGRESS.done()
        sys.stderr.write("error: interrupted\n")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
