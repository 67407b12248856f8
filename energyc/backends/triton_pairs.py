"""Triton printing of the pair ops: each pass over pairs (``torch_pairs.PairCall``) as one or two
kernels of the pair family (``codegen_templates/triton/pair.py.j2``; what they share is
``energyc.runtime.triton_pairs``, whose docstring has the maths).

A call's outputs summed over keys (token ``i``, and the log-sum-exp R of a softmax call) are one
queries-major kernel; those summed over queries (token ``j``) one keys-major kernel. Each kernel
gets its own tile function, a ``@triton.jit`` function printed from SymPy with the bodies its
outputs use (their common subexpressions once, by SymPy's cse), called on the tiles

    u<t> = q<t>_i . k<t>_j  (BLOCK_I, BLOCK_J)    d = i - j    e<m>: (BLOCK_I, 1) row,
    (1, BLOCK_J) column or scalar extras          dim_<X>: the dim sizes the bodies use

This module decides every line of a kernel (loads, products, accumulation, stores); the template
only places them. A body with a function Triton cannot spell leaves the call to torch
(``torch_pairs.print_call``): slower, never wrong.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

import sympy

from energyc.backends import torch_pairs
from energyc.backends.rules import TORCH, TRITON
from energyc.backends.spelling import stable_forms
from energyc.backends.torch_pairs import PairCall
from energyc.backends.triton_printer import NoTritonSpellingError, TritonPrinter
from energyc.ir.ops import describe_mask
from energyc.ir.pairs import DIST, PairLse, PairSum, RunningSum, extra_token, pair_symbols


@dataclass
class PairKernel:
    """One pair kernel and its tile function, as lines."""

    family = "pair"
    name: str
    doc: str
    fn_name: str
    fn_args: list[str]
    fn_doc: str
    fn_lines: list[str]
    fn_returns: str
    params: list[str]
    constexprs: list[str]
    prologue: list[str]
    loop_range: str
    loop: list[str]
    epilogue: list[str]


def _symbol_name(s: sympy.Symbol) -> str:
    """A body symbol's name in a kernel: u<t>, d, e<m>, or dim_<X> for a size."""
    if s == DIST:
        return "d"
    if s.name.startswith("pair_"):
        return s.name[5:]
    return f"dim_{s.name}"


def _tile_function(bodies: list[sympy.Expr]) -> tuple[list[str], list[str], str]:
    """(args, lines, returns) of a tile function returning ``bodies``, their common
    subexpressions computed once. Raises NoTritonSpellingError for a body Triton cannot spell."""
    used = set().union(*(b.free_symbols for b in bodies))
    order = sorted(used, key=lambda s: (not s.name.startswith("pair_u"), s != DIST,
                                        not s.name.startswith("pair_e"), _key(s)))
    names = {s.name: _symbol_name(s) for s in used}
    # the printer's stable forms first: cse would take sinh(u) and cosh(u) of a ratio apart
    bodies = [stable_forms(b) for b in bodies]
    shared, reduced = sympy.cse(bodies, symbols=sympy.numbered_symbols("c"), order="none")
    lines = []
    for sym, expr in shared:
        names[sym.name] = sym.name
        lines.append(f"{sym.name} = {TritonPrinter(names).doprint(expr)}")
    printed = [TritonPrinter(names).doprint(b) for b in reduced]
    returns = printed[0] if len(printed) == 1 else ", ".join(printed)
    return [names[s.name] for s in order], lines, returns


def _key(s: sympy.Symbol) -> tuple:
    digits = "".join(ch for ch in s.name if ch.isdigit())
    return (int(digits) if digits and s.name.startswith("pair_") else 0, s.name)


def _readable(body: sympy.Expr) -> str:
    subs = {s: sympy.Symbol(_symbol_name(s).removeprefix("dim_")) for s in body.free_symbols}
    return str(body.xreplace(subs))


