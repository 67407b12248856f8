"""Bidirectional (all tokens) log-sum-exp attention plus a GELU-gated element-wise energy built
from a user-defined function with its own derivative, and a polynomial self-energy.

    E_i = -(1/beta) sum_h log sum_j exp(beta q_ih . k_jh)
          - sum_m (U xbar_i)_m Phi((W x_i)_m) + gamma |x_i|^4 / 4

Phi(u) = u (1 + erf(u / sqrt 2)) / 2 (GELU), declared with elementwise() and its derivative.
"""

from energyc.dsl import (
                         all_tokens,
                         dims,
                         dot,
                         elementwise,
                         erf,
                         exp,
                         hyper,
                         layer,
                         logsumexp,
                         param,
                         pi,
                         sqrt,
                         state,
                         tokens,
)

D, H, K, M = dims("D H K M")
i, j = tokens()
x, xbar = state(D)
W_q = param("W_q", (H, K, D))
W_k = param("W_k", (H, K, D))
W = param("W", (M, D))
U = param("U", (M, D))
beta = hyper("beta", default=1 / sqrt(K))
gamma = hyper("gamma", default=0.01)

gelu = elementwise(
    "gelu",
    lambda u: u * (1 + erf(u / sqrt(2))) / 2,
    derivative=lambda u: (1 + erf(u / sqrt(2))) / 2 + u * exp(-(u**2) / 2) / sqrt(2 * pi),
)

attention = -(1 / beta) * logsumexp(beta * dot(W_q @ x[i], W_k @ xbar[j], over=K),
                                    over=all_tokens()).sum(H)
mlp = -((U @ xbar[i]) * gelu(W @ x[i])).sum(M)
self_energy = gamma * dot(x[i], x[i], over=D) ** 2 / 4

layer("bidirectional_gelu", attention + mlp + self_energy, eta=0.5)
