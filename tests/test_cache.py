"""Tests of the quantized KV cache types (-k, -w, -c, --kernels, --kl) of ./run.

The expected logits come from tests/cache_reference.py: an independent numpy decode loop
(float64 model, float32 quantizers written from docs/CQ.md, ../shared/docs/CQ.md and the cache
description in run.c) in which every token, the current one included, is read back through
the cache.

Two kinds of random models are used:
  * ordinary random models (reference.random_model), MHA and GQA: their keys and values
    differ from run.c's in the last float bits, so a quantization decision lying on a
    rounding boundary can go the other way in the two programs.  The reference lists the
    decisions closer than 1e-4 (relative) to their boundary; a row differing by more than
    1e-5 is explained by flipping such a decision (cache_reference.match_logits), never by a
    looser tolerance.  Each accepted flip is reported as a NearTieFlip warning.  fp16 is not
    compared on these models: dozens of half roundings lie within the float noise of their
    midpoint in every run, and together they move the logits by up to ~1e-4.
  * "exact" models (cache_reference.exact_kv_model, tie_model) whose keys and values are
    exact in float32 whatever the order of summation, so both programs quantize the same
    numbers (RoPE may still move a rotated key by an ulp).  There a decision exactly on its
    boundary (a true tie) is never flipped: it must go the documented way.

Tests
  1. test_type_matches_reference: every type, K:V pairs, CQ configurations (c = 1, 2, 4,
     head_size; b = 3, 4, 8, 10), MHA / GQA, with and without -w, one or two ppl windows;
     test_rounding_ties_go_away_from_zero, test_window_covering_everything_is_fp32,
     test_parallel_attention (kv_attend split among 3 threads)
  2. the fast kernels against the reference path (--kernels fast / ref, which share the
     encoder, so only float rounding may differ) and both against the numpy reference:
     test_fast_kernels_match_reference, test_decode_path_shapes, test_value_sums_query_heads,
     test_cq1_smollm_head_shape: every kernel shape (head sizes, c, query heads per kv head)
  3. test_codebook_with_every_vector_reproduces_fp32; test_cq_ties_take_the_first_centroid
  4. centroid file and -k validation (test_bad_centroid_file, test_bad_kv_spec, ...)
  5. test_bits_and_bytes
  6. test_kl
"""

import re
import warnings

import numpy as np
import pytest

from conftest import GPU, R, Runner, assert_clean_error, cpu_only, reference_binary
import cache_reference as CR

TOL = 1e-4          # logits, relative (row max |diff| / row max |ref|)
TOL_CQ_PATHS = 1e-5
EXPLAIN = 1e-5      # rows differing by more than this are explained by near-tie flips


class NearTieFlip(UserWarning):
    """A quantization decision within float noise of its boundary went the other way in
    run.c; the comparison accepted it (see cache_reference.match_logits)."""


# ------------------------------------------------------------------------------------------
# models, inputs, running the program

MODEL_KW = {
    # kv_dim 32: one full block of 32 channels
    "mha": ("random", dict(dim=32, hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=4,
                           vocab_size=96, seq_len=80)),
    # GQA (2 query heads per kv head), head_size 16 != dim / n_heads, kv_dim 48: blocks 32 + 16
    "gqa": ("random", dict(dim=48, hidden_dim=96, n_layers=2, n_heads=6, n_kv_heads=3,
                           head_size=16, vocab_size=96, seq_len=80)),
    # exact keys and values; GQA, kv_dim 16: one short block
    "exact_gqa": ("exact", dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_size=8,
                                vocab_size=96, seq_len=80)),
    # exact; MHA, three layers, head_size 16, kv_dim 64: two blocks
    "exact_mha": ("exact", dict(dim=32, n_layers=3, n_heads=4, n_kv_heads=4, head_size=16,
                                vocab_size=96, seq_len=80)),
}
SEEDS = {"mha": 101, "gqa": 102, "exact_gqa": 103, "exact_mha": 104}
N_IDS = 70
# ppl window length: None = seq_len (one window of 71 forward steps: KIVI blocks 0 and 1
# complete, block 2 not); 40 = two windows of 40 and 32 steps (block 0 completes at the
# very last step of the second window)
LENGTH = {"mha": None, "gqa": 40, "exact_gqa": None, "exact_mha": 40}

_models = {}


def get_model(name):
    if name not in _models:
        kind, kw = MODEL_KW[name]
        if kind == "random":
            cfg, w = R.random_model(SEEDS[name], **kw)
        else:
            cfg, w = CR.exact_kv_model(SEEDS[name], **kw)
        _models[name] = (cfg, w, CR.to64(w), CR.rope_table(cfg))
    return _models[name]


def is_exact(name):
    return MODEL_KW[name][0] == "exact"


def stream(cfg, n=N_IDS, seed=5):
    return np.random.default_rng(seed).integers(0, cfg["vocab_size"], size=n).tolist()


def parse_kv(line):
    return dict(part.partition("=")[::2] for part in line.split())


_counter = [0]


