"""Triton kernels of the fused context reduction (attention family), under TRITON_INTERPRET=1 on
CPU: numerics per dtype against a float64 reference, the layer against the torch backend, the
kernel count in the rendered source, and no (tokens x tokens) tensor in either backend."""

import ast
import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from energyc.tolerances import tolerance
from tests.conftest import context_data

triton = pytest.importorskip("triton")

attention_kernels = importlib.import_module("energyc.runtime.triton_attention")
attention_runtime = importlib.import_module("energyc.runtime.attention")  # torch fallback

KINDS = [("causal",), ("all",), ("strict",), ("window", 9), ("not_self",)]


def in_context(kind, T):
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    return {"causal": j <= i, "strict": j < i, "not_self": j != i, "all": (i >= 0) & (j >= 0),
            "window": (j <= i) & (j >= i - (kind[1] if len(kind) > 1 else 0))}[kind[0]]


def reference_weights(q, k, scale, kind, slopes=None):
    """P (B, H, T, T) and lse (B, H, T) in float64 for the scores scale * q_i . k_j, plus
    slopes_h * (i - j) when slopes is given; an empty context set gives P = 0, lse = 0."""
    T = q.shape[1]
    qh, kh = (t.transpose(1, 2).double() for t in (q, k))
    s = scale * (qh @ kh.transpose(-1, -2))
    if slopes is not None:
        i = torch.arange(T, dtype=torch.float64)
        s = s + slopes.double()[:, None, None] * (i[:, None] - i[None, :])
    s = s.masked_fill(~in_context(kind, T), -1e300)
    empty = ~in_context(kind, T).any(-1)[:, None]  # (T, 1)
    p = torch.softmax(s, -1).masked_fill(empty, 0.0)
    lse = torch.logsumexp(s, -1).masked_fill(empty[:, 0], 0.0)
    return p, lse


def reference(q, k, v, scale, kind, slopes=None):
    """Softmax attention over the context set in float64: o (B, T, H, G), lse (B, T, H)."""
    p, lse = reference_weights(q, k, scale, kind, slopes)
    return (p @ v.transpose(1, 2).double()).transpose(1, 2), lse.transpose(1, 2)


def reference_transposed(q, k, v, scale, kind, slopes=None):
    """The weights applied keys-major in float64: o_t[j] = sum_i P_ij v[i]."""
    p, _ = reference_weights(q, k, scale, kind, slopes)
    return (p.transpose(-1, -2) @ v.transpose(1, 2).double()).transpose(1, 2)


def _inputs(dtype, T, bias):
    torch.manual_seed(T)
    B, H, F, G = 2, 3, 8, 5
    q, k = torch.randn(B, T, H, F, dtype=dtype), torch.randn(B, T, H, F, dtype=dtype)
    v, g = torch.randn(B, T, H, G, dtype=dtype), torch.randn(B, T, H, G, dtype=dtype)
    slopes = 0.5 * torch.randn(H, dtype=dtype) if bias else None  # |lse| up to about 20 at T = 33
    return q, k, v, g, slopes


