"""Typed errors of the standalone bundle layer.

Everything that reads, writes or runs a ``wts.h5.zip`` raises a subclass of :class:`BundleError` (or
:class:`PredictionInputError` for bad inference input), so callers can catch one family and users get a
message that names the cause and the fix. Nothing here imports MLflow; the flavor layer wraps these into
``MlflowException`` with the right error code.
"""

from __future__ import annotations

import reprlib
from typing import Any

__all__ = [
    "PtychoFlavorError",
    "BundleError",
    "NotABundleError",
    "CorruptBundleError",
    "UnsafeBundleError",
    "UnsupportedBundleError",
    "TensorFlowBundleError",
    "ArchitectureEraError",
    "ConfigMismatchError",
    "StateDictMismatchError",
    "PredictionInputError",
    "DatasetError",
    "InvalidArgumentError",
    "CheckpointError",
    "NotACheckpointError",
    "CorruptCheckpointError",
    "UnsafeCheckpointError",
    "UnsupportedCheckpointError",
    "TensorFlowConversionError",
    "UnconvertibleInputError",
    "FlavorUnavailableError",
    "short_repr",
]

_REPR = reprlib.Repr()
_REPR.maxstring = 160
_REPR.maxother = 160
_REPR.maxlong = 40
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 10
_REPR.maxlevel = 3


def short_repr(value: Any) -> str:
    """A bounded ``repr`` for error messages: values from a hostile file can be huge or deeply nested.

    At most a few hundred characters come out, whatever ``value`` is; a broken ``__repr__`` never replaces the
    real error.
    """
    try:
        text = _REPR.repr(value)
    except Exception:  # noqa: BLE001
        return f"<{type(value).__name__}>"
    return text if len(text) <= 300 else text[:297] + "..."


class PtychoFlavorError(Exception):
    """Root of every error this package raises on purpose."""


class BundleError(PtychoFlavorError):
    """A ``wts.h5.zip`` bundle cannot be read or written."""


class NotABundleError(BundleError):
    """The path does not exist, is not a regular file, or holds no readable zip directory.

    A file cut short before its central directory lands here too (the message says it looks truncated).
    """


class CorruptBundleError(BundleError):
    """The archive opens but is damaged: bad CRC, a member cut short, missing member, hash mismatch, bad manifest."""


class UnsafeBundleError(BundleError):
    """The archive holds something a safe loader refuses: code-bearing pickles, path tricks, zip bombs."""


class UnsupportedBundleError(BundleError):
    """The bundle is well-formed but describes something this loader does not build."""


class TensorFlowBundleError(UnsupportedBundleError):
    """A TensorFlow (``version '1.0'``, ``model.keras``) archive was given to the PyTorch loader."""


class ArchitectureEraError(UnsupportedBundleError):
    """The state_dict comes from an older upstream architecture era (E0-E2) whose forward differs."""


class ConfigMismatchError(BundleError):
    """The params snapshot, the torch configs or the global config disagree with each other or the data."""


class StateDictMismatchError(BundleError):
    """The weights do not fit the network the configuration describes (strict load failed)."""


class PredictionInputError(PtychoFlavorError, ValueError):
    """Inference input has the wrong rank, shape, dtype or non-finite values."""


class DatasetError(PtychoFlavorError, ValueError):
    """A ptychography NPZ dataset is missing keys or holds arrays of the wrong shape, dtype or values."""


class InvalidArgumentError(PtychoFlavorError, ValueError):
    """A function or command argument has a value the package cannot use (a device that is not there, a
    simulator size out of range, a training setting that makes no sense); the message names the argument."""


class CheckpointError(BundleError):
    """A PyTorch Lightning checkpoint (``*.ckpt``) cannot be read or converted into a bundle."""


class NotACheckpointError(CheckpointError, NotABundleError):
    """The file is not a Lightning checkpoint (a bundle, a bare state_dict, a TF archive, ...); the message says what it is."""


class CorruptCheckpointError(CheckpointError, CorruptBundleError):
    """The checkpoint opens but is damaged: a storage cut short, a tensor outside its storage, a malformed pickle."""


class UnsafeCheckpointError(CheckpointError, UnsafeBundleError):
    """The checkpoint's pickle names a global outside the allow-list, or asks for more memory than the caps allow."""


class UnsupportedCheckpointError(CheckpointError, UnsupportedBundleError):
    """The checkpoint is well-formed but holds settings a standalone bundle cannot represent."""


class TensorFlowConversionError(UnsupportedBundleError):
    """A TensorFlow archive that cannot be converted exactly to the PyTorch CNN (the message names the era or setting).

    Raised instead of producing an approximate model: SavedModel-era archives, the rectangular ``A + i*phi``
    combine, ``relu``/``softplus`` amplitude activations, unknown layers or a graph that is not upstream's CNN.
    """


class UnconvertibleInputError(BundleError, ValueError):
    """A file or folder handed to the converter is none of the formats it turns into bundles (a bare state_dict, an
    MLflow model directory, a dataset, unknown bytes, or already a PyTorch bundle); the message names what it is
    and what to do with it instead."""


class FlavorUnavailableError(PtychoFlavorError, AttributeError):
    """``mlflow.ptycho_torch`` was used where the flavor cannot load (e.g. ``mlflow-skinny`` without pandas).

    An ``AttributeError`` because it is raised on attribute access of the placeholder alias; the message names the
    import that failed and how to install what is missing. MLflow itself keeps working.
    """
