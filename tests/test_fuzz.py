"""Mutation fuzz test of run.c's readers: checkpoints (llama2.c legacy and CQKV), tokenizers
(sentencepiece-style and byte-level BPE) and CQ centroid files.

Each case takes one valid file, mutates its header and first KB (for the byte-level tokenizer
also the "BPE1" tables after the pieces) with 1-3 of: an int32 field set to an edge value,
bit flips, random bytes, a float special (NaN, inf, 3e38, a subnormal), a cut, appended bytes,
inserted or deleted bytes; then runs the binary under test ($RUN_BIN; `make test` runs this file
with ./run and again with the ASan+UBSan build) on it with one of a few command lines (generate
greedy, sampled or at a tiny temperature, ppl on text or ids, chat, encode, decode, a q8 cache
with a window, cq1).

A case passes when the program either exits 1 with one "error: ..." first line (a clean
error) or exits 0 (a normal run), with no sanitizer report, no signal and within the timeout,
and it may exit 0 only if the inputs are valid as docs/FORMATS.md defines them: an oracle
here parses the mutated files from the spec (shared nothing with run.c) and checks each header
field, the sizes, the piece counts, the merges, the Unicode table and the centroid shape and
fingerprint.  Fields that carry no meaning for reading (CQKV header padding, the centroid file's
weighting, calibration token count and padding) are left out of the oracle.

Deterministic: FUZZ_SEED (default 20240918) and FUZZ_CASES (default 500 in all, split over
the five kinds of file); FUZZ_TIMEOUT seconds per run (default 30, only a hang guard);
FUZZ_JOBS parallel runs (default 2).  `make fuzz` runs 5000 cases under ASan and prints the
counts.  Failing inputs are kept in the test's temporary directory, named in the message.
"""

import math
import os
import random
import struct
import subprocess
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import R

SEED = int(os.environ.get("FUZZ_SEED", "20240918"))
CASES = int(os.environ.get("FUZZ_CASES", "500"))
TIMEOUT = float(os.environ.get("FUZZ_TIMEOUT", "30"))
JOBS = int(os.environ.get("FUZZ_JOBS", "2"))
SANITIZER_WORDS = (b"Sanitizer", b"runtime error:", b"AddressSanitizer", b"LeakSanitizer")

BPE_MAGIC = 0x31455042
CQCB_MAGIC = 0x42435143
PROMPT = "Once upon a time, 42 caf\u00e9s \U0001F600 it's  ok\n"
CQ_TYPE = (8, 8)  # cq1: c = 8 channels per group, b = 8 bits


# ------------------------------------------------------------------------------------------
# the valid files every mutation starts from

LEGACY_CFG = dict(dim=32, hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300,
                  seq_len=64)
MERGES = [(b"t", b"h"), (b"th", b"e"), (b" ", b"the"), (b"i", b"n"), (b"in", b"g"), (b" ", b"a"),
          (b"o", b"n"), (b"e", b"r"), (b" ", b"t"), (b"1", b"2"), (b"c", b"a"), (b"ca", b"f"),
          (b"\xc3", b"\xa9"), (b"'", b"s"), (b" ", b" ")]
SPECIALS = [b"<|endoftext|>", b"<|im_start|>", b"<|im_end|>"]
RANGES = sorted(R.ascii_class_ranges() + [(0xC0, 0x24F, 1), (0x660, 0x669, 2), (0x3000, 0x3000, 3),
                                          (0x4E00, 0x9FFF, 1)])


def byte_level_tokenizer():
    """(pieces, merges as id pairs, special ids): 256 bytes, merged pieces, special tokens."""
    pieces = [bytes([b]) for b in range(256)]
    index = {p: i for i, p in enumerate(pieces)}
    merges = []
    for a, b in MERGES:
        if a + b not in index:
            index[a + b] = len(pieces)
            pieces.append(a + b)
        merges.append((index[a], index[b]))
    specials = list(range(len(pieces), len(pieces) + len(SPECIALS)))
    pieces += SPECIALS
    return pieces, merges, specials


