"""Layers generated from examples/ by `energyc compile examples/` (checked in; do not edit)."""
