"""Architectures bdpruning knows by name."""

from .deepid import DEEPID_INPUT_SHAPE, DeepID

__all__ = ["DeepID", "DEEPID_INPUT_SHAPE"]
