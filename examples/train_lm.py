"""Train a decoder-only byte-level language model: CEM layers from energyc, or a Llama baseline.

Bytes are the tokens (vocabulary 256, no tokenizer). Two models of the same width and depth:

* ``--model cem``: blocks of [RMSNorm -> CEM attention step -> RMSNorm -> CEM MLP step], each step
  a residual update ``h = norm(x); x = x + (layer(h) - h)`` where the generated layer maps h to
  ``h - eta P dE/dh``. The attention layer is ``generated.lm_attention_<position>[_dplr]`` (the
  position scheme lives inside the energy), the MLP is ``generated.cem_mlp``. Tied embeddings.
* ``--model baseline``: a Llama-style pre-norm Transformer in plain PyTorch: RMSNorm, attention
  with q, k, v, o projections (no biases) on ``scaled_dot_product_attention``, a SwiGLU MLP
  (three matrices), rotary / ALiBi / no position information, tied embeddings.

Usage:

    python examples/train_lm.py --model cem --out runs/cem
    python examples/train_lm.py --model baseline --out runs/baseline
    python examples/train_lm.py --model cem --position alibi --interaction dplr \\
        --preconditioner diag --recursive-steps 2 --out runs/cem_alibi_dplr
    python examples/train_lm.py --model cem --out runs/cem --resume    # continue a run
    torchrun --nproc_per_node 2 examples/train_lm.py --model cem --threads 1 --out runs/ddp
    python examples/train_lm.py --model cem --precision bf16 --out runs/cem_bf16
    python examples/compare_runs.py runs/cem runs/baseline -o runs/compare.png

Data: by default the Python standard library's own ``*.py`` sources (no download; the same bytes
on every machine with the same Python), split into training and validation by file with a stable
hash of the relative path. ``--data PATH`` takes a text file (split 95/5 by position) or a folder
(every file, split by file like the default).

``--pack-documents``: each window holds pieces of the files it covers (the file it starts in cut
at its start, whole files, the file it ends in cut at its end: ``window_documents``), and a token
attends only to its own document's bytes: the CEM model's attention layers are
``generated.lm_attention_<position>[_dplr]_documents`` (the same energy over
``(j <= i) & same_document()``, called with ``document_ids=``), the baseline's SDPA takes the
boolean block-causal mask (FlexAttention has no backward on CPU in torch 2.13, and torchtune
packs with this mask wherever FlexAttention does not run). Rotary and ALiBi positions enter the
scores as i - j and need no per-document offsets. The windows and the targets are the same as
without packing (a document's last byte keeps the next document's first byte as its target);
only what each token attends to changes. A text file (--data FILE) is one document.

Batch k is a pure function of (--seed, k), and the validation windows are fixed, so a run resumed
from ``OUT/checkpoint.pt`` follows the same loss curve as an uninterrupted one (same machine and
threads; ``--stop-at K`` stops after step K as if interrupted), and N processes under torchrun
see exactly the combined batch of one process (rank r takes the r-th slice of it).

Precision (``--precision``, default bf16 on CUDA, fp32 on CPU): fp32, or mixed precision with float32
parameters and optimizer state, the forward (the generated layers included) and the evaluation
under ``torch.autocast`` to bfloat16 (bf16) or float16 (fp16, with ``torch.amp.GradScaler``
scaling the loss; its state is checkpointed). The cross-entropy is taken in float32.

Same --dim/--depth/--mlp-hidden, different parameter counts by design: CEM attention has W_q and
W_k (half of q, k, v, o; ALiBi adds H learned slopes, --interaction dplr an (H, D) diagonal) and
the CEM MLP has W and U (2/3 of SwiGLU's three matrices).

Writes ``OUT/checkpoint.pt`` and ``OUT/metrics.json``: ``params`` (the tied embedding counted
once), ``params_attention``, ``params_mlp``, ``params_embedding``, ``params_norm``;
``tokens_per_s`` (tokens of all processes per second of training steps, evaluation and
checkpoints excluded); ``val_bpb`` (validation bits per byte at the last evaluation: mean
cross-entropy in nats / ln 2); ``curve``, one entry per evaluation (step 0 included) with
``val_bpb``, ``train_loss`` (mean training cross-entropy in nats over the steps since the previous
evaluation) and ``train_bpb``; ``train_losses`` (every step's); ``precision``; ``config``; ``corpus``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import importlib
import json
import math
import os
import platform
import random
import sys
import sysconfig
import time
import zlib
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F  # noqa: N812
from torch import nn
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

VOCAB = 256
VAL_MODULUS = 20  # a file is a validation file when crc32(relative path) % 20 == 0
SINGLE_FILE_TRAIN_FRACTION = 0.95
MAX_TRAIN_BYTES = 20_000_000
MAX_VAL_BYTES = 2_000_000
VAL_SEED = 20240501  # the validation windows: the same for every run, whatever --seed
SKIP_DIRS = frozenset({"site-packages", "test", "tests", "idle_test", "__pycache__"})
PRECONDITIONERS = {"none": "identity", "diag": "diagonal", "dplr": "dplr"}
POSITION_LAYER = {"rope": "rope", "alibi": "alibi", "none": "nope"}
FALLBACK_ATTENTION = "generated.cem_attention"
# settings a resumed run must share with its checkpoint (the others may change on resume)
RESUME_KEYS = (
    "model", "dim", "depth", "heads", "mlp_hidden", "position", "interaction", "recursive_steps",
    "preconditioner", "precond_rank", "eta", "seq", "batch", "lr", "warmup", "min_lr_ratio",
    "weight_decay", "grad_clip", "seed", "data", "eval_batches", "precision", "pack_documents",
)  # fmt: skip
# of checkpoints written before the setting existed
RESUME_DEFAULTS = {"precision": "fp32", "pack_documents": False}
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # the autocast dtype


class ConfigError(ValueError):
    """A bad setting or unusable data, reported to the user as `train_lm.py: error: ...`."""


# -- data ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Corpus:
    """Training and validation bytes (uint8 tensors) and where they came from.

    ``train_documents`` and ``val_documents`` (int64, increasing, starting at 0) are the offsets
    of each document's first byte in its split: a file of a folder (empty files have none), or
    the whole split of a text file.
    """

    train: torch.Tensor
    val: torch.Tensor
    source: str
    split: str
    files_train: int = 0
    files_val: int = 0
    train_documents: torch.Tensor = dataclasses.field(default_factory=lambda: _starts([0]))
    val_documents: torch.Tensor = dataclasses.field(default_factory=lambda: _starts([0]))

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "split": self.split,
            "train_bytes": int(self.train.numel()),
            "val_bytes": int(self.val.numel()),
            "files_train": self.files_train,
            "files_val": self.files_val,
            "documents_train": int(self.train_documents.numel()),
            "documents_val": int(self.val_documents.numel()),
        }


def _starts(offsets: list[int]) -> torch.Tensor:
    return torch.tensor(offsets, dtype=torch.int64)


def _documents_in(starts: list[int], lo: int, hi: int) -> torch.Tensor:
    """The document starts of bytes lo .. hi - 1 of a stream whose documents start at ``starts``
    (sorted), as offsets from lo: 0 (the document lo is in, cut there) and every start inside."""
    return _starts([0] + [s - lo for s in starts if lo < s < hi])


def is_validation_file(relpath: str) -> bool:
    """Whether the file at ``relpath`` (posix separators) belongs to the validation split."""
    return zlib.crc32(relpath.encode("utf-8")) % VAL_MODULUS == 0


def list_files(
    root: str, suffix: str | None = None, skip_dirs: frozenset[str] = frozenset()
) -> list[str]:
    """Relative posix paths of the files under ``root``, sorted; hidden entries skipped."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs and not d.startswith(".")]
        for name in filenames:
            if name.startswith(".") or (suffix is not None and not name.endswith(suffix)):
                continue
            full = os.path.join(dirpath, name)
            if os.path.isfile(full):
                out.append(os.path.relpath(full, root).replace(os.sep, "/"))
    return sorted(out)


