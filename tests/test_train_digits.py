"""examples/train_digits.py --quick: the three-layer associative memory trains on scikit-learn's
8x8 digits (300 images, 64 memories, 40 epochs; seconds on two CPU cores), writes its pictures
and metrics, and its dynamics never raise the energy. Skipped without scikit-learn."""

from __future__ import annotations

import json
import os
import sys

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)

import train_digits  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    metrics = train_digits.train(train_digits.build_parser().parse_args(
        ["--quick", "--out", str(out), "--no-progress", "--threads", "1"]))
    return out, metrics


def test_writes_pictures_and_metrics(quick):
    out, metrics = quick
    for name in ("digits_reconstructions.png", "digits_energy.png"):
        with open(out / name, "rb") as fh:
            assert fh.read(8) == PNG, name
    with open(out / "digits_metrics.json", encoding="utf-8") as fh:
        saved = json.load(fh)
    assert saved["accuracy"] == metrics["accuracy"]
    assert saved["test_images"] == 60 and saved["train_images"] == 240
    assert len(saved["curve"]) == saved["config"]["epochs"] == 40


def test_classifies_above_chance(quick):
    # A floor, not a tuned result: the 60 test images hold 6 of each digit, so a classifier at
    # chance (10%) gets 18 or more right with probability about 1e-5 (binomial, n 60, p 0.1);
    # the untrained model (--epochs 0) reads 8 to 10%, the quick run well over 80%.
    _, metrics = quick
    assert metrics["accuracy"] >= 0.3


def test_completes_better_than_its_input(quick):
    # The masked pixels start at the mean training image (0 in the centred pixels), so the mean
    # image's error is where the dynamics begin: a trained memory must end below it. The
    # untrained model (--epochs 0) ends slightly above it.
    _, metrics = quick
    assert metrics["mse_masked"] < metrics["mse_mean_image"]


def test_energy_never_rises(quick):
    _, metrics = quick
    assert metrics["energy_non_increasing"]
    traces = metrics["energy_traces"]
    steps = metrics["config"]["steps"]
    for name in ("classify", "complete"):
        assert len(traces[name]) == 6
        for totals in traces[name]:
            assert len(totals) == steps + 1  # the input and after each step
            assert totals[-1] < totals[0]  # the dynamics move: a flat trace is not a descent


def test_energy_check_catches_a_rise():
    # energy_traces' verdict is not always True: a trace made to rise is reported as rising
    import torch

    torch.manual_seed(0)
    lay = train_digits.Layer(N=8, eta=3.0, steps=6)  # a step far too long for descent
    with torch.no_grad():
        lay.W.mul_(20.0)
    x = torch.rand(4, 64) - 0.5
    m = train_digits.masks("bottom", 4, torch.Generator().manual_seed(0))
    assert not train_digits.energy_traces(lay, x, m)["non_increasing"]
