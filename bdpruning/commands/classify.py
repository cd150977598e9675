"""``bdprune classify``: GoodNet labels for PNG/JPEG images; flagged inputs get the extra class N."""

from __future__ import annotations

import argparse

from .options import add_model_arguments, add_tf32_argument, model_options

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="RGB images of the model's size (55x47 for DeepID)")
    parser.add_argument("--bd", required=True, help="the backdoored model B (.h5, .onnx or model directory)")
    parser.add_argument("--repaired", required=True, help="the repaired model B'")
    parser.add_argument("--resize", action="store_true", help="resize images of another size (bilinear)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add_model_arguments(parser)
    add_tf32_argument(parser)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..runtime.devices import resolve_device
    from ..evaluation.goodnet import GoodNet, goodnet_labels
    from ..data.images import read_images
    from ..errors import BdpruningError
    from ..models import model_info
    from ..models.loading import load_model
    from ..numerics.precision import precision_context

    device = resolve_device(args.device)
    goodnet = GoodNet(load_model(args.bd, device, **model_options(args)),
                      load_model(args.repaired, device, **model_options(args)))
    images = read_images(args.images, goodnet.input_shape, resize=args.resize).to(device)  # 0..255
    input_range = model_info(goodnet.bd).input_range
    if input_range == "normalized":
        raise BdpruningError(f"{args.bd}: the model takes normalised images; classify feeds PNG/JPEG pixels "
                             "(0..255, or 0..1 for a model recorded so)")
    if input_range == "0..1":
        images = images / 255
    with torch.inference_mode(), precision_context(args.tf32):
        bd_probs, repaired_probs = goodnet.outputs(images)
    bd, repaired = bd_probs.argmax(dim=1), repaired_probs.argmax(dim=1)
    labels = goodnet_labels(bd, repaired, goodnet.num_classes)
    for path, label, bd_label, repaired_label in zip(args.images, labels.tolist(), bd.tolist(), repaired.tolist()):
        flag = f"\tflagged as poisoned (B: {bd_label}, B': {repaired_label})" if label == goodnet.num_classes else ""
        print(f"{path}\t{label}{flag}")
    return 0
