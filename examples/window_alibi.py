"""Sliding-window CEM attention with a distance penalty and a learned inverse temperature.

    E_i = -(1/beta) sum_h log sum_{i-w <= j <= i} exp(beta (q_ih . k_jh) - m_h (i - j))

Features: a sliding-window context set, a score term that depends on i - j (ALiBi-like slopes
m_h, learned), and a learnable hyperparameter beta.
"""

from energyc.dsl import (
                         constant,
                         dims,
                         dot,
                         hyper,
                         layer,
                         logsumexp,
                         param,
                         sqrt,
                         state,
                         tokens,
                         window,
)

D, H, K = dims("D H K")
i, j = tokens()
x, xbar = state(D)
W_q = param("W_q", (H, K, D))
W_k = param("W_k", (H, K, D))
slopes = param("slopes", (H,), init=constant(0.5))
beta = hyper("beta", default=1 / sqrt(K), learnable=True)

scores = beta * dot(W_q @ x[i], W_k @ xbar[j], over=K) - slopes * (i - j)
E = -(1 / beta) * logsumexp(scores, over=window(4)).sum(H)

layer("window_alibi", E, eta=0.5)
