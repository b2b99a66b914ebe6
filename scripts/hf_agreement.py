#!/usr/bin/env python3
"""run.c against Hugging Face transformers' LlamaForCausalLM on the same weights.

What it measures (the issue's criterion: "SmolLM2's fp32-cache perplexity on a WikiText-2
window and its next-token distributions agree with Hugging Face transformers'
LlamaForCausalLM on the same weights: logits to 1e-3 relative, perplexity to 0.1 %"):
  1. permutation test: a tiny random GQA model (head size != dim / heads, RoPE theta
     100000): tests/reference.py's float64 numpy forward pass against LlamaForCausalLM
     (float64) loaded with the q/k rows permuted from our interleaved RoPE layout to Hugging
     Face's rotate-half layout.  It must agree to 1e-4 relative; without the permutation it
     does not (shown as a control).
  2. the real checkpoint: one window [bos] + L-1 ids of the text, `./run MODEL -m ppl --ids
     -l L -k fp32 --logits F` against LlamaForCausalLM(attn_implementation="eager", float32,
     TF32 off) on the same ids: per row max|diff| / max|logit| (the worst row, and some
     rows), top-1 agreement, and the perplexity of both.

Weights: the CQKV checkpoint is read directly (numpy memmap).  Within a head, our channel 2j
is Hugging Face's channel j and our 2j+1 its channel hs/2 + j (rows of wq and wk); everything
else maps one to one (w1 = gate_proj, w3 = up_proj, w2 = down_proj; tied classifier).

Usage:
  python3 scripts/hf_agreement.py --model smol.bin --tokenizer smol_tok.bin [-l 512]
      [--device cuda] [--text FILE | --ids FILE] [--logits RUN_LOGITS] [--skip-tiny]
(default text: WikiText-2 test; --logits reuses a file ./run wrote for the same window.)
Needs transformers (any version with LlamaConfig.head_dim: 4.45 or later, 5.x included).
"""
import argparse
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from smollm_quality import DEFAULT_TEXT, load_checkpoint, token_ids  # noqa: E402


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def to_hf_rows(w, n_heads, hs):
    """q/k rows from our interleaved layout (pairs 2j, 2j+1) to rotate-half (pairs j, j+hs/2):
    our row h*hs + 2j + r becomes Hugging Face row h*hs + r*hs/2 + j."""
    D = w.shape[-1]
    return np.ascontiguousarray(w.reshape(n_heads, hs // 2, 2, D).transpose(0, 2, 1, 3).reshape(n_heads * hs, D))


def hf_config(cfg):
    """LlamaConfig of our checkpoint, for transformers 4.45+ and 5.x (which keeps RoPE settings
    in rope_parameters instead of rope_theta)."""
    import inspect
    from transformers import LlamaConfig
    kw = dict(vocab_size=cfg["vocab_size"], hidden_size=cfg["dim"], intermediate_size=cfg["hidden_dim"],
              num_hidden_layers=cfg["n_layers"], num_attention_heads=cfg["n_heads"],
              num_key_value_heads=cfg["n_kv_heads"], head_dim=cfg["head_size"],
              max_position_embeddings=cfg["seq_len"], rms_norm_eps=cfg["norm_eps"],
              tie_word_embeddings=bool(cfg["shared_classifier"]), hidden_act="silu", attention_bias=False,
              mlp_bias=False, bos_token_id=cfg["bos_id"], eos_token_id=cfg["eos_id"])
    if "rope_parameters" in inspect.signature(LlamaConfig.__init__).parameters:
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg["rope_theta"]}
    else:
        kw["rope_theta"] = cfg["rope_theta"]
    c = LlamaConfig(**kw)
    rp = getattr(c, "rope_parameters", None)
    if isinstance(rp, dict):
        rp["rope_theta"] = cfg["rope_theta"]
    c._attn_implementation = "eager"
    if getattr(c, "head_dim", None) != cfg["head_size"]:
        sys.exit("error: this transformers' LlamaConfig ignores head_dim; use 4.45 or later")
    return c


def hf_model(cfg, w, dtype=torch.float32, device="cpu", permute=True):
    """LlamaForCausalLM holding our weights (q/k rows permuted to rotate-half unless told not)."""
    from transformers import LlamaForCausalLM
    H, KVH, hs = cfg["n_heads"], cfg["n_kv_heads"], cfg["head_size"]
    model = LlamaForCausalLM(hf_config(cfg)).to(dtype)
    t = lambda a: torch.from_numpy(np.array(a, dtype=np.float32)).to(dtype)
    perm = (lambda a, n: to_hf_rows(np.asarray(a), n, hs)) if permute else (lambda a, n: np.asarray(a))
    sd = {"model.embed_tokens.weight": t(w["token_embedding"]), "model.norm.weight": t(w["final_norm"]),
          "lm_head.weight": t(w["token_embedding"] if cfg["shared_classifier"] else w["classifier"])}
    for l in range(cfg["n_layers"]):
        p = "model.layers.%d." % l
        sd.update({p + "input_layernorm.weight": t(w["attn_norm"][l]),
                   p + "post_attention_layernorm.weight": t(w["ffn_norm"][l]),
                   p + "self_attn.q_proj.weight": t(perm(w["wq"][l], H)),
                   p + "self_attn.k_proj.weight": t(perm(w["wk"][l], KVH)),
                   p + "self_attn.v_proj.weight": t(w["wv"][l]),
                   p + "self_attn.o_proj.weight": t(w["wo"][l]),
                   p + "mlp.gate_proj.weight": t(w["w1"][l]),
                   p + "mlp.up_proj.weight": t(w["w3"][l]),
                   p + "mlp.down_proj.weight": t(w["w2"][l])})
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if "rotary" not in k and "inv_freq" not in k]
    if missing or unexpected:
        sys.exit("error: state dict mismatch: missing %s, unexpected %s" % (missing, unexpected))
    if cfg["shared_classifier"] and model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.to(device).eval()


