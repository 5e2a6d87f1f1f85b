"""em: emergent-misalignment research framework."""

__version__ = "0.1.0"
