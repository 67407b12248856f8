"""Context sets from the call's data: packed documents, padding and prefixes (float64).

Properties, for energies on every kernel family (the attention kernels, the pair kernels, running
sums, the unfused reductions) and both backends (Triton under the interpreter):

* a packed batch gives each document exactly what the document run alone gives: outputs and the
  gradients of x and every parameter (``cu_seqlens`` and ``document_ids`` alike);
* padding never changes a real token's output or gradient; a padded token's output is its input
  and real tokens' losses send it no gradient;
* with documents, lengths and prefixes the layer equals torch.autograd on the reference
  interpreter, whose masks are the sets' textbook (FlexAttention) definitions;
* the call's data is checked: both or neither of cu_seqlens / document_ids where needed, values
  out of range, data the energy does not read.
"""

from __future__ import annotations

import os
import textwrap

import pytest
import torch

from energyc.check import Case, build, import_generated
from energyc.compiler import compile_file
from energyc.loader import load
from energyc.reference import reference_step
from energyc.runtime.backends import preload
from tests.conftest import assert_within_tolerance

HEADER = """from energyc.dsl import *
D, H, K = dims("D H K", H=2, K=3); i, j = tokens(); x, xbar = state(D)
W_q = param("W_q", (H, K, D)); W_k = param("W_k", (H, K, D))
beta = hyper("beta", default=0.7)
q = W_q @ x[i]; k = W_k @ xbar[j]; s = dot(q, k, over=K)
"""
ENERGIES = {
    # the attention kernels: a log-sum-exp over j <= i within each document
    "doc_causal": "E = -(logsumexp(beta * s, over=(j <= i) & same_document()) / beta).sum(H)",
    "doc_window": "E = -(logsumexp(beta * s, over=window(2) & same_document()) / beta).sum(H)",
    # empty rows inside the batch: each document's first token
    "doc_strict": "E = -(logsumexp(beta * s, over=(j < i) & same_document()) / beta).sum(H)",
    # an encoder over each document
    "doc_encoder": "E = -(logsumexp(beta * s, over=same_document()) / beta).sum(H)",
    # a hole in each document's interval
    "doc_not_self": "E = -(logsumexp(beta * s, over=(j != i) & same_document()) / beta).sum(H)",
    # the pair kernels: soft-capped scores in a log-sum-exp, and a sum of a score function
    "doc_softcap": ("E = -(logsumexp(2 * tanh(beta * s / 2), over=(j <= i) & same_document())"
                    " / beta).sum(H)"),
    "doc_sigmoid": "E = -sum_over(log(1 + exp(beta * s)), (j <= i) & same_document()).sum(H)",
    # a running sum (linear in the context): prefix sums restarted at each document
    "doc_running": ("v = W_k @ xbar[j]\n"
                    "E = -(q * sum_over(v, (j <= i) & same_document())).sum(K).sum(H)"),
    # a prefix-LM
    "prefix_lm": "E = -(logsumexp(beta * s, over=(j <= i) | (j < prefix())) / beta).sum(H)",
    "prefix_pairs": ("E = -(logsumexp(2 * tanh(beta * s / 2), over=(j <= i) | (j < prefix()))"
                     " / beta).sum(H)"),
    # no data in the set: padding alone (lengths)
    "causal": "E = -(logsumexp(beta * s, over=j <= i) / beta).sum(H)",
    "everything": "E = -(logsumexp(beta * s, over=all_tokens()) / beta).sum(H)",
    "pairs_all": "E = -sum_over(log(1 + exp(beta * s)), all_tokens()).sum(H)",
}
DOCUMENTS = [n for n in ENERGIES if n.startswith("doc_")]
PREFIX = [n for n in ENERGIES if n.startswith("prefix")]
BACKENDS = ["torch", "triton"]

_COMPILED: dict = {}


def compiled(tmp_path_factory, name):
    """(CompiledLayer, generated module) of ``ENERGIES[name]``, compiled once per session."""
    if name not in _COMPILED:
        path = tmp_path_factory.mktemp("energies") / f"{name}.py"
        path.write_text(HEADER + textwrap.dedent(ENERGIES[name]) + f'\nlayer("{name}", E, eta=0.5)\n')
        (layer,) = compile_file(load(str(path)))
        _COMPILED[name] = layer, import_generated(layer)
    return _COMPILED[name]


