"""Modern Hopfield network: memories Xi retrieved by descent on

    E_i = -(1/beta) log sum_mu exp(beta Xi_mu . x_i) + |x_i|^2 / 2

One step with eta = 1 is Hopfield retrieval: x_i <- sum_mu softmax_mu(beta Xi x_i) Xi_mu.
"""

from energyc.dsl import dims, dot, hyper, layer, logsumexp, param, state, tokens

D, M = dims("D M")
i, j = tokens()
x, xbar = state(D)
Xi = param("Xi", (M, D))
beta = hyper("beta", default=1)

E = -(1 / beta) * logsumexp(beta * (Xi @ x[i]), over=M) + dot(x[i], x[i], over=D) / 2

layer("hopfield", E, eta=1.0)
