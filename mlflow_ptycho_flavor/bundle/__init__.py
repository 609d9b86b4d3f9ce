"""The standalone ``wts.h5.zip`` bundle format: reading, validating, loading and writing. Never imports MLflow.

Layers inside (each imports only those before it): :mod:`.identify` (what a file or folder is, from bounded
reads: bundle, TensorFlow archive, Lightning checkpoint, bare state_dict, MLflow model directory, dataset),
:mod:`.archive` (bounded zip reader and writer; its refusals name what a foreign file is),
:mod:`.budget` (bounded work on untrusted pickles and decoded values), :mod:`.unpickle` (restricted decoding of
pickled members), :mod:`.params` (the legacy ``params.cfg`` snapshot and CONFIG-001), :mod:`.metadata`
(``torch_scaling_metadata.pt`` <-> network config), :mod:`.compat` (eras and the fit check), :mod:`.io`
(``read_bundle`` / ``read_and_build`` / ``load_torch_bundle``), :mod:`.writer` (``save_torch_bundle`` / ``write_bundle``).
"""

from mlflow_ptycho_flavor.bundle.archive import (
    BUNDLE_FILE_NAME,
    DEFAULT_LIMITS,
    BundleLimits,
    looks_like_bundle_path,
    resolve_bundle_path,
)
from mlflow_ptycho_flavor.bundle.identify import ArtifactInfo, ArtifactKind, describe_for_error, identify_artifact
from mlflow_ptycho_flavor.bundle.io import BundleContents, load_torch_bundle, read_and_build, read_bundle
from mlflow_ptycho_flavor.bundle.writer import save_torch_bundle

__all__ = [
    "ArtifactInfo",
    "ArtifactKind",
    "BUNDLE_FILE_NAME",
    "DEFAULT_LIMITS",
    "BundleContents",
    "BundleLimits",
    "describe_for_error",
    "identify_artifact",
    "load_torch_bundle",
    "looks_like_bundle_path",
    "read_and_build",
    "read_bundle",
    "resolve_bundle_path",
    "save_torch_bundle",
]
