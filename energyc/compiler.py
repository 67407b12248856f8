"""From a declared layer to the graphs the backends print.

The layer's step is ``x <- x - eta * P * g`` with ``g = dE/dx`` (the state's role(s) only; the
context role ``xbar`` is held fixed). Two graphs are built, with the same machinery:

* ``energy``: the per-token energy ``E_i`` (for ``Layer.energy``);
* ``step``:   forward output ``grad = dE/dx`` and, on top of it, the VJP of ``grad`` w.r.t. ``x``,
  ``xbar``, every parameter and every learned hyperparameter, seeded by an upstream ``grad_g``.
  Those are the second derivatives of E, derived symbolically by applying :func:`vjp` twice.

The preconditioner P, the step loop and its backward do not depend on the energy: they are the
runtime's (``energyc.runtime.precond``, ``energyc.runtime.layer``).

Each graph then runs through the pass pipeline. :func:`split` decides which nodes belong to the
forward function, which to the backward, and which forward values the backward needs (saved).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import sympy

from energyc.autodiff import vjp, vjp_many
from energyc.dsl import EnergyFile, HyperDecl, LayerDecl, ParamDecl
from energyc.errors import CompileError, EnergyError
from energyc.ir import ops
from energyc.ir.graph import Graph
from energyc.passes import run_pipeline
from energyc.passes.pairs import unfused_reductions

LEAF_OPS = ("input", "param", "hyper", "const", "offset", "position")


@dataclass
class CompiledLayer:
    decl: LayerDecl
    dims: tuple[str, ...]
    state_dim: str
    params: list[ParamDecl]
    hypers: list[HyperDecl]
    energy: Graph
    step: Graph
    timings: dict[str, float] = field(default_factory=dict)
    #: what stays slow, each "FILE:LINE: why" (a reduction over j left materialised)
    notes: list[str] = field(default_factory=list)
    #: a neuron model's Lagrangians: each layer's per token (outputs ``lagrangian:<input>``),
    #: and their sum's step graph (outputs: the activations g = dL/dx, ``grad_output``; the
    #: backward: the Hessian-vector products J v and the Lagrangians' parameters' gradients)
    lagrangian: Graph | None = None
    lagrangian_step: Graph | None = None

    @property
    def states(self) -> list[tuple[str, str]]:
        """The states the step updates (``state_inputs``)."""
        return state_inputs(self.decl)

    @property
    def neurons(self) -> bool:
        return bool(self.decl.neurons)

    @property
    def even_dims(self) -> tuple[str, ...]:
        """Dims that must be even (features of a rotary position embedding)."""
        g = self.energy
        found = {g.node(n).attr("feature") for n in g.live() if g.node(n).op == "rotary"}
        return tuple(d for d in self.dims if d in found)

    @property
    def name(self) -> str:
        return self.decl.name

    @property
    def memory(self) -> str | None:
        """The code name of the memory the energy reads (a second sequence, in the context
        role: the step functions take it as ``xbar``), or None."""
        return self.decl.memory

    @property
    def context_dim(self) -> str:
        """The dim of the context role's tokens: the memory's, else the state's."""
        return self.file.memories[self.memory].dim if self.memory else self.state_dim

    @property
    def context_data(self) -> tuple[str, ...]:
        """What the energy's context sets read from the call (``energyc.context.DATA``'s names:
        documents, a prefix), sorted."""
        g = self.energy
        masks = [g.node(n).attr("mask") for n in g.live()]
        return tuple(sorted({d for m in masks if m is not None for d in m.data}))

    @property
    def file(self) -> EnergyFile:
        return self.decl.file


def _subgraph(src: Graph, roots: list[int]) -> tuple[Graph, list[int]]:
    """A new graph of ``roots`` and their ancestors in ``src``, and the roots' ids in it."""
    g = Graph(src.dims)
    order = sorted(src.ancestors(roots))
    mapping: dict[int, int] = {}
    for n in order:
        node = src.node(n)
        mapping[n] = g.add_like(node, [mapping[u] for u in node.inputs])
    return g, [mapping[r] for r in roots]


def _energy_subgraph(decl: LayerDecl) -> tuple[Graph, int]:
    g, (e,) = _subgraph(decl.file.graph, [decl.energy])
    return g, e