def _to_tensor(data: bytes | bytearray) -> torch.Tensor:
    if not data:
        return torch.zeros(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _split_by_position(data: bytes, max_train: int, max_val: int) -> tuple[bytes, bytes]:
    cut = int(len(data) * SINGLE_FILE_TRAIN_FRACTION)
    return data[:cut][:max_train], data[cut:][:max_val]


def load_corpus(
    path: str | None = None,
    *,
    min_bytes: int = 2,
    max_train_bytes: int = MAX_TRAIN_BYTES,
    max_val_bytes: int = MAX_VAL_BYTES,
) -> Corpus:
    """Load the training and validation bytes.

    Args:
        path: None for the Python standard library's ``*.py`` files (no site-packages, no test
            folders); a file (its first max_train + max_val bytes, split 95/5 by position); or a
            folder (all files, recursively, split by file: see ``is_validation_file``). Files are
            read in sorted order of their relative paths; each split keeps its first bytes up to
            its cap. A folder whose split by file leaves a part shorter than ``min_bytes`` (too
            few files) is split 95/5 by position instead.
        min_bytes: the least bytes each split needs (``seq + 1`` for training windows).

    Raises:
        ConfigError: the path does not exist, holds no data, or gives too little for a split.
    """
    if path is None:
        root, suffix, skip = sysconfig.get_paths()["stdlib"], ".py", SKIP_DIRS
        source = f"python stdlib *.py ({root})"
    else:
        root, suffix, skip, source = path, None, frozenset(), path
        if not os.path.exists(path):
            raise ConfigError(f"--data {path}: no such file or folder")
    if os.path.isfile(root):
        with open(root, "rb") as fh:
            data = fh.read(max_train_bytes + max_val_bytes)
        train, val = _split_by_position(data, max_train_bytes, max_val_bytes)
        corpus = Corpus(_to_tensor(train), _to_tensor(val), source, "by position 95/5", 1, 1)
    else:
        files = list_files(root, suffix, skip)
        if not files:
            raise ConfigError(f"--data {root}: the folder holds no files")
        parts: dict[bool, bytearray] = {False: bytearray(), True: bytearray()}
        caps = {False: max_train_bytes, True: max_val_bytes}
        counts = {False: 0, True: 0}
        starts: dict[bool, list[int]] = {False: [], True: []}  # each file's first byte
        for rel in files:
            is_val = is_validation_file(rel)
            room = caps[is_val] - len(parts[is_val])
            if room <= 0:
                continue
            with open(os.path.join(root, rel), "rb") as fh:
                content = fh.read(room)
            if content:
                starts[is_val].append(len(parts[is_val]))
            parts[is_val] += content
            counts[is_val] += 1
        split = f"by file (crc32(relative path) % {VAL_MODULUS} == 0: validation)"
        documents = {k: _documents_in(v, 0, len(parts[k])) for k, v in starts.items()}
        if min(len(parts[False]), len(parts[True])) < min_bytes:
            n_train = len(parts[False])
            data = bytes(parts[False] + parts[True])
            train, val = _split_by_position(data, max_train_bytes, max_val_bytes)
            every = starts[False] + [n_train + s for s in starts[True]]
            cut = int(len(data) * SINGLE_FILE_TRAIN_FRACTION)
            documents = {False: _documents_in(every, 0, len(train)),
                         True: _documents_in(every, cut, cut + len(val))}  # fmt: skip
            parts = {False: bytearray(train), True: bytearray(val)}
            split = "by position 95/5 (too few files for a split by file)"
        corpus = Corpus(
            _to_tensor(parts[False]),
            _to_tensor(parts[True]),
            source,
            split,
            counts[False],
            counts[True],
            documents[False],
            documents[True],
        )
    for name, part in (("training", corpus.train), ("validation", corpus.val)):
        if part.numel() < min_bytes:
            raise ConfigError(
                f"{source}: the {name} split has {part.numel()} bytes; it needs at least "
                f"{min_bytes} (--seq + 1)"
            )
    return corpus


def _stream_seed(seed: int, step: int) -> int:
    """A well-mixed 63-bit generator seed for batch ``step`` of run ``seed``."""
    digest = hashlib.blake2b(f"train_lm:{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _windows(
    data: torch.Tensor,
    starts: torch.Tensor,
    seq: int,
    device: str | torch.device,
    documents: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    idx = starts[:, None] + torch.arange(seq + 1)
    w = data[idx].long().to(device)
    if documents is None:
        return w[:, :-1], w[:, 1:]
    return w[:, :-1], w[:, 1:], window_documents(documents, starts, seq).to(device)


def window_documents(documents: torch.Tensor, starts: torch.Tensor, seq: int) -> torch.Tensor:
    """(n, seq) int64 document ids of the windows of ``seq`` input bytes at ``starts`` (n,) of a
    stream whose documents start at the offsets ``documents``: 0 for the document a window
    starts in, + 1 at each document that starts inside it (FlexAttention's ``document_ids``).

    A window packs the pieces of the files it covers: the file it starts in, cut at the window's
    start (whole where the window starts at its first byte), the files inside it whole, and the
    file it ends in cut at the window's end (its rest is another window's piece): packing that
    splits a document across packs, as torchtune's pretraining packing (split_across_pack) and
    trl's packing of text streams do, at random offsets.
    """
    idx = starts[:, None] + torch.arange(seq)
    ids = torch.searchsorted(documents, idx, right=True)
    return ids - ids[:, :1]


def _rank_slice(n: int, rank: int, world_size: int) -> slice:
    if n % world_size:
        raise ConfigError(f"--batch {n} is not divisible by the number of processes {world_size}")
    share = n // world_size
    return slice(rank * share, (rank + 1) * share)


def get_batch(
    data: torch.Tensor,
    step: int,
    *,
    seed: int,
    batch: int,
    seq: int,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    documents: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Inputs and targets (batch // world_size, seq) for training step ``step``, and with
    ``documents`` (the split's document starts, ``Corpus.train_documents``) the windows'
    document ids (``window_documents``): (x, y) or (x, y, document_ids).

    The global batch is ``batch`` random windows of seq + 1 bytes drawn from a generator seeded
    by (seed, step) only, so it is a pure function of (seed, step); rank r takes the r-th of
    world_size equal slices of it. The windows are the same with documents and without.
    """
    g = torch.Generator().manual_seed(_stream_seed(seed, step))
    starts = torch.randint(0, data.numel() - seq, (batch,), generator=g)
    return _windows(data, starts[_rank_slice(batch, rank, world_size)], seq, device, documents)


def validation_batches(
    data: torch.Tensor,
    *,
    batches: int,
    batch: int,
    seq: int,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    documents: torch.Tensor | None = None,
) -> list[tuple[torch.Tensor, ...]]:
    """The fixed validation windows (seeded by VAL_SEED): ``batches`` batches of ``batch``, each
    as ``get_batch``'s (with ``documents``, ``Corpus.val_documents``: and their document ids)."""
    g = torch.Generator().manual_seed(VAL_SEED)
    starts = torch.randint(0, data.numel() - seq, (batches, batch), generator=g)
    part = _rank_slice(batch, rank, world_size)
    return [_windows(data, s[part], seq, device, documents) for s in starts]


# -- models ----------------------------------------------------------------------------------------


def rotary(t: torch.Tensor, base: float = 10000.0, offset: int = 0) -> torch.Tensor:
    """Rotary position embedding of t (..., T, K), interleaved pairs (2m, 2m+1).

    out[2m] = t[2m] cos(p w_m) - t[2m+1] sin(p w_m), out[2m+1] = t[2m] sin + t[2m+1] cos, with
    p = offset + the token's index in t (its absolute position when t follows ``offset`` earlier
    tokens) and w_m = base^(-2m/K).
    """
    T, K = t.shape[-2], t.shape[-1]
    exact = torch.float32 if t.device.type == "mps" else torch.float64  # angles as the runtime's
    pos = torch.arange(offset, offset + T, device=t.device, dtype=exact)
    freq = base ** (-torch.arange(0, K, 2, device=t.device, dtype=exact) / K)
    angle = pos[:, None] * freq[None, :]  # (T, K/2)
    cos, sin = angle.cos().to(t.dtype), angle.sin().to(t.dtype)
    u = t.unflatten(-1, (K // 2, 2))
    a, b = u[..., 0], u[..., 1]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)


def alibi_slopes(heads: int) -> torch.Tensor:
    """ALiBi's standard slopes 2^(-8h/H), h = 1..H."""
    return torch.tensor([2.0 ** (-8.0 * h / heads) for h in range(1, heads + 1)])


def alibi_bias(
    heads: int, T: int, device: torch.device, dtype: torch.dtype, start: int = 0
) -> torch.Tensor:
    """(H, T - start, T) additive mask of queries i = start..T-1 over keys j = 0..T-1:
    -slope_h (i - j) for j <= i, -inf for j > i (start = 0: the full (H, T, T) mask)."""
    i, j = torch.arange(start, T, device=device), torch.arange(T, device=device)
    dist_ij = (i[:, None] - j[None, :]).to(dtype)
    bias = -alibi_slopes(heads).to(device=device, dtype=dtype)[:, None, None] * dist_ij
    return bias.masked_fill(dist_ij < 0, -math.inf)


def causal_mask(T: int, device: torch.device, start: int = 0) -> torch.Tensor:
    """(T - start, T) boolean mask of queries i = start..T-1 over keys j = 0..T-1: j <= i."""
    i, j = torch.arange(start, T, device=device), torch.arange(T, device=device)
    return j[None, :] <= i[:, None]


def document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, T, T) boolean mask of the windows' documents (B, T): j <= i and j in i's document,
    the block-causal mask of packed sequences (torchtune's ``packed_block_causal_mask``)."""
    T = document_ids.shape[1]
    same = document_ids[:, :, None] == document_ids[:, None, :]
    return same & causal_mask(T, document_ids.device)


@dataclasses.dataclass
class KVCache:
    """Keys (rotated, under rope) and values of the P tokens an Attention has decoded so far,
    each (B, H, P, K); ``first``: each row's first real token (B,) when the rows were padded on
    the left (None: no padding)."""

    k: torch.Tensor
    v: torch.Tensor
    first: torch.Tensor | None = None

    @property
    def length(self) -> int:
        """P, the number of cached tokens."""
        return self.k.shape[-2]


@dataclasses.dataclass
class DecodeCache:
    """LanguageModel.decode's state after P tokens: each block's cache and P."""

    blocks: list[Any]
    length: int


class Attention(nn.Module):
    """Causal multi-head attention with q, k, v, o projections (no biases)."""

    def __init__(self, dim: int, heads: int, position: str) -> None:
        super().__init__()
        self.heads, self.position = heads, position
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)

    def _qkv(self, x: torch.Tensor, offset: int) -> tuple[torch.Tensor, ...]:
        """q, k, v (B, H, T, K) of x (B, T, D) at absolute positions offset..offset+T-1."""
        B, T, _ = x.shape
        q, k, v = (
            p(x).view(B, T, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v)
        )
        if self.position == "rope":
            q, k = rotary(q, offset=offset), rotary(k, offset=offset)
        return q, k, v

    def forward(self, x: torch.Tensor, document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of x (B, T, D) over j <= i, or with ``document_ids`` (B, T) over j <= i in
        i's document: SDPA with the boolean block-causal mask (ALiBi: its bias, -inf outside the
        document). Rotary and ALiBi positions enter the scores as i - j, so a packed document
        attends as it does alone, without per-document position offsets."""
        B, T, D = x.shape
        q, k, v = self._qkv(x, 0)
        if document_ids is not None:
            mask = document_mask(document_ids)[:, None]  # (B, 1, T, T)
            if self.position == "alibi":
                bias = alibi_bias(self.heads, T, x.device, q.dtype)
                mask = bias.masked_fill(~mask, -math.inf)  # (B, H, T, T)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif self.position == "alibi":
            mask = alibi_bias(self.heads, T, x.device, x.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(out.transpose(1, 2).reshape(B, T, D))

    def decode(
        self, x_new: torch.Tensor, cache: KVCache | None = None,
        left_padding: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """Attention of t >= 1 new tokens x_new (B, t, D) that follow the P tokens in ``cache``
        (None: P = 0): the rows P..P+t-1 of ``forward`` on the whole sequence.

        Query i (absolute position P..P+t-1) attends to the keys j <= i of all P + t tokens; rope
        rotates the new q and k by their absolute positions, alibi adds -slope_h (i - j).
        ``left_padding`` (B,), on a sequence's first call: each row's padding tokens at its start
        (prompts of different lengths), which no real token reads (a padding token reads itself
        alone, so that every row of the softmax has a key). Returns (out (B, t, D), the cache
        with the new keys and values appended).
        """
        B, t, D = x_new.shape
        P = 0 if cache is None else cache.length
        first = left_padding if cache is None else cache.first
        q, k, v = self._qkv(x_new, P)
        if cache is not None:
            k, v = torch.cat((cache.k, k), dim=2), torch.cat((cache.v, v), dim=2)
        allowed = causal_mask(P + t, x_new.device, start=P)  # (t, P + t)
        if first is not None:
            i = torch.arange(P, P + t, device=x_new.device)[:, None]
            j = torch.arange(P + t, device=x_new.device)[None, :]
            real = j >= first.to(x_new.device)[:, None, None]  # (B, 1, P + t)
            allowed = (allowed & real) | (i == j)  # (B, t, P + t)
            allowed = allowed[:, None]  # (B, 1, t, P + t)
        if self.position == "alibi":
            bias = alibi_bias(self.heads, P + t, x_new.device, x_new.dtype, start=P)
            mask = bias.masked_fill(~allowed, -math.inf)
        else:
            mask = allowed
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o(out.transpose(1, 2).reshape(B, t, D)), KVCache(k, v, first)


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class BaselineBlock(nn.Module):
    """Pre-norm Llama block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, position: str, depth: int) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(dim)
        self.attention = Attention(dim, heads, position)
        self.mlp_norm = nn.RMSNorm(dim)
        self.mlp = SwiGLU(dim, mlp_hidden)
        out_scale = 1 / math.sqrt(2 * depth)  # GPT-2 style: residual branches start small
        for lin in (self.attention.q, self.attention.k, self.attention.v, self.mlp.w1, self.mlp.w3):
            nn.init.normal_(lin.weight, std=dim**-0.5)
        nn.init.normal_(self.attention.o.weight, std=dim**-0.5 * out_scale)
        nn.init.normal_(self.mlp.w2.weight, std=mlp_hidden**-0.5 * out_scale)

    def forward(self, x: torch.Tensor, document_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), document_ids)
        return x + self.mlp(self.mlp_norm(x))

    def decode(
        self, x_new: torch.Tensor, cache: KVCache | None = None,
        left_padding: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """``forward`` on t new tokens (B, t, D) after the cached ones: (the new rows, the cache).
        Only the attention looks back; norms and MLP act per token."""
        a, cache = self.attention.decode(self.attention_norm(x_new), cache, left_padding)
        x = x_new + a
        return x + self.mlp(self.mlp_norm(x)), cache


class CemBlock(nn.Module):
    """RMSNorm -> CEM attention step -> RMSNorm -> CEM MLP step, each a residual update."""

    def __init__(self, attention: nn.Module, mlp: nn.Module, dim: int) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(dim)
        self.attention = attention
        self.mlp_norm = nn.RMSNorm(dim)
        self.mlp = mlp

    def forward(self, x: torch.Tensor, document_ids: torch.Tensor | None = None) -> torch.Tensor:
        # each layer maps h to h - eta P dE/dh; its update joins the residual stream; a layer
        # over (j <= i) & same_document() takes the windows' documents (the MLP reads none)
        h = self.attention_norm(x)
        if document_ids is None:
            x = x + (self.attention(h) - h)
        else:
            x = x + (self.attention(h, document_ids=document_ids) - h)
        h = self.mlp_norm(x)
        return x + (self.mlp(h) - h)

    def decode(
        self, x_new: torch.Tensor, cache: tuple[Any, Any] | None = None,
        left_padding: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[Any, Any]]:
        """``forward`` on t new tokens (B, t, D) after the cached ones: (the new rows, the cache).

        Each generated layer's ``decode(h_new, cache) -> (y_new, cache)`` returns the rows of
        ``layer(h)`` for the new tokens; the cache is the pair of the layers' opaque caches.
        ``left_padding`` (first call): each row's padding tokens, passed to both layers (the
        attention layer's sets then start at each row's first real token).

        Raises:
            NotImplementedError: a layer has no ``decode`` (generated without incremental
                decoding).
        """
        for layer in (self.attention, self.mlp):
            if not hasattr(layer, "decode"):
                kind = type(layer)
                raise NotImplementedError(
                    f"{kind.__module__}.{kind.__qualname__} has no decode() (generated without "
                    f"incremental decoding; regenerate with `python -m energyc compile "
                    f"examples/`), so this CEM model cannot decode incrementally; run the full "
                    f"forward model(tokens) instead"
                )
        attention_cache, mlp_cache = (None, None) if cache is None else cache
        pad = {} if left_padding is None else {"left_padding": left_padding}
        h = self.attention_norm(x_new)
        y, attention_cache = self.attention.decode(h, attention_cache, **pad)
        x = x_new + (y - h)
        h = self.mlp_norm(x)
        y, mlp_cache = self.mlp.decode(h, mlp_cache, **pad)
        return x + (y - h), (attention_cache, mlp_cache)


class LanguageModel(nn.Module):
    """Byte embedding (scaled by sqrt(dim)), blocks, final RMSNorm, tied output projection."""

    def __init__(self, blocks: list[nn.Module], dim: int, name: str, attention_layer: str) -> None:
        super().__init__()
        self.name, self.attention_layer = name, attention_layer
        self.embed = nn.Embedding(VOCAB, dim)
        nn.init.normal_(self.embed.weight, std=dim**-0.5)  # unit-norm rows: logits of std ~1
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.RMSNorm(dim)
        self.input_scale = math.sqrt(dim)  # the residual stream starts at unit RMS

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed(tokens) * self.input_scale

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) @ self.embed.weight.T  # tied embeddings

    def forward(
        self, tokens: torch.Tensor, document_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits (B, T, VOCAB) of tokens (B, T); with ``document_ids`` (B, T), non-decreasing
        along each row (``window_documents``), every token sees only its own document's tokens
        (the model must have been built with --pack-documents for the CEM model's layers)."""
        x = self._embed(tokens)
        for block in self.blocks:
            x = block(x, document_ids)
        return self._logits(x)

    def decode(
        self, tokens_new: torch.Tensor, cache: DecodeCache | None = None,
        left_padding: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, DecodeCache]:
        """Incremental ``forward``: the logits (B, t, VOCAB) of t >= 1 new tokens (B, t) that follow
        the P tokens in ``cache`` (None: a new sequence), and the cache after P + t tokens.

        Decoding a sequence in pieces gives ``forward``'s logits on the whole of it (to rounding):
        the same embedding, blocks and tied output, each block looking back through its cache.
        Rows of different lengths decode together padded on the left: ``left_padding`` (B,), on
        the first call, counts each row's padding tokens; a row's logits are then those of the
        row decoded alone (its padding's logits mean nothing).

        Raises:
            NotImplementedError: a block's layers cannot decode (see CemBlock.decode).
        """
        previous = [None] * len(self.blocks) if cache is None else cache.blocks
        x = self._embed(tokens_new)
        caches = []
        pad = {} if left_padding is None else {"left_padding": left_padding}
        for block, block_cache in zip(self.blocks, previous):
            x, block_cache = block.decode(x, block_cache, **pad)
            caches.append(block_cache)
        P = 0 if cache is None else cache.length
        return self._logits(x), DecodeCache(caches, P + tokens_new.shape[1])


def attention_layer_name(position: str, interaction: str, documents: bool = False) -> str:
    """The generated package for a position scheme and an interaction, over j <= i or (with
    ``documents``) over (j <= i) & same_document()."""
    suffix = ("_dplr" if interaction == "dplr" else "") + ("_documents" if documents else "")
    return f"generated.lm_attention_{POSITION_LAYER[position]}{suffix}"


def load_attention_layer(
    position: str, interaction: str, warn: bool = True, documents: bool = False
) -> tuple[type[nn.Module], str]:
    """The generated attention ``Layer`` class and its module name.

    Falls back to ``generated.cem_attention`` (no positions, low-rank scores) with a warning when
    the wanted package has not been generated; a layer over documents has no fallback.

    Raises:
        ConfigError: the layer over documents has not been generated.
    """
    name = attention_layer_name(position, interaction, documents)
    try:
        return importlib.import_module(name).Layer, name
    except ModuleNotFoundError as exc:
        if exc.name is None or not name.startswith(exc.name):
            raise  # an import error inside the package, not a missing package
        if documents:
            raise ConfigError(
                f"--pack-documents: {name} is not generated yet (run `python -m energyc compile "
                f"examples/`)"
            ) from None
        if warn:
            print(
                f"warning: {name} is not generated yet (run `python -m energyc compile "
                f"examples/`); using {FALLBACK_ATTENTION} (no position information, low-rank "
                f"scores) instead",
                file=sys.stderr,
            )
        return importlib.import_module(FALLBACK_ATTENTION).Layer, FALLBACK_ATTENTION


def build_model(args: argparse.Namespace, warn: bool = True) -> LanguageModel:
    """The model ``args`` describe; the same args (and --seed) give the same initial weights."""
    torch.manual_seed(args.seed)
    dim, heads, hidden = args.dim, args.heads, args.mlp_hidden
    blocks: list[nn.Module] = []
    if args.model == "baseline":
        blocks = [
            BaselineBlock(dim, heads, hidden, args.position, args.depth) for _ in range(args.depth)
        ]
        return LanguageModel(blocks, dim, "baseline", "torch scaled_dot_product_attention")
    # the layers over documents have the same parameters as the causal ones: a checkpoint of
    # either loads into the other (generate.py decodes one document with the causal layers)
    documents = getattr(args, "pack_documents", False)
    attention_cls, attention_name = load_attention_layer(
        args.position, args.interaction, warn, documents
    )
    from generated.cem_mlp import Layer as CemMlp

    common = {
        "eta": args.eta,
        "steps": args.recursive_steps,
        "precond": PRECONDITIONERS[args.preconditioner],
        "precond_rank": args.precond_rank,
    }
    for _ in range(args.depth):
        attention = attention_cls(D=dim, H=heads, K=dim // heads, **common)
        blocks.append(CemBlock(attention, CemMlp(D=dim, M=hidden, **common), dim))
    return LanguageModel(blocks, dim, "cem", attention_name)


def param_counts(model: LanguageModel) -> dict[str, int]:
    """Parameters in total (the tied embedding once), in attention, MLP, embedding, norms."""

    def count(modules: Any) -> int:
        return sum(p.numel() for m in modules for p in m.parameters())

    total = sum(p.numel() for p in model.parameters())
    counts = {
        "params": total,
        "params_attention": count(b.attention for b in model.blocks),
        "params_mlp": count(b.mlp for b in model.blocks),
        "params_embedding": model.embed.weight.numel(),
    }
    counts["params_norm"] = total - sum(counts[k] for k in list(counts)[1:])
    return counts


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy in nats.

    Packed windows too: every position's target is the next byte, also a document's last byte,
    whose target is the first byte of the next document, as torchtune's packed datasets keep it
    (its logits see only its own document: it predicts how a file starts). Every window so counts
    the same seq bytes with packing and without.
    """
    return F.cross_entropy(logits.reshape(-1, VOCAB).float(), targets.reshape(-1))


# -- training --------------------------------------------------------------------------------------


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Learning-rate multiplier for 0-based ``step``: linear warmup, then cosine to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup - 1))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(
    model: nn.Module, args: argparse.Namespace
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (weight decay on matrices only) and the warmup + cosine schedule."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )  # fmt: skip
    warmup, total, min_ratio = args.warmup, args.steps, args.min_lr_ratio
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, total, min_ratio))
    return opt, sched


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """The autocast region of a forward in ``precision`` (fp32: autocast off)."""
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: list[tuple[torch.Tensor, ...]],
    world_size: int = 1,
    precision: str = "fp32",
) -> float:
    """Validation bits per byte: mean cross-entropy (nats) over all ranks' windows / ln 2.

    A batch is (x, y) or, packed, (x, y, document_ids)."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=batches[0][0].device)
    for x, y, *documents in batches:
        with autocast(x.device, precision):
            logits = model(x, *documents)
        total[0] += F.cross_entropy(
            logits.reshape(-1, VOCAB).float(), y.reshape(-1), reduction="sum"
        ).double()
        total[1] += y.numel()
    if world_size > 1:
        dist.all_reduce(total)
    model.train(was_training)
    return float(total[0] / total[1]) / math.log(2)


class Progress:
    """The progress bar (tqdm, on stderr) and the lines printed above it; silent when disabled
    (--no-progress, and every rank but 0)."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = tqdm(total=total, initial=initial, disable=not enabled, file=sys.stderr,
                        unit="step", dynamic_ncols=True, mininterval=0.1)  # fmt: skip

    def update(
        self, step: int, loss: float, tokens_per_s: float, val_bpb: float | None
    ) -> None:
        """Move the bar to ``step`` and show the recent loss, throughput and last val_bpb."""
        if not self.enabled:
            return
        fields = {"loss": f"{loss:.4f}", "tok/s": f"{tokens_per_s:,.0f}"}
        if val_bpb is not None:
            fields["val_bpb"] = f"{val_bpb:.4f}"
        self.bar.set_postfix(fields, refresh=False)
        self.bar.update(step - self.bar.n)

    def message(self, text: str) -> None:
        """Print a line above the bar."""
        if self.enabled:
            self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def _atomic_write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1)
        fh.write("\n")
    os.replace(tmp, path)


def _atomic_save(obj: Any, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


@dataclasses.dataclass
class DistInfo:
    rank: int
    world_size: int
    device: torch.device
    owns_group: bool  # whether train() initialised the process group (and so destroys it)


def setup_distributed(device_arg: str | None) -> DistInfo:
    """Join the torchrun process group (gloo on CPU, nccl on CUDA) when WORLD_SIZE > 1."""
    if device_arg is None:
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(device_arg)
    if device.type == "cuda" and world_size > 1 and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = False
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owns = True
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), device, owns)
    return DistInfo(0, 1, device, False)


def _check_resume(saved: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """Errors for settings that differ from the checkpoint's; warns about a changed --steps."""
    saved = {**RESUME_DEFAULTS, **saved}
    diffs = [
        f"--{k.replace('_', '-')} {saved.get(k)!r} in the checkpoint, {getattr(args, k)!r} now"
        for k in RESUME_KEYS
        if saved.get(k) != getattr(args, k)
    ]
    if diffs:
        raise ConfigError("cannot resume with different settings: " + "; ".join(diffs))
    notes = []
    if saved.get("steps") != args.steps:
        notes.append(
            f"warning: --steps {args.steps} differs from the checkpoint's "
            f"{saved.get('steps')}: the learning-rate schedule changes"
        )
    return notes


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Train as ``args`` say; write OUT/metrics.json and OUT/checkpoint.pt (rank 0); return the
    metrics."""
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = setup_distributed(args.device)
    rank, world, device = info.rank, info.world_size, info.device
    if args.precision is None:  # bf16 where it is fast (CUDA), fp32 elsewhere
        args.precision = "bf16" if device.type == "cuda" else "fp32"
    main_rank = rank == 0
    wrapped: nn.Module | None = None
    try:
        _rank_slice(args.batch, rank, world)
        corpus = load_corpus(args.data, min_bytes=args.seq + 1)
        model = build_model(args, warn=main_rank).to(device)
        counts = param_counts(model)
        opt, sched = make_optimizer(model, args)
        # fp16 needs the loss scaled (its gradients underflow); bf16 and fp32 do not
        scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
        ckpt_path = os.path.join(args.out, "checkpoint.pt")
        metrics_path = os.path.join(args.out, "metrics.json")
        state: dict[str, Any] = {
            "curve": [],
            "train_losses": [],
            "train_time_s": 0.0,
            "tokens_trained": 0,
            "wall_time_s": 0.0,
        }
        step = 0
        notes: list[str] = []
        if args.resume and os.path.exists(ckpt_path):
            ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
            notes += _check_resume(ckpt["config"], args)
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            if "scaler" in ckpt:  # checkpoints before --precision have none (fp32: unused)
                scaler.load_state_dict(ckpt["scaler"])
            step, state = ckpt["step"], ckpt["metrics"]
            rng = ckpt["rng"]
            torch.set_rng_state(rng["torch"].cpu())
            if rng.get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
            random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
            notes.append(f"resumed from {ckpt_path} at step {step}")
        elif args.resume:
            notes.append(f"no {ckpt_path} yet: starting from step 0")
        if main_rank:
            os.makedirs(args.out, exist_ok=True)
        wrapped = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            wrapped = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        packed = args.pack_documents
        val = validation_batches(
            corpus.val,
            batches=args.eval_batches,
            batch=args.batch,
            seq=args.seq,
            rank=rank,
            world_size=world,
            device=device,
            documents=corpus.val_documents if packed else None,
        )
        config = {k: v for k, v in vars(args).items()}
        stop = min(args.steps, args.stop_at) if args.stop_at else args.steps
        progress = Progress(args.steps, step, main_rank and not args.no_progress)
        if main_rank:
            for note in notes:
                print(note, file=sys.stderr)
            progress.message(
                f"{args.model}: {counts['params']:,} parameters (attention "
                f"{counts['params_attention']:,}, MLP {counts['params_mlp']:,}); "
                f"{model.attention_layer}; {corpus.train.numel():,} training bytes; "
                f"{world} process(es) on {device}; {args.precision}"
                + ("; windows packed from documents (document masks)" if packed else "")
            )

        def metrics() -> dict[str, Any]:
            curve = state["curve"]
            return {
                "model": args.model,
                "precision": args.precision,
                "attention_layer": model.attention_layer,
                **counts,
                "tokens_per_s": state["tokens_trained"] / max(state["train_time_s"], 1e-9),
                "val_bpb": curve[-1]["val_bpb"] if curve else None,
                "initial_val_bpb": curve[0]["val_bpb"] if curve else None,
                "steps_done": step,
                "finished": step >= args.steps,
                "train_time_s": state["train_time_s"],
                "wall_time_s": state["wall_time_s"] + time.perf_counter() - t_start,
                "tokens_trained": state["tokens_trained"],
                "curve": curve,
                "train_losses": state["train_losses"],
                "config": config,
                "corpus": corpus.describe(),
                "world_size": world,
                "device": str(device),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "python": platform.python_version(),
            }

        def record_eval() -> None:
            val_bpb = evaluate(model, val, world, args.precision)
            losses = state["train_losses"]
            last = state["curve"][-1]["step"] if state["curve"] else 0
            recent = losses[last:step]  # the steps since the previous evaluation
            train_loss = sum(recent) / len(recent) if recent else None
            state["curve"].append(
                {
                    "step": step,
                    "val_bpb": val_bpb,
                    "train_loss": train_loss,
                    "train_bpb": train_loss / math.log(2) if recent else None,
                }
            )
            if main_rank:
                progress.message(
                    f"step {step}/{args.steps}  val_bpb {val_bpb:.4f}  train_loss "
                    + (f"{train_loss:.4f} nats" if recent else "-")
                )
                _atomic_write_json(metrics_path, metrics())

        def save_checkpoint() -> None:
            if not main_rank:
                return
            cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
            py_rng = random.getstate()
            snapshot = dict(state)
            snapshot["wall_time_s"] = state["wall_time_s"] + time.perf_counter() - t_start
            _atomic_save({
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict(),
                "step": step,
                "metrics": snapshot,
                "config": config,
                "rng": {"torch": torch.get_rng_state(), "cuda": cuda_rng,
                        "python": [py_rng[0], list(py_rng[1]), py_rng[2]]},
            }, ckpt_path)  # fmt: skip

        if step == 0 and not state["curve"]:
            record_eval()
        tokens_per_step = args.batch * args.seq
        model.train()
        while step < stop:
            t0 = time.perf_counter()
            x, y, *documents = get_batch(
                corpus.train,
                step,
                seed=args.seed,
                batch=args.batch,
                seq=args.seq,
                rank=rank,
                world_size=world,
                device=device,
                documents=corpus.train_documents if packed else None,
            )
            with autocast(device, args.precision):
                logits = wrapped(x, *documents)
            loss = lm_loss(logits, y)  # in float32
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()  # no scaling unless fp16
            if args.grad_clip > 0:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            scaler.step(opt)  # fp16: skipped when a gradient is not finite
            scaler.update()
            sched.step()
            loss_value = loss.detach()
            if world > 1:
                dist.all_reduce(loss_value)
                loss_value /= world
            state["train_losses"].append(float(loss_value))
            state["train_time_s"] += time.perf_counter() - t0
            state["tokens_trained"] += tokens_per_step
            step += 1
            if not math.isfinite(state["train_losses"][-1]):
                raise FloatingPointError(f"the training loss is {loss_value} at step {step}")
            if step % args.eval_every == 0 or step == args.steps:
                record_eval()
            if step % args.checkpoint_every == 0 or step == stop:
                save_checkpoint()
            recent = state["train_losses"][-10:]
            progress.update(
                step,
                sum(recent) / len(recent),
                state["tokens_trained"] / state["train_time_s"],
                state["curve"][-1]["val_bpb"] if state["curve"] else None,
            )
        progress.close()
        result = metrics()
        if main_rank:
            _atomic_write_json(metrics_path, result)
            if step < args.steps:
                print(
                    f"stopped at step {step} (--stop-at); continue with --resume", file=sys.stderr
                )
            print(
                f"{args.model}: {step}/{args.steps} steps; val_bpb {result['val_bpb']:.4f} (at "
                f"step {state['curve'][-1]['step']}); "
                f"{result['tokens_per_s']:,.0f} tokens/s; {result['params']:,} parameters; "
                f"{result['wall_time_s']:.1f} s; wrote {metrics_path}"
            )
        if world > 1:
            dist.barrier()  # leave together: gloo can abort when a peer tears down mid-exchange
        return result
    finally:
        # free DDP's reducer before its process group: torn down the other way round (at exit),
        # gloo sometimes aborts the process ("terminate called without an active exception")
        wrapped = None
        gc.collect()
        if info.owns_group:
            dist.destroy_process_group()


# -- command line ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_lm.py",
        description="Train a byte-level language model of CEM layers or a Llama baseline.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", choices=("cem", "baseline"), default="cem")
    p.add_argument("--position", choices=("rope", "alibi", "none"), default="rope")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--mlp-hidden", type=int, default=None, help="default: 4 * dim")
    cem = p.add_argument_group("CEM model")
    cem.add_argument(
        "--recursive-steps",
        type=int,
        default=1,
        help="descent steps per layer, with shared weights",
    )
    cem.add_argument("--preconditioner", choices=tuple(PRECONDITIONERS), default="none")
    cem.add_argument(
        "--precond-rank", type=int, default=4, help="low rank of --preconditioner dplr"
    )
    cem.add_argument("--interaction", choices=("lowrank", "dplr"), default="lowrank")
    cem.add_argument("--eta", type=float, default=1.0, help="descent step size")
    p.add_argument("--seq", type=int, default=256, help="tokens (bytes) per window")
    p.add_argument("--batch", type=int, default=16, help="windows per step (all processes)")
    p.add_argument(
        "--pack-documents",
        action="store_true",
        help="document masks: a token sees only its own file's bytes in a window (the same "
        "windows; the CEM model's attention over (j <= i) & same_document(), the baseline's "
        "SDPA with the block-causal mask)",
    )
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=20, help="linear warmup steps")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr / --lr (cosine)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm; 0: off")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument(
        "--precision",
        choices=tuple(PRECISIONS),
        default=None,
        help="fp32, or mixed precision under torch.autocast with float32 parameters: bf16, or "
        "fp16 with a gradient scaler (default: bf16 on CUDA, fp32 on CPU)",
    )
    p.add_argument(
        "--data",
        default=None,
        help="a text file or a folder (default: the Python standard library)",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument(
        "--stop-at",
        type=int,
        default=None,
        help="stop after this step (checkpointed), as if interrupted",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line; bad values exit with a message (argparse's way)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.mlp_hidden is None:
        args.mlp_hidden = 4 * args.dim
    positive = (
        "dim",
        "depth",
        "heads",
        "mlp_hidden",
        "recursive_steps",
        "precond_rank",
        "seq",
        "batch",
        "steps",
        "eval_every",
        "eval_batches",
        "checkpoint_every",
    )
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(
                f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}"
            )
    if args.dim % args.heads:
        parser.error(f"--dim {args.dim} is not divisible by --heads {args.heads}")
    if args.position == "rope" and (args.dim // args.heads) % 2:
        parser.error(
            f"--position rope needs an even head size; --dim {args.dim} / --heads "
            f"{args.heads} = {args.dim // args.heads}"
        )
    if args.lr <= 0 or args.eta <= 0:
        parser.error("--lr and --eta must be positive")
    if args.warmup < 0 or args.weight_decay < 0 or args.grad_clip < 0:
        parser.error("--warmup, --weight-decay and --grad-clip must not be negative")
    if not 0 <= args.min_lr_ratio <= 1:
        parser.error(f"--min-lr-ratio must be in [0, 1], got {args.min_lr_ratio}")
    if args.stop_at is not None and args.stop_at < 1:
        parser.error(f"--stop-at must be at least 1, got {args.stop_at}")
    if args.data is not None and not os.path.exists(args.data):
        parser.error(f"--data {args.data}: no such file or folder")
    return args


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: parse, train, report; errors exit with status 2."""
    args = parse_args(argv)
    try:
        train(args)
    except ConfigError as exc:
        build_parser().error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
