"""The Triton path of every example layer, under TRITON_INTERPRET=1 on CPU.

* numerics: forward and backward (x and every parameter) in float32, bfloat16 and float16 against
  torch.autograd run on the independent reference interpreter in float64 (energyc.reference), with
  the dtype's tolerances from energyc.tolerances;
* structure: the launches of each generated _triton_layer.py, counted from its source, are one per
  element-wise or reduction node of the compiled graphs, of kernels written once each (no two
  alike); and the fusion passes are what brings the launches down (compiled with and without
  each pass).
"""

from __future__ import annotations

import ast
import importlib
import os

import pytest
import torch

from energyc.backends import TRITON
from energyc.check import Case, build, memory_of
from energyc.compiler import compile_file
from energyc.loader import load
from energyc.reference import reference_step
from tests.conftest import assert_within_tolerance, context_data, example_files, neuron_reference

pytest.importorskip("triton")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _layers():
    out = []
    for path in example_files():
        for layer in compile_file(load(path)):
            out.append(layer)
    return out


LAYERS = _layers()
IDS = [layer.name for layer in LAYERS]


def _case(layer, tokens: int = 7) -> Case:
    dims = {d: (4 if d in layer.even_dims else 3) for d in layer.dims}
    hypers = {}
    for h in layer.hypers:
        d = h.default
        hypers[h.name] = 1.0 if d is None else float(d.subs({s: dims[s.name] for s in d.free_symbols}))
    return Case(dims=dims, batch=2, tokens=tokens, seed=0, scale=0.7, hypers=hypers, eta=0.5,
                steps=layer.decl.steps, precond="dplr", context=layer.decl.context,
                memory_tokens=tokens if layer.memory else 0)  # Triton: as many keys as queries


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def step_and_grads(layer, module, dtype, device, tokens: int = 7, backend: str = "triton"):
    """One descent step (preconditioned, DPLR) and its backward (x and every parameter) of
    ``module``'s layer on ``backend``, and the same from torch.autograd on the float64 reference
    interpreter: ``(names, got, expected)``, got in float64 on the CPU."""
    case = _case(layer, tokens)
    if layer.neurons:
        return _neurons_step_and_grads(layer, module, case, dtype, device, backend)
    exact, x = build(layer, module, case)  # float64 parameters and input
    # the reference starts from the same inputs as the layer (rounded to dtype), so the comparison
    # measures the layer's arithmetic, not the rounding of its inputs
    exact.load_state_dict({k: v.to(dtype).double() for k, v in exact.state_dict().items()})
    x = x.to(dtype).double().requires_grad_()
    c = memory_of(layer, case)  # a layer that reads a memory: its memory
    c = None if c is None else c.to(dtype).double().requires_grad_()
    memory = [] if c is None else [c]
    w = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(1))
    data = context_data(module.Layer, case.batch, case.tokens)
    y = reference_step(layer, exact, x, create_graph=True, memory=c, **data)
    expected = [y, *torch.autograd.grad((y * w).sum(), [x, *memory, *exact.parameters()],
                                        allow_unused=True)]

    lay = module.Layer(**case.dims, **case.hypers, eta=case.eta, steps=case.steps,
                       precond=case.precond, precond_rank=2, context=case.context,
                       backend=backend, dtype=dtype, device=device)
    lay.load_state_dict({k: v.to(dtype) for k, v in exact.state_dict().items()})
    xt = x.detach().to(device, dtype).requires_grad_()
    ct = [m.detach().to(device, dtype).requires_grad_() for m in memory]
    yt = lay(xt, **dict(zip(["memory"], ct)), **{k: v.to(device) for k, v in data.items()})
    got = [yt, *torch.autograd.grad((yt * w.to(device, dtype)).sum(),
                                    [xt, *ct, *lay.parameters()], allow_unused=True)]
    got = [None if t is None else t.detach().cpu().double() for t in got]
    names = ["forward", "d/dx", *["d/dmemory"] * len(ct),
             *(f"d/d{n}" for n, _ in lay.named_parameters())]
    return names, got, [None if t is None else t.detach() for t in expected]


