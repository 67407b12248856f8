"""A second sequence (``c = memory("c", Dm)``, read as ``c[j]`` over all its tokens), given to the
layer at call time: cross-attention of a decoder on an encoder's output and Hopfield retrieval
over patterns given at run time (examples/cross_attention.py, examples/hopfield_memory.py)
against torch.autograd of the same energies written plainly in PyTorch (float64): the forward,
the backward to x, the memory and every parameter, the energy and its gradients; the memory's
own token count (M != T), on the torch and the Triton paths (and the flash kernels alone, with
M keys for T queries); memory_lengths (padding changes no real output, padded memory tokens
get gradient 0); the fused path (attention kernels, no (tokens x memory) value); the refusals."""

from __future__ import annotations

import importlib
import textwrap

import pytest
import torch

from energyc.check import import_generated
from energyc.compiler import compile_file
from energyc.errors import EnergyError
from energyc.loader import load
from energyc.reference import evaluate_energy, module_values, reference_step
from energyc.render import render_files
from energyc.tolerances import tolerance
from tests.conftest import assert_within_tolerance

F64 = torch.float64
DIMS = {"cross_attention": dict(D=5, Dm=3, H=2, K=4), "hopfield_memory": dict(D=4)}
PATHS = {"cross_attention": "examples/cross_attention.py",
         "hopfield_memory": "examples/hopfield_memory.py"}
_COMPILED: dict = {}


def _compiled(name: str):
    if name not in _COMPILED:
        (layer,) = compile_file(load(PATHS[name]))
        _COMPILED[name] = (layer, import_generated(layer))
    return _COMPILED[name]


def _layer(name: str, **settings) -> torch.nn.Module:
    _, module = _compiled(name)
    torch.manual_seed(0)
    lay = module.Layer(**DIMS[name], dtype=F64, **settings)
    with torch.no_grad():  # away from the initial values
        for p in lay.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return lay


def _memory_dim(name: str) -> int:
    return DIMS[name].get("Dm", DIMS[name]["D"])


def _inputs(name: str, B: int = 2, T: int = 5, M: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, DIMS[name]["D"], dtype=F64, generator=g).requires_grad_(True)
    c = torch.randn(B, M, _memory_dim(name), dtype=F64, generator=g).requires_grad_(True)
    return x, c


