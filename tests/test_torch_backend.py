"""Printing helpers of the torch backend."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from energyc.backends.torch_backend import Emitter, _broadcast
from energyc.context import causal
from energyc.ir.graph import Graph


def test_broadcast_index():
    assert _broadcast("v", ("b", "i", "D"), ("b", "i", "D")) == "v"
    assert _broadcast("v", (), ("b", "i")) == "v"
    assert _broadcast("v", ("b", "i"), ("b", "i", "j", "D")) == "v[:, :, None, None]"
    assert _broadcast("v", ("i", "j"), ("b", "i", "j", "H")) == "v[None, :, :, None]"


def test_mask_of_a_pair_value_without_batch_is_the_mask_itself():
    """A (T, T) value needs the (T, T) mask of every row (this printed ``mask_causal[]``
    before); a value with the batch axis, the (B|1, T, T) mask as it is."""
    em = Emitter(Graph(("D",)), {}, {})
    assert em.mask(causal(), ("i", "j")) == "_rt.shared_mask(mask_causal)"
    assert em.mask(causal(), ("b", "i", "j", "D")) == "mask_causal[:, :, :, None]"


def test_functions_of_dim_sizes_print_as_math():
    """log, exp, tanh ... of constants (dim sizes) print with math.*; this crashed for every
    function but those with their own printer (SymPy registers the others one by one)."""
    import sympy

    from energyc.backends.torch_printer import TorchPrinter

    K = sympy.Symbol("K", positive=True)
    a0 = sympy.Symbol("a0")
    printer = TorchPrinter({"K": "K", "a0": "a0"}, {a0})
    assert printer.doprint(sympy.log(K)) == "math.log(K)"
    assert printer.doprint(a0 * sympy.log(K)) == "a0*math.log(K)"
    assert printer.doprint(sympy.tanh(K) + sympy.exp(a0)) == "torch.exp(a0) + math.tanh(K)"


def test_an_energy_with_log_of_a_dim_compiles_and_runs(tmp_path):
    import torch

    from energyc.check import import_generated
    from energyc.compiler import compile_file
    from energyc.loader import load

    path = tmp_path / "logk.py"
    path.write_text(
        "from energyc.dsl import *\n"
        "D, M = dims('D M'); i, j = tokens(); x, xbar = state(D)\n"
        "W = param('W', (M, D))\n"
        "E = -(log(M) * softplus(W @ x[i])).sum(M)\n"
        "layer('logk', E, eta=0.5)\n"
    )
    (layer,) = compile_file(load(str(path)))
    module = import_generated(layer)
    y = module.Layer(D=4, M=3)(torch.randn(2, 5, 4))
    assert y.shape == (2, 5, 4) and torch.isfinite(y).all()


def _step_calls(name: str) -> dict[str, str]:
    """The torch step functions of an example's generated layer.py, by name."""
    import ast

    source = open(f"generated/{name}/layer.py", encoding="utf-8").read()
    return {f.name: ast.get_source_segment(source, f) for f in ast.parse(source).body
            if isinstance(f, ast.FunctionDef)}


def test_attention_calls_over_the_same_scores_share_one_call():
    """The diagonal-plus-low-rank step's two values (W_k xbar_j and xbar_j) share one forward
    call and its backward one call; the Energy Transformer's two backward calls (query and key
    role) share one. Values, outputs and upstream gradients are concatenated."""
    for name in ("strict_dplr", "lm_attention_nope_dplr", "energy_transformer"):
        fns = _step_calls(name)
        assert fns["_grad_backward"].count("kernels.attention_backward(") == 1, name
        assert "torch.cat([" in fns["_grad_backward"], name
    assert _step_calls("strict_dplr")["_grad_forward"].count("kernels.attention_forward(") == 1
    # two context sets, two scores: nothing to share
    assert _step_calls("local_global_attention")["_grad_backward"].count(
        "kernels.attention_backward(") == 2


def test_backward_calls_merge_only_where_their_gradients_are_summed():
    """A consumer that uses one call's dq but not the other's (or weighs them differently) keeps
    the calls apart: the merged call gives only their sum."""
    import sympy

    from energyc.backends.torch_attention import _summed_alike

    g = Graph(("D",))
    a = g.add("input", name="a", axes=("b", "i", "D"))
    b = g.add("input", name="b", axes=("b", "i", "D"))
    x0, x1 = sympy.symbols("a0 a1")
    same = g.add("pointwise", [a, b], body=x0 + x1, axes=("b", "i", "D"))
    em = Emitter(g, {}, {})
    em.region = {same}
    assert _summed_alike(em, a, b)
    g2 = Graph(("D",))
    a2 = g2.add("input", name="a", axes=("b", "i", "D"))
    b2 = g2.add("input", name="b", axes=("b", "i", "D"))
    g2.add("pointwise", [a2, b2], body=x0 + 2 * x1, axes=("b", "i", "D"))
    em2 = Emitter(g2, {}, {})
    em2.region = set(g2.ids())
    assert not _summed_alike(em2, a2, b2)


