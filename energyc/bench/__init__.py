"""``energyc bench``: generated layers against autograd of their energy: time, memory, accuracy.

For every layer of an energy file and every token count T, these variants run with the same
weights, input x (batch, T, D) and loss weights w:

* **generated**: ``y = Layer(x)``, the compiled descent step with its derived backward;
* **autograd** (the baseline of every speed and memory figure): ``y = x - eta P grad_x E(x | xbar)``
  with E the energy in plain PyTorch as a user writes it, the generated package's
  ``Layer.energy`` (its ``_energy``: einsum contractions, masked log-sum-exps, and where the
  compiler made a context reduction a pair reduction, the same reduction over blocks of keys), and
  ``grad_x E`` by ``torch.autograd.grad(..., create_graph=True)`` on a separate state tensor
  (:func:`energyc.reference.autograd_step`: the steps, the context "current" or "input", the
  preconditioner of :func:`energyc.reference.precondition`), so its backward is autograd's double
  backward;
* **interpreter** (with ``interpreter=True``, ``--interpreter``; not the baseline): the same step
  with E evaluated by the independent interpreter :mod:`energyc.reference`
  (:func:`energyc.reference.reference_step`, the reference of ``energyc check``), node by node
  over the declared energy graph, every reduction materialised.

One call is forward plus backward of ``L = sum(y * w)`` to x and every parameter
(``torch.autograd.grad``). Measured per layer and T:

* time: warm-up calls, then ``repeats`` calls interleaved A, B, A, B, ...; the median of each;
  ``speed-up = median(autograd) / median(generated)`` (> 1: the generated layer is faster);
* peak memory of one call: on CUDA ``torch.cuda.max_memory_allocated`` (reset before each variant;
  the base is ``memory_allocated`` before the call); on CPU the peak RSS (VmHWM) of a fresh process
  per variant and size, forked from a probe server that has imported torch and compiled the file but
  run no layer; the base is that process's RSS just before the call (weights and inputs built), and
  the peak counter is reset there (``/proc/self/clear_refs``), so the peak is the call's own;
  ``memory ratio = (peak - base)(autograd) / (peak - base)(generated)``;
* error against the truth: the truth is y and every gradient computed in float64 from the same
  rounded weights, hyperparameters and inputs (the variant's dtype rounded, then widened) by the
  interpreter, or, where that cannot run within the budgets, by autograd through ``Layer.energy``
  (``truth`` says which). A variant's error is the worst over y and the gradients t of
  ``max|t - t64| / max|t64|`` (each tensor's largest error relative to its largest magnitude;
  the absolute error where t64 is all zero), from its last warm-up call; the smaller error is the
  more accurate variant. In float64 it measures two evaluation orders against each other;
* agreement: y and every gradient of generated and autograd within the dtype's tolerance
  (:mod:`energyc.tolerances`, ``|a - b| <= atol + rtol |b|`` elementwise), and the generated layer
  recomputed in float64 from the same rounded values within the float64 tolerance of the truth:
  ``ok`` both, ``ok in float64`` the second only (a difference of rounding in the lower
  precision; the table says so in words, naming the worst tensor of the first comparison:
  "ok: float32 beyond tolerance by rounding (d/dW: 1.9x tol), float64 agrees"), ``MISMATCH`` not
  the second (reported on stderr, exit status 1); in a float64 run
  a difference of generated and autograd beyond the tolerance is a MISMATCH too.

A variant that runs out of memory (on CPU: beyond ``max_memory_mib`` of address space over its base,
enforced with RLIMIT_AS in the probe process) or whose call takes longer than ``max_seconds`` is
shown as such and not timed further; on CPU the truth is computed in such a probe process too.
The probe processes (fork server, RLIMIT_AS, alarms) are :mod:`energyc.bench.isolation`.
"""

from __future__ import annotations

import datetime
import inspect
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from types import ModuleType

import torch

from energyc.bench.isolation import ProbeServer, available_memory_mib
from energyc.compiler import CompiledLayer
from energyc.errors import EnergyError
from energyc.tolerances import tolerance

VARIANTS = ("generated", "autograd", "interpreter")  # the last only with --interpreter
BASELINE = "autograd"  # the variant every speed-up and memory ratio is against
TRUTH_SOURCES = ("interpreter", "autograd")  # the float64 truth: the first that runs
ACCURACY_RATIO = 2.0  # a row whose generated error is over this times autograd's is pointed out
# what the variants, the ratios and the errors are: the table's legend and the JSON's
DEFINITIONS = {
    "generated": "the generated Layer: its compiled descent step and derived backward",
    "autograd": "the baseline: y = x - eta P grad_x E by torch.autograd.grad(create_graph=True) "
                "through the energy in plain PyTorch, the generated package's Layer.energy "
                "(einsum contractions, masked log-sum-exps; a pair reduction over blocks of keys); "
                "for a neuron model, autograd through the unrolled dynamics, each step's "
                "activations by autograd of the package's _lagrangians and dE/dg of its _energy "
                "(its states side by side in x)",
    "interpreter": "the same by autograd through energyc.reference's interpreter of the energy "
                   "graph (every reduction materialised; timed with --interpreter, not the "
                   "baseline)",
    "speedup": "autograd ms / generated ms (> 1: the generated layer is faster)",
    "memory_ratio": "autograd / generated of the peak memory increments",
    "error": "against the truth, y and every gradient computed in float64 from the same rounded "
             "weights, hyperparameters and inputs by the interpreter (by autograd where the "
             "interpreter cannot run within the budgets): the worst over y and the gradients t of "
             "max|t - t64| / max|t64| (the smaller, the more accurate)",
    "agreement": "ok: generated and autograd agree within the dtype's tolerance (energyc/"
                 "tolerances.py) and the generated layer recomputed in float64 agrees with the "
                 "float64 truth; 'ok: float32 beyond tolerance by rounding (T: N x tol), float64 "
                 "agrees': in the run's dtype generated and autograd differ, worst in the output "
                 "or gradient T by N times the tolerance, but in float64 the generated layer "
                 "agrees with the truth, so the difference is rounding, not a wrong formula; "
                 "MISMATCH (T: N x tol): the generated layer in float64 differs from the truth "
                 "(exit status 1)",
}
# the sizes of the usual dim names, where neither --dim nor the energy gives one; a dim that none of
# them gives is refused (a blanket size would make e.g. 32 x 32 heads of a grouped-query energy)
DEFAULT_DIMS = {"D": 128, "H": 4, "K": 32, "M": 512}
DEFAULT_TOKENS = (256, 1024)
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
MIB = 1024.0 * 1024.0

