"""Neuron models: descent on the activations of neuron layers, compiled as one program.

A generated package whose file declares ``neurons(...)`` has a ``Layer`` on
:class:`NeuronLayer`. Each neuron layer l has a state x_l (batch, tokens, D_l) and a Lagrangian
L_l whose gradient is its activation g_l = dL_l/dx_l; the energy E(g) joins the activations
(the package's ``NEURONS``, ``DYNAMICS``, ``TERMS``). Its step functions, all generated:

* ``_activation_forward(kernels, x_1..x_n, *weights)`` -> g_1..g_n, saved;
* ``_activation_backward(kernels, saved, v_1..v_n, x_1..x_n, *weights)`` -> J_1 v_1 .. J_n v_n
  (J_l = Hess L_l, symmetric), and the Lagrangians' parameters' gradients (gamma, delta, ...);
* ``_grad_forward(kernels, g_1, gbar, g_2..g_n, *weights)`` -> dE/dg_1..dE/dg_n, saved (gbar: the
  first layer's context role, as ``xbar`` for a plain layer);
* ``_grad_backward(kernels, saved, w_1..w_n, g_1, gbar, g_2..g_n, *weights)`` -> the VJP of
  dE/dg w.r.t. g_1, gbar, g_2..g_n and the parameters (E's second derivatives);
* ``_energy``, ``_energy_terms``, ``_lagrangians``: E, its named terms, each L_l per token.

:class:`NeuronFunction` runs ``steps`` steps of the dynamics in one autograd Function, with
eta_l = eta / tau_l (clamped layers held fixed)::

    g_l   = dL_l/dx_l (x_l)                         _activation_forward
    d_l   = dE/dg_l (g)                             _grad_forward (gbar = g_1, or the input's)
    u_l   = d_l             ("descent", the Energy Transformer's)
          | x_l + d_l       ("legendre", hamux's: d/dg_l of x_l . g_l - L_l(x_l) is x_l)
    x_l  <- x_l - eta_l P u_l      (P on a single layer; clamped layers: no change)

Backward, the steps in reverse, a_l = dLoss/dx_l after the step::

    w_l  = P^T (-eta_l a_l)   (0 for a clamped layer)
    a_l += w_l                ("legendre": the x_l in u_l)
    v    = VJP of dE/dg seeded by w      _grad_backward (v_1 += its gbar part with "current")
    a_l += J_l v_l                        _activation_backward
    parameters: E's part from _grad_backward, the Lagrangians' from _activation_backward

With context "input", gbar is the input's activation g_1(x_1^0): its gradients are summed over
the steps and taken back through J_1 at the input at the end. The total energy, what
:meth:`NeuronLayer.trace` reports per step, is E(g) for "descent" and E(g) + sum_l
(x_l . g_l - L_l(x_l)) for "legendre" (hamux's); each descends for a small step because each J_l
is positive semi-definite (``energyc check`` verifies it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch

from energyc.runtime import precond
from energyc.runtime.arguments import check_input
from energyc.runtime.autocast import autocast_as, autocast_dtype, autocast_state
from energyc.runtime.backends import implementation
from energyc.runtime.layer import EnergyLayer
from energyc.runtime.rows import CallData, call_data, calling
from energyc.runtime.steps import Sums
from energyc.settings import check_number


class NeuronConfig(NamedTuple):
    """What one application of :class:`NeuronFunction` runs."""

    eta: float
    steps: int
    precond: str
    context: str
    backend: str
    package: str
    dynamics: str
    etas: tuple[float, ...]  # eta / tau_l per layer
    clamped: tuple[bool, ...]  # per layer: held fixed during the dynamics


def _outputs(result: tuple, n: int) -> tuple[list[torch.Tensor], Any]:
    """A generated forward's (*values, saved) as ([values], saved)."""
    return list(result[:n]), result[n]


def _zeros_for(values: Sequence[torch.Tensor | None],
               like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.zeros_like(y) if v is None else v for v, y in zip(values, like)]


