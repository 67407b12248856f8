import importlib
import os
import sys

import pytest

# Without a GPU, Triton kernels run on Triton's CPU interpreter; it must be chosen before triton is
# imported (generated packages import their Triton kernels lazily, so this comes first).
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def example_files() -> list[str]:
    """The energy files of examples/, as `energyc compile examples/` finds them (the .py files
    that import energyc.dsl; not the scripts that train, compare or generate)."""
    from energyc.cli import energy_files

    return sorted(os.path.relpath(f, ROOT) for f in energy_files([EXAMPLES]))


def context_data(layer, batch: int, tokens: int) -> dict:
    """The call's context data keywords for a generated layer (its Layer class, or an example
    package's name) on ``batch`` rows of ``tokens``: for sets that read documents, per-row
    ``document_ids`` cut at other tokens in each row (the first row's first document one token
    long); for sets that read a prefix, a third of each row; {} where the sets read nothing from
    the call."""
    if isinstance(layer, str):
        layer = importlib.import_module(f"generated.{layer}").Layer
    reads = layer._declared.context_data
    import torch

    data = {}
    if "same_document" in reads:
        ids = torch.zeros(batch, tokens, dtype=torch.int64)
        for b in range(batch):
            for cut in {1 + b, tokens // 2 + b}:
                if 0 < cut < tokens:
                    ids[b, cut:] += 1
        data["document_ids"] = ids
    if "prefix" in reads:
        data["prefix"] = torch.full((batch,), tokens // 3, dtype=torch.int64)
    return data


@pytest.fixture(autouse=True)
def _in_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def pytest_collection_modifyitems(config, items):
    """Skip tests marked gpu when no CUDA device is present."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def assert_within_tolerance(name: str, got, want, dtype) -> None:
    """Element-wise ``|got - want| <= atol + rtol |want|`` with the tolerances of ``dtype`` from
    the one table (energyc.tolerances); the message names the value and the worst error."""
    from energyc.tolerances import tolerance

    rtol, atol = tolerance(dtype)
    err = (got.double() - want).abs()
    bound = atol + rtol * want.abs()
    assert bool((err <= bound).all()), (
        f"{name}: max abs error {float(err.max()):.3e} beyond the {dtype} tolerance "
        f"(rtol={rtol}, atol={atol})")


def neuron_reference(layer, module, case, dtype):
    """A neuron model's drawn case (``energyc.check.build_neurons``) with its weights and states
    rounded to ``dtype``, and the float64 reference of those rounded values: its states after
    the dynamics and the gradients of sum(y * w) to every state and parameter
    (``energyc.reference.reference_neurons``). Returns (layer, states, ws, expected)."""
    import torch

    from energyc.check import build_neurons
    from energyc.reference import reference_neurons

    exact, xs = build_neurons(layer, module, case)
    exact.load_state_dict({k: v.to(dtype).double() for k, v in exact.state_dict().items()})
    xs = [x.to(dtype).double().requires_grad_() for x in xs]
    gen = torch.Generator().manual_seed(1)
    ws = [torch.randn(x.shape, dtype=x.dtype, generator=gen) for x in xs]
    ys = reference_neurons(layer, exact, xs, True)
    loss = sum((y * w).sum() for y, w in zip(ys, ws))
    expected = [*ys, *torch.autograd.grad(loss, [*xs, *exact.parameters()], allow_unused=True)]
    return exact, xs, ws, expected
