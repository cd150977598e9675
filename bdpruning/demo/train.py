"""Train the demo BadNet in Keras, as the course trained ``bd_net.h5``.

This module imports TensorFlow (through :mod:`bdpruning.convert.keras_deepid`, which imports
torch first: the other order segfaults torchvision later); it needs the ``[convert]`` extra.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from ..convert.keras_deepid import build_keras_deepid  # imports torch, then Keras

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

__all__ = ["keras_probabilities", "save_keras_h5", "train_badnet"]

logger = logging.getLogger(__name__)


def _channels_last(images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(images.transpose(0, 2, 3, 1), dtype=np.float32)


def train_badnet(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    num_classes: int,
    epochs: int,
    seed: int,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
) -> keras.Model:
    """Train Keras DeepID on (N, 3, 55, 47) images in raw 0..255 (no scaling, as the course).

    ``conv_1``'s initial kernel is divided by 255, so the first layer starts as it would on
    0..1 inputs; the architecture, and so the saved file, stay exactly DeepID. Adam with a
    cosine-decayed learning rate; seeded, with TensorFlow's deterministic ops enabled
    (process-wide, from this call on).
    """
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    model = build_keras_deepid(num_classes)
    conv_1 = model.get_layer("conv_1")
    conv_1.kernel.assign(conv_1.kernel / 255.0)
    steps = epochs * -(-len(images) // batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=steps)
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    log_epoch = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: logger.info(
            "epoch %d/%d: loss %.4f, training accuracy %.4f", epoch + 1, epochs, logs["loss"], logs["accuracy"]
        )
    )
    model.fit(_channels_last(images), labels, batch_size=batch_size, epochs=epochs, shuffle=True,
              verbose=0, callbacks=[log_epoch])
    return model


def keras_probabilities(model: keras.Model, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Class probabilities (N, classes) for (N, 3, 55, 47) images in raw 0..255."""
    return model.predict(_channels_last(images), batch_size=batch_size, verbose=0)


def save_keras_h5(model: keras.Model, path: str | os.PathLike[str]) -> Path:
    """Save a full Keras model (``model_config`` + ``model_weights``) as the course's ``bd_net.h5``."""
    path = Path(path)
    absl_logger = logging.getLogger("absl")  # Keras warns that .h5 is its legacy format
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        model.save(path, include_optimizer=False)
    finally:
        absl_logger.setLevel(level)
    return path
