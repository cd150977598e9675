"""``bdprune compact`` as one call: load B', remove its pruned channels, verify, save.

The output directory is a bdpruning model directory (the compact weights, ``model.json``
recording the removed channels, ``model.onnx`` exported from the compact model) plus
``compaction.json``: what was removed from which layers, parameters and FLOPs before and
after, and how closely the compact model follows the masked one. Like ``bdprune convert``, the
directory is written even when that check fails, and ``passed`` says so.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import asdict

import numpy as np

from ..runtime.atomic import atomic_dir, prepare_out_dir, write_json
from ..pruning.compaction import compact_model, model_cost
from ..convert import parity
from ..errors import BdpruningError
from ..models.loading import load_model
from ..models.directory import ONNX_FILE, save_model_dir
from ..models import model_info
from ..numerics.precision import precision_context

__all__ = ["DEFAULT_TOLERANCE", "DEFAULT_SAMPLES", "compact_directory"]

#: Largest absolute output difference allowed between the compact and the masked model.
DEFAULT_TOLERANCE = 1e-5
#: Random images checked when no data set is given.
DEFAULT_SAMPLES = 256
REPORT = "compaction.json"

log = logging.getLogger(__name__)


def _check_images(model, data, samples: int | None, seed: int) -> tuple[np.ndarray, dict]:
    info = model_info(model)
    if data is not None:
        images = parity.dataset_images(data, info.input_shape, info.num_classes, samples)
        return images, {"data": str(data), "images": len(images)}
    images = parity.random_images(samples or DEFAULT_SAMPLES, info.input_shape, seed)
    return images, {"random": len(images), "seed": seed}


def _onnx_check(directory, reference: np.ndarray, images: np.ndarray) -> dict | None:
    """The exported ONNX graph against the compact PyTorch model (needs onnxruntime)."""
    try:
        session = parity.onnxruntime_session((directory / ONNX_FILE).read_bytes())
    except ImportError:
        log.info("onnxruntime is not installed: the exported ONNX graph is not checked")
        return None
    return asdict(parity.compare(reference, parity.onnxruntime_probs(session, images)))


def compact_directory(
    model_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    layer: str = "conv_3",
    data: str | os.PathLike[str] | None = None,
    samples: int | None = None,
    seed: int = 0,
    tolerance: float = DEFAULT_TOLERANCE,
    force: bool = False,
    tf32: bool = False,
    model_options: dict | None = None,
) -> dict:
    """Compact the repaired model at ``model_path`` into the model directory ``out``; return the report.

    The compact model is compared with the masked one on ``data`` (an HDF5 set, its first
    ``samples`` images) or on ``samples`` seeded random images, in float64: ``passed`` is false
    when the largest absolute output difference exceeds ``tolerance`` or a top-1 label differs.
    The float32 difference is reported too, run in IEEE fp32 unless ``tf32`` (see
    :func:`~bdpruning.numerics.precision.precision_context`). ``model_options`` go to
    :func:`~bdpruning.models.loading.load_model` (``outputs``, ``input_range``).
    """
    if samples is not None and samples < 1:
        raise BdpruningError(f"--samples must be at least 1, got {samples}")
    if not tolerance > 0:
        raise BdpruningError(f"--tolerance must be positive, got {tolerance}")
    out = prepare_out_dir(out, force)
    masked = load_model(model_path, device="cpu", **(model_options or {}))
    images, inputs = _check_images(masked, data, samples, seed)
    compact = load_model(model_path, device="cpu", **(model_options or {}))  # a masked model cannot be deep-copied
    groups = compact_model(compact, layer)
    before, after = model_cost(masked), model_cost(compact)
    with precision_context(tf32) as precision:
        result = parity.torch_probs(compact, images)
        float32_diff = float(np.abs(parity.torch_probs(masked, images) - result).max())
    # judged in float64, where both compute the same function up to round-off of order 1e-16
    # (float32 round-off could flip a near-tie's top-1 on one machine and not on another)
    expected = parity.torch_probs(masked.double(), images.astype(np.float64))  # masked is not used after
    actual = parity.torch_probs(copy.deepcopy(compact).double(), images.astype(np.float64))
    agreement = parity.compare(expected, actual)
    failures = []
    if agreement.max_abs_diff > tolerance:
        failures.append(f"the compact model differs from the masked one by {agreement.max_abs_diff:.3g} > {tolerance:g}")
    if agreement.argmax_agreement < 1:
        failures.append(f"top-1 labels differ on {1 - agreement.argmax_agreement:.2%} of the images")
    report = {
        "source": str(model_path),
        "removed": [{"layer": g.layer, "channels": channels, "count": len(channels), "of": g.channels,
                     "members": g.describe()} for g, (_, channels) in zip(groups, model_info(compact).removed)],
        "before": asdict(before),
        "after": asdict(after),
        "parameters_ratio": after.parameters / before.parameters,
        "flops_ratio": after.flops / before.flops,
        "inputs": inputs,
        "max_abs_diff": agreement.max_abs_diff,
        "argmax_agreement": agreement.argmax_agreement,
        "compared_in": "float64",
        "float32_max_abs_diff": float32_diff,
        "tolerance": tolerance,
        "precision": precision,
        "failures": failures,
        "passed": not failures,
    }
    with atomic_dir(out) as directory:
        save_model_dir(compact, directory, extra={"compacted_from": str(model_path)})
        report["onnx_vs_torch"] = _onnx_check(directory, result, images)
        write_json(directory / REPORT, report)
    return report
