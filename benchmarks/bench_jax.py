"""energyc against JAX: the same energies written in JAX as a JAX user would (issue 14).

Two workloads, fp32 on the CPU, each a training step (forward + gradient of a loss w.r.t. the input
and every weight):

1. **Energy Transformer block** at its published size: D=768, 12 heads of K=64, 3072 Hopfield
   memories, 197 tokens (196 patches + CLS), batch 1. On g = LayerNorm(x) (learned weight and bias,
   shared by the steps) the energy is (benchmarks/energies/et_block.py)

       E = -(1/beta) sum_h sum_i log sum_{j != i} exp(beta (W_q,h g_i) . (W_k,h g_j))
           - (1/2) sum_i sum_mu relu(Xi_mu . g_i)^2,            beta = 1/sqrt(K),

   and the step is 12 times  x <- x - 0.1 dE/dg (LayerNorm(x))  (dE/dg of the total energy: the key
   role of g_j is differentiated too), loss = sum(x_12 * w), gradients to x, W_q, W_k, Xi and the
   LayerNorm's weight and bias.
   energyc: the energy file compiled at start into a temporary folder (`energyc compile`), its Layer
   (joint, steps=1, eta=0.1) applied as  g = layer_norm(x); x = x + (layer(g) - g)  12 times with
   the same weights. JAX: E in jax.numpy, `jax.grad(E)` inside the unrolled steps, and
   `jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))` for the training gradient.

2. **cem_attention** (examples/cem_attention.py) at 512, 1024, 2048, 4096 tokens, batch 4, D=256,
   4 heads of 64: one step y = x - dE/dx with E's causal log-sum-exp over j <= i (xbar = x held
   fixed inside dE/dx), loss = sum(y * w), gradients to x, W_q, W_k. energyc: the generated Layer;
   JAX: `jax.grad` of E inside the loss and `jax.jit(jax.value_and_grad(loss))` (double
   differentiation, as a JAX user writes it).

Correctness first: both workloads in float64 at a small size, loss and every gradient of energyc and
JAX (with jax_enable_x64) must agree to 1e-10 (relative to the largest value, at least 1); exit
status 1 otherwise, before any timing.

Threads: each side runs at each of --threads (default 1 and 2) and is reported at its best. torch:
`torch.set_num_threads(n)` in this process before each call. JAX: its thread count is fixed when it
initialises, so each JAX thread count is a persistent worker process (this script with
--jax-worker) restricted to n CPUs with sched_setaffinity before jax is imported (XLA sizes its
pools, and its threads inherit the affinity). The usual advice,
XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1", does not limit the
threads on jax 0.10.2 (XLA's pools still run work on several threads; per-thread CPU times), so it
is set only with --jax-xla-flags (for the 1-thread worker, on top of the affinity). The CPU-time /
wall-time ratio of every variant is printed as a check of the parallelism it got, and the kernel's
(system) share of that CPU time.

Timing: energyc is warmed up with 2 calls per thread count; JAX's trace + lower + compile is timed
separately, then 2 warm-up calls. Then --repeats repetitions, each calling every variant (energyc
at each thread count, JAX at each thread count) once in a round-robin whose start rotates; a JAX
call is a request to its worker, run while this process waits. Medians are reported; timings are
printed, never asserted.

Profile: the energyc ET step at its best thread count under torch.profiler; the share of the self
CPU time of all ops spent outside matrix products (GEMM ops: mm, bmm, addmm, baddbmm, matmul, oneDNN's linear, ...;
the fused CPU flash-attention kernels are counted as a class of their own), and the top other ops.

Run from the repository root (needs `pip install -e ".[bench]"`, i.e. jax[cpu]):

    python benchmarks/bench_jax.py                      # both workloads, full sizes (minutes)
    python benchmarks/bench_jax.py --quick              # small sizes, 2 repeats: a smoke test
    python benchmarks/bench_jax.py --workloads cem --cem-tokens 512 2048 --repeats 5
    python benchmarks/bench_jax.py --write              # also into benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch is imported lazily: the JAX workers run without it
    import torch

ROOT = Path(__file__).resolve().parents[1]
ET_FILE = Path("benchmarks") / "energies" / "et_block.py"
CEM_FILE = Path("examples") / "cem_attention.py"
SECTION = "## Against JAX (`bench_jax.py`)"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"

CHECK_TOL = 1e-10  # float64 agreement, relative to max(1, largest |value|)
WARMUP = 2
LN_EPS = 1e-5
ONE_THREAD_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
MARK = "@@bench_jax@@ "  # prefix of the worker's protocol lines on its stdout

# issue 14's targets
TARGET_ET_SPEEDUP = 1.1  # energyc at least this much faster than JAX
TARGET_ET_OUTSIDE = 0.15  # at most this share of the energyc step outside matrix products
TARGET_CEM = ((512, 2.0), (2048, 2.0))

ET_FULL = {"B": 1, "T": 197, "D": 768, "H": 12, "K": 64, "M": 3072, "steps": 12}
ET_QUICK = {"B": 1, "T": 33, "D": 64, "H": 2, "K": 32, "M": 128, "steps": 3}
ET_CHECK = {"B": 2, "T": 9, "D": 16, "H": 2, "K": 4, "M": 8, "steps": 2}
CEM_FULL = {"B": 4, "D": 256, "H": 4, "K": 64}
CEM_QUICK = {"B": 2, "D": 64, "H": 2, "K": 32}
CEM_CHECK = {"B": 2, "T": 16, "D": 32, "H": 2, "K": 8}
CEM_TOKENS = (512, 1024, 2048, 4096)
CEM_TOKENS_QUICK = (128, 256)
ET_ETA = 0.1
CEM_ETA = 1.0

# torch.profiler op names that are matrix products (einsum's own self time is not: its GEMMs are
# its bmm/mm children), and those of the fused CPU attention kernels
GEMM_OPS = {
    "aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addbmm", "aten::matmul",
    "aten::dot", "aten::vdot", "aten::mv", "aten::addmv", "aten::_addmm_activation",
    "mkldnn::_linear_pointwise",  # energyc.runtime.gemm's oneDNN GEMM
}
ATTENTION_MARKS = ("scaled_dot_product", "flash_attention")


# --------------------------------------------------------------------------------------------
# The JAX side (worker processes; no torch here)
# --------------------------------------------------------------------------------------------


def jax_programs(jax: Any, jnp: Any) -> dict[str, Any]:
    """The two workloads in JAX, as a JAX user writes them: loss(x, params, w) per workload."""

    def layer_norm(x, weight, bias):
        mu = x.mean(axis=-1, keepdims=True)
        var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
        return (x - mu) * jax.lax.rsqrt(var + LN_EPS) * weight + bias

    def et_energy(g, p):
        """Total energy of the Energy Transformer block (joint: g in both roles)."""
        K = p["W_q"].shape[1]
        T = g.shape[1]
        beta = 1.0 / math.sqrt(K)
        q = jnp.einsum("btd,hkd->bhtk", g, p["W_q"])
        k = jnp.einsum("btd,hkd->bhtk", g, p["W_k"])
        scores = beta * jnp.einsum("bhik,bhjk->bhij", q, k)
        scores = jnp.where(jnp.eye(T, dtype=bool), -jnp.inf, scores)  # j != i
        attention = -(1.0 / beta) * jax.nn.logsumexp(scores, axis=-1).sum()
        h = jax.nn.relu(jnp.einsum("btd,md->btm", g, p["Xi"]))
        return attention - 0.5 * (h * h).sum()

    def et_loss(x, p, w, steps):
        for _ in range(steps):
            g = layer_norm(x, p["ln_w"], p["ln_b"])
            x = x - ET_ETA * jax.grad(et_energy)(g, p)
        return (x * w).sum()

    def cem_energy(x_state, xbar, p):
        """Total energy of cem_attention: causal log-sum-exp, xbar the (fixed) context role."""
        K = p["W_q"].shape[1]
        T = x_state.shape[1]
        beta = 1.0 / math.sqrt(K)
        q = jnp.einsum("btd,hkd->bhtk", x_state, p["W_q"])
        k = jnp.einsum("btd,hkd->bhtk", xbar, p["W_k"])
        scores = beta * jnp.einsum("bhik,bhjk->bhij", q, k)
        scores = jnp.where(jnp.tril(jnp.ones((T, T), dtype=bool)), scores, -jnp.inf)  # j <= i
        return -(1.0 / beta) * jax.nn.logsumexp(scores, axis=-1).sum()

    def cem_loss(x, p, w, steps):
        del steps
        y = x - CEM_ETA * jax.grad(cem_energy)(x, x, p)  # dE/dx with xbar = x held fixed
        return (y * w).sum()

    return {"et": et_loss, "cem": cem_loss}


PARAMS = {"et": ("W_q", "W_k", "Xi", "ln_w", "ln_b"), "cem": ("W_q", "W_k")}


def _cpu_seconds() -> tuple[float, float]:
    """(user, system) CPU seconds of this process, all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def _cpu_use(c0: tuple[float, float], wall: float) -> dict[str, float]:
    """CPU time / wall time since ``c0``, and the system (kernel) share of that CPU time."""
    user, system = (b - a for a, b in zip(c0, _cpu_seconds()))
    return {"cpu_ratio": (user + system) / wall, "sys_share": system / max(user + system, 1e-9)}


