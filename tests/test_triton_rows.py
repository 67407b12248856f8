"""The Triton kernels on context sets from the call's data (``energyc.runtime.rows``: packed
documents, lengths, prefixes), under TRITON_INTERPRET=1, at more tokens than a block holds.

* the flash kernels (forward, backward, keys-major product) at 70 tokens on their 32 x 32 tiles,
  documents that start anywhere in a block, 1-token documents, padding, prefixes and a window
  within documents, against a dense masked reference in float64 whose masks are the sets'
  textbook definitions (document ids, lengths, prefix lengths), in float32 and float64; empty
  rows (a document's first token under j < i, padded queries) give lse 0, o 0, gradients 0;
* the block ranges the kernels compute from the rows (``row_key_range``, ``row_query_range``)
  against the rows' exact ranges: every key a query block sees, every query a key block is seen
  by, and no more than the rows' ends give;
* the generated pair kernels (16 x 16 tiles, 40 tokens) and reduction kernels (64 keys a step,
  70 tokens) with data: a layer's step and its gradients against autograd of the reference.
"""

from __future__ import annotations

import bisect
import importlib

import pytest
import torch

from energyc.runtime.rows import Rows, call_data, calling, resolve
from energyc.tolerances import tolerance

triton = pytest.importorskip("triton")
attention = importlib.import_module("energyc.runtime.triton_attention")

B, T, H, F, G = 2, 70, 2, 8, 5
# documents that start inside blocks of 32, two of one token, one across a block edge
CUTS = [0, 1, 2, 30, 33, 64, 70]
IDS = torch.tensor([[0] * 5 + [1] * 40 + [2] + [3] * 24,  # per row: document_ids
                    [0] * 31 + [1] * 2 + [2] * 37])
LENGTHS = torch.tensor([70, 50])
PREFIX = torch.tensor([40, 5])

# (set spelling, the call's data): the set from its textbook definition in ``textbook``
CASES = {
    "causal_cu": (("causal", "same_document"), {"cu_seqlens": CUTS}),
    "strict_ids_lengths": (("strict", "same_document"), {"document_ids": IDS, "lengths": LENGTHS}),
    "not_self_cu_lengths": (("not_self", "same_document"), {"cu_seqlens": CUTS,
                                                             "lengths": LENGTHS}),
    "window_ids": (("window", 3, "same_document"), {"document_ids": IDS}),
    "window_wide_cu": (("window", 40, "same_document"), {"cu_seqlens": CUTS, "lengths": LENGTHS}),
    "encoder_ids_lengths": (("all", "same_document"), {"document_ids": IDS, "lengths": LENGTHS}),
    "prefix_lengths": (("causal", "prefix"), {"prefix": PREFIX, "lengths": LENGTHS}),
    "strict_prefix": (("strict", "prefix"), {"prefix": PREFIX}),
    "causal_lengths": (("causal",), {"lengths": LENGTHS}),
}


def textbook(spelling, data) -> torch.Tensor:
    """(B, T, T) bool: key j in query i's set, from the definitions (FlexAttention's masks)."""
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    name, args = spelling[0], [a for a in spelling[1:] if not isinstance(a, str)]
    band = {"causal": j <= i, "strict": j < i, "not_self": j != i, "all": (i >= 0) & (j >= 0),
            "window": (j <= i) & (j >= i - (args[0] if args else 0))}[name]
    mask = band[None].expand(B, T, T)
    if "prefix" in spelling:
        mask = mask | (j[None] < data["prefix"][:, None, None])
    if "same_document" in spelling:
        if "cu_seqlens" in data:
            ids = torch.bucketize(torch.arange(T), torch.tensor(data["cu_seqlens"][1:]),
                                  right=True)[None].expand(B, T)
        else:
            ids = data["document_ids"]
        mask = mask & (ids[:, :, None] == ids[:, None, :])
    if "lengths" in data:
        n = data["lengths"][:, None, None]
        mask = mask & (i[None] < n) & (j[None] < n)
    return mask


