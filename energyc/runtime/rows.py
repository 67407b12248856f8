"""Context sets from the call's data: packed documents, padding and prefixes, as per-row bounds.

A layer call may carry data that bounds its context sets row by row (``energyc.context``'s
``DATA``): the documents packed into each row (FlashAttention's varlen ``cu_seqlens``, shared by
the rows, or FlexAttention's per-token ``document_ids``), each row's length (padding) and each
row's prefix length (a prefix-LM). :func:`call_data` checks them once per call into a
:class:`CallData`; the layer runs its steps (forward, backward, ``energy``) inside
``calling(data)``, and every kernel turns the context set its generated code names into what it
iterates over with :func:`resolve`: the ``Context`` itself when the call has no data (a band of
offsets, the same for every row), else a :class:`Rows`, the set's interval of keys for each
query of each row,

    C_b(i) = { j : lo_b(i) <= j <= hi_b(i) } \\ { i - HOLE }

with, from the band LO <= i - j <= HI (``energyc/context.py``)::

    lo_b(i) = max(i - HI, 0)                  hi_b(i) = min(i - LO, T - 1)
    | (j < prefix()):                          hi_b(i) = max(hi_b(i), P_b - 1)
    & same_document():  lo_b(i) = max(lo_b(i), start_b(i)),  hi_b(i) = min(hi_b(i), end_b(i))
    lengths:            hi_b(i) = min(hi_b(i), L_b - 1); a padded query (i >= L_b): empty,
                        lo_b(i) = L_b, hi_b(i) = L_b - 1
    first (decoding a batch of prompts padded on the left):
                        lo_b(i) = max(lo_b(i), F_b); a padded query (i < F_b): empty,
                        lo_b(i) = F_b, hi_b(i) = F_b - 1

A layer that reads a memory (a second sequence of M tokens given at call time, ``energyc.dsl.memory``)
has keys that are the memory's tokens, not the state's: every set is all of them, bounded by the
call's ``memory_lengths=`` (M_b per row), and the state's lengths bound the queries alone::

    memory:             lo_b(i) = 0, hi_b(i) = M_b - 1 (queries T, keys M); a padded query:
                        lo_b(i) = M_b, hi_b(i) = M_b - 1

O(tokens) vectors built on the device; never a (T x T) mask or a block table. lo_b and hi_b
never decrease along i, so a block of queries [i0, i1) reaches the keys [min_b lo_b(i0),
max_b hi_b(i1 - 1)] and a tile needs a mask only where some row's interval cuts it; ``Rows``
answers the same questions as ``Context`` (``key_range``, ``query_range``, ``needs_mask``,
``key_cuts``, ``query_cuts``) over all rows at once, for kernels whose blocks span the batch,
and gives the per-row vectors (``lo``, ``hi``) to kernels that run one row per program.

A padded query's update is zero (the layer masks g, and the gradient reaching g, with
``CallData.valid``): its output is its input, and real tokens' losses send it no gradient, as
no real token's set holds it.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from energyc.context import Context, context

#: the call's keywords that carry context data, and what each gives
KEYWORDS = ("cu_seqlens", "document_ids", "lengths", "prefix", "memory_lengths")


@dataclass(eq=False)
class CallData:
    """One call's context data for a batch of B rows of T tokens, checked (``call_data``).

    Attributes:
        ids: (B or 1, T) int64, each token's document (None: no documents given); start, end:
            the first and the last token of token i's document.
        lengths: (B,) int64, each row's real tokens (None: every token is real).
        prefix: (B,) int64, each row's prefix length (None: no prefix given).
        first: (B,) int64, each row's first real token (None: 0): the tokens before it are
            padding (a decoded batch of prompts padded on the left).
        M: the memory's tokens (None: the layer reads no memory; its keys are the state's).
        memory_lengths: (B,) int64, each row's real memory tokens (None: all M).
    """

    B: int
    T: int
    ids: torch.Tensor | None = None
    start: torch.Tensor | None = None
    end: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    prefix: torch.Tensor | None = None
    first: torch.Tensor | None = None
    M: int | None = None
    memory_lengths: torch.Tensor | None = None
    _rows: dict = field(default_factory=dict, repr=False)

    @property
    def keys(self) -> int:
        """The keys' count: the memory's tokens, else the state's."""
        return self.T if self.M is None else self.M

    @property
    def device(self) -> torch.device | str:
        """Where the call's data lives (the CPU when it holds no tensor)."""
        for t in (self.ids, self.lengths, self.prefix, self.first, self.memory_lengths):
            if t is not None:
                return t.device
        return "cpu"

    @property
    def valid(self) -> torch.Tensor | None:
        """(B, T, 1) 1 at real tokens, 0 at padding (None without lengths), in int64; callers
        cast it."""
        if self.lengths is None and self.first is None:
            return None
        known = self.lengths if self.lengths is not None else self.first
        i = torch.arange(self.T, device=known.device)[None, :]
        real = torch.ones((known.shape[0], self.T), dtype=torch.bool, device=known.device)
        if self.lengths is not None:
            real = real & (i < self.lengths[:, None])
        if self.first is not None:
            real = real & (i >= self.first[:, None])
        return real[:, :, None]

    def positions(self) -> torch.Tensor | None:
        """(B or 1, T) int64, each token's index within its document (None without documents):
        absolute positions restart at each document."""
        if self.start is None:
            return None
        return torch.arange(self.T, device=self.start.device)[None, :] - self.start

    def rows(self, ctx: Context, T: int, device: torch.device | str) -> Rows:
        """The set ``ctx`` on this call's rows (made once per set)."""
        if T != self.T:
            raise ValueError(f"the call's context data is for {self.T} tokens, the set is asked "
                             f"for {T}")
        found = self._rows.get(ctx)
        if found is None:
            found = self._rows[ctx] = Rows.build(ctx, self, device)
        return found