def jax_worker(threads: int, x64: bool) -> int:
    """Serve requests (one JSON line each on stdin) until 'quit' or end of input."""
    allowed = sorted(os.sched_getaffinity(0))
    if threads > len(allowed):
        raise SystemExit(f"--jax-threads {threads}: only {len(allowed)} CPUs available")
    cpus = allowed[-threads:]
    os.sched_setaffinity(0, cpus)  # before jax starts its thread pools: they inherit it
    import jax

    if x64:
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    programs = jax_programs(jax, jnp)
    state: dict[str, Any] = {}

    def reply(obj: dict) -> None:
        sys.stdout.write(MARK + json.dumps(obj) + "\n")
        sys.stdout.flush()

    reply({"ok": True, "jax": jax.__version__, "cpus": cpus,
           "xla_flags": os.environ.get("XLA_FLAGS", ""), "devices": str(jax.devices())})
    for line in sys.stdin:
        req = json.loads(line)
        try:
            cmd = req["cmd"]
            if cmd == "quit":
                break
            if cmd == "setup":
                state.clear()
                data = np.load(req["inputs"])
                workload, steps = req["workload"], int(req["steps"])
                x = jnp.asarray(data["x"])
                w = jnp.asarray(data["w"])
                p = {name: jnp.asarray(data[name]) for name in PARAMS[workload]}
                loss = programs[workload]

                def objective(x, p, w, loss=loss, steps=steps):
                    return loss(x, p, w, steps)

                fn = jax.jit(jax.value_and_grad(objective, argnums=(0, 1)))
                t0 = time.perf_counter()
                compiled = fn.lower(x, p, w).compile()
                compile_s = time.perf_counter() - t0
                for _ in range(int(req.get("warmup", WARMUP))):
                    jax.block_until_ready(compiled(x, p, w))
                state.update(fn=compiled, args=(x, p, w), workload=workload)
                reply({"ok": True, "compile_s": compile_s, "dtype": str(x.dtype)})
            elif cmd == "time":
                fn, args = state["fn"], state["args"]
                c0, t0 = _cpu_seconds(), time.perf_counter()
                jax.block_until_ready(fn(*args))
                wall = time.perf_counter() - t0
                reply({"ok": True, "ms": wall * 1e3, **_cpu_use(c0, wall)})
            elif cmd == "save":
                fn, args = state["fn"], state["args"]
                value, (gx, gp) = fn(*args)
                out = {"loss": np.asarray(value), "x": np.asarray(gx)}
                out.update({name: np.asarray(g) for name, g in gp.items()})
                np.savez(req["path"], **out)
                reply({"ok": True})
            else:
                reply({"ok": False, "error": f"unknown command {cmd!r}"})
        except Exception:  # report to the parent, keep serving
            reply({"ok": False, "error": traceback.format_exc()})
    return 0


