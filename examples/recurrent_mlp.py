"""A relu^2 MLP energy taken in three recursive steps, with a frozen context and a learned
diagonal preconditioner.

    E_i = -sum_m (U xbar_i)_m relu((W x_i)_m)^2 / 2        =>  dE_i/dx_i = -W^T [relu(W x_i) * (U xbar_i)]

Features: a piecewise function (relu), recursive steps with shared weights, context frozen at the
layer input, and a diagonal preconditioner.
"""

from energyc.dsl import dims, layer, param, relu, state, tokens

D, M = dims("D M")
i, j = tokens()
x, xbar = state(D)
W = param("W", (M, D))
U = param("U", (M, D))

E = -((U @ xbar[i]) * relu(W @ x[i]) ** 2 / 2).sum(M)

layer("recurrent_mlp", E, eta=0.2, steps=3, precond="diagonal", context="input")
