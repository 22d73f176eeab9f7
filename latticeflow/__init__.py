"""latticeflow: normalizing-flow samplers for lattice field theories."""

__version__ = "0.1.0"
