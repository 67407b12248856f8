"""The plain data a backend's lowering makes of a compiled layer and its templates render
(``codegen_templates/``): functions as lines, the package's declarations, the kernels."""

from __future__ import annotations

from dataclasses import dataclass, field

from energyc.runtime_version import RUNTIME_VERSION


@dataclass
class FunctionSpec:
    """A straight-line function: ``def name(args): doc; lines; return returns``."""

    name: str
    args: list[str]
    doc: str
    lines: list[str]
    returns: str


@dataclass
class TritonModuleSpec:
    """The Triton path of one package: its step functions and the kernels they launch."""

    energy: str
    functions: list[FunctionSpec]
    kernels: list = field(default_factory=list)  # PointwiseKernel | ReductionKernel | PairKernel
    attention: bool = False  # whether energyc.runtime.triton_attention serves fused reductions
    notes: list[str] = field(default_factory=list)  # what stays on torch, and why (file:line)
    launches: dict[str, int] = field(default_factory=dict)  # per family: a kernel may serve several

    @property
    def context_test(self) -> bool:
        """Whether a kernel tests a context set (``_in_row_context``, from energyc.runtime)."""
        return self.pairs or any("_in_row_context(" in getattr(k, "valid", "")
                                 for k in self.kernels)

    @property
    def math(self) -> bool:
        """Whether a kernel calls a function of energyc.runtime.triton_math (``_tm.``)."""
        return any("_tm." in repr(k) for k in self.kernels)

    @property
    def pairs(self) -> bool:
        """Whether a kernel is a pair kernel (energyc.runtime.triton_pairs's helpers)."""
        return any(k.family == "pair" for k in self.kernels)

    @property
    def counts(self) -> dict[str, int]:
        """Kernels per family (each distinct kernel once)."""
        out: dict[str, int] = {}
        for k in self.kernels:
            out[k.family] = out.get(k.family, 0) + 1
        return out


@dataclass
class DimSpec:
    name: str  # the code name (energyc.names): a local variable of generated code
    attr: str  # the Layer's attribute and constructor keyword
    public: str  # as declared
    even: bool = False
    default: int | None = None  # the declared default size (None: the constructor requires it)


@dataclass
class HyperSpec:
    name: str  # the code name
    default: str  # Python expression in the dims, or "None" (then required)
    learnable: bool
    attr: str = ""  # the Layer's attribute and constructor keyword
    public: str = ""


@dataclass
class ParamSpec:
    name: str  # the code name
    shape: str  # "(H, K, D)", in the dims' code names
    init: str  # its initialisation as data: "('normal', 0, 1 / math.sqrt(D))" (runtime.layer.INITS)
    attr: str = ""  # the Layer's attribute
    public: str = ""


@dataclass
class PackageSpec:
    name: str
    class_name: str
    source: str
    doc: str
    dims: list[DimSpec]
    state_dim: str  # its code name
    state_attr: str  # its attribute
    hypers: list[HyperSpec]
    params: list[ParamSpec]
    eta: float
    steps: int
    precond: str
    rank: int
    context: str
    joint: bool
    functions: list[FunctionSpec]
    precond_kinds: list[str]  # energyc.settings.PRECONDITIONERS
    settings_doc: list[str] = field(default_factory=list)  # the settings' Args lines (settings.DOC)
    runtime_version: str = RUNTIME_VERSION  # the energyc.runtime the package requires at least
    decode_unsupported: str | None = None  # why Layer.decode raises; None: it decodes
    decode_keys_from_context: bool = False  # the cached values depend on the context alone
    context_data: tuple[str, ...] = ()  # what the context sets read from the call (context.DATA)
    # the memory the energy reads (a second sequence given at call time): its declared name and
    # its dim's attribute; None: none
    memory: tuple[str, str] | None = None
    # a neuron model's layers (its declared name, its dim's attribute, its time constant tau),
    # in declared order; empty: the state is x itself
    neurons: tuple[tuple[str, str, float], ...] = ()
    dynamics: str = "descent"  # a neuron model's: "descent" or "legendre"
    terms: tuple[str, ...] = ()  # the energy's named terms
