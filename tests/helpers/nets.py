"""Small nets the tests prune, and the one BatchNorm randomizer."""

from __future__ import annotations

import torch
from torch import nn


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial statistics, scales and shifts in every BatchNorm of ``model`` (an untrained
    net's are 0, 1, 1 and 0), seeded; ``model`` in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.rand(n, generator=generator) * 2 - 1)
                module.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
                module.bias.copy_(torch.rand(n, generator=generator) * 2 - 1)
    return model.eval()


class BatchNormCNN(nn.Module):
    """Conv-BatchNorm-ReLU-MaxPool twice, then a linear layer: a small research CNN (16 x 16 input)."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(12 * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        return self.fc(x.flatten(1))


class HalfBatchNormNet(nn.Module):
    """Two convs, only the first followed by a BatchNorm; pixels 0..255, three classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 6, 3)
        self.bn_a = nn.BatchNorm2d(6)
        self.conv_b = nn.Conv2d(6, 5, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn_a(self.conv_a(x / 255)))
        x = torch.relu(self.conv_b(x))
        return self.head(torch.flatten(self.pool(x), 1))


def half_batchnorm_net() -> HalfBatchNormNet:
    """A seeded :class:`HalfBatchNormNet` with a randomized BatchNorm, in eval mode."""
    torch.manual_seed(0)
    return randomize_batchnorm(HalfBatchNormNet())


class SkipNet(nn.Module):
    """A small non-DeepID CNN: BatchNorm after the pruned conv and a skip connection around it;
    five classes, probabilities out."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x / 64 - 2))
        x = torch.relu(self.bn(self.block(x)) + x)
        return self.head(torch.flatten(self.pool(x), 1)).softmax(dim=1)


class FixedView(nn.Module):
    """conv (3 -> 4 channels, 3x3) then a linear layer behind ``.view(-1, features)``: a reshape
    to a fixed size, which removing channels must rewrite (or refuse)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.features = features
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(features, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).view(-1, self.features))


class Block(nn.Module):
    """Conv (3x3, padded) -> ReLU -> MaxPool(2)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.relu(self.conv(x)))


class IntNet(nn.Module):
    """Integer weights on integer pixels and logits out: every value is an exact float32 integer,
    so results cannot depend on batching or summation order (48 x 40 input)."""

    def __init__(self, classes: int = 4, seed: int = 0) -> None:
        super().__init__()
        self.block1, self.block2, self.block3 = Block(3, 4), Block(4, 6), Block(6, 6)
        self.head = nn.Linear(6 * 6 * 5, classes)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randint(-2, 3, parameter.shape, generator=generator))
            self.block2.conv.bias.add_(40)  # most block-2 channels fire, not all

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(torch.floor(x / 16))))
        return self.head(torch.flatten(x, 1))


SMALL_DEEPID_PRUNED = [0, 5, 7, 11, 30]  # conv_3 channels pruned in :func:`small_deepid`


def small_deepid(seed: int = 0, pruned: list[int] = SMALL_DEEPID_PRUNED) -> nn.Module:
    """A random-init 10-class DeepID with ``pruned`` conv_3 channels masked (global RNG untouched)."""
    from bdpruning import DeepID, prune_channels

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DeepID(num_classes=10)
    return prune_channels(model, "conv_3", pruned) if pruned else model