@torch.no_grad()
def hf_logits(model, ids, device):
    """Logits (T, V) of one sequence, in the model's dtype, on the CPU."""
    x = torch.tensor([ids], dtype=torch.long, device=device)
    return model(input_ids=x, use_cache=False).logits[0].cpu()


def rel_rows(got, ref):
    """Per row: max |got - ref| / max |ref|."""
    return (got - ref).abs().amax(1) / ref.abs().amax(1)


def nll_of(logits, targets):
    lp = torch.log_softmax(logits.double(), dim=-1)
    return float(-lp[torch.arange(len(targets)), torch.as_tensor(targets)].mean())


# ------------------------------------------------------------------------------------------

def tiny_test(device):
    """tests/reference.py's forward (float64) vs LlamaForCausalLM (float64) on a tiny model."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import reference as R
    cfg, w = R.random_model(3, dim=48, hidden_dim=96, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=64,
                            seq_len=64, head_size=16, rope_theta=100000.0, shared_classifier=True)
    ids = [cfg["bos_id"]] + np.random.default_rng(4).integers(0, cfg["vocab_size"], 40).tolist()
    ref = torch.from_numpy(R.forward(cfg, w, ids))
    print("1. permutation test: tiny random model (2 layers, 6/2 heads x 16, dim 48, theta 1e5), %d tokens"
          % len(ids))
    print("\n| q/k rows | max row rel. diff vs tests/reference.py | top-1 agreement |")
    print("|---|---:|---:|")
    ok = True
    for permute in (True, False):
        m = hf_model(cfg, w, torch.float64, device, permute=permute)
        got = hf_logits(m, ids, device)
        err = float(rel_rows(got, ref).max())
        top1 = float((got.argmax(1) == ref.argmax(1)).double().mean())
        print("| %s | %.2e | %.3f |" % ("permuted to rotate-half" if permute else "not permuted (control)", err, top1))
        if permute:
            ok &= err <= 1e-4
        else:
            ok &= err > 1e-2           # the control must differ, or the test would prove nothing
    print("\npermutation test: %s (permuted <= 1e-4, control > 1e-2)\n" % ("PASS" if ok else "FAIL"))
    return ok


def real_test(args):
    cfg, w = load_checkpoint(args.model)
    L, V = args.length, cfg["vocab_size"]
    ids = token_ids(args)[:L - 1]
    if len(ids) < L - 1:
        sys.exit("error: the text has only %d ids, -l %d needs %d" % (len(ids), L, L - 1))
    window = [cfg["bos_id"]] + ids
    tmp = None
    printed = {}
    if args.logits:
        lpath = args.logits
    else:
        tmp = tempfile.mkdtemp(prefix="hfagree")
        idf, lpath = os.path.join(tmp, "ids.txt"), os.path.join(tmp, "logits.bin")
        with open(idf, "w") as f:
            f.write(" ".join(map(str, ids)) + "\n")
        t0 = time.time()
        out = subprocess.run([args.run_bin, args.model, "-m", "ppl", "-f", idf, "--ids", "-l", str(L), "-k", "fp32",
                              "--logits", lpath], capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit("error: ./run failed: %s" % out.stderr.strip())
        printed = dict(kv.split("=", 1) for kv in out.stdout.split())
        log("./run -m ppl -l %d -k fp32: %.1f s" % (L, time.time() - t0))
    ours = torch.from_numpy(np.fromfile(lpath, dtype="<f4").reshape(-1, V).copy())
    if ours.shape[0] != L:
        sys.exit("error: %s holds %d logits rows, expected %d (one window of -l %d)" % (lpath, ours.shape[0], L, L))
    t0 = time.time()
    model = hf_model(cfg, w, torch.float32, args.device)
    log("LlamaForCausalLM built and loaded: %.1f s" % (time.time() - t0))
    t0 = time.time()
    hf = hf_logits(model, window, args.device).float()
    log("LlamaForCausalLM forward, %d tokens on %s: %.1f s" % (L, args.device, time.time() - t0))
    rows = rel_rows(ours, hf)
    overall = float((ours - hf).abs().max() / hf.abs().max())
    top1 = float((ours.argmax(1) == hf.argmax(1)).double().mean())
    nll_run, nll_hf = nll_of(ours[:L - 1], ids), nll_of(hf[:L - 1], ids)
    ppl_run, ppl_hf = math.exp(nll_run), math.exp(nll_hf)
    ppl_rel = abs(ppl_run - ppl_hf) / ppl_hf
    print("2. %s: one window of %d tokens ([bos] + %d ids), ./run -k fp32 vs LlamaForCausalLM "
          "(attention %s, %s, %s)\n" % (os.path.basename(args.model), L, L - 1, getattr(model.config, "_attn_implementation", "?"),
                                        str(next(model.parameters()).dtype).replace("torch.", ""), args.device))
    print("| position | max abs diff | max abs logit (HF) | rel. diff | top-1 equal |")
    print("|---:|---:|---:|---:|---|")
    worst = int(rows.argmax())
    for p in sorted(set([0, 1, L // 4, L // 2, 3 * L // 4, L - 1, worst])):
        print("| %d%s | %.3e | %.3f | %.2e | %s |" % (
            p, " (worst)" if p == worst else "", float((ours[p] - hf[p]).abs().max()), float(hf[p].abs().max()),
            float(rows[p]), "yes" if int(ours[p].argmax()) == int(hf[p].argmax()) else "no"))
    print("\n| measure | ./run | Hugging Face | difference | bound | |")
    print("|---|---:|---:|---:|---:|---|")
    ok_logits = float(rows.max()) <= 1e-3
    ok_ppl = ppl_rel <= 1e-3
    print("| logits: worst row max abs diff / max abs logit | | | %.2e | 1e-3 | %s |" % (
        float(rows.max()), "ok" if ok_logits else "FAIL"))
    print("| logits: max abs diff / max abs logit, whole window | | | %.2e | | |" % overall)
    print("| logits: mean over rows | | | %.2e | | |" % float(rows.mean()))
    print("| top-1 agreement | | | %.4f | | |" % top1)
    print("| perplexity (%d scored ids) | %.4f | %.4f | %.2e rel. | 1e-3 | %s |" % (
        L - 1, ppl_run, ppl_hf, ppl_rel, "ok" if ok_ppl else "FAIL"))
    if printed:
        print("\n(./run printed ppl=%s for the window)" % printed.get("ppl"))
    if tmp:
        os.remove(lpath)
        os.remove(os.path.join(tmp, "ids.txt"))
        os.rmdir(tmp)
    return ok_logits and ok_ppl


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="CQKV checkpoint (e.g. SmolLM2-135M-Instruct converted by export.py)")
    ap.add_argument("--tokenizer", help="tokenizer.bin for ./run encode (with --text)")
    ap.add_argument("--text", default=DEFAULT_TEXT, help="text (default WikiText-2 test)")
    ap.add_argument("--ids", help="file of token ids instead of --text")
    ap.add_argument("-l", "--length", type=int, default=512, help="window length (512)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (Hugging Face side)")
    ap.add_argument("--run-bin", default=os.path.join(ROOT, "run"), help="./run binary")
    ap.add_argument("--logits", help="logits ./run already wrote for this window (-m ppl -l L -k fp32 --logits)")
    ap.add_argument("--skip-tiny", action="store_true", help="skip the permutation test on a tiny model")
    ap.add_argument("--tiny-only", action="store_true", help="only the permutation test")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if hasattr(torch, "set_float32_matmul_precision"):
        torch.set_float32_matmul_precision("highest")
    import transformers
    log("transformers %s, torch %s" % (transformers.__version__, torch.__version__))
    ok = True
    if not args.skip_tiny:
        ok &= tiny_test(args.device)
    if not args.tiny_only:
        if not args.model:
            sys.exit("error: --model is required")
        ok &= real_test(args)
    print("\nhf agreement: %s" % ("PASS" if ok else "FAIL"))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
