"""The embedded default BadNet: built on the user's machine from data a package ships.

``build_demo(out_dir)`` writes MNIST digits in the course's HDF5 format (clean and poisoned
splits) and the Keras DeepID BadNet: the shipped ``data/demo_bd_net.h5`` by default, or one
trained on them (``rebuild=True`` or other parameters); see :mod:`bdpruning.demo.build`.
Importing this package does not import TensorFlow; training does (the ``[convert]`` extra).
"""

from __future__ import annotations

from .build import MANIFEST, MODEL_FILE, SHIPPED_MODEL, DemoFiles, build_demo
from .dataset import DATA_FILES, TRIGGER_BOX, make_demo_data, stamp_trigger

__all__ = [
    "DATA_FILES",
    "MANIFEST",
    "MODEL_FILE",
    "SHIPPED_MODEL",
    "TRIGGER_BOX",
    "DemoFiles",
    "build_demo",
    "make_demo_data",
    "stamp_trigger",
]