Log = Callable[[str], None]


@dataclass
class BenchOptions:
    """What to run: sizes, dtype, device, repetitions and budgets."""

    tokens: tuple[int, ...] = DEFAULT_TOKENS
    batch: int = 2
    dtype: str = "float32"
    device: str = "cpu"
    backend: str = "auto"
    threads: int = 1
    dims: dict[str, int] = field(default_factory=dict)  # --dim: over every other source
    # the sizes of dims that neither ``dims`` nor the energy's Layer gives (``layer_dims``)
    default_dims: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_DIMS))
    repeats: int = 5
    warmup: int = 1
    max_seconds: float = 60.0
    max_memory_mib: float | None = None  # CPU probes; None: 80% of the memory available at start
    memory: bool = True  # CPU: measure peak RSS in probe processes (they also enforce the budgets)
    interpreter: bool = False  # also time autograd of the interpreter (energyc.reference)
    seed: int = 0

    @property
    def variants(self) -> tuple[str, ...]:
        """The variants this run times."""
        return VARIANTS if self.interpreter else VARIANTS[:2]

    def command(self, files: Sequence[str]) -> str:
        """The ``energyc bench`` command line that runs these options on ``files``."""
        parts = ["energyc bench", *files, "--tokens", *map(str, self.tokens),
                 f"--batch {self.batch} --dtype {self.dtype} --device {self.device}",
                 f"--backend {self.backend} --threads {self.threads}"]
        if self.dims:
            parts += ["--dim", *(f"{k}={v}" for k, v in self.dims.items())]
        parts.append(f"--repeats {self.repeats} --warmup {self.warmup} "
                     f"--max-seconds {self.max_seconds:g}")
        if not self.memory:
            parts.append("--no-memory")
        if self.interpreter:
            parts.append("--interpreter")
        return " ".join(parts)


@dataclass
class VariantResult:
    """One variant at one size: status, times (ms) and peak memory (MiB)."""

    status: str = "ok"  # ok | out of memory | over budget | error: ...
    times_ms: list[float] = field(default_factory=list)
    median_ms: float | None = None
    peak_mib: float | None = None
    base_mib: float | None = None
    memory_source: str = ""
    probe_seconds: float | None = None

    @property
    def increment_mib(self) -> float | None:
        if self.peak_mib is None or self.base_mib is None:
            return None
        return self.peak_mib - self.base_mib


@dataclass
class Row:
    """One layer at one token count."""

    file: str
    layer: str
    tokens: int
    dims: dict[str, int]
    generated: VariantResult
    autograd: VariantResult  # the baseline
    agreement: dict = field(default_factory=dict)
    context_sets: list[str] = field(default_factory=list)  # of its reductions over j; [] per token
    threads: int = 1  # torch's CPU threads for every variant
    interpreter: VariantResult | None = None  # timed with --interpreter only
    # the float64 truth's source and each variant's error against it (see the module docstring)
    errors: dict = field(default_factory=dict)

    def variants(self) -> dict[str, VariantResult]:
        """The variants of this row, by name (the interpreter where it was timed)."""
        return {v: getattr(self, v) for v in VARIANTS if getattr(self, v) is not None}

    def error(self, variant: str) -> float | None:
        """The variant's error against the float64 truth (None: not measured)."""
        e = self.errors.get(variant)
        return e.get("max_rel") if isinstance(e, dict) else None

    @property
    def speedup(self) -> float | None:
        g, a = self.generated.median_ms, self.autograd.median_ms
        return a / g if g and a else None

    @property
    def memory_ratio(self) -> float | None:
        """autograd / generated of the peak increments; None below 1 MiB (too small to compare)
        or when a variant ran out of memory (its peak is where it stopped, not what it needs)."""
        g, a = self.generated.increment_mib, self.autograd.increment_mib
        if g is None or a is None or g < 1.0:
            return None
        if "out of memory" in (self.generated.status, self.autograd.status):
            return None
        return a / g

    def as_dict(self) -> dict:
        out = asdict(self)
        out["speedup"] = self.speedup
        out["memory_ratio"] = self.memory_ratio
        for v, r in self.variants().items():
            out[v]["increment_mib"] = r.increment_mib
        return out


# -- sizes and cases ---------------------------------------------------------------------------------


def declared_dims(module: ModuleType | None) -> dict[str, int]:
    """The dim sizes the generated package's Layer gives itself: its dim keywords (``DIMS`` of
    the package's layer.py, where the Layer is defined) that have an integer default (a size
    declared in the energy file, ``dims("D G R K", G=2, R=2)``)."""
    if module is None:
        return {}
    names = getattr(module, "DIMS", None)
    if names is None:  # the package: its __init__ exports Layer alone
        names = getattr(sys.modules.get(module.Layer.__module__), "DIMS", ())
    params = inspect.signature(module.Layer).parameters
    return {d: p.default for d in names if (p := params.get(d)) is not None
            and isinstance(p.default, int) and not isinstance(p.default, bool)}


