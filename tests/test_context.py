"""The context-set object (energyc.context) against the dense predicate it defines.

Every registered kind is drawn (with small random arguments), at random lengths, blocks and
block positions; each rule a kernel reads (the key range of a query block, the query range of a
key block, which tiles need a mask, where a block's range is cut, the empty rows, the mask
tile's diagonals) must agree with the (T x T) matrix of ``contains``, and ``contains`` with the
textbook definition of each kind energyc has."""

from __future__ import annotations

import inspect
import sys

import numpy as np
import pytest
from hypothesis import given, reject, settings
from hypothesis import strategies as st

from energyc import context as cx

#: the definitions of the kinds, written from their mathematics (j in C(i))
TEXTBOOK = {
    "causal": lambda i, j: j <= i,
    "strict": lambda i, j: j < i,
    "window": lambda i, j, w: (i - w <= j) & (j <= i),
    "not_self": lambda i, j: j != i,
    "all": lambda i, j: (i >= 0) & (j >= 0),
}


@st.composite
def contexts(draw) -> cx.Context:
    """Any registered kind, its int arguments drawn from 0 .. 12."""
    name = draw(st.sampled_from(sorted(cx.KINDS)))
    make = cx.KINDS[name]
    args = [draw(st.integers(0, 12)) for _ in inspect.signature(make).parameters]
    try:
        return make(*args)
    except ValueError:
        reject()


@st.composite
def cases(draw):
    """(context, T, (i0, i1), (j0, j1)): a length and one query and one key block anywhere."""
    ctx = draw(contexts())
    T = draw(st.integers(1, 40))
    i0 = draw(st.integers(0, T - 1))
    i1 = draw(st.integers(i0 + 1, T))
    j0 = draw(st.integers(0, T - 1))
    j1 = draw(st.integers(j0 + 1, T))
    return ctx, T, (i0, i1), (j0, j1)


def dense(ctx: cx.Context, T: int) -> np.ndarray:
    """(T, T) booleans: j in C(i)."""
    i = np.arange(T)
    return np.broadcast_to(ctx.contains(i[:, None], i[None, :]), (T, T))


def test_every_kind_has_a_textbook_definition_here():
    assert set(cx.KINDS) <= set(TEXTBOOK), "add the new kind's definition to TEXTBOOK"


@settings(max_examples=300, deadline=None)
@given(contexts(), st.integers(0, 30))
def test_contains_is_the_textbook_definition(ctx, T):
    i = np.arange(T)
    want = np.broadcast_to(TEXTBOOK[ctx.name](i[:, None], i[None, :], *ctx.args), (T, T))
    assert np.array_equal(dense(ctx, T), want), ctx
    assert cx.context(ctx.spelling) == ctx and hash(cx.context(ctx.spelling)) == hash(ctx)


@settings(max_examples=600, deadline=None)
@given(cases())
def test_key_range_of_a_query_block_holds_exactly_its_keys(case):
    """[c0, c1) holds every key a query of [i0, i1) sees; c0 and c1 are the first and last such
    key (up to a hole at an end), and an empty range where the block sees none."""
    ctx, T, (i0, i1), _ = case
    seen = np.flatnonzero(dense(ctx, T)[i0:i1].any(0))
    c0, c1 = ctx.key_range(i0, i1, T)
    assert 0 <= c0 <= c1 <= T
    if len(seen) == 0:
        assert c1 - c0 <= (ctx.hole is not None), (ctx, T, i0, i1, c0, c1)
        return
    assert c0 <= seen.min() and seen.max() < c1, (ctx, T, i0, i1, c0, c1)
    slack = 1 if ctx.hole is not None else 0
    assert seen.min() - c0 <= slack and c1 - 1 - seen.max() <= slack, (ctx, T, i0, i1, c0, c1)


@settings(max_examples=600, deadline=None)
@given(cases())
def test_query_range_of_a_key_block_holds_exactly_its_queries(case):
    """[r0, r1) holds every query that sees a key of [j0, j1), tightly as the key range."""
    ctx, T, _, (j0, j1) = case
    seen = np.flatnonzero(dense(ctx, T)[:, j0:j1].any(1))
    r0, r1 = ctx.query_range(j0, j1, T)
    assert 0 <= r0 <= r1 <= T
    if len(seen) == 0:
        assert r1 - r0 <= (ctx.hole is not None), (ctx, T, j0, j1, r0, r1)
        return
    assert r0 <= seen.min() and seen.max() < r1, (ctx, T, j0, j1, r0, r1)
    slack = 1 if ctx.hole is not None else 0
    assert seen.min() - r0 <= slack and r1 - 1 - seen.max() <= slack, (ctx, T, j0, j1, r0, r1)


