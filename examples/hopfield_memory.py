"""Hopfield retrieval over stored patterns given at run time:

    E_i = -(1/beta) log sum_m exp(beta c_m . x_i) + |x_i|^2 / 2

c is a memory (``layer(x, memory=patterns)``, patterns (batch, M, D)), not a learned parameter
as in hopfield.py. One step with eta = 1 is retrieval:
x_i <- sum_m softmax_m(beta c . x_i) c_m. The backward gives the patterns' gradient too.
"""

from energyc.dsl import all_tokens, dims, dot, hyper, layer, logsumexp, memory, state, tokens

D = dims("D")
i, j = tokens()
x, xbar = state(D)
c = memory("c", D)  # the stored patterns
beta = hyper("beta", default=1)

E = -(1 / beta) * logsumexp(beta * dot(c[j], x[i], over=D), over=all_tokens()) + dot(x[i], x[i], over=D) / 2

layer("hopfield_memory", E, eta=1.0)
