"""Tests for examples/generate.py and the incremental decoding of examples/train_lm.py's models.

Tiny models (dim 32, depth 2, 2 heads, trained length 16) in float64 where logits are compared;
sequences of 20+ bytes, so decoding runs past the trained length. The CEM tests need the generated
layers' ``decode``; they are skipped, with the reason, where a layer class has none.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
for _path in (ROOT, EXAMPLES):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import generate  # noqa: E402
import train_lm  # noqa: E402
from test_train_lm import _text, tiny  # noqa: E402  (tiny runs, made as the trainer's tests do)

SMALL = ["--dim", "32", "--depth", "2", "--heads", "2", "--seq", "16"]
PIECES = (1, 3, 5, 7, 4)  # a 20-token sequence decoded in these pieces
PROMPT = b"00012 energy"


def decode_missing(position: str) -> list[str]:
    """The generated Layer classes of a CEM model with ``position`` that have no decode()."""
    from generated.cem_mlp import Layer as CemMlp

    attention, _ = train_lm.load_attention_layer(position, "lowrank", warn=False)
    return [cls.__module__ for cls in (attention, CemMlp) if not hasattr(cls, "decode")]


def model_case(model: str, position: str) -> pytest.param:
    """A (model, position) parameter; CEM cases skip while a generated layer lacks decode()."""
    missing = decode_missing(position) if model == "cem" else []
    reason = f"{', '.join(missing)}: the generated Layer has no decode() yet"
    return pytest.param(model, position, marks=pytest.mark.skipif(bool(missing), reason=reason),
                        id=f"{model}-{position}")  # fmt: skip


POSITIONS = ("rope", "alibi", "none")
CASES = [model_case(m, p) for m in ("baseline", "cem") for p in POSITIONS]
BASELINE_ROPE, CEM_ROPE = CASES[0], CASES[len(POSITIONS)]


def small_model(model: str, position: str) -> train_lm.LanguageModel:
    args = train_lm.parse_args(["--model", model, "--position", position, *SMALL,
                                "--out", "unused"])  # fmt: skip
    return train_lm.build_model(args, warn=False).double().eval()


def run(model, n: int, use_cache: bool, temperature: float = 0.0, top_k=None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    text, seconds = generate.generate(model, PROMPT, n, temperature, top_k, g, use_cache)
    assert len(text) == n and seconds > 0
    return text


# -- incremental decoding ------------------------------------------------------------------------


@pytest.mark.parametrize("model,position", CASES)
def test_decode_in_pieces_equals_forward(model, position):
    net = small_model(model, position)
    tokens = torch.randint(0, 256, (2, sum(PIECES)), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = net(tokens)
        cache, got, start = None, [], 0
        for size in PIECES:
            logits, cache = net.decode(tokens[:, start : start + size], cache)
            assert logits.shape == (2, size, train_lm.VOCAB)
            got.append(logits)
            start += size
    assert cache.length == tokens.shape[1] and len(cache.blocks) == 2
    torch.testing.assert_close(torch.cat(got, dim=1), want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("position", POSITIONS)
def test_attention_cache_holds_rotated_keys(position):
    """The baseline's cache: k (after rotary) and v of all tokens so far, (B, H, P, K)."""
    attention = small_model("baseline", position).blocks[0].attention
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    with torch.no_grad():
        _, first = attention.decode(x[:, :4])
        out, cache = attention.decode(x[:, 4:], first)
        q, k, v = attention._qkv(x, 0)
        torch.testing.assert_close(out, attention(x)[:, 4:], rtol=0, atol=1e-12)
    assert first.length == 4 and cache.length == 9 and cache.k.shape == (2, 2, 9, 16)
    torch.testing.assert_close(cache.k, k, rtol=0, atol=1e-12)
    torch.testing.assert_close(cache.v, v, rtol=0, atol=0)


def test_rotary_offset_continues_positions():
    t = torch.randn(2, 10, 8, dtype=torch.float64)
    torch.testing.assert_close(train_lm.rotary(t[:, 6:], offset=6), train_lm.rotary(t)[:, 6:])
    assert not torch.allclose(train_lm.rotary(t[:, 6:]), train_lm.rotary(t)[:, 6:])


