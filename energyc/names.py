"""The names a user declares, and the names generated code uses for them.

A user may name dims, parameters and hyperparameters anything Python calls an identifier, except
what the notation itself uses (:data:`RESERVED`). Each declared name then has two more spellings:

* its **code name** (:func:`code_name`): the identifier in the compiler's graphs and in the
  generated functions. It is the declared name itself when that is plainly safe (ASCII letters,
  digits and single inner underscores; not a Python keyword or builtin; nothing the generated code
  or its template uses, :data:`INTERNAL`); otherwise a mangled name ending in ``__``, which no
  safe name, no internal name and no name derived from one (``W_q_``, ``grad_W_q``) can be. Code
  names never reach the user.
* its **attribute name** (:func:`attribute_names`): the Layer's attribute, and for dims and
  hyperparameters the Layer's constructor keyword. It is the declared name unless Python or
  ``torch.nn.Module`` forbids it there (a keyword, an attribute of ``torch.nn.Module`` or of the
  generated Layer, one of the Layer's own settings ``eta``, ``steps``, ...); then underscores are
  appended (``lambda_``, ``steps_``, ``forward_``).
"""

from __future__ import annotations

import builtins
import keyword
import re

#: names the notation itself uses: the tokens, the state and its context role, the step size
RESERVED = ("i", "j", "x", "xbar", "eta")

#: the generated Layer's own constructor keywords (its settings)
SETTINGS = ("eta", "steps", "precond", "precond_rank", "context", "backend", "dtype", "device")

#: identifiers of generated code and its templates that a user's name must not shadow
INTERNAL = frozenset("""
    b i j B T x xbar x0 y g u gx gxbar grad_g grad_u grad_y grad_x grad_context
    kernels saved keep path steps config ctx self torch math triton tl dataclass launchers
    triton_attention precond_forward precond_backward precond_saved factory exc dims hypers
    DIMS PARAMS HYPERS PRECONDITIONERS KERNELS Layer P_diag P_lowrank acc out red rest start offs
    valid BLOCK BLOCK_O BLOCK_R ACC OUT N_OUT N_RED EPI IN eta precond precond_rank context
    backend dtype device per_token energy forward backward extra_repr reset_parameters m_new
    m_safe zero_o zero_r offs_o offs_r rest_o rest_r valid_o valid_r
""".split())

# numbered temporaries and kernel operands (t0, a3, s1_2, IN0, ...), and derived-name prefixes
_INTERNAL_PATTERN = re.compile(
    r"(?:t|a|c|e|n|o|on|r|rn|s|IN|EPI)\d+(?:_\w*)?|(?:grad|g|mask|dim|precond|P)_\w*")
_PLAIN = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:_[A-Za-z0-9]+)*")


#: further names a dim must not have: the arguments of the tile functions of pair reductions
#: (``def t3(u, d, e)``), in which the dims' sizes are free variables
INTERNAL_DIMS = frozenset({"d", "e"})


def is_plain(name: str, dim: bool = False) -> bool:
    """Whether generated code can use ``name`` (of a dim when ``dim``) as it is."""
    return not (dim and name in INTERNAL_DIMS) and (name.isascii() and _PLAIN.fullmatch(name) is not None
            and not keyword.iskeyword(name) and not keyword.issoftkeyword(name)
            and name not in INTERNAL and not hasattr(builtins, name)
            and _INTERNAL_PATTERN.fullmatch(name) is None)


def code_name(name: str, taken: set[str], dim: bool = False) -> str:
    """The identifier generated code uses for the declared ``name`` (``taken``: code names so far).

    Mangled names end in ``__``; their stem is ASCII (other characters as ``u<hex>``) and never
    starts with a prefix that generated code derives names with (``grad_``, ``g_``, ...).
    """
    if is_plain(name, dim):
        return name
    stem = "".join(c if c.isascii() and (c.isalnum() or c == "_") else f"u{ord(c):x}"
                   for c in name)
    stem = re.sub(r"_+", "_", stem).strip("_")
    if not stem or not stem[0].isalpha() or _INTERNAL_PATTERN.fullmatch(stem):
        stem = "n" + stem
    candidate, k = f"{stem}__", 1
    while candidate in taken:
        candidate, k = f"{stem}{k}__", k + 1
    return candidate


def _module_attributes() -> frozenset[str]:
    import torch

    names = set(dir(torch.nn.Module)) | set(vars(torch.nn.Module()))
    names |= {"config", "precond_rank", "P_diag", "P_lowrank", "energy", "extra_repr",
              "reset_parameters", "_hypers", "_params", "_config", "_setup", "self"}
    return frozenset(names | set(SETTINGS))


_ATTRIBUTES: frozenset[str] | None = None


def _attribute_ok(name: str) -> bool:
    global _ATTRIBUTES
    if _ATTRIBUTES is None:
        _ATTRIBUTES = _module_attributes()
    private = name.startswith("__") and not name.endswith("__")  # mangled inside a class body
    return not keyword.iskeyword(name) and not private and name not in _ATTRIBUTES


def attribute_names(names: list[str]) -> dict[str, str]:
    """Declared name -> the Layer's attribute (and constructor keyword) for it."""
    out = {n: n for n in names if _attribute_ok(n)}
    taken = set(out)
    for n in names:
        if n in out:
            continue
        candidate = n + "_"
        while candidate in taken or not _attribute_ok(candidate):
            candidate += "_"
        out[n] = candidate
        taken.add(candidate)
    return out
