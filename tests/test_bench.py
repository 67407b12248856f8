"""`energyc bench`: the table, the JSON, the agreement check, the memory probes and the budgets."""

import importlib.util
import json
import math

import pytest
import torch

from energyc import bench
from energyc.cli import main
from energyc.compiler import compile_file
from energyc.loader import load
from energyc.tolerances import tolerance

FILES = ["examples/cem_mlp.py", "examples/cem_attention.py"]
TINY = ["--dim", "D=16", "H=2", "K=8", "M=32", "--repeats", "1"]
TINY_MLP = ["--dim", "D=16", "M=32", "--repeats", "1"]


def _table_rows(out: str) -> dict[tuple[str, int, int], list[str]]:
    """(layer, tokens, threads) -> the cells of the printed table (split on runs of two
    spaces)."""
    lines = out.splitlines()
    start = next(k for k, line in enumerate(lines) if line.startswith("layer "))
    rows = {}
    for line in lines[start + 2:]:
        if not line.strip() or line.startswith("wrote "):
            break
        cells = [c.strip() for c in line.split("  ") if c.strip()]
        rows[(cells[0], int(cells[1]), int(cells[2]))] = cells
    return rows


def test_bench_sweeps_thread_counts(tmp_path, capsys):
    """--threads 1 2: one row per layer, size and thread count, the sweep in the header, the
    command and the JSON rows; torch's own setting is as it was."""
    before = torch.get_num_threads()
    out_json = tmp_path / "bench.json"
    assert main(["bench", "examples/cem_mlp.py", "--tokens", "16", *TINY_MLP, "--no-memory",
                 "--threads", "1", "2", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert sorted(_table_rows(out)) == [("cem_mlp", 16, 1), ("cem_mlp", 16, 2)]
    assert "threads 1, 2" in out.splitlines()[0]
    data = json.loads(out_json.read_text())
    assert [r["threads"] for r in data["rows"]] == [1, 2]
    assert "--threads 1 2" in data["command"]
    assert torch.get_num_threads() == before


def test_bench_cli_table_and_json(tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    assert main(["bench", *FILES, "--tokens", "32", *TINY, "--json", str(out_json)]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert out.startswith("machine: ") and "threads 1" in out and f"torch {torch.__version__}" in out
    assert "float32" in out and "batch 2" in out
    rows = _table_rows(out)
    assert sorted(rows) == [("cem_attention", 32, 1), ("cem_mlp", 32, 1)]
    for cells in rows.values():
        assert float(cells[3]) > 0 and float(cells[4]) > 0  # generated, autograd ms
        assert cells[5].endswith("x") and float(cells[5][:-1]) > 0  # speed-up (checked in JSON)
        assert cells[6].split()[0].isdigit() and cells[7].split()[0].isdigit()  # peak MiB
        assert cells[-1] == "ok"
    assert "memory probe" in captured.err and "repetition 1/1" in captured.err  # progress

    data = json.loads(out_json.read_text())
    assert data["command"].startswith("energyc bench examples/cem_mlp.py")
    assert data["machine"]["threads"] == 1 and data["machine"]["cpu"]
    assert data["options"]["tokens"] == [32]
    assert len(data["rows"]) == 2
    rtol, atol = tolerance(torch.float32)
    for row in data["rows"]:
        assert row["dims"] == ({"D": 16, "M": 32} if row["layer"] == "cem_mlp"
                               else {"D": 16, "H": 2, "K": 8})
        assert row["context_sets"] == ([] if row["layer"] == "cem_mlp" else ["causal"])
        agreement = row["agreement"]
        assert agreement["ok"] and agreement["status"] == "ok"
        assert (agreement["rtol"], agreement["atol"]) == (rtol, atol)
        assert agreement["excess"] <= 1.0
        for v in ("generated", "autograd"):
            r = row[v]
            assert r["status"] == "ok" and len(r["times_ms"]) == 1
            assert r["median_ms"] == r["times_ms"][0]
            assert r["peak_mib"] >= r["base_mib"] > 50  # RSS of a process that imported torch
            assert r["memory_source"] == "VmHWM since reset"
        assert row["speedup"] == pytest.approx(row["autograd"]["median_ms"]
                                               / row["generated"]["median_ms"])


def _perturbed(scale_for):
    """run_variant with the generated y scaled by scale_for(dtype) (a wrong layer)."""
    original = bench.run_variant

    def run_variant(variant, layer, lay, x, w):
        if variant != "generated":
            return original(variant, layer, lay, x, w)
        y = lay(x) * scale_for(x.dtype)
        return y, torch.autograd.grad((y * w).sum(), [x, *lay.parameters()], allow_unused=True)

    return run_variant


def test_bench_reports_a_mismatch(monkeypatch, capsys):
    monkeypatch.setattr(bench, "run_variant", _perturbed(lambda dtype: 1.01))
    assert main(["bench", FILES[0], "--tokens", "16", *TINY_MLP, "--no-memory"]) == 1
    captured = capsys.readouterr()
    assert "MISMATCH" in captured.err and "WARNING" in captured.err
    (cells,) = _table_rows(captured.out).values()
    assert cells[-1].startswith("MISMATCH (")


def test_bench_rechecks_a_rounding_difference_in_float64(monkeypatch, capsys):
    # beyond the float32 tolerance in float32 only, as rounding would be: not a mismatch
    rtol = tolerance(torch.float32)[0]
    monkeypatch.setattr(bench, "run_variant", _perturbed(
        lambda dtype: 1 + 10 * rtol if dtype == torch.float32 else 1.0))
    assert main(["bench", FILES[0], "--tokens", "16", *TINY_MLP, "--no-memory"]) == 0
    captured = capsys.readouterr()
    assert "agree in float64" in captured.err
    (cells,) = _table_rows(captured.out).values()
    assert cells[-1].startswith("ok in float64")


def _reference_not_finite(bad_first: bool):
    """run_variant whose autograd y is NaN at one element (an overflow on a pair outside the
    context set would give that); with ``bad_first`` the generated y is also off elsewhere."""
    original = bench.run_variant

    def run_variant(variant, layer, lay, x, w):
        y, grads = original(variant, layer, lay, x, w)
        if variant == "autograd":
            y = y.clone()
            y.view(-1)[0] = math.nan
        elif bad_first:
            y = y.clone()
            y.view(-1)[1] += 1.0
        return y, grads

    return run_variant


def test_bench_does_not_call_autograds_overflow_a_mismatch(monkeypatch, capsys):
    """Autograd NaN where the generated layer is finite: not compared, said so, not a MISMATCH;
    the other elements still are (one wrong one is a MISMATCH)."""
    monkeypatch.setattr(bench, "run_variant", _reference_not_finite(bad_first=False))
    assert main(["bench", FILES[0], "--tokens", "16", *TINY_MLP, "--no-memory"]) == 0
    captured = capsys.readouterr()
    assert "autograd of the energy is NaN or infinite where the generated layer is finite" in (
        captured.err)
    (cells,) = _table_rows(captured.out).values()
    # y is (batch 2, 16 tokens, D=16): 512 elements, one NaN
    assert cells[-1] == "ok where autograd is finite (autograd not finite: y 1/512)"
    monkeypatch.setattr(bench, "run_variant", _reference_not_finite(bad_first=True))
    assert main(["bench", FILES[0], "--tokens", "16", *TINY_MLP, "--no-memory"]) == 1
    (cells,) = _table_rows(capsys.readouterr().out).values()
    assert cells[-1].startswith("MISMATCH")


def test_bench_over_budget_is_shown_not_raised(capsys):
    assert main(["bench", FILES[0], "--tokens", "16", *TINY_MLP, "--no-memory",
                 "--max-seconds", "1e-9"]) == 0
    (cells,) = _table_rows(capsys.readouterr().out).values()
    assert cells[3:6] == ["over budget", "over budget", "-"]


@pytest.fixture
def one_thread():
    """The forked probes then run no thread pool (forking one is unsafe)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mlp():
    (layer,) = compile_file(load(FILES[0]))
    from energyc.check import import_generated

    return layer, import_generated(layer)


def test_probe_measures_the_increment_of_one_call(mlp, one_thread):
    layer, module = mlp
    small = bench._fork_probe(layer, module, bench.BenchOptions(dims={"D": 16, "M": 32}), 4,
                              "autograd")
    large = bench._fork_probe(layer, module, bench.BenchOptions(dims={"D": 64, "M": 256}), 2048,
                              "autograd")
    assert small["status"] == large["status"] == "ok"
    # (2, 2048, 256) float32 values are 4 MiB each; autograd keeps several of them alive
    assert large["peak_mib"] - large["base_mib"] > 8 > small["peak_mib"] - small["base_mib"]


def test_probe_out_of_memory_and_over_budget(mlp, one_thread):
    layer, module = mlp
    opts = bench.BenchOptions(dims={"D": 64, "M": 256}, max_memory_mib=1.0)
    # from the probe server, a fresh process, as energyc bench runs it: a probe forked from this
    # test process could serve the call from memory earlier tests freed, needing none new
    server = bench.ProbeServer(opts)
    try:
        answer = server.probe(FILES[0], layer.name, module.__path__[0], 2048, "autograd")
    finally:
        server.close()
    assert answer["status"] == "out of memory"
    opts = bench.BenchOptions(dims={"D": 64, "M": 256}, max_seconds=1e-4)
    assert bench._fork_probe(layer, module, opts, 2048, "generated")["status"] == "over budget"


@pytest.mark.parametrize("args, message", [
    (["--dim", "D"], "--dim: expected NAME=SIZE"),
    (["--dim", "Q=4"], "--dim: no layer declares dim Q"),
    (["--tokens", "0"], "--tokens: token counts must be at least 1"),
    (["--repeats", "0"], "--repeats: must be at least 1"),
])
def test_bench_bad_arguments(args, message, capsys):
    assert main(["bench", FILES[0], *args]) == 1
    assert f"energyc: error: {message}" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_bench_cuda_without_a_device(capsys):
    assert main(["bench", FILES[0], "--device", "cuda"]) == 1
    assert "energyc: error: --device: no CUDA device" in capsys.readouterr().err


def test_bench_examples_replaces_only_its_section(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_examples",
                                                  "benchmarks/bench_examples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n## Before\n\nkept\n")
    module.write_section(str(path), f"{module.SECTION}\n\nfirst\n")
    path.write_text(path.read_text() + "\n## After\n\nkept too\n")
    module.write_section(str(path), f"{module.SECTION}\n\nsecond\n")
    assert path.read_text() == (f"# Benchmark results\n\n## Before\n\nkept\n\n{module.SECTION}\n\n"
                                "second\n\n## After\n\nkept too\n")


def test_bench_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: energyc bench" in out
    for option in ("--tokens", "--batch", "--dtype", "--device", "--backend", "--threads", "--dim",
                   "--repeats", "--max-seconds", "--json"):
        assert option in out


def _bench_examples_module():
    spec = importlib.util.spec_from_file_location("bench_examples",
                                                  "benchmarks/bench_examples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_examples_keeps_one_section_per_set_of_token_counts(tmp_path):
    module = _bench_examples_module()
    path = tmp_path / "RESULTS.md"
    small, large = module.section_heading([256, 1024]), module.section_heading([4096])
    module.write_section(str(path), f"{small}\n\nsmall\n")
    module.write_section(str(path), f"{large}\n\nlarge\n")
    module.write_section(str(path), f"{small}\n\nsmall again\n")
    assert path.read_text() == (f"# Benchmark results\n\n{small}\n\nsmall again\n\n{large}\n\n"
                                "large\n")


def test_bench_examples_target_met_when_autograd_cannot_finish():
    """A pair layer whose autograd ran out of time or memory while the generated layer ran meets
    the speed line (no ratio can be formed); a failed generated layer never does."""
    from energyc.bench import Report, Row, VariantResult

    module = _bench_examples_module()

    def row(generated, autograd):
        return Row("f.py", "layer", 4096, {}, generated, autograd, context_sets=["j <= i"])

    ok = VariantResult(median_ms=120.0)
    over = VariantResult(status="over budget")
    ((_, _, met),) = module.targets(Report(rows=[row(ok, over)], machine={}, options={}))
    assert "autograd over budget" in met and "met" in met and "MISSED" not in met.split(";")[0]
    ((_, _, missed),) = module.targets(Report(rows=[row(over, ok)], machine={}, options={}))
    assert missed.startswith("4096: speed-up - MISSED")


def test_bench_examples_records_a_saved_run(tmp_path):
    """--from-json reads back what --json wrote: the same table and verdicts; a pair layer whose
    autograd ran out of memory meets the memory line (its peak is where it stopped) and shows no
    ratio."""
    from energyc.bench import Report, Row, VariantResult, write_json

    module = _bench_examples_module()
    ok = VariantResult(median_ms=300.0, peak_mib=390.0, base_mib=230.0)
    oom = VariantResult(status="out of memory", peak_mib=350.0, base_mib=230.0)
    report = Report({"cpu": "x", "logical_cpus": 2, "torch": "t", "threads": 1, "date": "d"},
                    {"max_memory_mib": 17625}, [Row("f.py", "meanfield", 4096, {}, ok, oom,
                                                     context_sets=["j <= i"])], "cmd")
    write_json(report, str(tmp_path / "run.json"))
    again = module.load_report(str(tmp_path / "run.json"))
    assert module.format_table(again) == module.format_table(report)
    assert again.rows[0].memory_ratio is None
    ((_, _, verdict),) = module.targets(again)
    assert "autograd out of memory (needs over 17625 MiB), generated +160 MiB: met" in verdict
