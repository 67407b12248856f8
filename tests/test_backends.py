"""The backend objects and the op table: every op has its shape rule, VJP rule, description,
formula and reference evaluation, and one printing rule in every backend's table."""

from __future__ import annotations

import inspect
import os

import pytest

from energyc.backends import BACKENDS, TRITON, rules
from energyc.ir.evaluate import EVALUATORS
from energyc.ir.ops import OPS, Op
from energyc.render import templates_dir

# Op.vjp (no gradient): leaves, and attention_lse, a saved normaliser that only the attention
# family reads, whose gradients hold its dependence on the scores already
NO_VJP = {"input", "param", "hyper", "const", "offset", "position", "attention_lse"}
DESCRIBED_BY_ATTRIBUTES = {"broadcast"}  # Op.describe: its name and attributes
# Op.formula, their first input's: the energy's formula names what they are made from
FORMULA_OF_FIRST_INPUT = {"broadcast", "rotary", "attention", "attention_lse",
                          "attention_transposed", "attention_grad"}


def _own(op: type[Op], piece: str) -> bool:
    return getattr(op, piece) is not getattr(Op, piece)


@pytest.mark.parametrize("name", sorted(OPS))
def test_every_op_has_its_pieces_in_its_class_and_a_reference_evaluation(name):
    """Shape, VJP, description and formula on the op's class (or Op's default where listed),
    and a rule in the reference evaluation's table."""
    op = OPS[name]
    assert op.name == name
    assert _own(op, "shape")
    assert _own(op, "vjp") == (name not in NO_VJP)
    assert _own(op, "describe") == (name not in DESCRIBED_BY_ATTRIBUTES)
    assert _own(op, "formula") == (name not in FORMULA_OF_FIRST_INPUT)
    assert op in EVALUATORS, f"no reference evaluation for {name}"


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
    with pytest.raises(ImportError,
                       match="op 'contract' has no printing rule in the torch backend"):
        rules.check_complete(table, rules.TRITON)
    with pytest.raises(ValueError, match="two printing rules for op 'mask'"):
        table(OPS["mask"])(lambda em, nid, node: None)


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
