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
from energyc.context import Context
from energyc.ir.functions import EnergyFunction, sigmoid, softplus
from energyc.ir.ops import ARG_SYMBOLS

_UNARY = {
    sympy.exp: torch.exp, sympy.log: torch.log, sympy.tanh: torch.tanh, sympy.sinh: torch.sinh,
    sympy.cosh: torch.cosh, sympy.sin: torch.sin, sympy.cos: torch.cos, sympy.tan: torch.tan,
    sympy.atan: torch.atan, sympy.erf: torch.erf, sympy.erfc: torch.erfc, sympy.Abs: torch.abs,
    sympy.sign: torch.sign, sympy.asinh: torch.asinh,
}


# sigmoid and softplus by torch's own functions, not their definitions: autograd of
# 1 / (1 + exp(-u)) or log(1 + exp(u)) squares exp(|u|) in the second derivative, which overflows
# for |u| > 355 in float64 (and 44 in float32) and turned a second derivative of ~0 into ~1
# (sigmoid_attention after a large step: the reference's backward 8.8e4 off, the layer's right).
# softplus is linear past its threshold: 40, where its second derivative, e^-40 = 4e-18, is below
# float64's resolution (the default 20 drops 2e-9). They are what a user's autograd layer calls,
# so the benchmark's autograd variant is no slower than theirs.
_STABLE = {
    sigmoid: torch.sigmoid,
    softplus: lambda u: F.softplus(u, threshold=40.0),
}


def _evaluate(expr: sympy.Basic, env: Mapping[str, torch.Tensor], dtype) -> torch.Tensor:
    """Evaluate a SymPy expression on tensors, recursively (EnergyFunctions expanded first, but
    for those with a stable torch form, _STABLE)."""
    def ev(e):
        if e.is_Symbol:
            return env[e.name]
        if type(e) in _STABLE:
            return _STABLE[type(e)](ev(e.args[0]))
        if e.is_Number or e in (sympy.pi, sympy.E):
            return torch.tensor(float(e), dtype=dtype)
        if e.is_Add:
            out = ev(e.args[0])
            for a in e.args[1:]:
                out = out + ev(a)
            return out
        if e.is_Mul:
            out = ev(e.args[0])
            for a in e.args[1:]:
                out = out * ev(a)
            return out
        if e.is_Pow:
            base, expo = e.args
            if expo.is_Integer:
                return ev(base) ** int(expo)
            return ev(base) ** ev(expo)
        if e.func in _UNARY:
            return _UNARY[e.func](ev(e.args[0]))
        if isinstance(e, sympy.Piecewise):
            out = torch.tensor(math.nan, dtype=dtype)
            for value, cond in reversed(e.args):
                out = ev(value) if cond == sympy.true else torch.where(ev(cond), ev(value), out)
            return out
        if isinstance(e, sympy.Heaviside):
            v = ev(e.args[0])
            h0 = float(e.args[1]) if len(e.args) > 1 else 0.5
            return torch.where(v > 0, 1.0, torch.where(v < 0, 0.0, h0)).to(dtype)
        if isinstance(e, (sympy.Max, sympy.Min)):
            fn = torch.maximum if isinstance(e, sympy.Max) else torch.minimum
            vals = [ev(a) for a in e.args]
            out = vals[0]
            for v in vals[1:]:
                out = fn(*torch.broadcast_tensors(out, v))
            return out
        if isinstance(e, sympy.core.relational.Relational):
            a, b = ev(e.lhs), ev(e.rhs)
            return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b, "==": a == b,
                    "!=": a != b}[e.rel_op]
        if isinstance(e, sympy.And):
            out = ev(e.args[0])
            for a in e.args[1:]:
                out = out & ev(a)
            return out
        raise NotImplementedError(f"reference evaluator: {e.func}")

    expanded = expr.replace(lambda e: isinstance(e, EnergyFunction) and type(e) not in _STABLE,
                            lambda e: type(e).definition(e.args[0]))
    return ev(expanded)


def _mask(ctx: Context, T: int, device) -> torch.Tensor:
    """(T, T): j in C(i), dense."""
    idx = torch.arange(T, device=device)
    return ctx.contains(idx[:, None], idx[None, :])


def _align(value: torch.Tensor, axes: tuple, to: tuple) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    shape = [value.shape[axes.index(a)] if a in axes else 1 for a in to]
    return value.reshape(shape) if axes == tuple(a for a in to if a in axes) else value


