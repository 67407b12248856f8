"""Printing helpers of the torch backend."""

from energyc.backends.torch_backend import Emitter, _broadcast
from energyc.ir.graph import Graph


def test_broadcast_index():
    assert _broadcast("v", ("b", "i", "D"), ("b", "i", "D")) == "v"
    assert _broadcast("v", (), ("b", "i")) == "v"
    assert _broadcast("v", ("b", "i"), ("b", "i", "j", "D")) == "v[:, :, None, None]"
    assert _broadcast("v", ("i", "j"), ("b", "i", "j", "H")) == "v[None, :, :, None]"


def test_mask_of_a_pair_value_without_batch_is_the_mask_itself():
    """A (T, T) value needs the (T, T) mask as it is (this printed ``mask_causal[]`` before)."""
    em = Emitter(Graph(("D",)), {}, {})
    assert em.mask(("causal",), ("i", "j")) == "mask_causal"
    assert em.mask(("causal",), ("b", "i", "j", "D")) == "mask_causal[None, :, :, None]"


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
