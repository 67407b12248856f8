"""Tests for examples/train_lm.py (byte-level LM trainer) and examples/compare_runs.py.

Tiny models (dim 32, depth 1, seq 32, batch 4) on a small text file written to tmp_path, so the
whole file runs in well under a minute on two CPU cores.
"""

from __future__ import annotations

import gc
import json
import math
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
for _path in (ROOT, EXAMPLES):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import compare_runs  # noqa: E402
import train_lm  # noqa: E402

REQUIRED_KEYS = {"model", "params", "params_attention", "params_mlp", "params_embedding",
                 "tokens_per_s", "val_bpb", "curve", "config"}  # fmt: skip


def _text(n_lines: int = 1500) -> str:
    """A deterministic, learnable text of about 60 KB."""
    words = ["energy", "descent", "token", "layer", "attention", "gradient", "byte", "model"]
    return "".join(
        f"{i:05d} {words[i % 8]} {words[(i * 7) % 8]} = {(i * i) % 97};\n" for i in range(n_lines)
    )


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(_text())
    return str(path)


def tiny(model: str, data: str, out: str, *extra: str) -> list[str]:
    """Command-line arguments of a tiny run."""
    return ["--model", model, "--dim", "32", "--depth", "1", "--heads", "2", "--seq", "32",
            "--batch", "4", "--eval-batches", "2", "--data", data, "--out", out,
            "--threads", "1", "--no-progress", *extra]  # fmt: skip


def read_metrics(out: str) -> dict:
    with open(os.path.join(out, "metrics.json"), encoding="utf-8") as fh:
        return json.load(fh)


# -- training end to end ---------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["cem", "baseline"])
def test_trains_and_writes_metrics(model, data_file, tmp_path, capsys):
    out = str(tmp_path / model)
    argv = tiny(model, data_file, out, "--steps", "4", "--eval-every", "2", "--warmup", "1")
    argv.remove("--no-progress")
    assert train_lm.main(argv) == 0
    m = read_metrics(out)
    assert REQUIRED_KEYS <= set(m)
    assert m["model"] == model and m["finished"] and m["steps_done"] == 4
    assert [c["step"] for c in m["curve"]] == [0, 2, 4]
    assert all(math.isfinite(c["val_bpb"]) and 0 < c["val_bpb"] < 16 for c in m["curve"])
    assert m["val_bpb"] == m["curve"][-1]["val_bpb"]
    assert m["curve"][1]["train_loss"] == pytest.approx(sum(m["train_losses"][:2]) / 2)
    assert len(m["train_losses"]) == 4 and m["tokens_per_s"] > 0
    assert m["params"] == (m["params_attention"] + m["params_mlp"] + m["params_embedding"]
                           + m["params_norm"])  # fmt: skip
    assert m["config"]["dim"] == 32 and m["config"]["model"] == model
    assert os.path.exists(os.path.join(out, "checkpoint.pt"))
    err = capsys.readouterr().err
    assert "\r" in err and "4/4" in err and "val_bpb=" in err  # the progress bar (tqdm)
    assert m["precision"] == "fp32" and m["config"]["precision"] == "fp32"  # CPU's default


def test_cem_loss_decreases(data_file, tmp_path):
    """Thirty steps on a repetitive text: the validation loss must go down clearly."""
    out = str(tmp_path / "cem")
    train_lm.main(tiny("cem", data_file, out, "--steps", "30", "--eval-every", "30",
                       "--warmup", "3", "--lr", "1e-2"))  # fmt: skip
    curve = read_metrics(out)["curve"]
    assert curve[-1]["val_bpb"] < curve[0]["val_bpb"] - 1.0


