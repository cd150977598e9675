"""Float32 precision for every number bdpruning reports: IEEE fp32 on CUDA unless TF32 is asked for.

PyTorch lets cuDNN convolutions use TensorFloat-32 (a 10-bit mantissa) by default, and on CUDA
a sweep's clean accuracy then differs from the reference by fractions of a point at some steps.
:func:`precision_context` makes CUDA (and CPU oneDNN) compute in IEEE fp32, or allows TF32, and
restores the caller's settings on exit; :func:`precision_record` describes the settings in force::

    with precision_context() as record:    # tf32=False: IEEE fp32; record: precision_record()
        labels = model(images.cuda())

Torch 2.9 and later have per-operation settings (``torch.backends.cudnn.conv.fp32_precision``,
``torch.backends.cuda.matmul.fp32_precision``, ...) and keep the legacy flags
(``torch.backends.cudnn.allow_tf32``, ``torch.get_float32_matmul_precision()``) as a separate
mirror that it checks against them: reading a mirror that disagrees raises "a mix of the legacy
and new APIs" (cuBLAS reads it too). So the new settings are set here and the legacy mirror is
set to agree with them. Older torch has only the legacy flags, which are set instead. The
settings are global to the process: do not change them from another thread meanwhile.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import torch

__all__ = ["PrecisionRecord", "precision_context", "precision_record", "runs_in_precision_context",
           "has_fp32_precision_api"]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

#: The per-operation settings of torch >= 2.9 that this module reads and writes.
_OPERATIONS = {
    "cudnn_conv": ("cudnn", "conv"),
    "cudnn_rnn": ("cudnn", "rnn"),
    "cuda_matmul": ("cuda.matmul", None),
    "mkldnn_conv": ("mkldnn", "conv"),
    "mkldnn_matmul": ("mkldnn", "matmul"),
    "mkldnn_rnn": ("mkldnn", "rnn"),
}
_CUDA_OPERATIONS = ("cudnn_conv", "cudnn_rnn", "cuda_matmul")


@dataclass(frozen=True)
class _Settings:
    """New per-operation settings (empty on torch < 2.9) and the legacy flags (None: unreadable)."""

    operations: dict[str, str]
    cudnn_tf32: bool | None
    matmul: str | None


def _objects() -> dict[str, Any]:
    """The objects whose ``fp32_precision`` is each operation's setting (empty on torch < 2.9)."""
    objects = {}
    for name, (path, op) in _OPERATIONS.items():
        parent: Any = torch.backends
        for part in path.split("."):
            parent = getattr(parent, part, None)
        target = getattr(parent, op, None) if op else parent
        if target is not None and hasattr(target, "fp32_precision"):
            objects[name] = target
    return objects if all(name in objects for name in _CUDA_OPERATIONS) else {}


def has_fp32_precision_api() -> bool:
    """Whether this torch has the per-operation ``fp32_precision`` settings (torch >= 2.9)."""
    return bool(_objects())


def _legacy(getter: Callable[[], T]) -> T | None:
    """A legacy flag, or None when torch refuses to read it (it disagrees with the new settings)."""
    try:
        with warnings.catch_warnings():  # torch 2.9-2.11 warn that the legacy flags are deprecated
            warnings.simplefilter("ignore")
            return getter()
    except RuntimeError:
        return None


def _read() -> _Settings:
    operations = {name: target.fp32_precision for name, target in _objects().items()}
    return _Settings(operations, _legacy(lambda: torch.backends.cudnn.allow_tf32),
                     _legacy(torch.get_float32_matmul_precision))


def _legacy_matmul(operations: dict[str, str]) -> str:
    """The legacy matmul precision that agrees with these per-operation settings: first with CUDA
    matmul (cuBLAS checks that), then with oneDNN's (only ``torch.get_float32_matmul_precision``)."""
    if operations.get("cuda_matmul") != "tf32":
        return "highest"
    return "medium" if operations.get("mkldnn_matmul") == "bf16" else "high"


def _apply(settings: _Settings) -> None:
    """Set the legacy flags first (setting them overwrites some new ones), then the new settings.

    A legacy flag that could not be read (the caller had mixed the APIs) is set to agree with
    the new settings.
    """
    cudnn_tf32, matmul = settings.cudnn_tf32, settings.matmul
    if settings.operations:
        cudnn_tf32 = settings.operations["cudnn_conv"] == "tf32" if cudnn_tf32 is None else cudnn_tf32
        matmul = matmul or _legacy_matmul(settings.operations)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if cudnn_tf32 is not None:
            torch.backends.cudnn.allow_tf32 = cudnn_tf32
        if matmul is not None:
            torch.set_float32_matmul_precision(matmul)
    objects = _objects()
    for name, value in settings.operations.items():
        objects[name].fp32_precision = value


