"""The CPU flash kernels with masked blocks (energyc/runtime/flash_cpu.py) against a materialised
float64 reference differentiated by torch.autograd: every context set, with and without an
i - j bias, values narrower and wider than the scores' features, token counts across blocks."""

from __future__ import annotations

import math

import pytest
import torch

from energyc import runtime as rt
from energyc.runtime import flash_cpu
from energyc.runtime.pairs import _in_context
from energyc.tolerances import tolerance

KINDS = [("causal",), ("strict",), ("window", 7), ("window", 300), ("not_self",), ("all",)]


def dense(q, k, v, scale, kind, slopes):
    """o (B, T, H, G), lse (B, T, H) and P (B, H, T, T), materialised."""
    T = q.shape[1]
    S = scale * torch.einsum("bihf,bjhf->bhij", q, k)
    d = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).to(q.dtype)
    if slopes is not None:
        S = S + slopes[None, :, None, None] * d
    inside = _in_context(kind[0], kind[1] if kind[0] == "window" else 0, d)
    S = S.masked_fill(~inside, -math.inf)
    lse = torch.logsumexp(S, -1)
    lse = torch.where(torch.isinf(lse), 0.0, lse)  # an empty context set: 0 by convention
    P = torch.exp(S - lse[..., None])
    return torch.einsum("bhij,bjhf->bihf", P, v), lse.transpose(1, 2), P


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: "_".join(map(str, k)))
@pytest.mark.parametrize("T,G", [(1, 4), (5, 5), (300, 3), (600, 6)])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "slopes"])
def test_masked_blocks_match_the_materialised_attention(kind, T, G, bias):
    torch.manual_seed(T + G)
    dt = torch.float64
    B, H, F = 2, 3, 4
    q, k = (torch.randn(B, T, H, F, dtype=dt, requires_grad=True) for _ in range(2))
    v = torch.randn(B, T, H, G, dtype=dt, requires_grad=True)
    scale = torch.tensor(0.7, dtype=dt, requires_grad=True)
    slopes = (0.1 * torch.randn(H, dtype=dt)).requires_grad_() if bias else None
    o, lse, P = dense(q, k, v, scale, kind, slopes)
    g = torch.randn_like(o)
    wrt = [q, k, v, scale] + ([slopes] if bias else [])
    want = torch.autograd.grad((o * g).sum(), wrt)
    detached = [t.detach() for t in (q, k, v, scale)]
    s = None if slopes is None else slopes.detach()
    o2, lse2 = flash_cpu.forward(*detached, kind, s)
    got = flash_cpu.backward(*detached, kind, o2, lse2, g, s, need_dscale=True)
    w = torch.randn(B, T, H, 5, dtype=dt)  # a value of the query token, for the key role
    ot = flash_cpu.transposed(detached[0], detached[1], w, detached[3], kind, lse2, s)
    rtol, atol = tolerance(dt)
    tol = dict(rtol=rtol, atol=atol)
    torch.testing.assert_close(o2, o.detach(), **tol)
    torch.testing.assert_close(lse2, lse.detach(), **tol)
    torch.testing.assert_close(ot, torch.einsum("bhij,bihf->bjhf", P.detach(), w), **tol)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol)


def test_runtime_attention_takes_the_masked_blocks_for_other_sets_and_biases(monkeypatch):
    """attention_forward / _backward / _transposed use flash_cpu where the plain kernels do not
    serve (here: a window with slopes and a learned scale) and agree with the chunked path."""
    torch.manual_seed(0)
    B, T, H, F = 2, 40, 2, 4
    q, k, v, g = (torch.randn(B, T, H, F, dtype=torch.float64) for _ in range(4))
    slopes, kind = torch.tensor([0.1, -0.2], dtype=torch.float64), ("window", 5)
    calls = []
    for name in ("forward", "backward", "transposed"):
        real = getattr(flash_cpu, name)
        monkeypatch.setattr(flash_cpu, name,
                            lambda *a, _real=real, _n=name, **kw: calls.append(_n) or _real(*a, **kw))
    o, lse = rt.attention_forward(q, k, v, 0.5, kind, slopes)
    grads = rt.attention_backward(q, k, v, 0.5, kind, o, lse, g, slopes, need_dscale=True)
    ot = rt.attention_transposed(q, k, g, 0.5, kind, lse, slopes)
    assert calls == ["forward", "backward", "transposed"]
    monkeypatch.setattr(flash_cpu, "serves", lambda *a, **kw: False)  # the chunked fallback
    o_c, lse_c = rt.attention_forward(q, k, v, 0.5, kind, slopes)
    grads_c = rt.attention_backward(q, k, v, 0.5, kind, o_c, lse_c, g, slopes, need_dscale=True)
    rtol, atol = tolerance(torch.float64)
    tol = dict(rtol=rtol, atol=atol)
    torch.testing.assert_close(o, o_c, **tol)
    torch.testing.assert_close(ot, rt.attention_transposed(q, k, g, 0.5, kind, lse_c, slopes), **tol)
    for a, b in zip(grads, grads_c):
        torch.testing.assert_close(a, b, **tol)


def test_a_zero_scale_with_a_learned_scale_or_slopes_is_not_served():
    """dscale and dslopes are divided out of dq by the scale."""
    q = torch.zeros(1, 3, 1, 2)
    assert flash_cpu.serves(q, q, 0.5, None, need_dscale=True)
    assert not flash_cpu.serves(q, q, 0.0, None, need_dscale=True)
    assert not flash_cpu.serves(q, q, 0.0, torch.ones(1))
    assert flash_cpu.serves(q, q, 0.0)
