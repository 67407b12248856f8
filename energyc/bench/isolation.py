"""The benchmark's process isolation: CPU memory probes, one fresh process per variant and size.

The operating-system machinery of ``energyc bench`` lives here and nowhere else in energyc: a
probe server (a fresh interpreter, ``python -m energyc.bench --serve-probes``) that compiles each
energy file once and imports its generated packages, then forks one process per probe; in the
probe, the peak RSS counter reset before the call (``/proc/self/clear_refs``), the address space
limited (``RLIMIT_AS``: ``max_memory_mib`` over the base) and a one-shot alarm for
``max_seconds`` (``SIGALRM``); in the server, a wait on the probe's answer that kills it past the
budget. The measuring itself (cases, variants) is :mod:`energyc.bench`'s, read through the package
at call time, so what the harness is given (a patched ``run_variant``) is what a probe runs.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import resource
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from types import ModuleType
from typing import TYPE_CHECKING

import torch

from energyc import bench

if TYPE_CHECKING:
    from energyc.bench import BenchOptions
    from energyc.compiler import CompiledLayer

BUILD_ALLOWANCE_S = 300.0  # a probe process may take this long to build its layer and inputs


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def available_memory_mib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


class _OverBudgetError(Exception):
    pass


def _probe(layer: CompiledLayer, module: ModuleType, opts: BenchOptions, tokens: int,
           variant: str, widen: bool = False, save: str | None = None) -> dict:
    """In a fresh process: one call of ``variant``; its peak RSS and the RSS before it.

    A call at 2 tokens first pages in the code and makes the one-time allocations, so that the
    increment is the measured call's working memory. With ``widen`` the call is in float64 on the
    values ``opts.dtype`` rounds (:func:`float64_case`; the truth), and with ``save`` its outputs
    (y and the gradients) are written there with ``torch.save``.
    """

    def case(n: int):
        c = bench.build_case(layer, module, opts, n)
        return bench.float64_case(layer, module, opts, *c) if widen else c

    lay, x, w = case(min(tokens, 2))
    bench.run_variant(variant, layer, lay, x, w)
    lay, x, w = case(tokens)
    gc.collect()
    reset = _reset_peak_rss()
    base_kib = _proc_status_kib("VmRSS")
    vm_kib = _proc_status_kib("VmSize")
    if opts.max_memory_mib and vm_kib is not None:
        limit = int((vm_kib + opts.max_memory_mib * 1024) * 1024)
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY
                                                else min(limit, hard), hard))

    fired = []

    def over_budget(signum, frame):
        fired.append(signum)
        raise _OverBudgetError()

    signal.signal(signal.SIGALRM, over_budget)
    status = "ok"
    t0 = time.perf_counter()
    try:
        # the one-shot alarm is armed and cancelled inside the handled block: wherever it fires
        # (a short budget can expire before the call starts, or in the cancelling finally) its
        # exception lands in the except below, not in the caller
        try:
            signal.setitimer(signal.ITIMER_REAL, opts.max_seconds)
            y, grads = bench.run_variant(variant, layer, lay, x, w)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _OverBudgetError:
        status = "over budget"
    except BaseException as exc:  # reported to the parent, never raised there
        status = bench._failure(exc)
    seconds = time.perf_counter() - t0
    if fired or seconds > opts.max_seconds:  # the alarm may surface wrapped by autograd
        status = "over budget"
    if status == "ok" and save:
        torch.save([t if t is None else t.detach().cpu() for t in (y, *grads)], save)
    peak_kib = _proc_status_kib("VmHWM") if reset else None
    source = "VmHWM since reset"
    if peak_kib is None:  # no /proc: the lifetime peak of this process (KiB on Linux)
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        source = "ru_maxrss (lifetime)"
    return {"status": status, "seconds": seconds,
            "peak_mib": peak_kib / 1024.0 if peak_kib is not None else None,
            "base_mib": base_kib / 1024.0 if base_kib is not None else None,
            "lifetime_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "memory_source": source}


def _import_package(path: str) -> ModuleType:
    """Import the generated package at ``path`` under a private name."""
    name = f"_energyc_bench_{os.path.basename(path)}_{abs(hash(path))}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(path, "__init__.py"), submodule_search_locations=[path])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _serve_probes(opts_json: str) -> int:
    """The probe server: read requests (JSON lines) on stdin, answer each on stdout.

    It compiles each energy file once and imports the generated packages, then forks a fresh
    process per request (a variant at a size) that measures one call; the server itself runs no
    layer, so every probe starts from the same state and no thread pool is forked.
    """
    from energyc.compiler import compile_file
    from energyc.loader import load

    opts = bench.BenchOptions(**json.loads(opts_json))
    torch.set_num_threads(opts.threads)
    compiled: dict[str, dict[str, CompiledLayer]] = {}
    out = sys.stdout
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        try:
            if req["file"] not in compiled:
                compiled[req["file"]] = {c.name: c for c in compile_file(load(req["file"]))}
            layer = compiled[req["file"]][req["layer"]]
            module = _import_package(req["package"])
            answer = _fork_probe(layer, module, opts, req["tokens"], req["variant"],
                                 req.get("widen", False), req.get("save"))
        except Exception as exc:  # answered, not raised
            answer = {"status": bench._failure(exc)}
        out.write(json.dumps(answer) + "\n")
        out.flush()
    return 0


def _fork_probe(layer, module, opts: BenchOptions, tokens: int, variant: str,
                widen: bool = False, save: str | None = None) -> dict:
    """Fork a probe process (:func:`_probe`), wait for its answer (killing it past the budget),
    return it."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the probe process: its stdout is the server's answer channel, so silence it
        os.close(read_end)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        code = 0
        try:
            answer = _probe(layer, module, opts, tokens, variant, widen, save)
        except BaseException as exc:  # e.g. the Layer cannot be built
            answer = {"status": bench._failure(exc)}
        try:
            os.write(write_end, json.dumps(answer).encode())
        except BaseException:
            code = 1
        os._exit(code)
    os.close(write_end)
    deadline = time.monotonic() + opts.max_seconds + BUILD_ALLOWANCE_S
    chunks, timed_out = [], False
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            if select.select([read_end], [], [], left)[0]:
                data = os.read(read_end, 1 << 16)
                if not data:
                    break
                chunks.append(data)
    finally:
        os.close(read_end)
    if timed_out:
        os.kill(pid, signal.SIGKILL)
    _, wait_status = os.waitpid(pid, 0)
    if timed_out:
        return {"status": "over budget"}
    if chunks:
        return json.loads(b"".join(chunks))
    if os.WIFSIGNALED(wait_status):
        sig = os.WTERMSIG(wait_status)
        return {"status": "out of memory" if sig == signal.SIGKILL
                else f"error: probe killed by signal {sig}"}
    return {"status": f"error: probe exited with status {os.waitstatus_to_exitcode(wait_status)}"}