def _rotary_reference(t, axes, feature, base, inverse):
    """Rotary embedding as a complex multiplication: (u_2m + i u_2m+1) * exp(i p w_m)."""
    token = next(a for a in axes if a in ("i", "j"))
    td, fd = axes.index(token), axes.index(feature)
    u = t.movedim((td, fd), (-2, -1))
    T, F = u.shape[-2], u.shape[-1]
    z = torch.complex(u[..., 0::2], u[..., 1::2])
    w = base ** (-torch.arange(0, F, 2, dtype=torch.float64, device=t.device) / F)
    phase = torch.arange(T, dtype=torch.float64, device=t.device)[:, None] * w[None, :]
    rot = torch.polar(torch.ones_like(phase), -phase if inverse else phase)
    z = z * rot.to(z.dtype)
    out = torch.stack((z.real, z.imag), dim=-1).flatten(-2)
    return out.movedim((-2, -1), (td, fd))


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
            idx = torch.arange(T, dtype=x.dtype, device=x.device)
            values[n] = idx[:, None] - idx[None, :]
        elif op == "rotary":
            values[n] = _rotary_reference(ins[0], node.axes, node.attr("feature"),
                                          node.attr("base"), node.attr("inverse"))
        elif op == "relabel":
            values[n] = ins[0]
        elif op == "broadcast":
            shape = [sizes["B"] if a == "b" else T if a in ("i", "j") else sizes[a]
                     for a in node.axes]
            values[n] = _align(ins[0], in_axes[0], node.axes).expand(shape)  # the same tensor, axis renamed
        elif op == "contract":
            letters = {a: chr(ord("a") + k) for k, a in enumerate(("b", "i", "j", *graph.dims))}
            spec = ",".join("".join(letters[a] for a in ax) for ax in in_axes)
            spec += "->" + "".join(letters[a] for a in node.axes)
            values[n] = torch.einsum(spec, *ins)
        elif op == "pointwise":
            env = {ARG_SYMBOLS[k].name: _align(v, ax, node.axes)
                   for k, (v, ax) in enumerate(zip(ins, in_axes))}
            env.update({name: torch.tensor(float(v), dtype=x.dtype) for name, v in sizes.items()})
            values[n] = _evaluate(node.attr("body"), env, x.dtype)
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
                    # exp of -inf (not where() after exp): masked entries may overflow
                    total = torch.exp(neg - mx).sum(dims[0], keepdim=True)
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


def autograd_step(module: torch.nn.Module, x: torch.Tensor, energy, create_graph: bool
                  ) -> torch.Tensor:
    """The layer's output, ``steps`` times ``x <- x - eta P grad_x E(x | xbar)``, with ``grad_x E``
    taken by ``torch.autograd.grad`` of ``energy(xa, xbar)`` (the per-token energy, (B, T)).

    The state role ``xa`` is a separate tensor (``x * 1.0``, or a detached leaf without
    ``create_graph``), so that only E's dependence through x_i is differentiated, not through the
    context xbar (the current state with context "current", the layer's input with "input");
    ``module`` gives the settings (``config``: eta, steps, preconditioner, context) and the
    preconditioner's parameters (``P_diag``, ``P_lowrank``; :func:`precondition`). With
    ``create_graph`` the result is differentiable again: its backward is autograd's double
    backward."""
    eta, steps, precond, context = module.config[:4]
    x0 = x
    for _ in range(steps):
        xbar = x if context == "current" else x0
        xa = x * 1.0 if create_graph else x.detach().requires_grad_(True)  # the state role only
        if not create_graph:
            xbar = xbar.detach()
        e = energy(xa, xbar)
        (g,) = torch.autograd.grad(e.sum(), xa, create_graph=create_graph)
        u = precondition(precond, g, module.P_diag, module.P_lowrank)
        x = x - eta * u
    return x


def module_values(layer: CompiledLayer, module: torch.nn.Module
                  ) -> tuple[dict[str, torch.Tensor], dict[str, float | torch.Tensor]]:
    """The generated Layer ``module``'s parameters and hyperparameters by declared name, as
    :func:`evaluate_energy` takes them."""
    attr = layer.file.attribute
    params = {p.name: getattr(module, attr(p.name)) for p in layer.params}
    hypers = {h.name: getattr(module, attr(h.name)) for h in layer.hypers}
    return params, hypers


def reference_step(layer: CompiledLayer, module: torch.nn.Module, x: torch.Tensor,
                   create_graph: bool) -> torch.Tensor:
    """The layer's output computed with torch.autograd on :func:`evaluate_energy`."""
    params, hypers = module_values(layer, module)
    return autograd_step(
        module, x, lambda xa, xbar: evaluate_energy(layer, xa, xbar, params, hypers),
        create_graph)