def check_against_reference(kernels, dtype, kind, T, bias, need_dscale, stat_dtype):
    """Forward and backward of ``kernels`` (the Triton module or the torch runtime) against
    autograd on the float64 reference, dscale and dslopes included."""
    q, k, v, g, slopes = _inputs(dtype, T, bias)
    scale = torch.tensor(0.4) if need_dscale else 0.4  # a python float or a 0-d tensor
    o, lse = kernels.attention_forward(q, k, v, scale, kind, slopes)
    dq, dk, dv, dscale, dslopes = kernels.attention_backward(
        q, k, v, scale, kind, o, lse, g, slopes=slopes, need_dscale=need_dscale
    )
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    scale_leaf = torch.tensor(float(scale), dtype=torch.float64, requires_grad=True)
    slopes_leaf = slopes.double().requires_grad_() if bias else None
    ro, rl = reference(*leaves, scale_leaf, kind, slopes_leaf)
    wrt = leaves + [scale_leaf] + ([slopes_leaf] if bias else [])
    expected = [ro, rl, *torch.autograd.grad((ro * g.double()).sum(), wrt)]
    rtol, atol = tolerance(dtype)
    for name, got, want in zip(("o", "lse", "dq", "dk", "dv"), (o, lse, dq, dk, dv), expected):
        torch.testing.assert_close(got.double(), want.detach(), rtol=rtol, atol=atol, msg=name)
    # dscale and dslopes weight each dS_ij by q_i . k_j and by i - j: their tolerances scale with
    # the largest weight (the rounding of the saved o, which is in q's dtype, reaches them
    # multiplied by it; with the table's atol alone, bf16 dslopes at T = 33 fail by up to 4x)
    if need_dscale:
        assert dscale.shape == () and dscale.dtype == stat_dtype
        qk = q.double().transpose(1, 2) @ k.double().transpose(1, 2).mT
        torch.testing.assert_close(dscale.double(), expected[5].detach(), rtol=rtol,
                                   atol=atol * max(1.0, qk.abs().max().item()), msg="dscale")
    else:
        assert dscale is None
    if bias:
        assert dslopes.shape == slopes.shape and dslopes.dtype == stat_dtype
        torch.testing.assert_close(dslopes.double(), expected[6].detach(), rtol=rtol,
                                   atol=atol * max(1, T - 1), msg="dslopes")
    else:
        assert dslopes is None


