"""The GPU program against the CPU program (RUN_BIN=./runcu, REF_BIN=./run): both compute the
same function, so their outputs must agree to float rounding.  Skipped for the CPU binary.

  * --logits with the fp32 cache: every row within 1e-4 of ./run's (relative to the row's
    largest logit), on stories260K and, where it is present ($CQ_SMOLLM: a converted
    SmolLM2-135M checkpoint, with its tokenizer beside it as .tok), on SmolLM2;
  * greedy generation: ./run's tokens for 200 steps on stories260K and 100 on SmolLM2, with
    fp32, fp16 and cq4;
  * -m ppl for every GPU cache type (and K:V mixes, -w) within 0.1 % of ./run on stories260K,
    one window at a time and two side by side (-b 2: the batched decode), and on a random model
    with head size 128 (LLaMA-2-7B's heads);
    on a SmolLM2 window of 2048 tokens within twice the spread ./run itself shows between 1 and
    2 threads, or within 0.1 % (the stories260K tolerance) where that spread is smaller: the
    thread count only reorders ./run's attention sums, a far smaller change than the GPU's
    other rounding of every product, and at 1 bit a key that lies almost midway between two
    centroids takes either code on that change (a measured case, random ids: -k cq8c10b, ./run 6401907 with
    the fast kernels and 6401869 with --kernels ref, 1 thread; ./runcu 6403027, 1.7e-4 away).
CQ codebooks are random (cache_reference.random_codebooks): agreement does not need good ones.
"""
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, GPU, STORIES, TOK512, R, Runner, reference_binary, needs_stories

import cache_reference as CR

pytestmark = pytest.mark.skipif(not GPU, reason="GPU-vs-CPU agreement: RUN_BIN=./runcu only")

SMOLLM = Path(os.environ.get("CQ_SMOLLM", "models/smollm2-135m-instruct.bin"))
needs_smollm = pytest.mark.skipif(not SMOLLM.is_file(), reason="no SmolLM2 checkpoint at %s ($CQ_SMOLLM)" % SMOLLM)

GPU_TYPES = ["fp32", "fp16", "cq4", "cq2", "cq1", "cq8c10b", "cq2:cq1", "fp16:cq4", "cq4:fp32"]


@pytest.fixture(scope="module")
def cpu():
    ref = reference_binary()
    if not ref.is_file():
        pytest.fail("the CPU program %s is missing (make run, or set REF_BIN)" % ref)
    return Runner(ref)


def model_dir(tmp_path_factory, src, name):
    """A copy of the checkpoint src with random codebooks for every CQ configuration used here."""
    d = tmp_path_factory.mktemp(name)
    model = d / "model.bin"
    os.symlink(os.path.abspath(src), model)
    cfg, w = R.read_checkpoint(src)
    for seed, (c, b) in enumerate([(2, 8), (4, 8), (8, 8), (8, 10)]):
        CR.write_centroids(CR.default_centroid_path(model, c, b), cfg, w, c, b,
                           CR.random_codebooks(cfg, c, b, 100 + seed, scale=0.3))
    return model, cfg


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    if not STORIES.is_file():
        pytest.skip("shared test data absent: %s" % STORIES)
    return model_dir(tmp_path_factory, STORIES, "stories")


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    if not SMOLLM.is_file():
        pytest.skip("no SmolLM2 checkpoint at %s ($CQ_SMOLLM)" % SMOLLM)
    return model_dir(tmp_path_factory, SMOLLM, "smollm")


