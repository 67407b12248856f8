"""Lagrangians of neuron layers: ``neurons("g", D, layernorm())``.

A neuron layer's activation is the gradient of its Lagrangian, g = dL/dx, and the Jacobian of
the activation is L's Hessian J = d^2 L / dx^2: symmetric by construction, positive
semi-definite where L is convex, which is what makes every descent on an energy of g lower
that energy (``energyc check`` verifies it). Each function here returns the Lagrangian as a
function of the state at the updated token (a tensor over the layer's dim), written in the
notation like any energy, so the compiler derives g and J v symbolically:

==================  ===============================================  ===============================
Lagrangian          L(x)                                             activation g = dL/dx
==================  ===============================================  ===============================
identity()          x . x / 2                                        x
relu()              sum relu(x)^2 / 2                                relu(x)
repu(n)             sum relu(x)^n / n                                relu(x)^(n-1)
sigmoid()           sum softplus(x)                                  sigmoid(x)
tanh()              sum log cosh(x)                                  tanh(x)
softmax(beta)       (1/beta) log sum_k exp(beta x_k)                 softmax(beta x)
layernorm()         D gamma sqrt(mean((x - mean x)^2) + eps)         gamma (x - mean x) / sigma
                    + delta . x                                      + delta
spherical()         sqrt(x . x)                                      x / |x|
==================  ===============================================  ===============================

A user's own Lagrangian is any function of the state returning a scalar per token:
``neurons("h", N, lambda x: sum_over(softplus(x), N))``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from energyc import dsl
from energyc.dsl import Tensor, dot, logsumexp, ones, param, sum_over, zeros
from energyc.errors import EnergyError
from energyc.ir import functions as _fn

Lagrangian = Callable[[Tensor], Tensor]


def _dim(x: Tensor) -> Any:
    """The layer's dim (a SymPy symbol, usable as a size in expressions)."""
    (d,) = x.order
    return dsl.current_file().dims[d]


def identity() -> Lagrangian:
    """L = x . x / 2: g = x (hamux's identity layer, pixels)."""
    return lambda x: dot(x, x, over=_dim(x)) / 2


def relu() -> Lagrangian:
    """L = sum relu(x)^2 / 2: g = relu(x)."""
    return lambda x: sum_over(dsl.relu(x) ** 2, _dim(x)) / 2


def repu(n: int) -> Lagrangian:
    """L = sum relu(x)^n / n: g = relu(x)^(n - 1) (rectified polynomial, n >= 2)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        raise dsl._fail(f"repu(n): n must be an integer >= 2 (the power of the Lagrangian; the "
                        f"activation is relu(x)^(n-1)), got {n!r}")
    return lambda x: sum_over(dsl.relu(x) ** n, _dim(x)) / n


def sigmoid() -> Lagrangian:
    """L = sum softplus(x): g = sigmoid(x)."""
    return lambda x: sum_over(dsl.softplus(x), _dim(x))


def tanh() -> Lagrangian:
    """L = sum log cosh(x), written log cosh(x) = x + softplus(-2x) - log 2 (finite where cosh
    overflows): g = tanh(x)."""
    return lambda x: sum_over(dsl.apply(lambda u: u + _fn.softplus(-2 * u) - dsl.sympy.log(2), x),
                              _dim(x))


def softmax(beta: Any = 1) -> Lagrangian:
    """L = (1/beta) log sum_k exp(beta x_k): g = softmax(beta x). ``beta`` (the inverse
    temperature): a number or a hyperparameter (``hyper("beta", default=1)``)."""
    return lambda x: logsumexp(beta * x, over=_dim(x)) / beta


def spherical() -> Lagrangian:
    """L = |x| = sqrt(x . x): g = x / |x| (the state's direction)."""
    return lambda x: dsl.sqrt(dot(x, x, over=_dim(x)))


def layernorm(gamma: Any = "gamma", delta: Any = "delta", eps: float = 1e-5) -> Lagrangian:
    """The Energy Transformer's LayerNorm: L = D gamma sqrt(mean((x - mean x)^2) + eps) +
    delta . x, whose gradient is g = gamma (x - mean x) / sqrt(var + eps) + delta.

    ``gamma`` and ``delta``: the names of the parameters declared for them (gamma a scalar,
    initialised to 1; delta over the layer's dim, initialised to 0), or parameters declared by
    the file (``param("gamma", ())``), or numbers. A per-feature weight (gamma over the dim) is
    refused: its activation diag(w) J_LN has a Jacobian that is not symmetric, so it is the
    gradient of no Lagrangian and the dynamics would lose their energy guarantee."""

    def build(x: Tensor) -> Tensor:
        D = _dim(x)
        (d,) = x.order
        g = param(gamma, (), init=ones()) if isinstance(gamma, str) else gamma
        b = param(delta, (d,), init=zeros()) if isinstance(delta, str) else delta
        if isinstance(g, Tensor) and g.order:
            raise EnergyError(
                f"layernorm(gamma=...): gamma has dims ({dsl._pub(g.order)}); a per-feature weight "
                f"w makes the activation diag(w) J_LN, whose Jacobian is not symmetric: it is the "
                f"gradient of no Lagrangian, and descent on it is not descent on an energy. Use a "
                f"scalar gamma (the Energy Transformer's), or a bias delta over the dim",
                dsl.user_location())
        if isinstance(b, Tensor) and b.order not in ((), (d,)):
            raise dsl._fail(f"layernorm(delta=...): delta must be a scalar or over the layer's dim "
                            f"{dsl._pub([d])}, got dims ({dsl._pub(b.order)})")
        centred = x - sum_over(x, D) / D
        sigma = dsl.sqrt(sum_over(centred * centred, D) / D + eps)
        bias = dot(b, x, over=D) if isinstance(b, Tensor) and b.order else b * sum_over(x, D)
        return D * g * sigma + bias

    return build


#: the library, by name (``energyc check`` and the docs walk it)
LIBRARY: dict[str, Callable[..., Lagrangian]] = {
    "identity": identity, "relu": relu, "repu": repu, "sigmoid": sigmoid, "tanh": tanh,
    "softmax": softmax, "spherical": spherical, "layernorm": layernorm,
}
