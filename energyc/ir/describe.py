"""Graphs as text: a table of ops and shapes, and formulas (of an energy, of a pointwise body).

What code generation prints into docstrings and comments and what ``energyc inspect`` shows
share these; they import neither torch nor the command line's views (``energyc.inspect``, which
adds the Graphviz picture).
"""

from __future__ import annotations

import re

import sympy

from energyc.ir.graph import Graph, Node
from energyc.ir.ops import ARG_SYMBOLS, OPS, describe_mask


def _axes(node: Node, param_dims: dict[str, tuple[str, ...]] | None) -> tuple[str, ...]:
    """A node's axes; for a parameter, its dims as declared when ``param_dims`` names them (the
    graph keeps every value's axes in one canonical order, the Layer stores a parameter in the
    declared one)."""
    if node.op == "param" and param_dims and node.attr("name") in param_dims:
        return tuple(param_dims[node.attr("name")])
    return tuple(node.axes)


def format_graph(graph: Graph, title: str = "",
                 param_dims: dict[str, tuple[str, ...]] | None = None) -> str:
    """One line per live node: id, op, inputs, axes; then the outputs.

    Args:
        graph: the graph to print.
        title: a first line.
        param_dims: parameter name -> its declared dims, shown instead of the canonical order.
    """
    lines = [title] if title else []
    for n in graph.live():
        node = graph.node(n)
        ins = ", ".join(f"%{u}" for u in node.inputs)
        axes = "(" + ", ".join(_axes(node, param_dims)) + ")"
        lines.append(f"  %{n:<4} {axes:<18} {OPS[node.op].describe(node):<48} {ins}")
    outs = ", ".join(f"{k}=%{v}" for k, v in graph.outputs.items())
    lines.append(f"  outputs: {outs}")
    counts = ", ".join(f"{op}: {c}" for op, c in graph.op_counts().items())
    lines.append(f"  ops: {counts}")
    return "\n".join(lines)


def format_energy(graph: Graph, output: str, public: dict[str, str] | None = None) -> str:
    """The output as one formula, e.g. ``-sum_{H}(logsumexp_{j <= i}(...))/beta``.

    ``public`` maps code names to the declared names (``EnergyFile.public``), shown instead."""
    text = _format_energy(graph, output)
    for code, name in sorted((public or {}).items(), key=lambda item: -len(item[0])):
        if code != name:
            text = re.sub(rf"(?<!\w){re.escape(code)}(?!\w)", name, text)
    return text


def _format_energy(graph: Graph, output: str) -> str:
    memo: dict[int, str] = {}

    def fmt(n: int) -> str:
        if n in memo:
            return memo[n]
        node = graph.node(n)
        op = node.op
        if op == "input":
            text = f"{node.attr('name')}_i"
        elif op in ("param", "hyper"):
            text = node.attr("name")
        elif op == "const":
            text = str(node.attr("value"))
        elif op == "offset":
            text = "(i - j)"
        elif op == "relabel":
            inner = fmt(node.inputs[0])
            text = inner.replace("_i", "_j") if graph.node(node.inputs[0]).op == "input" else (
                f"{inner}[i->j]")
        elif op == "contract":
            summed = sorted(set().union(*(graph.node(u).axes for u in node.inputs))
                            - set(node.axes))
            prod = " * ".join(fmt(u) for u in node.inputs)
            text = f"sum_{{{', '.join(summed)}}}({prod})" if summed else f"({prod})"
        elif op == "pointwise":
            text = formula(node.attr("body"), [fmt(u) for u in node.inputs])
        elif op in ("reduce", "fused_reduce"):
            mask = node.attr("mask")
            over = describe_mask(mask) if mask else ", ".join(node.attr("axes"))
            name = "sum" if node.attr("kind") == "sum" else "logsumexp"
            if op == "reduce":
                text = f"{name}_{{{over}}}({fmt(node.inputs[0])})"
            else:
                n_pre = node.attr("n_pre")
                pre = formula(node.attr("pre"), [fmt(u) for u in node.inputs[:n_pre]])
                reduced = f"{name}_{{{over}}}({pre})"
                text = formula(node.attr("post"), [reduced] + [fmt(u) for u in node.inputs[n_pre:]])
        elif op == "mask":
            text = f"[{describe_mask(node.attr('mask'))}]*{_wrap(fmt(node.inputs[0]))}"
        elif op in ("pair_lse", "pair_sum"):
            text = _pair_formula(graph, node, fmt)
        elif op == "running_sum":
            text = f"sum_{{{describe_mask(node.attr('mask'))}}}({fmt(node.inputs[0])})"
        else:
            text = fmt(node.inputs[0])
        memo[n] = text
        return text

    return fmt(graph.outputs[output])


def _pair_formula(graph, node, fmt) -> str:
    """A pair op as ``logsumexp_{C}(phi)`` or ``sum_{C}(A * v)`` with its pairs written out."""
    from energyc.ir.pairs import DIST, e, form_of, u

    form = form_of(graph, node)
    subs = {u(t): sympy.Symbol(f"({fmt(q)} . {fmt(k)})") for t, (q, k) in
            enumerate(zip(form.q, form.k))}
    subs.update({e(m): sympy.Symbol(_wrap(fmt(x))) for m, x in enumerate(form.extras)})
    subs[DIST] = sympy.Symbol("(i - j)")
    body = sympy.sstr(node.attr("body").xreplace(subs))
    ctx = describe_mask(node.attr("mask"))
    if node.op == "pair_lse":
        return f"logsumexp_{{{ctx}}}({body})"
    value = f" * {_wrap(fmt(node.inputs[-1]))}" if node.attr("value") else ""
    over = "j" if node.attr("token") == "i" else "i"
    return f"sum_{{{over}: {ctx}}}({body}{value})"


def formula(body: sympy.Expr, args: list[str]) -> str:
    """``body`` with each argument ``a<k>`` written as the text ``args[k]``."""
    if body == ARG_SYMBOLS[0]:
        return args[0]
    subs = {ARG_SYMBOLS[k]: sympy.Symbol(_wrap(text)) for k, text in enumerate(args)}
    return sympy.sstr(body.xreplace(subs))


def _wrap(text: str) -> str:
    simple = text.replace("_", "").replace("{", "").replace("}", "").isalnum()
    return text if simple or (text.endswith(")") and text.count("(") == 1) else f"({text})"
