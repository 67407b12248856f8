"""The torch attention kernels on the call's rows (energyc.runtime.rows): attention_forward,
attention_backward and attention_transposed inside ``rows.calling(call_data(...))``, against a
dense masked softmax written from the sets' definitions and differentiated by torch.autograd
(float64). Block sizes are made small so that many blocks, tiles straddling document boundaries
and boundaries aligned with blocks are exercised, on each path: the CPU flash blocks
(flash_cpu), the chunked fallback, the whole matrix with kept weights."""

from __future__ import annotations

import math

import pytest
import torch

from energyc import runtime as rt
from energyc.runtime import attention, flash_cpu
from energyc.runtime.rows import call_data, calling
from energyc.tolerances import tolerance

DT = torch.float64
H, F, G = 2, 3, 4


def inside(T: int, band: tuple, B: int, ids=None, lengths=None, prefix=None) -> torch.Tensor:
    """(B, T, T) bool: key j in query i's set, from the definitions: the band, | (j < P_b),
    & the same document, and both tokens real (j < L_b, i < L_b)."""
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    name = band[0]
    if name == "causal":
        m = j <= i
    elif name == "strict":
        m = j < i
    elif name == "window":
        m = (j <= i) & (j >= i - band[1])
    elif name == "not_self":
        m = j != i
    else:
        m = torch.ones(T, T, dtype=torch.bool)
    m = m[None].expand(B, T, T)
    if prefix is not None:
        m = m | (j[None] < prefix[:, None, None])
    if ids is not None:
        ids = ids.expand(B, T)
        m = m & (ids[:, :, None] == ids[:, None, :])
    if lengths is not None:
        real = torch.arange(T)[None, :] < lengths[:, None]
        m = m & real[:, :, None] & real[:, None, :]
    return m


def dense(q, k, v, scale, slopes, mask):
    """o (B, T, H, G), lse (B, T, H) and P (B, H, T, T) of softmax attention over ``mask``
    (B, T, T), materialised; an empty row's lse, o and weights 0 (the project's convention)."""
    T = q.shape[1]
    S = scale * torch.einsum("bihf,bjhf->bhij", q, k)
    if slopes is not None:
        d = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).to(DT)
        S = S + slopes[None, :, None, None] * d
    m = mask[:, None]
    empty = ~m.any(-1)
    S = S.masked_fill(~m, -math.inf).masked_fill(empty[..., None], 0.0)
    lse = torch.logsumexp(S, -1)
    P = torch.exp(S - lse[..., None]).masked_fill(~m, 0.0)
    lse = lse.masked_fill(empty, 0.0)
    return torch.einsum("bhij,bjhf->bihf", P, v), lse.transpose(1, 2), P


def _ids(cuts: list[int]) -> torch.Tensor:
    return torch.bucketize(torch.arange(cuts[-1]), torch.tensor(cuts[1:]), right=True)[None]


T = 70
BLOCK = 16
UNALIGNED = [0, 1, 16, 17, 18, 32, 50, 51, 64, 69, 70]  # 1-token documents, at and off block edges
ALIGNED = [0, 16, 48, 64, 70]