def state_inputs(decl: LayerDecl) -> list[tuple[str, str]]:
    """The states the step updates, as (graph input's name, dim): ``x`` alone, or a neuron
    model's layers (in the energy's graph each input is the layer's activation g, in the
    Lagrangian's its state x)."""
    if decl.neurons:
        return [(n.input, n.dim) for n in decl.neurons]
    return [("x", decl.file.state_dim)]


def grad_output(state: str) -> str:
    """The step graph's output dE/d<state>: ``grad`` for x, ``grad:<state>`` for another."""
    return "grad" if state == "x" else f"grad:{state}"


def grad_seed(state: str) -> str:
    """The backward's upstream input for ``grad_output(state)``: ``grad_g``, ``grad_g_<state>``."""
    return "grad_g" if state == "x" else f"grad_g_{state}"


def _leaves(graph: Graph, op: str) -> dict[str, int]:
    return {graph.node(n).attr("name"): n for n in graph.ids() if graph.node(n).op == op}


def differentiate(graph: Graph, seeded: list[tuple[str, str]], wrt: dict[str, int]) -> Graph:
    """Add the VJP of the outputs named in ``seeded`` (output, upstream) w.r.t. ``wrt``, each
    seeded by a new input ``upstream`` (the gradient of a value labelled ``q`` labelled
    ``grad_q``), as outputs ``grad_<name>``."""
    pairs = []
    for out_name, upstream in seeded:
        out = graph.outputs[out_name]
        pairs.append((out, graph.add("input", name=upstream, axes=graph.node(out).axes)))
    grads = vjp_many(graph, pairs, list(wrt.values()), prefix="grad_")
    for name, w in wrt.items():
        if grads[w] is not None:
            graph.outputs[f"grad_{name}"] = grads[w]
    return graph


def compile_layer(decl: LayerDecl, verify: bool = False) -> CompiledLayer:
    """Build and optimise the energy and step graphs of one layer."""
    t0 = time.perf_counter()
    f = decl.file
    energy, (e_node, *term_nodes) = _subgraph(f.graph, [decl.energy, *(n for _, n in decl.terms)])
    energy.outputs["energy"] = e_node
    for (name, _), node in zip(decl.terms, term_nodes):
        energy.outputs[f"term:{name}"] = node
    lagrangian = None
    if decl.neurons:  # each layer's Lagrangian, per token
        lagrangian, nodes = _subgraph(f.graph, [n.lagrangian for n in decl.neurons])
        lagrangian.outputs = {f"lagrangian:{n.input}": node
                              for n, node in zip(decl.neurons, nodes)}
    graphs = [energy] if lagrangian is None else [energy, lagrangian]
    used_params = {k for g in graphs for k in _leaves(g, "param")}
    used_hypers = {k for g in graphs for k in _leaves(g, "hyper")}
    params = [p for name, p in f.params.items() if name in used_params]
    hypers = [h for name, h in f.hypers.items() if name in used_hypers]
    used_dims = set()
    for g in graphs:
        for n in g.live():
            used_dims.update(a for a in g.node(n).axes if a not in ("b", "i", "j"))
    for p in params:
        used_dims.update(p.dims)
    state_dims = {d for _, d in state_inputs(decl)}
    dims = tuple(d for d in f.dims if d in used_dims or d in state_dims)
    for d in dims:
        if d not in state_dims and not any(d in p.dims for p in params):
            raise EnergyError(f"dim {d} has no size: no parameter uses it", f.dim_where.get(d))
    if verify:
        energy.verify()
    _check_positions_in_documents(energy, decl)

    energy = run_pipeline(energy, verify=verify, stages=("energy",))  # its reductions' kernels
    notes = [f"{where or decl.where}: the reduction over j stays materialised ((tokens x tokens) "
             f"memory and time): {reason}" for where, reason in unfused_reductions(energy)]
    setup = time.perf_counter() - t0
    step, times = _step_graph(decl, params, hypers, verify)
    t3 = time.perf_counter()
    energy = run_pipeline(energy, verify=verify, stages=("simplify", "lower"))
    times["passes"] += time.perf_counter() - t3
    lagrangian_step = None
    if lagrangian is not None:
        total = ops.add_all(f.graph, [n.lagrangian for n in decl.neurons])
        lagrangian_step, more = _step_graph(decl, params, hypers, verify, root=total)
        t4 = time.perf_counter()
        lagrangian = run_pipeline(lagrangian, verify=verify,
                                  stages=("energy", "simplify", "lower"))
        for key, value in more.items():
            times[key] += value
        times["passes"] += time.perf_counter() - t4
    if not notes and _pair_valued(step):
        notes.append(f"{decl.where}: the step graph keeps values over (i, j): "
                     f"{', '.join(sorted(set(_pair_valued(step))))}")
    times["first_order"] += setup
    compiled = CompiledLayer(decl, dims, f.state_dim, params, hypers, energy, step, times, notes,
                             lagrangian, lagrangian_step)
    for d in compiled.even_dims:
        if f.dim_sizes.get(d, 0) % 2:
            raise EnergyError(f"dim {f.public_name(d)} must be even (its features pair up in a "
                              f"rotary embedding), but its default size is {f.dim_sizes[d]}",
                              f.dim_where.get(d))
    return compiled