def run_ppl(run, tmp, model, ids, spec, window=0, length=None, cent=None, kernels=None,
            kl=False, vocab=None):
    """./run MODEL -m ppl --ids ...: returns (key=value dict, logits rows float64)."""
    _counter[0] += 1
    f = tmp / ("ids%d.txt" % _counter[0])
    f.write_text(" ".join(map(str, ids)) + "\n")
    lf = tmp / ("logits%d.bin" % _counter[0])
    args = [model, "-m", "ppl", "-f", f, "--ids", "--logits", lf, "-k", spec]
    if window:
        args += ["-w", window]
    if length:
        args += ["-l", length]
    if cent is not None:
        args += ["-c", cent]
    if kernels:
        args += ["--kernels", kernels]
    if kl:
        args += ["--kl"]
    if GPU and kernels == "ref":  # the reference path is the CPU program's
        run = Runner(reference_binary())
    elif GPU and cpu_only(spec):
        r = run(*args)
        assert_clean_error(r)
        assert b"not on the GPU path" in r.stderr, r.stderr
        pytest.skip("-k %s is CPU-only: the GPU program's clean error was checked" % spec)
    r = run(*args, check=True)
    lines = r.stdout.decode().strip().splitlines()
    assert len(lines) == 1, r.stdout
    rows = np.fromfile(lf, dtype="<f4").astype(np.float64)
    assert rows.size % vocab == 0
    return parse_kv(lines[0]), rows.reshape(-1, vocab)


def fast_and_ref(run, tmp, model, ids, spec, cfg, what, check, window=0, length=None, tol=TOL_CQ_PATHS):
    """./run with --kernels fast and with --kernels ref, each checked against the numpy reference
    by check(rows, what), which returns the near-tie decisions it had to flip.  The two paths
    share the encoder, but from the second layer on their keys and values differ by rounding,
    so a decision within float noise of its boundary may go different ways in the two runs;
    unless one did, the runs must also agree with each other to tol."""
    out, flips = {}, []
    for kernels in ("fast", "ref"):
        _, out[kernels] = run_ppl(run, tmp, model, ids, spec, window=window, length=length,
                                  kernels=kernels, vocab=cfg["vocab_size"])
        flips += check(out[kernels], "%s --kernels %s" % (what, kernels))
    if not flips:
        err = CR.row_errors(out["fast"], out["ref"]).max()
        assert err <= tol, "%s: fast kernels differ from the reference path by %.3g" % (what, err)


def cq_configs(spec):
    """The distinct (c, b) of the CQ sides of a spec."""
    out = []
    for t in CR.parse_spec(spec):
        if t.is_cq and (t.c, t.b) not in out:
            out.append((t.c, t.b))
    return out


def install_codebooks(path, cfg, w, spec, seed, use_c=False, key_scale=1.0):
    """Random codebooks for the CQ sides of spec, written where run.c looks for them.
    Returns (codebooks for the reference, the -c argument or None)."""
    cbs = {}
    cent = None
    for (c, b) in cq_configs(spec):
        # a spread close to the keys' and values' (about unit variance)
        cbs[(c, b)] = CR.random_codebooks(cfg, c, b, seed + 31 * c + b)
        cbs[(c, b)][:, 0] *= np.float32(key_scale)  # (L, K/V, G, 2^b, c)
        target = CR.default_centroid_path(path, c, b)
        if use_c:
            target = str(path) + ".mine.cent"
            cent = target
        CR.write_centroids(target, cfg, w, c, b, cbs[(c, b)])
    kt, vt = CR.parse_spec(spec)
    ref_cb = {"k": cbs.get((kt.c, kt.b)), "v": cbs.get((vt.c, vt.b))}
    return ref_cb, cent


def compare(got, cfg, w, w64, rope, ids, spec, window=0, length=None, codebooks=None,
            tol=TOL, what="", exact=False):
    """Asserts run.c's logits rows equal the reference's to tol (relative, per row),
    after explaining near-tie decisions; returns the reference rows."""
    def compute(ov):
        return CR.ppl_logits(cfg, w, ids, spec, L=length, window=window, codebooks=codebooks,
                             overrides=ov, w64=w64, rope=rope)
    ref, flips, bad = CR.match_logits(got, compute, EXPLAIN, exact_ties=exact)
    assert got.shape == ref.shape, "%s: %d logits rows, expected %d" % (what, got.shape[0], ref.shape[0])
    err = CR.row_errors(got, ref)
    for did, margin in flips:
        warnings.warn(NearTieFlip("%s: decision %r (margin %.2g) taken the other way by run.c"
                                  % (what, did, margin)))
    assert err.max() <= tol, (
        "%s: logits differ from the reference: max rel err %.3g at row %d (first row over "
        "%.0e: %s); near-tie flips tried and kept: %r"
        % (what, err.max(), int(err.argmax()), EXPLAIN, bad, flips))
    return ref, flips


# ------------------------------------------------------------------------------------------
# 1. every type against the reference

PLAIN = ["q8", "q4", "q2", "q1", "kivi4", "kivi2"]
PAIRS = ["cq4c3b:q4", "kivi2:cq2c4b", "cq2c4b:cq4c3b", "q8:fp32"]
FP16 = ["fp16", "fp16:cq2c4b", "cq2c4b:fp16"]
TYPE_MATRIX = {
    # (model, -w): specs
    ("mha", 0): ["fp32"] + PLAIN + ["cq2c4b", "cq4c3b", "cq8c4b", "cq1c3b", "cq2c10b", "cq4",
                                    "cq1"] + PAIRS,
    ("mha", 5): PLAIN + ["cq2c4b", "cq1c3b", "cq2c10b", "cq4c3b:q4"],
    ("gqa", 0): ["fp32"] + PLAIN + ["cq2c4b", "cq4c3b", "cq16c4b", "cq1c4b", "cq8c10b", "cq2"]
                + PAIRS,
    ("gqa", 7): ["q4", "kivi4", "cq2c4b", "cq16c4b:q2"],
    ("exact_gqa", 0): ["fp32"] + FP16 + PLAIN + ["cq2c4b", "cq4c3b", "cq8c4b", "cq1c3b",
                                                 "cq2c10b"] + PAIRS,
    ("exact_gqa", 5): ["fp16", "q8", "q1", "kivi4", "cq2c4b", "fp16:cq2c4b"],
    ("exact_mha", 0): FP16 + PLAIN + ["cq2c4b", "cq16c4b", "cq1c4b", "cq8c10b", "cq4c3b:q4",
                                      "cq2c4b:cq4c3b"],
    ("exact_mha", 9): ["fp16", "q1", "kivi2", "cq4c3b"],
}


