"""A fuzz test of the front end (issue 11): every drawn energy file gets a clear answer.

Hypothesis draws energy files: names from the whole identifier space (Python keywords, builtins,
torch.nn.Module attributes, names generated code uses, non-ASCII letters, names Python normalises,
non-identifiers), dims, parameters, hyperparameters, up to a few hundred terms, context sets,
layer settings, and deliberate mistakes. Each file must either

* fail with exactly one ``energyc: error:`` line, naming the file and a line when the error is in
  the file, and leave the output folder as it was; or
* compile to a package that imports, runs forward and backward on a small input, and passes the
  property checks (energyc/check.py, a few examples each).

A drawn mistake must fail. ``ENERGYC_FUZZ_THOROUGH=1`` draws many more files, with more terms.
"""

from __future__ import annotations

import importlib.util
import keyword
import os
import sys

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from energyc.check import CHECKS, run_check
from energyc.cli import main
from energyc.compiler import compile_file
from energyc.loader import load
from energyc.names import INTERNAL, SETTINGS

THOROUGH = os.environ.get("ENERGYC_FUZZ_THOROUGH", "") not in ("", "0")
EXAMPLES = 200 if THOROUGH else 15
MAX_TERMS = 300 if THOROUGH else 24

TRICKY = sorted(
    set(keyword.kwlist) | set(keyword.softkwlist) | set(INTERNAL) | set(SETTINGS)
    | {"print", "len", "sum", "range", "float", "int", "super", "type", "object", "id", "max"}
    | {"forward", "training", "eval", "parameters", "state_dict", "to", "cuda", "half", "apply",
       "register_buffer", "zero_grad", "named_modules", "_parameters", "_modules", "dump_patches"}
    | {"Δ", "λ", "ß", "名前", "ℌ", "ﬁ", "_", "__", "__x", "__init__", "a0", "a12", "b", "B", "T",
       "W_", "x_", "u394__", "t0_q", "grad_W", "g_W", "mask_causal", "dim_D", "R", "e", "d"}
)
INVALID = ["1x", "a-b", "", "a b", "x.y", "Ω!", "sum()"]

identifier = st.text(
    alphabet=st.sampled_from("abcxyzABDHKRT_0123456789ΔλéßΩ"), min_size=1, max_size=8
).filter(str.isidentifier)
names = st.one_of(identifier, identifier, identifier, identifier, st.sampled_from(TRICKY))
CONTEXTS = ["j <= i", "j < i", "j != i", "window(2)", "all_tokens()"]
FUNCTIONS = ["tanh({})", "softplus({})", "sigmoid({})", "log(1 + exp({}))",
             "sqrt(1 + ({}) ** 2)", "({}) ** 2", "exp(-({}) ** 2)"]


