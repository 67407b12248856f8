"""Incremental decoding.

A causal layer's output at token i depends on tokens <= i alone, and the context enters each
step only through per-token values on the j side of its reductions (keys such as W_k xbar_j).
``Layer.decode`` maps the states of t new tokens that follow a prefix of P tokens to their
outputs with a cache of those values: each step's ``_grad_decode`` computes the new tokens'
values, joins them to the cached ones (``extend``) and runs the reductions with the new tokens as
queries at positions P .. P + t - 1 (the ``offset`` of the pair kernels, attention and rotary).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from energyc.runtime import attention
from energyc.runtime.arguments import check_input
from energyc.runtime.autocast import autocast_dtype


class DecodeCache:
    """What ``Layer.decode`` keeps between calls: the number of tokens seen (``position``) and,
    per descent step, the j-side values over those tokens by name (``steps``; with context
    "input" and values of the context alone, one dictionary serves every step). Opaque to users:
    pass back what ``decode`` returned; ``None`` starts a sequence. ``values(step)`` shows what a
    step holds."""

    def __init__(self, package: str, batch: int, steps: list[dict[str, Any]],
                 position: int = 0) -> None:
        self.package, self.batch, self.steps, self.position = package, batch, steps, position

    def values(self, step: int = 0) -> dict[str, torch.Tensor]:
        """The cached values of descent step ``step`` by name: over the ``position`` tokens, or
        a window's last ones."""
        return {name: entry.view() for name, entry in self.steps[step].items()}

    def __repr__(self) -> str:
        names = sorted({name for step in self.steps for name in step})
        return (f"DecodeCache({self.package}, batch={self.batch}, position={self.position}, "
                f"steps={len(self.steps)}, values={names})")


class _Tokens:
    """A value over the first ``n`` tokens, kept in a buffer along the token axis ``dim`` with
    room to grow: appending t tokens writes t rows (amortised by doubling the room), not the
    whole prefix again. Caches branch: each keeps its own ``n``, and a buffer that another branch
    has already written past ``n`` is copied before this one writes."""

    def __init__(self, buffer: torch.Tensor, dim: int, n: int, owner: list[int]) -> None:
        self.buffer, self.dim, self.n, self.owner = buffer, dim, n, owner  # owner[0]: rows written

    def view(self) -> torch.Tensor:
        return self.buffer.narrow(self.dim, 0, self.n)

    def append(self, new: torch.Tensor) -> _Tokens:
        t = new.shape[self.dim]
        buffer, owner = self.buffer, self.owner
        if owner[0] != self.n or buffer.shape[self.dim] < self.n + t:
            shape = list(new.shape)
            shape[self.dim] = max(2 * (self.n + t), 16)
            buffer = new.new_empty(shape)
            buffer.narrow(self.dim, 0, self.n).copy_(self.view())
            owner = [self.n]
        buffer.narrow(self.dim, self.n, t).copy_(new)
        owner[0] = self.n + t
        return _Tokens(buffer, self.dim, self.n + t, owner)


class _Last:
    """A value over ``n`` tokens of which only the last ones are kept: those a window of
    ``keep`` tokens before the latest call's queries reaches, and that call's (at most
    keep + t)."""

    def __init__(self, tokens: torch.Tensor, dim: int, n: int, keep: int) -> None:
        self.tokens, self.dim, self.n, self.keep = tokens, dim, n, keep

    def view(self) -> torch.Tensor:
        return self.tokens

    def append(self, new: torch.Tensor) -> _Last:
        size = self.tokens.shape[self.dim]
        old = self.tokens.narrow(self.dim, max(size - self.keep, 0), min(size, self.keep))
        joined = torch.cat([old, new], dim=self.dim)
        return _Last(joined, self.dim, self.n + new.shape[self.dim], self.keep)


def extend(cache: dict[str, _Tokens | _Last], name: str, new: torch.Tensor, dim: int,
           position: int, keep: int | None = None) -> torch.Tensor:
    """The j-side value ``name`` over the tokens so far: the cached ``position`` tokens' and the
    new tokens' (``new``), joined along the token axis ``dim`` and kept in ``cache``. With
    ``keep`` (a value that only windows of at most ``keep`` tokens read) only the last ``keep``
    cached tokens are kept and joined: memory O(keep), not O(tokens). A step that shares its
    cache with an earlier one of the same call (context "input") finds it extended already
    (position + t tokens) and takes it as it is."""
    entry = cache.get(name)
    t = new.shape[dim]
    have = 0 if entry is None else entry.n
    if entry is not None and have == position + t:
        return entry.view()
    if have != position:
        raise RuntimeError(f"decode cache: {name} holds {have} tokens, expected {position}")
    if entry is None and keep is not None:
        entry = _Last(new.narrow(dim, 0, 0), dim, 0, keep)
    elif entry is None:  # an empty buffer: the first append makes room to grow
        entry = _Tokens(new.narrow(dim, 0, 0), dim, 0, [0])
    cache[name] = entry.append(new)
    return cache[name].view()


def decode_layer(package: str, config: Any, x: Any, cache: DecodeCache | None, dim: int,
                 params: Sequence[torch.Tensor],
                 hypers: Callable[[torch.Tensor], tuple[torch.Tensor, ...]],
                 precond: Sequence[torch.Tensor | None], grad_decode: Callable | None,
                 precond_forward: dict[str, Callable], unsupported: str | None,
                 keys_from_context: bool) -> tuple[torch.Tensor, DecodeCache]:
    """A generated layer's ``decode``: the outputs of the ``steps`` descent steps at the t new
    tokens of ``x`` (batch, t, dim) that follow the ``cache.position`` tokens of ``cache``, and
    the cache extended by them. Without autograd (inference). Under torch.autocast, as
    ``apply_layer``: x in the parameters' dtype, steps inside the region, output in the autocast
    dtype.

    Raises:
        ValueError: the layer cannot decode (``unsupported`` says why), or the cache is not one
            of this layer's for this batch.
    """
    if unsupported is not None:
        raise ValueError(f"{package}: decode needs every token's update to depend on earlier "
                         f"tokens alone: {unsupported}")
    compute = autocast_dtype(x, params) if isinstance(x, torch.Tensor) else None
    check_input("x", x, dim, params, compute=compute)
    eta, steps, precond_kind, context, _ = config
    if cache is None:
        shared = context == "input" and keys_from_context
        first: dict[str, torch.Tensor] = {}
        cache = DecodeCache(package, x.shape[0],
                            [first] * steps if shared else [{} for _ in range(steps)])
    elif not isinstance(cache, DecodeCache) or cache.package != package:
        raise ValueError(f"argument cache: expected None or a DecodeCache from {package}.decode, "
                         f"got {cache!r}")
    elif cache.batch != x.shape[0]:
        raise ValueError(f"argument x: batch {x.shape[0]} does not match the cache's "
                         f"({cache.batch})")
    # a new cache: the dictionaries copied (shared ones stay shared), the tensors joined anew
    copies = {id(d): dict(d) for d in cache.steps}
    new = DecodeCache(package, cache.batch, [copies[id(d)] for d in cache.steps], cache.position)
    if compute is not None:
        x = x.to(params[0].dtype) if params else x
    forward = precond_forward[precond_kind]
    with torch.no_grad():
        x0 = x
        for step in new.steps:
            xbar = x if context == "current" else x0
            g = grad_decode(attention, step, new.position, x, xbar, *params,
                            *hypers(x))
            u, _ = forward(g, *precond)
            x = torch.add(x, u, alpha=-eta)
    new.position += x.shape[1]
    return (x if compute is None else x.to(compute)), new
