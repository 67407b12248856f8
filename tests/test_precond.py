"""The preconditioners of every layer (energyc.runtime.precond) and the step settings
(energyc.settings): u = P g and its VJPs against autograd on the plain statement
(energyc.reference.precondition) in float64; the settings' checks and their messages."""

from __future__ import annotations

import pytest
import torch

from energyc import settings
from energyc.reference import precondition
from energyc.runtime import precond
from energyc.tolerances import tolerance


def _case(kind: str, B: int, T: int, D: int, R: int, seed: int):  # noqa: N803
    gen = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.randn(*shape, dtype=torch.float64, generator=gen)  # noqa: E731
    g, grad_u = draw(B, T, D), draw(B, T, D)
    P_diag = draw(D) if "P_diag" in settings.PRECOND_PARAMETERS[kind] else None
    P_lowrank = draw(D, R) if "P_lowrank" in settings.PRECOND_PARAMETERS[kind] else None
    return g, grad_u, P_diag, P_lowrank


@pytest.mark.parametrize("kind", settings.PRECONDITIONERS)
@pytest.mark.parametrize("B, T, D, R", [(1, 1, 1, 1), (2, 5, 6, 3), (3, 4, 8, 9)])
def test_preconditioner_and_its_vjp_match_autograd(kind, B, T, D, R):
    """u = P g equals the plain statement; (dg, dP_diag, dP_lowrank) equal autograd's VJP of it
    with the same upstream gradient (float64), None exactly where P has no such parameter."""
    g, grad_u, P_diag, P_lowrank = _case(kind, B, T, D, R, seed=B * 100 + T * 10 + D)
    rtol, atol = tolerance(torch.float64)
    u, saved = precond.FORWARD[kind](g, P_diag, P_lowrank)
    torch.testing.assert_close(u, precondition(kind, g, P_diag, P_lowrank), rtol=rtol, atol=atol)
    got = precond.BACKWARD[kind](saved, grad_u, g, P_diag, P_lowrank)

    leaves = [t.clone().requires_grad_(True) if t is not None else None
              for t in (g, P_diag, P_lowrank)]
    ref = precondition(kind, *leaves)
    present = [t for t in leaves if t is not None]
    expected = iter(torch.autograd.grad(ref, present, grad_u))
    for name, leaf, value in zip(("g", "P_diag", "P_lowrank"), leaves, got):
        if leaf is None:
            assert value is None, name
        else:
            torch.testing.assert_close(value, next(expected), rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("kind", settings.PRECONDITIONERS)
def test_preconditioner_leaves_its_inputs_alone(kind):
    """The in-place steps work on fresh tensors only: g, G and P are unchanged."""
    g, grad_u, P_diag, P_lowrank = _case(kind, 2, 3, 4, 2, seed=7)
    before = [t.clone() if t is not None else None for t in (g, grad_u, P_diag, P_lowrank)]
    u, saved = precond.FORWARD[kind](g, P_diag, P_lowrank)
    precond.BACKWARD[kind](saved, grad_u, g, P_diag, P_lowrank)
    for a, b in zip(before, (g, grad_u, P_diag, P_lowrank)):
        assert (a is None and b is None) or torch.equal(a, b)


def test_preconditioner_parameters_start_at_the_identity():
    """P_diag, P_lowrank as each kind declares them; after reset_, softplus(P_diag) = 1."""
    factory = {"dtype": torch.float64, "device": None}
    for kind in settings.PRECONDITIONERS:
        P_diag, P_lowrank = precond.parameters(kind, 5, 2, factory)
        names = settings.PRECOND_PARAMETERS[kind]
        assert (P_diag is not None, P_lowrank is not None) == ("P_diag" in names,
                                                               "P_lowrank" in names)
        with torch.no_grad():
            precond.reset_(P_diag, P_lowrank)
        if P_diag is not None:
            torch.testing.assert_close(torch.nn.functional.softplus(P_diag),
                                       torch.ones(5, dtype=torch.float64))
        if P_lowrank is not None:
            assert P_lowrank.shape == (5, 2) and bool(P_lowrank.abs().max() < 1)


GOOD = dict(eta=0.5, steps=2, precond="dplr", precond_rank=3, context="input", backend="torch")
BAD = [
    ("eta", "1.0", TypeError), ("eta", None, TypeError), ("eta", True, TypeError),
    ("eta", float("nan"), ValueError), ("eta", 10**400, ValueError),
    ("steps", 0, ValueError), ("steps", 1.0, ValueError), ("steps", True, ValueError),
    ("precond", "full", ValueError), ("precond", None, ValueError), ("precond", ["dplr"], ValueError),
    ("precond_rank", 0, ValueError), ("precond_rank", 2.0, ValueError),
    ("context", "past", ValueError), ("context", None, ValueError),
    ("backend", "cuda", ValueError),
]


def test_step_settings_checked():
    assert settings.check_step_settings(**GOOD) == (0.5, 2, "dplr", "input", "torch")
    assert settings.check_step_settings(0, 1, "identity", 1, "current") == (
        0.0, 1, "identity", "current", "auto")


@pytest.mark.parametrize("name, value, error", BAD, ids=[f"{n}={v!r}"[:40] for n, v, _ in BAD])
def test_bad_step_setting_names_it(name, value, error):
    with pytest.raises(error, match=f"^argument {name}: expected ") as info:
        settings.check_step_settings(**{**GOOD, name: value})
    assert isinstance(info.value, settings.SettingError)
    assert info.value.name == name and info.value.value is value