def check_transposed(kernels, dtype, kind, T, bias):
    """attention_transposed, from the saved lse of attention_forward, against the float64
    reference."""
    q, k, v, _, slopes = _inputs(dtype, T, bias)
    _, lse = kernels.attention_forward(q, k, v, 0.4, kind, slopes)
    o_t = kernels.attention_transposed(q, k, v, 0.4, kind, lse, slopes=slopes)
    assert o_t.shape == v.shape and o_t.dtype == dtype
    rtol, atol = tolerance(dtype)
    want = reference_transposed(q, k, v, 0.4, kind, slopes)
    torch.testing.assert_close(o_t.double(), want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("need_dscale", [False, True], ids=["no_dscale", "dscale"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", KINDS, ids=str)
@pytest.mark.parametrize("T", [1, 7, 33])  # below, between and past the 32-token blocks
def test_kernels_against_float64_reference(dtype, kind, T, bias, need_dscale):
    check_against_reference(attention_kernels, dtype, kind, T, bias, need_dscale, torch.float32)


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", KINDS, ids=str)
@pytest.mark.parametrize("T", [1, 7, 33])
def test_transposed_kernel_against_float64_reference(dtype, kind, T, bias):
    check_transposed(attention_kernels, dtype, kind, T, bias)


@pytest.mark.parametrize("need_dscale", [False, True], ids=["no_dscale", "dscale"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=str)
@pytest.mark.parametrize("kind", KINDS, ids=str)
@pytest.mark.parametrize("T", [1, 7, 33])
@pytest.mark.parametrize("chunk", [256, 5], ids=["one_chunk", "chunks_of_5"])
def test_torch_runtime_against_float64_reference(dtype, kind, T, bias, need_dscale, chunk,
                                                 monkeypatch):
    """The pure-torch fallback: the CPU flash kernels without bias and dscale, else the scores
    formed a chunk of queries at a time (one chunk, or several with a ragged last one)."""
    monkeypatch.setattr(attention_runtime, "QUERY_CHUNK", chunk)
    stat_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    check_against_reference(attention_runtime, dtype, kind, T, bias, need_dscale, stat_dtype)
    check_transposed(attention_runtime, dtype, kind, T, bias)


def test_layer_triton_matches_torch_backend():
    """fp32 layer on the Triton kernels vs the torch backend, both against a float64 run: the
    Triton error may be at most twice the torch fp32 path's own error (plus the table's atol)."""
    from generated.cem_attention import Layer

    torch.manual_seed(0)
    base = Layer(D=16, H=2, K=8, steps=2)
    x = torch.randn(2, 37, 16)
    runs = {}
    for name, backend, dtype in (("exact", "torch", torch.float64), ("torch", "torch", torch.float32),
                                 ("triton", "triton", torch.float32)):
        layer = Layer(D=16, H=2, K=8, steps=2, backend=backend, dtype=dtype)
        layer.load_state_dict({k: v.to(dtype) for k, v in base.state_dict().items()})
        xx = x.to(dtype).requires_grad_()
        y = layer(xx)
        grads = torch.autograd.grad((y * torch.sin(y)).sum(), [xx, layer.W_q, layer.W_k])
        runs[name] = [t.detach().double() for t in (y, *grads)]
    _, atol = tolerance(torch.float32)
    for exact, ours, theirs in zip(runs["exact"], runs["triton"], runs["torch"]):
        err_triton = (ours - exact).abs().max().item()
        err_torch = (theirs - exact).abs().max().item()
        assert err_triton <= 2 * err_torch + atol, (err_triton, err_torch)


def test_auto_backend_uses_torch_on_cpu():
    from generated.cem_attention import Layer, layer

    path, kernels = layer._rt.implementation("auto", torch.zeros(1), "generated.cem_attention")
    assert path is layer and kernels is layer._rt.attention
    with pytest.raises(ValueError, match="argument backend"):
        Layer(D=8, H=2, K=4, backend="cuda")


class _Shapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        return out


SIZES = dict(D=16, H=2, K=8)
ATTENTION_LAYERS = {  # every attention-type example; its sizes
    "cem_attention": SIZES, "lm_attention_nope": SIZES, "lm_attention_rope": SIZES,
    "bidirectional_gelu": dict(SIZES, M=12), "energy_transformer": SIZES, "window_alibi": SIZES,
    "strict_dplr": SIZES, "lm_attention_alibi": SIZES, "lm_attention_nope_dplr": SIZES,
    "lm_attention_rope_dplr": SIZES, "lm_attention_alibi_dplr": SIZES,
    "local_global_attention": dict(SIZES, G=2),
    # over (j <= i) & same_document(), called with per-row document ids (conftest.context_data)
    **{f"lm_attention_{p}_documents": SIZES for p in ("nope", "rope", "alibi", "nope_dplr",
                                                       "rope_dplr", "alibi_dplr")},
    # a memory of as many tokens as x (37: a (tokens x memory) value shows as two 37s)
    "cross_attention": dict(SIZES, Dm=12), "hopfield_memory": dict(D=16),
}
CONTEXT_LAYERS = {  # every example with a reduction over a context set: the above and pair ops
    **ATTENTION_LAYERS,
    "softcap_attention": SIZES, "sigmoid_attention": SIZES, "head_temperature_attention": SIZES,
    "grouped_query_attention": dict(D=16, G=2, R=2, K=8), "causal_meanfield": dict(D=16, M=8),
}
def _token_pair_shapes(name, backend, chunk=None):
    """Shapes with two token axes (T = 37) created by the layer's forward and backward; ``chunk``
    sets the torch runtime's QUERY_CHUNK and the masked flash blocks' BLOCK (their scores and mask
    tiles are (chunk, T) blocks)."""
    Layer = importlib.import_module(f"generated.{name}").Layer
    runtime = importlib.import_module("energyc.runtime.attention")
    flash_cpu = importlib.import_module("energyc.runtime.flash_cpu")
    pairs = importlib.import_module("energyc.runtime.pairs")
    saved = runtime.QUERY_CHUNK, flash_cpu.BLOCK, pairs.BLOCK_Q, pairs.BLOCK_K
    if chunk:  # pair tiles of chunk x chunk too
        runtime.QUERY_CHUNK = flash_cpu.BLOCK = pairs.BLOCK_Q = pairs.BLOCK_K = chunk
    torch.manual_seed(0)
    layer = Layer(**CONTEXT_LAYERS[name], precond="dplr", backend=backend)
    x = torch.randn(2, 37, 16, requires_grad=True)
    call = context_data(name, 2, 37)  # the documents its sets read
    if layer._declared.memory is not None:
        call["memory"] = torch.randn(2, 37, getattr(layer, layer._declared.memory[1]))
    try:
        with _Shapes() as mode:
            y = layer(x, **call)
            torch.autograd.grad(y.sum(), [x, *layer.parameters()])
    finally:
        runtime.QUERY_CHUNK, flash_cpu.BLOCK, pairs.BLOCK_Q, pairs.BLOCK_K = saved
    assert mode.shapes, "the dispatch mode saw no op"
    return [(f, s) for f, s in mode.shapes if s.count(37) >= 2]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", sorted(CONTEXT_LAYERS))
def test_no_token_pair_tensor(backend, name):
    """T = 37 is distinct from every other size, so a (T x T) tensor shows as two 37s. Forward,
    backward, all parameters (learned scales and slopes included), DPLR preconditioner. The torch
    backend runs the CPU flash kernels where they serve, else its chunked fallback, and pair ops
    on tiles (blocks and tiles of 16 here, so that 37 tokens take several)."""
    assert _token_pair_shapes(name, backend, chunk=16) == []


@pytest.mark.parametrize("name", sorted(set(CONTEXT_LAYERS) - set(ATTENTION_LAYERS)))
def test_no_token_pair_tensor_inside_the_pair_launches(monkeypatch, name):
    """The probe above sees a custom op's outputs, not what its implementation makes; here the
    pair kernels' launches run as plain functions, so every tensor the launcher makes (its
    views of the operands, the outputs) is seen too: none has two token axes."""
    triton_pairs = importlib.import_module("energyc.runtime.triton_pairs")
    monkeypatch.setattr(triton_pairs, "_pairs_op", triton_pairs._pairs_op._init_fn)
    assert _token_pair_shapes(name, "triton", chunk=16) == []


def test_the_launch_probe_sees_a_token_pair_view(monkeypatch):
    """It can fail: a launcher that broadcasts a row extra to (T, T) is seen."""
    triton_pairs = importlib.import_module("energyc.runtime.triton_pairs")
    monkeypatch.setattr(triton_pairs, "_pairs_op", triton_pairs._pairs_op._init_fn)
    real = triton_pairs._strides
    monkeypatch.setattr(triton_pairs, "_strides", lambda t, shape: real(t.expand(shape), shape))
    assert _token_pair_shapes("softcap_attention", "triton", chunk=16)


def test_one_pair_tile_does_create_token_pairs():
    """The probe sees the (T x T) tile of a pair op where one tile holds every pair (the default
    128 x 128 at 37 tokens): the soft-capped scores."""
    assert _token_pair_shapes("softcap_attention", "torch")


def test_one_chunk_fallback_does_create_token_pairs():
    """The same probe sees (T x T) values where one block holds every query (the default 256 at
    37 tokens): here the mask tiles of the masked CPU flash blocks (a window context set with an
    i - j bias)."""
    assert _token_pair_shapes("window_alibi", "torch")


def test_flash_kernels_are_in_the_runtime_only():
    """One set of flash kernels, in energyc.runtime.triton_attention; the attention packages'
    Triton paths name that module as their kernels, and no package carries a copy."""
    import os

    path = attention_kernels.__file__
    tree = ast.parse(open(path).read())
    jitted = [f.name for f in tree.body if isinstance(f, ast.FunctionDef)
              and any("jit" in ast.unparse(d) for d in f.decorator_list)]
    kernels = [n for n in jitted if n.startswith("_attention_")]
    assert kernels == ["_attention_fwd", "_attention_bwd_preprocess", "_attention_bwd_dkdv",
                       "_attention_bwd_dq"]
    for name in ATTENTION_LAYERS:
        path = importlib.import_module(f"generated.{name}._triton_layer")
        assert path.KERNELS is attention_kernels, name
    for package in os.listdir("generated"):
        if os.path.isdir(os.path.join("generated", package)):
            assert not os.path.exists(os.path.join("generated", package, "_triton_attention.py"))
            assert not os.path.exists(os.path.join("generated", package, "_runtime.py"))


@pytest.mark.gpu
def test_cuda_triton_matches_torch():
    from generated.cem_attention import Layer

    torch.manual_seed(0)
    a = Layer(D=64, H=4, K=16, backend="torch", device="cuda")
    b = Layer(D=64, H=4, K=16, backend="triton", device="cuda")
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 300, 64, device="cuda")
    rtol, atol = tolerance(torch.float32)
    torch.testing.assert_close(b(x), a(x), rtol=rtol, atol=atol)
