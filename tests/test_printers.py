"""The torch and Triton printers against SymPy's own evaluation of the same body.

Each body is evaluated three ways at the same points: (a) a one-kernel Triton module printed from
the Triton printer's output (under TRITON_INTERPRET=1 on CPU, as the other Triton tests), (b) the
torch printer's code run by torch, (c) SymPy's expression with energyc's functions expanded to
their definitions, evaluated by mpmath at 50 digits: the truth. Points are float32 numbers, so
both dtypes see the same exact inputs.

What a dtype is held to, at a point where every node of the body (every function value, power,
sum, product) is real and finite in that dtype: the tolerance of energyc.tolerances with |want|
replaced by the body's condition sum_n |n df/dn| over its nodes n (numbers included: 1/3 is
rounded too; the inputs, exact, are not nodes), computed from mpmath by perturbing each node's
value: if every node may err by rtol relative, f errs by at most rtol sum_n |n df/dn| to first
order. The sum has the root's own |f|, so it is never below the table's bound; where a body
cancels (sinh(u) - u at small u) it grows as the value's sensitivity does, and no further. A
point that a discontinuity (sign, step, Heaviside, a Piecewise condition) could flip within its
argument's own tolerance is left out, as is one where a node is complex (a log or root of a
negative number: both printers give NaN there, as torch does), and one where a node below the
body's root underflows: its exact value is not 0 but smaller in magnitude than the dtype's
smallest normal number (``torch.finfo(dtype).tiny``), where the dtype holds it to no relative
precision (0 or a subnormal) and the condition, a relative one, bounds nothing: (a1**13)**a1 at
a1 = 1e-4 is 0.988, and 0 in float32, whose a1**13 is 0. The root itself may underflow: its
error is then within the tolerance's atol.

The drawn bodies are made from the fixed tables below (UNARY, EXPONENTS, BINARY, NUMBERS, and
this module's own ``one_minus``). Which ones are drawn still depends on what the process imported
before: Hypothesis (6.155) takes a share of its numbers (5% of integers, 15% of floats) from the
literals of every local module loaded so far, and has no setting to stop it, so after
tests/test_check.py (which loads the compiler and generated packages) the 150 examples diverge
from the 49th on. Every example is held to the rules above either way.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import math
import operator
import os
import re
import shutil
import sys
import tempfile

import mpmath
import pytest
import sympy
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from energyc import runtime
from energyc.backends.torch_printer import TORCH_FUNCTIONS, TorchPrinter
from energyc.backends.triton_printer import TritonPrinter
from energyc.ir import functions as fns
from energyc.ir.ops import ARG_SYMBOLS
from energyc.tolerances import tolerance

triton = pytest.importorskip("triton")

X, Y = ARG_SYMBOLS[0], ARG_SYMBOLS[1]
DTYPES = (torch.float64, torch.float32)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DIGITS = 50  # mpmath's working precision for the truth and the conditions

# torch's own float32 sinh and cosh (its vectorised CPU kernels, on tensors of 32 elements or
# more) overflow where exp does, at |u| > 88.72, not at sinh's and cosh's 89.41: the torch printer
# spells them so, and is held to them only below half the largest float (a node of that kind and
# printer over this fraction of the dtype's largest number is not compared)
OVERFLOWS_EARLY = {("torch", sympy.sinh): 0.5, ("torch", sympy.cosh): 0.5}

# a user's function with no spelling: the printers print its definition, a sum
ONE_MINUS = fns.elementwise("_test_printers_one_minus", lambda u: 1 - u)

KERNEL = """import triton
import triton.language as tl
{imports}