class JaxWorker:
    """A worker process for one JAX thread count, driven over its stdin/stdout."""

    def __init__(self, threads: int, x64: bool = False, xla_flags: bool = False) -> None:
        self.threads = threads
        env = dict(os.environ)
        if threads == 1 and xla_flags:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + ONE_THREAD_XLA_FLAGS).strip()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--jax-worker",
               "--jax-threads", str(threads)] + (["--x64"] if x64 else [])
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        self.info = self._read()

    def _read(self) -> dict:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(MARK):
                reply = json.loads(line[len(MARK):])
                if not reply.get("ok"):
                    raise RuntimeError(f"JAX worker ({self.threads} thread(s)): {reply['error']}")
                return reply
        raise RuntimeError(f"JAX worker ({self.threads} thread(s)) exited with status "
                           f"{self.proc.wait()}")

    def request(self, **req: Any) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


# --------------------------------------------------------------------------------------------
# The energyc side
# --------------------------------------------------------------------------------------------


def compile_energy(path: Path, outdir: Path) -> float:
    """`energyc compile path -o outdir`; return the wall time in seconds."""
    cmd = [sys.executable, "-m", "energyc", "compile", str(path), "-o", str(outdir), "-q"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"energyc compile {path} failed with exit status {proc.returncode}")
    return elapsed


