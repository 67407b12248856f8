"""`energyc bench` over every example energy file: generated layers against autograd of E.

For each layer of each example (the energy files of examples/, as `energyc compile examples/`
finds them) and each token count, the generated layer and the baseline, y = x - eta P grad E by
torch.autograd (create_graph=True) through E in plain PyTorch (the generated package's
Layer.energy), run
forward + backward with the same weights and inputs, and each one's error against the float64
truth is printed (`gen err`, `autograd err`); see `energyc/bench/__init__.py` for what is
measured and how.
`--interpreter` also times autograd through the interpreter of energyc/reference.py (the baseline
before 2026-12-07). Defaults: fp32, batch 2, D=128, H=4, K=32, M=512 (G=2, R=2 for
grouped_query_attention's 2 x 2 query heads and local_global_attention's global heads), 256, 1024
and 4096 tokens, 1 thread.

The table is followed by the targets of issue 9, per layer: a layer with a reduction over a context
set (pairs of tokens) should be at least 2x faster than autograd at 1024 tokens, 4x at 4096, never
slower at 256, with at most a quarter of autograd's peak memory (increment) at 4096; a per-token
(element-wise) layer at least 1.2x faster at 1024. Then the rows where the generated layer's error
against the float64 truth is over twice autograd's, if any.

Run from the repository root:

    python benchmarks/bench_examples.py                                  # every example: long
    python benchmarks/bench_examples.py --examples cem_mlp cem_attention --tokens 256 1024
    python benchmarks/bench_examples.py --write                          # into benchmarks/RESULTS.md

`--write` replaces the section of this run (headed SECTION and its token counts) in
benchmarks/RESULTS.md (or appends it) with the
machine, the command, the date and the table; the rest of the file is left alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from energyc.bench import (  # noqa: E402
    ACCURACY_RATIO,
    DEFAULT_DIMS,
    VARIANTS,
    BenchOptions,
    Report,
    Row,
    VariantResult,
    format_header,
    format_table,
    run_bench,
    write_json,
)
from energyc.cli import energy_files  # noqa: E402
from energyc.errors import EnergyError  # noqa: E402


def example_files() -> list[str]:
    """The energy files of examples/ (the .py files that import energyc.dsl), relative to the
    repository, sorted."""
    return sorted(os.path.relpath(f, ROOT) for f in energy_files([os.path.join(ROOT, "examples")]))

SECTION = "## Every example: generated layer against autograd of the energy (`energyc bench`)"


def section_heading(tokens) -> str:
    """The RESULTS.md heading of a run: one section per set of token counts."""
    return f"{SECTION}, {', '.join(map(str, tokens))} tokens"
RESULTS = os.path.join(ROOT, "benchmarks", "RESULTS.md")
DEFAULT_TOKENS = (256, 1024, 4096)
# the examples' dim sizes where --dim gives none: energyc bench's, and G=2 R=2 (grouped keys put
# G x R query heads on G key heads; 2 x 2 gives the H=4 query heads of the other attention
# examples; local_global_attention's G global heads are 2 too)
EXAMPLE_DIMS = {**DEFAULT_DIMS, "G": 2, "R": 2}

# issue 9: (tokens, minimum speed-up) per kind of layer, and the memory line at 4096 tokens
SPEED_TARGETS = {"pairs": ((256, 1.0), (1024, 2.0), (4096, 4.0)), "per token": ((1024, 1.2),)}
MEMORY_TARGET = (4096, 4.0)  # pair layers: autograd's peak increment at least 4x the generated's


def kind(row: Row) -> str:
    """'pairs' for a layer with a reduction over a context set of tokens j, else 'per token'."""
    return "pairs" if row.context_sets else "per token"


def targets(report: Report) -> list[tuple[str, str, str]]:
    """(layer, kind, verdicts) for every layer, from the measured sizes only."""
    out = []
    layers = list(dict.fromkeys(r.layer for r in report.rows))
    for name in layers:
        rows = {r.tokens: r for r in report.rows if r.layer == name}
        k = kind(next(iter(rows.values())))
        verdicts = []
        for tokens, minimum in SPEED_TARGETS[k]:
            row = rows.get(tokens)
            if row is None:
                continue
            s = row.speedup
            if s is None and _beyond_budget(row):  # autograd could not finish; the layer did
                verdicts.append(f"{tokens}: autograd {row.autograd.status}, generated "
                                f"{row.generated.median_ms:.0f} ms: met (>= {minimum:g}x)")
                continue
            verdicts.append(f"{tokens}: speed-up {'-' if s is None else f'{s:.2f}x'} "
                            f"{'met' if s is not None and s >= minimum else 'MISSED'} "
                            f"(>= {minimum:g}x)")
        tokens, minimum = MEMORY_TARGET
        if k == "pairs" and tokens in rows and _out_of_memory(rows[tokens]):
            verdicts.append(f"{tokens}: autograd out of memory (needs over "
                            f"{report.options.get('max_memory_mib')} MiB), generated "
                            f"+{rows[tokens].generated.increment_mib:.0f} MiB: met "
                            f"(>= {minimum:g}x)")
        elif k == "pairs" and tokens in rows:
            m = rows[tokens].memory_ratio
            verdicts.append(f"{tokens}: memory ratio {'-' if m is None else f'{m:.2f}x'} "
                            f"{'met' if m is not None and m >= minimum else 'MISSED'} "
                            f"(>= {minimum:g}x)")
        out.append((name, k, "; ".join(verdicts) or "no target at these sizes"))
    return out


def _beyond_budget(row: Row) -> bool:
    """Autograd ran out of memory or time while the generated layer was timed."""
    return (row.generated.status == "ok" and row.generated.median_ms is not None
            and row.autograd.status in ("out of memory", "over budget"))


def _out_of_memory(row: Row) -> bool:
    """Autograd ran out of memory while the generated layer's peak was measured."""
    return (row.autograd.status == "out of memory" and row.generated.status == "ok"
            and row.generated.increment_mib is not None)


