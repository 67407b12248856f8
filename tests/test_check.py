"""The property checks detect broken layers (so a passing check means something)."""

import pytest
import torch

from energyc.check import format_results, import_generated, run_check
from energyc.compiler import compile_file
from energyc.loader import load


@pytest.fixture(scope="module")
def mlp():
    layer = compile_file(load("examples/cem_mlp.py"))[0]
    return layer, import_generated(layer)


@pytest.fixture(scope="module")
def attention():
    layer = compile_file(load("examples/cem_attention.py"))[0]
    return layer, import_generated(layer)


def _patched(module, name, wrap, monkeypatch):
    original = getattr(module.layer, name)
    monkeypatch.setattr(module.layer, name, wrap(original))


def test_forward_check_catches_a_wrong_gradient(mlp, monkeypatch):
    layer, module = mlp

    def wrap(fn):
        def broken(*args):
            g, saved = fn(*args)
            return g * (1 + 1e-6), saved  # a relative error of 1e-6 must be caught in float64
        return broken

    _patched(module, "_grad_forward", wrap, monkeypatch)
    result = run_check(layer, module, "forward", 5)
    assert result.status == "FAIL" and "forward" in result.error


def test_backward_check_catches_a_wrong_parameter_gradient(mlp, monkeypatch):
    layer, module = mlp

    def wrap(fn):
        def broken(*args):
            out = list(fn(*args))
            out[2] = out[2] * (1 + 1e-6)  # dW
            return tuple(out)
        return broken

    _patched(module, "_grad_backward", wrap, monkeypatch)
    result = run_check(layer, module, "backward", 5)
    assert result.status == "FAIL" and "d/dW" in result.error


def test_causal_check_catches_a_leak(attention, monkeypatch):
    layer, module = attention

    def wrap(fn):
        def leaky(kernels, x, *rest):
            g, saved = fn(kernels, x, *rest)
            return g + 1e-3 * x.flip(1), saved  # token t now sees token T-1-t
        return leaky

    _patched(module, "_grad_forward", wrap, monkeypatch)
    result = run_check(layer, module, "causal", 10)
    assert result.status == "FAIL" and "causal" in result.error


def test_descent_check_catches_ascent(mlp, monkeypatch):
    layer, module = mlp

    def wrap(fn):
        def ascent(*args):
            g, saved = fn(*args)
            return -g, saved
        return ascent

    _patched(module, "_grad_forward", wrap, monkeypatch)
    result = run_check(layer, module, "descent", 5)
    assert result.status == "FAIL" and "raised the energy" in result.error


def test_energy_check_catches_a_wrong_second_derivative(attention, monkeypatch):
    """An energy whose value and first derivatives are right but whose second derivative is
    not: a term that is 0 with gradient 0, whose gradient's own backward is not 0, caught in
    d(dE . w)/dx."""
    layer, module = attention

    class _Zero(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x.new_zeros(x.shape[:-1])

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return _Flat.apply(g[..., None] * x)

    class _Flat(torch.autograd.Function):
        """0 on the way forward, 1e-6 times the cotangent on the way back."""

        @staticmethod
        def forward(ctx, v):
            return torch.zeros_like(v)

        @staticmethod
        def backward(ctx, h):
            return 1e-6 * h

    def wrap(fn):
        def curved(x, xbar, *rest):
            return fn(x, xbar, *rest) + _Zero.apply(x)
        return curved

    _patched(module, "_energy", wrap, monkeypatch)
    result = run_check(layer, module, "energy", 5)
    assert result.status == "FAIL" and "d(dE . w)/dx" in result.error, result.error


def test_energy_check_catches_an_energy_autograd_cannot_differentiate(attention, monkeypatch):
    """An in-place step on a value its backward saves (exp's output): the check reports it."""
    layer, module = attention

    def wrap(fn):
        def in_place(x, xbar, *rest):
            e = torch.exp(fn(x, xbar, *rest))
            return e.mul_(2)
        return in_place

    _patched(module, "_energy", wrap, monkeypatch)
    result = run_check(layer, module, "energy", 3)
    assert result.status == "FAIL" and "inplace operation" in result.error, result.error


def test_table_reports_counts(mlp):
    layer, module = mlp
    results = [run_check(layer, module, c, 3) for c in ("forward", "backward")]
    text = format_results(results)
    assert "2 passed, 0 failed, 0 skipped" in text
    assert torch.isfinite(torch.tensor([r.worst for r in results])).all()


def test_a_non_finite_reference_is_no_case_but_a_non_finite_layer_fails():
    """Where the reference overflows (an exp of a state a divergent step made large) there is
    nothing to compare: the case is rejected. NaN from the layer against a finite reference is
    still an error."""
    import torch

    from energyc.check import ReferenceNotFiniteError, _close

    finite = torch.tensor([1.0, 2.0], dtype=torch.float64)
    with pytest.raises(ReferenceNotFiniteError):
        _close("forward", finite, torch.tensor([1.0, float("nan")], dtype=torch.float64))
    with pytest.raises(AssertionError):
        _close("forward", torch.tensor([1.0, float("nan")], dtype=torch.float64), finite)
    assert _close("forward", finite, finite) == 0.0


def test_reference_softplus_and_sigmoid_stay_exact_in_their_second_derivative():
    """The reference evaluated softplus by its definition log(1 + exp(u)), whose autograd second
    derivative overflows past |u| ~ 355 (float64): sigmoid_attention after a large step (D=1, 5
    tokens, eta=1, 2 steps) had a reference backward 8.8e4 off while the layer was right (checked
    by finite differences)."""
    import torch

    from energyc.reference import _STABLE, softplus

    _softplus = _STABLE[softplus]
    u = torch.tensor([-1000.0, -400.0, -5.0, 0.0, 5.0, 400.0, 1000.0], dtype=torch.float64,
                     requires_grad=True)
    (g,) = torch.autograd.grad(_softplus(u).sum(), u, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), u)
    s = torch.sigmoid(u.detach())
    from energyc.tolerances import tolerance

    rtol, atol = tolerance(torch.float64)
    torch.testing.assert_close(_softplus(u).detach(), torch.nn.functional.softplus(u.detach(),
                               threshold=50), rtol=rtol, atol=atol)
    torch.testing.assert_close(g.detach(), s, rtol=rtol, atol=atol)
    torch.testing.assert_close(h, s * (1 - s), rtol=rtol, atol=atol)


def test_sigmoid_attention_reference_after_a_large_step():

    from energyc.check import Case, build, check_backward, import_generated
    from energyc.compiler import compile_file
    from energyc.loader import load

    layer = compile_file(load("examples/sigmoid_attention.py"))[0]
    module = import_generated(layer)
    case = Case(dims={"D": 1, "H": 3, "K": 1}, batch=1, tokens=5, seed=599213, scale=0.75,
                hypers={"beta": 1.0}, eta=1.0, steps=2, precond="identity", context="current")
    lay, x = build(layer, module, case)
    assert float(lay(x).abs().max()) > 100  # the step is large: scores past the overflow
    check_backward(layer, module, case)
