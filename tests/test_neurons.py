"""Neuron models (``neurons(name, dim, lagrangian)``, ``energyc.lagrangians``,
``energyc.runtime.neurons``): every Lagrangian of the library gives its textbook activation; a
model's dynamics, their backward (through the Lagrangians' Hessian-vector products), its total
energy and its descent agree with torch.autograd of the unrolled reference (``energyc check``'s
properties, on energies written here and on the examples), with several layers, clamps, time
constants, preconditioners, contexts, padding and documents; the Triton path equals the torch
path; the trace descends; and each refusal names its line."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch

from energyc.check import import_generated, run_check
from energyc.compiler import compile_file
from energyc.errors import EnergyError
from energyc.loader import load
from energyc.reference import reference_neurons
from tests.conftest import assert_within_tolerance as _within

F64 = torch.float64

# an energy with a token-mixing term and a per-token term, over one neuron layer g
TOKEN_MIXING = """
    from energyc.dsl import *
    from energyc import lagrangians
    D, H, K, M = dims("D H K M")
    i, j = tokens()
    g, gbar = neurons("g", D, {lagrangian})
    W_q = param("W_q", (H, K, D))
    W_k = param("W_k", (H, K, D))
    Xi = param("Xi", (M, D))
    beta = hyper("beta", default=1)
    attention = -logsumexp(beta * dot(W_q @ g[i], W_k @ gbar[j], over=K), over={over}).sum(H)
    layer("model", {{"attention": attention, "memory": -(relu(Xi @ g[i]) ** 2).sum(M) / 2}},
          eta=0.3, steps=2, joint={joint})
"""

LIBRARY = {
    "identity": "lagrangians.identity()",
    "relu": "lagrangians.relu()",
    "repu": "lagrangians.repu(3)",
    "sigmoid": "lagrangians.sigmoid()",
    "tanh": "lagrangians.tanh()",
    "softmax": "lagrangians.softmax(2.0)",
    "layernorm": "lagrangians.layernorm()",
    "spherical": "lagrangians.spherical()",
    "own": "lambda x: sum_over(softplus(x) + x * x / 4, D)",
}


def assert_within_tolerance(got: torch.Tensor, want: torch.Tensor, name: str = "value") -> None:
    _within(name, got, want, want.dtype)


def _write(tmp_path, source: str, name: str = "model.py") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return str(path)


def _compile(tmp_path, source: str):
    (layer,) = compile_file(load(_write(tmp_path, source)))
    return layer, import_generated(layer, str(tmp_path / "out"))


def _perturbed(lay: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():  # away from the initial values (gamma 1, delta 0, P the identity)
        for p in lay.parameters():
            p.add_(scale * torch.randn_like(p))
    return lay


@pytest.mark.parametrize("name", sorted(LIBRARY))
def test_library_lagrangians_pass_every_check(tmp_path, name):
    """Each Lagrangian inside a token-mixing energy: forward, backward (the Hessian-vector
    products), descent of the total energy and the energy's derivatives, against autograd."""
    layer, module = _compile(tmp_path, TOKEN_MIXING.format(lagrangian=LIBRARY[name],
                                                           over="j <= i", joint=False))
    for check in ("forward", "backward", "descent", "energy", "causal"):
        result = run_check(layer, module, check, max_examples=6)
        assert result.status == "ok", f"{name} {check}: {result.error}"