def _expressions():
    """Random element-wise bodies over a0..a3: sums, differences, products, quotients,
    negations, numbers and functions, nested; products with affine factors c + s y and with
    steps (relu's derivative)."""
    import sympy
    from hypothesis import strategies as st

    from energyc.ir.functions import step

    syms = sympy.symbols("a0:4")
    leaves = st.sampled_from(syms) | st.sampled_from([sympy.Integer(2), sympy.Rational(1, 3),
                                                        sympy.Float(-0.5), sympy.S.One])

    def grow(children):
        pair = st.tuples(children, children)
        return (pair.map(lambda p: p[0] + p[1]) | pair.map(lambda p: p[0] - p[1])
                | pair.map(lambda p: p[0] * p[1]) | pair.map(lambda p: p[0] / (p[1] ** 2 + 1))
                | children.map(lambda c: -c) | children.map(sympy.tanh)
                | st.tuples(children, children, children).map(lambda p: p[0] * p[1] * (1 - p[2]))
                | pair.map(lambda p: p[0] * (sympy.Rational(-1, 2) + 3 * sympy.tanh(p[1]) ** 2))
                | pair.map(lambda p: p[0] * step(p[1])))

    return st.recursive(leaves, grow, max_leaves=8)


_SHAPES = {"full": (2, 3), "row": (1, 3), "col": (2, 1), "scalar": ()}


@settings(max_examples=300, deadline=None)
@given(body=_expressions(), kinds=st.lists(st.sampled_from(sorted(_SHAPES)), min_size=4,
                                           max_size=4))
def test_in_place_chains_print_the_same_values_and_leave_the_arguments_alone(body, kinds):
    """Products and sums print as in-place chains on a fresh first step (torch_printer): for
    arguments of every broadcast shape, the value equals the plain printing's, and no argument
    changes."""
    import math

    import sympy
    import torch

    from energyc import runtime
    from energyc.backends.torch_printer import TorchPrinter

    syms = sympy.symbols("a0:4")
    full = {s for s, k in zip(syms, kinds) if k == "full"}
    names = {s.name: s.name for s in syms}
    gen = torch.Generator().manual_seed(0)
    args = {s.name: torch.randn(_SHAPES[k], generator=gen, dtype=torch.float64)
            for s, k in zip(syms, kinds)}
    before = {k: v.clone() for k, v in args.items()}
    env = {"torch": torch, "math": math, "_rt": runtime}
    chained = TorchPrinter(names, set(syms), full).doprint(body)
    plain = TorchPrinter(names, set(syms)).doprint(body)
    got = eval(chained, {**env, **args})
    want = eval(plain, {**env, **args})
    got, want = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
    assert got.shape == want.shape, (chained, plain)
    # both printings evaluate the same float64 operations, in another order at most
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=f"{chained}\n{plain}")
    for k in args:
        assert torch.equal(args[k], before[k]), f"{k} changed by {chained}"


def test_affine_factors_print_as_one_pass_over_the_product():
    """``a b (1 - c)`` (a sigmoid's derivative) multiplies the product by ``1 - c`` in place
    (``_rt.mul_affine_``), and ``a (1 - c)`` alone makes its fresh tensor with
    ``torch.addcmul``: no temporary for ``1 - c``."""
    import sympy

    from energyc.backends.torch_printer import TorchPrinter

    a, b, c = sympy.symbols("a b c")
    names = {s.name: s.name for s in (a, b, c)}
    printer = TorchPrinter(names, {a, b, c}, {a})
    assert printer.doprint(-a * b * (1 - c)) == "_rt.mul_affine_((a * b), c, 1, -1).neg_()"
    assert printer.doprint(a * (1 - c)) == "torch.addcmul(a, a, c, value=-1)"
    assert printer.doprint(a * (2 + 4 * c)) == "torch.addcmul(a, a, c, value=2).mul_(2)"
    # without a full-shaped argument the plain printing stays
    assert "addcmul" not in TorchPrinter(names, {a, b, c}).doprint(a * (1 - c))