def run_dynamics(config: NeuronConfig, path: Any, kernels: Any, xs: list[torch.Tensor],
                 weights: Sequence[torch.Tensor | None], P: tuple[Any, Any],
                 valid: torch.Tensor | None, keep: bool = False, record: Any = None):
    """The forward of :class:`NeuronFunction` (the module docstring): the states after the
    steps, the steps' saved values (with ``keep``) and the input's activations. ``record(xs)``,
    if given, is called before each step and after the last (the energy trace)."""
    n = len(xs)
    P_diag, P_lowrank = P
    precond_forward = precond.FORWARD[config.precond]
    current = config.context == "current"
    steps, g0 = [], None
    for _ in range(config.steps):
        gs, act_saved = _outputs(path._activation_forward(kernels, *xs, *weights), n)
        if g0 is None:
            g0 = (gs, act_saved)
        if record is not None:
            record(xs)
        gbar = gs[0] if current else g0[0][0]
        ds, saved = _outputs(path._grad_forward(kernels, gs[0], gbar, *gs[1:], *weights), n)
        us = [x + d for x, d in zip(xs, ds)] if config.dynamics == "legendre" else ds
        if valid is not None:
            us = [u * valid for u in us]
        u0 = us[0]  # before P: the preconditioner's backward reads it
        us[0], precond_saved = precond_forward(u0, P_diag, P_lowrank)
        if keep:  # u before P only where P's backward reads it (not the identity's)
            steps.append((xs, gs, act_saved, saved, precond_saved,
                          None if config.precond == "identity" else u0))
        xs = [x if fixed else torch.add(x, u, alpha=-eta)
              for x, u, eta, fixed in zip(xs, us, config.etas, config.clamped)]
    if record is not None:
        record(xs)
    return xs, steps, g0


