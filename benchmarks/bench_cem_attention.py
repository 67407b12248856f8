"""Benchmark the energyc-generated CEM attention layer against two hand-written baselines.

The energy (examples/cem_attention.py), per batch element, token i and head h, is

    E_i = -(1/beta) sum_h log sum_{j <= i} exp(beta (W_q,h x_i) . (W_k,h xbar_j))

and one layer is one descent step y = x - eta * dE/dx, where xbar is the same tensor as x but held
fixed inside dE/dx (it is still differentiated through during training). The step equals causal
multi-head attention with values tied to the keys and output projection W_q^T:

    y = x + eta * sum_h SDPA(q_h, k_h, k_h, is_causal=True, scale=beta) @ W_q,h

Three implementations with identical weights are compared:

    energyc (generated)    the Layer that `energyc compile` writes (symbolic forward and backward);
    autograd of energy     E in plain PyTorch, g = autograd.grad(E, x_state, create_graph=True),
                           y = x - eta * g, trained by double backward;
    hand-derived on SDPA   the identity above on torch.nn.functional.scaled_dot_product_attention.

What is measured:

1. the time `python -m energyc compile examples/cem_attention.py` takes (into a temporary folder,
   from which the generated Layer is imported, so the current compiler is always measured);
2. correctness: forward output and gradients of a random linear loss w.r.t. x, W_q and W_k agree in
   float64 at a small size (exit status 1 if any difference exceeds 1e-8);
3. speed: forward + backward of loss = (y * w).sum() to x, W_q and W_k, round-robin over the
   variants in every repetition (the starting variant rotates), after 2 warm-up iterations each;
   median and min per variant, the ratios autograd / energyc (target >= 2.5) and
   energyc / sdpa (target <= 1.2), and on CUDA the peak memory of one step per variant.
   Timing targets are reported, never asserted.

Run from the repository root:

    python benchmarks/bench_cem_attention.py
    python benchmarks/bench_cem_attention.py --tokens 1024 --threads 2 --repeats 20
    python benchmarks/bench_cem_attention.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import importlib
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the generated package imports energyc.runtime from this checkout
EXAMPLE = Path("examples") / "cem_attention.py"
PACKAGE = "cem_attention"
CHECK_TOL = 1e-8
TARGET_VS_AUTOGRAD = 2.5  # autograd / energyc must be at least this
TARGET_VS_SDPA = 1.2  # energyc / sdpa must be at most this
WARMUP = 2
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}

NAME_GEN = "energyc (generated)"
NAME_AUTOGRAD = "autograd of energy"
NAME_EINSUM = "autograd of energy, einsum"
NAME_SDPA = "hand-derived on SDPA"


# --------------------------------------------------------------------------------------------
# The generated layer
# --------------------------------------------------------------------------------------------


def compile_example(outdir: Path) -> float:
    """Compile examples/cem_attention.py into ``outdir``; return the wall time in seconds."""
    cmd = [sys.executable, "-m", "energyc", "compile", str(EXAMPLE), "-o", str(outdir), "-q"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"energyc compile failed with exit status {proc.returncode}")
    return elapsed


def import_generated(outdir: Path) -> ModuleType:
    """Import the freshly generated ``cem_attention`` package from ``outdir`` (and nowhere else)."""
    for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
        del sys.modules[name]
    sys.path.insert(0, str(outdir))
    try:
        module = importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(outdir))
    origin = Path(module.__file__ or "").resolve()
    if outdir.resolve() not in origin.parents:
        raise SystemExit(f"imported {PACKAGE} from {origin}, not from {outdir}")
    return module


# --------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------


def project(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Per-head projection: x (B, T, D), W (H, K, D) -> (B, H, T, K)."""
    B, T, _ = x.shape
    H, K, D = W.shape
    return (x @ W.reshape(H * K, D).t()).view(B, T, H, K).transpose(1, 2)


