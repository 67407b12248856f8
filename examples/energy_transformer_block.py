"""The Energy Transformer block (Hoover et al. 2023) with its LayerNorm inside: a neuron layer g
with the EnergyLayerNorm Lagrangian, and descent x <- x - alpha dE/dg on

    E = -(1/beta) sum_h sum_i log sum_{j != i} exp(beta K_hj . Q_hi)     (attention)
        - 1/2 sum_i sum_mu relu(Xi_mu . g_i)^2                         (Hopfield)

with Q = W_q g, K = W_k g, g = gamma (x - mean x) / sigma + delta (scalar gamma, vector delta).
Twelve steps of alpha = 0.1 are one block (weights shared across the steps). The paper excludes
the token itself from its log-sum-exp (j != i); the official code (bhoov/energy-transformer-jax)
includes it: ``energy_transformer_block_official`` is that one.
"""

from energyc.dsl import (
    all_tokens,
    dims,
    dot,
    hyper,
    layer,
    logsumexp,
    neurons,
    param,
    relu,
    sqrt,
    tokens,
)
from energyc.lagrangians import layernorm

D, H, K, M = dims("D H K M")
i, j = tokens()
g, gbar = neurons("g", D, layernorm(eps=1e-5))
W_q = param("W_q", (H, K, D))
W_k = param("W_k", (H, K, D))
Xi = param("Xi", (M, D))
beta = hyper("beta", default=1 / sqrt(K))

scores = beta * dot(W_q @ g[i], W_k @ g[j], over=K)
hopfield = -0.5 * (relu(Xi @ g[i]) ** 2).sum(M)


def block(name: str, keys) -> None:
    attention = -(1 / beta) * logsumexp(scores, over=keys).sum(H)
    layer(name, {"attention": attention, "hopfield": hopfield}, eta=0.1, steps=12, joint=True)


block("energy_transformer_block", j != i)  # the paper's
block("energy_transformer_block_official", all_tokens())  # the official code's: self included
