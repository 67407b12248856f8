"""Two-operand contractions as one matrix product, on the faster of torch's two CPU GEMMs.

A contraction ``einsum("PS,SQ->PQ", a, b)`` of two operands without a batch axis (every output
axis belongs to one operand) is one GEMM of the flattened axes:

    out[P, Q] = sum_S a[P, S] b[S, Q]          A = a as a (|P|, |S|) matrix, B = b as (|S|, |Q|)

torch computes float32 products on the CPU with MKL's sgemm. On CPUs where MKL takes its generic
code path (AMD's, whose AVX-512 it does not use) oneDNN's float32 matmul, which torch ships too
and which dispatches on the instruction set rather than the vendor, is twice as fast: measured on
an AMD EPYC with one thread, 2048 x 2048 x 2048 took 185 ms with MKL and 83 ms with oneDNN, and
the token-sized products of the examples (197 x 768 x 3072, 2048 x 128 x 512, 512 x 32 x 4096)
1.7-2.8x less (``benchmarks/bench_gemm.py`` prints the table for the machine it runs on).
:func:`contract` takes such a product to oneDNN (``torch.ops.mkldnn._linear_pointwise``, the op
torch.compile's CPU backend emits for linear layers: ``x @ w^T`` for a weight ``w`` of shape
(out, in)) when it serves: float32 CPU operands, oneDNN enabled (``torch.backends.mkldnn``; its
``flags(enabled=False)`` context turns this off), no autocast, no autograd graph to record (the
op has no derivative), not under torch.compile (which picks its own GEMMs), and a product of at least ``MIN_MACS`` multiply-adds (below it oneDNN's
call overhead loses). Anything else is ``torch.einsum``.

Both sum in float32; the order of the terms differs, so results differ from einsum's in the last
bits, as two BLAS libraries' results do. oneDNN sums a long contraction about sequentially: over
2048 terms (a weight gradient's sum over batch x tokens) its error was 2.9x MKL's (8.8e-7 against
3.0e-7 relative to float64, 128 x 2048 x 128; 5.7e-7 over 256 terms already), which made
lm_attention_nope's d/dW_k in float32 1.9x as far off as autograd's of the energy. A sum over
more than 2 SUM_CHUNK terms is therefore one oneDNN product per SUM_CHUNK terms (at most
MAX_CHUNKS products, longer chunks beyond), added in order (``_linear_sum``): 3.6e-7 there, in
1.1-1.4x the one product's time (0.39 -> 0.54 ms), still below MKL's 0.66 ms, and no measurable
change in a layer's step (0.98-1.02x, lm_attention, recurrent_mlp). The chunks must be dense
blocks: the operands stored sum-major (the token axes outermost, as a weight gradient's are;
a copy ``_matrices`` makes for such a sum is laid out so); oneDNN took ~80 ms per product of a
chunk of a row-major matrix, whose rows then are longer than the chunk. A sum stored row-major (a
contraction over features, such as an MLP's 512 hidden units) stays one product: copying its
chunks made the steps of cem_mlp, hopfield and recurrent_mlp 1.05x, 1.17x and 1.22x as long.
There oneDNN's order remains: causal_meanfield's y and d/dx at 1024 tokens are 2.0x and 2.3x as
far off as autograd's (8.5e-7 and 9.5e-7 against 4.2e-7; 4.3e-7 with einsum for every product).
"""

from __future__ import annotations

import functools
import math

import torch

MIN_MACS = 1 << 22  # on the machine above 16 x 128 x 512 (2^20) is 1.3x slower on oneDNN, 64^3 3x
# a sum over more than 2 SUM_CHUNK terms of operands stored sum-major is taken SUM_CHUNK terms (or
# a MAX_CHUNKS-th of them) at a time, the chunks' products added (``_linear_sum``, module)
SUM_CHUNK = 256
MAX_CHUNKS = 64
_ONEDNN = torch.backends.mkldnn.is_available()


