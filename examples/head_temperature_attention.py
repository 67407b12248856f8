"""Causal CEM attention with a learned inverse temperature per head.

    E_i = -sum_h (1/beta_h) log sum_{j <= i} exp(beta_h (W_q,h x_i) . (W_k,h xbar_j)),
    beta_h = exp(t_h) / sqrt(K)

Feature: a per-head scale inside the scores and outside the log-sum-exp, learned through a
parameter t of dims (H,): the log of each head's inverse temperature relative to 1/sqrt(K), so
beta_h > 0 for every value of t, and t = 0 (its init) is the usual 1/sqrt(K). Each head can
sharpen or soften its softmax on its own.
"""

from energyc.dsl import dims, dot, exp, layer, logsumexp, param, sqrt, state, tokens, zeros

D, H, K = dims("D H K")
i, j = tokens()
x, xbar = state(D)
W_q = param("W_q", (H, K, D))
W_k = param("W_k", (H, K, D))
log_beta = param("log_beta", (H,), init=zeros())  # t_h

beta = exp(log_beta) / sqrt(K)  # beta_h: (H,), positive
scores = beta * dot(W_q @ x[i], W_k @ xbar[j], over=K)
E = -(logsumexp(scores, over=j <= i) / beta).sum(H)

layer("head_temperature_attention", E, eta=1.0)
