"""Graph passes and the pipeline that runs them in order.

Each pass takes a :class:`~energyc.ir.graph.Graph` and returns a new one with the same outputs.
``ENERGYC_DEBUG=1`` prints the graph after every pass.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from energyc.ir.graph import Graph
from energyc.passes.attention import (
    fold_score_scales,
    fuse_context_attention,
    fuse_context_lse,
    split_context_sums,
)
from energyc.passes.canonicalize import canonicalize
from energyc.passes.cse import cse, dead_code
from energyc.passes.fuse import fuse_pointwise, fuse_reductions
from energyc.passes.pairs import expand_feature_sums, fuse_pair_reductions, log_sums_as_lse
from energyc.passes.share import reuse_values, share_subexpressions

Pass = Callable[[Graph], Graph]

#: The pipeline, in order. Read it top to bottom. Each pass belongs to a stage (:data:`STAGE`):
#: ``energy`` passes run on the energy before the first differentiation, ``simplify`` passes after
#: each differentiation, ``lower`` passes (which only serve the backends) once, after the last;
#: ``step`` passes as ``lower`` ones, on the step graph only (the energy graph's function
#: (``Layer.energy``) stays differentiable by autograd, which the fused attention calls are not).
PIPELINE: list[tuple[str, Pass]] = [
    ("expand_feature_sums", expand_feature_sums),
    ("log_sums_as_lse", log_sums_as_lse),
    ("fold_score_scales", fold_score_scales),
    ("fuse_pair_reductions", fuse_pair_reductions),
    ("dead_code", dead_code),
    ("canonicalize", canonicalize),
    ("cse", cse),
    ("fuse_pointwise", fuse_pointwise),
    ("split_context_sums", split_context_sums),
    ("fuse_context_attention", fuse_context_attention),
    ("fuse_context_lse", fuse_context_lse),
    ("reuse_values", reuse_values),
    ("share_subexpressions", share_subexpressions),
    ("fuse_reductions", fuse_reductions),
]

STAGE = {"expand_feature_sums": "energy", "log_sums_as_lse": "energy",
         "fold_score_scales": "energy", "fuse_pair_reductions": "energy",
         "fuse_context_lse": "step", "reuse_values": "lower", "share_subexpressions": "lower",
         "fuse_reductions": "lower"}
STAGES = ("energy", "simplify", "lower", "step")


def run_pipeline(graph: Graph, verify: bool = False,
                 stages: tuple[str, ...] = STAGES) -> Graph:
    """Run the passes of ``stages`` (by default all) in pipeline order."""
    debug = os.environ.get("ENERGYC_DEBUG") == "1"
    for name, pass_fn in PIPELINE:
        if STAGE.get(name, "simplify") not in stages:
            continue
        graph = pass_fn(graph)
        if verify:
            graph.verify()
        if debug:
            from energyc.ir.describe import format_graph

            print(f"--- after {name} ---")
            print(format_graph(graph))
    return graph
