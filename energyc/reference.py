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

from energyc.compiler import CompiledLayer, _energy_subgraph, _subgraph
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
    further: Mapping[str, torch.Tensor] | None = None,
    root: int | None = None,
) -> torch.Tensor:
    """Per-token energy E_i, shape (B, T), from the declared energy graph (each op by its rule
    in :mod:`energyc.ir.evaluate`). ``xbar`` is the context: the state's tokens, or for a layer
    that reads a memory, the memory (B, M, Dm). ``further``: a neuron model's further layers'
    values by input name; ``root``: another node of the file's graph to evaluate (a
    Lagrangian) instead of the energy."""
    if root is None:
        graph, out = _energy_subgraph(layer.decl)
    else:
        graph, (out,) = _subgraph(layer.file.graph, [root])
    B, T, _ = x.shape
    sizes = {"b": B, "i": T, "j": xbar.shape[1], layer.state_dim: x.shape[-1],
             layer.context_dim: xbar.shape[-1]}
    env: dict[str, torch.Tensor | float] = {"x": x, "xbar": xbar}
    for (name, dim) in layer.states[1:]:
        if further is not None and name in further:
            env[name] = further[name]
            sizes[dim] = further[name].shape[-1]
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


def lagrangians(layer: CompiledLayer, params, hypers, xs: list[torch.Tensor]
                ) -> list[torch.Tensor]:
    """Each neuron layer's Lagrangian per token (B, T), evaluated from its declaration."""
    names = [name for name, _ in layer.states]
    return [evaluate_energy(layer, xs[0], xs[0], params, hypers, dict(zip(names[1:], xs[1:])),
                            root=n.lagrangian) for n in layer.decl.neurons]


def reference_activations(layer: CompiledLayer, params, hypers, xs: list[torch.Tensor],
                          create_graph: bool) -> list[torch.Tensor]:
    """Each neuron layer's activation g_l = dL_l/dx_l by torch.autograd of its Lagrangian."""
    return gradients(lambda xa: sum(L.sum() for L in lagrangians(layer, params, hypers, xa)),
                     xs, create_graph)


def gradients(scalar, xs: list[torch.Tensor], create_graph: bool) -> list[torch.Tensor]:
    """The gradient of ``scalar(xs)`` with respect to each of ``xs`` by torch.autograd, each
    taken along its own tensor (``x * 1.0``: a later state depends on the earlier steps'
    states, and the activation of each is the partial derivative along its own); without
    ``create_graph``, at detached copies."""
    xa = [x * 1.0 if create_graph else x.detach().requires_grad_(True) for x in xs]
    with torch.enable_grad():
        return list(torch.autograd.grad(scalar(xa), xa, create_graph=create_graph))


def reference_total_energy(layer: CompiledLayer, module: torch.nn.Module,
                           xs: list[torch.Tensor], xbar: torch.Tensor | None = None,
                           **data) -> torch.Tensor:
    """A neuron model's total energy per token (B, T), differentiable twice: E at the
    activations (its context role the first layer's activation at ``xbar``, or at the state,
    held fixed), plus with "legendre" dynamics each layer's x . g - L(x); 0 at padding."""
    params, hypers = module_values(layer, module)
    names = [name for name, _ in layer.states]
    call = call_data(xs[0], None, **data)
    with calling(call):
        gs = reference_activations(layer, params, hypers, xs, True)
        gbar = gs[0] if xbar is None else reference_activations(
            layer, params, hypers, [xbar, *xs[1:]], True)[0]
        e = evaluate_energy(layer, gs[0], gbar.detach(), params, hypers,
                            dict(zip(names[1:], gs[1:])))
        if layer.decl.dynamics == "legendre":
            for x, g, L in zip(xs, gs, lagrangians(layer, params, hypers, xs)):
                e = e + (x * g).sum(-1) - L
    if call is not None and call.valid is not None:
        e = e * call.valid[:, :, 0].to(e.dtype)
    return e


