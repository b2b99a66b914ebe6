"""Shared fixtures for the tests of ./run.

The binary under test is $RUN_BIN, or <repo>/run.  Shared test data lives next to the
repository in <repo>/../shared (models/, data/), or where $CQ_SHARED says; tests that need it
skip when it is absent.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SHARED = Path(os.environ.get("CQ_SHARED", str(REPO.parent / "shared")))  # a copy elsewhere: CQ_SHARED
MODELS = SHARED / "models"
DATA = SHARED / "data"
STORIES = MODELS / "stories260K.bin"
TOK512 = MODELS / "tok512.bin"

sys.path.insert(0, str(TESTS))
import reference as R  # noqa: E402,F401  (re-exported to the test modules)

# ASan/UBSan builds are ~10x slower; the timeout only guards against hangs.
TIMEOUT = float(os.environ.get("RUN_TIMEOUT", "300"))

needs_stories = pytest.mark.skipif(
    not (STORIES.is_file() and TOK512.is_file()),
    reason="shared test data absent: expected %s and %s (stories260K + tok512 from "
           "karpathy/tinyllamas)" % (STORIES, TOK512))

needs_tok512 = pytest.mark.skipif(
    not TOK512.is_file(), reason="shared test data absent: expected %s" % TOK512)

needs_wikitext = pytest.mark.skipif(
    not (DATA / "wikitext2-test.raw.txt").is_file(),
    reason="shared test data absent: expected %s" % (DATA / "wikitext2-test.raw.txt"))


def binary_path():
    return Path(os.environ.get("RUN_BIN", str(REPO / "run")))


# The GPU program (RUN_BIN=./runcu) runs the same suite.  Its cache types are fp32, fp16 and CQ;
# for the CPU-only ones it must give a clean error instead.  --kernels ref (the reference
# attention) is the CPU's: tests that compare against it run ./run (REF_BIN) for that side.
GPU = binary_path().name.startswith("runcu")
CPU_ONLY_TYPES = {"q8", "q4", "q2", "q1", "kivi4", "kivi2"}


def reference_binary():
    return Path(os.environ.get("REF_BIN", str(REPO / "run")))


def cpu_only(spec):
    """True when -k spec names a type the GPU program does not have."""
    return any(t in CPU_ONLY_TYPES for t in spec.split(":"))


@pytest.fixture(scope="session")
def run_bin():
    p = binary_path()
    if not p.is_file() or not os.access(p, os.X_OK):
        pytest.fail("binary under test %s does not exist or is not executable "
                    "(build it with `make`, or set RUN_BIN)" % p)
    return p


class Runner:
    """Runs the binary under test; returns subprocess.CompletedProcess with bytes output."""

    def __init__(self, binary):
        self.binary = binary

    def __call__(self, *args, timeout=TIMEOUT, input=None, check=False):
        cmd = [str(self.binary)] + [a if isinstance(a, bytes) else str(a) for a in args]
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           input=input if input is not None else b"", timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError("%s exited with %d\nstderr: %s" % (
                " ".join(map(str, cmd)), r.returncode, r.stderr.decode(errors="replace")))
        return r


@pytest.fixture(scope="session")
def run(run_bin):
    return Runner(run_bin)


@pytest.fixture
def tmp(tmp_path):
    """A fresh temporary directory (pathlib.Path) per test."""
    return tmp_path


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("run_tests")


def assert_clean_error(r, allow_usage=False):
    """Checks the error contract: exit status 1..127 (no signal), a first stderr line that
    starts with "error:", nothing from a sanitizer."""
    err = r.stderr.decode("utf-8", errors="replace")
    assert r.returncode != 0, "expected failure, got exit 0; stdout=%r" % r.stdout[:300]
    assert 0 < r.returncode < 128, "died from a signal / abnormal status %d; stderr=%r" % (
        r.returncode, err[-2000:])
    for bad in ("Sanitizer", "runtime error", "AddressSanitizer", "LeakSanitizer"):
        assert bad not in err, "sanitizer report in stderr:\n" + err[-4000:]
    lines = err.splitlines()
    assert lines, "stderr is empty"
    if allow_usage:
        assert any(l.startswith("error:") for l in lines), "no 'error:' line in stderr: %r" % err
    else:
        assert lines[0].startswith("error:"), "first stderr line is not 'error: ...': %r" % err