def _elementwise_ops(source: str, function: str) -> int:
    """The element-wise passes over memory of a generated step function: each torch function,
    operator and in-place step of its element-wise lines (einsums, kernel calls and views are
    not element-wise)."""
    import re

    body = source.split(f"def {function}(", 1)[1].split("\ndef ", 1)[0]
    count = 0
    for line in body.splitlines():
        code = line.split("#", 1)[0]
        if not re.match(r"\s+t\d+ = ", code) or re.search(r"einsum|kernels\.|_rt\.pair|permute",
                                                           code):
            continue
        rhs = code.split(" = ", 1)[1]
        count += len(re.findall(r"torch\.(?:ops\.aten\.)?\w+\(|_rt\.mul_affine_\(|\.(?:mul|div|add|sub|neg)_\("
                                r"|\.to\(", rhs))
        count += len(re.findall(r" [-+*/<>] |\*\*", rhs))
    return count


def test_gated_units_step_element_wise_passes():
    """The element-wise passes of cem_mlp's and recurrent_mlp's steps (the glue between their
    matrix products), fixed here so that a change in them is seen: cem_mlp's backward reuses the
    forward's product and multiplies by 1 - sigmoid in one pass; recurrent_mlp's relu(u)
    step(u) is relu(u) (functions.PRODUCT_IDENTITIES), its forward makes no step tensor, and
    its backward's a * step(u) is relu's backward op, one pass (torch_printer); a sum
    of two products of the weights' gradient is one GEMM (_rt.contract_add)."""
    import pathlib

    passes = {}
    for package in ("cem_mlp", "recurrent_mlp"):
        source = (pathlib.Path("generated") / package / "layer.py").read_text()
        passes[package] = tuple(_elementwise_ops(source, f) for f in
                                ("_grad_forward", "_grad_backward"))
    # cem_mlp: sigmoid, *, neg_ | *, mul_affine_; *, neg_ (d/dW's sum is inside its GEMM)
    assert passes["cem_mlp"] == (3, 4)
    # recurrent_mlp: relu, *, neg_ | a * step(u) in one pass (threshold_backward), mul_, neg_;
    # *, neg_
    assert passes["recurrent_mlp"] == (3, 5)
    assert "_rt.contract_add(" in source  # d/dW = grad_g^T t + x^T t': one GEMM with beta 1


def test_weight_gradients_come_out_in_the_weights_layout():
    """A parameter's gradient that is a product (or a sum of products) read by nothing else is
    printed with its einsum's output in the parameter's own axis order, so the backward returns
    it contiguous, not as a permuted view: autograd adds such a view into ``.grad`` by a strided
    pass. cem_mlp's d/dU and d/dW (whose sum of two products is one GEMM) and the Energy
    Transformer's d/dW_q, d/dW_k and d/dXi are returned as they are."""
    import pathlib

    def returned(package):
        source = (pathlib.Path("generated") / package / "layer.py").read_text()
        body = source.split("def _grad_backward", 1)[1].split("\ndef ", 1)[0]
        flat = " ".join(body.split()).replace("( ", "(").replace(" )", ")")  # layout aside
        return flat, body.strip().splitlines()[-1].strip()

    body, ret = returned("cem_mlp")
    assert ret == "return t10, t11, grad_W, grad_U"
    assert '"bim,bid->md", t8, xbar)' in body and '"bim,bid->md", t7, x)' in body
    body, ret = returned("energy_transformer")
    assert "permute" not in ret, ret
    # on the Triton path d/dW is an element-wise kernel's output (no GEMM takes the sum): it
    # keeps the canonical order and is permuted on return
    source = (pathlib.Path("generated") / "cem_mlp" / "_triton_layer.py").read_text()
    body = source.split("def _grad_backward", 1)[1].split("\ndef ", 1)[0]
    assert body.strip().splitlines()[-1].strip() == "return t10, t11, grad_W.permute(1, 0), grad_U"


@pytest.mark.parametrize("equation", ["bim,bid->dm", "bid,bim->dm", "bim,dm->bid", "dm,bim->bid",
                                      "bjhk,bjd->dhk", "ij,jk->ki"])
def test_contract_add_is_the_sum_and_the_product(equation):
    """_rt.contract_add(total, eq, a, b) = total + einsum(eq, a, b): in one GEMM for the
    contractions without a batch axis, in either output order, on transposed views too."""
    import torch

    from energyc import runtime as rt

    gen = torch.Generator().manual_seed(0)
    size = {"b": 2, "i": 5, "d": 3, "m": 4, "j": 5, "h": 2, "k": 3}
    ins, out = equation.split("->")
    a, b = (torch.randn(*(size[c] for c in ix), dtype=torch.float64, generator=gen)
            for ix in ins.split(","))
    a = a.transpose(0, -1).contiguous().transpose(0, -1)  # a strided view
    total = torch.randn(*(size[c] for c in out), dtype=torch.float64, generator=gen)
    got = rt.contract_add(total, equation, a, b)
    torch.testing.assert_close(got, total + torch.einsum(equation, a, b), rtol=1e-12, atol=1e-12)


