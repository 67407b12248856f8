"""Human-readable views of graphs for ``energyc inspect``: the text views of
:mod:`energyc.ir.describe` (a table of ops and shapes, a formula) and a Graphviz picture."""

from __future__ import annotations

from energyc.ir.describe import _axes, format_energy, format_graph, formula
from energyc.ir.graph import Graph
from energyc.ir.ops import OPS

__all__ = ["format_energy", "format_graph", "formula", "to_dot"]


def to_dot(graph: Graph, name: str = "energy",
           param_dims: dict[str, tuple[str, ...]] | None = None) -> str:
    """The graph in Graphviz DOT (``dot -Tpng`` draws it); ``param_dims`` as in format_graph."""
    lines = [f'digraph "{name}" {{', "  rankdir=TB;", '  node [shape=box, fontname="monospace"];']
    for n in graph.live():
        node = graph.node(n)
        axes = ", ".join(_axes(node, param_dims))
        label = f"%{n} {OPS[node.op].describe(node)}\\n({axes})".replace('"', "'")
        lines.append(f'  n{n} [label="{label}"];')
        for u in node.inputs:
            lines.append(f"  n{u} -> n{n};")
    for out, n in graph.outputs.items():
        lines.append(f'  out_{out} [label="{out}", shape=ellipse];')
        lines.append(f"  n{n} -> out_{out};")
    lines.append("}")
    return "\n".join(lines) + "\n"
