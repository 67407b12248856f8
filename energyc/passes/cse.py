"""Common-subexpression elimination and dead-code removal.

Graphs are hash-consed, so re-adding every live node into a fresh graph merges equal nodes (same op,
inputs, attributes) and drops nodes no output uses. Both passes are that rebuild; ``cse`` also merges
pointwise nodes whose bodies differ only by argument order of commutative operations, because the
builder stores bodies in SymPy's canonical form.
"""

from __future__ import annotations

from energyc.ir.graph import Graph


def rebuild(graph: Graph) -> Graph:
    new = Graph(graph.dims)
    mapping = graph.copy_into(new)
    new.outputs = {name: mapping[n] for name, n in graph.outputs.items()}
    return new


def dead_code(graph: Graph) -> Graph:
    """Drop nodes that no output uses."""
    return rebuild(graph)


def cse(graph: Graph) -> Graph:
    """Merge equal nodes: ``f(a, b)`` computed twice becomes one node."""
    return rebuild(graph)