class NeuronFunction(torch.autograd.Function):
    """The dynamics of a neuron model (``steps`` steps, the module docstring); backward by the
    derived VJPs of the energy's gradient and the Lagrangians' activations.

    Applied as ``(config, data, *states, *params, *hypers, P_diag, P_lowrank)``: the states in
    the package's ``NEURONS`` order; returns the states after the steps."""

    @staticmethod
    def forward(ctx, config: NeuronConfig, data: CallData | None, *args: Any):
        n = len(config.etas)
        xs, (*weights, P_diag, P_lowrank) = list(args[:n]), args[n:]
        valid = None if data is None or data.valid is None else data.valid.to(xs[0].dtype)
        ctx.autocast = autocast_state(xs[0])
        with calling(data):
            path, kernels = implementation(config.backend, xs[0], config.package)
            out, steps, g0 = run_dynamics(config, path, kernels, xs, weights, (P_diag, P_lowrank),
                                          valid, keep=any(ctx.needs_input_grad))
        ctx.config, ctx.data, ctx.valid, ctx.steps, ctx.g0 = config, data, valid, steps, g0
        ctx.save_for_backward(*xs, *weights, *(p for p in (P_diag, P_lowrank) if p is not None))
        ctx.has_P = (P_diag is not None, P_lowrank is not None)
        # an output that is a clamped input is returned as a new tensor (autograd's rule)
        return tuple(x.clone() if x is x_in else x for x, x_in in zip(out, xs))

    @staticmethod
    def backward(ctx, *grad_out: torch.Tensor | None):
        with autocast_as(ctx.autocast, ctx.saved_tensors[0]), calling(ctx.data):  # as forward
            return NeuronFunction._backward(ctx, list(grad_out))

    @staticmethod
    def _backward(ctx, grad_out: list[torch.Tensor | None]) -> tuple[torch.Tensor | None, ...]:
        config: NeuronConfig = ctx.config
        n = len(config.etas)
        saved = list(ctx.saved_tensors)
        x0s = saved[:n]
        rest = saved[n:]
        n_P = sum(ctx.has_P)
        weights = rest[:len(rest) - n_P]
        P_saved = iter(rest[len(rest) - n_P:])
        P_diag = next(P_saved) if ctx.has_P[0] else None
        P_lowrank = next(P_saved) if ctx.has_P[1] else None
        path, kernels = implementation(config.backend, x0s[0], config.package)
        precond_backward = precond.BACKWARD[config.precond]
        current = config.context == "current"
        legendre = config.dynamics == "legendre"
        sums = Sums()
        grads_x: list[torch.Tensor | None] = _zeros_for(grad_out, x0s)
        grads_w: list[torch.Tensor | None] = [None] * len(weights)
        grad_context = grad_P_diag = grad_P_lowrank = None

        def through_activations(act_saved: Any, vs: list[torch.Tensor],
                                xs: list[torch.Tensor]) -> None:
            """a_l += J_l v_l at the states xs, and the Lagrangians' parameters' parts."""
            nonlocal grads_x, grads_w
            # J v in the states' dtype: under autocast the energy's VJP may come in bfloat16,
            # and the Lagrangians' element-wise backward (a LayerNorm's centring) is where
            # autocast keeps float32
            vs = [v.to(x.dtype) for v, x in zip(vs, xs)]
            act = path._activation_backward(kernels, act_saved, *vs, *xs, *weights)
            grads_x = [sums.add(a, jv, x) for a, jv, x in zip(grads_x, act[:n], x0s)]
            grads_w = [sums.add(total, part, w)
                       for total, part, w in zip(grads_w, act[n:], weights)]

        for xs, gs, act_saved, saved_e, precond_saved, u0 in reversed(ctx.steps):
            grad_us = [None if fixed else -eta * a
                       for a, eta, fixed in zip(grads_x, config.etas, config.clamped)]
            if grad_us[0] is not None:
                grad_us[0], g_Pd, g_Pl = precond_backward(precond_saved, grad_us[0], u0,
                                                          P_diag, P_lowrank)
                grad_P_diag = sums.add(grad_P_diag, g_Pd)
                grad_P_lowrank = sums.add(grad_P_lowrank, g_Pl)
            if ctx.valid is not None:
                grad_us = [None if w is None else w * ctx.valid for w in grad_us]
            if legendre:
                grads_x = [sums.add(a, w) for a, w in zip(grads_x, grad_us)]
            if all(w is None for w in grad_us):
                continue  # every layer clamped: the step changes nothing
            seeds = _zeros_for(grad_us, gs)
            gbar = gs[0] if current else ctx.g0[0][0]
            out = path._grad_backward(kernels, saved_e, *seeds, gs[0], gbar, *gs[1:], *weights)
            g_first, g_bar, *rest_out = out
            g_further, parts = rest_out[:n - 1], rest_out[n - 1:]
            if current:
                g_first = sums.add(g_first, g_bar)
            else:
                grad_context = sums.add(grad_context, g_bar)
            grads_w = [sums.add(total, part, w) for total, part, w in zip(grads_w, parts, weights)]
            through_activations(act_saved, _zeros_for([g_first, *g_further], gs), xs)
        if grad_context is not None:  # context "input": gbar = g_1 at the input
            gs, act_saved = ctx.g0
            through_activations(act_saved, [grad_context, *map(torch.zeros_like, gs[1:])], x0s)
        ctx.steps = ctx.g0 = None
        return (None, None, *grads_x, *grads_w, grad_P_diag, grad_P_lowrank)