def test_decode_without_layer_api_is_a_clear_error():
    """A CEM block whose layers have no decode() (stand-ins here) refuses to decode."""
    net = train_lm.LanguageModel([train_lm.CemBlock(nn.Identity(), nn.Identity(), 32)], 32,
                                 "cem", "stand-in")  # fmt: skip
    with pytest.raises(NotImplementedError, match=r"torch\.nn\.modules.*Identity has no decode"):
        net.decode(torch.tensor([[1, 2, 3]]))


# -- generation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("model,position", CASES)
def test_greedy_generation_with_and_without_cache(model, position):
    net = small_model(model, position)
    assert run(net, 24, use_cache=True) == run(net, 24, use_cache=False)


@pytest.mark.parametrize("model,position", [BASELINE_ROPE, CEM_ROPE])
def test_sampling_with_and_without_cache(model, position):
    net = small_model(model, position)
    cached = run(net, 24, True, temperature=1.0, top_k=5, seed=3)
    assert cached == run(net, 24, False, temperature=1.0, top_k=5, seed=3)


def test_sampling_is_seeded_and_top_k_bounded():
    net = small_model("baseline", "rope")
    a = run(net, 24, True, temperature=1.0, seed=1)
    assert a == run(net, 24, True, temperature=1.0, seed=1)
    assert a != run(net, 24, True, temperature=1.0, seed=2)
    assert run(net, 24, True, temperature=1.0, top_k=1, seed=5) == run(net, 24, True)
    sampled = run(net, 24, True, temperature=2.0, top_k=3, seed=4)
    with torch.no_grad():
        logits = net(torch.tensor([list(PROMPT + sampled)]))[0]
    allowed = logits[len(PROMPT) - 1 : -1].topk(3, dim=-1).indices  # the logits each byte followed
    assert all(byte in allowed[n].tolist() for n, byte in enumerate(sampled))


def test_generate_rejects_empty_prompt_and_no_tokens():
    net = small_model("baseline", "rope")
    g = torch.Generator()
    with pytest.raises(ValueError, match="prompt is empty"):
        generate.generate(net, b"", 3, 0.0, None, g, True)
    with pytest.raises(ValueError, match="at least 1"):
        generate.generate(net, PROMPT, 0, 0.0, None, g, True)


# -- command line ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run folders of a baseline and a CEM model trained for 2 steps by train_lm.py."""
    root = tmp_path_factory.mktemp("runs")
    data = root / "corpus.txt"
    data.write_text(_text())
    out = {}
    for model in ("baseline", "cem"):
        out[model] = str(root / model)
        train_lm.main(tiny(model, str(data), out[model], *SMALL, "--steps", "2",
                           "--eval-every", "2", "--warmup", "1"))  # fmt: skip
    return out


@pytest.mark.parametrize("model,cache", [
    ("baseline", True), ("baseline", False), ("cem", False),
    pytest.param("cem", True, marks=CEM_ROPE.marks),
])  # fmt: skip
def test_cli_prints_the_continuation(model, cache, runs, capsys):
    argv = ["--checkpoint", runs[model], "--prompt", PROMPT.decode(), "--tokens", "5",
            "--temperature", "0", "--device", "cpu"] + ([] if cache else ["--no-cache"])  # fmt: skip
    assert generate.main(argv) == 0
    captured = capsys.readouterr()
    net, config = generate.load_model(runs[model], torch.device("cpu"))
    assert config["model"] == model and net.name == model and not net.training
    expected = run(net, 5, use_cache=False)
    assert captured.out == expected.decode("utf-8", errors="replace") + "\n"
    mode = "cache" if cache else "no-cache"
    assert "5 bytes in" in captured.err and f"tokens/s ({mode})" in captured.err


