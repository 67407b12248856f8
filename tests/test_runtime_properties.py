"""Run-time properties of every generated layer (issue 11, item 1), drawn by Hypothesis: shapes
from empty to a few tokens, every dtype the torch backend supports, NaN and inf inputs,
non-contiguous views, and arguments outside their domain.

Example counts are small by default (a few per package and test; the whole file takes seconds);
ENERGYC_EDGE_EXAMPLES=50 draws more.
"""

from __future__ import annotations

import copy
import importlib
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from energyc import runtime as rt
from energyc.context import context
from energyc.tolerances import tolerance
from tests.conftest import context_data
from tests.test_runtime_edges import PACKAGES, build, memory

SETTINGS = settings(
    max_examples=int(os.environ.get("ENERGYC_EDGE_EXAMPLES", "3")),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
SIZE = 4  # every dim of every layer (build's default): the state is (batch, tokens, 4)


class Called(torch.nn.Module):
    """A generated layer called with the keywords its energy needs besides x (a memory, the
    documents or prefix its sets read: ``memory``, ``conftest.context_data``), drawn from x's
    shape, so that every package runs the same properties; other attributes are the layer's."""

    def __init__(self, layer: torch.nn.Module, package: str) -> None:
        super().__init__()
        self.layer, self.package = layer, package

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)

    def _keywords(self, x: torch.Tensor) -> dict:
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            return {}  # the layer names what is wrong with x
        dtype = next(iter(self.layer.parameters()), x).dtype  # a layer may have none
        return {**memory(self.layer, x.to(dtype)),
                **context_data(self.package, x.shape[0], x.shape[1])}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x, **self._keywords(x))

    def energy(self, x: torch.Tensor, xbar: torch.Tensor | None = None, per_token: bool = False):
        if self.layer._declared.memory is not None:  # the memory is the context, not xbar
            return self.layer.energy(x, per_token=per_token, **self._keywords(x))
        return self.layer.energy(x, xbar=xbar, per_token=per_token, **self._keywords(x))


def _layer(package: str, dtype: torch.dtype = torch.float64, **settings_) -> torch.nn.Module:
    return Called(build(package, SIZE, **settings_).to(dtype), package)


def _call(layer: torch.nn.Module, x: torch.Tensor, w: torch.Tensor):
    """y, and the gradients of sum(y * w) for x (a leaf) and every parameter."""
    for p in layer.parameters():
        p.grad = None
    y = layer(x)
    (y * w).sum().backward()
    return y.detach(), x.grad if x.is_leaf else None, [None if p.grad is None else p.grad.clone()
                                for p in layer.parameters()]


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    rtol, atol = tolerance(dtype)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol,
                               equal_nan=True)


# -- shapes: batch 0, 0 and 1 tokens, a few tokens; every dtype -----------------------------------


@pytest.mark.parametrize("package", PACKAGES)
@SETTINGS
@given(batch=st.integers(0, 2), tokens=st.integers(0, 5), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16))
def test_shapes_and_dtypes_follow_the_input(package, batch, tokens, dtype, seed):
    """Output, gradients and energies have the input's shape and dtype (parameters' for their
    gradients) for any batch and token count, empty included; in float64 everything is finite,
    and lower precisions agree with the float64 evaluation of the same (rounded) weights and
    input within the dtype's tolerance."""
    layer = _layer(package, dtype)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, SIZE, generator=gen).to(dtype).requires_grad_(True)
    w = torch.randn(batch, tokens, SIZE, generator=gen).to(dtype)
    y, gx, gparams = _call(layer, x, w)
    assert y.shape == x.shape and y.dtype == dtype
    assert gx.shape == x.shape and gx.dtype == dtype
    for p, g in zip(layer.parameters(), gparams):
        assert g is None or (g.shape == p.shape and g.dtype == p.dtype)
    e = layer.energy(x.detach(), per_token=True)
    assert e.shape == (batch, tokens) and e.dtype == dtype
    assert layer.energy(x.detach()).shape == (batch,)
    if batch * tokens == 0:
        return
    reference = copy.deepcopy(layer).double()
    x64 = x.detach().double().requires_grad_(True)
    y64, gx64, gparams64 = _call(reference, x64, w.double())
    assert torch.isfinite(y64).all() and torch.isfinite(gx64).all()
    _close(y, y64, dtype)
    _close(e, reference.energy(x64.detach(), per_token=True), dtype)
    if dtype in (torch.float64, torch.float32):  # half-precision gradients: rounding of sums
        _close(gx, gx64, dtype)                   # over tokens, compared by test_triton_layers


