"""Context sets: for each updated (query) token i, the context tokens (keys) j it reads.

Every context set is, for each query i, an interval of keys less at most one hole:

    C(i) = { j : lo(i) <= j <= hi(i) } \\ { hole(i) }

Each set energyc has today is a band of offsets ``d = i - j``: ``LO <= d <= HI`` and
``d != HOLE`` (None: unbounded, no hole), so ``lo(i) = i - HI``, ``hi(i) = i - LO`` (clipped to
the tokens 0 .. T - 1) and ``hole(i) = i - HOLE``:

    set               constructor     LO    HI    HOLE   spelling in generated code
    j <= i            causal()        0     -     -      ("causal",)
    j < i             strict()        1     -     -      ("strict",)
    i - w <= j <= i   window(w)       0     w     -      ("window", w)
    j != i            not_self()      -     -     0      ("not_self",)
    all j             all_tokens()    -     -     -      ("all",)

lo(i) and hi(i) never decrease as i grows. That one fact gives everything a kernel needs, and
the methods of ``Context`` are those formulas (ranges half-open, as Python's):

* the keys a query block [i0, i1) reaches: [lo(i0), hi(i1 - 1) + 1) (``key_range``);
* the queries that reach a key block [j0, j1), for the sums over queries (dK, dV, the key role):
  [first i with hi(i) >= j0, last i with lo(i) <= j1 - 1] (``query_range``);
* a tile [i0, i1) x [j0, j1) needs no mask when [j0, j1) lies inside [lo(i1 - 1), hi(i0)] and
  holds no hole (``needs_mask``; ``key_cuts`` and ``query_cuts`` cut a block's range where that
  changes);
* a row is empty when lo(i) > hi(i), or the interval is its hole alone (``empty_rows``): its
  log-sum-exp is 0 and its sums 0 by the project's convention;
* the mask tile: ``lo(i) <= j <= hi(i) and j != hole(i)`` (``contains``; ``mask_diagonals`` for
  a band tile as triangles and a diagonal, without an offsets tensor).

The compiler (the DSL, the passes, lowering, the reference, the checks), the torch runtime and the
Triton kernels all read this one object: the IR's ``mask`` attribute is a ``Context``, generated
code spells it as its ``spelling`` tuple (``context`` turns that back into the object, once per
spelling), and the Triton kernels take its band as the constexprs ``LO, HI, HOLE``
(``kernel_args``; ``energyc.runtime.triton_layer.in_context``, ``key_range``, ``query_range``).
A new band kind is one constructor here, registered with ``@_kind``; the DSL's relations
(``RELATIONS``) and functions (``FUNCTIONS``) are read from here too.

Per-batch data (documents packed in one row, padding, prefixes) extends the object without
changing its users' questions: lo and hi then depend on the batch row b as well,

    & same_document():   lo_b(i) = max(i - HI, start_b(doc(i))),  hi_b(i) = min(i - LO, end_b(doc(i)))
    & (j < length()):    hi_b(i) = min(i - LO, L_b - 1)
    | (j < prefix()):    hi_b(i) = max(i - LO, P_b - 1)

built on the device as O(tokens) vectors from ``cu_seqlens`` / document ids, lengths or prefix
lengths given at call time (never a (T x T) mask or a block table). They stay monotone in i, so
the formulas above hold row by row: a ``Context`` would record which data it reads (a field
beside its band), ``key_range``, ``query_range``, ``needs_mask`` and ``empty_rows`` would take
the vectors (a launch grid shared by the batch takes the widest range over its rows; the query
range is a ``searchsorted`` on hi_b and lo_b), and the kernels' ``in_context`` would compare j
with the loaded lo_b(i), hi_b(i) instead of ``LO <= i - j <= HI``. None of that is built yet:
every set here is a band, the same for every batch row.

This module imports no torch, so that the compiler, the runtime and the Triton path all read it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Context:
    """A context set: the band ``lo <= i - j <= hi``, ``i - j != hole`` (None: unbounded, no
    hole) of the kind ``name`` made with ``args``; ``text`` says it for people (``{j <= i}``).

    Build one with a constructor of this module (``causal()``, ``window(4)``, ...) or from its
    spelling (``context(("window", 4))``); two are equal when their kind and arguments are."""

    name: str
    args: tuple[int, ...]
    lo: int | None
    hi: int | None
    hole: int | None
    text: str
    data: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return "{" + self.described + "}"

    @property
    def described(self) -> str:
        """The set for people, its band and what it reads from the call (``j <= i, same
        document``)."""
        return ", ".join([self.text, *[DATA[d] for d in self.data]])

    # -- combining with sets from data ----------------------------------------------------------

    def __and__(self, other: Any) -> Context:
        """This set within each token's document: ``(j <= i) & same_document()``."""
        if not isinstance(other, Context) or other.name != "all" or not other.data:
            raise TypeError(
                f"a context set combines by & with same_document() alone (its band and the "
                f"document's tokens); got {self!r} & {other!r}")
        return self.reading(*other.data)

    __rand__ = __and__

    def __or__(self, other: Any) -> Context:
        """A prefix-LM's set: ``(j <= i) | (j < prefix())``, every key before the row's prefix
        length P_b as well (hi_b(i) = max(i - LO, P_b - 1))."""
        if not isinstance(other, PrefixSet):
            raise TypeError(f"a context set combines by | with j < prefix() alone; got "
                            f"{self!r} | {other!r}")
        if self.hi is not None or self.hole is not None or self.lo is None:
            raise TypeError(
                f"{self!r} | (j < prefix()) is not one interval of keys per token (a window or a "
                f"hole leaves a gap before the prefix's end); combine j <= i or j < i with it")
        return self.reading("prefix")

    def reading(self, *data: str) -> Context:
        """This set, also bounded by the call's data ``data`` (``DATA``'s names)."""
        for d in data:
            if d not in DATA:
                raise ValueError(f"unknown context data {d!r}; the kinds are {sorted(DATA)}")
        merged = tuple(sorted(set(self.data) | set(data)))
        return Context(self.name, self.args, self.lo, self.hi, self.hole, self.text, merged)

    # -- what the set is ---------------------------------------------------------------------

    @property
    def spelling(self) -> tuple:
        """The set as generated code spells it: ``("causal",)``, ``("window", 4)``."""
        return (self.name, *self.args, *self.data)

    @property
    def band(self) -> tuple[int | None, int | None, int | None]:
        """(lo, hi, hole) of the offsets i - j."""
        return self.lo, self.hi, self.hole

    @property
    def everything(self) -> bool:
        """Whether every key is in every row's set (no mask at all, whatever the call's data)."""
        return self.band == (None, None, None) and not self.data

    @property
    def looks_back(self) -> bool:
        """Whether each query reads itself and earlier tokens alone (j <= i): a causal layer,
        which decodes incrementally (a prefix-LM's set reads the whole prefix: not)."""
        return self.lo is not None and self.lo >= 0 and "prefix" not in self.data

    @property
    def reach(self) -> int | None:
        """How many tokens before the query the set reads at most, when it looks back that far
        alone (a window's w: decoding keeps that many cached tokens), else None."""
        return self.hi if self.looks_back else None

    @property
    def width(self) -> int | None:
        """The most keys one row holds (hi - lo + 1), or None when the band is unbounded."""
        return None if self.lo is None or self.hi is None else max(self.hi - self.lo + 1, 0)

    @property
    def may_be_empty(self) -> bool:
        """Whether some row's set can be empty (for some length): j = i is not always in it (the
        first token of j < i; the one token of j != i at T = 1)."""
        return not self.contains(0, 0)

    def contains(self, i: Any, j: Any) -> Any:
        """Whether key j is in the set of query i: ``lo <= i - j <= hi and i - j != hole``, for
        ints or element-wise for arrays that broadcast (torch tensors, numpy arrays)."""
        d = i - j
        inside = d == d  # every pair, in the arrays' broadcast shape
        if self.lo is not None:
            inside = inside & (d >= self.lo)
        if self.hi is not None:
            inside = inside & (d <= self.hi)
        if self.hole is not None:
            inside = inside & (d != self.hole)
        return inside

    # -- block ranges --------------------------------------------------------------------------

    def row(self, i: int, T: int) -> tuple[int, int]:
        """The keys [a, b) of query i's interval, clipped to 0 .. T - 1 (a >= b: empty; the
        hole, if inside, still counts)."""
        return self.key_range(i, i + 1, T)

    def key_range(self, i0: int, i1: int, T: int) -> tuple[int, int]:
        """The keys [c0, c1) that the queries [i0, i1) reach: [lo(i0), hi(i1 - 1) + 1),
        clipped to 0 .. T; c0 <= c1."""
        c0 = 0 if self.hi is None else min(max(i0 - self.hi, 0), T)
        c1 = T if self.lo is None else min(max(i1 - self.lo, 0), T)
        return c0, max(c0, c1)

    def query_range(self, j0: int, j1: int, T: int) -> tuple[int, int]:
        """The queries [r0, r1) whose sets reach some key of [j0, j1): from the first i with
        hi(i) >= j0 to the last with lo(i) <= j1 - 1, clipped to 0 .. T; r0 <= r1."""
        r0 = 0 if self.lo is None else min(max(j0 + self.lo, 0), T)
        r1 = T if self.hi is None else min(max(j1 + self.hi, 0), T)
        return r0, max(r0, r1)

    def needs_mask(self, i0: int, i1: int, j0: int, j1: int) -> bool:
        """Whether some pair of queries [i0, i1) x keys [j0, j1) is outside the set (the tile
        needs a mask), from the indices alone: the tile's offsets span [i0 - j1 + 1, i1 - 1 - j0]."""
        dmin, dmax = i0 - j1 + 1, i1 - 1 - j0
        return ((self.lo is not None and dmin < self.lo)
                or (self.hi is not None and dmax > self.hi)
                or (self.hole is not None and dmin <= self.hole <= dmax))

    def key_cuts(self, i0: int, i1: int) -> list[int]:
        """Where ``needs_mask`` of queries [i0, i1) against one key j can change along j: key j is
        seen by every query of the block when i0 - j >= lo, i1 - 1 - j <= hi and j is outside
        [i0 - hole, i1 - hole)."""
        cuts = []
        if self.lo is not None:
            cuts.append(i0 - self.lo + 1)
        if self.hi is not None:
            cuts.append(i1 - 1 - self.hi)
        if self.hole is not None:
            cuts += [i0 - self.hole, i1 - self.hole]
        return cuts

    def query_cuts(self, j0: int, j1: int) -> list[int]:
        """``key_cuts`` with the roles swapped: query i sees every key of [j0, j1) when
        i - (j1 - 1) >= lo, i - j0 <= hi and i is outside [j0 + hole, j1 + hole)."""
        cuts = []
        if self.lo is not None:
            cuts.append(j1 - 1 + self.lo)
        if self.hi is not None:
            cuts.append(j0 + self.hi + 1)
        if self.hole is not None:
            cuts += [j0 + self.hole, j1 + self.hole]
        return cuts

    def row_empty(self, i: int, T: int) -> bool:
        """Whether query i of T has no key: its interval is empty, or its hole alone."""
        a, b = self.row(i, T)
        return a >= b or (b - a == 1 and self.hole is not None and i - a == self.hole)

    def empty_rows(self, T: int) -> tuple[int, int]:
        """(head, tail): the first ``head`` and the last ``tail`` of T queries have an empty set,
        the others not (the intervals are monotone: only the ends can be empty)."""
        head = 0
        while head < T and self.row_empty(head, T):
            head += 1
        tail = 0
        while tail < T - head and self.row_empty(T - 1 - tail, T):
            tail += 1
        return head, tail

    def mask_diagonals(self, i0: int, j0: int) -> tuple[int | None, int | None, int | None]:
        """The mask of a tile whose pair (r, c) is query i0 + r, key j0 + c, as diagonals of
        ``c - r`` (its offset is d = (i0 - j0) - (c - r)): the pairs outside the set are those
        with c - r >= above (d < lo), c - r <= below (d > hi) and c - r == on (d = hole);
        None where the set has no such bound."""
        base = i0 - j0
        above = None if self.lo is None else base - self.lo + 1
        below = None if self.hi is None else base - self.hi - 1
        on = None if self.hole is None else base - self.hole
        return above, below, on

    def kernel_args(self) -> dict[str, int | None]:
        """The band as the Triton kernels' constexprs ``LO, HI, HOLE`` (None: unbounded, no
        hole; each compiled kernel serves one band)."""
        return {"LO": self.lo, "HI": self.hi, "HOLE": self.hole}


