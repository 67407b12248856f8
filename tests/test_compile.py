"""A model made of generated layers runs under torch.compile(fullgraph=True) with the same outputs
and gradients as in eager mode (the generated autograd.Function is traced, forward and backward)."""

import pytest
import torch

from energyc.tolerances import tolerance


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fullgraph_compile_matches_eager(backend):
    """On the Triton path every kernel launch is a torch.library custom op, opaque to tracing."""
    if backend == "triton":
        pytest.importorskip("triton")
    from generated.causal_meanfield import Layer as RunningSum
    from generated.cem_attention import Layer as Attention
    from generated.cem_mlp import Layer as Mlp
    from generated.energy_transformer import Layer as Joint
    from generated.softcap_attention import Layer as Softcap
    from generated.strict_dplr import Layer as Dplr
    from generated.window_alibi import Layer as Window

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        Attention(D=16, H=2, K=8, steps=2, precond="dplr", backend=backend),  # fused, two steps
        Window(D=16, H=2, K=8, backend=backend),  # i - j term, learned slopes and beta
        Joint(D=16, H=2, K=8, backend=backend),  # key role: the keys-major product
        Dplr(D=16, H=2, K=8, backend=backend),  # two score terms, a head-less key
        Mlp(D=16, M=32, precond="diagonal", backend=backend),
        Softcap(D=16, H=2, K=8, backend=backend),  # pair ops: the block-sparse torch kernels
        RunningSum(D=16, M=8, backend=backend),  # a running sum over j <= i
    ).double()
    x = torch.randn(2, 8, 16, dtype=torch.float64, requires_grad=True)
    params = [x, *model.parameters()]

    def loss(x):
        return (model(x) ** 2).sum()

    eager = loss(x)
    eager_grads = torch.autograd.grad(eager, params)
    compiled = torch.compile(loss, fullgraph=True)
    out = compiled(x)
    grads = torch.autograd.grad(out, params)
    rtol, atol = tolerance(torch.float64)
    torch.testing.assert_close(out, eager, rtol=rtol, atol=atol)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
