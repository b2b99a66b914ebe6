"""Tests of the core program against the independent numpy reference (tests/reference.py).

Covers: logits and perplexity (both checkpoint formats, MHA/GQA/MQA, separate classifier,
head_size != dim/n_heads, rope_theta, norm_eps, bos id), the tokenizer (encode hook and
decoding through generate), stories260K greedy generation and perplexity, the sampler
(replayed on the logits the program writes), every error path, and bench mode.
"""

import math
import os
import struct

import numpy as np
import pytest

from conftest import (DATA, GPU, STORIES, TOK512, R, assert_clean_error, needs_stories,
                      needs_tok512, needs_wikitext)

REL_LOGITS = 1e-4


# ------------------------------------------------------------------------------------------
# helpers

def save_model(path, seed, legacy=False, **kw):
    cfg, w = R.random_model(seed, **kw)
    R.write_checkpoint(path, cfg, w, legacy=legacy)
    # the reference reads the file back: checks the writer and gives the weights as stored
    cfg2, w2 = R.read_checkpoint(path)
    assert cfg2 == cfg
    for k in w:
        assert np.array_equal(w[k], w2[k]), k
    return cfg2, w2


def parse_kv(line):
    out = {}
    for part in line.split():
        k, _, v = part.partition("=")
        out[k] = v
    return out


def read_logits(path, vocab):
    a = np.fromfile(path, dtype="<f4")
    assert a.size % vocab == 0, "logits file size %d is not a multiple of vocab %d" % (a.size, vocab)
    return a.reshape(-1, vocab)


def rel_err(got, ref):
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


def run_ppl_ids(run, tmp, model, ids, length=None, extra=()):
    f = tmp / "ids.txt"
    f.write_text(" ".join(map(str, ids)) + "\n")
    lf = tmp / "logits.bin"
    args = [model, "-m", "ppl", "-f", f, "--ids", "--logits", lf, "-k", "fp32"]
    if length is not None:
        args += ["-l", length]
    r = run(*args, *extra, check=True)
    lines = r.stdout.decode().strip().splitlines()
    assert len(lines) == 1, r.stdout
    return parse_kv(lines[0]), lf


def check_ppl(kv, ref_nll, ref_ppl, n_tokens):
    assert int(kv["tokens"]) == n_tokens
    assert kv["type"] == "fp32"
    nll, ppl = float(kv["nll"]), float(kv["ppl"])
    assert nll == pytest.approx(ref_nll, rel=1e-5, abs=2e-6), (nll, ref_nll)
    assert ppl == pytest.approx(ref_ppl, rel=1e-5, abs=2e-6), (ppl, ref_ppl)


def encode_ids(run, model, tok, text=None, file=None):
    args = [model, "-z", tok, "-m", "encode"]
    if file is not None:
        args += ["-f", file]
    else:
        args += ["-i", text]
    r = run(*args, check=True)
    lines = r.stdout.decode().splitlines()
    assert len(lines) == 1, r.stdout
    return [int(x) for x in lines[0].split()]


# ------------------------------------------------------------------------------------------
# logits and perplexity on random models

BASE = dict(dim=32, hidden_dim=80, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=97, seq_len=24)