@pytest.mark.parametrize("package", PACKAGES)
@pytest.mark.parametrize("batch", [1, 3])
def test_one_token(package, batch):
    """One token: every context set holds at most the token itself (j < i holds nothing)."""
    layer = _layer(package)
    x = torch.randn(batch, 1, SIZE, dtype=torch.float64, requires_grad=True)
    y, gx, gparams = _call(layer, x, torch.ones_like(x))
    assert y.shape == x.shape and torch.isfinite(y).all() and torch.isfinite(gx).all()
    assert all(g is None or torch.isfinite(g).all() for g in gparams)
    assert torch.isfinite(layer.energy(x.detach(), per_token=True)).all()


# -- NaN and inf: propagate, never crash, stay in their batch element -----------------------------


@pytest.mark.parametrize("package", PACKAGES)
@SETTINGS
@given(data=st.data(), value=st.sampled_from([math.nan, math.inf, -math.inf]),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_non_finite_input_propagates_within_its_batch_element(package, data, value, dtype):
    tokens = data.draw(st.integers(1, 4), label="tokens")
    t = data.draw(st.integers(0, tokens - 1), label="token")
    d = data.draw(st.integers(0, SIZE - 1), label="feature")
    layer = _layer(package, dtype)
    clean = torch.randn(2, tokens, SIZE, dtype=dtype)
    x = clean.clone()
    x[0, t, d] = value
    x.requires_grad_(True)
    y, gx, _ = _call(layer, x, torch.ones_like(x))
    assert not torch.isfinite(y[0, t, d])  # x - eta P g: NaN stays NaN, inf stays non-finite
    if math.isnan(value) and tokens > 1:  # (one token under j != i: E is 0 whatever x is)
        assert torch.isnan(layer.energy(x.detach())[0])
    # the other batch element is untouched: same output and gradient as without the bad value
    y_clean, gx_clean, _ = _call(layer, clean.clone().requires_grad_(True), torch.ones_like(x))
    _close(y[1], y_clean[1], dtype)
    _close(gx[1], gx_clean[1], dtype)
    assert torch.isfinite(gx[1]).all()


# -- non-contiguous inputs: the same result as their contiguous copy ------------------------------

VIEWS = {
    # name: (shape of the base tensor for a (B, T, D) view, the view of it)
    "transposed": (lambda B, T, D: (T, B, D), lambda b: b.transpose(0, 1)),
    "feature_major": (lambda B, T, D: (D, B, T), lambda b: b.permute(1, 2, 0)),
    "every_other_feature": (lambda B, T, D: (B, T, 2 * D), lambda b: b[..., ::2]),
    "every_other_token": (lambda B, T, D: (B, 2 * T, D), lambda b: b[:, ::2]),
    "expanded_batch": (lambda B, T, D: (1, T, D), lambda b: b.expand(2, -1, -1)),
}


@pytest.mark.parametrize("package", PACKAGES)
@SETTINGS
@given(view=st.sampled_from(sorted(VIEWS)), tokens=st.integers(2, 4),
       dtype=st.sampled_from([torch.float64, torch.float32]), seed=st.integers(0, 2**16))
def test_non_contiguous_input_matches_its_contiguous_copy(package, view, tokens, dtype, seed):
    base_shape, make = VIEWS[view]
    layer = _layer(package, dtype)
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(base_shape(2, tokens, SIZE), generator=gen).to(dtype)
    w = torch.randn(2, tokens, SIZE, generator=gen).to(dtype)
    results = []
    for contiguous in (False, True):
        leaf = base.clone().requires_grad_(True)
        x = make(leaf)
        if contiguous:
            x = x.contiguous()
        else:
            assert not x.is_contiguous()
        y, _, gparams = _call(layer, x, w)
        results.append((y, leaf.grad, gparams, layer.energy(x.detach(), make(base), True)))
    (y, g, gp, e), (y_c, g_c, gp_c, e_c) = results
    _close(y, y_c, dtype)
    _close(g, g_c, dtype)
    _close(e, e_c, dtype)
    for a, b in zip(gp, gp_c):
        assert (a is None) == (b is None)
        if a is not None:
            _close(a, b, dtype)


# -- attention with a scale <= 0 (a hyperparameter such as beta set to 0 or below) ---------------


@pytest.mark.parametrize("kind", [("causal",), ("all",), ("strict",), ("window", 2)])
@pytest.mark.parametrize("scale", [-1.0, 0.0, 0.5])
def test_attention_with_any_scale_matches_the_materialised_softmax(scale, kind):
    """The CPU flash kernel (causal) scaled its -inf mask: scale 0 or below gave NaN."""
    gen = torch.Generator().manual_seed(0)
    q, k, v, g = (torch.randn(2, 5, 2, 3, generator=gen, dtype=torch.float64) for _ in range(4))
    q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)
    o, lse = rt.attention_forward(q, k, v, scale, kind)
    dq, dk, dv, _, _ = rt.attention_backward(q, k, v, scale, kind, o, lse, g)
    i = torch.arange(5)
    inside = context(kind).contains(i[:, None], i[None, :])
    s = (scale * torch.einsum("bihf,bjhf->bhij", q, k)).masked_fill(~inside, -math.inf)
    lse_ref = torch.logsumexp(s, -1).nan_to_num(neginf=0.0)  # an empty set: 0
    p = torch.exp(s - lse_ref[..., None])
    o_ref = torch.einsum("bhij,bjhf->bihf", p, v)
    grads = torch.autograd.grad((o_ref * g).sum(), (q, k, v))
    _close(o, o_ref, torch.float64)
    _close(lse, lse_ref.transpose(1, 2), torch.float64)
    for actual, expected in zip((dq, dk, dv), grads):
        _close(actual, expected, torch.float64)