def missing_dims(layer: CompiledLayer, opts: BenchOptions,
                 module: ModuleType | None = None) -> list[str]:
    """The dims of ``layer`` that nothing sizes (see :func:`layer_dims`)."""
    given = {**opts.default_dims, **declared_dims(module), **opts.dims}
    return [d for d in layer.dims if d not in given]


def layer_dims(layer: CompiledLayer, opts: BenchOptions,
               module: ModuleType | None = None) -> dict[str, int]:
    """The dims of ``layer``: ``opts.dims`` (``--dim``), else the size the generated Layer
    declares for itself (:func:`declared_dims`), else ``opts.default_dims`` (DEFAULT_DIMS).

    Raises:
        EnergyError: a dim that none of these sizes (naming it and ``--dim``); an odd size of a
            dim whose features pair up.
    """
    missing = missing_dims(layer, opts, module)
    if missing:
        raise EnergyError(_missing_message({layer.name: missing}, opts), "--dim")
    given = {**opts.default_dims, **declared_dims(module), **opts.dims}
    dims = {d: int(given[d]) for d in layer.dims}
    for d in layer.even_dims:
        if dims[d] % 2:
            raise EnergyError(f"dim {d} of layer {layer.name} must be even (its features pair up "
                              f"in a rotary embedding), got {dims[d]}", "--dim")
    return dims


def _missing_message(missing: dict[str, list[str]], opts: BenchOptions) -> str:
    names = list(dict.fromkeys(d for ds in missing.values() for d in ds))
    where = "; ".join(f"layer {k}: {', '.join(ds)}" for k, ds in missing.items())
    table = " ".join(f"{k}={v}" for k, v in opts.default_dims.items()) or "none"
    it = "it" if len(names) == 1 else "them"
    return (f"no size for dim {', '.join(names)} ({where}): the energy's Layer declares no default "
            f"for {it} and energyc bench sizes only {table}; give {it} with --dim "
            + " ".join(f"{d}=SIZE" for d in names)
            + ", or declare a size in the energy file: dims(\"...\", "
            + ", ".join(f"{d}=SIZE" for d in names) + ")")


def layer_hypers(layer: CompiledLayer) -> dict[str, float]:
    """Hyperparameters without a declared default get 1.0; the others keep the Layer's default."""
    return {h.name: 1.0 for h in layer.hypers if h.default is None}


def build_case(layer: CompiledLayer, module: ModuleType, opts: BenchOptions, tokens: int,
               dtype: torch.dtype | None = None):
    """The Layer (default settings, weights perturbed by 0.1 N(0, 1) so that no gradient is
    trivially zero), the input x (batch, tokens, D) with requires_grad, and the loss weights w.

    Deterministic in ``opts.seed``: every process builds the same weights and inputs.
    """
    dtype = dtype or DTYPES[opts.dtype]
    gen = torch.Generator().manual_seed(opts.seed)
    torch.manual_seed(opts.seed)
    dims = layer_dims(layer, opts, module)
    lay = module.Layer(**dims, **layer_hypers(layer), backend=opts.backend, dtype=dtype,
                       device=opts.device)
    with torch.no_grad():
        for p in lay.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p))
    # a neuron model's states side by side along the last dim (``state_widths``)
    shape = (opts.batch, tokens, sum(state_widths(layer, dims)))
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(opts.device, dtype)
    w = torch.randn(shape, generator=gen, dtype=torch.float64).to(opts.device, dtype)
    lay.bench_call = call_keywords(layer, opts, tokens, gen, dtype, dims)
    return lay, x.requires_grad_(True), w


#: the tokens of each packed document where a layer's sets read documents
DOCUMENT_TOKENS = 512


def call_keywords(layer: CompiledLayer, opts: BenchOptions, tokens: int, gen: torch.Generator,
                  dtype: torch.dtype, dims: dict[str, int]) -> dict:
    """The call's keywords a layer needs besides x, as a user's batch would give them: packed
    documents of DOCUMENT_TOKENS tokens (``cu_seqlens``) where its sets read documents, a prefix
    of half the tokens where they read one, and a memory of as many tokens as the state where
    the energy reads one (its gradient is not compared)."""
    reads = layer.context_data
    out: dict = {}
    if "same_document" in reads:
        cuts = list(range(0, tokens, DOCUMENT_TOKENS)) + [tokens]
        out["cu_seqlens"] = torch.tensor(cuts, dtype=torch.int32, device=opts.device)
    if "prefix" in reads:
        out["prefix"] = tokens // 2
    if layer.memory:
        size = dims[layer.file.attribute(layer.context_dim)]
        out["memory"] = torch.randn((opts.batch, tokens, size), generator=gen,
                                    dtype=torch.float64).to(opts.device, dtype)
    return out


def float64_case(layer: CompiledLayer, module: ModuleType, opts: BenchOptions,
                 lay: torch.nn.Module, x: torch.Tensor, w: torch.Tensor):
    """``build_case``'s Layer, x and w in float64 with the same values: the weights, inputs and
    fixed hyperparameters as ``opts.dtype`` rounds them (a generated layer and the interpreter
    round a hyperparameter to the input's dtype), then widened."""
    lay64 = module.Layer(**layer_dims(layer, opts, module), **layer_hypers(layer),
                         backend=opts.backend, dtype=torch.float64, device=opts.device)
    lay64.load_state_dict({k: v.double() for k, v in lay.state_dict().items()})
    lay64.bench_call = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point()
                        else v for k, v in getattr(lay, "bench_call", {}).items()}
    for h in layer.hypers:
        name = layer.file.attribute(h.name)
        value = getattr(lay, name)
        if not isinstance(value, torch.Tensor):  # learned ones are parameters, loaded above
            setattr(lay64, name, float(torch.tensor(value, dtype=DTYPES[opts.dtype]).double()))
    return lay64, x.detach().double().requires_grad_(True), w.double()