def import_generated(outdir: Path, package: str) -> ModuleType:
    """Import the freshly generated ``package`` from ``outdir`` (and nowhere else)."""
    for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        del sys.modules[name]
    sys.path.insert(0, str(outdir))
    try:
        module = importlib.import_module(package)
    finally:
        sys.path.remove(str(outdir))
    origin = Path(module.__file__ or "").resolve()
    if outdir.resolve() not in origin.parents:
        raise SystemExit(f"imported {package} from {origin}, not from {outdir}")
    return module


@dataclass
class Problem:
    """One workload at one size: the energyc step and the arrays the JAX side loads."""

    workload: str
    sizes: dict[str, int]
    params: dict[str, torch.Tensor]  # by the names of PARAMS[workload]
    x: torch.Tensor
    w: torch.Tensor
    forward: Any  # x -> final state, torch
    layer: torch.nn.Module

    @property
    def tokens(self) -> int:
        return self.sizes["T"]

    def step(self) -> list[torch.Tensor]:
        """Loss and its gradients w.r.t. x and every parameter (x first)."""
        import torch

        inputs = [self.x, *self.params.values()]
        loss = (self.forward(self.x) * self.w).sum()
        return [loss.detach(), *torch.autograd.grad(loss, inputs)]

    def save_inputs(self, path: Path) -> None:
        arrays = {"x": self.x, "w": self.w, **self.params}
        np.savez(path, **{k: v.detach().cpu().numpy() for k, v in arrays.items()})


def make_problem(workload: str, module: ModuleType, sizes: dict[str, int], dtype: torch.dtype,
                 seed: int) -> Problem:
    """Weights (the Layer's initialisation, the LayerNorm's perturbed from 1 and 0), x and w."""
    import torch

    torch.manual_seed(seed)
    B, T, D, H, K = (sizes[k] for k in "BTDHK")
    if workload == "et":
        layer = module.Layer(D=D, H=H, K=K, M=sizes["M"], eta=ET_ETA, steps=1, dtype=dtype)
        ln_w = torch.nn.Parameter(1 + 0.1 * torch.randn(D, dtype=dtype))
        ln_b = torch.nn.Parameter(0.1 * torch.randn(D, dtype=dtype))
        params = {"W_q": layer.W_q, "W_k": layer.W_k, "Xi": layer.Xi, "ln_w": ln_w, "ln_b": ln_b}
        steps = sizes["steps"]

        def forward(x: torch.Tensor) -> torch.Tensor:
            for _ in range(steps):
                g = torch.nn.functional.layer_norm(x, (D,), ln_w, ln_b, eps=LN_EPS)
                x = x + (layer(g) - g)
            return x
    else:
        layer = module.Layer(D=D, H=H, K=K, eta=CEM_ETA, dtype=dtype)
        params = {"W_q": layer.W_q, "W_k": layer.W_k}
        forward = layer
    x = torch.randn(B, T, D, dtype=dtype, requires_grad=True)
    w = torch.randn(B, T, D, dtype=dtype)
    return Problem(workload, dict(sizes), params, x, w, forward, layer)


# --------------------------------------------------------------------------------------------
# Correctness (float64)
# --------------------------------------------------------------------------------------------


