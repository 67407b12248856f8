"""`energyc bench`: the table, the JSON, the agreement check, the memory probes and the budgets."""

import importlib.util
import json
import math
import re

import pytest
import torch

from energyc import bench
from energyc.bench import isolation
from energyc.cli import main
from energyc.compiler import compile_file
from energyc.loader import load
from energyc.tolerances import tolerance

FILES = ["examples/cem_mlp.py", "examples/cem_attention.py"]
TINY = ["--dim", "D=16", "H=2", "K=8", "M=32", "--repeats", "1"]
TINY_MLP = ["--dim", "D=16", "M=32", "--repeats", "1"]


def _table_rows(out: str) -> dict[tuple[str, int, int], dict[str, str]]:
    """(layer, tokens, threads) -> the cells of the printed table by column name (split on runs
    of two spaces)."""
    lines = out.splitlines()
    start = next(k for k, line in enumerate(lines) if line.startswith("layer "))
    names = [c.strip() for c in lines[start].split("  ") if c.strip()]
    rows = {}
    for line in lines[start + 2:]:
        if not line.strip() or line.startswith("wrote "):
            break
        cells = [c.strip() for c in line.split("  ") if c.strip()]
        assert len(cells) == len(names), (names, cells)
        rows[(cells[0], int(cells[1]), int(cells[2]))] = dict(zip(names, cells))
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
    rtol, atol = tolerance(torch.float32)
    for cells in rows.values():
        assert "interpreter ms" not in cells  # not timed without --interpreter
        assert float(cells["generated ms"]) > 0 and float(cells["autograd ms"]) > 0
        speedup = cells["speed-up"]
        assert speedup.endswith("x") and float(speedup[:-1]) > 0  # the value: checked in JSON
        for v in ("generated", "autograd"):
            assert cells[f"{v} peak MiB"].split()[0].isdigit()
        # float32 at 32 tokens: both within the float32 tolerance of the float64 truth
        assert 0 < float(cells["gen err"]) < rtol and 0 < float(cells["autograd err"]) < rtol
        assert cells["agree"] == "ok"
    assert "memory probe" in captured.err and "repetition 1/1" in captured.err  # progress
    assert "the truth: interpreter in float64" in captured.err
    header = out.split("\nlayer ", 1)[0]
    assert "autograd: the baseline" in header and "Layer.energy" in header
    assert "speed-up = autograd ms / generated ms" in header
    assert "max|t - t64| / max|t64|" in header

    data = json.loads(out_json.read_text())
    assert data["command"].startswith("energyc bench examples/cem_mlp.py")
    assert data["machine"]["threads"] == 1 and data["machine"]["cpu"]
    assert data["options"]["tokens"] == [32] and data["options"]["interpreter"] is False
    assert data["baseline"] == "autograd"
    assert {"autograd", "speedup", "error", "agreement"} <= set(data["definitions"])
    assert len(data["rows"]) == 2
    for row in data["rows"]:
        assert row["dims"] == ({"D": 16, "M": 32} if row["layer"] == "cem_mlp"
                               else {"D": 16, "H": 2, "K": 8})
        assert row["context_sets"] == ([] if row["layer"] == "cem_mlp" else ["causal"])
        agreement = row["agreement"]
        assert agreement["ok"] and agreement["status"] == "ok"
        assert (agreement["rtol"], agreement["atol"]) == (rtol, atol)
        assert agreement["excess"] <= 1.0
        assert agreement["float64"]["ok"] and agreement["float64"]["truth"] == "interpreter"
        assert agreement["float64"]["rtol"] == tolerance(torch.float64)[0]
        errors = row["errors"]
        assert errors["truth"] == "interpreter" and "truth_failed" not in errors
        for v in ("generated", "autograd"):
            r = row[v]
            assert r["status"] == "ok" and len(r["times_ms"]) == 1
            assert r["median_ms"] == r["times_ms"][0]
            assert r["peak_mib"] >= r["base_mib"] > 50  # RSS of a process that imported torch
            assert r["memory_source"] == "VmHWM since reset"
            e = errors[v]
            assert set(e["per_tensor"]) == {"y", "d/dx", *(f"d/d{p}" for p in (
                ("W", "U") if row["layer"] == "cem_mlp" else ("W_q", "W_k")))}
            assert e["max_rel"] == max(e["per_tensor"].values()) == e["per_tensor"][e["name"]]
            assert 0 < e["max_rel"] < rtol
        assert row["interpreter"] is None
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
    # the float64 comparison with the truth is shown: 1% off is 1e5 times the float64 bound
    # (and 50 times float32's)
    assert cells["agree"].startswith("MISMATCH (") and cells["agree"].endswith("x tol)")
    assert float(cells["agree"].rsplit(" ", 2)[1][:-1]) > 0.01 / tolerance(torch.float64)[0] / 2


