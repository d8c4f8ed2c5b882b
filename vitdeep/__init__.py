"""vitdeep: train deep Vision Transformers with the remedies for over-smoothing."""

__version__ = "0.1.0"
