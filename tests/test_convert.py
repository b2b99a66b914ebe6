"""Tests of export.py's converters (section 7: `export.py model` and `export.py tokenizer`)
together with run.c.

Every model test builds a tiny synthetic checkpoint in a source format (a Hugging Face
directory, a Meta directory, a GGUF file, a llama2.c file), converts it, runs ./run on the
converted file (-m ppl --ids --logits) and compares the logits with a reference computed from
the SOURCE tensors, not from the converted file:
  * Hugging Face: a numpy forward pass written in HF's own convention (rotate-half RoPE on the
    q/k rows as HF stores them), so the q/k row permutation of the converter is checked
    numerically;
  * Meta and GGUF: tests/reference.py's forward pass (both store q/k in the interleaved
    layout); GGUF tensors are dequantized here from their bytes (Q8_0, Q4_0, Q4_1);
  * llama2.c: the logits of the legacy file itself.
The tokenizer tests check the sentencepiece export byte for byte against llama2.c's, and the
byte-level BPE export against the `tokenizers` package (a trained toy tokenizer and, when the
file is present, SmolLM2's). The last section checks the error contract of both commands.

Run: .venv/bin/python -m pytest -q tests/test_convert.py   (gguf and tokenizers come from .venv)
With CQ_SKIP_SLOW=1 (the sanitizer run) the conversion of the real SmolLM2 model is skipped.
"""

import hashlib
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import DATA, MODELS, REPO, R, assert_clean_error

sys.path.insert(0, str(REPO))
import export  # noqa: E402

SKIP_SLOW = os.environ.get("CQ_SKIP_SLOW") == "1"
REL_LOGITS = 1e-4
SMOLLM_GGUF = REPO / "models" / "smollm2-135m-instruct.gguf"
TOK512_MODEL = MODELS / "tok512.model"
TOK512_BIN = MODELS / "tok512.bin"
WIKITEXT_RAW = DATA / "wikitext2-test.raw.txt"
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}")
LLAMA2_TEMPLATE = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"

HEADER = struct.Struct("<Ii8iffiiiii")
HEADER_KEYS = ("magic", "version", "dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads",
               "vocab_size", "seq_len", "head_size", "rope_theta", "norm_eps", "bos_id",
               "eos_id", "shared_classifier", "tokenizer_kind", "chat_template")


# ------------------------------------------------------------------------------------------
# helpers

def export_ok(*argv):
    """Runs export.py in this process (importing torch once for the whole file)."""
    rc = export.main([str(a) for a in argv])
    assert rc == 0, "export.py %s failed with %s" % (" ".join(map(str, argv)), rc)


def read_header(path):
    with open(path, "rb") as f:
        raw = f.read(256)
    assert len(raw) == 256
    h = dict(zip(HEADER_KEYS, HEADER.unpack_from(raw)))
    assert h["magic"] == 0x564B5143 and h["version"] == 1
    assert raw[HEADER.size:] == bytes(256 - HEADER.size), "header padding is not zero"
    return h


def check_header(path, **want):
    """Compares header fields (floats as float32) and the file size implied by the header."""
    h = read_header(path)
    for k, v in want.items():
        if isinstance(v, float):
            assert h[k] == np.float32(v), (k, h[k], v)
        else:
            assert h[k] == v, (k, h[k], v)
    D, F, L = h["dim"], h["hidden_dim"], h["n_layers"]
    q, kv, V = h["n_heads"] * h["head_size"], h["n_kv_heads"] * h["head_size"], h["vocab_size"]
    floats = V * D + L * (D + q * D + 2 * kv * D + D * q + D + 3 * F * D) + D
    floats += 0 if h["shared_classifier"] else V * D
    assert os.path.getsize(path) == 256 + 4 * floats
    return h


def run_logits(run, tmp, model, ids, vocab, name="ids"):
    """./run's logits for the window [bos] + ids: one row per step."""
    f = tmp / (name + ".txt")
    f.write_text(" ".join(map(str, ids)) + "\n")
    lf = tmp / (name + ".logits")
    run(model, "-m", "ppl", "-f", f, "--ids", "--logits", lf, check=True)
    a = np.fromfile(lf, dtype="<f4")
    assert a.size == (len(ids) + 1) * vocab, "logits file: %d floats" % a.size
    return a.reshape(len(ids) + 1, vocab)


def rel_err(got, ref):
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


def check_logits(got, ref):
    assert got.shape == ref.shape
    err = rel_err(got, ref)
    assert err < REL_LOGITS, "logits differ from the reference: relative error %.3g" % err


def visible_stderr_lines(err):
    """stderr as a terminal shows it: progress text rewritten by '\\r' is gone."""
    return [line.split("\r")[-1] for line in err.split("\n") if line.split("\r")[-1].strip()]


def check_export_error(capsys, argv, msg=None):
    """export.main(argv) fails with one "error: ..." line on stderr and nothing on stdout."""
    capsys.readouterr()
    rc = export.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 1, "expected exit status 1, got %r; stderr=%r" % (rc, err)
    lines = visible_stderr_lines(err)
    assert len(lines) == 1 and lines[0].startswith("error: "), "stderr: %r" % err
    assert "Traceback" not in err and out == ""
    if msg is not None:
        assert msg in lines[0], lines[0]


def random_ids(seed, vocab, n=10):
    return [int(t) for t in np.random.default_rng(seed).integers(0, vocab, size=n)]


def normal(rng, shape, scale):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def norm_weight(rng, n):
    return (1.0 + 0.2 * rng.standard_normal(n)).astype(np.float32)


# ------------------------------------------------------------------------------------------
# 1. Hugging Face directories

def hf_tensors(seed, D, F, L, H, KVH, hd, V, untied):
    """Random weights under HF's names, q/k rows in HF's rotate-half layout (float32)."""
    rng = np.random.default_rng(seed)
    t = {"model.embed_tokens.weight": normal(rng, (V, D), 2.0 / np.sqrt(D)),
         "model.norm.weight": norm_weight(rng, D)}
    for l in range(L):
        p = "model.layers.%d." % l
        t[p + "input_layernorm.weight"] = norm_weight(rng, D)
        t[p + "self_attn.q_proj.weight"] = normal(rng, (H * hd, D), 1 / np.sqrt(D))
        t[p + "self_attn.k_proj.weight"] = normal(rng, (KVH * hd, D), 1 / np.sqrt(D))
        t[p + "self_attn.v_proj.weight"] = normal(rng, (KVH * hd, D), 1 / np.sqrt(D))
        t[p + "self_attn.o_proj.weight"] = normal(rng, (D, H * hd), 1 / np.sqrt(H * hd))
        t[p + "post_attention_layernorm.weight"] = norm_weight(rng, D)
        t[p + "mlp.gate_proj.weight"] = normal(rng, (F, D), 1 / np.sqrt(D))
        t[p + "mlp.up_proj.weight"] = normal(rng, (F, D), 1 / np.sqrt(D))
        t[p + "mlp.down_proj.weight"] = normal(rng, (D, F), 1 / np.sqrt(F))
    if untied:
        t["lm_head.weight"] = normal(rng, (V, D), 2.0 / np.sqrt(D))
    return t


