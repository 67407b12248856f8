"""The command line: ``energyc compile | inspect | check | bench``."""

from __future__ import annotations

import argparse
import os
import sys
import time

from energyc import __version__
from energyc.errors import EnergyError


def _compile(args: argparse.Namespace) -> int:
    from energyc.build import compile_paths, write_package_marker

    log = (lambda m: None) if args.quiet else (lambda m: print(m, flush=True))
    note = (lambda m: None) if args.quiet else None  # None: to stderr, "energyc: note: ..."
    compile_paths(energy_files(args.files), args.outdir, log=log, note=note)  # all or none
    write_package_marker(args.outdir)  # `from generated.<layer> import Layer` finds these
    return 0


def energy_files(paths: list[str]) -> list[str]:
    """Expand folders to the energy files in them (the .py files that import energyc.dsl).

    Raises:
        EnergyError: a folder holds no energy file.
    """
    out = []
    for path in paths:
        if os.path.isdir(path):
            found = []
            for name in sorted(os.listdir(path)):
                full = os.path.join(path, name)
                if name.endswith(".py") and os.path.isfile(full):
                    with open(full, "rb") as fh:  # bytes: a file that is not UTF-8 is the
                        if b"energyc.dsl" in fh.read():  # loader's to report, with its line
                            found.append(full)
            if not found:
                raise EnergyError("no energy file in this folder (no .py file in it imports "
                                  "energyc.dsl)", path)
            out.extend(found)
        else:
            out.append(path)
    return out


def _inspect(args: argparse.Namespace) -> int:
    from energyc.backends.lowering import decodable, decode_frontier, split
    from energyc.compiler import compile_file
    from energyc.inspect import format_energy, format_graph, to_dot
    from energyc.loader import load

    layers = compile_file(load(args.file))
    for layer in layers:
        # parameters are shown with their dims as declared (the shape of the Layer's tensor)
        param_dims = {p.name: p.dims for p in layer.params}
        params = ", ".join(f"{p.name} ({', '.join(p.dims)})" for p in layer.params)
        print(f"layer {layer.name}  (state dim {layer.state_dim}; dims {', '.join(layer.dims)};"
              f" params {params or '-'};"
              f" hypers {', '.join(h.name for h in layer.hypers) or '-'})")
        print(f"  E_i = {format_energy(layer.energy, 'energy', layer.file.public)}")
        for note in layer.notes:
            print(f"  note: {note}")
        needed, unsupported, _ = decodable(layer)
        if unsupported is None:
            cached = ", ".join(f"({', '.join(layer.step.node(n).axes)})"
                               for n in decode_frontier(layer.step, needed))
            print(f"  decode: incremental; caches per step {cached or 'nothing'}")
        else:
            print(f"  decode: not available: {unsupported}")
        sp = split(layer.step, ["grad"], ["grad_g"])
        graphs = {"energy": layer.energy, "step": layer.step}
        if args.graph in ("energy", "all"):
            print(format_graph(layer.energy, "\nenergy graph:", param_dims))
        if args.graph in ("step", "all"):
            print(format_graph(layer.step, "\nstep graph (forward dE/dx and its VJP):",
                               param_dims))
        print(f"\n  forward: {len(sp.forward)} nodes; backward: {len(sp.backward)} nodes; "
              f"saved for backward: {len(sp.saved)}")
        if args.dot:
            for name, graph in graphs.items():
                path = _suffixed(args.dot, layer.name, name, len(layers))
                with open(path, "w", encoding="utf-8") as fh:
                    fh.write(to_dot(graph, f"{layer.name}_{name}", param_dims))
                print(f"  wrote {path}")
        if args.png:
            for name, graph in graphs.items():
                path = _suffixed(args.png, layer.name, name, len(layers))
                _draw_png(graph, path, f"{layer.name}: {name}")
                print(f"  wrote {path}")
    return 0


def _suffixed(path: str, layer: str, graph: str, n_layers: int) -> str:
    """PATH.GRAPH.EXT, or PATH.LAYER.GRAPH.EXT when the file declares several layers."""
    root, ext = os.path.splitext(path)
    parts = [root, layer, graph] if n_layers > 1 else [root, graph]
    return ".".join(parts) + ext