def unproject(a: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Transpose of :func:`project` summed over heads: a (B, H, T, K), W (H, K, D) -> (B, T, D)."""
    B, H, T, K = a.shape
    return a.transpose(1, 2).reshape(B, T, H * K) @ W.reshape(H * K, -1)


class _TiedWeights(torch.nn.Module):
    """W_q, W_k of shape (H, K, D) and the float hyperparameter beta, copied from a source layer."""

    def __init__(self, source: torch.nn.Module, eta: float) -> None:
        super().__init__()
        self.W_q = torch.nn.Parameter(source.W_q.detach().clone())
        self.W_k = torch.nn.Parameter(source.W_k.detach().clone())
        self.beta = float(source.beta)
        self.eta = float(eta)


class AutogradEnergyLayer(_TiedWeights):
    """y = x - eta * dE/dx with E evaluated in plain PyTorch and dE/dx taken by autograd.

    The scores are materialised as a (B, H, T, T) tensor, causally masked, and reduced by
    logsumexp. The gradient is taken w.r.t. a separate node ``x_state`` (the state role) while
    the context role uses ``x`` directly, so xbar is held fixed in dE/dx but stays in the graph;
    ``create_graph=True`` makes the step trainable (double backward).
    """

    def energy(self, x_state: torch.Tensor, xbar: torch.Tensor) -> torch.Tensor:
        """Per-token energy E_i, shape (B, T)."""
        T = x_state.shape[1]
        q = project(x_state, self.W_q)  # (B, H, T, K)
        k = project(xbar, self.W_k)  # (B, H, T, K)
        scores = self.beta * (q @ k.transpose(-1, -2))  # (B, H, i, j)
        causal = torch.ones(T, T, dtype=torch.bool, device=x_state.device).tril()
        scores = scores.masked_fill(~causal, -math.inf)
        return -(1.0 / self.beta) * torch.logsumexp(scores, dim=-1).sum(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One descent step on E."""
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            x_state = x.clone() if x.requires_grad else x.detach().requires_grad_()
            energy = self.energy(x_state, x)
            (g,) = torch.autograd.grad(energy.sum(), x_state, create_graph=create_graph)
        return x - self.eta * g


class AutogradEinsumEnergyLayer(AutogradEnergyLayer):
    """The same autograd layer with E transcribed literally from the maths with einsum.

    Scores are (B, i, j, H), as ``E_i = -(1/beta) sum_h logsumexp_j(beta q_ih . k_jh)`` reads.
    This is how a researcher would first write the energy; the class above is a tuned layout.
    """

    def energy(self, x_state: torch.Tensor, xbar: torch.Tensor) -> torch.Tensor:
        """Per-token energy E_i, shape (B, T)."""
        T = x_state.shape[1]
        q = torch.einsum("hkd,bid->bihk", self.W_q, x_state)
        k = torch.einsum("hkd,bjd->bjhk", self.W_k, xbar)
        scores = self.beta * torch.einsum("bihk,bjhk->bijh", q, k)
        causal = torch.ones(T, T, dtype=torch.bool, device=x_state.device).tril()
        scores = scores.masked_fill(~causal[None, :, :, None], -math.inf)
        return -(1.0 / self.beta) * torch.logsumexp(scores, dim=2).sum(dim=-1)


class SdpaLayer(_TiedWeights):
    """y = x + eta * W_q^T SDPA(q, k, k, is_causal=True, scale=beta), q = W_q x, k = W_k x."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One descent step via the attention identity."""
        q = project(x, self.W_q)
        k = project(x, self.W_k)
        a = torch.nn.functional.scaled_dot_product_attention(
            q, k, k, is_causal=True, scale=self.beta
        )
        return x + self.eta * unproject(a, self.W_q)


def build_variants(
    generated: ModuleType,
    *,
    D: int,
    H: int,
    K: int,
    dtype: torch.dtype,
    device: torch.device,
    eta: float = 1.0,
) -> dict[str, torch.nn.Module]:
    """The three layers, all with the weights and beta of a freshly initialised generated Layer."""
    gen = generated.Layer(D=D, H=H, K=K, eta=eta, dtype=dtype, device=device)
    return {
        NAME_GEN: gen,
        NAME_AUTOGRAD: AutogradEnergyLayer(gen, eta),
        NAME_EINSUM: AutogradEinsumEnergyLayer(gen, eta),
        NAME_SDPA: SdpaLayer(gen, eta),
    }


# --------------------------------------------------------------------------------------------
# Correctness
# --------------------------------------------------------------------------------------------


def outputs_and_grads(
    layer: torch.nn.Module, x: torch.Tensor, w: torch.Tensor
) -> list[torch.Tensor]:
    """[y, dL/dx, dL/dW_q, dL/dW_k] for L = (layer(x) * w).sum()."""
    x = x.detach().requires_grad_()
    y = layer(x)
    grads = torch.autograd.grad((y * w).sum(), [x, layer.W_q, layer.W_k])
    return [y.detach(), *grads]


def check_correctness(generated: ModuleType, device: torch.device) -> bool:
    """Compare the three variants in float64 at a small size; print the max abs differences."""
    B, T, D, H, K = 2, 16, 32, 2, 8
    torch.manual_seed(0)
    variants = build_variants(generated, D=D, H=H, K=K, dtype=torch.float64, device=device)
    x = torch.randn(B, T, D, dtype=torch.float64, device=device)
    w = torch.randn(B, T, D, dtype=torch.float64, device=device)
    results = {name: outputs_and_grads(layer, x, w) for name, layer in variants.items()}

    print(f"correctness (float64, B={B} T={T} D={D} H={H} K={K}, tolerance {CHECK_TOL:g}):")
    labels = ["y", "dL/dx", "dL/dW_q", "dL/dW_k"]
    print(f"  {'max |a - b|':<44}" + "".join(f"{label:>11}" for label in labels))
    ok = True
    names = list(variants)
    for a, b in [(names[0], names[1]), (names[0], names[2]), (names[1], names[2])]:
        diffs = [(ra - rb).abs().max().item() for ra, rb in zip(results[a], results[b])]
        ok &= all(d <= CHECK_TOL for d in diffs)  # False for NaN too
        print(f"  {a + ' vs ' + b:<44}" + "".join(f"{d:>11.2e}" for d in diffs))

    # The generated layer's energy() against the plain-PyTorch energy, as a further cross-check.
    gen, ref = variants[NAME_GEN], variants[NAME_AUTOGRAD]
    with torch.no_grad():
        e_diff = (gen.energy(x, per_token=True) - ref.energy(x, x)).abs().max().item()
    ok &= e_diff <= CHECK_TOL
    print(f"  {'energy: generated .energy() vs plain PyTorch':<44}{e_diff:>11.2e}")
    print(f"  -> {'PASS' if ok else 'FAIL'}")
    return ok


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Per-variant results of the timing run."""

    times_ms: list[float]
    peak_mib: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def min(self) -> float:
        return min(self.times_ms)


def make_step(layer: torch.nn.Module, x: torch.Tensor, w: torch.Tensor) -> Callable[[], None]:
    """One training step: forward, loss = (y * w).sum(), backward to x, W_q and W_k."""
    inputs = [x, layer.W_q, layer.W_k]

    def step() -> None:
        y = layer(x)
        torch.autograd.grad((y * w).sum(), inputs)

    return step


def sync(device: torch.device) -> None:
    """Wait for queued kernels (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(step: Callable[[], None], device: torch.device) -> float:
    """Wall time of one step in milliseconds."""
    sync(device)
    start = time.perf_counter()
    step()
    sync(device)
    return (time.perf_counter() - start) * 1e3


def cuda_peak_mib(step: Callable[[], None], device: torch.device) -> float:
    """Peak CUDA memory of one step above what was allocated before it, in MiB."""
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def run_timing(
    steps: dict[str, Callable[[], None]], repeats: int, device: torch.device
) -> dict[str, Timing]:
    """Warm up each variant, then time them round-robin, rotating the order every repetition."""
    names = list(steps)
    for name in names:
        for _ in range(WARMUP):
            steps[name]()
    sync(device)
    results = {name: Timing([]) for name in names}
    for rep in range(repeats):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            results[name].times_ms.append(time_once(steps[name], device))
    if device.type == "cuda":
        for name in names:
            results[name].peak_mib = cuda_peak_mib(steps[name], device)
    return results


def print_table(results: dict[str, Timing], device: torch.device) -> None:
    """Aligned plain-text table of the timings."""
    gen = results[NAME_GEN].median
    header = ["variant", "median ms", "min ms", "median / energyc", "peak MiB"]
    rows = []
    for name, r in results.items():
        peak = f"{r.peak_mib:.1f}" if r.peak_mib is not None else "n/a"
        rows.append([name, f"{r.median:.2f}", f"{r.min:.2f}", f"{r.median / gen:.2f}x", peak])
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header))]

    def fmt(row: list[str]) -> str:
        cells = [row[0].ljust(widths[0])] + [v.rjust(wd) for v, wd in zip(row[1:], widths[1:])]
        return "  ".join(cells)

    print(fmt(header))
    print("  ".join("-" * wd for wd in widths))
    for row in rows:
        print(fmt(row))
    if device.type != "cuda":
        print("(peak memory: reported on CUDA only)")


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4, help="batch size (default 4)")
    p.add_argument("--tokens", type=int, default=512, help="sequence length (default 512)")
    p.add_argument("--dim", type=int, default=256, help="model width D (default 256)")
    p.add_argument("--heads", type=int, default=4, help="heads H (default 4)")
    p.add_argument("--head-dim", type=int, default=64, help="head width K (default 64)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="default float32")
    p.add_argument("--repeats", type=int, default=10, help="timed repetitions (default 10)")
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="default cuda if available, else cpu",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: as is)"
    )
    args = p.parse_args(argv)
    for name in ("batch", "tokens", "dim", "heads", "head_dim", "repeats", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    return args


def main(argv: list[str] | None = None) -> int:
    """Compile, check, time, report. Returns 1 if the correctness check fails, else 0."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]

    with tempfile.TemporaryDirectory(prefix="bench_cem_attention_") as tmp:
        outdir = Path(tmp)
        compile_s = compile_example(outdir)
        generated = import_generated(outdir)
        print(f"energyc compile time: {compile_s:.2f} s ({EXAMPLE})")
        print(
            f"torch {torch.__version__}, device {device}"
            + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
            + f", threads {torch.get_num_threads()}"
        )
        print()

        if not check_correctness(generated, device):
            print(f"ERROR: the variants disagree beyond {CHECK_TOL:g}; not timing.")
            return 1
        print()

        B, T, D, H, K = args.batch, args.tokens, args.dim, args.heads, args.head_dim
        torch.manual_seed(1)
        variants = build_variants(generated, D=D, H=H, K=K, dtype=dtype, device=device)
        x = torch.randn(B, T, D, dtype=dtype, device=device, requires_grad=True)
        w = torch.randn(B, T, D, dtype=dtype, device=device)
        steps = {name: make_step(layer, x, w) for name, layer in variants.items()}
        beta = float(variants[NAME_GEN].beta)
        print(
            f"forward+backward (loss = (y * w).sum(), grads to x, W_q, W_k): {args.dtype}, "
            f"batch {B}, tokens {T}, D={D}, H={H}, K={K}, beta={beta:.4g}, eta=1, "
            f"{args.repeats} repeats round-robin after {WARMUP} warm-up each"
        )
        results = run_timing(steps, args.repeats, device)

    print()
    print_table(results, device)
    print()
    gen = results[NAME_GEN].median
    vs_autograd = results[NAME_AUTOGRAD].median / gen
    vs_einsum = results[NAME_EINSUM].median / gen
    vs_sdpa = gen / results[NAME_SDPA].median
    ok_autograd = vs_autograd >= TARGET_VS_AUTOGRAD
    ok_sdpa = vs_sdpa <= TARGET_VS_SDPA
    print(f"autograd / energyc: {vs_autograd:.2f}x (target >= {TARGET_VS_AUTOGRAD})")
    print(f"autograd, einsum / energyc: {vs_einsum:.2f}x (target >= {TARGET_VS_AUTOGRAD})")
    print(f"energyc / sdpa:     {vs_sdpa:.2f}x (target <= {TARGET_VS_SDPA})")
    print(
        f"targets: >= {TARGET_VS_AUTOGRAD}x vs autograd "
        f"{'MET' if ok_autograd else 'MISSED'} ({vs_autograd:.2f}x; einsum transcription "
        f"{'MET' if vs_einsum >= TARGET_VS_AUTOGRAD else 'MISSED'}, {vs_einsum:.2f}x); "
        f"<= {TARGET_VS_SDPA}x vs SDPA {'MET' if ok_sdpa else 'MISSED'} ({vs_sdpa:.2f}x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