def test_bench_rechecks_a_rounding_difference_in_float64(monkeypatch, capsys):
    # beyond the float32 tolerance in float32 only, as rounding would be: not a mismatch
    rtol = tolerance(torch.float32)[0]
    monkeypatch.setattr(bench, "run_variant", _perturbed(
        lambda dtype: 1 + 10 * rtol if dtype == torch.float32 else 1.0))
    assert main(["bench", FILES[0], "--tokens", "16", *TINY_MLP, "--no-memory"]) == 0
    captured = capsys.readouterr()
    assert "agree in float64" in captured.err
    (cells,) = _table_rows(captured.out).values()
    # in words: float32 differs beyond its tolerance, by rounding, naming the worst tensor (y and
    # every gradient are 10 rtol off, a little under 10x the bound), and float64 agrees; the
    # legend says what that means
    found = re.fullmatch(r"ok: float32 beyond tolerance by rounding "
                         r"\((y|d/d\w+): ([0-9.]+)x tol\), float64 agrees", cells["agree"])
    assert found and 5 < float(found[2]) <= 10.01, cells["agree"]
    assert ("'ok: float32 beyond tolerance by rounding (T: N x tol), float64 agrees': in the "
            "run's dtype generated and autograd differ" in captured.out)
    assert "so the difference is rounding, not a wrong formula" in captured.out
    # the errors against the float64 truth say which variant is off: the generated y, by 10 rtol
    # of each of its elements (relative to the largest, at most that), autograd by rounding
    gen, auto = cells["gen err"].split(" ", 1), float(cells["autograd err"])
    assert 5 * rtol < float(gen[0]) <= 10 * rtol * (1 + 1e-3) and auto < rtol
    # its ratio to autograd's, over 2x (of the unrounded errors)
    assert gen[1].startswith("(") and gen[1].endswith("x)")
    assert float(gen[1][1:-2]) == pytest.approx(float(gen[0]) / auto, rel=0.1)
    assert "NOTE: the generated layer is the less accurate" in captured.err


def _reference_not_finite(bad_first: bool):
    """run_variant whose autograd y is NaN at one element (an overflow on a pair outside the
    context set would give that); with ``bad_first`` the generated y is also off elsewhere."""
    original = bench.run_variant

    def run_variant(variant, layer, lay, x, w):
        y, grads = original(variant, layer, lay, x, w)
        if variant == "autograd":
            y = y.clone()
            y.view(-1)[0] = math.nan
        elif bad_first and variant == "generated":
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
    assert cells["agree"] == "ok where autograd is finite (autograd not finite: y 1/512)"
    monkeypatch.setattr(bench, "run_variant", _reference_not_finite(bad_first=True))
    assert main(["bench", FILES[0], "--tokens", "16", *TINY_MLP, "--no-memory"]) == 1
    (cells,) = _table_rows(capsys.readouterr().out).values()
    assert cells["agree"].startswith("MISMATCH")


def test_bench_over_budget_is_shown_not_raised(capsys):
    assert main(["bench", FILES[0], "--tokens", "16", *TINY_MLP, "--no-memory",
                 "--max-seconds", "1e-9"]) == 0
    (cells,) = _table_rows(capsys.readouterr().out).values()
    assert [cells[c] for c in ("generated ms", "autograd ms", "speed-up")] == [
        "over budget", "over budget", "-"]


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
    small = isolation._fork_probe(layer, module, bench.BenchOptions(dims={"D": 16, "M": 32}),
                                  4, "autograd")
    large = isolation._fork_probe(layer, module, bench.BenchOptions(dims={"D": 64, "M": 256}),
                                  2048, "autograd")
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
    assert isolation._fork_probe(layer, module, opts, 2048, "generated")["status"] == "over budget"


