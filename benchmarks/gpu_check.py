"""The GPU check: one command that runs the GPU tests and benchmarks on a CUDA machine in about ten
minutes and leaves every log and number under one folder.

Steps, in order, each a subprocess with its own time budget (a step that runs past it is stopped
and reported; the next one still runs, so a short lease gives what it had time for):

1. ``env``: the machine (nvidia-smi, torch, triton, the CUDA device) into ``env.txt``;
2. ``pytest``: ``pytest -m gpu``, the Triton suite on CUDA, into ``pytest_gpu.log``; with it
   the documents case (tests/test_triton_rows.py: cem-style attention over (j <= i) &
   same_document() on cu_seqlens at 4096 tokens, forward and backward against torch's float64
   attention of each document alone, and its time beside plain causal attention);
3. ``examples``: ``energyc bench`` (benchmarks/bench_examples.py) over every example in bfloat16
   at ``--tokens`` (default 1024, 4096 and 16384) with the Triton path, one example per
   subprocess, each with its own JSON (``examples/<name>.json`` and ``.log``), until the step's
   budget is spent; ``examples.md`` gathers the tables;
4. ``cem``: benchmarks/bench_cem_attention.py at issue 10's size (batch 8, 4096 tokens, D=1024,
   16 heads of 64, bfloat16) into ``cem_attention.log``.

The last thing printed is a summary table (step, status, seconds, file), which ``summary.md``
repeats. Without a CUDA device steps 1-2 run (the gpu tests report themselves skipped) and steps
3-4 are skipped; the exit status is then 3, so that a CPU run cannot be mistaken for a GPU one.
``--cpu-dry-run`` instead runs steps 3-4 on the CPU at small sizes, which checks the plumbing and
times what does not need a GPU (compiles, imports) before GPU minutes are spent.

Run from the repository root (on the device machine ``$OUT`` is the folder that comes back):

    python benchmarks/gpu_check.py --out "$OUT"
    python benchmarks/gpu_check.py --out /tmp/gpu_check --cpu-dry-run     # here, no GPU
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

NO_CUDA_EXIT = 3
# issue 10's cem_attention size on a GPU
CEM_GPU = ["--batch", "8", "--tokens", "4096", "--dim", "1024", "--heads", "16", "--head-dim",
           "64", "--dtype", "bfloat16", "--repeats", "20", "--device", "cuda"]
CEM_DRY = ["--batch", "2", "--tokens", "128", "--dim", "64", "--heads", "2", "--head-dim", "32",
           "--dtype", "float32", "--repeats", "2", "--device", "cpu"]


@dataclass
class Step:
    name: str
    status: str  # ok, failed (exit N), timed out, skipped: ...
    seconds: float
    output: str  # the file or folder it wrote, relative to --out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out",
                   help="folder for every log and number (default $OUT, else gpu_check_out)")
    p.add_argument("--steps", nargs="+", default=["env", "pytest", "examples", "cem"],
                   choices=["env", "pytest", "examples", "cem"])
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384],
                   help="token counts of the examples step (default 1024 4096 16384)")
    p.add_argument("--examples", nargs="+", default=None,
                   help="only these examples (by name); default every example")
    p.add_argument("--budget", type=float, nargs=4, metavar=("ENV", "PYTEST", "EXAMPLES", "CEM"),
                   default=[30, 180, 270, 90],
                   help="seconds per step (default 30 180 270 90: under ten minutes in all)")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="without CUDA, run the benchmark steps on the CPU at small sizes")
    return p.parse_args(argv)


def run(cmd: list[str], log: str, budget: float) -> tuple[str, float]:
    """Run ``cmd`` from the repository root with stdout and stderr into ``log``; stop it after
    ``budget`` seconds. Returns (status, seconds)."""
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                  timeout=max(budget, 1))
            status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timed out ({budget:.0f} s)"
    return status, time.perf_counter() - t0


def step_env(out: str, budget: float) -> Step:
    code = ("import torch, platform; print('python', platform.python_version()); "
            "print('torch', torch.__version__, 'cuda', torch.version.cuda); "
            "print('cuda available', torch.cuda.is_available()); "
            "[print('device', i, torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i))"
            " for i in range(torch.cuda.device_count())]\n"
            "try:\n import triton; print('triton', triton.__version__)\n"
            "except ImportError as e: print('triton: not installed', e)")
    status, secs = run([sys.executable, "-c", code], os.path.join(out, "env.txt"), budget)
    try:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        smi = f"nvidia-smi: {exc}\n"
    with open(os.path.join(out, "env.txt"), "a", encoding="utf-8") as fh:
        fh.write(smi)
    return Step("env", status, secs, "env.txt")


def step_pytest(out: str, budget: float) -> Step:
    status, secs = run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                        "-rs"], os.path.join(out, "pytest_gpu.log"), budget)
    return Step("pytest -m gpu", status, secs, "pytest_gpu.log")


def example_names(only: list[str] | None) -> list[str]:
    from energyc.cli import energy_files

    files = energy_files([os.path.join(ROOT, "examples")])
    names = sorted(os.path.splitext(os.path.basename(f))[0] for f in files)
    return [n for n in names if only is None or n in only]


def step_examples(out: str, budget: float, tokens: list[int], only: list[str] | None,
                  cuda: bool) -> Step:
    folder = os.path.join(out, "examples")
    os.makedirs(folder, exist_ok=True)
    device = ["--device", "cuda", "--dtype", "bfloat16", "--backend", "auto"] if cuda else [
        "--device", "cpu", "--dtype", "float32", "--backend", "torch"]
    sizes = tokens if cuda else [64]
    t0 = time.perf_counter()
    done, statuses = 0, []
    names = example_names(only)
    for name in names:
        left = budget - (time.perf_counter() - t0)
        if left < 5:
            break
        cmd = [sys.executable, os.path.join("benchmarks", "bench_examples.py"), "--examples", name,
               "--tokens", *map(str, sizes), "--repeats", "5" if cuda else "1",
               "--max-seconds", "20", *device, "--json", os.path.join(folder, f"{name}.json")]
        status, _ = run(cmd, os.path.join(folder, f"{name}.log"), left)
        statuses.append(status)
        done += 1
    _write_examples_table(folder, names[:done], statuses, os.path.join(out, "examples.md"))
    failed = sum(s != "ok" for s in statuses)
    status = "ok" if done == len(names) and not failed else (
        f"{done} of {len(names)} examples run, {failed} not ok")
    return Step("energyc bench (examples)", status, time.perf_counter() - t0, "examples.md")


def _write_examples_table(folder: str, names: list[str], statuses: list[str], path: str) -> None:
    """One Markdown table (energyc bench's columns) of every example's JSON that was written,
    and the examples whose run did not finish."""
    from benchmarks.bench_examples import load_report
    from energyc.bench import Report, format_header, format_table

    reports, missing = [], []
    for name, status in zip(names, statuses):
        try:
            reports.append(load_report(os.path.join(folder, f"{name}.json")))
        except (OSError, ValueError, KeyError, TypeError):
            missing.append(f"- {name}: {status}, no results (see examples/{name}.log)")
    with open(path, "w", encoding="utf-8") as fh:
        if reports:
            merged = Report(reports[0].machine, reports[0].options,
                            [row for r in reports for row in r.rows])
            fh.write("\n".join(format_header(merged)) + "\n\n"
                     + format_table(merged, markdown=True) + "\n")
        fh.write("\n".join(missing) + ("\n" if missing else ""))


def step_cem(out: str, budget: float, cuda: bool) -> Step:
    cmd = [sys.executable, os.path.join("benchmarks", "bench_cem_attention.py"),
           *(CEM_GPU if cuda else CEM_DRY)]
    status, secs = run(cmd, os.path.join(out, "cem_attention.log"), budget)
    return Step("bench_cem_attention", status, secs, "cem_attention.log")


def summary(steps: list[Step], cuda: bool, device: str) -> str:
    lines = [f"GPU check: {device}", "",
             "| step | status | seconds | output |", "|---|---|---:|---|"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.1f} | {s.output} |" for s in steps]
    if not cuda:
        lines += ["", "No CUDA device: the GPU steps did not run here (exit status "
                  f"{NO_CUDA_EXIT}); no figure above is a GPU figure."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    import torch

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else "no CUDA device (CPU only)"
    budget = dict(zip(["env", "pytest", "examples", "cem"], args.budget))
    steps: list[Step] = []
    for name in args.steps:
        print(f"[gpu_check] {name} ...", flush=True)
        if name == "env":
            steps.append(step_env(out, budget[name]))
        elif name == "pytest":
            steps.append(step_pytest(out, budget[name]))
        elif not (cuda or args.cpu_dry_run):
            label = {"examples": "energyc bench (examples)", "cem": "bench_cem_attention"}[name]
            steps.append(Step(label, "skipped: needs CUDA", 0.0, "-"))
        elif name == "examples":
            steps.append(step_examples(out, budget[name], args.tokens, args.examples, cuda))
        else:
            steps.append(step_cem(out, budget[name], cuda))
        print(f"[gpu_check] {name}: {steps[-1].status} ({steps[-1].seconds:.1f} s)", flush=True)
    text = summary(steps, cuda, device)
    with open(os.path.join(out, "summary.md"), "w", encoding="utf-8") as fh:
        fh.write(text)
    print(text, end="")
    if not cuda:
        return NO_CUDA_EXIT
    return 0 if all(s.status == "ok" for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
