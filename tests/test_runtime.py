"""The shared runtime (energyc.runtime): what importing it pulls in, the version check generated
packages run at import, and the one copy of what every package uses."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from energyc import runtime as _rt
from tests.conftest import ROOT

COMPILER_MODULES = ("sympy", "networkx", "jinja2", "energyc.compiler", "energyc.render",
                    "energyc.ir", "energyc.passes", "energyc.backends", "triton")


def _loaded_after(statement: str) -> set[str]:
    """The top-level names and energyc modules in sys.modules after ``statement``, run in a fresh
    interpreter with TRITON_INTERPRET unset (so nothing decides the Triton path for it)."""
    code = f"{statement}\nimport sys\nprint(' '.join(sorted(sys.modules)))"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    return set(run.stdout.split())


@pytest.mark.parametrize("statement", [
    "import energyc.runtime",
    "from generated.cem_attention import Layer",  # a generated package on the torch backend
    "from generated.cem_mlp import Layer; Layer(D=4, M=8)",
])
def test_runtime_imports_with_torch_alone(statement):
    loaded = _loaded_after(statement)
    assert "torch" in loaded and "energyc.runtime" in loaded
    assert not [m for m in COMPILER_MODULES if m in loaded]


def test_the_probe_sees_the_compiler():
    """The subprocess probe above can fail: importing the compiler shows in it."""
    loaded = _loaded_after("import energyc.render")
    assert {"sympy", "jinja2", "energyc.compiler"} <= loaded


def test_require_refuses_a_newer_version():
    from energyc import runtime
    from energyc.runtime.version import _version_tuple

    runtime.require(runtime.RUNTIME_VERSION, "generated.x")  # the same version: fine
    runtime.require("0.0.1", "generated.x")
    major, minor, patch = _version_tuple(runtime.RUNTIME_VERSION)
    with pytest.raises(ImportError, match=r"generated\.x was generated for energyc\.runtime >= "
                                          rf"{major}\.{minor + 1}\.0.*upgrade energyc"):
        runtime.require(f"{major}.{minor + 1}.0", "generated.x")
    assert _version_tuple("0.10.0") > _version_tuple("0.9.3")  # numeric order


def test_runtime_version_is_not_newer_than_energyc():
    import energyc
    from energyc import runtime
    from energyc.runtime.version import _version_tuple

    assert _version_tuple(runtime.RUNTIME_VERSION) <= _version_tuple(
        energyc.__version__)


def test_generated_package_checks_the_runtime_version_at_import(tmp_path):
    """A package generated for a newer runtime than the installed one fails to import, naming
    the package and the versions; its header states the dependency."""
    from energyc.build import compile_path
    from energyc.runtime import RUNTIME_VERSION

    (target,) = compile_path(os.path.join(ROOT, "examples", "cem_mlp.py"), str(tmp_path))
    header = open(os.path.join(target, "layer.py")).read().splitlines()[:3]
    assert header[2] == (f"# Depends on torch and energyc.runtime (energyc >= {RUNTIME_VERSION}).")
    path = os.path.join(target, "layer.py")
    text = open(path).read()
    assert text.count(f'_rt.require("{RUNTIME_VERSION}", __package__)') == 1
    with open(path, "w") as fh:
        fh.write(text.replace(f'_rt.require("{RUNTIME_VERSION}"', '_rt.require("99.0.0"'))
    code = "import cem_mlp"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=str(tmp_path), env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
    assert run.returncode != 0
    assert "ImportError: cem_mlp was generated for energyc.runtime >= 99.0.0" in run.stderr


def test_kernels_take_the_band_the_context_object_gives():
    """The compiler prints a context set's ``kernel_args`` by name into the reduction kernels it
    generates, and the launchers pass them to the attention and pair kernels: the shared Triton
    context test and block ranges take exactly those constexprs."""
    pytest.importorskip("triton")
    from energyc.context import window
    from energyc.runtime import triton_layer

    band = list(window(3).kernel_args())
    assert triton_layer.in_context.arg_names[2:] == band
    for ranges in (triton_layer.key_range, triton_layer.query_range):
        assert ranges.arg_names[2:4] == band[:2]  # a hole changes no range


def test_runtime_exports_what_generated_code_calls():
    """``energyc.runtime.__all__`` is explicit: every name in it exists, and every ``_rt.NAME``
    that a template or a generated package calls is in it (a module split cannot drop one)."""
    import re

    from energyc import runtime

    for name in runtime.__all__:
        assert hasattr(runtime, name), name
    called = set()
    for folder in ("codegen_templates", "generated", os.path.join("energyc", "backends")):
        for base, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if name.endswith((".py", ".j2")):
                    text = open(os.path.join(base, name)).read()
                    called |= set(re.findall(r"\b_rt\.([A-Za-z_]+)", text))
    assert called and called <= set(runtime.__all__), sorted(called - set(runtime.__all__))


def test_generated_packages_hold_no_runtime_copy():
    """Only the energy-dependent files: layer.py, _triton_layer.py and __init__.py."""
    root = os.path.join(ROOT, "generated")
    for package in sorted(os.listdir(root)):
        if not os.path.isdir(os.path.join(root, package)) or package.startswith((".", "_")):
            continue
        files = {f for f in os.listdir(os.path.join(root, package)) if f.endswith(".py")}
        assert files == {"__init__.py", "layer.py", "_triton_layer.py"}, (package, files)


def test_sums_add_in_place_into_their_own_tensor_only():
    """_rt.Sums: the first part is kept (never written: it may be the caller's gradient), the
    first sum is a new tensor, later parts go into it in place (one of the same shape, or one
    that broadcasts to it); a part that would promote the dtype or broadcast the shape makes a
    new tensor."""
    import torch

    from energyc import runtime as rt

    sums = rt.Sums()
    upstream = torch.ones(2, 3)
    kept = upstream.clone()
    total = sums.add(None, upstream)
    assert total is upstream
    first = sums.add(total, torch.ones(2, 3))
    assert first is not upstream and torch.equal(upstream, kept)
    again = sums.add(first, torch.full((2, 3), 2.0))
    assert again is first and torch.equal(again, torch.full((2, 3), 4.0))
    assert sums.add(again, None) is again
    row = sums.add(again, torch.ones(3))  # broadcasts into the sum's own shape: in place
    assert row is again and torch.equal(row, torch.full((2, 3), 5.0))
    wider = sums.add(again, torch.ones(2, 3, dtype=torch.float64))
    assert wider is not again and wider.dtype == torch.float64
    broadcast = sums.add(torch.ones(3) + 0, torch.ones(2, 3))  # not one of its own: new
    assert broadcast.shape == (2, 3)


def test_rotary_angles_in_float32_are_as_exact_as_in_float64():
    """A float32 rotary embedding at 4096 positions equals the float64 one rounded: its table's
    angles are computed in float64 (in float32, p * w is off by ~6e-8 p radians: 1.5e-4 at
    p = 4096, 10-30x the float32 gradient tolerance of a rotary layer at 1024 tokens)."""
    t = torch.randn(1, 4096, 2, 64, generator=torch.Generator().manual_seed(0))
    got = _rt.rotary(t, token_dim=1, feature_dim=3, base=10000.0, inverse=False)
    want = _rt.rotary(t.double(), token_dim=1, feature_dim=3, base=10000.0, inverse=False)
    err = (got.double() - want).abs().max() / t.abs().max()
    assert err < 3e-7  # a few float32 ulps (2^-23 = 1.2e-7): two products and a sum, rounded


def test_both_attention_kernels_implement_one_interface():
    """energyc.runtime.kernels.implements: the torch and Triton attention modules call it at
    import; a module whose function lacks a parameter of the interface is refused by name."""
    import types

    from energyc.runtime import attention, kernels

    kernels.implements(attention)
    if importlib.util.find_spec("triton") is not None:
        from energyc.runtime import triton_attention

        kernels.implements(triton_attention)
    drifted = types.ModuleType("drifted")
    drifted.attention_forward = lambda q, k, v, scale, kind, slopes=None, keep_probs=False, \
        probs=None: None
    with pytest.raises(TypeError, match=r"drifted.attention_forward differs .*offset=0"):
        kernels.implements(drifted)
    del drifted.attention_forward
    with pytest.raises(TypeError, match="drifted implements AttentionKernels but lacks"):
        kernels.implements(drifted)
