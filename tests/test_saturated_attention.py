"""float32 gradients of saturated attention (issue 11, item 7).

With scores of large magnitude (beta = 100 and inputs scaled by 100, or beta = 1e4 and scale 10,
|lse| ~ 1e6) each softmax row is one-hot to float32 precision. torch.autograd of the energy keeps
its weights and is within 2e-7 of float64; a backward that recomputes the weights as
exp(S - lse) from float32 scores, or takes delta = g . o instead of sum_j P_ij (g . v_j), was
40-130% off. The torch backend's fallback renormalises the recomputed rows and takes delta from P
(energyc.runtime.attention._softmax_rows, attention_backward), and a float32 backward with max |lse| above
FLASH_BACKWARD_MAX_LSE does not use the CPU flash kernel; the Triton path keeps the flash scheme,
whose error is bounded (README, "Status and limits") and tested here.
"""

import importlib

import pytest
import torch

from energyc.tolerances import tolerance

runtime = importlib.import_module("energyc.runtime.attention")

SATURATED = [(100.0, 100.0), (1e4, 10.0)]  # (beta, input scale): the settings
SIZES = {"D": 64, "H": 4, "K": 16}
UNIT_ROUNDOFF = 2.0**-24  # float32


def _gradients(dtype, backend, beta, scale, seed=0):
    """y, dL/dx, dL/dW_q, dL/dW_k of the generated cem_attention layer for L = (y * w).sum();
    inputs, weights and w drawn in float32 (so the float64 run sees the same numbers)."""
    from generated.cem_attention import Layer

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 32, SIZES["D"], generator=gen) * scale
    w_q = torch.randn(SIZES["H"], SIZES["K"], SIZES["D"], generator=gen) / SIZES["D"] ** 0.5
    w_k = torch.randn(SIZES["H"], SIZES["K"], SIZES["D"], generator=gen) / SIZES["D"] ** 0.5
    w = torch.randn(2, 32, SIZES["D"], generator=gen)
    layer = Layer(**SIZES, beta=beta, backend=backend, dtype=dtype)
    with torch.no_grad():
        layer.W_q.copy_(w_q)
        layer.W_k.copy_(w_k)
    x = x.to(dtype).requires_grad_(True)
    y = layer(x)
    (y * w.to(dtype)).sum().backward()
    return y.detach(), x.grad, layer.W_q.grad, layer.W_k.grad