def state_widths(layer: CompiledLayer, dims: dict[str, int]) -> list[int]:
    """The widths of the states the layer updates: D, or a neuron model's dims, in order. The
    benchmark's x holds them side by side along its last dim (one tensor for every variant,
    split into the layer's states by :func:`run_variant`)."""
    return [dims[dim] for _, dim in layer.states]


def run_variant(variant: str, layer: CompiledLayer, lay: torch.nn.Module, x: torch.Tensor,
                w: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """One call: y and the gradients of sum(y * w) to x and every parameter of ``lay``.

    ``generated``: the Layer; ``autograd``: y by :func:`energyc.reference.autograd_step` on the
    package's ``Layer.energy`` (the baseline); ``interpreter``: the same on the interpreter
    (:func:`energyc.reference.reference_step`)."""
    from energyc.reference import autograd_step, reference_step

    call = getattr(lay, "bench_call", {})  # the call's keywords (build_case)
    memory = call.get("memory")
    data = {k: v for k, v in call.items() if k != "memory"}
    if layer.neurons:
        y = _neurons_output(variant, layer, lay, x, data)
    elif variant == "generated":
        y = lay(x, **call)
    elif variant == "autograd":
        if memory is None:
            def energy(xa, xbar):
                return lay.energy(xa, xbar, per_token=True, **data)
        else:  # the memory is every step's context
            def energy(xa, xbar):
                return lay.energy(xa, per_token=True, memory=memory, **data)
        y = autograd_step(lay, x, energy, create_graph=True)
    elif variant == "interpreter":
        y = reference_step(layer, lay, x, create_graph=True, memory=memory, **data)
    else:
        raise ValueError(f"unknown variant {variant!r} (choose from {', '.join(VARIANTS)})")
    grads = torch.autograd.grad((y * w).sum(), [x, *lay.parameters()], allow_unused=True)
    return y, grads


def _neurons_output(variant: str, layer: CompiledLayer, lay: torch.nn.Module, x: torch.Tensor,
                    data: dict) -> torch.Tensor:
    """:func:`run_variant`'s y for a neuron model: x split into its states, the states after
    the dynamics side by side again; ``autograd`` is
    :func:`energyc.reference.package_neurons` (autograd through the unrolled dynamics, on the
    package's plain ``_lagrangians`` and ``_energy``), ``interpreter`` the reference's."""
    from energyc.reference import package_neurons, reference_neurons

    widths = [getattr(lay, layer.file.attribute(dim)) for _, dim in layer.states]
    xs = list(x.split(widths, dim=-1))
    if variant == "generated":
        ys = lay(*xs, **data)
        ys = ys if isinstance(ys, tuple) else (ys,)
    elif variant == "autograd":
        ys = package_neurons(lay, xs, True, **data)
    elif variant == "interpreter":
        ys = reference_neurons(layer, lay, xs, True, **data)
    else:
        raise ValueError(f"unknown variant {variant!r} (choose from {', '.join(VARIANTS)})")
    return torch.cat(list(ys), dim=-1)


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text
                                               or "can't allocate memory" in text)


def _failure(exc: BaseException) -> str:
    if _is_oom(exc):
        return "out of memory"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"error: {type(exc).__name__}: {first}"[:300]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# -- agreement -----------------------------------------------------------------------------------------


def _aligned(names: Sequence[str], got: Sequence, want: Sequence):
    """(name, a, b, unchecked) per pair of tensors to compare, in float64, a missing one (None:
    no gradient) as zeros, and the elements where ``want`` is not finite but ``got`` is set to 0
    in both; ``unchecked`` counts those ("n/size", or "" for none). Pairs of two Nones are
    skipped."""
    for name, a, b in zip(names, got, want):
        if a is None and b is None:
            continue
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        a, b = a.detach().double(), b.detach().double()
        mask = torch.isfinite(a) & ~torch.isfinite(b)
        unchecked = ""
        if mask.any():
            unchecked = f"{int(mask.sum())}/{mask.numel()}"
            a, b = a.masked_fill(mask, 0.0), b.masked_fill(mask, 0.0)
        yield name, a, b, unchecked


def compare(names: Sequence[str], got: Sequence, want: Sequence, dtype: torch.dtype) -> dict:
    """Elementwise ``|got - want| <= atol + rtol |want|`` with the dtype's tolerance.

    Returns ``ok``, the worst tensor by ``max(|got - want| / bound)`` (``excess``: > 1 is beyond the
    tolerance), its max abs error, and the tolerance used. Elements where ``want`` (autograd of
    the energy, or the truth) is NaN or infinite and ``got`` is finite are not compared: they are
    counted per tensor in ``unchecked`` (autograd of a materialised reduction forms every pair,
    also those outside the context set, where a score function may overflow; the generated
    kernels never form them).
    """
    rtol, atol = tolerance(dtype)
    worst = {"ok": True, "name": "", "max_abs_err": 0.0, "excess": 0.0, "rtol": rtol,
             "atol": atol, "dtype": str(dtype).replace("torch.", ""), "unchecked": {}}
    for name, a, b, unchecked in _aligned(names, got, want):
        if unchecked:
            worst["unchecked"][name] = unchecked
        err = (a - b).abs()
        excess = float((err / (atol + rtol * b.abs())).max()) if err.numel() else 0.0
        if not math.isfinite(excess) or excess > worst["excess"] or not worst["name"]:
            worst.update(name=name, max_abs_err=float(err.max()) if err.numel() else 0.0,
                         excess=excess)
        if not excess <= 1.0:  # NaN is a mismatch too
            worst["ok"] = False
    return worst