def type_cases():
    return [pytest.param(m, spec, win, id="%s-%s-w%d" % (m, spec, win))
            for (m, win), specs in TYPE_MATRIX.items() for spec in specs]


@pytest.mark.parametrize("model,spec,window", type_cases())
def test_type_matches_reference(run, tmp, model, spec, window):
    cfg, w, w64, rope = get_model(model)
    path = tmp / "model.bin"
    R.write_checkpoint(path, cfg, w)
    cbs, cent = install_codebooks(path, cfg, w, spec, SEEDS[model],
                                  use_c=len(cq_configs(spec)) == 1 and window == 5)
    ids = stream(cfg)
    length = LENGTH[model]
    kv, got = run_ppl(run, tmp, path, ids, spec, window=window, length=length, cent=cent,
                      vocab=cfg["vocab_size"])
    ref, _ = compare(got, cfg, w, w64, rope, ids, spec, window, length, cbs,
                     what="%s -k %s -w %d" % (model, spec, window), exact=is_exact(model))
    if spec.startswith("fp16") or spec.endswith("fp16"):
        # fp16 moves the logits by a few 1e-4 only: make sure the comparison can see it
        ref32 = CR.ppl_logits(cfg, w, ids, "fp32", L=length, w64=w64, rope=rope)[0]
        effect = CR.row_errors(ref, ref32).max()
        err = CR.row_errors(got, ref).max()
        assert effect > 20 * err, "fp16 effect %.3g is not far above the error %.3g" % (effect, err)


TIE_TYPES = [("q8", 8), ("q4", 4), ("q2", 2), ("q1", 1), ("kivi4", 4), ("kivi2", 2)]


@pytest.mark.parametrize("spec,bits", TIE_TYPES, ids=[t for t, _ in TIE_TYPES])
def test_rounding_ties_go_away_from_zero(run, tmp, monkeypatch, spec, bits):
    """Values built so that about a thousand codes lie exactly halfway between two levels
    (cache_reference.tie_model): roundf semantics, no flip allowed."""
    cfg, w = CR.tie_model(3, bits)
    path = tmp / "model.bin"
    R.write_checkpoint(path, cfg, w)
    ids = stream(cfg, 40, seed=0)
    w64, rope = CR.to64(w), CR.rope_table(cfg)
    _, got = run_ppl(run, tmp, path, ids, spec, vocab=cfg["vocab_size"])
    ref, _ = compare(got, cfg, w, w64, rope, ids, spec, what="ties -k %s" % spec, exact=True)
    dec = CR.ppl_logits(cfg, w, ids, spec, w64=w64, rope=rope)[1]
    ties = sum(1 for m, did, _ in dec.near if m == 0 and did[2] == "v")
    assert ties > 500, "the model should produce exact ties (%d)" % ties
    # the test can tell the rounding modes apart: half-to-even moves the logits a lot
    monkeypatch.setattr(CR, "round_away", np.rint)
    even = CR.ppl_logits(cfg, w, ids, spec, w64=w64, rope=rope)[0]
    assert CR.row_errors(even, ref).max() > 100 * TOL


def test_window_covering_everything_is_fp32(run, tmp):
    """-w at least as long as the context: every position is read in full precision."""
    cfg, w, w64, rope = get_model("gqa")
    path = tmp / "model.bin"
    R.write_checkpoint(path, cfg, w)
    ids = stream(cfg, 30)
    _, ref = run_ppl(run, tmp, path, ids, "fp32", vocab=cfg["vocab_size"])
    for spec in ["fp16", "q8", "q1", "kivi2", "cq2c4b", "cq1c3b:q2", "fp32:cq16c4b"]:
        if GPU and cpu_only(spec):
            continue  # (their clean error is checked with the other tests of those types)
        cbs, cent = install_codebooks(path, cfg, w, spec, 7)
        for win in (31, 80):
            _, got = run_ppl(run, tmp, path, ids, spec, window=win, vocab=cfg["vocab_size"])
            err = CR.row_errors(got, ref).max()
            assert err <= 1e-6, "-k %s -w %d differs from fp32 by %.3g" % (spec, win, err)


WIDE_KW = dict(dim=64, hidden_dim=96, n_layers=2, n_heads=8, n_kv_heads=2, head_size=64,
               vocab_size=64, seq_len=80)


@pytest.mark.parametrize("spec,window", [("q4", 0), ("kivi2", 9), ("cq2c4b", 0), ("cq4c3b:cq2c4b", 0),
                                         ("cq8c4b", 10), ("q8:cq4c4b", 0)])
def test_parallel_attention(run, tmp, monkeypatch, spec, window):
    """Heads x head_size x positions large enough for kv_attend to split the positions among
    threads (3 threads: uneven ranges); the per-thread accumulators are added up."""
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    if "wide" not in _models:
        cfg, w = R.random_model(105, **WIDE_KW)
        _models["wide"] = (cfg, w, CR.to64(w), CR.rope_table(cfg))
    cfg, w, w64, rope = _models["wide"]
    path = tmp / "model.bin"
    R.write_checkpoint(path, cfg, w)
    cbs, _ = install_codebooks(path, cfg, w, spec, 17)
    ids = stream(cfg, 72, seed=21)
    _, got = run_ppl(run, tmp, path, ids, spec, window=window, vocab=cfg["vocab_size"])
    compare(got, cfg, w, w64, rope, ids, spec, window, None, cbs,
            what="wide -k %s -w %d (3 threads)" % (spec, window))


