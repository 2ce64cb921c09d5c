"""The benchmark scripts stay runnable: each one's ``--quick`` smoke run finishes and prints its
verdict against its target. (Pass or fail is not asserted: timings on shared CI machines are not
a test; the ratios are measured by running the scripts, see benchmarks/README.md.)"""
from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT, subprocess_env


@pytest.mark.parametrize("script, verdict", [
    ("bench_hard_attention.py", "the target (>= 4x)"),
    ("bench_protopnet_step.py", "<= 1.15x: "),
    ("bench_push.py", "<= 1.5x: "),
    ("bench_explainers.py", "memory: evaluation is bounded by one batch"),
])
def test_benchmark_quick_run_prints_its_verdict(script, verdict):
    if script == "bench_explainers.py":
        pytest.importorskip("captum")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick"],
                          cwd=ROOT, env=subprocess_env(OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert verdict in done.stdout
