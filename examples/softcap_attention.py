"""Causal CEM attention with soft-capped scores: the score is not linear in q . k.

    E_i = -(1/beta) sum_h log sum_{j <= i} exp(c tanh(beta (W_q,h x_i) . (W_k,h xbar_j) / c))

Feature: a score function phi(s) = c tanh(s / c) of the contraction s = beta q . k (logit
soft-capping, as in Gemma 2), so the softmax weights of the descent step are those of the capped
scores and each pair's value is scaled by phi'(s) = sech^2(s / c). As c -> infinity it is
cem_attention.
"""

from energyc.dsl import dims, dot, hyper, layer, logsumexp, param, sqrt, state, tanh, tokens

D, H, K = dims("D H K")
i, j = tokens()
x, xbar = state(D)
W_q = param("W_q", (H, K, D))
W_k = param("W_k", (H, K, D))
beta = hyper("beta", default=1 / sqrt(K))
cap = hyper("cap", default=5)  # c: scores are squashed into (-c, c)

q = W_q @ x[i]
k = W_k @ xbar[j]
scores = cap * tanh(beta * dot(q, k, over=K) / cap)
E = -(1 / beta) * logsumexp(scores, over=j <= i).sum(H)

layer("softcap_attention", E, eta=1.0)
