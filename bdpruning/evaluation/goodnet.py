"""GoodNet: a backdoored net B and its repair B' side by side, flagging where they disagree.

Where B and B' agree on the top-1 class, GoodNet gives that class; where they disagree it gives
the extra label N (the number of classes, 1283 for the face net): the input is flagged as
poisoned. This is the CSAW-HackML Lab-3 detector, as a plain ``nn.Module``::

    goodnet = GoodNet(load_model("bd_net.h5"), load_model("repaired_2pct"))
    labels = goodnet(images)              # int64, N where flagged
    bd_probs, repaired_probs = goodnet.outputs(images)
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..errors import BdpruningError
from ..models.onnx_graph import export_onnx
from ..models import model_info

__all__ = ["GoodNet", "goodnet_labels", "export_goodnet_onnx"]


def goodnet_labels(bd_labels: torch.Tensor, repaired_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The GoodNet rule on top-1 labels: B's label where B and B' agree, ``num_classes`` elsewhere."""
    return torch.where(bd_labels == repaired_labels, bd_labels, torch.full_like(bd_labels, num_classes))


class GoodNet(nn.Module):
    """B and B' (same classes, same input shape) combined; ``forward`` returns int64 labels.

    Both models come from :func:`bdpruning.load_model`, are adopted (:func:`bdpruning.adopt`) or
    are :class:`~bdpruning.DeepID`; a pair with different class counts, input shapes or recorded
    input ranges is refused with a one-line error.
    """

    def __init__(self, bd: nn.Module, repaired: nn.Module) -> None:
        super().__init__()
        bd_info, repaired_info = model_info(bd), model_info(repaired)
        for what, a, b in (
            ("classes", bd_info.num_classes, repaired_info.num_classes),
            ("input shape", tuple(bd_info.input_shape), tuple(repaired_info.input_shape)),
            ("input range", bd_info.input_range, repaired_info.input_range),
        ):
            if a != b and None not in (a, b):
                raise BdpruningError(
                    f"B and B' do not match: {bd_info.source} has {what} {a}, "
                    f"{repaired_info.source} has {what} {b}"
                )
        self.bd = bd
        self.repaired = repaired
        self.num_classes = bd_info.num_classes
        self.input_shape = tuple(bd_info.input_shape)

    def outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The outputs of B and of B' (probabilities or logits, as each returns: only their top-1
        labels count) on float (N, C, H, W) images in the models' input range."""
        return self.bd(images), self.repaired(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        bd_probs, repaired_probs = self.outputs(images)
        return goodnet_labels(bd_probs.argmax(dim=1), repaired_probs.argmax(dim=1), self.num_classes)


def export_goodnet_onnx(goodnet: GoodNet, path: str | os.PathLike[str]) -> None:
    """Export GoodNet as one ONNX graph: input ``input`` (batch, C, H, W) float, int64 labels out."""
    export_onnx(goodnet, path, goodnet.input_shape)
