"""DeepID as a Keras model (the architecture of the course's ``bd_net.h5``).

Used to load weights-only files into Keras and to train the embedded demo BadNet. TensorFlow
comes from :mod:`.tensorflow_runtime` (torch and torchvision first: the other order segfaults).
"""

from __future__ import annotations

from .tensorflow_runtime import keras  # torch first, TensorFlow's start-up messages kept quiet

layers = keras.layers

__all__ = ["build_keras_deepid"]


def build_keras_deepid(num_classes: int = 1283) -> keras.Model:
    """The Keras DeepID: layer names and shapes exactly as in the course's ``bd_net.h5``."""
    inputs = keras.Input(shape=(55, 47, 3), name="input")
    x = layers.Conv2D(20, (4, 4), activation="relu", name="conv_1")(inputs)
    x = layers.MaxPooling2D((2, 2), name="pool_1")(x)
    x = layers.Conv2D(40, (3, 3), activation="relu", name="conv_2")(x)
    x = layers.MaxPooling2D((2, 2), name="pool_2")(x)
    x = layers.Conv2D(60, (3, 3), activation="relu", name="conv_3")(x)
    pool_3 = layers.MaxPooling2D((2, 2), name="pool_3")(x)
    branch_1 = layers.Flatten(name="flatten_1")(pool_3)
    x = layers.Conv2D(80, (2, 2), activation="relu", name="conv_4")(pool_3)
    branch_2 = layers.Flatten(name="flatten_2")(x)
    branch_1 = layers.Dense(160, name="fc_1")(branch_1)
    branch_2 = layers.Dense(160, name="fc_2")(branch_2)
    x = layers.Add(name="add_1")([branch_1, branch_2])
    x = layers.Activation("relu", name="activation_1")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="output")(x)
    return keras.Model(inputs, outputs, name="deepid")
