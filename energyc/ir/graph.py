"""The dataflow graph: immutable nodes with named axes, held in a networkx DiGraph.

Every value is a tensor whose axes are *named*: ``b`` (batch), ``i`` (the updated token), ``j``
(a context token) and the energy's declared dims (``D``, ``H``, ...). Axes are always stored in the
graph's canonical order ``(b, i, j, *dims)``, so aligning a value to a wider set of axes only ever
inserts singleton axes and never permutes.

Nodes are hash-consed: adding a node equal to an existing one (same op, inputs and attributes)
returns the existing id, so common subexpressions are shared by construction. Node ids grow in
insertion order, which is therefore a topological order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import networkx as nx

TOKEN_AXES = ("b", "i", "j")
#: A built-in feature axis of size 1, last in every graph's canonical order (no declared dim's
#: code name starts with an underscore: a dim declared "_1" is "n1__" in the graphs, see
#: energyc.names): a score term ``r_i * c_j`` of values of one token each is the contraction of
#: ``r_i`` and ``c_j`` over it (``passes.attention.fold_score_scales``).
UNIT = "_1"


@dataclass(frozen=True)
class Node:
    """One operation. ``attrs`` is a sorted tuple of (name, value) pairs; ``where`` is the source;
    ``label`` what the energy file calls the value, where the graph knows it (a name the file
    binds it to, ``q``; ``dq`` for dE/dq and ``grad_q`` for the backward's gradient of q): the
    generated variable's name (``backends.lowering``). Neither takes part in equality."""

    op: str
    inputs: tuple[int, ...]
    axes: tuple[str, ...]
    attrs: tuple[tuple[str, Any], ...] = ()
    where: str | None = field(default=None, compare=False, hash=False)
    label: str | None = field(default=None, compare=False, hash=False)

    def attr(self, name: str, default: Any = None) -> Any:
        for key, value in self.attrs:
            if key == name:
                return value
        return default

    @property
    def key(self) -> tuple:
        return (self.op, self.inputs, self.axes, self.attrs)


class Graph:
    """A graph of :class:`Node` under construction or finished; ``outputs`` names its results."""

    def __init__(self, dims: Iterable[str]) -> None:
        self.dims: tuple[str, ...] = tuple(dims)
        self.nx = nx.DiGraph()
        self.outputs: dict[str, int] = {}
        self._by_key: dict[tuple, int] = {}

    # -- construction ---------------------------------------------------------------------------
    def canonical(self, axes: Iterable[str]) -> tuple[str, ...]:
        """Sort axes into canonical order ``(b, i, j, *dims)``."""
        order = TOKEN_AXES + self.dims + (UNIT,)
        axes = set(axes)
        unknown = axes - set(order)
        if unknown:
            raise ValueError(f"unknown axes {sorted(unknown)}")
        return tuple(a for a in order if a in axes)

    def add(self, op: str, inputs: Iterable[int] = (), where: str | None = None, **attrs: Any) -> int:
        """Add (or find) a node; its axes come from the op's shape rule."""
        from energyc.ir.ops import OPS

        inputs = tuple(inputs)
        attr_items = tuple(sorted(attrs.items()))
        axes = OPS[op].shape(self, [self.node(u).axes for u in inputs], dict(attr_items))
        node = Node(op, inputs, axes, attr_items, where)
        existing = self._by_key.get(node.key)
        if existing is not None:
            return existing
        nid = self.nx.number_of_nodes()
        self.nx.add_node(nid, node=node)
        for pos, u in enumerate(inputs):
            if self.nx.has_edge(u, nid):
                self.nx.edges[u, nid]["positions"].append(pos)
            else:
                self.nx.add_edge(u, nid, positions=[pos])
        self._by_key[node.key] = nid
        return nid

    def add_like(self, node: Node, inputs: Iterable[int]) -> int:
        """Add (or find) a node with ``node``'s op, attributes, source and label, on new
        ``inputs``."""
        nid = self.add(node.op, inputs, where=node.where, **dict(node.attrs))
        self.label(nid, node.label)
        return nid

    def label(self, nid: int, label: str | None) -> None:
        """Give node ``nid`` the label ``label`` unless it has one (the first name a value gets
        is its name)."""
        node = self.node(nid)
        if label is not None and node.label is None:
            self.nx.nodes[nid]["node"] = replace(node, label=label)

    # -- queries --------------------------------------------------------------------------------
    def node(self, nid: int) -> Node:
        return self.nx.nodes[nid]["node"]

    def __len__(self) -> int:
        return self.nx.number_of_nodes()

    def ids(self) -> list[int]:
        """All node ids in topological (insertion) order."""
        return list(range(self.nx.number_of_nodes()))

    def users(self, nid: int) -> list[int]:
        return sorted(self.nx.successors(nid))

    def ancestors(self, roots: Iterable[int]) -> set[int]:
        seen: set[int] = set()
        stack = list(roots)
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            stack.extend(self.node(n).inputs)
        return seen

    def live(self) -> list[int]:
        """Ids reachable from the outputs, in topological order."""
        live = self.ancestors(self.outputs.values())
        return [n for n in self.ids() if n in live]

    def op_counts(self, live_only: bool = True) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.live() if live_only else self.ids():
            op = self.node(n).op
            counts[op] = counts.get(op, 0) + 1
        return dict(sorted(counts.items()))

    def rewritten(self, rule: Callable[[Graph, dict[int, int], int], int | None]) -> Graph:
        """A new graph of this graph's live nodes, inputs first, with the same outputs:
        ``rule(new, mapping, n)`` returns the id in ``new`` of what replaces node ``n`` (its
        inputs are in ``mapping`` already; the same value, which takes ``n``'s label where it
        has none), or None to copy the node as it is. The shape of every rewriting pass."""
        new = Graph(self.dims)
        mapping: dict[int, int] = {}
        for n in self.live():
            replaced = rule(new, mapping, n)
            if replaced is None:
                node = self.node(n)
                replaced = new.add_like(node, [mapping[u] for u in node.inputs])
            else:  # the same value: it keeps its name
                new.label(replaced, self.node(n).label)
            mapping[n] = replaced
        new.outputs = {name: mapping[n] for name, n in self.outputs.items()}
        return new

    def copy_into(self, other: Graph, mapping: Mapping[int, int] | None = None) -> dict[int, int]:
        """Re-add every live node of this graph to ``other``; return the id map."""
        mapping = dict(mapping or {})
        for n in self.live():
            if n in mapping:
                continue
            node = self.node(n)
            mapping[n] = other.add_like(node, [mapping[u] for u in node.inputs])
        return mapping

    def verify(self) -> None:
        """Check structural invariants: inputs precede users, axes obey each op's shape rule."""
        from energyc.ir.ops import OPS

        for n in self.ids():
            node = self.node(n)
            for u in node.inputs:
                if u >= n:
                    raise AssertionError(f"node {n} uses later node {u}")
            expected = OPS[node.op].shape(
                self, [self.node(u).axes for u in node.inputs], dict(node.attrs)
            )
            if expected != node.axes:
                raise AssertionError(f"node {n} ({node.op}) has axes {node.axes}, rule {expected}")
            if node.axes != self.canonical(node.axes):
                raise AssertionError(f"node {n} axes {node.axes} not canonical")
        for name, n in self.outputs.items():
            if n not in self.nx:
                raise AssertionError(f"output {name} missing")

    def describe(self, nid: int) -> str:
        from energyc.ir.ops import OPS

        node = self.node(nid)
        return OPS[node.op].describe(node)
