"""The neuron models against their peers' own code, in float64.

- The Energy Transformer block (generated ``energy_transformer_block_official``) against the
  official code, bhoov/energy-transformer-jax's ``architecture.py`` (EnergyLayerNorm, the attention
  and Hopfield energies, the image model's loop ``g = lnorm(x); x = x - alpha * grad(et.energy)(g)``)
  over 12 steps of alpha 0.1: run where ``ENERGYC_ET_OFFICIAL`` names a checkout of it or its git
  directory (nothing is fetched; skipped otherwise; ``benchmarks/bench_neurons.py --et-official``
  checks the same at every benchmark run).
- The three-layer digits memory (generated ``digits_memory``) against the same model in hamux's
  API (``NeuronLayer``, ``LinearSynapse``, ``HAM.vectorize()``; skipped without hamux): the
  activations, each energy term and the total, ``dEdact``, the states after its step loop (free
  and with the pixels clamped, with per-layer time constants), the energy along the dynamics, and
  the gradient of a loss through the dynamics.
- ``bench_neurons.py --quick`` runs.
"""

import os
import sys

import numpy as np
import pytest
import torch

from benchmarks import bench_neurons as bn
from energyc.runtime.backends import implementation

# The bound for the peers (1e-12), relative to max(1, |value|): the peers compute the same
# float64 arithmetic in another order, so agreement is to rounding, tighter than the float64 row
# of energyc.tolerances (which also bounds longer chains of differentiated graphs).
PEER_TOL = 1e-12


def assert_close(mine, theirs, what: str) -> None:
    mine = mine.detach().numpy() if isinstance(mine, torch.Tensor) else np.asarray(mine)
    theirs = np.asarray(theirs)
    assert mine.shape == theirs.shape, (what, mine.shape, theirs.shape)
    scale = max(1.0, float(np.abs(theirs).max()))
    diff = float(np.abs(mine - theirs).max())
    assert diff <= PEER_TOL * scale, f"{what}: max |energyc - peer| = {diff:.3g} (scale {scale:.3g})"


def _jax():
    jax = pytest.importorskip("jax")
    pytest.importorskip("equinox")
    return jax


