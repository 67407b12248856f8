"""Generated output is deterministic and the checked-in generated/ matches the compiler.

To update generated/ after a compiler change: `energyc compile examples/`.
"""

import filecmp
import os

import pytest

from energyc.build import compile_path
from energyc.compiler import compile_file
from energyc.loader import load
from energyc.render import render_files
from tests.conftest import ROOT, example_files


@pytest.mark.parametrize("path", example_files())
def test_regenerating_changes_nothing(path, tmp_path):
    written = compile_path(path, str(tmp_path))
    for target in written:
        name = os.path.basename(target)
        checked_in = os.path.join(ROOT, "generated", name)
        assert os.path.isdir(checked_in), f"generated/{name} missing: run energyc compile {path}"
        cmp = filecmp.dircmp(target, checked_in, ignore=["__pycache__"])
        assert not cmp.left_only and not cmp.right_only, (cmp.left_only, cmp.right_only)
        for f in cmp.common_files:
            with open(os.path.join(target, f)) as a, open(os.path.join(checked_in, f)) as b:
                assert a.read() == b.read(), (
                    f"generated/{name}/{f} is stale: run `energyc compile examples/`"
                )


def test_rendering_is_deterministic():
    path = "examples/cem_attention.py"
    first = render_files(compile_file(load(path))[0], path)
    second = render_files(compile_file(load(path))[0], path)
    assert first == second
    header = first["layer.py"].splitlines()[:2]
    assert "examples/cem_attention.py" in header[0] and "torch/layer.py.j2" in header[0]
    assert "Content hash" in header[1]