# -- the kinds -------------------------------------------------------------------------------------

#: each kind's constructor by the name generated code spells it with
KINDS: dict[str, Callable[..., Context]] = {}


def _kind(name: str):
    """Register a constructor as the kind ``name``: its arguments are the spelling's rest."""

    def register(make: Callable[..., Context]) -> Callable[..., Context]:
        KINDS[name] = make
        return make

    return register


@_kind("causal")
def causal() -> Context:
    """``j <= i``: the token itself and every earlier one."""
    return Context("causal", (), 0, None, None, "j <= i")


@_kind("strict")
def strict() -> Context:
    """``j < i``: every earlier token (the first token's set is empty)."""
    return Context("strict", (), 1, None, None, "j < i")


@_kind("window")
def window(w: int) -> Context:
    """The sliding window ``i - w <= j <= i``: the token and its w predecessors."""
    if not isinstance(w, int) or isinstance(w, bool) or w < 0:
        raise ValueError(f"window(w) needs a non-negative int, got {w!r}")
    return Context("window", (w,), 0, w, None, f"i - {w} <= j <= i")


@_kind("not_self")
def not_self() -> Context:
    """``j != i``: every other token."""
    return Context("not_self", (), None, None, 0, "j != i")


@_kind("all")
def all_tokens() -> Context:
    """Every token is context (bidirectional)."""
    return Context("all", (), None, None, None, "all j")


