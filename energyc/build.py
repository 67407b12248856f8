"""The compile entry point: energy file -> generated packages."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from energyc.compiler import CompiledLayer, compile_file
from energyc.loader import load
from energyc.render import render_files, write_package


def source_name(path: str) -> str:
    """The energy file's path as recorded in headers: relative to the working directory if inside."""
    rel = os.path.relpath(os.path.abspath(path))
    return rel.replace(os.sep, "/") if not rel.startswith("..") else os.path.basename(path)


def compile_path(
    path: str, outdir: str = "generated", log: Callable[[str], None] | None = None
) -> list[str]:
    """Compile every layer of the energy file at ``path`` into ``outdir/<layer>/``.

    All layers are rendered before any is written, so an error leaves ``outdir`` untouched.
    """
    log = log or (lambda message: None)
    t0 = time.perf_counter()
    energy_file = load(path)
    log(f"loaded {path}: {len(energy_file.layers)} layer(s)")
    layers: list[CompiledLayer] = compile_file(energy_file)
    rendered = []
    for layer in layers:
        log(f"  {layer.name}: derived forward and backward graphs "
            f"({len(layer.step.live())} nodes) in {sum(layer.timings.values()):.2f}s")
        rendered.append((layer.name, render_files(layer, source_name(path))))
    written = [write_package(files, outdir, name) for name, files in rendered]
    for target in written:
        log(f"  wrote {target}/")
    log(f"done in {time.perf_counter() - t0:.2f}s")
    return written
