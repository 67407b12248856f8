"""The Triton pair kernels (energyc.runtime.triton_pairs, printed per call by
energyc.backends.triton_pairs) on energies that are in no example: the pair forms of
tests/test_pairs.py (scores not linear in q . k, sums that are not log-sum-exps, several
contractions, per-head theta, grouped heads with an i - j term, two context sets, the key role of
a joint energy), under TRITON_INTERPRET=1.

At 37 tokens against the interpreter's 16 x 16 tiles each kernel runs several query and key
blocks with a ragged last one, so the online log-sum-exp rescales across tiles and every
context set's block ranges are exercised. There float32 meets its tolerance against the float64
reference; in half precision, where at this size the torch backend itself misses the table's
tolerance on some forms (its projections are half-precision contractions), the Triton path's
error is held to twice the torch backend's, as FlashAttention-style kernels (weights rounded to
the operands' dtype before their product with the values) are held to a plain implementation.
At the examples' 7 tokens, half precision meets the table too."""

from __future__ import annotations

import importlib
import re

import pytest
import torch

from energyc.check import import_generated
from energyc.compiler import compile_file
from energyc.loader import load
from energyc.render import render_files
from energyc.tolerances import tolerance
from tests.test_pairs import FORMS, _energy_file
from tests.test_triton_layers import DEVICES, DTYPES, check_triton_path, step_and_grads

pytest.importorskip("triton")

TOKENS = 37
PAIR_FORMS = sorted(n for n in FORMS if n != "running_sum")  # a prefix sum, not a pair kernel


def _module(tmp_path, name):
    (layer,) = compile_file(load(_energy_file(tmp_path, name)))
    return layer, import_generated(layer)


def _triton_source(module) -> str:
    return open(importlib.import_module(f"{module.__name__}._triton_layer").__file__).read()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", PAIR_FORMS)
def test_pair_kernels_against_autograd_reference(tmp_path, name, device):
    layer, module = _module(tmp_path, name)
    source = _triton_source(module)
    assert "_rt.pair_" not in source  # every pass over pairs is a kernel
    assert re.search(r"= _pairs\(", source)
    check_triton_path(layer, module, torch.float32, device, tokens=TOKENS)


@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
@pytest.mark.parametrize("name", PAIR_FORMS)
def test_pair_kernels_in_half_precision(tmp_path, name, dtype):
    layer, module = _module(tmp_path, name)
    check_triton_path(layer, module, dtype, "cpu")  # the examples' size: the table
    _, atol = tolerance(dtype)
    names, ours, exact = step_and_grads(layer, module, dtype, "cpu", TOKENS)
    _, theirs, _ = step_and_grads(layer, module, dtype, "cpu", TOKENS, backend="torch")
    for value, a, b, c in zip(names, ours, theirs, exact):
        if c is None:
            continue
        err_triton = (a - c).abs().max().item()
        err_torch = (b - c).abs().max().item()
        assert err_triton <= 2 * err_torch + atol, (value, err_triton, err_torch)


def test_a_missing_rescale_is_caught(tmp_path, monkeypatch):
    """The comparison can fail: the forward kernel without the online rescale of its
    accumulators (right while one key tile holds every key, wrong past it) is caught."""
    layer, module = _module(tmp_path, "per_head_theta")
    path = importlib.import_module(f"{module.__name__}._triton_layer").__file__
    source = open(path).read()
    broken = source.replace(" * scale[:, None] + ", " + ")
    assert broken != source
    open(path, "w").write(broken)
    (layer,) = compile_file(load(_energy_file(tmp_path, "per_head_theta")))
    tampered = _reimport(module, path)
    with pytest.raises(AssertionError):
        check_triton_path(layer, tampered, torch.float32, "cpu", tokens=TOKENS)
    check_triton_path(layer, tampered, torch.float32, "cpu", tokens=7)  # one tile: no rescale


def _reimport(module, path):
    import sys

    for key in [k for k in sys.modules if k.startswith(module.__name__)]:
        del sys.modules[key]
    spec = importlib.util.spec_from_file_location(
        module.__name__, path.replace("_triton_layer.py", "__init__.py"),
        submodule_search_locations=[path.rsplit("/", 1)[0]])
    fresh = importlib.util.module_from_spec(spec)
    sys.modules[module.__name__] = fresh
    spec.loader.exec_module(fresh)
    return fresh


ARCTAN_SCORES = """from energyc.dsl import *
import sympy
D, H, K = dims("D H K"); i, j = tokens(); x, xbar = state(D)
W_q = param("W_q", (H, K, D)); W_k = param("W_k", (H, K, D))
s = dot(W_q @ x[i], W_k @ xbar[j], over=K)
E = -logsumexp(apply(lambda v: 2 * sympy.atan(v / 2), s), over=j <= i).sum(H)
layer("f", E, eta=0.5)
"""


def _arctan_layer(tmp_path):
    """The arctan-capped energy, compiled, with the notes its rendering gives."""
    path = tmp_path / "f.py"
    path.write_text(ARCTAN_SCORES)
    (layer,) = compile_file(load(str(path)))
    notes: list[str] = []
    render_files(layer, str(path), notes)  # energyc compile prints these as notes
    return path, layer, notes