@pytest.mark.parametrize("args, message", [
    (["--dim", "D"], "--dim: expected NAME=SIZE"),
    (["--dim", "Q=4"], "--dim: no layer declares dim Q"),
    (["--tokens", "0"], "--tokens: token counts must be at least 1"),
    (["--repeats", "0"], "--repeats: must be at least 1"),
])
def test_bench_bad_arguments(args, message, capsys):
    assert main(["bench", FILES[0], *args]) == 1
    assert f"energyc: error: {message}" in capsys.readouterr().err


GQA = "examples/grouped_query_attention.py"  # dims("D G R K", G=2, R=2)


def _gqa_without_sizes(tmp_path) -> str:
    """The grouped-query energy with no default sizes for G and R."""
    text = open(GQA).read()
    assert 'dims("D G R K", G=2, R=2)' in text
    path = tmp_path / "gqa_unsized.py"
    path.write_text(text.replace('dims("D G R K", G=2, R=2)', 'dims("D G R K")'))
    return str(path)


def test_bench_refuses_a_dim_that_nothing_sizes(tmp_path, capsys):
    """G and R are in no table and the Layer declares no size for them: refused before anything
    runs, naming them and --dim (not sized 32 each, 1024 query heads)."""
    unsized = _gqa_without_sizes(tmp_path)
    assert main(["bench", unsized, "--tokens", "16", "--no-memory"]) == 1
    err = capsys.readouterr().err
    assert ("energyc: error: --dim: no size for dim G, R (layer grouped_query_attention: G, R)"
            in err)
    assert "give them with --dim G=SIZE R=SIZE" in err and "D=128 H=4 K=32 M=512" in err
    assert "or declare a size in the energy file: dims(\"...\", G=SIZE, R=SIZE)" in err
    # given, it runs, the others from the table
    assert main(["bench", unsized, "--tokens", "16", "--no-memory", "--repeats", "1", "--dim",
                 "G=2", "R=1", "D=16", "K=8"]) == 0
    assert "sizes: batch 2, D=16, G=2, K=8, R=1;" in capsys.readouterr().out


def test_bench_takes_the_sizes_the_energy_declares(capsys):
    """dims("D G R K", G=2, R=2): the generated Layer's G and R keywords default to 2, and bench
    sizes them so without --dim (--dim still wins)."""
    assert main(["bench", GQA, "--tokens", "16", "--no-memory", "--repeats", "1", "--dim",
                 "D=16", "K=8"]) == 0
    assert "sizes: batch 2, D=16, G=2, K=8, R=2;" in capsys.readouterr().out
    assert main(["bench", GQA, "--tokens", "16", "--no-memory", "--repeats", "1", "--dim",
                 "D=16", "K=8", "R=1"]) == 0
    assert "sizes: batch 2, D=16, G=2, K=8, R=1;" in capsys.readouterr().out


def test_bench_takes_a_size_the_layer_declares():
    """--dim first, then a size the generated Layer gives its dim keyword, then the table."""
    (layer,) = compile_file(load(GQA))

    class Layer:  # the generated package's Layer, as if the energy gave G and R defaults
        def __init__(self, *, D, G=3, R=2, K):
            pass

    module = type("module", (), {"Layer": Layer, "DIMS": ("D", "G", "R", "K")})
    assert bench.declared_dims(module) == {"G": 3, "R": 2}
    opts = bench.BenchOptions(dims={"R": 5})
    assert bench.layer_dims(layer, opts, module) == {"D": 128, "G": 3, "R": 5, "K": 32}
    assert bench.missing_dims(layer, opts) == ["G"]
    with pytest.raises(bench.EnergyError, match="no size for dim G .*--dim G=SIZE"):
        bench.layer_dims(layer, opts)