DECODE_SHAPES = [
    # head_size, keys: the decode path's kernels are compiled for head sizes 64 and 128 with
    # c = 2, 4, 8; any other shape takes the general kernel, padded to whole 8-float vectors
    # when head_size is not a multiple of 8 (12, 20); heads over 64 channels are scored in
    # pieces of 8 vectors (128: two whole pieces, 72: a whole piece and one vector)
    (64, "cq8c4b"), (64, "cq4c4b"), (64, "cq2c5b"), (128, "cq8c3b"), (128, "cq2c3b"),
    (40, "cq8c4b"), (12, "cq4c4b"), (12, "cq2c4b"), (20, "cq4c3b"), (64, "cq16c3b"),
    (72, "cq8c4b"), (72, "cq4c3b"),
]


@pytest.mark.parametrize("head_size,spec", DECODE_SHAPES, ids=["hs%d-%s" % s for s in DECODE_SHAPES])
def test_decode_path_shapes(run, tmp, head_size, spec):
    """The fast CQ kernels on every shape they are compiled for (keys and values), GQA with 3
    query heads per kv head, 40 positions (5 blocks of 8) and 37 (a partial block): equal to the
    reference path and to the numpy reference."""
    key = "shape%d" % head_size
    if key not in _models:
        cfg, w = R.random_model(300 + head_size, dim=24, hidden_dim=32, n_layers=2, n_heads=6,
                                n_kv_heads=2, head_size=head_size, vocab_size=48, seq_len=40)
        _models[key] = (cfg, w, CR.to64(w), CR.rope_table(cfg))
    cfg, w, w64, rope = _models[key]
    path = tmp / "model.bin"
    R.write_checkpoint(path, cfg, w)
    cbs, _ = install_codebooks(path, cfg, w, spec, 23)
    for n in (40, 37):
        ids = stream(cfg, n - 1, seed=n)
        fast_and_ref(run, tmp, path, ids, spec, cfg, "head_size %d -k %s, %d positions" % (head_size, spec, n),
                     lambda got, what: compare(got, cfg, w, w64, rope, ids, spec, 0, None, cbs,
                                               tol=TOL_CQ_PATHS, what=what)[1])


VALUE_HEAD_CASES = [
    # n_heads, n_kv_heads, head_size, spec: cq_value_sums takes the query heads of a kv head
    # 1, 2 or 3 at a time (R = 1, 2, 3; R = 4, 5 and 7 in passes of 3, the last one padded
    # with zero weights), over head sizes with their own kernels (64, 128)
    # and the general one (72: a whole piece of 8 vectors and one more)
    (2, 2, 64, "cq8c4b"), (4, 2, 64, "cq4c4b"), (8, 2, 64, "cq2c4b"), (5, 1, 64, "cq8c4b"),
    (7, 1, 128, "cq4c3b"), (4, 1, 128, "cq8c4b"), (5, 1, 72, "cq8c4b"), (7, 1, 72, "cq4c3b"),
]


@pytest.mark.parametrize("n_heads,n_kv_heads,head_size,spec", VALUE_HEAD_CASES,
                         ids=["H%d-KVH%d-hs%d-%s" % c for c in VALUE_HEAD_CASES])
def test_value_sums_query_heads(run, tmp, n_heads, n_kv_heads, head_size, spec):
    """Values through codes with 1 to 7 query heads per kv head, against the reference."""
    key = "heads%d_%d_%d" % (n_heads, n_kv_heads, head_size)
    if key not in _models:
        cfg, w = R.random_model(400 + n_heads * 10 + head_size, dim=24, hidden_dim=32, n_layers=1,
                                n_heads=n_heads, n_kv_heads=n_kv_heads, head_size=head_size,
                                vocab_size=48, seq_len=40)
        _models[key] = (cfg, w, CR.to64(w), CR.rope_table(cfg))
    cfg, w, w64, rope = _models[key]
    path = tmp / "model.bin"
    R.write_checkpoint(path, cfg, w)
    cbs, _ = install_codebooks(path, cfg, w, spec, 37)
    ids = stream(cfg, 36, seed=3)
    what = "%d query heads, %d kv heads, head_size %d, -k %s" % (n_heads, n_kv_heads, head_size, spec)
    fast_and_ref(run, tmp, path, ids, spec, cfg, what,
                 lambda got, what: compare(got, cfg, w, w64, rope, ids, spec, 0, None, cbs,
                                           tol=TOL_CQ_PATHS, what=what)[1])


def test_cq1_smollm_head_shape(run, tmp):
    """cq1 (8c8b) with SmolLM2's head shape (64 channels, 3 query heads per kv head) past 256
    positions (two chunks of kv_attend): the kernels specialised for that shape (64/8 for keys
    and values)."""
    if "smol_shape" not in _models:
        cfg, w = R.random_model(64, dim=24, hidden_dim=32, n_layers=1, n_heads=6, n_kv_heads=2,
                                head_size=64, vocab_size=48, seq_len=300)
        _models["smol_shape"] = (cfg, w, CR.to64(w), CR.rope_table(cfg))
    cfg, w, w64, rope = _models["smol_shape"]
    path = tmp / "model.bin"
    R.write_checkpoint(path, cfg, w)
    cbs, _ = install_codebooks(path, cfg, w, "cq1", 29)
    ids = stream(cfg, 289, seed=5)
    fast_and_ref(run, tmp, path, ids, "cq1", cfg, "head_size 64, R = 3, -k cq1, 290 positions",
                 lambda got, what: compare(got, cfg, w, w64, rope, ids, "cq1", 0, None, cbs,
                                           tol=TOL_CQ_PATHS, what=what)[1])


