"""The Layer of every generated package: descent steps on its energy, driven by its declarations.

A generated ``layer.py`` holds what depends on its energy: the declarations (``DIMS``,
``PARAMS``, ``HYPERS``, ``STATE_DIM``, ``EVEN_DIMS``, ``LEARNED_HYPERS``, ``DECODE_*`` and
``_declarations``, the parameters' shapes and initialisations and the hyperparameters' defaults
at given dims), the step functions (``_energy``, ``_grad_forward``, ``_grad_backward``,
``_grad_decode``) and a ``Layer(EnergyLayer, module=__name__)`` whose constructor keeps the
energy's keywords. Here, once for every package:

* :class:`EnergyLayer`: construction from the declarations (checked dims, parameters,
  hyperparameters fixed or learned, the preconditioner's parameters), ``reset_parameters``,
  ``forward``, ``energy``, ``decode``, ``extra_repr``;
* :class:`LayerFunction`: the autograd Function of the step loop. Forward, ``steps`` times
  (xbar = x with context "current", the layer's input with "input"; P of
  ``energyc.runtime.precond``)::

      g = dE/dx (x, xbar)          the package's _grad_forward
      x <- x - eta P g

  Backward, the steps in reverse, with the upstream gradient a = dLoss/dx_{k+1}::

      G  = -eta a                  dLoss/du
      dg, dP = VJP of P g          (precond.BACKWARD)
      dx, dxbar, dθ = VJP of g     the package's _grad_backward, seeded by dg
      a <- a + dx (+ dxbar with context "current"; with "input" dxbar adds to the input's)

  dθ (parameters, learned hyperparameters) and dP summed over the steps (``Sums``, in place
  after the first).

The step's settings (eta, steps, precond, precond_rank, context, backend) are checked by
``energyc.settings``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, NamedTuple

import torch

from energyc import settings
from energyc.runtime import precond
from energyc.runtime.arguments import as_scalar, check_dim, check_input, hyper_value
from energyc.runtime.arguments import factory as parameter_factory
from energyc.runtime.autocast import autocast_as, autocast_dtype, autocast_off, autocast_state
from energyc.runtime.backends import implementation, preload
from energyc.runtime.decode import decode_layer
from energyc.runtime.positions import alibi_slopes_
from energyc.runtime.rows import CallData, call_data, calling
from energyc.runtime.steps import Sums, apply_layer, energy_inputs


class StepConfig(NamedTuple):
    """What one application of :class:`LayerFunction` runs: the Layer's ``config`` (eta, steps,
    precond, context, backend) and the generated package whose step functions it calls."""

    eta: float
    steps: int
    precond: str
    context: str
    backend: str
    package: str


class LayerFunction(torch.autograd.Function):
    """``steps`` descent steps x <- x - eta * P * g(x, xbar); backward by the derived VJPs.

    Applied as ``(config, data, x, memory, *params, *hypers, P_diag, P_lowrank)``
    (``energyc.runtime.steps.apply_layer``): the call's context data (``energyc.runtime.rows``;
    None: none), the memory (None: the layer reads none), then the package's parameters and
    hyperparameters (0-d tensors) in its declared order, then P's. The steps run with the data as
    the call's (``rows.calling``); with lengths, g is zero at padded tokens (so is the gradient
    reaching it in the backward). A memory is every step's context (the step functions' xbar),
    unchanged by the steps; its gradient is the steps' xbar gradients, summed."""

    @staticmethod
    def forward(ctx, config: StepConfig, data: CallData | None, x: torch.Tensor,
                memory: torch.Tensor | None, *args: torch.Tensor | None):
        with calling(data):
            return LayerFunction._forward(ctx, config, data, x, memory, args)

    @staticmethod
    def _forward(ctx, config: StepConfig, data: CallData | None, x: torch.Tensor,
                 memory: torch.Tensor | None,
                 args: tuple[torch.Tensor | None, ...]) -> torch.Tensor:
        *weights, P_diag, P_lowrank = args
        valid = None if data is None or data.valid is None else data.valid.to(x.dtype)
        keep = any(ctx.needs_input_grad)
        ctx.autocast = autocast_state(x)
        path, kernels = implementation(config.backend, x, config.package)
        grad_forward = path._grad_forward
        precond_forward = precond.FORWARD[config.precond]
        current = config.context == "current"
        x0 = x
        steps = []
        for _ in range(config.steps):
            xbar = memory if memory is not None else x if current else x0
            g, saved = grad_forward(kernels, x, xbar, *weights)
            if valid is not None:
                g = g * valid
            u, precond_saved = precond_forward(g, P_diag, P_lowrank)
            if keep:
                steps.append((x, g, saved, precond_saved))
            x = torch.add(x, u, alpha=-config.eta)  # x - eta u, one pass
        ctx.config = config
        ctx.data, ctx.valid = data, valid
        ctx.steps = steps
        ctx.has_memory = memory is not None
        ctx.save_for_backward(x0, memory, *args)
        return x

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x0, memory, *args = ctx.saved_tensors
        with autocast_as(ctx.autocast, x0), calling(ctx.data):  # as in the forward
            return LayerFunction._backward(ctx, ctx.config, grad_y, x0, memory, args)

    @staticmethod
    def _backward(ctx, config: StepConfig, grad_y: torch.Tensor, x0: torch.Tensor,
                  memory: torch.Tensor | None,
                  args: list[torch.Tensor | None]) -> tuple[torch.Tensor | None, ...]:
        *weights, P_diag, P_lowrank = args
        path, kernels = implementation(config.backend, x0, config.package)
        grad_backward = path._grad_backward
        precond_backward = precond.BACKWARD[config.precond]
        current = config.context == "current"
        sums = Sums()  # each gradient's parts over the steps, added in place after the first
        grad_x = grad_y
        grad_context = grad_memory = grad_P_diag = grad_P_lowrank = None
        grads: list[torch.Tensor | None] = [None] * len(weights)
        for x, g, saved, precond_saved in reversed(ctx.steps):
            xbar = memory if memory is not None else x if current else x0
            grad_u = -config.eta * grad_x
            grad_g, g_P_diag, g_P_lowrank = precond_backward(
                precond_saved, grad_u, g, P_diag, P_lowrank)
            if ctx.valid is not None:
                grad_g = grad_g * ctx.valid
            gx, gxbar, *parts = grad_backward(kernels, saved, grad_g, x, xbar, *weights)
            grad_x = sums.add(grad_x, gx)
            if memory is not None:
                grad_memory = sums.add(grad_memory, gxbar)
            elif current:
                grad_x = sums.add(grad_x, gxbar)
            else:
                grad_context = sums.add(grad_context, gxbar)
            grads = [sums.add(total, part) for total, part in zip(grads, parts)]
            grad_P_diag = sums.add(grad_P_diag, g_P_diag)
            grad_P_lowrank = sums.add(grad_P_lowrank, g_P_lowrank)
        grad_x = sums.add(grad_x, grad_context)
        ctx.steps = None
        return (None, None, grad_x, grad_memory, *grads, grad_P_diag, grad_P_lowrank)