def test_contract_add_falls_back_where_it_is_no_single_gemm():
    """A batch axis (in both operands and the output), other dtypes: einsum and an add."""
    import torch

    from energyc import runtime as rt

    a, b = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    total = torch.randn(2, 3, 5)
    torch.testing.assert_close(rt.contract_add(total, "bij,bjk->bik", a, b),
                               total + torch.einsum("bij,bjk->bik", a, b))
    got = rt.contract_add(total.double(), "bij,bjk->bik", a, b)
    assert got.dtype == torch.float64


def _printed_functions():
    """Every function the torch printer spells by name: SymPy's (TORCH_FUNCTIONS) and
    energyc's own with a torch spelling."""
    import sympy

    from energyc.backends.torch_printer import TORCH_FUNCTIONS
    from energyc.ir.functions import BUILTIN_FUNCTIONS

    own = {n: f for n, f in BUILTIN_FUNCTIONS.items() if f.torch}
    return {**{n: getattr(sympy, n) for n in TORCH_FUNCTIONS}, **own}


@pytest.mark.parametrize("name", sorted(_printed_functions()))
def test_in_place_scaling_is_safe_exactly_where_autograd_does_not_save_the_output(name):
    """SAVES_OUTPUT is the set of spellings whose result autograd saves: scaling ``f(a)`` in
    place (the chain ``f(a).mul_(c)``) breaks autograd exactly for those. A printer for a
    recorded function (the energy) scales them out of place, and autograd differentiates the
    result twice (gradgradcheck against finite differences)."""
    import math  # noqa: F401 - the printed code may read it

    import sympy
    import torch

    from energyc.backends.torch_printer import SAVES_OUTPUT, TorchPrinter

    f = _printed_functions()[name]
    a0 = sympy.Symbol("a0")
    expr = f(a0) / 3

    def run(recorded):
        code = TorchPrinter({"a0": "a0"}, {a0}, {a0}, recorded=recorded).doprint(expr)

        def fn(u):
            return eval(code, {"torch": torch, "math": math, "a0": u})
        return code, fn

    u = (torch.rand(5, dtype=torch.float64) * 0.8 + 0.1).requires_grad_(True)  # tan, log: 0 < u < 1
    code, fn = run(False)
    assert ".div_(3)" in code, code  # the plain printer scales f's result in place
    if name == "step":  # (u > 0).to(dtype): no derivative, nothing recorded
        assert not fn(u).requires_grad
        return
    try:
        fn(u).sum().backward()
        broke = False
    except RuntimeError as exc:
        assert "inplace operation" in str(exc)
        broke = True
    assert broke == (name in SAVES_OUTPUT), (name, code)
    code, fn = run(True)
    assert "_(" not in code or name not in SAVES_OUTPUT, code
    if name != "sign":  # piecewise constant: no derivative to check
        assert torch.autograd.gradgradcheck(fn, (u,)), code
    fn(u).sum().backward()


def test_a_user_function_that_prints_its_argument_is_not_scaled_in_place():
    """``c * f(a)`` scales f's result in place only where that result is a new tensor: a user
    function defined as ``u`` (or ``u + 1``) prints its argument (or a sum), and ``a0.mul_(3)``
    overwrote the argument itself."""
    import math  # noqa: F401 - the printed code may read it

    import sympy
    import torch

    from energyc.backends.torch_printer import TorchPrinter
    from energyc.ir.functions import elementwise

    a0 = sympy.Symbol("a0")
    for f in (elementwise("_same", lambda u: u), elementwise("_shifted", lambda u: u + 1),
              elementwise("_exp_of", lambda u: sympy.exp(u))):
        code = TorchPrinter({"a0": "a0"}, {a0}, {a0}).doprint(3 * f(a0))
        u = torch.ones(3, dtype=torch.float64)
        out = eval(code, {"torch": torch, "math": math, "a0": u})
        assert torch.equal(u, torch.ones(3, dtype=torch.float64)), code
        expected = 3 * (f.definition(sympy.Integer(1)))
        assert torch.allclose(out, torch.full((3,), float(expected), dtype=torch.float64)), code
    # a definition that is one torch call is a new tensor: scaled in place as before
    assert ".mul_(3)" in TorchPrinter({"a0": "a0"}, {a0}, {a0}).doprint(
        3 * elementwise("_exp_of2", lambda u: sympy.exp(u))(a0))