def check_correctness(modules: dict[str, ModuleType], workloads: list[str], tmp: Path,
                      out: list[str]) -> bool:
    """energyc and JAX in float64 at a small size: loss and every gradient within CHECK_TOL."""
    import torch

    worker = JaxWorker(threads=1, x64=True)
    ok = True
    try:
        for workload in workloads:
            sizes = ET_CHECK if workload == "et" else CEM_CHECK
            problem = make_problem(workload, modules[workload], sizes, torch.float64, seed=0)
            inputs, results = tmp / f"check_{workload}_in.npz", tmp / f"check_{workload}_out.npz"
            problem.save_inputs(inputs)
            worker.request(cmd="setup", workload=workload, inputs=str(inputs),
                           steps=sizes.get("steps", 1), warmup=0)
            worker.request(cmd="save", path=str(results))
            ref = np.load(results)
            mine = problem.step()
            names = ["loss", "x", *PARAMS[workload]]
            cells = []
            for name, value in zip(names, mine):
                a, b = value.numpy(), ref[name]
                scale = max(1.0, float(np.abs(b).max()))
                diff = float(np.abs(a - b).max())
                ok &= bool(diff <= CHECK_TOL * scale)  # False for NaN too
                cells.append(f"{'d/d' + name if name != 'loss' else 'loss'} {diff:.1e}")
            dims = " ".join(f"{k}={v}" for k, v in sizes.items())
            out.append(f"- {workload} ({dims}): max |energyc - JAX|: {', '.join(cells)}")
    finally:
        worker.close()
    out.append(f"- tolerance {CHECK_TOL:g} x max(1, max |JAX value|): "
               f"{'PASS' if ok else 'FAIL'}")
    return ok


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


@dataclass
class Series:
    """The timed calls of one variant."""

    ms: list[float] = field(default_factory=list)
    cpu_ratio: list[float] = field(default_factory=list)
    sys_share: list[float] = field(default_factory=list)
    compile_s: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.ms)


def time_torch(problem: Problem, threads: int) -> dict[str, float]:
    """One energyc call at ``threads`` torch threads: ms, CPU time / wall time, system share."""
    import torch

    torch.set_num_threads(threads)
    c0, t0 = _cpu_seconds(), time.perf_counter()
    problem.step()
    wall = time.perf_counter() - t0
    return {"ms": wall * 1e3, **_cpu_use(c0, wall)}


def run_size(problem: Problem, workers: dict[int, JaxWorker], threads: list[int], repeats: int,
             tmp: Path, log: Any) -> dict[tuple[str, int], Series]:
    """Warm up and time every variant of one problem, round-robin."""
    import torch

    inputs = tmp / f"{problem.workload}_{problem.tokens}.npz"
    problem.save_inputs(inputs)
    series: dict[tuple[str, int], Series] = {}
    for n in threads:
        log(f"  JAX, {n} thread(s): trace + compile + {WARMUP} warm-up calls")
        reply = workers[n].request(cmd="setup", workload=problem.workload, inputs=str(inputs),
                                   steps=problem.sizes.get("steps", 1), warmup=WARMUP)
        series[("jax", n)] = Series(compile_s=reply["compile_s"])
    for n in threads:
        log(f"  energyc, {n} thread(s): {WARMUP} warm-up calls")
        torch.set_num_threads(n)
        for _ in range(WARMUP):
            problem.step()
        series[("energyc", n)] = Series()
    order = [("energyc", n) for n in threads] + [("jax", n) for n in threads]
    for rep in range(repeats):
        shift = rep % len(order)
        for side, n in order[shift:] + order[:shift]:
            time.sleep(0.01)  # let the other side's idle threads stop spinning
            if side == "energyc":
                reply = time_torch(problem, n)
            else:
                reply = workers[n].request(cmd="time")
            series[(side, n)].ms.append(reply["ms"])
            series[(side, n)].cpu_ratio.append(reply["cpu_ratio"])
            series[(side, n)].sys_share.append(reply["sys_share"])
        log(f"  repetition {rep + 1}/{repeats}: " + ", ".join(
            f"{side} {n}t {series[(side, n)].ms[-1]:.1f} ms" for side, n in order))
    return series


def best(series: dict[tuple[str, int], Series], side: str) -> tuple[int, float]:
    """(threads, median ms) of the fastest thread count of one side."""
    return min(((n, s.median) for (sd, n), s in series.items() if sd == side),
               key=lambda item: item[1])


# --------------------------------------------------------------------------------------------
# Profile
# --------------------------------------------------------------------------------------------


@dataclass
class ProfileShare:
    total_ms: float
    gemm_ms: float
    attention_ms: float
    wall_ms: float
    steps: int
    top: list[tuple[str, float, float]]  # (op, self ms per step, calls per step)

    @property
    def outside(self) -> float:
        """Share outside GEMM ops and the fused attention kernels."""
        return 1 - (self.gemm_ms + self.attention_ms) / self.total_ms

    @property
    def outside_gemm(self) -> float:
        """Share outside GEMM ops (the attention kernels counted as outside)."""
        return 1 - self.gemm_ms / self.total_ms


