"""Run-time edge cases of every generated layer (issue 11): empty inputs, one token, NaN and inf,
non-contiguous inputs, every dtype, and constructor arguments outside their domain."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from energyc import runtime as rt
from tests.conftest import ROOT, context_data

PACKAGES = sorted(
    name
    for name in os.listdir(os.path.join(ROOT, "generated"))
    if os.path.exists(os.path.join(ROOT, "generated", name, "layer.py"))
)


def build(package: str, size: int = 4, **settings) -> torch.nn.Module:
    """The package's Layer with every dim (its ``DIMS`` keywords, those with a declared default
    size too) set to ``size``; a model of several neuron layers as :class:`OneState`."""
    Layer = importlib.import_module(f"generated.{package}").Layer
    dims = dict.fromkeys(importlib.import_module(f"generated.{package}.layer").DIMS, size)
    torch.manual_seed(0)
    layer = Layer(**dims, **settings)
    return OneState(layer) if len(getattr(layer, "neurons", ())) > 1 else layer


class OneState(torch.nn.Module):
    """A model of several neuron layers (every dim the same size) called as a layer of one
    state, so that every package runs the same run-time properties: ``forward(x)`` gives the
    first layer's state after the dynamics, the further layers starting from ``x / 2 ** k``
    (so that x reaches every layer, NaN included, and its gradient flows through all), and
    ``energy(x, xbar, per_token)`` the model's total energy at those states. Other attributes
    are the layer's."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)

    def _states(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not isinstance(x, torch.Tensor):
            return [x] * len(self.layer.neurons)  # the layer names what is wrong with x
        return [x if k == 0 else x / 2 ** k for k in range(len(self.layer.neurons))]

    def forward(self, x: torch.Tensor, **call) -> torch.Tensor:
        return self.layer(*self._states(x), **call)[0]

    def energy(self, x: torch.Tensor, xbar: torch.Tensor | None = None, per_token: bool = False,
               **call) -> torch.Tensor:
        return self.layer.energy(*self._states(x), xbar=xbar, per_token=per_token, **call)


def memory(layer: torch.nn.Module, x: torch.Tensor, tokens: int = 3) -> dict:
    """The call's ``memory=`` for a layer that reads one (``tokens`` of it per row of x, drawn),
    else no keywords."""
    declared = layer._declared.memory
    if declared is None:
        return {}
    dim = getattr(layer, declared[1])
    gen = torch.Generator().manual_seed(2)
    return {"memory": torch.randn(x.shape[0], tokens, dim, generator=gen).to(x.dtype)}


def state_dim(layer: torch.nn.Module) -> int:
    """The size of the state's feature dim (the last of x)."""
    return getattr(layer, layer._declared.state_dim)


# -- item 1: 0 tokens and batch 0 ------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 0), (0, 3), (0, 0)], ids=["tokens0", "batch0", "both0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("package", PACKAGES)
def test_empty_input_gives_empty_outputs_forward_and_backward(package, dtype, shape):
    """No crash (the CPU flash kernel used to kill the process on 0 tokens), no IndexError from
    a reduction over no keys: outputs, gradients and energies of the right (empty) shape."""
    layer = build(package).to(dtype)
    x = torch.randn(*shape, 4, dtype=dtype, requires_grad=True)
    call = {**memory(layer, x), **context_data(package, *shape)}
    y = layer(x, **call)
    assert y.shape == x.shape and y.dtype == dtype
    y.sum().backward()
    assert x.grad.shape == x.shape
    for p in layer.parameters():
        if p.grad is not None:
            assert p.grad.shape == p.shape and torch.count_nonzero(p.grad) == 0
    assert layer.energy(x.detach(), **call).shape == (shape[0],)
    assert layer.energy(x.detach(), per_token=True, **call).shape == shape


@pytest.mark.parametrize("shape", [(2, 0, 2, 4), (0, 3, 2, 4)])
@pytest.mark.parametrize("kind", [("causal",), ("all",), ("strict",), ("window", 2)])
def test_attention_kernels_on_empty_input(kind, shape):
    q = torch.randn(shape)
    o, lse = rt.attention_forward(q, q, q, 0.5, kind)
    assert o.shape == shape and lse.shape == shape[:3] and lse.dtype == torch.float32
    dq, dk, dv, dscale, dslopes = rt.attention_backward(
        q, q, q, 0.5, kind, o, lse, torch.ones_like(o), slopes=torch.ones(2), need_dscale=True
    )
    assert dq.shape == dk.shape == dv.shape == shape
    assert dscale.shape == () and dslopes.shape == (2,)


def test_masked_logsumexp_over_no_keys_is_zero():
    s = torch.randn(2, 3, 0)
    out = rt.masked_logsumexp(s, torch.ones((), dtype=torch.bool), dim=-1)
    assert out.shape == (2, 3) and torch.count_nonzero(out) == 0


# -- item 10 and NaN/inf inputs: propagate, never crash ---------------------------------------------


@pytest.mark.parametrize("package", PACKAGES)
def test_nan_input_stays_nan_in_the_per_token_energy_and_the_output(package):
    """masked_logsumexp tested `total > 0`, which is False for NaN: the token got energy -0.0."""
    layer = build(package).double()
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    x[:, 1, 0] = float("nan")
    call = {**memory(layer, x), **context_data(package, 2, 3)}
    assert torch.isnan(layer.energy(x, per_token=True, **call)[:, 1]).all()
    assert torch.isnan(layer(x, **call)[:, 1]).any()


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("package", PACKAGES)
def test_non_finite_input_never_crashes(package, value):
    layer = build(package)
    x = torch.randn(1, 3, 4)
    x[0, 0, 0] = value
    x.requires_grad_(True)
    layer(x, **memory(layer, x), **context_data(package, 1, 3)).sum().backward()
    assert x.grad.shape == x.shape


def test_masked_logsumexp_keeps_nan_and_empty_sets():
    s = torch.tensor([[float("nan"), 0.0], [1.0, 2.0], [3.0, 4.0]])
    mask = torch.tensor([[True, True], [True, True], [False, False]])
    out = rt.masked_logsumexp(s, mask, dim=-1)
    assert torch.isnan(out[0]) and torch.isclose(out[1], torch.logsumexp(s[1], 0))
    assert out[2] == 0


def test_masked_logsumexp_second_derivatives():
    """Its first and second derivatives (autograd's, as through a generated ``_energy``) are those
    of the log-sum-exp of the scores in the set, with an empty row (the strict set's first)
    giving 0 and no NaN; the shift m is detached, which must not change them."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 5, 3, dtype=torch.float64, generator=g).requires_grad_(True)
    mask = (torch.arange(5)[None, :] < torch.arange(5)[:, None])[None, :, :, None]  # j < i
    torch.autograd.gradgradcheck(lambda t: rt.masked_logsumexp(t, mask, dim=2), (s,))
    w = torch.randn(2, 5, 3, dtype=torch.float64, generator=g)
    (d1,) = torch.autograd.grad((rt.masked_logsumexp(s, mask, 2) * w).sum(), s, create_graph=True)
    (d2,) = torch.autograd.grad((d1 * s).sum(), s)
    rows = [torch.logsumexp(s[:, i, :i], dim=1) if i else s.new_zeros(2, 3) for i in range(5)]
    want = torch.stack(rows, dim=1)
    (e1,) = torch.autograd.grad((want * w).sum(), s, create_graph=True)
    (e2,) = torch.autograd.grad((e1 * s).sum(), s)
    torch.testing.assert_close(d1, e1)
    torch.testing.assert_close(d2, e2)
    assert torch.isfinite(d2).all()


@pytest.mark.parametrize("kind", [("causal",), ("not_self",)])
def test_attention_operands_of_mixed_dtypes_under_autocast(kind):
    """Under autocast a query made by element-wise work (float32) meets keys and values made by
    contractions (bfloat16): every attention call casts them as autocast casts a matrix product's
    operands, and gives what it gives on operands rounded to bfloat16 beforehand."""
    g = torch.Generator().manual_seed(0)
    q, k, v, gr = (torch.randn(2, 7, 3, 4, generator=g) for _ in range(4))
    kb, vb = k.bfloat16(), v.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, lse = rt.attention_forward(q, kb, vb, 0.5, kind)
        grads = rt.attention_backward(q, kb, vb, 0.5, kind, o.float(), lse, gr)
        ot = rt.attention_transposed(q, kb, vb, 0.5, kind, lse)
    qb, gb = q.bfloat16(), gr.bfloat16()
    o2, lse2 = rt.attention_forward(qb, kb, vb, 0.5, kind)
    grads2 = rt.attention_backward(qb, kb, vb, 0.5, kind, o2, lse2, gb)
    ot2 = rt.attention_transposed(qb, kb, vb, 0.5, kind, lse2)
    assert o.dtype == torch.bfloat16 and ot.dtype == torch.bfloat16
    torch.testing.assert_close(o, o2, rtol=0, atol=0)  # the same bfloat16 computation
    torch.testing.assert_close(ot, ot2, rtol=0, atol=0)
    for a, b in zip(grads[:3], grads2[:3]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", [("causal",), ("all",), ("not_self",)])
def test_attention_operands_whose_features_are_strided(dtype, kind):
    """Operands whose feature axis is not the contiguous one (einsum's permuted output of a small
    contraction): every attention call gives what it gives on contiguous copies (torch's CPU flash
    kernel read such a query as if it were contiguous: garbage)."""
    g = torch.Generator().manual_seed(0)

    def strided(*shape):  # (B, T, H, F) stored F-major: stride(-1) = B * T * H
        return torch.randn(shape[::-1], generator=g, dtype=dtype).permute(3, 2, 1, 0)

    q, k, v, gr = (strided(2, 5, 3, 4) for _ in range(4))
    assert q.stride(-1) != 1
    got_o, got_lse = rt.attention_forward(q, k, v, 0.5, kind)
    got = [got_o, got_lse, *rt.attention_backward(q, k, v, 0.5, kind, got_o, got_lse, gr)[:3],
           rt.attention_transposed(q, k, v, 0.5, kind, got_lse)]
    qc, kc, vc, gc = (t.contiguous() for t in (q, k, v, gr))
    o, lse = rt.attention_forward(qc, kc, vc, 0.5, kind)
    want = [o, lse, *rt.attention_backward(qc, kc, vc, 0.5, kind, o, lse, gc)[:3],
            rt.attention_transposed(qc, kc, vc, 0.5, kind, lse)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same computation on the same values
