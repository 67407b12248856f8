"""An independent evaluation of an energy, for checking generated code against torch.autograd.

This interpreter walks the *energy* graph as declared (before differentiation and passes) with
plain torch operations (the op table's reference evaluation, :mod:`energyc.ir.evaluate`), so
``torch.autograd`` can differentiate it once (the layer's forward reference) or twice (the
backward reference). It shares no code with the generated modules or the runtime: masks are
built from the context-set definitions, and SymPy bodies are walked with each energyc function
expanded to its defining expression (sigmoid and softplus: torch's own, ``STABLE``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F  # noqa: N812

from energyc.compiler import CompiledLayer, _energy_subgraph
from energyc.ir.evaluate import STABLE as _STABLE  # noqa: F401  (tests read it here)
from energyc.ir.evaluate import align, evaluate
from energyc.ir.functions import softplus  # noqa: F401
from energyc.runtime.rows import call_data, calling


def evaluate_energy(
    layer: CompiledLayer,
    x: torch.Tensor,
    xbar: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    hypers: Mapping[str, float | torch.Tensor],
) -> torch.Tensor:
    """Per-token energy E_i, shape (B, T), from the declared energy graph (each op by its rule
    in :mod:`energyc.ir.evaluate`). ``xbar`` is the context: the state's tokens, or for a layer
    that reads a memory, the memory (B, M, Dm)."""
    graph, out = _energy_subgraph(layer.decl)
    B, T, _ = x.shape
    sizes = {"b": B, "i": T, "j": xbar.shape[1], layer.state_dim: x.shape[-1],
             layer.context_dim: xbar.shape[-1]}
    env: dict[str, torch.Tensor | float] = {"x": x, "xbar": xbar}
    for p in layer.params:
        for d, n in zip(p.dims, params[p.name].shape):
            sizes[d] = n
    for n in graph.ids():
        node = graph.node(n)
        if node.op == "param":  # stored in the declared order, a graph value in the canonical one
            decl = next(p for p in layer.params if p.name == node.attr("name"))
            env[decl.name] = params[decl.name].permute([decl.dims.index(a) for a in node.axes])
        elif node.op == "hyper":
            env[node.attr("name")] = hypers[node.attr("name")]
    e = evaluate(graph, out, env, sizes, dtype=x.dtype, device=x.device)
    return align(e, graph.node(out).axes, ("b", "i")).expand(B, T)


def precondition(kind: str, g: torch.Tensor, P_diag=None, P_lowrank=None) -> torch.Tensor:  # noqa: N803
    """u = P g, written out directly."""
    if kind == "identity":
        return g
    u = F.softplus(P_diag) * g
    if kind == "dplr":
        u = u + (g @ P_lowrank) @ P_lowrank.T
    return u


def autograd_step(module: torch.nn.Module, x: torch.Tensor, energy, create_graph: bool,
                  valid: torch.Tensor | None = None,
                  memory: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's output, ``steps`` times ``x <- x - eta P grad_x E(x | xbar)``, with ``grad_x E``
    taken by ``torch.autograd.grad`` of ``energy(xa, xbar)`` (the per-token energy, (B, T)).

    The state role ``xa`` is a separate tensor (``x * 1.0``, or a detached leaf without
    ``create_graph``), so that only E's dependence through x_i is differentiated, not through the
    context xbar (the current state with context "current", the layer's input with "input");
    ``module`` gives the settings (``config``: eta, steps, preconditioner, context) and the
    preconditioner's parameters (``P_diag``, ``P_lowrank``; :func:`precondition`). With
    ``create_graph`` the result is differentiable again: its backward is autograd's double
    backward. ``valid`` (B, T, 1), where given: 1 at real tokens, 0 at padding, whose update is
    zero. ``memory``, for a layer that reads one, is the context of every step."""
    eta, steps, precond, context = module.config[:4]
    x0 = x
    for _ in range(steps):
        xbar = memory if memory is not None else x if context == "current" else x0
        xa = x * 1.0 if create_graph else x.detach().requires_grad_(True)  # the state role only
        if not create_graph:
            xbar = xbar.detach()
        e = energy(xa, xbar)
        (g,) = torch.autograd.grad(e.sum(), xa, create_graph=create_graph)
        if valid is not None:
            g = g * valid.to(g.dtype)
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
                   create_graph: bool, memory: torch.Tensor | None = None,
                   **data) -> torch.Tensor:
    """The layer's output computed with torch.autograd on :func:`evaluate_energy`; ``data``: the
    call's context data keywords (``cu_seqlens``, ``document_ids``, ``lengths``, ``prefix``,
    ``memory_lengths``), as the layer takes them; ``memory``: the memory, for a layer that
    reads one."""
    params, hypers = module_values(layer, module)
    call = call_data(x, None, memory=memory, **data)
    valid = None if call is None else call.valid
    with calling(call):
        return autograd_step(
            module, x, lambda xa, xbar: evaluate_energy(layer, xa, xbar, params, hypers),
            create_graph, valid, memory)
