"""Property checks of a compiled layer against torch.autograd (shared by tests and `energyc check`).

For drawn dims, batch, tokens, values, hyperparameters and layer settings (float64):

* ``forward``: the layer equals ``x - eta P grad E`` (steps times), grad E by torch.autograd on
  the independent evaluation of E in :mod:`energyc.reference`;
* ``backward``: the generated backward equals torch.autograd double backward, for x and every
  parameter (learned hyperparameters and preconditioner parameters included);
* ``causal``: for conditional energies whose context sets only look back, perturbing tokens after
  t leaves outputs up to t unchanged;
* ``descent``: a small step lowers each token's conditional energy (the total, for joint ones);
* ``energy``: ``layer.energy(x, xbar)`` per token equals E of the reference, and autograd
  differentiates it twice: its gradients to x, xbar and every parameter (``create_graph=True``),
  and the gradients of their weighted sum again, equal autograd's on the reference (users
  differentiate energies: to monitor descent, regularise, or write their own dynamics).

A neuron model (``neurons``) runs the same five checks on its states (``NEURON_CHECK_FUNCTIONS``):
its dynamics and their backward against autograd through the unrolled steps
(:func:`energyc.reference.reference_neurons`), clamped layers drawn; causality of every layer's
outputs; descent of the total energy (E, plus the Legendre terms for "legendre" dynamics) for a
small step with the identity preconditioner, which holds because each Lagrangian's Hessian is
positive semi-definite; and the total energy with its first and second derivatives.

Each case also draws the call's context data (``energyc.runtime.rows``): document boundaries
(as ``cu_seqlens`` or per-row ``document_ids``) and prefix lengths for energies whose sets read
them, and, for every layer, sometimes each row's length (padding). The reference builds its
masks from the sets' textbook definitions with the same data.
"""

from __future__ import annotations

import atexit
import importlib
import importlib.util
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from types import ModuleType

import torch
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from energyc.compiler import CompiledLayer, compile_file
from energyc.context import Context
from energyc.loader import load
from energyc.reference import (
    evaluate_energy,
    module_values,
    reference_neurons,
    reference_step,
    reference_total_energy,
)
from energyc.render import render_files, write_package
from energyc.runtime.rows import call_data, calling
from energyc.settings import CONTEXTS, PRECONDITIONERS
from energyc.tolerances import tolerance

CHECKS = ("forward", "backward", "causal", "descent", "energy")


def import_generated(layer: CompiledLayer, outdir: str | None = None) -> ModuleType:
    """Render ``layer`` into a fresh directory and import it under a private name.

    Without ``outdir`` the directory is a temporary one, removed when the process exits (the
    module stays imported; its source is only read at import)."""
    if outdir is None:
        outdir = tempfile.mkdtemp(prefix="energyc-check-")
        atexit.register(shutil.rmtree, outdir, ignore_errors=True)
    path = write_package(render_files(layer, layer.file.path), outdir, layer.name)
    name = f"_energyc_check_{layer.name}_{abs(hash(outdir))}"
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(path, "__init__.py"), submodule_search_locations=[path]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _contexts(layer: CompiledLayer) -> set[Context]:
    g = layer.energy
    return {g.node(n).attr("mask") for n in g.live() if g.node(n).attr("mask") is not None}


def context_sets(layer: CompiledLayer) -> set[str]:
    """The kinds of the energy's context sets (``Context.name``: "causal", "window", ...)."""
    return {ctx.name for ctx in _contexts(layer)}


def is_causal(layer: CompiledLayer) -> bool:
    return not layer.decl.joint and all(ctx.looks_back for ctx in _contexts(layer))


@dataclass
class Case:
    """One drawn configuration."""

    dims: dict[str, int]
    batch: int
    tokens: int
    seed: int
    scale: float
    hypers: dict[str, float]
    eta: float
    steps: int
    precond: str
    context: str
    data: dict = field(default_factory=dict)  # the call's context data keywords
    memory_tokens: int = 0  # a memory's tokens, for a layer that reads one
    clamp: tuple[str, ...] = ()  # a neuron model's layers held fixed (by name)


