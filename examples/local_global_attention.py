"""A local/global mix: sliding-window heads plus causal heads, two context sets in one energy.

    E_i = -(1/beta) sum_h log sum_{i-w <= j <= i} exp(beta (A_q,h x_i) . (A_k,h xbar_j))
          -(1/beta) sum_g log sum_{j <= i} exp(beta (W_q,g x_i) . (W_k,g xbar_j))

Feature: two reductions over different context sets in one energy, each with its own heads and
projections: H local heads see the last w + 1 tokens (w = 4), G global heads the whole causal
prefix (as in models that interleave sliding-window and global attention, here summed in one
step).
"""

from energyc.dsl import dims, dot, hyper, layer, logsumexp, param, sqrt, state, tokens, window

D, H, G, K = dims("D H G K")
i, j = tokens()
x, xbar = state(D)
A_q = param("A_q", (H, K, D))  # local heads
A_k = param("A_k", (H, K, D))
W_q = param("W_q", (G, K, D))  # global heads
W_k = param("W_k", (G, K, D))
beta = hyper("beta", default=1 / sqrt(K))

local = logsumexp(beta * dot(A_q @ x[i], A_k @ xbar[j], over=K), over=window(4)).sum(H)
global_ = logsumexp(beta * dot(W_q @ x[i], W_k @ xbar[j], over=K), over=j <= i).sum(G)
E = -(1 / beta) * (local + global_)

layer("local_global_attention", E, eta=0.5)
