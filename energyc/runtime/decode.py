"""Incremental decoding.

A causal layer's output at token i depends on tokens <= i alone, and the context enters each
step only through per-token values on the j side of its reductions (keys such as W_k xbar_j).
``Layer.decode`` maps the states of t new tokens that follow a prefix of P tokens to their
outputs with a cache of those values: each step's ``_grad_decode`` computes the new tokens'
values, joins them to the cached ones (``extend``) and runs the reductions with the new tokens as
queries at positions P .. P + t - 1 (the ``offset`` of the pair kernels, attention and rotary).

Rows of different lengths decode together padded on the left (``left_padding=`` on the first
call: each row's prompt ends at the chunk's end, so every later token is at the same position in
every row); the padding is outside every context set and its outputs are its inputs. Where the
layer's sets read documents, ``document_ids=`` of each call's tokens say where a document starts:
at a token whose id differs from the one before (the previous call's last, for the first), and
from there its context is fresh. Both become the call's context data over the P + t positions
(``energyc.runtime.rows``: ``first`` and per-position document starts), which the kernels read as
in the forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from energyc.runtime import attention
from energyc.runtime.arguments import check_input
from energyc.runtime.autocast import autocast_dtype
from energyc.runtime.rows import CallData, _int_tensor, _row_values, calling


class DecodeCache:
    """What ``Layer.decode`` keeps between calls: the number of tokens seen (``position``) and,
    per descent step, the j-side values over those tokens by name (``steps``; with context
    "input" and values of the context alone, one dictionary serves every step). Opaque to users:
    pass back what ``decode`` returned; ``None`` starts a sequence. ``values(step)`` shows what a
    step holds."""

    def __init__(self, package: str, batch: int, steps: list[dict[str, Any]],
                 position: int = 0) -> None:
        self.package, self.batch, self.steps, self.position = package, batch, steps, position
        self.first: torch.Tensor | None = None  # each row's first real token (left padding)
        self.document: tuple[torch.Tensor, torch.Tensor] | None = None  # (id, start) of the last

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
                 keys_from_context: bool, reads: tuple[str, ...] = (),
                 document_ids: Any = None, left_padding: Any = None
                 ) -> tuple[torch.Tensor, DecodeCache]:
    """A generated layer's ``decode``: the outputs of the ``steps`` descent steps at the t new
    tokens of ``x`` (batch, t, dim) that follow the ``cache.position`` tokens of ``cache``, and
    the cache extended by them. Without autograd (inference). Under torch.autocast, as
    ``apply_layer``: x in the parameters' dtype, steps inside the region, output in the autocast
    dtype.

    ``reads``: what the layer's sets read from the call; ``document_ids`` (batch, t) or (t,):
    the new tokens' documents, required where ``reads`` holds "same_document"; ``left_padding``
    (an int or one per row, first call only): the padding tokens at the start of each row.

    Raises:
        ValueError: the layer cannot decode (``unsupported`` says why), the cache is not one
            of this layer's for this batch, or the context data is wrong or not this layer's.
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
    new.first, new.document = cache.first, cache.document
    data = _decode_data(new, x, reads, document_ids, left_padding)
    valid = None if data is None or data.first is None else \
        data.valid[:, new.position:].to(params[0].dtype if params else x.dtype)
    if compute is not None:
        x = x.to(params[0].dtype) if params else x
    forward = precond_forward[precond_kind]
    with torch.no_grad(), calling(data):
        x0 = x
        for step in new.steps:
            xbar = x if context == "current" else x0
            g = grad_decode(attention, step, new.position, x, xbar, *params,
                            *hypers(x))
            if valid is not None:
                g = g * valid
            u, _ = forward(g, *precond)
            x = torch.add(x, u, alpha=-eta)
    new.position += x.shape[1]
    return (x if compute is None else x.to(compute)), new


def _decode_data(cache: DecodeCache, x: torch.Tensor, reads: tuple[str, ...],
                 document_ids: Any, left_padding: Any) -> CallData | None:
    """The context data of a decode call over the P + t tokens so far (P = cache.position),
    updating ``cache``'s rows' first real token and last document (id, start)."""
    B, t = x.shape[0], x.shape[1]
    P, T = cache.position, cache.position + t
    device = x.device
    if left_padding is not None:
        if P:
            raise ValueError("left_padding= is taken on a sequence's first decode call (the "
                             "prompts padded on the left); later calls continue every row")
        cache.first = _row_values("left_padding", left_padding, B, t, device)
    wants_docs = "same_document" in reads
    if document_ids is not None and not wants_docs:
        raise ValueError("document_ids= given, but this layer's context sets read no documents "
                         "(declare them with & same_document() in the energy)")
    if wants_docs and document_ids is None:
        raise ValueError("this layer's context set reads documents (same_document()): give "
                         "document_ids= of the new tokens (decoding takes per-token ids; a token "
                         "whose id differs from the one before starts a document)")
    if not wants_docs and cache.first is None:
        return None
    data = CallData(B, T, first=cache.first)
    if wants_docs:
        ids = _int_tensor("document_ids", document_ids, device)
        if ids.dim() == 1:
            ids = ids[None, :].expand(B, t)
        if ids.shape != (B, t):
            raise ValueError(f"document_ids must be per new token, shape ({B}, {t}) or ({t},); "
                             f"got {tuple(ids.shape)}")
        r = torch.arange(P, T, device=device).expand(B, t)
        before = torch.empty_like(ids)
        before[:, 1:] = ids[:, :-1]
        if cache.document is None:
            before[:, 0] = ids[:, 0] - 1  # the sequence's first token starts a document
            carried = torch.zeros(B, dtype=torch.long, device=device)
        else:
            before[:, 0] = cache.document[0]
            carried = cache.document[1]
        starts = torch.where(ids != before, r, carried[:, None]).cummax(dim=1).values
        cache.document = (ids[:, -1].clone(), starts[:, -1].clone())
        # the earlier positions are no query of this call: their start only keeps lo monotone
        data.start = torch.cat([torch.zeros(B, P, dtype=torch.long, device=device), starts], 1)
        data.end = torch.full((B, T), T - 1, dtype=torch.long, device=device)
    return data
