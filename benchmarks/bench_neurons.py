"""Neuron models against their peers (issue 28): the Energy Transformer block with its LayerNorm
inside, and the three-layer digits associative memory, each as a training step, fp32 on the CPU.

1. **Energy Transformer block** (examples/energy_transformer_block.py, the generated
   ``energy_transformer_block_official`` Layer: the official code's self-inclusive log-sum-exp) at
   its published size: D=768, 12 heads of K=64, 3072 memories, 197 tokens, batch 1; 12 steps
   x <- x - 0.1 dE/dg, g = EnergyLayerNorm(x) (scalar gamma, vector delta, eps 1e-5); loss =
   sum(x_12^2), gradients to x, gamma, delta, W_q, W_k, Xi. Columns:

   - ``energyc``: the generated Layer (its dynamics and backward in one autograd Function);
   - ``JAX official``: ``jax.jit(jax.value_and_grad)`` of the official code
     (bhoov/energy-transformer-jax, ``architecture.py``: ``EnergyLayerNorm``,
     ``EnergyTransformer.energy``, and its image model's loop ``g = lnorm(x); x = x - alpha *
     jax.grad(et.energy)(g)``), its parameters as equinox pytrees (``eqx.partition``), when
     ``--et-official DIR`` names a checkout or its git directory (the file is read from there into
     a temporary folder at run time; nothing of it is in this repository);
   - ``JAX plain``: the same energy written in jax.numpy (einsum + logsumexp, batched),
     ``jax.grad`` of the energy inside the loop and ``jax.jit(jax.value_and_grad)`` of the loss;
   - ``torch autograd``: the same energy in PyTorch, ``torch.autograd.grad(E, g,
     create_graph=True)`` inside the 12 steps, then the loss's gradient.

2. **Digits memory** (examples/digits_memory.py): pixels (identity), hidden (softmax, beta),
   labels (softmax), two dense synapses, hamux's dynamics x_l <- x_l - (eta / tau_l)(x_l +
   dE/dg_l); batch 128, V=64, N=256, C=10, 8 steps of eta 0.5 from masked images (hidden and
   labels at 0); loss = cross-entropy of the label activation + mean squared error of the pixels,
   gradients to W and U. Columns: ``energyc`` (the generated Layer), ``hamux`` (the same model in
   hamux's own API: ``NeuronLayer`` with ``lagr_identity``/``lagr_softmax``, ``LinearSynapse``,
   ``HAM(...).vectorize()``, its step loop ``x - eta / tau * dEdact``, ``jax.jit(
   jax.value_and_grad)`` over ``eqx.partition``'s arrays), ``torch autograd``.

Correctness first: every column at a small size in float64 (JAX with jax_enable_x64) against
energyc, the loss and every gradient within 1e-12 x max(1, largest |value|); exit status 1
otherwise, before any timing.

Threads: each side at each of --threads (default 1 2), reported at its best. torch:
``torch.set_num_threads(n)`` in this process. JAX: a worker process per thread count restricted to
n CPUs with sched_setaffinity before jax is imported (``bench_jax.py`` found that XLA_FLAGS'
thread settings do not limit jax 0.10.2's threads; the affinity does); XLA_FLAGS is left as it is.
Timing: 2 warm-up calls per variant (JAX after its trace + compile, timed apart), then --repeats
rounds calling every variant once, round-robin with a rotating start; medians.

Profile: energyc's step at each thread count under torch.profiler: the share of op self time
outside matrix products (``bench_jax.GEMM_OPS``: mm, bmm, addmm, baddbmm, matmul, oneDNN's linear;
einsum's own self time, its permutes and reshapes, counts as outside), the top other ops, and the
time inside each generated step function (``_activation_forward``, ``_grad_forward``,
``_grad_backward``, ``_activation_backward``; inclusive).

    python benchmarks/bench_neurons.py --et-official /path/to/energy-transformer-jax
    python benchmarks/bench_neurons.py --quick          # tiny shapes: a smoke test (seconds)
    python benchmarks/bench_neurons.py --workloads digits --repeats 11
    python benchmarks/bench_neurons.py --write          # also into benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

try:
    from benchmarks import bench_jax as _bj
except ImportError:  # run as a script: benchmarks/ is sys.path[0]
    import bench_jax as _bj  # type: ignore[no-redef]

if TYPE_CHECKING:  # torch is imported lazily: the JAX workers run without it
    import torch

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Neuron models (`bench_neurons.py`)"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
MARK = "@@bench_neurons@@ "
# float64 agreement, relative to max(1, largest |value|): the bound for the peers (1e-12;
# tests/test_neuron_peers.py's PEER_TOL); bench_jax.py checks its own workloads to 1e-10
CHECK_TOL = 1e-12
WARMUP = 2
ET_ALPHA = 0.1
LN_EPS = 1e-5  # the official EnergyLayerNorm's default, and layernorm()'s
ENV_OFFICIAL = "ENERGYC_ET_OFFICIAL"

# issue 28's targets
TARGET_ET_SPEEDUP = 1.3  # energyc at least this much faster than JAX's jit(grad) of the official code
TARGET_ET_OUTSIDE = 0.15  # at most this share of energyc's step outside matrix products
TARGET_DIGITS_SPEEDUP = 2.0  # energyc at least this much faster than hamux's jit(grad)

ET_FULL = {"B": 1, "T": 197, "D": 768, "H": 12, "K": 64, "M": 3072, "steps": 12}
ET_QUICK = {"B": 1, "T": 17, "D": 32, "H": 2, "K": 16, "M": 64, "steps": 3}
ET_CHECK = {"B": 2, "T": 7, "D": 16, "H": 2, "K": 8, "M": 32, "steps": 12}
DIGITS_FULL = {"B": 128, "V": 64, "N": 256, "C": 10, "steps": 8}
DIGITS_QUICK = {"B": 16, "V": 16, "N": 32, "C": 4, "steps": 3}
DIGITS_CHECK = {"B": 4, "V": 12, "N": 20, "C": 4, "steps": 8}
DIGITS_ETA = 0.5  # examples/digits_memory.py's
DIGITS_BETA = 1.0  # its default beta
DIGITS_TAU = {"pixels": 1.0, "hidden": 1.0, "labels": 1.0}  # its default time constants
DIGITS_CHECK_BETA = 2.5  # the check runs other beta and tau than 1, so that a misplaced one shows
DIGITS_CHECK_TAU = {"pixels": 1.0, "hidden": 2.0, "labels": 0.5}
DIGITS_LAYERS = ("pixels", "hidden", "labels")

ET_NAMES = ("x", "gamma", "delta", "W_q", "W_k", "Xi")  # the gradients, in energyc's layout
DIGITS_NAMES = ("W", "U")


# --------------------------------------------------------------------------------------------
# The official Energy Transformer code, from a checkout or git directory named at run time
# --------------------------------------------------------------------------------------------


def official_source(path: str | os.PathLike) -> str:
    """The text of the official ``architecture.py`` from ``path``: a checkout of
    bhoov/energy-transformer-jax (a folder holding architecture.py) or a git directory of it (a
    bare mirror, or a checkout's .git), read with ``git show HEAD:architecture.py``."""
    path = Path(path)
    if (path / "architecture.py").is_file():
        return (path / "architecture.py").read_text(encoding="utf-8")
    proc = subprocess.run(["git", "--git-dir", str(path), "show", "HEAD:architecture.py"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"--et-official {path}: neither a folder with architecture.py nor a git "
                         f"directory holding it ({proc.stderr.strip()})")
    return proc.stdout


def official_commit(path: str | os.PathLike) -> str | None:
    """The commit of the official code at ``path`` (a git directory, or a checkout), or None."""
    path = Path(path)
    git = ["--git-dir", str(path)] if not (path / "architecture.py").is_file() else \
        ["-C", str(path)]
    proc = subprocess.run(["git", *git, "rev-parse", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def write_official(path: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """Write the official ``architecture.py`` (from a checkout or git directory) into ``folder``
    and return the file's path."""
    out = Path(folder) / "architecture.py"
    out.write_text(official_source(path), encoding="utf-8")
    return out


def import_official(file: str | os.PathLike) -> ModuleType:
    """Import the official ``architecture.py`` at ``file`` under a name of its own."""
    spec = importlib.util.spec_from_file_location("_et_official_architecture", str(file))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------
# The JAX side (worker processes; no torch here)
# --------------------------------------------------------------------------------------------


def et_plain_loss(jax: Any, jnp: Any) -> Any:
    """loss(x, p, steps) of the ET block in jax.numpy as a JAX user writes it (batched)."""

    def layer_norm(x, gamma, delta):
        xm = x - x.mean(-1, keepdims=True)
        return gamma * xm / jnp.sqrt((xm * xm).mean(-1, keepdims=True) + LN_EPS) + delta

    def energy(g, p):
        beta = 1.0 / math.sqrt(p["W_q"].shape[1])
        q = jnp.einsum("btd,hkd->bhtk", g, p["W_q"])
        k = jnp.einsum("btd,hkd->bhtk", g, p["W_k"])
        attention = jax.nn.logsumexp(beta * jnp.einsum("bhik,bhjk->bhij", q, k), axis=-1)
        h = jax.nn.relu(jnp.einsum("btd,md->btm", g, p["Xi"]))
        return -attention.sum() / beta - 0.5 * (h * h).sum()

    def loss(x, p, steps):
        for _ in range(steps):
            g = layer_norm(x, p["gamma"], p["delta"])
            x = x - ET_ALPHA * jax.grad(energy)(g, p)
        return (x * x).sum()

    return loss


def et_official_model(official: ModuleType, sizes: dict[str, int], arrays: dict[str, Any]):
    """(et, lnorm): the official modules at ``sizes`` holding ``arrays`` (energyc's layout:
    W_q, W_k (H, K, D), Xi (M, D), gamma, delta); the official Xi is (D, M)."""
    import equinox as eqx
    import jax.random as jr

    D, K, H, M = (sizes[k] for k in "DKHM")
    config = official.ETConfig(D=D, Y=K, n_heads=H, scale_mems=M / D)
    et = official.EnergyTransformer(jr.PRNGKey(0), config)
    lnorm = official.EnergyLayerNorm(D, use_bias=True, eps=LN_EPS)
    et = eqx.tree_at(lambda m: (m.attn.Wq, m.attn.Wk, m.hn.Xi), et,
                     (arrays["W_q"], arrays["W_k"], arrays["Xi"].T))
    lnorm = eqx.tree_at(lambda m: (m.gamma, m.delta), lnorm, (arrays["gamma"], arrays["delta"]))
    return et, lnorm


def et_official_loss(jax: Any) -> Any:
    """loss(x, (et, lnorm), steps): the official image model's loop on each batch row."""

    def one(x, model, steps):
        et, lnorm = model
        for _ in range(steps):
            g = lnorm(x)
            x = x - ET_ALPHA * jax.grad(et.energy)(g)
        return (x * x).sum()

    def loss(x, model, steps):
        if x.shape[0] == 1:  # the official code takes one image's tokens (N, D)
            return one(x[0], model, steps)
        return jax.vmap(lambda r: one(r, model, steps))(x).sum()

    return loss


def digits_hamux_model(sizes: dict[str, int], W: Any, U: Any, beta: float) -> Any:
    """The digits memory in hamux's API (vectorized over the batch). hamux's ``LinearSynapse``
    is E = -xhat1 . W xhat2 with W (d1, d2): (hidden, pixels) with W (N, V) and (hidden, labels)
    with U (N, C) are energyc's -h . (W v) and -h . (U c)."""
    import functools

    import hamux as hmx

    V, N, C = (sizes[k] for k in "VNC")
    neurons = {
        "pixels": hmx.NeuronLayer(hmx.lagr_identity, (V,)),
        "hidden": hmx.NeuronLayer(functools.partial(hmx.lagr_softmax, beta=beta), (N,)),
        "labels": hmx.NeuronLayer(hmx.lagr_softmax, (C,)),
    }
    synapses = {"pixels_hidden": hmx.LinearSynapse(W), "hidden_labels": hmx.LinearSynapse(U)}
    connections = [(("hidden", "pixels"), "pixels_hidden"), (("hidden", "labels"), "hidden_labels")]
    return hmx.HAM(neurons, synapses, connections).vectorize()


def hamux_dynamics(jax: Any, ham: Any, xs: dict, steps: int, eta: float, tau: dict,
                   clamp: tuple[str, ...] = ()) -> dict:
    """hamux's step loop: x_l <- x_l - (eta / tau_l) dE/dxhat_l (``dEdact``: the Legendre term's
    x_l plus the synapses'), clamped layers held."""
    for _ in range(steps):
        xhats = ham.activations(xs)
        grads = ham.dEdact(xhats, xs)
        xs = {k: xs[k] if k in clamp else xs[k] - (eta / tau[k]) * grads[k] for k in xs}
    return xs


def digits_hamux_loss(jax: Any, jnp: Any) -> Any:
    def loss(ham, data, steps, eta, tau):
        xs = {"pixels": data["x_pixels"], "hidden": data["x_hidden"], "labels": data["x_labels"]}
        xs = hamux_dynamics(jax, ham, xs, steps, eta, tau)
        xhats = ham.activations(xs)
        ce = -(data["onehot"] * jnp.log(xhats["labels"])).sum(-1).mean()
        return ce + ((xhats["pixels"] - data["image"]) ** 2).mean()

    return loss


def build_program(kind: str, jax: Any, jnp: Any, data: dict[str, np.ndarray], cfg: dict,
                  official_file: str | None) -> tuple[Any, tuple, Any]:
    """(jitted value_and_grad, its arguments, gradients -> {name: array in energyc's layout})."""
    import equinox as eqx

    sizes, steps = cfg["sizes"], int(cfg["sizes"]["steps"])
    arr = {k: jnp.asarray(v) for k, v in data.items()}
    if kind == "et_plain":
        loss = et_plain_loss(jax, jnp)
        p = {k: arr[k] for k in ET_NAMES[1:]}
        fn = jax.jit(jax.value_and_grad(lambda x, p: loss(x, p, steps), argnums=(0, 1)))

        def unpack(grads):
            gx, gp = grads
            return {"x": gx, **gp}

        return fn, (arr["x"], p), unpack
    if kind == "et_official":
        if official_file is None:
            raise RuntimeError("et_official: no --et-official given")
        official = import_official(official_file)
        model = et_official_model(official, sizes, arr)
        params, static = eqx.partition(model, eqx.is_array)
        loss = et_official_loss(jax)
        fn = jax.jit(jax.value_and_grad(
            lambda x, params: loss(x, eqx.combine(params, static), steps), argnums=(0, 1)))

        def unpack(grads):
            gx, (g_et, g_ln) = grads
            return {"x": gx, "gamma": g_ln.gamma, "delta": g_ln.delta, "W_q": g_et.attn.Wq,
                    "W_k": g_et.attn.Wk, "Xi": g_et.hn.Xi.T}

        return fn, (arr["x"], params), unpack
    if kind == "digits_hamux":
        ham = digits_hamux_model(sizes, arr["W"], arr["U"], float(cfg["beta"]))
        params, static = eqx.partition(ham, eqx.is_array)
        loss = digits_hamux_loss(jax, jnp)
        tau = {k: float(v) for k, v in cfg["tau"].items()}
        batch = {k: arr[k] for k in ("x_pixels", "x_hidden", "x_labels", "onehot", "image")}
        fn = jax.jit(jax.value_and_grad(
            lambda params, batch: loss(eqx.combine(params, static), batch, steps,
                                       float(cfg["eta"]), tau)))

        def unpack(grads):
            syn = grads.hypersynapses
            return {"W": syn["pixels_hidden"].W, "U": syn["hidden_labels"].W}

        return fn, (params, batch), unpack
    raise RuntimeError(f"unknown program {kind!r}")


def jax_worker(threads: int, x64: bool, official_file: str | None) -> int:
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

    programs: dict[str, Any] = {}

    def reply(obj: dict) -> None:
        sys.stdout.write(MARK + json.dumps(obj) + "\n")
        sys.stdout.flush()

    versions = {"jax": jax.__version__}
    for name in ("equinox", "hamux"):
        try:
            versions[name] = importlib.import_module(name).__version__
        except Exception:  # not installed: its programs fail when asked for
            versions[name] = None
    reply({"ok": True, "cpus": cpus, "xla_flags": os.environ.get("XLA_FLAGS", ""), **versions})
    for line in sys.stdin:
        req = json.loads(line)
        try:
            cmd = req["cmd"]
            if cmd == "quit":
                break
            if cmd == "setup":
                data = dict(np.load(req["inputs"]))
                fn, args, unpack = build_program(req["program"], jax, jnp, data, req["cfg"],
                                                 official_file)
                t0 = time.perf_counter()
                compiled = fn.lower(*args).compile()
                compile_s = time.perf_counter() - t0
                for _ in range(int(req.get("warmup", WARMUP))):
                    jax.block_until_ready(compiled(*args))
                programs[req["name"]] = (compiled, args, unpack)
                reply({"ok": True, "compile_s": compile_s})
            elif cmd == "time":  # n calls; the mean per call
                fn, args, _ = programs[req["name"]]
                n = int(req.get("n", 1))
                c0, t0 = _bj._cpu_seconds(), time.perf_counter()
                for _ in range(n):
                    jax.block_until_ready(fn(*args))
                wall = time.perf_counter() - t0
                reply({"ok": True, "ms": wall * 1e3 / n, **_bj._cpu_use(c0, wall)})
            elif cmd == "save":
                fn, args, unpack = programs[req["name"]]
                value, grads = fn(*args)
                out = {"loss": np.asarray(value)}
                out.update({k: np.asarray(v) for k, v in unpack(grads).items()})
                np.savez(req["path"], **out)
                reply({"ok": True})
            else:
                reply({"ok": False, "error": f"unknown command {cmd!r}"})
        except Exception:  # report to the parent, keep serving
            reply({"ok": False, "error": traceback.format_exc()})
    return 0


class JaxWorker:
    """A worker process for one JAX thread count, driven over its stdin/stdout."""

    def __init__(self, threads: int, x64: bool = False, official_file: Path | None = None):
        self.threads = threads
        cmd = [sys.executable, str(Path(__file__).resolve()), "--jax-worker",
               "--jax-threads", str(threads)] + (["--x64"] if x64 else [])
        if official_file is not None:
            cmd += ["--official-file", str(official_file)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE,
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
# The torch side: energyc's generated Layers and torch autograd
# --------------------------------------------------------------------------------------------


def generated(package: str) -> ModuleType:
    """A generated package of this checkout (``generated/<package>``)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(f"generated.{package}")


@dataclass
class Problem:
    """One workload at one size: its arrays (what the JAX side loads) and the torch variants."""

    workload: str
    sizes: dict[str, int]
    arrays: dict[str, np.ndarray]
    cfg: dict
    variants: dict[str, Any]  # name -> callable() returning [loss, *gradients] (torch)
    names: tuple[str, ...]  # the gradients' names
    layer: Any  # energyc's Layer

    def save_inputs(self, path: Path) -> None:
        np.savez(path, **self.arrays)


def et_problem(sizes: dict[str, int], dtype: torch.dtype, seed: int) -> Problem:
    """The ET block: the Layer's initialisation, gamma and delta perturbed from 1 and 0."""
    import torch
    from torch.nn import functional

    torch.manual_seed(seed)
    B, T, D, H, K, M, steps = (sizes[k] for k in ("B", "T", "D", "H", "K", "M", "steps"))
    module = generated("energy_transformer_block_official")
    layer = module.Layer(D=D, H=H, K=K, M=M, eta=ET_ALPHA, steps=steps, backend="torch",
                         dtype=dtype)
    with torch.no_grad():
        layer.gamma.fill_(1.0 + 0.1 * float(torch.randn(())))
        layer.delta.copy_(0.1 * torch.randn(D, dtype=dtype))
    x = torch.randn(B, T, D, dtype=dtype, requires_grad=True)
    params = {"gamma": layer.gamma, "delta": layer.delta, "W_q": layer.W_q, "W_k": layer.W_k,
              "Xi": layer.Xi}
    inputs = [x, *params.values()]

    def energyc() -> list[torch.Tensor]:
        y = layer(x)
        loss = (y * y).sum()
        return [loss.detach(), *torch.autograd.grad(loss, inputs)]

    beta = 1.0 / math.sqrt(K)

    def energy(g: torch.Tensor) -> torch.Tensor:
        q = torch.einsum("btd,hkd->bhtk", g, layer.W_q)
        k = torch.einsum("btd,hkd->bhtk", g, layer.W_k)
        attention = torch.logsumexp(beta * q @ k.transpose(-1, -2), dim=-1)
        h = torch.relu(g @ layer.Xi.T)
        return -attention.sum() / beta - 0.5 * (h * h).sum()

    def autograd() -> list[torch.Tensor]:
        y = x
        for _ in range(steps):
            g = functional.layer_norm(y, (D,), eps=LN_EPS) * layer.gamma + layer.delta
            (dg,) = torch.autograd.grad(energy(g), g, create_graph=True)
            y = y - ET_ALPHA * dg
        loss = (y * y).sum()
        return [loss.detach(), *torch.autograd.grad(loss, inputs)]

    arrays = {"x": x, **params}
    return Problem("et", dict(sizes), {k: v.detach().numpy() for k, v in arrays.items()},
                   {"sizes": dict(sizes)}, {"energyc": energyc, "torch": autograd}, ET_NAMES,
                   layer)


def digits_problem(sizes: dict[str, int], dtype: torch.dtype, seed: int, beta: float,
                   tau: dict[str, float]) -> Problem:
    """The digits memory: the Layer's initialisation; random images with about a third of the
    pixels masked (0) as the pixels' initial state, hidden and labels at 0; random labels."""
    import torch

    torch.manual_seed(seed)
    B, V, N, C, steps = (sizes[k] for k in ("B", "V", "N", "C", "steps"))
    module = generated("digits_memory")
    layer = module.Layer(V=V, N=N, C=C, beta=beta, eta=DIGITS_ETA, steps=steps, tau=tau,
                         backend="torch", dtype=dtype)
    image = torch.rand(B, 1, V, dtype=dtype)
    visible = (torch.rand(B, 1, V) > 1 / 3).to(dtype)
    states = [image * visible, torch.zeros(B, 1, N, dtype=dtype),
              torch.zeros(B, 1, C, dtype=dtype)]
    target = torch.randint(0, C, (B,))
    onehot = torch.nn.functional.one_hot(target, C).to(dtype)[:, None]
    params = [layer.W, layer.U]

    def loss_of(x_pixels: torch.Tensor, x_labels: torch.Tensor) -> torch.Tensor:
        ce = -(onehot * torch.log_softmax(x_labels, dim=-1)).sum(-1).mean()
        return ce + ((x_pixels - image) ** 2).mean()

    def energyc() -> list[torch.Tensor]:
        xv, _, xc = layer(*states)
        loss = loss_of(xv, xc)
        return [loss.detach(), *torch.autograd.grad(loss, params)]

    etas = [DIGITS_ETA / tau[name] for name in DIGITS_LAYERS]

    def autograd() -> list[torch.Tensor]:
        xs = [s.clone().requires_grad_(True) for s in states]  # dE/dg of a leaf at step 1
        for _ in range(steps):
            gv, gh, gc = xs[0] * 1.0, torch.softmax(beta * xs[1], -1), torch.softmax(xs[2], -1)
            E = -(gh * (gv @ layer.W.T)).sum() - (gh * (gc @ layer.U.T)).sum()
            ds = torch.autograd.grad(E, [gv, gh, gc], create_graph=True)
            xs = [x - eta * (x + d) for x, d, eta in zip(xs, ds, etas)]
        loss = loss_of(xs[0], xs[2])
        return [loss.detach(), *torch.autograd.grad(loss, params)]

    arrays = {"x_pixels": states[0][:, 0], "x_hidden": states[1][:, 0],
              "x_labels": states[2][:, 0], "onehot": onehot[:, 0], "image": image[:, 0],
              "W": layer.W, "U": layer.U}
    cfg = {"sizes": dict(sizes), "beta": beta, "eta": DIGITS_ETA, "tau": dict(tau)}
    return Problem("digits", dict(sizes), {k: v.detach().numpy() for k, v in arrays.items()},
                   cfg, {"energyc": energyc, "torch": autograd}, DIGITS_NAMES, layer)


# the JAX programs of each workload: (column, worker program, what it is)
JAX_COLUMNS = {
    "et": [("JAX official", "et_official"), ("JAX plain", "et_plain")],
    "digits": [("hamux", "digits_hamux")],
}
LABELS = {
    "energyc": "energyc: the generated Layer (dynamics + backward in one autograd Function)",
    "torch": "torch autograd: the energy in PyTorch, autograd.grad(create_graph=True) in the loop",
    "JAX official": "JAX official: jit(value_and_grad) of bhoov/energy-transformer-jax's "
                    "architecture.py and its loop",
    "JAX plain": "JAX plain: jit(value_and_grad) of the energy in jax.numpy (einsum + logsumexp), "
                 "jax.grad of E inside the loop",
    "hamux": "hamux: jit(value_and_grad) of the model in hamux's API (HAM.vectorize(), dEdact, "
             "its step loop)",
}


def jax_columns(workload: str, official: bool, have_jax: bool, have_hamux: bool) -> list:
    cols = []
    for col, program in JAX_COLUMNS[workload]:
        if not have_jax or (program == "et_official" and not official) or \
                (program == "digits_hamux" and not have_hamux):
            continue
        cols.append((col, program))
    return cols


# --------------------------------------------------------------------------------------------
# Correctness (float64)
# --------------------------------------------------------------------------------------------


def check_correctness(workloads: list[str], columns: dict[str, list], tmp: Path,
                      official_file: Path | None, out: list[str]) -> bool:
    """Every column against energyc in float64 at a small size: the loss and every gradient."""
    import torch

    worker = JaxWorker(1, x64=True, official_file=official_file) if any(
        columns[w] for w in workloads) else None
    ok = True
    try:
        for workload in workloads:
            if workload == "et":
                problem = et_problem(ET_CHECK, torch.float64, seed=0)
            else:
                problem = digits_problem(DIGITS_CHECK, torch.float64, 0, DIGITS_CHECK_BETA,
                                         DIGITS_CHECK_TAU)
            mine = [t.numpy() for t in problem.variants["energyc"]()]
            others: dict[str, list[np.ndarray]] = {
                "torch autograd": [t.detach().numpy() for t in problem.variants["torch"]()]}
            inputs = tmp / f"check_{workload}.npz"
            problem.save_inputs(inputs)
            for col, program in columns[workload]:
                assert worker is not None
                worker.request(cmd="setup", name=program, program=program, inputs=str(inputs),
                               cfg=problem.cfg, warmup=0)
                path = tmp / f"check_{workload}_{program}.npz"
                worker.request(cmd="save", name=program, path=str(path))
                ref = np.load(path)
                others[col] = [ref["loss"], *(ref[n] for n in problem.names)]
            names = ["loss", *(f"d/d{n}" for n in problem.names)]
            dims = " ".join(f"{k}={v}" for k, v in problem.sizes.items())
            extra = "" if workload == "et" else \
                f" beta={DIGITS_CHECK_BETA} tau={DIGITS_CHECK_TAU}"
            for col, values in others.items():
                cells = []
                for name, a, b in zip(names, mine, values):
                    scale = max(1.0, float(np.abs(b).max()))
                    diff = float(np.abs(a - b).max())
                    ok &= bool(diff <= CHECK_TOL * scale)  # False for NaN too
                    cells.append(f"{name} {diff / scale:.1e}")
                out.append(f"- {workload} ({dims}{extra}), max |energyc - {col}| / max(1, max |value|): "
                           f"{', '.join(cells)}")
    finally:
        if worker is not None:
            worker.close()
    out.append(f"- tolerance {CHECK_TOL:g} x max(1, max |value|): {'PASS' if ok else 'FAIL'}")
    return ok


# --------------------------------------------------------------------------------------------
# Timing and profile
# --------------------------------------------------------------------------------------------


def time_torch(fn: Any, threads: int, n: int = 1) -> dict[str, float]:
    """n calls at ``threads`` torch threads: the mean ms per call, CPU time / wall time."""
    import torch

    torch.set_num_threads(threads)
    c0, t0 = _bj._cpu_seconds(), time.perf_counter()
    for _ in range(n):
        fn()
    wall = time.perf_counter() - t0
    return {"ms": wall * 1e3 / n, **_bj._cpu_use(c0, wall)}


SAMPLE_MS = 50.0  # a timed sample is at least about this long: several calls of a short step


def calls_per_sample(fn: Any, threads: int) -> int:
    """How many calls make a sample of about SAMPLE_MS (one for a step that long or longer)."""
    ms = min(time_torch(fn, threads)["ms"] for _ in range(3))
    return max(1, int(SAMPLE_MS // max(ms, 1e-3)))


def run_problem(problem: Problem, columns: list, workers: dict[int, JaxWorker],
                threads: list[int], repeats: int, tmp: Path,
                log: Any) -> dict[tuple[str, int], _bj.Series]:
    """Warm up and time every column at every thread count, round-robin."""
    import torch

    inputs = tmp / f"{problem.workload}.npz"
    problem.save_inputs(inputs)
    series: dict[tuple[str, int], _bj.Series] = {}
    for col, program in columns:
        for n in threads:
            log(f"  {col}, {n} thread(s): trace + compile + {WARMUP} warm-up calls")
            reply = workers[n].request(cmd="setup", name=program, program=program,
                                       inputs=str(inputs), cfg=problem.cfg, warmup=WARMUP)
            series[(col, n)] = _bj.Series(compile_s=reply["compile_s"])
    for side in ("energyc", "torch"):
        for n in threads:
            log(f"  {side}, {n} thread(s): {WARMUP} warm-up calls")
            torch.set_num_threads(n)
            for _ in range(WARMUP):
                problem.variants[side]()
            series[(side, n)] = _bj.Series()
    inner = calls_per_sample(problem.variants["energyc"], threads[0])
    problem.cfg["calls_per_sample"] = inner
    if inner > 1:
        log(f"  {inner} calls per timed sample (energyc's step is under {SAMPLE_MS:g} ms)")
    programs = dict(columns)
    order = [(side, n) for side in ("energyc", "torch", *programs) for n in threads]
    for rep in range(repeats):
        shift = rep % len(order)
        for side, n in order[shift:] + order[:shift]:
            time.sleep(0.01)  # let the other side's idle threads stop spinning
            if side in programs:
                reply = workers[n].request(cmd="time", name=programs[side], n=inner)
            else:
                reply = time_torch(problem.variants[side], n, inner)
            s = series[(side, n)]
            s.ms.append(reply["ms"])
            s.cpu_ratio.append(reply["cpu_ratio"])
            s.sys_share.append(reply["sys_share"])
        log(f"  repetition {rep + 1}/{repeats}: " + ", ".join(
            f"{side} {n}t {series[(side, n)].ms[-1]:.1f} ms" for side, n in order))
    return series


STEP_FUNCTIONS = ("_activation_forward", "_grad_forward", "_grad_backward",
                  "_activation_backward")


@dataclass
class Profile:
    share: _bj.ProfileShare
    functions: dict[str, tuple[float, int]]  # generated function -> (ms per step, calls per step)
    einsum_self_ms: float  # per step


def profile_energyc(problem: Problem, threads: int, steps: int) -> Profile:
    """Self CPU time per op of ``steps`` energyc steps under torch.profiler, and the time in each
    generated step function (wrapped in record_function for the profile only)."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    fn = problem.variants["energyc"]
    layer_module = sys.modules[f"{problem.layer._declared.package}.layer"]
    originals = {name: getattr(layer_module, name) for name in STEP_FUNCTIONS}

    def wrap(name: str, f: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with record_function(f"energyc::{name}"):
                return f(*args, **kwargs)
        return wrapped

    torch.set_num_threads(threads)
    fn()
    for name, f in originals.items():
        setattr(layer_module, name, wrap(name, f))
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            wall_ms = (time.perf_counter() - t0) * 1e3
    finally:
        for name, f in originals.items():
            setattr(layer_module, name, f)
    total = gemm = attention = einsum = 0.0
    others, functions = [], {}
    for event in prof.key_averages():
        if event.key.startswith("energyc::"):
            functions[event.key[len("energyc::"):]] = (event.cpu_time_total / 1e3 / steps,
                                                       event.count // steps)
            continue
        ms = event.self_cpu_time_total / 1e3
        total += ms
        if event.key in _bj.GEMM_OPS:
            gemm += ms
        elif any(mark in event.key for mark in _bj.ATTENTION_MARKS):
            attention += ms
        else:
            if event.key == "aten::einsum":
                einsum += ms
            others.append((event.key, ms / steps, event.count / steps))
    others.sort(key=lambda item: -item[1])
    share = _bj.ProfileShare(total, gemm, attention, wall_ms, steps, others[:12])
    return Profile(share, functions, einsum / steps)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def best(series: dict[tuple[str, int], _bj.Series], side: str) -> tuple[int, float]:
    return min(((n, s.median) for (sd, n), s in series.items() if sd == side),
               key=lambda item: item[1])


def table(series: dict[tuple[str, int], _bj.Series], sides: list[str],
          threads: list[int]) -> list[str]:
    per = " / ".join(f"{n}t" for n in threads)
    header = ["variant", "best ms (threads)", f"ms at {per}", "energyc speed-up",
              f"CPU/wall ({per})", "compile s"]
    lines = ["| " + " | ".join(header) + " |", "|---|---:|---:|---:|---:|---:|"]
    _, ems = best(series, "energyc")
    for side in sides:
        n, ms = best(series, side)
        compile_s = series[(side, threads[0])].compile_s
        lines.append("| " + " | ".join([
            LABELS[side].split(":")[0], f"{ms:.1f} ({n})",
            " / ".join(f"{series[(side, t)].median:.1f}" for t in threads),
            "-" if side == "energyc" else f"{ms / ems:.2f}x",
            " / ".join(f"{statistics.median(series[(side, t)].cpu_ratio):.2f}" for t in threads),
            "-" if compile_s is None else " / ".join(
                f"{series[(side, t)].compile_s:.1f}" for t in threads),
        ]) + " |")
    return lines


def profile_lines(profs: dict[int, Profile], threads: int) -> list[str]:
    """The profile at ``threads`` (energyc's best) in full, and the share outside matrix
    products at every thread count."""
    prof = profs[threads]
    share = prof.share
    per_step = share.total_ms / share.steps
    lines = [
        "Share of energyc's step outside matrix products (torch.profiler, op self time): "
        + ", ".join(f"{p.share.outside_gemm:.1%} at {n} thread(s)" for n, p in profs.items())
        + ".",
        "",
        f"Profile of energyc's step ({share.steps} steps under torch.profiler at {threads} "
        f"thread(s); {per_step:.1f} ms of op self time per step, "
        f"{share.wall_ms / share.steps:.1f} ms wall with the profiler): matrix products (GEMM "
        f"ops) {share.gemm_ms / share.total_ms:.1%}, everything else {share.outside_gemm:.1%} "
        f"(of which `aten::einsum`'s own self time {prof.einsum_self_ms / per_step:.1%}).",
        "",
        "Time inside each generated step function (inclusive, per training step): " + ", ".join(
            f"`{name}` {ms:.1f} ms ({calls} calls)" for name, (ms, calls) in sorted(
                prof.functions.items(), key=lambda item: -item[1][0])) + ".",
        "",
        "| op outside matrix products | self ms / step | calls / step | share |",
        "|---|---:|---:|---:|",
        *(f"| `{name}` | {ms:.2f} | {calls:g} | {ms * share.steps / share.total_ms:.1%} |"
          for name, ms, calls in share.top),
    ]
    return lines


def _per_sample(inner: int) -> str:
    return f", each the mean of {inner} calls in a row" if inner > 1 else ""


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def et_section(series, profs, sides, threads, repeats, inner, quick) -> list[str]:
    s = ET_QUICK if quick else ET_FULL
    lines = [
        f"### Energy Transformer block{' (--quick sizes)' if quick else ''}",
        "",
        f"Batch {s['B']}, {s['T']} tokens, D={s['D']}, {s['H']} heads of K={s['K']}, {s['M']} "
        f"memories, {s['steps']} steps x <- x - {ET_ALPHA} dE/dg with the EnergyLayerNorm inside, "
        f"fp32; loss sum(x^2), gradients to x, gamma, delta, W_q, W_k, Xi; {repeats} "
        f"repetitions{_per_sample(inner)}.",
        "",
        *table(series, sides, threads),
        "",
        *(f"- {LABELS[side]}" for side in sides),
        "",
        *profile_lines(profs, best(series, "energyc")[0]),
        "",
    ]
    full = " (at --quick sizes: not the issue's)" if quick else ""
    verdicts = []
    for side in ("JAX official", "JAX plain"):
        if side in sides:
            speedup = best(series, side)[1] / best(series, "energyc")[1]
            verdicts.append(f"energyc >= {TARGET_ET_SPEEDUP}x {side}: "
                            f"{verdict(speedup >= TARGET_ET_SPEEDUP)} ({speedup:.2f}x)")
        else:
            verdicts.append(f"energyc >= {TARGET_ET_SPEEDUP}x {side}: not measured")
    en = best(series, "energyc")[0]
    outside = profs[en].share.outside_gemm
    verdicts.append(f"<= {TARGET_ET_OUTSIDE:.0%} outside matrix products: "
                    f"{verdict(outside <= TARGET_ET_OUTSIDE)} ({outside:.1%} at energyc's best, "
                    f"{en} thread(s))")
    lines.append(f"Targets (issue 28){full}: " + "; ".join(verdicts) + ".")
    return lines


def digits_section(series, profs, sides, threads, repeats, inner, quick) -> list[str]:
    s = DIGITS_QUICK if quick else DIGITS_FULL
    lines = [
        f"### Digits memory{' (--quick sizes)' if quick else ''}",
        "",
        f"Batch {s['B']}, V={s['V']}, N={s['N']}, C={s['C']}, {s['steps']} steps of hamux's "
        f"dynamics (eta {DIGITS_ETA}, beta {DIGITS_BETA:g}, tau 1), pixels free, fp32; loss "
        "cross-entropy of the label activation + MSE of the pixels, gradients to W, U; "
        f"{repeats} repetitions{_per_sample(inner)}.",
        "",
        *table(series, sides, threads),
        "",
        *(f"- {LABELS[side]}" for side in sides),
        "",
        *profile_lines(profs, best(series, "energyc")[0]),
        "",
    ]
    full = " (at --quick sizes: not the issue's)" if quick else ""
    if "hamux" in sides:
        speedup = best(series, "hamux")[1] / best(series, "energyc")[1]
        lines.append(f"Target (issue 28){full}: energyc >= {TARGET_DIGITS_SPEEDUP}x hamux: "
                     f"{verdict(speedup >= TARGET_DIGITS_SPEEDUP)} ({speedup:.2f}x).")
    else:
        lines.append(f"Target (issue 28): energyc >= {TARGET_DIGITS_SPEEDUP}x hamux: not "
                     "measured (hamux not installed).")
    return lines


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", nargs="+", choices=["et", "digits"], default=["et", "digits"])
    p.add_argument("--et-official", metavar="DIR", default=os.environ.get(ENV_OFFICIAL),
                   help="a checkout of bhoov/energy-transformer-jax or its git directory (default "
                        f"${ENV_OFFICIAL}); without it the official column is left out")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes, 2 repeats, 1 profiled step: a smoke test, not the issue's")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed rounds (default 7; --quick 2)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], metavar="N",
                   help="thread counts for each side (default 1 2)")
    p.add_argument("--profile-steps", type=int, default=None, metavar="N",
                   help="energyc training steps under torch.profiler (default 3; --quick 1)")
    p.add_argument("--no-jax", action="store_true", help="energyc and torch autograd alone")
    p.add_argument("--write", action="store_true",
                   help=f"write the section {SECTION!r} into benchmarks/RESULTS.md")
    p.add_argument("--results", default=str(RESULTS), metavar="PATH",
                   help="the file --write edits (default benchmarks/RESULTS.md)")
    p.add_argument("--jax-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--jax-threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--x64", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--official-file", default=None, help=argparse.SUPPRESS)
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
        return jax_worker(args.jax_threads, args.x64, args.official_file)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # energyc and generated/ from this checkout
    import torch

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    shown = [a if a != args.et_official else "DIR" for a in (sys.argv[1:] if argv is None
                                                             else argv)]
    command = shlex.join(["python", "benchmarks/bench_neurons.py", *shown])
    gpu = "A CUDA device present (unused: CPU only)" if torch.cuda.is_available() else "No GPU"
    out: list[str] = [SECTION, "", f"{_bj.machine_line()} {gpu}.", "", f"Command: `{command}`"
                      + (" (DIR: a checkout or git directory of bhoov/energy-transformer-jax)"
                         if args.et_official else ""), ""]

    def emit(*lines: str) -> None:
        out.extend(lines)
        print("\n".join(lines), flush=True)

    print("\n".join(out), flush=True)
    have_jax = not args.no_jax and importlib.util.find_spec("jax") is not None \
        and importlib.util.find_spec("equinox") is not None
    have_hamux = have_jax and importlib.util.find_spec("hamux") is not None
    threads = args.threads
    repeats = args.repeats or (2 if args.quick else 7)
    profile_steps = args.profile_steps or (1 if args.quick else 3)
    load0 = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bench_neurons_"))
    workers: dict[int, JaxWorker] = {}
    try:
        official_file = None
        if args.et_official and have_jax and "et" in args.workloads:
            official_file = write_official(args.et_official, tmp)
        columns = {w: jax_columns(w, official_file is not None, have_jax, have_hamux)
                   for w in args.workloads}
        missing = []
        if not have_jax:
            missing.append("jax/equinox " + ("left out (--no-jax)" if args.no_jax else
                                             "not installed") + ": no JAX or hamux column")
        elif "et" in args.workloads and official_file is None:
            missing.append("no --et-official: the JAX official column is left out")
        if have_jax and not have_hamux and "digits" in args.workloads:
            missing.append("hamux not installed: no hamux column")
        if official_file is not None:
            commit = official_commit(args.et_official)
            missing.insert(0, "the official code: `architecture.py` of bhoov/energy-transformer-jax"
                           + (f" at commit {commit[:12]}" if commit else "")
                           + ", read into a temporary folder")
        if missing:
            emit(*(f"- {m}" for m in missing))
        check: list[str] = []
        ok = check_correctness(args.workloads, columns, tmp, official_file, check)
        emit("- correctness, float64 (loss and every gradient against energyc; JAX with "
             "jax_enable_x64):", *(f"  {line}" for line in check))
        if not ok:
            emit("", f"ERROR: a column disagrees with energyc beyond {CHECK_TOL:g}; not timing.")
            return 1
        if any(columns.values()):
            workers = {n: JaxWorker(n, official_file=official_file) for n in threads}
            info = workers[threads[0]].info
            emit(f"- versions: jax {info['jax']}, equinox {info['equinox']}, hamux "
                 f"{info['hamux']}; torch {torch.__version__}")
            emit("- threads: torch `torch.set_num_threads(n)` in this process; JAX n threads: a "
                 "worker process restricted to n CPUs by sched_setaffinity before jax starts ("
                 + "; ".join(f"{n}: CPU(s) {w.info['cpus']}, XLA_FLAGS="
                             + (f"\"{w.info['xla_flags']}\"" if w.info["xla_flags"] else "unset")
                             for n, w in workers.items()) + ")")
        emit(f"- timing: {WARMUP} warm-up calls per variant (JAX after trace + compile, timed "
             "apart), then the repetitions round-robin over every variant and thread count with "
             "a rotating start; medians; speed-up = the variant's best / energyc's best (> 1: "
             "energyc faster); CPU/wall: the parallelism a call got")
        emit(f"- load average (1, 5, 15 min) at start: {', '.join(f'{v:.2f}' for v in load0)}")

        if "et" in args.workloads:
            sizes = ET_QUICK if args.quick else ET_FULL
            log(f"Energy Transformer block: {sizes}, {repeats} repeats")
            problem = et_problem(sizes, torch.float32, seed=1)
            series = run_problem(problem, columns["et"], workers, threads, repeats, tmp, log)
            log(f"  profile: {profile_steps} energyc steps at {', '.join(map(str, threads))} "
                "thread(s)")
            profs = {n: profile_energyc(problem, n, profile_steps) for n in threads}
            sides = ["energyc", *(c for c, _ in columns["et"]), "torch"]
            emit("", *et_section(series, profs, sides, threads, repeats,
                                 problem.cfg["calls_per_sample"], args.quick))
            del problem
        if "digits" in args.workloads:
            sizes = DIGITS_QUICK if args.quick else DIGITS_FULL
            log(f"Digits memory: {sizes}, {repeats} repeats")
            problem = digits_problem(sizes, torch.float32, 2, DIGITS_BETA, DIGITS_TAU)
            series = run_problem(problem, columns["digits"], workers, threads, repeats, tmp,
                                 log)
            log(f"  profile: {profile_steps} energyc steps at {', '.join(map(str, threads))} "
                "thread(s)")
            profs = {n: profile_energyc(problem, n, profile_steps) for n in threads}
            sides = ["energyc", *(c for c, _ in columns["digits"]), "torch"]
            emit("", *digits_section(series, profs, sides, threads, repeats,
                                     problem.cfg["calls_per_sample"], args.quick))
            del problem
    finally:
        for worker in workers.values():
            worker.close()
        shutil.rmtree(tmp, ignore_errors=True)
    emit("", f"Load average at the end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}.")
    if args.write:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from bench_examples import write_section

        write_section(args.results, "\n".join(out) + "\n")
        print(f"wrote the section {SECTION!r} of {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