def _draw_data(draw_fn, reads: set[str], batch: int, tokens: int) -> dict:
    """The call's context data for ``batch`` rows of ``tokens``: documents and prefixes where
    ``reads`` says the sets read them, lengths (padding) for any layer, a third of the time."""
    data: dict = {}
    if "same_document" in reads:
        cuts = sorted(draw_fn(st.sets(st.integers(1, max(tokens - 1, 1)), max_size=3)))
        cuts = [c for c in cuts if c < tokens]
        if draw_fn(st.booleans()):
            data["cu_seqlens"] = torch.tensor([0, *cuts, tokens], dtype=torch.int32)
        else:  # per row: each row its own boundaries
            rows = []
            for _ in range(batch):
                row_cuts = sorted(draw_fn(st.sets(st.integers(1, max(tokens - 1, 1)),
                                                  max_size=3)))
                ids = torch.zeros(tokens, dtype=torch.long)
                for c in row_cuts:
                    ids[c:] += 1
                rows.append(ids)
            data["document_ids"] = torch.stack(rows)
    if "prefix" in reads:
        data["prefix"] = torch.tensor(draw_fn(st.lists(st.integers(0, tokens), min_size=batch,
                                                       max_size=batch)))
    if draw_fn(st.integers(0, 2)) == 0:
        data["lengths"] = torch.tensor(draw_fn(st.lists(st.integers(0, tokens), min_size=batch,
                                                        max_size=batch)))
    return data