@pytest.mark.parametrize("spec", ["fp32", "q4", "cq8c4b", "cq2c4b:cq4c4b"])
def test_long_context_online_softmax(run, tmp, spec):
    """600 positions: three chunks of kv_attend's online softmax (ATTN_CHUNK = 256), with
    attention scores scaled up (q and k weights x6) so that later chunks raise the running
    maximum by more than MAX_LAG and the sums are rescaled."""
    if "long" not in _models:
        cfg, w = R.random_model(77, dim=16, hidden_dim=24, n_layers=1, n_heads=4, n_kv_heads=2,
                                head_size=8, vocab_size=40, seq_len=640)
        w["wq"] = w["wq"] * np.float32(6.0)
        w["wk"] = w["wk"] * np.float32(6.0)
        _models["long"] = (cfg, w, CR.to64(w), CR.rope_table(cfg))
    cfg, w, w64, rope = _models["long"]
    path = tmp / "model.bin"
    R.write_checkpoint(path, cfg, w)
    cbs, _ = install_codebooks(path, cfg, w, spec, 31, key_scale=6.0)  # CQ keys as large as the model's
    ids = stream(cfg, 599, seed=12)
    fast_and_ref(run, tmp, path, ids, spec, cfg, "600 positions -k %s" % spec,
                 lambda got, what: compare(got, cfg, w, w64, rope, ids, spec, 0, None, cbs, what=what)[1],
                 tol=TOL)  # scores of +-100: their rounding moves the weights by more than 1e-5


# ------------------------------------------------------------------------------------------
# 2. the fast kernels and the reference path, both equal to the numpy reference

PATH_CASES = [
    ("mha", "cq2c4b", 0), ("mha", "cq8c4b", 0), ("mha", "cq4", 0), ("mha", "cq2c10b", 0),
    ("mha", "cq1c3b", 0), ("mha", "cq2c4b:q8", 5),
    ("gqa", "cq4c3b", 0), ("gqa", "cq16c4b", 0), ("gqa", "cq4c3b", 7), ("gqa", "cq8c3b:cq2c4b", 0),
    ("exact_gqa", "cq2c4b", 0), ("exact_gqa", "cq8c3b", 3), ("exact_mha", "cq4c4b", 0),
]


@pytest.mark.parametrize("model,spec,window", PATH_CASES,
                         ids=["%s-%s-w%d" % c for c in PATH_CASES])
def test_fast_kernels_match_reference(run, tmp, model, spec, window):
    """--kernels fast and ref: keys and values through codes, and through the full-precision
    window where there is one (up to 71 positions), equal to each other and to numpy."""
    cfg, w, w64, rope = get_model(model)
    path = tmp / "model.bin"
    R.write_checkpoint(path, cfg, w)
    cbs, cent = install_codebooks(path, cfg, w, spec, SEEDS[model] + 1)
    ids = stream(cfg, seed=9)
    length = LENGTH[model]
    fast_and_ref(run, tmp, path, ids, spec, cfg, "%s -k %s -w %d" % (model, spec, window),
                 lambda got, what: compare(got, cfg, w, w64, rope, ids, spec, window, length, cbs,
                                           tol=TOL_CQ_PATHS, exact=is_exact(model), what=what)[1],
                 window=window, length=length)


# ------------------------------------------------------------------------------------------
# 3. a codebook holding every key and value reproduces the fp32 cache

def captured_vectors(cfg, w, w64, rope, ids, length):
    """Pre-RoPE keys and values of every layer and row, from the fp32 reference:
    dict (layer, side) -> (n_rows, kv_dim) float32."""
    _, _, cap = CR.ppl_logits(cfg, w, ids, "fp32", L=length, capture=True, w64=w64, rope=rope)
    out = {}
    for row, l, k, v in cap:
        out.setdefault((l, 0), []).append(k)
        out.setdefault((l, 1), []).append(v)
    return {key: np.array(vs, dtype=np.float32) for key, vs in out.items()}


def covering_codebooks(cfg, vecs, c, b, seed):
    """Codebooks (L, 2, G, 2^b, c) whose centroids include every captured group vector;
    the free entries are far-away random vectors (no group vector is near them)."""
    L, G, K = cfg["n_layers"], CR.n_groups(cfg, c), 1 << b
    rng = np.random.default_rng(seed)
    cb = np.empty((L, 2, G, K, c), np.float32)
    min_sep = np.inf
    for (l, side), X in vecs.items():
        for g in range(G):
            uniq = np.unique(X[:, g * c:(g + 1) * c], axis=0)
            assert len(uniq) <= K, "%d distinct vectors for %d centroids" % (len(uniq), K)
            far = 100.0 + 10.0 * rng.standard_normal((K - len(uniq), c))
            entries = np.concatenate([uniq, far]).astype(np.float32)
            cb[l, side, g] = entries[rng.permutation(K)]
            if len(uniq) > 1:
                d = np.linalg.norm(uniq[:, None] - uniq[None], axis=2)
                d[np.arange(len(uniq)), np.arange(len(uniq))] = np.inf
                min_sep = min(min_sep, d.min() / max(np.abs(uniq).max(), 1e-30))
    return cb, min_sep


