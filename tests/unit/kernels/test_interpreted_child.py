"""Runs the kernel tests in a child pytest with TRITON_INTERPRET=1.

Collected only when this process cannot switch the Triton interpreter on
itself (see conftest.py): e.g. a whole-suite run where other tests need
compiled Triton. The slow sweep has its own (slow-marked) case so that
`-m slow` / `-m "not slow"` select the same kernel tests as an in-process run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]


@pytest.mark.parametrize("markexpr", ["not slow", pytest.param("slow", marks=pytest.mark.slow)])
def test_kernels_interpreted_in_child(markexpr):
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", str(HERE), "-q", "-m", markexpr, "-p", "no:cacheprovider"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    tail = (res.stdout + res.stderr)[-8000:]
    print(tail)
    # 5 = nothing selected (e.g. no slow kernel tests); anything else but 0 is a failure
    assert res.returncode in (0, 5), f"kernel tests failed under TRITON_INTERPRET=1:\n{tail}"
