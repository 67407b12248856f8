"""energyc.runtime.gemm: two-operand contractions as one GEMM, on oneDNN where it serves."""

from __future__ import annotations

import pytest
import torch

from energyc.runtime import gemm
from energyc.tolerances import tolerance

# sizes whose products reach gemm.MIN_MACS (b i = 512 rows, d = 96, m = 128)
SIZE = {"b": 2, "i": 256, "d": 96, "m": 128, "h": 4, "k": 24}
EQUATIONS = ["bim,bid->dm", "bid,bim->dm", "bim,dm->bid", "dm,bim->bid", "bid,dhk->bihk",
             "bihk,dhk->bid", "bid,bihk->dhk", "bihk,bid->hkd"]


@pytest.fixture
def calls(monkeypatch):
    """The oneDNN calls made, counted."""
    made = []

    def counting(x, w):
        made.append((tuple(x.shape), tuple(w.shape)))
        return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")

    monkeypatch.setattr(gemm, "_linear", counting)
    return made


def _operands(equation, dtype=torch.float32, strided=True):
    gen = torch.Generator().manual_seed(0)
    ins, out = equation.split("->")
    a, b = (torch.randn(*(SIZE[c] for c in ix), dtype=dtype, generator=gen)
            for ix in ins.split(","))
    if strided:
        a = a.transpose(0, -1).contiguous().transpose(0, -1)  # a strided view
    total = torch.randn(*(SIZE[c] for c in out), dtype=dtype, generator=gen)
    return a, b, total


def _close(got, want):
    rtol, atol = tolerance(want.dtype)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


@pytest.mark.skipif(not gemm._ONEDNN, reason="torch built without oneDNN")
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("equation", EQUATIONS)
def test_contraction_is_one_onednn_gemm(equation, strided, calls):
    """contract = einsum and contract_add = total + einsum, each by one oneDNN GEMM, for every
    contraction without a batch axis, in either output order, on strided operands."""
    a, b, total = _operands(equation, strided=strided)
    want = torch.einsum(equation, a.double(), b.double())
    got = gemm.contract(equation, a, b)
    assert got.shape == want.shape and got.dtype == torch.float32
    _close(got, want.float())
    _close(gemm.contract_add(total, equation, a, b), (total.double() + want).float())
    assert len(calls) == 2


@pytest.mark.parametrize("equation", EQUATIONS)
def test_plans_place_every_axis(equation):
    """A plan's P, Q and S are the operands' axes, each once, in the orders of the operands."""
    ia, ib, P, Q, S, q_first = gemm.gemm_plan(equation)
    assert sorted(P + S) == sorted(ia) and sorted(Q + S) == sorted(ib)
    assert (Q + P if q_first else P + Q) == equation.split("->")[1]


@pytest.mark.parametrize("equation", ["bij,bjk->bik", "ii,ij->j", "ij,jk,kl->il", "ijk,kj->i",
                                      "ij,kj->ik", "ij,jk->ik"])
def test_what_is_not_one_gemm_has_no_plan(equation):
    """A batch axis, a repeated axis, three operands, an axis summed within one operand: no
    plan (einsum computes them). The last two are single GEMMs: a plan."""
    plan = gemm.gemm_plan(equation)
    assert (plan is not None) == (equation in ("ij,kj->ik", "ij,jk->ik"))


def test_einsum_where_onednn_does_not_serve(calls):
    """float64, small products, a batch axis, an autograd graph to record, autocast and
    torch.backends.mkldnn disabled all take einsum, with einsum's result."""
    eq = "bim,dm->bid"
    a, b, _ = _operands(eq, dtype=torch.float64)
    _close(gemm.contract(eq, a, b), torch.einsum(eq, a, b))  # float64
    small = torch.randn(2, 3, 4), torch.randn(5, 4)
    _close(gemm.contract(eq, *small), torch.einsum(eq, *small))  # below MIN_MACS
    batched = torch.randn(2, 64, 96), torch.randn(2, 96, 128)
    _close(gemm.contract("bij,bjk->bik", *batched), torch.einsum("bij,bjk->bik", *batched))
    a, b, _ = _operands(eq)
    a.requires_grad_(True)
    got = gemm.contract(eq, a, b)
    assert got.grad_fn is not None  # recorded: its derivative exists
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gemm.contract(eq, a.detach(), b).dtype == torch.bfloat16
    with torch.backends.mkldnn.flags(enabled=False):
        gemm.contract(eq, a.detach(), b)
    assert calls == []
    with torch.no_grad():
        gemm.contract(eq, a, b)  # no graph to record: oneDNN
    assert len(calls) == (1 if gemm._ONEDNN else 0)


def test_contract_add_keeps_total():
    """contract_add writes a new tensor; total, a and b are unchanged."""
    eq = "bim,bid->dm"
    a, b, total = _operands(eq)
    before = [t.clone() for t in (a, b, total)]
    out = gemm.contract_add(total, eq, a, b)
    assert out.data_ptr() != total.data_ptr()
    for t, t0 in zip((a, b, total), before):
        assert torch.equal(t, t0)


@pytest.mark.skipif(not gemm._ONEDNN, reason="torch built without oneDNN")
@pytest.mark.parametrize("layout", ["token_major", "copied"])
@pytest.mark.parametrize("equation", ["bim,bid->md", "bid,bim->dm", "bihk,bid->hkd"])
def test_a_long_sum_is_as_accurate_as_einsums(equation, layout, calls):
    """A weight gradient's sum over 2 x 1024 tokens in float32, against float64 from the same
    values: no more than twice einsum's (MKL's) error (2: another order of the same sum). One
    oneDNN product summed its 2048 terms about sequentially: 3x (chunks of SUM_CHUNK now, one
    call each). Its operands as stored (the token axes outermost), or views that the product
    copies (then stored sum-major, for the chunks)."""
    size = {"b": 2, "i": 1024, "d": 128, "m": 128, "h": 4, "k": 32}
    gen = torch.Generator().manual_seed(0)
    ins = equation.split("->")[0].split(",")
    a, b = (torch.randn(*(size[c] for c in ix), generator=gen) for ix in ins)
    if layout == "copied":  # i innermost in memory: not a view of a sum-major matrix
        a = a.transpose(1, -1).contiguous().transpose(1, -1)
    want = torch.einsum(equation, a.double(), b.double())

    def err(t):
        return float((t.double() - want).abs().max() / want.abs().max())

    got, mkl = gemm.contract(equation, a, b), torch.einsum(equation, a, b)
    assert err(got) <= 2 * err(mkl), (err(got), err(mkl))
    assert len(calls) == 2048 // gemm.SUM_CHUNK
