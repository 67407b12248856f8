"""Attention weights kept from the forward (``keep_probs`` / ``probs=`` of energyc.runtime).

A forward asked to keep its weights P forms them whole (where tokens and keys fit one query block)
and the later calls over the same scores multiply by them: the key role, the backward's forwards
with other values, and the backward. The compiler asks for it where three or more calls read the
same scores (``kept_weights.keeps_probs``). Every call must give what it gives without P.
"""

from __future__ import annotations

import math
import pathlib

import pytest
import torch

from energyc import runtime as rt
from energyc.context import strict
from energyc.runtime import attention
from energyc.tolerances import tolerance

KINDS = [("all",), ("not_self",), ("causal",), ("strict",), ("window", 3)]


def _inputs(dtype, tokens=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (2, tokens, 3, 4)
    q, k, v, u, g = (torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
                     for _ in range(5))
    slopes = torch.tensor([0.5, -0.25, 0.125], dtype=dtype)
    return q, k, v, u, g, slopes


def _close(actual, expected, dtype):
    rtol, atol = tolerance(dtype)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_every_call_gives_with_kept_weights_what_it_gives_without(kind, bias, dtype):
    """Forward (o, lse), the key role, a forward with another value, and the backward (dq, dk,
    dv, dscale, dslopes) with P kept equal the same calls without it (which form the scores
    again), for every context set (strict has an empty first row), with and without a bias."""
    q, k, v, u, g, slopes = _inputs(dtype)
    slopes = slopes if bias else None
    scale = 0.7
    o, lse, p = rt.attention_forward(q, k, v, scale, kind, slopes=slopes, keep_probs=True)
    assert p is not None and p.shape == (2, 3, 7, 7)
    o_ref, lse_ref = rt.attention_forward(q, k, v, scale, kind, slopes=slopes)
    _close(o, o_ref, dtype)
    _close(lse, lse_ref, dtype)
    rows = p.sum(-1)
    empty = lse_ref.transpose(1, 2) == 0  # strict's first token: no key
    _close(rows, torch.where(empty, 0.0, 1.0).to(rows.dtype), dtype)

    _close(rt.attention_transposed(q, k, u, scale, kind, lse, slopes=slopes, probs=p),
           rt.attention_transposed(q, k, u, scale, kind, lse_ref, slopes=slopes), dtype)
    o_u, lse_u = rt.attention_forward(q, k, u, scale, kind, slopes=slopes, probs=p)
    assert lse_u is None  # P alone: the caller already has the log-sum-exp
    _close(o_u, rt.attention_forward(q, k, u, scale, kind, slopes=slopes)[0], dtype)

    kept = rt.attention_backward(q, k, v, scale, kind, o, lse, g, slopes=slopes,
                                 need_dscale=True, probs=p)
    formed = rt.attention_backward(q, k, v, scale, kind, o_ref, lse_ref, g, slopes=slopes,
                                   need_dscale=True)
    for a, b in zip(kept, formed):
        assert (a is None) == (b is None)
        if a is not None:
            _close(a, b, dtype)


def test_kept_weights_match_autograd_of_the_materialised_softmax():
    """float64, strict set with a bias: dq, dk, dv, dscale and dslopes from kept weights against
    autograd of the softmax written out (the reference the other backward paths are held to)."""
    q, k, v, _, g, slopes = _inputs(torch.float64)
    scale = torch.tensor(0.7, dtype=torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, scale, slopes)]
    ql, kl, vl, sl, ml = leaves
    i = torch.arange(7, dtype=torch.float64)
    offset = i[:, None] - i
    s = sl * torch.einsum("bihf,bjhf->bhij", ql, kl) + ml[:, None, None] * offset
    s = s.masked_fill(~strict().contains(i[:, None], i[None, :]), -math.inf)
    lse = torch.logsumexp(s, -1).nan_to_num(neginf=0.0)
    o_ref = torch.einsum("bhij,bjhf->bihf", torch.exp(s - lse[..., None]), vl)
    grads = torch.autograd.grad((o_ref * g).sum(), leaves)
    o, lse_k, p = rt.attention_forward(q, k, v, scale, ("strict",), slopes=slopes,
                                       keep_probs=True)
    got = rt.attention_backward(q, k, v, scale, ("strict",), o, lse_k, g, slopes=slopes,
                                need_dscale=True, probs=p)
    for a, b in zip(got, grads):
        _close(a, b, torch.float64)