def x64(jax):
    """A context with jax_enable_x64 on (``jax.enable_x64``; jax.experimental's before it)."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64

    return enable_x64()


# -- Energy Transformer: the official code ----------------------------------------------------


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    path = os.environ.get(bn.ENV_OFFICIAL)
    if not path:
        pytest.skip(f"{bn.ENV_OFFICIAL} does not name a checkout of bhoov/energy-transformer-jax")
    _jax()
    folder = tmp_path_factory.mktemp("et_official")
    return bn.import_official(bn.write_official(path, folder))


ET = {"B": 2, "T": 7, "D": 16, "H": 2, "K": 8, "M": 32, "steps": 12}


def test_et_block_equals_official(official):
    """States after 12 steps, the energy (and each term) before every step, and the gradient of
    sum(x_12^2) w.r.t. x, gamma, delta, W_q, W_k, Xi: the generated Layer against the official
    modules holding the same weights (official Xi (D, M) = energyc's Xi (M, D) transposed)."""
    jax = _jax()
    import jax.numpy as jnp

    problem = bn.et_problem(ET, torch.float64, seed=3)
    layer = problem.layer
    x = torch.from_numpy(problem.arrays["x"])
    with x64(jax):
        arrays = {k: jnp.asarray(v) for k, v in problem.arrays.items()}
        et, lnorm = bn.et_official_model(official, ET, arrays)
        xs, energies = arrays["x"], []
        terms = jax.jit(lambda xb: [f(lnorm(xb)) for f in (et.attn.energy, et.hn.energy,
                                                            et.energy)])
        step = jax.jit(lambda xb: xb - bn.ET_ALPHA * jax.grad(et.energy)(lnorm(xb)))
        for k in range(ET["steps"] + 1):
            # the official code takes one row's tokens (N, D): each row on its own
            per_row = [terms(xb) for xb in xs]
            energies.append({name: float(sum(values)) for name, values in zip(
                ("attention", "hopfield", "total"), zip(*per_row))})
            if k < ET["steps"]:
                xs = jnp.stack([step(xb) for xb in xs])
        assert_close(layer(x), xs, f"states after {ET['steps']} steps")
        trace = layer.trace(x)
        assert len(trace) == len(energies)
        for step, (mine, theirs) in enumerate(zip(trace, energies)):
            for name, value in theirs.items():
                assert_close(np.asarray(mine[name]), value, f"{name} energy before step {step}")

        loss = bn.et_official_loss(jax)
        import equinox as eqx

        params, static = eqx.partition((et, lnorm), eqx.is_array)
        value, (gx, (g_et, g_ln)) = jax.jit(jax.value_and_grad(
            lambda x, p: loss(x, eqx.combine(p, static), ET["steps"]), argnums=(0, 1)))(
            arrays["x"], params)
    theirs = {"x": gx, "gamma": g_ln.gamma, "delta": g_ln.delta, "W_q": g_et.attn.Wq,
              "W_k": g_et.attn.Wk, "Xi": g_et.hn.Xi.T}
    mine = problem.variants["energyc"]()
    assert_close(mine[0], value, "loss")
    for name, grad in zip(bn.ET_NAMES, mine[1:]):
        assert_close(grad, theirs[name], f"d loss / d {name}")


# -- hamux: the three-layer digits memory -----------------------------------------------------


DIGITS = {"V": 64, "N": 256, "C": 10}  # examples/digits_memory.py's dims
TAUS = {"pixels": 1.0, "hidden": 2.0, "labels": 0.5}


@pytest.fixture
def hamux_x64():
    """jax with jax_enable_x64 for the test's duration (hamux's arrays in float64)."""
    jax = _jax()
    pytest.importorskip("hamux")
    with x64(jax):
        yield jax


def digits(beta: float = 2.5, tau=None, steps: int = 8, batch: int = 5, seed: int = 0):
    """The generated Layer (float64, its default init), random states (B, 1, D_l) and the same
    model in hamux's API holding its weights (call under jax.enable_x64: float64 arrays)."""
    import jax.numpy as jnp

    from generated.digits_memory import Layer

    torch.manual_seed(seed)
    layer = Layer(**DIGITS, beta=beta, eta=bn.DIGITS_ETA, steps=steps, tau=tau,
                  dtype=torch.float64)
    states = [torch.randn(batch, 1, layer._dim_of(k), dtype=torch.float64) for k in range(3)]
    ham = bn.digits_hamux_model({**DIGITS}, jnp.asarray(layer.W.detach().numpy()),
                                jnp.asarray(layer.U.detach().numpy()), beta)
    xs = {name: jnp.asarray(s[:, 0].numpy()) for name, s in zip(bn.DIGITS_LAYERS, states)}
    return layer, states, ham, xs


def dEdact(layer, states) -> list[torch.Tensor]:
    """energyc's dE/dg_l with the Legendre terms (hamux's ``dEdact``): x_l + dE_s/dg_l, dE_s/dg
    from the generated ``_grad_forward`` the dynamics run."""
    path, kernels = implementation("torch", states[0], layer._declared.package)
    gs = layer.activations(*states)
    *ds, _ = path._grad_forward(kernels, gs[0], gs[0], *gs[1:], *layer._params(),
                                *layer._hypers(states[0]))
    return [x + d for x, d in zip(states, ds)]


def test_digits_activations_energies_dEdact_equal_hamux(hamux_x64):
    layer, states, ham, xs = digits()
    xhats = ham.activations(xs)
    tree = ham.energy_tree(xhats, xs)
    total = ham.energy(xhats, xs)
    grads = ham.dEdact(xhats, xs)
    for name, g in zip(bn.DIGITS_LAYERS, layer.activations(*states)):
        assert_close(g[:, 0], xhats[name], f"activation of {name}")
    energies = layer.energies(*states)
    for name in bn.DIGITS_LAYERS:  # hamux's neuron energy: the Legendre transform x.g - L(x)
        assert_close(energies[f"legendre_{name}"], tree["neurons"][name], f"energy of {name}")
    for term, theirs in zip(("pixels_hidden", "hidden_labels"), tree["connections"]):
        assert_close(energies[term], theirs, f"energy of synapse {term}")
    assert_close(energies["total"], total, "total energy")
    assert_close(layer.energy(*states), total, "layer.energy")
    for name, mine in zip(bn.DIGITS_LAYERS, dEdact(layer, states)):
        assert_close(mine[:, 0], grads[name], f"dEdact of {name}")


@pytest.mark.parametrize("tau", [None, TAUS], ids=["tau1", "tau"])
@pytest.mark.parametrize("clamp", [(), ("pixels",)], ids=["free", "clamped"])
def test_digits_dynamics_equal_hamux(hamux_x64, tau, clamp):
    """The states after 8 steps of hamux's loop (x_l - eta / tau_l * dEdact, clamped layers
    held), and the total energy before every step and after the last (``layer.trace``)."""
    taus = {**{n: 1.0 for n in bn.DIGITS_LAYERS}, **(tau or {})}
    layer, states, ham, xs = digits(tau=tau)
    trace = layer.trace(*states, clamp=clamp)
    out = layer(*states, clamp=clamp)
    assert len(trace) == 9
    for step in range(9):
        xhats = ham.activations(xs)
        assert_close(np.asarray(trace[step]["total"]), ham.energy(xhats, xs).sum(),
                     f"total energy before step {step}")
        if step < 8:
            xs = bn.hamux_dynamics(hamux_x64, ham, xs, 1, bn.DIGITS_ETA, taus, clamp)
    for name, mine in zip(bn.DIGITS_LAYERS, out):
        assert_close(mine[:, 0], xs[name], f"state of {name} after 8 steps")
    if clamp:
        assert torch.equal(out[0], states[0])


def test_digits_training_gradient_equals_hamux(hamux_x64):
    """The gradient w.r.t. W and U of a loss through the dynamics (the benchmark's: cross-entropy
    of the label activation + MSE of the pixels): energyc's backward against jax.grad through
    hamux's loop."""
    import jax.numpy as jnp

    problem = bn.digits_problem({"B": 4, **DIGITS, "steps": 8}, torch.float64, 1, 2.5, TAUS)
    mine = problem.variants["energyc"]()
    fn, args, unpack = bn.build_program("digits_hamux", hamux_x64, jnp, problem.arrays,
                                        problem.cfg, None)
    value, grads = fn(*args)
    theirs = unpack(grads)
    assert_close(mine[0], value, "loss")
    for name, grad in zip(bn.DIGITS_NAMES, mine[1:]):
        assert_close(grad, theirs[name], f"d loss / d {name}")


# -- the benchmark's smoke test ---------------------------------------------------------------


def test_bench_neurons_quick_without_jax(capsys):
    """--quick --no-jax: the check (energyc against torch autograd), both tables and profiles."""
    threads = torch.get_num_threads()
    try:
        assert bn.main(["--quick", "--no-jax", "--threads", "1", "--repeats", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "PASS" in out
    assert "### Energy Transformer block (--quick sizes)" in out
    assert "### Digits memory (--quick sizes)" in out
    assert out.count("| energyc |") == 2 and out.count("| torch autograd |") == 2
    assert "`_grad_backward`" in out


@pytest.mark.slow
def test_bench_neurons_quick(capsys):
    """--quick with the JAX columns (and the official one where ENERGYC_ET_OFFICIAL is set)."""
    _jax()
    pytest.importorskip("hamux")
    threads = torch.get_num_threads()
    try:
        assert bn.main(["--quick", "--threads", "1", "--repeats", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "PASS" in out
    assert "| JAX plain |" in out and "| hamux |" in out
    assert ("| JAX official |" in out) == bool(os.environ.get(bn.ENV_OFFICIAL))
    assert "max |energyc - hamux|" in out


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
