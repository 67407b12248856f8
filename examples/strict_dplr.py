"""Strictly causal attention (j < i) with a diagonal-plus-low-rank interaction, preconditioned.

    E_i = -(1/beta) sum_h log sum_{j < i} exp(beta x_i^T (diag(d_h) + W_q,h^T W_k,h) xbar_j)

Features: the strict context set (token 0 sees nothing: its log-sum-exp is 0 by convention), a
diagonal-plus-low-rank interaction, and a learned diagonal-plus-low-rank preconditioner P by
default.
"""

from energyc.dsl import dims, dot, hyper, layer, logsumexp, normal, param, sqrt, state, tokens

D, H, K = dims("D H K")
i, j = tokens()
x, xbar = state(D)
W_q = param("W_q", (H, K, D))
W_k = param("W_k", (H, K, D))
d = param("d", (H, D), init=normal(std=0.1))
beta = hyper("beta", default=1 / sqrt(D))

interaction = dot(d * x[i], xbar[j], over=D) + dot(W_q @ x[i], W_k @ xbar[j], over=K)
E = -(1 / beta) * logsumexp(beta * interaction, over=j < i).sum(H)

layer("strict_dplr", E, eta=0.5, precond="dplr", rank=2)
