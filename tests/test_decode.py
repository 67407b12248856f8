"""Incremental decoding (``Layer.decode``, issue 12): every causal example decodes a sequence split
into any calls to the outputs of ``forward`` on the whole sequence; the others say why they
cannot."""

from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from energyc import runtime as rt
from energyc.tolerances import tolerance
from tests.conftest import context_data
from tests.test_runtime_edges import PACKAGES, build, state_dim

# the examples whose context sets hold later tokens (all j, j != i), and those that read a
# memory (decoding with one is not supported yet): no incremental form
NOT_CAUSAL = {"bidirectional_gelu", "energy_transformer", "cross_attention", "hopfield_memory"}
# neuron models do not decode yet (their DECODE_UNSUPPORTED says so)
NEURON_MODELS = {p for p in PACKAGES
                 if hasattr(importlib.import_module(f"generated.{p}.layer"), "NEURONS")}
DECODABLE = [p for p in PACKAGES if p not in NOT_CAUSAL | NEURON_MODELS]


def _module(package: str):
    return importlib.import_module(f"generated.{package}.layer")


def _layer(package: str, **settings_) -> torch.nn.Module:
    layer = build(package, 4, dtype=torch.float64, eta=0.3, **settings_)
    with torch.no_grad():  # away from the initial values (zeros, the identity)
        gen = torch.Generator().manual_seed(1)
        for p in layer.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return layer


def _decode_in_pieces(layer, x: torch.Tensor, cuts: list[int], **data) -> torch.Tensor:
    """Decode x in the pieces that ``cuts`` make; ``data``: the forward's document_ids, whose
    columns each call takes for its tokens."""
    cache, outs, start = None, [], 0
    for stop in [*cuts, x.shape[1]]:
        piece = {k: v[:, start:stop] for k, v in data.items()}
        y, cache = layer.decode(x[:, start:stop], cache, **piece)
        assert cache.position == stop
        outs.append(y)
        start = stop
    return torch.cat(outs, dim=1)


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    rtol, atol = tolerance(torch.float64)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def test_the_causal_examples_decode_and_the_others_say_why():
    for package in PACKAGES:
        reason = _module(package).DECODE_UNSUPPORTED
        assert (reason is None) == (package not in NOT_CAUSAL | NEURON_MODELS), (package, reason)
        assert (package in NEURON_MODELS) == ("neuron model" in (reason or "")), (package, reason)