def _max_lse(beta, scale, seed=0):
    """max |lse| of the layer's attention at these settings (the draws of _gradients), in
    float64."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(2, 32, SIZES["D"], generator=gen) * scale).double()
    w_q = torch.randn(SIZES["H"], SIZES["K"], SIZES["D"], generator=gen) / SIZES["D"] ** 0.5
    w_k = torch.randn(SIZES["H"], SIZES["K"], SIZES["D"], generator=gen) / SIZES["D"] ** 0.5
    w_q, w_k = w_q.double(), w_k.double()
    q = torch.einsum("hkd,btd->bthk", w_q, x)
    k = torch.einsum("hkd,btd->bthk", w_k, x)
    _, lse = runtime.attention_forward(q, k, k, beta, ("causal",))
    return lse.abs().max().item()


def _relative(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("path", ["default", "fallback"])
@pytest.mark.parametrize("beta,scale", SATURATED)
def test_saturated_float32_gradients_match_float64(beta, scale, path, monkeypatch):
    """The torch backend, on the path a CPU call takes and on the chunked fallback (the path of
    other context sets, of a bias term and of CUDA tensors), within float32's tolerance."""
    if path == "fallback":
        monkeypatch.setattr(runtime, "_FLASH_CPU_OPS", False)
    assert _max_lse(beta, scale) > 1e5  # the regime of the issue (saturated rows)
    reference = _gradients(torch.float64, "torch", beta, scale)
    got = _gradients(torch.float32, "torch", beta, scale)
    rtol, atol = tolerance(torch.float32)
    for name, a, b in zip(("y", "dx", "dW_q", "dW_k"), got, reference):
        # element-wise rtol, and atol relative to the tensor's scale (the values are ~1e2-1e4
        # here, where an absolute 2e-5 would ask for more than float32's 24 bits)
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol * b.abs().max().item(),
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_saturated_fallback_kernels_match_float64(monkeypatch):
    """attention_backward and attention_transposed on the fallback, context sets the flash kernel
    does not take (a window, j != i), saturated scores with ties (the weights 0, 1/2 and 1, where
    lse's rounding, 0.03 at |lse| ~ 5e5, shows): within float32's tolerance of float64."""
    monkeypatch.setattr(runtime, "_FLASH_CPU_OPS", False)
    gen = torch.Generator().manual_seed(1)
    q, k, v, g = (torch.randn(2, 40, 3, 8, generator=gen) * 30 for _ in range(4))
    k[:, 1::2] = k[:, 0::2]  # tied keys: rows with two weights of 1/2, so lse = max + log 2
    rtol, atol = tolerance(torch.float32)
    for kind in (("window", 5), ("not_self",), ("causal",)):
        results = {}
        for dtype in (torch.float32, torch.float64):
            args = [t.to(dtype) for t in (q, k, v)]
            o, lse = runtime.attention_forward(*args, 100.0, kind)
            grads = runtime.attention_backward(*args, 100.0, kind, o, lse, g.to(dtype))[:3]
            o_t = runtime.attention_transposed(*args, 100.0, kind, lse)
            results[dtype] = (o, *grads, o_t)
        reference = results[torch.float64]
        assert reference[2].abs().max() > 0  # not trivially one-hot with dk = 0
        # atol relative to each tensor's scale; dq, 0 in exact maths (tied keys are equal), to the
        # scale of dk, its counterpart (dq_i = s sum_j dS_ij k_j, dk_j = s sum_i dS_ij q_i)
        scales = [t.abs().max().item() for t in reference]
        scales[1] = scales[2]
        for name, a, b, size in zip(("o", "dq", "dk", "dv", "o_t"), results[torch.float32],
                                    reference, scales):
            torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol * size,
                                       msg=lambda m, name=name, kind=kind: f"{kind} {name}: {m}")


def test_flash_backward_routing():
    """float64 always takes the flash kernel; float32 only while max |lse| is at most
    FLASH_BACKWARD_MAX_LSE, NaN never (the fallback propagates it)."""
    limit = runtime.FLASH_BACKWARD_MAX_LSE
    assert runtime._flash_backward_accurate(torch.full((2, 3, 4), 1e6, dtype=torch.float64))
    assert runtime._flash_backward_accurate(torch.full((2, 3, 4), -limit))
    assert not runtime._flash_backward_accurate(torch.full((2, 3, 4), 2 * limit))
    assert not runtime._flash_backward_accurate(torch.tensor([1.0, float("nan")]))


def test_flash_backward_error_below_the_limit():
    """At max |lse| just below FLASH_BACKWARD_MAX_LSE the flash kernel serves, within float32's
    tolerance of float64 (its error is about 6e-8 * max |lse|, here <= 2e-5)."""
    beta = 12.0  # inputs of scale 1: max |lse| = 209 for these draws
    assert 100 < _max_lse(beta, 1.0) <= runtime.FLASH_BACKWARD_MAX_LSE
    reference = _gradients(torch.float64, "torch", beta, 1.0)
    got = _gradients(torch.float32, "torch", beta, 1.0)
    for a, b in zip(got[1:], reference[1:]):
        assert _relative(a, b) <= 1e-1 * tolerance(torch.float32)[0]  # the limit's design bound


@pytest.mark.slow
@pytest.mark.parametrize("beta,scale", [*SATURATED, (12.0, 1.0)])
def test_triton_path_error_bound(beta, scale):
    """The Triton path (flash kernels: P = exp(S - lse), delta = g . o) keeps a float32 gradient
    error of about 6e-8 * max |lse| relative (measured 0.4-1.8x that), as README states: bounded
    here by 4 * 2^-24 * max |lse|."""
    pytest.importorskip("triton")
    reference = _gradients(torch.float64, "torch", beta, scale)
    got = _gradients(torch.float32, "triton", beta, scale)
    bound = 4 * UNIT_ROUNDOFF * _max_lse(beta, scale)
    assert _relative(got[0], reference[0]) <= tolerance(torch.float32)[0]  # the forward: exact
    for a, b in zip(got[1:], reference[1:]):
        assert _relative(a, b) <= bound