def _inputs(dtype):
    gen = torch.Generator().manual_seed(7)
    q, k = (torch.randn(B, T, H, F, generator=gen, dtype=dtype) for _ in range(2))
    v, g = (torch.randn(B, T, H, G, generator=gen, dtype=dtype) for _ in range(2))
    return q, k, v, g


def _reference(q, k, v, g, mask, scale):
    """o, lse, dq, dk, dv and the keys-major product in float64 from the dense mask; an empty
    set gives o = 0, lse = 0."""
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    m = mask[:, None]  # (B, 1, T, T)
    s = scale * torch.einsum("bihf,bjhf->bhij", leaves[0], leaves[1])
    s = s.masked_fill(~m, -1e300)
    empty = ~m.any(-1, keepdim=True)
    p = torch.softmax(s, -1).masked_fill(empty, 0.0)
    o = torch.einsum("bhij,bjhg->bihg", p, leaves[2])
    lse = torch.logsumexp(s, -1).masked_fill(empty[..., 0], 0.0).transpose(1, 2)
    grads = torch.autograd.grad((o * g.double()).sum(), leaves)
    o_t = torch.einsum("bhij,bihg->bjhg", p, v.double())
    return [o.detach(), lse.detach(), *grads, o_t.detach()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
def test_flash_kernels_on_the_calls_rows(case, dtype):
    spelling, data = CASES[case]
    q, k, v, g = _inputs(dtype)
    call = call_data(q, None, **data)
    with calling(call):
        assert isinstance(resolve(spelling, T, "cpu"), Rows)
        o, lse = attention.attention_forward(q, k, v, 0.4, spelling)
        dq, dk, dv, _, _ = attention.attention_backward(q, k, v, 0.4, spelling, o, lse, g)
        o_t = attention.attention_transposed(q, k, v, 0.4, spelling, lse)
    mask = textbook(spelling, data)
    want = _reference(q, k, v, g, mask, 0.4)
    rtol, atol = tolerance(dtype)
    for name, got, ref in zip(("o", "lse", "dq", "dk", "dv", "o_t"), (o, lse, dq, dk, dv, o_t),
                              want):
        assert got.dtype == dtype, name
        assert bool(torch.isfinite(got).all()), name
        torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=atol, msg=name)
    empty = ~mask.any(-1)  # (B, T): rows with no key
    seen = mask.any(1)  # (B, T): keys some query sees
    assert bool(empty.any()) == (case not in ("causal_cu", "window_ids", "strict_prefix"))
    assert bool((lse[empty] == 0).all()) and bool((o[empty] == 0).all())
    assert bool((dq[empty] == 0).all())
    assert bool((dk[~seen] == 0).all()) and bool((dv[~seen] == 0).all())


def test_a_document_boundary_inside_a_block_is_masked():
    """The comparison can fail: the kernels given the band alone (the rows of the call left
    out) disagree with the documents' reference."""
    spelling, data = CASES["causal_cu"]
    q, k, v, g = _inputs(torch.float32)
    o, _ = attention.attention_forward(q, k, v, 0.4, ("causal",))
    want = _reference(q, k, v, g, textbook(spelling, data), 0.4)
    assert not torch.allclose(o.double(), want[0], rtol=1e-3, atol=1e-3)


# -- block ranges ------------------------------------------------------------------------------

_probe = None


def _probe_kernel():
    """A kernel writing each program's (lo, hi) of the rows' block ranges for batch row 1 (made
    on first use: a JIT function reads the globals of its module)."""
    global _probe, tl_, triton_layer_
    if _probe is not None:
        return _probe
    import triton.language as tl_

    from energyc.runtime import triton_layer as triton_layer_

    @triton.jit
    def _probe(OUT, ROWS_LO, ROWS_HI, s_rows, T, BLOCK_I: tl_.constexpr, BLOCK_J: tl_.constexpr,
               KEYS: tl_.constexpr):
        pid = tl_.program_id(0)
        LO_ROW = ROWS_LO + s_rows
        HI_ROW = ROWS_HI + s_rows
        if KEYS:
            lo, hi = triton_layer_.row_key_range(pid, T, LO_ROW, HI_ROW, None, None, BLOCK_I,
                                                 BLOCK_J, True)
        else:
            lo, hi = triton_layer_.row_query_range(pid, T, LO_ROW, HI_ROW, None, None, BLOCK_I,
                                                   BLOCK_J, True)
        tl_.store(OUT + 2 * pid, lo)
        tl_.store(OUT + 2 * pid + 1, hi)

    return _probe


