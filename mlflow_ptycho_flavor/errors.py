"""Typed errors of the standalone bundle layer.

Everything that reads, writes or runs a ``wts.h5.zip`` raises a subclass of :class:`BundleError` (or
:class:`PredictionInputError` for bad inference input), so callers can catch one family and users get a
message that names the cause and the fix. Nothing here imports MLflow; the flavor layer wraps these into
``MlflowException`` with the right error code.
"""

from __future__ import annotations

import itertools
import reprlib
from collections.abc import Iterator
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
    "NonFiniteWeightsError",
    "MAX_QUOTED_CHARS",
    "ModelFetchError",
    "BundleHashMismatchError",
    "short_repr",
    "short_message",
    "short_error",
]


class _BoundedRepr(reprlib.Repr):
    """``reprlib`` made safe for hostile values: bounded work as well as bounded output.

    ``reprlib`` dispatches on the exact type name, so a ``dict``/``list`` subclass (``OrderedDict``), a ``slice`` or
    ``bytes`` fall through to the builtin ``repr``, which walks everything (a "billion laughs" structure never
    finishes); it also sorts dict keys and sets (work proportional to their size) and formats huge ints in full.
    Here containers (and exceptions, whose repr is their arguments') are dispatched by ``isinstance`` and sliced
    without sorting, bytes are cut before formatting, and huge ints are described by their size; anything else
    (numbers, numpy and torch values, the unpickler's own records) has a bounded builtin ``repr``.
    """

    def repr1(self, x: Any, level: int) -> str:
        for base, method in (
            (str, self.repr_str), (bool, self.repr_instance), (int, self.repr_int), (bytes, self.repr_bytes),
            (bytearray, self.repr_bytes), (dict, self.repr_dict), (list, self.repr_list),
            (tuple, self.repr_tuple), (set, self.repr_set), (frozenset, self.repr_frozenset),
            (slice, self.repr_slice), (BaseException, self.repr_exception),
        ):
            if isinstance(x, base):
                return method(x, level)
        return self.repr_instance(x, level)

    def _items(self, items: Iterator[Any], size: int, level: int, left: str, right: str, limit: int) -> str:
        if not size:
            return left + right
        if level <= 0:
            return left + self.fillvalue + right
        pieces = [self.repr1(item, level - 1) for item in itertools.islice(items, limit)]
        if size > limit:
            pieces.append(self.fillvalue)
        return left + ", ".join(pieces) + right

    # The builtin types' own iterators: a subclass's overridden __iter__ is never called.
    def repr_list(self, x: Any, level: int) -> str:
        return self._items(list.__iter__(x), len(x), level, "[", "]", self.maxlist)

    def repr_tuple(self, x: Any, level: int) -> str:
        text = self._items(tuple.__iter__(x), len(x), level, "(", ")", self.maxtuple)
        return text[:-1] + ",)" if len(x) == 1 and level > 0 else text

    def repr_set(self, x: Any, level: int) -> str:
        return self._items(set.__iter__(x), len(x), level, "{", "}", self.maxset) if len(x) else "set()"

    def repr_frozenset(self, x: Any, level: int) -> str:
        if not len(x):
            return "frozenset()"
        return "frozenset(" + self._items(frozenset.__iter__(x), len(x), level, "{", "}", self.maxfrozenset) + ")"

    def repr_dict(self, x: Any, level: int) -> str:
        if not len(x):
            return "{}"
        if level <= 0:
            return "{" + self.fillvalue + "}"
        pieces = [
            f"{self.repr1(key, level - 1)}: {self.repr1(value, level - 1)}"
            for key, value in itertools.islice(dict.items(x), self.maxdict)
        ]
        if len(x) > self.maxdict:
            pieces.append(self.fillvalue)
        return "{" + ", ".join(pieces) + "}"

    def repr_bytes(self, x: Any, level: int) -> str:
        text = repr(bytes(x[: self.maxstring]))
        return text + self.fillvalue if len(x) > self.maxstring else text

    def repr_int(self, x: Any, level: int) -> str:
        if x.bit_length() > 128:  # repr of a huge int is quadratic (and refused past 4300 digits)
            return f"<int of {x.bit_length()} bits>"
        return super().repr_int(int(x), level)

    def repr_exception(self, x: Any, level: int) -> str:
        return type(x).__name__ + self.repr_tuple(x.args, level)

    def repr_slice(self, x: Any, level: int) -> str:
        if level <= 0:
            return f"slice({self.fillvalue})"
        return f"slice({', '.join(self.repr1(part, level - 1) for part in (x.start, x.stop, x.step))})"


_REPR = _BoundedRepr()
_REPR.maxstring = 160
_REPR.maxother = 160
_REPR.maxlong = 40
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = 10
_REPR.maxlevel = 3

#: Most characters :func:`short_repr` and :func:`short_error` return.
MAX_QUOTED_CHARS = 300


def short_repr(value: Any) -> str:
    """A bounded ``repr`` for error messages: values from a hostile file can be huge, deeply nested or shared.

    At most :data:`MAX_QUOTED_CHARS` characters come out, after work bounded by the output (no full walk, no
    sorting, no formatting of huge ints), whatever ``value`` is; a broken ``__repr__`` never replaces the real
    error.
    """
    try:
        text = _REPR.repr(value)
    except Exception:  # noqa: BLE001
        return f"<{type(value).__name__}>"
    return text if len(text) <= MAX_QUOTED_CHARS else text[: MAX_QUOTED_CHARS - 3] + "..."


def short_message(exc: BaseException) -> str:
    """``str(exc)`` of an exception raised while decoding untrusted bytes, bounded like :func:`short_repr` (a
    ``KeyError``'s message is the repr of its key, which may be anything; library messages may quote whole names)."""
    if isinstance(exc, KeyError) and len(exc.args) == 1:
        text = short_repr(exc.args[0])
    else:
        try:
            text = str(exc)
        except Exception:  # noqa: BLE001
            text = ""
    return text if len(text) <= MAX_QUOTED_CHARS else text[: MAX_QUOTED_CHARS - 3] + "..."


def short_error(exc: BaseException) -> str:
    """``"TypeName: message"`` with the message bounded by :func:`short_message`."""
    text = short_message(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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


class NonFiniteWeightsError(CorruptBundleError, ValueError):
    """The weights hold NaN or infinite values: refused when saving and when loading (docs/bundle-format.md §5).

    Such a network predicts NaN for every input, so its weights count as damaged; ``allow_nonfinite=True``
    (``save_torch_bundle``, ``write_bundle``, ``read_bundle``, ``load_torch_bundle``) lets them through for
    forensics. A ``ValueError`` too, since at save time it is the caller's network that is refused.
    """


class ModelFetchError(PtychoFlavorError):
    """A model URI cannot be fetched as a ``ptycho_torch`` bundle: it is not an MLflow model, not a ``ptycho_torch``
    one, or its MLmodel does not say which file the bundle is and what its sha256 is; nothing was written."""


class BundleHashMismatchError(ModelFetchError, CorruptBundleError):
    """The bundle downloaded from a model differs from the bytes its MLmodel's ``bundle_sha256`` records (a damaged
    or replaced artifact); nothing was written."""