def profile_step(problem: Problem, threads: int, steps: int) -> ProfileShare:
    """Self CPU time per op of ``steps`` energyc steps under torch.profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(threads)
    problem.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            problem.step()
        wall_ms = (time.perf_counter() - t0) * 1e3
    total = gemm = attention = 0.0
    others = []
    for event in prof.key_averages():
        ms = event.self_cpu_time_total / 1e3
        total += ms
        if event.key in GEMM_OPS:
            gemm += ms
        elif any(mark in event.key for mark in ATTENTION_MARKS):
            attention += ms
        else:
            others.append((event.key, ms / steps, event.count / steps))
    others.sort(key=lambda item: -item[1])
    return ProfileShare(total, gemm, attention, wall_ms, steps, others[:10])


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def machine_line() -> str:
    """CPU, logical CPUs, versions, load (the same CPU name energyc.bench.machine reads)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh
                        if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        from importlib.metadata import version

        jax_version = f"jax {version('jax')}, jaxlib {version('jaxlib')}"
    except Exception:  # not installed: the workers will say so
        jax_version = "jax not installed"
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return (f"Machine: {cpu} ({os.cpu_count()} logical CPUs); torch {torch.__version__}; "
            f"{jax_version}; Python {platform.python_version()}. Date: {date}.")