# name: (the set's spelling, the call's data, the mask's definition)
CASES = {
    "doc_causal": (("causal", "same_document"), dict(cu_seqlens=UNALIGNED),
                   dict(band=("causal",), ids=_ids(UNALIGNED))),
    "doc_causal_aligned": (("causal", "same_document"), dict(cu_seqlens=ALIGNED),
                           dict(band=("causal",), ids=_ids(ALIGNED))),
    "doc_strict": (("strict", "same_document"), dict(cu_seqlens=UNALIGNED),
                   dict(band=("strict",), ids=_ids(UNALIGNED))),
    "doc_encoder": (("all", "same_document"), dict(cu_seqlens=UNALIGNED),
                    dict(band=("all",), ids=_ids(UNALIGNED))),
    "doc_window": (("window", 5, "same_document"), dict(cu_seqlens=UNALIGNED),
                   dict(band=("window", 5), ids=_ids(UNALIGNED))),
    "doc_window_wide": (("window", 20, "same_document"), dict(cu_seqlens=ALIGNED),
                        dict(band=("window", 20), ids=_ids(ALIGNED))),
    "doc_not_self": (("not_self", "same_document"), dict(cu_seqlens=UNALIGNED),
                     dict(band=("not_self",), ids=_ids(UNALIGNED))),
    "lengths_causal": (("causal",), dict(lengths=[70, 33, 16]),
                       dict(band=("causal",), lengths=torch.tensor([70, 33, 16]))),
    "lengths_all": (("all",), dict(lengths=[48, 70, 1]),
                    dict(band=("all",), lengths=torch.tensor([48, 70, 1]))),
    "prefix": (("causal", "prefix"), dict(prefix=[20, 0, 45]),
               dict(band=("causal",), prefix=torch.tensor([20, 0, 45]))),
    "prefix_lengths": (("causal", "prefix"), dict(prefix=[20, 3, 45], lengths=[70, 40, 45]),
                       dict(band=("causal",), prefix=torch.tensor([20, 3, 45]),
                            lengths=torch.tensor([70, 40, 45]))),
    # per-row documents, each row its own boundaries, with padding
    "ids_window_lengths": (
        ("window", 6, "same_document"),
        dict(document_ids=torch.cat([_ids([0, 5, 30, 31, 70]), _ids([0, 16, 32, 70]),
                                     _ids([0, 1, 2, 40, 70])]), lengths=[70, 50, 39]),
        dict(band=("window", 6), ids=torch.cat([_ids([0, 5, 30, 31, 70]), _ids([0, 16, 32, 70]),
                                                _ids([0, 1, 2, 40, 70])]),
             lengths=torch.tensor([70, 50, 39]))),
    "ids_not_self": (
        ("not_self", "same_document"),
        dict(document_ids=torch.cat([_ids([0, 1, 30, 70]), _ids([0, 33, 34, 70]),
                                     _ids([0, 70])])),
        dict(band=("not_self",), ids=torch.cat([_ids([0, 1, 30, 70]), _ids([0, 33, 34, 70]),
                                                _ids([0, 70])]))),
}


def _operands(B: int, seed: int, bias: bool, tokens: int = T):
    torch.manual_seed(seed)
    q, k = (torch.randn(B, tokens, H, F, dtype=DT, requires_grad=True) for _ in range(2))
    v = torch.randn(B, tokens, H, G, dtype=DT, requires_grad=True)
    scale = torch.tensor(0.8, dtype=DT, requires_grad=True)
    slopes = torch.tensor([0.15, -0.1], dtype=DT, requires_grad=True) if bias else None
    return q, k, v, scale, slopes