class _Kernel:
    """Builds the lines of one kernel of a call: the outputs ``picked`` (indices into
    ``call.outputs``), queries-major (``own`` = "i") or keys-major ("j")."""

    def __init__(self, em, call: PairCall, picked: list[int], own: str):
        self.em, self.call, self.own = em, call, own
        self.other = "j" if own == "i" else "i"
        self.picked = picked
        self.softmax = call.softmax
        form = call.form
        self.r = 1 + len(form.heads)
        n_terms, n_extras = len(form.q), len(form.extras)
        self.values = [(n, call.outputs[n][1]) for n in picked if call.outputs[n][1] is not None]
        # the bodies this kernel needs, renumbered w0, w1, ... (phi first for a softmax)
        used = [call.outputs[n][2] for n in picked]
        self.body_ids = ([0] if self.softmax else []) + [b for b in dict.fromkeys(used)
                                                         if not (self.softmax and b == 0)]
        self.bodies = [call.bodies[b] for b in self.body_ids]
        symbols = set().union(*(pair_symbols(b) for b in self.bodies)) if self.bodies else set()
        self.terms = [t for t in range(n_terms) if sympy.Symbol(f"pair_u{t}") in symbols]
        self.extras = [m for m in range(n_extras) if sympy.Symbol(f"pair_e{m}") in symbols]
        self.uses_d = DIST in symbols
        self.dims = sorted({s.name for b in self.bodies for s in b.free_symbols
                            if not s.name.startswith("pair_")})
        self.n_terms, self.n_extras = n_terms, n_extras

    # -- parameters, in the launcher's order ----------------------------------------------------

    def params(self) -> list[str]:
        call, r = self.call, self.r
        n_out = len(self.picked) + (1 if self.softmax else 0)
        ptrs = ([f"Q{t}" for t in range(self.n_terms)] + [f"K{t}" for t in range(self.n_terms)]
                + [f"E{m}" for m in range(self.n_extras)] + [f"V{n}" for n, _ in self.values]
                + [f"OUT{o}" for o in range(n_out)])
        sizes = ["T", *(f"n{a}" for a in range(1, r))]
        strides = []
        for p in ptrs:
            last = {"Q": ("t", "f"), "K": ("t", "f"), "E": ("i", "j"), "V": ("t", "f")}.get(p[0])
            if last is None:  # an output: (*shape, T[, G])
                o = int(p[3:])
                n = None if self.softmax and o == 0 else self.picked[o - (1 if self.softmax else 0)]
                last = ("t",) if n is None or call.outputs[n][1] is None else ("t", "f")
            strides += [f"s{p.lower()}_{a}" for a in range(r)] + [f"s{p.lower()}_{x}" for x in last]
        widths = [f"F{t}" for t in range(self.n_terms)] + [f"G{p}" for p in range(len(self.values))]
        return [*ptrs, *sizes, *strides, *widths, *(f"dim_{d}" for d in self.dims)]

    def first_reads(self) -> dict[int, int]:
        """Each value node the kernel's sums read, with the first output that reads it."""
        out: dict[int, int] = {}
        for n, v in self.values:
            out.setdefault(v, n)
        return out

    def constexprs(self) -> list[str]:
        return [f"BF{t}" for t in range(self.n_terms)] + [f"BG{p}" for p in range(len(self.values))]

    # -- lines ---------------------------------------------------------------------------------

    def _base(self, p: str) -> str:
        return " + ".join([p] + [f"c{a} * s{p.lower()}_{a}" for a in range(self.r)])

    def _rows(self, p: str, token: str, feature_block: str, width: str) -> str:
        """A (tokens, features) tile of operand pointer ``p`` at the token offsets ``offs_<token>``."""
        lp = p.lower()
        return (f"_load_rows({p}_base, offs_{token}, valid_{token}, s{lp}_t, s{lp}_f, "
                f"{feature_block}, {width})")

    def _extra(self, m: int) -> tuple[str | None, str]:
        """(the token the extra varies with, or None; its load)."""
        token = extra_token(self.em.graph.node(self.call.form.extras[m]).axes)
        if token is None:
            return None, f"e{m} = tl.load(E{m}_base).to(ACC)"
        index = "[:, None]" if token == "i" else "[None, :]"
        # padding tokens read 1, not 0: nothing they give is kept, and a body that divides
        # by an extra or takes its log stays finite there
        return token, (f"e{m} = tl.load(E{m}_base + offs_{token} * se{m}_{token}, "
                       f"mask=valid_{token}, other=1.0).to(ACC){index}")

    def lines(self) -> tuple[list[str], str, list[str], list[str]]:
        own, other = self.own, self.other
        block = {"i": "BLOCK_I", "j": "BLOCK_J"}
        own_ptr, other_ptr = ("Q", "K") if own == "i" else ("K", "Q")
        pro = ["pid = tl.program_id(0)", "bh = tl.program_id(1).to(tl.int64)"]
        if self.r == 1:
            pro.append("c0 = bh")
        else:
            pro.append("rest = bh")
            for a in range(self.r - 1, 0, -1):
                pro.append(f"c{a} = rest % n{a}")
                pro.append(f"rest = rest // n{a}")
            pro.append("c0 = rest")
        # the call's key bounds of batch row c0 (read under ROWS: energyc.runtime.triton_layer)
        pro.append("LO_ROW = ROWS_LO + c0 * s_rows")
        pro.append("HI_ROW = ROWS_HI + c0 * s_rows")
        for t in self.terms:
            pro.append(f"Q{t}_base = {self._base(f'Q{t}')}")
            pro.append(f"K{t}_base = {self._base(f'K{t}')}")
        for m in self.extras:
            pro.append(f"E{m}_base = {self._base(f'E{m}')}")
        for n in self.first_reads().values():  # a value several sums share is read once
            pro.append(f"V{n}_base = {self._base(f'V{n}')}")
        pro.append(f"offs_{own} = pid * {block[own]} + tl.arange(0, {block[own]})")
        pro.append(f"valid_{own} = offs_{own} < T")
        for t in self.terms:
            pro.append(f"{own_ptr.lower()}{t} = {self._rows(f'{own_ptr}{t}', own, f'BF{t}', f'F{t}')}")
        loop_extras = []
        for m in self.extras:
            token, load = self._extra(m)
            (loop_extras if token == other else pro).append(load)
        # accumulators
        acc_axis = 1 if own == "i" else 0
        for p, (n, _) in enumerate(self.values):
            pro.append(f"acc{n} = tl.zeros(({block[own]}, BG{p}), dtype=ACC)")
        for n in self.picked:
            if self.call.outputs[n][1] is None:
                pro.append(f"acc{n} = tl.zeros(({block[own]},), dtype=ACC)")
        if self.softmax:
            pro.append('m = tl.full((BLOCK_I,), float("-inf"), dtype=ACC)')
            pro.append("s = tl.zeros((BLOCK_I,), dtype=ACC)")
        ranges = "_row_key_range" if own == "i" else "_row_query_range"
        pro.append(f"lo, hi = {ranges}(pid, T, LO_ROW, HI_ROW, LO, HI, BLOCK_I, BLOCK_J, ROWS)")
        bounds = "lo_i, hi_i = _row_bounds(LO_ROW, HI_ROW, offs_i, valid_i, ROWS)"
        if own == "i":
            pro.append(bounds)

        loop = [f"offs_{other} = start + tl.arange(0, {block[other]})",
                f"valid_{other} = offs_{other} < T"]
        if own == "j":
            loop.append(bounds)
        loop.append("valid = valid_i[:, None] & valid_j[None, :] & "
                    "_in_row_context(offs_i, offs_j, lo_i, hi_i, LO, HI, HOLE, ROWS)")
        for t in self.terms:
            loop.append(f"{other_ptr.lower()}{t} = "
                        f"{self._rows(f'{other_ptr}{t}', other, f'BF{t}', f'F{t}')}")
            loop.append(f"u{t} = _tile_dot(q{t}, tl.trans(k{t}), ACC, UPCAST)")
        if self.uses_d:
            loop.append("d = (offs_i[:, None] - offs_j[None, :]).to(ACC)")
        loop += loop_extras
        args, _, _ = self.fn
        ws = [f"w{b}" for b in range(len(self.bodies))]
        loop.append(f"{', '.join(ws)} = {self.fn_name}({', '.join(args)})")
        if self.softmax:  # p: the tile's exp(phi - m), 0 outside the context set
            loop.append("m, s, p, scale = _online_step(m, s, w0, valid)")
        loaded = {v: f"v{n}" for v, n in self.first_reads().items()}
        for p, (n, v) in enumerate(self.values):
            if self.first_reads()[v] == n:
                loop.append(f"v{n} = {self._rows(f'V{n}', other, f'BG{p}', f'G{p}')}")
        weights: dict[int, str] = {}
        for n in self.picked:
            b = self.body_ids.index(self.call.outputs[n][2])
            if b not in weights:
                weights[b] = f"a{b}"
                w = f"w{b} * p" if self.softmax else f"w{b}"
                loop.append(f"a{b} = tl.where(valid, {w}, 0.0)")
            a, v = weights[b], self.call.outputs[n][1]
            rescale = "" if not self.softmax else (" * scale" if v is None else " * scale[:, None]")
            if v is None:
                loop.append(f"acc{n} = acc{n}{rescale} + tl.sum({a}, axis={acc_axis})")
            else:
                vt = loaded[v]
                lhs = f"_operand({a}, {vt}, UPCAST)"
                if own == "j":
                    lhs = f"tl.trans({lhs})"
                loop.append(f"acc{n} = acc{n}{rescale} + _tile_dot({lhs}, {vt}, ACC, UPCAST)")

        epi = []
        if self.softmax:
            epi += ["r, denom = _online_result(m, s)  # no key in the context set: R = 0, sums 0",
                    f"tl.store({self._base('OUT0')} + offs_i * sout0_t, r, mask=valid_i)"]
        first = 1 if self.softmax else 0
        for o, n in enumerate(self.picked, start=first):
            out = f"OUT{o}"
            lo = out.lower()
            value = self.call.outputs[n][1]
            norm = ("" if not self.softmax else
                    (" / denom" if value is None else " / denom[:, None]"))
            if value is None:
                epi.append(f"tl.store({self._base(out)} + offs_{own} * s{lo}_t, acc{n}{norm}, "
                           f"mask=valid_{own})")
            else:
                p = [m for m, _ in self.values].index(n)
                epi.append(f"_store_rows({self._base(out)}, offs_{own}, valid_{own}, s{lo}_t, "
                           f"s{lo}_f, acc{n}{norm}, BG{p}, G{p})")
        return pro, f"lo, hi, {block[other]}", loop, epi

    def build(self, name: str) -> PairKernel:
        self.fn_name = f"{name}_tile"
        self.fn = _tile_function(self.bodies)
        args, fn_lines, returns = self.fn
        pro, loop_range, loop, epi = self.lines()
        names = self.em.names
        form, call = self.call.form, self.call
        over = describe_mask(form.mask)
        heads = ", ".join(["b", *form.heads])
        where = [f"u{t} = {names[form.q[t]]}_i . {names[form.k[t]]}_j (over {form.features[t]})"
                 for t in self.terms]
        if self.uses_d:
            where.append("d = i - j")
        where += [f"e{m} = {names[form.extras[m]]}" for m in self.extras]
        results = [self.em.pending[n] for n, _ in call.results]
        sums = []
        if self.softmax:
            sums.append(f"{results[0]}_i = log sum_j exp(w0_ij)")
        for n in self.picked:
            token, v, b = call.outputs[n]
            weight = f"w{self.body_ids.index(b)}_ij"
            if self.softmax:
                weight += f" exp(w0_ij - {results[0]}_i)"
            value = "" if v is None else f" {names[v]}_{self.other}"
            sums.append(f"{results[n + (1 if self.softmax else 0)]}_{token} = "
                        f"sum_{self.other} {weight}{value}")
        role = "queries" if self.own == "i" else "keys"
        weights = textwrap.fill(f"with the weights w of {self.fn_name} on " + ", ".join(where)
                                + ".", width=96, initial_indent="    ", subsequent_indent="    ")
        doc = (f"Over the pairs j in {{{over}}} of each ({heads}) slice, one program per "
               f"block of {role}:\n\n" + "".join(f"        {line}\n" for line in sums)
               + f"\n{weights}\n    ")
        fn_doc = "; ".join(f"w{b} = {_readable(body)}" for b, body in enumerate(self.bodies))
        return PairKernel(name, doc, self.fn_name, args, fn_doc, fn_lines, returns,
                          self.params(), self.constexprs(), pro, loop_range, loop, epi)


