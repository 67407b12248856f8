"""CEM attention layers for the byte-level language model (examples/train_lm.py).

Six layers from one file: three positional schemes times two interactions.

    scores_ij = beta * s_ij with
      lowrank:  s = (W_q x_i) . (W_k xbar_j)
      dplr:     s = (W_q x_i) . (W_k xbar_j) + x_i^T diag(d_h) xbar_j
    positions:
      rope:     the low-rank part uses R_i W_q x_i and R_j W_k xbar_j (R_p a fixed rotation)
      alibi:    the scores get -m_h (i - j) (slopes m_h, learned, ALiBi-initialised)
      nope:     nothing
    E_i = -(1/beta) sum_h log sum_{j <= i} exp(scores_ij)
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


def causal_energy(scores):
    return -(1 / beta) * logsumexp(scores, over=j <= i).sum(H)


for interaction, extra in (("", 0), ("_dplr", diagonal)):
    layer(f"lm_attention_nope{interaction}", causal_energy(beta * (lowrank + extra)))
    layer(f"lm_attention_rope{interaction}", causal_energy(beta * (rope + extra)))
    layer(f"lm_attention_alibi{interaction}",
          causal_energy(beta * (lowrank + extra) - slopes * (i - j)))