EXACT_CB_CASES = [
    # model, c, b, positions, -c file?
    ("mha", 8, 4, 16, False),     # c = head_size; 16 positions = 16 centroids
    ("mha", 2, 4, 16, True),
    ("mha", 1, 4, 16, False),
    ("mha", 8, 5, 20, True),      # 20 vectors and 12 far-away fillers: decode path
    ("gqa", 16, 4, 16, False),
    ("gqa", 4, 5, 25, False),
    ("gqa", 2, 10, 40, True),     # 16-bit codes
]


@pytest.mark.parametrize("model,c,b,n,use_c", EXACT_CB_CASES,
                         ids=["%s-%dc%db-n%d" % c[:4] for c in EXACT_CB_CASES])
def test_codebook_with_every_vector_reproduces_fp32(run, tmp, model, c, b, n, use_c):
    cfg, w, w64, rope = get_model(model)
    path = tmp / "model.bin"
    R.write_checkpoint(path, cfg, w)
    # n positions: bos and n-1 distinct other tokens, so that no two rows share a layer-0 key
    rng = np.random.default_rng(c * 100 + b)
    others = [t for t in range(cfg["vocab_size"]) if t != cfg["bos_id"]]
    ids = [int(t) for t in rng.choice(others, size=n - 1, replace=False)]
    length = n  # one window [bos] + ids
    vecs = captured_vectors(cfg, w, w64, rope, ids, length)
    cb, min_sep = covering_codebooks(cfg, vecs, c, b, seed=b)
    assert min_sep > 1e-5, "two captured vectors are too close (%.3g) for this test" % min_sep
    spec = "cq%dc%db" % (c, b)
    cent = tmp / "every.cent" if use_c else CR.default_centroid_path(path, c, b)
    CR.write_centroids(cent, cfg, w, c, b, cb)
    _, ref = run_ppl(run, tmp, path, ids, "fp32", length=length, vocab=cfg["vocab_size"])
    for kernels in ("fast", "ref"):
        _, got = run_ppl(run, tmp, path, ids, spec, length=length, kernels=kernels,
                         cent=cent if use_c else None, vocab=cfg["vocab_size"])
        err = CR.row_errors(got, ref).max()
        assert err <= 1e-5, "-k %s --kernels %s: logits differ from -k fp32 by %.3g" % (spec, kernels, err)


@pytest.mark.parametrize("c,b", [(2, 5), (4, 5), (2, 9)])
def test_cq_ties_take_the_first_centroid(run, tmp, c, b):
    """Exact model: for every key and value group vector x the codebook holds x + d and
    x - d (d = +-1/8 per channel, in random order): two centroids at exactly the same
    distance, computed without rounding by both programs.  The first index must win.
    With b = 9 the two sit 256 entries apart, in the two chunks run.c's encoder scans."""
    model = "exact_gqa"
    cfg, w, w64, rope = get_model(model)
    path = tmp / "model.bin"
    R.write_checkpoint(path, cfg, w)
    rng = np.random.default_rng(40 + c)
    others = [t for t in range(cfg["vocab_size"]) if t != cfg["bos_id"]]
    ids = [int(t) for t in rng.choice(others, size=15, replace=False)]
    vecs = captured_vectors(cfg, w, w64, rope, ids, 16)
    L, G, K = cfg["n_layers"], CR.n_groups(cfg, c), 1 << b
    cb = np.empty((L, 2, G, K, c), np.float32)
    for (l, side), X in vecs.items():
        for g in range(G):
            uniq = np.unique(X[:, g * c:(g + 1) * c], axis=0)
            entries = []
            for x in uniq:
                d = rng.choice([-0.125, 0.125], size=c)
                pair = [x + d, x - d]
                entries += pair if rng.random() < 0.5 else pair[::-1]
            fill = list(100.0 + rng.integers(-50, 50, size=(K - len(entries), c)))
            if K > 256:  # first of each pair in entries 0.., second in 256..
                entries = entries[0::2] + fill[:256 - len(uniq)] + entries[1::2] + fill[256 - len(uniq):]
            else:
                entries += fill
            cb[l, side, g] = np.array(entries, np.float32)
    spec = "cq%dc%db" % (c, b)
    CR.write_centroids(CR.default_centroid_path(path, c, b), cfg, w, c, b, cb)
    ref, dec, _ = CR.ppl_logits(cfg, w, ids, spec, L=16, codebooks=cb, w64=w64, rope=rope)
    ties = sum(1 for m, _, _ in dec.near if m == 0)
    assert ties >= 16 * G, "every group should be a tie (%d)" % ties
    for kernels in ("fast", "ref"):
        _, got = run_ppl(run, tmp, path, ids, spec, length=16, kernels=kernels, vocab=cfg["vocab_size"])
        compare(got, cfg, w, w64, rope, ids, spec, 0, 16, cb, exact=True,
                what="ties -k %s --kernels %s" % (spec, kernels))


# ------------------------------------------------------------------------------------------
# 4. centroid file and -k validation

@pytest.fixture(scope="module")
def val_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("cqval")
    cfg, w, _, _ = get_model("mha")      # 2 layers, 4 kv heads, head_size 8
    path = d / "model.bin"
    R.write_checkpoint(path, cfg, w)
    (d / "ids.txt").write_text("3 4 5 6 7\n")
    return d, path, cfg, w


def val_run(run, val_model, spec, cent=None):
    d, path, cfg, w = val_model
    args = [path, "-m", "ppl", "-f", d / "ids.txt", "--ids", "-k", spec]
    if cent is not None:
        args += ["-c", cent]
    return run(*args)


