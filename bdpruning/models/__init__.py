"""Architectures bdpruning knows by name, and the model record every model carries."""

from .deepid import DEEPID_INPUT_SHAPE, DeepID
from .record import OUTPUTS, ModelInfo, adopt, attach_info, model_info

__all__ = ["DeepID", "DEEPID_INPUT_SHAPE", "OUTPUTS", "ModelInfo", "adopt", "attach_info", "model_info"]