#: a parameter's initialisation by kind, with its arguments at the layer's dims (a generated
#: package's ``_declarations``: ``("normal", mean, std)``, ``("uniform", low, high)``,
#: ``("constant", value)``, ``("alibi",)``: ALiBi's geometric slopes over the entries)
INITS: dict[str, Callable[..., Any]] = {
    "normal": lambda p, mean, std: torch.nn.init.normal_(p, mean=mean, std=std),
    "uniform": lambda p, low, high: torch.nn.init.uniform_(p, a=low, b=high),
    "constant": lambda p, value: torch.nn.init.constant_(p, value),
    "alibi": alibi_slopes_,
}


@dataclass(frozen=True)
class Declarations:
    """A generated package's declarations (its ``layer.py``'s constants), read once when its
    Layer class is made, and the module itself, whose functions (``_declarations``, ``_energy``,
    ``_grad_decode``; the step functions through ``implementation``) are looked up when called.

    ``dims``, ``params``, ``hypers``: the Layer's attributes (and, for dims and hyperparameters,
    constructor keywords) in the declared order; ``module._declarations(*dims)`` ->
    ({param: (shape, init)}, {hyper: default or None}) at given dims."""

    module: ModuleType
    package: str
    dims: tuple[str, ...]
    even_dims: tuple[str, ...]
    state_dim: str
    params: tuple[str, ...]
    hypers: tuple[str, ...]
    learned: tuple[str, ...]
    decode_unsupported: str | None
    decode_keys_from_context: bool
    context_data: tuple[str, ...]
    memory: tuple[str, str] | None  # the memory's name and its dim's attribute (None: none)

    @classmethod
    def of(cls, module: ModuleType) -> Declarations:
        return cls(
            module, module.__package__, tuple(module.DIMS), tuple(module.EVEN_DIMS),
            module.STATE_DIM, tuple(module.PARAMS), tuple(module.HYPERS),
            tuple(module.LEARNED_HYPERS), module.DECODE_UNSUPPORTED,
            module.DECODE_KEYS_FROM_CONTEXT, tuple(getattr(module, "CONTEXT_DATA", ())),
            getattr(module, "MEMORY", None))