def _int_tensor(name: str, value: Any, device: torch.device) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{name} must be an integer tensor, got {type(value).__name__}") from None
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {value.dtype}")
    return value.to(device=device, dtype=torch.int64)


def _row_values(name: str, value: Any, B: int, T: int, device: torch.device) -> torch.Tensor:
    """A per-row count in 0 .. T: an int (every row) or a (B,) integer tensor."""
    t = _int_tensor(name, value, device)
    if t.dim() == 0:
        t = t.expand(B)
    if t.shape != (B,):
        raise ValueError(f"{name} must hold one value per batch row, shape ({B},); got "
                         f"{tuple(t.shape)}")
    if B and (int(t.min()) < 0 or int(t.max()) > T):
        raise ValueError(f"{name} must lie in 0 .. {T} (the tokens of a row); got "
                         f"{t.tolist() if B <= 16 else (int(t.min()), int(t.max()))}")
    return t.contiguous()


def _documents(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, end) of each token's document from per-token ids (B, T), non-decreasing along T:
    a token starts a document where its id differs from the one before. O(T) on the device."""
    B, T = ids.shape
    i = torch.arange(T, device=ids.device).expand(B, T)
    new = torch.ones_like(ids, dtype=torch.bool)
    new[:, 1:] = ids[:, 1:] != ids[:, :-1]
    start = torch.where(new, i, 0).cummax(dim=1).values
    last = torch.ones_like(new)
    last[:, :-1] = new[:, 1:]
    end = torch.where(last, i, T - 1).flip(1).cummin(dim=1).values.flip(1)
    return start.contiguous(), end.contiguous()


def call_data(x: torch.Tensor, reads: tuple[str, ...] | None, *, cu_seqlens: Any = None,
              document_ids: Any = None, lengths: Any = None, prefix: Any = None,
              memory: torch.Tensor | None = None, memory_lengths: Any = None
              ) -> CallData | None:
    """The call's context data for the state x (B, T, D), checked; None when none is given.

    ``reads``: what the layer's context sets read (``energyc.context.DATA``'s names); documents
    and prefix lengths are required where read and refused where not, lengths accepted always
    (None: whatever is given is taken, as the reference does). ``memory``: the memory (B, M, Dm)
    the layer reads (None: none; its keys are the state's tokens), whose rows ``memory_lengths``
    bounds (an int or one per row, 0 .. M; refused without a memory).

    Raises:
        TypeError, ValueError: naming the argument and what it must be.
    """
    B, T = x.shape[0], x.shape[1]
    device = x.device
    if cu_seqlens is not None and document_ids is not None:
        raise ValueError("give the documents once: cu_seqlens= (offsets shared by the rows) or "
                         "document_ids= (per token), not both")
    docs = cu_seqlens is not None or document_ids is not None
    if reads is None:
        reads = ("same_document",) * docs + ("prefix",) * (prefix is not None)
    wants_docs = "same_document" in reads
    if wants_docs and not docs:
        raise ValueError("this layer's context set reads documents (same_document()): give "
                         "cu_seqlens= (int32 offsets of the packed documents, FlashAttention's "
                         "varlen) or document_ids= (per token, FlexAttention's document mask)")
    if docs and not wants_docs:
        given = "cu_seqlens" if cu_seqlens is not None else "document_ids"
        raise ValueError(f"{given}= given, but this layer's context sets read no documents "
                         f"(declare them with & same_document() in the energy)")
    if prefix is not None and "prefix" not in reads:
        raise ValueError("prefix= given, but this layer's context sets read no prefix (declare "
                         "(j <= i) | (j < prefix()) in the energy)")
    if prefix is None and "prefix" in reads:
        raise ValueError("this layer's context set reads a prefix ((j <= i) | (j < prefix())): "
                         "give prefix= (each row's prefix length, an int or a (batch,) tensor)")
    if memory_lengths is not None and memory is None:
        raise ValueError("memory_lengths= given, but no memory: it bounds the tokens of the "
                         "memory= this layer reads")
    if memory is not None and (docs or prefix is not None):
        raise ValueError("a layer that reads a memory reads all its tokens: documents and "
                         "prefixes bound the state's context, which it does not read")
    if not docs and lengths is None and prefix is None and memory_lengths is None:
        return None
    data = CallData(B, T)
    if memory is not None:
        data.M = memory.shape[1]
        if memory_lengths is not None:
            data.memory_lengths = _row_values("memory_lengths", memory_lengths, B, data.M,
                                              device)
    if cu_seqlens is not None:
        cu = _int_tensor("cu_seqlens", cu_seqlens, device)
        if cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(f"cu_seqlens must be 1-D offsets [0, n_1, n_1 + n_2, ..., {T}] "
                             f"(shared by the batch rows); got shape {tuple(cu.shape)}")
        cuts = cu.tolist()
        if cuts[0] != 0 or cuts[-1] != T or any(b < a for a, b in zip(cuts, cuts[1:])):
            raise ValueError(f"cu_seqlens must rise from 0 to the row's {T} tokens; got "
                             f"{cuts if len(cuts) <= 12 else cuts[:6] + ['...'] + cuts[-3:]}")
        ids = torch.bucketize(torch.arange(T, device=device), cu[1:], right=True)[None, :]
        data.ids = ids
        data.start, data.end = _documents(ids)
    elif document_ids is not None:
        ids = _int_tensor("document_ids", document_ids, device)
        if ids.dim() == 1:
            ids = ids[None, :]
        if ids.dim() != 2 or ids.shape[1] != T or ids.shape[0] not in (1, B):
            raise ValueError(f"document_ids must be per token, shape ({B}, {T}) or ({T},); got "
                             f"{tuple(ids.shape)}")
        if T > 1 and bool((ids[:, 1:] < ids[:, :-1]).any()):
            raise ValueError("document_ids must not decrease along a row's tokens (each document "
                             "one contiguous run, as packing lays them out)")
        data.ids = ids
        data.start, data.end = _documents(ids)
    if lengths is not None:
        data.lengths = _row_values("lengths", lengths, B, T, device)
    if prefix is not None:
        data.prefix = _row_values("prefix", prefix, B, T, device)
    return data


# the call's data, per thread (torch.compile traces a threading.local's attributes, not a
# ContextVar's methods); a call without data in a thread without any sets nothing
_CALL = threading.local()


@contextmanager
def calling(data: CallData | None) -> Iterator[None]:
    """Run the block with ``data`` as the call's context data (None: none)."""
    previous = getattr(_CALL, "data", None)
    if data is None and previous is None:
        yield
        return
    _CALL.data = data
    try:
        yield
    finally:
        _CALL.data = previous


def current() -> CallData | None:
    """The context data of the call being run (None: none)."""
    return getattr(_CALL, "data", None)


def resolve(kind: Context | tuple | Rows, T: int, device: torch.device | str | None = None,
            offset: int = 0) -> Context | Rows:
    """What a kernel iterates over for the set ``kind`` (a ``Context`` or its spelling) on T
    queries in the current call: the ``Context`` itself when the call has no data for it, else
    its :class:`Rows` (a ``Rows`` is returned as it is). ``device``: where the rows are built
    (default: the call data's). Decoding T queries after ``offset`` cached tokens, the rows are
    those of the offset + T tokens so far (``energyc.runtime.decode``), read at positions
    offset + i.

    Raises:
        ValueError: the set reads data the call did not give (a package's step functions called
            outside its layer).
    """
    if isinstance(kind, Rows):
        return kind
    ctx = context(kind)
    data = current()
    if data is None or (not ctx.data and data.lengths is None and data.first is None
                        and data.memory_lengths is None):
        if ctx.data:
            raise ValueError(f"the context set {ctx!r} reads the call's data; run it through its "
                             f"layer with cu_seqlens=, document_ids= or prefix=")
        return ctx
    return data.rows(ctx, offset + T, data.device if device is None else device)


@dataclass(eq=False)
class Rows:
    """A context set on the rows of one call: query i of row b reads the keys lo[b, i] ..
    hi[b, i] less the hole i - HOLE (``hole``: HOLE, or None).

    ``lo`` and ``hi`` are (B or 1, T) int64 on the call's device, non-decreasing along i, over
    ``keys`` keys: T, or where the keys are a memory's, its M tokens (``S``); the
    block questions below are answered over every row at once (a tile needs a mask when some
    row's interval cuts it), from host copies of their per-query extremes made on first use."""

    ctx: Context
    lo: torch.Tensor
    hi: torch.Tensor
    hole: int | None
    T: int
    S: int | None = None  # the keys' count where they are a memory's (None: T, the queries')
    _host: tuple | None = field(default=None, repr=False)

    @classmethod
    def build(cls, ctx: Context, data: CallData, device: torch.device | str) -> Rows:
        if data.M is not None:
            return cls._memory(ctx, data, device)
        T = data.T
        i = torch.arange(T, device=device)
        lo = (i - ctx.hi).clamp(min=0) if ctx.hi is not None else torch.zeros_like(i)
        hi = (i - ctx.lo).clamp(max=T - 1) if ctx.lo is not None else torch.full_like(i, T - 1)
        lo, hi = lo[None, :], hi[None, :]
        if "prefix" in ctx.data:
            hi = torch.maximum(hi, data.prefix[:, None] - 1)
        if "same_document" in ctx.data:
            lo = torch.maximum(lo, data.start.to(device))
            hi = torch.minimum(hi, data.end.to(device))
        if data.lengths is not None:
            n = data.lengths.to(device)[:, None]
            real = i[None, :] < n
            hi = torch.where(real, torch.minimum(hi, n - 1), n - 1)
            lo = torch.where(real, lo, n)
        if data.first is not None:  # padding on the left: every row starts at its first token
            f = data.first.to(device)[:, None]
            real = i[None, :] >= f
            lo = torch.where(real, torch.maximum(lo, f), f)
            hi = torch.where(real, hi, f - 1)
        return cls(ctx, lo.contiguous(), hi.contiguous(), ctx.hole, T)

    def keys_from(self, k0: int) -> Rows:
        """The set on the tokens from position k0 on, counted from there (a decode cache that
        keeps a window's last keys alone): rows k0 .. T - 1, bounds less k0 (a bound before k0
        is never a query's that reads these keys alone)."""
        if not k0:
            return self
        return Rows(self.ctx, (self.lo[:, k0:] - k0).clamp(min=0), self.hi[:, k0:] - k0,
                    self.hole, self.T - k0)

    @classmethod
    def _memory(cls, ctx: Context, data: CallData, device: torch.device | str) -> Rows:
        """All M memory tokens (less those at or after a row's memory length) for each of the T
        queries; a padded query's row is empty (lo = M_b, hi = M_b - 1: monotone in i)."""
        if ctx.band != (None, None, None) or ctx.data:
            raise ValueError(f"a memory is read over all its tokens; got the set {ctx!r}")
        T, M = data.T, data.M
        n = (data.memory_lengths.to(device)[:, None] if data.memory_lengths is not None
             else torch.full((1, 1), M, device=device, dtype=torch.int64))
        lo = torch.zeros((1, T), device=device, dtype=torch.int64)
        hi = (n - 1).expand(-1, T)
        if data.lengths is not None:
            i = torch.arange(T, device=device)
            real = i[None, :] < data.lengths.to(device)[:, None]
            lo = torch.where(real, lo, n)
            hi = torch.where(real, hi, n - 1)
        return cls(ctx, lo.contiguous(), hi.contiguous(), None, T, S=M)

    @property
    def keys(self) -> int:
        """The keys' count: T, or a memory's M (``S``)."""
        return self.T if self.S is None else self.S

    # -- per-row answers ----------------------------------------------------------------------

    @property
    def empty(self) -> torch.Tensor:
        """(B or 1, T) bool: rows whose set is empty (no key, or its hole alone)."""
        out = self.lo > self.hi
        if self.hole is not None:
            i = torch.arange(self.T, device=self.lo.device)[None, :]
            out = out | ((self.lo == self.hi) & (self.lo == i - self.hole))
        return out

    def contains(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """(B, len(i), len(j)) bool: whether key j is in query i's set, for 1-D index tensors."""
        lo, hi = self.lo[:, i][:, :, None], self.hi[:, i][:, :, None]
        inside = (j[None, None, :] >= lo) & (j[None, None, :] <= hi)
        if self.hole is not None:
            inside = inside & ((i[:, None] - j[None, :]) != self.hole)[None]
        return inside

    def tile(self, i0: int, i1: int, j0: int, j1: int) -> torch.Tensor:
        """(B or 1, i1 - i0, j1 - j0) bool: the mask of the tile queries [i0, i1) x keys [j0,
        j1)."""
        device = self.lo.device
        return self.contains(torch.arange(i0, i1, device=device),
                             torch.arange(j0, j1, device=device))

    def dense(self) -> torch.Tensor:
        """(B or 1, T, keys) bool: the whole mask (the reference and the unfused path)."""
        return self.tile(0, self.T, 0, self.keys)

    # -- block answers over every row ---------------------------------------------------------

    def _extremes(self) -> tuple[list[int], list[int], list[int], list[int]]:
        if self._host is None:
            self._host = (self.lo.amin(0).tolist(), self.lo.amax(0).tolist(),
                          self.hi.amin(0).tolist(), self.hi.amax(0).tolist())
        return self._host

    def key_range(self, i0: int, i1: int, T: int | None = None) -> tuple[int, int]:
        """The keys [c0, c1) some row's queries [i0, i1) reach (c0 <= c1)."""
        if i0 >= i1:
            return 0, 0
        lo_min, _, _, hi_max = self._extremes()
        c0, c1 = lo_min[i0], hi_max[i1 - 1] + 1
        return c0, max(c0, c1)

    def query_range(self, j0: int, j1: int, T: int | None = None) -> tuple[int, int]:
        """The queries [r0, r1) of some row whose sets reach some key of [j0, j1): from the first
        i with max_b hi_b(i) >= j0 to the last with min_b lo_b(i) <= j1 - 1."""
        lo_min, _, _, hi_max = self._extremes()
        r0 = bisect.bisect_left(hi_max, j0)
        r1 = bisect.bisect_right(lo_min, j1 - 1)
        return r0, max(r0, r1)

    def needs_mask(self, i0: int, i1: int, j0: int, j1: int) -> bool:
        """Whether some row leaves some pair of the tile outside its set: every row's queries
        [i0, i1) hold the keys [j0, j1) when max_b lo_b(i1 - 1) <= j0 and j1 - 1 <= min_b
        hi_b(i0), and no hole i - HOLE falls in the tile."""
        _, lo_max, hi_min, _ = self._extremes()
        if lo_max[i1 - 1] > j0 or hi_min[i0] < j1 - 1:
            return True
        return self.hole is not None and i0 - j1 + 1 <= self.hole <= i1 - 1 - j0

    def key_cuts(self, i0: int, i1: int) -> list[int]:
        """Where ``needs_mask`` of queries [i0, i1) against one key j can change along j."""
        _, lo_max, hi_min, _ = self._extremes()
        cuts = [lo_max[i1 - 1], hi_min[i0] + 1]
        if self.hole is not None:
            cuts += [i0 - self.hole, i1 - self.hole]
        return cuts

    def query_cuts(self, j0: int, j1: int) -> list[int]:
        """Where ``needs_mask`` of one query i against keys [j0, j1) can change along i: every
        row's query i holds them when max_b lo_b(i) <= j0 (true up to a point) and min_b hi_b(i)
        >= j1 - 1 (true from a point)."""
        _, lo_max, hi_min, _ = self._extremes()
        cuts = [bisect.bisect_right(lo_max, j0), bisect.bisect_left(hi_min, j1 - 1)]
        if self.hole is not None:
            cuts += [j0 + self.hole, j1 + self.hole]
        return cuts

    def empty_rows(self, T: int | None = None) -> tuple[int, int]:
        """(head, tail) queries empty in every row (the rest may hold empty rows too: a
        document's first token under j < i, padding; see ``empty``)."""
        empty = self.empty.all(0).tolist()
        head = 0
        while head < len(empty) and empty[head]:
            head += 1
        tail = 0
        while tail < len(empty) - head and empty[len(empty) - 1 - tail]:
            tail += 1
        return head, tail
