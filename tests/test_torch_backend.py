"""Printing helpers of the torch backend."""

from energyc.backends.torch_backend import Emitter, _broadcast
from energyc.ir.graph import Graph


def test_broadcast_index():
    assert _broadcast("v", ("b", "i", "D"), ("b", "i", "D")) == "v"
    assert _broadcast("v", (), ("b", "i")) == "v"
    assert _broadcast("v", ("b", "i"), ("b", "i", "j", "D")) == "v[:, :, None, None]"
    assert _broadcast("v", ("i", "j"), ("b", "i", "j", "H")) == "v[None, :, :, None]"


def test_mask_of_a_pair_value_without_batch_is_the_mask_itself():
    """A (T, T) value needs the (T, T) mask as it is (this printed ``mask_causal[]`` before)."""
    em = Emitter(Graph(("D",)), {}, {})
    assert em.mask(("causal",), ("i", "j")) == "mask_causal"
    assert em.mask(("causal",), ("b", "i", "j", "D")) == "mask_causal[None, :, :, None]"