class NeuronLayer(EnergyLayer):
    """The Layer of a neuron model (a generated package that declares ``neurons``): its states,
    one per neuron layer, are what ``forward`` takes and returns; see the module docstring.

    Attributes besides :class:`EnergyLayer`'s: ``tau`` (each layer's time constant by name,
    the layer's step is eta / tau), ``neurons`` (the layers' names in order), ``dynamics``."""

    def _neuron_setup(self, tau: Mapping[str, float] | None) -> None:
        module = self._declared.module
        self.neurons = tuple(name for name, _, _ in module.NEURONS)
        self.dynamics = module.DYNAMICS
        self.terms = tuple(module.TERMS)
        self.tau = {name: t for name, _, t in module.NEURONS}
        if len(self.neurons) > 1 and self.config[2] != "identity":
            raise ValueError(f"argument precond: {self.config[2]!r} with several neuron layers "
                             f"({', '.join(self.neurons)}); a preconditioner acts on one state, "
                             f"and a model of several steps each layer by eta / tau (use "
                             f"precond='identity')")
        if tau is not None:
            if not isinstance(tau, Mapping):
                raise TypeError(f"argument tau: expected a dict of time constants by neuron layer "
                                f"({', '.join(self.neurons)}), got {type(tau).__name__}")
            for name, value in tau.items():
                if name not in self.tau:
                    raise ValueError(f"argument tau: no neuron layer {name!r} (the layers: "
                                     f"{', '.join(self.neurons)})")
                value = check_number(value, f"tau[{name!r}]")
                if not value > 0:
                    raise ValueError(f"argument tau[{name!r}]: expected a positive number, got "
                                     f"{value}")
                self.tau[name] = value

    def _dim_of(self, k: int) -> int:
        return getattr(self, self._declared.module.NEURONS[k][1])

    def _states(self, states: Sequence[Any], what: str = "forward") -> list[torch.Tensor]:
        """The call's states, checked: one per neuron layer, (batch, tokens, D_l) each, of the
        parameters' dtype and device, with the same batch and tokens."""
        n = len(self.neurons)
        if len(states) != n:
            raise TypeError(f"{what}() takes the states of the {n} neuron layer(s) "
                            f"({', '.join(self.neurons)}), in that order; got {len(states)}")
        params = self._params()
        out = []
        for k, (name, x) in enumerate(zip(self.neurons, states)):
            compute = autocast_dtype(x, params) if isinstance(x, torch.Tensor) else None
            check_input(name, x, self._dim_of(k), params, compute=compute)
            if params and compute is not None:
                x = x.to(params[0].dtype)
            if out and x.shape[:2] != out[0].shape[:2]:
                raise ValueError(f"argument {name}: expected the batch and tokens of "
                                 f"{self.neurons[0]} {tuple(out[0].shape[:2])}, got "
                                 f"{tuple(x.shape[:2])}")
            out.append(x)
        return out

    def _neuron_config(self, clamp: Any = ()) -> NeuronConfig:
        if isinstance(clamp, str):
            clamp = (clamp,)
        clamp = tuple(clamp or ())
        for name in clamp:
            if name not in self.neurons:
                raise ValueError(f"argument clamp: no neuron layer {name!r} (the layers: "
                                 f"{', '.join(self.neurons)})")
        eta, steps, kind, context, backend = self.config
        return NeuronConfig(eta, steps, kind, context, backend, self._declared.package,
                            self.dynamics, tuple(eta / self.tau[name] for name in self.neurons),
                            tuple(name in clamp for name in self.neurons))

    def _data(self, xs: list[torch.Tensor], sets: dict[str, Any]) -> CallData | None:
        return call_data(xs[0], self._declared.context_data, **sets)

    def forward(self, *states: torch.Tensor, clamp: Any = (), cu_seqlens: Any = None,
                document_ids: Any = None, lengths: Any = None,
                prefix: Any = None) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The states after the dynamics (``steps`` steps): one tensor (batch, tokens, D_l) per
        neuron layer in, in ``self.neurons``' order, and as many out (one tensor for a model of
        one layer). ``clamp``: the names of layers held fixed during the dynamics (an input
        given, a label to read). The context data keywords are ``EnergyLayer.forward``'s
        (documents, prefix, lengths: padded tokens are not updated)."""
        xs = self._states(states)
        data = self._data(xs, dict(cu_seqlens=cu_seqlens, document_ids=document_ids,
                                   lengths=lengths, prefix=prefix))
        params = self._params()
        out = NeuronFunction.apply(self._neuron_config(clamp), data, *xs, *params,
                                   *self._hypers(xs[0]), self.P_diag, self.P_lowrank)
        compute = autocast_dtype(states[0], params)  # under autocast, the output's dtype
        if compute is not None:
            out = tuple(y.to(compute) for y in out)
        return out[0] if len(out) == 1 else tuple(out)

    def activations(self, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each neuron layer's activation g_l = dL_l/dx_l at the given states (differentiable)."""
        xs = self._states(states, "activations")
        path, kernels = implementation("torch", xs[0], self._declared.package)
        *gs, _ = path._activation_forward(kernels, *xs, *self._params(), *self._hypers(xs[0]))
        return tuple(gs)

    def energies(self, *states: torch.Tensor, per_token: bool = False,
                 xbar: torch.Tensor | None = None, cu_seqlens: Any = None,
                 document_ids: Any = None, lengths: Any = None,
                 prefix: Any = None) -> dict[str, torch.Tensor]:
        """The energy at the given states, by term: each named term of E (or ``energy``),
        with "legendre" dynamics each layer's Legendre term ``legendre_<name>`` = x . g - L(x),
        and ``total``, their sum, the quantity the dynamics descend. Per batch element (or per
        token); differentiable. E's context role (where it reads ``gbar[j]``) is the first
        layer's activation at ``xbar`` (a state of that layer), held fixed; left out, at the
        state itself (gbar = g.detach()), as a step from these states reads it."""
        xs = self._states(states, "energies")
        if xbar is not None:  # the first layer's state in the context role, like it
            params = self._params()
            compute = autocast_dtype(xbar, params) if isinstance(xbar, torch.Tensor) else None
            check_input("xbar", xbar, self._dim_of(0), params, like=xs[0], compute=compute)
            xbar = xbar.to(xs[0].dtype)
        data = self._data(xs, dict(cu_seqlens=cu_seqlens, document_ids=document_ids,
                                   lengths=lengths, prefix=prefix))
        module = self._declared.module
        weights = (*self._params(), *self._hypers(xs[0]))
        with calling(data):
            gs = self.activations(*xs)
            gbar = gs[0] if xbar is None else self.activations(xbar, *xs[1:])[0]
            args = (gs[0], gbar.detach(), *gs[1:], *weights)
            if self.terms:
                values = dict(zip(self.terms, module._energy_terms(*args)))
            else:
                values = {"energy": module._energy(*args)}
            if self.dynamics == "legendre":
                Ls = module._lagrangians(*xs, *weights)
                Ls = Ls if isinstance(Ls, tuple) else (Ls,)
                for name, x, g, L in zip(self.neurons, xs, gs, Ls):
                    values[f"legendre_{name}"] = (x * g).sum(-1) - L
        if data is not None and data.valid is not None:
            mask = data.valid[:, :, 0]
            values = {k: v * mask.to(v.dtype) for k, v in values.items()}
        values["total"] = sum(values.values())
        return values if per_token else {k: v.sum(dim=1) for k, v in values.items()}

    def energy(self, *states: torch.Tensor, per_token: bool = False,
               **data: Any) -> torch.Tensor:  # type: ignore[override]
        """The total energy the dynamics descend (``energies(...)["total"]``)."""
        return self.energies(*states, per_token=per_token, **data)["total"]

    @torch.no_grad()
    def trace(self, *states: torch.Tensor, clamp: Any = (), **data: Any) -> list[dict[str, float]]:
        """The energy trace of ``forward``'s dynamics: for the input and after each step, each
        term's energy and the total (``energies``), summed over the batch, as floats; the
        dynamics of ``forward`` (same steps, clamps and data)."""
        xs = self._states(states, "trace")
        config = self._neuron_config(clamp)
        out: list[dict[str, float]] = []

        def record(xs: list[torch.Tensor]) -> None:
            values = self.energies(*xs, **data)
            out.append({k: float(v.sum()) for k, v in values.items()})

        cdata = self._data(xs, dict(data))
        valid = None if cdata is None or cdata.valid is None else cdata.valid.to(xs[0].dtype)
        with calling(cdata):
            path, kernels = implementation(config.backend, xs[0], config.package)
            run_dynamics(config, path, kernels, xs, (*self._params(), *self._hypers(xs[0])),
                         (self.P_diag, self.P_lowrank), valid, record=record)
        return out

    def decode(self, *args: Any, **kwargs: Any) -> Any:
        raise ValueError(self._declared.decode_unsupported)

    def extra_repr(self) -> str:
        taus = ", ".join(f"{k}={v:g}" for k, v in self.tau.items())
        return f"{super().extra_repr()}, dynamics={self.dynamics!r}, tau=({taus})"
