"""fuse_context_attention: structure (which layers fuse, no token-pair tensors left) and numerics
of both runtime paths (CPU flash kernels and the materialised fallback)."""

import pytest
import torch

from energyc.check import import_generated
from energyc.compiler import compile_file, split
from energyc.loader import load
from energyc.passes import PIPELINE
from energyc.passes.attention import fuse_context_attention
from energyc.passes.cse import rebuild


def step_graph(path):
    return compile_file(load(path))[0].step


@pytest.mark.parametrize("path,attention,grads", [
    ("examples/cem_attention.py", 1, 3),        # j <= i, fixed beta
    ("examples/bidirectional_gelu.py", 1, 3),   # all tokens
    # joint, j != i: the query-role pass fuses (and one more region of its VJP); the key-role
    # (transposed) pass is not an attention pattern and stays materialised
    ("examples/energy_transformer.py", 2, 3),
    ("examples/window_alibi.py", 0, 0),         # learned beta and an i - j term
    ("examples/strict_dplr.py", 0, 0),          # diagonal-plus-low-rank scores
])
def test_which_layers_fuse(path, attention, grads):
    counts = step_graph(path).op_counts()
    assert counts.get("attention", 0) == attention
    assert counts.get("attention_grad", 0) == grads


def test_fused_step_has_no_token_pair_values():
    g = step_graph("examples/cem_attention.py")
    pairs = [n for n in g.live() if {"i", "j"} <= set(g.node(n).axes)]
    assert pairs == []
    sp = split(g, ["grad"], ["grad_g"])
    assert all(not {"i", "j"} <= set(g.node(n).axes) for n in sp.saved)


def test_pass_is_in_pipeline_and_idempotent():
    assert "fuse_context_attention" in [name for name, _ in PIPELINE]
    g = step_graph("examples/cem_attention.py")
    again = rebuild(fuse_context_attention(g))
    assert again.op_counts() == rebuild(g).op_counts()


def test_unfused_graph_has_the_softmax_weighted_sum():
    """Before the pass, the same layer materialises (b, i, j, H) weights; after, none remain."""
    import energyc.passes as passes
    from energyc.autodiff import vjp
    from energyc.compiler import _energy_subgraph
    from energyc.ir import ops
    from energyc.passes import run_pipeline

    layer = compile_file(load("examples/cem_attention.py"))[0]
    g, e = _energy_subgraph(layer.decl)
    x = next(n for n in g.ids() if g.node(n).op == "input" and g.node(n).attr("name") == "x")
    g.outputs = {"grad": vjp(g, e, ops.const(g, 1), [x])[x]}
    before = run_pipeline.__globals__["PIPELINE"]
    try:
        passes.PIPELINE = [p for p in before if p[0] != "fuse_context_attention"]
        unfused = passes.run_pipeline(g)
    finally:
        passes.PIPELINE = before
    assert any({"i", "j"} <= set(unfused.node(n).axes) for n in unfused.live())
    fused = fuse_context_attention(unfused)
    assert fused.op_counts().get("attention") == 1


@pytest.mark.parametrize("path", ["examples/cem_attention.py", "examples/bidirectional_gelu.py"])
def test_flash_and_fallback_paths_agree(path, monkeypatch):
    layer = compile_file(load(path))[0]
    module = import_generated(layer)
    runtime = module.layer._rt
    kwargs = {d: 4 for d in layer.dims}
    kwargs[layer.state_dim] = 6
    torch.manual_seed(0)
    lay = module.Layer(**kwargs, dtype=torch.float64)
    x = torch.randn(2, 7, 6, dtype=torch.float64, requires_grad=True)
    results = []
    for flash in (True, False):
        monkeypatch.setattr(runtime, "_flash_cpu", lambda q, flash=flash: flash)
        y = lay(x)
        grads = torch.autograd.grad((y * torch.cos(y)).sum(), [x, *lay.parameters()])
        results.append((y.detach(), grads))
    (y1, g1), (y2, g2) = results
    torch.testing.assert_close(y1, y2, rtol=1e-10, atol=1e-12)  # float64, two exact algorithms
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