def good_file(cfg, w, c=2, b=4, **header):
    """Bytes of a valid centroid file (header fields overridable)."""
    cb = CR.random_codebooks(cfg, c, b, 1)
    fields = dict(n_layers=cfg["n_layers"], n_kv_heads=cfg["n_kv_heads"],
                  head_size=cfg["head_size"], c=c, b=b, fp=CR.fingerprint(w))
    fields.update(header)
    return CR.centroid_header(**fields) + cb.astype("<f4").tobytes()


def test_valid_file_accepted(run, val_model, tmp):
    d, path, cfg, w = val_model
    f = tmp / "ok.cent"
    f.write_bytes(good_file(cfg, w))
    r = val_run(run, val_model, "cq2c4b", f)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().startswith("type=cq2c4b ")


def test_missing_file_names_export_command(run, val_model):
    d, path, cfg, w = val_model
    r = val_run(run, val_model, "cq2c5b")
    assert_clean_error(r)
    first = r.stderr.decode().splitlines()[0]
    assert "export.py centroids" in first, first
    assert CR.default_centroid_path(path, 2, 5) in first, first
    assert "cq2c5b" in first, first
    r = val_run(run, val_model, "cq2c4b", d / "nowhere.cent")
    assert_clean_error(r)
    assert "nowhere.cent" in r.stderr.decode().splitlines()[0]


def _other_model_fp(cfg):
    _, w2 = R.random_model(999, dim=cfg["dim"], hidden_dim=cfg["hidden_dim"],
                           n_layers=cfg["n_layers"], n_heads=cfg["n_heads"],
                           n_kv_heads=cfg["n_kv_heads"], vocab_size=cfg["vocab_size"],
                           seq_len=cfg["seq_len"])
    return CR.fingerprint(w2)


def bad_files(cfg, w):
    good = good_file(cfg, w)
    nan = bytearray(good)
    nan[-4:] = np.array([np.nan], "<f4").tobytes()          # last value of the last layer's V
    nan_k = bytearray(good)
    nan_k[CR.CQCB_HEADER_BYTES + 8:CR.CQCB_HEADER_BYTES + 12] = np.array([np.inf], "<f4").tobytes()
    return {
        "magic": good_file(cfg, w, magic=0x42435144),
        "version": good_file(cfg, w, version=2),
        "fingerprint": good_file(cfg, w, fp=_other_model_fp(cfg)),
        "fingerprint_plus_one": good_file(cfg, w, fp=CR.fingerprint(w) + 1),
        "n_layers": good_file(cfg, w, n_layers=3),
        "n_kv_heads": good_file(cfg, w, n_kv_heads=2),
        "head_size": good_file(cfg, w, head_size=16),
        "c_mismatch": good_file(cfg, w, c=4, b=4),
        "b_mismatch": good_file(cfg, w, c=2, b=3),
        "truncated": good[:-4],
        "truncated_one_byte": good[:-1],
        "truncated_header": good[:30],
        "empty": b"",
        "extra_bytes": good + b"\0\0\0\0",
        "nan_values": bytes(nan),
        "inf_keys": bytes(nan_k),
    }


BAD_FILE_NAMES = ["magic", "version", "fingerprint", "fingerprint_plus_one", "n_layers",
                  "n_kv_heads", "head_size", "c_mismatch", "b_mismatch", "truncated",
                  "truncated_one_byte", "truncated_header", "empty", "extra_bytes",
                  "nan_values", "inf_keys"]


@pytest.mark.parametrize("which", BAD_FILE_NAMES)
@pytest.mark.parametrize("how", ["c_flag", "default_name"])
def test_bad_centroid_file(run, val_model, tmp, which, how):
    d, path, cfg, w = val_model
    data = bad_files(cfg, w)[which]
    if how == "c_flag":
        f = tmp / "bad.cent"
        f.write_bytes(data)
        r = val_run(run, val_model, "cq2c4b", f)
    else:
        # a model of its own in tmp, so that the default name is private to this test
        m = tmp / "m.bin"
        m.write_bytes(path.read_bytes())
        with open(CR.default_centroid_path(m, 2, 4), "wb") as f:
            f.write(data)
        r = run(m, "-m", "ppl", "-f", d / "ids.txt", "--ids", "-k", "cq2c4b")
    assert_clean_error(r)


@pytest.mark.parametrize("spec", ["cq3c8b", "cq8c0b", "cq8c17b", "cq16c8b", "cqx", "cq",
                                  "cq2c4", "cq0c4b", "cq2c4bb", "cq-2c4b", "cq2c4b:",
                                  ":cq2c4b", "q3", "cq2c4b:cq3c4b", "fp32:cq16c8b"])
def test_bad_kv_spec(run, val_model, tmp, spec):
    d, path, cfg, w = val_model
    f = tmp / "any.cent"
    f.write_bytes(good_file(cfg, w))
    for cent in (None, f):
        r = val_run(run, val_model, spec, cent)
        assert_clean_error(r)


def test_default_name_without_bin_suffix(run, val_model, tmp):
    d, path, cfg, w = val_model
    m = tmp / "weights.ckpt"
    m.write_bytes(path.read_bytes())
    (tmp / "weights.ckpt.2c4b.cent").write_bytes(good_file(cfg, w))
    r = run(m, "-m", "ppl", "-f", d / "ids.txt", "--ids", "-k", "cq2c4b")
    assert r.returncode == 0, r.stderr


def test_c_flag_wins_over_default_name(run, val_model, tmp):
    d, path, cfg, w = val_model
    m = tmp / "m.bin"
    m.write_bytes(path.read_bytes())
    with open(CR.default_centroid_path(m, 2, 4), "wb") as f:
        f.write(b"garbage")
    (tmp / "ok.cent").write_bytes(good_file(cfg, w))
    r = run(m, "-m", "ppl", "-f", d / "ids.txt", "--ids", "-k", "cq2c4b", "-c", tmp / "ok.cent")
    assert r.returncode == 0, r.stderr
    r = run(m, "-m", "ppl", "-f", d / "ids.txt", "--ids", "-k", "cq2c4b")
    assert_clean_error(r)


