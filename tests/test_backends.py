"""The backend objects: one per target, each with a printing rule for every op, and the reference
evaluator of the op tests with a branch for every op."""

from __future__ import annotations

import ast
import inspect
import os

import pytest

from energyc.backends import BACKENDS, TRITON, rules
from energyc.ir.ops import OPS
from energyc.render import templates_dir
from tests import test_ops


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_every_op_has_a_printing_rule_in_every_backend(backend):
    # keyed by op class: one rule per op of the IR, found as OPS[node.op]
    assert set(backend.rules) == set(OPS.values()), set(OPS.values()) ^ set(backend.rules)
    assert backend.emitter.rules is backend.rules  # the table its emitter prints with
    assert all(callable(rule) for rule in backend.rules.values())


def test_a_missing_printing_rule_fails_naming_the_op_and_the_backend():
    table = rules.Rules("torch")
    table.update(rules.TORCH)
    del table[OPS["contract"]]
    with pytest.raises(ImportError, match="op 'contract' has no printing rule in the torch backend"):
        rules.check_complete(table, rules.TRITON)
    with pytest.raises(ValueError, match="two printing rules for op 'mask'"):
        table(OPS["mask"])(lambda em, nid, node: None)


def _evaluated_ops() -> set[str]:
    """The ops ``tests.test_ops._eval_node`` has a branch for: the names it compares ``op``
    with (``op == "x"``, ``op in (...)``, ``op in LEAF_OPS``)."""
    tree = ast.parse(inspect.getsource(test_ops._eval_node))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and getattr(node.left, "id", None) == "op":
            for right in node.comparators:
                if isinstance(right, ast.Constant):
                    names.add(right.value)
                elif isinstance(right, (ast.Tuple, ast.List, ast.Set)):
                    names.update(e.value for e in right.elts)
                elif isinstance(right, ast.Name):
                    names.update(getattr(test_ops, right.id))
    return names


def test_every_op_has_a_branch_in_the_reference_evaluator():
    assert set(OPS) <= _evaluated_ops(), set(OPS) - _evaluated_ops()


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_backend_templates_and_tuning_tables_exist(backend):
    if backend is TRITON:
        pytest.importorskip("triton")
    for template, out, _ in backend.templates:
        assert os.path.exists(os.path.join(templates_dir(), template)), template
        assert out.endswith(".py")
    assert list(backend.tuning_tables()) == list(backend.tuning)  # each names a runtime table


def test_render_walks_no_graph():
    """render.py renders, formats and writes: lowering (graph -> specs) is the backends'."""
    import energyc.render as render

    source = inspect.getsource(render)
    for walk in ("graph.live()", ".node(", "split(", "Emitter"):
        assert walk not in source, walk


def test_code_generation_does_not_import_the_command_lines_views():
    """Compiling and rendering a package reads formulas from energyc.ir.describe, not from the
    CLI's view module energyc.inspect (which draws pictures for `energyc inspect`)."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from energyc.compiler import compile_file\n"
            "from energyc.loader import load\n"
            "from energyc.render import render_files\n"
            "(layer,) = compile_file(load('examples/cem_attention.py'))\n"
            "render_files(layer, layer.file.path)\n"
            "assert 'energyc.inspect' not in sys.modules, 'imported energyc.inspect'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
