"""The preconditioners P of a layer's step ``x <- x - eta * P g`` (g = dE/dx), for every layer.

With s = softplus(p) (p = ``P_diag``, shape (D,)) and L = ``P_lowrank`` (D, R), on g of shape
(B, T, D), each token's g_bt a row:

* ``identity``:  u = g.
* ``diagonal``:  u = s * g (P = diag(s), positive: s > 0).
* ``dplr``:      u = s * g + (g L) L^T (P = diag(s) + L L^T, positive definite).

Their vector-Jacobian products with an upstream gradient G = dLoss/du (B, T, D), where
sigmoid(p) = d softplus(p) / dp:

* identity:  dg = G.
* diagonal:  dg = s * G;  dp = sum_{b,t} g * G * sigmoid(p).
* dplr:      dg = s * G + (G L) L^T  (P is symmetric);  dp as diagonal;
             dL = sum_{b,t} g^T (G L) + G^T (g L)  (d (g L L^T) / dL, both factors).

Each ``forward(g, P_diag, P_lowrank)`` returns (u, saved) and each ``backward(saved, grad_u, g,
P_diag, P_lowrank)`` returns (dg, dP_diag, dP_lowrank), None where P has no such parameter
(:data:`FORWARD`, :data:`BACKWARD` by kind, ``energyc.settings.PRECONDITIONERS``). In float16
and bfloat16 the sum of dp takes its products in float32. Products of
(B, T, D) values make one new tensor and work in place after it; contractions are
``energyc.runtime.gemm.contract`` as in the generated step functions, so under torch.autocast
they are cast as the step's are. The Triton path uses these too: each is a few passes over
(B, T, D) that torch serves on CUDA as well as a generated kernel would.
``energyc.reference.precondition`` is the plain statement that the tests compare with.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from energyc.runtime.gemm import contract, contract_add
from energyc.settings import PRECOND_PARAMETERS

#: softplus(INVERSE_SOFTPLUS_ONE) = 1: P_diag's initial value (P starts at the identity)
INVERSE_SOFTPLUS_ONE = math.log(math.e - 1.0)

Saved = tuple[torch.Tensor, ...]
Grads = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]


def identity_forward(g: torch.Tensor, P_diag: None, P_lowrank: None) -> tuple[torch.Tensor, Saved]:
    """u = g."""
    return g, ()


def identity_backward(saved: Saved, grad_u: torch.Tensor, g: torch.Tensor, P_diag: None,
                      P_lowrank: None) -> Grads:
    """dg = G."""
    return grad_u, None, None


def diagonal_forward(g: torch.Tensor, P_diag: torch.Tensor,
                     P_lowrank: None) -> tuple[torch.Tensor, Saved]:
    """u = softplus(p) * g; saves s = softplus(p)."""
    s = torch.nn.functional.softplus(P_diag)
    return g * s, (s,)


#: dtypes whose products are summed in float32 for dp (a sum over every token, which a rounding
#: of each product to 10 bits would bias; a Triton reduction kernel accumulates in float32 too)
_HALF = (torch.float16, torch.bfloat16)


def _grad_diag(g: torch.Tensor, grad_u: torch.Tensor, P_diag: torch.Tensor) -> torch.Tensor:
    """dp = sum_{b,t} g * G * sigmoid(p)."""
    if g.dtype in _HALF or grad_u.dtype in _HALF:
        dp = (g.float() * grad_u.float()).mul_(torch.sigmoid(P_diag.float())).sum(dim=(0, 1))
        return dp.to(P_diag.dtype)
    return (g * grad_u).mul_(torch.sigmoid(P_diag)).sum(dim=(0, 1))


def diagonal_backward(saved: Saved, grad_u: torch.Tensor, g: torch.Tensor,
                      P_diag: torch.Tensor, P_lowrank: None) -> Grads:
    """dg = s * G, dp = sum_{b,t} g * G * sigmoid(p)."""
    (s,) = saved
    return grad_u * s, _grad_diag(g, grad_u, P_diag), None


def dplr_forward(g: torch.Tensor, P_diag: torch.Tensor,
                 P_lowrank: torch.Tensor) -> tuple[torch.Tensor, Saved]:
    """u = s * g + (g L) L^T; saves g L and s."""
    proj = contract("bid,dr->bir", g, P_lowrank)
    low = contract("bir,dr->bid", proj, P_lowrank)
    s = torch.nn.functional.softplus(P_diag)
    return (g * s).add_(low), (proj, s)


def dplr_backward(saved: Saved, grad_u: torch.Tensor, g: torch.Tensor, P_diag: torch.Tensor,
                  P_lowrank: torch.Tensor) -> Grads:
    """dg = s * G + (G L) L^T, dp = sum_{b,t} g * G * sigmoid(p), dL = g^T (G L) + G^T (g L)."""
    proj, s = saved
    grad_proj = contract("bid,dr->bir", grad_u, P_lowrank)
    low = contract("bir,dr->bid", grad_proj, P_lowrank)
    grad_lowrank = contract_add(contract("bir,bid->dr", grad_proj, g), "bid,bir->dr", grad_u, proj)
    grad_diag = _grad_diag(g, grad_u, P_diag)
    return (grad_u * s).add_(low), grad_diag, grad_lowrank


#: u = P g for each kind of ``energyc.settings.PRECONDITIONERS``
FORWARD: dict[str, Callable[..., tuple[torch.Tensor, Saved]]] = {
    "identity": identity_forward, "diagonal": diagonal_forward, "dplr": dplr_forward,
}
#: the VJP of u = P g w.r.t. g, P_diag and P_lowrank for each kind
BACKWARD: dict[str, Callable[..., Grads]] = {
    "identity": identity_backward, "diagonal": diagonal_backward, "dplr": dplr_backward,
}


def parameters(kind: str, dim: int, rank: int, factory: dict
               ) -> tuple[torch.nn.Parameter | None, torch.nn.Parameter | None]:
    """(P_diag, P_lowrank) of a preconditioner of ``kind`` on a state of ``dim`` features (None
    where it has no such parameter), uninitialised (:func:`reset_`); ``factory``: the dtype and
    device keywords."""
    names = PRECOND_PARAMETERS[kind]
    P_diag = torch.nn.Parameter(torch.empty((dim,), **factory)) if "P_diag" in names else None
    P_lowrank = (torch.nn.Parameter(torch.empty((dim, rank), **factory))
                 if "P_lowrank" in names else None)
    return P_diag, P_lowrank


def reset_(P_diag: torch.Tensor | None, P_lowrank: torch.Tensor | None) -> None:
    """P starts at the identity: softplus(P_diag) = 1, and P_lowrank small (normal, std
    0.1 / sqrt(D)), so that its gradient is not zero. Call under torch.no_grad()."""
    if P_diag is not None:
        P_diag.fill_(INVERSE_SOFTPLUS_ONE)
    if P_lowrank is not None:
        torch.nn.init.normal_(P_lowrank, std=0.1 / math.sqrt(P_lowrank.shape[0]))
