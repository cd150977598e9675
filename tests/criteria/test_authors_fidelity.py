"""ANP and RNP against their authors' code: ANP's signed noise step, RNP's alpha, pruning that
keeps the shift (with the sweep exact), and a minimal authors'-style ANP loop, written here from
csdongxian/ANP_backdoor's ``optimize_mask_cifar.py``, giving bdpruning's masks."""

from __future__ import annotations

import copy
import functools
import logging

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DistributedSampler

import bdpruning
from bdpruning.criteria import ANP, RNP
from bdpruning.criteria.anp import anp_optimizers, perturb_adversarially
from bdpruning.criteria.channel_masks import ChannelMasks
from bdpruning.criteria.rnp import recovery_loss
from bdpruning.evaluation.predict import predict_labels
from bdpruning.pruning.finetuning import finetune_loss
from bdpruning.sweep.masked import masked_sweep_predictions

CPU = {"accelerator": "cpu", "progress": False}


@pytest.fixture(autouse=True)
def quiet_lightning():
    for name in ("pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


class TinyBN(nn.Module):
    """Two conv-BatchNorm-ReLU blocks and a linear head (logits), 3 x 6 x 6 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean(dim=(2, 3)))


def tiny_bn(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    model = TinyBN().to(dtype)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            n = bn.num_features
            bn.running_mean.copy_(torch.rand(n, generator=generator, dtype=dtype) - 0.5)
            bn.running_var.copy_(torch.rand(n, generator=generator, dtype=dtype) + 0.5)
            bn.weight.copy_(torch.rand(n, generator=generator, dtype=dtype) + 0.5)
            bn.bias.copy_(torch.rand(n, generator=generator, dtype=dtype) - 0.5)
    return bdpruning.adopt(model.eval(), outputs="logits", example=torch.zeros(1, 3, 6, 6, dtype=dtype))


def tiny_data(count: int = 64, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    images = torch.rand(count, 3, 6, 6, generator=generator, dtype=dtype) * 4 - 2
    return images, torch.arange(count) % 3


def test_one_signed_anp_step_from_zero_puts_every_perturbation_at_plus_or_minus_eps():
    model, (images, labels) = tiny_bn(), tiny_data()
    masks = ChannelMasks(model.train(), noise=True)
    eps = 0.4
    _, noise_optimizer = anp_optimizers(masks, eps=eps, steps=1, mask_lr=0.2)
    masks.perturbed = True
    noise_optimizer.zero_grad()
    (-finetune_loss(model, images, labels)).backward()
    masks.sign_noise_gradients()
    noise_optimizer.step()
    values = torch.cat([p.detach() for p in masks.noise_parameters()])
    assert torch.equal(values.abs(), torch.full_like(values, eps))


def test_anp_perturbation_moves_each_value_by_exactly_eps_from_its_random_start():
    model, (images, labels) = tiny_bn(), tiny_data()
    masks = ChannelMasks(model.train(), noise=True)
    eps = 0.3
    _, noise_optimizer = anp_optimizers(masks, eps=eps, steps=1, mask_lr=0.2)
    masks.reset_noise(eps, torch.Generator().manual_seed(5))
    start = torch.cat([p.detach().clone() for p in masks.noise_parameters()])
    perturb_adversarially(model, masks, images, labels, eps, 1, noise_optimizer, torch.Generator().manual_seed(5))
    moved = torch.cat([p.detach() for p in masks.noise_parameters()]) - start
    torch.testing.assert_close(moved.abs(), torch.full_like(moved, eps), rtol=0, atol=1e-12)
    assert start.abs().max() <= eps and (start + moved).abs().max() > eps  # the authors do not clip


def test_rnp_recovery_gradient_is_alpha_times_the_plain_loss_gradient():
    model, (images, labels) = tiny_bn(), tiny_data()
    masks = ChannelMasks(model.train())
    gradients = []
    for loss in (recovery_loss(model, images, labels, alpha=0.2)[0], finetune_loss(model, images, labels)):
        grads = torch.autograd.grad(loss, masks.mask_parameters())
        gradients.append(torch.cat(grads))
    torch.testing.assert_close(gradients[0], 0.2 * gradients[1], rtol=1e-12, atol=0)
    assert gradients[1].abs().min() > 0


@pytest.mark.parametrize("criterion", [ANP(), RNP()])
def test_learned_masks_prune_as_the_authors_keeping_the_shift(criterion):
    assert criterion.keep_shift
    model = tiny_bn()
    bdpruning.prune_channels(model, "conv1", [1, 3], keep_shift=True)
    captured = {}
    model.bn1.register_forward_hook(lambda m, i, o: captured.update(bn1=o))
    model(tiny_data(8)[0])
    beta = model.bn1.bias_orig if hasattr(model.bn1, "bias_orig") else model.bn1.bias
    for channel in (1, 3):
        assert torch.equal(captured["bn1"][:, channel], beta[channel].detach().expand_as(captured["bn1"][:, channel]))
        assert beta[channel] != 0
    assert bdpruning.pruning.masks.shift_kept_layers(model) == ["conv1"]


def test_a_model_whose_pruned_channels_keep_their_shift_reloads_the_same(tmp_path):
    model = tiny_bn(torch.float32)
    bdpruning.prune_channels(model, "conv2", [0, 4], keep_shift=True)
    bdpruning.save_model_dir(model, tmp_path / "b")
    reloaded = bdpruning.load_model(tmp_path / "b", into=TinyBN())
    images = tiny_data(16, torch.float32)[0]
    assert torch.equal(reloaded(images), model(images))
    assert bdpruning.pruning.masks.shift_kept_layers(reloaded) == ["conv2"]


def test_the_masked_sweep_is_exact_when_pruned_channels_keep_their_shift():
    """Float64: the sweep's labels equal the pruned model's at every step, and differ from the
    labels of pruning with the shift zeroed (so the test can fail)."""
    model = tiny_bn()
    with torch.no_grad():
        model.head.weight.mul_(20)
    images, labels = tiny_data(60)
    order = [("conv1", 2), ("conv2", 1), ("conv1", 0), ("conv2", 4), ("conv2", 0), ("conv1", 3)]
    naive, zeroed = [], []
    for k in range(len(order) + 1):
        for keep, rows in ((True, naive), (False, zeroed)):
            pruned = copy.deepcopy(model)
            for layer, channel in order[:k]:
                bdpruning.prune_channels(pruned, layer, [channel], keep_shift=keep)
            rows.append(predict_labels(pruned, (images, labels)))
    naive = torch.stack(naive)
    assert torch.equal(masked_sweep_predictions(model, (images, labels), order, batch_size=16, keep_shift=True),
                       naive)
    assert torch.equal(masked_sweep_predictions(model, (images, labels), order, [0, 3, 6], keep_shift=True),
                       naive[[0, 3, 6]])
    assert not torch.equal(naive, torch.stack(zeroed))


def _authors_anp_masks(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, iterations: int,
                       batch_size: int, eps: float, alpha: float, lr: float, seed: int) -> list[torch.Tensor]:
    """``optimize_mask_cifar.py``'s ``mask_train`` with ``NoisyBatchNorm2d`` (``models/anp_batchnorm.py``):
    each BatchNorm computes with weight x (mask + noise) and bias x (1 + noise_bias) when perturbed.
    The random starts come from the generator bdpruning uses (noises, then noise biases, layer by
    layer), and the batches in the order of a seeded ``DistributedSampler``, so both see the same."""
    model = copy.deepcopy(model).train()
    model.requires_grad_(False)
    bns = [model.bn1, model.bn2]
    like = dict(dtype=images.dtype)
    mask = [torch.ones(bn.num_features, **like, requires_grad=True) for bn in bns]
    noise = [torch.zeros(bn.num_features, **like, requires_grad=True) for bn in bns]
    noise_bias = [torch.zeros(bn.num_features, **like, requires_grad=True) for bn in bns]
    state = {"perturbed": False}

    def noisy_forward(index: int, bn: nn.BatchNorm2d):
        def forward(x):
            if state["perturbed"]:
                weight, bias = mask[index] + noise[index], 1.0 + noise_bias[index]
            else:
                weight, bias = mask[index], 1.0
            return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight * weight, bn.bias * bias, True,
                                bn.momentum, bn.eps)
        return forward

    for index, bn in enumerate(bns):
        bn.forward = noisy_forward(index, bn)
    mask_opt = torch.optim.SGD(mask, lr=lr, momentum=0.9)
    noise_opt = torch.optim.SGD(noise + noise_bias, lr=eps / 1)
    generator = torch.Generator().manual_seed(seed)
    sampler = DistributedSampler(range(len(images)), num_replicas=1, rank=0, shuffle=True, seed=seed)
    done, epoch = 0, 0
    while done < iterations:
        sampler.set_epoch(epoch)
        order = list(sampler)
        for start in range(0, len(order), batch_size):
            batch = torch.tensor(order[start:start + batch_size])
            x, y = images[batch], labels[batch]
            with torch.no_grad():  # reset(rand_init=True): uniform in [-eps, eps]
                for p in noise + noise_bias:
                    p.copy_(torch.rand(p.shape, generator=generator, dtype=p.dtype) * 2 * eps - eps)
            noise_opt.zero_grad()
            state["perturbed"] = True
            (-F.cross_entropy(model(x), y)).backward()
            for p in noise + noise_bias:  # sign_grad
                p.grad = torch.sign(p.grad)
            noise_opt.step()
            mask_opt.zero_grad()
            state["perturbed"] = True
            loss_rob = F.cross_entropy(model(x), y)
            state["perturbed"] = False
            loss_nat = F.cross_entropy(model(x), y)
            (alpha * loss_nat + (1 - alpha) * loss_rob).backward()
            mask_opt.step()
            with torch.no_grad():  # clip_mask
                for p in mask:
                    p.clamp_(0, 1)
            done += 1
            if done == iterations:
                break
        epoch += 1
    return [m.detach() for m in mask]


def test_bdprunings_anp_learns_the_masks_of_an_authors_style_loop():
    model, (images, labels) = tiny_bn(), tiny_data(64)
    settings = dict(iterations=12, batch_size=16, eps=0.4, alpha=0.2, seed=3)
    scores = ANP(images=None, mask_lr=0.2, trainer_options=CPU, **settings).score(model, (images, labels))
    expected = _authors_anp_masks(model, images, labels, lr=0.2, **settings)
    for layer, values in zip(["conv1", "conv2"], expected):
        torch.testing.assert_close(torch.tensor(scores.scores[layer], dtype=torch.float64), values,
                                   rtol=0, atol=1e-9)
    assert min(min(v) for v in scores.scores.values()) < 0.95  # the masks moved


def test_clp_covers_batchnorm_layers_only_unless_extended_and_warns_on_a_net_without_any(caplog):
    from helpers.planted import planted_net

    from bdpruning.criteria import CLP

    assert list(CLP(u=0).score(tiny_bn()).scores) == ["conv1", "conv2"]
    with caplog.at_level(logging.WARNING, logger="bdpruning.criteria.clp"):
        scores = CLP().score(planted_net())
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert scores.selected == 0 and scores.order == [] and len(warnings) == 1
    assert "no conv layer is followed by a BatchNorm" in warnings[0].getMessage()
    assert CLP(convs_without_batchnorm=True).score(planted_net()).selection() == {"features": [0]}


def test_an_rnp_unlearning_that_ends_at_chance_warns(caplog):
    model = tiny_bn()  # 3 classes: chance is 33 %
    with caplog.at_level(logging.WARNING, logger="bdpruning.criteria.rnp"):
        RNP(stop_accuracy=0.6)._check_unlearning([0.9, 0.55], model)  # stopped, above chance
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        RNP(stop_accuracy=0.6)._check_unlearning([0.9, 0.3], model)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "unlearning ended at chance" in warnings[0].getMessage()
