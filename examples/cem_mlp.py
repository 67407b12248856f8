"""CEM MLP: a gated MLP with a tied up/down projection, as one descent step.

    E_i = -sum_m (U xbar_i)_m softplus((W x_i)_m)
    dE_i/dx_i = -W^T [sigmoid(W x_i) * (U xbar_i)]      (the original GLU)
"""

from energyc.dsl import dims, layer, param, softplus, state, tokens

D, M = dims("D M")
i, j = tokens()
x, xbar = state(D)
W = param("W", (M, D))
U = param("U", (M, D))

E = -((U @ xbar[i]) * softplus(W @ x[i])).sum(M)

layer("cem_mlp", E, eta=1.0)