def _textbook(name: str, x: torch.Tensor, lay) -> torch.Tensor:
    """The activation of each library Lagrangian, from NEURONS.md's table."""
    if name == "identity":
        return x
    if name == "relu":
        return torch.relu(x)
    if name == "repu":
        return torch.relu(x) ** 2
    if name == "sigmoid":
        return torch.sigmoid(x)
    if name == "tanh":
        return torch.tanh(x)
    if name == "softmax":
        return torch.softmax(2.0 * x, dim=-1)
    if name == "spherical":
        return x / x.norm(dim=-1, keepdim=True)
    if name == "layernorm":
        centred = x - x.mean(-1, keepdim=True)
        sigma = (centred.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
        return lay.gamma * centred / sigma + lay.delta
    return torch.sigmoid(x) + x / 2  # "own": d/dx (softplus(x) + x^2 / 4)


@pytest.mark.parametrize("name", sorted(LIBRARY))
def test_activations_are_the_textbook_ones(tmp_path, name):
    _, module = _compile(tmp_path, TOKEN_MIXING.format(lagrangian=LIBRARY[name], over="j <= i",
                                                       joint=False))
    lay = _perturbed(module.Layer(D=6, H=2, K=3, M=4, dtype=F64))
    x = 3 * torch.randn(2, 5, 6, dtype=F64)
    (g,) = lay.activations(x)
    assert_within_tolerance(g, _textbook(name, x, lay))


HIERARCHY = """
    from energyc.dsl import *
    from energyc import lagrangians
    V, N, C = dims("V N C")
    i, j = tokens()
    beta = hyper("beta", default=1, learnable=True)
    v, _ = neurons("pixels", V, lagrangians.identity())
    h, _ = neurons("hidden", N, lagrangians.softmax(beta), tau=2.0)
    c, _ = neurons("labels", C, lagrangians.layernorm(gamma="g_c", delta="d_c"), tau=0.5)
    W = param("W", (N, V))
    U = param("U", (N, C))
    layer("model", {{"a": -dot(h[i], W @ v[i], over=N), "b": -dot(h[i], U @ c[i], over=N)}},
          eta=0.2, steps=3, dynamics="{dynamics}")
"""


@pytest.mark.parametrize("dynamics", ["legendre", "descent"])
def test_a_hierarchy_of_three_layers_passes_every_check(tmp_path, dynamics):
    """Three layers with their own dims, time constants and Lagrangians (one with parameters,
    one with a learned temperature), clamps drawn: every check against autograd."""
    layer, module = _compile(tmp_path, HIERARCHY.format(dynamics=dynamics))
    for check in ("forward", "backward", "descent", "energy"):
        result = run_check(layer, module, check, max_examples=8)
        assert result.status == "ok", f"{check}: {result.error}"


def test_clamped_layers_stay_and_pass_gradient(tmp_path):
    layer, module = _compile(tmp_path, HIERARCHY.format(dynamics="legendre"))
    lay = _perturbed(module.Layer(V=5, N=4, C=3, dtype=F64))
    xs = [torch.randn(2, 1, d, dtype=F64, requires_grad=True) for d in (5, 4, 3)]
    pix, hid, lab = lay(*xs, clamp=("pixels", "labels"))
    assert torch.equal(pix, xs[0]) and torch.equal(lab, xs[2])
    assert not torch.equal(hid, xs[1])
    (grad,) = torch.autograd.grad(hid.sum(), xs[0])
    assert grad.abs().sum() > 0  # a clamped input steers the free layers
    want = reference_neurons(layer, lay, xs, True, clamp=("pixels", "labels"))
    (want_grad,) = torch.autograd.grad(want[1].sum(), xs[0])
    assert_within_tolerance(grad, want_grad)


def test_time_constants_set_each_layers_step(tmp_path):
    layer, module = _compile(tmp_path, HIERARCHY.format(dynamics="legendre"))
    slow = _perturbed(module.Layer(V=5, N=4, C=3, dtype=F64, steps=1, tau={"hidden": 4.0}))
    assert slow.tau == {"pixels": 1.0, "hidden": 4.0, "labels": 0.5}  # the declared, overridden
    xs = [torch.randn(2, 1, d, dtype=F64) for d in (5, 4, 3)]
    moved_slow = slow(*xs)[1] - xs[1]
    fast = slow
    fast.tau = {**slow.tau, "hidden": 1.0}
    moved_fast = fast(*xs)[1] - xs[1]
    assert_within_tolerance(4 * moved_slow, moved_fast)  # eta / tau, one step
    want = reference_neurons(layer, fast, xs, False)
    for got, w in zip(fast(*xs), want):
        assert_within_tolerance(got, w)


@pytest.mark.parametrize("precond", ["diagonal", "dplr"])
@pytest.mark.parametrize("context", ["current", "input"])
def test_preconditioners_and_contexts(tmp_path, precond, context):
    layer, module = _compile(tmp_path, TOKEN_MIXING.format(lagrangian=LIBRARY["layernorm"],
                                                           over="j < i", joint=False))
    lay = _perturbed(module.Layer(D=4, H=2, K=3, M=5, dtype=F64, precond=precond, context=context,
                                  precond_rank=2))
    x = torch.randn(2, 6, 4, dtype=F64, requires_grad=True)
    y = lay(x)
    want = reference_neurons(layer, lay, [x], True)[0]
    assert_within_tolerance(y, want)
    leaves = [x, *lay.parameters()]
    w = torch.randn_like(y)
    for got, expected in zip(torch.autograd.grad((y * w).sum(), leaves),
                             torch.autograd.grad((want * w).sum(), leaves)):
        assert_within_tolerance(got, expected)


def test_padding_and_documents(tmp_path):
    """Padded tokens are not updated and change no real token; packed documents equal each
    document alone."""
    _, module = _compile(tmp_path, TOKEN_MIXING.format(
        lagrangian=LIBRARY["layernorm"], over="(j <= i) & same_document()", joint=False))
    lay = _perturbed(module.Layer(D=4, H=2, K=3, M=5, dtype=F64))
    x = torch.randn(1, 7, 4, dtype=F64)
    packed = lay(x, cu_seqlens=torch.tensor([0, 3, 7]))
    assert_within_tolerance(packed[:, :3], lay(x[:, :3], cu_seqlens=torch.tensor([0, 3])))
    assert_within_tolerance(packed[:, 3:], lay(x[:, 3:], cu_seqlens=torch.tensor([0, 4])))
    padded = x.clone()
    padded[:, 5:] = 100.0
    y = lay(padded, cu_seqlens=torch.tensor([0, 3, 7]), lengths=torch.tensor([5]))
    assert torch.equal(y[:, 5:], padded[:, 5:])
    assert_within_tolerance(y[:, :3], packed[:, :3])


def test_triton_path_equals_torch(tmp_path):
    pytest.importorskip("triton")
    _, module = _compile(tmp_path, HIERARCHY.format(dynamics="legendre"))
    torch_lay = _perturbed(module.Layer(V=4, N=3, C=2, dtype=F64, backend="torch"))
    triton_lay = module.Layer(V=4, N=3, C=2, dtype=F64, backend="triton")
    triton_lay.load_state_dict(torch_lay.state_dict())
    xs = [torch.randn(2, 2, d, dtype=F64, requires_grad=True) for d in (4, 3, 2)]
    got = triton_lay(*xs, clamp=("pixels",))
    want = torch_lay(*xs, clamp=("pixels",))
    for a, b in zip(got, want):
        assert_within_tolerance(a, b)
    ga = torch.autograd.grad(sum(y.sum() for y in got), [*xs, *triton_lay.parameters()])
    gb = torch.autograd.grad(sum(y.sum() for y in want), [*xs, *torch_lay.parameters()])
    for a, b in zip(ga, gb):
        assert_within_tolerance(a, b)


def test_the_examples_pass_every_check_and_their_traces_descend():
    for path in ("examples/energy_transformer_block.py", "examples/digits_memory.py"):
        for layer in compile_file(load(path)):
            module = import_generated(layer)
            for check in ("forward", "backward", "descent", "energy"):
                result = run_check(layer, module, check, max_examples=4)
                assert result.status == "ok", f"{layer.name} {check}: {result.error}"
    from generated.digits_memory import Layer as Digits
    from generated.energy_transformer_block import Layer as EnergyTransformer

    torch.manual_seed(0)
    et = EnergyTransformer(D=16, H=2, K=4, M=32, dtype=F64)
    trace = et.trace(torch.randn(2, 6, 16, dtype=F64))
    assert len(trace) == et.config[1] + 1
    totals = [t["total"] for t in trace]
    assert all(b <= a for a, b in zip(totals, totals[1:])), totals
    assert all(math.isclose(t["total"], t["attention"] + t["hopfield"], rel_tol=1e-12)
               for t in trace)
    am = Digits(N=32, dtype=F64)
    xs = [torch.rand(3, 1, 64, dtype=F64), torch.zeros(3, 1, 32, dtype=F64),
          torch.zeros(3, 1, 10, dtype=F64)]
    totals = [t["total"] for t in am.trace(*xs, clamp=("pixels",))]
    assert all(b <= a for a, b in zip(totals, totals[1:])), totals


def test_a_concave_lagrangian_fails_the_descent_check(tmp_path):
    """The descent check can fail: a concave Lagrangian's Hessian is negative, and a step on its
    activations raises the energy."""
    layer, module = _compile(tmp_path, TOKEN_MIXING.format(
        lagrangian="lambda x: -dot(x, x, over=D) / 2", over="all_tokens()", joint=True))
    result = run_check(layer, module, "descent", max_examples=6)
    assert result.status == "FAIL" and "raised the total energy" in result.error


def test_energies_by_term_and_the_legendre_terms(tmp_path):
    _, module = _compile(tmp_path, HIERARCHY.format(dynamics="legendre"))
    lay = _perturbed(module.Layer(V=5, N=4, C=3, dtype=F64))
    xs = [torch.randn(2, 1, d, dtype=F64) for d in (5, 4, 3)]
    values = lay.energies(*xs)
    assert set(values) == {"a", "b", "legendre_pixels", "legendre_hidden", "legendre_labels",
                           "total"}
    # the identity layer's Legendre term is x . x - x . x / 2 = |x|^2 / 2
    assert_within_tolerance(values["legendre_pixels"], (xs[0] ** 2).sum((1, 2)) / 2)
    assert_within_tolerance(values["total"], sum(v for k, v in values.items() if k != "total"))


# -- refusals ---------------------------------------------------------------------------------------

REFUSALS = {
    "per-feature gamma": ("""
        from energyc.dsl import *
        from energyc.lagrangians import layernorm
        D = dims("D")
        i, j = tokens()
        w = param("w", (D,))
        g, gbar = neurons("g", D, layernorm(gamma=w))
        """, "not symmetric"),
    "state and neurons": ("""
        from energyc.dsl import *
        from energyc.lagrangians import identity
        D = dims("D")
        x, xbar = state(D)
        g, gbar = neurons("g", D, identity())
        """, "not both"),
    "further layer at j": ("""
        from energyc.dsl import *
        from energyc.lagrangians import identity
        D, N = dims("D N")
        i, j = tokens()
        g, gbar = neurons("g", D, identity())
        h, _ = neurons("h", N, identity())
        W = param("W", (N, D))
        E = logsumexp(dot(h[j], W @ g[i], over=N), over=j <= i)
        """, "further neuron layer"),
    "lagrangian of two layers": ("""
        from energyc.dsl import *
        from energyc.lagrangians import identity
        D = dims("D")
        i, j = tokens()
        g, gbar = neurons("g", D, identity())
        h, _ = neurons("h", D, lambda x: dot(x, g[i], over=D))
        """, "its own state"),
    "lagrangian with dims left": ("""
        from energyc.dsl import *
        D = dims("D")
        i, j = tokens()
        g, gbar = neurons("g", D, lambda x: x * x)
        """, "not a scalar per token"),
    "unread layer": ("""
        from energyc.dsl import *
        from energyc.lagrangians import identity
        D, N = dims("D N")
        i, j = tokens()
        g, gbar = neurons("g", D, identity())
        h, _ = neurons("h", N, identity())
        layer("m", dot(g[i], g[i], over=D))
        """, "does not read the neuron layer h"),
    "bad dynamics": ("""
        from energyc.dsl import *
        from energyc.lagrangians import identity
        D = dims("D")
        i, j = tokens()
        g, gbar = neurons("g", D, identity())
        layer("m", dot(g[i], g[i], over=D), dynamics="hopfield")
        """, "dynamics must be one of"),
    "several layers with a preconditioner": ("""
        from energyc.dsl import *
        from energyc.lagrangians import identity
        D, N = dims("D N")
        i, j = tokens()
        g, gbar = neurons("g", D, identity())
        h, _ = neurons("h", N, identity())
        W = param("W", (N, D))
        layer("m", dot(h[i], W @ g[i], over=N), precond="diagonal")
        """, "a preconditioner acts on one state"),
    "terms on a plain layer": ("""
        from energyc.dsl import *
        D = dims("D")
        i, j = tokens()
        x, xbar = state(D)
        layer("m", {"a": dot(x[i], x[i], over=D)})
        """, "named energy terms are for neuron models"),
    "dynamics on a plain layer": ("""
        from energyc.dsl import *
        D = dims("D")
        i, j = tokens()
        x, xbar = state(D)
        layer("m", dot(x[i], x[i], over=D), dynamics="legendre")
        """, "for neuron models"),
    "bad tau": ("""
        from energyc.dsl import *
        from energyc.lagrangians import identity
        D = dims("D")
        g, gbar = neurons("g", D, identity(), tau=0)
        """, "tau must be a positive number"),
    "repu power": ("""
        from energyc.dsl import *
        from energyc.lagrangians import repu
        D = dims("D")
        g, gbar = neurons("g", D, repu(1))
        """, "repu(n)"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_name_the_line(tmp_path, case):
    source, message = REFUSALS[case]
    path = _write(tmp_path, source)
    with pytest.raises(EnergyError) as info:
        load(path)
    assert message in str(info.value)
    assert f"{path}:" in str(info.value)


def test_layer_argument_errors(tmp_path):
    _, module = _compile(tmp_path, HIERARCHY.format(dynamics="legendre"))
    with pytest.raises(ValueError, match="precond"):
        module.Layer(V=5, N=4, C=3, precond="diagonal")
    with pytest.raises(ValueError, match="no neuron layer 'pix'"):
        module.Layer(V=5, N=4, C=3, tau={"pix": 1.0})
    lay = module.Layer(V=5, N=4, C=3, dtype=F64)
    xs = [torch.randn(2, 1, d, dtype=F64) for d in (5, 4, 3)]
    with pytest.raises(TypeError, match="states of the 3 neuron layer"):
        lay(*xs[:2])
    with pytest.raises(ValueError, match="argument clamp"):
        lay(*xs, clamp=("pix",))
    with pytest.raises(ValueError, match="argument hidden"):
        lay(xs[0], torch.randn(2, 1, 5, dtype=F64), xs[2])
    with pytest.raises(ValueError, match="neuron model"):
        lay.decode(xs[0])


def test_a_further_layer_is_read_at_i_whatever_its_name(tmp_path):
    """A further layer's value reads at i, its second (context) value nowhere, by what it is,
    not by its name: a layer called "foobar" is read as foobar[i]."""
    source = """
        from energyc.dsl import *
        from energyc.lagrangians import identity, softmax
        V, N = dims("V N")
        i, j = tokens()
        v, _ = neurons("pixels", V, identity())
        h, hbar = neurons("foobar", N, softmax())
        W = param("W", (N, V))
        layer("m", -dot(h[i], W @ v[i], over=N), dynamics="legendre")
        """
    assert load(_write(tmp_path, source)).layers[0].name == "m"
    refused = source.replace("h[i], W", "hbar[i], W")
    with pytest.raises(EnergyError, match="further neuron layer"):
        load(_write(tmp_path, refused, "refused.py"))
