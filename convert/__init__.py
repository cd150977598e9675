"""Keras -> ONNX -> PyTorch conversion with numerical parity checks (installed as ``bdpruning.convert``)."""
