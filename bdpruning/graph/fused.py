"""Fast inference forms of a model: the same function, computed with fused convolutions in
the channels-last layout.

A profile of the DeepID forward on CPU (2 threads, batch 256) shows where NCHW PyTorch loses to
Keras: the oneDNN convolutions in NCHW, then ReLU as a separate pass over each convolution's
output, then NCHW max-pooling. Keras runs oneDNN in NHWC with ReLU fused into the convolution.
:func:`inference_module` does the same in PyTorch without changing the model:

- on CPU, a ``Conv2d`` whose only user is a ReLU runs as one oneDNN convolution with a ReLU
  post-op (``torch.ops.mkldnn._convolution_pointwise``, the kernel torch.compile emits);
  the convolution itself is the same oneDNN primitive, so the outputs equal the unfused ones;
- the input is fed channels-last (NHWC strides), so every convolution and pooling runs NHWC.
  Channels-last reorders the convolution's sums: outputs differ from NCHW by round-off only.

Layers with hooks (pruning masks, a ranking hook) are never fused, so they run as before;
a model whose graph calls ``.view`` (which refuses channels-last strides) or that torch.fx
cannot trace is fed NCHW. Float32 on CPU only is fused; CUDA runs cuDNN unfused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import BdpruningError
from .ops import is_relu
from .split import SplitModel, per_image
from .tracing import trace_model

__all__ = ["CPU_BATCH", "FastModule", "fast_split", "in_cpu_batches", "inference_module"]

log = logging.getLogger(__name__)

#: Images per call of a CPU inference pass: a batch's activations then stay in the cache. On a
#: 2-core EPYC (32 MiB L3), DeepID's prefix to pool_3 ran 4,000 digits in 0.51 s at 64 images a
#: call, 0.52 s at 128, 0.75 s at 256 and 1.00 s at 1,024 (conv_1's output is 183 KB an image).
CPU_BATCH = 64


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or getattr(module, "_forward_hooks_with_kwargs", None))


def _global_hooks() -> bool:
    from torch.nn.modules import module as module_module

    return bool(module_module._global_forward_hooks or module_module._global_forward_pre_hooks)


class ConvReLU(nn.Module):
    """``relu(conv(x))``: one fused oneDNN call for float32 CPU input, else the two steps.

    Reads ``conv``'s parameters at every call, so it follows training and device moves.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        if x.device.type == "cpu" and x.dtype == torch.float32 and conv.weight.dtype == torch.float32 \
                and not torch.is_grad_enabled():
            return torch.ops.mkldnn._convolution_pointwise(
                x, conv.weight, conv.bias, conv.padding, conv.stride, conv.dilation, conv.groups, "relu", [], "")
        return F.relu(conv(x))


def _fusable(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op != "call_module":
        return False
    conv = gm.get_submodule(node.target)
    return (type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and not _has_hooks(conv) and len(node.users) == 1 and _is_relu(gm, next(iter(node.users))))


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    return is_relu(gm, node) and not (node.op == "call_module" and _has_hooks(gm.get_submodule(node.target)))


def _fuse_conv_relu(gm: fx.GraphModule) -> int:
    """Replace every fusable conv -> ReLU pair of ``gm`` by one :class:`ConvReLU` call."""
    fused = 0
    for node in list(gm.graph.nodes):
        if not _fusable(gm, node):
            continue
        relu = next(iter(node.users))
        name = f"{node.target.replace('.', '_')}_relu_fused"
        gm.add_submodule(name, ConvReLU(gm.get_submodule(node.target)))
        with gm.graph.inserting_after(relu):
            replacement = gm.graph.call_module(name, (node.args[0],))
        relu.replace_all_uses_with(replacement)
        gm.graph.erase_node(relu)
        gm.graph.erase_node(node)
        fused += 1
    if fused:
        gm.graph.lint()
        gm.recompile()
    return fused


def _takes_channels_last(gm: fx.GraphModule) -> bool:
    """Whether channels-last input is safe and useful: a conv reads the input, no ``.view``."""
    if any(node.op == "call_method" and node.target == "view" for node in gm.graph.nodes):
        return False
    return any(node.op == "call_module" and isinstance(gm.get_submodule(node.target), (nn.Conv2d, ConvReLU))
               for node in gm.graph.nodes)


@dataclass
class FastModule:
    """A module computing ``model``'s function for inference, and the input layout it wants."""

    module: nn.Module
    channels_last: bool

    def __call__(self, images: torch.Tensor):
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.module(images)


def inference_module(model: nn.Module, *, fuse: bool = True, channels_last: bool = True) -> FastModule:
    """``model`` (in eval mode) for inference: conv -> ReLU pairs fused on CPU and NHWC input,
    sharing ``model``'s parameters and submodules (hooks registered on them still fire).

    Build it after registering hooks: a hooked layer is left as it is. A model that torch.fx
    cannot trace runs unchanged, fed NCHW.
    """
    try:
        gm = trace_model(model)
    except BdpruningError:  # untraceable Python control flow
        log.debug("%s is not traceable: inference runs it unchanged, NCHW", type(model).__name__)
        return FastModule(model, False)
    gm = fx.GraphModule(gm, gm.graph.__deepcopy__())  # a private graph: the caller's stays untouched
    gm.train(model.training)
    fused = _fuse_conv_relu(gm) if fuse and not _global_hooks() else 0
    layout = channels_last and _takes_channels_last(gm)
    log.debug("inference form of %s: %d conv+ReLU fused, %s input", type(model).__name__, fused,
              "channels-last" if layout else "NCHW")
    return FastModule(gm, layout)



def fast_split(split: SplitModel) -> SplitModel:
    """``split`` with its prefix and suffix in their fast inference forms (see
    :func:`inference_module`); ``channels_last`` says whether the prefix wants NHWC input."""
    prefix, suffix = inference_module(split.prefix), inference_module(split.suffix, channels_last=False)
    return SplitModel(prefix.module, suffix.module, split.node_name, prefix.channels_last)


def in_cpu_batches(module, images: torch.Tensor):
    """``module(images)``, run :data:`CPU_BATCH` images at a time on the CPU outside autograd
    (the per-image outputs concatenated; an output that is not per image is taken from the
    first call); at once elsewhere. For modules without side effects per call (no hooks)."""
    if images.device.type != "cpu" or torch.is_grad_enabled() or len(images) <= CPU_BATCH:
        return module(images)
    parts = [module(chunk) for chunk in images.split(CPU_BATCH)]
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    return tuple(torch.cat([part[i] for part in parts]) if per_image(value, CPU_BATCH)
                 else value for i, value in enumerate(parts[0]))