def _check_positions_in_documents(energy: Graph, decl: LayerDecl) -> None:
    """Refuse ``position(i)`` / ``position(j)`` beside a set that reads documents: a packed
    document's absolute positions would have to restart at its first token, which positions (a
    value of one token, the same in every row) do not do. Scores that read positions as ``i - j``
    (RoPE, ALiBi, ``i - j``) need no per-document offset and are served."""
    nodes = [energy.node(n) for n in energy.live()]
    position = next((n for n in nodes if n.op == "position"), None)
    if position is None:
        return
    if any(n.attr("mask") is not None and "same_document" in n.attr("mask").data for n in nodes):
        raise EnergyError(
            "position() with a set that reads documents (same_document()) is not supported: "
            "positions count from the row's first token, not the document's; a score that reads "
            "the distance i - j (RoPE, ALiBi) needs no per-document position",
            position.where or decl.where)


def _step_graph(decl: LayerDecl, params: list[ParamDecl], hypers: list[HyperDecl],
                verify: bool, root: int | None = None) -> tuple[Graph, dict[str, float]]:
    """The step graph of the energy ``root`` (the layer's by default): each state's gradient
    g = dE/dx (``grad_output``), then their VJP w.r.t. the inputs, the parameters and the
    learned hyperparameters (second derivatives of E), seeded by one upstream input per state
    (``grad_seed``), through the pipeline; and the seconds each part took. A neuron model's
    Lagrangian is compiled by the same function (its root the sum of the layers' Lagrangians:
    g is then each layer's activation and the VJP its Hessian-vector product)."""
    t0 = time.perf_counter()
    step, (e_step,) = _subgraph(decl.file.graph, [decl.energy if root is None else root])
    step.outputs = {"energy": e_step}
    step = run_pipeline(step, verify=verify, stages=("energy",))
    e_step = step.outputs["energy"]
    states = state_inputs(decl)
    inputs = _leaves(step, "input")
    xs = [inputs[name] for name, _ in states]
    grads = vjp(step, e_step, ops.const(step, 1), xs, prefix="d")  # dq = dE/dq
    outputs = {}
    for (name, dim), xn in zip(states, xs):
        g = grads[xn]
        full = ("b", "i", dim)
        if step.node(g).axes != full:
            g = step.add("broadcast", (g,), out=full)
        outputs[grad_output(name)] = g
    step.outputs = outputs
    t1 = time.perf_counter()
    step = run_pipeline(step, verify=verify, stages=("simplify",))
    step_params, step_hypers = _leaves(step, "param"), _leaves(step, "hyper")
    wrt = dict(_leaves(step, "input"))
    wrt.update({p.name: step_params[p.name] for p in params if p.name in step_params})
    wrt.update({h.name: step_hypers[h.name] for h in hypers
                if h.learnable and h.name in step_hypers})
    step = differentiate(step, [(grad_output(name), grad_seed(name)) for name, _ in states], wrt)
    t2 = time.perf_counter()
    step = run_pipeline(step, verify=verify, stages=("simplify", "lower", "step"))
    return step, {"first_order": t1 - t0, "second_order": t2 - t1,
                  "passes": time.perf_counter() - t2}


def _pair_valued(graph: Graph) -> list[str]:
    """The ops of live values with both token axes (a (tokens x tokens) tensor at run time)."""
    return [graph.node(n).op for n in graph.live() if {"i", "j"} <= set(graph.node(n).axes)]


def compile_file(energy_file: EnergyFile, verify: bool = False) -> list[CompiledLayer]:
    out = []
    for decl in energy_file.layers:
        try:
            out.append(compile_layer(decl, verify=verify))
        except sympy.SympifyError as exc:  # pragma: no cover - defensive
            raise CompileError(f"SymPy could not handle an expression: {exc}", decl.where) from None
    return out