def _output_names(lay: torch.nn.Module) -> list[str]:
    return ["y", "d/dx", *(f"d/d{n}" for n, _ in lay.named_parameters())]


def relative_errors(names: Sequence[str], got: Sequence, truth: Sequence, dtype: torch.dtype
                    ) -> dict:
    """The error of ``got`` against the float64 ``truth`` (the module docstring's definition).

    ``max_rel``: the worst over the tensors of ``max|got - truth| / max|truth|`` (the absolute
    error where the truth is all zero; NaN where ``got`` is NaN where the truth is not), ``name``
    its tensor, ``per_tensor`` each one's; ``excess`` and ``excess_name``: the worst elementwise
    ``|got - truth| / (atol + rtol |truth|)`` with ``dtype``'s tolerance (:func:`compare`), which
    weighs an error by the magnitude of its own element. Elements where the truth is not finite
    and ``got`` is are left out, as in :func:`compare`."""
    per: dict[str, float] = {}
    for name, a, b, _ in _aligned(names, got, truth):
        if not a.numel():
            continue
        err, scale = float((a - b).abs().max()), float(b.abs().max())
        if torch.isnan(a - b).any():
            err = math.nan
        per[name] = err / scale if scale > 0 else err
    if not per:
        return {"max_rel": 0.0, "name": "", "per_tensor": {}}
    name = max(per, key=lambda n: per[n] if not math.isnan(per[n]) else math.inf)
    c = compare(names, got, truth, dtype)
    return {"max_rel": per[name], "name": name, "per_tensor": per, "excess": c["excess"],
            "excess_name": c["name"]}


# -- the benchmark -----------------------------------------------------------------------------------