def test_variants_build_and_run(data_file):
    """Every CEM position x interaction x preconditioner variant runs one forward/backward."""
    corpus = train_lm.load_corpus(data_file, min_bytes=33)
    x, y = train_lm.get_batch(corpus.train, 0, seed=0, batch=2, seq=16)
    for position in ("rope", "alibi", "none"):
        for interaction, precond in (("lowrank", "diag"), ("dplr", "dplr")):
            args = train_lm.parse_args(tiny("cem", data_file, "unused", "--position", position,
                                            "--interaction", interaction, "--preconditioner",
                                            precond, "--recursive-steps", "2"))  # fmt: skip
            model = train_lm.build_model(args)
            assert model.attention_layer == train_lm.attention_layer_name(position, interaction)
            attention = model.blocks[0].attention
            assert attention.config[1] == 2 and attention.config[2] == train_lm.PRECONDITIONERS[
                precond]  # fmt: skip
            assert hasattr(attention, "slopes") == (position == "alibi")
            assert hasattr(attention, "d") == (interaction == "dplr")
            train_lm.lm_loss(model(x), y).backward()
            assert all(p.grad is not None for p in model.parameters())


# -- parameter counts ------------------------------------------------------------------------------


def test_parameter_counts_half_attention_two_thirds_mlp(data_file):
    counts = {}
    for model in ("cem", "baseline"):
        args = train_lm.parse_args(["--model", model, "--dim", "48", "--depth", "3", "--heads",
                                    "4", "--mlp-hidden", "80", "--out", "unused"])  # fmt: skip
        counts[model] = train_lm.param_counts(train_lm.build_model(args))
    cem, base = counts["cem"], counts["baseline"]
    assert base["params_attention"] == 3 * 4 * 48 * 48  # q, k, v, o of (48, 48)
    assert 2 * cem["params_attention"] == base["params_attention"]  # W_q, W_k only
    assert 3 * cem["params_mlp"] == 2 * base["params_mlp"]  # W, U vs gate, up, down
    assert cem["params_mlp"] == 3 * 2 * 80 * 48
    assert cem["params_embedding"] == base["params_embedding"] == 256 * 48  # tied: counted once
    assert cem["params_norm"] == base["params_norm"] == (2 * 3 + 1) * 48
    # ALiBi adds the learned per-head slopes, dplr the per-head diagonal (H, D)
    args = train_lm.parse_args(["--dim", "48", "--depth", "3", "--heads", "4", "--position",
                                "alibi", "--interaction", "dplr", "--out", "unused"])  # fmt: skip
    alibi = train_lm.param_counts(train_lm.build_model(args))
    assert alibi["params_attention"] == cem["params_attention"] + 3 * (4 + 4 * 48)


# -- exact resume ----------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_resume_is_exact(precision, data_file, tmp_path):
    """8 steps straight vs 5 steps, stop, resume to 8: bit-identical losses and parameters, in
    every precision (fp16: the gradient scaler's state is checkpointed too)."""
    common = ["--steps", "8", "--eval-every", "2", "--checkpoint-every", "3", "--warmup", "2",
              "--preconditioner", "diag", "--precision", precision]  # fmt: skip
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    train_lm.main(tiny("cem", data_file, full, *common))
    train_lm.main(tiny("cem", data_file, split, *common, "--stop-at", "5"))
    half = read_metrics(split)
    assert half["steps_done"] == 5 and not half["finished"]
    train_lm.main(tiny("cem", data_file, split, *common, "--resume"))
    a, b = read_metrics(full), read_metrics(split)
    assert len(a["train_losses"]) == 8
    assert a["train_losses"] == b["train_losses"]
    assert a["curve"] == b["curve"]
    ca = torch.load(os.path.join(full, "checkpoint.pt"), weights_only=True)
    cb = torch.load(os.path.join(split, "checkpoint.pt"), weights_only=True)
    assert ca["step"] == cb["step"] == 8
    assert ca["model"].keys() == cb["model"].keys()
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    assert all(torch.equal(ca["optimizer"]["state"][k]["exp_avg"], v["exp_avg"])
               for k, v in cb["optimizer"]["state"].items())  # fmt: skip


def test_resume_refuses_other_settings(data_file, tmp_path, capsys):
    out = str(tmp_path / "run")
    train_lm.main(tiny("cem", data_file, out, "--steps", "2", "--eval-every", "2"))
    with pytest.raises(SystemExit) as exc:
        train_lm.main(tiny("cem", data_file, out, "--steps", "4", "--lr", "1e-3", "--resume"))
    assert exc.value.code == 2
    assert "cannot resume" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        train_lm.main(tiny("cem", data_file, out, "--steps", "4", "--precision", "bf16",
                           "--resume"))  # fmt: skip
    assert exc.value.code == 2
    assert "--precision 'fp32' in the checkpoint, 'bf16' now" in capsys.readouterr().err