def _check(name: str, bias: bool, path: str, tokens: int = T) -> None:
    spelling, data, definition = CASES[name]
    data = {key: torch.as_tensor(value) for key, value in data.items()}
    B = 3
    q, k, v, scale, slopes = _operands(B, len(name), bias, tokens)
    mask = inside(tokens, B=B, **definition)
    o, lse, P = dense(q, k, v, scale, slopes, mask)
    g = torch.randn_like(o)
    wrt = [q, k, v, scale] + ([slopes] if bias else [])
    want = torch.autograd.grad((o * g).sum(), wrt)
    w = torch.randn(B, tokens, H, 5, dtype=DT)  # a value of the query token, for the key role
    want_t = torch.einsum("bhij,bihf->bjhf", P.detach(), w)
    qd, kd, vd, sd = (t.detach() for t in (q, k, v, scale))
    md = None if slopes is None else slopes.detach()
    with calling(call_data(qd, None, **data)):
        if path == "probs":
            o2, lse2, p = rt.attention_forward(qd, kd, vd, sd, spelling, md, keep_probs=True)
            assert p is not None, "the weights were not kept"
        else:
            (o2, lse2), p = rt.attention_forward(qd, kd, vd, sd, spelling, md), None
        got = rt.attention_backward(qd, kd, vd, sd, spelling, o2, lse2, g, md, need_dscale=True,
                                    probs=p)
        got_t = rt.attention_transposed(qd, kd, w, sd, spelling, lse2, md, probs=p)
    rtol, atol = tolerance(DT)
    tol = dict(rtol=rtol, atol=atol)
    assert torch.isfinite(o2).all() and torch.isfinite(got_t).all()
    torch.testing.assert_close(o2, o.detach(), **tol, msg=lambda m: f"{name} o: {m}")
    if lse2 is not None:
        torch.testing.assert_close(lse2, lse.detach(), **tol, msg=lambda m: f"{name} lse: {m}")
    torch.testing.assert_close(got_t, want_t, **tol, msg=lambda m: f"{name} key role: {m}")
    names = ["dq", "dk", "dv", "dscale", "dslopes"]
    for n, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, n=n: f"{name} {n}: {m}")
    if not bias:
        assert got[4] is None


@pytest.fixture(params=["flash", "flash_unmasked_parts", "chunks"])
def path(request, monkeypatch):
    """The CPU flash blocks (with every run of unmasked keys its own call, MIN_UNMASKED = 1, or
    as they are) and the chunked fallback, all on blocks of 16 queries."""
    monkeypatch.setattr(flash_cpu, "BLOCK", BLOCK)
    monkeypatch.setattr(attention, "QUERY_CHUNK", BLOCK)
    if request.param == "flash_unmasked_parts":
        monkeypatch.setattr(flash_cpu, "MIN_UNMASKED", 1)
    if request.param == "chunks":
        monkeypatch.setattr(flash_cpu, "serves", lambda *a, **kw: False)
    return request.param


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "slopes"])
@pytest.mark.parametrize("name", list(CASES))
def test_rows_match_the_dense_masked_softmax(name, bias, path):
    _check(name, bias, path)


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "slopes"])
@pytest.mark.parametrize("name", ["doc_causal", "doc_strict", "doc_not_self", "doc_window",
                                  "lengths_causal", "prefix", "ids_window_lengths"])
def test_rows_on_the_whole_matrix_with_kept_weights(name, bias):
    """A forward that keeps its weights (T within one query chunk): the whole matrix masked by
    the rows, and the backward and the key role from the kept weights."""
    _check(name, bias, "probs")


def test_decoding_reads_the_rows_at_the_queries_positions():
    """3 queries after 5 cached tokens, on the rows of all 8 (as runtime.decode builds them),
    give the whole computation's last 3 rows: documents, and padding on the left."""
    q = torch.randn(1, 8, H, F, dtype=DT)
    k = torch.randn(1, 8, H, F, dtype=DT)
    for kind, data in [(("causal", "same_document"), dict(cu_seqlens=[0, 6, 8])),
                       (("window", 2, "same_document"), dict(cu_seqlens=[0, 4, 8])),
                       (("causal",), dict(lengths=[7]))]:
        with calling(call_data(q, None, **data)):
            o, lse = rt.attention_forward(q, k, k, 0.7, kind)
            o2, lse2 = rt.attention_forward(q[:, 5:], k, k, 0.7, kind, offset=5)
        torch.testing.assert_close(o2, o[:, 5:], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lse2, lse[:, 5:], rtol=1e-12, atol=1e-12)


