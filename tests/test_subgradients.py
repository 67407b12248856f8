"""Derivatives of Abs, sign, Heaviside, Max, Min and clamps (``energyc.ir.functions.diff``):
autograd's subgradients, at ties included, and energies that use them (a Huber tether per
token, a clamped score in a context sum, steps and signs in the energy itself) against autograd
of the reference on the torch backend and on the Triton path under the interpreter.

At a tie autograd takes: |u|' = sign(u) = 0 at 0 (torch.abs), sign' = Heaviside' = 0, and
torch.maximum / torch.minimum split the gradient in halves; Max and Min of several arguments
are the nested two-argument maxima in their argument order, as the reference evaluates them.
"""

from __future__ import annotations

import importlib
import itertools
import math
import textwrap

import pytest
import sympy
import torch

from energyc import runtime
from energyc.backends.torch_printer import TorchPrinter
from energyc.backends.triton_printer import TritonPrinter
from energyc.check import CHECKS, import_generated, run_check
from energyc.compiler import compile_file
from energyc.ir.evaluate import evaluate_body
from energyc.ir.functions import diff, simplify_functions
from energyc.ir.ops import ARG_SYMBOLS
from energyc.loader import load
from energyc.render import render_files

a0, a1, a2 = ARG_SYMBOLS[:3]
huber = sympy.Piecewise((a0**2 / 2, sympy.Abs(a0) <= a1), (a1 * (sympy.Abs(a0) - a1 / 2), True))

BODIES = {
    "abs": sympy.Abs(a0) * a1,
    "sign": sympy.sign(a0) * a1,
    "heaviside": sympy.Heaviside(a0) * a1,
    "heaviside_h0": sympy.Heaviside(a0, 0) * a1 + sympy.Heaviside(a1, 1) * a0,
    "max": sympy.Max(a0, a1),
    "min": sympy.Min(a0, a1),
    "max3": sympy.Max(a0, a1, a2),
    "min3": sympy.Min(a0, a1, a2),
    "clamp": sympy.Min(sympy.Max(a0, a1), a2),
    "clamp_constants": sympy.Min(sympy.Max(a0, -1), 1) * a1,
    "huber": huber,
    "abs_of_power": sympy.Abs(a0**3 * a1),
}

# every point of a grid of -1, 0, 1: ties everywhere
GRID = torch.tensor(list(itertools.product([-1.0, 0.0, 1.0], repeat=3)), dtype=torch.float64).T


@pytest.mark.parametrize("name", sorted(BODIES))
def test_derivatives_are_autograds_at_ties(name):
    """diff(body, a_k), evaluated, equals autograd of the evaluated body on a grid of ties."""
    body = BODIES[name]
    args = [v.clone().requires_grad_() for v in GRID]
    env = {s.name: v for s, v in zip(ARG_SYMBOLS[:3], args)}
    value = evaluate_body(body, env, torch.float64).expand(GRID.shape[1])
    for k, s in enumerate(ARG_SYMBOLS[:3]):
        d = diff(body, s)
        assert not d.has(sympy.Derivative, sympy.DiracDelta, sympy.re, sympy.im), d
        (want,) = torch.autograd.grad(value.sum(), args[k], retain_graph=True, allow_unused=True)
        want = torch.zeros_like(GRID[k]) if want is None else want
        got = evaluate_body(d, {n: v.detach() for n, v in env.items()}, torch.float64)
        torch.testing.assert_close(got.expand_as(want), want, rtol=0, atol=0, msg=f"d/d{s}")


def test_second_derivatives_of_the_piecewise_functions_are_zero():
    for f in (sympy.Abs(a0), sympy.sign(a0), sympy.Heaviside(a0), sympy.Max(a0, a1),
              sympy.Min(sympy.Max(a0, -1), 1)):
        assert diff(f, a0, a0) == 0
        assert diff(f, a0, a1) == 0


@pytest.mark.parametrize("name", sorted(BODIES))
def test_both_printers_spell_every_derivative(name):
    """No re, im or DiracDelta reaches a printer: the Triton printer spells every body and
    derivative (NoTritonSpellingError otherwise), and the torch printer's spelling has the
    reference's values on the grid of ties (tests/test_printers.py runs both on drawn bodies)."""
    names = {s.name: s.name for s in ARG_SYMBOLS[:3]}
    env = {s.name: v for s, v in zip(ARG_SYMBOLS[:3], GRID)}
    body = BODIES[name]
    for d in [body, *(diff(body, s) for s in ARG_SYMBOLS[:3])]:
        TritonPrinter(names).doprint(d)
        code = TorchPrinter(names, set(ARG_SYMBOLS[:3])).doprint(d)
        got = eval(code, {"torch": torch, "math": math, "_rt": runtime}, dict(env))  # noqa: S307
        want = evaluate_body(d, env, torch.float64)
        torch.testing.assert_close(torch.as_tensor(got, dtype=torch.float64).expand(GRID.shape[1]),
                                   want.expand(GRID.shape[1]), rtol=0, atol=0, msg=code)