# -- mixed precision -------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["cem", "baseline"])
def test_bf16_trains(model, data_file, tmp_path):
    """--precision bf16 on CPU: the forward under autocast to bfloat16 (generated layers
    included), float32 parameters; twelve steps on a repetitive text lower the loss."""
    out = str(tmp_path / model)
    train_lm.main(tiny(model, data_file, out, "--steps", "12", "--eval-every", "12",
                       "--warmup", "2", "--lr", "1e-2", "--precision", "bf16"))  # fmt: skip
    m = read_metrics(out)
    assert m["precision"] == "bf16" and m["config"]["precision"] == "bf16"
    losses = m["train_losses"]
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2
    assert m["curve"][-1]["val_bpb"] < m["curve"][0]["val_bpb"]
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values())


def test_bf16_forward_runs_in_bf16(data_file):
    """Under the trainer's autocast the generated layers return bfloat16, as nn.Linear does."""
    args = train_lm.parse_args(tiny("cem", data_file, "unused"))
    model = train_lm.build_model(args, warn=False)
    block = model.blocks[0]
    x = torch.randn(2, 8, args.dim)
    with train_lm.autocast(x.device, "bf16"):
        assert block.attention(x).dtype == torch.bfloat16
        assert block.mlp(x).dtype == torch.bfloat16
    with train_lm.autocast(x.device, "fp32"):
        assert block.attention(x).dtype == torch.float32


# -- data and batches ------------------------------------------------------------------------------


def test_batches_are_pure_functions_of_seed_and_step(data_file):
    data = train_lm.load_corpus(data_file, min_bytes=33).train
    x0, y0 = train_lm.get_batch(data, 7, seed=1, batch=4, seq=32)
    x1, _ = train_lm.get_batch(data, 7, seed=1, batch=4, seq=32)
    x2, _ = train_lm.get_batch(data, 8, seed=1, batch=4, seq=32)
    x3, _ = train_lm.get_batch(data, 7, seed=2, batch=4, seq=32)
    assert torch.equal(x0, x1) and not torch.equal(x0, x2) and not torch.equal(x0, x3)
    assert torch.equal(x0[:, 1:], y0[:, :-1])  # targets are the inputs shifted by one byte
    parts = [train_lm.get_batch(data, 7, seed=1, batch=4, seq=32, rank=r, world_size=2)[0]
             for r in range(2)]  # fmt: skip
    assert torch.equal(torch.cat(parts), x0)
    with pytest.raises(train_lm.ConfigError, match="not divisible"):
        train_lm.get_batch(data, 0, seed=0, batch=4, seq=32, world_size=3)


def test_folder_split_by_file_is_stable(tmp_path):
    folder = tmp_path / "docs"
    for n in range(60):
        (folder / f"d{n % 3}").mkdir(parents=True, exist_ok=True)
        (folder / f"d{n % 3}" / f"f{n:02d}.txt").write_text(f"file {n}\n" * 20)
    corpus = train_lm.load_corpus(str(folder), min_bytes=10)
    val_files = [r for r in train_lm.list_files(str(folder)) if train_lm.is_validation_file(r)]
    assert 0 < corpus.files_val == len(val_files) < 60
    assert corpus.files_train + corpus.files_val == 60
    expected = b"".join((folder / r).read_bytes() for r in val_files)
    assert bytes(corpus.val.tolist()) == expected
    assert corpus.split.startswith("by file")
    again = train_lm.load_corpus(str(folder), min_bytes=10)
    assert torch.equal(corpus.train, again.train) and torch.equal(corpus.val, again.val)
    capped = train_lm.load_corpus(str(folder), min_bytes=10, max_train_bytes=100)
    assert capped.train.numel() == 100