def accuracy_notes(report: Report) -> list[str]:
    """One line per row whose generated layer is over ACCURACY_RATIO times less accurate than
    autograd against the float64 truth."""
    out = []
    for r in report.rows:
        g, a = r.error("generated"), r.error("autograd")
        if g is not None and a is not None and g > ACCURACY_RATIO * a:
            out.append(f"{r.layer} at {r.tokens} tokens: generated error {g:.1e} "
                       f"({r.errors['generated']['name']}) against autograd's {a:.1e} "
                       f"({r.errors['autograd']['name']}), {g / a if a else float('inf'):.1f}x")
    return out


def format_accuracy(report: Report) -> str:
    notes = accuracy_notes(report)
    if not notes:
        return (f"accuracy: no row's generated error is over {ACCURACY_RATIO:g}x autograd's "
                "(against the float64 truth)")
    return "\n".join([f"accuracy: the generated layer over {ACCURACY_RATIO:g}x less accurate "
                      "than autograd (against the float64 truth):", *(f"- {n}" for n in notes)])


def format_targets(report: Report, markdown: bool) -> str:
    rows = targets(report)
    if markdown:
        return "\n".join(["| layer | kind | issue 9 targets |", "|---|---|---|",
                          *(f"| {a} | {b} | {c} |" for a, b, c in rows)])
    width = max(len(a) for a, _, _ in rows)
    return "\n".join(f"{a.ljust(width)}  {b.ljust(9)}  {c}" for a, b, c in rows)


def section(report: Report, command: str) -> str:
    """The RESULTS.md section: heading, machine, command, date, the tables."""
    m = report.machine
    lines = [section_heading(sorted({r.tokens for r in report.rows})), "",
             f"Machine: {m['cpu']} ({m['logical_cpus']} logical CPUs)"
             + (f", GPU {m['gpu']}" if "gpu" in m else "")
             + f"; torch {m['torch']}; {m['threads']} thread(s). Date: {m['date']}.", "",
             f"Command: `{command}`", "",
             *(f"- {line}" for line in format_header(report)[1:]), "",
             format_table(report, markdown=True), "",
             format_targets(report, markdown=True), "",
             format_accuracy(report), ""]
    return "\n".join(lines)


