"""The IR: named-axis graphs (graph.py), the op table (ops.py) and the pair-reduction ops (pairs.py)."""

from energyc.ir import pairs as _pairs  # noqa: F401  (registers the pair ops in ops.OPS)