def _layer(layer, module, backend, tokens, batch=1, seed=0, precond="dplr", steps=2,
           context="current"):
    if backend == "triton":
        pytest.importorskip("triton")
        if not os.environ.get("TRITON_INTERPRET"):
            pytest.skip("the Triton path runs on CPU under TRITON_INTERPRET=1")
    hypers = {"beta": 0.7} if any(h.name == "beta" for h in layer.hypers) else {}
    case = Case(dims={"D": 4, "H": 2, "K": 3}, batch=batch, tokens=tokens, seed=seed, scale=0.8,
                hypers=hypers, eta=0.5, steps=steps, precond=precond, context=context)
    lay, x = build(layer, module, case)
    lay.config = (*lay.config[:4], backend)
    preload(backend, module.__name__)  # the Triton path is imported where a layer is built on it
    return lay, x


def _run(lay, x, w, **data):
    """The layer's output and the gradients of (y * w).sum() to x and every parameter."""
    x = x.detach().clone().requires_grad_(True)
    y = lay(x, **data)
    grads = torch.autograd.grad((y * w).sum(), [x, *lay.parameters()])
    return y.detach(), grads


def _close(what, got, want):
    assert_within_tolerance(what, got, want, torch.float64)


CUTS = [[0, 4, 5, 11, 13], [0, 13], [0, 1, 2, 3, 13], [0, 6, 13]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", DOCUMENTS)
def test_packed_documents_equal_each_document_alone(tmp_path_factory, name, backend):
    layer, module = compiled(tmp_path_factory, name)
    for n, cuts in enumerate(CUTS):
        lay, x = _layer(layer, module, backend, tokens=13, seed=n)
        w = torch.randn_like(x)
        cu = torch.tensor(cuts, dtype=torch.int32)
        y, grads = _run(lay, x, w, cu_seqlens=cu)
        ids = torch.bucketize(torch.arange(13), cu[1:], right=True)
        y_ids, grads_ids = _run(lay, x, w, document_ids=ids[None].expand(x.shape[0], 13))
        _close(f"{name} document_ids vs cu_seqlens", y_ids, y)
        for a, b in zip(grads_ids, grads):
            _close(f"{name} document_ids gradient", a, b)
        param_sums = [torch.zeros_like(p) for p in lay.parameters()]
        for a, b in zip(cuts, cuts[1:]):
            one = torch.tensor([0, b - a], dtype=torch.int32)
            y_doc, g_doc = _run(lay, x[:, a:b], w[:, a:b], cu_seqlens=one)
            _close(f"{name} document [{a}, {b}) output", y[:, a:b], y_doc)
            _close(f"{name} document [{a}, {b}) dx", grads[0][:, a:b], g_doc[0])
            for total, part in zip(param_sums, g_doc[1:]):
                total += part
        for (pname, _), a, b in zip(lay.named_parameters(), grads[1:], param_sums):
            _close(f"{name} d{pname}, summed over the documents", a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["causal", "everything", "pairs_all", "doc_causal",
                                  "doc_running", "prefix_lm"])
def test_padding_changes_no_real_token(tmp_path_factory, name, backend):
    layer, module = compiled(tmp_path_factory, name)
    lay, x = _layer(layer, module, backend, tokens=11, batch=3, seed=1)
    lengths = torch.tensor([11, 7, 3])
    data = {}
    if name.startswith("doc_"):
        data["document_ids"] = torch.tensor([[0] * 5 + [1] * 6, [0] * 2 + [1] * 9, [0] * 11])
    if name.startswith("prefix"):
        data["prefix"] = torch.tensor([4, 2, 1])
    w = torch.randn_like(x)
    y, grads = _run(lay, x, w, lengths=lengths, **data)
    for b, n in enumerate(lengths.tolist()):
        row = {k: v[b:b + 1, :n] if v.dim() == 2 else v[b:b + 1] for k, v in data.items()}
        y_b, g_b = _run(lay, x[b:b + 1, :n], w[b:b + 1, :n], **row)
        _close(f"{name} row {b} real outputs", y[b:b + 1, :n], y_b)
        _close(f"{name} row {b} real dx", grads[0][b:b + 1, :n], g_b[0])
        _close(f"{name} row {b} padded outputs are the inputs", y[b, n:], x[b, n:])
    # real tokens' losses send padded tokens no gradient
    w_real = w * (torch.arange(11)[None, :, None] < lengths[:, None, None])
    _, g_real = _run(lay, x, w_real, lengths=lengths, **data)
    for b, n in enumerate(lengths.tolist()):
        assert torch.count_nonzero(g_real[0][b, n:]) == 0, f"{name}: padding got a gradient"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", DOCUMENTS + PREFIX + ["causal", "everything", "pairs_all"])
def test_against_autograd_of_the_reference(tmp_path_factory, name, backend):
    layer, module = compiled(tmp_path_factory, name)
    lay, x = _layer(layer, module, backend, tokens=9, batch=2, seed=2)
    data = {"lengths": torch.tensor([9, 6])}
    if name.startswith("doc_"):
        data["document_ids"] = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [0, 1, 1, 1, 1, 1, 2, 2, 2]])
    if name.startswith("prefix"):
        data["prefix"] = torch.tensor([3, 7])
    w = torch.randn_like(x)
    y, grads = _run(lay, x, w, **data)
    xr = x.detach().clone().requires_grad_(True)
    ref = reference_step(layer, lay, xr, create_graph=True, **data)
    want = torch.autograd.grad((ref * w).sum(), [xr, *lay.parameters()], allow_unused=True)
    _close(f"{name} forward", y, ref.detach())
    for (pname, _), a, b in zip([("x", None), *lay.named_parameters()], grads, want):
        _close(f"{name} d{pname}", a, torch.zeros_like(a) if b is None else b)
    # layer.energy with the same data equals the reference's energy, real tokens only
    from energyc.reference import evaluate_energy, module_values
    from energyc.runtime.rows import call_data, calling

    params, hypers = module_values(layer, lay)
    call = call_data(x, None, **data)
    with calling(call):
        e_ref = evaluate_energy(layer, x, x, params, hypers) * call.valid[:, :, 0]
    _close(f"{name} energy", lay.energy(x, per_token=True, **data).detach(), e_ref.detach())