def _target(tf32: bool, current: _Settings) -> _Settings:
    """CUDA convolutions and matmuls in TF32 or IEEE fp32; with IEEE, CPU oneDNN in IEEE too."""
    if not current.operations:  # torch < 2.9: the legacy flags only
        return _Settings({}, tf32, "high" if tf32 else "highest")
    mode = "tf32" if tf32 else "ieee"
    operations = {name: mode if name in _CUDA_OPERATIONS or not tf32 else value
                  for name, value in current.operations.items()}
    return _Settings(operations, tf32, _legacy_matmul(operations))


@contextmanager
def precision_context(tf32: bool = False) -> Iterator[dict]:
    """Run the body with CUDA in IEEE fp32 (``tf32=False``: cuDNN convolutions and RNNs, CUDA
    matmuls, and CPU oneDNN too, so nobody's bf16 opt-in reaches reported numbers) or with TF32
    allowed on CUDA (``tf32=True``; CPU settings untouched). The caller's settings come back on
    exit, also after an exception. Yields :func:`precision_record` of the settings inside."""
    saved = _read()
    try:
        _apply(_target(tf32, saved))
        yield precision_record()
    finally:
        _apply(saved)


def _effective(value: str) -> str:
    return "ieee" if value == "none" else value  # "none" everywhere up the tree: torch's default, IEEE


@dataclass(frozen=True)
class PrecisionRecord:
    """The float32 precision in force: whether CUDA may use TF32, the setting of each operation
    (``ieee``, ``tf32``, ``bf16``; torch < 2.9: its legacy flags), which API set them, and the
    torch version. :meth:`to_json` is the ``precision`` entry of bdpruning's results files."""

    tf32: bool
    operations: tuple[tuple[str, str], ...]  #: (operation, setting), in torch's order
    api: str  #: ``fp32_precision`` (torch >= 2.9) or ``legacy``
    torch: str

    @classmethod
    def current(cls, tf32: bool | None = None) -> PrecisionRecord:
        """The settings in force now; with ``tf32`` given, those ``precision_context(tf32)`` puts in force."""
        if tf32 is not None:
            with precision_context(tf32) as record:
                return cls.from_json(record)
        operations = {name: target.fp32_precision for name, target in _objects().items()}
        if operations:
            settings = {name: _effective(value) for name, value in operations.items()}
            api = "fp32_precision"
        else:
            cudnn = "tf32" if _legacy(lambda: torch.backends.cudnn.allow_tf32) else "ieee"
            matmul = _legacy(torch.get_float32_matmul_precision)
            settings = {"cudnn_conv": cudnn, "cudnn_rnn": cudnn, "cuda_matmul": "ieee" if matmul == "highest" else "tf32",
                        "float32_matmul_precision": matmul}
            api = "legacy"
        return cls(any(settings[name] == "tf32" for name in _CUDA_OPERATIONS), tuple(settings.items()), api,
                   torch.__version__)

    @classmethod
    def from_json(cls, record: dict) -> PrecisionRecord:
        """The record :meth:`to_json` wrote."""
        operations = tuple((k, v) for k, v in record.items() if k not in ("tf32", "api", "torch"))
        return cls(record["tf32"], operations, record["api"], record["torch"])

    def to_json(self) -> dict:
        """``{"tf32": ..., <operation>: <setting>, ..., "api": ..., "torch": ...}``."""
        return {"tf32": self.tf32, **dict(self.operations), "api": self.api, "torch": self.torch}


def precision_record(tf32: bool | None = None) -> dict:
    """:meth:`PrecisionRecord.current` as JSON-ready data (see :meth:`PrecisionRecord.to_json`)."""
    if tf32 is not None:
        with precision_context(tf32) as record:
            return record
    return PrecisionRecord.current().to_json()


def runs_in_precision_context(function: F) -> F:
    """Decorate a function that has a keyword ``tf32`` (default False): its call runs inside
    :func:`precision_context` with that value."""
    signature = inspect.signature(function)
    default = signature.parameters["tf32"].default

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        tf32 = kwargs["tf32"] if "tf32" in kwargs else signature.bind(*args, **kwargs).arguments.get("tf32", default)
        with precision_context(bool(tf32)):
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