def test_the_calls_take_the_weights_from_probs():
    """With ``probs`` the key role, the forward and dv depend on P and their value alone: the
    same results with q and k replaced by zeros (which would give uniform weights)."""
    q, k, v, u, g, _ = _inputs(torch.float64)
    o, lse, p = rt.attention_forward(q, k, v, 1.0, ("causal",), keep_probs=True)
    zeros = torch.zeros_like(q)
    _close(rt.attention_transposed(zeros, zeros, u, 1.0, ("causal",), lse, probs=p),
           rt.attention_transposed(q, k, u, 1.0, ("causal",), lse), torch.float64)
    _close(rt.attention_forward(zeros, zeros, u, 1.0, ("causal",), probs=p)[0],
           rt.attention_forward(q, k, u, 1.0, ("causal",))[0], torch.float64)
    dv = rt.attention_backward(zeros, zeros, v, 1.0, ("causal",), o, lse, g, probs=p)[2]
    _close(dv, rt.attention_backward(q, k, v, 1.0, ("causal",), o, lse, g)[2], torch.float64)


def test_weights_are_kept_up_to_the_limit_only(monkeypatch):
    """keep_probs returns P while queries and keys fit one query block (QUERY_CHUNK), else None
    (the kernels form the scores again in each call); empty inputs keep none; o and lse are the
    same."""
    q, k, v, *_ = _inputs(torch.float32, tokens=6)
    monkeypatch.setattr(attention, "QUERY_CHUNK", 6)
    assert rt.attention_forward(q, k, v, 0.5, ("causal",), keep_probs=True)[2] is not None
    monkeypatch.setattr(attention, "QUERY_CHUNK", 5)
    o, lse, p = rt.attention_forward(q, k, v, 0.5, ("causal",), keep_probs=True)
    assert p is None
    o_ref, lse_ref = rt.attention_forward(q, k, v, 0.5, ("causal",))
    assert torch.equal(o, o_ref) and torch.equal(lse, lse_ref)
    empty = q[:, :0]
    assert rt.attention_forward(empty, empty, empty, 0.5, ("causal",), keep_probs=True)[2] is None
    # a window: kept where it reaches half the keys, or the keys fit half a block
    monkeypatch.setattr(attention, "QUERY_CHUNK", 8)
    kept = {w: rt.attention_forward(q, k, v, 0.5, ("window", w), keep_probs=True)[2] is not None
            for w in (1, 2, 3)}
    assert kept == {1: False, 2: True, 3: True}  # 6 keys: a window of w reaches w + 1
    q4, k4, v4 = q[:, :4], k[:, :4], v[:, :4]
    assert rt.attention_forward(q4, k4, v4, 0.5, ("window", 0), keep_probs=True)[2] is not None


def _source(package: str, module: str = "layer") -> str:
    return (pathlib.Path("generated") / package / f"{module}.py").read_text()


@pytest.mark.parametrize("module, later_calls", [("layer", 3), ("_triton_layer", 4)])
def test_the_energy_transformer_keeps_its_weights_for_its_four_calls(module, later_calls):
    """Its scores are read by the forward, the key role, the backward's forward with the value
    W_k grad_g and the backward: the forward keeps P, saves it beside the log-sum-exp, and the
    later calls take it (``probs=``): three on torch, four on the Triton path, whose backward
    calls over the two values are not merged into one. The Triton kernels keep none (P is None
    there)."""
    source = _source("energy_transformer", module)
    assert source.count("keep_probs=True") == 1
    assert source.count("probs=t4_p") == later_calls
    assert "t4, t4_p" in source  # saved and unpacked beside the log-sum-exp


@pytest.mark.parametrize("package", ["cem_attention", "lm_attention_rope_dplr", "strict_dplr"])
def test_a_forward_and_its_backward_keep_no_weights(package):
    """Two calls over the scores (the forward, the backward, the latter merged over several
    values): the flash kernels' recomputation is the cheaper, and nothing is kept."""
    assert "probs" not in _source(package)
