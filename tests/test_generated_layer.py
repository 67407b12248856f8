"""The generated packages' contract: imports, constructor, parameters, shapes, dtypes, errors."""

import math

import pytest
import torch

from generated.cem_attention import CemAttention, Layer


def test_import_contract_and_alias():
    assert CemAttention is Layer
    layer = Layer(D=16, H=2, K=4)
    assert set(dict(layer.named_parameters())) == {"W_q", "W_k"}
    assert layer.W_q.shape == (2, 4, 16) and layer.W_k.shape == (2, 4, 16)
    assert layer.beta == pytest.approx(1 / math.sqrt(4))  # the declared default 1/sqrt(K)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_and_dtype_preserved(dtype):
    layer = Layer(D=8, H=2, K=4, beta=0.7, eta=0.5, dtype=dtype)
    x = torch.randn(3, 5, 8, dtype=dtype)
    y = layer(x)
    assert y.shape == x.shape and y.dtype == dtype
    e = layer.energy(x)
    assert e.shape == (3,) and e.dtype == dtype
    assert layer.energy(x, per_token=True).shape == (3, 5)


def test_steps_and_preconditioners_build_and_run():
    for precond in ("identity", "diagonal", "dplr"):
        layer = Layer(D=8, H=2, K=4, steps=2, precond=precond, precond_rank=3)
        y = layer(torch.randn(2, 4, 8))
        y.sum().backward()
        assert layer.W_q.grad is not None
        if precond != "identity":
            assert layer.P_diag.grad is not None
        if precond == "dplr":
            assert layer.P_lowrank.shape == (8, 3) and layer.P_lowrank.grad is not None


def test_energy_decreases_under_small_step():
    torch.manual_seed(0)
    layer = Layer(D=8, H=2, K=4, eta=1e-3, dtype=torch.float64)
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
        assert (layer.energy(y, x, per_token=True) < layer.energy(x, x, per_token=True)).all()


def test_missing_dim_names_the_argument():
    with pytest.raises(TypeError, match="'K'"):
        Layer(D=8, H=2)


@pytest.mark.parametrize("bad", [0, -1, 2.5, "8", True])
def test_bad_dim_names_the_argument(bad):
    with pytest.raises(ValueError, match="argument D"):
        Layer(D=bad, H=2, K=4)


def test_bad_settings_name_the_argument():
    with pytest.raises(ValueError, match="argument steps"):
        Layer(D=8, H=2, K=4, steps=0)
    with pytest.raises(ValueError, match="argument precond"):
        Layer(D=8, H=2, K=4, precond="full")
    with pytest.raises(ValueError, match="argument context"):
        Layer(D=8, H=2, K=4, context="past")
    with pytest.raises(TypeError, match="argument beta"):
        Layer(D=8, H=2, K=4, beta="large")


def test_wrong_input_shape_names_x():
    layer = Layer(D=8, H=2, K=4)
    with pytest.raises(ValueError, match=r"argument x: expected shape \(batch, tokens, 8\)"):
        layer(torch.randn(2, 4, 7))
    with pytest.raises(ValueError, match="argument x"):
        layer(torch.randn(4, 8))


def test_wrong_input_dtype_names_x():
    layer = Layer(D=8, H=2, K=4)
    with pytest.raises(TypeError, match="argument x: dtype torch.float64 does not match"):
        layer(torch.randn(2, 4, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="argument x: expected a floating-point tensor"):
        layer(torch.ones(2, 4, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="argument x: expected a torch.Tensor"):
        layer([[1.0] * 8])


def test_learnable_hyper_is_a_parameter():
    from generated.window_alibi import Layer as Window

    layer = Window(D=8, H=2, K=4)
    assert "beta" in dict(layer.named_parameters())
    layer(torch.randn(1, 5, 8)).sum().backward()
    assert layer.beta.grad is not None


def test_no_grad_forward_keeps_no_state():
    layer = Layer(D=8, H=2, K=4)
    with torch.no_grad():
        y = layer(torch.randn(2, 4, 8))
    assert y.grad_fn is None


def test_rotary_needs_an_even_feature_size():
    from generated.lm_attention_rope import Layer as Rope

    with pytest.raises(ValueError, match="argument K: expected an even size"):
        Rope(D=8, H=2, K=3)
    Rope(D=8, H=2, K=4)(torch.randn(1, 3, 8))


def test_alibi_slopes_initialised_geometrically():
    from generated.lm_attention_alibi import Layer as Alibi

    layer = Alibi(D=8, H=4, K=2)
    expected = torch.tensor([2.0 ** (-8.0 * (h + 1) / 4) for h in range(4)])
    torch.testing.assert_close(layer.slopes.detach(), expected)