def _launch(em, call: PairCall, kernel: str, picked: list[int], own: str,
            dims: list[str]) -> str:
    q, k, ex = torch_pairs._operands(em, call.form, call.form.extras)
    values = [torch_pairs.value_view(em, call, call.outputs[n][0], call.outputs[n][1])
              for n in picked]
    shape = torch_pairs.shape_arg(em, call.form)
    dim_args = f"({', '.join(dims)}{',' if len(dims) == 1 else ''})"
    return (f'_pairs("{kernel}", {own == "j"}, {call.softmax}, {q}, {k}, {ex}, '
            f"[{', '.join(values)}], {torch_pairs.mask_arg(call.form)}, T=T, shape={shape}, "
            f"dims={dim_args}, dtype=x.dtype, device=x.device)")


def print_call(em, call: PairCall) -> None:
    """The call as pair kernels: a queries-major one for its sums over keys (and R), a
    keys-major one for its sums over queries; torch where a body has no Triton spelling."""
    roles = {"i": [n for n, o in enumerate(call.outputs) if o[0] == "i"],
             "j": [n for n, o in enumerate(call.outputs) if o[0] == "j"]}
    kernels = []
    try:
        for own, picked in roles.items():
            if picked or (own == "i" and call.softmax):
                # numbered after the kept kernels and this call's first, not kept yet
                name = em.kernel_set.name(em.function, "pairs", ahead=len(kernels))
                builder = _Kernel(em, call, picked, own)
                kernels.append((builder.build(name), builder, picked, own))
    except NoTritonSpellingError as error:
        where = em.graph.node(call.results[0][0]).where
        em.kernel_set.stays_on_torch(where, "a pass over the pairs of a context set", error)
        torch_pairs.print_call(em, call)
        return
    names = [em.pending[n] for n, _ in call.results]
    first = 1 if call.softmax else 0
    for kernel, builder, picked, own in kernels:
        out = ([names[0]] if call.softmax and own == "i" else []) + [names[n + first] for n in picked]
        launched = em.kernel_set.add(kernel)
        targets = ", ".join(out) + ("," if len(out) == 1 else "")
        em.lines.append(f"{targets} = {_launch(em, call, launched, picked, own, builder.dims)}")
    torch_pairs.bind_results(em, call, names)


# the pair ops group their passes as on torch; each pass prints here (TritonEmitter.print_pair_call
# calls print_call above); a running sum (a prefix sum of one token's values) is torch's
TRITON.reuse(TORCH, PairLse, PairSum, RunningSum)
