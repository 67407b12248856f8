"""render.format_code: ruff's layout with argument lists packed, the code itself unchanged."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from energyc.render import WIDTH, format_code, render_files


def _same_code(a: str, b: str) -> bool:
    return ast.dump(ast.parse(a)) == ast.dump(ast.parse(b))


def test_a_tuple_that_fits_is_one_line_and_a_one_tuple_keeps_its_comma():
    code = "x = torch.empty((H, K, D,), **factory)\ny = (a,)\nz = f(b,)\n"
    assert format_code(code) == "x = torch.empty((H, K, D), **factory)\ny = (a,)\nz = f(b)\n"


def test_a_long_signature_fills_rows_and_ruff_keeps_them():
    params = ", ".join([f"s{k}_{d}" for k in range(3) for d in range(4)])
    code = (f"def kernel(OUT, IN0, IN1, IN2, N, n0, n1, n2, n3, {params}, ACC: tl.constexpr, "
            "BLOCK: tl.constexpr):\n    pass\n")
    out = format_code(code)
    assert _same_code(code, out)
    rows = out.splitlines()
    assert rows[0] == "def kernel("
    assert rows[-2] == "):  # fmt: skip"
    assert len(rows) == 5  # not one parameter a row (25 rows)
    assert all(len(r) <= WIDTH for r in rows)
    assert rows[-3].endswith(" s2_3, ACC: tl.constexpr, BLOCK: tl.constexpr,")  # named together
    assert format_code(out) == out


def test_a_long_call_with_a_comment_keeps_it_before_the_marker():
    args = ", ".join(f"argument_{k}" for k in range(12))
    code = f"def f():\n    t2 = launch({args}, (1,), ())  # (b, i)\n"
    out = format_code(code)
    assert _same_code(code, out)
    assert out.splitlines()[-1] == "    )  # (b, i)  # fmt: skip"
    assert len(out.splitlines()) == 5


def test_what_is_not_one_call_keeps_ruffs_layout():
    code = ("def f():\n"
            "    return (first_long_name_aaaaaaaaaaaaaaaaaaaaaa, second_long_name_bbbbbbbbbbbbbbbbbbbb,"
            " third_long_name_cccccccccccccc).replace(a, b)\n")
    out = format_code(code)
    assert _same_code(code, out)
    assert "fmt: skip" not in out


@pytest.mark.parametrize("path", ["examples/cem_attention.py", "examples/softcap_attention.py"])
def test_rendered_packages_are_ruff_clean_and_within_the_width(path, tmp_path):
    """Ruff leaves the packed code as it is; no statement row over WIDTH but a docstring's."""
    from energyc.compiler import compile_file
    from energyc.loader import load

    (layer,) = compile_file(load(path))[:1]
    for name, text in render_files(layer, path).items():
        target = tmp_path / name
        target.write_text(text)
        check = subprocess.run(
            [sys.executable, "-m", "ruff", "format", "--isolated", "--check", "--line-length",
             str(WIDTH), "--config", "format.skip-magic-trailing-comma=true", str(target)],
            capture_output=True, text=True)
        assert check.returncode == 0, (name, check.stdout, check.stderr)
        code_rows = [r for r in text.splitlines()[3:] if len(r) > WIDTH
                     and r.lstrip().startswith(("t", "_", "def", "return"))]
        assert not code_rows, code_rows
