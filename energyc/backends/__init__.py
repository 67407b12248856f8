"""Backends turn graphs into code; the graph code never imports a backend.

Each backend is one :class:`Backend` object (as SymForce's code generation configs): its name,
its emitter and the table of printing rules it prints with (one rule per op class, registered
beside the rule's code: :mod:`energyc.backends.rules`), its templates, the lowering that makes
their specs from a compiled layer, and the tuning tables of the runtime kernels it launches.
A compile reads in one direction: frontend -> ir -> autodiff -> passes -> each backend's lowering
(``energyc.backends.lowering``) -> ``energyc.render`` (render, format, write).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# importing a printing module registers its rules (torch_attention: the attention family's)
from energyc.backends import (  # noqa: F401
    lowering,
    rules,
    torch_attention,
    torch_backend,
    triton_backend,
)


@dataclass(frozen=True)
class Backend:
    """One code generation target.

    Attributes:
        name: "torch" or "triton" (the generated Layer's ``backend=`` argument).
        emitter: the class that prints a function's nodes with its table (``emitter.rules``).
        rules: its table, op class -> printing rule (every op of ``energyc.ir.ops.OPS`` has
            one: importing this package fails otherwise, naming the op and the backend).
        templates: (template under codegen_templates/, file written, dependency note) each.
        lower: ``lower(layer, source)``, the spec its templates render.
        tuning: the tables of launch sizes its kernels use at run time, as
            ``module:NAME`` of ``energyc.runtime`` (read by :meth:`tuning_tables`).
    """

    name: str
    emitter: type
    rules: rules.Rules
    templates: tuple[tuple[str, str, str], ...]
    lower: Callable[..., Any]
    tuning: tuple[str, ...]

    def tuning_tables(self) -> dict[str, Any]:
        """The tuning tables' current values (imports the runtime modules that hold them)."""
        out = {}
        for ref in self.tuning:
            module, name = ref.split(":")
            out[ref] = getattr(importlib.import_module(f"energyc.runtime.{module}"), name)
        return out


TORCH = Backend(
    name="torch",
    emitter=torch_backend.Emitter,
    rules=rules.TORCH,
    templates=(("torch/layer.py.j2", "layer.py", ""), ("torch/__init__.py.j2", "__init__.py", "")),
    lower=lowering.package_spec,
    tuning=("gemm:MIN_MACS", "flash_cpu:BLOCK", "flash_cpu:MIN_UNMASKED", "pairs:BLOCK_Q",
            "pairs:BLOCK_K"),
)

TRITON = Backend(
    name="triton",
    emitter=triton_backend.TritonEmitter,
    rules=rules.TRITON,
    templates=(("triton/layer.py.j2", "_triton_layer.py", "; this module also on triton"),),
    lower=lowering.triton_module_spec,
    tuning=("triton_layer:BLOCK", "triton_layer:BLOCK_O", "triton_layer:BLOCK_R",
            "triton_attention:GPU_TILES", "triton_attention:INTERPRETER_TILE",
            "triton_pairs:GPU_TILES", "triton_pairs:INTERPRETER_TILE"),
)

BACKENDS = (TORCH, TRITON)

rules.check_complete(*(backend.rules for backend in BACKENDS))