def _neurons_step_and_grads(layer, module, case: Case, dtype, device, backend: str):
    """``step_and_grads`` of a neuron model: its dynamics (DPLR where it has one layer) and their
    backward to every state and parameter, against ``reference_neurons`` in float64. In float16
    and bfloat16 one step (as most examples): over the Energy Transformer's twelve, the
    half-precision backward drifts beyond the dtype's tolerance (test_autocast says how far)."""
    case.precond = "dplr" if len(layer.states) == 1 else "identity"
    case.eta = layer.decl.eta
    if dtype != torch.float32:
        case.steps = 1
    exact, xs, ws, expected = neuron_reference(layer, module, case, dtype)
    lay = module.Layer(**case.dims, **case.hypers, eta=case.eta, steps=case.steps,
                       precond=case.precond, precond_rank=2, context=case.context,
                       backend=backend, dtype=dtype, device=device)
    lay.load_state_dict({k: v.to(dtype) for k, v in exact.state_dict().items()})
    xt = [x.detach().to(device, dtype).requires_grad_() for x in xs]
    yt = lay(*xt)
    yt = list(yt) if isinstance(yt, tuple) else [yt]
    loss = sum((y * w.to(device, dtype)).sum() for y, w in zip(yt, ws))
    got = [*yt, *torch.autograd.grad(loss, [*xt, *lay.parameters()], allow_unused=True)]
    got = [None if t is None else t.detach().cpu().double() for t in got]
    names = [*lay.neurons, *(f"d/d{n}" for n in lay.neurons),
             *(f"d/d{n}" for n, _ in lay.named_parameters())]
    return names, got, [None if t is None else t.detach() for t in expected]