def reference_neurons(layer: CompiledLayer, module: torch.nn.Module, xs: list[torch.Tensor],
                      create_graph: bool, clamp: tuple[str, ...] = (),
                      **data) -> list[torch.Tensor]:
    """A neuron model's states after its dynamics, with torch.autograd on the declared graphs:
    each layer's activation g_l = grad of its Lagrangian (evaluated from its declaration), dE/dg
    by autograd of :func:`evaluate_energy` at the activations. See :func:`autograd_neurons`."""
    params, hypers = module_values(layer, module)
    names = [name for name, _ in layer.states]

    def lagrangian_sum(xs: list[torch.Tensor]) -> torch.Tensor:
        return sum(L.sum() for L in lagrangians(layer, params, hypers, xs))

    def energy(g: torch.Tensor, gbar: torch.Tensor, further: list[torch.Tensor]) -> torch.Tensor:
        return evaluate_energy(layer, g, gbar, params, hypers, dict(zip(names[1:], further)))

    return autograd_neurons(module, xs, lagrangian_sum, energy, create_graph, clamp, **data)


def package_neurons(module: torch.nn.Module, xs: list[torch.Tensor], create_graph: bool,
                    clamp: tuple[str, ...] = (), **data) -> list[torch.Tensor]:
    """:func:`autograd_neurons` on a generated package's own plain functions (``_lagrangians``
    and ``_energy``, what a user would write in PyTorch): ``energyc bench``'s baseline."""
    package = module._declared.module

    def weights() -> tuple:
        return (*module._params(), *module._hypers(xs[0]))

    def lagrangian_sum(xs: list[torch.Tensor]) -> torch.Tensor:
        Ls = package._lagrangians(*xs, *weights())
        return sum(L.sum() for L in (Ls if isinstance(Ls, tuple) else (Ls,)))

    def energy(g: torch.Tensor, gbar: torch.Tensor, further: list[torch.Tensor]) -> torch.Tensor:
        return package._energy(g, gbar, *further, *weights())

    return autograd_neurons(module, xs, lagrangian_sum, energy, create_graph, clamp, **data)


def autograd_neurons(module: torch.nn.Module, xs: list[torch.Tensor], lagrangian_sum, energy,
                     create_graph: bool, clamp: tuple[str, ...] = (),
                     **data) -> list[torch.Tensor]:
    """A neuron model's dynamics by torch.autograd: each step, the activations g_l as the
    gradient of ``lagrangian_sum(xs)`` (a separate tensor per state), dE/dg by autograd of
    ``energy(g_1, gbar, [g_2, ...])`` (per token; the first layer's state role a separate
    tensor, its context role g_1 itself, or the input's with context "input"), then ``x_l <-
    x_l - (eta / tau_l) u_l`` with u_l = P dE/dg_l or, for "legendre" dynamics, x_l + dE/dg_l;
    clamped layers held fixed; ``module`` (the generated Layer) gives the settings and P. With
    ``create_graph`` the result is differentiable again (autograd through the whole unrolled
    dynamics)."""
    config = module._neuron_config(clamp)
    call = call_data(xs[0], None, **data)
    valid = None if call is None or call.valid is None else call.valid.to(xs[0].dtype)

    xs = list(xs)
    g0 = None
    with calling(call):
        for _ in range(config.steps):
            gs = gradients(lagrangian_sum, xs, create_graph)
            g0 = gs if g0 is None else g0
            gbar = gs[0] if config.context == "current" else g0[0]
            gbar = gbar if create_graph else gbar.detach()  # the context role, held fixed
            ds = gradients(lambda ga, gbar=gbar: energy(ga[0], gbar, ga[1:]).sum(), gs, create_graph)
            us = [x + d for x, d in zip(xs, ds)] if config.dynamics == "legendre" else list(ds)
            if valid is not None:
                us = [u * valid for u in us]
            us[0] = precondition(config.precond, us[0], module.P_diag, module.P_lowrank)
            xs = [x if fixed else x - eta * u
                  for x, u, eta, fixed in zip(xs, us, config.etas, config.clamped)]
    return xs