class EnergyLayer(torch.nn.Module):
    """A layer of descent steps on a generated package's energy (the base of its ``Layer``).

    A subclass names its module, ``class Layer(EnergyLayer, module=__name__)``, whose
    declarations (:class:`Declarations`) it is built from, and its ``__init__`` takes the
    energy's keywords and passes them on in order: ``self._setup(*dims, *hypers, eta, steps,
    precond, precond_rank, context, backend, dtype, device)``. Attributes: each dim's size, each
    parameter (``torch.nn.Parameter``), each hyperparameter (a float, or a 0-d Parameter when
    learned), ``P_diag`` and ``P_lowrank`` (None where the preconditioner has none),
    ``precond_rank`` and ``config`` = (eta, steps, precond, context, backend).
    """

    _declared: Declarations

    def __init_subclass__(cls, module: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if module is not None:  # a generated Layer; a user's subclass inherits its declarations
            cls._declared = Declarations.of(sys.modules[module])

    def _setup(self, *values: Any) -> None:
        """Build the layer from the constructor's arguments, dims and hyperparameters first in
        the declared order, then the settings (``energyc.settings.KEYWORDS``)."""
        declared = self._declared
        n_dims, n_hypers = len(declared.dims), len(declared.hypers)
        dims, hypers = values[:n_dims], values[n_dims:n_dims + n_hypers]
        eta, steps, kind, rank, context, backend, dtype, device = values[n_dims + n_hypers:]
        super().__init__()
        for attr, size in zip(declared.dims, dims):
            setattr(self, attr, check_dim(attr, size, even=attr in declared.even_dims))
        self.config = settings.check_step_settings(eta, steps, kind, rank, context, backend)
        preload(backend, declared.package)
        self.precond_rank = int(rank)
        factory = parameter_factory(dtype, device)
        shapes, defaults = declared.module._declarations(*self._dims())
        for attr in declared.params:
            setattr(self, attr, torch.nn.Parameter(torch.empty(shapes[attr][0], **factory)))
        for attr, value in zip(declared.hypers, hypers):
            value = hyper_value(attr, value, defaults[attr])
            if attr in declared.learned:
                value = torch.nn.Parameter(torch.tensor(value, **factory))
            setattr(self, attr, value)
        self.P_diag, self.P_lowrank = precond.parameters(
            kind, getattr(self, declared.state_dim), self.precond_rank, factory)
        self.reset_parameters()

    def _dims(self) -> tuple[int, ...]:
        return tuple(getattr(self, attr) for attr in self._declared.dims)

    @property
    def _config(self) -> StepConfig:
        return StepConfig(*self.config, self._declared.package)

    def reset_parameters(self) -> None:
        """Each parameter drawn (or set) by its declared initialisation; P the identity."""
        declared = self._declared
        shapes, _ = declared.module._declarations(*self._dims())
        with torch.no_grad():
            for attr in declared.params:
                kind, *args = shapes[attr][1]
                INITS[kind](getattr(self, attr), *args)
            precond.reset_(self.P_diag, self.P_lowrank)

    def _hypers(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The hyperparameters as 0-d tensors of x's dtype and device, in the declared order."""
        return tuple([as_scalar(getattr(self, attr), x) for attr in self._declared.hypers])

    def _params(self) -> tuple[torch.Tensor, ...]:
        """The parameters in the declared order."""
        return tuple([getattr(self, attr) for attr in self._declared.params])

    def _call_data(self, x: Any, sets: dict[str, Any],
                   memory: torch.Tensor | None = None) -> CallData | None:
        if (not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.dtype.is_floating_point
                or x.shape[-1] != getattr(self, self._declared.state_dim)):
            return None  # apply_layer's check says what x must be
        return call_data(x, self._declared.context_data, memory=memory, **sets)

    def _memory(self, memory: Any, x: Any) -> None:
        """Check the call's ``memory=`` against the layer: required where the energy reads a
        memory, a (batch, M, Dm) tensor like x, refused elsewhere."""
        declared = self._declared.memory
        if declared is None:
            if memory is not None:
                raise ValueError("memory= given, but this layer's energy reads no memory "
                                 "(declare one with memory(name, dim) and read it as name[j])")
            return
        name, dim = declared
        params = self._params()
        compute = autocast_dtype(x, params) if isinstance(x, torch.Tensor) else None
        check_input("x", x, getattr(self, self._declared.state_dim), params, compute=compute)
        if memory is None:
            raise ValueError(f"this layer's energy reads the memory {name}: give it as memory= "
                             f"(batch, tokens, {dim}={getattr(self, dim)})")
        params = self._params()
        if not isinstance(x, torch.Tensor):
            return  # x's own check says what it must be
        check_input("memory", memory, getattr(self, dim), params or (x,),
                    compute=autocast_dtype(x, params) if params else None)
        if memory.shape[0] != x.shape[0]:
            raise ValueError(f"argument memory: expected x's batch of {x.shape[0]} rows, got "
                             f"{memory.shape[0]}")

    def forward(self, x: torch.Tensor, *, memory: torch.Tensor | None = None,
                memory_lengths: Any = None, cu_seqlens: Any = None, document_ids: Any = None,
                lengths: Any = None, prefix: Any = None) -> torch.Tensor:
        """Map x (batch, tokens, D) to the state after the descent steps (D: the state's dim).

        The call's context data (``energyc.runtime.rows``): ``cu_seqlens`` (1-D offsets of the
        documents packed in each row, shared by the rows, as FlashAttention's varlen) or
        ``document_ids`` ((batch, tokens) or (tokens,), non-decreasing), where the energy's sets
        read documents (``& same_document()``); ``prefix`` (an int or one per row) where they read
        a prefix (``| (j < prefix())``); ``lengths`` (an int or one per row) on any layer: tokens
        at or after a row's length are padding, outside every context set, and their outputs are
        their inputs (no update; no gradient from the real tokens' losses); the rows of each
        length run together on their real tokens alone (``_by_length``), so padding costs no
        work beyond the rows' own.

        ``memory`` (batch, M, Dm), where the energy reads a memory (``memory(name, Dm)``, read
        as ``name[j]``): the second sequence every step's reductions over j read, all M tokens of
        it, or with ``memory_lengths`` (an int or one per row) the first M_b of row b (later ones
        are padding: they change no output and get gradient 0). It is not updated; its gradient
        is returned like x's.

        Under torch.autocast the steps run inside the region on x in the parameters' dtype:
        autocast casts each contraction's operands to its dtype, the rest stays float32, and the
        output is in the autocast dtype (energyc.runtime's mixed-precision notes).
        """
        self._memory(memory, x)
        data = self._call_data(x, dict(cu_seqlens=cu_seqlens, document_ids=document_ids,
                                       lengths=lengths, prefix=prefix,
                                       memory_lengths=memory_lengths), memory)
        if (data is not None and data.lengths is not None
                and not torch.is_autocast_enabled(x.device.type)
                and not torch.compiler.is_compiling()):
            return self._by_length(x, memory, data)
        return apply_layer(
            LayerFunction, self._config, data, "x", x, getattr(self, self._declared.state_dim),
            self._params(), self._hypers, (self.P_diag, self.P_lowrank), memory)

    def _by_length(self, x: torch.Tensor, memory: torch.Tensor | None,
                   data: CallData) -> torch.Tensor:
        """``forward`` of a padded batch, the rows of each length together on their real tokens
        alone: the rows with L real tokens are the call ``forward(x[rows, :L])`` (their
        documents, prefixes, memories and memory lengths cut alike), and every padded token's
        output is its input. The same values as the padded call through the kernels' per-row
        bounds (no real token reads a padded one), without the dense work of the padding
        (projections and element-wise steps over every row's T tokens)."""
        lengths = data.lengths.tolist()
        out = x.clone()  # a padded token's output is its input
        for n in sorted(set(lengths)):
            if n == 0:
                continue
            rows = torch.tensor([b for b, m in enumerate(lengths) if m == n], device=x.device)
            cut: dict[str, Any] = {}
            if data.ids is not None:
                ids = data.ids if data.ids.shape[0] == 1 else data.ids[rows]
                cut["document_ids"] = ids[:, :n].expand(len(rows), n)
            if data.prefix is not None:
                cut["prefix"] = data.prefix[rows].clamp(max=n)
            if memory is not None:
                cut["memory"] = memory[rows]
                if data.memory_lengths is not None:
                    cut["memory_lengths"] = data.memory_lengths[rows]
            out[rows, :n] = self.forward(x[rows, :n], **cut)
        return out

    def energy(self, x: torch.Tensor, xbar: torch.Tensor | None = None,
               per_token: bool = False, *, memory: torch.Tensor | None = None,
               memory_lengths: Any = None, cu_seqlens: Any = None, document_ids: Any = None,
               lengths: Any = None, prefix: Any = None) -> torch.Tensor:
        """Total energy per batch element (or per token), evaluated from E itself: E(x | xbar).

        ``xbar`` is the context. Left out, it is the context a step from ``x`` uses: x itself,
        held fixed (``x.detach()``), so the value is E(x | x) and gradients reach x through its
        state role alone; ``x - eta * grad_x layer.energy(x).sum()`` is then one step of
        ``forward`` (identity preconditioner, ``steps=1``; with context "input" the first step).
        Give ``xbar=x`` to differentiate through both roles. Gradients reach the parameters
        through both roles either way. A joint energy reads x at context tokens too (``x[j]``):
        those terms are differentiated as the step differentiates them. Under torch.autocast it
        is evaluated in the parameters' dtype (a reduction, which autocast keeps in float32).
        The context data keywords are ``forward``'s; a padded token's energy is 0. A layer that
        reads a memory takes it as ``memory=`` (and ``memory_lengths=``), as ``forward`` does,
        and no ``xbar``: E(x | memory), differentiable to the memory too.
        """
        declared = self._declared
        params = self._params()
        self._memory(memory, x)
        if memory is not None and xbar is not None:
            raise ValueError("give the context once: this layer's context is its memory=, not "
                             "xbar")
        x, xbar = energy_inputs(x, xbar, getattr(self, declared.state_dim), params, memory)
        data = self._call_data(x, dict(cu_seqlens=cu_seqlens, document_ids=document_ids,
                                       lengths=lengths, prefix=prefix,
                                       memory_lengths=memory_lengths), memory)
        with autocast_off(x), calling(data):
            e = declared.module._energy(x, xbar, *params, *self._hypers(x))
        if data is not None and data.valid is not None:
            e = e * data.valid[:, :, 0].to(e.dtype)
        return e if per_token else e.sum(dim=1)

    def decode(self, x: torch.Tensor, cache: Any = None, *, document_ids: Any = None,
               left_padding: Any = None) -> tuple[torch.Tensor, Any]:
        """Incremental decoding: the outputs at t new tokens x (batch, t, D) that follow the
        tokens already passed through ``cache``, and the cache extended by them.

        ``cache=None`` starts a sequence. Splitting a sequence into decode calls gives the outputs
        of ``forward`` on the whole sequence; each call does work linear in the tokens so far.
        Without autograd (inference). Raises ValueError where a token's update depends on later
        tokens (the package's DECODE_UNSUPPORTED says why).

        Rows of different lengths decode together padded on the left: ``left_padding`` (an int
        or one per row, on the first call) counts each row's padding tokens, which no real token
        reads and whose outputs are their inputs. Where the energy's sets read documents,
        ``document_ids`` ((batch, t) or (t,)) gives the new tokens' documents: a token whose id
        differs from the one before starts a document, with a fresh context.
        """
        declared = self._declared
        return decode_layer(
            declared.package, self.config, x, cache, getattr(self, declared.state_dim),
            self._params(), self._hypers, (self.P_diag, self.P_lowrank), declared.module._grad_decode,
            precond.FORWARD, declared.decode_unsupported, declared.decode_keys_from_context,
            declared.context_data, document_ids, left_padding)

    def extra_repr(self) -> str:
        declared = self._declared
        dims = ", ".join(f"{d}={getattr(self, d)}" for d in declared.dims)
        hypers = ", ".join(f"{h}={float(getattr(self, h)):.4g}" for h in declared.hypers)
        eta, steps, kind, context, backend = self.config
        return (
            f"{dims}, {hypers}, eta={eta}, steps={steps}, precond={kind!r}, "
            f"context={context!r}, backend={backend!r}"
        ).replace(", , ", ", ")
