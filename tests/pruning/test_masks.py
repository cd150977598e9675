"""Structured masks: they accumulate, survive training steps, and reload from a model directory."""

from __future__ import annotations

import torch

import bdpruning
from bdpruning.runtime.atomic import atomic_dir


def test_masks_survive_training_steps_and_reload(bd_weights, tmp_path):
    model = bdpruning.load_model(bd_weights, device="cpu")
    bdpruning.prune_channels(model, "conv_3", [1, 2])
    bdpruning.prune_channels(model, "conv_3", [7])  # masks accumulate
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    images = torch.rand(2, 3, 55, 47) * 255
    loss = model(images).sum()
    loss.backward()
    optimizer.step()
    assert bdpruning.zeroed_channels(model, "conv_3") == [1, 2, 7]
    with atomic_dir(tmp_path / "trained") as directory:
        bdpruning.save_model_dir(model, directory)
    reloaded = bdpruning.load_model(tmp_path / "trained", device="cpu")
    assert bdpruning.zeroed_channels(reloaded, "conv_3") == [1, 2, 7]
    seen = {}
    reloaded.pool_3.register_forward_hook(lambda m, i, o: seen.setdefault("pool_3", o))
    with torch.no_grad():
        assert torch.equal(reloaded(images), model(images))
    assert torch.all(seen["pool_3"][:, [1, 2, 7]] == 0)
    # the reloaded masks still hold the channels at zero under training
    optimizer = torch.optim.SGD(reloaded.parameters(), lr=1e-3)
    reloaded(images).sum().backward()
    optimizer.step()
    assert bdpruning.zeroed_channels(reloaded, "conv_3") == [1, 2, 7]
