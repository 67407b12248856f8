"""Bad energy files give one clear message naming the file and line; nothing is half-written."""

import os
import subprocess
import sys
import textwrap

import pytest

from energyc.build import compile_path
from energyc.errors import EnergyError

HEADER = """\
from energyc.dsl import *
import sympy
D, H, K = dims("D H K")
i, j = tokens()
x, xbar = state(D)
W_q = param("W_q", (H, K, D))
W_k = param("W_k", (H, K, D))
beta = hyper("beta", default=1)
"""  # lines 1-8; the body below starts at line 9

CASES = {
    "undefined_symbol": (
        "gamma = sympy.Symbol('gamma')\nE = (gamma * (W_q @ x[i])).sum(H, K)\nlayer('bad', E)\n",
        10, "undefined symbol 'gamma'"),
    "undefined_name": (
        "E = (W_v @ x[i]).sum(H, K)\nlayer('bad', E)\n", 9, "undefined name"),
    "contraction_mismatch_matmul": (
        "M = dims('M')\nV = param('V', (H, M))\nE = (V @ x[i]).sum(H)\nlayer('bad', E)\n",
        11, "shape mismatch in contraction"),
    "contraction_mismatch_dot": (
        "E = dot(W_q @ x[i], x[i], over=K).sum(H)\nlayer('bad', E)\n",
        9, "shape mismatch in contraction"),
    "non_scalar_energy": (
        "E = logsumexp(dot(W_q @ x[i], W_k @ xbar[j], over=K), over=j <= i)\nlayer('bad', E)\n",
        10, "not a scalar per token"),
    "context_index_as_state": (
        "E = logsumexp(dot(W_q @ x[i], W_k @ x[j], over=K), over=j <= i).sum(H)\n"
        "layer('bad', E)\n",
        9, "context index j is used with the state"),
    "unreduced_context": (
        "E = dot(W_q @ x[i], W_k @ xbar[j], over=K).sum(H)\nlayer('bad', E)\n",
        10, "still depends on the context token j"),
    "undifferentiable_function": (
        "f = sympy.Function('f')\nE = apply(f, W_q @ x[i]).sum(H, K)\nlayer('bad', E)\n",
        10, "cannot differentiate"),
    "syntax_error": ("E = (W_q @ x[i]).sum(H, K\nlayer('bad', E)\n", 9, "syntax error"),
    "reduce_over_token": (
        "E = (W_q @ x[i]).sum(j)\nlayer('bad', E)\n", 9, "context set"),
    "no_layer": ("E = (W_q @ x[i]).sum(H, K)\n", None, "declares no layer"),
    "dim_size_of_another_dim": (
        "M = dims('M', K=3)\nE = (W_q @ x[i]).sum(H, K)\nlayer('bad', E)\n", 9,
        "dims('M') gives a size to 'K', which it does not declare"),
    "dim_size_zero": (
        "M = dims('M', M=0)\nE = (W_q @ x[i]).sum(H, K)\nlayer('bad', E)\n", 9,
        "the size of dim M must be a positive integer, got 0"),
    "dim_size_float": (
        "M = dims('M', M=2.0)\nE = (W_q @ x[i]).sum(H, K)\nlayer('bad', E)\n", 9,
        "the size of dim M must be a positive integer, got 2.0"),
    "dim_size_bool": (
        "M = dims('M', M=True)\nE = (W_q @ x[i]).sum(H, K)\nlayer('bad', E)\n", 9,
        "the size of dim M must be a positive integer, got True"),
    "dim_size_odd_for_rotary": (
        "P = dims('P', P=3)\nW_p = param('W_p', (P, D))\n"
        "E = rotary(W_p @ x[i], over=P).sum(P)\nlayer('bad', E)\n", 9,
        "dim P must be even (its features pair up in a rotary embedding), but its default size "
        "is 3"),
    "bad_precond": (
        "E = (W_q @ x[i]).sum(H, K)\nlayer('bad', E, precond='full')\n", 10, "precond must be"),
}


def write(tmp_path, name, body):
    path = tmp_path / f"{name}.py"
    path.write_text(HEADER + textwrap.dedent(body))
    return str(path)


@pytest.mark.parametrize("case", sorted(CASES))
def test_error_names_file_and_line(case, tmp_path):
    body, line, needle = CASES[case]
    path = write(tmp_path, case, body)
    out = tmp_path / "out"
    with pytest.raises(EnergyError) as info:
        compile_path(path, str(out))
    message = str(info.value)
    assert needle in message
    expected_where = f"{path}:{line}" if line else path
    assert message.startswith(expected_where + ":") or message.startswith(expected_where), message
    assert not out.exists() or not os.listdir(out), "a failed compile wrote files"


@pytest.mark.parametrize("case", ["undefined_symbol", "undifferentiable_function", "syntax_error"])
def test_cli_prints_one_line_no_traceback(case, tmp_path):
    body, line, needle = CASES[case]
    path = write(tmp_path, case, body)
    proc = subprocess.run([sys.executable, "-m", "energyc", "compile", path, "-o",
                           str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert f"{path}:{line}" in proc.stderr and needle in proc.stderr


def test_failed_compile_keeps_previous_package(tmp_path):
    good = write(tmp_path, "good", "E = (W_q @ x[i]).sum(H, K)\nlayer('pkg', E)\n")
    out = tmp_path / "out"
    compile_path(good, str(out))
    before = (out / "pkg" / "layer.py").read_text()
    bad = write(tmp_path, "bad", "f = sympy.Function('f')\nE = apply(f, W_q @ x[i]).sum(H, K)\n"
                                 "layer('pkg', E)\n")
    with pytest.raises(EnergyError):
        compile_path(bad, str(out))
    assert (out / "pkg" / "layer.py").read_text() == before
    assert sorted(os.listdir(out)) == ["pkg"], "temporary files left behind"


def test_render_failure_leaves_nothing(tmp_path, monkeypatch):
    from energyc import render

    good = write(tmp_path, "good", "E = (W_q @ x[i]).sum(H, K)\nlayer('pkg', E)\n")
    out = tmp_path / "out"

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(render.shutil, "rmtree", render.shutil.rmtree)
    original_open = open

    def failing_open(path, *args, **kwargs):
        if str(path).endswith("layer.py") and "w" in (args[0] if args else kwargs.get("mode", "")):
            boom()
        return original_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", failing_open)
    with pytest.raises(OSError):
        compile_path(good, str(out))
    monkeypatch.undo()
    assert not (out / "pkg").exists()
    assert os.listdir(out) == []


def test_rotary_of_a_pair_value_is_an_error(tmp_path):
    path = write(tmp_path, "rot", "s = dot(W_q @ x[i], W_k @ xbar[j], over=K)\n"
                                  "r = rotary(s, over=H)\nlayer('bad', r)\n")
    with pytest.raises(EnergyError, match=r"rot.py:10: rotary\(\) needs a value of one token"):
        compile_path(path, str(tmp_path / "out"))


def test_user_location_walks_frames_without_reading_sources(monkeypatch):
    """It called inspect.stack(), which reads the source of every frame on the stack: 8 ms for
    each construct of an energy file, 10 s of compiling a 200-term energy."""
    import inspect

    from energyc.errors import user_location

    monkeypatch.setattr(inspect, "stack", lambda *a, **k: pytest.fail("inspect.stack called"))
    where, line = user_location(), sys._getframe().f_lineno
    assert where == f"{__file__}:{line}"
