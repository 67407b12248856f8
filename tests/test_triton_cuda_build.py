"""Every Triton kernel of every generated package builds for an H100 (CUDA capability 9.0, down
to PTX and a cubin), with the argument types and constexprs its launches use, in float32,
bfloat16 (every autotuning tile) and float64. No GPU is needed: Triton compiles for a target
without one (tests/cuda_build.py). The interpreter, which runs the kernels in the other tests,
accepts some code a GPU build rejects (a loop-carried variable changing its type, for one), so
this is the check that the Triton path would start on a GPU at all."""

import os
import subprocess
import sys

import pytest

from tests.test_triton_layers import LAYERS

triton = pytest.importorskip("triton")


@pytest.mark.slow
@pytest.mark.skipif("nvidia" not in __import__("triton.backends").backends.backends,
                    reason="this triton has no CUDA backend")
def test_kernels_build_for_h100():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton's current default, set to silence its warning
    packages = sorted(layer.name for layer in LAYERS)
    run = subprocess.run(
        [sys.executable, "-m", "tests.cuda_build", *packages,
         "--dtypes", "float32", "bfloat16", "float64", "--arch", "90"],
        capture_output=True, text=True, env=env, timeout=3000)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-4000:]
    assert run.stdout.splitlines()[-1].endswith(" 0 failed for sm_90"), run.stdout[-2000:]
