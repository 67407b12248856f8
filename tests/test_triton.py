"""Triton kernels of the fused context reduction (attention family), under TRITON_INTERPRET=1 on
CPU: numerics per dtype against a float64 reference, the layer against the torch backend, the
kernel count in the rendered source, and no (tokens x tokens) tensor in either backend."""

import ast
import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from energyc.tolerances import tolerance

triton = pytest.importorskip("triton")

attention_kernels = importlib.import_module("generated.cem_attention._triton_attention")


def in_context(kind, T):
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    return {"causal": j <= i, "strict": j < i, "not_self": j != i, "all": (i >= 0) & (j >= 0),
            "window": (j <= i) & (j >= i - (kind[1] if len(kind) > 1 else 0))}[kind[0]]


def reference(q, k, v, scale, kind):
    """Softmax attention over the context set in float64; an empty set gives o = 0, lse = 0."""
    qh, kh, vh = (t.transpose(1, 2).double() for t in (q, k, v))
    s = (scale * (qh @ kh.transpose(-1, -2))).masked_fill(~in_context(kind, q.shape[1]), -1e300)
    empty = ~in_context(kind, q.shape[1]).any(-1)[:, None]  # (T, 1)
    p = torch.softmax(s, -1).masked_fill(empty, 0.0)
    lse = torch.logsumexp(s, -1).masked_fill(empty[:, 0], 0.0)
    return (p @ vh).transpose(1, 2), lse.transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", [("causal",), ("all",), ("strict",), ("window", 9),
                                  ("not_self",)], ids=str)
@pytest.mark.parametrize("T", [1, 7, 33])  # below, between and past the 32-token blocks
def test_kernels_against_float64_reference(dtype, kind, T):
    torch.manual_seed(T)
    B, H, F, G = 2, 3, 8, 5
    q, k = torch.randn(B, T, H, F, dtype=dtype), torch.randn(B, T, H, F, dtype=dtype)
    v, g = torch.randn(B, T, H, G, dtype=dtype), torch.randn(B, T, H, G, dtype=dtype)
    o, lse = attention_kernels.attention_forward(q, k, v, 0.4, kind)
    dq, dk, dv = attention_kernels.attention_backward(q, k, v, 0.4, kind, o, lse, g)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ro, rl = reference(*leaves, 0.4, kind)
    expected = [ro, rl, *torch.autograd.grad((ro * g.double()).sum(), leaves)]
    rtol, atol = tolerance(dtype)
    for name, got, want in zip(("o", "lse", "dq", "dk", "dv"), (o, lse, dq, dk, dv), expected):
        torch.testing.assert_close(got.double(), want.detach(), rtol=rtol, atol=atol, msg=name)


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
    assert path is layer and kernels is layer._rt
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


FUSED_ATTENTION_LAYERS = {
    "cem_attention": dict(D=16, H=2, K=8),
    "lm_attention_nope": dict(D=16, H=2, K=8),
    "lm_attention_rope": dict(D=16, H=2, K=8),
    "bidirectional_gelu": dict(D=16, H=2, K=8, M=12),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", sorted(FUSED_ATTENTION_LAYERS))
def test_no_token_pair_tensor(backend, name):
    """T = 37 is distinct from every other size, so a (T x T) tensor shows as two 37s. Forward,
    backward, all parameters, DPLR preconditioner."""
    Layer = importlib.import_module(f"generated.{name}").Layer
    layer = Layer(**FUSED_ATTENTION_LAYERS[name], precond="dplr", backend=backend)
    x = torch.randn(2, 37, 16, requires_grad=True)
    with _Shapes() as mode:
        y = layer(x)
        torch.autograd.grad(y.sum(), [x, *layer.parameters()])
    assert mode.shapes, "the dispatch mode saw no op"
    pairs = [(f, s) for f, s in mode.shapes if s.count(37) >= 2]
    assert pairs == []


def test_materialised_layer_does_create_token_pairs():
    """The same probe sees the (T x T) scores of a layer the fusion does not cover."""
    from generated.window_alibi import Layer

    layer = Layer(D=16, H=2, K=8)
    x = torch.randn(2, 37, 16, requires_grad=True)
    with _Shapes() as mode:
        layer(x).sum().backward()
    assert any(s.count(37) >= 2 for _, s in mode.shapes)


def test_kernel_count_in_rendered_source():
    import generated.cem_attention as pkg

    path = pkg.__path__[0] + "/_triton_attention.py"
    tree = ast.parse(open(path).read())
    jitted = [f.name for f in tree.body if isinstance(f, ast.FunctionDef)
              and any("jit" in ast.unparse(d) for d in f.decorator_list)]
    kernels = [n for n in jitted if n.startswith("_cem_attention_")]
    assert kernels == ["_cem_attention_fwd", "_cem_attention_bwd_preprocess",
                       "_cem_attention_bwd_dkdv", "_cem_attention_bwd_dq"]
    import os

    import generated.cem_mlp as mlp

    assert not os.path.exists(os.path.join(mlp.__path__[0], "_triton_attention.py"))


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