def test_one_c_file_for_two_cq_configs(run, val_model, tmp):
    d, path, cfg, w = val_model
    f = tmp / "one.cent"
    f.write_bytes(good_file(cfg, w))
    r = val_run(run, val_model, "cq2c4b:cq4c3b", f)
    assert_clean_error(r)
    # the same configuration on both sides is fine with -c
    r = val_run(run, val_model, "cq2c4b:cq2c4b", f)
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------------------------------
# 5. bits per channel and bytes per token

BITS_SPECS = ["fp32", "fp16", "q8", "q4", "q2", "q1", "kivi4", "kivi2", "cq4", "cq2", "cq1",
              "cq2c4b", "cq4c3b", "cq1c3b", "cq2c10b", "cq8c4b", "cq8c12b",
              "cq4c3b:q4", "fp16:cq2c4b", "q8:fp32", "kivi2:kivi4", "cq1:cq4"]
EXPECTED_BITS = {"fp32": 32, "fp16": 16, "q8": 8.5, "q4": 5, "q2": 3, "q1": 2, "kivi4": 5,
                 "kivi2": 3}


def expected_bits(name):
    if name in EXPECTED_BITS:
        return EXPECTED_BITS[name]
    c, b = {"cq4": (2, 8), "cq2": (4, 8), "cq1": (8, 8)}.get(name, (None, None))
    if c is None:
        c, b = map(int, re.fullmatch(r"cq(\d+)c(\d+)b", name).groups())
    return b / c


@pytest.mark.parametrize("spec", BITS_SPECS)
def test_bits_and_bytes(run, tmp, spec):
    cfg, w, _, _ = get_model("mha")
    path = tmp / "model.bin"
    R.write_checkpoint(path, cfg, w)
    install_codebooks(path, cfg, w, spec, 3)
    kv, _ = run_ppl(run, tmp, path, [5, 6, 7], spec, vocab=cfg["vocab_size"])
    kname, _, vname = spec.partition(":")
    vname = vname or kname
    bits = (expected_bits(kname) + expected_bits(vname)) / 2
    kv_dim = cfg["n_kv_heads"] * cfg["head_size"]
    nbytes = bits / 8 * kv_dim * cfg["n_layers"] * 2
    fp32_bytes = 4.0 * kv_dim * cfg["n_layers"] * 2
    assert kv["type"] == (kname if kname == vname else spec)
    assert kv["bits_per_channel"] == "%.3f" % bits, (kv, bits)
    assert kv["kv_bytes_per_token"] == "%.1f" % nbytes, (kv, nbytes)
    assert kv["ratio_fp32"] == "%.4f" % (nbytes / fp32_bytes), kv
    # the reference module's formulas say the same
    assert CR.spec_bits(spec) == pytest.approx(bits)
    assert CR.spec_bytes_per_token(spec, cfg) == pytest.approx(nbytes)


# ------------------------------------------------------------------------------------------
# 6. --kl

def scored_rows(n_ids, length):
    """Indices of the logits rows that score a token (all but each window's last row)."""
    rows, r = [], 0
    for start in range(0, n_ids, length - 1):
        m = min(length - 1, n_ids - start)
        rows += list(range(r, r + m))
        r += m + 1
    return np.array(rows)


def log_softmax(x):
    m = x.max(axis=1, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


KL_CASES = [("gqa", "q4", 0), ("gqa", "kivi2", 0), ("gqa", "cq2c4b", 0), ("gqa", "cq4c3b:q8", 6),
            ("mha", "q1", 0), ("mha", "cq1c3b", 3), ("exact_gqa", "fp16", 0), ("mha", "fp32", 0)]


@pytest.mark.parametrize("model,spec,window", KL_CASES, ids=["%s-%s-w%d" % c for c in KL_CASES])
def test_kl(run, tmp, model, spec, window):
    cfg, w, _, _ = get_model(model)
    path = tmp / "model.bin"
    R.write_checkpoint(path, cfg, w)
    install_codebooks(path, cfg, w, spec, 11)
    ids = stream(cfg, 60, seed=13)
    length = 25                                  # three windows
    V = cfg["vocab_size"]
    kv, q = run_ppl(run, tmp, path, ids, spec, window=window, length=length, kl=True, vocab=V)
    _, q_nokl = run_ppl(run, tmp, path, ids, spec, window=window, length=length, vocab=V)
    _, p = run_ppl(run, tmp, path, ids, "fp32", length=length, vocab=V)
    # the side-by-side fp32 cache does not disturb the one under test
    assert np.array_equal(q, q_nokl)
    rows = scored_rows(len(ids), length)
    assert int(kv["tokens"]) == len(rows) == len(ids)
    lp, lq = log_softmax(p[rows]), log_softmax(q[rows])
    kl = float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=1)))
    got = float(kv["kl"])
    assert abs(got - kl) <= 1e-6 + 1e-5 * abs(kl), (got, kl)
    # nll from the same logits
    targets = np.array(ids)
    nll = float(-np.mean(lq[np.arange(len(rows)), targets]))
    assert float(kv["nll"]) == pytest.approx(nll, rel=1e-5, abs=2e-6)
    if spec == "fp32":
        assert abs(got) <= 1e-6
    else:
        assert kl > 1e-8, "the type should differ measurably from fp32 (kl %.3g)" % kl
