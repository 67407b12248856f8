"""Compare runs of examples/train_lm.py: a markdown table and a plot of validation loss.

Usage:

    python examples/compare_runs.py runs/cem runs/baseline [...] [-o compare.png]

Reads RUN/metrics.json from each folder; prints a markdown table (model, parameters in total, in
attention and in the MLPs, training tokens/s, final validation bits per byte) and writes a PNG of
validation bits per byte against the training step for all runs (needs matplotlib; without it
the table is still printed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

COLUMNS = ("run", "model", "params", "attention params", "MLP params", "tokens/s",
           "final val_bpb", "steps")  # fmt: skip


def load_run(folder: str) -> dict[str, Any]:
    """The metrics.json of a run folder; FileNotFoundError or ValueError when unusable."""
    path = os.path.join(folder, "metrics.json")
    with open(path, encoding="utf-8") as fh:
        metrics = json.load(fh)
    missing = [k for k in ("model", "params", "curve") if k not in metrics]
    if missing:
        raise ValueError(f"{path}: not a train_lm.py metrics file (no {', '.join(missing)})")
    return metrics


def _fmt_int(value: Any) -> str:
    return f"{int(value):,}" if isinstance(value, (int, float)) else "-"


def _fmt_float(value: Any, digits: int) -> str:
    return f"{value:,.{digits}f}" if isinstance(value, (int, float)) else "-"


def run_label(folder: str) -> str:
    return os.path.basename(os.path.normpath(folder)) or folder


def markdown_table(runs: list[tuple[str, dict[str, Any]]]) -> str:
    """One row per (folder, metrics)."""
    rows = [COLUMNS, tuple("---" for _ in COLUMNS)]
    for folder, m in runs:
        model = m["model"]
        if m.get("attention_layer", "").startswith("generated."):
            model += f" ({m['attention_layer'].removeprefix('generated.')})"
        rows.append((
            run_label(folder), model, _fmt_int(m.get("params")),
            _fmt_int(m.get("params_attention")), _fmt_int(m.get("params_mlp")),
            _fmt_float(m.get("tokens_per_s"), 0), _fmt_float(m.get("val_bpb"), 4),
            str(m.get("steps_done", "-")),
        ))  # fmt: skip
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def plot(runs: list[tuple[str, dict[str, Any]]], path: str) -> bool:
    """Write the validation curves to ``path``; False (and a message) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "matplotlib is not installed: no plot written (pip install matplotlib)", file=sys.stderr
        )
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    later: list[float] = []  # values after step 0, which set the y range
    for folder, m in runs:
        points = [(c["step"], c["val_bpb"]) for c in m["curve"] if c.get("val_bpb") is not None]
        if points:
            steps, values = zip(*points)
            later += [v for s, v in points if s > 0]
            name = run_label(folder)
            name = name if name == m["model"] else f"{name} ({m['model']})"
            ax.plot(
                steps, values, marker="o", markersize=3, label=f"{name}, {m['params']:,} params"
            )
    title = "Byte-level LM: validation loss"
    if later:  # the untrained model's loss (step 0) would squash the curves: clip it
        low, high = min(later), max(later)
        ax.set_ylim(low - 0.05 * (high - low) - 0.01, high + 0.15 * (high - low) + 0.01)
        title += " (step 0 off scale)"
    ax.set_xlabel("training step")
    ax.set_ylabel("validation bits per byte")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="compare_runs.py", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="DIR", help="train_lm.py --out folders")
    parser.add_argument("-o", "--output", default="compare.png", help="PNG to write")
    args = parser.parse_args(argv)
    runs = []
    for folder in args.runs:
        try:
            runs.append((folder, load_run(folder)))
        except FileNotFoundError:
            parser.error(f"{folder}: no metrics.json (is it a train_lm.py --out folder?)")
        except ValueError as exc:  # json.JSONDecodeError included
            parser.error(f"{folder}: unreadable metrics.json: {exc}")
    print(markdown_table(runs))
    if plot(runs, args.output):
        print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
