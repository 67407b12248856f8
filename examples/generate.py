"""Generate text from a byte-level language model trained by examples/train_lm.py.

Usage:

    python examples/train_lm.py --model cem --steps 200 --out runs/cem
    python examples/generate.py --checkpoint runs/cem --prompt "def main(" --tokens 200
    python examples/generate.py --checkpoint runs/baseline --prompt "import " --tokens 100 \\
        --temperature 0.8 --top-k 40 --seed 1
    python examples/generate.py --checkpoint runs/cem --prompt "class " --tokens 50 --no-cache
    python examples/generate.py --checkpoint runs/cem --prompts prompts.txt --tokens 100

The model (CEM or baseline) is rebuilt from the settings saved in RUN_DIR/checkpoint.pt (the file
``train_lm.py --resume`` reads) and loaded with its weights. The prompt's UTF-8 bytes are the
tokens. With the cache (the default), one ``model.decode`` call reads the whole prompt (the
prefill) and each new byte takes one ``decode`` call on that byte alone; with ``--no-cache`` each
new byte runs the ordinary forward on the whole sequence so far and takes its last logits. The two
give the same bytes (to rounding of the logits). The continuation goes to stdout, decoded as UTF-8
with invalid bytes replaced; a line on stderr gives the throughput and the mode.

With ``--prompts FILE`` (one prompt per line) the prompts are continued together, one batch:
padded on the left to the longest (``left_padding=`` of the layers' decode: no real token reads
the padding), one ``decode`` prefill, then one call per new byte for every row at once; each
row's bytes are those its prompt gives alone (to rounding of the logits). Each continuation is
printed after a line ``== prompt k: 'PROMPT'``.

Sampling: softmax(logits / temperature), optionally restricted to the top-k bytes, drawn with a
CPU torch.Generator seeded by --seed; temperature 0 takes the most likely byte (greedy).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

EXAMPLES = os.path.dirname(os.path.abspath(__file__))
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)

import train_lm  # noqa: E402

CHECKPOINT_FILE = "checkpoint.pt"  # what train_lm.py writes into --out and --resume reads


def next_byte(
    logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator
) -> int:
    """Draw a byte from logits (VOCAB,): argmax when temperature is 0, otherwise a sample of
    softmax(logits / temperature) over the top_k largest logits (all of them when None)."""
    logits = logits.detach().double().cpu()
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def generate(
    model: train_lm.LanguageModel,
    prompt_bytes: bytes,
    n: int,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator,
    use_cache: bool,
) -> tuple[bytes, float]:
    """Continue ``prompt_bytes`` by ``n`` bytes; return them and the seconds taken (the prefill
    included).

    use_cache: the prompt in one ``model.decode`` call, then one call per new byte (the last byte
    needs none); otherwise ``model(tokens)`` on the whole sequence for every new byte. The model
    should be in eval mode; it runs on its parameters' device, without gradients. The sequence may
    grow past the length the model was trained on: rotary and ALiBi positions extrapolate.
    """
    if not prompt_bytes:
        raise ValueError("the prompt is empty: generation needs at least one byte to condition on")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    device = next(model.parameters()).device
    tokens = torch.tensor([list(prompt_bytes)], dtype=torch.long, device=device)
    out = bytearray()
    start = time.perf_counter()
    with torch.inference_mode():
        if use_cache:
            logits, cache = model.decode(tokens)
        else:
            logits = model(tokens)
        while True:
            out.append(next_byte(logits[0, -1], temperature, top_k, generator))
            if len(out) == n:
                break
            new = torch.tensor([[out[-1]]], dtype=torch.long, device=device)
            if use_cache:
                logits, cache = model.decode(new, cache)
            else:
                tokens = torch.cat((tokens, new), dim=1)
                logits = model(tokens)
    return bytes(out), time.perf_counter() - start


def generate_batch(
    model: train_lm.LanguageModel,
    prompts: list[bytes],
    n: int,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator,
) -> tuple[list[bytes], float]:
    """Continue every prompt by ``n`` bytes at once, decoding the rows together; return the
    continuations and the seconds taken (the prefill included).

    The prompts are padded on the left to the longest (``left_padding`` of ``model.decode``), so
    that every row's next byte is at the same position; a row's bytes are those ``generate``
    gives its prompt alone (the same draws in the same order when ``generator`` is seeded alike
    for a single row). The rows draw from ``generator`` in turn, row 0 first, at each step.
    """
    if not prompts or any(not p for p in prompts):
        raise ValueError("every prompt needs at least one byte to condition on")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    pad = torch.tensor([width - len(p) for p in prompts], device=device)
    tokens = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts], dtype=torch.long,
                          device=device)
    outs = [bytearray() for _ in prompts]
    start = time.perf_counter()
    with torch.inference_mode():
        logits, cache = model.decode(tokens, left_padding=pad)
        while True:
            new = [next_byte(logits[b, -1], temperature, top_k, generator)
                   for b in range(len(prompts))]
            for out, byte in zip(outs, new):
                out.append(byte)
            if len(outs[0]) == n:
                break
            step = torch.tensor(new, dtype=torch.long, device=device)[:, None]
            logits, cache = model.decode(step, cache)
    return [bytes(o) for o in outs], time.perf_counter() - start


def load_model(run_dir: str, device: torch.device) -> tuple[train_lm.LanguageModel, dict]:
    """The model of RUN_DIR/checkpoint.pt, rebuilt from its saved settings, in eval mode; and
    those settings.

    Raises:
        FileNotFoundError: no such folder, or no checkpoint in it.
        ValueError: the checkpoint's weights do not fit the model its settings describe.
    """
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"--checkpoint {run_dir}: no such folder")
    path = os.path.join(run_dir, CHECKPOINT_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"--checkpoint {run_dir}: no {CHECKPOINT_FILE} in it (train_lm.py writes one into "
            f"its --out folder)"
        )
    ckpt = torch.load(path, map_location=device, weights_only=True)
    config = ckpt["config"]
    # a --pack-documents run's attention layers read documents; the prompt and its continuation
    # are one document, which the causal layers (the same parameters) decode
    settings = {**config, "pack_documents": False}
    model = train_lm.build_model(argparse.Namespace(**settings)).to(device)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise ValueError(
            f"{path}: the weights do not fit the {config['model']} model its settings describe "
            f"({model.attention_layer}): {exc}"
        ) from exc
    return model.eval(), config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="generate.py",
        description="Generate bytes from a language model trained by examples/train_lm.py.",
        epilog="The sequence may grow past the --seq the model was trained on: nothing truncates "
        "it, rotary and ALiBi positions extrapolate (the text may degrade beyond that length).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="RUN_DIR",
        help=f"a train_lm.py --out folder (reads RUN_DIR/{CHECKPOINT_FILE})",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--prompt", help="the text to continue (its UTF-8 bytes)")
    which.add_argument(
        "--prompts", metavar="FILE",
        help="a file of prompts, one per line, continued together (rows of different lengths "
        "decoded in one batch)",
    )
    p.add_argument("--tokens", type=int, required=True, help="bytes to generate")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0: greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest bytes")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="recompute the whole sequence for every byte instead of decoding incrementally",
    )
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: bad arguments, a missing run or a model that cannot decode
    incrementally exit with status 2 and a message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    prompts = None
    if args.prompts is not None:
        try:
            with open(args.prompts, encoding="utf-8") as fh:
                prompts = [line.rstrip("\n") for line in fh if line.rstrip("\n")]
        except OSError as exc:
            parser.error(f"--prompts {args.prompts}: {exc.strerror or exc}")
        if not prompts:
            parser.error(f"--prompts {args.prompts}: no prompt in it (one per line)")
        if args.no_cache:
            parser.error("--prompts decodes the rows together; --no-cache takes one --prompt")
    elif not args.prompt:
        parser.error("--prompt is empty: give at least one character to continue")
    if args.tokens < 1:
        parser.error(f"--tokens must be at least 1, got {args.tokens}")
    if args.temperature < 0:
        parser.error(f"--temperature must not be negative, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        parser.error(f"--top-k must be at least 1, got {args.top_k}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        model, config = load_model(args.checkpoint, device)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(str(exc))
    generator = torch.Generator().manual_seed(args.seed)
    use_cache = not args.no_cache
    if prompts is not None:
        try:
            texts, seconds = generate_batch(model, [p.encode("utf-8") for p in prompts],
                                            args.tokens, args.temperature, args.top_k, generator)
        except (NotImplementedError, ValueError) as exc:
            parser.error(str(exc))
        for k, (prompt, text) in enumerate(zip(prompts, texts)):
            print(f"== prompt {k}: {prompt!r}")
            print(text.decode("utf-8", errors="replace"))
        total = args.tokens * len(prompts)
        print(
            f"{config['model']} ({model.attention_layer}) on {device}: {len(prompts)} prompts x "
            f"{args.tokens} bytes in {seconds:.3f} s, {total / seconds:,.1f} tokens/s (batch)",
            file=sys.stderr,
        )
        return 0
    try:
        text, seconds = generate(
            model,
            args.prompt.encode("utf-8"),
            args.tokens,
            args.temperature,
            args.top_k,
            generator,
            use_cache,
        )
    except (NotImplementedError, ValueError) as exc:
        if not use_cache:
            raise
        parser.error(f"{exc}\n(--no-cache generates with the full forward instead)")
    print(text.decode("utf-8", errors="replace"))
    mode = "cache" if use_cache else "no-cache"
    print(
        f"{config['model']} ({model.attention_layer}) on {device}: {args.tokens} bytes in "
        f"{seconds:.3f} s, {args.tokens / seconds:,.1f} tokens/s ({mode})",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
