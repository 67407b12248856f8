"""benchmarks/gpu_check.py: the one-command GPU check, as far as it runs without a GPU."""

from __future__ import annotations

import pytest
import torch

from benchmarks import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_without_cuda_the_gpu_steps_are_skipped_and_said(tmp_path):
    """Without CUDA the environment is recorded, the benchmark steps are skipped (not run on
    the CPU as if they were GPU figures), the summary says so and the exit status is 3."""
    status = gpu_check.main(["--out", str(tmp_path), "--steps", "env", "examples", "cem"])
    assert status == gpu_check.NO_CUDA_EXIT
    summary = (tmp_path / "summary.md").read_text()
    assert summary.count("skipped: needs CUDA") == 2
    assert "no figure above is a GPU figure" in summary
    assert "cuda available False" in (tmp_path / "env.txt").read_text()


def test_a_step_past_its_budget_is_stopped_and_reported(tmp_path):
    """A step that runs past its budget is stopped and reported as timed out."""
    status, secs = gpu_check.run(["python", "-c", "import time; time.sleep(30)"],
                                 str(tmp_path / "log.txt"), budget=1)
    assert status == "timed out (1 s)" and secs < 20


def test_examples_table_gathers_the_runs_and_names_the_missing(tmp_path):
    """examples.md holds the rows of every example JSON written and names the examples whose
    run left none."""
    from dataclasses import asdict

    from energyc.bench import BenchOptions, Report, Row, VariantResult, machine, write_json

    row = Row("examples/cem_mlp.py", "cem_mlp", 1024, {"D": 128, "M": 512},
              VariantResult(median_ms=1.0, times_ms=[1.0]),
              VariantResult(median_ms=3.0, times_ms=[3.0]), agreement={"status": "ok"})
    opts = BenchOptions()
    write_json(Report(machine(opts), asdict(opts), [row]), str(tmp_path / "cem_mlp.json"))
    gpu_check._write_examples_table(str(tmp_path), ["cem_mlp", "window_alibi"],
                                    ["ok", "timed out (20 s)"], str(tmp_path / "examples.md"))
    text = (tmp_path / "examples.md").read_text()
    assert "| cem_mlp | 1024 |" in text and "3.00x" in text
    assert "- window_alibi: timed out (20 s), no results" in text
    assert "| window_alibi |" not in text  # an example without a JSON has no row
