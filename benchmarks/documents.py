"""Packed documents and padding on the torch backend (CPU): what the call's rows cost.

The layers are CEM attention (examples/cem_attention.py) over the sets of
benchmarks/energies/doc_attention.py, compiled from that file on every run; one step,
float32, forward + backward of loss = (y * w).sum() to x and every parameter.

1. 8 documents of 512 tokens packed in one row of 4096 (``cu_seqlens``) with
   ``(j <= i) & same_document()`` against the limit, the 8 documents run alone (8 calls with
   ``cu_seqlens=[0, 512]``, and the plain ``j <= i`` layer on a batch of 8 rows of 512), and
   against ``j <= i`` over the whole row of 4096 (what ignoring the documents costs); the same for
   ``window(64) & same_document()``, and a column for a pair-kernel energy (a soft-capped score
   within each document). Goal: packed within 1.3x of the documents alone.
2. Padding: one batch of rows of 4096, 2048, 1024 and 512 real tokens of 4096 (``lengths``)
   against each row alone at its length, ``j <= i``. Goal: within 1.3x.
3. Peak memory of one step, packed documents of 512, from 1k to 16k tokens, on every path (the
   attention kernels: doc_causal, doc_window; the pair kernels: doc_softcap; a fresh process per
   energy and size: the peak RSS increment of the step; linear in the tokens when no (T x T)
   value exists).
4. FlexAttention: the same step written by hand (q = W_q x, k = W_k x, y = x + eta W_q^T
   attn(q, k, k)) on ``torch.nn.attention.flex_attention`` with a ``create_block_mask`` document
   mask, compiled with torch.compile, against the packed energyc layer: the forward alone
   (FlexAttention has no backward on CPU), under torch.no_grad for both; the ratio flex /
   energyc.

Timings are medians of --repeats runs after a warm-up, reported, never asserted. Run from the
repository root:

    python benchmarks/documents.py                 # one thread
    python benchmarks/documents.py --threads 2
    python benchmarks/documents.py --quick         # 1024 tokens, a few repeats
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ENERGIES = ROOT / "benchmarks" / "energies" / "doc_attention.py"
GOAL = 1.3


def compile_layers() -> dict:
    """The generated packages of the energy file, by layer name."""
    from energyc.check import import_generated
    from energyc.compiler import compile_file
    from energyc.loader import load

    return {layer.name: import_generated(layer) for layer in compile_file(load(str(ENERGIES)))}


def make(modules: dict, name: str, args) -> torch.nn.Module:
    torch.manual_seed(0)
    return modules[name].Layer(D=args.dim, H=args.heads, K=args.head_dim)


def step(layer, x: torch.Tensor, w: torch.Tensor, **data) -> None:
    """Forward and backward of (y * w).sum() to x and the parameters."""
    x = x.detach().requires_grad_(True)
    y = layer(x, **data)
    (y * w).sum().backward()


def timed(fn, repeats: int) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def cuts(tokens: int, n: int) -> torch.Tensor:
    return torch.arange(0, tokens + 1, n, dtype=torch.int32)


def documents_table(modules: dict, args) -> list[list[str]]:
    T, n = args.tokens, args.tokens // 8
    torch.manual_seed(1)
    x = torch.randn(1, T, args.dim)
    w = torch.randn_like(x)
    one = torch.tensor([0, n], dtype=torch.int32)
    rows = []
    for packed, plain in (("doc_causal", "causal"), ("doc_window", "window"),
                          ("doc_softcap", None)):
        lay = make(modules, packed, args)
        t_packed = timed(lambda lay=lay: step(lay, x, w, cu_seqlens=cuts(T, n)), args.repeats)
        t_alone = timed(lambda lay=lay: [step(lay, x[:, a:a + n], w[:, a:a + n], cu_seqlens=one)
                                         for a in range(0, T, n)], args.repeats)
        t_batch = t_whole = None
        if plain is not None:
            ref = make(modules, plain, args)
            t_batch = timed(lambda ref=ref: step(ref, x.view(8, n, -1), w.view(8, n, -1)),
                            args.repeats)
            t_whole = timed(lambda ref=ref: step(ref, x, w), args.repeats)
        limit = min(t for t in (t_alone, t_batch) if t is not None)
        rows.append([packed, f"{t_packed:.1f}", f"{t_alone:.1f}", _ms(t_batch), _ms(t_whole),
                     f"{t_packed / limit:.2f}x", _ratio(t_whole, t_packed)])
    return rows


def padding_table(modules: dict, args) -> list[list[str]]:
    T = args.tokens
    lengths = [T, T // 2, T // 4, T // 8]
    torch.manual_seed(2)
    x = torch.randn(len(lengths), T, args.dim)
    w = torch.randn_like(x)
    lay = make(modules, "causal", args)
    t_padded = timed(lambda: step(lay, x, w, lengths=torch.tensor(lengths)), args.repeats)
    t_alone = timed(lambda: [step(lay, x[b:b + 1, :L], w[b:b + 1, :L])
                             for b, L in enumerate(lengths)], args.repeats)
    t_full = timed(lambda: step(lay, x, w), args.repeats)
    return [["j <= i, rows " + "/".join(map(str, lengths)), f"{t_padded:.1f}", f"{t_alone:.1f}",
             f"{t_full:.1f}", f"{t_padded / t_alone:.2f}x"]]


def _ms(t: float | None) -> str:
    return "-" if t is None else f"{t:.1f}"


def _ratio(a: float | None, b: float) -> str:
    return "-" if a is None else f"{a / b:.2f}x"


# -- peak memory, one fresh process per size ------------------------------------------------


def _status_kib(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


MEMORY_LAYERS = ("doc_causal", "doc_window", "doc_softcap")  # the attention and pair paths


def memory_probe(tokens: int, args, name: str = "doc_causal") -> dict:
    """In this (fresh) process: the peak RSS increment of one step of ``name`` on documents of
    512 packed into ``tokens``, after a step at 512 tokens has made the one-time allocations."""
    modules = compile_layers()
    lay = make(modules, name, args)
    n = min(512, tokens)
    small = torch.randn(1, n, args.dim)
    step(lay, small, small, cu_seqlens=cuts(n, n))
    x = torch.randn(1, tokens, args.dim)
    w = torch.randn_like(x)
    gc.collect()
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")  # VmHWM back to the current RSS
    base = _status_kib("VmRSS")
    t0 = time.perf_counter()
    step(lay, x, w, cu_seqlens=cuts(tokens, n))
    seconds = time.perf_counter() - t0
    return {"tokens": tokens, "peak_mib": (_status_kib("VmHWM") - base) / 1024,
            "ms": 1e3 * seconds}


def memory_table(args) -> list[list[str]]:
    rows = []
    for tokens in args.memory_sizes:
        row = [str(tokens)]
        for name in MEMORY_LAYERS:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", str(tokens),
                   "--memory-layer", name, "--threads", str(args.threads), "--dim",
                   str(args.dim), "--heads", str(args.heads), "--head-dim", str(args.head_dim)]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if out.returncode != 0:
                row.append("failed: " + out.stderr.strip().splitlines()[-1])
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            row.append(f"{r['peak_mib']:.1f} ({r['peak_mib'] * 1024 / tokens:.1f})")
        rows.append(row)
    return rows


# -- FlexAttention -------------------------------------------------------------------------


def flex_table(modules: dict, args) -> list[list[str]]:
    """The hand-written FlexAttention step against the packed energyc layer, forward alone
    (FlexAttention refuses a backward on CPU), and how far apart their outputs are (float32, the
    same weights)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    T, n = args.tokens, args.tokens // 8
    lay = make(modules, "doc_causal", args)
    W_q, W_k = lay.W_q.detach().clone(), lay.W_k.detach().clone()
    beta, eta = float(lay.beta), 1.0
    H, K = args.heads, args.head_dim
    doc = torch.arange(T) // n

    def document_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)

    t0 = time.perf_counter()
    block_mask = create_block_mask(document_causal, None, None, T, T, device="cpu")
    t_mask = 1e3 * (time.perf_counter() - t0)
    attend = torch.compile(flex_attention, dynamic=False)

    def project(x, W):
        return (x @ W.reshape(H * K, -1).t()).view(x.shape[0], T, H, K).transpose(1, 2)

    @torch.no_grad()
    def flex_step(x):
        q, k = project(x, W_q), project(x, W_k)
        a = attend(q, k, k, block_mask=block_mask, scale=beta)
        return x + eta * (a.transpose(1, 2).reshape(x.shape[0], T, H * K)
                          @ W_q.reshape(H * K, -1))

    @torch.no_grad()
    def our_step(x):
        return lay(x, cu_seqlens=cuts(T, n))

    torch.manual_seed(3)
    x = torch.randn(1, T, args.dim)
    t0 = time.perf_counter()
    y_flex = flex_step(x)  # compiles
    t_compile = 1e3 * (time.perf_counter() - t0)
    diff = float((y_flex - our_step(x)).abs().max())
    t_flex = timed(lambda: flex_step(x), args.repeats)
    t_ours = timed(lambda: our_step(x), args.repeats)
    return [[f"{T} tokens, 8 documents", f"{t_ours:.1f}", f"{t_flex:.1f}",
             f"{t_flex / t_ours:.2f}x", f"{t_mask:.1f}", f"{t_compile / 1e3:.1f} s",
             f"{diff:.1e}"]]


