import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def example_files() -> list[str]:
    return sorted(
        os.path.join("examples", f)
        for f in os.listdir(EXAMPLES)
        if f.endswith(".py") and not f.startswith(("demo", "train", "compare", "_"))
    )


@pytest.fixture(autouse=True)
def _in_root(monkeypatch):
    monkeypatch.chdir(ROOT)
