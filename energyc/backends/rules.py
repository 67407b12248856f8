"""Printing rules: each backend's table from op class to the function that prints a node.

A rule is registered against the op class it prints, beside its code::

    @TORCH(ops.Contract)
    def _emit_contract(em, nid, node) -> str | None: ...

and takes the emitter, the node's id and the node; it returns the node's expression (the emitter
binds it to the node's variable) or None where it binds names itself. A backend may take some
ops' rules from another (the Triton backend prints dense products, masks and attention calls as
the torch backend does): it names them (:meth:`Rules.reuse`), so every table lists every op.
:func:`check_complete`, run when ``energyc.backends`` is imported, fails naming the op and the
backend when an op of ``energyc.ir.ops.OPS`` has no rule.
"""

from __future__ import annotations

from collections.abc import Callable

from energyc.ir.ops import OPS, Op

Rule = Callable[..., "str | None"]


class Rules(dict):
    """One backend's table: op class -> printing rule."""

    def __init__(self, backend: str) -> None:
        super().__init__()
        self.backend = backend

    def __call__(self, *op_classes: type[Op]) -> Callable[[Rule], Rule]:
        """Register the decorated function as the rule of each of ``op_classes``."""

        def register(rule: Rule) -> Rule:
            for op in op_classes:
                if op in self:
                    raise ValueError(f"the {self.backend} backend has two printing rules for "
                                     f"op {op.name!r}")
                self[op] = rule
            return rule

        return register

    def reuse(self, other: Rules, *op_classes: type[Op]) -> None:
        """Print ``op_classes`` with ``other``'s rules (registered there already)."""
        for op in op_classes:
            if op not in other:
                raise ImportError(f"the {self.backend} backend reuses the {other.backend} "
                                  f"backend's rule for op {op.name!r}, which has none")
            self(op)(other[op])

    def missing(self) -> list[str]:
        """The ops of ``OPS`` with no rule here, by name."""
        return sorted(name for name, op in OPS.items() if op not in self)


def check_complete(*tables: Rules) -> None:
    """Fail (ImportError) naming each op and backend that has no printing rule."""
    gaps = [f"op {name!r} has no printing rule in the {t.backend} backend"
            for t in tables for name in t.missing()]
    if gaps:
        raise ImportError("; ".join(gaps))


TORCH = Rules("torch")  # backends/torch_backend.py, torch_attention.py, torch_pairs.py
TRITON = Rules("triton")  # backends/triton_backend.py, triton_pairs.py
