"""Compile the Triton kernels a generated layer launches for a CUDA GPU, without one.

Run as ``python -m tests.cuda_build PACKAGE DTYPE... [--arch 90]`` with TRITON_INTERPRET unset. The
layer runs one step forward and backward on CPU tensors, with each preconditioner; each kernel launch, instead of running,
is compiled by Triton for the target (an H100 is ``cuda`` capability 90) with the types and
constexprs of that launch, down to PTX and a cubin (ptxas ships with Triton). The launched
kernels write nothing, so the layer's values are garbage: this checks that every kernel builds for
the GPU, not what it computes (the interpreter tests do that). Prints one line per distinct
(kernel, signature) and exits non-zero if any fails to build.
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
    parser.add_argument("package")
    parser.add_argument("dtypes", nargs="+", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--sizes", default="D=16,H=2,K=8,M=12")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("run with TRITON_INTERPRET unset: interpreted kernels are not compiled")

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    target = GPUTarget("cuda", args.arch, 32)
    built: dict[tuple, str | None] = {}

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
        key = (self.__name__, tuple(signature.items()), tuple(sorted(constexprs.items())))
        if key not in built:
            try:
                kernel = triton.compile(ASTSource(self, signature, constexprs), target=target)
                built[key] = None
                print(f"ok    {self.__name__}  ({len(kernel.asm['cubin'])} bytes of sm_{args.arch})")
            except Exception:  # report every failure, then exit non-zero
                built[key] = traceback.format_exc(limit=3)
                print(f"FAIL  {self.__name__}\n{built[key]}")
        return None

    JITFunction.run = compile_launch
    module = importlib.import_module(f"generated.{args.package}")
    path = importlib.import_module(f"generated.{args.package}._triton_layer")
    # the kernels' path as on a CUDA device (the runtime would refuse CPU tensors uninterpreted)
    module.layer._rt.implementation = lambda backend, x, package: (path, path.KERNELS)
    sizes = {k: int(v) for k, v in (s.split("=") for s in args.sizes.split(","))}
    dims = {k: v for k, v in sizes.items() if k in module.Layer.__init__.__code__.co_varnames}
    torch.manual_seed(0)
    for dtype in (getattr(torch, name) for name in args.dtypes):
        for precond in ("identity", "diagonal", "dplr"):
            layer = module.Layer(**dims, precond=precond, backend="triton", dtype=dtype)
            x = torch.randn(2, 5, dims["D"], dtype=dtype, requires_grad=True)
            y = layer(x)
            torch.autograd.grad(y.float().sum(), [x, *layer.parameters()], allow_unused=True)
    failed = [key for key, err in built.items() if err is not None]
    print(f"{args.package} {' '.join(args.dtypes)}: {len(built) - len(failed)} built, "
          f"{len(failed)} failed for sm_{args.arch}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