def test_bench_examples_size_every_dim_of_every_example():
    """benchmarks/bench_examples.py's table, with the sizes the generated Layers declare (a
    memory's width: cross_attention's Dm=64), gives every example's dims a size (G=2 R=2 for
    the grouped and global heads), so that its run over examples/ needs no --dim."""
    import importlib

    module = _bench_examples_module()
    opts = bench.BenchOptions(default_dims=dict(module.EXAMPLE_DIMS))
    assert module.EXAMPLE_DIMS == {**bench.DEFAULT_DIMS, "G": 2, "R": 2}
    for path in module.example_files():
        for layer in compile_file(load(path)):
            package = importlib.import_module(f"generated.{layer.name}.layer")
            assert bench.missing_dims(layer, opts, package) == [], (path, layer.name)


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
    errors = {"truth": "interpreter", "generated": {"max_rel": 3e-5, "name": "d/dV"},
              "autograd": {"max_rel": 1e-5, "name": "d/dW"}}
    report = Report({"cpu": "x", "logical_cpus": 2, "torch": "t", "threads": 1, "date": "d"},
                    {"max_memory_mib": 17625}, [Row("f.py", "meanfield", 4096, {}, ok, oom,
                                                     context_sets=["j <= i"], errors=errors)],
                    "cmd")
    write_json(report, str(tmp_path / "run.json"))
    again = module.load_report(str(tmp_path / "run.json"))
    assert module.format_table(again) == module.format_table(report)
    assert again.rows[0].memory_ratio is None and again.rows[0].interpreter is None
    ((_, _, verdict),) = module.targets(again)
    assert "autograd out of memory (needs over 17625 MiB), generated +160 MiB: met" in verdict
    # the errors come back, and a generated error 3x autograd's is pointed out
    assert "3.0e-05 (3.0x)" in module.format_table(again)
    assert module.accuracy_notes(again) == [
        "meanfield at 4096 tokens: generated error 3.0e-05 (d/dV) against autograd's 1.0e-05 "
        "(d/dW), 3.0x"]


@pytest.mark.parametrize("settings", [
    {"steps": 2, "context": "current", "precond": "dplr"},
    {"steps": 2, "context": "input", "precond": "diagonal"},
])
def test_the_autograd_baseline_is_autograd_through_layer_energy(settings):
    """The baseline differentiates the package's Layer.energy (E scaled by 2 there moves its y and
    no other variant's), and agrees in float64 with the generated layer and the interpreter over
    several steps, both contexts and a learned preconditioner."""
    from energyc.check import import_generated

    (layer,) = compile_file(load(FILES[1]))
    module = import_generated(layer)
    g = torch.Generator().manual_seed(0)
    lay = module.Layer(D=8, H=2, K=4, eta=0.5, dtype=torch.float64, **settings)
    with torch.no_grad():
        for p in lay.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(2, 12, 8, generator=g, dtype=torch.float64).requires_grad_(True)
    w = torch.randn(2, 12, 8, generator=g, dtype=torch.float64)
    names = bench._output_names(lay)
    outs = {}
    for v in bench.VARIANTS:
        y, grads = bench.run_variant(v, layer, lay, x, w)
        outs[v] = [y.detach(), *grads]
    for v in ("autograd", "interpreter"):
        assert bench.compare(names, outs["generated"], outs[v], torch.float64)["ok"], v
    energy = lay.energy
    lay.energy = lambda x, xbar=None, per_token=False: 2 * energy(x, xbar, per_token)
    y2 = bench.run_variant("autograd", layer, lay, x, w)[0]
    assert not torch.allclose(y2, outs["autograd"][0])
    assert torch.equal(bench.run_variant("interpreter", layer, lay, x, w)[0],
                       outs["interpreter"][0])