class ProbeServer:
    """A fresh interpreter that answers memory probes (see :func:`_serve_probes`)."""

    def __init__(self, opts: BenchOptions) -> None:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        # a fixed mmap threshold: glibc returns every freed block of 64 KiB or more to the system
        # (no dynamic threshold keeping it in the heap), so the RSS follows the live tensors
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "energyc.bench", "--serve-probes", json.dumps(asdict(opts))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
            env=env)
        self._ready = False

    def _read(self) -> dict | None:
        line = self.proc.stdout.readline()
        return json.loads(line) if line else None

    def probe(self, file: str, layer: str, package: str, tokens: int, variant: str,
              widen: bool = False, save: str | None = None) -> dict:
        """One call of ``variant`` in a fresh process (:func:`_probe`: ``widen``, ``save``)."""
        if not self._ready:
            self._ready = bool(self._read())
        answer = None
        if self._ready and self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"file": file, "layer": layer, "package": package,
                                              "tokens": tokens, "variant": variant,
                                              "widen": widen, "save": save}) + "\n")
            self.proc.stdin.flush()
            answer = self._read()
        if answer is None:
            self._stderr.seek(0)
            tail = self._stderr.read().decode(errors="replace").strip().splitlines()[-1:]
            return {"status": f"error: the probe server stopped ({' '.join(tail)})"}
        return answer

    def close(self) -> None:
        if self.proc.poll() is None and not self._ready:  # nothing asked yet: no need to wait
            self.proc.kill()
            self.proc.wait()
        elif self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()