@pytest.mark.parametrize("package", DECODABLE)
@settings(max_examples=4, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_decode_in_any_split_equals_the_forward(package, data):
    """Random splits of a sequence longer than the windows (w = 4) and the pair tiles' edges
    within a call, steps 1 and 3, both context modes, every preconditioner (float64)."""
    module = _module(package)
    steps = data.draw(st.sampled_from([1, 3]), label="steps")
    context = data.draw(st.sampled_from(["current", "input"]), label="context")
    precond = data.draw(st.sampled_from(list(module.PRECONDITIONERS)), label="precond")
    T = data.draw(st.integers(1, 12), label="tokens")
    cuts = sorted(data.draw(st.sets(st.integers(1, T - 1), max_size=4), label="cuts")) if T > 1 \
        else []
    layer = _layer(package, steps=steps, context=context, precond=precond)
    x = torch.randn(2, T, state_dim(layer), dtype=torch.float64,
                    generator=torch.Generator().manual_seed(T))
    data = context_data(package, 2, T)  # documents: each row's, cut inside the calls and at them
    with torch.no_grad():
        want = layer(x, **data)
    _assert_close(_decode_in_pieces(layer, x, cuts, **data), want)


@pytest.mark.parametrize("package", ["strict_dplr", "window_alibi", "local_global_attention",
                                     "lm_attention_rope", "lm_attention_alibi",
                                     "causal_meanfield"])
def test_decode_one_token_at_a_time(package):
    """Token 0 alone (an empty strict set), every window edge, and rotary and i - j biases at
    every offset: one token per call, after a prefill of 3."""
    layer = _layer(package, steps=2)
    x = torch.randn(1, 10, state_dim(layer), dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = layer(x)
    _assert_close(_decode_in_pieces(layer, x, list(range(1, 10))), want)
    _assert_close(_decode_in_pieces(layer, x, list(range(3, 10))), want)


@pytest.mark.parametrize("package", sorted(NOT_CAUSAL))
def test_decode_raises_where_a_context_holds_later_tokens(package):
    layer = build(package, 4)
    reason = _module(package).DECODE_UNSUPPORTED
    with pytest.raises(ValueError, match="decode needs") as err:
        layer.decode(torch.randn(1, 2, state_dim(layer)))
    assert reason in str(err.value)


def test_the_cache_holds_the_keys_per_step_and_one_set_with_a_frozen_context():
    """lm_attention_rope caches its rotated keys: with context "current" one set per step, with
    "input" (keys of the layer's input alone) one set for all; a call leaves the cache it was
    given as it was."""
    for context, sets in (("current", 3), ("input", 1)):
        layer = _layer("lm_attention_rope", steps=3, context=context)
        x = torch.randn(2, 5, state_dim(layer), dtype=torch.float64)
        _, cache = layer.decode(x[:, :3])
        assert len({id(step) for step in cache.steps}) == sets
        (name,) = cache.values(0)  # the rotated keys' variable in _grad_decode
        keys = cache.values(0)[name].clone()
        assert keys.shape == (2, 3, 4, 4)  # (b, j, H, K) over the 3 tokens
        y, later = layer.decode(x[:, 3:], cache)
        assert cache.position == 3 and torch.equal(cache.values(0)[name], keys)
        assert later.position == 5 and later.values(0)[name].shape[1] == 5
        assert torch.equal(later.values(0)[name][:, :3], keys)
        assert not y.requires_grad


def test_a_cache_can_branch():
    """Two continuations decoded from one cache (the buffers grow in place) each give the
    forward's outputs of their own sequence."""
    layer = _layer("lm_attention_rope", steps=2)
    gen = torch.Generator().manual_seed(3)
    prefix, a, b = (torch.randn(1, n, state_dim(layer), dtype=torch.float64, generator=gen)
                    for n in (4, 3, 2))
    _, cache = layer.decode(prefix)
    ya1, cache_a = layer.decode(a[:, :1], cache)
    yb, _ = layer.decode(b, cache)  # writes where branch a wrote its first token
    ya2, _ = layer.decode(a[:, 1:], cache_a)
    with torch.no_grad():
        want_a = layer(torch.cat([prefix, a], 1))[:, 4:]
        want_b = layer(torch.cat([prefix, b], 1))[:, 4:]
    _assert_close(torch.cat([ya1, ya2], 1), want_a)
    _assert_close(yb, want_b)


def test_decode_checks_its_arguments():
    layer = _layer("cem_attention")
    other = _layer("lm_attention_rope")
    x = torch.randn(2, 3, state_dim(layer), dtype=torch.float64)
    _, cache = layer.decode(x)
    with pytest.raises(ValueError, match="batch 1 does not match the cache's"):
        layer.decode(x[:1], cache)
    with pytest.raises(ValueError, match="expected None or a DecodeCache"):
        other.decode(x, cache)
    with pytest.raises(ValueError, match="expected None or a DecodeCache"):
        layer.decode(x, {"t1": x})
    with pytest.raises(ValueError, match="expected shape"):
        layer.decode(x[..., :2])
    with pytest.raises(TypeError, match="does not match the layer's parameters"):
        layer.decode(x.float())


def test_extend_joins_the_new_tokens_once_per_call():
    cache: dict = {}
    a = torch.zeros(1, 2, 3)
    assert torch.equal(rt.extend(cache, "k", a, 1, 0), a)
    b = torch.ones(1, 1, 3)
    joined = rt.extend(cache, "k", b, 1, 2)
    assert joined.shape == (1, 3, 3) and torch.equal(joined[:, 2], b[:, 0])
    again = rt.extend(cache, "k", b, 1, 2)  # a second step of the same call: no second join
    assert again.shape == (1, 3, 3) and again.data_ptr() == joined.data_ptr()
    with pytest.raises(RuntimeError, match="holds 3 tokens, expected 5"):
        rt.extend(cache, "k", b, 1, 5)
    for n in range(3, 40):  # the buffer grows by doubling: few copies of the prefix
        rt.extend(cache, "k", b, 1, n)
    assert cache["k"].buffer.shape[1] < 2 * 40 + 16


@pytest.mark.parametrize("kind", [("causal",), ("strict",), ("window", 3)])
@pytest.mark.parametrize("P", [1, 4, 9])
def test_pair_kernels_with_a_query_offset_give_the_rows_of_the_whole_sequence(kind, P):
    """pair_softmax_sums, pair_sums and running_sum for the t queries after P tokens, against
    the rows P .. P + t - 1 of the whole sequence, with an i - j term in phi (tiles of 2 x 3:
    the tile edges fall inside the queries and the keys)."""
    from energyc.runtime import pairs

    gen = torch.Generator().manual_seed(P)
    T, t = P + 5, 5
    q = torch.randn(2, 3, T, 4, dtype=torch.float64, generator=gen)
    k = torch.randn(2, 3, T, 4, dtype=torch.float64, generator=gen)
    v = torch.randn(2, 3, T, 2, dtype=torch.float64, generator=gen)

    def phi_g(u, d, e):
        return u[0] * 0.5 - 0.3 * d, torch.tanh(u[0])

    def weights(u, d, e):
        return (torch.sigmoid(u[0] - 0.1 * d),)

    common = {"shape": (2, 3), "uses_offset": True, "dtype": torch.float64, "device": q.device}
    old = pairs.BLOCK_Q, pairs.BLOCK_K
    pairs.BLOCK_Q, pairs.BLOCK_K = 2, 3
    try:
        whole = pairs.pair_softmax_sums([q], [k], [], phi_g, [("i", v, 0)], kind, T=T, **common)
        part = pairs.pair_softmax_sums([q[..., P:, :]], [k], [], phi_g, [("i", v, 0)], kind,
                                       T=t, offset=P, **common)
        sums = pairs.pair_sums([q], [k], [], weights, [("i", v, 0)], kind, T=T, **common)
        sums_part = pairs.pair_sums([q[..., P:, :]], [k], [], weights, [("i", v, 0)], kind,
                                    T=t, offset=P, **common)
    finally:
        pairs.BLOCK_Q, pairs.BLOCK_K = old
    for a, b in zip(part, whole):
        _assert_close(a, b[..., P:] if a.dim() == 3 else b[..., P:, :])
    _assert_close(sums_part[0], sums[0][..., P:, :])
    running = pairs.running_sum(v, 2, kind, keys_major=False)
    _assert_close(pairs.running_sum(v, 2, kind, keys_major=False, offset=P), running[..., P:, :])


def test_a_window_caches_its_last_tokens_alone():
    """window_alibi (w = 4) keeps the keys of the window before the latest call's queries and
    that call's: memory bounded by the window, outputs those of the whole sequence."""
    layer = _layer("window_alibi", steps=2)
    x = torch.randn(1, 20, state_dim(layer), dtype=torch.float64,
                    generator=torch.Generator().manual_seed(5))
    cache, outs = None, []
    for start in range(0, 20, 2):
        y, cache = layer.decode(x[:, start:start + 2], cache)
        (keys,) = cache.values(0).values()  # the one cached value: the keys
        assert keys.shape[1] <= 4 + 2
        outs.append(y)
    with torch.no_grad():
        _assert_close(torch.cat(outs, 1), layer(x))
