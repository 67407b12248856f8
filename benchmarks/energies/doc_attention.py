"""CEM attention (examples/cem_attention.py) over packed documents, for benchmarks/documents.py.

    E_i = -(1/beta) sum_h log sum_{j in C(i)} exp(beta (W_q,h x_i) . (W_k,h xbar_j))

with C(i) each token's earlier tokens, or its last 64, within its document (the layers read the
documents from the call: cu_seqlens= or document_ids=), the same sets over the whole row, and a
soft-capped score within each document (the pair kernels: a score function that is not a
product).
"""

from energyc.dsl import (
      dims,
      dot,
      hyper,
      layer,
      logsumexp,
      param,
      same_document,
      sqrt,
      state,
      tanh,
      tokens,
      window,
)

D, H, K = dims("D H K", D=256, H=4, K=64)
i, j = tokens()
x, xbar = state(D)
W_q = param("W_q", (H, K, D))
W_k = param("W_k", (H, K, D))
beta = hyper("beta", default=1 / sqrt(K))

q = W_q @ x[i]
k = W_k @ xbar[j]
s = beta * dot(q, k, over=K)

layer("doc_causal", -(1 / beta) * logsumexp(s, over=(j <= i) & same_document()).sum(H), eta=1.0)
layer("doc_window", -(1 / beta) * logsumexp(s, over=window(64) & same_document()).sum(H),
      eta=1.0)
layer("causal", -(1 / beta) * logsumexp(s, over=j <= i).sum(H), eta=1.0)
layer("window", -(1 / beta) * logsumexp(s, over=window(64)).sum(H), eta=1.0)
layer("doc_softcap", -(1 / beta) * logsumexp(30 * tanh(s / 30), over=(j <= i) & same_document())
      .sum(H), eta=1.0)
