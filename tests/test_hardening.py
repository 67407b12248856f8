"""Inputs that used to end in a traceback, a silent success or a wrong answer (issue 11).

Each test names the item it covers: every bad input gets one `energyc: error:` line naming the
file:line or the argument, a multi-file compile is all or nothing, the property checks judge a
flat energy correctly, and the README's set-up commands install what they need.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from energyc import __version__
from energyc.check import Case, check_descent, import_generated
from energyc.cli import main
from energyc.compiler import compile_file
from energyc.loader import load
from tests.conftest import ROOT

HEADER = """\
from energyc.dsl import *
D, H, K = dims("D H K")
i, j = tokens()
x, xbar = state(D)
W_q = param("W_q", (H, K, D))
"""  # lines 1-5; a body starts at line 6

GOOD = "E = (W_q @ x[i]).sum(H, K)\nlayer('{name}', E)\n"


def write(folder, name: str, body: str, header: str = HEADER) -> str:
    path = folder / f"{name}.py"
    path.write_text(header + textwrap.dedent(body), encoding="utf-8")
    return str(path)


def compile_error(capsys, *args: str) -> str:
    """Run `energyc compile ARGS`; assert it fails with one error line; return that line."""
    assert main(["compile", *args]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("energyc: error: ") and "\n" not in err, err
    return err


# -- item 8: raw tracebacks, silent successes, half-done multi-file compiles ----------------------


def test_file_that_is_not_utf8_is_an_error_at_its_line(tmp_path, capsys):
    path = tmp_path / "latin1.py"
    path.write_bytes((HEADER + "# caf\xe9\n" + GOOD.format(name="a")).encode("latin-1"))
    err = compile_error(capsys, str(path), "-o", str(tmp_path / "out"))
    assert f"{path}:6: the file is not UTF-8 text (byte 0xe9" in err
    assert not (tmp_path / "out").exists()


def test_file_with_a_coding_line_is_read_in_that_encoding(tmp_path):
    path = tmp_path / "latin1.py"
    text = "# -*- coding: latin-1 -*-\n" + HEADER + "# caf\xe9\n" + GOOD.format(name="a")
    path.write_bytes(text.encode("latin-1"))
    assert main(["compile", "-q", str(path), "-o", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "a" / "layer.py").exists()


def test_folder_with_a_file_that_is_not_utf8_compiles_its_energy_files(tmp_path):
    """A folder's .py files are searched for `energyc.dsl` as bytes: a non-UTF-8 file that is not
    an energy file is skipped, not a crash."""
    folder = tmp_path / "energies"
    folder.mkdir()
    write(folder, "good", GOOD.format(name="good"))
    (folder / "notes.py").write_bytes("# caf\xe9\n".encode("latin-1"))
    assert main(["compile", "-q", str(folder), "-o", str(tmp_path / "out")]) == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["__init__.py", "good"]  # + the package marker


def test_outdir_naming_an_existing_file_is_an_error(tmp_path, capsys):
    path = write(tmp_path, "good", GOOD.format(name="good"))
    existing = tmp_path / "afile"
    existing.write_text("keep me")
    err = compile_error(capsys, path, "-o", str(existing))
    assert f"output folder: {existing} is an existing file, not a folder" in err
    assert existing.read_text() == "keep me"


def test_complex_constant_is_an_error_at_its_line(tmp_path, capsys):
    path = write(tmp_path, "logneg", "E = (log(-1) * (W_q @ x[i])).sum(H, K)\nlayer('c', E)\n")
    err = compile_error(capsys, path, "-o", str(tmp_path / "out"))
    assert f"{path}:6: the expression has a constant that is not a real number" in err


@pytest.mark.parametrize("code", ["sys.exit(3)", "sys.exit()", "exit(0)"])
def test_exit_in_an_energy_file_is_an_error_at_its_line(tmp_path, capsys, code):
    path = write(tmp_path, "exits", f"import sys\n{code}\n" + GOOD.format(name="a"))
    err = compile_error(capsys, path, "-o", str(tmp_path / "out"))
    assert f"{path}:7: the file exits (sys.exit(" in err


def test_folder_without_energy_files_is_an_error(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "helper.py").write_text("print('not an energy file')\n")
    err = compile_error(capsys, str(empty), "-o", str(tmp_path / "out"))
    assert f"{empty}: no energy file in this folder" in err


def test_multi_file_compile_is_all_or_nothing(tmp_path, capsys):
    good = write(tmp_path, "good", GOOD.format(name="good"))
    bad = write(tmp_path, "bad", "E = (W_v @ x[i]).sum(H, K)\nlayer('bad', E)\n")
    out = tmp_path / "out"
    err = compile_error(capsys, good, bad, "-o", str(out))
    assert f"{bad}:6: undefined name 'W_v'" in err
    assert not out.exists() or os.listdir(out) == [], "the good file's package was written"


def test_two_files_declaring_one_layer_name_is_an_error(tmp_path, capsys):
    first = write(tmp_path, "first", GOOD.format(name="same"))
    second = write(tmp_path, "second", GOOD.format(name="same"))
    out = tmp_path / "out"
    err = compile_error(capsys, first, second, "-o", str(out))
    assert f"{second}:7: layer 'same' is also declared at {first}:7" in err
    assert not out.exists()


def test_a_file_named_twice_is_compiled_once(tmp_path):
    """`compile FOLDER FOLDER/file.py` names a file twice; that is not two declarations."""
    path = write(tmp_path, "good", GOOD.format(name="good"))
    assert main(["compile", "-q", str(tmp_path), path, "-o", str(tmp_path / "out")]) == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["__init__.py", "good"]  # + the package marker


# -- item 9 (compile-time half): settings that used to fail only at Layer() ---------------------


@pytest.mark.parametrize("body,needle", [
    ("E = (W_q @ x[i]).sum(H, K)\nlayer('r', E, precond='dplr', rank=0)\n",
     "7: rank must be a positive int"),
    ("E = (W_q @ x[i]).sum(H, K)\nlayer('r', E, rank=2.5)\n", "7: rank must be a positive int"),
    ("V = param('V', (H, K), init=normal(-1))\nE = (V * (W_q @ x[i])).sum(H, K)\n"
     "layer('n', E)\n", "6: normal(std): std must be >= 0, got -1"),
    ("V = param('V', (H, K), init=normal(-1 / sqrt(K)))\nE = (V * (W_q @ x[i])).sum(H, K)\n"
     "layer('n', E)\n", "6: normal(std): std must be >= 0"),
    ("V = param('V', (H, K), init=uniform(1, -1))\nE = (V * (W_q @ x[i])).sum(H, K)\n"
     "layer('n', E)\n", "6: uniform(low, high) needs low <= high"),
    ("V = param('V', (H, K), init=constant(float('nan')))\nE = (V * (W_q @ x[i])).sum(H, K)\n"
     "layer('n', E)\n", "6: constant(value): value must be a finite real number"),
    ("beta = hyper('beta', default=log(-1))\nE = (beta * (W_q @ x[i])).sum(H, K)\n"
     "layer('n', E)\n", "6: default of beta must be a finite real number"),
], ids=["rank_zero", "rank_float", "normal_negative", "normal_negative_in_dims",
        "uniform_reversed", "constant_nan", "hyper_complex"])
def test_bad_setting_is_a_compile_error_at_its_line(tmp_path, capsys, body, needle):
    path = write(tmp_path, "setting", body)
    err = compile_error(capsys, path, "-o", str(tmp_path / "out"))
    assert f"{path}:{needle}" in err
    assert not (tmp_path / "out").exists()


# -- item 11: the descent check on a flat energy ----------------------------------------------


@pytest.fixture(scope="module")
def mlp():
    layer = compile_file(load(os.path.join(ROOT, "examples", "cem_mlp.py")))[0]
    return layer, import_generated(layer)


MLP_CASE = Case(dims={"D": 3, "M": 4}, batch=2, tokens=3, seed=0, scale=1.0, hypers={}, eta=0.5,
                steps=1, precond="identity", context="current")


@pytest.mark.parametrize("rise_in_ulps", [0, 1])
def test_descent_check_passes_an_energy_that_a_step_leaves_unchanged(mlp, monkeypatch,
                                                                     rise_in_ulps):
    """A flat energy (here: E_i = 1 where the step is not zero) is not raised by a step, though
    the step moves x; a rise within rounding (one ulp of |E|) is no rise either."""
    layer, module = mlp
    eps = torch.finfo(torch.float64).eps

    def flat(x, xbar, *params):
        moved = (x != xbar).any(dim=-1).to(x.dtype)  # the second evaluation, at x + step
        return 1.0 + rise_in_ulps * eps * moved

    monkeypatch.setattr(module.layer, "_energy", flat)
    check_descent(layer, module, MLP_CASE)  # raises AssertionError when it judges a rise


def test_descent_check_still_catches_a_rise(mlp, monkeypatch):
    layer, module = mlp

    def rising(x, xbar, *params):
        return 1.0 + 1e-9 * (x != xbar).any(dim=-1).to(x.dtype)

    monkeypatch.setattr(module.layer, "_energy", rising)
    with pytest.raises(AssertionError, match="raised the energy"):
        check_descent(layer, module, MLP_CASE)


# -- item 12: --version, messages without SymPy jargon, inspect's parameter dims ----------------


def test_version_matches_the_package():
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as fh:
        declared = re.search(r'^version = "([^"]+)"', fh.read(), re.M).group(1)
    proc = subprocess.run([sys.executable, "-m", "energyc", "--version"], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"energyc {__version__}" == f"energyc {declared}"


@pytest.mark.parametrize("body,needle", [
    ("E = (W_q @ x[i] / 0).sum(H, K)\nlayer('z', E)\n",
     "6: the expression is undefined for every input: it divides by zero"),
    ("import sympy\nE = apply(sympy.floor, W_q @ x[i]).sum(H, K)\nlayer('a', E)\n",
     "7: cannot differentiate floor: no derivative is known for it"),
], ids=["division_by_zero", "floor"])
def test_messages_speak_of_the_energy_not_of_sympy(tmp_path, capsys, body, needle):
    path = write(tmp_path, "jargon", body)
    err = compile_error(capsys, path, "-o", str(tmp_path / "out"))
    assert f"{path}:{needle}" in err
    for jargon in ("zoo", "a0", "im, re", "SymPy"):
        assert jargon not in err, (jargon, err)


def test_inspect_shows_parameters_with_their_declared_dims(tmp_path, capsys):
    path = write(tmp_path, "md", "M = dims('M')\nW = param('W', (M, D))\n"
                                 "E = (W @ x[i]).sum(M) + (W_q @ x[i]).sum(H, K)\nlayer('md', E)\n")
    dot = tmp_path / "g.dot"
    assert main(["inspect", path, "--dot", str(dot)]) == 0
    out = capsys.readouterr().out
    assert "params W_q (H, K, D), W (M, D);" in out
    w_lines = [line.split() for line in out.splitlines() if line.rstrip().endswith(" param W")]
    assert len(w_lines) == 2, out  # the energy graph and the step graph
    assert all(line[1:3] == ["(M,", "D)"] for line in w_lines), w_lines
    assert "param W\\n(M, D)" in (tmp_path / "g.energy.dot").read_text()


# -- items 3 and 13: what the README's set-up commands install --------------------------------


def _requirement_name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group(0)).lower()


def _pyproject() -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        tomllib = pytest.importorskip("tomli")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        return tomllib.load(fh)


def test_energyc_check_needs_only_core_dependencies():
    """Every third-party package that `energyc compile | inspect | check` imports (beyond torch's
    own) is a core dependency or one of theirs: a plain `pip install` runs all three."""
    code = textwrap.dedent("""
        import json, sys
        import torch
        before = set(sys.modules)
        import energyc.cli, energyc.build, energyc.check, energyc.inspect, energyc.reference
        new = {m.split(".")[0] for m in set(sys.modules) - before}
        print(json.dumps(sorted(new - set(sys.stdlib_module_names) - {"energyc"})))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    imported = json.loads(proc.stdout)
    from importlib import metadata

    distributions = metadata.packages_distributions()
    allowed = {_requirement_name(r) for r in _pyproject()["project"]["dependencies"]}
    todo = list(allowed)
    while todo:  # what the core dependencies themselves require
        try:
            requires = metadata.requires(todo.pop()) or []
        except metadata.PackageNotFoundError:
            continue
        for req in requires:
            name = _requirement_name(req)
            if "extra ==" not in req and name not in allowed:
                allowed.add(name)
                todo.append(name)
    # a module with no distribution is the standard library's or the checkout's own
    missing = {module: distributions[module] for module in imported if module in distributions
               and not {_requirement_name(d) for d in distributions[module]} & allowed}
    assert not missing, f"imported but not core dependencies: {missing}"