@pytest.mark.parametrize("case", ["strict_ids_lengths", "window_ids", "prefix_lengths",
                                  "not_self_cu_lengths", "encoder_ids_lengths"])
def test_row_block_ranges_cover_the_set_and_skip_the_rest(case):
    spelling, data = CASES[case]
    BI, BJ = 8, 16
    call = call_data(torch.zeros(B, T, 1), None, **data)
    with calling(call):
        rows = resolve(spelling, T, "cpu")
    lo = rows.lo.expand(B, T).contiguous()
    hi = rows.hi.expand(B, T).contiguous()
    mask = textbook(spelling, data)[1]  # batch row 1, as the probe reads
    lo1, hi1 = lo[1].tolist(), hi[1].tolist()
    probe = _probe_kernel()
    for keys, block, other in ((True, BI, BJ), (False, BJ, BI)):
        n = -(-T // block)
        out = torch.zeros(2 * n, dtype=torch.int64)
        probe[(n,)](out, lo, hi, T, T, BLOCK_I=BI, BLOCK_J=BJ, KEYS=keys)
        for p, (a, b) in enumerate(out.view(n, 2).tolist()):
            x0, x1 = p * block, min((p + 1) * block, T)
            if keys:  # the keys of queries [x0, x1): [lo(x0), hi(x1 - 1)], start to a block
                seen = mask[x0:x1].any(0).nonzero().flatten()
                assert (a, b) == (lo1[x0] // other * other, hi1[x1 - 1] + 1), (p, a, b)
            else:  # the queries of keys [x0, x1): first with hi >= x0 .. last with lo < x1
                seen = mask[:, x0:x1].any(1).nonzero().flatten()
                r0 = bisect.bisect_left(hi1, x0)
                assert (a, b) == (r0 // other * other, bisect.bisect_left(lo1, x1)), (p, a, b)
            if len(seen):
                assert a <= int(seen.min()) and int(seen.max()) < b, (p, a, b, seen)


# -- generated kernels: pair kernels and masked reductions, through a layer --------------------

ENERGIES = {
    # pair kernels (queries-major with the online log-sum-exp; keys-major in the backward)
    "doc_softcap": ("E = -(logsumexp(2 * tanh(beta * s / 2), over=(j <= i) & same_document())"
                    " / beta).sum(H)"),
    "doc_window_sigmoid": "E = -sum_over(log(1 + exp(beta * s)), window(5) & same_document()).sum(H)",
    "prefix_softcap": ("E = -(logsumexp(2 * tanh(beta * s / 2), over=(j < i) | (j < prefix()))"
                       " / beta).sum(H)"),
    # reduction kernels over a context set (a score summed over features: no pair form)
    "doc_reduction": "E = -(logsumexp(tanh(q * k).sum(K), over=(j < i) & same_document())).sum(H)",
}


def _layer_case(name):
    tokens = 70 if name == "doc_reduction" else 40  # past one reduction step, several pair tiles
    cut = [0, 1, 7, 8, 25, tokens]  # 1-token documents, boundaries inside 16-token tiles
    ids = torch.bucketize(torch.arange(tokens), torch.tensor(cut[1:]), right=True)
    data = {"lengths": torch.tensor([tokens, tokens - 13])}
    if name.startswith("doc_"):
        data["document_ids"] = torch.stack([ids, torch.roll(ids, 0).clamp(max=2)])
    else:
        data["prefix"] = torch.tensor([9, 20])
    return tokens, data


def _compiled(tmp_path, name):
    from energyc.check import import_generated
    from energyc.compiler import compile_file
    from energyc.loader import load
    from tests.test_documents import HEADER

    path = tmp_path / f"{name}.py"
    path.write_text(HEADER + ENERGIES[name] + f'\nlayer("{name}", E, eta=0.5)\n')
    (layer,) = compile_file(load(str(path)))
    return layer, import_generated(layer)


@pytest.mark.parametrize("name", sorted(ENERGIES))
def test_generated_kernels_on_the_calls_rows(tmp_path, name):
    from energyc.reference import reference_step
    from tests import test_documents

    layer, module = _compiled(tmp_path, name)
    source = open(importlib.import_module(f"{module.__name__}._triton_layer").__file__).read()
    if name == "doc_reduction":
        assert "_in_row_context(o" in source and "mask=(" in source
    else:
        assert "= _pairs(" in source and "_rt.pair_" not in source
    tokens, data = _layer_case(name)
    lay, x = test_documents._layer(layer, module, "triton", tokens=tokens, batch=2, seed=3,
                                   steps=1)
    w = torch.randn_like(x)
    y, grads = test_documents._run(lay, x, w, **data)
    xr = x.detach().clone().requires_grad_(True)
    ref = reference_step(layer, lay, xr, create_graph=True, **data)
    want = torch.autograd.grad((ref * w).sum(), [xr, *lay.parameters()], allow_unused=True)
    test_documents._close(f"{name} forward", y, ref.detach())
    for (pname, _), a, b in zip([("x", None), *lay.named_parameters()], grads, want):
        test_documents._close(f"{name} d{pname}", a, torch.zeros_like(a) if b is None else b)


# -- on a GPU (benchmarks/gpu_check.py's pytest step) ------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_documents_against_each_document_in_float64(dtype):
    """cem-style attention (values = keys, a scale beta) over (j <= i) & same_document() on
    cu_seqlens at 4096 tokens on the autotuned GPU tiles: forward and backward of the packed
    batch against torch's float64 attention of each document alone (causal), within the dtype's
    tolerance; and the packed call no slower than 3x the plain causal call, which reads no rows
    (the data path skips the key blocks outside each document)."""
    device = "cuda"
    Bc, Tc, Hc, Fc = 2, 4096, 4, 64
    cuts = [0, 1, 700, 701, 1500, 2048, 2050, 3333, 4096]  # 1-token documents, unaligned
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(Bc, Tc, Hc, Fc, device=device, generator=gen).to(dtype)
    k = torch.randn(Bc, Tc, Hc, Fc, device=device, generator=gen).to(dtype)
    g = torch.randn(Bc, Tc, Hc, Fc, device=device, generator=gen).to(dtype)
    beta = Fc ** -0.5
    spelling = ("causal", "same_document")
    call = call_data(q, None, cu_seqlens=torch.tensor(cuts, dtype=torch.int32))
    with calling(call):
        o, lse = attention.attention_forward(q, k, k, beta, spelling)
        dq, dk, dv, _, _ = attention.attention_backward(q, k, k, beta, spelling, o, lse, g)
    rtol, atol = tolerance(dtype)
    for a, b in zip(cuts, cuts[1:]):
        leaves = [t[:, a:b].double().requires_grad_() for t in (q, k)]
        s = beta * torch.einsum("bihf,bjhf->bhij", leaves[0], leaves[1])
        causal = torch.ones(b - a, b - a, dtype=torch.bool, device=device).tril()
        p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
        ref = torch.einsum("bhij,bjhf->bihf", p, leaves[1])
        want_dq, want_dk = torch.autograd.grad((ref * g[:, a:b].double()).sum(), leaves)
        for name, got, want in (("o", o, ref), ("dq", dq, want_dq), ("dk + dv", dk + dv, want_dk)):
            torch.testing.assert_close(got[:, a:b].double(), want.detach(), rtol=rtol, atol=atol,
                                       msg=f"{name} of document [{a}, {b})")

    def timed(fn):
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 10

    def packed():
        with calling(call):
            attention.attention_forward(q, k, k, beta, spelling)

    plain = timed(lambda: attention.attention_forward(q, k, k, beta, ("causal",)))
    documents = timed(packed)
    print(f"forward at {Tc} tokens, {dtype}: causal {plain:.3f} ms, causal within documents "
          f"{documents:.3f} ms")
    assert documents <= 3 * plain + 0.5, (documents, plain)