def test_call_data_errors(tmp_path_factory):
    layer, module = compiled(tmp_path_factory, "doc_causal")
    lay, x = _layer(layer, module, "torch", tokens=6)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens= .*or document_ids="):
        lay(x)
    with pytest.raises(ValueError, match="not both"):
        lay(x, cu_seqlens=cu, document_ids=torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="rise from 0"):
        lay(x, cu_seqlens=torch.tensor([0, 4, 3, 6]))
    with pytest.raises(ValueError, match="rise from 0 to the row's 6"):
        lay(x, cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(TypeError, match="integer tensor"):
        lay(x, cu_seqlens=torch.tensor([0.0, 6.0]))
    with pytest.raises(ValueError, match="must not decrease"):
        lay(x, document_ids=torch.tensor([0, 0, 1, 0, 1, 1]))
    with pytest.raises(ValueError, match="lengths must lie in 0 .. 6"):
        lay(x, cu_seqlens=cu, lengths=7)
    with pytest.raises(ValueError, match="prefix= given"):
        lay(x, cu_seqlens=cu, prefix=2)
    plain, pmodule = compiled(tmp_path_factory, "causal")
    lay2, x2 = _layer(plain, pmodule, "torch", tokens=6)
    with pytest.raises(ValueError, match="read no documents"):
        lay2(x2, cu_seqlens=cu)
    pre, prmodule = compiled(tmp_path_factory, "prefix_lm")
    lay3, x3 = _layer(pre, prmodule, "torch", tokens=6)
    with pytest.raises(ValueError, match="give prefix="):
        lay3(x3)


def test_notation_errors(tmp_path):
    bad = {
        "window(2) | (j < prefix())": "not one interval",
        "(j <= i) & window(2)": "same_document",
        "(j <= i) | (j <= i)": "j < prefix",
        "(j <= i) | (i < prefix())": "j < prefix",
    }
    for spelled, message in bad.items():
        path = tmp_path / "bad.py"
        path.write_text(HEADER + f"E = logsumexp(s, over={spelled}).sum(H)\nlayer('bad', E)\n")
        with pytest.raises(Exception, match=message) as info:
            compile_file(load(str(path)))
        assert "bad.py:6" in str(info.value), str(info.value)


def test_positions_with_documents_are_refused(tmp_path):
    path = tmp_path / "pos.py"
    path.write_text(HEADER + "E = -logsumexp(log(position(i) + 1) * s, "
                    "over=(j <= i) & same_document()).sum(H)\nlayer('pos', E)\n")
    with pytest.raises(Exception, match="position\\(\\) with a set that reads documents") as info:
        compile_file(load(str(path)))
    assert "pos.py:6" in str(info.value), str(info.value)


DECODERS = ["doc_causal", "doc_window", "doc_strict", "doc_softcap", "doc_sigmoid", "doc_running"]


@pytest.mark.parametrize("name", DECODERS)
def test_decode_across_documents_equals_the_forward(tmp_path_factory, name):
    layer, module = compiled(tmp_path_factory, name)
    lay, x = _layer(layer, module, "torch", tokens=12, batch=2, seed=3)
    ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 2, 3, 3, 3], [5, 5, 5, 5, 5, 6, 6, 6, 6, 6, 7, 7]])
    with torch.no_grad():
        want = lay(x, document_ids=ids)
        got, cache = [], None
        for a, b in [(0, 5), (5, 6), (6, 10), (10, 12)]:  # boundaries inside and at chunk ends
            y, cache = lay.decode(x[:, a:b], cache, document_ids=ids[:, a:b])
            got.append(y)
    _close(f"{name} decode across documents", torch.cat(got, 1), want)