def _linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w^T on oneDNN: x (m, k), w (n, k), either may be strided."""
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


@functools.lru_cache(maxsize=512)
def gemm_plan(equation: str) -> tuple[str, str, str, str, str, bool] | None:
    """How ``equation`` (two operands) is one GEMM: (a's axes, b's axes, P, Q, S, whether the
    output is Q then P), or None where it is not: a batch axis (in both operands and the
    output), an axis repeated within an operand, an axis summed within one operand, the summed
    axes in different orders in the operands, or an output order other than P Q or Q P."""
    ins, out = equation.split("->")
    parts = ins.split(",")
    if len(parts) != 2:
        return None
    ia, ib = parts
    S = "".join(c for c in ia if c in ib)
    P = "".join(c for c in ia if c not in S)
    Q = "".join(c for c in ib if c not in S)
    if (len(set(ia)) < len(ia) or len(set(ib)) < len(ib) or S != "".join(c for c in ib if c in ia)
            or set(S) & set(out) or out not in (P + Q, Q + P)):
        return None
    return ia, ib, P, Q, S, out == Q + P


def _matrices(plan: tuple, a: torch.Tensor,
              b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """A (|P|, |S|) and B^T (|Q|, |S|): views where the layouts allow, else copies (stored
    S-major where the sum is long enough for ``_linear_sum`` to take it in chunks)."""
    order_a, order_b, n_p_axes, n_q_axes = _per_plan(_orders, plan)
    a = a.permute(order_a)
    b = b.permute(order_b)
    n_p, n_q, n_s = math.prod(a.shape[:n_p_axes]), math.prod(b.shape[:n_q_axes]), \
        math.prod(a.shape[n_p_axes:])
    return _matrix(a, n_p_axes, n_p, n_s), _matrix(b, n_q_axes, n_q, n_s), n_p, n_q


def _matrix(t: torch.Tensor, n_lead: int, n: int, n_s: int) -> torch.Tensor:
    """t, its n_lead leading axes then the summed ones, as an (n, n_s) matrix: a view where its
    layout allows; else a copy, stored S-major (the transpose of a contiguous (n_s, n)) where
    the sum is long enough to be taken in chunks, row-major otherwise."""
    if n_s <= 2 * SUM_CHUNK or torch.compiler.is_compiling():
        return t.reshape(n, n_s)
    try:
        return t.view(n, n_s)
    except RuntimeError:  # not a view: the S axes first, then the others
        lead = list(range(n_lead))
        return t.permute(list(range(n_lead, t.dim())) + lead).contiguous().view(n_s, n).T


@functools.lru_cache(maxsize=512)
def _orders(plan: tuple) -> tuple[list[int], list[int], int, int]:
    """The permutations that put a's axes in the order P S and b's in Q S, and |P|'s and |Q|'s
    numbers of axes (once per plan, not per call)."""
    ia, ib, P, Q, S, _ = plan
    return [ia.index(c) for c in P + S], [ib.index(c) for c in Q + S], len(P), len(Q)


def _plan(equation: str) -> tuple[str, str, str, str, str, bool] | None:
    return _per_plan(gemm_plan, equation)


def _per_plan(cached, key):
    """``cached(key)`` from its cache; under torch.compile, which traces the function itself and
    not its cache, the function."""
    return cached.__wrapped__(key) if torch.compiler.is_compiling() else cached(key)


def _onednn_serves(a: torch.Tensor, b: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():  # the compiler chooses its own GEMMs
        return False
    return (_ONEDNN and a.dtype == torch.float32 and b.dtype == torch.float32
            and a.device.type == "cpu" and b.device.type == "cpu" and torch.backends.mkldnn.enabled and not torch.is_autocast_enabled("cpu")
            and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)))


def _onednn_product(plan: tuple, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """The product as a fresh contiguous (|P|, |Q|) or (|Q|, |P|) matrix (the output's order)
    by oneDNN, or None where that does not serve."""
    if not _onednn_serves(a, b):
        return None
    # |P| |S| |Q| from the shapes, before _matrices, whose reshapes may copy
    if a.numel() * math.prod(b.shape[k] for k in _per_plan(_out_positions, plan)[1]) < MIN_MACS:
        return None
    A, Bt, n_p, n_q = _matrices(plan, a, b)
    if plan[5]:  # out[Q, P] = B^T A^T:  x = B^T, w = A
        return _linear_sum(Bt, A)
    return _linear_sum(A, Bt)


def _linear_sum(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w^T on oneDNN, x (m, k), w (n, k); a long sum (k > 2 SUM_CHUNK) of operands stored
    k-major (a weight gradient's sum over tokens: both strides along k are the row length, so
    each chunk is a dense block) in chunks of SUM_CHUNK terms, at most MAX_CHUNKS of them, their
    products added in order (see the module)."""
    k = x.shape[1]
    if k <= 2 * SUM_CHUNK or x.stride(0) != 1 or w.stride(0) != 1:
        return _linear(x, w)
    size = max(SUM_CHUNK, -(-k // MAX_CHUNKS))
    out = _linear(x[:, :size], w[:, :size])
    for s in range(size, k, size):
        out.add_(_linear(x[:, s:s + size], w[:, s:s + size]))
    return out


def contract(equation: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.einsum(equation, a, b)``; one oneDNN GEMM where it serves (see the module)."""
    plan = _plan(equation)
    if plan is not None:
        r = _onednn_product(plan, a, b)
        if r is not None:
            return r.view(_out_shape(plan, a, b))
    return torch.einsum(equation, a, b)


def _out_shape(plan: tuple, a: torch.Tensor, b: torch.Tensor) -> list[int]:
    ia, ib, P, Q, S, q_first = plan
    pos_p, pos_q = _per_plan(_out_positions, plan)
    p_sizes, q_sizes = [a.shape[k] for k in pos_p], [b.shape[k] for k in pos_q]
    return q_sizes + p_sizes if q_first else p_sizes + q_sizes


@functools.lru_cache(maxsize=512)
def _out_positions(plan: tuple) -> tuple[list[int], list[int]]:
    """Where P's axes are in a and Q's in b (once per plan)."""
    ia, ib, P, Q, _, _ = plan
    return [ia.index(c) for c in P], [ib.index(c) for c in Q]


def contract_add(total: torch.Tensor, equation: str, a: torch.Tensor,
                 b: torch.Tensor) -> torch.Tensor:
    """``total + einsum(equation, a, b)`` without a product tensor and an add:

        out[P, Q] = total[P, Q] + sum_S a[P, S] b[S, Q]

    one oneDNN GEMM into a fresh matrix and ``total`` added into it in place where oneDNN serves
    (on the machine above that is faster than MKL's addmm with beta 1, whose GEMM is half as
    fast), else ``addmm`` with beta 1. The axes flatten to matrices as views where the layouts
    allow (a (b, i, D) state is a transposed (b i) x D matrix); else reshape copies. A
    contraction that is not one GEMM, operands of other dtypes, or autocast (which would round
    the sum to its dtype) take the einsum and an add."""
    plan = _plan(equation)
    if (plan is None or torch.is_autocast_enabled(total.device.type)
            or not a.dtype == b.dtype == total.dtype):
        return total + torch.einsum(equation, a, b)
    shape = _out_shape(plan, a, b)
    if list(total.shape) != shape:  # total broadcasts: the sum has its own shape
        return total + contract(equation, a, b)
    r = _onednn_product(plan, a, b)
    if r is not None:
        return r.view(shape).add_(total)
    A, Bt, n_p, n_q = _matrices(plan, a, b)
    if plan[5]:
        r = torch.addmm(total.reshape(n_q, n_p), Bt, A.T)
    else:
        r = torch.addmm(total.reshape(n_p, n_q), A, Bt.T)
    return r.view(total.shape)