def cases(layer: CompiledLayer, max_dim: int = 5, max_tokens: int = 6):
    """Hypothesis strategy of :class:`Case` for ``layer``."""
    dim_names = list(layer.dims)
    reads = set(layer.context_data)
    hyper_defaults = {}
    for h in layer.hypers:
        hyper_defaults[h.name] = h.default

    @st.composite
    def draw(draw_fn):
        dims = {d: (2 * draw_fn(st.integers(1, max_dim // 2)) if d in layer.even_dims
                    else draw_fn(st.integers(1, max_dim))) for d in dim_names}
        hypers = {}
        for name, default in hyper_defaults.items():
            if default is None:
                base = 1.0
            else:
                base = float(default.subs({s: dims[s.name] for s in default.free_symbols}))
            factor = draw_fn(st.floats(0.5, 2.0))
            hypers[name] = base * factor if base != 0 else factor - 1.0
        batch, tokens = draw_fn(st.integers(1, 3)), draw_fn(st.integers(1, max_tokens))
        several = len(layer.decl.neurons) > 1
        names = [n.public for n in layer.decl.neurons]
        clamp = tuple(n for n in names if draw_fn(st.integers(0, 2)) == 0) if several else ()
        if len(clamp) == len(names):
            clamp = clamp[1:]  # at least one layer moves
        return Case(
            dims=dims,
            batch=batch,
            tokens=tokens,
            seed=draw_fn(st.integers(0, 2**31 - 1)),
            scale=draw_fn(st.floats(0.3, 1.5)),
            hypers=hypers,
            eta=draw_fn(st.floats(0.05, 1.0)),
            steps=draw_fn(st.integers(1, 2)) if layer.decl.steps == 1 else layer.decl.steps,
            # several neuron layers step with eta / tau each, no preconditioner
            precond="identity" if several else draw_fn(st.sampled_from(PRECONDITIONERS)),
            context=draw_fn(st.sampled_from(CONTEXTS)),
            data=_draw_data(draw_fn, reads, batch, tokens),
            memory_tokens=draw_fn(st.integers(1, max_tokens + 2)) if layer.memory else 0,
            clamp=clamp,
        )

    return draw()


def build(layer: CompiledLayer, module: ModuleType, case: Case, dtype=torch.float64):
    torch.manual_seed(case.seed)
    keyword = layer.file.attribute  # the Layer's keyword for a dim or hyperparameter
    kwargs = {keyword(d): n for d, n in case.dims.items()}
    kwargs.update({keyword(h): v for h, v in case.hypers.items()})
    state_dim = layer.state_dim
    lay = module.Layer(**kwargs, eta=case.eta, steps=case.steps, precond=case.precond,
                       precond_rank=2, context=case.context, dtype=dtype)
    with torch.no_grad():
        for p in lay.parameters():
            p.add_(0.1 * torch.randn_like(p))  # break symmetric inits (P starts at identity)
    x = case.scale * torch.randn(case.batch, case.tokens, case.dims[state_dim], dtype=dtype)
    return lay, x


def build_neurons(layer: CompiledLayer, module: ModuleType, case: Case, dtype=torch.float64):
    """A neuron model's layer and drawn states, one (batch, tokens, D_l) per neuron layer."""
    lay, x = build(layer, module, case, dtype)
    xs = [x] + [case.scale * torch.randn(case.batch, case.tokens, case.dims[dim], dtype=dtype)
                for _, dim in layer.states[1:]]
    return lay, xs


def memory_of(layer: CompiledLayer, case: Case, dtype=torch.float64) -> torch.Tensor | None:
    """The drawn memory (batch, memory_tokens, Dm) of a layer that reads one (else None)."""
    if not layer.memory:
        return None
    gen = torch.Generator().manual_seed(case.seed + 1)
    return case.scale * torch.randn(case.batch, case.memory_tokens,
                                    case.dims[layer.context_dim], dtype=dtype, generator=gen)


def _memory(c: torch.Tensor | None) -> dict:
    """The layer call's keywords for memory ``c`` (none without one)."""
    return {} if c is None else {"memory": c}


class ReferenceNotFiniteError(Exception):
    """The reference evaluation overflowed (NaN or infinity) for a drawn case, e.g. an exp of a
    state a divergent step made large: nothing there to compare with, so the case is rejected
    rather than counted (the layer's own non-finite values against a finite reference still
    fail)."""


def _close(name: str, actual: torch.Tensor, expected: torch.Tensor) -> float:
    if not bool(torch.isfinite(expected).all()):
        raise ReferenceNotFiniteError(name)
    rtol, atol = tolerance(expected.dtype)
    err = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    if not bool((err <= bound).all()):
        worst = float((err - bound).max())
        raise AssertionError(f"{name}: max abs error {float(err.max()):.3e} exceeds the float "
                             f"tolerance (rtol={rtol}, atol={atol}) by {worst:.3e}")
    return float(err.max()) if err.numel() else 0.0


def check_forward(layer: CompiledLayer, module: ModuleType, case: Case) -> float:
    lay, x = build(layer, module, case)
    c = memory_of(layer, case)
    with torch.no_grad():
        y = lay(x, **_memory(c), **case.data)
    expected = reference_step(layer, lay, x, create_graph=False, memory=c, **case.data).detach()
    return _close("forward", y, expected)


def check_backward(layer: CompiledLayer, module: ModuleType, case: Case) -> float:
    lay, x = build(layer, module, case)
    x = x.requires_grad_(True)
    c = memory_of(layer, case)
    memory = [] if c is None else [c.requires_grad_(True)]
    params = [x, *memory] + [p for p in lay.parameters()]
    names = ["x", *["memory"] * len(memory)] + [n for n, _ in lay.named_parameters()]
    w = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(case.seed))
    got = torch.autograd.grad((lay(x, **_memory(c), **case.data) * w).sum(), params,
                              allow_unused=True)
    expected = torch.autograd.grad(
        (reference_step(layer, lay, x, create_graph=True, memory=c, **case.data) * w).sum(),
        params,
        allow_unused=True)
    worst = 0.0
    for name, a, b in zip(names, got, expected):
        if b is None:
            b = torch.zeros_like(a) if a is not None else None
        if a is None:
            a = torch.zeros_like(b)
        if b is None:
            continue
        worst = max(worst, _close(f"backward d/d{name}", a, b))
    return worst


def check_causal(layer: CompiledLayer, module: ModuleType, case: Case) -> float:
    if not is_causal(layer) or case.tokens < 2:
        return 0.0
    lay, x = build(layer, module, case)
    t = case.seed % (case.tokens - 1)
    x2 = x.clone()
    x2[:, t + 1:] += torch.randn_like(x2[:, t + 1:])
    with torch.no_grad():
        y1, y2 = lay(x, **case.data), lay(x2, **case.data)
    return _close(f"causal (tokens <= {t})", y2[:, : t + 1], y1[:, : t + 1])


def check_descent(layer: CompiledLayer, module: ModuleType, case: Case) -> float:
    lay, x = build(layer, module, case)
    lay.config = (1.0, 1, case.precond, "current", lay.config[4])
    c = memory_of(layer, case)
    with torch.no_grad():
        g = lay(x, **_memory(c), **case.data) - x  # = -P grad E at eta = 1
        step = 1e-4 / (1.0 + float(g.abs().max()))
        y = x + step * g
        if layer.decl.joint:
            before, after = lay.energy(x, **case.data), lay.energy(y, **case.data)
            scale_ok = g.abs().amax(dim=(1, 2)) < 1e-12  # a stationary state cannot descend
        else:  # the context held fixed: x's tokens, or the memory
            before = lay.energy(x, x, per_token=True, **case.data) if c is None else \
                lay.energy(x, per_token=True, memory=c, **case.data)
            after = lay.energy(y, x, per_token=True, **case.data) if c is None else \
                lay.energy(y, per_token=True, memory=c, **case.data)
            scale_ok = g.abs().amax(dim=2) < 1e-12  # a stationary token cannot descend
        drop = before - after
        # A change within the rounding of the energies is no rise: a flat energy (or a gradient
        # too small to move E by one ulp) leaves E as it was, give or take a few ulps of |E|.
        resolution = 16 * torch.finfo(before.dtype).eps * (before.abs() + after.abs())
        ok = drop >= -resolution
    bad = ~(ok | scale_ok)
    if bool(bad.any()):
        raise AssertionError(f"descent: a step of size {step:.2e} raised the energy of "
                             f"{int(bad.sum())} token(s) (max rise {float((-drop).max()):.3e})")
    return float(drop.min())


def _energy_derivatives(energy, leaves: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """E (B, T) of ``energy(*leaves)``, its gradients to the leaves and the gradients of their
    sum weighted by drawn tensors, to the same leaves: what autograd's first and second order
    give."""
    gen = torch.Generator().manual_seed(seed)
    e = energy(*leaves)
    w = torch.randn(e.shape, dtype=e.dtype, generator=gen)
    # an energy of no leaf (e.g. j < i on one token: an empty set, E = 0) has zero derivatives
    first = (torch.autograd.grad((e * w).sum(), leaves, create_graph=True, allow_unused=True)
             if e.requires_grad else [None] * len(leaves))
    first = [torch.zeros_like(v) if g is None else g for v, g in zip(leaves, first)]
    total = sum((g * torch.randn(g.shape, dtype=g.dtype, generator=gen)).sum() for g in first)
    second = torch.autograd.grad(total, leaves, allow_unused=True) if total.requires_grad \
        else [None] * len(leaves)
    second = [torch.zeros_like(v) if g is None else g for v, g in zip(leaves, second)]
    return [e, *first, *second]


def check_energy(layer: CompiledLayer, module: ModuleType, case: Case) -> float:
    lay, x = build(layer, module, case)
    xbar = memory_of(layer, case)  # a memory is the context; else another state's tokens
    if xbar is None:
        gen = torch.Generator().manual_seed(case.seed)
        xbar = case.scale * torch.randn(x.shape, dtype=x.dtype, generator=gen)
    x, xbar = x.requires_grad_(True), xbar.requires_grad_(True)
    params, hypers = module_values(layer, lay)
    learned = {h: v for h, v in hypers.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    leaves = [*params.values(), *learned.values()]
    if layer.memory:
        def energy(a, b):
            return lay.energy(a, memory=b, per_token=True, **case.data)
    else:
        def energy(a, b):
            return lay.energy(a, b, per_token=True, **case.data)
    got = _energy_derivatives(lambda a, b, *_: energy(a, b), [x, xbar, *leaves], case.seed)
    call = call_data(x, None, memory=xbar if layer.memory else None, **case.data)
    valid = 1.0 if call is None or call.valid is None else call.valid[:, :, 0].to(x.dtype)

    def reference(a, b):
        with calling(call):
            return evaluate_energy(layer, a, b, params, hypers) * valid

    want = _energy_derivatives(lambda a, b, *_: reference(a, b), [x, xbar, *leaves],
                               case.seed)
    names = ["x", "xbar", *params, *learned]
    labels = ["E"] + [f"dE/d{n}" for n in names] + [f"d(dE . w)/d{n}" for n in names]
    return max(_close(f"energy {k}", a.detach(), b.detach()) for k, a, b in zip(labels, got, want))


def check_neuron_forward(layer: CompiledLayer, module: ModuleType, case: Case) -> float:
    """A neuron model's states after its dynamics equal :func:`reference_neurons`'s."""
    lay, xs = build_neurons(layer, module, case)
    with torch.no_grad():
        ys = _as_list(lay(*xs, clamp=case.clamp, **case.data))
    want = reference_neurons(layer, lay, xs, False, clamp=case.clamp, **case.data)
    return max(_close(f"forward {n.public}", y, w.detach())
               for n, y, w in zip(layer.decl.neurons, ys, want))


def check_neuron_backward(layer: CompiledLayer, module: ModuleType, case: Case) -> float:
    """The backward through the dynamics equals autograd's through the reference's unrolled
    steps, for every state and parameter."""
    lay, xs = build_neurons(layer, module, case)
    xs = [x.requires_grad_(True) for x in xs]
    leaves = [*xs, *lay.parameters()]
    names = [n.public for n in layer.decl.neurons] + [n for n, _ in lay.named_parameters()]
    gen = torch.Generator().manual_seed(case.seed)
    ws = [torch.randn(x.shape, dtype=x.dtype, generator=gen) for x in xs]
    ys = _as_list(lay(*xs, clamp=case.clamp, **case.data))
    got = torch.autograd.grad(sum((y * w).sum() for y, w in zip(ys, ws)), leaves,
                              allow_unused=True)
    want_ys = reference_neurons(layer, lay, xs, True, clamp=case.clamp, **case.data)
    want = torch.autograd.grad(sum((y * w).sum() for y, w in zip(want_ys, ws)), leaves,
                               allow_unused=True)
    worst = 0.0
    for name, a, b, v in zip(names, got, want, leaves):
        a = torch.zeros_like(v) if a is None else a
        b = torch.zeros_like(v) if b is None else b
        worst = max(worst, _close(f"backward d/d{name}", a, b))
    return worst


def check_neuron_descent(layer: CompiledLayer, module: ModuleType, case: Case) -> float:
    """A small step of the dynamics lowers the total energy (E(g), plus the Legendre terms for
    "legendre" dynamics): dTotal = -s u^T J u <= 0 where every Lagrangian's Hessian J is positive
    semi-definite. Taken with the identity preconditioner (J P need not be semi-definite) and the
    context held at the states' activations (per token for a conditional energy)."""
    lay, xs = build_neurons(layer, module, case)
    eta, _, _, _, backend = lay.config
    lay.config = (1.0, 1, "identity", "current", backend)
    lay.tau = dict.fromkeys(lay.tau, 1.0)
    per_token = not layer.decl.joint
    with torch.no_grad():
        ys = _as_list(lay(*xs, clamp=case.clamp, **case.data))
        us = [y - x for x, y in zip(xs, ys)]  # = -u at eta = 1
        step = 1e-4 / (1.0 + max(float(u.abs().max()) for u in us))
        new = [x + step * u for x, u in zip(xs, us)]
        before = lay.energy(*xs, per_token=per_token, xbar=xs[0], **case.data)
        after = lay.energy(*new, per_token=per_token, xbar=xs[0], **case.data)
        moving = sum(u.abs().amax(dim=-1) for u in us)
        scale_ok = (moving < 1e-12) if per_token else (moving.amax(dim=1) < 1e-12)
        drop = before - after
        # as in check_descent: a change within the rounding of the energies is no rise
        resolution = 16 * torch.finfo(before.dtype).eps * (before.abs() + after.abs())
        ok = drop >= -resolution
    bad = ~(ok | scale_ok)
    if bool(bad.any()):
        raise AssertionError(f"descent: a step of size {step:.2e} raised the total energy "
                             f"(max rise {float((-drop).max()):.3e})")
    return float(drop.min())


def check_neuron_energy(layer: CompiledLayer, module: ModuleType, case: Case) -> float:
    """``layer.energy(*states)`` per token (the total the dynamics descend) equals the
    reference's, and autograd differentiates it twice alike, to every state and parameter."""
    lay, xs = build_neurons(layer, module, case)
    xs = [x.requires_grad_(True) for x in xs]
    params, hypers = module_values(layer, lay)
    learned = {h: v for h, v in hypers.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    leaves = [*xs, *params.values(), *learned.values()]
    n = len(xs)
    got = _energy_derivatives(lambda *a: lay.energy(*a[:n], per_token=True, **case.data),
                              leaves, case.seed)
    want = _energy_derivatives(
        lambda *a: reference_total_energy(layer, lay, list(a[:n]), **case.data), leaves, case.seed)
    names = [m.public for m in layer.decl.neurons] + [*params, *learned]
    labels = ["E"] + [f"dE/d{m}" for m in names] + [f"d(dE . w)/d{m}" for m in names]
    return max(_close(f"energy {k}", a.detach(), b.detach()) for k, a, b in zip(labels, got, want))


def check_neuron_causal(layer: CompiledLayer, module: ModuleType, case: Case) -> float:
    """:func:`check_causal` for a neuron model: perturbing every layer's tokens after t leaves
    every layer's outputs up to t unchanged."""
    if case.tokens < 2:
        return 0.0
    lay, xs = build_neurons(layer, module, case)
    t = case.seed % (case.tokens - 1)
    moved = [x.clone() for x in xs]
    for x in moved:
        x[:, t + 1:] += torch.randn_like(x[:, t + 1:])
    with torch.no_grad():
        y1 = _as_list(lay(*xs, clamp=case.clamp, **case.data))
        y2 = _as_list(lay(*moved, clamp=case.clamp, **case.data))
    return max(_close(f"causal {n.public} (tokens <= {t})", b[:, :t + 1], a[:, :t + 1])
               for n, a, b in zip(layer.decl.neurons, y1, y2))


def _as_list(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, tuple) else [out]


CHECK_FUNCTIONS = {"forward": check_forward, "backward": check_backward,
                   "causal": check_causal, "descent": check_descent, "energy": check_energy}
#: a neuron model's checks (its states, its dynamics, its total energy)
NEURON_CHECK_FUNCTIONS = {"forward": check_neuron_forward, "backward": check_neuron_backward,
                          "causal": check_neuron_causal, "descent": check_neuron_descent,
                          "energy": check_neuron_energy}


@dataclass
class Result:
    layer: str
    check: str
    examples: int = 0
    worst: float = 0.0
    error: str = ""
    skipped: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def status(self) -> str:
        if self.error:
            return "FAIL"
        return "skip" if self.skipped else "ok"


def run_check(layer: CompiledLayer, module: ModuleType, check: str, max_examples: int,
              derandomize: bool = True) -> Result:
    result = Result(layer.name, check)
    if check == "causal" and not is_causal(layer):
        result.skipped = "not causal" if not layer.decl.joint else "joint energy"
        return result
    fn = (NEURON_CHECK_FUNCTIONS if layer.neurons else CHECK_FUNCTIONS)[check]

    @settings(max_examples=max_examples, deadline=None, derandomize=derandomize, database=None,
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(cases(layer))
    def prop(case: Case) -> None:
        with torch.random.fork_rng():
            try:
                err = fn(layer, module, case)
            except ReferenceNotFiniteError:
                reject()
            except Exception:
                result.extra["case"] = case
                raise
        result.examples += 1
        if check != "descent":
            result.worst = max(result.worst, err)

    try:
        prop()
    except AssertionError as exc:
        result.error = str(exc).splitlines()[0]
        if "case" in result.extra:
            result.error += f" [smallest failing case: {result.extra['case']}]"
    except Exception as exc:  # an error inside the layer or the reference: report, don't crash
        result.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return result


def check_file(path: str, thorough: bool = False, log=print) -> list[Result]:
    """Run every check on every layer of the energy file; return the results."""
    layers = compile_file(load(path))
    n = 100 if thorough else 12
    results = []
    with tempfile.TemporaryDirectory(prefix="energyc-check-") as tmp:
        for layer in layers:
            module = import_generated(layer, tmp)
            for check in CHECKS:
                log(f"  {layer.name}: {check} ...")
                results.append(run_check(layer, module, check, n, derandomize=not thorough))
    return results


def format_results(results: list[Result]) -> str:
    rows = [("layer", "check", "examples", "max abs err", "status")]
    for r in results:
        worst = "" if r.check == "descent" or r.skipped else f"{r.worst:.2e}"
        status = r.status + (f" ({r.skipped})" if r.skipped else "") + (
            f": {r.error}" if r.error else "")
        rows.append((r.layer, r.check, str(r.examples), worst, status))
    widths = [max(len(row[k]) for row in rows) for k in range(4)]
    lines = []
    for k, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4])
        if k == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 6)
    passed = sum(r.status == "ok" for r in results)
    failed = sum(r.status == "FAIL" for r in results)
    skipped = sum(r.status == "skip" for r in results)
    lines.append(f"{passed} passed, {failed} failed, {skipped} skipped")
    return "\n".join(lines)