@pytest.mark.parametrize("name", ["causal", "doc_causal", "doc_window", "doc_softcap",
                                  "doc_running"])
def test_decode_ragged_rows_equals_each_row_alone(tmp_path_factory, name):
    layer, module = compiled(tmp_path_factory, name)
    lay, x = _layer(layer, module, "torch", tokens=10, batch=3, seed=4)
    prompts = [5, 2, 7]  # each row's prompt, padded on the left to 7; then 3 tokens each
    pad = [7 - n for n in prompts]
    ids = torch.zeros(3, 10, dtype=torch.long)  # one document per row
    data = {"document_ids": ids} if name.startswith("doc_") else {}
    with torch.no_grad():
        out, cache = lay.decode(x[:, :7], None, left_padding=torch.tensor(pad),
                                **{k: v[:, :7] for k, v in data.items()})
        outs = [out]
        for t in range(7, 10):
            y, cache = lay.decode(x[:, t:t + 1], cache, **{k: v[:, t:t + 1] for k, v in data.items()})
            outs.append(y)
        got = torch.cat(outs, 1)
        for b in range(3):
            alone = lay(x[b:b + 1, pad[b]:], **{k: v[b:b + 1, pad[b]:] for k, v in data.items()})
            _close(f"{name} row {b} decoded with the others", got[b:b + 1, pad[b]:], alone)
            _close(f"{name} row {b} padding unchanged", got[b, :pad[b]], x[b, :pad[b]])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["causal", "everything", "pairs_all", "doc_causal",
                                  "doc_softcap", "doc_running", "prefix_lm"])
def test_padding_through_the_kernels_rows_equals_the_rows_by_length(tmp_path_factory, name,
                                                                    backend):
    """A padded batch runs its rows of each length on their real tokens alone (``forward``);
    the same call through the kernels' per-row bounds (the step loop on the whole padded batch
    with the call's lengths: what autocast and compiled calls run) gives the same outputs and
    gradients."""
    from energyc.runtime.layer import LayerFunction
    from energyc.runtime.rows import call_data
    from energyc.runtime.steps import apply_layer

    layer, module = compiled(tmp_path_factory, name)
    lay, x = _layer(layer, module, backend, tokens=9, batch=3, seed=5)
    data = {"lengths": torch.tensor([9, 4, 6])}
    if name.startswith("doc_"):
        data["document_ids"] = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2], [0, 1, 1, 1, 1, 1, 1, 1, 1],
                                             [0, 0, 0, 0, 0, 0, 1, 1, 1]])
    if name.startswith("prefix"):
        data["prefix"] = torch.tensor([3, 7, 2])
    w = torch.randn_like(x)
    y, grads = _run(lay, x, w, **data)
    call = call_data(x, lay._declared.context_data, **data)
    xr = x.detach().clone().requires_grad_(True)
    yr = apply_layer(LayerFunction, lay._config, call, "x", xr, x.shape[-1], lay._params(),
                     lay._hypers, (lay.P_diag, lay.P_lowrank))
    want = torch.autograd.grad((yr * w).sum(), [xr, *lay.parameters()])
    _close(f"{name} output", y, yr.detach())
    for (pname, _), a, b in zip([("x", None), *lay.named_parameters()], grads, want):
        _close(f"{name} d{pname}", a, b)


def test_padding_under_autocast_runs_through_the_rows(tmp_path_factory):
    """Under torch.autocast a padded call runs the whole batch through the per-row bounds (the
    output in the autocast dtype): real rows as each row alone under autocast, padding unchanged
    (this once failed: the rows by length were written into a float32 output)."""
    layer, module = compiled(tmp_path_factory, "doc_causal")
    lay, x = _layer(layer, module, "torch", tokens=8, batch=2, seed=6)
    lay = lay.float()
    x = x.float()
    ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1, 1]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lay(x, document_ids=ids, lengths=torch.tensor([8, 5]))
        alone = lay(x[1:, :5], document_ids=ids[1:, :5])
    assert y.dtype == torch.bfloat16
    assert torch.equal(y[1, 5:], x[1, 5:].to(torch.bfloat16))
    assert_within_tolerance("autocast row 1", y[1:, :5].float(), alone.double(), torch.bfloat16)
