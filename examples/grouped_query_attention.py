"""Causal CEM attention with grouped key heads (grouped-query attention).

    E_i = -(1/beta) sum_g sum_r log sum_{j <= i} exp(beta (W_q,gr x_i) . (W_k,g xbar_j))

Feature: operands with different head axes. The keys live on G groups (W_k of dims (G, K, D)), the
queries on G x R heads (W_q of dims (G, R, K, D)); the R query heads of a group share its keys,
and so its values, which in a CEM step are the keys: the step is
x_i <- x_i + eta sum_{g,r} W_q,gr^T sum_{j <= i} softmax_j(beta q_igr . k_jg) W_k,g xbar_j, and the
gradient of W_k,g gathers the R heads of its group.
"""

from energyc.dsl import dims, dot, hyper, layer, logsumexp, param, sqrt, state, tokens

D, G, R, K = dims("D G R K", G=2, R=2)  # 2 groups of 2 query heads unless given
i, j = tokens()
x, xbar = state(D)
W_q = param("W_q", (G, R, K, D))
W_k = param("W_k", (G, K, D))
beta = hyper("beta", default=1 / sqrt(K))

q = W_q @ x[i]  # (G, R, K) at the updated token i
k = W_k @ xbar[j]  # (G, K) at a context token j: one key per group
E = -(1 / beta) * logsumexp(beta * dot(q, k, over=K), over=j <= i).sum(G, R)

layer("grouped_query_attention", E, eta=1.0)
