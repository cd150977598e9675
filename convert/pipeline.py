"""``bdprune convert``: Keras ``.h5`` -> ONNX -> PyTorch, verified against Keras, written atomically.

The output directory is a bdpruning model directory (:func:`bdpruning.save_model_dir`: the
PyTorch weights, ``model.json`` and tf2onnx's ``model.onnx``) plus ``conversion.json``, the
parity report. DeepID files are saved as the named :class:`~bdpruning.models.DeepID` module;
other models as their onnx2torch module. The directory is written even when parity fails, so
the user can inspect it; ``passed`` in the report (and the command's exit code) says so.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np

from ..atomic import atomic_dir, prepare_out_dir
from ..errors import BdpruningError
from ..images import read_images
from ..keras_h5 import deepid_from_keras, fits_deepid, read_keras_h5
from ..modelio import ONNX_OPSET, ModelInfo, attach_info, onnx_to_torch, save_model_dir
from . import parity
from .keras_to_onnx import load_keras, to_onnx, toolchain_versions

__all__ = ["DEFAULT_TOLERANCE", "DEEPID_ONNX_TOLERANCE", "DEFAULT_SAMPLES", "convert_keras"]

#: Largest softmax difference (PyTorch vs Keras) a conversion may have by default.
DEFAULT_TOLERANCE = 1e-4
#: Largest softmax difference allowed between the named DeepID module and the ONNX graph's
#: onnx2torch module (same PyTorch kernels: ~2e-6 on 11,547 images, where onnxruntime and
#: Keras differ from either by ~1.2e-5).
DEEPID_ONNX_TOLERANCE = 1e-5
#: Random images checked when no data set is given.
DEFAULT_SAMPLES = 256
REPORT = "conversion.json"

log = logging.getLogger(__name__)


def _parity_images(
    shape: tuple[int, int, int],
    num_classes: int,
    data: str | os.PathLike[str] | None,
    images: Sequence[str | os.PathLike[str]],
    samples: int | None,
    seed: int,
) -> tuple[np.ndarray, dict]:
    if data is not None:
        batch = parity.dataset_images(data, shape, num_classes, samples)
        described: dict = {"data": str(data)}
    else:
        batch = parity.random_images(samples or DEFAULT_SAMPLES, shape, seed)
        described = {"random": len(batch), "seed": seed}
    if images:
        if shape[0] != 3:
            raise BdpruningError(f"--images needs a model of RGB images; this one takes {shape[0]} channels")
        batch = np.concatenate([batch, read_images(images, shape).numpy()])
        described["images"] = [str(p) for p in images]
    return batch, described


def _verdict(outputs: dict[str, np.ndarray], tolerance: float) -> dict:
    """Each backend against Keras; the worst PyTorch one decides, with the DeepID-onnx2torch check."""
    reference = outputs["keras"]
    backends = {name: parity.compare(reference, probs) for name, probs in outputs.items() if name != "keras"}
    pytorch = [agreement for name, agreement in backends.items() if name != "onnxruntime"]
    verdict = {
        "max_abs_diff": max(a.max_abs_diff for a in pytorch),
        "argmax_agreement": min(a.argmax_agreement for a in pytorch),
        "backends": {name: asdict(agreement) for name, agreement in backends.items()},
        "tolerance": tolerance,
    }
    failures = []
    if verdict["max_abs_diff"] > tolerance:
        failures.append(f"PyTorch differs from Keras by {verdict['max_abs_diff']:.3g} > tolerance {tolerance:g}")
    if "deepid" in outputs:
        deepid_vs_onnx = parity.compare(outputs["onnx2torch"], outputs["deepid"]).max_abs_diff
        verdict["deepid_vs_onnx2torch_max_abs_diff"] = deepid_vs_onnx
        if deepid_vs_onnx > DEEPID_ONNX_TOLERANCE:
            failures.append(f"DeepID differs from the ONNX graph's module by {deepid_vs_onnx:.3g} "
                            f"> {DEEPID_ONNX_TOLERANCE:g}")
    return {**verdict, "failures": failures, "passed": not failures}


def convert_keras(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    data: str | os.PathLike[str] | None = None,
    images: Sequence[str | os.PathLike[str]] = (),
    samples: int | None = None,
    seed: int = 0,
    force: bool = False,
) -> dict:
    """Convert a Keras ``.h5`` into the model directory ``out``; return the parity report.

    Parity is measured on ``data`` (an HDF5 set, first ``samples`` images) or on ``samples``
    seeded random images, plus any ``images`` files. The report's ``passed`` is false when a
    PyTorch model differs from Keras by more than ``tolerance`` (softmax, max abs) or the named
    DeepID module from the ONNX graph's onnx2torch module by more than
    ``DEEPID_ONNX_TOLERANCE``; ``failures`` says why.
    """
    if samples is not None and samples < 1:
        raise BdpruningError(f"--samples must be at least 1, got {samples}")
    source = Path(source)
    out = prepare_out_dir(out, force)
    h5 = read_keras_h5(source)
    # weights-only files must fit DeepID: deepid_from_keras raises naming the misfit layer
    deepid = deepid_from_keras(source, h5) if fits_deepid(h5) or not h5.is_full_model else None
    keras_model = load_keras(source, h5)
    height, width, channels = (int(s) for s in keras_model.inputs[0].shape[1:])
    shape = (channels, height, width)
    num_classes = int(keras_model.outputs[0].shape[-1])
    proto = to_onnx(keras_model, source)
    onnx_bytes = proto.SerializeToString()
    info = ModelInfo("onnx", num_classes, shape, str(source), onnx_bytes)
    graph_module = attach_info(onnx_to_torch(proto, source).eval(), info)

    batch, inputs = _parity_images(shape, num_classes, data, images, samples, seed)
    log.info("checking parity on %d images", len(batch))
    outputs = {"keras": parity.keras_probs(keras_model, batch),
               "onnxruntime": parity.onnxruntime_probs(parity.onnxruntime_session(onnx_bytes), batch),
               "onnx2torch": parity.torch_probs(graph_module, batch)}
    if deepid is not None:
        attach_info(deepid, ModelInfo("deepid", deepid.num_classes, shape, str(source)))
        outputs["deepid"] = parity.torch_probs(deepid, batch)
    report = {
        "source": str(source),
        "architecture": "deepid" if deepid is not None else "onnx",
        "num_classes": num_classes,
        "input_shape": list(shape),
        "samples": len(batch),
        "inputs": inputs,
        **_verdict(outputs, tolerance),
        "opset": ONNX_OPSET,
        "versions": toolchain_versions(),
    }
    with atomic_dir(out) as directory:
        save_model_dir(deepid if deepid is not None else graph_module, directory, onnx_bytes=onnx_bytes)
        (directory / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report
