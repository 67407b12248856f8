"""CEM attention: one descent step on a causal log-sum-exp interaction energy.

    E_i = -(1/beta) sum_h log sum_{j <= i} exp(beta (W_q,h x_i) . (W_k,h xbar_j))

One step is causal multi-head attention whose values are tied to the keys (W_k) and whose output
projection is W_q^T.
"""

from energyc.dsl import dims, dot, hyper, layer, logsumexp, param, sqrt, state, tokens

D, H, K = dims("D H K")
i, j = tokens()
x, xbar = state(D)
W_q = param("W_q", (H, K, D))
W_k = param("W_k", (H, K, D))
beta = hyper("beta", default=1 / sqrt(K))

q = W_q @ x[i]  # (H, K) at the updated token i
k = W_k @ xbar[j]  # (H, K) at a context token j
E = -(1 / beta) * logsumexp(beta * dot(q, k, over=K), over=j <= i).sum(H)

layer("cem_attention", E, eta=1.0)