def hf_rmsnorm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def hf_rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def hf_forward(hc, tensors, tokens):
    """LlamaForCausalLM's forward pass in float64, in HF's conventions: rotate-half RoPE with
    cos/sin of shape (T, head_dim) from inv_freq duplicated [freqs, freqs], repeat_kv for
    grouped-query attention, q/k/v/o_proj, gate/up/down_proj, RMSNorm."""
    t = {k: np.asarray(v, dtype=np.float64) for k, v in tensors.items()}
    D, H = hc["hidden_size"], hc["num_attention_heads"]
    KVH = hc.get("num_key_value_heads") or H
    hd = hc.get("head_dim") or D // H
    theta, eps = hc.get("rope_theta", 10000.0), hc.get("rms_norm_eps", 1e-6)
    T = len(tokens)
    inv_freq = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    freqs = np.outer(np.arange(T, dtype=np.float64), inv_freq)
    emb = np.concatenate([freqs, freqs], axis=-1)            # (T, hd)
    cos, sin = np.cos(emb)[:, None, :], np.sin(emb)[:, None, :]
    mask = np.triu(np.full((T, T), -np.inf), k=1)
    x = t["model.embed_tokens.weight"][np.asarray(tokens)]
    for l in range(hc["num_hidden_layers"]):
        p = "model.layers.%d." % l
        h = hf_rmsnorm(x, t[p + "input_layernorm.weight"], eps)
        q = (h @ t[p + "self_attn.q_proj.weight"].T).reshape(T, H, hd)
        k = (h @ t[p + "self_attn.k_proj.weight"].T).reshape(T, KVH, hd)
        v = (h @ t[p + "self_attn.v_proj.weight"].T).reshape(T, KVH, hd)
        q = q * cos + hf_rotate_half(q) * sin
        k = k * cos + hf_rotate_half(k) * sin
        k = np.repeat(k, H // KVH, axis=1)                  # repeat_kv
        v = np.repeat(v, H // KVH, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + mask
        s = np.exp(s - s.max(axis=-1, keepdims=True))
        s /= s.sum(axis=-1, keepdims=True)
        o = np.einsum("hqk,khd->qhd", s, v).reshape(T, H * hd)
        x = x + o @ t[p + "self_attn.o_proj.weight"].T
        h = hf_rmsnorm(x, t[p + "post_attention_layernorm.weight"], eps)
        g = h @ t[p + "mlp.gate_proj.weight"].T
        u = h @ t[p + "mlp.up_proj.weight"].T
        x = x + (g / (1.0 + np.exp(-g)) * u) @ t[p + "mlp.down_proj.weight"].T
    x = hf_rmsnorm(x, t["model.norm.weight"], eps)
    head = t["model.embed_tokens.weight"] if hc.get("tie_word_embeddings") else t["lm_head.weight"]
    return x @ head.T


def to_storage(a, dtype):
    """float32 array -> (raw little-endian bytes in `dtype`, the exact stored values as float64)."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    if dtype == "F32":
        return a.astype("<f4").tobytes(), a.astype(np.float64)
    if dtype == "F16":
        h = a.astype("<f2")
        return h.tobytes(), h.astype(np.float64)
    assert dtype == "BF16"
    u = a.view(np.uint32).astype(np.uint64)
    top = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")   # round to nearest even
    back = (top.astype(np.uint32) << 16).view(np.float32)
    return top.tobytes(), back.astype(np.float64)


def write_safetensors(path, entries):
    """entries: name -> (dtype string, shape, raw bytes). 8-byte header length, JSON, data."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, (dtype, shape, raw) in entries.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    js = json.dumps(header).encode("utf-8")
    js += b" " * (-len(js) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(js)))
        f.write(js)
        for b in blobs:
            f.write(b)


HF_CASES = {
    # safetensors BF16, GQA, explicit head_dim != hidden/heads, separate lm_head, ChatML,
    # byte-level tokenizer.json, eos given as a list
    "bf16_gqa_untied": dict(
        weights="safetensors", dtype="BF16", D=48, F=80, L=2, H=4, KVH=2, hd=16, V=67,
        untied=True, extra=dict(rope_theta=500000.0, rms_norm_eps=1e-6, head_dim=16,
                                bos_token_id=1, eos_token_id=[2, 5], tie_word_embeddings=False),
        template=CHATML, byte_level=True),
    # safetensors F16, MHA (num_key_value_heads absent), tied, theta and head_dim absent
    "f16_mha_tied": dict(
        weights="safetensors", dtype="F16", D=32, F=64, L=2, H=4, KVH=None, hd=8, V=53,
        untied=False, extra=dict(rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=3,
                                 tie_word_embeddings=True),
        template=LLAMA2_TEMPLATE, byte_level=False),
    # safetensors F32 in two shard files (+ index), GQA with 3 query heads per kv head
    "f32_sharded_gqa3": dict(
        weights="safetensors-2", dtype="F32", D=48, F=72, L=3, H=6, KVH=2, hd=8, V=61,
        untied=False, extra=dict(rope_theta=1000000.0, rms_norm_eps=1e-5, head_dim=8,
                                 bos_token_id=3, eos_token_id=4, tie_word_embeddings=True),
        template=None, byte_level=False),
    # pytorch_model-0000X-of-00002.bin, multi-query attention, q width 64 > hidden 32
    "torch_sharded_mqa": dict(
        weights="torch-2", dtype="F32", D=32, F=64, L=2, H=4, KVH=1, hd=16, V=59,
        untied=True, extra=dict(rope_theta=20000.0, rms_norm_eps=1e-5, head_dim=16,
                                bos_token_id=1, eos_token_id=2),
        template=CHATML, byte_level=False),
    # pytorch_model.bin (bfloat16) of a tied model whose state dict also holds lm_head.weight
    "torch_bf16_tied_with_head": dict(
        weights="torch", dtype="BF16", D=32, F=48, L=1, H=2, KVH=2, hd=16, V=50,
        untied=True, extra=dict(rope_theta=40000.0, rms_norm_eps=1e-5, bos_token_id=1,
                                eos_token_id=2, tie_word_embeddings=True),
        template=None, byte_level=True),
}


def make_hf_dir(d, case, seed):
    d.mkdir()
    c = HF_CASES[case]
    hc = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=c["D"],
              intermediate_size=c["F"], num_hidden_layers=c["L"], num_attention_heads=c["H"],
              vocab_size=c["V"], max_position_embeddings=64, hidden_act="silu")
    if c["KVH"] is not None:
        hc["num_key_value_heads"] = c["KVH"]
    hc.update(c["extra"])
    (d / "config.json").write_text(json.dumps(hc, indent=1))
    if c["template"] is not None:
        (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": c["template"]}))
    if c["byte_level"]:
        (d / "tokenizer.json").write_text(json.dumps(
            {"version": "1.0", "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False},
             "model": {"type": "BPE", "vocab": {}, "merges": []}}))
    t = hf_tensors(seed, c["D"], c["F"], c["L"], c["H"], c["KVH"] or c["H"], c["hd"], c["V"],
                   c["untied"])
    if case == "torch_bf16_tied_with_head":
        t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()
    stored = {}   # the exact values in the files, float64
    names = list(t)
    if c["weights"].startswith("safetensors"):
        n_files = 2 if c["weights"].endswith("-2") else 1
        files = [{} for _ in range(n_files)]
        for i, name in enumerate(names):
            raw, stored[name] = to_storage(t[name], c["dtype"])
            files[i % n_files][name] = (c["dtype"], t[name].shape, raw)
        if n_files == 1:
            write_safetensors(d / "model.safetensors", files[0])
        else:
            index = {}
            for i, entries in enumerate(files):
                fname = "model-%05d-of-%05d.safetensors" % (i + 1, n_files)
                write_safetensors(d / fname, entries)
                index.update({name: fname for name in entries})
            (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    else:
        tdtype = torch.bfloat16 if c["dtype"] == "BF16" else torch.float32
        sd = {name: torch.from_numpy(t[name]).to(tdtype) for name in names}
        for name in names:
            stored[name] = sd[name].to(torch.float64).numpy()
        if c["weights"] == "torch":
            torch.save(sd, d / "pytorch_model.bin")
        else:
            half = len(names) // 2
            for i, part in enumerate((names[:half], names[half:])):
                torch.save({n: sd[n] for n in part}, d / ("pytorch_model-%05d-of-00002.bin" % (i + 1)))
    return hc, stored


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_hf_directory(run, tmp, case):
    c = HF_CASES[case]
    hc, stored = make_hf_dir(tmp / "hf", case, seed=len(case))
    out = tmp / "model.bin"
    export_ok("model", tmp / "hf", "-o", out)
    eos = hc["eos_token_id"]
    check_header(out, dim=c["D"], hidden_dim=c["F"], n_layers=c["L"], n_heads=c["H"],
                 n_kv_heads=c["KVH"] or c["H"], vocab_size=c["V"], seq_len=64, head_size=c["hd"],
                 rope_theta=float(hc.get("rope_theta", 10000.0)), norm_eps=hc["rms_norm_eps"],
                 bos_id=hc["bos_token_id"], eos_id=eos[0] if isinstance(eos, list) else eos,
                 shared_classifier=int(bool(hc.get("tie_word_embeddings"))),
                 tokenizer_kind=int(c["byte_level"]), chat_template=int(c["template"] == CHATML))
    ids = random_ids(7, c["V"], 11)
    got = run_logits(run, tmp, out, ids, c["V"])
    check_logits(got, hf_forward(hc, stored, [hc["bos_token_id"]] + ids))


def test_hf_qk_row_order(tmp):
    """Within a head the converted q/k rows are HF's reordered (our 2j = HF j, our 2j + 1 =
    HF hs/2 + j), and the reordering matters: reference.py's interleaved forward pass on the
    converted weights matches the rotate-half forward on HF's, and on HF's rows left as they
    are it clearly does not (so the logits tests above do see the order)."""
    hc, stored = make_hf_dir(tmp / "hf", "bf16_gqa_untied", seed=3)
    out = tmp / "model.bin"
    export_ok("model", tmp / "hf", "-o", out)
    cfg, w = R.read_checkpoint(out)
    hd, H, KVH = hc["head_dim"], hc["num_attention_heads"], hc["num_key_value_heads"]
    unpermuted = {k: np.array(v) for k, v in w.items()}
    for l in range(hc["num_hidden_layers"]):
        for ours_name, name, heads in (("wq", "q_proj", H), ("wk", "k_proj", KVH)):
            theirs = stored["model.layers.%d.self_attn.%s.weight" % (l, name)]
            ours = np.asarray(w[ours_name][l]).reshape(heads, hd, -1)
            hf = theirs.reshape(heads, hd, -1).astype(np.float32)
            assert np.array_equal(ours[:, 0::2], hf[:, :hd // 2])
            assert np.array_equal(ours[:, 1::2], hf[:, hd // 2:])
            unpermuted[ours_name][l] = theirs
    ids = [hc["bos_token_id"]] + random_ids(8, hc["vocab_size"], 9)
    ref = hf_forward(hc, stored, ids)
    assert rel_err(R.forward(cfg, w, ids), ref) < REL_LOGITS
    assert rel_err(R.forward(cfg, unpermuted, ids), ref) > 1e-2


# ------------------------------------------------------------------------------------------
# 2. Meta directories (params.json + consolidated.NN.pth)

META_CASES = {
    # one file, MHA (n_kv_heads absent), bfloat16, output == tok_embeddings, rope.freqs present
    "single_bf16_mha_shared": dict(shards=1, dtype=torch.bfloat16, D=32, F=64, L=2, H=4, KVH=None,
                                   V=70, theta=None, eps=1e-5, shared=True, llama3=False),
    # two model-parallel shards split as Llama 2 does (tok_embeddings along dim 1), GQA
    "two_shards_llama2_gqa": dict(shards=2, dtype=torch.float16, D=32, F=64, L=2, H=4, KVH=2,
                                  V=70, theta=10000.0, eps=1e-6, shared=False, llama3=False),
    # two shards split as Llama 3 does (tok_embeddings along the vocabulary), theta 500000
    "two_shards_llama3_gqa": dict(shards=2, dtype=torch.float32, D=32, F=96, L=2, H=4, KVH=2,
                                  V=70, theta=500000.0, eps=1e-5, shared=False, llama3=True),
}


def meta_state_dict(seed, c):
    rng = np.random.default_rng(seed)
    D, F, L, H, V = c["D"], c["F"], c["L"], c["H"], c["V"]
    hs, KVH = D // H, c["KVH"] or c["H"]
    sd = {"tok_embeddings.weight": normal(rng, (V, D), 2.0 / np.sqrt(D)),
          "norm.weight": norm_weight(rng, D)}
    sd["output.weight"] = (sd["tok_embeddings.weight"].copy() if c["shared"]
                           else normal(rng, (V, D), 2.0 / np.sqrt(D)))
    for l in range(L):
        p = "layers.%d." % l
        sd[p + "attention.wq.weight"] = normal(rng, (H * hs, D), 1 / np.sqrt(D))
        sd[p + "attention.wk.weight"] = normal(rng, (KVH * hs, D), 1 / np.sqrt(D))
        sd[p + "attention.wv.weight"] = normal(rng, (KVH * hs, D), 1 / np.sqrt(D))
        sd[p + "attention.wo.weight"] = normal(rng, (D, H * hs), 1 / np.sqrt(H * hs))
        sd[p + "feed_forward.w1.weight"] = normal(rng, (F, D), 1 / np.sqrt(D))
        sd[p + "feed_forward.w2.weight"] = normal(rng, (D, F), 1 / np.sqrt(F))
        sd[p + "feed_forward.w3.weight"] = normal(rng, (F, D), 1 / np.sqrt(D))
        sd[p + "attention_norm.weight"] = norm_weight(rng, D)
        sd[p + "ffn_norm.weight"] = norm_weight(rng, D)
    sd = {k: torch.from_numpy(v).to(c["dtype"]) for k, v in sd.items()}
    sd["rope.freqs"] = 1.0 / (10000.0 ** (torch.arange(0, hs, 2).float() / hs))  # old files have it
    return sd


def split_model_parallel(sd, n, llama3):
    """Meta's model parallelism: column-parallel weights (wq, wk, wv, w1, w3, output) split
    along dim 0, row-parallel ones (wo, w2) along dim 1, tok_embeddings along dim 1 (Llama 2's
    ParallelEmbedding) or dim 0 (Llama 3's VocabParallelEmbedding); 1-D tensors replicated."""
    parts = [{} for _ in range(n)]
    for name, v in sd.items():
        if v.dim() == 1:
            chunks = [v] * n
        else:
            row_parallel = name.endswith(("attention.wo.weight", "feed_forward.w2.weight"))
            if name == "tok_embeddings.weight":
                row_parallel = not llama3
            chunks = torch.chunk(v, n, dim=1 if row_parallel else 0)
        for p, x in zip(parts, chunks):
            p[name] = x.clone()
    return parts


@pytest.mark.parametrize("case", sorted(META_CASES))
def test_meta_directory(run, tmp, case):
    c = META_CASES[case]
    d = tmp / "meta"
    d.mkdir()
    params = {"dim": c["D"], "n_layers": c["L"], "n_heads": c["H"], "vocab_size": -1,
              "multiple_of": 32, "norm_eps": c["eps"]}
    if c["KVH"] is not None:
        params["n_kv_heads"] = c["KVH"]
    if c["theta"] is not None:
        params["rope_theta"] = c["theta"]
    (d / "params.json").write_text(json.dumps(params))
    sd = meta_state_dict(11 + len(case), c)
    parts = [sd] if c["shards"] == 1 else split_model_parallel(sd, c["shards"], c["llama3"])
    for i, p in enumerate(parts):
        torch.save(p, d / ("consolidated.%02d.pth" % i))
    out = tmp / "model.bin"
    export_ok("model", d, "-o", out, "--seq-len", 40)
    KVH = c["KVH"] or c["H"]
    check_header(out, dim=c["D"], hidden_dim=c["F"], n_layers=c["L"], n_heads=c["H"],
                 n_kv_heads=KVH, vocab_size=c["V"], seq_len=40, head_size=c["D"] // c["H"],
                 rope_theta=c["theta"] or 10000.0, norm_eps=c["eps"], bos_id=1, eos_id=2,
                 shared_classifier=int(c["shared"]), tokenizer_kind=0, chat_template=0)
    # the reference: reference.py's (interleaved) forward on the unsplit source tensors
    f = lambda name: sd[name].to(torch.float64).numpy()  # noqa: E731
    cfg = R.make_config(c["D"], c["F"], c["L"], c["H"], KVH, c["V"], 40,
                        rope_theta=c["theta"] or 10000.0, norm_eps=c["eps"],
                        shared_classifier=False)
    w = {"token_embedding": f("tok_embeddings.weight"), "final_norm": f("norm.weight"),
         "classifier": f("output.weight")}
    for ours, theirs in (("attn_norm", "attention_norm"), ("wq", "attention.wq"),
                         ("wk", "attention.wk"), ("wv", "attention.wv"), ("wo", "attention.wo"),
                         ("ffn_norm", "ffn_norm"), ("w1", "feed_forward.w1"),
                         ("w2", "feed_forward.w2"), ("w3", "feed_forward.w3")):
        w[ours] = np.stack([f("layers.%d.%s.weight" % (l, theirs)) for l in range(c["L"])])
    ids = random_ids(5, c["V"], 12)
    check_logits(run_logits(run, tmp, out, ids, c["V"]), R.forward(cfg, w, [1] + ids))


# ------------------------------------------------------------------------------------------
# 3. GGUF files

BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}


def own_dequantize(raw, qtype, shape):
    """ggml's block formats, decoded here from the bytes: blocks of 32 values along a row;
    Q8_0 = fp16 d + 32 int8 (x = d q); Q4_0 = fp16 d + 16 bytes, low nibbles values 0..15,
    high nibbles 16..31 (x = d (q - 8)); Q4_1 = fp16 d, fp16 m + 16 bytes (x = d q + m).
    float32 arithmetic, as ggml's: d q is exact, Q4_1's "+ m" rounds once."""
    b = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, BLOCK_BYTES[qtype])
    d = b[:, 0:2].copy().view("<f2").astype(np.float32)
    if qtype == "Q8_0":
        x = d * b[:, 2:].copy().view(np.int8).astype(np.float32)
    else:
        qs = b[:, 4:] if qtype == "Q4_1" else b[:, 2:]
        q = np.empty((len(b), 32), dtype=np.float32)
        q[:, :16] = qs & 0x0F
        q[:, 16:] = qs >> 4
        if qtype == "Q4_0":
            x = d * (q - np.float32(8))
        else:
            x = d * q + b[:, 2:4].copy().view("<f2").astype(np.float32)
    return x.reshape(shape)


GGUF_NAMES = {"attn_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v",
              "wo": "attn_output", "ffn_norm": "ffn_norm", "w1": "ffn_gate", "w2": "ffn_down",
              "w3": "ffn_up"}

MIXED = {"token_embd": "Q8_0", "attn_q": "Q4_0", "attn_k": "Q4_1", "attn_v": "Q8_0",
         "attn_output": "F16", "ffn_gate": "Q4_1", "ffn_up": "Q4_0", "ffn_down": "Q8_0",
         "output": "F16", "attn_norm": "F32", "ffn_norm": "F16", "output_norm": "F32"}

# D=64, F=96, H=4, head size 16: every row length is a multiple of the block size 32
GGUF_CASES = {
    "F32": dict(KVH=2, output=True, theta=None, eps=None, tok="llama", template=None, vocab_key=False),
    "F16": dict(KVH=None, output=False, theta=500000.0, eps=1e-6, tok="gpt2", template=CHATML, vocab_key=False),
    "Q8_0": dict(KVH=2, output=True, theta=10000.0, eps=1e-5, tok=None, template=None, vocab_key=True),
    "Q4_0": dict(KVH=1, output=False, theta=10000.0, eps=1e-5, tok="llama", template=LLAMA2_TEMPLATE, vocab_key=False),
    "Q4_1": dict(KVH=2, output=True, theta=1000000.0, eps=1e-5, tok="llama", template=None, vocab_key=False),
    "mixed": dict(KVH=2, output=True, theta=100000.0, eps=1e-5, tok="gpt2", template=CHATML, vocab_key=False),
}


def gguf_vocab(V, kind):
    """Token strings, scores and types for a tiny vocabulary (model "llama" or "gpt2")."""
    if kind == "llama":
        tokens = ["<unk>", "<s>", "</s>"] + ["\u2581w%d" % i for i in range(V - 3)]
        return tokens, [0.0, 0.0, 0.0] + [-float(i) for i in range(V - 3)], [2, 3, 3] + [1] * (V - 3)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["\u0120"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + letters
    merges = []
    for a in letters[:-1]:
        if len(tokens) == V:
            break
        tokens.append("\u0120" + a)
        merges.append("\u0120 " + a)
    while len(tokens) < V:
        a, b = tokens[3 + len(tokens) % 26], tokens[4 + len(tokens) % 25]
        if a + b not in tokens:
            merges.append(a + " " + b)
            tokens.append(a + b)
        else:
            tokens.append("<extra_%d>" % len(tokens))
    return tokens, merges, [3, 3, 3] + [1] * (V - 3)


def write_gguf(path, case, seed, D=64, F=96, L=2, H=4, V=80, ctx=64, arch="llama"):
    """A tiny LLaMA GGUF; returns (reference config, reference weights as stored)."""
    import gguf
    c = GGUF_CASES[case]
    KVH, hs = c["KVH"] or H, D // H
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(ctx)
    w.add_embedding_length(D)
    w.add_block_count(L)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    if c["KVH"] is not None:
        w.add_head_count_kv(c["KVH"])
    w.add_rope_dimension_count(hs)
    if c["theta"] is not None:
        w.add_rope_freq_base(c["theta"])
    if c["eps"] is not None:
        w.add_layer_norm_rms_eps(c["eps"])
    if c["vocab_key"]:
        w.add_vocab_size(V)
    bos, eos = (1, 2) if c["tok"] != "gpt2" else (0, 2)
    if c["tok"] == "llama":
        tokens, scores, types = gguf_vocab(V, "llama")
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
    elif c["tok"] == "gpt2":
        tokens, merges, types = gguf_vocab(V, "gpt2")
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("smollm")
        w.add_token_list(tokens)
        w.add_token_merges(merges)
        w.add_token_types(types)
    if c["tok"] is not None:
        w.add_bos_token_id(bos)
        w.add_eos_token_id(eos)
    if c["template"] is not None:
        w.add_chat_template(c["template"])

    def put(name, a, kind):
        """Stores float32 `a` (numpy shape (out, in)) as `kind`; returns the stored values."""
        if case == "mixed":
            qtype = MIXED[kind]
        elif a.ndim == 1:   # norms: F32 (F16 in the F16 file)
            qtype = "F16" if case == "F16" else "F32"
        else:
            qtype = case
        if qtype == "F32":
            w.add_tensor(name, a.astype(np.float32))
            return a.astype(np.float64)
        if qtype == "F16":
            h = a.astype(np.float16)
            w.add_tensor(name, h)
            return h.astype(np.float64)
        gq = getattr(gguf.GGMLQuantizationType, qtype)
        raw = gguf.quants.quantize(a.astype(np.float32), gq)
        w.add_tensor(name, raw, raw_dtype=gq)
        x = own_dequantize(raw, qtype, a.shape)
        # the package's decoder agrees, and the values are what was quantized (roughly)
        assert np.allclose(x, gguf.quants.dequantize(raw, gq).reshape(a.shape), rtol=0, atol=1e-6)
        assert np.max(np.abs(x - a)) < (0.02 if qtype == "Q8_0" else 0.3) * np.max(np.abs(a))
        return x

    ref = {"token_embedding": put("token_embd.weight", normal(rng, (V, D), 2.0 / np.sqrt(D)), "token_embd")}
    shapes = {"attn_norm": (D,), "wq": (H * hs, D), "wk": (KVH * hs, D), "wv": (KVH * hs, D),
              "wo": (D, H * hs), "ffn_norm": (D,), "w1": (F, D), "w2": (D, F), "w3": (F, D)}
    fan_in = {"wo": H * hs, "w2": F}
    layers = {k: [] for k in shapes}
    for l in range(L):
        for ours, shape in shapes.items():
            a = norm_weight(rng, shape[0]) if len(shape) == 1 else normal(rng, shape, 1 / np.sqrt(fan_in.get(ours, D)))
            layers[ours].append(put("blk.%d.%s.weight" % (l, GGUF_NAMES[ours]), a, GGUF_NAMES[ours]))
    ref.update({k: np.stack(v) for k, v in layers.items()})
    ref["final_norm"] = put("output_norm.weight", norm_weight(rng, D), "output_norm")
    if c["output"]:
        ref["classifier"] = put("output.weight", normal(rng, (V, D), 2.0 / np.sqrt(D)), "output")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    cfg = R.make_config(D, F, L, H, KVH, V, ctx, rope_theta=c["theta"] or 10000.0,
                        norm_eps=c["eps"] or 1e-5, bos_id=bos, eos_id=eos,
                        shared_classifier=not c["output"])
    return cfg, ref


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_gguf(run, tmp, case):
    pytest.importorskip("gguf")
    c = GGUF_CASES[case]
    cfg, ref = write_gguf(tmp / "m.gguf", case, seed=21 + len(case))
    out = tmp / "model.bin"
    export_ok("model", tmp / "m.gguf", "-o", out)
    check_header(out, dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=cfg["n_kv_heads"],
                 vocab_size=80, seq_len=64, head_size=16, rope_theta=cfg["rope_theta"],
                 norm_eps=cfg["norm_eps"], bos_id=cfg["bos_id"], eos_id=cfg["eos_id"],
                 shared_classifier=int(not c["output"]), tokenizer_kind=int(c["tok"] == "gpt2"),
                 chat_template=int(c["template"] == CHATML))
    ids = random_ids(9, 80, 12)
    got = run_logits(run, tmp, out, ids, 80)
    check_logits(got, R.forward(cfg, ref, [cfg["bos_id"]] + ids))


def test_gguf_seq_len_and_overrides(tmp):
    pytest.importorskip("gguf")
    write_gguf(tmp / "m.gguf", "Q8_0", seed=1)
    out = tmp / "model.bin"
    export_ok("model", tmp / "m.gguf", "-o", out, "--seq-len", 16, "--tokenizer-kind", 1,
              "--chat-template", 1, "--source", "gguf")
    check_header(out, seq_len=16, tokenizer_kind=1, chat_template=1)


def test_gguf_sentencepiece_tokenizer(tmp):
    """export.py tokenizer on a GGUF with a "llama" vocabulary writes llama2.c's format:
    the word mark becomes a space, BOS/EOS become "\\n<s>\\n" and "\\n</s>\\n", scores kept."""
    pytest.importorskip("gguf")
    write_gguf(tmp / "m.gguf", "F32", seed=2)
    export_ok("tokenizer", tmp / "m.gguf", "-o", tmp / "tok.bin")
    tok = R.Tokenizer.load(tmp / "tok.bin")
    tokens, scores, _ = gguf_vocab(80, "llama")
    want = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [t.replace("\u2581", " ").encode() for t in tokens[3:]]
    assert tok.pieces == want
    assert tok.scores == [float(np.float32(s)) for s in scores]
    assert tok.max_token_length == max(len(p) for p in want)


@pytest.mark.skipif(SKIP_SLOW, reason="CQ_SKIP_SLOW=1: converting the 135M model takes ~8 s")
def test_smollm2_model(run, tmp):
    """The real SmolLM2-135M-Instruct GGUF (Q4_1 matrices, Q8_0 embedding): the converted
    header, and logits against the reference forward on the GGUF's tensors decoded here."""
    if not SMOLLM_GGUF.is_file():
        pytest.skip("%s absent (`make test` downloads it)" % SMOLLM_GGUF)
    gguf = pytest.importorskip("gguf")
    out = tmp / "smollm2.bin"
    export_ok("model", SMOLLM_GGUF, "-o", out, "--seq-len", 64)
    check_header(out, dim=576, hidden_dim=1536, n_layers=30, n_heads=9, n_kv_heads=3,
                 vocab_size=49152, seq_len=64, head_size=64, rope_theta=100000.0, norm_eps=1e-5,
                 bos_id=1, eos_id=2, shared_classifier=1, tokenizer_kind=1, chat_template=1)
    tensors = {}
    for t in gguf.GGUFReader(str(SMOLLM_GGUF)).tensors:
        shape = [int(n) for n in t.shape][::-1]          # ggml lists the row length first
        if t.tensor_type.name in ("F32", "F16"):
            a = np.asarray(t.data).astype(np.float32).reshape(shape)
        else:
            a = own_dequantize(t.data, t.tensor_type.name, shape)
        tensors[t.name] = a
    cfg = R.make_config(576, 1536, 30, 9, 3, 49152, 64, rope_theta=100000.0, norm_eps=1e-5)
    w = {"token_embedding": tensors["token_embd.weight"], "final_norm": tensors["output_norm.weight"]}
    for ours, theirs in GGUF_NAMES.items():   # lists of layers: reference.forward indexes [l]
        w[ours] = [tensors["blk.%d.%s.weight" % (l, theirs)] for l in range(30)]
    ids = random_ids(13, 49152, 5)
    check_logits(run_logits(run, tmp, out, ids, 49152), R.forward(cfg, w, [1] + ids))


# ------------------------------------------------------------------------------------------
# 4. llama2.c files

@pytest.mark.parametrize("shared", [True, False])
def test_llama2c_legacy(run, tmp, shared):
    cfg, w = R.random_model(31, dim=32, hidden_dim=72, n_layers=2, n_heads=4, n_kv_heads=2,
                            vocab_size=97, seq_len=32, shared_classifier=shared)
    legacy = tmp / "legacy.bin"
    R.write_checkpoint(legacy, cfg, w, legacy=True)
    out = tmp / "model.bin"
    export_ok("model", legacy, "-o", out)
    check_header(out, dim=32, hidden_dim=72, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97,
                 seq_len=32, head_size=8, rope_theta=10000.0, norm_eps=1e-5, bos_id=1, eos_id=2,
                 shared_classifier=int(shared), tokenizer_kind=0, chat_template=0)
    ids = random_ids(3, 97, 20)
    got = run_logits(run, tmp, out, ids, 97, "converted")
    assert np.array_equal(got, run_logits(run, tmp, legacy, ids, 97, "legacy"))
    check_logits(got, R.forward(cfg, w, [1] + ids))
    # a CQKV file converts to itself; the overrides change only their header fields
    again = tmp / "again.bin"
    export_ok("model", out, "-o", again)
    assert again.read_bytes() == out.read_bytes()
    export_ok("model", out, "-o", again, "--tokenizer-kind", 1, "--chat-template", 1)
    check_header(again, tokenizer_kind=1, chat_template=1)
    assert again.read_bytes()[256:] == out.read_bytes()[256:]


# ------------------------------------------------------------------------------------------
# 5. tokenizers

def test_sentencepiece_model_matches_llama2c_export(tmp):
    if not (TOK512_MODEL.is_file() and TOK512_BIN.is_file()):
        pytest.skip("shared test data absent: expected %s and %s" % (TOK512_MODEL, TOK512_BIN))
    export_ok("tokenizer", TOK512_MODEL, "-o", tmp / "tok.bin")
    assert (tmp / "tok.bin").read_bytes() == TOK512_BIN.read_bytes()
    # a directory holding tokenizer.model works too
    (tmp / "d").mkdir()
    (tmp / "d" / "tokenizer.model").write_bytes(TOK512_MODEL.read_bytes())
    export_ok("tokenizer", tmp / "d", "-o", tmp / "tok2.bin")
    assert (tmp / "tok2.bin").read_bytes() == TOK512_BIN.read_bytes()


def test_llama2_tokenizer_bin(run, tmp):
    tok = REPO / "tokenizer.bin"
    assert hashlib.sha256(tok.read_bytes()).hexdigest() == \
        "50a52ef822ee9e83de5ce9d0be0a025a773d019437f58b5ff9dcafb063ece361"
    cfg, w = R.random_model(0, dim=8, hidden_dim=16, n_layers=1, n_heads=2, n_kv_heads=2,
                            vocab_size=32000, seq_len=16)
    R.write_checkpoint(tmp / "m.bin", cfg, w)
    r = run(tmp / "m.bin", "-z", tok, "-m", "encode", "-i", "Once upon a time", check=True)
    assert r.stdout.decode().split() == ["1", "9038", "2501", "263", "931"]


ENCODE_LINES = [
    "Once upon a time there was a little girl named Lily.",
    "Hello, world!  Two spaces,   three spaces, and trailing ones   ",
    "   leading spaces and\ttabs\t\tinside, a tab at the end\t",
    "I'm sure they're here; we've seen it, you'll see, he'd say, it's done. DON'T SHOUT 'quoted'",
    "'s 't 're at the start, and a lone apostrophe ' in the middle and at the end'",
    "Numbers: 0 7 42 1234567 3.14159 -12 +1e10 2024-05-01 1,000,000 and x2 y10z",
    "mixed123abc456 def7.8.9 99bottles",
    "Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e, na\u00efve fa\u00e7ade, \u00dcn\u00efc\u00f6d\u00e9, stra\u00dfe, \u00c6\u00d8\u00c5",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3001\u4e2d\u6587\u5b57\u7b26\uff0c\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8",
    "\u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac, \u0440\u0443\u0441\u0441\u043a\u0438\u0439, "
    "\u05e2\u05d1\u05e8\u05d9\u05ea, \u0627\u0644\u0639\u0631\u0628\u064a\u0629 \u0661\u0662\u0663 \u0664\u0665",
    "Roman \u216b numerals, fractions \u00bd \u00be, x\u00b2 y\u00b3, circled \u2460\u2461, "
    "devanagari \u0967\u0968\u0969",
    "Emoji \U0001F600\U0001F44D\U0001F3FD \U0001F468\u200d\U0001F469\u200d\U0001F467 "
    "\U0001F1EB\U0001F1F7 \u2728!",
    "e\u0301 combining accent, \ufb01 ligature, \uff26\uff35\uff2c\uff2c width \uff19\uff19",
    "odd spaces:\x0b\x0cvertical, \u00a0nbsp, \u2003em, \u3000ideographic, \u2028sep, \x85nel",
    "zero\u200bwidth, joiner\u200d, soft\u00adhyphen, private \ue000 use",
    "x=1;y=2*(3+4)/5 -> z!=w && a||b ... ??? !!! --- ###",
    "<|im_start|>user\rHello there!<|im_end|><|endoftext|>",
    "text<|endoftext|>more text <|im_end|> spaced <|im_start|><|im_start|>",
    "partial specials: <|im_start <|endoftext| |>",
    "line with a CRLF end\r",
    "",
    "    ",
    "\t",
    "a",
    "\r",
    "A" * 120 + " " + "ab" * 60,
]

TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog. She said: \"I'm here, aren't you?\"",
    "Once upon a time, in 1999, 42 children went to the river and they're still there.",
    "Caf\u00e9s and cr\u00e8mes; \u65e5\u672c\u8a9e \u4e2d\u6587 \u0440\u0443\u0441\u0441\u043a\u0438\u0439 "
    "\u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac \U0001F600\U0001F600",
    "    indented code:\n\tif (x == 1) { return y + 2; }\n\n\n",
    "In 1999 and 2000, 42 of 420 items cost $19.99 each; 1,000,000 units by 2024-05-01.",
] * 3 + ENCODE_LINES


def build_bpe_tokenizer(digits, extra_special):
    """A byte-level BPE trained on a small text (all 256 bytes in the alphabet) with special
    tokens. digits: Digits(individual_digits) before ByteLevel, as SmolLM does, set after
    training so that the vocabulary has merges across digits ("19", " 1") that must not fire."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=520, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAIN_TEXT, trainer)
    if digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     byte_level])
    if extra_special:
        tok.add_special_tokens([AddedToken("<tool_call>", special=True, normalized=False)])
    return tok


def tiny_byte_level_model(path, vocab, bos=0):
    cfg, w = R.random_model(1, dim=8, hidden_dim=16, n_layers=1, n_heads=2, n_kv_heads=2,
                            vocab_size=vocab, seq_len=16, bos_id=bos, eos_id=bos,
                            tokenizer_kind=1, chat_template=1)
    R.write_checkpoint(path, cfg, w)


def encode_lines(run, model, tok, path, n_lines):
    r = run(model, "-z", tok, "-m", "encode", "--lines", "-f", path, check=True)
    out = r.stdout.split(b"\n")
    assert out[-1] == b"" and len(out) == n_lines + 1, "%d lines of ids for %d lines" % (len(out) - 1, n_lines)
    return [[int(x) for x in line.split()] for line in out[:-1]]


def decode_ids(run, model, tok, tmp, ids):
    f = tmp / "decode_ids.txt"
    f.write_text(" ".join(map(str, ids)))
    return run(model, "-z", tok, "-m", "decode", "-f", f, check=True).stdout


@pytest.mark.parametrize("digits,extra_special", [(False, False), (True, True)])
def test_byte_level_bpe_tokenizer_json(run, tmp, digits, extra_special):
    pytest.importorskip("tokenizers")
    hf = build_bpe_tokenizer(digits, extra_special)
    hf.save(str(tmp / "tokenizer.json"))
    export_ok("tokenizer", tmp / "tokenizer.json", "-o", tmp / "tok.bin")
    V = hf.get_vocab_size()
    model = tmp / "m.bin"
    tiny_byte_level_model(model, V)
    lines = list(ENCODE_LINES) + (["call <tool_call>{\"a\": 1}<tool_call>"] if extra_special else [])
    text = "\n".join(lines) + "\n"
    (tmp / "lines.txt").write_bytes(text.encode("utf-8"))
    got = encode_lines(run, model, tmp / "tok.bin", tmp / "lines.txt", len(lines))
    want = [e.ids for e in hf.encode_batch(lines, add_special_tokens=False)]
    bad = [(lines[i], got[i], want[i]) for i in range(len(lines)) if got[i] != want[i]]
    assert not bad, "%d lines encode differently, first: %r" % (len(bad), bad[0])
    # the whole text at once (newlines inside, BOS first) and back to the same bytes
    r = run(model, "-z", tmp / "tok.bin", "-m", "encode", "-f", tmp / "lines.txt", check=True)
    ids = hf.encode(text, add_special_tokens=False).ids
    assert [int(x) for x in r.stdout.split()] == [0] + ids
    assert decode_ids(run, model, tmp / "tok.bin", tmp, ids) == text.encode("utf-8")


def read_gguf_tokenizer(path):
    """A tokenizers.Tokenizer built from a GGUF's gpt2 vocabulary and merges (SmolLM's
    pre-tokenizer: single digits split off, then GPT-2's pattern), control tokens special."""
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    r = gguf.GGUFReader(str(path))
    field = lambda name: r.fields[name].contents()  # noqa: E731
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, t in enumerate(types) if t == 3])
    return tok, len(tokens)


@pytest.fixture(scope="module")
def smollm_tokenizer(tmp_path_factory):
    if not SMOLLM_GGUF.is_file():
        pytest.skip("%s absent (`make test` downloads it)" % SMOLLM_GGUF)
    pytest.importorskip("gguf")
    pytest.importorskip("tokenizers")
    d = tmp_path_factory.mktemp("smollm")
    export_ok("tokenizer", SMOLLM_GGUF, "-o", d / "tok.bin")
    hf, V = read_gguf_tokenizer(SMOLLM_GGUF)
    assert V == 49152
    tiny_byte_level_model(d / "m.bin", V, bos=1)
    return d / "m.bin", d / "tok.bin", hf


def test_smollm2_tokenizer_examples(run, tmp, smollm_tokenizer):
    model, tok, hf = smollm_tokenizer
    lines = ENCODE_LINES + ["<|im_start|>assistant<|im_end|>", "<repo_name>x<reponame>"]
    (tmp / "lines.txt").write_bytes(("\n".join(lines) + "\n").encode("utf-8"))
    got = encode_lines(run, model, tok, tmp / "lines.txt", len(lines))
    want = [e.ids for e in hf.encode_batch(lines, add_special_tokens=False)]
    bad = [(lines[i], got[i], want[i]) for i in range(len(lines)) if got[i] != want[i]]
    assert not bad, "%d lines encode differently, first: %r" % (len(bad), bad[0])
    assert got[-2][0] == 1 and got[-2][-1] == 2, got[-2]   # the ChatML control tokens


def test_smollm2_tokenizer_wikitext(run, tmp, smollm_tokenizer):
    if not WIKITEXT_RAW.is_file():
        pytest.skip("shared test data absent: expected %s" % WIKITEXT_RAW)
    model, tok, hf = smollm_tokenizer
    with open(WIKITEXT_RAW, encoding="utf-8", newline="") as f:
        text = f.read()                     # CRLF line ends: every line keeps its "\r"
    lines = text.split("\n")
    assert lines[-1] == ""
    lines = lines[:-1]
    got = encode_lines(run, model, tok, WIKITEXT_RAW, len(lines))
    want = [e.ids for e in hf.encode_batch(lines, add_special_tokens=False)]
    bad = [i for i in range(len(lines)) if got[i] != want[i]]
    assert not bad, "%d of %d lines differ, first line %d: %r\nrun.c: %r\ntokenizers: %r" % (
        len(bad), len(lines), bad[0], lines[bad[0]], got[bad[0]], want[bad[0]])
    newline = hf.encode("\n", add_special_tokens=False).ids
    assert len(newline) == 1
    ids = [t for line in want for t in line + newline]
    assert decode_ids(run, model, tok, tmp, ids) == text.encode("utf-8")


# ------------------------------------------------------------------------------------------
# 6. errors: one "error: ..." line, exit status 1, no traceback

def test_cli_error_is_one_line(tmp):
    (tmp / "garbage.bin").write_bytes(b"definitely not a checkpoint\n" * 8)
    r = subprocess.run([sys.executable, str(REPO / "export.py"), "model", str(tmp / "garbage.bin"),
                        "-o", str(tmp / "out.bin")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=120)
    assert_clean_error(r)
    assert len(r.stderr.decode().splitlines()) == 1 and b"Traceback" not in r.stderr
    assert not (tmp / "out.bin").exists()


def test_model_errors(tmp, capsys):
    check_export_error(capsys, ["model", tmp / "missing", "-o", tmp / "o.bin"], "no such file")
    (tmp / "garbage.bin").write_bytes(bytes(range(256)) * 3)
    check_export_error(capsys, ["model", tmp / "garbage.bin", "-o", tmp / "o.bin"])
    (tmp / "tiny.bin").write_bytes(b"abc")
    check_export_error(capsys, ["model", tmp / "tiny.bin", "-o", tmp / "o.bin"])
    (tmp / "empty").mkdir()
    check_export_error(capsys, ["model", tmp / "empty", "-o", tmp / "o.bin"], "config.json")
    # Hugging Face: no weights; a missing config key; an unreadable config; a missing tensor;
    # an unsupported dtype
    hf = tmp / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(dict(hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=1, num_attention_heads=4,
                                                    vocab_size=50)))
    check_export_error(capsys, ["model", hf, "-o", tmp / "o.bin"], "safetensors")
    write_safetensors(hf / "model.safetensors", {"model.embed_tokens.weight":
                                                  ("I32", (50, 32), bytes(50 * 32 * 4))})
    check_export_error(capsys, ["model", hf, "-o", tmp / "o.bin"], "I32")
    write_safetensors(hf / "model.safetensors", {"model.embed_tokens.weight":
                                                  ("F32", (50, 32), bytes(50 * 32 * 4))})
    check_export_error(capsys, ["model", hf, "-o", tmp / "o.bin"], "missing")
    (hf / "config.json").write_text(json.dumps(dict(hidden_size=32)))
    check_export_error(capsys, ["model", hf, "-o", tmp / "o.bin"], "num_attention_heads")
    (hf / "config.json").write_text("{not json")
    check_export_error(capsys, ["model", hf, "-o", tmp / "o.bin"], "config.json")
    # Meta: params.json without consolidated.*.pth
    meta = tmp / "meta"
    meta.mkdir()
    (meta / "params.json").write_text(json.dumps({"dim": 32, "n_layers": 1, "n_heads": 4}))
    check_export_error(capsys, ["model", meta, "-o", tmp / "o.bin"], "consolidated")
    assert not (tmp / "o.bin").exists()


def test_gguf_errors(tmp, capsys):
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(tmp / "other.gguf"), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    check_export_error(capsys, ["model", tmp / "other.gguf", "-o", tmp / "o.bin"], "architecture")
    write_gguf(tmp / "good.gguf", "Q8_0", seed=4)
    data = (tmp / "good.gguf").read_bytes()
    (tmp / "trunc.gguf").write_bytes(data[:200])
    check_export_error(capsys, ["model", tmp / "trunc.gguf", "-o", tmp / "o.bin"])
    # a GGUF without tokenizer.ggml.tokens has no tokenizer to export
    check_export_error(capsys, ["tokenizer", tmp / "good.gguf", "-o", tmp / "t.bin"], "tokens")
    assert not (tmp / "o.bin").exists() and not (tmp / "t.bin").exists()


def test_tokenizer_errors(tmp, capsys):
    check_export_error(capsys, ["tokenizer", tmp / "missing.model", "-o", tmp / "t.bin"], "no such file")
    (tmp / "garbage.model").write_bytes(b"\xff" * 64)
    check_export_error(capsys, ["tokenizer", tmp / "garbage.model", "-o", tmp / "t.bin"])
    (tmp / "text.model").write_bytes(b"hello world, not a tokenizer\n")
    check_export_error(capsys, ["tokenizer", tmp / "text.model", "-o", tmp / "t.bin"])
    (tmp / "bad.json").write_text("{not json")
    check_export_error(capsys, ["tokenizer", tmp / "bad.json", "-o", tmp / "t.bin"])
    (tmp / "wp.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {"a": 0}}}))
    check_export_error(capsys, ["tokenizer", tmp / "wp.json", "-o", tmp / "t.bin"], "WordPiece")
    (tmp / "bad_merge.json").write_text(json.dumps(
        {"pre_tokenizer": {"type": "ByteLevel"},
         "model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": ["a c"]}}))
    check_export_error(capsys, ["tokenizer", tmp / "bad_merge.json", "-o", tmp / "t.bin"], "merge")
    (tmp / "dir").mkdir()
    check_export_error(capsys, ["tokenizer", tmp / "dir", "-o", tmp / "t.bin"], "tokenizer")
    assert not (tmp / "t.bin").exists()
    if TOK512_MODEL.is_file():  # a sentencepiece model cut inside a field is refused
        for n in (2003, 7600):    # (inside a piece; inside the trailing normalizer spec)
            (tmp / "cut.model").write_bytes(TOK512_MODEL.read_bytes()[:n])
            check_export_error(capsys, ["tokenizer", tmp / "cut.model", "-o", tmp / "t.bin"], "truncated")


def test_output_path_errors(tmp, capsys):
    """A missing output folder or an -o that is a directory: an error before any work, no
    traceback, no file."""
    cfg, w = R.random_model(3, dim=16, hidden_dim=32, n_layers=1, n_heads=2, n_kv_heads=2,
                            vocab_size=80, seq_len=16)
    R.write_checkpoint(tmp / "src.bin", cfg, w, legacy=True)
    missing = tmp / "no_such_dir" / "o.bin"
    check_export_error(capsys, ["model", tmp / "src.bin", "-o", missing], "does not exist")
    check_export_error(capsys, ["model", tmp / "src.bin", "-o", tmp], "is a directory")
    hf_json = tmp / "tokenizer.json"
    hf_json.write_text(json.dumps({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2},
                                             "merges": ["a b"]}}))
    check_export_error(capsys, ["tokenizer", hf_json, "-o", tmp / "nope" / "x.tok"], "does not exist")
    check_export_error(capsys, ["tokenizer", hf_json, "-o", tmp], "is a directory")
    assert not missing.parent.exists()
    export_ok("tokenizer", hf_json, "-o", tmp / "ok.tok")  # the same source is fine
    export_ok("model", tmp / "src.bin", "-o", tmp / "ok.bin")


