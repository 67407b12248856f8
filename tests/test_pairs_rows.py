"""The torch pair kernels and running sums on the call's context data (``energyc.runtime.rows``).

Called directly inside ``rows.calling(call_data(...))`` at more tokens than a tile (the tiles
made small, so that many tiles, and tiles straddling documents, aligned and not, are exercised),
in float64 against dense computations masked by the sets' textbook definitions (the reference's
``context_mask``, not the runtime's per-row bounds): packed documents (1-token ones among them),
lengths (padding), prefix-LMs, a window or a hole within documents. Rows whose set is empty (a
document's first token under j < i, padded queries) give log-sum-exp 0 and sums 0, never NaN.
The tiles of packed documents are those some document's pairs fall in, and no more.
"""

from __future__ import annotations

import math

import pytest
import torch

from energyc.context import all_tokens, causal, not_self, same_document, strict, window
from energyc.ir.evaluate import context_mask
from energyc.runtime import pairs as kernels
from energyc.runtime.rows import Rows, call_data, calling, resolve

T = 37
B, H, F, G = 2, 3, 4, 2
CUTS = [0, 1, 2, 9, 16, 17, 29, 36, 37]  # 1-token documents at 0, 1, 16 and 36
IDS = torch.tensor([[0] * 5 + [1] + [2] * 20 + [3] * 11,  # per row: other boundaries
                    [0] * 12 + [1] * 12 + [2] * 13])
DOCS = same_document()

# (name, set, the call's data): every kind of data, alone and together
CASES = [
    ("causal_documents", causal() & DOCS, {"cu_seqlens": torch.tensor(CUTS)}),
    ("strict_documents", strict() & DOCS, {"cu_seqlens": torch.tensor(CUTS)}),
    ("encoder_documents", DOCS, {"cu_seqlens": torch.tensor(CUTS)}),
    ("window_documents", window(5) & DOCS, {"cu_seqlens": torch.tensor(CUTS)}),
    ("not_self_documents", not_self() & DOCS, {"cu_seqlens": torch.tensor(CUTS)}),
    ("causal_document_ids", causal() & DOCS, {"document_ids": IDS}),
    ("causal_lengths", causal(), {"lengths": torch.tensor([37, 23])}),
    ("all_lengths", all_tokens(), {"lengths": torch.tensor([30, 9])}),
    ("not_self_lengths", not_self(), {"lengths": torch.tensor([37, 1])}),
    ("prefix", causal().reading("prefix"), {"prefix": torch.tensor([11, 0])}),
    ("strict_prefix", strict().reading("prefix"), {"prefix": torch.tensor([5, 37])}),
    ("prefix_lengths", causal().reading("prefix"),
     {"prefix": torch.tensor([20, 4]), "lengths": torch.tensor([33, 17])}),
    ("window_documents_lengths", window(3) & DOCS,
     {"document_ids": IDS, "lengths": torch.tensor([31, 14])}),
    ("strict_documents_lengths", strict() & DOCS,
     {"cu_seqlens": torch.tensor(CUTS), "lengths": torch.tensor([36, 17])}),
]
# the cases with empty rows: documents' first tokens under j < i, a 1-token row under j != i,
# padded queries
WITH_EMPTY_ROWS = {"strict_documents", "not_self_documents", "causal_lengths", "all_lengths",
                   "not_self_lengths", "prefix_lengths", "window_documents_lengths",
                   "strict_documents_lengths"}
# (BLOCK_Q, BLOCK_K): unaligned, ragged last tiles; square tiles
BLOCKS = [(4, 3), (8, 8)]


def _data(data: dict, batch: int = B, tokens: int = T):
    return call_data(torch.zeros(batch, tokens, 1), None, **data)


def _dense(ctx, data) -> torch.Tensor:
    """(B|1, 1, T, T) the set's mask from its textbook definition on the call's data."""
    with calling(data):
        return context_mask(ctx, data.T)[:, None]