@triton.jit
def kernel(OUT, IN0, IN1, N, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    valid = offs < N
    a0 = tl.load(IN0 + offs, mask=valid, other=0.0).to(ACC)
    a1 = tl.load(IN1 + offs, mask=valid, other=0.0).to(ACC)
    out = {expr}
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=valid)
"""
_KERNEL_DIR = tempfile.mkdtemp(prefix="energyc-printers-")
atexit.register(shutil.rmtree, _KERNEL_DIR, ignore_errors=True)


@functools.cache
def _kernel(expr: str):
    """The element-wise kernel ``out = expr`` over a0, a1 (as the generated element-wise
    kernels: loads in ACC, the body, a store), in a module file of its own (Triton reads a JIT
    function's source)."""
    imports = "from energyc.runtime import triton_math as _tm" if "_tm." in expr else ""
    name = f"_printers_kernel{len(os.listdir(_KERNEL_DIR))}"
    path = os.path.join(_KERNEL_DIR, f"{name}.py")
    with open(path, "w") as f:
        f.write(KERNEL.format(imports=imports, expr=expr))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module.kernel


def triton_values(body, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """The body at (xs, ys) by a kernel of the Triton printer's code, in the inputs' dtype."""
    kernel = _kernel(TritonPrinter({X.name: "a0", Y.name: "a1"}).doprint(body))
    xs, ys = xs.to(DEVICE), ys.to(DEVICE)
    out = torch.empty_like(xs)
    acc = triton.language.float64 if xs.dtype == torch.float64 else triton.language.float32
    kernel[(1,)](out, xs, ys, xs.numel(), ACC=acc, BLOCK=triton.next_power_of_2(xs.numel()))
    return out.cpu()


def torch_values(body, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """The body at (xs, ys) by the torch printer's code (in-place chains on: both arguments
    have the output's shape)."""
    code = TorchPrinter({X.name: "x", Y.name: "y"}, {X, Y}, {X, Y}).doprint(body)
    env = {"torch": torch, "math": math, "_rt": runtime, "x": xs.clone(), "y": ys.clone()}
    return torch.as_tensor(eval(code, env), dtype=xs.dtype).expand(xs.shape)


def _expanded(expr):
    """``expr`` with energyc's functions replaced by their definitions (SymPy's own terms)."""
    return expr.replace(
        lambda e: isinstance(e, fns.EnergyFunction), lambda e: type(e).definition(e.args[0])
    )


def _mp(expr, symbols=(X, Y)):
    """``expr`` as an mpmath function of ``symbols``: NaN where mpmath divides by 0 or
    compares a complex number (a Max or a condition of a log of a negative number)."""
    # a definition's division by 0 (1 / step(u) = 1 / Piecewise(..)) is zoo: NaN there
    f = sympy.lambdify(symbols, _expanded(expr).xreplace({sympy.zoo: sympy.nan}), modules="mpmath")

    def value(*args):
        try:
            return f(*args)
        except (ZeroDivisionError, TypeError):
            return mpmath.nan

    return value


def _real(value) -> bool:
    return isinstance(value, (mpmath.mpf, int, float)) and mpmath.isfinite(value)


def _exact(number) -> bool:
    """Whether a SymPy number is a float32 number (then no dtype rounds it)."""
    if not (number.is_Rational or number.is_Float):
        return False
    as_float32 = torch.tensor(float(number), dtype=torch.float32).item()
    return math.isfinite(as_float32) and sympy.Rational(as_float32) == sympy.Rational(number)


def _nodes(body) -> list:
    """The distinct nodes of ``body`` whose values the printed code computes (rounded): every
    function value, power, sum and product, and every number that float32 rounds."""
    out = []
    for node in sympy.preorder_traversal(body):
        if node.is_Symbol or node.is_Relational or node.is_Boolean:
            continue
        if node.is_number and node.is_Atom and _exact(node):
            continue
        if isinstance(node, sympy.Expr) and node not in out:
            out.append(node)
    return out


class Reference:
    """What SymPy says about ``body``: its value, its nodes' values, its condition, its
    discontinuities' arguments, at a point (x, y)."""

    def __init__(self, body):
        self.body = body
        self.value = _mp(body)
        # innermost first (reversed preorder: a node after all of its arguments), so that no
        # node is evaluated whose arguments are beyond float64 (exp(exp(95)) would not end)
        inner_first = _nodes(body)[::-1]
        self.nodes = [_mp(n) for n in inner_first]
        self.kinds = [type(n) for n in inner_first]
        self.inner = [n != body for n in inner_first]
        h = sympy.Dummy("h")
        self.perturbed = [
            _mp(body.xreplace({n: n * (1 + h)}), (X, Y, h)) for n in _nodes(body) if n != body
        ]
        self.jumps = [(arg, Reference(arg)) for arg in _jump_arguments(body)]

    def condition(self, x, y) -> mpmath.mpf:
        """sum_n |n df/dn| at (x, y), by central differences of f with node n scaled by 1 + h."""
        step = mpmath.mpf(10) ** -(DIGITS // 2)
        total = abs(self.value(x, y))
        for f in self.perturbed:
            total += abs((f(x, y, step) - f(x, y, -step)) / (2 * step))
        return total

    def comparable(self, x, y, dtype, printer: str = "triton") -> bool:
        """Every node real and finite in ``dtype`` (as ``printer``'s functions compute it), no
        discontinuity within reach."""
        biggest, tiny = torch.finfo(dtype).max, torch.finfo(dtype).tiny
        for kind, value, inner in zip(self.kinds, self.nodes, self.inner):
            v = value(x, y)
            if not _real(v) or abs(v) > biggest * OVERFLOWS_EARLY.get((printer, kind), 1):
                return False
            if inner and 0 < abs(v) < tiny:  # underflows: see the module docstring
                return False
        rtol, atol = tolerance(dtype)
        for _, ref in self.jumps:
            # the argument g of a jump, off by at most its own tolerance: |g| must exceed it
            if not ref.comparable(x, y, dtype):
                return False
            if abs(ref.value(x, y)) <= atol + rtol * ref.condition(x, y):
                return False
        return True


def _jump_arguments(body) -> list:
    """The arguments g of the discontinuities of ``body``: sign(g), step(g), Heaviside(g), and
    g = lhs - rhs of each condition of a Piecewise."""
    out = []
    for node in sympy.preorder_traversal(body):
        if isinstance(node, (sympy.sign, fns.step, sympy.Heaviside)):
            out.append(node.args[0])
        elif isinstance(node, sympy.Piecewise):
            for _, cond in node.args:
                out.extend(
                    r.lhs - r.rhs
                    for r in sympy.preorder_traversal(cond)
                    if isinstance(r, sympy.core.relational.Relational)
                )
    return [g for g in out if g.free_symbols]


def check_body(body, points: list[tuple[float, float]]) -> int:
    """Compare the two printers with SymPy at ``points`` in float64 and float32 (where the
    dtype can, see the module docstring); the number of comparisons made."""
    ref = Reference(body)
    made = 0
    with mpmath.workdps(DIGITS):
        for dtype in DTYPES:
            rtol, atol = tolerance(dtype)
            xs = torch.tensor([p[0] for p in points], dtype=dtype)
            ys = torch.tensor([p[1] for p in points], dtype=dtype)
            got = {"triton": triton_values(body, xs, ys), "torch": torch_values(body, xs, ys)}
            for k, (x, y) in enumerate(points):
                mx, my = mpmath.mpf(x), mpmath.mpf(y)
                for printer, values in got.items():
                    if not ref.comparable(mx, my, dtype, printer):
                        continue
                    want = ref.value(mx, my)
                    bound = atol + rtol * ref.condition(mx, my)
                    value = values[k].item()
                    error = abs(mpmath.mpf(value) - want) if math.isfinite(value) else math.inf
                    assert error <= bound, (
                        f"{printer} printer, {dtype}: {body} at a0={x!r}, a1={y!r} gives "
                        f"{value!r}, SymPy {mpmath.nstr(want, 17)} (error {float(error):.3e}, "
                        f"allowed {float(bound):.3e})\n"
                        f"triton: {TritonPrinter({X.name: 'a0', Y.name: 'a1'}).doprint(body)}\n"
                        f"torch: {TorchPrinter({X.name: 'x', Y.name: 'y'}, {X, Y}).doprint(body)}"
                    )
                    made += 1
    return made


# -- the functions the printers know -----------------------------------------------------------

UNARY = {
    "exp": sympy.exp,
    "log": sympy.log,
    "tanh": sympy.tanh,
    "sinh": sympy.sinh,
    "cosh": sympy.cosh,
    "sin": sympy.sin,
    "cos": sympy.cos,
    "tan": sympy.tan,
    "atan": sympy.atan,
    "erf": sympy.erf,
    "erfc": sympy.erfc,
    "Abs": sympy.Abs,
    "sign": sympy.sign,
    "asinh": sympy.asinh,
    "sigmoid": fns.sigmoid,
    "softplus": fns.softplus,
    "relu": fns.relu,
    "step": fns.step,
    "sqrt": sympy.sqrt,
    "Heaviside": sympy.Heaviside,
    "neg": operator.neg,
    "one_minus": ONE_MINUS,
}
EXPONENTS = (
    [sympy.Integer(n) for n in (-12, -3, -2, -1, 2, 3, 5, 8, 9, 13)]
    + [sympy.Rational(p, q) for p, q in ((1, 2), (-1, 2), (3, 2), (-3, 2), (5, 2), (1, 3), (-2, 3))]
    + [sympy.Float(2.5), sympy.Float(0.7)]
)
BINARY = {
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
    "div": operator.truediv,
    "Max": sympy.Max,
    "Min": sympy.Min,
    "pow": operator.pow,
}
NUMBERS = [
    sympy.Integer(2),
    sympy.Integer(-3),
    sympy.S.Half,
    sympy.Rational(1, 3),
    sympy.Float(0.25),
]


def _bodies():
    """Compositions of the functions above with sums, products, quotients, powers (constant and
    tensor exponents), Max, Min, Piecewise and negation, over a0, a1 and some numbers: trees
    of depth 2 to 4, a function or operator at every inner node."""
    leaves = st.sampled_from([X, Y] * 4 + NUMBERS)

    def made(f, *args):
        try:
            return f(*args)
        # Max(log(-3), ..), Heaviside(I): SymPy refuses a complex number (ValueError); so does
        # a Piecewise condition log(-3) > 0 (TypeError: "Invalid comparison of non-real")
        except (ValueError, TypeError):
            return args[0]

    @st.composite
    def tree(draw, depth):
        if depth == 0:
            return draw(leaves)
        kind = draw(st.sampled_from(["unary", "unary", "power", "binary", "binary", "piecewise"]))
        child = draw(tree(depth - 1))
        if kind == "unary":
            return made(UNARY[draw(st.sampled_from(sorted(UNARY)))], child)
        if kind == "power":
            return child ** draw(st.sampled_from(EXPONENTS))
        other = draw(tree(draw(st.integers(0, depth - 1))))
        if kind == "binary":
            return made(BINARY[draw(st.sampled_from(sorted(BINARY)))], child, other)
        condition = draw(tree(draw(st.integers(0, depth - 1))))
        return made(lambda a, b: sympy.Piecewise((a, condition > 0), (b, True)), child, other)

    return st.integers(2, 4).flatmap(tree)


def _coordinate():
    """A float32 number: small, moderate, up to 100 in magnitude, or where exp overflows in
    float32 (88.7) and sinh and cosh do not yet (89.4)."""
    magnitude = st.one_of(
        st.floats(0, 4), st.floats(-6, 2).map(lambda e: 10.0**e), st.floats(87, 92)
    )
    signed = st.tuples(st.sampled_from([-1.0, 1.0]), magnitude).map(lambda t: t[0] * t[1])
    return signed.map(lambda v: torch.tensor(v, dtype=torch.float32).item())


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow],
)
@given(
    body=_bodies(), points=st.lists(st.tuples(_coordinate(), _coordinate()), min_size=8, max_size=8)
)
def test_printed_bodies_agree_with_sympy(body, points):
    """Both printers' code of a drawn body agrees with SymPy within the dtype's tolerance
    (scaled by the body's condition) wherever the dtype can represent every node."""
    assume(body.free_symbols and not body.has(sympy.zoo, sympy.nan, sympy.oo, sympy.I))
    assume(check_body(body, points) > 0)


# -- the functions one by one, at points that find each known failure -------------------------

# small (cancellation), moderate, and large: beyond exp's float32 overflow (88.72) but within
# sinh's and cosh's (89.41), beyond both, and far beyond (where u**2 overflows float32)
GRID = [
    0.0,
    1e-6,
    3e-4,
    0.02,
    0.3,
    0.5,
    0.7,
    1.0,
    2.5,
    4.0,
    6.0,
    9.5,
    27.0,
    88.5,
    89.0,
    89.3,
    95.0,
    1e10,
    1e30,
]
GRID = sorted({torch.tensor(s * v, dtype=torch.float32).item() for v in GRID for s in (-1, 1)})


def _functions() -> dict:
    """Every function the torch printer knows (its table, its own printing methods and
    energyc's functions), as a body in a0."""
    out = {name: getattr(sympy, name)(X) for name in TORCH_FUNCTIONS}
    out.update({f.__name__: f(X) for f in fns.BUILTIN_FUNCTIONS.values()})
    out.update(
        {
            "Heaviside": sympy.Heaviside(X),
            "Max": sympy.Max(X, Y, 1),
            "Min": sympy.Min(X, 0),
            "Piecewise": sympy.Piecewise((X, X > 1), (Y, True)),
            "sqrt": sympy.sqrt(X),
            "rsqrt": 1 / sympy.sqrt(X),
            "one_minus": ONE_MINUS(X),
            "power": X**Y,
            "negative_base": (-3) ** X + sympy.Rational(-1, 3) ** X,
        }
    )
    out.update({f"pow{e}": X**e for e in EXPONENTS})
    return out


FUNCTIONS = _functions()


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_each_function_agrees_with_sympy(name):
    """Each function alone and as an operand (2 f, f**2, 1 / (1 + f**2), 1 - f: a factor, a
    base, a divisor's term, a subtrahend), on the grid."""
    f = FUNCTIONS[name]
    points = [(x, 0.75) for x in GRID]
    for body in (f, 2 * f, f**2, 1 / (1 + f**2), 1 - f):
        check_body(body, points)


# -- regressions -------------------------------------------------------------------------------


def test_sinh_cosh_ratio():
    """log(cosh(u))'s derivatives, SymPy's sinh(u) / cosh(u) and 1 - sinh(u)**2 / cosh(u)**2
    (a user's energy: the Triton printer wrote the ratio without parentheses, relative error
    2.7; and inf / inf beyond |u| = 89.4 in float32 on both printers): tanh and sech**2 within
    the tolerance, 1 and 0 for large |u|."""
    u = X
    ratio = sympy.diff(sympy.log(sympy.cosh(u)), u)
    assert ratio == sympy.sinh(u) / sympy.cosh(u)
    second = sympy.diff(ratio, u)
    third = sympy.diff(second, u)
    points = [(x, 0.0) for x in GRID]
    for body in (ratio, second, third, sympy.sinh(u) / sympy.cosh(u) ** 2, 3 * ratio):
        assert check_body(body, points) >= 2 * len(GRID)  # both dtypes at every point
    for dtype in DTYPES:
        xs = torch.tensor([-100.0, 100.0], dtype=dtype)
        for values in (triton_values, torch_values):
            assert values(ratio, xs, xs).tolist() == [-1.0, 1.0]
            assert values(second, xs, xs).tolist() == [0.0, 0.0]


def test_three_halves_power_on_triton():
    """c**(3/2) (a Laplace kernel's backward) prints as c * sqrt(c): no fallback to torch."""
    c = X
    assert TritonPrinter({X.name: "c0"}).doprint(c ** sympy.Rational(3, 2)) == (
        "(c0 * tl.sqrt(c0))"
    )
    assert TritonPrinter({X.name: "c0"}).doprint(c ** sympy.Rational(-3, 2)) == (
        "(1.0 / (c0 * tl.sqrt(c0)))"
    )
    check_body(c ** sympy.Rational(3, 2) + c ** sympy.Rational(-3, 2), [(x, 0.0) for x in GRID])


def test_every_function_the_torch_printer_knows_has_a_triton_spelling():
    """No body of FUNCTIONS raises NoTritonSpellingError (each would leave its node or pass
    over pairs to torch on the Triton path)."""
    printer = TritonPrinter({X.name: "a0", Y.name: "a1"})
    for name, body in FUNCTIONS.items():
        assert "math." not in printer.doprint(body), name
    assert set(TORCH_FUNCTIONS) <= set(FUNCTIONS)


LOG_COSH = """from energyc.dsl import *
D, M = dims("D M"); i, j = tokens(); x, xbar = state(D)
W = param("W", (M, D)); U = param("U", (M, D))
E = log(cosh(W @ x[i])).sum(M) - dot(U @ xbar[i], W @ x[i], over=M)
layer("log_cosh", E, eta=0.5)
"""

LAPLACE_KERNEL = """from energyc.dsl import *
D, H, K = dims("D H K"); i, j = tokens(); x, xbar = state(D)
W_q = param("W_q", (H, K, D)); W_k = param("W_k", (H, K, D))
r2 = ((W_q @ x[i] - W_k @ xbar[j]) ** 2).sum(K)
E = -logsumexp(-sqrt(r2 + 1), over=j <= i).sum(H)
layer("laplace_kernel", E, eta=0.5)
"""


def _compiled(tmp_path, text):
    """The layer of the energy file ``text``, its generated module and the notes of its
    rendering (what the Triton path leaves to torch)."""
    from energyc.check import import_generated
    from energyc.compiler import compile_file
    from energyc.loader import load
    from energyc.render import render_files

    path = tmp_path / "energy.py"
    path.write_text(text)
    (layer,) = compile_file(load(str(path)))
    notes: list[str] = []
    files = render_files(layer, str(path), notes)
    return layer, import_generated(layer), files["_triton_layer.py"], notes


@pytest.mark.parametrize("text", [LOG_COSH, LAPLACE_KERNEL], ids=["log_cosh", "laplace_kernel"])
def test_energies_on_the_triton_path(tmp_path, text):
    """The two energies of the issue on the Triton path: log(cosh(W x)) (its gradient
    sinh / cosh, printed without parentheses: wrong by 2.7 relative; now tanh where the body is
    made) and a Laplace kernel exp(-sqrt(|q - k|^2 + 1)) (its backward's c**(3/2) had no
    Triton spelling: those passes over pairs ran torch's code): no note, the layer right."""
    from tests.test_triton_layers import check_triton_path

    layer, module, source, notes = _compiled(tmp_path, text)
    assert notes == []
    assert not re.search(r"\b(sinh|cosh)\(", source)  # the kernels compute no sinh nor cosh
    check_triton_path(layer, module, torch.float32, "cpu")


def test_log_cosh_layer_where_sinh_and_cosh_overflow(tmp_path):
    """log(cosh(W x)) at pre-activations 50, -100 and 25: sinh and cosh overflow float32 at
    89.4 (their ratio was inf / inf = NaN on both backends), tanh does not. The step and its
    gradient in float32, on both backends, equal float64's within float32's tolerance."""
    from tests.conftest import assert_within_tolerance

    _, module, _, _ = _compiled(tmp_path, LOG_COSH)

    def step(backend, dtype):
        layer = module.Layer(D=3, M=3, backend=backend, dtype=dtype)
        with torch.no_grad():
            layer.W.copy_(50 * torch.eye(3))
            layer.U.copy_(torch.eye(3) / 10)
        x = torch.tensor([[[1.0, -2.0, 0.5]]], dtype=dtype, requires_grad=True)
        y = layer(x)
        return [y, *torch.autograd.grad(y.sum(), [x, layer.W])]

    exact = [t.detach() for t in step("torch", torch.float64)]
    for backend in ("torch", "triton"):
        for name, got, want in zip(("step", "d/dx", "d/dW"), step(backend, torch.float32), exact):
            assert_within_tolerance(f"{backend} {name}", got.detach(), want, torch.float32)


def build_for_h100() -> list[str]:
    """Build (not run) the kernel of every FUNCTIONS body for an H100 (CUDA capability 9.0), with
    float32 and float64 arithmetic: the failures. Run with TRITON_INTERPRET unset (the
    interpreter accepts code that a GPU build may not: tests/cuda_build.py)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    failed = []
    for name, body in sorted(FUNCTIONS.items()):
        kernel = _kernel(TritonPrinter({X.name: "a0", Y.name: "a1"}).doprint(body))
        for acc, pointer in (
            (triton.language.float32, "*fp32"),
            (triton.language.float64, "*fp64"),
        ):
            types = {"OUT": pointer, "IN0": pointer, "IN1": pointer, "N": "i32"}
            types.update({"ACC": "constexpr", "BLOCK": "constexpr"})
            try:
                triton.compile(ASTSource(kernel, types, {(4,): acc, (5,): 16}), target=target)
            except Exception as error:  # every failure is reported
                failed.append(f"{name} {pointer}: {str(error)[-300:]}")
    return failed


@pytest.mark.slow
@pytest.mark.skipif(
    "nvidia" not in __import__("triton.backends").backends.backends,
    reason="this triton has no CUDA backend",
)
def test_every_spelling_builds_for_h100():
    """The kernels of test_each_function_agrees_with_sympy build for a GPU, not only run in
    the interpreter (helpers of energyc.runtime.triton_math called with constexprs included)."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton's current default, set to silence its warning
    code = "from tests.test_printers import build_for_h100; print(build_for_h100())"
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1200
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.strip().splitlines()[-1] == "[]", run.stdout[-4000:]