def show(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[c]) for r in rows)) for c, h in enumerate(header)]
    print(f"\n{title}")
    print("| " + " | ".join(h.ljust(n) for h, n in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (n + 2) for n in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(n) for c, n in zip(r, widths)) + " |")
    sys.stdout.flush()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens of a packed row (default "
                   "4096: 8 documents of 512)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--memory-sizes", type=int, nargs="*",
                   default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--skip", nargs="*", default=[],
                   choices=["documents", "padding", "memory", "flex"])
    p.add_argument("--quick", action="store_true",
                   help="1024 tokens, 2 repeats, memory at 1k and 2k tokens")
    p.add_argument("--memory-probe", type=int, help=argparse.SUPPRESS)
    p.add_argument("--memory-layer", default="doc_causal", choices=MEMORY_LAYERS,
                   help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args, args.memory_layer)))
        return
    if args.quick:
        args.tokens, args.repeats, args.memory_sizes = 1024, 2, [1024, 2048]
    print(f"torch {torch.__version__}, {args.threads} thread(s), float32, D={args.dim} "
          f"H={args.heads} K={args.head_dim}; one step, forward + backward; median of "
          f"{args.repeats}")
    modules = compile_layers()
    n = args.tokens // 8
    if "documents" not in args.skip:
        show(f"Packed: 8 documents of {n} in one row of {args.tokens} (ms)",
             ["energy & same_document()", "packed", "8 alone", "plain set, batch 8 x " + str(n),
              f"plain set, whole {args.tokens}", "packed / limit", "whole / packed"],
             documents_table(modules, args))
    if "padding" not in args.skip:
        show("Padding: one batch against each row alone (ms)",
             ["rows", "padded batch", "rows alone", "batch without lengths",
              "padded / alone"], padding_table(modules, args))
    if "memory" not in args.skip:
        show("Peak memory of one step, documents of 512 packed: MiB (KiB per token), a fresh "
             "process per energy and size",
             ["tokens", *MEMORY_LAYERS], memory_table(args))
    if "flex" not in args.skip:
        show("FlexAttention, document mask, compiled: forward alone (ms)",
             ["case", "energyc", "flex_attention", "flex / energyc", "block mask ms",
              "flex compile", "max |y diff|"], flex_table(modules, args))
    print(f"\nlimit: the faster of the 8 documents alone (8 calls with cu_seqlens) and the plain "
          f"set on a batch of 8; goal packed / limit and padded / alone <= {GOAL}")


if __name__ == "__main__":
    main()
