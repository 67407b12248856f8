"""Sigmoid attention as a descent step: a sum (not a log-sum-exp) over the causal context.

    E_i = -(1/beta) sum_h sum_{j <= i} softplus(beta (W_q,h x_i) . (W_k,h xbar_j) + b_h)

Feature: a sum-type reduction over a context set. Its gradient weighs each context token by
sigmoid(beta q_ih . k_jh + b_h) instead of a softmax over j, so the weights of one token do not
compete with the others' and need not sum to one; the learned per-head bias b_h (initialised
negative, as sigmoid attention is usually started with b = -log(tokens)) keeps the total weight of
a long context in check.
"""

from energyc.dsl import (
    constant,
    dims,
    dot,
    hyper,
    layer,
    param,
    softplus,
    sqrt,
    state,
    sum_over,
    tokens,
)

D, H, K = dims("D H K")
i, j = tokens()
x, xbar = state(D)
W_q = param("W_q", (H, K, D))
W_k = param("W_k", (H, K, D))
bias = param("bias", (H,), init=constant(-2))  # b_h
beta = hyper("beta", default=1 / sqrt(K))

scores = beta * dot(W_q @ x[i], W_k @ xbar[j], over=K) + bias
E = -(1 / beta) * sum_over(softplus(scores), j <= i).sum(H)

layer("sigmoid_attention", E, eta=0.5)