def test_default_corpus_is_stdlib_without_tests():
    corpus = train_lm.load_corpus(None, max_train_bytes=50_000, max_val_bytes=10_000)
    assert corpus.train.numel() == 50_000 and corpus.val.numel() == 10_000
    assert "stdlib" in corpus.source and corpus.split.startswith("by file")
    assert b"import" in bytes(corpus.train[:50_000].tolist())


# -- the baseline's positions and causality ------------------------------------------------------


def test_rotary_convention_matches_generated_runtime():
    from energyc import runtime as rt

    t = torch.randn(2, 3, 7, 8, dtype=torch.float64)  # (B, H, T, K)
    ours = train_lm.rotary(t)
    m, p = 1, 5  # pair (2, 3) at position 5, by the formula
    w = 10000.0 ** (-2 * m / 8)
    a, b = t[..., p, 2 * m], t[..., p, 2 * m + 1]
    assert torch.allclose(ours[..., p, 2 * m], a * math.cos(p * w) - b * math.sin(p * w))
    assert torch.allclose(ours[..., p, 2 * m + 1], a * math.sin(p * w) + b * math.cos(p * w))
    theirs = rt.rotary(t, token_dim=2, feature_dim=3, base=10000.0, inverse=False)
    assert torch.allclose(ours, theirs)


def test_alibi_bias():
    bias = train_lm.alibi_bias(4, 5, torch.device("cpu"), torch.float32)
    assert bias.shape == (4, 5, 5)
    assert bias[1, 4, 1].item() == pytest.approx(-(2.0**-4) * 3)  # slope 2^(-8*2/4), i - j = 3
    assert torch.isinf(bias[0, 1, 2]) and bias[2, 3, 3] == 0


@pytest.mark.parametrize("model,position", [("cem", "rope"), ("cem", "alibi"),
                                            ("baseline", "rope"), ("baseline", "alibi"),
                                            ("baseline", "none")])  # fmt: skip
def test_models_are_causal(model, position):
    args = train_lm.parse_args(["--model", model, "--position", position, "--dim", "16",
                                "--heads", "2", "--depth", "2", "--out", "unused"])  # fmt: skip
    net = train_lm.build_model(args)
    x = torch.randint(0, 256, (2, 12))
    x2 = x.clone()
    x2[:, 8:] = torch.randint(0, 256, (2, 4))
    with torch.no_grad():
        a, b = net(x), net(x2)
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-5)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


# -- bad arguments ---------------------------------------------------------------------------------


