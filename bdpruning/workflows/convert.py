"""``bdprune convert``: Keras ``.h5`` -> ONNX -> PyTorch, verified, written atomically.

The output directory is a bdpruning model directory (:func:`bdpruning.save_model_dir`: the
PyTorch weights, ``model.json`` and tf2onnx's ``model.onnx``) plus ``conversion.json``, the
parity report (:func:`check_parity`). DeepID files are saved as the named
:class:`~bdpruning.models.DeepID` module; other models as their onnx2torch module. The
directory is written even when parity fails, so the user can inspect it; ``passed`` in the
report (and the command's exit code) says so.

Everything that can be checked without TensorFlow (the file, its layers, its input shape, the
data set, the output directory) is checked before TensorFlow is imported, so a user mistake
costs no TensorFlow start-up and prints one line.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from torch import nn

from ..runtime.atomic import atomic_dir, prepare_out_dir, write_json
from ..numerics import roundoff
from ..convert import parity
from ..errors import BdpruningError
from ..data.images import read_images
from ..models.keras_h5 import KerasH5, deepid_from_keras, fits_deepid, image_input_shape, read_keras_h5
from ..models.directory import write_model_files
from ..models.onnx_graph import ONNX_OPSET, onnx_outputs, onnx_to_torch
from ..models import DeepID, ModelInfo, attach_info
from ..models.deepid import DEEPID_INPUT_RANGE

__all__ = ["DEFAULT_SAMPLES", "REPORT", "check_parity", "convert_keras"]

#: Random images checked when neither a data set nor image files are given.
DEFAULT_SAMPLES = 256
REPORT = "conversion.json"
_PYTORCH_BACKENDS = ("onnx2torch", "deepid")

log = logging.getLogger(__name__)


def _parity_inputs(
    shape: tuple[int, int, int],
    num_classes: int | None,
    data: str | os.PathLike[str] | None,
    images: Sequence[str | os.PathLike[str]],
    samples: int | None,
    seed: int,
) -> tuple[np.ndarray, dict]:
    """Real images (``data`` and image files) when given, else seeded random ones, labelled."""
    if images and shape[0] != 3:
        raise BdpruningError(f"--images needs a model of RGB images; this one takes {shape[0]} channels")
    batches, described = [], {}
    if data is not None:
        batches.append(parity.dataset_images(data, shape, num_classes, samples))
        described["data"] = str(data)
    if images:
        batches.append(read_images(images, shape).numpy())
        described["images"] = [str(p) for p in images]
    if batches:
        return np.concatenate(batches), {"kind": "real", **described}
    count = samples or DEFAULT_SAMPLES
    return parity.random_images(count, shape, seed), {
        "kind": "random", "random": count, "seed": seed,
        "note": "fallback: no --data or --images given; on random pixels a trained net's logits are "
                "large and its softmax ill-conditioned, so only a coarse check is possible",
    }


def check_parity(
    keras_model: Any,
    onnx_bytes: bytes,
    graph_module: nn.Module,
    deepid: DeepID | None,
    images: np.ndarray,
    tolerance: float | None = None,
) -> dict:
    """Keras, onnxruntime and the PyTorch modules against a float64 evaluation of the converted
    weights (see :mod:`bdpruning.convert.parity` for the bound); the parity part of the report.

    ``passed`` is false when a backend's error is more than float32 round-off explains, when its
    top-1 differs on an input whose float64 margin is safe, or (with ``tolerance``) when a
    PyTorch module's softmax differs from Keras' by more than ``tolerance``.
    """
    from ..numerics.precision import precision_context

    with precision_context(tf32=False):
        saved = deepid if deepid is not None else graph_module
        reference = roundoff.float64_reference(saved, images)
        outputs = {"keras": parity.keras_probs(keras_model, images),
                   "onnxruntime": parity.onnxruntime_probs(parity.onnxruntime_session(onnx_bytes), images),
                   "onnx2torch": parity.torch_probs(graph_module, images)}
        if deepid is not None:
            outputs["deepid"] = parity.torch_probs(deepid, images)
    keras = outputs["keras"]
    backends, failures = {}, []
    for name, values in outputs.items():
        measured = roundoff.measure(reference, values)
        backends[name] = measured.as_dict()
        if name != "keras":
            vs_keras = parity.compare(keras, values)
            backends[name]["max_abs_diff_vs_keras"] = vs_keras.max_abs_diff
            backends[name]["argmax_agreement_vs_keras"] = vs_keras.argmax_agreement
        if measured.logit_error_units > measured.logit_bound_units:
            failures.append(f"{name}'s logits differ from the float64 reference by {measured.logit_error_units:.1f} u, "
                            f"more than float32 round-off explains ({measured.logit_bound_units:.0f} u)")
        if measured.softmax_bound_ratio > 1:
            failures.append(f"{name}'s softmax differs from the float64 reference by {measured.softmax_max_abs_error:.3g}, "
                            f"{measured.softmax_bound_ratio:.3g}x the round-off bound")
        if measured.safe_top1_agreement < 1:
            failures.append(f"{name}'s top-1 differs from the float64 reference on "
                            f"{(1 - measured.safe_top1_agreement) * measured.safe_inputs:.0f} input(s) whose margin is safe")
    pytorch = [backends[name] for name in _PYTORCH_BACKENDS if name in backends]
    verdict = {
        "max_abs_diff": max(b["max_abs_diff_vs_keras"] for b in pytorch),
        "argmax_agreement": min(b["argmax_agreement_vs_keras"] for b in pytorch),
        "tolerance": tolerance,
    }
    if tolerance is not None and verdict["max_abs_diff"] > tolerance:
        failures.append(f"PyTorch differs from Keras by {verdict['max_abs_diff']:.3g} > tolerance {tolerance:g}")
    return {
        "reference": {
            "what": f"float64 evaluation of the converted {'DeepID' if deepid is not None else 'onnx2torch'} module",
            "accumulation_depth": reference.accumulation_depth,
            "lambda": roundoff.LAMBDA,
            "unit_roundoff": roundoff.UNIT_ROUNDOFF,
            "logit_bound_units": 2 * roundoff.LAMBDA * reference.accumulation_depth ** 0.5,
            "median_logit_scale": float(np.median(reference.scale)),
            "largest_logit_scale": float(reference.scale.max()),
        },
        "backends": backends,
        **verdict,
        "failures": failures,
        "passed": not failures,
    }


def _validate(source: Path, samples: int | None) -> tuple[KerasH5, tuple[int, int, int], DeepID | None]:
    """Every check that needs no TensorFlow: the file, its layers, its input shape."""
    if samples is not None and samples < 1:
        raise BdpruningError(f"--samples must be at least 1, got {samples}")
    h5 = read_keras_h5(source)
    # weights-only files must fit DeepID: deepid_from_keras raises naming the misfit layer
    deepid = deepid_from_keras(source, h5) if fits_deepid(h5) or not h5.is_full_model else None
    return h5, image_input_shape(h5), deepid


def convert_keras(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    tolerance: float | None = None,
    data: str | os.PathLike[str] | None = None,
    images: Sequence[str | os.PathLike[str]] = (),
    samples: int | None = None,
    seed: int = 0,
    force: bool = False,
) -> dict:
    """Convert a Keras ``.h5`` into the model directory ``out``; return the report.

    Parity is checked on real images when given (``data``, an HDF5 set, its first ``samples``
    images, and ``images`` files), else on ``samples`` seeded random images (a fallback, labelled
    so in the report); see :func:`check_parity`.
    """
    source = Path(source)
    out = prepare_out_dir(out, force)
    h5, shape, deepid = _validate(source, samples)
    hint = deepid.num_classes if deepid is not None else None
    batch, inputs = _parity_inputs(shape, hint, data, images, samples, seed)

    from ..convert.keras_to_onnx import load_keras, to_onnx, toolchain_versions  # TensorFlow from here on

    keras_model = load_keras(source, h5)
    num_classes = int(keras_model.outputs[0].shape[-1])
    if data is not None and hint is None:  # the labels, now that the class count is known
        parity.dataset_images(data, shape, num_classes, 1)
    proto = to_onnx(keras_model, source)
    onnx_bytes = proto.SerializeToString()
    info = ModelInfo("onnx", num_classes, shape, str(source), onnx_bytes, outputs=onnx_outputs(proto, source))
    graph_module = attach_info(onnx_to_torch(proto, source).eval(), info)
    if deepid is not None:
        attach_info(deepid, ModelInfo("deepid", deepid.num_classes, shape, str(source), input_range=DEEPID_INPUT_RANGE))

    log.info("checking parity on %d %s images", len(batch), inputs["kind"])
    report = {
        "source": str(source),
        "architecture": "deepid" if deepid is not None else "onnx",
        "num_classes": num_classes,
        "input_shape": list(shape),
        "samples": len(batch),
        "inputs": inputs,
        **check_parity(keras_model, onnx_bytes, graph_module, deepid, batch, tolerance),
        "opset": ONNX_OPSET,
        "versions": toolchain_versions(),
    }
    with atomic_dir(out) as directory:
        write_model_files(deepid if deepid is not None else graph_module, directory, onnx_bytes=onnx_bytes)
        write_json(directory / REPORT, report)
    return report