def _setup_commands() -> list[str]:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        block = fh.read().split("## Set-up", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.startswith("python -m pip install")]


def test_readme_demo_command_installs_no_triton():
    """README command 1 (install, compile, demo) pulls only what the demo needs: no Triton (a
    286 MB download) and no test tools."""
    demo = [c for c in _setup_commands() if "examples/demo.py" in c]
    assert len(demo) == 1, _setup_commands()
    extras = re.search(r'-e "?\.(?:\[([^\]]*)\])?"?', demo[0]).group(1)
    project = _pyproject()["project"]
    requirements = list(project["dependencies"])
    for extra in (extras or "").split(","):
        if extra.strip():
            requirements += project["optional-dependencies"][extra.strip()]
    names = {_requirement_name(r) for r in requirements}
    assert "triton" not in names and "pytest" not in names, names


def _words(command: str) -> list[str]:
    """A command's words, without the ones that only change how much it prints or caches."""
    quiet = {"-q", "-p", "no:cacheprovider"}
    return [word for word in command.split() if word not in quiet]


def test_readme_test_command_is_what_ci_runs():
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as fh:
        ci = [_words(line) for line in fh if line.startswith("python")]
    (test_command,) = [c for c in _setup_commands() if "pytest" in c]
    assert [_words(part) for part in test_command.split(" && ")] == ci


