"""Token positions as values (``position(i)``, ``position(j)``: 0, 1, ... over one token):
Scalable-Softmax's log n_i scaling the scores (n_i = i + 1 keys in j <= i) on the attention
kernels, positions in scores the pair kernels take, against autograd of the reference; no value
over both tokens; decoding continues the positions after the cached prefix."""

from __future__ import annotations

import importlib
import textwrap

import pytest
import torch

from energyc.check import CHECKS, import_generated, run_check
from energyc.compiler import compile_file
from energyc.loader import load
from energyc.render import render_files

HEADER = """import sympy
from energyc.dsl import *
D, H, K = dims("D H K", H=2, K=4); i, j = tokens(); x, xbar = state(D)
W_q = param("W_q", (H, K, D)); W_k = param("W_k", (H, K, D))
s = param("s", (H,), init=constant(0.5)); beta = hyper("beta", default=0.5)
"""
ENERGIES = {
    # E_i = -(1/beta) sum_h log sum_{j <= i} exp(beta s_h log(i + 1) q_ih . k_jh)
    "ssmax": """
        n = apply(lambda p: sympy.log(p + 1), position(i))
        L = logsumexp(beta * s * n * dot(W_q @ x[i], W_k @ xbar[j], over=K), over=j <= i)
        layer("ssmax", -(L / beta).sum(H), eta=0.5)
    """,
    # the same scale spelled on the tensor, in a window
    "ssmax_window": """
        L = logsumexp(beta * s * log(position(i) + 1) * dot(W_q @ x[i], W_k @ xbar[j], over=K),
                      over=window(3))
        layer("ssmax_window", -(L / beta).sum(H), eta=0.5)
    """,
    # both tokens' positions in scores that are no log-sum-exp: the pair kernels' extras
    "pair_positions": """
        u = tanh(dot(W_q @ x[i], W_k @ xbar[j], over=K)) * log(position(j) + 1)
        E = sum_over(u / (position(i) + 1), j <= i).sum(H)
        layer("pair_positions", E, eta=0.5)
    """,
}
ON_ATTENTION = ("ssmax", "ssmax_window")


def _compiled(tmp_path, name):
    path = tmp_path / f"{name}.py"
    path.write_text(HEADER + textwrap.dedent(ENERGIES[name]))
    (layer,) = compile_file(load(str(path)))
    notes: list[str] = []
    render_files(layer, str(path), notes)
    return layer, notes


def _pair_values(graph):
    """The live values of ``graph`` over both tokens (described): (tokens x tokens) tensors."""
    return [graph.describe(n) for n in graph.live() if {"i", "j"} <= set(graph.node(n).axes)]


@pytest.mark.parametrize("name", sorted(ENERGIES))
def test_positions_against_autograd(tmp_path, name):
    """Every property check of the generated layer (torch backend) against autograd of the
    reference; the scores run fused (attention kernels for the log-sum-exps, pair kernels
    otherwise) with the positions as one-token values: nothing over both tokens."""
    layer, notes = _compiled(tmp_path, name)
    assert notes == []
    counts = layer.step.op_counts()
    assert counts.get("position", 0) >= 1, counts
    if name in ON_ATTENTION:
        assert "attention" in counts and not [op for op in counts if op.startswith("pair")], counts
    else:
        assert [op for op in counts if op.startswith("pair")], counts
    assert _pair_values(layer.step) == []
    module = import_generated(layer)
    for check in CHECKS:
        result = run_check(layer, module, check, 4)
        assert not result.error and result.examples == 4, f"{check}: {result.error}"


def test_positions_start_at_zero(tmp_path):
    """Token 0's scale is log(0 + 1) = 0: its scores are constant, its energy's gradient zero
    and its step none; every later token moves."""
    layer, _ = _compiled(tmp_path, "ssmax")
    module = import_generated(layer)
    torch.manual_seed(0)
    lay = module.Layer(D=8, dtype=torch.float64)
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    with torch.no_grad():
        out = lay(x)
    assert torch.equal(out[:, 0], x[:, 0])
    assert (out[:, 1:] - x[:, 1:]).abs().amax(-1).min() > 0


@pytest.mark.parametrize("name", ON_ATTENTION)
def test_decode_continues_the_positions(tmp_path, name):
    """Decoding in two calls (5 tokens, then 4 after the cached 5) gives the forward's outputs:
    the new tokens' positions are 5, 6, ...; positions restarted at 0 would not."""
    layer, _ = _compiled(tmp_path, name)
    module = import_generated(layer)
    torch.manual_seed(0)
    lay = module.Layer(D=8, dtype=torch.float64, context="input")
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    with torch.no_grad():
        first, cache = lay.decode(x[:, :5])
        second, _ = lay.decode(x[:, 5:], cache)
        whole = lay(x)
        # float64, the same operations on the same operands in query blocks: a few ulps
        torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=1e-12, atol=1e-12)
        restarted, _ = lay.decode(x[:, 5:], None)
        assert not torch.allclose(restarted, whole[:, 5:])


@pytest.mark.parametrize("name", sorted(ENERGIES))
def test_positions_on_the_triton_path(tmp_path, name):
    """The Triton path (interpreter, 37 tokens: several 16 x 16 tiles) against the float64
    reference, the pair bodies in kernels (no torch pair call)."""
    pytest.importorskip("triton")
    from tests.test_triton_layers import check_triton_path

    layer, notes = _compiled(tmp_path, name)
    assert notes == []
    module = import_generated(layer)
    source = open(importlib.import_module(f"{module.__name__}._triton_layer").__file__).read()
    assert "_rt.pair_" not in source
    check_triton_path(layer, module, torch.float32, "cpu", tokens=37)