CAUSAL_FLASH = ["cem_attention", "lm_attention_nope", "lm_attention_rope", "local_global_attention"]


@pytest.mark.parametrize("package", CAUSAL_FLASH)
@pytest.mark.parametrize("beta", [-1.0, -0.25])
def test_negative_beta_is_descent_on_the_energy(package, beta):
    """x - eta grad_x E(x | xbar = x), E the layer's own energy; NaN before (flash kernel)."""
    layer = _layer(package, beta=beta)
    x = torch.randn(2, 5, SIZE, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(layer.energy(x, x.detach()).sum(), x)
    eta = layer.config[0]
    _close(layer(x.detach()), x.detach() - eta * grad, torch.float64)


@pytest.mark.parametrize("package", PACKAGES)
def test_energy_without_xbar_is_the_energy_the_step_descends(package):
    """layer.energy(x) is E(x | x held fixed): one step x - eta grad_x layer.energy(x).sum() is
    layer(x) (identity preconditioner, steps=1), and its value is E(x | x). With xbar=x the
    gradient runs through both roles and is not the step's (it was the default)."""
    layer = _layer(package, precond="identity", steps=1)
    x = torch.randn(2, 5, SIZE, dtype=torch.float64, requires_grad=True)
    energy = layer.energy(x, per_token=True)
    (grad,) = torch.autograd.grad(energy.sum(), x)
    eta = layer.config[0]
    neurons = getattr(layer, "neurons", ())
    if len(neurons) > 1:
        pytest.skip("several neuron layers (test_neurons checks their energies)")
    if neurons:  # a step descends on dE/dg: grad_x E(g(x)) = J (dE/dg), J = dg/dx symmetric
        (g,) = layer.activations(x)
        step = (x.detach() - layer(x.detach())) / eta  # dE/dg
        (want,) = torch.autograd.grad(g, x, step)
        _close(grad, want, torch.float64)
    else:
        _close(layer(x.detach()), x.detach() - eta * grad, torch.float64)
    torch.testing.assert_close(energy, layer.energy(x, x, per_token=True), rtol=0, atol=0)
    if package in ("cem_attention", "grouped_query_attention"):
        (both,) = torch.autograd.grad(layer.energy(x, x).sum(), x)
        assert (both - grad).abs().max() > 1e-3


# -- arguments outside their domain: a clear error naming the argument ----------------------------


def _dims(package: str) -> dict[str, int]:
    """Every dim keyword of the package's Layer (those with a declared default too) at SIZE."""
    return dict.fromkeys(importlib.import_module(f"generated.{package}.layer").DIMS, SIZE)


def _hypers(package: str) -> tuple[str, ...]:
    return importlib.import_module(f"generated.{package}.layer").HYPERS


BAD_SETTINGS = [
    ("eta", math.nan, ValueError), ("eta", math.inf, ValueError), ("eta", -math.inf, ValueError),
    ("eta", "1.0", TypeError), ("eta", True, TypeError), ("eta", None, TypeError),
    ("eta", [1.0], TypeError),
    ("steps", 0, ValueError), ("steps", -1, ValueError), ("steps", 1.5, ValueError),
    ("steps", True, ValueError),
    ("precond", "full", ValueError), ("precond", None, ValueError),
    ("precond_rank", 0, ValueError), ("precond_rank", -2, ValueError),
    ("context", "past", ValueError), ("context", None, ValueError),
    ("backend", "cuda", ValueError), ("backend", None, ValueError),
    ("dtype", torch.int64, TypeError), ("dtype", torch.complex64, TypeError),
    ("dtype", "float32", TypeError), ("device", "nowhere", ValueError),
]


@pytest.mark.parametrize("name, value, error", BAD_SETTINGS,
                         ids=[f"{n}={v!r}" for n, v, _ in BAD_SETTINGS])
def test_bad_setting_names_the_argument(name, value, error):
    for package in PACKAGES:
        with pytest.raises(error, match=f"argument {name}:"):
            build(package, SIZE, **{name: value})


@pytest.mark.parametrize("value", [0, -1])
def test_bad_dim_names_the_argument(value):
    for package in PACKAGES:
        for dim in _dims(package):
            with pytest.raises(ValueError, match=f"argument {dim}:"):
                importlib.import_module(f"generated.{package}").Layer(
                    **{**_dims(package), dim: value})


@pytest.mark.parametrize("value, error", [(math.nan, ValueError), (math.inf, ValueError),
                                          ("0.5", TypeError), (False, TypeError)])
def test_bad_hyperparameter_names_the_argument(value, error):
    for package in PACKAGES:
        for hyper in _hypers(package):
            with pytest.raises(error, match=f"argument {hyper}:"):
                build(package, SIZE, **{hyper: value})


def test_settings_in_their_domain_are_accepted():
    """eta 0 (the identity) and below (a step up the energy), numpy-like numbers, any device
    spelling torch takes."""
    x = torch.randn(1, 3, SIZE)
    for package in PACKAGES:
        def made(package=package, **settings_):
            return Called(build(package, SIZE, **settings_), package)

        torch.testing.assert_close(made(eta=0)(x), x)
        made(eta=-0.5, dtype=torch.float32, device="cpu")(x)
        made(eta=torch.tensor(0.5), device=torch.device("cpu"))(x)


BAD_INPUTS = [
    ("x", lambda: torch.randn(3, SIZE), ValueError, r"expected shape \(batch, tokens, 4\)"),
    ("x", lambda: torch.randn(1, 2, 3, SIZE), ValueError, r"expected shape"),
    ("x", lambda: torch.randn(1, 2, SIZE + 1), ValueError, r"expected shape"),
    ("x", lambda: torch.ones(1, 2, SIZE, dtype=torch.long), TypeError, "floating-point"),
    ("x", lambda: torch.ones(1, 2, SIZE, dtype=torch.bool), TypeError, "floating-point"),
    ("x", lambda: torch.randn(1, 2, SIZE, dtype=torch.float32), TypeError, "does not match"),
    ("x", lambda: [[[0.0] * SIZE]], TypeError, "expected a torch.Tensor"),
    ("xbar", lambda: torch.randn(1, 2, SIZE, dtype=torch.float64), ValueError,
     r"expected the shape of x, \(2, 3, 4\)"),
    ("xbar", lambda: torch.randn(2, 5, SIZE, dtype=torch.float64), ValueError,
     "expected the shape of x"),
    ("xbar", lambda: torch.ones(2, 3, SIZE, dtype=torch.int32), TypeError, "floating-point"),
]


@pytest.mark.parametrize("name, make, error, message", BAD_INPUTS,
                         ids=[f"{n}{i}" for i, (n, *_) in enumerate(BAD_INPUTS)])
def test_bad_input_names_the_argument(name, make, error, message):
    """xbar of another batch or token count than x was broadcast or failed deep in a step."""
    for package in PACKAGES:
        layer = _layer(package)
        if name == "xbar" and layer._declared.memory is not None:
            continue  # its context is the memory (tests/test_memory.py checks memory=)
        if message == "does not match" and not list(layer.parameters()):
            continue  # no parameters: any floating dtype is the layer's
        x = torch.randn(2, 3, SIZE, dtype=torch.float64)
        # a neuron model names the state by its first layer
        arg = layer.neurons[0] if name == "x" and hasattr(layer, "neurons") else name
        with pytest.raises(error, match=f"argument {arg}: .*{message}"):
            if name == "x":
                layer(make())
            else:
                layer.energy(x, make())
        if name == "x":
            with pytest.raises(error, match=f"argument {arg}: .*{message}"):
                layer.energy(make())
