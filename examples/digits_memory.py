"""A three-layer associative memory (hamux): pixels, hidden and label neurons joined by two
dense synapses, with hamux's dynamics (each layer's Legendre term in the energy):

    E = sum_l (x_l . g_l - L_l(x_l)) - g_h . (W g_v) - g_h . (U g_c)

    pixels  v: identity Lagrangian (g_v = x_v)
    hidden  h: softmax Lagrangian, inverse temperature beta (g_h = softmax(beta x_h))
    labels  c: softmax Lagrangian (g_c = softmax(x_c))

x_l <- x_l - (eta / tau_l)(x_l + dE/dg_l). With the pixels clamped to an image the labels settle
on its digit; with every layer free from a masked image the pixels fill in what was masked
(examples/train_digits.py trains both on scikit-learn's 8x8 digits).
"""

from energyc.dsl import dims, dot, hyper, layer, neurons, param, tokens
from energyc.lagrangians import identity, softmax

V, N, C = dims("V N C", V=64, N=256, C=10)
i, j = tokens()
beta = hyper("beta", default=1)
v, _ = neurons("pixels", V, identity())
h, _ = neurons("hidden", N, softmax(beta))
c, _ = neurons("labels", C, softmax())
W = param("W", (N, V))
U = param("U", (N, C))

layer("digits_memory", {"pixels_hidden": -dot(h[i], W @ v[i], over=N),
                        "hidden_labels": -dot(h[i], U @ c[i], over=N)},
      eta=0.5, steps=8, dynamics="legendre")
