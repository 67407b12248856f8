"""CEM attention layers for the byte-level language model (examples/train_lm.py).

Twelve layers from one file: three positional schemes times two interactions, each over the
causal set and, for windows packed from several documents (``train_lm.py --pack-documents``),
over the causal set within a document (``_documents``, called with ``document_ids=``).

    scores_ij = beta * s_ij with
      lowrank:  s = (W_q x_i) . (W_k xbar_j)
      dplr:     s = (W_q x_i) . (W_k xbar_j) + x_i^T diag(d_h) xbar_j
    positions:
      rope:     the low-rank part uses R_i W_q x_i and R_j W_k xbar_j (R_p a fixed rotation)
      alibi:    the scores get -m_h (i - j) (slopes m_h, learned, ALiBi-initialised)
      nope:     nothing
    E_i = -(1/beta) sum_h log sum_{j in C(i)} exp(scores_ij)
    C(i): j <= i, or (j <= i) & same_document(): the keys of token i's own document up to i

Positions enter the scores only as i - j (the rotation's angle, the ALiBi term), so a document
packed after others scores as it does alone: no per-document position offsets.
"""

from energyc.dsl import (
    alibi_slopes,
    dims,
    dot,
    hyper,
    layer,
    logsumexp,
    param,
    rotary,
    same_document,
    sqrt,
    state,
    tokens,
    zeros,
)

D, H, K = dims("D H K")
i, j = tokens()
x, xbar = state(D)
W_q = param("W_q", (H, K, D))
W_k = param("W_k", (H, K, D))
d = param("d", (H, D), init=zeros())
slopes = param("slopes", (H,), init=alibi_slopes())
beta = hyper("beta", default=1 / sqrt(K))

q = W_q @ x[i]
k = W_k @ xbar[j]
lowrank = dot(q, k, over=K)
rope = dot(rotary(q, over=K), rotary(k, over=K), over=K)
diagonal = dot(d * x[i], xbar[j], over=D)


def causal_energy(scores, over):
    return -(1 / beta) * logsumexp(scores, over=over).sum(H)


for documents, over in (("", j <= i), ("_documents", (j <= i) & same_document())):
    for interaction, extra in (("", 0), ("_dplr", diagonal)):
        name = f"{interaction}{documents}"
        layer(f"lm_attention_nope{name}", causal_energy(beta * (lowrank + extra), over))
        layer(f"lm_attention_rope{name}", causal_energy(beta * (rope + extra), over))
        layer(f"lm_attention_alibi{name}",
              causal_energy(beta * (lowrank + extra) - slopes * (i - j), over))
