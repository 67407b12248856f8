"""An independent evaluation of an energy, for checking generated code against torch.autograd.

This interpreter walks the *energy* graph as declared (before differentiation and passes) with
plain torch operations, so ``torch.autograd`` can differentiate it once (the layer's forward
reference) or twice (the backward reference). It shares no code with the generated modules: masks
are built here from the context-set definitions, and SymPy bodies are evaluated through
``sympy.lambdify`` with each energyc function expanded to its defining expression.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import sympy
import torch
import torch.nn.functional as F  # noqa: N812

from energyc.compiler import CompiledLayer, _energy_subgraph
from energyc.ir.functions import expand_definitions
from energyc.ir.ops import ARG_SYMBOLS

_TORCH_MODULE = {
    "exp": torch.exp, "log": torch.log, "tanh": torch.tanh, "sinh": torch.sinh,
    "cosh": torch.cosh, "sin": torch.sin, "cos": torch.cos, "tan": torch.tan, "atan": torch.atan,
    "erf": torch.erf, "erfc": torch.erfc, "sqrt": torch.sqrt, "Abs": torch.abs, "sign": torch.sign,
    "asinh": torch.asinh, "pi": math.pi, "E": math.e,
}


def _mask(kind: tuple, T: int, device) -> torch.Tensor:
    idx = torch.arange(T, device=device)
    i, j = idx[:, None], idx[None, :]
    name = kind[0]
    if name == "causal":
        return j <= i
    if name == "strict":
        return j < i
    if name == "window":
        return (j <= i) & (i - j <= kind[1])
    if name == "not_self":
        return i != j
    return torch.ones(T, T, dtype=torch.bool, device=device)


def _align(value: torch.Tensor, axes: tuple, to: tuple) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    shape = [value.shape[axes.index(a)] if a in axes else 1 for a in to]
    return value.reshape(shape) if axes == tuple(a for a in to if a in axes) else value


def _body_fn(body: sympy.Expr, nargs: int, sizes: Mapping[str, int]):
    expanded = expand_definitions(body)
    # a smooth, autograd-friendly spelling of Piecewise/Max/Min
    expanded = expanded.replace(sympy.Max, lambda *a: _pairwise(a, "max")).replace(
        sympy.Min, lambda *a: _pairwise(a, "min"))
    subs = {sympy.Symbol(name, positive=True, integer=True): v for name, v in sizes.items()}
    expanded = expanded.xreplace({s: subs.get(s, s) for s in expanded.free_symbols
                                  if s.name in sizes})
    expanded = expanded.xreplace({s: sympy.Integer(sizes[s.name]) for s in expanded.free_symbols
                                  if s.name in sizes})
    fn = sympy.lambdify(list(ARG_SYMBOLS[:nargs]), expanded,
                        modules=[_TORCH_MODULE, {"Heaviside": _heaviside, "where": torch.where,
                                                 "select": _select, "maximum": torch.maximum,
                                                 "minimum": torch.minimum}, "math"])
    return fn


def _pairwise(args, kind):
    return sympy.Function(f"_{kind}")(*args)


def _heaviside(x, h0=0.5):
    return torch.where(x > 0, 1.0, torch.where(x < 0, 0.0, h0)).to(x.dtype)


def _select(conds, choices, default=math.nan):  # lambdify's Piecewise for numpy-like modules
    out = default
    for cond, choice in reversed(list(zip(conds, choices))):
        out = torch.where(cond, choice, out)
    return out


def evaluate_energy(
    layer: CompiledLayer,
    x: torch.Tensor,
    xbar: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    hypers: Mapping[str, float | torch.Tensor],
) -> torch.Tensor:
    """Per-token energy E_i, shape (B, T), from the declared energy graph."""
    graph, out = _energy_subgraph(layer.decl)
    B, T, _ = x.shape
    sizes = {"B": B, "T": T}
    sizes[layer.state_dim] = x.shape[-1]
    for p in layer.params:
        for d, n in zip(p.dims, params[p.name].shape):
            sizes[d] = n
    values: dict[int, torch.Tensor] = {}
    for n in graph.ids():
        node = graph.node(n)
        op = node.op
        ins = [values[u] for u in node.inputs]
        in_axes = [graph.node(u).axes for u in node.inputs]
        if op == "input":
            values[n] = x if node.attr("name") == "x" else xbar
        elif op == "param":
            decl = next(p for p in layer.params if p.name == node.attr("name"))
            perm = [decl.dims.index(a) for a in node.axes]
            values[n] = params[decl.name].permute(perm)
        elif op == "hyper":
            values[n] = torch.as_tensor(hypers[node.attr("name")], dtype=x.dtype)
        elif op == "const":
            values[n] = torch.tensor(float(node.attr("value").subs(
                {s: sizes[s.name] for s in node.attr("value").free_symbols})), dtype=x.dtype)
        elif op == "offset":
            idx = torch.arange(T, dtype=x.dtype)
            values[n] = idx[:, None] - idx[None, :]
        elif op == "relabel":
            values[n] = ins[0]  # the same tensor, axis renamed
        elif op == "contract":
            letters = {a: chr(ord("a") + k) for k, a in enumerate(("b", "i", "j", *graph.dims))}
            spec = ",".join("".join(letters[a] for a in ax) for ax in in_axes)
            spec += "->" + "".join(letters[a] for a in node.axes)
            values[n] = torch.einsum(spec, *ins)
        elif op == "pointwise":
            fn = _body_fn(node.attr("body"), len(ins), sizes)
            args = [_align(v, ax, node.axes) for v, ax in zip(ins, in_axes)]
            res = fn(*args)
            if not isinstance(res, torch.Tensor):
                res = torch.tensor(float(res), dtype=x.dtype)
            values[n] = res
        elif op == "reduce":
            (v,) = ins
            axes = in_axes[0]
            dims = [axes.index(a) for a in node.attr("axes")]
            mask = node.attr("mask")
            if mask is not None:
                m = _align(_mask(mask, T, x.device), ("i", "j"), axes)
                if node.attr("kind") == "sum":
                    values[n] = torch.where(m, v, torch.zeros_like(v)).sum(dims[0])
                else:
                    neg = torch.where(m, v, torch.full_like(v, -math.inf))
                    mx = neg.amax(dims[0], keepdim=True).detach()
                    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
                    total = torch.where(m, torch.exp(v - mx), torch.zeros_like(v)).sum(
                        dims[0], keepdim=True)
                    safe = torch.where(total > 0, total, torch.ones_like(total))
                    values[n] = torch.where(total > 0, mx + torch.log(safe),
                                            torch.zeros_like(total)).squeeze(dims[0])
            elif node.attr("kind") == "sum":
                values[n] = v.sum(dims)
            else:
                values[n] = torch.logsumexp(v, dims[0])
        else:  # pragma: no cover - the energy graph holds no other ops
            raise NotImplementedError(op)
    e = values[out]
    axes = graph.node(out).axes
    return _align(e, axes, ("b", "i")).expand(B, T)


def precondition(kind: str, g: torch.Tensor, P_diag=None, P_lowrank=None) -> torch.Tensor:  # noqa: N803
    """u = P g, written out directly."""
    if kind == "identity":
        return g
    u = F.softplus(P_diag) * g
    if kind == "dplr":
        u = u + (g @ P_lowrank) @ P_lowrank.T
    return u


def reference_step(layer: CompiledLayer, module: torch.nn.Module, x: torch.Tensor,
                   create_graph: bool) -> torch.Tensor:
    """The layer's output computed with torch.autograd on :func:`evaluate_energy`."""
    eta, steps, precond, context = module.config
    params = {p.name: getattr(module, p.name) for p in layer.params}
    hypers = {h.name: getattr(module, h.name) for h in layer.hypers}
    x0 = x
    for _ in range(steps):
        xbar = x if context == "current" else x0
        xa = x * 1.0 if create_graph else x.detach().requires_grad_(True)  # the state role only
        if not create_graph:
            xbar = xbar.detach()
        e = evaluate_energy(layer, xa, xbar, params, hypers)
        (g,) = torch.autograd.grad(e.sum(), xa, create_graph=create_graph)
        u = precondition(precond, g, module.P_diag, module.P_lowrank)
        x = x - eta * u
    return x
