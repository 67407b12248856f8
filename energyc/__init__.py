"""energyc: compile energy functions into Transformer layers (descent steps on the energy)."""

__version__ = "0.3.0"
