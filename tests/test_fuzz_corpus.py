"""Replay the checked-in fuzz corpus (seeds and past crashes), then fuzz for a bounded time.

The bounded run uses atheris (coverage-guided, libFuzzer); its length is
DERPNET_FUZZ_SECONDS (default 20). A crash fails the test and leaves the input in
the pytest tmp dir: copy it into fuzz/corpus/ as a regression input.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fuzz.targets import run, seeds

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"


def test_seeds_are_checked_in():
    names = {p.name for p in CORPUS.iterdir()}
    assert {f"seed-{n}" for n in seeds()} <= names


@pytest.mark.parametrize("path", sorted(CORPUS.iterdir()), ids=lambda p: p.name)
def test_corpus_input_raises_only_derp_errors(path):
    run(path.read_bytes())


def test_bounded_coverage_guided_fuzzing(tmp_path):
    pytest.importorskip("atheris", reason="atheris not installed (pip install '.[test]')")
    seconds = int(os.environ.get("DERPNET_FUZZ_SECONDS", "20"))
    work = tmp_path / "corpus"
    shutil.copytree(CORPUS, work)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "fuzz" / "derp_fuzz.py"), f"-max_total_time={seconds}",
         f"-artifact_prefix={tmp_path}/", "-print_final_stats=1", str(work)],
        cwd=ROOT, capture_output=True, text=True, timeout=seconds + 120)
    crashes = list(tmp_path.glob("crash-*"))
    assert proc.returncode == 0 and not crashes, proc.stderr[-3000:]
    assert "stat::number_of_executed_units" in proc.stderr
