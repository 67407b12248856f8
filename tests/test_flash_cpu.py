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


@pytest.fixture(params=[None, 1], ids=["default_parts", "every_part_a_call"])
def unmasked_parts(request, monkeypatch):
    """The kernels as they are, and with every run of keys inside the context set its own call
    without a mask (flash_cpu.MIN_UNMASKED = 1), whatever its width."""
    if request.param is not None:
        monkeypatch.setattr(flash_cpu, "MIN_UNMASKED", request.param)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: "_".join(map(str, k)))
@pytest.mark.parametrize("T,G", [(1, 4), (5, 5), (300, 3), (600, 6)])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "slopes"])
def test_masked_blocks_match_the_materialised_attention(kind, T, G, bias, unmasked_parts):
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


@pytest.mark.parametrize("kind", KINDS + [("window", 0), ("window", 2)],
                         ids=lambda k: "_".join(map(str, k)))
def test_parts_split_the_keys_where_the_context_set_cuts_them(kind, monkeypatch):
    """key_parts and query_parts cover the range in order; a part without a mask lies wholly in
    the context set; each masked part has a pair outside it (so no mask is wasted);
    _no_keys names exactly the rows without a key in a part. Every rectangle of 12 tokens."""
    monkeypatch.setattr(flash_cpu, "MIN_UNMASKED", 1)
    T = 12
    w = kind[1] if kind[0] == "window" else 0
    d = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    inside = _in_context(kind[0], w, d)
    spans = [(a, b) for a in range(T) for b in range(a + 1, T + 1)]
    for r0, r1 in spans:
        for c0, c1 in spans:
            for parts, tile in ((flash_cpu.key_parts(kind, r0, r1, c0, c1),
                                 lambda a, b, r0=r0, r1=r1: inside[r0:r1, a:b]),
                                (flash_cpu.query_parts(kind, r0, r1, c0, c1),
                                 lambda a, b, r0=r0, r1=r1: inside[a:b, r0:r1])):
                assert [p[0] for p in parts] == [c0] + [p[1] for p in parts[:-1]]
                assert parts[-1][1] == c1
                for a, b, masked in parts:
                    assert bool(tile(a, b).all()) != masked, (kind, r0, r1, c0, c1, parts)
            for a, b, _ in flash_cpu.key_parts(kind, r0, r1, c0, c1):
                want = ~inside[r0:r1, a:b].any(1)
                assert torch.equal(flash_cpu._no_keys(kind, r0, r1, a, b, torch.device("cpu")),
                                   want)


def test_long_sequences_run_most_keys_without_a_mask(monkeypatch):
    """At 600 tokens (blocks of 256) a not-self block's keys are three calls: two without a
    mask around the masked diagonal tile, whose mask is (256, 256), not (256, 600), where runs
    of 64 keys are worth a call; with the default MIN_UNMASKED (1024) they stay one masked call."""
    calls = []
    real = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

    class Ops:
        def __getattr__(self, name):
            if name == "_scaled_dot_product_flash_attention_for_cpu":
                def counting(q, k, v, *args, attn_mask=None, **kw):
                    calls.append(None if attn_mask is None else tuple(attn_mask.shape))
                    return real(q, k, v, *args, attn_mask=attn_mask, **kw)
                return counting
            return getattr(torch.ops.aten, name)

    monkeypatch.setattr(flash_cpu.torch.ops, "aten", Ops(), raising=False)
    q, k, v = (torch.randn(1, 600, 2, 8) for _ in range(3))
    flash_cpu.forward(q, k, v, 0.5, ("not_self",))
    assert calls == [(256, 600), (256, 600), (88, 600)]
    calls.clear()
    monkeypatch.setattr(flash_cpu, "MIN_UNMASKED", 64)
    flash_cpu.forward(q, k, v, 0.5, ("not_self",))
    assert calls[:2] == [(256, 256), None] and calls[2:5] == [None, (256, 256), None]
    assert all(c is None or c[1] <= 256 for c in calls)


def test_slopes_gradient_of_a_narrow_window_is_as_accurate_as_the_materialised_one():
    """dslopes of a window narrower than a block, in float32, against float64 from the same rounded
    inputs: no more than twice the error of the materialised float32 attention differentiated by
    autograd (2: the two roundings differ, not the formula). Weighted by j - r0 (up to a block)
    instead of its own i - j (up to 4) it was 30-60x that."""
    torch.manual_seed(0)
    B, T, H, F = 2, 1024, 2, 16
    kind = ("window", 4)
    q, k, v = (torch.randn(B, T, H, F) for _ in range(3))
    slopes, scale = torch.tensor([-0.5, -0.25]), 0.25
    g = torch.randn(B, T, H, F)

    def dslopes_dense(dt):
        s = slopes.to(dt).requires_grad_()
        o, _, _ = dense(q.to(dt), k.to(dt), v.to(dt), scale, kind, s)
        return torch.autograd.grad((o * g.to(dt)).sum(), s)[0]

    truth = dslopes_dense(torch.float64)
    o, lse = flash_cpu.forward(q, k, v, scale, kind, slopes)
    got = flash_cpu.backward(q, k, v, scale, kind, o, lse, g, slopes)[4]

    def err(t):
        return float((t.double() - truth).abs().max() / truth.abs().max())

    assert err(got) <= 2 * err(dslopes_dense(torch.float32))