def test_not_a_checkpoint(tmp, capsys):
    """Text and random bytes have no magic; read as a llama2.c header they give nonsense,
    which is reported as "not a checkpoint", not as a shape problem of a model."""
    (tmp / "text.bin").write_bytes(b"this is a text file, not a model at all\n" * 30)
    check_export_error(capsys, ["model", tmp / "text.bin", "-o", tmp / "o.bin"], "is not a checkpoint")
    rng = np.random.default_rng(5)
    for i in range(20):
        (tmp / "r.bin").write_bytes(rng.integers(0, 256, 2000 + 97 * i, dtype=np.uint8).tobytes())
        check_export_error(capsys, ["model", tmp / "r.bin", "-o", tmp / "o.bin"], "is not a checkpoint")
    assert not (tmp / "o.bin").exists()


def test_truncated_gguf(tmp, capsys):
    """A GGUF cut anywhere: one error line that says truncated or corrupt (the gguf reader's
    own words were numpy's: "cannot reshape array of size ...")."""
    pytest.importorskip("gguf")
    write_gguf(tmp / "good.gguf", "Q8_0", seed=4)
    data = (tmp / "good.gguf").read_bytes()
    for n in sorted(set([24, 100, 1000, len(data) // 2, len(data) - 100, len(data) - 1] +
                        list(range(300, len(data), len(data) // 40)))):
        (tmp / "cut.gguf").write_bytes(data[:n])
        for cmd, out in (("model", "o.bin"), ("tokenizer", "t.bin")):
            capsys.readouterr()
            assert export.main([cmd, str(tmp / "cut.gguf"), "-o", str(tmp / out)]) == 1
            err = visible_stderr_lines(capsys.readouterr().err)
            assert len(err) == 1 and err[0].startswith("error: "), (n, err)
            assert "truncated or corrupt GGUF" in err[0] or (cmd == "tokenizer" and "tokens" in err[0]), (n, err)
            assert "reshape" not in err[0] and "dtype" not in err[0], (n, err)
    assert not (tmp / "o.bin").exists()


def byte_level_tables_end(data, pos):
    """Offset just past the "BPE1" tables that start at pos (docs/FORMATS.md's layout)."""
    magic, pre, n = struct.unpack_from("<Iii", data, pos)
    assert magic == 0x31455042 and pre in (0, 1)
    pos += 12 + 8 * n
    (n,) = struct.unpack_from("<i", data, pos)
    pos += 4 + 4 * n
    (n,) = struct.unpack_from("<i", data, pos)
    return pos + 4 + 12 * n


def pieces_end(data, n):
    pos = 4
    for _ in range(n):
        _, length = struct.unpack_from("<fi", data, pos)
        pos += 8 + length
    return pos


def test_exported_tokenizers_have_no_trailing_bytes(run, tmp):
    """Every kind of tokenizer file export.py writes ends exactly where its pieces (and the
    byte-level tables) end, and run.c, which refuses trailing bytes and other sizes, reads it
    with a model of that many pieces."""
    pytest.importorskip("gguf")
    pytest.importorskip("tokenizers")
    sources = {}
    write_gguf(tmp / "llama.gguf", "F32", seed=2)
    sources["gguf llama"] = (tmp / "llama.gguf", 80, 0)
    write_gguf(tmp / "gpt2.gguf", "F16", seed=2)
    sources["gguf gpt2"] = (tmp / "gpt2.gguf", 80, 1)
    hf = build_bpe_tokenizer(False, True)
    hf.save(str(tmp / "tokenizer.json"))
    sources["tokenizer.json byte-level"] = (tmp / "tokenizer.json", hf.get_vocab_size(), 1)
    (tmp / "sp.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {
        "<unk>": 0, "<s>": 1, "</s>": 2, "\u2581": 3, "a": 4, "b": 5, "\u2581a": 6}, "merges": ["\u2581 a"]}}))
    sources["tokenizer.json sentencepiece-style"] = (tmp / "sp.json", 7, 0)
    if TOK512_MODEL.is_file():
        sources["sentencepiece .model"] = (TOK512_MODEL, 512, 0)
    for name, (src, V, kind) in sources.items():
        out = tmp / "out.tok"
        export_ok("tokenizer", src, "-o", out)
        data = out.read_bytes()
        end = pieces_end(data, V)
        if kind == 1:
            end = byte_level_tables_end(data, end)
        assert end == len(data), "%s: %d bytes, the contents end at %d" % (name, len(data), end)
        cfg, w = R.random_model(1, dim=8, hidden_dim=16, n_layers=1, n_heads=2, n_kv_heads=2,
                                vocab_size=V, seq_len=16, bos_id=1 if kind == 0 else 0,
                                eos_id=2 if kind == 0 else 0, tokenizer_kind=kind)
        R.write_checkpoint(tmp / "m.bin", cfg, w)
        run(tmp / "m.bin", "-z", out, "-m", "encode", "-i", "a b", check=True)
