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
from energyc.runtime_version import RUNTIME_VERSION
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
    assert sorted(first) == ["__init__.py", "_triton_layer.py", "layer.py"]  # no runtime copy
    header = first["layer.py"].splitlines()[:3]
    assert "examples/cem_attention.py" in header[0] and "torch/layer.py.j2" in header[0]
    assert "Content hash" in header[1]
    assert header[2] == f"# Depends on torch and energyc.runtime (energyc >= {RUNTIME_VERSION})."
    assert first["_triton_layer.py"].splitlines()[2] == (
        f"# Depends on torch and energyc.runtime (energyc >= {RUNTIME_VERSION}); this module also "
        "on triton.")


def test_output_does_not_depend_on_the_hash_seed(tmp_path):
    """Python randomises str hashes per process; generated code must not follow set orders."""
    import subprocess
    import sys

    outs = []
    for seed in ("1", "2", "3"):
        out = tmp_path / f"seed{seed}"
        env = dict(os.environ, PYTHONHASHSEED=seed)
        proc = subprocess.run([sys.executable, "-m", "energyc", "compile", "-q", "examples/",
                               "-o", str(out)], capture_output=True, text=True, env=env, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        outs.append(out)
    for other in outs[1:]:
        cmp = filecmp.dircmp(outs[0], other, ignore=["__pycache__"])
        for name in cmp.common_dirs:
            sub = cmp.subdirs[name]
            assert not sub.diff_files and not sub.left_only and not sub.right_only, (name,
                                                                                      sub.diff_files)