@st.composite
def energy_files(draw):
    """(source, layer name or None, the line of a deliberate mistake or 0, a mistake was drawn)."""
    lines = ["from energyc.dsl import *"]
    dim_names = draw(st.lists(names, min_size=2, max_size=4, unique=True))
    lines.append(f"dim_vars = dims({' '.join(dim_names)!r})")
    lines.append("D, *HS = dim_vars if isinstance(dim_vars, tuple) else (dim_vars,)")
    lines.append("i, j = tokens()")
    lines.append("x, xbar = state(D)")
    n_params = draw(st.integers(1, 3))
    for k in range(n_params):
        shape = "(HS[0], D)" if draw(st.booleans()) else "(D,)"
        init = draw(st.sampled_from(["", ", init=normal(0.3)", ", init=uniform(-0.5, 0.5)"]))
        lines.append(f"P{k} = param({draw(names)!r}, {shape}{init})")
    n_hypers = draw(st.integers(0, 2))
    for k in range(n_hypers):
        default = draw(st.sampled_from(["1.0", "0.5", "1 / sqrt(D)", "2"]))
        learn = draw(st.booleans())
        lines.append(f"h{k} = hyper({draw(names)!r}, default={default}, learnable={learn})")
    hyper_of = (lambda: f"h{draw(st.integers(0, n_hypers - 1))}") if n_hypers else (lambda: "1")

    def value(role: str) -> str:
        k = draw(st.integers(0, n_params - 1))
        return f"reduce_all(P{k} @ {role})"

    lines.append("def reduce_all(t):\n    return t.sum(*t_dims(t)) if t_dims(t) else t")
    lines.append("def t_dims(t):\n    return [d for d in dim_vars_list() if str(d) in "
                 "[str(o) for o in t.order]]")
    lines.append("def dim_vars_list():\n    return [D, *HS]")
    n_terms = draw(st.integers(1, MAX_TERMS))
    lines.append("E = 0")
    for _ in range(n_terms):
        kind = draw(st.integers(0, 3))
        if kind == 0:
            term = draw(st.sampled_from(FUNCTIONS)).format(value("x[i]"))
        elif kind == 1:
            ctx = draw(st.sampled_from(CONTEXTS))
            term = f"-logsumexp({value('x[i]')} * {value('xbar[j]')} / 4, over={ctx})"
        elif kind == 2:
            ctx = draw(st.sampled_from(CONTEXTS))
            term = f"sum_over(tanh({value('x[i]')} + {value('xbar[j]')}), {ctx}) / 8"
        else:
            term = f"0.5 * {value('x[i]')} ** 2"
        lines.append(f"E = E + {hyper_of()} * ({term})")
    layer_name = draw(st.one_of(identifier, identifier, identifier, st.sampled_from(TRICKY)))
    eta = draw(st.sampled_from(["0.1", "0.5", "1.0"]))
    steps = draw(st.integers(1, 2))
    precond = draw(st.sampled_from(["identity", "diagonal", "dplr"]))
    context = draw(st.sampled_from(["current", "input"]))
    rank = draw(st.integers(1, 3))
    mistake = draw(st.sampled_from([None] * 30 + [
        "eta=float('nan')", "eta=float('inf')", "steps=0", "precond='newton'", "rank=0",
        "context='past'", "undeclared", "leftover", "joint", "syntax", "mismatch", "twice",
        "invalid name"]))
    settings_ = {"eta": eta, "steps": str(steps), "precond": repr(precond),
                 "context": repr(context), "rank": str(rank)}
    mistake_line = 0
    if mistake == "undeclared":
        lines.append("E = E + Z_undeclared")
    elif mistake == "leftover":
        lines.append("E = E + P0 @ x[i] + HS[0] * 0 + apply(lambda a: a, x[i])")
    elif mistake == "joint":
        lines.append(f"E = E + {value('x[j]')} * 0 + logsumexp({value('x[i]')} * "
                     f"{value('x[j]')}, over=j <= i)")
    elif mistake == "syntax":
        lines.append("E = E + (")
    elif mistake == "mismatch":
        lines.append("E = E + dot(x[i], xbar[j], over=HS[0])")
    elif mistake == "twice":
        lines.append(f"Q = param({dim_names[0]!r}, (D,))")
    elif mistake == "invalid name":
        lines.append(f"Q = param({draw(st.sampled_from(INVALID))!r}, (D,))")
    elif mistake is not None:
        key, _, bad = mistake.partition("=")
        settings_[key] = bad
    layer_args = ", ".join(f"{k}={v}" for k, v in settings_.items())
    if mistake is not None and mistake not in ("eta=float('nan')", "eta=float('inf')", "steps=0",
                                               "precond='newton'", "rank=0", "context='past'"):
        mistake_line = len(lines)
    lines.append(f"layer({layer_name!r}, E, {layer_args})")
    if mistake is not None and not mistake_line:
        mistake_line = len(lines)
    return "\n".join(lines) + "\n", layer_name, mistake_line, mistake is not None


def _snapshot(folder) -> dict[str, bytes]:
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = fh.read()
    return out


_counter = [0]


def _import(path: str):
    _counter[0] += 1
    name = f"_energyc_fuzz_{_counter[0]}"
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(path, "__init__.py"), submodule_search_locations=[path])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not THOROUGH,
          suppress_health_check=list(HealthCheck))
@given(drawn=energy_files())
def test_every_energy_file_gets_a_clear_answer(tmp_path_factory, capsys, drawn):
    source, layer_name, mistake_line, mistaken = drawn
    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / "energy.py"
    path.write_text(source, encoding="utf-8")
    out = folder / "out"
    out.mkdir()
    (out / "keep.txt").write_text("the user's own file\n", encoding="utf-8")
    before = _snapshot(out)
    capsys.readouterr()
    code = main(["compile", "-q", str(path), "-o", str(out)])
    err = capsys.readouterr().err.strip()
    if code != 0:
        assert code == 1, err
        assert err.startswith("energyc: error: ") and "\n" not in err, f"{err}\n---\n{source}"
        assert err.startswith(f"energyc: error: {path}:"), f"{err}\n---\n{source}"
        assert _snapshot(out) == before, "a failed compile changed the output folder"
        event("refused: " + err.split(": ", 3)[-1][:40])
        return
    event("compiled")
    assert not mistaken, f"a mistake at line {mistake_line} compiled:\n{source}"
    assert "Traceback" not in err, err
    module = _import(str(out / layer_name))
    keywords = module.layer.DIMS
    sizes = {k: 2 + n for n, k in enumerate(keywords)}
    hyper_defaults = {}
    # a small step: with the drawn eta (up to 1) and hundreds of terms, two steps can diverge
    # (x - eta * 300 x ...), which is the settings' doing, not the compiler's; finite it must be
    lay = module.Layer(**sizes, **hyper_defaults, eta=1e-3, dtype=torch.float64)
    d = getattr(lay, keywords[0])
    x = torch.randn(2, 3, d, dtype=torch.float64, requires_grad=True)
    y = lay(x)
    y.sum().backward()
    assert y.shape == x.shape and torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    (layer,) = compile_file(load(str(path)))
    for check in CHECKS:
        result = run_check(layer, module, check, max_examples=2)
        assert not result.error, f"{check}: {result.error}\n---\n{source}"
