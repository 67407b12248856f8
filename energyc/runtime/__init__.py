"""The runtime every generated package shares (``from energyc import runtime as _rt``).

Generated packages hold only what depends on their energy (declarations, the step functions, a
``Layer`` declared on ``EnergyLayer``, and the energy's own Triton kernels); everything else they call is here, written once, one
subject per module:

* ``version``: the runtime version a package needs, checked at its import (``require``);
* ``tables``: constant tables built once per size, dtype and device (``_cached``);
* ``masks``: context sets as dense (T, T) masks and offsets i - j, and the log-sum-exp over a
  context set that autograd differentiates (a generated ``_energy``'s);
* ``positions``: rotary embeddings, ALiBi slopes;
* ``attention``: the torch kernels of a fused context reduction (``attention_forward``,
  ``attention_backward``, ``attention_transposed``: the CPU flash kernels, the masked blocks of
  ``flash_cpu``, a chunked fallback, kept weights), with the interface of ``kernels``;
* ``kernels``: the interface every backend's attention kernels implement;
* ``pairs``: the block-sparse pair reductions (``pair_lse``, ``pair_sums``, ...) over the tiles
  a context set (``energyc.context``) reaches, and its mask tiles;
* ``gemm``: two-operand contractions as one GEMM (``contract``, ``contract_add``);
* ``elementwise``: helpers of generated bodies (``mul_affine_``);
* ``layer``: the Layer every generated package declares (``EnergyLayer``: construction from the
  package's declarations, forward, energy, decode) and the autograd Function of its step loop
  (``LayerFunction``); the step settings are checked by ``energyc.settings``;
* ``neurons``: the Layer of a neuron model (``NeuronLayer``: states per neuron layer, the
  energy trace) and the autograd Function of its dynamics (``NeuronFunction``);
* ``precond``: the preconditioners P (identity, diagonal, dplr) and their VJPs;
* ``arguments``: a layer's argument checks (dims, hyperparameters, dtype, device, inputs);
* ``backends``: which implementation runs (``implementation``, ``preload``);
* ``autocast``: what a layer computes in under torch.autocast;
* ``steps``: a layer's ``forward`` and ``energy`` calls (``apply_layer``, ``energy_inputs``)
  and the running sums of its backward (``Sums``);
* ``decode``: incremental decoding (``decode_layer``, ``extend``, ``DecodeCache``).

The Triton path's shared pieces are separate modules, imported only when that path is used:
``energyc.runtime.triton_layer`` (the launchers of generated element-wise and reduction kernels,
the kernels' context test and block ranges, interpreter helpers), ``energyc.runtime.triton_attention`` (the flash
kernels of fused context reductions), ``energyc.runtime.triton_pairs`` and
``energyc.runtime.triton_math``. Importing this package needs torch alone: no triton, and none
of the compiler (sympy, networkx, jinja2).
"""

from __future__ import annotations

from energyc.runtime.arguments import (
    as_scalar,
    check_dim,
    check_input,
    factory,
    hyper_value,
)
from energyc.runtime.attention import (
    FLASH_BACKWARD_MAX_LSE,
    QUERY_CHUNK,
    attention_backward,
    attention_forward,
    attention_transposed,
    probs_fit,
)
from energyc.runtime.autocast import (
    AUTOCAST_DTYPES,
    autocast_as,
    autocast_dtype,
    autocast_off,
    autocast_state,
)
from energyc.runtime.backends import implementation, preload
from energyc.runtime.decode import DecodeCache, decode_layer, extend
from energyc.runtime.elementwise import mul_affine_
from energyc.runtime.gemm import contract, contract_add
from energyc.runtime.layer import EnergyLayer, LayerFunction, StepConfig
from energyc.runtime.masks import (
    context_mask,
    masked_logsumexp,
    shared_mask,
    token_offset,
    token_position,
)
from energyc.runtime.neurons import NeuronConfig, NeuronFunction, NeuronLayer
from energyc.runtime.pairs import pair_lse, pair_softmax_sums, pair_sums, pair_tiles, running_sum
from energyc.runtime.positions import alibi_slopes_, rotary
from energyc.runtime.precond import INVERSE_SOFTPLUS_ONE
from energyc.runtime.steps import Sums, apply_layer, energy_inputs
from energyc.runtime.version import RUNTIME_VERSION, require

__all__ = [
    # version
    "RUNTIME_VERSION", "require",
    # constants
    "INVERSE_SOFTPLUS_ONE",
    # context sets, positions
    "context_mask", "masked_logsumexp", "shared_mask", "token_offset", "token_position", "alibi_slopes_", "rotary",
    # kernels
    "attention_backward", "attention_forward", "attention_transposed", "probs_fit",
    "FLASH_BACKWARD_MAX_LSE", "QUERY_CHUNK",
    "pair_lse", "pair_softmax_sums", "pair_sums", "pair_tiles", "running_sum",
    "contract", "contract_add", "mul_affine_",
    # the layer's plumbing
    "EnergyLayer", "LayerFunction", "StepConfig", "NeuronLayer", "NeuronFunction", "NeuronConfig",
    "as_scalar", "check_dim", "check_input", "factory",
    "hyper_value", "implementation", "preload",
    "AUTOCAST_DTYPES", "autocast_as", "autocast_dtype", "autocast_off", "autocast_state",
    "Sums", "apply_layer", "energy_inputs",
    "DecodeCache", "decode_layer", "extend",
]
