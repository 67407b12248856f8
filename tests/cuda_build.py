"""Compile the Triton kernels that generated layers launch for a CUDA GPU, without one.

Run as ``python -m tests.cuda_build PACKAGE... [--dtypes ...] [--arch 90]`` with TRITON_INTERPRET
unset. Each layer runs one step forward and backward on CPU tensors, with each preconditioner;
each kernel launch, instead of running, is compiled by Triton for the target (an H100 is ``cuda``
capability 90) with the types and constexprs of that launch, down to PTX and a cubin (ptxas ships
with Triton). An autotuned kernel is built in every configuration its autotuner would time for
the dtypes in ``--all-tiles`` (the benchmark's bfloat16 by default), in its first otherwise.
The flash kernels of fused context reductions are energyc.runtime.triton_attention's, shared by
every package; of the packages' own kernels, those whose source differs only in the package's
name prefix are built once. The launches
write nothing, so the layers' values are garbage: this checks that every kernel builds for the
GPU, not what it computes (the interpreter tests do that). Prints one line per build and exits
non-zero if any fails.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

import torch

DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
          torch.float64: "fp64", torch.int64: "i64", torch.int32: "i32", torch.bool: "i1"}
NAMES = ["float32", "bfloat16", "float16", "float64"]


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + DTYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2 ** 31) <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("packages", nargs="+")
    parser.add_argument("--dtypes", nargs="+", choices=NAMES, default=["float32", "bfloat16"])
    parser.add_argument("--all-tiles", nargs="*", choices=NAMES, default=["bfloat16"])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--sizes", default="D=16,H=2,K=8,M=12,G=2,R=2")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("run with TRITON_INTERPRET unset: interpreted kernels are not compiled")

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    target = GPUTarget("cuda", args.arch, 32)
    built: dict[tuple, str | None] = {}
    state = {"prefix": "", "all_tiles": True}

    def compile_launch(self, *call_args, grid=None, warmup=False, **kwargs):
        bound = dict(zip(self.arg_names, call_args))
        bound.update({k: v for k, v in kwargs.items() if k in self.arg_names})
        signature, constexprs = {}, {}
        for k, param in enumerate(self.params):
            name = param.name
            value = bound.get(name, param.default)
            if param.is_constexpr:
                signature[name] = "constexpr"
                constexprs[(k,)] = value
            else:
                signature[name] = _arg_type(value)
        options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        key = (self.src.replace(state["prefix"], "_"), tuple(signature.items()),
               tuple(sorted(constexprs.items())), tuple(sorted(options.items())))
        if key in built:
            return None
        try:
            kernel = triton.compile(ASTSource(self, signature, constexprs), target=target,
                                    options=options)
            built[key] = None
            tiles = {k: v for k, v in bound.items() if k.startswith("BLOCK")}
            print(f"ok    {self.__name__} {tiles} {options}  ({len(kernel.asm['cubin'])} bytes of "
                  f"sm_{args.arch}, {kernel.metadata.shared} bytes of shared memory)", flush=True)
        except Exception:  # report every failure, then exit non-zero
            built[key] = traceback.format_exc(limit=3)
            print(f"FAIL  {self.__name__}\n{built[key]}", flush=True)
        return None

    def compile_configs(self, *call_args, **kwargs):
        """An autotuned kernel: build the configurations its autotuner would time."""
        for config in self.configs if state["all_tiles"] else self.configs[:1]:
            self.fn.run(*call_args, **kwargs, **config.all_kwargs())

    JITFunction.run = compile_launch
    Autotuner.run = compile_configs
    from energyc.runtime import layer as runtime_layer

    def triton_path(backend, x, package):
        """The kernels' path as on a CUDA device (the runtime refuses CPU tensors uninterpreted)."""
        path = sys.modules[f"{package}._triton_layer"]
        return path, path.KERNELS

    runtime_layer.implementation = triton_path  # where the step loop looks it up
    from energyc.runtime import neurons as runtime_neurons

    runtime_neurons.implementation = triton_path  # and a neuron model's dynamics
    sizes = {k: int(v) for k, v in (s.split("=") for s in args.sizes.split(","))}
    for package in args.packages:
        module = importlib.import_module(f"generated.{package}")
        importlib.import_module(f"generated.{package}._triton_layer")
        dims = {k: v for k, v in sizes.items() if k in module.Layer.__init__.__code__.co_varnames}
        state["prefix"] = f"_{package}_"
        torch.manual_seed(0)
        for name in args.dtypes:
            dtype = getattr(torch, name)
            state["all_tiles"] = name in args.all_tiles
            for precond in ("identity", "diagonal", "dplr"):
                neurons = getattr(module.Layer._declared.module, "NEURONS", ())
                if len(neurons) > 1 and precond != "identity":
                    continue  # several neuron layers step without a preconditioner
                layer = module.Layer(**dims, precond=precond, backend="triton", dtype=dtype)
                # a neuron model's states, one per layer; else x over D
                widths = [getattr(layer, dim) for _, dim, _ in neurons] or [dims["D"]]
                xs = [torch.randn(2, 5, w, dtype=dtype, requires_grad=True) for w in widths]
                call = {}  # the documents or prefix its sets read (not conftest's helper:
                reads = layer._declared.context_data  # importing it would interpret Triton)
                if "same_document" in reads:
                    call["document_ids"] = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 2]])
                if "prefix" in reads:
                    call["prefix"] = 2
                declared = layer._declared.memory
                if declared is not None:  # more memory tokens than x's, padded in one row
                    call["memory"] = torch.randn(2, 7, getattr(layer, declared[1]), dtype=dtype)
                    call["memory_lengths"] = torch.tensor([7, 3])
                ys = layer(*xs, **call)
                ys = ys if isinstance(ys, tuple) else (ys,)
                torch.autograd.grad(sum(y.float().sum() for y in ys), [*xs, *layer.parameters()],
                                    allow_unused=True)
    failed = [key for key, err in built.items() if err is not None]
    print(f"{len(args.packages)} packages, {' '.join(args.dtypes)}: {len(built) - len(failed)} "
          f"distinct kernels built, {len(failed)} failed for sm_{args.arch}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