def logits_of(runner, model, cfg, ids, spec, tmp, tag, window=0, threads=None, batch=1):
    f, lf = tmp / ("ids_%s.txt" % tag), tmp / ("logits_%s.bin" % tag)
    f.write_text(" ".join(map(str, ids)))
    args = [model, "-m", "ppl", "-f", f, "--ids", "--logits", lf, "-k", spec, "-b", batch] + (["-w", window] if window else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    cmd = [str(runner.binary)] + [str(a) for a in args]
    r = subprocess.run(cmd, capture_output=True, env=env, timeout=1800)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    line = dict(kv.split("=", 1) for kv in r.stdout.decode().split())
    return line, np.fromfile(lf, "<f4").reshape(-1, cfg["vocab_size"]).astype(np.float64)


def row_error(a, b):
    return (np.abs(a - b).max(axis=1) / np.abs(b).max(axis=1)).max()


def sample_ids(cfg, n, seed):
    return np.random.default_rng(seed).integers(3, cfg["vocab_size"], size=n).tolist()


@pytest.mark.parametrize("which,n", [("stories", 300), ("smollm", 64)])
def test_fp32_logits_agree(run, cpu, request, tmp, which, n):
    model, cfg = request.getfixturevalue(which)
    ids = sample_ids(cfg, n, 1)
    _, gpu = logits_of(run, model, cfg, ids, "fp32", tmp, "gpu")
    _, ref = logits_of(cpu, model, cfg, ids, "fp32", tmp, "cpu")
    assert gpu.shape == ref.shape
    err = row_error(gpu, ref)
    assert err <= 1e-4, "%s: --logits -k fp32 differ from ./run by %.3g" % (which, err)


@pytest.mark.parametrize("spec", ["fp32", "fp16", "cq4"])
@pytest.mark.parametrize("which,steps,tok", [("stories", 200, None), ("smollm", 100, "tok")])
def test_greedy_tokens_agree(run, cpu, request, which, steps, tok, spec):
    model, cfg = request.getfixturevalue(which)
    tokenizer = str(TOK512) if tok is None else str(SMOLLM)[:-4] + ".tok"
    prompt = "Once upon a time" if tok is None else "The history of the city begins"
    args = [model, "-z", tokenizer, "-t", 0, "-n", steps, "-i", prompt, "-k", spec]
    g, c = run(*args, check=True), cpu(*args, check=True)
    assert g.stdout == c.stdout, "%s -k %s: ./runcu generated\n%r\n./run\n%r" % (which, spec, g.stdout, c.stdout)


@pytest.mark.parametrize("spec,window", [(t, 0) for t in GPU_TYPES] + [("cq1", 32), ("cq2:fp16", 16), ("fp16", 8)])
def test_stories_ppl_agrees(run, cpu, stories, tmp, spec, window):
    model, cfg = stories
    ids = sample_ids(cfg, 1500, 2)  # three windows of 512
    g, _ = logits_of(run, model, cfg, ids, spec, tmp, "gpu", window)
    c, _ = logits_of(cpu, model, cfg, ids, spec, tmp, "cpu", window)
    rel = abs(float(g["ppl"]) - float(c["ppl"])) / float(c["ppl"])
    assert rel <= 1e-3, "-k %s -w %d: ppl %s on the GPU, %s on the CPU" % (spec, window, g["ppl"], c["ppl"])


def gpu_against_cpu(run, cpu, model, cfg, ids, spec, tmp, window, batch=1):
    """-m ppl of ./runcu (-b batch) and of ./run (one thread: many tests run at once): both logits,
    the perplexities' relative difference, each row's error and a line that says them."""
    g, gl = logits_of(run, model, cfg, ids, spec, tmp, "gpu", window, batch=batch)
    c, cl = logits_of(cpu, model, cfg, ids, spec, tmp, "cpu", window, threads=1)
    rel = abs(float(g["ppl"]) - float(c["ppl"])) / float(c["ppl"])
    rows = np.abs(gl - cl).max(axis=1) / np.abs(cl).max(axis=1) if gl.shape == cl.shape else np.array([np.inf])
    what = "-k %s -w %d: ppl %s on the GPU, %s on the CPU; logits' row error median %.2g, max %.2g" % (
        spec, window, g["ppl"], c["ppl"], np.median(rows), rows.max())
    print(what)
    return gl, cl, rel, rows, what


@pytest.fixture(scope="module")
def hs128(tmp_path_factory):
    """A random one-layer model with LLaMA-2-7B's heads (MHA, head size 128), where the kernels
    stage a 128 KB key codebook (cq1, cq2) or read it from global memory (cq4, cq8c10b)."""
    src = tmp_path_factory.mktemp("hs128_src") / "model.bin"
    cfg, w = R.random_model(128, dim=512, hidden_dim=1024, n_layers=1, n_heads=4, n_kv_heads=4,
                            vocab_size=256, seq_len=2048)
    R.write_checkpoint(src, cfg, w)
    return model_dir(tmp_path_factory, src, "hs128")


@pytest.mark.parametrize("spec,window", [(t, 0) for t in GPU_TYPES + ["cq4:cq2"]] + [("cq2", 64)])
def test_head_size_128_ppl_agrees(run, cpu, hs128, tmp, spec, window):
    """One window of 2048 positions at head size 128 (32 blocks of 64 positions per kv head):
    the perplexity within 0.1 % of ./run's, and the median row of logits within 1e-4 (a key
    coded differently moves the rows after it a little; an error in the kernel moves them all)."""
    model, cfg = hs128
    gl, cl, rel, rows, what = gpu_against_cpu(run, cpu, model, cfg, sample_ids(cfg, 2047, 4), spec, tmp, window)
    assert rel <= 1e-3 and np.median(rows) <= 1e-4, "head size 128, " + what


@pytest.mark.parametrize("spec,window", [(t, 0) for t in GPU_TYPES] + [("cq1", 32)])
def test_stories_batched_ppl_agrees(run, cpu, stories, tmp, spec, window):
    """The batched decode: ./runcu -m ppl -b 2 (three windows of 512: two side by side, then one
    with an idle second sequence) against ./run's one window at a time: the perplexity within
    0.1 %, the logits' median row within 1e-4."""
    model, cfg = stories
    gl, cl, rel, rows, what = gpu_against_cpu(run, cpu, model, cfg, sample_ids(cfg, 1500, 2), spec, tmp, window, batch=2)
    assert gl.shape == cl.shape and rel <= 1e-3 and np.median(rows) <= 1e-4, "-b 2 " + what


def window_ids(cpu, cfg, n):
    """The first n tokens of WikiText-2 test (the shared data) in SmolLM2's tokenizer; random
    ids where the text is absent.  Text keeps the model in its working range: on random ids with
    random codebooks its perplexity is in the millions and a rounding change anywhere moves it
    ten times as much (-k fp16:cq4: 4e-3 between 1 and 2 threads, against 3.4e-4 on the text)."""
    text = DATA / "wikitext2-test.raw.txt"
    if not text.is_file():
        return sample_ids(cfg, n, 3)
    r = cpu(str(SMOLLM), "-z", str(SMOLLM)[:-4] + ".tok", "-m", "encode", "-f", str(text), check=True)
    return [int(t) for t in r.stdout.split()[1:n + 1]]  # without the BOS that -m encode prints first


@needs_smollm
def test_smollm_window_ppl_within_cpu_spread(run, cpu, smollm, tmp):
    """One window of 2048 tokens of SmolLM2 for every GPU type; the CPU runs (1 and 2 threads
    for each type) go in parallel."""
    model, cfg = smollm
    f = tmp / "ids.txt"
    f.write_text(" ".join(map(str, window_ids(cpu, cfg, 2047))))
    jobs = {}
    for spec in GPU_TYPES:
        for threads in (1, 2):
            env = dict(os.environ, OMP_NUM_THREADS=str(threads))
            jobs[spec, threads] = subprocess.Popen([str(cpu.binary), str(model), "-m", "ppl", "-f", str(f), "--ids",
                                                    "-k", spec], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    gpu = {spec: float(dict(kv.split("=", 1) for kv in run(model, "-m", "ppl", "-f", f, "--ids", "-k", spec,
                                                           check=True).stdout.decode().split())["ppl"])
           for spec in GPU_TYPES}
    report, bad = [], []
    for spec in GPU_TYPES:
        p = {}
        for threads in (1, 2):
            out, err = jobs[spec, threads].communicate(timeout=3000)
            assert jobs[spec, threads].returncode == 0, err.decode(errors="replace")
            p[threads] = float(dict(kv.split("=", 1) for kv in out.decode().split())["ppl"])
        spread = abs(p[1] - p[2])
        allowed = max(2 * spread, 1e-3 * p[1])
        report.append("%-8s gpu %.5f cpu(1) %.5f cpu(2) %.5f" % (spec, gpu[spec], p[1], p[2]))
        if abs(gpu[spec] - p[1]) > allowed:
            bad.append(spec)
    print("\n".join(report))
    assert not bad, "outside the CPU's spread: %s\n%s" % (bad, "\n".join(report))
