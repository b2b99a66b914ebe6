#!/usr/bin/env python3
"""Quality of every KV-cache type on stories260K: perplexity and KL divergence against fp32.

stories260K's training text is not available, so both calibration and evaluation text are the
model's own samples, drawn with different seeds:
  * evaluation: ./run samples stories (-t 1.0 -p 0.9, seeds 1000, 1001, ...) until the text
    holds at least --eval-tokens tokens;
  * calibration: export.py centroids --self N (the model samples N tokens, seed 7), once with
    Fisher weights and once uniform.
Then `./run -m ppl --kl` runs on the evaluation text for every cache type, with and without a
32-token full-precision window, and a Markdown table goes to stdout and OUT/table.md.

Usage: /usr/bin/python3 scripts/stories_quality.py [--model M] [--tokenizer T] [--out DIR]
"""
import argparse
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "models")

# (label, -k value, is CQ); CQ rows run with Fisher and with uniform centroids
TYPES = [("fp32", "fp32", False), ("fp16", "fp16", False), ("q8", "q8", False), ("q4", "q4", False),
         ("q2", "q2", False), ("q1", "q1", False), ("kivi4", "kivi4", False), ("kivi2", "kivi2", False),
         ("cq4", "cq4", True), ("cq2", "cq2", True), ("cq8c10b", "cq8c10b", True), ("cq1", "cq1", True)]
CQ_FILES = {"cq4": "2c8b", "cq2": "4c8b", "cq1": "8c8b", "cq8c10b": "8c10b"}


def run(cmd, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        sys.exit("failed: %s\n%s" % (" ".join(cmd), p.stderr.strip()))
    return p.stdout


def parse_ppl(line):
    return {k: float(v) if re.fullmatch(r"[-+0-9.eE]+", v) else v
            for k, v in (kv.split("=", 1) for kv in line.split())}


def make_eval_text(binary, model, tok, path, tokens_wanted):
    texts, seed, n = [], 1000, 0
    while n < tokens_wanted:
        out = run([binary, model, "-z", tok, "-t", "1.0", "-p", "0.9", "-s", str(seed), "-n", "0"])
        texts.append(out.strip())
        n += len(run([binary, model, "-z", tok, "-m", "encode", "-i", texts[-1]]).split()) - 1
        seed += 1
    with open(path, "w") as f:
        f.write("\n".join(texts) + "\n")
    return n


def learn_centroids(model, tok, outdir, uniform, calib_tokens, labels):
    os.makedirs(outdir, exist_ok=True)
    cmd = [sys.executable, os.path.join(ROOT, "export.py"), "centroids", model, "-z", tok,
           "--self", str(calib_tokens), "--seed", "7", "--types", ",".join(labels), "-o", outdir, "-q"]
    if uniform:
        cmd.append("--uniform")
    t0 = time.time()
    run(cmd)
    return time.time() - t0


def measure(binary, model, tok, eval_text, kv, window, centroids):
    cmd = [binary, model, "-z", tok, "-m", "ppl", "-f", eval_text, "-k", kv, "--kl", "-w", str(window)]
    if centroids:
        cmd += ["-c", centroids]
    return parse_ppl(run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1")).strip().splitlines()[-1])


def quality_table(binary, model, tok, out, eval_tokens=8192, calib_tokens=8192, windows=(0, 32), log=print,
                  reuse=False, weightings=("fisher", "uniform"), types=TYPES):
    """Returns {(label, weighting, window): ppl-line dict}; weighting is None for non-CQ types."""
    os.makedirs(out, exist_ok=True)
    eval_text = os.path.join(out, "eval.txt")
    n = make_eval_text(binary, model, tok, eval_text, eval_tokens)
    log("evaluation text: %d tokens in %s" % (n, eval_text))
    stem = os.path.splitext(os.path.basename(model))[0]
    cent = {}
    cq_labels = [t[0] for t in types if t[2]]
    for weighting in weightings:
        d = os.path.join(out, weighting)
        if not (reuse and os.path.isdir(d)):
            log("learning %s centroids (%s) ... %.0f s" % (weighting, ",".join(cq_labels), learn_centroids(
                model, tok, d, weighting == "uniform", calib_tokens, cq_labels)))
        for label in cq_labels:
            cb = CQ_FILES[label]
            suffix = ".uniform.cent" if weighting == "uniform" else ".cent"
            cent[(label, weighting)] = os.path.join(d, "%s.%s%s" % (stem, cb, suffix))
    results = {}
    for label, kv, is_cq in types:
        for weighting in (weightings if is_cq else (None,)):
            for w in windows:
                r = measure(binary, model, tok, eval_text, kv, w, cent.get((label, weighting)))
                results[(label, weighting, w)] = r
                log("%-8s %-8s w=%-3d ppl %10.4f  kl %.5f" % (label, weighting or "", w, r["ppl"], r["kl"]))
    return results


def markdown(results, windows=(0, 32)):
    rows = ["| cache | centroids | bits/channel | KV bytes/token | " +
            " | ".join("ppl (w=%d) | KL (w=%d)" % (w, w) for w in windows) + " |",
            "|---|---|---:|---:|" + "---:|---:|" * len(windows)]
    for label, _, is_cq in TYPES:
        for weighting in (("fisher", "uniform") if is_cq else (None,)):
            r0 = results[(label, weighting, windows[0])]
            cells = []
            for w in windows:
                r = results[(label, weighting, w)]
                cells += ["%.3f" % r["ppl"], "%.4f" % r["kl"]]
            rows.append("| %s | %s | %.3g | %.0f | %s |" % (label, weighting or "-", r0["bits_per_channel"],
                                                           r0["kv_bytes_per_token"], " | ".join(cells)))
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(SHARED, "stories260K.bin"))
    ap.add_argument("--tokenizer", default=os.path.join(SHARED, "tok512.bin"))
    ap.add_argument("--binary", default=os.path.join(ROOT, "run"))
    ap.add_argument("--out", default=os.path.join(ROOT, "out", "stories"))
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--reuse", action="store_true", help="keep centroids already in OUT")
    a = ap.parse_args()
    for path in (a.model, a.tokenizer, a.binary):
        if not os.path.exists(path):
            sys.exit("error: %s not found (build with make; the model lives in ../shared/models)" % path)
    results = quality_table(a.binary, a.model, a.tokenizer, a.out, a.eval_tokens, a.calib_tokens,
                            log=lambda m: print(m, file=sys.stderr), reuse=a.reuse)
    table = markdown(results)
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