def plain_energy(name: str, lay, x: torch.Tensor, c: torch.Tensor,
                 memory_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """E_i (B, T) written directly in PyTorch; keys m >= M_b of row b are outside the sum."""
    if name == "cross_attention":
        beta = lay.beta
        q = torch.einsum("hkd,btd->bthk", lay.W_q, x)
        k = torch.einsum("hkd,bmd->bmhk", lay.W_k, c)
        s = beta * torch.einsum("bthk,bmhk->bthm", q, k)
    else:
        beta = lay.beta
        s = (beta * torch.einsum("btd,bmd->btm", x, c))[:, :, None]
    if memory_lengths is not None:
        keep = torch.arange(c.shape[1])[None, :] < memory_lengths[:, None]  # (B, M)
        s = s.masked_fill(~keep[:, None, None, :], -torch.inf)
    e = -(torch.logsumexp(s, dim=-1) / beta).sum(-1)
    if name == "hopfield_memory":
        e = e + 0.5 * (x * x).sum(-1)
    return e


def plain_steps(name: str, lay, x: torch.Tensor, c: torch.Tensor, steps: int,
                memory_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """``steps`` times x <- x - eta dE/dx (the state role only; the memory fixed), differentiable
    (create_graph) to x, c and the parameters."""
    for _ in range(steps):
        xa = x * 1.0
        e = plain_energy(name, lay, xa, c, memory_lengths)
        (g,) = torch.autograd.grad(e.sum(), xa, create_graph=True)
        x = x - lay.config[0] * g
    return x


def _close(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    rtol, atol = tolerance(F64)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _grads(out: torch.Tensor, leaves: list[torch.Tensor], seed: int = 3):
    up = torch.randn(out.shape, dtype=F64, generator=torch.Generator().manual_seed(seed))
    up = up.to(out.dtype)
    return torch.autograd.grad(out, leaves, up)


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("name", sorted(PATHS))
def test_forward_and_backward_against_plain_pytorch(name, steps):
    """M = 7 memory tokens for T = 5 queries (and M = 2 < T): outputs, and the gradients to x,
    the memory and every parameter, equal autograd's on the
    plainly written energy; the memory is not changed (it is no output)."""
    lay = _layer(name, steps=steps)
    for M in (7, 2):
        x, c = _inputs(name, M=M)
        c0 = c.detach().clone()
        y = lay(x, memory=c)
        want = plain_steps(name, lay, x, c, steps)
        _close("output", y, want)
        assert torch.equal(c.detach(), c0)
        leaves = [x, c, *lay.parameters()]
        for what, got, ref in zip(["x", "memory", *(n for n, _ in lay.named_parameters())],
                                  _grads(y, leaves), _grads(want, leaves)):
            _close(f"gradient of {what}", got, ref)


@pytest.mark.parametrize("name", sorted(PATHS))
def test_reference_interpreter_reads_the_memory(name):
    """energyc.reference (the declared energy graph, each op's torch rule) with the memory as
    its context equals the plain energy, and its step equals the layer's."""
    layer, _ = _compiled(name)
    lay = _layer(name)
    x, c = _inputs(name)
    params, hypers = module_values(layer, lay)
    _close("energy", evaluate_energy(layer, x, c, params, hypers), plain_energy(name, lay, x, c))
    _close("step", reference_step(layer, lay, x, True, memory=c), lay(x, memory=c))


@pytest.mark.parametrize("name", sorted(PATHS))
def test_energy_and_its_gradients(name):
    """layer.energy(x, memory=c) is E(x | c) per token, and autograd through it gives the plain
    energy's gradients to x, the memory and the parameters."""
    lay = _layer(name)
    x, c = _inputs(name)
    e = lay.energy(x, memory=c, per_token=True)
    want = plain_energy(name, lay, x, c)
    _close("energy", e, want)
    leaves = [x, c, *lay.parameters()]
    for got, ref in zip(_grads(e, leaves), _grads(want, leaves)):
        _close("energy gradient", got, ref)


@pytest.mark.parametrize("name", sorted(PATHS))
def test_memory_lengths_in_the_energy(name):
    """memory_lengths=: keys m >= M_b are outside row b's sets (the energy equals the plain one
    with them masked, and equals each row alone with its memory cut at M_b); padded memory
    tokens get gradient 0; with the state's lengths too, a padded query's energy is 0."""
    lay = _layer(name)
    x, c = _inputs(name, B=3, M=6)
    ml = torch.tensor([6, 2, 4])
    e = lay.energy(x, memory=c, memory_lengths=ml, per_token=True)
    _close("energy", e, plain_energy(name, lay, x, c, ml))
    for b in range(3):
        alone = lay.energy(x[b:b + 1], memory=c[b:b + 1, :int(ml[b])], per_token=True)
        _close(f"row {b} alone", e[b:b + 1], alone)
    (gc,) = torch.autograd.grad(e.sum(), c)
    for b in range(3):
        assert torch.count_nonzero(gc[b, int(ml[b]):]) == 0
    e2 = lay.energy(x, memory=c, memory_lengths=ml, lengths=torch.tensor([5, 3, 1]),
                    per_token=True)
    assert torch.count_nonzero(e2[1, 3:]) == 0 and torch.count_nonzero(e2[2, 1:]) == 0
    _close("real tokens", e2[1, :3], e[1, :3])


@pytest.mark.parametrize("name", sorted(PATHS))
def test_memory_lengths_in_the_layer(name):
    """Padding the memory changes no real output or gradient: each row equals the row alone with
    its memory cut at M_b, and padded memory tokens get gradient 0."""
    lay = _layer(name, steps=2)
    x, c = _inputs(name, B=3, M=6)
    ml = torch.tensor([6, 2, 4])
    y = lay(x, memory=c, memory_lengths=ml)
    _close("output", y, plain_steps(name, lay, x, c, 2, ml))
    (gc,) = torch.autograd.grad(y.sum(), c)
    for b in range(3):
        _close(f"row {b} alone", y[b:b + 1], lay(x[b:b + 1], memory=c[b:b + 1, :int(ml[b])]))
        assert torch.count_nonzero(gc[b, int(ml[b]):]) == 0


def _pair_values(graph):
    """The live values of ``graph`` over both tokens (described): (tokens x memory) tensors."""
    return [graph.describe(n) for n in graph.live() if {"i", "j"} <= set(graph.node(n).axes)]


@pytest.mark.parametrize("name", sorted(PATHS))
def test_the_memory_runs_on_the_attention_kernels(name):
    """The log-sum-exp over the memory runs on the attention kernels, forward and backward: the
    step graph holds no value over (tokens x memory tokens), and nothing is left materialised."""
    layer, _ = _compiled(name)
    notes: list[str] = []
    render_files(layer, PATHS[name], notes)
    assert notes == []
    counts = layer.step.op_counts()
    assert counts.get("attention", 0) >= 1 and counts.get("attention_grad", 0) >= 1, counts
    assert not [op for op in counts if op.startswith("pair")], counts
    assert _pair_values(layer.step) == []


def test_memory_tokens_in_generated_code():
    """The step functions take the memory as their context argument and its token count as Tm;
    the package declares MEMORY; decoding is refused with a reason naming the memory."""
    module = importlib.import_module("generated.cross_attention.layer")
    source = open(module.__file__).read()
    assert "_, Tm, Dm = xbar.shape" in source
    assert module.MEMORY == ("c", "Dm")
    assert "memory" in module.DECODE_UNSUPPORTED
    lay = _layer("cross_attention")
    x, _ = _inputs("cross_attention")
    with pytest.raises(ValueError, match="memory"):
        lay.decode(x.detach())


def test_call_refusals():
    lay = _layer("cross_attention")
    x, c = _inputs("cross_attention")
    with pytest.raises(ValueError, match="reads the memory c: give it as memory="):
        lay(x)
    with pytest.raises(ValueError, match="argument memory: expected shape"):
        lay(x, memory=c[..., :2])
    with pytest.raises(ValueError, match="batch"):
        lay(x, memory=c[:1])
    with pytest.raises(ValueError, match="memory_lengths must lie in 0 .. 7"):
        lay(x, memory=c, memory_lengths=8)
    with pytest.raises(ValueError, match="give the context once"):
        lay.energy(x, c, memory=c)
    other = import_generated(compile_file(load("examples/cem_attention.py"))[0])
    plain = other.Layer(D=5, H=2, K=4, dtype=F64)
    with pytest.raises(ValueError, match="reads no memory"):
        plain(x, memory=c)
    with pytest.raises(ValueError, match="memory_lengths= given, but no memory"):
        plain(x, memory_lengths=3)


HEADER = """from energyc.dsl import *
D, Dm, K = dims("D Dm K"); i, j = tokens(); x, xbar = state(D)
c = memory("c", Dm)
W_q = param("W_q", (K, D)); W_k = param("W_k", (K, Dm)); W_x = param("W_x", (K, D))
"""
REFUSED = {
    "mixed": ("s = dot(W_q @ x[i], W_k @ c[j], over=K) + dot(W_q @ x[i], W_x @ xbar[j], over=K)\n"
              "layer('bad', logsumexp(s, over=all_tokens()))",
              5, r"reads the memory c \(at .*bad.py:5\) and the state at the context token"),
    "causal": ("layer('bad', logsumexp(dot(W_q @ x[i], W_k @ c[j], over=K), over=j <= i))",
               5, "read over all its tokens: over=all_tokens()"),
    "at_i": ("layer('bad', dot(W_q @ x[i], W_k @ c[i], over=K))",
             5, r"read at the context token: c\[j\]"),
    "distance": ("s = dot(W_q @ x[i], W_k @ c[j], over=K) + (i - j)\n"
                 "layer('bad', logsumexp(s, over=all_tokens()))",
                 5, "the token distance i - j"),
    "joint": ("layer('bad', logsumexp(dot(W_q @ x[i], W_k @ c[j], over=K), over=all_tokens()), "
              "joint=True)", 5, "not joint"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_energies_name_the_line(tmp_path, case):
    """An energy that reads a memory and the state's context tokens (or i - j), a memory over
    another set than all its tokens, a memory at the updated token, a joint memory layer: each an
    error at its file and line."""
    body, line, message = REFUSED[case]
    path = tmp_path / "bad.py"
    path.write_text(HEADER + textwrap.dedent(body) + "\n")
    with pytest.raises(EnergyError, match=message) as info:
        compile_file(load(str(path)))
    assert f"bad.py:{line}" in str(info.value)


@pytest.mark.parametrize("memory_lengths", [False, True], ids=["all", "memory_lengths"])
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
@pytest.mark.parametrize(("T", "M"), [(5, 5), (7, 3), (4, 9)], ids=["M=T", "M<T", "M>T"])
@pytest.mark.parametrize("name", sorted(PATHS))
def test_triton_path(name, T, M, dtype, memory_lengths):
    """The Triton path (under the interpreter without a GPU) with a memory of as many, fewer or
    more tokens than queries, with and without memory_lengths, equals autograd of the plainly
    written energy in float64 within ``dtype``'s tolerance: the output and the gradients to x,
    the memory and every parameter; padded memory tokens get gradient 0."""
    pytest.importorskip("triton")
    lay = _layer(name, backend="triton").to(dtype)
    ref = _layer(name)
    x, c = _inputs(name, T=T, M=M)
    ml = torch.tensor([M, max(M - 2, 1)]) if memory_lengths else None
    xd, cd = (t.detach().to(dtype).requires_grad_() for t in (x, c))
    y = lay(xd, memory=cd, memory_lengths=ml)
    want = plain_steps(name, ref, x, c, 1, ml)
    assert y.dtype == dtype
    assert_within_tolerance("output", y, want.detach(), dtype)
    names = ["x", "memory", *(n for n, _ in lay.named_parameters())]
    got = _grads(y, [xd, cd, *lay.parameters()])
    exp = _grads(want, [x, c, *ref.parameters()])
    for what, g, e in zip(names, got, exp, strict=True):
        assert_within_tolerance(f"gradient of {what}", g, e, dtype)
    if memory_lengths:
        assert torch.count_nonzero(got[1][1, int(ml[1]):]) == 0


@pytest.mark.parametrize("data", ["none", "memory_lengths", "both_lengths"])
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
@pytest.mark.parametrize(("T", "M"), [(40, 9), (9, 40)], ids=["M<T", "M>T"])
def test_triton_flash_kernels_on_a_memory(T, M, dtype, data):
    """The flash kernels with T queries and M keys across their 32-token blocks (forward, dq,
    the keys-major dk, dv and the transposed product, whose results have M rows), with the
    call's rows of a memory (memory_lengths: keys m >= M_b out of row b's sets; the state's
    lengths: padded queries read no key), against a dense masked reference in float64; empty
    rows give lse 0 and o 0, keys no query sees get gradient 0."""
    pytest.importorskip("triton")
    from energyc.runtime import triton_attention
    from energyc.runtime.rows import call_data, calling

    B, H, F, G = 2, 2, 8, 5
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(B, T, H, F, generator=gen, dtype=dtype)
    k = torch.randn(B, M, H, F, generator=gen, dtype=dtype)
    v_keys = torch.randn(B, M, H, G, generator=gen, dtype=dtype)
    g, v_queries = (torch.randn(B, T, H, G, generator=gen, dtype=dtype) for _ in range(2))
    keywords = {}
    if data != "none":
        keywords["memory_lengths"] = torch.tensor([M, M // 3])
    if data == "both_lengths":
        keywords["lengths"] = torch.tensor([T - 3, T])
    call = call_data(torch.zeros(B, T, 1), (), memory=torch.zeros(B, M, 1), **keywords)
    with calling(call):
        o, lse = triton_attention.attention_forward(q, k, v_keys, 0.4, ("all",))
        dq, dk, dv, _, _ = triton_attention.attention_backward(q, k, v_keys, 0.4, ("all",), o,
                                                               lse, g)
        o_t = triton_attention.attention_transposed(q, k, v_queries, 0.4, ("all",), lse)
    mask = torch.ones(B, T, M, dtype=torch.bool)
    if "memory_lengths" in keywords:
        mask &= torch.arange(M)[None, None, :] < keywords["memory_lengths"][:, None, None]
    if "lengths" in keywords:
        mask &= torch.arange(T)[None, :, None] < keywords["lengths"][:, None, None]
    leaves = [t.double().requires_grad_() for t in (q, k, v_keys)]
    s = 0.4 * torch.einsum("bihf,bjhf->bhij", leaves[0], leaves[1])
    s = s.masked_fill(~mask[:, None], -1e300)
    empty = ~mask[:, None].any(-1, keepdim=True)  # (B, 1, T, 1)
    p = torch.softmax(s, -1).masked_fill(empty, 0.0)
    o_ref = torch.einsum("bhij,bjhg->bihg", p, leaves[2])
    lse_ref = torch.logsumexp(s, -1).masked_fill(empty[..., 0], 0.0).transpose(1, 2)
    grads = torch.autograd.grad((o_ref * g.double()).sum(), leaves)
    o_t_ref = torch.einsum("bhij,bihg->bjhg", p, v_queries.double())
    for what, got, want, rows in zip(
            ("o", "lse", "dq", "dk", "dv", "o_t"), (o, lse, dq, dk, dv, o_t),
            (o_ref, lse_ref, *grads, o_t_ref), (T, T, T, M, M, M), strict=True):
        assert got.shape[:2] == (B, rows) and got.dtype == dtype, what
        assert_within_tolerance(what, got, want.detach(), dtype)
    empty_rows, seen = ~mask.any(-1), mask.any(1)  # (B, T), (B, M)
    assert bool((lse[empty_rows] == 0).all()) and bool((o[empty_rows] == 0).all())
    assert bool((dk[~seen] == 0).all()) and bool((dv[~seen] == 0).all())
    assert bool((o_t[~seen] == 0).all())