def test_relative_errors_definition():
    """max over tensors of max|got - truth| / max|truth|; absolute where the truth is zero; NaN the
    worst; elements where only the truth is not finite left out."""
    t = torch.tensor([1.0, -4.0, 2.0], dtype=torch.float64)
    got = [t + torch.tensor([0.0, 0.02, 0.0]), torch.full((2,), 3e-3), t * (1 + 1e-3)]
    truth = [t, torch.zeros(2, dtype=torch.float64), t]
    e = bench.relative_errors(["a", "b", "c"], got, truth, torch.float32)
    assert e["per_tensor"] == pytest.approx({"a": 0.02 / 4, "b": 3e-3, "c": 1e-3})
    assert e["name"] == "a" and e["max_rel"] == pytest.approx(0.005)
    rtol, atol = tolerance(torch.float32)
    assert e["excess_name"] == "b" and e["excess"] == pytest.approx(3e-3 / atol, rel=1e-5)
    nan = bench.relative_errors(["a", "b"], [t, t.clone().fill_(math.nan)], [t, t],
                                torch.float32)
    assert nan["name"] == "b" and math.isnan(nan["max_rel"])
    inf_truth = torch.tensor([1.0, math.inf, 2.0], dtype=torch.float64)
    left_out = bench.relative_errors(["a"], [torch.tensor([1.0, 5.0, 2.2])], [inf_truth],
                                     torch.float32)
    assert left_out["max_rel"] == pytest.approx(0.1)


def test_bench_interpreter_variant(tmp_path, capsys):
    """--interpreter times the interpreter too, in its own columns; the speed-up stays against
    the autograd baseline."""
    out_json = tmp_path / "bench.json"
    assert main(["bench", FILES[1], "--tokens", "16", "--dim", "D=16", "H=2", "K=8", "--repeats",
                 "1", "--no-memory", "--interpreter", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    (cells,) = _table_rows(out).values()
    assert float(cells["interpreter ms"]) > 0 and float(cells["interpreter err"]) > 0
    assert cells["interpreter peak MiB"] == "-"  # --no-memory
    assert "interpreter: the same by autograd through energyc.reference" in out
    data = json.loads(out_json.read_text())
    assert "--interpreter" in data["command"] and data["options"]["interpreter"] is True
    (row,) = data["rows"]
    assert row["interpreter"]["status"] == "ok" and len(row["interpreter"]["times_ms"]) == 1
    assert row["errors"]["interpreter"]["max_rel"] > 0
    assert row["speedup"] == pytest.approx(row["autograd"]["median_ms"]
                                           / row["generated"]["median_ms"])


def test_bench_truth_falls_back_to_autograd(monkeypatch, tmp_path, capsys):
    """Where the interpreter cannot run in float64, the truth is autograd's, and the row says
    why."""
    original = bench.run_variant

    def run_variant(variant, layer, lay, x, w):
        if variant == "interpreter" and x.dtype == torch.float64:
            raise RuntimeError("the interpreter cannot run")
        return original(variant, layer, lay, x, w)

    monkeypatch.setattr(bench, "run_variant", run_variant)
    out_json = tmp_path / "bench.json"
    assert main(["bench", FILES[0], "--tokens", "16", *TINY_MLP, "--no-memory",
                 "--json", str(out_json)]) == 0
    (row,) = json.loads(out_json.read_text())["rows"]
    assert row["errors"]["truth"] == "autograd"
    assert row["errors"]["truth_failed"] == {
        "interpreter": "error: RuntimeError: the interpreter cannot run"}
    assert row["agreement"]["status"] == "ok" and row["agreement"]["float64"]["truth"] == "autograd"
    assert "the truth: interpreter in float64: error" in capsys.readouterr().err


def test_bench_float64_run_fails_on_a_baseline_difference(monkeypatch, capsys):
    """In float64 a difference of generated and autograd beyond the tolerance is a MISMATCH,
    though the generated layer agrees with the truth (here autograd is off)."""
    original = bench.run_variant

    def run_variant(variant, layer, lay, x, w):
        y, grads = original(variant, layer, lay, x, w)
        return (y * 1.01 if variant == "autograd" else y), grads

    monkeypatch.setattr(bench, "run_variant", run_variant)
    assert main(["bench", FILES[0], "--tokens", "16", *TINY_MLP, "--no-memory", "--dtype",
                 "float64"]) == 1
    (cells,) = _table_rows(capsys.readouterr().out).values()
    assert cells["agree"].startswith("MISMATCH (y: ")