def check_triton_path(layer, module, dtype, device, tokens: int = 7) -> None:
    """The Triton path of ``module`` against the float64 reference (``step_and_grads``), with
    the dtype's tolerances."""
    for name, a, b in zip(*step_and_grads(layer, module, dtype, device, tokens)):
        if b is None:
            assert a is None or not a.any(), name
            continue
        assert_within_tolerance(name, a, b, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layer", LAYERS, ids=IDS)
def test_triton_path_against_autograd_reference(layer, dtype, device):
    """Each example's Triton path (on CPU under the interpreter; with the gpu marker, compiled
    for CUDA)."""
    check_triton_path(layer, importlib.import_module(f"generated.{layer.name}"), dtype, device)


# -- structure: kernels counted from the rendered source --------------------------------------------


def _source(package: str) -> str:
    return open(os.path.join("generated", package, "_triton_layer.py"), encoding="utf-8").read()


def _kernels_and_launches(package: str) -> tuple[list[str], list[str]]:
    """The module's kernels (its ``@triton.jit`` functions but the pair kernels' tile functions,
    which kernels call) and the kernels its step functions launch."""
    tree = ast.parse(_source(package))
    kernels = [f.name for f in tree.body if isinstance(f, ast.FunctionDef)
               and any(ast.unparse(d) == "triton.jit" for d in f.decorator_list)
               and not f.name.endswith("_tile")]
    launches = [call.args[0].value for call in ast.walk(tree) if isinstance(call, ast.Call)
                and isinstance(call.func, ast.Name)
                and call.func.id in ("_pointwise", "_reduction", "_pairs")
                and isinstance(call.args[0], ast.Constant)]
    return kernels, launches


def _tile_functions(package: str) -> dict[str, list[str]]:
    """Each tile function of the module with the functions that call it."""
    tree = ast.parse(_source(package))
    tiles = {f.name: [] for f in tree.body if isinstance(f, ast.FunctionDef)
             and f.name.endswith("_tile")}
    for f in tree.body:
        if isinstance(f, ast.FunctionDef):
            for call in ast.walk(f):
                if isinstance(call, ast.Call) and getattr(call.func, "id", None) in tiles:
                    tiles[call.func.id].append(f.name)
    return tiles


def _fusable_nodes(layer) -> int:
    """Element-wise nodes with axes and reductions in the printed step functions (a neuron
    model's activation functions, from its Lagrangian's step graph, included)."""
    graphs = [layer.step] + ([layer.lagrangian_step] if layer.neurons else [])
    return sum(1 for graph in graphs for n in graph.live()
               if graph.node(n).op in ("reduce", "fused_reduce")
               or (graph.node(n).op == "pointwise" and graph.node(n).axes))


def _kernel_bodies(package: str) -> list[str]:
    """Each kernel's signature and body (docstring left out), its own name elided."""
    tree = ast.parse(_source(package))
    out = []
    for f in tree.body:
        if isinstance(f, ast.FunctionDef) and any("triton.jit" in ast.unparse(d)
                                                  for d in f.decorator_list):
            body = f.body[1:] if isinstance(f.body[0], ast.Expr) else f.body
            text = ast.unparse(f.args) + "\n" + "\n".join(ast.unparse(s) for s in body)
            out.append(text.replace(f.name.removesuffix("_tile"), "NAME"))
    return out


@pytest.mark.parametrize("layer", LAYERS, ids=IDS)
def test_one_launch_per_fused_node_each_kernel_once(layer):
    """Each element-wise or reduction node is one launch; kernels that would be alike are one."""
    kernels, launches = _kernels_and_launches(layer.name)
    assert kernels, "no kernel generated"
    assert set(launches) == set(kernels)  # every kernel launched, nothing else launched
    pair = [k for k in kernels if "_pairs" in k]
    assert len([k for k in launches if k not in pair]) == _fusable_nodes(layer)
    bodies = _kernel_bodies(layer.name)
    assert len(set(bodies)) == len(bodies)  # no kernel repeats another's signature and body
    assert all(k.startswith(f"_{layer.name}_") for k in kernels)
    # every pair kernel calls its own tile function, which nothing else calls
    assert _tile_functions(layer.name) == {f"{k}_tile": [k] for k in pair}
    # every pass over pairs is a kernel: no pair op is left to torch's tiles
    assert "_rt.pair_" not in _source(layer.name)
    assert bool(pair) == bool({"pair_lse", "pair_sum"} & set(layer.step.op_counts()))
    spec = TRITON.lower(layer, "examples/x.py")
    assert len(spec.kernels) == len(kernels)
    assert sum(spec.launches.values()) == len(launches)


# Launch counts of three layers, read off the rendered modules when the passes were written; a
# change in the passes that changes them should be looked at (and the numbers updated with a
# reason). (The preconditioners' 7 element-wise and 2 reduction launches left with the
# preconditioners, for the runtime's torch functions, energyc.runtime.precond.) Then the distinct
# kernels they launch: the backward repeats the forward's negation.
EXPECTED_LAUNCHES = {
    "cem_mlp": {"pointwise": 5},
    "cem_attention": {"pointwise": 4},
    # forward: R and the sums over keys in one pass; backward: one pass over pairs, as a
    # queries-major kernel (dq) and a keys-major one (dk and the value term)
    "softcap_attention": {"pair": 3, "pointwise": 5, "reduction": 1},
}
EXPECTED_KERNELS = {
    "cem_mlp": {"pointwise": 4},
    "cem_attention": {"pointwise": 3},
    "softcap_attention": {"pair": 3, "pointwise": 4, "reduction": 1},
}


@pytest.mark.parametrize("name", sorted(EXPECTED_KERNELS))
def test_kernel_counts_per_family(name):
    layer = next(la for la in LAYERS if la.name == name)
    spec = TRITON.lower(layer, "examples/x.py")
    assert spec.launches == EXPECTED_LAUNCHES[name]
    assert spec.counts == EXPECTED_KERNELS[name]


def _counts_without(monkeypatch, path: str, skip: str) -> dict[str, int]:
    import energyc.passes as passes

    pipeline = [(n, f) for n, f in passes.PIPELINE if f.__name__ != skip]
    assert len(pipeline) < len(passes.PIPELINE)
    monkeypatch.setattr(passes, "PIPELINE", pipeline)
    (layer,) = [la for la in compile_file(load(path))][:1]
    monkeypatch.undo()
    return TRITON.lower(layer, path).launches


@pytest.mark.parametrize("path", ["examples/cem_mlp.py", "examples/hopfield.py",
                                  "examples/recurrent_mlp.py"])
def test_fuse_pointwise_removes_launches(monkeypatch, path):
    """Without fuse_pointwise each element-wise op of a chain is its own launch."""
    (layer,) = compile_file(load(path))[:1]
    fused = TRITON.lower(layer, path).launches
    unfused = _counts_without(monkeypatch, path, "fuse_pointwise")
    assert sum(fused.values()) < sum(unfused.values())


@pytest.mark.parametrize("path", ["examples/strict_dplr.py", "examples/hopfield.py",
                                  "examples/causal_meanfield.py"])
def test_fuse_reductions_removes_launches(monkeypatch, path):
    """Without fuse_reductions the work before and after each reduction is separate launches."""
    (layer,) = compile_file(load(path))[:1]
    fused = TRITON.lower(layer, path).launches
    unfused = _counts_without(monkeypatch, path, "fuse_reductions")
    assert fused.get("pointwise", 0) < unfused.get("pointwise", 0)
    assert sum(fused.values()) < sum(unfused.values())