@pytest.mark.parametrize("extra,message", [
    (["--data", "/nonexistent/corpus.txt"], "no such file or folder"),
    (["--dim", "30", "--heads", "4"], "not divisible by --heads"),
    (["--dim", "12", "--heads", "4"], "even head size"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--model", "rnn"], "invalid choice"),
])  # fmt: skip
def test_bad_arguments(extra, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        train_lm.main(["--out", str(tmp_path / "x"), *extra])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_too_small_corpus(tmp_path, capsys):
    small = tmp_path / "small.txt"
    small.write_text("tiny")
    with pytest.raises(SystemExit) as exc:
        train_lm.main(["--out", str(tmp_path / "x"), "--data", str(small), "--seq", "32"])
    assert exc.value.code == 2
    assert "needs at least 33" in capsys.readouterr().err


# -- distributed data parallel ---------------------------------------------------------------------


def _grad_worker(rank: int, world: int, init_file: str, argv: list[str], out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)  # fmt: skip
    ddp = None
    try:
        from torch.nn.parallel import DistributedDataParallel

        args = train_lm.parse_args(argv)
        model = train_lm.build_model(args, warn=False)
        ddp = DistributedDataParallel(model)
        data = train_lm.load_corpus(args.data, min_bytes=args.seq + 1).train
        x, y = train_lm.get_batch(data, 3, seed=args.seed, batch=args.batch, seq=args.seq,
                                  rank=rank, world_size=world)  # fmt: skip
        train_lm.lm_loss(ddp(x), y).backward()
        torch.save({n: p.grad for n, p in model.named_parameters()},
                   os.path.join(out, f"grads{rank}.pt"))  # fmt: skip
        dist.barrier()
    finally:
        ddp = None  # DDP's reducer goes before the process group (see train_lm.train)
        gc.collect()
        dist.destroy_process_group()


def _grads_one_process(argv: list[str], batch_slice: slice | None = None) -> dict:
    args = train_lm.parse_args(argv)
    model = train_lm.build_model(args, warn=False)
    data = train_lm.load_corpus(args.data, min_bytes=args.seq + 1).train
    x, y = train_lm.get_batch(data, 3, seed=args.seed, batch=args.batch, seq=args.seq)
    if batch_slice is not None:
        x, y = x[batch_slice], y[batch_slice]
    train_lm.lm_loss(model(x), y).backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("model", ["cem", "baseline"])
def test_ddp_gradients_equal_one_process(model, data_file, tmp_path):
    """Two gloo processes, each on half of the step's batch, give the one-process gradients.

    Each rank's loss is the mean over its half; DDP averages the ranks' gradients; the average of
    two means over halves of equal size is the mean over the whole batch, so the gradients agree.
    They agree to fp32 rounding, not bitwise: the sums run in a different order (per half, then
    across ranks), which changes the last bits (relative ~1e-7, so rtol 1e-5 leaves room).
    """
    argv = tiny(model, data_file, str(tmp_path), "--preconditioner", "dplr", "--position",
                "alibi", "--interaction", "dplr")  # fmt: skip
    mp.start_processes(_grad_worker, args=(2, str(tmp_path / "init"), argv, str(tmp_path)),
                       nprocs=2, join=True, start_method="spawn")  # fmt: skip
    ranks = [torch.load(tmp_path / f"grads{r}.pt", weights_only=True) for r in range(2)]
    single = _grads_one_process(argv)
    half = _grads_one_process(argv, slice(0, 2))
    assert ranks[0].keys() == single.keys()
    for name, grad in single.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # all-reduced: the same
        assert torch.allclose(ranks[0][name], grad, rtol=1e-5, atol=1e-7), name
    # the check can fail: one half's gradient is not the full batch's
    assert not all(torch.allclose(half[n], single[n], rtol=1e-3, atol=1e-6) for n in single)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _main_worker(rank: int, world: int, port: int, argv: list[str]) -> None:
    # what torchrun sets up for each process
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    train_lm.main(argv)


def test_torchrun_style_run_matches_one_process(data_file, tmp_path):
    """train_lm.main under 2 processes (torchrun's environment) follows the one-process curve."""
    common = ["--steps", "3", "--eval-every", "3", "--warmup", "1"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    train_lm.main(tiny("cem", data_file, one, *common))
    mp.start_processes(_main_worker, args=(2, _free_port(), tiny("cem", data_file, two, *common)),
                       nprocs=2, join=True, start_method="spawn")  # fmt: skip
    a, b = read_metrics(one), read_metrics(two)
    assert b["world_size"] == 2 and a["world_size"] == 1
    # fp32 rounding in the gradient sums (see above), carried through three AdamW steps
    assert b["train_losses"] == pytest.approx(a["train_losses"], rel=1e-4)
    assert b["val_bpb"] == pytest.approx(a["val_bpb"], rel=1e-4)


# -- compare_runs ----------------------------------------------------------------------------------


def test_compare_runs_table_and_plot(data_file, tmp_path, capsys):
    runs = []
    for model in ("cem", "baseline"):
        out = str(tmp_path / model)
        train_lm.main(tiny(model, data_file, out, "--steps", "2", "--eval-every", "1"))
        runs.append(out)
    capsys.readouterr()
    png = tmp_path / "plot.png"
    assert compare_runs.main([*runs, "-o", str(png)]) == 0
    table = capsys.readouterr().out
    lines = [line for line in table.splitlines() if line.startswith("|")]
    assert len(lines) == 4  # header, rule, two runs
    assert "cem" in lines[2] and "baseline" in lines[3]
    m = read_metrics(runs[0])
    assert f"{m['params']:,}" in lines[2] and f"{m['val_bpb']:.4f}" in lines[2]
    pytest.importorskip("matplotlib")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_runs_missing_metrics(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        compare_runs.main([str(tmp_path / "nothing")])
    assert exc.value.code == 2
    assert "metrics.json" in capsys.readouterr().err


# -- windows packed from documents -----------------------------------------------------------------


@pytest.fixture
def data_folder(tmp_path):
    """400 files of 1 to 4 lines of ``_text`` (about 30 to 120 bytes): windows of 32 bytes
    cross a file boundary often."""
    lines = _text(1000).splitlines(keepends=True)
    folder, at = tmp_path / "files", 0
    folder.mkdir()
    for n in range(400):
        count = 1 + n % 4
        (folder / f"f{n:03d}.txt").write_text("".join(lines[at:at + count]))
        at = (at + count) % (len(lines) - 4)
    return str(folder)


def _pieces(part: torch.Tensor, starts: torch.Tensor) -> list[bytes]:
    data, cuts = bytes(part.tolist()), [*starts.tolist(), part.numel()]
    return [data[a:b] for a, b in zip(cuts, cuts[1:])]


def test_corpus_document_starts_are_file_starts(data_folder, tmp_path):
    files = [open(os.path.join(data_folder, r), "rb").read()
             for r in train_lm.list_files(data_folder)]  # fmt: skip
    corpus = train_lm.load_corpus(data_folder, min_bytes=33)
    assert corpus.split.startswith("by file")
    for part, starts, count in ((corpus.train, corpus.train_documents, corpus.files_train),
                                (corpus.val, corpus.val_documents, corpus.files_val)):  # fmt: skip
        pieces = _pieces(part, starts)
        assert len(pieces) == count > 1 and all(p in files for p in pieces)
    # a folder of too few files is split by position: the pieces are still files, cut at the cut
    few = tmp_path / "few"
    few.mkdir()
    for n in range(3):
        (few / f"g{n}.txt").write_text(f"<{n}>" + "abcdefghij" * (n + 3))
    files = [(few / f"g{n}.txt").read_bytes() for n in range(3)]
    corpus = train_lm.load_corpus(str(few), min_bytes=2)
    assert corpus.split.startswith("by position")
    train = _pieces(corpus.train, corpus.train_documents)  # files, the last cut at the cut
    assert train[:-1] == files[:2] and files[2].startswith(train[-1]) and train[-1] != files[2]
    val = _pieces(corpus.val, corpus.val_documents)  # the rest of the last file
    assert len(val) == 1 and files[2].endswith(val[0])
    single = train_lm.load_corpus(os.path.join(few, "g0.txt"), min_bytes=2)
    assert single.train_documents.tolist() == single.val_documents.tolist() == [0]


def test_packed_windows_carry_their_documents(data_folder):
    corpus = train_lm.load_corpus(data_folder, min_bytes=33)
    x, y = train_lm.get_batch(corpus.train, 5, seed=0, batch=8, seq=32)
    px, py, ids = train_lm.get_batch(corpus.train, 5, seed=0, batch=8, seq=32,
                                     documents=corpus.train_documents)  # fmt: skip
    assert torch.equal(x, px) and torch.equal(y, py)  # the same windows and targets
    assert ids.shape == (8, 32) and ids.dtype == torch.int64
    assert (ids[:, 0] == 0).all() and (ids.diff(dim=1) >= 0).all()
    assert int(ids.max()) >= 1  # some window holds several files
    # a document starts inside a window exactly where a file starts in the stream
    g = torch.Generator().manual_seed(train_lm._stream_seed(0, 5))
    starts = torch.randint(0, corpus.train.numel() - 32, (8,), generator=g)
    file_starts = set(corpus.train_documents.tolist())
    for row in range(8):
        new = (ids[row].diff() > 0).nonzero().flatten() + 1
        assert [int(starts[row]) + t in file_starts for t in range(1, 32)] == [
            t in new.tolist() for t in range(1, 32)]  # fmt: skip
    parts = [train_lm.get_batch(corpus.train, 5, seed=0, batch=8, seq=32, rank=r, world_size=2,
                                documents=corpus.train_documents)[2] for r in range(2)]  # fmt: skip
    assert torch.equal(torch.cat(parts), ids)
    val = train_lm.validation_batches(corpus.val, batches=2, batch=4, seq=32,
                                      documents=corpus.val_documents)  # fmt: skip
    assert all(len(b) == 3 and b[2].shape == (4, 32) for b in val)


@pytest.mark.parametrize("model", ["cem", "baseline"])
def test_pack_documents_trains(model, data_folder, tmp_path):
    out = str(tmp_path / model)
    train_lm.main(tiny(model, data_folder, out, "--steps", "3", "--eval-every", "3",
                       "--warmup", "1", "--pack-documents"))  # fmt: skip
    m = read_metrics(out)
    assert m["finished"] and m["config"]["pack_documents"]
    assert all(math.isfinite(v) for v in m["train_losses"]) and math.isfinite(m["val_bpb"])
    assert m["corpus"]["documents_train"] > 1
    if model == "cem":
        assert m["attention_layer"] == "generated.lm_attention_rope_documents"
    # a packed run resumes only packed
    with pytest.raises(SystemExit):
        train_lm.main(tiny(model, data_folder, out, "--steps", "4", "--resume"))


def _packed_vs_alone(net: torch.nn.Module, lengths: list[int]) -> tuple[torch.Tensor, ...]:
    """Logits of one row packed from documents of ``lengths``, and of each document alone."""
    tokens = torch.randint(0, 256, (1, sum(lengths)))
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    with torch.no_grad():
        packed = net(tokens, ids)
        alone = torch.cat([net(part) for part in tokens.split(lengths, dim=1)], dim=1)
        unmasked = net(tokens)
    return packed, alone, unmasked


@pytest.mark.parametrize("position", ["rope", "alibi", "none"])
def test_baseline_document_mask_is_each_document_alone(position):
    args = train_lm.parse_args(["--model", "baseline", "--position", position, "--dim", "16",
                                "--heads", "2", "--depth", "2", "--out", "unused"])  # fmt: skip
    torch.manual_seed(1)
    packed, alone, unmasked = _packed_vs_alone(train_lm.build_model(args), [5, 9, 1, 7])
    assert torch.allclose(packed, alone, atol=1e-5)
    assert not torch.allclose(unmasked[:, 5:], alone[:, 5:], atol=1e-3)  # the mask matters


@pytest.mark.parametrize("position,interaction", [("rope", "lowrank"), ("alibi", "dplr")])
def test_cem_documents_are_each_document_alone(position, interaction):
    """The packed CEM model's logits of each document are those of the document alone through
    the causal layers with the same parameters (its attention kernels read the documents)."""
    args = train_lm.parse_args(["--model", "cem", "--position", position, "--interaction",
                                interaction, "--dim", "16", "--heads", "2", "--depth", "2",
                                "--pack-documents", "--out", "unused"])  # fmt: skip
    net = train_lm.build_model(args)
    causal = train_lm.build_model(train_lm.parse_args(
        ["--model", "cem", "--position", position, "--interaction", interaction, "--dim", "16",
         "--heads", "2", "--depth", "2", "--out", "unused"]))  # fmt: skip
    causal.load_state_dict(net.state_dict())  # the same parameters over j <= i
    torch.manual_seed(1)
    lengths = [5, 9, 1, 7]
    tokens = torch.randint(0, 256, (1, sum(lengths)))
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    with torch.no_grad():
        packed = net(tokens, ids)
        alone = torch.cat([causal(part) for part in tokens.split(lengths, dim=1)], dim=1)
    assert torch.allclose(packed, alone, atol=1e-5)


def test_cem_documents_model_needs_document_ids():
    """The packed CEM model's attention layers read documents: called without them, the layer
    says what it needs (the model passes document_ids through to them, not to the MLP)."""
    args = train_lm.parse_args(["--model", "cem", "--dim", "16", "--heads", "2", "--depth", "1",
                                "--pack-documents", "--out", "unused"])  # fmt: skip
    net = train_lm.build_model(args)
    tokens = torch.randint(0, 256, (2, 8))
    with pytest.raises(ValueError, match="same_document"):
        net(tokens)
    assert net(tokens, torch.zeros(2, 8, dtype=torch.int64)).shape == (2, 8, 256)
