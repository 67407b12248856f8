"""Graphs as text: a table of ops and shapes, and formulas (of an energy, of a pointwise body).

What code generation prints into docstrings and comments and what ``energyc inspect`` shows
share these; they import neither torch nor the command line's views (``energyc.inspect``, which
adds the Graphviz picture).
"""

from __future__ import annotations

import re

from energyc.ir.graph import Graph, Node
from energyc.ir.ops import OPS, formula

__all__ = ["format_energy", "format_graph", "formula"]


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
    """Each node's formula (its op's ``formula`` of its inputs' formulas), from the output down."""
    memo: dict[int, str] = {}

    def fmt(n: int) -> str:
        if n not in memo:
            node = graph.node(n)
            memo[n] = OPS[node.op].formula(graph, node, [fmt(u) for u in node.inputs])
        return memo[n]

    return fmt(graph.outputs[output])
