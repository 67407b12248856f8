"""Property tests (Hypothesis, float64) of every example's generated layer against autograd.

The same checks back `energyc check`; see energyc/check.py for what each one asserts.
"""

import functools
import os

import pytest

from energyc.check import CHECKS, import_generated, is_causal, run_check
from energyc.compiler import compile_file
from energyc.loader import load
from tests.conftest import ROOT, example_files

EXAMPLES_PER_CHECK = int(os.environ.get("ENERGYC_EXAMPLES", "15"))


@functools.cache
def compiled(path):
    return [(layer, import_generated(layer)) for layer in compile_file(load(os.path.join(ROOT, path)))]


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("path", example_files())
def test_example_property(path, check):
    for layer, module in compiled(path):
        if check == "causal" and not is_causal(layer):
            continue
        result = run_check(layer, module, check, EXAMPLES_PER_CHECK)
        assert not result.error, f"{layer.name}: {result.error}"
        assert result.examples == EXAMPLES_PER_CHECK