def test_a_body_triton_cannot_spell_stays_on_torch(tmp_path, monkeypatch):
    """A function with no Triton spelling (arctan, its spelling taken away here: every function
    the torch printer knows has one) leaves its passes over pairs to the torch runtime's calls
    on the Triton path (slower, never wrong), with a note, and the layer is right."""
    from energyc.backends import triton_printer

    monkeypatch.delitem(triton_printer.TRITON_FUNCTIONS, "atan")
    path, layer, notes = _arctan_layer(tmp_path)
    assert notes == [f"{path}:6: a pass over the pairs of a context set runs torch's code on the "
                     "Triton path: atan has no Triton spelling (correct; slower on a GPU)"]
    module = import_generated(layer)
    source = _triton_source(module)
    assert "_rt.pair_softmax_sums(" in source and "= _pairs(" not in source
    assert "math.atan" not in source
    check_triton_path(layer, module, torch.float32, "cpu", tokens=TOKENS)


def test_arctan_scores_run_on_the_pair_kernels(tmp_path):
    """arctan's Triton spelling (energyc.runtime.triton_math.atan): the same energy's passes
    over pairs are pair kernels, with no note, and the layer is right."""
    _, layer, notes = _arctan_layer(tmp_path)
    assert notes == []
    module = import_generated(layer)
    source = _triton_source(module)
    assert "_rt.pair_" not in source and "= _pairs(" in source and "_tm.atan(" in source
    check_triton_path(layer, module, torch.float32, "cpu", tokens=TOKENS)


def test_the_kernel_printer_never_spells_math():
    """Every function SymPy's Python printer knows prints as Triton's or is refused (then the
    node stays on torch); none as ``math.*``, which a kernel cannot call on a tile."""
    import sympy
    from sympy.printing.pycode import _known_functions, _known_functions_math

    from energyc.backends.triton_printer import NoTritonSpellingError, TritonPrinter

    x = sympy.Symbol("x")
    printer = TritonPrinter({"x": "a0"})
    spelled = []
    for name in sorted({**_known_functions, **_known_functions_math}):
        fn = getattr(sympy, name, None)
        if not isinstance(fn, sympy.FunctionClass):
            continue
        try:
            expr = fn(x)
        except TypeError:  # takes two arguments
            continue
        try:
            code = printer.doprint(expr)
        except NoTritonSpellingError:
            continue
        assert "math." not in code, (name, code)
        spelled.append(name)
    assert {"exp", "log", "erf", "tanh"} <= set(spelled)


def _probe_kernel():
    """A kernel writing each program's (lo, hi) of the kernels' block ranges (made on first use:
    a JIT function reads the globals of its module)."""
    global _probe, tl_, triton_layer_
    import triton
    import triton.language as tl_

    from energyc.runtime import triton_layer as triton_layer_

    @triton.jit
    def _probe(OUT, T, LO: tl_.constexpr, HI: tl_.constexpr, BLOCK_I: tl_.constexpr,
               BLOCK_J: tl_.constexpr, KEYS: tl_.constexpr):
        pid = tl_.program_id(0)
        if KEYS:
            lo, hi = triton_layer_.key_range(pid, T, LO, HI, BLOCK_I, BLOCK_J)
        else:
            lo, hi = triton_layer_.query_range(pid, T, LO, HI, BLOCK_I, BLOCK_J)
        tl_.store(OUT + 2 * pid, lo)
        tl_.store(OUT + 2 * pid + 1, hi)

    return _probe


def _ranges(T, ctx, BI, BJ):
    """(lo, hi) of key_range per query block and of query_range per key block, as the kernels
    compute them (one program per block, under the interpreter)."""
    probe = _probe_kernel()
    out = {}
    for keys, block in ((True, BI), (False, BJ)):
        n = -(-T // block)
        buf = torch.zeros(2 * n, dtype=torch.int32)
        probe[(n,)](buf, T, LO=ctx.lo, HI=ctx.hi, BLOCK_I=BI, BLOCK_J=BJ, KEYS=keys)
        out[keys] = buf.view(n, 2).tolist()
    return out[True], out[False]


@pytest.mark.parametrize("spelling", [("causal",), ("strict",), ("window", 5), ("window", 20),
                                      ("not_self",), ("all",)], ids=str)
def test_block_ranges_cover_the_context_set_and_skip_the_rest(spelling):
    """Each query block's key range holds every key its queries see, each key block's query
    range every query that sees one of its keys, and no more than the block grid adds: the
    object's range (``Context.key_range``, ``query_range``) with its start rounded down to a
    whole block of the other side."""
    from energyc.context import context

    ctx = context(spelling)
    T, BI, BJ = 37, 8, 16
    i = torch.arange(T)
    inside = ctx.contains(i[:, None], i[None, :])
    key_ranges, query_ranges = _ranges(T, ctx, BI, BJ)
    for b, (lo, hi) in enumerate(key_ranges):
        seen = inside[b * BI:(b + 1) * BI].any(0).nonzero().flatten()
        c0, c1 = ctx.key_range(b * BI, min((b + 1) * BI, T), T)
        assert (lo, max(lo, hi)) == (c0 // BJ * BJ, max(c0 // BJ * BJ, c1)), (b, lo, hi)
        if len(seen):  # the first query of j < i sees no key
            assert (c0, c1) == (int(seen.min()), int(seen.max()) + 1), (b, c0, c1)
        else:
            assert hi <= lo, (b, lo, hi)
    for b, (lo, hi) in enumerate(query_ranges):
        seen = inside[:, b * BJ:(b + 1) * BJ].any(1).nonzero().flatten()
        r0, r1 = ctx.query_range(b * BJ, min((b + 1) * BJ, T), T)
        assert (lo, hi) == (r0 // BI * BI, r1), (b, lo, hi)
        assert (r0, r1) == (int(seen.min()), int(seen.max()) + 1), (b, r0, r1)