def _draw(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def _operands(seed=0):
    torch.manual_seed(seed)
    q, k = 1.5 * _draw(B, H, T, F), 1.5 * _draw(1, H, T, F)  # keys shared by the rows
    v = _draw(B, H, T, G)
    row, col = _draw(B, H, T, 1), _draw(1, 1, 1, T)
    return q, k, v, row, col


def _scores(q, k, row, col):
    d = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).to(torch.float64)
    qk = q @ k.transpose(-1, -2)
    return qk, 2 * torch.tanh(qk / 2) + 0.1 * d + row + col


def _phi(u, d, e):
    return 2 * torch.tanh(u[0] / 2) + 0.1 * d + e[0] + e[1]


KW = dict(T=T, shape=(B, H), uses_offset=True, dtype=torch.float64, device=torch.device("cpu"))


def _empty_rows(m: torch.Tensor) -> torch.Tensor:
    """(B, H, T) the queries with no key."""
    return ~m.any(-1).expand(B, H, T)


@pytest.mark.parametrize("blocks", BLOCKS, ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("name, ctx, data", CASES, ids=[c[0] for c in CASES])
def test_lse_and_softmax_sums_on_rows(monkeypatch, name, ctx, data, blocks):
    monkeypatch.setattr(kernels, "BLOCK_Q", blocks[0])
    monkeypatch.setattr(kernels, "BLOCK_K", blocks[1])
    call = _data(data)
    m = _dense(ctx, call)
    q, k, v, row, col = _operands()
    qk, S = _scores(q, k, row, col)
    empty = _empty_rows(m)
    assert bool(empty.any()) == (name in WITH_EMPTY_ROWS)
    x = S.masked_fill(~m, -math.inf)
    R = torch.where(empty, 0.0, torch.logsumexp(x, -1))
    g0 = 1 - torch.tanh(qk / 2) ** 2
    g1 = qk
    A0 = torch.where(m, g0 * torch.exp(S - R[..., None]), 0.0)
    A1 = torch.where(m, g1 * torch.exp(S - R[..., None]), 0.0)

    def phi_g(u, d, e):
        t = torch.tanh(u[0] / 2)
        return _phi(u, d, e), 1 - t * t, u[0]

    with calling(call):
        assert isinstance(resolve(ctx, T, "cpu"), Rows)
        got_R = kernels.pair_lse([q], [k], [row, col], _phi, ctx, **KW)
        R2, s0, s1 = kernels.pair_softmax_sums([q], [k], [row, col], phi_g,
                                               [("i", v, 0), ("i", None, 1)], ctx, **KW)
    for got, want in [(got_R, R), (R2, R), (s0, A0 @ v), (s1, A1.sum(-1))]:
        assert not got.isnan().any()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # empty rows: exactly 0
    assert (got_R[empty] == 0).all() and (s0[empty] == 0).all() and (s1[empty] == 0).all()


@pytest.mark.parametrize("blocks", BLOCKS, ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("name, ctx, data", CASES, ids=[c[0] for c in CASES])
def test_pair_sums_over_keys_and_queries_on_rows(monkeypatch, name, ctx, data, blocks):
    monkeypatch.setattr(kernels, "BLOCK_Q", blocks[0])
    monkeypatch.setattr(kernels, "BLOCK_K", blocks[1])
    call = _data(data)
    m = _dense(ctx, call)
    q, k, v, row, col = _operands(1)
    qk, S = _scores(q, k, row, col)
    A0 = torch.where(m, torch.sigmoid(S), 0.0)
    A1 = torch.where(m, qk * torch.sigmoid(S), 0.0)

    def weights(u, d, e):
        s = torch.sigmoid(_phi(u, d, e))
        return s, u[0] * s

    outputs = [("i", v, 0), ("j", v, 1), ("i", None, 1), ("j", None, 0)]
    with calling(call):
        got = kernels.pair_sums([q], [k], [row, col], weights, outputs, ctx, **KW)
    want = [A0 @ v, A1.transpose(-1, -2) @ v, A1.sum(-1), A0.sum(-2)]
    for g, w in zip(got, want):
        assert not g.isnan().any()
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
    empty = _empty_rows(m)
    assert (got[0][empty] == 0).all() and (got[2][empty] == 0).all()
    unread = ~m.any(-2).expand(B, H, T)  # keys in no query's set (padding)
    assert (got[1][unread] == 0).all() and (got[3][unread] == 0).all()


@pytest.mark.parametrize("keys_major", [False, True], ids=["queries", "keys"])
@pytest.mark.parametrize("name, ctx, data", CASES, ids=[c[0] for c in CASES])
def test_running_sums_on_rows(name, ctx, data, keys_major):
    call = _data(data)
    m = _dense(ctx, call)[:, 0].to(torch.float64)  # (B|1, i, j)
    torch.manual_seed(2)
    for v in (_draw(B, T, 3), _draw(1, T, 3)):  # a value of one row broadcasts over the rows
        with calling(call):
            got = kernels.running_sum(v, 1, ctx, keys_major)
        want = (torch.einsum("bij,bic->bjc", m, v) if keys_major
                else torch.einsum("bij,bjc->bic", m, v))
        assert got.shape == (max(v.shape[0], m.shape[0]), T, 3)
        torch.testing.assert_close(got, want.expand_as(got), rtol=1e-12, atol=1e-12)
        # a query with an empty set (or, transposed, a key in no set) sums to exactly 0
        none = ~m.bool().any(-2 if keys_major else -1)
        assert (got[none.expand(got.shape[0], T)] == 0).all()


def test_running_sums_on_rows_other_axes():
    """The token axis anywhere after the batch axis, several value axes; without a batch axis,
    documents shared by the rows."""
    call = _data({"cu_seqlens": torch.tensor(CUTS)})
    ctx = window(4) & DOCS
    m = _dense(ctx, call)[0, 0].to(torch.float64)
    torch.manual_seed(3)
    v = _draw(B, 2, T, 3)
    with calling(call):
        got = kernels.running_sum(v, 2, ctx, False)
        got_t = kernels.running_sum(v, 2, ctx, True)
        one = kernels.running_sum(v[0, 0], 0, ctx, False)
    torch.testing.assert_close(got, torch.einsum("ij,bhjc->bhic", m, v), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_t, torch.einsum("ij,bhic->bhjc", m, v), rtol=1e-12,
                               atol=1e-12)
    torch.testing.assert_close(one, m @ v[0, 0], rtol=1e-12, atol=1e-12)
    with calling(_data({"lengths": torch.tensor([37, 20])})):
        with pytest.raises(ValueError, match="without a batch axis"):
            kernels.running_sum(v[0, 0], 0, causal(), False)


def test_rows_kernels_differentiate():
    """layer.energy records the kernels: autograd through them on rows (gradcheck, float64)."""
    call = _data({"cu_seqlens": torch.tensor([0, 1, 4, 9]), "lengths": torch.tensor([9, 7])},
                 tokens=9)
    ctx = strict() & DOCS
    torch.manual_seed(6)
    v = _draw(B, 9, 2).requires_grad_(True)
    q, k = _draw(B, 1, 9, 2).requires_grad_(True), _draw(1, 1, 9, 2).requires_grad_(True)
    kw = dict(T=9, shape=(B, 1), uses_offset=False, dtype=torch.float64,
              device=torch.device("cpu"))
    with calling(call):
        assert torch.autograd.gradcheck(lambda a: kernels.running_sum(a, 1, ctx, False), (v,))
        assert torch.autograd.gradcheck(lambda a: kernels.running_sum(a, 1, ctx, True), (v,))
        assert torch.autograd.gradcheck(
            lambda a, b: kernels.pair_lse([a], [b], [], lambda u, d, e: torch.tanh(u[0]), ctx,
                                          **kw), (q, k))


def test_running_sum_in_float32_restarts_at_each_document():
    """A long float32 sum restarted at documents keeps float32 precision (the differences of
    prefix sums are taken in float64)."""
    call = _data({"cu_seqlens": torch.tensor([0, 3000, 3001, 4096])}, batch=1, tokens=4096)
    ctx = causal() & DOCS
    torch.manual_seed(4)
    v = 100 + torch.rand(1, 4096, 2)
    with calling(call):
        got = kernels.running_sum(v, 1, ctx, False)
    want = torch.cat([v[:, :3000].double().cumsum(1), v[:, 3000:3001].double(),
                      v[:, 3001:].double().cumsum(1)], 1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=2e-7, atol=0)


def _tiles(ctx, data, tokens, block):
    with calling(_data(data, batch=1, tokens=tokens)):
        return list(kernels.pair_tiles(tokens, ctx, block, block))


def _fewest_tiles(m: torch.Tensor, block_q: int, block_k: int) -> int:
    """The tiles of ``block_q`` x ``block_k`` that hold pairs of the (T, T) mask ``m``, each
    query block's key tiles laid from the first key it reaches."""
    count = 0
    for i0 in range(0, m.shape[0], block_q):
        keys = m[i0:i0 + block_q].any(0).nonzero()[:, 0]
        if len(keys):
            count += len(torch.unique((keys - keys[0]) // block_k))
    return count


@pytest.mark.parametrize("block_k", [4, 1])
@pytest.mark.parametrize("ctx", [causal() & DOCS, strict() & DOCS, DOCS, window(5) & DOCS],
                         ids=["causal", "strict", "encoder", "window"])
@pytest.mark.parametrize("cuts", [CUTS, [0, 8, 16, 24, 32, 37], [0, 5, 6, 20, 37]],
                         ids=["short_documents", "aligned", "unaligned"])
def test_packed_documents_visit_only_their_tiles(ctx, cuts, block_k):
    """Each tile computed holds a pair of some document's set and is masked exactly when it
    holds a pair outside; the tiles cover every pair of the set once and are the fewest that
    do, each query block's key tiles laid from the first key it reaches (under j < i a block's
    keys may have a gap: the last token of a document that its next document's first token,
    empty, follows)."""
    data = {"cu_seqlens": torch.tensor(cuts)}
    m = _dense(ctx, _data(data, batch=1))[0, 0]
    covered = torch.zeros(T, T, dtype=torch.int64)
    with calling(_data(data, batch=1)):
        tiles = list(kernels.pair_tiles(T, ctx, 4, block_k))
    for i0, i1, j0, j1, partial in tiles:
        tile = m[i0:i1, j0:j1]
        assert tile.any(), (i0, j0)
        assert partial == bool((~tile).any()), (i0, j0)
        covered[i0:i1, j0:j1] += 1
    assert (covered[m] == 1).all()
    assert len(tiles) == _fewest_tiles(m, 4, block_k)


def test_packed_documents_compute_the_tiles_of_the_documents_alone(monkeypatch):
    """8 documents of 64 tokens on 64-token tiles: the packed call computes as many tiles as the
    8 documents run alone (one each), in pair_lse as in pair_sums; unaligned documents at most
    one more per document boundary a tile straddles."""
    monkeypatch.setattr(kernels, "BLOCK_Q", 64)
    monkeypatch.setattr(kernels, "BLOCK_K", 64)
    ctx = causal() & DOCS
    n = 64
    calls = []

    def phi(u, d, e):
        calls.append(u[0].shape)
        return u[0]

    def run(tokens, cuts):
        torch.manual_seed(5)
        q, k = _draw(1, 1, tokens, 2), _draw(1, 1, tokens, 2)
        kw = dict(T=tokens, shape=(1, 1), uses_offset=False, dtype=torch.float64,
                  device=torch.device("cpu"))
        calls.clear()
        with calling(_data({"cu_seqlens": torch.tensor(cuts)}, batch=1, tokens=tokens)):
            kernels.pair_lse([q], [k], [], phi, ctx, **kw)
            lse_tiles = len(calls)
            kernels.pair_sums([q], [k], [], lambda u, d, e: (phi(u, d, e),),
                              [("i", None, 0), ("j", None, 0)], ctx, **kw)
        return lse_tiles, len(calls) - lse_tiles

    packed = run(8 * n, list(range(0, 8 * n + 1, n)))
    alone = run(n, [0, n])
    assert packed == (8 * alone[0], 8 * alone[1]) == (8, 8)
    # the same documents, unaligned: each straddling tile computed once, no other
    cuts = [0, 40, 104, 168, 232, 296, 360, 424, 512]
    tiles = _tiles(ctx, {"cu_seqlens": torch.tensor(cuts)}, 512, 64)
    m = _dense(ctx, _data({"cu_seqlens": torch.tensor(cuts)}, batch=1, tokens=512))[0, 0]
    assert len(tiles) == _fewest_tiles(m, 64, 64) < 8 * 9 // 2  # causal over the row: 36


def test_tiles_without_data_are_the_band_tiles():
    """Without the call's data (or with data another call gave) the set's own tiles."""
    plain = list(kernels.pair_tiles(T, causal(), 4, 4))
    with calling(None):
        assert list(kernels.pair_tiles(T, causal(), 4, 4)) == plain
    with calling(_data({"cu_seqlens": torch.tensor(CUTS)})):
        assert list(kernels.pair_tiles(T, causal(), 4, 4)) == plain  # the set reads no documents


def test_query_blocks_and_mask_tiles_on_rows():
    """query_blocks reach the keys of every row's queries; mask_tile is per row."""
    ctx = causal() & DOCS
    call = _data({"document_ids": IDS})
    m = _dense(ctx, call)[:, 0]
    with calling(call):
        rows = resolve(ctx, T, "cpu")
        for r0, r1, c0, c1 in kernels.query_blocks(ctx, T, 8):
            assert not m[:, r0:r1, :c0].any() and not m[:, r0:r1, c1:].any()
            assert m[:, r0:r1, c0:c1].any()
        tile = kernels.mask_tile(rows, 5, 17, 3, 30, torch.float64, torch.device("cpu"))
    assert tile.shape == (B, 12, 27)
    assert torch.equal(tile == 0, m[:, 5:17, 3:30])
    assert torch.isneginf(tile[~m[:, 5:17, 3:30]]).all()


def test_decoding_reads_the_rows_at_the_queries_positions():
    """T queries after ``offset`` cached tokens on the rows of all offset + T tokens (as
    runtime.decode builds them) give the last T rows of the whole computation, with every key
    held or a window's last keys alone (key_start > 0)."""
    fn = lambda u, d, e: torch.tanh(u[0])  # noqa: E731
    # (set, data, the fewest keys the queries 6 .. 8 read: those from the first's lo on)
    for ctx, data, fewest in [
            (causal() & DOCS, {"cu_seqlens": torch.tensor([0, 3, 4, 9])}, 5),
            (window(2) & DOCS, {"document_ids": torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1]])}, 5),
            (causal(), {"lengths": torch.tensor([8])}, 9)]:
        call = _data(data, batch=1, tokens=9)
        q, k = _draw(1, 1, 9, 2), _draw(1, 1, 9, 2)
        v = _draw(1, 9, 3)
        kw = dict(shape=(1, 1), uses_offset=True, dtype=torch.float64, device=torch.device("cpu"))
        with calling(call):
            whole = kernels.pair_lse([q], [k], [], fn, ctx, T=9, **kw)
            sums = kernels.running_sum(v, 1, ctx, False)
            for keep in {9, fewest}:  # every key, or the last ones alone (a window's cache)
                part = kernels.pair_lse([q[..., 6:, :]], [k[..., 9 - keep:, :]], [], fn, ctx, T=3,
                                        offset=6, **kw)
                torch.testing.assert_close(part, whole[..., 6:], rtol=1e-12, atol=1e-12)
                tail = kernels.running_sum(v[:, 9 - keep:], 1, ctx, False, offset=6, T=3)
                torch.testing.assert_close(tail, sums[:, 6:], rtol=1e-12, atol=1e-12)
