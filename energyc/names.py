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
import sys

from energyc.settings import KEYWORDS

#: names the notation itself uses: the tokens, the state and its context role, the step size
RESERVED = ("i", "j", "x", "xbar", "eta")

#: the generated Layer's own constructor keywords (its settings)
SETTINGS = KEYWORDS

#: identifiers of generated code and its templates that a user's name must not shadow
INTERNAL = frozenset("""
    b i j B T Tm x xbar x0 y g u gx gxbar grad_g grad_u grad_y grad_x grad_context
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


# torch.nn.Module's attributes (the class's dir and a fresh instance's __dict__) in torch 2.13:
# a generated Layer's attribute must not shadow one. Listed here so that compiling imports no
# torch (1.7 s of a 2.3 s `energyc compile` of cem_attention); tests/test_names.py checks the list
# against the installed torch, and where torch is already imported its own names are added.
NN_MODULE_ATTRIBUTES = frozenset({
    'T_destination', '__annotations__', '__call__', '__class__', '__delattr__', '__dict__',
    '__dir__', '__doc__', '__eq__', '__format__', '__ge__', '__getattr__', '__getattribute__',
    '__getstate__', '__gt__', '__hash__', '__init__', '__init_subclass__', '__le__', '__lt__',
    '__module__', '__ne__', '__new__', '__reduce__', '__reduce_ex__', '__repr__',
    '__setattr__', '__setstate__', '__sizeof__', '__str__', '__subclasshook__', '__weakref__',
    '_apply', '_backward_hooks', '_backward_pre_hooks', '_buffers', '_call_impl',
    '_compiled_call_impl', '_forward_hooks', '_forward_hooks_always_called',
    '_forward_hooks_with_kwargs', '_forward_pre_hooks', '_forward_pre_hooks_with_kwargs',
    '_get_backward_hooks', '_get_backward_pre_hooks', '_get_name', '_is_full_backward_hook',
    '_load_from_state_dict', '_load_state_dict_post_hooks', '_load_state_dict_pre_hooks',
    '_maybe_warn_non_full_backward_hook', '_modules', '_named_members',
    '_non_persistent_buffers_set', '_parameters', '_register_load_state_dict_pre_hook',
    '_register_state_dict_hook', '_replicate_for_data_parallel', '_save_to_state_dict',
    '_slow_forward', '_state_dict_hooks', '_state_dict_pre_hooks', '_version',
    '_wrapped_call_impl', 'add_module', 'apply', 'bfloat16', 'buffers', 'call_super_init',
    'children', 'compile', 'cpu', 'cuda', 'double', 'dump_patches', 'eval', 'extra_repr',
    'float', 'forward', 'get_buffer', 'get_extra_state', 'get_parameter', 'get_submodule',
    'half', 'ipu', 'load_state_dict', 'modules', 'mtia', 'named_buffers', 'named_children',
    'named_modules', 'named_parameters', 'parameters', 'register_backward_hook',
    'register_buffer', 'register_forward_hook', 'register_forward_pre_hook',
    'register_full_backward_hook', 'register_full_backward_pre_hook',
    'register_load_state_dict_post_hook', 'register_load_state_dict_pre_hook',
    'register_module', 'register_parameter', 'register_state_dict_post_hook',
    'register_state_dict_pre_hook', 'requires_grad_', 'set_extra_state', 'set_submodule',
    'share_memory', 'state_dict', 'to', 'to_empty', 'train', 'training', 'type', 'xpu',
    'zero_grad'
})


def _module_attributes() -> frozenset[str]:
    names = set(NN_MODULE_ATTRIBUTES)
    torch = sys.modules.get("torch")
    if torch is not None:  # imported already: its own attributes too (another torch version)
        names |= set(dir(torch.nn.Module)) | set(vars(torch.nn.Module()))
    names |= LAYER_ATTRIBUTES
    return frozenset(names | set(SETTINGS))


#: the attributes of the generated Layer's base (energyc.runtime.layer.EnergyLayer) beyond
#: torch.nn.Module's, and ``self`` (tests/test_names.py checks the list against the class)
LAYER_ATTRIBUTES = frozenset({
    "config", "precond_rank", "P_diag", "P_lowrank", "energy", "decode", "extra_repr",
    "reset_parameters", "_hypers", "_params", "_config", "_setup", "_declared", "_dims", "self",
    "_call_data", "_memory", "_by_length"})

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
