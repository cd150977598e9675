"""Architectures bdpruning knows by name, and the model record every model carries."""

from .deepid import DEEPID_INPUT_SHAPE, DeepID
from .record import INPUT_RANGES, OUTPUTS, ModelInfo, adopt, attach_info, model_expectations, model_info

__all__ = ["DeepID", "DEEPID_INPUT_SHAPE", "INPUT_RANGES", "OUTPUTS", "ModelInfo", "adopt", "attach_info",
           "model_expectations", "model_info"]
