"""Declared names that collide with generated code or Python (issue 11, items 5 and 6).

Every name Python calls an identifier either compiles to a package that imports, runs and passes
the property checks, with the declared name as the Layer's keyword and attribute where Python
allows it (else with underscores appended), or is refused with one `energyc: error: FILE:LINE:`
line. Only the notation's own names (i, j, x, xbar, eta) are reserved.
"""

from __future__ import annotations

import inspect
import keyword
import textwrap

import pytest
import torch

from energyc.check import CHECKS, import_generated, run_check
from energyc.cli import main
from energyc.compiler import compile_file
from energyc.loader import load
from energyc.names import INTERNAL, RESERVED, attribute_names, code_name, is_plain


def energy_file(tmp_path, body: str, name: str = "energy") -> str:
    path = tmp_path / f"{name}.py"
    path.write_text("from energyc.dsl import *\n" + textwrap.dedent(body), encoding="utf-8")
    return str(path)


def build(tmp_path, body: str):
    """Compile, import and run forward, backward and every property check (few examples)."""
    layers = compile_file(load(energy_file(tmp_path, body)))
    (layer,) = layers
    module = import_generated(layer, str(tmp_path / "out"))
    for check in CHECKS:
        result = run_check(layer, module, check, max_examples=3)
        assert not result.error, (check, result.error)
    return layer, module


def run(module, **kwargs):
    lay = module.Layer(**kwargs, dtype=torch.float64)
    x = torch.randn(2, 3, kwargs.get("D", 4), dtype=torch.float64, requires_grad=True)
    y = lay(x)
    y.sum().backward()
    assert y.shape == x.shape and torch.isfinite(x.grad).all()
    lay.eval()
    lay.train()
    assert lay.energy(x.detach()).shape == (2,)
    return lay


def test_settings_names_as_hyperparameter_and_dim(tmp_path):
    # used to be `SyntaxError: duplicate argument` on import
    _, module = build(tmp_path, """\
        D, dtype = dims("D dtype")
        i, j = tokens()
        x, xbar = state(D)
        W = param("W", (dtype, D))
        steps = hyper("steps", default=2.0)
        layer("names_a", (steps * (W @ x[i]) ** 2).sum(dtype))
    """)
    lay = run(module, D=4, dtype_=3, steps_=1.5, steps=2)
    assert lay.dtype_ == 3 and lay.steps_ == 1.5 and lay.config[1] == 2
    assert module.layer.DIMS == ("D", "dtype_") and module.layer.HYPERS == ("steps_",)


@pytest.mark.parametrize("name", ["forward", "training", "eval", "lambda", "P_diag", "grad_g",
                                  "y", "u", "saved", "kernels", "torch", "self", "__x", "a0"])
def test_parameter_names_that_collide(tmp_path, name):
    # forward: KeyError; training: TypeError on .eval(); lambda: "generated code does not parse"
    _, module = build(tmp_path, f"""\
        D, H = dims("D H")
        i, j = tokens()
        x, xbar = state(D)
        W = param({name!r}, (H, D))
        layer("names_p", ((W @ x[i]) ** 2).sum(H))
    """)
    lay = run(module, D=4, H=2)
    attr = attribute_names([name])[name]
    assert isinstance(getattr(lay, attr), torch.nn.Parameter)
    assert module.layer.PARAMS == (attr,)
    assert attr == name or not keyword.iskeyword(attr)


@pytest.mark.parametrize("name", ["in", "Δ", "b", "B", "T", "torch", "self", "R", "d", "e",
                                  "math", "mask_causal", "t0"])
def test_dim_names_that_collide(tmp_path, name):
    # Δ: einsum subscripts; in: "generated code does not parse"; b, B, T: were reserved
    _, module = build(tmp_path, f"""\
        D, H = dims("D {name}")
        i, j = tokens()
        x, xbar = state(D)
        W = param("W", (H, D))
        c = hyper("c", default=1 / sqrt(H))
        layer("names_d", c * logsumexp(dot(W @ x[i], W @ xbar[j], over=H), over=j <= i),
              precond="dplr")
    """)
    keyword_name = attribute_names(["D", name])[name]
    lay = run(module, D=4, **{keyword_name: 3})
    assert getattr(lay, keyword_name) == 3