def fingerprint(wk0_bytes):
    """docs/FORMATS.md: the sum mod 2^64 of the layer-0 wk tensor read as uint32 words."""
    return int(np.frombuffer(wk0_bytes, dtype="<u4").astype(np.uint64).sum(dtype=np.uint64))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_base_files(tmp_path_factory.mktemp("fuzz_base"))


def write_base_files(d):
    cfg, w = R.random_model(31, **LEGACY_CFG)
    R.write_checkpoint(d / "legacy.bin", cfg, w, legacy=True)
    R.random_tokenizer(300, seed=4).save(d / "tok0.bin")
    pieces, merges, specials = byte_level_tokenizer()
    R.write_byte_level_tokenizer(d / "tok1.bin", pieces, merges, specials, pretokenizer=1,
                                 ranges=RANGES)
    bos = specials[0]
    cfg1, w1 = R.random_model(32, 32, 64, 2, 4, 2, len(pieces), 64, head_size=8,
                              shared_classifier=False, rope_theta=50000.0, bos_id=bos, eos_id=bos,
                              tokenizer_kind=1, chat_template=1)
    R.write_checkpoint(d / "cqkv.bin", cfg1, w1)
    c, b = CQ_TYPE
    kv_dim = cfg1["n_kv_heads"] * cfg1["head_size"]
    rng = np.random.default_rng(33)
    codebooks = rng.normal(size=(cfg1["n_layers"], 2, kv_dim // c, 1 << b, c)).astype("<f4")
    fp = fingerprint(np.ascontiguousarray(w1["wk"][0], dtype="<f4").tobytes())
    head = struct.pack("<IiiiiiiiqQ", CQCB_MAGIC, 1, cfg1["n_layers"], cfg1["n_kv_heads"],
                       cfg1["head_size"], c, b, 1, 4096, fp)
    (d / "cqkv.cent").write_bytes(head + bytes(64 - len(head)) + codebooks.tobytes())
    (d / "text.txt").write_text(PROMPT * 3 + "The end.\n", encoding="utf-8")
    (d / "ids.txt").write_text("3 4 5 6 7 8\n")
    return d


# ------------------------------------------------------------------------------------------
# the oracle: is this set of inputs valid by docs/FORMATS.md?

def i32(data, off):
    return struct.unpack_from("<i", data, off)[0]


def u32(data, off):
    return struct.unpack_from("<I", data, off)[0]


def f32(data, off):
    return struct.unpack_from("<f", data, off)[0]


def checkpoint_config(data):
    """(config dict, None) of a checkpoint valid by the spec, or (None, the reason)."""
    if len(data) < 28:
        return None, "shorter than any header"
    magic = u32(data, 0)
    if magic == R.CQKV_MAGIC:
        if len(data) < 256:
            return None, "truncated CQKV header"
        if i32(data, 4) != 1:
            return None, "CQKV version"
        D, F, L, H, KVH, V, T, hs = struct.unpack_from("<8i", data, 8)
        theta, eps = f32(data, 40), f32(data, 44)
        bos, eos, shared, kind, template = struct.unpack_from("<5i", data, 48)
        header, extra = 256, 0
    elif magic == 0x616B3432:
        return None, "llama2.c version 1/2 export"
    else:
        D, F, L, H, KVH, V, T = struct.unpack_from("<7i", data, 0)
        if H <= 0 or D <= 0 or D % H:
            return None, "legacy dim / n_heads"
        hs, theta, eps, bos, eos, kind, template = D // H, 10000.0, 1e-5, 1, 2, 0, 0
        shared = int(V > 0)
        V = abs(V) if V != -2**31 else 0
        header, extra = 28, T * hs if T > 0 else 0
    if min(D, F, L, H, KVH, V, T, hs) <= 0:
        return None, "a size is not positive"
    if H % KVH or hs % 2:
        return None, "heads or head size"
    if not (math.isfinite(theta) and theta > 0 and math.isfinite(eps) and eps > 0):
        return None, "rope_theta / norm_eps"
    if not (0 <= bos < V and 0 <= eos < V) or shared not in (0, 1) or kind not in (0, 1) \
            or template not in (0, 1):
        return None, "bos / eos / flags"
    QD, KD = H * hs, KVH * hs
    floats = V * D + L * D + L * QD * D + 2 * L * KD * D + L * D * QD + L * D + 3 * L * F * D + D
    floats += 0 if shared else V * D
    if len(data) != header + 4 * (floats + extra):
        return None, "file size does not match the header"
    wk0 = header + 4 * (V * D + L * D + L * QD * D)
    return dict(V=V, L=L, KVH=KVH, hs=hs, kind=kind, T=T, bos=bos, eos=eos,
                fingerprint=fingerprint(data[wk0:wk0 + 4 * KD * D])), None


def tokenizer_problem(data, V, kind):
    """Why the tokenizer file is not a valid one of V pieces and this kind, or None."""
    if len(data) < 4:
        return "no header"
    max_len, pos, pieces = u32(data, 0), 4, []
    for _ in range(V):
        if pos + 8 > len(data):
            return "fewer pieces than the vocabulary"
        n = i32(data, pos + 4)
        if n < 0 or n > max_len or pos + 8 + n > len(data):
            return "bad piece length"
        pieces.append(data[pos + 8:pos + 8 + n])
        pos += 8 + n
    if kind == 1:
        if pos + 12 > len(data) or u32(data, pos) != BPE_MAGIC or i32(data, pos + 4) not in (0, 1):
            return "BPE tables header"
        n = i32(data, pos + 8)
        pos += 12
        if n < 0 or pos + 8 * n > len(data):
            return "merge count"
        lookup = set(pieces)
        for r in range(n):
            a, b = struct.unpack_from("<ii", data, pos + 8 * r)
            if not (0 <= a < V and 0 <= b < V) or pieces[a] + pieces[b] not in lookup:
                return "merge"
        pos += 8 * n
        if pos + 4 > len(data):
            return "special count"
        n = i32(data, pos)
        pos += 4
        if n < 0 or n > V or pos + 4 * n > len(data):
            return "special count"
        for s in struct.unpack_from("<%di" % n, data, pos):
            if not 0 <= s < V or not pieces[s]:
                return "special token"
        pos += 4 * n
        if pos + 4 > len(data):
            return "range count"
        n = i32(data, pos)
        pos += 4
        if n < 0 or pos + 12 * n > len(data):
            return "range count"
        last = -1
        for r in range(n):
            a, b, c = struct.unpack_from("<IIi", data, pos + 12 * r)
            if a > b or a <= last or c not in (0, 1, 2, 3):
                return "Unicode range"
            last = b
        pos += 12 * n
    return None if pos == len(data) else "bytes after the end"


def centroid_problem(data, ck):
    if len(data) < 64 or u32(data, 0) != CQCB_MAGIC or i32(data, 4) != 1:
        return "centroid header"
    L, KVH, hs, c, b = struct.unpack_from("<5i", data, 8)
    if (L, KVH, hs) != (ck["L"], ck["KVH"], ck["hs"]) or (c, b) != CQ_TYPE:
        return "centroid shape"
    if struct.unpack_from("<Q", data, 40)[0] != ck["fingerprint"]:
        return "fingerprint"
    if len(data) != 64 + 4 * L * 2 * (KVH * hs // c) * (1 << b) * c:
        return "centroid file size"
    if not np.isfinite(np.frombuffer(data, dtype="<f4", offset=64)).all():
        return "non-finite centroid"
    return None


def inputs_problem(ckpt, tok, cent):
    """None when the checkpoint (and the tokenizer / centroid file the command reads) are
    valid and belong together; otherwise the first reason found."""
    ck, why = checkpoint_config(ckpt)
    if why:
        return "checkpoint: " + why
    if tok is not None:
        why = tokenizer_problem(tok, ck["V"], ck["kind"])
        if why:
            return "tokenizer: " + why
    if cent is not None:
        why = centroid_problem(cent, ck)
        if why:
            return "centroids: " + why
    return None


# ------------------------------------------------------------------------------------------
# mutations

INTS = [0, 1, -1, 2, 3, 7, 8, 255, 256, 4096, 65535, 65536, 1 << 22, 1 << 24, 1 << 30,
        2**31 - 1, -2**31, -8]
FLOATS = [math.nan, math.inf, -math.inf, 3e38, -3e38, 1e-45, 0.0, -0.0, 1e30]


def mutate(data, region, rng):
    """1-3 mutations of data inside [region[0], region[1]); returns (bytes, what was done)."""
    b = bytearray(data)
    done = []
    for _ in range(rng.randint(1, 3)):
        lo, hi = region[0], min(region[1], len(b))
        if hi - lo < 4:
            lo, hi = 0, len(b)
        if hi - lo < 4:
            b += bytes(rng.randrange(256) for _ in range(8))
            done.append("append 8")
            continue
        op = rng.choice([0, 0, 1, 2, 3, 3, 4, 5, 6, 7])  # int fields and float specials twice as often
        off = rng.randrange(lo, hi - 3) // 4 * 4 if op in (0, 3) else rng.randrange(lo, hi)
        if op == 0:    # an int32 field: an edge value or one derived from the present one
            old = i32(b, off)
            v = rng.choice(INTS + [old + 1, old - 1, old * 2, old // 2, rng.randrange(-2**31, 2**31)])
            v = (v + 2**31) % 2**32 - 2**31
            struct.pack_into("<i", b, off, v)
            done.append("int32 @%d %d->%d" % (off, old, v))
        elif op == 1:  # bit flips
            for _ in range(rng.randint(1, 8)):
                o = rng.randrange(lo, hi)
                b[o] ^= 1 << rng.randrange(8)
            done.append("bit flips near %d" % off)
        elif op == 2:  # random bytes
            n = rng.randint(1, 16)
            for o in range(off, min(off + n, len(b))):
                b[o] = rng.randrange(256)
            done.append("random bytes @%d" % off)
        elif op == 3:  # a float special
            v = rng.choice(FLOATS)
            struct.pack_into("<f", b, off, v)
            done.append("float @%d = %r" % (off, v))
        elif op == 4:  # cut
            n = rng.choice([off, rng.randrange(len(b)), len(b) - rng.randint(1, 8)])
            del b[max(n, 0):]
            done.append("cut at %d" % max(n, 0))
        elif op == 5:  # append
            n = rng.choice([1, 3, 4, 8, 100])
            b += bytes(rng.randrange(256) for _ in range(n))
            done.append("append %d" % n)
        elif op == 6:  # insert
            n = rng.choice([1, 4, 8])
            b[off:off] = bytes(rng.randrange(256) for _ in range(n))
            done.append("insert %d @%d" % (n, off))
        else:          # delete
            n = rng.choice([1, 4, 8])
            del b[off:off + n]
            done.append("delete %d @%d" % (n, off))
    return bytes(b), "; ".join(done)


def tables_offset(tok1):
    """Where the byte-level tokenizer's "BPE1" tables start."""
    pos = 4
    for _ in range(len(byte_level_tokenizer()[0])):
        pos += 8 + i32(tok1, pos + 4)
    return pos


# ------------------------------------------------------------------------------------------
# the cases

TARGETS = ["legacy_checkpoint", "cqkv_checkpoint", "sentencepiece_tokenizer",
           "byte_level_tokenizer", "centroids"]


def command_lines(target):
    """(args, reads the tokenizer, reads the centroids) with M, Z, C, TEXT, IDS placeholders."""
    # a short prompt, so that most of the steps sample (logits of the prompt's steps are not used)
    gen = ["-n", "8", "-t", "0", "-i", "Once"]
    sampled = ["-n", "8", "-t", "0.9", "-p", "0.9", "-s", "7", "-i", "Once"]
    ppl_text = ["-m", "ppl", "-f", "TEXT"]
    if target in ("legacy_checkpoint", "cqkv_checkpoint"):
        lines = [(gen, 1, 0), (sampled, 1, 0), (ppl_text, 1, 0), (["-m", "ppl", "--ids", "-f", "IDS"], 0, 0),
                 (gen + ["-k", "q8", "-w", "2"], 1, 0), (["-m", "encode", "-i", PROMPT], 1, 0),
                 (["-n", "8", "-t", "5e-38", "-i", "Once"], 1, 0)]
        if target == "cqkv_checkpoint":
            lines.append((["-m", "chat", "-y", "Be brief.", "-i", "hi", "-n", "24"], 1, 0))
        return lines
    if target.endswith("tokenizer"):
        return [(["-m", "encode", "-i", PROMPT], 1, 0), (gen[:-1] + [PROMPT], 1, 0), (ppl_text, 1, 0),
                (["-m", "decode", "-f", "IDS"], 1, 0)]
    return [(gen + ["-k", "cq1", "-c", "C"], 1, 1), (["-m", "ppl", "--ids", "-f", "IDS", "-k", "cq1", "-c", "C"], 0, 1),
            (sampled + ["-k", "cq1", "-w", "3", "-c", "C"], 1, 1)]


def make_cases(base, target, n, seed):
    rng = random.Random("%d-%s" % (seed, target))
    ckpt = (base / ("legacy.bin" if target == "legacy_checkpoint" else "cqkv.bin")).read_bytes()
    tok_name = "tok0.bin" if target in ("legacy_checkpoint", "sentencepiece_tokenizer") else "tok1.bin"
    if target == "sentencepiece_tokenizer":
        ckpt = (base / "legacy.bin").read_bytes()
    tok = (base / tok_name).read_bytes()
    cent = (base / "cqkv.cent").read_bytes()
    lines = command_lines(target)
    cases = []
    for i in range(n):
        files = {"M": ckpt, "Z": tok, "C": cent}
        if target.endswith("checkpoint"):
            header = 28 if target == "legacy_checkpoint" else 256
            files["M"], what = mutate(ckpt, (0, header + 1024), rng)
        elif target.endswith("tokenizer"):
            region = (0, 1024)
            if target == "byte_level_tokenizer" and rng.random() < 0.5:
                t = tables_offset(tok)
                region = (t, t + 1024)
            files["Z"], what = mutate(tok, region, rng)
        else:
            files["C"], what = mutate(cent, (0, 64 + 1024), rng)
        args, reads_tok, reads_cent = lines[i % len(lines)]
        cases.append(dict(i=i, files=files, args=args, what=what,
                          problem=inputs_problem(files["M"], files["Z"] if reads_tok else None,
                                                 files["C"] if reads_cent else None)))
    return cases


def run_case(binary, work, target, case):
    d = work / ("%s_%05d" % (target, case["i"]))
    d.mkdir()
    paths = {}
    for key, name in (("M", "model.bin"), ("Z", "tok.bin"), ("C", "model.cent")):
        (d / name).write_bytes(case["files"][key])
        paths[key] = str(d / name)
    paths["TEXT"], paths["IDS"] = str(work / "text.txt"), str(work / "ids.txt")
    args = [paths.get(a, a) for a in case["args"]]
    cmd = [str(binary), paths["M"], "-z", paths["Z"]] + args
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, input=b"",
                           timeout=TIMEOUT, env=env)
    except subprocess.TimeoutExpired:
        return "hang", cmd, b""
    err = r.stderr
    if any(w in err for w in SANITIZER_WORDS):
        outcome = "sanitizer"
    elif r.returncode < 0 or r.returncode >= 128:
        outcome = "signal"
    elif r.returncode == 1 and err.startswith(b"error: "):
        outcome = "clean error"
    elif r.returncode == 0:
        outcome = "normal run" if case["problem"] is None else "exit 0 on invalid input"
    else:
        outcome = "unclean error"
    if outcome in ("clean error", "normal run"):
        for name in ("model.bin", "tok.bin", "model.cent"):
            os.remove(d / name)
        d.rmdir()
    return outcome, cmd, err


def cases_per_target(target):
    k = TARGETS.index(target)
    return CASES // len(TARGETS) + (1 if k < CASES % len(TARGETS) else 0)


@pytest.mark.parametrize("target", TARGETS)
def test_mutation_fuzz(run_bin, base, tmp_path, target):
    work = tmp_path
    for name in ("text.txt", "ids.txt"):
        (work / name).write_bytes((base / name).read_bytes())
    cases = make_cases(base, target, cases_per_target(target), SEED)
    with ThreadPoolExecutor(max_workers=max(1, JOBS)) as pool:
        results = list(pool.map(lambda c: run_case(run_bin, work, target, c), cases))
    counts = {}
    bad = []
    for case, (outcome, cmd, err) in zip(cases, results):
        counts[outcome] = counts.get(outcome, 0) + 1
        if outcome not in ("clean error", "normal run"):
            lines = err.decode(errors="replace").splitlines()
            keep = lines[:6] + [l for l in lines[6:] if "SUMMARY" in l]  # the report's head and summary
            bad.append("%s (%s; inputs: %s)\n  %s\n  %s" % (
                outcome, case["what"], case["problem"] or "valid", " ".join(cmd), "\n  ".join(keep)))
    print("\nfuzz %s: %d cases, %d clean errors, %d normal runs, %d others %s" % (
        target, len(cases), counts.get("clean error", 0), counts.get("normal run", 0),
        len(bad), {k: v for k, v in counts.items() if k not in ("clean error", "normal run")}))
    assert not bad, "%d of %d cases failed; the first ones:\n%s" % (len(bad), len(cases),
                                                                   "\n".join(bad[:5]))


def test_oracle_accepts_the_base_files_and_spots_known_defects(base):
    """The oracle is what makes "exit 0" a failure: it must call the valid files valid and
    the usual defects invalid."""
    legacy, cqkv = (base / "legacy.bin").read_bytes(), (base / "cqkv.bin").read_bytes()
    tok0, tok1 = (base / "tok0.bin").read_bytes(), (base / "tok1.bin").read_bytes()
    cent = (base / "cqkv.cent").read_bytes()
    assert inputs_problem(legacy, tok0, None) is None
    assert inputs_problem(cqkv, tok1, cent) is None
    assert "size" in inputs_problem(legacy[:-4], tok0, None)
    assert inputs_problem(cqkv, tok0, None) is not None  # a tokenizer of another kind and size
    assert "bytes after" in inputs_problem(legacy, tok0 + b"\0", None)
    assert inputs_problem(cqkv, tok1[:-12], None) is not None
    assert "fingerprint" in inputs_problem(cqkv, tok1, cent[:40] + bytes(8) + cent[48:])
    nan = bytearray(cent)
    struct.pack_into("<f", nan, 64 + 40, math.nan)
    assert "non-finite" in inputs_problem(cqkv, tok1, bytes(nan))
    bad_range = bytearray(tok1)
    struct.pack_into("<i", bad_range, len(tok1) - 4, 7)  # the last range's class
    assert "Unicode range" in inputs_problem(cqkv, bytes(bad_range), None)
    # the mutations are deterministic per seed
    a = make_cases(base, "centroids", 5, 1)
    b = make_cases(base, "centroids", 5, 1)
    assert [c["files"]["C"] for c in a] == [c["files"]["C"] for c in b]