@pytest.mark.parametrize("where,extra,message", [
    ("missing", [], "no such folder"),
    ("empty", [], "no checkpoint.pt in it"),
    ("baseline", ["--prompt", ""], "--prompt is empty"),
    ("baseline", ["--tokens", "0"], "--tokens must be at least 1"),
    ("baseline", ["--top-k", "0"], "--top-k must be at least 1"),
    ("baseline", ["--threads", "0"], "--threads must be at least 1"),
])  # fmt: skip
def test_cli_errors(where, extra, message, runs, tmp_path, capsys):
    folder = {"missing": str(tmp_path / "nothing"), "empty": str(tmp_path)}.get(where)
    argv = ["--checkpoint", folder or runs[where], "--prompt", "x", "--tokens", "3", *extra]
    with pytest.raises(SystemExit) as exc:
        generate.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_decodes_a_packed_run(tmp_path, capsys):
    """A --pack-documents CEM run's checkpoint loads into the causal layers (the same parameters):
    a prompt and its continuation are one document, decoded through the cache."""
    data = tmp_path / "corpus.txt"
    data.write_text(_text())
    out = str(tmp_path / "packed")
    train_lm.main(tiny("cem", str(data), out, *SMALL, "--steps", "1", "--eval-every", "1",
                       "--warmup", "1", "--pack-documents"))  # fmt: skip
    net, config = generate.load_model(out, torch.device("cpu"))
    assert config["pack_documents"] and net.attention_layer == "generated.lm_attention_rope"
    capsys.readouterr()
    argv = ["--checkpoint", out, "--prompt", PROMPT.decode(), "--tokens", "5", "--temperature",
            "0", "--device", "cpu"]  # fmt: skip
    assert generate.main(argv) == 0
    expected = run(net, 5, use_cache=False)
    assert capsys.readouterr().out == expected.decode("utf-8", errors="replace") + "\n"


# -- a batch of prompts of different lengths -------------------------------------------------------

BATCH = [b"def f(x):", b"ab", b"00012 energy min", b"z"]


@pytest.mark.parametrize("model,position", CASES)
def test_ragged_rows_decode_as_each_row_alone(model, position):
    """Prompts of different lengths padded on the left and decoded together (prefill, then one
    byte per row per call) give each row's logits of the row decoded alone."""
    net = small_model(model, position)
    width = max(len(p) for p in BATCH)
    pad = torch.tensor([width - len(p) for p in BATCH])
    tokens = torch.tensor([[7] * (width - len(p)) + list(p) for p in BATCH])
    follow = torch.randint(0, 256, (len(BATCH), 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, cache = net.decode(tokens, left_padding=pad)
        steps = [logits[:, -1]]
        for t in range(3):
            logits, cache = net.decode(follow[:, t:t + 1], cache)
            steps.append(logits[:, -1])
        for b, prompt in enumerate(BATCH):
            alone = net(torch.cat([torch.tensor([list(prompt)]), follow[b:b + 1, :3]], 1))
            want = alone[0, len(prompt) - 1:]  # the logits after the prompt and each new byte
            got = torch.stack([s[b] for s in steps])
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)  # float64 rounding


@pytest.mark.parametrize("model", ["baseline", pytest.param("cem", marks=CEM_ROPE.marks)])
def test_cli_continues_a_file_of_prompts_together(model, runs, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def f(x):\nab\n\nz\n")
    argv = ["--checkpoint", runs[model], "--prompts", str(prompts), "--tokens", "4",
            "--temperature", "0", "--device", "cpu"]  # fmt: skip
    assert generate.main(argv) == 0
    captured = capsys.readouterr()
    net, _ = generate.load_model(runs[model], torch.device("cpu"))
    expected = []
    for prompt in ("def f(x):", "ab", "z"):  # the empty line is no prompt
        g = torch.Generator().manual_seed(0)
        text, _ = generate.generate(net, prompt.encode(), 4, 0.0, None, g, use_cache=False)
        expected += [f"== prompt {len(expected) // 2}: {prompt!r}",
                     text.decode("utf-8", errors="replace")]
    assert captured.out == "\n".join(expected) + "\n"
    assert "3 prompts x 4 bytes" in captured.err and "(batch)" in captured.err