def test_declared_dim_sizes_are_the_keywords_defaults(tmp_path):
    """dims("D in H", H=3, **{"in": 2}): the Layer's keywords in the declared order, D required,
    in_ and H defaulting to their sizes (a hyperparameter default of H follows), and the Args
    docstring saying so."""
    _, module = build(tmp_path, """\
        D, In, H = dims("D in H", H=3, **{"in": 2})
        i, j = tokens()
        x, xbar = state(D)
        W = param("W", (H, In, D))
        c = hyper("c", default=1 / sqrt(H))
        layer("sizes", c * logsumexp(dot(W @ x[i], W @ xbar[j], over=(H, In)), over=j <= i))
    """)
    params = inspect.signature(module.Layer).parameters
    assert list(params)[:3] == ["D", "in_", "H"]
    assert params["D"].default is inspect.Parameter.empty
    assert (params["in_"].default, params["H"].default) == (2, 3)
    assert params["H"].kind is inspect.Parameter.KEYWORD_ONLY
    doc = module.Layer.__doc__
    assert "D: size of dim D.\n" in doc and "in_: size of dim in (default 2)." in doc
    assert "H: size of dim H (default 3)." in doc
    lay = run(module, D=4)
    assert (lay.in_, lay.H, lay.W.shape) == (2, 3, (3, 2, 4))
    assert lay.c == pytest.approx(1 / 3 ** 0.5)
    assert run(module, D=4, H=5).W.shape == (5, 2, 4)
    with pytest.raises(TypeError, match="D"):
        module.Layer()