def test_real_parts_where_bodies_are_made():
    """|exp(u)| is exp(re(u)) to SymPy; an energy's values are real: exp(u)."""
    assert sympy.Abs(sympy.exp(a0)) == sympy.exp(sympy.re(a0))
    assert simplify_functions(sympy.Abs(sympy.exp(a0)) + sympy.im(a1)) == sympy.exp(a0)


# -- energies ----------------------------------------------------------------------------------

HEADER = "import sympy\nfrom energyc.dsl import *\n"
ENERGIES = {
    # E_i = sum_D huber(x_i - c) plus attention: the tether's derivative is the clipped residual
    "huber_tether": """
        D, M = dims("D M"); i, j = tokens(); x, xbar = state(D)
        c = param("c", (D,)); W = param("W", (M, D)); delta = hyper("delta", default=0.5)
        def huber(r):
            return sympy.Piecewise((r**2 / 2, abs(r) <= delta), (delta * (abs(r) - delta / 2), True))
        E = apply(huber, x[i] - c).sum(D) - logsumexp(dot(W @ x[i], W @ xbar[j], over=M), over=j <= i)
        layer("f", E, eta=0.5)
    """,
    # a ReLU-capped score, clamp(s, 0, cap), summed over the context: the pair kernels
    "capped_scores": """
        D, H, K = dims("D H K"); i, j = tokens(); x, xbar = state(D)
        W_q = param("W_q", (H, K, D)); W_k = param("W_k", (H, K, D)); cap = hyper("cap", default=2.0)
        s = dot(W_q @ x[i], W_k @ xbar[j], over=K)
        E = -sum_over(apply(lambda u: sympy.Min(sympy.Max(u, 0), cap), s), j <= i).sum(H)
        layer("f", E, eta=0.5)
    """,
    # Max of two tensors, sign and Heaviside in the energy itself (layer.energy differentiates
    # them twice under autograd), and |.| in a score
    "steps_and_signs": """
        D, H, K = dims("D H K"); i, j = tokens(); x, xbar = state(D)
        W_q = param("W_q", (H, K, D)); W_k = param("W_k", (H, K, D)); c = param("c", (D,))
        s = dot(W_q @ x[i], W_k @ xbar[j], over=K)
        E = (-logsumexp(apply(lambda u: -abs(u) / 2, s), over=window(3)).sum(H)
             + apply(lambda a, b, m: sympy.Max(a, b) * m + sympy.sign(a) * b
                     + sympy.Heaviside(a - m) * b**2 / 2, x[i], xbar[i], c).sum(D) / 4)
        layer("f", E, eta=0.5)
    """,
}


def _compiled(tmp_path, name):
    path = tmp_path / f"{name}.py"
    path.write_text(HEADER + textwrap.dedent(ENERGIES[name]))
    (layer,) = compile_file(load(str(path)))
    notes: list[str] = []
    render_files(layer, str(path), notes)
    return layer, notes


@pytest.mark.parametrize("name", sorted(ENERGIES))
def test_energies_against_autograd(tmp_path, name):
    """The generated layer (torch backend) passes every property check against autograd of the
    reference, and no value over both tokens is formed."""
    layer, notes = _compiled(tmp_path, name)
    assert notes == []
    assert [n for n in layer.step.live() if {"i", "j"} <= set(layer.step.node(n).axes)] == []
    module = import_generated(layer)
    for check in CHECKS:
        result = run_check(layer, module, check, 4)
        assert not result.error, f"{check}: {result.error}"


@pytest.mark.parametrize("name", sorted(ENERGIES))
def test_energies_on_the_triton_path(tmp_path, name):
    """The Triton path (interpreter, 37 tokens: several 16 x 16 tiles) against the float64
    reference, every body in a kernel (no note, no torch pair call)."""
    pytest.importorskip("triton")
    from tests.test_triton_layers import check_triton_path

    layer, notes = _compiled(tmp_path, name)
    assert notes == []
    module = import_generated(layer)
    source = open(importlib.import_module(f"{module.__name__}._triton_layer").__file__).read()
    assert "_rt.pair_" not in source
    check_triton_path(layer, module, torch.float32, "cpu", tokens=37)
