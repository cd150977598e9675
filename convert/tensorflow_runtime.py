"""TensorFlow, Keras and tf2onnx, imported the one safe way.

* torch and torchvision are imported first: importing torchvision (as onnx2torch does) after
  TensorFlow segfaults.
* TensorFlow's C++ start-up messages (absl's "All log messages before absl::InitializeLog()",
  oneDNN's notice) are written straight to file descriptor 2, whatever ``TF_CPP_MIN_LOG_LEVEL``
  says; they are kept off the user's terminal and go to this module's debug log instead.

Every Keras-side module imports ``tf``, ``keras`` and ``tf2onnx`` from here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from typing import Iterator

import torch  # noqa: F401  (before tensorflow)
import torchvision  # noqa: F401  (before tensorflow)

__all__ = ["keras", "tf", "tf2onnx", "stderr_to_debug_log"]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def stderr_to_debug_log(logger: logging.Logger = log) -> Iterator[None]:
    """Send what is written to file descriptor 2 (C++ logging included) to ``logger.debug``."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            for line in sink.read().decode("utf-8", "replace").splitlines():
                if line.strip():
                    logger.debug("%s", line)


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
with stderr_to_debug_log():
    import tensorflow as tf  # noqa: E402
    import keras  # noqa: E402
    import tf2onnx  # noqa: E402