@pytest.mark.parametrize("name", ["R", "b", "T", "Δ"])
def test_state_dim_names(tmp_path, name):
    _, module = build(tmp_path, f"""\
        D, {name} = dims("D {name}")
        i, j = tokens()
        x, xbar = state({name})
        W = param("W", (D, {name}))
        layer("names_s", ((W @ x[i]) ** 2).sum(D), precond="dplr")
    """)
    lay = module.Layer(**{"D": 2, name: 4}, precond="dplr", dtype=torch.float64)
    x = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
    lay(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_hyperparameter_names_b_and_T(tmp_path):
    # a bias b and a temperature T were "reserved"
    _, module = build(tmp_path, """\
        D, H = dims("D H")
        i, j = tokens()
        x, xbar = state(D)
        W = param("W", (H, D))
        b = param("b", (H,), init=zeros())
        T = hyper("T", default=2.0, learnable=True)
        layer("names_t", -T * logsumexp((W @ x[i] + b) / T, over=H))
    """)
    lay = run(module, D=4, H=3, T=1.5)
    assert isinstance(lay.b, torch.nn.Parameter) and float(lay.T.detach()) == 1.5


def test_layer_name_that_would_replace_a_module_global(tmp_path):
    _, module = build(tmp_path, """\
        D, H = dims("D H")
        i, j = tokens()
        x, xbar = state(D)
        W = param("W", (H, D))
        layer("d_i_m_s", ((W @ x[i]) ** 2).sum(H))
    """)
    assert module.layer.DIMS == ("D", "H") and module.layer.DIMSLayer is module.Layer
    run(module, D=4, H=2)


@pytest.mark.parametrize("body, line, needle", [
    ("layer('class', E)\n", 7, "layer name 'class' is a Python keyword"),
    ("layer('ok', E, eta=float('nan'))\n", 7, "eta must be a finite real number"),
    ("layer('ok', E, eta=float('inf'))\n", 7, "eta must be a finite real number"),
    ("layer('ok', E, steps=True)\n", 7, "steps must be a positive int"),
    ("layer('ok', E, doc=3)\n", 7, "doc must be a string"),
    ("Q = hyper('x')\nlayer('ok', E)\n", 7, "hyperparameter name 'x' is reserved"),
    ("Q = param('eta', (D,))\nlayer('ok', E)\n", 7, "parameter name 'eta' is reserved"),
    ("Q = param('H', (D,))\nlayer('ok', E)\n", 7, "name 'H' declared twice (first as a dim at"),
    ("Q = hyper('W')\nlayer('ok', E)\n", 7, "name 'W' declared twice"),
    ("Q = param('\u210c', (D,))\nlayer('ok', E)\n", 7, "is not in Unicode normal form"),
])
def test_names_refused_at_their_line(tmp_path, capsys, body, line, needle):
    path = energy_file(tmp_path, textwrap.dedent("""\
        D, H = dims("D H")
        i, j = tokens()
        x, xbar = state(D)
        W = param("W", (H, D))
        E = ((W @ x[i]) ** 2).sum(H)
    """) + body)
    out = tmp_path / "out"
    assert main(["compile", path, "-o", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"energyc: error: {path}:{line}: ") and "\n" not in err, err
    assert needle in err, err
    assert not out.exists()


def test_only_the_notation_is_reserved():
    assert set(RESERVED) == {"i", "j", "x", "xbar", "eta"}


def test_code_names_never_collide():
    declared = ["steps", "steps__", "Δ", "u394", "grad_x", "x", "_", "__", "a0", "lambda", "W"]
    taken: set[str] = set()
    codes = []
    for name in declared:
        code = code_name(name, taken)
        taken.add(code)
        codes.append(code)
        assert code.isidentifier() and code.isascii() and not keyword.iskeyword(code)
        assert code == name or code.endswith("__") and code not in INTERNAL
    assert len(set(codes)) == len(codes)
    assert codes[-1] == "W" and is_plain("W_q") and not is_plain("W_")


def test_attribute_names_are_unique_and_usable():
    names = ["forward", "forward_", "lambda", "__x", "steps", "W", "self", "__init__"]
    attrs = attribute_names(names)
    assert len(set(attrs.values())) == len(names)
    assert attrs["W"] == "W" and attrs["forward"] == "forward__" and attrs["lambda"] == "lambda_"
    for attr in attrs.values():
        assert attr.isidentifier() and not keyword.iskeyword(attr)
        assert not (attr.startswith("__") and not attr.endswith("__"))


def test_the_listed_module_attributes_are_the_installed_torchs():
    """names.NN_MODULE_ATTRIBUTES (listed so that compiling imports no torch) holds every
    attribute of the installed torch's nn.Module: a generated Layer's names never shadow one."""
    import json
    import subprocess
    import sys

    from energyc import names

    # in a fresh process: torch.compile, once used, patches nn.Module with attributes of its own
    # (___needs_generation_tag_patch), which no Layer is given
    code = ("import json, torch; print(json.dumps(sorted(set(dir(torch.nn.Module)) "
            "| set(vars(torch.nn.Module())))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    installed = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert installed <= names.NN_MODULE_ATTRIBUTES, sorted(installed - names.NN_MODULE_ATTRIBUTES)


def test_layer_attributes_list_the_base_class():
    """names.LAYER_ATTRIBUTES holds every attribute the generated Layer's base adds to
    nn.Module's (a declared name never replaces a method or setting of the layer), and the
    attributes a built layer sets that are not declared names."""
    from energyc import names
    from energyc.runtime.layer import EnergyLayer
    from generated.cem_attention import Layer

    added = set(dir(EnergyLayer)) - set(dir(torch.nn.Module))
    built = set(vars(Layer(D=4, H=2, K=2, precond="dplr"))) - set(vars(torch.nn.Module()))
    declared = {"D", "H", "K", "beta"}
    assert added and added <= names.LAYER_ATTRIBUTES, sorted(added - names.LAYER_ATTRIBUTES)
    assert built - declared <= names.LAYER_ATTRIBUTES, sorted(built - declared)


@pytest.mark.parametrize("name", ["decode", "_declared", "reset_parameters"])
def test_parameter_named_after_a_layer_method(tmp_path, name):
    """A parameter called like one of the Layer's methods gets an attribute with an underscore
    appended (``decode`` raised KeyError: attribute 'decode' already exists)."""
    _, module = build(tmp_path, f"""\
        D, H = dims("D H")
        i, j = tokens()
        x, xbar = state(D)
        W = param({name!r}, (H, D))
        layer("names_m", ((W @ x[i]) ** 2).sum(H))
    """)
    lay = run(module, D=4, H=2)
    assert isinstance(getattr(lay, name + "_"), torch.nn.Parameter)
    assert not isinstance(getattr(lay, name), torch.Tensor)  # the class's own, unchanged


def test_compiling_imports_no_torch(tmp_path):
    """`energyc compile` in a fresh process leaves torch unimported (its import took 1.7 s of a
    2.3 s compile of cem_attention)."""
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; from energyc.build import compile_paths; "
            f"compile_paths([Path('examples/cem_attention.py')], Path({str(tmp_path)!r})); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout + out.stderr


# -- the names of values: what the energy file binds them to ----------------------------------------


def _function(module, name: str) -> str:
    import inspect

    return inspect.getsource(getattr(module, name))


def test_values_are_named_as_the_file_binds_them(tmp_path):
    """q and k of cem_attention's notation, dq = dE/dq in the forward, the backward's gradients
    grad_dq, grad_k, grad_W_q; what the file does not name stays t<N>."""
    layer, module = build(tmp_path, """\
        D, H, K = dims("D H K")
        i, j = tokens()
        x, xbar = state(D)
        W_q = param("W_q", (H, K, D))
        W_k = param("W_k", (H, K, D))
        beta = hyper("beta", default=1 / sqrt(K))
        q = W_q @ x[i]
        k = W_k @ xbar[j]
        E = -(1 / beta) * logsumexp(beta * dot(q, k, over=K), over=j <= i).sum(H)
        layer("names_v", E)
    """)
    run(module.layer, D=4, H=2, K=3)
    energy = _function(module.layer, "_energy")
    assert "    q = _rt.contract(" in energy and "    k = _rt.contract(" in energy
    assert "    E = " in energy and "return E" in energy
    forward = _function(module.layer, "_grad_forward")
    assert "    dq = " in forward and "return t1, (q, k, " in forward
    backward = _function(module.layer, "_grad_backward")
    for name in ("grad_dq", "grad_k", "grad_W_q", "grad_W_k"):
        assert f"    {name} = " in backward, name
    assert "    t0, t4 = kernels.attention_forward(q, k, k, " in forward  # o: not named in the file


@pytest.mark.parametrize(("first", "second", "named"), [
    ("g", "h", ("h",)),  # g: the template's own (the gradient)
    ("t0", "h", ("h",)),  # a numbered temporary's form
    ("sum", "h", ("h",)),  # a builtin
    ("h", "h_p", ("h",)),  # h_p: what a printer derives from h (kept probabilities)
    ("W_x", "h", ("h",)),  # extends the parameter W
    ("D_", "h", ("h",)),  # not plain
    ("_h", "h", ("h",)),  # private: not taken
    ("h", "P", ("h",)),  # P: _grad_decode's argument
    ("q", "k", ("q", "k")),
])
def test_value_names_that_collide_keep_numbered_names(tmp_path, first, second, named):
    layer, module = build(tmp_path, f"""\
        D, M = dims("D M")
        i, j = tokens()
        x, xbar = state(D)
        W = param("W", (M, D))
        U = param("U", (M, D))
        {first} = W @ x[i]
        {second} = 2 * W @ xbar[j]
        E = logsumexp(dot({first}, {second}, over=M), over=j <= i)
        layer("names_c", E)
    """)
    run(module.layer, D=4, M=3)
    energy = _function(module.layer, "_energy")
    # the variables of W x_i and of 2 W xbar_j
    got = [next(line.split(" = ")[0].strip() for line in energy.splitlines()
                if line.strip().endswith(f", {arg})  # (b, {token}, M)")) for arg, token in
           (("x", "i"), ("xbar", "j"))]
    assert got[0] == (first if first in named else "t0"), energy
    assert got[1] == (second if second in named else "t1"), energy