#: what a set may read from the call besides its band, by the name its spelling carries, and
#: how people say it (``energyc.runtime.rows`` turns the call's data into per-row bounds)
DATA: dict[str, str] = {
    "same_document": "same document",  # lo_b(i) >= start_b(doc(i)), hi_b(i) <= end_b(doc(i))
    "prefix": "or j < prefix",  # hi_b(i) = max(hi(i), P_b - 1)
}


def same_document() -> Context:
    """Every token of the query's own document (``cu_seqlens=`` or ``document_ids=`` at call
    time): alone, an encoder over each document; ``(j <= i) & same_document()`` or
    ``window(w) & same_document()`` bound another set by it."""
    return all_tokens().reading("same_document")


@dataclass(frozen=True)
class PrefixSet:
    """``j < prefix()``: the keys before the row's prefix length (``prefix=`` at call time).
    Not a set by itself: ``(j <= i) | (j < prefix())`` is a prefix-LM's."""

    def __repr__(self) -> str:
        return "{j < prefix}"


class Prefix:
    """``prefix()``: the row's prefix length, compared with j (``j < prefix()``)."""

    def __repr__(self) -> str:
        return "prefix()"


def prefix() -> Prefix:
    """The row's prefix length P_b (``prefix=`` at call time), for ``j < prefix()``."""
    return Prefix()


#: the sets ``j <op> i`` makes in an energy file (``i, j = tokens()``)
RELATIONS: dict[str, Callable[[], Context]] = {"<=": causal, "<": strict, "!=": not_self}
#: the sets an energy file makes by calling a function (``energyc.dsl`` exports these)
FUNCTIONS: tuple[Callable[..., Any], ...] = (window, all_tokens, same_document, prefix)

_PARSED: dict[tuple, Context] = {}


def context(spelling: Context | tuple) -> Context:
    """The set a spelling such as ``("window", 4)`` names (a ``Context`` is returned as it is);
    each spelling is turned into its object once."""
    if isinstance(spelling, Context):
        return spelling
    found = _PARSED.get(spelling)
    if found is None:
        if not spelling or spelling[0] not in KINDS:
            raise ValueError(f"unknown context set {spelling!r}; the kinds are {sorted(KINDS)}")
        args = [a for a in spelling[1:] if not isinstance(a, str)]
        data = [a for a in spelling[1:] if isinstance(a, str)]
        found = _PARSED[spelling] = KINDS[spelling[0]](*args).reading(*data)
    return found
