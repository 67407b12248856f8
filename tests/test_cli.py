"""The command line: compile, inspect, check and their --help."""

import os
import subprocess
import sys

import pytest

from energyc.cli import main


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "energyc", *args], capture_output=True,
                          text=True, cwd=cwd)


@pytest.mark.parametrize("command", [[], ["compile"], ["inspect"], ["check"]])
def test_help(command):
    proc = run(*command, "--help")
    assert proc.returncode == 0
    assert "usage: energyc" in proc.stdout


def test_compile_to_outdir(tmp_path, capsys):
    assert main(["compile", "examples/cem_mlp.py", "-o", str(tmp_path)]) == 0
    assert (tmp_path / "cem_mlp" / "layer.py").exists()
    assert (tmp_path / "cem_mlp" / "__init__.py").exists()
    out = capsys.readouterr().out
    assert "wrote" in out and "done in" in out


def test_compile_quiet_prints_nothing_on_success(tmp_path, capsys):
    """-q silences the progress lines and the compiler's notes (here, that a reduction over j
    stays materialised); without it the note is on stderr; an error is printed either way."""
    path = tmp_path / "unfused.py"
    path.write_text(
        "from energyc.dsl import dims, dot, layer, logsumexp, param, state, tanh, tokens\n"
        'D, H, K = dims("D H K"); i, j = tokens(); x, xbar = state(D)\n'
        'W_q = param("W_q", (H, K, D)); W_k = param("W_k", (H, K, D))\n'
        "s = dot(W_q @ x[i], W_k @ xbar[j], over=K)\n"
        "E = -logsumexp(tanh(s) * tanh(s.sum(H)), over=j <= i).sum(H)\n"
        'layer("unfused", E, eta=0.5)\n')
    assert main(["compile", str(path), "-o", str(tmp_path / "loud")]) == 0
    loud = capsys.readouterr()
    assert "wrote" in loud.out and "energyc: note:" in loud.err
    assert main(["compile", str(path), "-o", str(tmp_path / "quiet"), "-q"]) == 0
    assert capsys.readouterr() == ("", "")
    assert (tmp_path / "quiet" / "unfused" / "layer.py").exists()
    assert main(["compile", "no/such/file.py", "-q"]) == 1
    assert "no such energy file" in capsys.readouterr().err
    assert "print nothing on success" in run("compile", "--help").stdout


def test_inspect_prints_ops_and_shapes_and_writes_dot(tmp_path, capsys):
    dot = tmp_path / "g.dot"
    assert main(["inspect", "examples/cem_attention.py", "--dot", str(dot)]) == 0
    out = capsys.readouterr().out
    assert "E_i = " in out and "logsumexp_{j <= i}" in out
    assert "contract" in out and "(b, i, j, H)" in out
    assert "saved for backward" in out
    assert "decode: incremental; caches per step (b, j, H, K)" in out  # the keys W_k xbar_j
    for name in ("g.energy.dot", "g.step.dot"):
        text = (tmp_path / name).read_text()
        assert text.startswith('digraph "cem_attention_') and "->" in text


def test_inspect_png(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "g.png"
    assert main(["inspect", "examples/cem_mlp.py", "--graph", "none", "--png", str(png)]) == 0
    assert (tmp_path / "g.energy.png").read_bytes()[:4] == b"\x89PNG"


def test_check_prints_table(capsys):
    assert main(["check", "examples/cem_mlp.py"]) == 0
    out = capsys.readouterr().out
    for check in ("forward", "backward", "causal", "descent", "energy"):
        assert check in out
    assert "5 passed, 0 failed, 0 skipped" in out


def test_missing_file_is_a_clear_error(capsys):
    assert main(["compile", "no/such/file.py"]) == 1
    assert "no such energy file: no/such/file.py" in capsys.readouterr().err


def test_console_script_entry_point_declared():
    with open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml")) as fh:
        assert 'energyc = "energyc.cli:main"' in fh.read()


def test_debug_env_dumps_graph_after_each_pass():
    env = dict(os.environ, ENERGYC_DEBUG="1")
    proc = subprocess.run([sys.executable, "-m", "energyc", "inspect", "examples/cem_mlp.py",
                           "--graph", "none"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    from energyc.passes import PIPELINE

    for name, _ in PIPELINE:
        assert f"--- after {name} ---" in proc.stdout


def test_inspect_says_why_a_layer_does_not_decode(capsys):
    assert main(["inspect", "examples/bidirectional_gelu.py"]) == 0
    assert "decode: not available: the context set {all j}" in capsys.readouterr().out
