"""Lowering: compiled graphs -> the specs that templates render (``energyc.backends.specs``).

What every backend shares: the split of a step graph into the forward and backward functions
and what the forward saves (:func:`split`), the variables of a graph's nodes, the arguments of
each function and the sizes they unpack, and :func:`function_spec`, which prints the nodes of a
function with a backend's emitter. The torch backend lowers the package (``package_spec``: the
energy, the step functions, incremental decoding, the Layer's declarations);
the Triton backend the step functions again with its kernel-printing emitter
(``triton_module_spec``). Nothing here renders or writes (``energyc.render``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

import sympy

from energyc import settings
from energyc.backends.kept_weights import keeps_probs
from energyc.backends.specs import (
    DimSpec,
    FunctionSpec,
    HyperSpec,
    PackageSpec,
    ParamSpec,
    TritonModuleSpec,
)
from energyc.backends.torch_backend import Emitter, einsum_letters, full_output
from energyc.backends.triton_backend import KernelSet, TritonEmitter
from energyc.compiler import LEAF_OPS, CompiledLayer, grad_output, grad_seed
from energyc.ir.describe import format_energy
from energyc.ir.graph import Graph
from energyc.ir.ops import describe_mask
from energyc.names import is_plain


@dataclass
class Split:
    """Which nodes the forward and backward functions compute, and what the forward saves."""

    forward: list[int]
    backward: list[int]
    saved: list[int]


def split(graph: Graph, forward_outputs: list[str], upstream_inputs: list[str]) -> Split:
    live = graph.live()
    up = {n for n in live if graph.node(n).op == "input" and graph.node(n).attr("name") in upstream_inputs}
    backward_set: set[int] = set()
    for n in live:
        if n in up or any(u in backward_set for u in graph.node(n).inputs):
            backward_set.add(n)
    fwd_needed = graph.ancestors([graph.outputs[o] for o in forward_outputs])
    saved: set[int] = set()
    recomputed: set[int] = set()  # leaves and relabels (free) that the backward re-emits
    stack = [u for n in backward_set for u in graph.node(n).inputs if u not in backward_set]
    while stack:
        u = stack.pop()
        op = graph.node(u).op
        if op in LEAF_OPS:
            recomputed.add(u)
        elif op == "relabel":
            recomputed.add(u)
            stack.extend(graph.node(u).inputs)
        else:
            saved.add(u)
    fwd_needed |= graph.ancestors(saved)  # once (it was recomputed for every live node)
    forward = [n for n in live if n in fwd_needed]
    forward = [n for n in forward if n not in backward_set]
    backward = [n for n in live if n in backward_set or n in recomputed]
    return Split(forward, backward, sorted(saved))


#: module-level names of layer.py that the class alias ``<ClassName> = Layer`` must not replace
MODULE_GLOBALS = frozenset({"DIMS", "PARAMS", "HYPERS", "STATE_DIM", "EVEN_DIMS", "LEARNED_HYPERS",
                            "PRECONDITIONERS", "Layer", "math", "torch", "DECODE_UNSUPPORTED",
                            "DECODE_KEYS_FROM_CONTEXT", "NEURONS", "DYNAMICS", "TERMS", "CONTEXT_DATA",
                            "MEMORY"})


def camel(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.split("_") if part)


def class_name(name: str) -> str:
    """The layer's class name: ``cem_attention`` -> ``CemAttention`` (``...Layer`` if that would
    replace a name layer.py defines, e.g. ``d_i_m_s`` -> ``DIMSLayer``)."""
    out = camel(name)
    return out + "Layer" if out in MODULE_GLOBALS - {"Layer"} else out


def _code(expr: sympy.Expr) -> str:
    """A SymPy constant expression in the dims, as Python code (``1 / math.sqrt(K)``)."""
    from energyc.backends.torch_printer import TorchPrinter

    names = {s.name: s.name for s in sympy.sympify(expr).free_symbols}
    return TorchPrinter(names, set()).doprint(expr)


ALWAYS_TENSORS = {"x", "xbar", "grad_g"}


def _size_lines(leaves: dict[str, tuple[int, tuple[str, ...]]], params: set[str],
                memory: bool = False) -> list[str]:
    """``B, T, D = x.shape`` and one unpacking per further source of a dim size (with a
    memory, its tokens' count ``Tm`` from the context argument: ``_, Tm, Dm = xbar.shape``)."""
    lines = []
    known: set[str] = set()
    for var, (nid, axes_order) in leaves.items():
        if nid < 0 and var not in ALWAYS_TENSORS and var not in params:
            continue  # an unused hyperparameter
        tokens = "Tm" if memory and var == "xbar" else "T"
        names = [{"b": "B", "i": tokens}.get(a, a) for a in axes_order]
        if set(names) - known:
            parts = [n if n not in known else "_" for n in names]
            lines.append(f"{', '.join(parts)} = {var}.shape")
            known.update(names)
    return lines


def _bind_arguments(em: Emitter, leaves: dict[str, tuple[int, tuple[str, ...]]]) -> list[str]:
    """Name each argument's leaf node for ``em``: the argument itself, or a permuted view
    ``<arg>_`` where its storage order is not the canonical one (the lines that make those)."""
    lines = []
    for var, (nid, order) in leaves.items():
        if nid < 0:
            continue
        canon = em.graph.node(nid).axes
        if tuple(order) != canon:
            perm = ", ".join(str(order.index(a)) for a in canon)
            lines.append(f"{var}_ = {var}.permute({perm})  # ({', '.join(canon)})")
            em.names[nid] = f"{var}_"
        else:
            em.names[nid] = var
    return lines


def function_spec(
    graph: Graph,
    name: str,
    doc: str,
    nodes: list[int],
    args: list[str],
    leaves: dict[str, tuple[int, tuple[str, ...]]],
    returns: list[tuple[int | None, tuple[str, ...], tuple[str, ...]]],
    names: dict[int, str],
    saved_in: list[int] | None = None,
    saved_out: list[int] | None = None,
    params: set[str] | None = None,
    emitter: Callable[[Graph, dict, dict], Emitter] = Emitter,
) -> FunctionSpec:
    """Print ``nodes`` of ``graph`` as a function.

    ``leaves`` maps argument names to (node id or -1, storage order of its axes); ``returns`` lists
    (node, canonical axes, storage order) per returned value; ``names`` gives every node's variable.
    """
    em = emitter(graph, {}, einsum_letters(graph.dims))
    em.region = set(nodes)
    lines = _bind_arguments(em, leaves)
    if saved_in:
        for n in saved_in:
            em.names[n] = names[n]
        unpack = [v for n in saved_in for v in _saved_names(graph, n, names[n])]
        lines.append(f"({unpack[0]},) = saved" if len(unpack) == 1
                     else f"{', '.join(unpack)} = saved")
    em.pending.update(names)
    kept = set(saved_out or ())
    em.wanted_order = {nid: tuple(order) for nid, axes, order in returns
                       if nid is not None and nid not in kept and graph.node(nid).axes == tuple(axes)
                       and tuple(order) != tuple(axes)}
    for n in nodes:
        if n in em.names:
            continue
        em.emit(n, names.get(n, ""))
    size_lines = _size_lines(leaves, params or set(), em.keys == "Tm")
    body = size_lines + em.mask_lines + lines + em.lines
    outs = [full_output(em, nid, axes, order) for nid, axes, order in returns]
    if saved_out is not None:
        saved = [v for n in saved_out for v in _saved_names(graph, n, em.names[n])]
        outs.append(f"({saved[0]},)" if len(saved) == 1 else f"({', '.join(saved)})")
    return FunctionSpec(name, args, doc, body, ", ".join(outs))


def _saved_names(graph: Graph, n: int, name: str) -> list[str]:
    """The variables that carry saved node ``n``: its own, and for a log-sum-exp whose weights
    are kept (kept_weights.keeps_probs) their companion ``<name>_p`` beside it."""
    return [name, f"{name}_p"] if keeps_probs(graph, n) else [name]


def _named_leaves(graph: Graph) -> dict[str, int]:
    """The live inputs, parameters and hyperparameters of ``graph`` by name."""
    return {graph.node(n).attr("name"): n for n in graph.live()
            if graph.node(n).op in ("input", "param", "hyper")}


#: what the printed functions bind besides their nodes' variables: arguments and sizes
FUNCTION_NAMES = frozenset({"kernels", "saved", "cache", "P", "B", "T", "Tm", "x", "xbar", "g",
                            "grad_g", "grad_u", "P_diag", "P_lowrank"})


def _names(graph: Graph) -> dict[int, str]:
    """Each printed node's variable: its label (what the energy file calls the value, ``q``,
    ``dq``, ``grad_q``; ``Node.label``) where :func:`_usable`, else ``t<k>``, ``k`` counting the
    nodes without one in order. An attention backward's gradients keep ``t<k>``: the first one's
    variable is the stem of all (``t5_dq, t5_dk, ... = kernels.attention_backward(...)``)."""
    declared = {graph.node(n).attr("name") for n in graph.ids()
                if graph.node(n).op in ("input", "param", "hyper")} | set(graph.dims)
    chosen: set[str] = set()
    names = {}
    k = 0
    for n in graph.live():
        node = graph.node(n)
        if node.op in ("input", "param", "hyper", "const", "relabel"):
            continue
        if node.label is not None and node.op != "attention_grad" \
                and _usable(node.label, declared, chosen):
            names[n] = node.label
            chosen.add(node.label)
        else:
            names[n] = f"t{k}"
            k += 1
    return names


def _usable(label: str, declared: set[str], chosen: set[str]) -> bool:
    """Whether generated code can call a value ``label``: a plain name (``energyc.names.is_plain``:
    no keyword, builtin, template name or numbered temporary; ``grad_`` allowed before one),
    none of the functions' own names or the declared names, and neither an extension of one of
    those or of the labels ``chosen`` so far by ``_`` nor extended by one (the printers derive
    ``<name>_p``, ``<name>_all``, ``<name>_dq``, ... from a variable)."""
    if not is_plain(label.removeprefix("grad_")) or label in FUNCTION_NAMES | declared:
        return False
    return not any(label.startswith(m + "_") or m.startswith(label + "_")
                   for m in declared | chosen | FUNCTION_NAMES)


def _leaf_map(layer: CompiledLayer, graph: Graph,
              extra_inputs: list[str]) -> dict[str, tuple[int, tuple[str, ...]]]:
    """Argument name -> (leaf node or -1, storage order of its axes)."""
    state_order = ("b", "i", layer.state_dim)
    found = _named_leaves(graph)
    leaves: dict[str, tuple[int, tuple[str, ...]]] = {}
    dims = dict(layer.states)
    dims.update({grad_seed(name): dim for name, dim in layer.states})
    for var in ["x", "xbar", *_further_states(layer), *extra_inputs]:
        # the context argument: the state's tokens, or the memory's over its own dim
        order = (("b", "i", layer.context_dim) if var == "xbar" else ("b", "i", dims[var])
                 if var in dims else state_order)
        leaves[var] = (found.get(var, -1), order)
    for p in layer.params:
        leaves[p.name] = (found.get(p.name, -1), p.dims)
    for h in layer.hypers:
        leaves[h.name] = (found.get(h.name, -1), ())
    return leaves


def package_spec(layer: CompiledLayer, source: str) -> PackageSpec:
    """The torch backend's package: layer.py's functions and the Layer's declarations."""
    decl = layer.decl
    D = layer.state_dim
    param_names = [p.name for p in layer.params]
    hyper_names = [h.name for h in layer.hypers]

    def leaf_map(graph: Graph, extra_inputs: list[str]) -> dict[str, tuple[int, tuple[str, ...]]]:
        return _leaf_map(layer, graph, extra_inputs)

    # energy
    eg = layer.energy
    e_names = _names(eg)
    states = ["x", "xbar", *_further_states(layer)]
    energy_fn = function_spec(
        eg, "_energy", "Per-token energy E_i, shape (B, T).",
        eg.live(), [*states, *param_names, *hyper_names], leaf_map(eg, []),
        [(eg.outputs["energy"], ("b", "i"), ("b", "i"))], e_names, params=set(param_names),
        emitter=functools.partial(Emitter, recorded=True),  # users differentiate the energy
    )
    functions = [energy_fn, *step_functions(layer, lambda stem: Emitter)]
    needed, unsupported, from_context = decodable(layer)
    if unsupported is None:
        functions.insert(3, decode_function(layer, needed))  # after _grad_forward, _grad_backward
    if layer.neurons:
        functions += neuron_functions(layer, e_names, states, param_names, hyper_names)
    f = layer.file
    hypers = [HyperSpec(h.name, _code(h.default) if h.default is not None else "None", h.learnable,
                        f.attribute(h.name), f.public_name(h.name))
              for h in layer.hypers]
    params = []
    for p in layer.params:
        fan_in = p.dims[-1] if p.dims else "1"  # a scalar parameter: fan-in 1
        init = p.init
        if init.kind == "normal":
            std = _code(init.args["std"]) if init.args["std"] is not None else f"1 / math.sqrt({fan_in})"
            args = [_code(init.args["mean"]), std]
        elif init.kind == "uniform":
            args = [_code(init.args["low"]), _code(init.args["high"])]
        elif init.kind == "alibi":
            args = []
        else:
            args = [_code(init.args["value"])]
        shape = f"({p.dims[0]},)" if len(p.dims) == 1 else f"({', '.join(p.dims)})"
        params.append(ParamSpec(p.name, shape, f"({', '.join([repr(init.kind), *args])}"
                                f"{',' if not args else ''})", f.attribute(p.name),
                                f.public_name(p.name)))
    doc = _module_doc(layer)
    dims = [DimSpec(d, f.attribute(d), f.public_name(d), d in layer.even_dims, f.dim_sizes.get(d))
            for d in layer.dims]
    return PackageSpec(
        name=decl.name, class_name=class_name(decl.name), source=source, doc=doc,
        dims=dims, state_dim=D, state_attr=f.attribute(D), hypers=hypers, params=params,
        eta=decl.eta,
        steps=decl.steps, precond=decl.precond, rank=decl.rank, context=decl.context,
        joint=decl.joint, functions=functions, precond_kinds=list(settings.PRECONDITIONERS),
        settings_doc=settings.DOC.splitlines(), decode_unsupported=unsupported,
        decode_keys_from_context=from_context, context_data=layer.context_data,
        memory=None if layer.memory is None else (f.public_name(layer.memory),
                                                  f.attribute(layer.context_dim)),
        neurons=tuple((n.public, f.attribute(n.dim), n.tau) for n in decl.neurons),
        dynamics=decl.dynamics, terms=tuple(name for name, _ in decl.terms),
    )


def triton_module_spec(layer: CompiledLayer, source: str) -> TritonModuleSpec:
    """The Triton path: the step functions printed again by the Triton emitter, which makes
    each element-wise node, reduction and pass over pairs a kernel."""
    kernel_set = KernelSet(layer.decl.name)
    def emitter(stem):
        return functools.partial(TritonEmitter, kernel_set=kernel_set, function=stem)

    functions = step_functions(layer, emitter)
    if layer.neurons:
        functions += step_functions(layer, emitter, lagrangian=True)
    sg = layer.step
    attention = any(sg.node(n).op in ("attention", "attention_transposed") for n in sg.live())
    notes = [f"{where or layer.decl.where}: {what} runs torch's code on the Triton path: "
             f"{error} has no Triton spelling (correct; slower on a GPU)"
             for (where, what), error in kernel_set.on_torch.items()]
    return TritonModuleSpec(layer.decl.name, functions, kernel_set.kernels, attention=attention,
                            notes=notes, launches=kernel_set.launched)


def _further_states(layer: CompiledLayer) -> list[str]:
    """The states after x (a neuron model's further layers), as the functions' arguments."""
    return [name for name, _ in layer.states if name != "x"]


def step_functions(layer: CompiledLayer, emitter, lagrangian: bool = False) -> list[FunctionSpec]:
    """The step's forward and backward; ``emitter(stem)`` makes the emitter of one function
    (``stem`` names its kernels: fwd, bwd). With ``lagrangian``, a neuron model's activations
    and their VJP from its Lagrangian's step graph (``_activation_forward``: g = dL/dx of
    each layer; ``_activation_backward``: the Hessian-vector products J v and the Lagrangians'
    parameters' gradients; stems act, actb)."""
    param_names = [p.name for p in layer.params]
    hyper_names = [h.name for h in layer.hypers]
    states = layer.states
    further = _further_states(layer)
    seeds = [grad_seed(name) for name, _ in states]

    def leaf_map(graph: Graph, extra_inputs: list[str]) -> dict[str, tuple[int, tuple[str, ...]]]:
        return _leaf_map(layer, graph, extra_inputs)

    # step: forward (g = dE/dx) and backward (its VJP)
    sg = layer.lagrangian_step if lagrangian else layer.step
    sp = split(sg, [grad_output(name) for name, _ in states], seeds)
    s_names = _names(sg)
    outs = [(sg.outputs[grad_output(name)], ("b", "i", dim), ("b", "i", dim))
            for name, dim in states]
    state_args = ["x", *further] if lagrangian else ["x", "xbar", *further]
    fwd = function_spec(
        sg, "_activation_forward" if lagrangian else "_grad_forward",
        ("The activations g = dL/dx (B, T, dim) of each neuron layer, and the intermediates "
         "the backward needs." if lagrangian else
         "g = dE/dx (B, T, D), and the intermediates the backward needs." if not further else
         "g = dE/dg for each neuron layer (B, T, dim), and the intermediates the backward "
         "needs."),
        sp.forward, ["kernels", *state_args, *param_names, *hyper_names], leaf_map(sg, []),
        outs, s_names, saved_out=sp.saved, params=set(param_names),
        emitter=emitter("act" if lagrangian else "fwd"),
    )
    context_order = ("b", "i", layer.context_dim)  # the memory's gradient, where it has one
    grads = [("x", ("b", "i", states[0][1]), ("b", "i", states[0][1]))]
    if not lagrangian:
        grads.append(("xbar", context_order, context_order))
    grads += [(name, ("b", "i", dim), ("b", "i", dim)) for name, dim in states[1:]]
    grads += [(p.name, sg.canonical(p.dims), p.dims) for p in layer.params]
    grads += [(h.name, (), ()) for h in layer.hypers]
    bwd = function_spec(
        sg, "_activation_backward" if lagrangian else "_grad_backward",
        ("Vector-Jacobian product of the activations w.r.t. each layer's state (J v, J the "
         "Lagrangian's Hessian) and the parameters." if lagrangian else
         "Vector-Jacobian product of g w.r.t. x, xbar, the parameters and the hyperparameters."),
        sp.backward, ["kernels", "saved", *seeds, *state_args, *param_names, *hyper_names],
        leaf_map(sg, seeds),
        [(sg.outputs.get(f"grad_{n}"), axes, order) for n, axes, order in grads], s_names,
        saved_in=sp.saved, params=set(param_names),
        emitter=emitter("actb" if lagrangian else "bwd"),
    )
    return [fwd, bwd]


def neuron_functions(layer: CompiledLayer, e_names: dict[int, str], states: list[str],
                     param_names: list[str], hyper_names: list[str]) -> list[FunctionSpec]:
    """A neuron model's further functions: ``_energy_terms`` (each named term per token, where
    the energy was given as terms), ``_lagrangians`` (each layer's Lagrangian per token), and
    the activations with their VJP (``step_functions(lagrangian=True)``)."""
    out = []
    eg = layer.energy
    terms = [k for k in eg.outputs if k.startswith("term:")]
    if terms:
        out.append(function_spec(
            eg, "_energy_terms", "Each named term of the energy per token, (B, T) each.",
            eg.live(), [*states, *param_names, *hyper_names], _leaf_map(layer, eg, []),
            [(eg.outputs[k], ("b", "i"), ("b", "i")) for k in terms], e_names,
            params=set(param_names), emitter=functools.partial(Emitter, recorded=True)))
    lg = layer.lagrangian
    lagrangian_states = [s for s in states if s != "xbar"]
    out.append(function_spec(
        lg, "_lagrangians", "Each neuron layer's Lagrangian L(x) per token, (B, T) each.",
        lg.live(), [*lagrangian_states, *param_names, *hyper_names], _leaf_map(layer, lg, []),
        [(lg.outputs[f"lagrangian:{name}"], ("b", "i"), ("b", "i")) for name, _ in layer.states],
        _names(lg), params=set(param_names), emitter=functools.partial(Emitter, recorded=True)))
    out += step_functions(layer, lambda stem: Emitter, lagrangian=True)
    return out


def decodable(layer: CompiledLayer) -> tuple[list[int], str | None, bool]:
    """The step-graph nodes that g = dE/dx needs, and whether the layer decodes incrementally:
    ``None``, or the reason it cannot (a sentence). Also whether the j-side values it caches
    depend on the context xbar alone (then, with context "input", one cache serves every step).

    A layer decodes when each token's g depends on itself and earlier tokens alone: every context
    set is causal (j <= i, j < i, a window), every reduction over j is fused (a pair or attention
    op: no value with both token axes), every value over j is computed from the state's tokens
    alone (not from a value over i: the key role of a joint energy), and no reduction runs over
    every token."""
    sg = layer.step
    needed = sorted(sg.ancestors([sg.outputs["grad"]]))
    inputs = {n for n in needed if sg.node(n).op == "input"}
    token_dep: set[int] = set()
    for n in needed:  # topological ids: inputs before their users
        node = sg.node(n)
        if n in inputs or any(u in token_dep for u in node.inputs):
            token_dep.add(n)
    if layer.neurons:
        return needed, ("a neuron model: its dynamics step on every layer's state; decoding "
                        "neuron models is not supported yet (run forward on the whole "
                        "sequence)"), False
    if layer.memory is not None:
        return needed, ("the energy reads a memory; decoding with one is not supported yet "
                        "(run forward on the new tokens with memory=: each token's update "
                        "depends on itself and the memory alone)"), False
    if layer.decl.joint:
        return needed, ("a joint energy: a token's update has a term from every token whose "
                        "context holds it (the key role), later ones included"), False
    for n in needed:
        node = sg.node(n)
        axes = set(node.axes)
        mask = node.attr("mask")
        where = f" ({node.where})" if node.where else ""
        if mask is not None and not mask.looks_back:
            return needed, (f"the context set {{{describe_mask(mask)}}}{where} holds tokens "
                            f"after i"), False
        if {"i", "j"} <= axes or node.op == "offset":
            return needed, (f"a reduction over j stays materialised{where}: decode runs fused "
                            f"context reductions"), False
        if "j" in axes and any("i" in sg.node(u).axes and u not in inputs for u in node.inputs):
            return needed, (f"a value over j is computed from one over i{where} (a key role, or "
                            f"a query-side value reused as a key): decode caches values of the "
                            f"context alone"), False
        if n in token_dep and "i" not in axes and "j" not in axes:
            return needed, f"a reduction over every token{where}", False
    frontier = decode_frontier(sg, needed)
    x_leaf = [n for n in inputs if sg.node(n).attr("name") == "x"]
    from_context = not (set(x_leaf) & sg.ancestors(frontier))
    return needed, None, from_context


def decode_frontier(sg: Graph, needed: list[int]) -> list[int]:
    """The j-side values (over j, not i) that a value over i reads: what decoding caches."""
    users: dict[int, list[int]] = {}
    for n in needed:
        for u in sg.node(n).inputs:
            users.setdefault(u, []).append(n)
    return [n for n in needed if "j" in sg.node(n).axes and "i" not in sg.node(n).axes
            and any("i" in sg.node(m).axes for m in users.get(n, []))]


def decode_function(layer: CompiledLayer, needed: list[int]) -> FunctionSpec:
    """``_grad_decode``: g at t new tokens after a prefix of P, the cached j-side values
    extended by the new tokens' (``_rt.extend``; a value that windows alone read keeps the
    window's last tokens only). The values that do not vary over i (the j side and the
    parameters' alone) print first, the cache joins at the frontier, then the rest with the
    queries at positions P ...; position-dependent calls take ``offset=P``."""
    sg = layer.step
    D = layer.state_dim
    state_order = ("b", "i", D)
    param_names = [p.name for p in layer.params]
    hyper_names = [h.name for h in layer.hypers]
    names = _names(sg)
    frontier = decode_frontier(sg, needed)
    first = [n for n in needed if "i" not in sg.node(n).axes]
    rest = [n for n in needed if "i" in sg.node(n).axes]
    em = Emitter(sg, {}, einsum_letters(sg.dims), position="P")
    em.region = set(needed)
    leaves = _leaf_map(layer, sg, [])
    lines = _bind_arguments(em, leaves)
    em.pending.update(names)
    for n in first:
        if n not in em.names:
            em.emit(n, names.get(n, ""))
    users: dict[int, list[int]] = {}
    for m in rest:
        for u in sg.node(m).inputs:
            users.setdefault(u, []).append(m)
    for n in frontier:
        node = sg.node(n)
        key = names.get(n) or sg.node(node.inputs[0]).attr("name")  # a relabelled argument
        code = em.names[n]
        var = f"{key}_all"
        masks = [sg.node(m).attr("mask") for m in users.get(n, [])]
        if all(m is not None and m.reach is not None for m in masks):  # read by windows alone
            keep = max(m.reach for m in masks)
            em.lines.append(f"{var} = _rt.extend(cache, {key!r}, {code}, {node.axes.index('j')}, "
                            f"P, keep={keep})  # ({', '.join(node.axes)}): the window's last "
                            f"{keep} tokens and the T new")
        else:
            em.lines.append(f"{var} = _rt.extend(cache, {key!r}, {code}, "
                            f"{node.axes.index('j')}, P)  # ({', '.join(node.axes)}) over the "
                            f"P + T tokens")
        em.names[n] = var
    for n in rest:
        if n not in em.names:
            em.emit(n, names.get(n, ""))
    body = _size_lines(leaves, set(param_names), em.keys == "Tm") + em.mask_lines + lines + em.lines
    out = full_output(em, sg.outputs["grad"], state_order, state_order)
    return FunctionSpec(
        "_grad_decode",
        ["kernels", "cache", "P", "x", "xbar", *param_names, *hyper_names],
        "g = dE/dx (B, T, D) at T new tokens after P cached ones (``cache``, extended here).",
        body, out)


def _module_doc(layer: CompiledLayer) -> str:
    decl = layer.decl
    parts = []
    if decl.doc or layer.file.doc:
        parts.append((decl.doc or layer.file.doc).strip())
    energy = format_energy(layer.energy, "energy", layer.file.public)
    if layer.neurons:  # the energy reads the first layer's activation where it reads "x"
        energy = _rename_state(energy, "x", decl.neurons[0].public)
    parts.append("Energy (per updated token i):\n\n    E_i = " + energy)
    if layer.neurons:
        parts.append(_neurons_doc(layer))
        return "\n\n".join(parts).replace('"""', "'''").replace("\\", "\\\\")
    role = ("both roles of x (joint energy)" if decl.joint
            else f"x_i only (the memory {layer.file.public_name(layer.memory)} is held fixed)"
            if layer.memory else "x_i only (xbar is held fixed)")
    parts.append(
        "Layer: `steps` descent steps  x <- x - eta * P * dE/dx,  differentiating through "
        f"{role}.\nThe backward (second derivatives of E) is derived symbolically: see "
        "_grad_backward."
    )
    return "\n\n".join(parts).replace('"""', "'''").replace("\\", "\\\\")


def _neurons_doc(layer: CompiledLayer) -> str:
    """A neuron model's docstring part: each layer's Lagrangian and the dynamics."""
    decl = layer.decl
    lines = ["Neuron layers (state x, Lagrangian L(x); the activation g = dL/dx and its Jacobian",
             "J = dg/dx are derived):", ""]
    for n in decl.neurons:
        L = format_energy(layer.lagrangian, f"lagrangian:{n.input}", layer.file.public)
        L = _rename_state(L, n.public if n.input != "x" else "x", "x")
        lines.append(f"    {n.public} (over {layer.file.public_name(n.dim)}, tau {n.tau:g}): "
                     f"L(x_i) = {L}")
    step = ("x + dE/dg  (hamux's: the total energy adds each layer's x . g - L(x))"
            if decl.dynamics == "legendre" else "dE/dg  (the Energy Transformer's)")
    joint = " (E differentiated through both roles of g: joint)" if decl.joint else ""
    lines += ["", f"Layer: `steps` steps  x <- x - (eta / tau) P u,  u = {step}{joint},",
              "the activations recomputed from the Lagrangians inside the loop "
              "(energyc.runtime.neurons).",
              "The backward composes E's second derivatives (_grad_backward) with each "
              "Lagrangian's Hessian-vector product",
              "(_activation_backward), both derived symbolically."]
    return "\n".join(lines)


def _rename_state(formula: str, old: str, new: str) -> str:
    """``old_i`` / ``old_j`` (a state at a token, as formulas print it) as ``new_i`` / ``new_j``."""
    return re.sub(rf"(?<![\w.]){re.escape(old)}_([ij])(?!\w)", rf"{new}_\1", formula)
