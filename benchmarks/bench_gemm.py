"""torch's two CPU float32 GEMMs side by side: MKL (``torch.matmul``) and oneDNN (what
``energyc.runtime.gemm.contract`` calls), on the products energyc's examples make.

    python benchmarks/bench_gemm.py                 # 1 thread
    python benchmarks/bench_gemm.py --threads 2
    python benchmarks/bench_gemm.py --write         # into benchmarks/RESULTS.md

Each shape m x k x n is timed with both operands contiguous and with both transposed views (the
layouts einsum's operands come in), interleaved, best of ``--repeats``; the error column is the
largest difference of each result from the float64 product, relative to its largest value.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.bench_examples import write_section  # noqa: E402
from energyc.bench import BenchOptions, machine  # noqa: E402
from energyc.runtime import gemm  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "RESULTS.md")
SECTION = "## CPU GEMMs: MKL against oneDNN in float32 (`bench_gemm.py`)"
SHAPES = [  # (m, k, n, where it comes from)
    (2048, 2048, 2048, "square"),
    (197, 768, 768, "ET block: projections (D=768)"),
    (197, 768, 3072, "ET block: Hopfield memories"),
    (768, 197, 3072, "ET block: a weight's gradient"),
    (2048, 128, 512, "cem_mlp, 1024 tokens x 2: W x"),
    (128, 2048, 512, "cem_mlp: the weight's gradient"),
    (4096, 256, 256, "cem_attention bench: projections"),
    (512, 32, 4096, "a 512-query block's scores against 4096 keys"),
    (16, 128, 512, "small (16 tokens)"),
    (64, 64, 64, "tiny"),
]


def best(f, repeats: int) -> float:
    f()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def run(args) -> list[str]:
    lines = ["| m x k x n | what | layout | MKL ms | oneDNN ms | MKL GFLOP/s | oneDNN GFLOP/s | "
             "MKL / oneDNN | rel. error MKL / oneDNN |", "|---|---|---|---:|---:|---:|---:|---:|---|"]
    gen = torch.Generator().manual_seed(0)
    for m, k, n, what in SHAPES:
        for layout in ("contiguous", "transposed"):
            if layout == "contiguous":
                a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
            else:
                a = torch.randn(k, m, generator=gen).T
                b = torch.randn(n, k, generator=gen).T
            exact = a.double() @ b.double()
            scale = exact.abs().max().item()
            err_mkl = ((a @ b).double() - exact).abs().max().item() / scale
            err_dnn = (gemm._linear(a, b.T).double() - exact).abs().max().item() / scale
            t_mkl = t_dnn = float("inf")
            for _ in range(2):  # interleaved
                t_mkl = min(t_mkl, best(lambda a=a, b=b: a @ b, args.repeats))
                t_dnn = min(t_dnn, best(lambda a=a, b=b: gemm._linear(a, b.T), args.repeats))
            flop = 2 * m * k * n
            lines.append(f"| {m} x {k} x {n} | {what} | {layout} | {t_mkl * 1e3:.2f} | "
                         f"{t_dnn * 1e3:.2f} | {flop / t_mkl / 1e9:.0f} | {flop / t_dnn / 1e9:.0f} "
                         f"| {t_mkl / t_dnn:.2f}x | {err_mkl:.1e} / {err_dnn:.1e} |")
            print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--write", action="store_true", help="write the section into RESULTS.md")
    args = p.parse_args(argv)
    if args.threads < 1 or args.repeats < 1:
        p.error("--threads and --repeats must be at least 1")
    if not gemm._ONEDNN:
        print("this torch has no oneDNN: energyc's contractions use torch.einsum", file=sys.stderr)
        return 1
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        table = run(args)
    finally:
        torch.set_num_threads(previous)
    m = machine(BenchOptions(threads=args.threads))
    command = "python benchmarks/bench_gemm.py " + " ".join(argv if argv is not None
                                                           else sys.argv[1:])
    text = "\n".join([
        SECTION, "",
        f"Machine: {m['cpu']} ({m['logical_cpus']} logical CPUs); torch {m['torch']}; "
        f"{args.threads} thread(s). Date: {m['date']}.", "",
        f"Command: `{command.strip()}`", "",
        "energyc's two-operand contractions (`energyc.runtime.gemm.contract`) run on oneDNN where "
        f"a product has at least {gemm.MIN_MACS} multiply-adds.", "", *table, ""])
    print(text)
    if args.write:
        write_section(RESULTS, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