def table(rows: list[dict[tuple[str, int], Series]], tokens: list[int],
          threads: list[int]) -> list[str]:
    """The markdown table of one workload: one row per size."""
    per_thread = " / ".join(f"{n}t" for n in threads)
    header = ["tokens", "energyc ms (threads)", "JAX ms (threads)", "speed-up",
              f"energyc {per_thread} ms", f"JAX {per_thread} ms", "JAX compile s",
              f"CPU/wall energyc; JAX ({per_thread})", "system share of CPU energyc; JAX"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * 7 + "---|---|"]

    def per_side(series: dict, what: str, fmt: str) -> str:
        return "; ".join(" / ".join(format(statistics.median(getattr(series[(side, n)], what)),
                                           fmt) for n in threads) for side in ("energyc", "jax"))

    for t, series in zip(tokens, rows):
        (en, ems), (jn, jms) = best(series, "energyc"), best(series, "jax")
        lines.append("| " + " | ".join([
            str(t), f"{ems:.1f} ({en})", f"{jms:.1f} ({jn})", f"{jms / ems:.2f}x",
            " / ".join(f"{series[('energyc', n)].median:.1f}" for n in threads),
            " / ".join(f"{series[('jax', n)].median:.1f}" for n in threads),
            " / ".join(f"{series[('jax', n)].compile_s:.1f}" for n in threads),
            per_side(series, "cpu_ratio", ".2f"), per_side(series, "sys_share", ".0%"),
        ]) + " |")
    return lines


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", nargs="+", choices=["et", "cem"], default=["et", "cem"])
    p.add_argument("--quick", action="store_true",
                   help="small sizes and 2 repeats: a smoke test, not the issue's sizes")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repetitions per size (default 7; 5 at 2048+ tokens; --quick 2)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], metavar="N",
                   help="thread counts for each side (default 1 2)")
    p.add_argument("--cem-tokens", type=int, nargs="+", default=None, metavar="T",
                   help=f"cem_attention token counts (default {' '.join(map(str, CEM_TOKENS))})")
    p.add_argument("--profile-steps", type=int, default=3, metavar="N",
                   help="energyc ET steps under torch.profiler (default 3)")
    p.add_argument("--write", action="store_true",
                   help=f"write the section {SECTION!r} into benchmarks/RESULTS.md")
    p.add_argument("--results", default=str(RESULTS), metavar="PATH",
                   help="the file --write edits (default benchmarks/RESULTS.md)")
    p.add_argument("--jax-xla-flags", action="store_true",
                   help=f"also set XLA_FLAGS=\"{ONE_THREAD_XLA_FLAGS}\" for the 1-thread JAX "
                        "worker (default: its CPU affinity alone limits it)")
    p.add_argument("--jax-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--jax-threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--x64", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("repeats", "profile_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if any(n < 1 or n > len(os.sched_getaffinity(0)) for n in args.threads):
        p.error(f"--threads: each must be between 1 and {len(os.sched_getaffinity(0))}")
    args.threads = sorted(set(args.threads))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.jax_worker:
        return jax_worker(args.jax_threads, args.x64)

    if importlib.util.find_spec("jax") is None:
        print("bench_jax.py: error: jax is not installed (pip install -e \".[bench]\", or "
              "pip install \"jax[cpu]\")", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))  # energyc from this checkout
    os.chdir(ROOT)
    import torch

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    command = shlex.join(["python", "benchmarks/bench_jax.py",
                          *(sys.argv[1:] if argv is None else argv)])
    out: list[str] = [SECTION, "", machine_line(), "", f"Command: `{command}`", ""]

    def emit(*lines: str) -> None:
        out.extend(lines)
        print("\n".join(lines), flush=True)

    print("\n".join(out), flush=True)
    load0 = os.getloadavg()
    threads = args.threads
    with tempfile.TemporaryDirectory(prefix="bench_jax_") as tmpname:
        tmp = Path(tmpname)
        files = {"et": ET_FILE, "cem": CEM_FILE}
        packages = {"et": "et_block", "cem": "cem_attention"}
        modules, compile_s = {}, {}
        for workload in args.workloads:
            compile_s[workload] = compile_energy(files[workload], tmp / "generated")
            modules[workload] = import_generated(tmp / "generated", packages[workload])
        emit("- energyc compile: " + ", ".join(
            f"`{files[w]}` {compile_s[w]:.1f} s" for w in args.workloads)
            + " (`python -m energyc compile`, into a temporary folder the Layers are imported "
              "from)")

        check: list[str] = []
        ok = check_correctness(modules, args.workloads, tmp, check)
        emit("- correctness, float64 (the loss and every gradient, energyc vs JAX with "
             "jax_enable_x64):", *(f"  {line}" for line in check))
        if not ok:
            emit("", f"ERROR: energyc and JAX disagree beyond {CHECK_TOL:g}; not timing.")
            return 1

        workers = {n: JaxWorker(n, xla_flags=args.jax_xla_flags) for n in threads}
        try:
            emit("- threads: torch `torch.set_num_threads(n)` in this process before each call; "
                 "JAX n threads: a worker process restricted to n CPUs (sched_setaffinity before "
                 "jax starts; " + "; ".join(
                     f"{n}: CPU(s) {w.info['cpus']}, XLA_FLAGS="
                     + (f"\"{w.info['xla_flags']}\"" if w.info["xla_flags"] else "unset")
                     for n, w in workers.items())
                 + "; the XLA thread flags alone do not limit XLA's threads on jax "
                 f"{workers[threads[0]].info['jax']}); CPU/wall = process CPU time / wall time "
                 "of a call (median): the parallelism it got; system share: the kernel's share "
                 "of that CPU time (page faults of fresh buffers, thread wake-ups)")
            emit(f"- timing: {WARMUP} warm-up calls per variant (JAX: after trace + lower + "
                 "compile, timed separately as `JAX compile s`), then the repetitions "
                 "round-robin over every side and thread count with a rotating start (JAX calls "
                 "are requests to the workers, made while this process waits), median; a call "
                 "= forward + gradient of the loss w.r.t. the input and every weight, fp32; "
                 "speed-up = JAX ms / energyc ms, each side at its best thread count (> 1: "
                 "energyc faster)")
            emit(f"- load average (1, 5, 15 min) at start: {', '.join(f'{v:.2f}' for v in load0)}"
                 " (a shared 2-core machine: ratios of interleaved medians are meaningful, "
                 "absolute times less so)")

            et_result = cem_results = None
            if "et" in args.workloads:
                sizes = ET_QUICK if args.quick else ET_FULL
                repeats = args.repeats or (2 if args.quick else 7)
                log(f"Energy Transformer block: {sizes}, {repeats} repeats")
                problem = make_problem("et", modules["et"], sizes, torch.float32, seed=1)
                series = run_size(problem, workers, threads, repeats, tmp, log)
                en, _ = best(series, "energyc")
                log(f"  profile: {args.profile_steps} energyc steps at {en} thread(s)")
                share = profile_step(problem, en, args.profile_steps)
                et_result = (series, share, sizes, repeats)
                del problem
                emit("", *et_section(et_result, threads, args.quick))

            if "cem" in args.workloads:
                tokens = args.cem_tokens or list(CEM_TOKENS_QUICK if args.quick else CEM_TOKENS)
                dims = CEM_QUICK if args.quick else CEM_FULL
                rows, reps = [], []
                for t in tokens:
                    repeats = args.repeats or (2 if args.quick else (7 if t < 2048 else 5))
                    log(f"cem_attention: T={t} {dims}, {repeats} repeats")
                    problem = make_problem("cem", modules["cem"], {**dims, "T": t},
                                           torch.float32, seed=2)
                    rows.append(run_size(problem, workers, threads, repeats, tmp, log))
                    reps.append(repeats)
                    del problem
                cem_results = (rows, tokens, dims, reps)
                emit("", *cem_section(cem_results, threads, args.quick))
        finally:
            for worker in workers.values():
                worker.close()

    load1 = os.getloadavg()
    emit("", f"Load average at the end: {', '.join(f'{v:.2f}' for v in load1)}.")
    if args.write:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from bench_examples import write_section

        write_section(args.results, "\n".join(out) + "\n")
        print(f"wrote the section {SECTION!r} of {args.results}")
    return 0


def et_section(result: tuple, threads: list[int], quick: bool) -> list[str]:
    series, share, sizes, repeats = result
    s = sizes
    lines = [
        f"### Energy Transformer block{' (--quick sizes)' if quick else ''}",
        "",
        f"Batch {s['B']}, {s['T']} tokens, D={s['D']}, {s['H']} heads of K={s['K']}, "
        f"{s['M']} memories, {s['steps']} descent steps (eta {ET_ETA}) through a shared "
        f"LayerNorm, fp32; gradient to x, W_q, W_k, Xi, LayerNorm weight and bias; {repeats} "
        "repetitions.",
        "",
        *table([series], [s["T"]], threads),
        "",
        f"Profile of the energyc step ({share.steps} training steps under torch.profiler at "
        f"{best(series, 'energyc')[0]} thread(s); {share.total_ms / share.steps:.0f} ms of op "
        f"self time per step, {share.wall_ms / share.steps:.0f} ms wall with the profiler): "
        f"GEMM ops {share.gemm_ms / share.total_ms:.1%}, fused CPU flash-attention kernels "
        f"{share.attention_ms / share.total_ms:.1%}, everything else {share.outside:.1%}. "
        "Top other ops (self ms per step, calls per step):",
        "",
        "| op | self ms / step | calls / step | share |",
        "|---|---:|---:|---:|",
        *(f"| `{name}` | {ms:.1f} | {calls:g} | {ms * share.steps / share.total_ms:.1%} |"
          for name, ms, calls in share.top),
        "",
    ]
    (_, ems), (_, jms) = best(series, "energyc"), best(series, "jax")
    speedup = jms / ems
    full = "" if not quick else " (at --quick sizes: not the issue's)"
    lines.append(
        f"Target (issue 14){full}: ET step >= {TARGET_ET_SPEEDUP}x faster than JAX: "
        f"{verdict(speedup >= TARGET_ET_SPEEDUP)} ({speedup:.2f}x); <= {TARGET_ET_OUTSIDE:.0%} "
        f"outside matrix products: {verdict(share.outside <= TARGET_ET_OUTSIDE)} "
        f"({share.outside:.1%} outside GEMMs and the fused attention kernels; "
        f"{share.outside_gemm:.1%} outside GEMM ops alone: "
        f"{verdict(share.outside_gemm <= TARGET_ET_OUTSIDE)})")
    return lines


def cem_section(result: tuple, threads: list[int], quick: bool) -> list[str]:
    rows, tokens, dims, reps = result
    lines = [
        f"### cem_attention{' (--quick sizes)' if quick else ''}",
        "",
        f"Batch {dims['B']}, D={dims['D']}, {dims['H']} heads of K={dims['K']}, one step "
        f"(eta {CEM_ETA}), fp32; gradient to x, W_q, W_k; "
        f"{', '.join(f'{r} repetitions at {t}' for r, t in zip(reps, tokens))} tokens.",
        "",
        *table(rows, tokens, threads),
        "",
    ]
    by_tokens = dict(zip(tokens, rows))
    verdicts = []
    for t, minimum in TARGET_CEM:
        if t not in by_tokens:
            verdicts.append(f"{t} tokens >= {minimum}x: not measured")
            continue
        speedup = best(by_tokens[t], "jax")[1] / best(by_tokens[t], "energyc")[1]
        verdicts.append(f"{t} tokens >= {minimum}x faster than JAX: "
                        f"{verdict(speedup >= minimum)} ({speedup:.2f}x)")
    full = "" if not quick else " (at --quick sizes: not the issue's)"
    lines.append(f"Target (issue 14){full}: " + "; ".join(verdicts))
    return lines


if __name__ == "__main__":
    sys.exit(main())