@settings(max_examples=600, deadline=None)
@given(cases())
def test_a_tile_needs_a_mask_exactly_when_a_pair_is_outside(case):
    ctx, T, (i0, i1), (j0, j1) = case
    tile = dense(ctx, T)[i0:i1, j0:j1]
    assert ctx.needs_mask(i0, i1, j0, j1) == (not tile.all()), (ctx, i0, i1, j0, j1)


@settings(max_examples=600, deadline=None)
@given(cases())
def test_cuts_split_a_range_where_every_row_sees_a_key_changes(case):
    """Along the keys of a query block (and the queries of a key block), whether the whole
    block sees the key changes only at ``key_cuts`` (``query_cuts``)."""
    ctx, T, (i0, i1), (j0, j1) = case
    full = dense(ctx, T)
    every_query = full[i0:i1].all(0)  # key j seen by every query of the block
    cuts = set(ctx.key_cuts(i0, i1))
    for j in range(1, T):
        if every_query[j] != every_query[j - 1]:
            assert j in cuts, (ctx, i0, i1, j, sorted(cuts))
    every_key = full[:, j0:j1].all(1)
    cuts = set(ctx.query_cuts(j0, j1))
    for i in range(1, T):
        if every_key[i] != every_key[i - 1]:
            assert i in cuts, (ctx, j0, j1, i, sorted(cuts))


@settings(max_examples=300, deadline=None)
@given(contexts(), st.integers(0, 30))
def test_empty_rows_are_the_rows_without_a_key(ctx, T):
    empty = ~dense(ctx, T).any(1)
    head, tail = ctx.empty_rows(T)
    want = np.zeros(T, dtype=bool)
    want[:head] = True
    want[T - tail:] = True
    assert np.array_equal(empty, want), (ctx, T, head, tail)
    assert [ctx.row_empty(i, T) for i in range(T)] == empty.tolist()
    if not ctx.may_be_empty:
        assert not empty.any(), (ctx, T)


@settings(max_examples=600, deadline=None)
@given(cases())
def test_mask_diagonals_give_the_tile(case):
    ctx, T, (i0, i1), (j0, j1) = case
    above, below, on = ctx.mask_diagonals(i0, j0)
    r = np.arange(i1 - i0)[:, None]
    c = np.arange(j1 - j0)[None, :]
    outside = np.zeros((i1 - i0, j1 - j0), dtype=bool)
    if above is not None:
        outside |= c - r >= above
    if below is not None:
        outside |= c - r <= below
    if on is not None:
        outside |= c - r == on
    assert np.array_equal(~outside, dense(ctx, T)[i0:i1, j0:j1]), (ctx, i0, i1, j0, j1)


@settings(max_examples=300, deadline=None)
@given(contexts(), st.integers(2, 30))
def test_looking_back_and_reach(ctx, T):
    """looks_back: no key after its query; reach: no key further back than it; width: no row
    holds more keys."""
    full = dense(ctx, T)
    i, j = np.nonzero(full)
    assert ctx.looks_back == bool((j <= i).all()), ctx
    if ctx.reach is not None:
        assert ((i - j) <= ctx.reach).all(), ctx
    if ctx.width is not None:
        assert (full.sum(1) <= ctx.width).all(), ctx


def test_spellings_and_text():
    assert cx.window(4).spelling == ("window", 4)
    assert cx.context(("window", 4)) is cx.context(("window", 4))  # parsed once
    assert repr(cx.causal()) == "{j <= i}" and cx.window(4).text == "i - 4 <= j <= i"
    assert cx.all_tokens().everything and not cx.not_self().everything
    with pytest.raises(ValueError, match="unknown context set"):
        cx.context(("ring", 3))
    with pytest.raises(ValueError, match="non-negative int"):
        cx.window(-1)


def test_the_module_imports_no_torch():
    """The compiler, the runtime and the Triton path all read it: it needs nothing of them."""
    import subprocess

    code = ("import sys, energyc.context; "
            "assert 'torch' not in sys.modules and 'sympy' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
