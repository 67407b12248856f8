"""A user's own compiled layers import from their own folder (issue 11, item 2).

With the README's editable install the source tree is on ``sys.path``, and its checked-in
``generated/`` package used to hide a user's ``generated/`` (a folder without ``__init__.py`` is
only a namespace package, which any regular package of the same name wins over).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from energyc.build import PACKAGE_MARKER, write_package_marker
from tests.conftest import ROOT

ENERGY = textwrap.dedent("""\
    from energyc.dsl import *
    D, H = dims("D H")
    i, j = tokens()
    x, xbar = state(D)
    W = param("W", (H, D))
    layer("my_user_layer", (W @ x[i]).sum(H))
""")


def test_compiled_layer_imports_from_a_fresh_folder(tmp_path):
    (tmp_path / "my_energy.py").write_text(ENERGY, encoding="utf-8")
    env = dict(os.environ)
    # the project's own generated/ is importable, as with the editable install's .pth
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-m", "energyc", "compile", "my_energy.py"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "generated" / "__init__.py").read_text(encoding="utf-8") == PACKAGE_MARKER
    code = ("import torch\n"
            "from generated.my_user_layer import Layer\n"
            "import generated\n"
            f"assert generated.__file__.startswith({str(tmp_path)!r}), generated.__file__\n"
            "y = Layer(D=4, H=2)(torch.randn(1, 3, 4))\n"
            "print(tuple(y.shape))\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "(1, 3, 4)"


def test_package_marker_never_overwrites(tmp_path):
    (tmp_path / "__init__.py").write_text("# mine\n", encoding="utf-8")
    assert write_package_marker(str(tmp_path)) is None
    assert (tmp_path / "__init__.py").read_text(encoding="utf-8") == "# mine\n"
    out = tmp_path / "out"
    out.mkdir()
    assert write_package_marker(str(out)) == str(out / "__init__.py")


def test_project_generated_marker_is_kept():
    with open(os.path.join(ROOT, "generated", "__init__.py"), encoding="utf-8") as fh:
        assert "examples/" in fh.read()
