"""A causal mean-field energy: each token interacts with the running sum of its past features.

    E_i = -(1/T0) sum_m softplus((W x_i)_m) * sum_{j <= i} (V xbar_j)_m

Feature: a plain sum over a context set (not a log-sum-exp) of a value that depends on j only.
"""

from energyc.dsl import constant, dims, hyper, layer, param, softplus, state, sum_over, tokens

D, M = dims("D M")
i, j = tokens()
x, xbar = state(D)
W = param("W", (M, D))
V = param("V", (M, D))
T0 = hyper("T0", default=8)
gate = param("gate", (M,), init=constant(1))

E = -(gate * softplus(W @ x[i]) * sum_over(V @ xbar[j], j <= i)).sum(M) / T0

layer("causal_meanfield", E, eta=0.5)