def write_section(path: str, text: str) -> None:
    """Replace the section of ``path`` whose heading is ``text``'s first line (up to the next '## '
    heading) with ``text``, or append it."""
    heading = text.split("\n", 1)[0]
    old = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Benchmark results\n"
    lines = old.splitlines(keepends=True)
    start = next((k for k, line in enumerate(lines) if line.rstrip("\n") == heading), None)
    if start is None:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = next((k for k in range(start + 1, len(lines)) if lines[k].startswith("## ")),
                   len(lines))
        tail = "".join(lines[end:])
        new = "".join(lines[:start]) + text + ("\n" + tail if tail else "")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(new)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", nargs="+", metavar="NAME",
                   help="only these example files (by name, e.g. cem_mlp, or path)")
    p.add_argument("--tokens", type=int, nargs="+", default=list(DEFAULT_TOKENS), metavar="N")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dtype", choices=["float32", "float64", "bfloat16"], default="float32")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--backend", choices=["torch", "triton", "auto"], default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dim", nargs="+", action="extend", default=[], metavar="NAME=SIZE",
                   help="dim sizes over the defaults (D=128 H=4 K=32 M=512 G=2 R=2)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-seconds", type=float, default=60.0, metavar="S")
    p.add_argument("--interpreter", action="store_true",
                   help="also time autograd through energyc/reference.py's interpreter of E")
    p.add_argument("--json", metavar="PATH", help="write the raw numbers as JSON")
    p.add_argument("--write", action="store_true",
                   help="write the table into RESULTS.md (its section only)")
    p.add_argument("--results", default=RESULTS, metavar="PATH",
                   help="the file --write edits (default benchmarks/RESULTS.md)")
    p.add_argument("--from-json", metavar="PATH",
                   help="print (and with --write, record) a run saved with --json instead of "
                        "running one; its own command is recorded")
    return p


def load_report(path: str) -> Report:
    """A Report from the JSON that --json wrote (the derived fields dropped)."""
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    names = {f.name for f in dataclasses.fields(VariantResult)}
    rows = []
    for r in data["rows"]:
        variants = {v: VariantResult(**{k: x for k, x in r[v].items() if k in names})
                    for v in VARIANTS if r.get(v) is not None}
        rows.append(Row(r["file"], r["layer"], r["tokens"], r["dims"], **variants,
                        agreement=r["agreement"], context_sets=r["context_sets"],
                        threads=r.get("threads", data["machine"]["threads"]),
                        errors=r.get("errors", {})))
    return Report(data["machine"], data["options"], rows, data.get("command", ""))


def select_files(names: list[str] | None) -> list[str]:
    files = example_files()
    if not names:
        return files
    by_name = {os.path.splitext(os.path.basename(f))[0]: f for f in files}
    chosen = []
    for name in names:
        key = os.path.splitext(os.path.basename(name))[0]
        if key not in by_name:
            raise SystemExit(f"bench_examples.py: error: --examples: no example {name!r} "
                             f"(examples: {', '.join(sorted(by_name))})")
        chosen.append(by_name[key])
    return chosen


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    os.chdir(ROOT)
    if args.from_json:
        report = load_report(args.from_json)
        return show(report, report.command, args)
    files = select_files(args.examples)
    dims = {}
    for item in args.dim:
        name, sep, size = item.partition("=")
        if not sep or not size.isdigit():
            raise SystemExit(f"bench_examples.py: error: --dim: expected NAME=SIZE, got {item!r}")
        dims[name] = int(size)
    opts = BenchOptions(tokens=tuple(args.tokens), batch=args.batch, dtype=args.dtype,
                        device=args.device, backend=args.backend, threads=args.threads,
                        dims=dims, default_dims=dict(EXAMPLE_DIMS), repeats=args.repeats,
                        max_seconds=args.max_seconds, interpreter=args.interpreter)
    command = shlex.join(["python", "benchmarks/bench_examples.py",
                          *(sys.argv[1:] if argv is None else argv)])
    try:
        report = run_bench(files, opts, log=lambda m: print(m, file=sys.stderr, flush=True))
    except EnergyError as exc:
        print(f"bench_examples.py: error: {exc}", file=sys.stderr)
        return 1
    report.command = command
    return show(report, command, args)


def show(report: Report, command: str, args: argparse.Namespace) -> int:
    """Print the report and its targets; write the JSON and the RESULTS.md section if asked."""
    print("\n".join(format_header(report)))
    print()
    print(format_table(report))
    print()
    print(format_targets(report, markdown=False))
    print()
    print(format_accuracy(report))
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    if args.write:
        text = section(report, command)
        write_section(args.results, text)
        print(f"wrote the section {text.split(chr(10), 1)[0]!r} of {args.results}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
