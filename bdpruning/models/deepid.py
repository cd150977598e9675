"""DeepID, the face-recognition BadNet architecture of CSAW-HackML Lab 3, as one readable module.

Layers carry their Keras names (``conv_1`` ... ``output``) so hooks and pruning address them as
the course does. Input: float (N, 3, 55, 47) in raw 0..255; output: softmax probabilities, as
the Keras model's ``output`` layer. Keras fuses ReLU into ``conv_*``; here the ReLUs are applied
in ``forward``, so ``pool_3`` sees the same values as in Keras.

Keras flattens NHWC tensors; this module flattens NCHW. The loaders permute the ``fc_1`` and
``fc_2`` weight columns accordingly (:func:`bdpruning.models.keras_h5.deepid_state_dict`), so both
compute the same function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DeepID", "DEEPID_INPUT_RANGE", "DEEPID_INPUT_SHAPE"]

#: (channels, height, width) of the images DeepID takes.
DEEPID_INPUT_SHAPE = (3, 55, 47)
#: The Lab-3 DeepID takes raw pixels, 0..255 (see :data:`bdpruning.models.INPUT_RANGES`).
DEEPID_INPUT_RANGE = "0..255"


class DeepID(nn.Module):
    """DeepID with two branches from ``pool_3`` (``fc_1`` and ``conv_4 -> fc_2``), added."""

    def __init__(self, num_classes: int = 1283) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.conv_1 = nn.Conv2d(3, 20, kernel_size=4)
        self.pool_1 = nn.MaxPool2d(2)
        self.conv_2 = nn.Conv2d(20, 40, kernel_size=3)
        self.pool_2 = nn.MaxPool2d(2)
        self.conv_3 = nn.Conv2d(40, 60, kernel_size=3)
        self.pool_3 = nn.MaxPool2d(2)
        self.flatten_1 = nn.Flatten()
        self.fc_1 = nn.Linear(60 * 5 * 4, 160)
        self.conv_4 = nn.Conv2d(60, 80, kernel_size=2)
        self.flatten_2 = nn.Flatten()
        self.fc_2 = nn.Linear(80 * 4 * 3, 160)
        self.output = nn.Linear(160, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool_1(F.relu(self.conv_1(x)))
        x = self.pool_2(F.relu(self.conv_2(x)))
        features = self.pool_3(F.relu(self.conv_3(x)))
        branch_1 = self.fc_1(self.flatten_1(features))
        branch_2 = self.fc_2(self.flatten_2(F.relu(self.conv_4(features))))
        hidden = F.relu(branch_1 + branch_2)
        return F.softmax(self.output(hidden), dim=1)
