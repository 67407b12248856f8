"""Energy Transformer block (Hoover et al. 2023): joint attention plus a ReLU^2 Hopfield network.

On the LayerNorm'ed state g (the layer's state x here; the LayerNorm sits outside the layer):

    E = -(1/beta) sum_i sum_h log sum_{j != i} exp(beta (W_q,h g_i) . (W_k,h g_j))
        - (1/2) sum_i sum_mu relu(Xi_mu . g_i)^2

The energy is joint (every token's total energy, so the key role of g_j is differentiated too).
benchmarks/bench_jax.py compiles this file and compares the step with the same maths in JAX.
"""

from energyc.dsl import dims, dot, hyper, layer, logsumexp, param, relu, sqrt, state, tokens

D, H, K, M = dims("D H K M")
i, j = tokens()
x, xbar = state(D)
W_q = param("W_q", (H, K, D))
W_k = param("W_k", (H, K, D))
Xi = param("Xi", (M, D))
beta = hyper("beta", default=1 / sqrt(K))

scores = beta * dot(W_q @ x[i], W_k @ x[j], over=K)
attention = -(1 / beta) * logsumexp(scores, over=j != i).sum(H)
h = relu(Xi @ x[i])  # (M,) at token i
hopfield = -dot(h, h, over=M) / 2

layer("et_block", attention + hopfield, eta=0.1, joint=True)
