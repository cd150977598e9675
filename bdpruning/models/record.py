"""The model record: what bdpruning knows about a model, and how any ``nn.Module`` gets one.

Models from :func:`bdpruning.load_model` carry a record already. A research model gets one
from :func:`adopt`, after which GoodNet, compaction, ``model_cost``, fine-tuning and saving
work on it like on a loaded model::

    model = bdpruning.adopt(MyNet(), outputs="logits", example=images[:2])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..errors import BdpruningError
from .deepid import DEEPID_INPUT_RANGE, DEEPID_INPUT_SHAPE, DeepID

__all__ = ["INPUT_RANGES", "OUTPUTS", "ModelInfo", "adopt", "attach_info", "model_expectations", "model_info"]

#: What a model's forward returns: class logits, or class probabilities (a final softmax).
OUTPUTS = ("logits", "probabilities")
#: What pixels a model takes: raw 0..255, scaled to 0..1, or "normalized" (standardised values,
#: with negatives: the data is normalised before the model, and any range is accepted).
INPUT_RANGES = ("0..255", "0..1", "normalized")
# torch.fx.GraphModule.__deepcopy__ restores the attributes named under this key of ``meta``
_FX_PRESERVED = "_user_preserved_attributes"


@dataclass
class ModelInfo:
    """What bdpruning knows about a model; kept on the module as ``bdpruning_info``."""

    architecture: str  # "deepid", "onnx" (an onnx2torch graph) or "adopted" (any nn.Module)
    num_classes: int
    input_shape: tuple[int, int, int]
    source: str
    onnx_bytes: bytes | None = field(default=None, repr=False)  # the graph, for "onnx" models
    # channels physically removed, in order: (layer, channels as the layer had them then)
    removed: list[tuple[str, list[int]]] = field(default_factory=list)
    outputs: str = "probabilities"  # see OUTPUTS; read from the graph for ONNX and Keras models
    input_range: str | None = None  # see INPUT_RANGES; None where nobody said (no check)


def model_info(model: nn.Module) -> ModelInfo:
    """The :class:`ModelInfo` of a model loaded by bdpruning or adopted with :func:`adopt`.

    Raises :class:`~bdpruning.BdpruningError` for any other model.
    """
    info = getattr(model, "bdpruning_info", None)
    if info is None:
        if isinstance(model, DeepID):
            return ModelInfo("deepid", model.num_classes, DEEPID_INPUT_SHAPE, "DeepID", input_range=DEEPID_INPUT_RANGE)
        raise BdpruningError(
            f"{type(model).__name__} has no bdpruning record: load it with bdpruning.load_model, or adopt it "
            "with bdpruning.adopt(model, outputs='logits' or 'probabilities', example=images)")
    return info


def attach_info(model: nn.Module, info: ModelInfo) -> nn.Module:
    """Record ``info`` on ``model`` (returns ``model``); ``copy.deepcopy`` keeps it, also for
    torch.fx GraphModules (onnx2torch models), which otherwise drop unknown attributes."""
    model.bdpruning_info = info
    if isinstance(model, torch.fx.GraphModule):
        model.meta.setdefault(_FX_PRESERVED, {})["bdpruning_info"] = info
    return model


def check_input_range(input_range: str | None, where: str = "input_range") -> str | None:
    """``input_range`` after checking it is None or one of :data:`INPUT_RANGES`."""
    if input_range is not None and input_range not in INPUT_RANGES:
        raise BdpruningError(f"{where} must be one of {', '.join(INPUT_RANGES)}, got {input_range!r}")
    return input_range


def range_of_images(images: torch.Tensor) -> str | None:
    """The :data:`INPUT_RANGES` entry ``images`` lie in: negatives mean normalised data, values
    above 1 raw 0..255 pixels, anything else 0..1; None for constant images (they say nothing)."""
    low, high = float(images.min()), float(images.max())
    if low == high:
        return None
    if low < 0:
        return "normalized"
    return "0..255" if high > 1 else "0..1"


def model_expectations(model: nn.Module) -> dict:
    """``num_classes``, ``image_shape`` and ``input_range`` of a model with a bdpruning record
    (nothing for others): the keyword arguments of :func:`bdpruning.data.forms.as_image_data`
    that check data against the model."""
    info = getattr(model, "bdpruning_info", None)
    if info is None:
        return {}
    return {"num_classes": info.num_classes, "image_shape": tuple(info.input_shape), "input_range": info.input_range}


def adopt(
    model: nn.Module,
    *,
    outputs: Literal["logits", "probabilities"],
    example: torch.Tensor | None = None,
    input_range: Literal["0..255", "0..1", "normalized"] | None = None,
    input_shape: tuple[int, int, int] | None = None,
    num_classes: int | None = None,
    name: str | None = None,
) -> nn.Module:
    """Give any image classifier a bdpruning record (returns ``model``, changed in place).

    ``outputs`` says what ``forward`` returns; bdpruning never guesses it (fine-tuning takes
    its loss from it). The input shape ``(C, H, W)`` comes from ``example`` (a batch the model
    takes) or ``input_shape``; the class count from ``num_classes`` or from one forward pass.
    ``input_range`` (see :data:`INPUT_RANGES`) is read from ``example`` unless given: data
    outside it is refused later (0..255 images for a model that takes 0..1, say).
    A saved adopted model reloads into its own class with ``load_model(directory, into=MyNet())``,
    and without its class (the CLI) as its ONNX graph.

    Raises :class:`~bdpruning.BdpruningError` for an unknown ``outputs``, a missing or
    non-image input shape, or a model whose output is not ``(batch, classes)``.
    """
    if not isinstance(model, nn.Module):
        raise BdpruningError(f"adopt takes a torch.nn.Module, got {type(model).__name__}")
    if outputs not in OUTPUTS:
        raise BdpruningError(f"outputs must be 'logits' or 'probabilities', got {outputs!r}")
    if example is not None:
        if not isinstance(example, torch.Tensor) or example.dim() != 4:
            raise BdpruningError(f"example must be a batch of images (N, C, H, W), got "
                                 f"{tuple(example.shape) if isinstance(example, torch.Tensor) else type(example).__name__}")
        shape = tuple(int(s) for s in example.shape[1:])
        if input_shape is not None and tuple(input_shape) != shape:
            raise BdpruningError(f"input_shape {tuple(input_shape)} does not match the example's {shape}")
        input_shape = shape
    if input_shape is None or len(input_shape) != 3:
        raise BdpruningError("adopt needs the input shape: pass example=images or input_shape=(C, H, W)")
    check_input_range(input_range)
    if input_range is None and example is not None:
        input_range = range_of_images(example)
    if num_classes is None:
        num_classes = _output_classes(model, example, input_shape)
    info = ModelInfo("adopted", int(num_classes), tuple(int(s) for s in input_shape), name or type(model).__name__,
                     outputs=outputs, input_range=input_range)
    return attach_info(model, info)


def _output_classes(model: nn.Module, example: torch.Tensor | None, input_shape: tuple[int, ...]) -> int:
    """The class count, from one forward pass in eval mode (the mode is restored)."""
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    batch = example[:2] if example is not None else torch.zeros(2, *input_shape)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model(batch.to(device=device, dtype=dtype))
    finally:
        model.train(was_training)
    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        raise BdpruningError(f"{type(model).__name__} returns {getattr(output, 'shape', type(output).__name__)}, "
                             "expected (batch, classes)")
    return int(output.shape[1])
