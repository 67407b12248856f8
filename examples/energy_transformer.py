"""Energy Transformer attention: a *joint* energy over all other tokens (j != i).

    E = -(1/beta) sum_i sum_h log sum_{j != i} exp(beta (W_q,h x_i) . (W_k,h x_j))

The state is used in both roles, so dE/dx_t has a query term (t = i) and a key term (t = j): two
attention-like passes, one with the transposed softmax.
"""

from energyc.dsl import dims, dot, hyper, layer, logsumexp, param, sqrt, state, tokens

D, H, K = dims("D H K")
i, j = tokens()
x, xbar = state(D)
W_q = param("W_q", (H, K, D))
W_k = param("W_k", (H, K, D))
beta = hyper("beta", default=1 / sqrt(K))

scores = beta * dot(W_q @ x[i], W_k @ x[j], over=K)
E = -(1 / beta) * logsumexp(scores, over=j != i).sum(H)

layer("energy_transformer", E, eta=0.1, joint=True)