def _draw_png(graph, path: str, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import networkx as nx
    except ImportError:
        raise EnergyError("--png needs matplotlib (pip install matplotlib); --dot needs nothing",
                          "--png") from None
    from energyc.ir.ops import OPS

    live = graph.live()
    sub = graph.nx.subgraph(live)
    layers: dict[int, int] = {}
    for n in live:
        layers[n] = 1 + max((layers[u] for u in graph.node(n).inputs), default=-1)
    for n in live:
        sub.nodes[n]["layer"] = layers[n]
    pos = nx.multipartite_layout(sub, subset_key="layer", align="horizontal")
    pos = {n: (xy[0], -xy[1]) for n, xy in pos.items()}
    labels = {n: f"{OPS[graph.node(n).op].describe(graph.node(n))[:28]}\n"
                 f"({','.join(graph.node(n).axes)})" for n in live}
    fig, ax = plt.subplots(figsize=(max(8, len(live) * 0.5), max(6, max(layers.values()) * 0.9)))
    nx.draw_networkx(sub, pos, ax=ax, labels=labels, node_size=300, font_size=6,
                     node_color="#cde", arrows=True)
    ax.set_title(title)
    ax.axis("off")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _check(args: argparse.Namespace) -> int:
    from energyc.check import check_file, format_results

    t0 = time.perf_counter()
    print(f"checking {args.file} ({'thorough' if args.thorough else 'quick'}: "
          f"{100 if args.thorough else 12} drawn examples per check, float64)", flush=True)
    results = check_file(args.file, thorough=args.thorough,
                         log=lambda m: print(m, flush=True))
    print(format_results(results))
    print(f"({time.perf_counter() - t0:.1f}s)")
    return 1 if any(r.status == "FAIL" for r in results) else 0


def _bench(args: argparse.Namespace) -> int:
    from energyc.bench import BenchOptions, format_header, format_table, run_bench, write_json

    dims = {}
    for item in args.dim:
        name, sep, size = item.partition("=")
        if not sep or not name.strip() or not size.strip().isdigit():
            raise EnergyError(f"expected NAME=SIZE (e.g. D=128), got {item!r}", "--dim")
        dims[name.strip()] = int(size)
    files = energy_files(args.files)
    report = None
    for threads in args.threads:  # a sweep: one run per thread count, their rows in one table
        opts = BenchOptions(tokens=tuple(args.tokens), batch=args.batch, dtype=args.dtype,
                            device=args.device, backend=args.backend, threads=threads,
                            dims=dims, repeats=args.repeats, warmup=args.warmup,
                            max_seconds=args.max_seconds, max_memory_mib=args.max_memory,
                            memory=not args.no_memory, interpreter=args.interpreter)
        run = run_bench(files, opts, log=lambda m: print(m, file=sys.stderr, flush=True))
        if report is None:
            report = run
        else:
            report.rows += run.rows
    if len(args.threads) > 1:
        report.machine["threads"] = ", ".join(map(str, args.threads))
    report.command = opts.command(args.files).replace(
        f"--threads {opts.threads}", "--threads " + " ".join(map(str, args.threads)))
    print("\n".join(format_header(report)))
    print()
    print(format_table(report))
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    return 1 if report.failed else 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="energyc",
        description="Compile energy functions into Transformer layers (descent steps on E).",
    )
    p.add_argument("--version", action="version", version=f"energyc {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="generate a PyTorch package per layer of an energy file",
                       description="Generate OUTDIR/<layer>/ (an nn.Module and its autograd "
                                   "Function) for each layer declared in FILE.")
    c.add_argument("files", nargs="+", metavar="FILE",
                   help="energy file(s), or folders: every .py file in them that imports "
                        "energyc.dsl")
    c.add_argument("-o", "--outdir", default="generated", help="output folder (default generated)")
    c.add_argument("-q", "--quiet", action="store_true", help="print nothing on success (neither the progress lines nor the "
                        "compiler's notes); errors still go to stderr")
    c.set_defaults(fn=_compile)
    i = sub.add_parser("inspect", help="print a layer's graphs (ops, shapes); draw them",
                       description="Print the energy and the derived step graph of each layer.")
    i.add_argument("file", metavar="FILE")
    i.add_argument("--graph", choices=["none", "energy", "step", "all"], default="all",
                   help="which graphs to print (default all)")
    i.add_argument("--dot", metavar="PATH", help="write Graphviz DOT file(s)")
    i.add_argument("--png", metavar="PATH", help="draw PNG picture(s) (needs matplotlib)")
    i.set_defaults(fn=_inspect)
    k = sub.add_parser("check", help="property-check generated layers against torch.autograd",
                       description="Compile FILE and compare each layer's forward and backward "
                                   "with torch.autograd on drawn inputs (Hypothesis); check "
                                   "causality and descent (for a neuron model: its dynamics "
                                   "against autograd through the unrolled steps, and that a "
                                   "small step lowers its total energy). Prints a table; exit 1 "
                                   "on failure.")
    k.add_argument("file", metavar="FILE")
    k.add_argument("--thorough", action="store_true",
                   help="100 random examples per check instead of 12 reproducible ones")
    k.set_defaults(fn=_check)
    b = sub.add_parser("bench", help="time, memory and accuracy: generated layers against "
                                     "autograd of E",
                       description="For each layer of FILE: forward + backward of the generated "
                                   "layer against the baseline 'autograd', y = x - eta P grad E "
                                   "by torch.autograd (create_graph=True) through E in plain "
                                   "PyTorch (the generated package's Layer.energy: einsum "
                                   "contractions, masked log-sum-exps; for a neuron model "
                                   "autograd through its unrolled dynamics on the package's "
                                   "_lagrangians and _energy), with the same weights "
                                   "and inputs. Prints median times, the speed-up (autograd ms / "
                                   "generated ms) and peak memory per layer and token count, "
                                   "each variant's error against the float64 truth (the "
                                   "interpreter energyc.reference in float64 on the same rounded "
                                   "values: the worst over y and the gradients of max|t - t64| / "
                                   "max|t64|), and checks that they agree. Exit 1 on a mismatch "
                                   "or an error.")
    b.add_argument("files", nargs="+", metavar="FILE",
                   help="energy file(s), or folders: every .py file in them that imports "
                        "energyc.dsl")
    b.add_argument("--tokens", type=int, nargs="+", default=[256, 1024], metavar="N",
                   help="token counts (default 256 1024)")
    b.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    b.add_argument("--dtype", choices=["float32", "float64", "bfloat16"], default="float32")
    b.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    b.add_argument("--backend", choices=["torch", "triton", "auto"], default="auto",
                   help="the generated layer's backend (default auto: torch on CPU, Triton on "
                        "CUDA)")
    b.add_argument("--threads", type=int, nargs="+", default=[1], metavar="N",
                   help="torch CPU threads (default 1); several: a sweep, one row per count")
    b.add_argument("--dim", nargs="+", action="extend", default=[], metavar="NAME=SIZE",
                   help="dim sizes; a dim not given takes the size its energy's Layer "
                        "declares, else D=128 H=4 K=32 M=512; any other dim must be given")
    b.add_argument("--repeats", type=int, default=5,
                   help="timed calls per variant, interleaved (default 5)")
    b.add_argument("--warmup", type=int, default=1, help="warm-up calls per variant (default 1)")
    b.add_argument("--max-seconds", type=float, default=60.0, metavar="S",
                   help="a variant whose call takes longer is shown as over budget (default 60)")
    b.add_argument("--max-memory", type=float, default=None, metavar="MIB",
                   help="CPU: memory a call may add before it counts as out of memory (default "
                        "80%% of the memory available at start)")
    b.add_argument("--no-memory", action="store_true",
                   help="CPU: no memory probes (faster; the budgets then hold only for timed "
                        "calls, and an out-of-memory call may be killed by the system)")
    b.add_argument("--interpreter", action="store_true",
                   help="also time autograd through energyc.reference's interpreter of E (every "
                        "reduction materialised; not the baseline)")
    b.add_argument("--json", metavar="PATH", help="write the raw numbers as JSON")
    b.set_defaults(fn=_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except EnergyError as exc:
        print(f"energyc: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