def machine(opts: BenchOptions) -> dict:
    """CPU model, logical CPUs, GPU, torch and triton versions, date."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "logical_cpus": os.cpu_count(), "threads": opts.threads,
            "torch": torch.__version__, "python": platform.python_version(),
            "dtype": opts.dtype, "device": opts.device, "backend": opts.backend,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    if opts.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(opts.device))
    if opts.backend == "triton" or (opts.backend == "auto" and opts.device.startswith("cuda")):
        try:
            from importlib.metadata import version

            info["triton"] = version("triton")
        except Exception:  # not installed
            info["triton"] = None
    return info


def _call(variant, layer, lay, x, w, device) -> tuple[float, list]:
    _sync(device)
    t0 = time.perf_counter()
    y, grads = run_variant(variant, layer, lay, x, w)
    _sync(device)
    seconds = time.perf_counter() - t0
    return seconds, [y.detach(), *grads]


def _truth(layer: CompiledLayer, module: ModuleType, file: str, tokens: int, opts: BenchOptions,
           server: ProbeServer | None, case: tuple, log: Log) -> tuple[str | None, list | None,
                                                                      dict[str, str]]:
    """The float64 truth (module docstring): its source, its outputs (y and the gradients) and why
    each source before it failed. On CPU with memory probes it is computed in a probe process,
    within the budgets; otherwise here."""
    tag = f"{layer.name} T={tokens}"
    failed: dict[str, str] = {}
    for source in TRUTH_SOURCES:
        log(f"[{tag}] the truth: {source} in float64 from the same rounded values ...")
        if server is not None:
            with tempfile.TemporaryDirectory(prefix="energyc-bench-truth-") as tmp:
                path = os.path.join(tmp, "outputs.pt")
                answer = server.probe(file, layer.name, module.__path__[0], tokens, source,
                                      widen=True, save=path)
                if answer["status"] == "ok":
                    return source, torch.load(path, map_location=opts.device), failed
                failed[source] = answer["status"]
        else:
            try:
                lay64, x64, w64 = float64_case(layer, module, opts, *case)
                y, grads = run_variant(source, layer, lay64, x64, w64)
                return source, [y.detach(), *grads], failed
            except Exception as exc:  # recorded in the row
                failed[source] = _failure(exc)
                if opts.device.startswith("cuda"):
                    torch.cuda.empty_cache()
        log(f"[{tag}] the truth: {source} in float64: {failed[source]}")
    return None, None, failed


def _agreement(layer: CompiledLayer, module: ModuleType, opts: BenchOptions, case: tuple,
               last: dict[str, list], truth: tuple, tag: str, log: Log) -> dict:
    """generated against autograd in the run's dtype, and the generated layer in float64 against
    the truth; the status (module docstring)."""
    names = _output_names(case[0])
    dtype = DTYPES[opts.dtype]
    source, want, failed = truth
    agreement: dict = {}
    if "autograd" in last:
        agreement = compare(names, last["generated"], last["autograd"], dtype)
        if not agreement["ok"]:
            a = agreement
            log(f"[{tag}] WARNING: the variants differ beyond the {a['dtype']} tolerance: "
                f"{a['name']} max abs error {a['max_abs_err']:.3e} ({a['excess']:.1f}x the bound "
                f"atol + rtol |b|, rtol={a['rtol']}, atol={a['atol']})")
    if want is not None:
        if opts.dtype == "float64":
            got = last["generated"]
        else:
            log(f"[{tag}] the generated layer in float64 from the same rounded values ...")
            try:
                y, grads = run_variant("generated", layer, *float64_case(layer, module, opts,
                                                                         *case))
                got = [y.detach(), *grads]
            except Exception as exc:
                got = None
                agreement["float64"] = {"ok": False, "error": _failure(exc), "truth": source}
        if got is not None:
            agreement["float64"] = compare(names, got, want, torch.float64)
            agreement["float64"]["truth"] = source
    else:
        agreement["float64"] = {"ok": False, "truth": None,
                                "error": "no float64 truth (" + "; ".join(
                                    f"{k}: {v}" for k, v in failed.items()) + ")"}
    direct_ok = agreement.get("ok", True)
    f64 = agreement["float64"]
    if not f64["ok"] and (want is not None or not direct_ok):
        status = "MISMATCH"  # a difference of formulas, or one no float64 truth can explain
    elif not direct_ok and opts.dtype == "float64":
        status = "MISMATCH"
    elif direct_ok and "autograd" in last:
        status = "ok"
    elif want is None:
        status = "-"  # autograd did not run and there is no truth: nothing was compared
    else:
        status = "ok in float64"
    agreement["status"] = status
    if status == "MISMATCH":
        log(f"[{tag}] MISMATCH: the generated layer disagrees with autograd of the energy "
            f"({json.dumps(f64 if want is not None else agreement)})")
    elif not direct_ok and "max_abs_err" in f64:
        log(f"[{tag}] they agree in float64 (the generated layer against the {source}: max abs "
            f"error {f64['max_abs_err']:.2e}): rounding, not a formula difference")
    unchecked = {**agreement.get("unchecked", {}), **f64.get("unchecked", {})}
    if unchecked and status not in ("MISMATCH", "-"):
        agreement["status"] += " where autograd is finite"
        counts = ", ".join(f"{n}: {c}" for n, c in unchecked.items())
        log(f"[{tag}] WARNING: autograd of the energy is NaN or infinite where the generated "
            f"layer is finite (elements: {counts}), so those were not compared; the rest agree. "
            "Autograd of a materialised reduction forms every pair, also those outside the "
            "context set, where a score function can overflow (the generated kernels never form "
            "them): score functions must be finite on every pair for this check (README, Status "
            "and limits)")
    return agreement


def bench_size(layer: CompiledLayer, module: ModuleType, file: str, tokens: int,
               opts: BenchOptions, server: ProbeServer | None, log: Log) -> Row:
    """Every variant of ``layer`` at ``tokens``: memory, the truth, errors, agreement and
    interleaved timings."""
    tag = f"{layer.name} T={tokens}"
    variants = opts.variants
    results = {v: VariantResult() for v in variants}
    from energyc.check import context_sets

    row = Row(file, layer.name, tokens, layer_dims(layer, opts, module), results["generated"],
              results["autograd"], context_sets=sorted(context_sets(layer)), threads=opts.threads,
              interpreter=results.get("interpreter"))
    cuda = opts.device.startswith("cuda")
    if server is not None:  # CPU: memory (and the budgets) first, in fresh processes
        for v in variants:
            log(f"[{tag}] {v}: memory probe in a fresh process ...")
            answer = server.probe(file, layer.name, module.__path__[0], tokens, v)
            r = results[v]
            r.status = answer["status"]
            r.peak_mib, r.base_mib = answer.get("peak_mib"), answer.get("base_mib")
            r.memory_source = answer.get("memory_source", "")
            r.probe_seconds = answer.get("seconds")
            log(f"[{tag}] {v}: {r.status}" + (f", peak {r.peak_mib:.0f} MiB (base "
                                               f"{r.base_mib:.0f} MiB), {r.probe_seconds:.2f} s"
                                               if r.status == "ok" and r.peak_mib else ""))
    try:
        lay, x, w = build_case(layer, module, opts, tokens)
    except Exception as exc:  # shown in the table
        for r in results.values():
            r.status = _failure(exc)
        return row
    running = [v for v in variants if results[v].status == "ok"]
    last: dict[str, list] = {}

    def call(v: str, measure: bool) -> None:
        r = results[v]
        try:
            if cuda and not measure:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            seconds, outs = _call(v, layer, lay, x, w, opts.device)
            if cuda and not measure:
                r.peak_mib = torch.cuda.max_memory_allocated() / MIB
                r.base_mib = base / MIB
                r.memory_source = "torch.cuda.max_memory_allocated"
        except Exception as exc:  # shown in the table
            r.status = _failure(exc)
            if cuda:
                torch.cuda.empty_cache()
            return
        if measure:
            r.times_ms.append(seconds * 1e3)
        else:
            last[v] = outs
        if seconds > opts.max_seconds:
            r.status = "over budget"

    for k in range(opts.warmup):
        log(f"[{tag}] warm-up {k + 1}/{opts.warmup} ...")
        for v in running:
            if results[v].status == "ok":
                call(v, measure=False)  # on CUDA, the last warm-up call is the memory one
    for v in list(last):
        if results[v].status != "ok":
            del last[v]
    if "generated" in last:
        truth = _truth(layer, module, file, tokens, opts, server, (lay, x, w), log)
        source, want, failed = truth
        names = _output_names(lay)
        row.errors = {"truth": source, "dtype": opts.dtype}
        if failed:
            row.errors["truth_failed"] = failed
        if want is not None:
            for v, outs in last.items():
                row.errors[v] = relative_errors(names, outs, want, DTYPES[opts.dtype])
            log(f"[{tag}] error against the float64 {source}: " + ", ".join(
                f"{v} {row.errors[v]['max_rel']:.2e} ({row.errors[v]['name']})" for v in last))
            g, a = row.error("generated"), row.error("autograd")
            if g is not None and a is not None and g > ACCURACY_RATIO * a:
                log(f"[{tag}] NOTE: the generated layer is the less accurate: its error is "
                    f"{g / a if a else math.inf:.1f}x autograd's")
        row.agreement = _agreement(layer, module, opts, (lay, x, w), last, truth, tag, log)
    last.clear()  # the timed calls keep no outputs
    for k in range(opts.repeats):
        log(f"[{tag}] repetition {k + 1}/{opts.repeats} ...")
        for v in running:
            if results[v].status == "ok":
                call(v, measure=True)
    for r in results.values():
        if r.times_ms:
            r.median_ms = statistics.median(r.times_ms)
    return row


@dataclass
class Report:
    """What ``energyc bench`` measured: the machine, the options and one row per layer and size."""

    machine: dict
    options: dict
    rows: list[Row]
    command: str = ""

    def as_dict(self) -> dict:
        return {"command": self.command, "machine": self.machine, "options": self.options,
                "baseline": BASELINE, "definitions": DEFINITIONS,
                "rows": [r.as_dict() for r in self.rows]}

    @property
    def failed(self) -> bool:
        """A MISMATCH, or a variant that raised (not out of memory or over budget)."""
        return any(r.agreement.get("status") == "MISMATCH"
                   or any(v.status.startswith("error") for v in r.variants().values())
                   for r in self.rows)


def run_bench(files: Sequence[str], opts: BenchOptions, log: Log | None = None) -> Report:
    """Benchmark every layer of every energy file at every token count of ``opts``."""
    from energyc.check import import_generated
    from energyc.compiler import compile_file
    from energyc.loader import load

    log = log or (lambda message: None)
    _validate(opts)
    if opts.device == "cpu" and opts.backend == "triton":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    if opts.max_memory_mib is None and not opts.device.startswith("cuda"):
        avail = available_memory_mib()
        opts.max_memory_mib = round(0.8 * avail) if avail else None
    report = Report(machine(opts), asdict(opts), [])
    threads = torch.get_num_threads()
    torch.set_num_threads(opts.threads)
    probes = opts.memory and not opts.device.startswith("cuda")
    server = ProbeServer(opts) if probes else None  # it imports while this process compiles
    try:
        compiled = []
        for path in files:
            layers = compile_file(load(path))
            log(f"{path}: {len(layers)} layer(s): {', '.join(c.name for c in layers)}")
            compiled += [(path, c) for c in layers]
        _check_dim_names(opts.dims, [c for _, c in compiled])
        with tempfile.TemporaryDirectory(prefix="energyc-bench-") as tmp:
            modules = [import_generated(layer, os.path.join(tmp, str(k)))
                       for k, (_, layer) in enumerate(compiled)]
            # dims nothing sizes, and odd sizes of paired dims, are argument errors, now
            missing = {layer.name: m for (_, layer), module in zip(compiled, modules)
                       if (m := missing_dims(layer, opts, module))}
            if missing:
                raise EnergyError(_missing_message(missing, opts), "--dim")
            for (_, layer), module in zip(compiled, modules):
                layer_dims(layer, opts, module)
            for (path, layer), module in zip(compiled, modules):
                for tokens in opts.tokens:
                    report.rows.append(bench_size(layer, module, path, tokens, opts, server, log))
    finally:
        torch.set_num_threads(threads)
        if server is not None:
            server.close()
    return report


def _validate(opts: BenchOptions) -> None:
    if opts.dtype not in DTYPES:
        raise EnergyError(f"unknown dtype {opts.dtype!r} (choose from {', '.join(DTYPES)})",
                          "--dtype")
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise EnergyError("no CUDA device is available to this torch "
                          f"({torch.__version__})", "--device")
    for name, value, low in (("--batch", opts.batch, 1), ("--threads", opts.threads, 1),
                             ("--repeats", opts.repeats, 1), ("--warmup", opts.warmup, 0)):
        if value < low:
            raise EnergyError(f"must be at least {low}, got {value}", name)
    if not opts.tokens or min(opts.tokens) < 1:
        raise EnergyError(f"token counts must be at least 1, got {list(opts.tokens)}", "--tokens")
    if not opts.max_seconds > 0:
        raise EnergyError(f"must be positive, got {opts.max_seconds}", "--max-seconds")
    for name, size in opts.dims.items():
        if size < 1:
            raise EnergyError(f"dim {name} must be at least 1, got {size}", "--dim")


def _check_dim_names(dims: dict[str, int], layers: list[CompiledLayer]) -> None:
    declared = sorted({d for c in layers for d in c.dims})
    unknown = [d for d in dims if d not in declared]
    if unknown:
        raise EnergyError(f"no layer declares dim {', '.join(unknown)} (dims: "
                          f"{', '.join(declared)})", "--dim")


# -- the table -----------------------------------------------------------------------------------------

COLUMNS = ("layer", "tokens", "threads", "generated ms", "autograd ms", "interpreter ms",
           "speed-up", "generated peak MiB", "autograd peak MiB", "interpreter peak MiB",
           "memory ratio", "gen err", "autograd err", "interpreter err", "agree")
INTERPRETER_COLUMNS = ("interpreter ms", "interpreter peak MiB", "interpreter err")


def columns(report: Report) -> tuple[str, ...]:
    """The table's columns: the interpreter's only where it was timed."""
    if any(r.interpreter is not None for r in report.rows):
        return COLUMNS
    return tuple(c for c in COLUMNS if c not in INTERPRETER_COLUMNS)


def _ms(r: VariantResult) -> str:
    return f"{r.median_ms:.1f}" if r.status == "ok" and r.median_ms is not None else r.status


def _mib(r: VariantResult) -> str:
    if r.peak_mib is None:
        return "-" if r.status == "ok" else r.status
    inc = r.increment_mib
    return f"{r.peak_mib:.0f} (+{inc:.0f})" if inc is not None else f"{r.peak_mib:.0f}"


def _err(row: Row, variant: str) -> str:
    """The variant's error against the truth; the generated one with its ratio to autograd's
    where it is over ACCURACY_RATIO times that."""
    e = row.error(variant)
    if e is None:
        return "-"
    text = f"{e:.1e}"
    a = row.error("autograd")
    if variant == "generated" and a is not None and e > ACCURACY_RATIO * a:
        text += f" ({e / a:.1f}x)" if a else " (autograd exact)"
    return text


def _agree(row: Row) -> str:
    """The agree cell: the status (module docstring), in words where only float64 agrees."""
    agree = row.agreement.get("status", "-")
    f64 = row.agreement.get("float64", {})
    unchecked = {**row.agreement.get("unchecked", {}), **f64.get("unchecked", {})}
    if agree.startswith("ok in float64") and "excess" in row.agreement:
        a = row.agreement
        agree = (f"ok: {a.get('dtype', 'the dtype')} beyond tolerance by rounding ({a['name']}: "
                 f"{a['excess']:.1f}x tol), float64 agrees")
        if unchecked:
            agree += " (autograd not finite: " + ", ".join(
                f"{n} {c}" for n, c in unchecked.items()) + ")"
    elif unchecked and agree != "MISMATCH":
        agree += " (autograd not finite: " + ", ".join(
            f"{n} {c}" for n, c in unchecked.items()) + ")"
    elif agree not in ("ok", "-"):
        # the comparison that failed: in float64 against the truth, else generated against autograd
        worst = f64 if not f64.get("ok", True) and "excess" in f64 else row.agreement
        if "excess" in worst:
            agree += f" ({worst['name']}: {worst['excess']:.1f}x tol)"
        elif "error" in f64:
            agree += f" ({f64['error']})"
    return agree


def _cells(row: Row, names: Sequence[str] = COLUMNS) -> list[str]:
    agree = _agree(row)
    interp = row.interpreter or VariantResult(status="-")
    cells = {"layer": row.layer, "tokens": str(row.tokens), "threads": str(row.threads),
             "generated ms": _ms(row.generated), "autograd ms": _ms(row.autograd),
             "interpreter ms": _ms(interp),
             "speed-up": f"{row.speedup:.2f}x" if row.speedup else "-",
             "generated peak MiB": _mib(row.generated), "autograd peak MiB": _mib(row.autograd),
             "interpreter peak MiB": _mib(interp),
             "memory ratio": f"{row.memory_ratio:.2f}x" if row.memory_ratio else "-",
             "gen err": _err(row, "generated"), "autograd err": _err(row, "autograd"),
             "interpreter err": _err(row, "interpreter"), "agree": agree}
    return [cells[c] for c in names]


def format_header(report: Report) -> list[str]:
    """The machine, sizes and definitions, one line each."""
    m, o = report.machine, report.options
    dims: dict[str, int] = {}
    for r in report.rows:
        dims.update(r.dims)
    gpu = f", GPU {m['gpu']}" if "gpu" in m else ""
    triton = f", triton {m['triton']}" if m.get("triton") else ""
    if o["device"].startswith("cuda"):
        memory = ("torch.cuda.max_memory_allocated; + is the increment over memory_allocated "
                  "before the call")
    elif o["memory"]:
        memory = ("peak RSS of a fresh process per variant and size; + is the increment over its "
                  "RSS just before the call")
    else:
        memory = "not measured (--no-memory)"
    variants = ["generated", "autograd"] + (
        ["interpreter"] if "interpreter ms" in columns(report) else [])
    return [
        f"machine: {m['cpu']} ({m['logical_cpus']} logical CPUs){gpu}; torch {m['torch']}{triton};"
        f" threads {m['threads']}; {m['dtype']}; device {m['device']}; backend {m['backend']};"
        f" {m['date']}",
        f"sizes: batch {o['batch']}, " + ", ".join(f"{k}={v}" for k, v in sorted(dims.items()))
        + f"; per variant {o['warmup']} warm-up call(s), then {o['repeats']} timed, interleaved"
          " (median); a call = forward + backward of sum(y * w) to x and every parameter",
        *(f"{v}: {DEFINITIONS[v]}" for v in variants),
        f"speed-up = {DEFINITIONS['speedup']}",
        f"memory: {memory}; memory ratio = {DEFINITIONS['memory_ratio']}",
        f"err: {DEFINITIONS['error']}; a generated error over {ACCURACY_RATIO:g}x autograd's "
        "shows the ratio",
        f"agree: {DEFINITIONS['agreement']}",
    ]


def format_table(report: Report, markdown: bool = False) -> str:
    """The rows as an aligned text table (or a Markdown table)."""
    names = columns(report)
    rows = [list(names)] + [_cells(r, names) for r in report.rows]
    if markdown:
        lines = ["| " + " | ".join(rows[0]) + " |",
                 "|" + "|".join("---" if k == 0 or k == len(names) - 1 else "---:"
                                for k in range(len(names))) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
        return "\n".join(lines)
    widths = [max(len(r[k]) for r in rows) for k in range(len(names))]
    right = set(range(1, len(names) - 1))

    def fmt(r):
        return "  ".join(c.rjust(w) if k in right else c.ljust(w)
                         for k, (c, w) in enumerate(zip(r, widths))).rstrip()

    return "\n".join([fmt(rows[0]), "  ".join("-" * w for w in widths), *map(fmt, rows[1:])])


def write_json(report: Report, path: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(report.as_dict(), fh, indent=2)
        fh.write("\n")

