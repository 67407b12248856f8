"""Cross-attention as a descent step: a decoder's tokens x read an encoder's output c.

    E_i = -(1/beta) sum_h log sum_m exp(beta (W_q,h x_i) . (W_k,h c_m))

c is a memory (a second sequence given at call time: ``layer(x, memory=enc_out)``, with
``memory_lengths=`` for a padded batch); the sum runs over all its tokens. One step is multi-head
cross-attention whose values are tied to the keys (W_k c_m) and whose output projection is W_q^T;
the backward gives the encoder output's gradient too.
"""

from energyc.dsl import (
    all_tokens,
    dims,
    dot,
    hyper,
    layer,
    logsumexp,
    memory,
    param,
    sqrt,
    state,
    tokens,
)

D, Dm, H, K = dims("D Dm H K", Dm=64)  # the encoder's width: a default size
i, j = tokens()
x, xbar = state(D)
c = memory("c", Dm)  # the encoder's output: (batch, M, Dm) at call time
W_q = param("W_q", (H, K, D))
W_k = param("W_k", (H, K, Dm))
beta = hyper("beta", default=1 / sqrt(K))

q = W_q @ x[i]  # (H, K) at the updated token i
k = W_k @ c[j]  # (H, K) at a memory token j
E = -(1 / beta) * logsumexp(beta * dot(q, k, over=K), over=all_tokens()).sum(H)

layer("cross_attention", E, eta=1.0)
