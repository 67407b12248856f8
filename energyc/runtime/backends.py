"""Which implementation of a generated layer runs: the package's torch step functions with the
torch attention kernels (``energyc.runtime.attention``), or its Triton module with the kernels
that module names."""

from __future__ import annotations

import sys
from types import ModuleType

import torch

from energyc.runtime import attention


def implementation(backend: str, x: torch.Tensor, package: str) -> tuple[ModuleType, ModuleType]:
    """(module with the step functions, module with the attention_* functions).

    torch: the package's layer.py and ``energyc.runtime.attention``. triton: its _triton_layer.py and the kernels
    that module names (``energyc.runtime.triton_attention``, or the torch kernels when the layer has
    no fused context reduction). Modules are looked up, not imported, so that torch.compile can
    trace this: ``preload`` imports them when the layer is built.
    """
    torch_path = sys.modules[f"{package}.layer"], attention
    if backend == "torch" or (backend == "auto" and not x.is_cuda):
        return torch_path
    path = sys.modules.get(f"{package}._triton_layer")
    if path is None:
        if backend == "auto":
            return torch_path
        raise RuntimeError(
            f"backend='triton' needs the triton package (import {package}._triton_layer)"
        )
    if not x.is_cuda and not sys.modules["energyc.runtime.triton_layer"].INTERPRETED:
        raise RuntimeError(
            "backend='triton' on CPU runs Triton's interpreter: set TRITON_INTERPRET=1 in the "
            "environment before triton is imported"
        )
    return path, path.KERNELS


def preload(backend: str, package: str) -> None:
    """Import the Triton path when ``backend`` may use it (``triton``, or ``auto`` with CUDA)."""
    import importlib

    if backend == "torch" or (backend == "auto" and not torch.cuda.is_available()):
        return
    try:
        importlib.import_module(f"{package}._triton_layer")
    except ImportError as exc:
        if backend == "triton":
            raise RuntimeError(f"backend='triton' needs the triton package: {exc}") from None