def _kernel_calls(monkeypatch) -> list[tuple[int, int, int, int]]:
    """Record the token ranges (queries r0:r1, keys c0:c1) and the batch rows of every CPU flash
    kernel call (forward and backward), read from the operands' views (B, H, tokens, features)
    of the whole sequence."""
    calls: list[tuple[int, int, int, int, int]] = []

    def span(t: torch.Tensor) -> tuple[int, int]:
        first = t.storage_offset() % t.stride(0) // t.stride(2)
        return first, first + t.shape[2]

    for name, qi in (("_scaled_dot_product_flash_attention_for_cpu", 0),
                     ("_scaled_dot_product_flash_attention_for_cpu_backward", 1)):
        real = getattr(torch.ops.aten, name)

        def hooked(*args, _real=real, _qi=qi, **kwargs):
            calls.append((*span(args[_qi]), *span(args[_qi + 1]), args[_qi].shape[0]))
            return _real(*args, **kwargs)

        monkeypatch.setattr(torch.ops.aten, name, hooked)
    return calls


@pytest.mark.parametrize("spelling", [("causal", "same_document"), ("all", "same_document"),
                                      ("window", 8, "same_document")],
                         ids=lambda s: s[0])
def test_packed_documents_do_the_work_of_the_documents_alone(spelling, monkeypatch):
    """8 documents of 64 tokens packed in one row of 512: every kernel call (forward, backward,
    key role) lies inside one document, and the pairs computed are those of the documents run
    one at a time."""
    torch.manual_seed(0)
    n, docs = 64, 8
    q, k, v, g = (torch.randn(1, n * docs, H, F, dtype=DT) for _ in range(4))
    calls = _kernel_calls(monkeypatch)

    def run(x: slice, cuts: list[int]):
        qs, ks, vs, gs = (t[:, x] for t in (q, k, v, g))
        with calling(call_data(qs, None, cu_seqlens=cuts)):
            o, lse = rt.attention_forward(qs, ks, vs, 0.5, spelling)
            rt.attention_backward(qs, ks, vs, 0.5, spelling, o, lse, gs)
            rt.attention_transposed(qs, ks, vs, 0.5, spelling, lse)

    run(slice(None), list(range(0, n * docs + 1, n)))
    packed = list(calls)
    assert packed, "no CPU flash kernel call was recorded"
    for r0, r1, c0, c1, _ in packed:
        assert r0 // n == (r1 - 1) // n == c0 // n == (c1 - 1) // n, (
            f"a call over queries [{r0}, {r1}) and keys [{c0}, {c1}) crosses a document")
    calls.clear()
    for d in range(docs):
        run(slice(d * n, (d + 1) * n), [0, n])
    alone = list(calls)

    def pairs(cs):
        return sum(b * (r1 - r0) * (c1 - c0) for r0, r1, c0, c1, b in cs)

    assert pairs(packed) == pairs(alone)
    assert len(packed) == len(alone)


def test_padded_rows_do_the_work_of_each_row_alone(monkeypatch):
    """Rows of 64, 32 and 16 real tokens of 64, causal: the pairs computed are those of the rows
    run alone (up to the padded queries' one masked key), not three rows of 64."""
    monkeypatch.setattr(flash_cpu, "BLOCK", BLOCK)
    torch.manual_seed(0)
    q, k, v, g = (torch.randn(3, 64, H, F, dtype=DT) for _ in range(4))
    lengths = [64, 32, 16]
    calls = _kernel_calls(monkeypatch)
    work = {}

    for rows in ("packed", "alone"):
        calls.clear()
        if rows == "packed":
            parts = [([t for t in (q, k, v, g)], lengths)]
        else:  # each row alone, its real tokens (on the same blocks: lengths of all its tokens)
            parts = [([t[b:b + 1, :n] for t in (q, k, v, g)], [n]) for b, n in enumerate(lengths)]
        for x, n in parts:
            with calling(call_data(x[0], None, lengths=n)):
                o, lse = rt.attention_forward(x[0], x[1], x[2], 0.5, ("causal",))
                rt.attention_backward(x[0], x[1], x[2], 0.5, ("causal",), o, lse, x[3])
        work[rows] = sum(b * (r1 - r0) * (c1 - c0) for r0, r1, c0, c1, b in calls if c1 - c0 > 1)
    assert work["packed"] == work["alone"]