# -- item 4: energies and element-wise bodies of more than 64 terms -------------------------------

MANY_TERMS = """\
ws = [param(f"w{k}", (H, D)) for k in range(70)]
E = sum(((w @ x[i]) ** 2).sum(H) for w in ws)
layer("many_terms", E)
"""

WIDE_APPLY = """\
ws = [param(f"w{k}", (H, D)) for k in range(200)]
E = apply(lambda *a: sum(v * v for v in a), *[w @ x[i] for w in ws]).sum(H)
layer("wide_apply", E)
"""


@pytest.mark.parametrize("body", [MANY_TERMS, WIDE_APPLY], ids=["70_terms", "apply_of_200"])
def test_energy_of_more_than_64_terms_compiles_and_runs(tmp_path, body):
    """ARG_SYMBOLS was a tuple of 64 symbols: a 64th argument was an IndexError."""
    path = write(tmp_path, "big", body)
    assert main(["compile", "-q", path, "-o", str(tmp_path / "out")]) == 0
    name = "many_terms" if "many_terms" in body else "wide_apply"
    module = import_package(str(tmp_path / "out" / name), name)
    layer = module.Layer(D=3, H=2).double()
    x = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    layer(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_arg_symbols_are_unbounded():
    from energyc.ir.ops import ARG_SYMBOLS

    assert ARG_SYMBOLS[500].name == "a500" and ARG_SYMBOLS.index(ARG_SYMBOLS[500]) == 500
    assert len(ARG_SYMBOLS[:300]) == 300 and ARG_SYMBOLS[299] in ARG_SYMBOLS
    assert sympy_symbol("a01") not in ARG_SYMBOLS and sympy_symbol("b3") not in ARG_SYMBOLS
    with pytest.raises(TypeError):
        set(ARG_SYMBOLS)  # no end: iterating it would never stop


def sympy_symbol(name: str):
    import sympy

    return sympy.Symbol(name)


def import_package(path: str, name: str):
    """Import the generated package in folder ``path`` under a private module name."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        f"_hardening_{name}", os.path.join(path, "__init__.py"), submodule_search_locations=[path]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
