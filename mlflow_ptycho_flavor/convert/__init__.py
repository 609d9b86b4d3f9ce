"""Foreign model formats in, standalone bundles out (TensorFlow archives, Lightning checkpoints). Never imports
MLflow.

:func:`convert_any` is the one entry point the command line (``ptycho-flavor convert SRC DST``) and the flavor
(``mlflow.ptycho_torch.log_model("model.ckpt")``) share: it identifies what ``SRC`` is from bounded reads
(:func:`mlflow_ptycho_flavor.bundle.identify.identify_artifact`, docs/bundle-format.md §11) and hands it to the
converter for that kind - :func:`~mlflow_ptycho_flavor.convert.checkpoint.convert_checkpoint` (§10) or
:func:`~mlflow_ptycho_flavor.convert.tensorflow.convert_tf_bundle` (§9). Everything else is refused with an
:class:`~mlflow_ptycho_flavor.errors.UnconvertibleInputError` naming what the input is and what to do with it,
before anything is written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from mlflow_ptycho_flavor._io import PathLike
from mlflow_ptycho_flavor.bundle.identify import ArtifactInfo, ArtifactKind, identify_artifact
from mlflow_ptycho_flavor.convert.checkpoint import convert_checkpoint, read_checkpoint
from mlflow_ptycho_flavor.convert.tensorflow import convert_tf_bundle, read_tf_archive
from mlflow_ptycho_flavor.errors import InvalidArgumentError, UnconvertibleInputError, short_repr

__all__ = [
    "CONVERTIBLE_KINDS",
    "ConversionResult",
    "convert_any",
    "convert_checkpoint",
    "convert_tf_bundle",
    "unconvertible",
]

#: What :func:`convert_any` turns into bundles.
CONVERTIBLE_KINDS = frozenset({ArtifactKind.LIGHTNING_CHECKPOINT, ArtifactKind.TENSORFLOW_ARCHIVE})


@dataclass(frozen=True)
class ConversionResult:
    """What :func:`convert_any` did.

    Attributes:
        bundle: the ``wts.h5.zip`` written.
        source: the file converted (for a folder holding ``wts.h5.zip``, that file).
        source_kind: what the source was (a Lightning checkpoint or a TensorFlow archive).
        source_sha256: hex digest of the source bytes that were converted (also in the bundle's provenance).
        source_size: the source's size in bytes.
    """

    bundle: Path
    source: Path
    source_kind: ArtifactKind
    source_sha256: str
    source_size: int


def convert_any(src: PathLike, dst: PathLike, *, intensity_scale: float | None = None) -> ConversionResult:
    """Convert whatever ``src`` is into a standalone PyTorch bundle at ``dst``, or refuse saying what it is.

    Args:
        src: a Lightning checkpoint (``*.ckpt``) of upstream's current training, or a TensorFlow ``wts.h5.zip``
            (or a folder holding one).
        dst: ``out/wts.h5.zip``, ``out/wts.h5`` (``.zip`` appended), any ``*.zip`` (e.g. ptychodus's
            ``model.zip``), or an existing folder (``<folder>/wts.h5.zip``). Written atomically.
        intensity_scale: for checkpoints, the physics scale to record in ``params.dill`` (a checkpoint does not
            hold it; see :func:`~mlflow_ptycho_flavor.convert.checkpoint.convert_checkpoint`). A TensorFlow archive
            carries its own, so giving one there is refused.

    Returns:
        The bundle written and what it came from.

    Raises:
        UnconvertibleInputError: ``src`` is already a PyTorch bundle, or a bare state_dict, an MLflow model
            directory, a dataset, a missing path or unknown bytes (the message names it and the fix).
        InvalidArgumentError: ``intensity_scale`` given for a TensorFlow archive, or not a finite number.
        BundleError: the converter's own refusals (an older architecture era, hostile or damaged input, settings
            with no exact PyTorch counterpart), each naming the cause.
    """
    info = identify_artifact(src)
    if intensity_scale is not None and (
        isinstance(intensity_scale, bool) or not isinstance(intensity_scale, (int, float))
        or not math.isfinite(intensity_scale)
    ):
        raise InvalidArgumentError(f"intensity_scale must be a finite number, got {short_repr(intensity_scale)}")
    if info.kind is ArtifactKind.LIGHTNING_CHECKPOINT:
        checkpoint = read_checkpoint(info.path)
        bundle = convert_checkpoint(checkpoint, dst, intensity_scale=intensity_scale)
        return ConversionResult(bundle, checkpoint.path, info.kind, str(checkpoint.sha256), int(checkpoint.size_bytes))
    if info.kind is ArtifactKind.TENSORFLOW_ARCHIVE:
        if intensity_scale is not None:
            raise InvalidArgumentError(
                "intensity_scale applies to Lightning checkpoints only: a TensorFlow archive records its own "
                "(params.dill and model.h5), which the converted bundle keeps"
            )
        archive = read_tf_archive(info.path)
        bundle = convert_tf_bundle(archive, dst)
        return ConversionResult(bundle, archive.path, info.kind, archive.sha256, archive.size_bytes)
    raise unconvertible(info)


def unconvertible(info: ArtifactInfo) -> UnconvertibleInputError:
    """The refusal for an input :func:`convert_any` does not convert, naming what it is and what to do instead."""
    if info.kind is ArtifactKind.TORCH_BUNDLE:
        return UnconvertibleInputError(
            f"{info.sentence()}; it is already what loaders read, so there is nothing to convert: load it "
            "(load_torch_bundle, ptycho-flavor predict), log it (ptycho-flavor log) or copy it as it is"
        )
    return UnconvertibleInputError(
        f"{info.sentence()}. Only Lightning checkpoints (.ckpt) and TensorFlow wts.h5.zip archives are converted "
        "into bundles"
    )
