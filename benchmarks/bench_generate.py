"""Generation speed of the byte-level language models (examples/generate.py): with the decode
cache against recomputing the prefix for every byte (``--no-cache``), and the time per generated
byte as the context grows.

Two measurements per model, both greedy, in one run on one thread (``--threads``):

- ``--tokens`` bytes (default 1024) after a short prompt, with the cache and with ``--no-cache``:
  seconds, bytes/s, and the speed-up of the cache;
- the time per byte at each context length of ``--contexts`` (default 128 and 1024): a prompt of
  that many bytes is read in one call (not timed), then ``--per-byte`` single-byte decode calls
  (default 64) are timed; the table gives their median and its ratio to the first context's.

The models are those of train_lm.py runs (``--cem RUN_DIR``, ``--baseline RUN_DIR``; the
README's commands write runs/cem and runs/baseline). Speed does not depend on the weights, so a
missing run directory is replaced by an untrained model of train_lm.py's default settings (the
README's), and the table says so. The prompt text is this file's own bytes, repeated as needed.

Run from the repository root:

    python benchmarks/bench_generate.py                 # runs/cem and runs/baseline
    python benchmarks/bench_generate.py --write         # into benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))

import generate  # noqa: E402
import train_lm  # noqa: E402

from benchmarks.bench_examples import write_section  # noqa: E402
from energyc.bench import BenchOptions, machine  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "RESULTS.md")
SECTION = "## Generation: the decode cache against recomputing the prefix (`bench_generate.py`)"


def load(run_dir: str, model: str) -> tuple[train_lm.LanguageModel, str]:
    """The model of a train_lm.py run, or an untrained one of the default settings."""
    if os.path.exists(os.path.join(run_dir, generate.CHECKPOINT_FILE)):
        m, _ = generate.load_model(run_dir, torch.device("cpu"))
        return m, f"trained ({os.path.relpath(run_dir, ROOT)})"
    args = train_lm.parse_args(["--model", model, "--out", run_dir])
    m = train_lm.build_model(args, warn=False).eval()
    return m, f"untrained, default settings (no run in {os.path.relpath(run_dir, ROOT)})"


def prompt(n: int) -> bytes:
    text = open(os.path.abspath(__file__), "rb").read()
    return (text * (n // len(text) + 1))[:n]


def per_byte(model: train_lm.LanguageModel, context: int, calls: int) -> float:
    """Median seconds of one single-byte decode call after a prompt of ``context`` bytes."""
    tokens = torch.tensor([list(prompt(context))])
    times = []
    with torch.inference_mode():
        logits, cache = model.decode(tokens)
        for _ in range(calls):
            nxt = logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            logits, cache = model.decode(nxt, cache)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(args: argparse.Namespace) -> list[str]:
    torch.set_num_threads(args.threads)
    rows, context_rows = [], []
    for name, run_dir in (("cem", args.cem), ("baseline", args.baseline)):
        model, origin = load(run_dir, name)
        seconds = {}
        for use_cache in (True, False):
            gen = torch.Generator().manual_seed(0)
            out, s = generate.generate(model, prompt(args.prompt), args.tokens, 0.0, None, gen,
                                       use_cache)
            seconds[use_cache] = s
            mode = "cache" if use_cache else "no cache"
            print(f"{name} {mode}: {len(out)} bytes in {s:.2f} s", file=sys.stderr)
        rows.append((name, origin, seconds[True], seconds[False]))
        base = None
        for c in args.contexts:
            t = per_byte(model, c, args.per_byte)
            base = base or t
            context_rows.append((name, c, t, t / base))
            print(f"{name} per byte at {c}: {t * 1e3:.2f} ms", file=sys.stderr)
    n = args.tokens
    lines = [f"| model | weights | {n} bytes with the cache (s) | without (s) | bytes/s with | "
             f"bytes/s without | speed-up |", "|---|---|---:|---:|---:|---:|---:|"]
    for name, origin, s_cache, s_none in rows:
        lines.append(f"| {name} | {origin} | {s_cache:.2f} | {s_none:.2f} | {n / s_cache:.0f} | "
                     f"{n / s_none:.1f} | {s_none / s_cache:.1f}x |")
    lines += ["", f"| model | context (bytes) | ms per byte (median of {args.per_byte}) | "
              f"ratio to {args.contexts[0]} |", "|---|---:|---:|---:|"]
    for name, c, t, ratio in context_rows:
        lines.append(f"| {name} | {c} | {t * 1e3:.2f} | {ratio:.2f}x |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cem", default=os.path.join(ROOT, "runs", "cem"), metavar="RUN_DIR")
    p.add_argument("--baseline", default=os.path.join(ROOT, "runs", "baseline"), metavar="RUN_DIR")
    p.add_argument("--tokens", type=int, default=1024, help="bytes to generate")
    p.add_argument("--prompt", type=int, default=16, help="prompt bytes for --tokens")
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--per-byte", type=int, default=64, help="timed single-byte calls")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--write", action="store_true", help="write the section into RESULTS.md")
    args = p.parse_args(argv)
    for flag in ("tokens", "prompt", "per_byte", "threads"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if any(c < 1 for c in args.contexts):
        p.error("--contexts must be at least 1")
    table = run(args)
    m = machine(BenchOptions(threads=args.threads))
    command = "python benchmarks/bench_generate.py " + " ".join(argv if argv is not None
                                                               else sys.argv[1:])
    text = "\n".join([
        SECTION, "",
        f"Machine: {m['cpu']} ({m['logical_cpus']} logical CPUs); torch {m['torch']}; "
        f"{args.threads} thread(s). Date: {m['date']}.", "",
        f"Command: `{command.strip()}`", "",
        f"Greedy; batch 1; a {args.prompt}-byte prompt for the {args.tokens} bytes (the prefill "
        f"included in the time).", "", *table, ""])
    print(text)
    if args.write:
        write_section(RESULTS, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
