"""A small BadNet with its backdoor planted by construction, for the criteria tests.

Images are 3 x 6 x 6 in 0..255, four classes from two bits: image channel 1 is bright or dark
(bit 1), channel 2 likewise (bit 2); image channel 0 is clean background in 60..110. The
trigger is a 2 x 2 patch of 255 in image channel 0, target class 0.

``PlantedNet``: a 1x1 conv ``features`` (16 channels) -> ReLU -> global average -> ``head``
-> softmax. Channels 1..15 read the two bits with small kernels (norms 0.010..0.017) and the
head separates the classes by a few logits. Channel 0 is the backdoor: kernel (1, 0, 0), bias
-100, so it is zero on clean pixels below 100, small on the rest (about 1 on average), and about
18 on a triggered image; it adds its value to class 0's logit. So clean accuracy and ASR are
both 100 %, and with channel 0 pruned the ASR is 0 % (the poisoned images come from the other
classes).
"""

from __future__ import annotations

import torch
from torch import nn

TARGET = 0
CLASSES = 4
BACKDOOR = 0  # the planted channel of ``features``


class PlantedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 16, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(16, CLASSES)
        with torch.no_grad():
            self.features.weight.zero_()
            self.features.bias.zero_()
            self.head.weight.zero_()
            self.head.bias.zero_()
            self.features.weight[0, 0] = 1.0
            self.features.bias[0] = -100.0
            self.head.weight[TARGET, 0] = 1.0
            for channel in range(1, 16):  # (image channel, sign, scale): relu(scale * sign * (x - 80))
                image_channel, sign = 1 + (channel - 1) % 4 // 2, 1 - 2 * ((channel - 1) % 2)
                scale = 0.010 + 0.0005 * channel
                self.features.weight[channel, image_channel] = sign * scale
                self.features.bias[channel] = -sign * scale * 80
                bit = image_channel - 1
                for label in range(CLASSES):  # +K per unit of the right side of 80 for this bit, -K else
                    wanted = 1 if (label >> bit) & 1 else -1
                    self.head.weight[label, channel] = 0.02 / scale * wanted * sign

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.features(x))
        return self.head(torch.flatten(self.pool(x), 1)).softmax(dim=1)


def planted_data(count: int, seed: int, poisoned: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` clean images with their labels, or the same images triggered, labelled TARGET."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % CLASSES
    images = torch.empty(count, 3, 6, 6)
    images[:, 0] = 60 + 50 * torch.rand(count, 6, 6, generator=generator)
    for bit in (0, 1):
        bright = ((labels >> bit) & 1).view(-1, 1, 1).float()
        images[:, 1 + bit] = 50 + 60 * bright + 20 * torch.rand(count, 6, 6, generator=generator) - 10
    if poisoned:  # from the other classes only
        images, labels = images[labels != TARGET], labels[labels != TARGET]
        images[:, 0, :2, :2] = 255
        labels = torch.full((len(labels),), TARGET)
    return images, labels


def planted_net() -> nn.Module:
    """A :class:`PlantedNet` in eval mode, adopted by bdpruning (its outputs are probabilities)."""
    import bdpruning

    return bdpruning.adopt(PlantedNet().eval(), outputs="probabilities", example=torch.zeros(1, 3, 6, 6))