MODELS = {
    "mha_cqkv": (dict(BASE), False),
    "mha_legacy": (dict(BASE), True),
    "gqa_cqkv": (dict(BASE, n_layers=3, n_heads=8, n_kv_heads=2, hidden_dim=64, vocab_size=64), False),
    "gqa_legacy": (dict(BASE, n_heads=8, n_kv_heads=4), True),
    "mqa_legacy": (dict(BASE, dim=48, hidden_dim=100, n_heads=6, n_kv_heads=1), True),
    "sepcls_cqkv": (dict(BASE, n_kv_heads=2, shared_classifier=False), False),
    "sepcls_legacy": (dict(BASE, n_kv_heads=2, shared_classifier=False), True),
    "hs_smaller_cqkv": (dict(BASE, dim=48, n_heads=4, n_kv_heads=2, head_size=8), False),
    "hs_larger_untied_cqkv": (dict(BASE, dim=24, n_heads=4, n_kv_heads=2, head_size=16,
                                   shared_classifier=False), False),
    "theta_500k_cqkv": (dict(BASE, n_kv_heads=2, rope_theta=500000.0), False),
    "theta_100_cqkv": (dict(BASE, rope_theta=100.0, head_size=16, n_heads=2, n_kv_heads=1), False),
    "eps_1e-2_cqkv": (dict(BASE, norm_eps=1e-2), False),
    "eps_1e-6_theta_1e6_cqkv": (dict(BASE, norm_eps=1e-6, rope_theta=1e6, n_kv_heads=1), False),
    "bos5_cqkv": (dict(BASE, bos_id=5, eos_id=6), False),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_logits_and_ppl_match_reference(run, tmp, name):
    kw, legacy = MODELS[name]
    model = tmp / "m.bin"
    cfg, w = save_model(model, seed=len(name), legacy=legacy, **kw)
    rng = np.random.default_rng(7)
    ids = rng.integers(0, cfg["vocab_size"], size=31).tolist()   # 2 windows at L = seq_len
    kv, lf = run_ppl_ids(run, tmp, model, ids)
    nll, ppl, n, rows = R.perplexity(cfg, w, ids)
    got = read_logits(lf, cfg["vocab_size"])
    assert got.shape == rows.shape
    err = rel_err(got, rows)
    assert err < REL_LOGITS, "logits differ from the reference: rel err %.3g" % err
    check_ppl(kv, nll, ppl, n)


@pytest.mark.parametrize("length", [2, 3, 5, 11, 24])
def test_ppl_windows(run, tmp, length):
    """-l smaller than the stream: several windows, each [bos] + chunk from an empty cache."""
    model = tmp / "m.bin"
    cfg, w = save_model(model, seed=3, **dict(BASE, n_kv_heads=2))
    ids = np.random.default_rng(length).integers(0, cfg["vocab_size"], size=37).tolist()
    kv, lf = run_ppl_ids(run, tmp, model, ids, length=length)
    nll, ppl, n, rows = R.perplexity(cfg, w, ids, L=length)
    n_windows = math.ceil(37 / (length - 1))
    assert rows.shape[0] == 37 + n_windows
    got = read_logits(lf, cfg["vocab_size"])
    assert got.shape == rows.shape
    assert rel_err(got, rows) < REL_LOGITS
    check_ppl(kv, nll, ppl, n)


@pytest.mark.parametrize("batch", [2, 4, 9])
def test_ppl_windows_side_by_side(run, tmp, monkeypatch, batch):
    """-m ppl -b B: B windows decoded side by side (6 windows: the last group partly idle with
    B = 4, B = 9 cut to 6; the last window shorter) give the reference's logits in window
    order; on the CPU with one thread exactly those of -b 1."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    model = tmp / "m.bin"
    cfg, w = save_model(model, seed=5, **dict(BASE, n_kv_heads=2))
    ids = np.random.default_rng(batch).integers(0, cfg["vocab_size"], size=37).tolist()
    nll, ppl, n, rows = R.perplexity(cfg, w, ids, L=8)
    kv1, lf = run_ppl_ids(run, tmp, model, ids, length=8)
    one = read_logits(lf, cfg["vocab_size"]).copy()
    kv, lf = run_ppl_ids(run, tmp, model, ids, length=8, extra=("-b", batch))
    got = read_logits(lf, cfg["vocab_size"])
    assert got.shape == rows.shape
    assert rel_err(got, rows) < REL_LOGITS
    check_ppl(kv, nll, ppl, n)
    if not GPU:
        assert np.array_equal(got, one) and kv == kv1


def test_ppl_single_token_stream(run, tmp):
    model = tmp / "m.bin"
    cfg, w = save_model(model, seed=4, **BASE)
    kv, lf = run_ppl_ids(run, tmp, model, [17])
    nll, ppl, n, rows = R.perplexity(cfg, w, [17])
    assert read_logits(lf, cfg["vocab_size"]).shape == (2, cfg["vocab_size"])
    check_ppl(kv, nll, ppl, 1)


def test_formats_agree(run, tmp):
    """The same weights in the legacy and the CQKV file give the same logits."""
    cfg, w = R.random_model(11, **dict(BASE, n_kv_heads=2, shared_classifier=False))
    R.write_checkpoint(tmp / "a.bin", cfg, w, legacy=True)
    R.write_checkpoint(tmp / "b.bin", cfg, w, legacy=False)
    ids = list(range(3, 40))
    (tmp / "a").mkdir()
    (tmp / "b").mkdir()
    _, la = run_ppl_ids(run, tmp / "a", tmp / "a.bin", ids)
    _, lb = run_ppl_ids(run, tmp / "b", tmp / "b.bin", ids)
    assert np.array_equal(np.fromfile(la, "<f4"), np.fromfile(lb, "<f4"))


# ------------------------------------------------------------------------------------------
# tokenizer: encoding through -m encode, decoding through generate with a forced prompt

ENCODE_STRINGS = [
    "Once upon a time",
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading and   repeated   spaces ",
    "a",
    " ",
    "line one\nline two\n\nthree\ttabbed",
    "She said, \"I want to play with you!\" and ran away.",
    "Caf\u00e9 cr\u00e8me, gr\u00fc\u00dfe, 10 \u20ac, \u4e2d\u6587",          # some in vocab, some not
    "\u00f1and\u00fa \u0416\u0438\u0437\u043d\u044c \u05e9\u05dc\u05d5\u05dd",  # absent: byte fallback
    "emoji \U0001F600 and \U0001F409 dragons",
    "#$%&*+/<=>@[\\]^_`{|}~ 0123456789",
    "control \x01\x02\x1b chars \x7f",
    "<0x41> <s> </s> <unk>",                               # piece names as plain text
    "the the the the the the the the the the the the",
]
ENCODE_BYTES = [
    b"\xff\xfe invalid utf8 \xc3",
    b"\x80\x80\x80\x80\x80\x80 lone continuations",
    b"\xe4\xb8 truncated three-byte \xf0\x9f\x98",
]


@pytest.fixture(scope="module")
def rand_tok_model(session_tmp):
    d = session_tmp / "randtok"
    d.mkdir(exist_ok=True)
    tok = R.random_tokenizer(512, seed=5)
    tok.save(d / "tok.bin")
    # separate classifier: with a tied one, random models soon repeat one token forever
    cfg, w = R.random_model(23, 32, 64, 2, 4, 2, 512, 64, shared_classifier=False)
    R.write_checkpoint(d / "m.bin", cfg, w)
    return d / "m.bin", d / "tok.bin", R.Tokenizer.load(d / "tok.bin", 512), cfg, w


@pytest.fixture(scope="module")
def tok512_model(session_tmp):
    d = session_tmp / "tok512"
    d.mkdir(exist_ok=True)
    cfg, w = R.random_model(22, 16, 32, 1, 2, 2, 512, 256)
    R.write_checkpoint(d / "m.bin", cfg, w, legacy=True)
    return d / "m.bin", TOK512, R.Tokenizer.load(TOK512, 512)


@needs_tok512
def test_encode_examples_tok512(run, tok512_model):
    model, tokp, tok = tok512_model
    assert tok.encode("Once upon a time") == [1, 403, 407, 261, 378]   # llama2c-compat.md
    assert encode_ids(run, model, tokp, "Once upon a time") == [1, 403, 407, 261, 378]
    assert encode_ids(run, model, tokp, "") == [1]


@needs_tok512
@pytest.mark.parametrize("i", range(len(ENCODE_STRINGS) + len(ENCODE_BYTES)))
def test_encode_tok512(run, tok512_model, i):
    model, tokp, tok = tok512_model
    s = (ENCODE_STRINGS + ENCODE_BYTES)[i]
    b = s.encode() if isinstance(s, str) else s
    assert encode_ids(run, model, tokp, b) == tok.encode(b)


@pytest.mark.parametrize("i", range(len(ENCODE_STRINGS) + len(ENCODE_BYTES)))
def test_encode_random_tokenizer(run, rand_tok_model, i):
    model, tokp, tok, _, _ = rand_tok_model
    s = (ENCODE_STRINGS + ENCODE_BYTES)[i]
    b = s.encode() if isinstance(s, str) else s
    assert encode_ids(run, model, tokp, b) == tok.encode(b)


def test_encode_file_random_tokenizer(run, tmp, rand_tok_model):
    model, tokp, tok, _, _ = rand_tok_model
    text = "\n".join(ENCODE_STRINGS).encode() + b"\n" + b"\n".join(ENCODE_BYTES) + b"\n"
    (tmp / "t.txt").write_bytes(text)
    assert encode_ids(run, model, tokp, file=tmp / "t.txt") == tok.encode(text)



def wikitext_prefix(n_bytes):
    """The first n_bytes of the WikiText-2 test text, cut back to whole UTF-8 characters."""
    text = (DATA / "wikitext2-test.raw.txt").read_bytes()[:n_bytes]
    return text[:len(text.decode("utf-8", errors="ignore").encode())]

@needs_tok512
@needs_wikitext
def test_encode_file_wikitext_tok512(run, tmp, tok512_model):
    """A long text (~12k tokens): the merge order over many pairs, many non-ASCII chars."""
    model, tokp, tok = tok512_model
    text = wikitext_prefix(20000)
    (tmp / "t.txt").write_bytes(text)
    got = encode_ids(run, model, tokp, file=tmp / "t.txt")
    ref = tok.encode(text)
    assert len(got) == len(ref)
    assert got == ref


def test_random_tokenizer_roundtrip():
    """Reference sanity: without byte fallback, decode(encode(s)) == s."""
    tok = R.random_tokenizer(512, seed=5)
    for s in ["hello world", "The quick brown fox.", "a\nb\tc", "Caf\u00e9 10 \u20ac"]:
        ids = tok.encode(s)
        assert tok.decode(ids[1:]) == s.encode()


@pytest.mark.parametrize("i", range(len(ENCODE_STRINGS) + len(ENCODE_BYTES)))
def test_decode_forced_prompt(run, rand_tok_model, i):
    model, tokp, tok, _, _ = rand_tok_model
    s = (ENCODE_STRINGS + ENCODE_BYTES)[i]
    b = s.encode() if isinstance(s, str) else s
    ids = tok.encode(b)
    if len(ids) < 2:
        pytest.skip("empty prompt")
    r = run(model, "-z", tokp, "-t", "0", "-n", len(ids) - 1, "-i", b, check=True)
    assert r.stdout == tok.decode(ids[1:]) + b"\n"


@needs_tok512
@pytest.mark.parametrize("i", range(len(ENCODE_STRINGS) + len(ENCODE_BYTES)))
def test_decode_forced_prompt_tok512(run, tok512_model, i):
    model, tokp, tok = tok512_model
    s = (ENCODE_STRINGS + ENCODE_BYTES)[i]
    b = s.encode() if isinstance(s, str) else s
    ids = tok.encode(b)
    if len(ids) < 2:
        pytest.skip("empty prompt")
    r = run(model, "-z", tokp, "-t", "0", "-n", len(ids) - 1, "-i", b, check=True)
    assert r.stdout == tok.decode(ids[1:]) + b"\n"


def test_tokenizer_with_more_pieces_than_vocab_is_refused(run, tmp):
    """The tokenizer file has no count of its pieces: a model with a smaller vocab would read
    its first V pieces and print plausible nonsense.  The trailing pieces make it an error that
    names both sizes."""
    small = R.random_tokenizer(400, seed=9)
    big = R.Tokenizer(small.pieces + [b"extra%d" % i for i in range(200)],
                      small.scores + [-1.0] * 200)
    big.save(tmp / "tok.bin")
    cfg, w = R.random_model(2, 16, 32, 1, 2, 1, 400, 32)
    R.write_checkpoint(tmp / "m.bin", cfg, w)
    for mode in (["-m", "encode", "-i", "hello"], ["-n", 4, "-t", 0]):
        r = run(tmp / "m.bin", "-z", tmp / "tok.bin", *mode)
        assert_clean_error(r)
        assert b"has 600 pieces" in r.stderr and b"vocabulary has 400" in r.stderr, r.stderr
    # the same file cut to 400 pieces is fine, and encodes as the reference does
    small.save(tmp / "tok400.bin")
    s = "hello there, the dog ran"
    assert encode_ids(run, tmp / "m.bin", tmp / "tok400.bin", s) == small.encode(s)
    # fewer pieces than the vocabulary: the count is named too
    r = run(tmp / "m.bin", "-z", err_tok(tmp, R.random_tokenizer(300, seed=9)), "-m", "encode", "-i", "a")
    assert_clean_error(r)
    assert b"has 300 pieces" in r.stderr and b"vocabulary has 400" in r.stderr, r.stderr
    # bytes after the last piece that are not whole pieces
    (tmp / "junk.bin").write_bytes((tmp / "tok400.bin").read_bytes() + b"\x01\x02\x03")
    r = run(tmp / "m.bin", "-z", tmp / "junk.bin", "-m", "encode", "-i", "a")
    assert_clean_error(r)
    assert b"3 bytes follow the 400 pieces" in r.stderr, r.stderr


def err_tok(tmp, tok, name="t.bin"):
    tok.save(tmp / name)
    return tmp / name


@needs_stories
def test_llama2_tokenizer_with_stories_is_refused(run):
    """The default -z tokenizer.bin (Llama 2's 32000 pieces) with stories260K (vocab 512)."""
    from conftest import REPO
    r = run(STORIES, "-z", REPO / "tokenizer.bin", "-n", 8, "-t", 0)
    assert_clean_error(r)
    assert b"has 32000 pieces" in r.stderr and b"vocabulary has 512" in r.stderr, r.stderr


# ------------------------------------------------------------------------------------------
# greedy generation and steps

def greedy_expected(cfg, w, tok, prompt_ids, steps, tie_margin=1e-3):
    """Expected stdout bytes, and whether it is only a prefix (a near tie was met)."""
    ids, margins = R.greedy_generate(cfg, w, prompt_ids, steps, bos=cfg["bos_id"])
    for k, m in enumerate(margins):
        if m is not None and m < tie_margin:
            return tok.decode(ids[:k], first_prev=prompt_ids[0], bos=cfg["bos_id"]), True
    return tok.decode(ids, first_prev=prompt_ids[0], bos=cfg["bos_id"]) + b"\n", False


def check_generate(r, expected, prefix_only):
    if prefix_only:
        assert r.stdout.startswith(expected)
    else:
        assert r.stdout == expected


@pytest.mark.parametrize("prompt", ["", "the dog", "Caf\u00e9 \U0001F600"])
def test_greedy_random_model(run, rand_tok_model, prompt):
    model, tokp, tok, cfg, w = rand_tok_model
    exp, pre = greedy_expected(cfg, w, tok, tok.encode(prompt), 40)
    check_generate(run(model, "-z", tokp, "-t", "0", "-n", 40, "-i", prompt, check=True), exp, pre)


@pytest.mark.parametrize("steps", [0, 1000])
def test_steps_clamped_to_seq_len(run, rand_tok_model, steps):
    """-n 0 and -n > seq_len both mean seq_len."""
    model, tokp, tok, cfg, w = rand_tok_model
    exp, pre = greedy_expected(cfg, w, tok, [1], cfg["seq_len"])
    check_generate(run(model, "-z", tokp, "-t", "0", "-n", steps, check=True), exp, pre)


def test_greedy_bos_other_id(run, tmp):
    """CQKV bos_id other than 1: the prompt starts with it and the loop stops on it."""
    tok = R.random_tokenizer(300, seed=3)
    tok.save(tmp / "tok.bin")
    cfg, w = R.random_model(8, 16, 32, 2, 2, 1, 300, 40, bos_id=7, eos_id=8)
    R.write_checkpoint(tmp / "m.bin", cfg, w)
    prompt = tok.encode("hello", bos=False)
    exp, pre = greedy_expected(cfg, w, tok, [7] + prompt, 30)
    ids = encode_ids(run, tmp / "m.bin", tmp / "tok.bin", "hello")
    assert ids == [7] + prompt
    r = run(tmp / "m.bin", "-z", tmp / "tok.bin", "-t", "0", "-n", 30, "-i", "hello", check=True)
    check_generate(r, exp, pre)


STORIES_START = b"Once upon a time, there was a little girl named Lily."


@pytest.fixture(scope="module")
def stories():
    cfg, w = R.read_checkpoint(STORIES)
    tok = R.Tokenizer.load(TOK512, cfg["vocab_size"])
    return cfg, w, tok


@needs_stories
@pytest.mark.parametrize("prompt", ["", "Once upon a time", "Tom had a red ball"])
def test_stories_greedy(run, stories, prompt):
    cfg, w, tok = stories
    exp, pre = greedy_expected(cfg, w, tok, tok.encode(prompt), 200)
    if prompt in ("", "Once upon a time"):
        assert exp.startswith(STORIES_START)      # the reference itself is sane
    r = run(STORIES, "-z", TOK512, "-t", "0", "-n", 200, "-i", prompt, check=True)
    check_generate(r, exp, pre)


@needs_stories
@pytest.mark.parametrize("length", [None, 64])
def test_stories_ppl_generated_text(run, tmp, stories, length):
    cfg, w, tok = stories
    ids, _ = R.greedy_generate(cfg, w, tok.encode("Lily and Ben"), 300)
    text = tok.decode(ids)
    (tmp / "t.txt").write_bytes(text)
    lf = tmp / "lg.bin"
    args = [STORIES, "-m", "ppl", "-f", tmp / "t.txt", "-z", TOK512, "--logits", lf]
    if length:
        args += ["-l", length]
    r = run(*args, check=True)
    kv = parse_kv(r.stdout.decode().strip())
    stream = tok.encode(text, bos=False)
    nll, ppl, n, rows = R.perplexity(cfg, w, stream, L=length)
    got = read_logits(lf, cfg["vocab_size"])
    assert got.shape == rows.shape
    assert rel_err(got, rows) < REL_LOGITS
    check_ppl(kv, nll, ppl, n)


@needs_stories
@needs_wikitext
def test_stories_ppl_wikitext(run, tmp, stories):
    cfg, w, tok = stories
    text = wikitext_prefix(3000)
    (tmp / "t.txt").write_bytes(text)
    r = run(STORIES, "-m", "ppl", "-f", tmp / "t.txt", "-z", TOK512, "-l", 256, check=True)
    kv = parse_kv(r.stdout.decode().strip())
    nll, ppl, n, _ = R.perplexity(cfg, w, tok.encode(text, bos=False), L=256)
    check_ppl(kv, nll, ppl, n)


# ------------------------------------------------------------------------------------------
# sampling: replay llama2.c's sampler on the logits the program wrote, then check those
# logits against the reference

SAMPLING = [
    (1.0, 0.9, 42, ""),
    (0.8, 0.0, 7, ""),
    (1.0, 1.0, 123, "the dog"),
    (1.5, 0.5, 5, "Once upon"),
    (0.5, 0.95, 2, ""),
    (2.0, 0.9, 99, "\u20ac"),
]


@pytest.mark.parametrize("t,p,seed,prompt", SAMPLING)
def test_sampling(run, tmp, rand_tok_model, t, p, seed, prompt):
    model, tokp, tok, cfg, w = rand_tok_model
    lf = tmp / "lg.bin"
    r = run(model, "-z", tokp, "-t", t, "-p", p, "-s", seed, "-n", 0, "-i", prompt,
            "--logits", lf, check=True)
    logits = read_logits(lf, cfg["vocab_size"])
    prompt_ids = tok.encode(prompt)
    ids = R.replay_sampling(logits, prompt_ids, 0, cfg["seq_len"], t, p, seed)
    assert r.stdout == tok.decode(ids) + b"\n"
    # one forward step per position until BOS is drawn or the steps run out
    stopped = len(ids) < cfg["seq_len"]
    assert logits.shape[0] == len(ids) + (1 if stopped else 0)
    fed = [prompt_ids[0]] + ids[:logits.shape[0] - 1]
    assert rel_err(logits, R.forward(cfg, w, fed)) < REL_LOGITS


@needs_stories
@pytest.mark.parametrize("t,p,seed,prompt", [(1.0, 0.9, 133742, ""), (0.8, 0.0, 1, "Once upon"),
                                             (1.2, 0.7, 9, "Lily")])
def test_stories_sampling(run, tmp, stories, t, p, seed, prompt):
    cfg, w, tok = stories
    lf = tmp / "lg.bin"
    r = run(STORIES, "-z", TOK512, "-t", t, "-p", p, "-s", seed, "-n", 120, "-i", prompt,
            "--logits", lf, check=True)
    logits = read_logits(lf, cfg["vocab_size"])
    prompt_ids = tok.encode(prompt)
    ids = R.replay_sampling(logits, prompt_ids, 120, cfg["seq_len"], t, p, seed)
    assert r.stdout == tok.decode(ids) + b"\n"
    fed = [prompt_ids[0]] + ids[:logits.shape[0] - 1]
    assert rel_err(logits, R.forward(cfg, w, fed)) < REL_LOGITS


def test_sampler_reference_sanity():
    """The Python sampler: RNG stream, greedy, multinomial and top-p on known inputs."""
    rng = R.XorShiftRng(42)
    vals = [rng.u32() for _ in range(3)]
    s = 42
    M = (1 << 64) - 1
    for v in vals:                     # recompute the xorshift* steps by hand
        s ^= s >> 12
        s ^= (s << 25) & M
        s ^= s >> 27
        assert v == ((s * 0x2545F4914F6CDD1D) & M) >> 32
    logits = np.array([0.0, 3.0, 3.0, -1.0], dtype=np.float32)
    assert R.sample_token(logits, 0.0, 0.9, R.XorShiftRng(1)) == 1    # first max wins
    # top-p with topp tiny: only the most probable token survives; ties -> lower index first
    assert R.sample_token(logits, 1.0, 1e-6, R.XorShiftRng(1)) == 1
    counts = np.zeros(4)
    rng = R.XorShiftRng(3)
    for _ in range(4000):
        counts[R.sample_token(logits, 1.0, 0.0, rng)] += 1
    p = R.softmax_f32(logits)
    assert np.allclose(counts / 4000, p, atol=0.03)


# ------------------------------------------------------------------------------------------
# bench

@pytest.mark.parametrize("threads,batch", [(1, 1), (2, 1), (1, 3)])
def test_bench(run, rand_tok_model, monkeypatch, threads, batch):
    """One line of key=value fields that agree with each other and with the options.  (Only
    what the program computes is checked, never how fast the machine was.)"""
    monkeypatch.setenv("OMP_NUM_THREADS", str(threads))
    model, _, _, _, _ = rand_tok_model
    r = run(model, "-m", "bench", "-l", 64, "-n", 8, "-b", batch, "-k", "fp16", check=True)
    f = dict(kv.split("=", 1) for kv in r.stdout.decode().split())
    assert int(f["steps"]) == 8 and int(f["context"]) == 64 and int(f["batch"]) == batch, f
    tok_s, ms = float(f["tok_per_s"]), float(f["ms_per_step"])
    assert tok_s > 0 and abs(1000 * batch / tok_s - ms) < 1e-3 * ms + 0.002, f
    assert 0 <= float(f["cache_ms"]) <= ms, f
    cfg = R.read_checkpoint(model)[0]
    bytes_per_token = 2 * 2 * cfg["n_kv_heads"] * cfg["head_size"] * cfg["n_layers"]  # fp16
    assert abs(float(f["kv_bytes_per_token"]) - bytes_per_token) < 0.1, f
    assert abs(float(f["kv_bytes_total"]) - bytes_per_token * 64 * batch) < 1, f


def test_bench_random_model(run):
    """random:PRESET,key=value builds a model of that shape with no file and no tokenizer."""
    r = run("random:smollm2-135m,layers=2,seq_len=128,vocab=64", "-m", "bench", "-l", 32, "-n", 4,
            "-k", "cq1", check=True)
    f = dict(kv.split("=", 1) for kv in r.stdout.decode().split())
    # SmolLM2's kv_dim is 3 x 64; cq1 keeps one byte per 8 channels for keys and values
    assert float(f["kv_bytes_per_token"]) == 2 * 2 * 192 / 8 and int(f["context"]) == 32, f
    for bad in ("random:nonesuch", "random:smollm2-135m,layers=0", "random:dim=64,heads=3",
                "random:smollm2-135m,depth=3"):
        assert_clean_error(run(bad, "-m", "bench", "-l", 16))


def test_reference_cli(tmp):
    """The benchmark scripts' model/tokenizer maker writes files the reference reads back."""
    import subprocess
    import sys
    ref = str(R.__file__)
    for legacy in (False, True):
        out = tmp / ("m%d.bin" % legacy)
        cmd = [sys.executable, ref, "make-model", str(out), "--dim", "48", "--hidden", "96",
               "--layers", "2", "--heads", "6", "--kv-heads", "2", "--vocab", "300",
               "--seq-len", "32", "--seed", "3"] + (["--legacy"] if legacy else [])
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        cfg, w = R.read_checkpoint(out)
        assert (cfg["dim"], cfg["n_heads"], cfg["n_kv_heads"], cfg["head_size"]) == (48, 6, 2, 8)
        assert np.isfinite(R.forward(cfg, w, [1, 5, 9])).all()
    subprocess.run([sys.executable, ref, "make-tokenizer", str(tmp / "t.bin"), "--vocab", "700"],
                   check=True, stdout=subprocess.DEVNULL)
    tok = R.Tokenizer.load(tmp / "t.bin")
    assert tok.vocab_size == 700 and len(set(tok.pieces)) == 700


def test_reference_cli_model_runs(run, tmp):
    import subprocess
    import sys
    out = tmp / "m.bin"
    subprocess.run([sys.executable, str(R.__file__), "make-model", str(out), "--dim", "64",
                    "--hidden", "128", "--layers", "2", "--heads", "4", "--kv-heads", "2",
                    "--vocab", "320", "--seq-len", "64", "--separate-classifier"],
                   check=True, stdout=subprocess.DEVNULL)
    cfg, w = R.read_checkpoint(out)
    ids = list(range(10, 40))
    kv, lf = run_ppl_ids(run, tmp, out, ids)
    nll, ppl, n, rows = R.perplexity(cfg, w, ids)
    assert rel_err(read_logits(lf, 320), rows) < REL_LOGITS
    check_ppl(kv, nll, ppl, n)


def test_help(run):
    r = run("-h")
    assert r.returncode == 0
    assert r.stdout.strip()


# ------------------------------------------------------------------------------------------
# errors

@pytest.fixture(scope="module")
def err_files(session_tmp):
    d = session_tmp / "err"
    d.mkdir(exist_ok=True)
    cfg = dict(BASE, vocab_size=300, seq_len=16, n_kv_heads=2)
    c, w = R.random_model(1, **cfg)
    R.write_checkpoint(d / "legacy.bin", c, w, legacy=True)
    R.write_checkpoint(d / "cqkv.bin", c, w)
    tok = R.random_tokenizer(300, seed=1)
    tok.save(d / "tok.bin")
    R.random_tokenizer(280, seed=1).save(d / "tok_small.bin")
    return dict(dir=d, legacy=d / "legacy.bin", cqkv=d / "cqkv.bin", tok=d / "tok.bin",
                tok_small=d / "tok_small.bin", cfg=c, w=w)


def legacy_hdr(dim=32, hidden=80, L=2, H=4, KVH=2, V=300, S=16):
    return struct.pack("<7i", dim, hidden, L, H, KVH, V, S)


def cqkv_hdr(**over):
    f = dict(magic=R.CQKV_MAGIC, version=1, dim=32, hidden=80, L=2, H=4, KVH=2, V=300, S=16,
             hs=8, theta=10000.0, eps=1e-5, bos=1, eos=2, shared=1, tk=0, ct=0)
    f.update(over)
    h = struct.pack("<Ii8iffiiiii", f["magic"], f["version"], f["dim"], f["hidden"], f["L"],
                    f["H"], f["KVH"], f["V"], f["S"], f["hs"], f["theta"], f["eps"], f["bos"],
                    f["eos"], f["shared"], f["tk"], f["ct"])
    return h + b"\0" * (256 - len(h))


def body_of(path, header_len):
    return path.read_bytes()[header_len:]


# (id, builder) -> builder(files) returns the bytes of the checkpoint file
CKPT_CASES = {
    "empty": lambda f: b"",
    "10_bytes": lambda f: b"\x01" * 10,
    "legacy_cut_27": lambda f: f["legacy"].read_bytes()[:27],
    "legacy_cut_header_only": lambda f: f["legacy"].read_bytes()[:28],
    "legacy_cut_128": lambda f: f["legacy"].read_bytes()[:128],
    "legacy_cut_half": lambda f: f["legacy"].read_bytes()[:f["legacy"].stat().st_size // 2],
    "legacy_cut_minus_4": lambda f: f["legacy"].read_bytes()[:-4],
    "legacy_cut_in_rope_tables": lambda f: f["legacy"].read_bytes()[:-100],
    "cqkv_cut_4": lambda f: f["cqkv"].read_bytes()[:4],
    "cqkv_cut_40": lambda f: f["cqkv"].read_bytes()[:40],
    "cqkv_cut_255": lambda f: f["cqkv"].read_bytes()[:255],
    "cqkv_cut_header_only": lambda f: f["cqkv"].read_bytes()[:256],
    "cqkv_cut_300": lambda f: f["cqkv"].read_bytes()[:300],
    "cqkv_cut_half": lambda f: f["cqkv"].read_bytes()[:f["cqkv"].stat().st_size // 2],
    "cqkv_cut_minus_1": lambda f: f["cqkv"].read_bytes()[:-1],
    "garbage": lambda f: np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes(),
    "text_file": lambda f: b"this is not a checkpoint, just some text\n" * 100,
    "wrong_magic": lambda f: b"CQKW" + f["cqkv"].read_bytes()[4:],
    "cqkv_version_2": lambda f: cqkv_hdr(version=2) + body_of(f["cqkv"], 256),
    "cqkv_version_0": lambda f: cqkv_hdr(version=0) + body_of(f["cqkv"], 256),
    "cqkv_version_neg": lambda f: cqkv_hdr(version=-1) + body_of(f["cqkv"], 256),
    # absurd legacy headers (the body of the valid file follows)
    "legacy_dim_0": lambda f: legacy_hdr(dim=0) + body_of(f["legacy"], 28),
    "legacy_dim_neg": lambda f: legacy_hdr(dim=-32) + body_of(f["legacy"], 28),
    "legacy_hidden_0": lambda f: legacy_hdr(hidden=0) + body_of(f["legacy"], 28),
    "legacy_hidden_neg": lambda f: legacy_hdr(hidden=-80) + body_of(f["legacy"], 28),
    "legacy_layers_0": lambda f: legacy_hdr(L=0) + body_of(f["legacy"], 28),
    "legacy_layers_neg": lambda f: legacy_hdr(L=-2) + body_of(f["legacy"], 28),
    "legacy_heads_0": lambda f: legacy_hdr(H=0) + body_of(f["legacy"], 28),
    "legacy_heads_neg": lambda f: legacy_hdr(H=-4) + body_of(f["legacy"], 28),
    "legacy_heads_not_dividing_dim": lambda f: legacy_hdr(H=3, KVH=3) + body_of(f["legacy"], 28),
    "legacy_kv_heads_0": lambda f: legacy_hdr(KVH=0) + body_of(f["legacy"], 28),
    "legacy_kv_heads_neg": lambda f: legacy_hdr(KVH=-2) + body_of(f["legacy"], 28),
    "legacy_kv_heads_not_dividing": lambda f: legacy_hdr(KVH=3) + body_of(f["legacy"], 28),
    "legacy_kv_heads_more_than_heads": lambda f: legacy_hdr(KVH=8) + body_of(f["legacy"], 28),
    "legacy_vocab_0": lambda f: legacy_hdr(V=0) + body_of(f["legacy"], 28),
    "legacy_vocab_int_min": lambda f: legacy_hdr(V=-2**31) + body_of(f["legacy"], 28),
    "legacy_seq_len_0": lambda f: legacy_hdr(S=0) + body_of(f["legacy"], 28),
    "legacy_seq_len_neg": lambda f: legacy_hdr(S=-16) + body_of(f["legacy"], 28),
    "legacy_seq_len_huge": lambda f: legacy_hdr(S=2**30) + body_of(f["legacy"], 28),
    "legacy_seq_len_int_max": lambda f: legacy_hdr(S=2**31 - 1) + body_of(f["legacy"], 28),
    "legacy_all_huge": lambda f: legacy_hdr(2**31 - 1, 2**31 - 1, 2**31 - 1, 1, 1, 2**31 - 1,
                                            2**31 - 1) + body_of(f["legacy"], 28),
    "legacy_overflowing_sizes": lambda f: legacy_hdr(65536, 262144, 1024, 1024, 1024, 1 << 22,
                                                     1 << 22) + body_of(f["legacy"], 28),
    # absurd CQKV headers
    "cqkv_dim_0": lambda f: cqkv_hdr(dim=0) + body_of(f["cqkv"], 256),
    "cqkv_dim_neg": lambda f: cqkv_hdr(dim=-1) + body_of(f["cqkv"], 256),
    "cqkv_layers_0": lambda f: cqkv_hdr(L=0) + body_of(f["cqkv"], 256),
    "cqkv_heads_0": lambda f: cqkv_hdr(H=0) + body_of(f["cqkv"], 256),
    "cqkv_kv_heads_0": lambda f: cqkv_hdr(KVH=0) + body_of(f["cqkv"], 256),
    "cqkv_kv_heads_not_dividing": lambda f: cqkv_hdr(KVH=3) + body_of(f["cqkv"], 256),
    "cqkv_vocab_0": lambda f: cqkv_hdr(V=0) + body_of(f["cqkv"], 256),
    "cqkv_vocab_neg": lambda f: cqkv_hdr(V=-300) + body_of(f["cqkv"], 256),
    "cqkv_seq_len_0": lambda f: cqkv_hdr(S=0) + body_of(f["cqkv"], 256),
    "cqkv_seq_len_huge": lambda f: cqkv_hdr(S=2**30) + body_of(f["cqkv"], 256),
    "cqkv_seq_len_int_max": lambda f: cqkv_hdr(S=2**31 - 1) + body_of(f["cqkv"], 256),
    "cqkv_head_size_0": lambda f: cqkv_hdr(hs=0) + body_of(f["cqkv"], 256),
    "cqkv_head_size_neg": lambda f: cqkv_hdr(hs=-8) + body_of(f["cqkv"], 256),
    "cqkv_head_size_odd": lambda f: cqkv_hdr(hs=7) + body_of(f["cqkv"], 256),
    "cqkv_head_size_huge": lambda f: cqkv_hdr(hs=2**30) + body_of(f["cqkv"], 256),
    "cqkv_theta_0": lambda f: cqkv_hdr(theta=0.0) + body_of(f["cqkv"], 256),
    "cqkv_theta_neg": lambda f: cqkv_hdr(theta=-10000.0) + body_of(f["cqkv"], 256),
    "cqkv_theta_nan": lambda f: cqkv_hdr(theta=float("nan")) + body_of(f["cqkv"], 256),
    "cqkv_eps_neg": lambda f: cqkv_hdr(eps=-1e-5) + body_of(f["cqkv"], 256),
    "cqkv_eps_nan": lambda f: cqkv_hdr(eps=float("nan")) + body_of(f["cqkv"], 256),
    "cqkv_shared_2": lambda f: cqkv_hdr(shared=2) + body_of(f["cqkv"], 256),
    "cqkv_bos_out_of_vocab": lambda f: cqkv_hdr(bos=300) + body_of(f["cqkv"], 256),
    "cqkv_bos_neg": lambda f: cqkv_hdr(bos=-1) + body_of(f["cqkv"], 256),
    "cqkv_eos_out_of_vocab": lambda f: cqkv_hdr(eos=1000) + body_of(f["cqkv"], 256),
    "cqkv_tokenizer_kind_7": lambda f: cqkv_hdr(tk=7) + body_of(f["cqkv"], 256),
    "cqkv_chat_template_9": lambda f: cqkv_hdr(ct=9) + body_of(f["cqkv"], 256),
    "cqkv_says_separate_classifier_but_none": lambda f: cqkv_hdr(shared=0) + body_of(f["cqkv"], 256),
}


@pytest.mark.parametrize("case", list(CKPT_CASES))
@pytest.mark.parametrize("mode", ["generate", "ppl"])
def test_bad_checkpoint(run, tmp, err_files, case, mode):
    p = tmp / "bad.bin"
    p.write_bytes(CKPT_CASES[case](err_files))
    if mode == "generate":
        r = run(p, "-z", err_files["tok"], "-n", 4, "-t", 0)
    else:
        (tmp / "ids.txt").write_text("3 4 5 6")
        r = run(p, "-m", "ppl", "-f", tmp / "ids.txt", "--ids")
    assert_clean_error(r)


def test_missing_checkpoint(run, tmp, err_files):
    assert_clean_error(run(tmp / "nope.bin", "-z", err_files["tok"]))


def test_checkpoint_is_directory(run, tmp, err_files):
    assert_clean_error(run(tmp, "-z", err_files["tok"]))


def test_valid_error_fixtures_work(run, err_files):
    """The files the error cases are derived from are themselves fine."""
    for m in ("legacy", "cqkv"):
        run(err_files[m], "-z", err_files["tok"], "-n", 4, "-t", 0, check=True)


def tok_bytes_cut(n):
    return lambda f: f["tok"].read_bytes()[:n]


TOK_CASES = {
    "missing": None,
    "empty": lambda f: b"",
    "cut_2": tok_bytes_cut(2),
    "cut_4": tok_bytes_cut(4),
    "cut_7": tok_bytes_cut(7),
    "cut_1000": tok_bytes_cut(1000),
    "cut_minus_1": lambda f: f["tok"].read_bytes()[:-1],
    "fewer_pieces_than_vocab": lambda f: f["tok_small"].read_bytes(),
    "negative_piece_length": lambda f: struct.pack("<Ifi", 16, 0.0, -5) + b"x" * 5000,
    "huge_piece_length": lambda f: struct.pack("<Ifi", 16, 0.0, 2**31 - 1) + b"x" * 5000,
}


@pytest.mark.parametrize("case", list(TOK_CASES))
@pytest.mark.parametrize("mode", ["generate", "encode", "ppl_text"])
def test_bad_tokenizer(run, tmp, err_files, case, mode):
    p = tmp / "tok.bin"
    if TOK_CASES[case] is not None:
        p.write_bytes(TOK_CASES[case](err_files))
    args = [err_files["legacy"], "-z", p]
    if mode == "generate":
        args += ["-n", 4, "-t", 0, "-i", "hello"]
    elif mode == "encode":
        args += ["-m", "encode", "-i", "hello"]
    else:
        (tmp / "t.txt").write_text("hello world")
        args += ["-m", "ppl", "-f", tmp / "t.txt"]
    assert_clean_error(run(*args))


FLAG_CASES = {
    "unknown_short": ["-x", "1"],
    "unknown_long": ["--foo"],
    "unknown_long_with_value": ["--temperature", "1"],
    "t_no_value": ["-t"],
    "i_no_value": ["-i"],
    "z_no_value": ["-z"],
    "logits_no_value": ["--logits"],
    "t_abc": ["-t", "abc"],
    "t_empty": ["-t", ""],
    "t_neg": ["-t", "-1"],
    "t_trailing_junk": ["-t", "0.5x"],
    "p_2": ["-p", "2"],
    "p_neg": ["-p", "-0.1"],
    "p_abc": ["-p", "abc"],
    "n_neg": ["-n", "-5"],
    "n_abc": ["-n", "abc"],
    "n_float": ["-n", "1.5"],
    "n_overflow": ["-n", "99999999999999999999"],
    "s_abc": ["-s", "abc"],
    "l_abc": ["-l", "abc"],
    "mode_unknown": ["-m", "foo"],
    "mode_empty": ["-m", ""],
    "kv_type_fp64": ["-k", "fp64"],
    "kv_type_pair_bad": ["-k", "fp32:fp64"],
    "kv_type_empty": ["-k", ""],
    "kernels_unknown": ["--kernels", "lut"],
    "kernels_no_value": ["--kernels"],
    "b_zero": ["-m", "bench", "-b", "0"],
    "b_outside_bench": ["-b", "2"],
}


@pytest.mark.parametrize("case", list(FLAG_CASES))
def test_bad_flags(run, err_files, case):
    r = run(err_files["legacy"], "-z", err_files["tok"], *FLAG_CASES[case])
    assert_clean_error(r, allow_usage=True)


def test_no_arguments(run):
    assert_clean_error(run(), allow_usage=True)


def test_flag_instead_of_checkpoint(run):
    assert_clean_error(run("-t", "0"), allow_usage=True)


def test_prompt_longer_than_context(run, err_files):
    prompt = " ".join(["the dog ran to the big park and played"] * 8)   # >> 16 tokens
    r = run(err_files["legacy"], "-z", err_files["tok"], "-t", 0, "-i", prompt)
    assert_clean_error(r)


def test_prompt_longer_than_context_encode_ok(run, err_files):
    """Only generation needs the prompt to fit; sanity that the prompt above is long."""
    prompt = " ".join(["the dog ran to the big park and played"] * 8)
    ids = encode_ids(run, err_files["legacy"], err_files["tok"], prompt)
    assert len(ids) > 16


def test_ppl_file_missing(run, tmp, err_files):
    assert_clean_error(run(err_files["legacy"], "-z", err_files["tok"], "-m", "ppl",
                           "-f", tmp / "nope.txt"))


def test_ppl_ids_file_missing(run, tmp, err_files):
    assert_clean_error(run(err_files["legacy"], "-m", "ppl", "--ids", "-f", tmp / "nope.txt"))


def test_ppl_without_file(run, err_files):
    assert_clean_error(run(err_files["legacy"], "-z", err_files["tok"], "-m", "ppl"))


@pytest.mark.parametrize("content", ["", "   \n", "3 4 300", "3 -1 4", "3 abc 4", "3 4.5",
                                     "99999999999999999999"])
def test_ppl_bad_ids(run, tmp, err_files, content):
    (tmp / "ids.txt").write_text(content)
    assert_clean_error(run(err_files["legacy"], "-m", "ppl", "--ids", "-f", tmp / "ids.txt"))


def test_ppl_batched_logits_to_a_pipe(run, tmp, err_files):
    """-b 2 writes the rows of two windows out of order: a pipe (stdout here) cannot take them."""
    (tmp / "ids.txt").write_text(" ".join(["5"] * 10))
    r = run(err_files["legacy"], "-m", "ppl", "--ids", "-f", tmp / "ids.txt", "-l", 4, "-b", 2, "--logits", "/dev/stdout")
    assert_clean_error(r)
    assert b"seek" in r.stderr


def test_ppl_empty_text(run, tmp, err_files):
    (tmp / "t.txt").write_text("")
    assert_clean_error(run(err_files["legacy"], "-z", err_files["tok"], "-m", "ppl",
                           "-f", tmp / "t.txt"))


@pytest.mark.parametrize("length", [1, -2, 17, 1000, 2**31 - 1])
def test_ppl_bad_window(run, tmp, err_files, length):
    (tmp / "ids.txt").write_text("3 4 5 6 7 8")
    assert_clean_error(run(err_files["legacy"], "-m", "ppl", "--ids", "-f", tmp / "ids.txt",
                           "-l", length))


def test_ppl_window_equal_seq_len_ok(run, tmp, err_files):
    (tmp / "ids.txt").write_text("3 4 5 6 7 8")
    run(err_files["legacy"], "-m", "ppl", "--ids", "-f", tmp / "ids.txt", "-l", 16, check=True)


def test_logits_unwritable(run, tmp, err_files):
    (tmp / "ids.txt").write_text("3 4 5")
    assert_clean_error(run(err_files["legacy"], "-m", "ppl", "--ids", "-f", tmp / "ids.txt",
                           "--logits", tmp / "no_such_dir" / "l.bin"))


# ------------------------------------------------------------------------------------------
# inputs that crashed, hung or read out of bounds (found by mutation fuzzing and by hand)

def test_tiny_temperature_is_greedy(run, rand_tok_model):
    """logit / 5e-38 overflows float: the sampler subtracts the max first and the distribution
    is one-hot at the argmax, so every top-p / plain sampling run prints the greedy text."""
    model, tokp, tok, cfg, w = rand_tok_model
    greedy = run(model, "-z", tokp, "-t", 0, "-n", 40, "-i", "the dog", check=True).stdout
    for t in ("2e-38", "5e-38", "1e-30", "1e-9"):
        for p in ("0.9", "0", "1"):
            r = run(model, "-z", tokp, "-t", t, "-p", p, "-s", 3, "-n", 40, "-i", "the dog", check=True)
            assert r.stdout == greedy, (t, p)


@needs_stories
def test_tiny_temperature_stories(run):
    greedy = run(STORIES, "-z", TOK512, "-t", 0, "-n", 60, "-i", "Once upon", check=True).stdout
    r = run(STORIES, "-z", TOK512, "-t", "5e-38", "-n", 60, "-i", "Once upon", check=True)
    assert r.stdout == greedy
    assert r.stdout.startswith(b"Once upon a time")


def test_top_p_without_candidates(run, tmp, rand_tok_model):
    """-t 1e30 makes the distribution uniform (1/512 each) and -p 0.001 puts the cut-off
    (1 - p) / 511 above 1/512: no token passes it, so all are candidates.  Replayed on the
    written logits by the reference sampler."""
    model, tokp, tok, cfg, w = rand_tok_model
    lf = tmp / "lg.bin"
    r = run(model, "-z", tokp, "-t", "1e30", "-p", "0.001", "-s", 11, "-n", 20, "-i", "a",
            "--logits", lf, check=True)
    logits = read_logits(lf, cfg["vocab_size"])
    prompt_ids = tok.encode("a")
    ids = R.replay_sampling(logits, prompt_ids, 20, cfg["seq_len"], 1e30, 0.001, 11)
    assert r.stdout == tok.decode(ids) + b"\n"
    assert len(ids) > len(prompt_ids)


def test_vocabulary_of_one_token(run, tmp):
    """With V = 1 the top-p cut-off divides by V - 1 = 0; the only token is also BOS, so
    generation stops after one step, and every prediction has probability 1 (ppl 1)."""
    cfg, w = R.random_model(3, 16, 32, 1, 2, 2, 1, 16, bos_id=0, eos_id=0)
    R.write_checkpoint(tmp / "m.bin", cfg, w)
    R.Tokenizer([b"<s>"], [0.0]).save(tmp / "t.bin")
    for p in ("0.9", "0", "1"):
        r = run(tmp / "m.bin", "-z", tmp / "t.bin", "-t", 1, "-p", p, check=True)
        assert r.stdout == b"\n"
    (tmp / "ids.txt").write_text("0 0 0")
    kv, _ = run_ppl_ids(run, tmp, tmp / "m.bin", [0, 0, 0])
    assert float(kv["ppl"]) == 1.0 and int(kv["tokens"]) == 3


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["token_embedding", "classifier"])
@pytest.mark.parametrize("mode", ["generate", "greedy", "ppl"])
def test_non_finite_logits(run, tmp, value, where, mode):
    """One NaN or infinite weight in BOS's embedding row or in a classifier row: the logits
    are not finite, which is an error that names the checkpoint, not garbage."""
    cfg, w = R.random_model(4, 16, 32, 1, 2, 2, 300, 16, shared_classifier=False)
    w[where][1, 3] = value
    R.write_checkpoint(tmp / "m.bin", cfg, w)
    R.random_tokenizer(300, seed=2).save(tmp / "t.bin")
    if mode == "ppl":
        (tmp / "ids.txt").write_text("5 6 7")
        r = run(tmp / "m.bin", "-m", "ppl", "--ids", "-f", tmp / "ids.txt")
    else:
        r = run(tmp / "m.bin", "-z", tmp / "t.bin", "-t", 0 if mode == "greedy" else 1, "-n", 8)
    assert_clean_error(r)
    assert b"non-finite logit" in r.stderr and b"checkpoint" in r.stderr, r.stderr


def small_vocab_tokenizer():
    """40 pieces and no <0xHH> byte pieces: <unk>, <s>, </s>, space, a-z, 0-9."""
    pieces = [b"<unk>", b"<s>", b"</s>", b" "] + [bytes([c]) for c in b"abcdefghijklmnopqrstuvwxyz0123456789"]
    scores = [0.0, 0.0, 0.0] + [-float(i) for i in range(1, len(pieces) - 2)]
    return R.Tokenizer(pieces, scores)


def test_small_vocabulary_unknown_character(run, tmp):
    """A character outside a vocabulary without byte pieces is one <unk> (id 0), as
    sentencepiece does without byte fallback; the ids stay in the vocabulary in encode,
    generate and ppl (checked against the reference forward pass)."""
    tok = small_vocab_tokenizer()
    tok.save(tmp / "t.bin")
    cfg, w = R.random_model(5, 16, 32, 1, 2, 2, 40, 32)
    R.write_checkpoint(tmp / "m.bin", cfg, w)
    ids = encode_ids(run, tmp / "m.bin", tmp / "t.bin", "h\u00e9")
    assert ids == tok.encode("h\u00e9") == [1, 3, tok.lookup[b"h"], 0]
    for s in ("a\u20acb c", "\u00e9\u00e9 x", b"a\xffb\x80"):
        assert encode_ids(run, tmp / "m.bin", tmp / "t.bin", s) == tok.encode(s), s
    r = run(tmp / "m.bin", "-z", tmp / "t.bin", "-t", 0, "-n", 8, "-i", "h\u00e9", check=True)
    assert r.stdout.startswith(b"h<unk>")
    text = "h\u00e9 z\u00fc 42 \U0001F600 ok"
    (tmp / "x.txt").write_text(text)
    r = run(tmp / "m.bin", "-z", tmp / "t.bin", "-m", "ppl", "-f", tmp / "x.txt", check=True)
    kv = parse_kv(r.stdout.decode().strip())
    stream = tok.encode(text, bos=False)
    assert max(stream) < 40
    nll, ppl, n, _ = R.perplexity(cfg, w, stream)
    check_ppl(kv, nll, ppl, n)


def gpt2_pretokens(text, letters, numbers, spaces):
    """GPT-2's pre-tokenizer pattern with the character classes given as sets (Python's re
    has no \\p{..}): the independent reference for run.c's scanner on odd Unicode tables."""
    import re

    def cls(chars, negate=False):
        body = "".join(re.escape(c) for c in sorted(chars))
        return ("[^%s]" % body) if negate else ("[%s]" % body)
    alts = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d"]
    if letters:
        alts.append(" ?%s+" % cls(letters))
    if numbers:
        alts.append(" ?%s+" % cls(numbers))
    alts.append(" ?%s+" % cls(set(letters) | set(numbers) | set(spaces), negate=True))
    if spaces:
        alts += ["%s+(?!%s)" % (cls(spaces), cls(spaces, negate=True)), "%s+" % cls(spaces)]
    return re.findall("|".join(alts), text)


@pytest.mark.parametrize("text", [" \n", "a \n b", "  \n\n ", "x\n \n", " \n \n", "\n", " "])
def test_byte_level_table_without_space(run, tmp, text):
    """A Unicode table that classes U+000A as white space but not U+0020 (which is then
    "other"): the scanner looped forever on " \\n".  The pre-tokens follow GPT-2's regex with
    those classes; a merge of " " and "\\n" fires only inside one pre-token."""
    pieces = [bytes([b]) for b in range(256)] + [b" \n", b"<|endoftext|>"]
    R.write_byte_level_tokenizer(tmp / "t.bin", pieces, [(0x20, 0x0A)], specials=[257],
                                 ranges=[(0x0A, 0x0A, 3)])
    cfg, w = R.random_model(6, 16, 32, 1, 2, 2, 258, 16, bos_id=257, eos_id=257,
                            tokenizer_kind=1, chat_template=1)
    R.write_checkpoint(tmp / "m.bin", cfg, w)
    want = [257]
    for piece in gpt2_pretokens(text, set(), set(), {"\n"}):
        b = piece.encode()
        i = 0
        while i < len(b):
            if b[i:i + 2] == b" \n":
                want.append(256)
                i += 2
            else:
                want.append(b[i])
                i += 1
    r = run(tmp / "m.bin", "-z", tmp / "t.bin", "-m", "encode", "-i", text, timeout=30, check=True)
    assert [int(x) for x in r.stdout.split()] == want


def test_byte_level_reference_pretokens_sanity():
    """The regex reference itself on GPT-2's usual classes."""
    L = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    N, S = set("0123456789"), set(" \t\n")
    assert gpt2_pretokens("Hello world  42 it's\n\n x", L, N, S) == \
        ["Hello", " world", " ", " 42", " it", "'s", "\n\n", " x"]


def test_bad_merge_frees_before_error(run, tmp):
    """A merge whose concatenation is no piece: a clean error, and under ASan no leak report.
    The merge buffer used to be lost on this path; LeakSanitizer saw it in about a third of
    the runs (when no stale copy of the pointer was left on the stack), hence 20 runs."""
    pieces = [bytes([b]) for b in range(256)] + [b"<|endoftext|>", b"ab"]
    R.write_byte_level_tokenizer(tmp / "t.bin", pieces, [(0x61, 0x62), (0x78, 0x79)],
                                 ranges=R.ascii_class_ranges())
    cfg, w = R.random_model(6, 16, 32, 1, 2, 2, 258, 16, bos_id=256, eos_id=256, tokenizer_kind=1)
    R.write_checkpoint(tmp / "m.bin", cfg, w)
    for _ in range(20):
        r = run(tmp / "m.bin", "-z", tmp / "t.bin", "-m", "encode", "-i", "ab")
        assert_clean_error(r)
        assert b"merge 1 (120, 121) makes a piece that is not in the vocabulary" in r.stderr


def test_byte_level_trailing_bytes_and_more_pieces(run, tmp):
    pieces = [bytes([b]) for b in range(256)] + [b"ab", b"<|endoftext|>"]
    R.write_byte_level_tokenizer(tmp / "t.bin", pieces, [(0x61, 0x62)], specials=[257],
                                 ranges=R.ascii_class_ranges())
    cfg, w = R.random_model(6, 16, 32, 1, 2, 2, 258, 16, bos_id=257, eos_id=257, tokenizer_kind=1)
    R.write_checkpoint(tmp / "m.bin", cfg, w)
    r = run(tmp / "m.bin", "-z", tmp / "t.bin", "-m", "encode", "-i", "xab", check=True)
    assert [int(x) for x in r.stdout.split()] == [257, 0x78, 256]
    (tmp / "junk.bin").write_bytes((tmp / "t.bin").read_bytes() + b"\0\0\0\0")
    r = run(tmp / "m.bin", "-z", tmp / "junk.bin", "-m", "encode", "-i", "xab")
    assert_clean_error(r)
    assert b"4 bytes follow the byte-level BPE tables" in r.stderr, r.stderr
    # the model's vocabulary is one smaller than the file's: named with both sizes
    cfg, w = R.random_model(6, 16, 32, 1, 2, 2, 257, 16, bos_id=256, eos_id=256, tokenizer_kind=1)
    R.write_checkpoint(tmp / "m257.bin", cfg, w)
    r = run(tmp / "m257.bin", "-z", tmp / "t.bin", "-m", "encode", "-i", "xab")
    assert_clean_error(r)
    assert b"has 258 pieces" in r.stderr and b"vocabulary has 257" in r.stderr, r.stderr


def chat_count(r):
    """The token count in chat's "this turn (N tokens) does not fit" error."""
    import re
    assert_clean_error(r)
    m = re.match(rb"error: chat: this turn \((\d+) tokens\) does not fit", r.stderr)
    assert m, r.stderr
    return int(m.group(1))


def test_chat_turn_too_long_is_an_error(run, err_files):
    r = run(err_files["legacy"], "-z", err_files["tok"], "-m", "chat", "-y", "be brief",
            "-i", "the dog ran to the big park and played " * 4)
    tok = R.Tokenizer.load(err_files["tok"], 300)
    rendered = "[INST] <<SYS>>\nbe brief\n<</SYS>>\n\n%s [/INST]" % ("the dog ran to the big park and played " * 4)
    assert chat_count(r) == len(tok.encode(rendered))


@pytest.mark.parametrize("how", ["flag", "stdin"])
def test_chat_long_prompts_are_not_cut(run, err_files, how):
    """A system prompt (or user line) of 3000 bytes, past the 1152-byte buffers chat had: the
    whole turn is encoded (the error counts its tokens: it does not fit a 16-token context)."""
    system = ("ab cd " * 500)[:3000]
    user = ("xy " * 700)[:2000]
    tok = R.Tokenizer.load(err_files["tok"], 300)
    rendered = "[INST] <<SYS>>\n%s\n<</SYS>>\n\n%s [/INST]" % (system, user)
    args = [err_files["legacy"], "-z", err_files["tok"], "-m", "chat"]
    if how == "flag":
        r = run(*args, "-y", system, "-i", user)
    else:
        r = run(*args, input=(system + "\n" + user + "\n").encode())
    assert chat_count(r) == len(tok.encode(rendered))


def test_huge_window_is_the_context(run, tmp, rand_tok_model):
    """-w larger than the context keeps every position in fp32: the same logits as -w seq_len."""
    model, tokp, tok, cfg, w = rand_tok_model
    out = {}
    for win in (cfg["seq_len"], 2**31 - 1):
        lf = tmp / ("w%d.bin" % win)
        run(model, "-z", tokp, "-k", "fp16", "-w", win, "-t", 0, "-n", 24, "-i", "the dog",
            "--logits", lf, check=True)
        out[win] = lf.read_bytes()
    assert out[cfg["seq_len"]] == out[2**31 - 1] and len(out[cfg["seq_len"]]) > 0


def test_ppl_context_of_one(run, tmp):
    """A model whose context is 1 position has no room for a scored token after BOS: the
    default window (the context) gave chunks of 0 tokens, and the loop never ended."""
    cfg, w = R.random_model(7, 16, 32, 1, 2, 2, 300, 1)
    R.write_checkpoint(tmp / "m.bin", cfg, w)
    (tmp / "ids.txt").write_text("3 4 5")
    r = run(tmp / "m.bin", "-m", "ppl", "--ids", "-f", tmp / "ids.txt", timeout=30)
    assert_clean_error(r)
    assert b"at least 2 positions" in r.stderr
