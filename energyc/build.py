"""The compile entry point: energy files -> generated packages."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

from energyc.compiler import CompiledLayer, compile_file
from energyc.errors import EnergyError
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
    return compile_paths([path], outdir, log)


def compile_paths(
    paths: list[str], outdir: str = "generated", log: Callable[[str], None] | None = None
) -> list[str]:
    """Compile every layer of every energy file in ``paths`` into ``outdir/<layer>/``.

    All or nothing: every file is loaded, compiled and rendered before any package is written, so
    an error in any of them leaves ``outdir`` untouched.

    Raises:
        EnergyError: an error in an energy file; two layers (in one file or two) with the same
            name, which would be the same package; ``outdir`` is an existing file.
    """
    log = log or (lambda message: None)
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise EnergyError(f"{outdir} is an existing file, not a folder", "output folder")
    t0 = time.perf_counter()
    rendered: list[tuple[str, dict[str, str]]] = []
    declared: dict[str, str | None] = {}  # layer name -> where it was declared
    seen: set[str] = set()
    for path in paths:
        if os.path.abspath(path) in seen:  # a file named twice (e.g. by itself and its folder)
            continue
        seen.add(os.path.abspath(path))
        energy_file = load(path)
        log(f"loaded {path}: {len(energy_file.layers)} layer(s)")
        for decl in energy_file.layers:
            if decl.name in declared:
                raise EnergyError(
                    f"layer {decl.name!r} is also declared at {declared[decl.name] or '?'}; each "
                    f"layer is the package {os.path.join(outdir, decl.name)}/, so rename one",
                    decl.where,
                )
            declared[decl.name] = decl.where
        layers: list[CompiledLayer] = compile_file(energy_file)
        for layer in layers:
            log(f"  {layer.name}: derived forward and backward graphs "
                f"({len(layer.step.live())} nodes) in {sum(layer.timings.values()):.2f}s")
            for note in layer.notes:
                print(f"energyc: note: {note}", file=sys.stderr, flush=True)
            rendered.append((layer.name, render_files(layer, source_name(path))))
    written = [write_package(files, outdir, name) for name, files in rendered]
    for target in written:
        log(f"  wrote {target}/")
    log(f"done in {time.perf_counter() - t0:.2f}s")
    return written
