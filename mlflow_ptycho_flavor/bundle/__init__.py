"""The standalone ``wts.h5.zip`` bundle format: reading, validating, loading and writing. Never imports MLflow.

Layers inside (each imports only those before it): :mod:`.archive` (bounded zip reader and writer),
:mod:`.unpickle` (restricted decoding of pickled members), :mod:`.params` (the legacy ``params.cfg`` snapshot and
CONFIG-001), :mod:`.metadata` (``torch_scaling_metadata.pt`` <-> network config), :mod:`.compat` (eras and the
fit check), :mod:`.io` (``read_bundle`` / ``load_torch_bundle`` / ``save_torch_bundle``).
"""

from mlflow_ptycho_flavor.bundle.archive import (
    BUNDLE_FILE_NAME,
    DEFAULT_LIMITS,
    BundleLimits,
    looks_like_bundle_path,
    resolve_bundle_path,
)
from mlflow_ptycho_flavor.bundle.io import BundleContents, load_torch_bundle, read_bundle, save_torch_bundle

__all__ = [
    "BUNDLE_FILE_NAME",
    "DEFAULT_LIMITS",
    "BundleContents",
    "BundleLimits",
    "load_torch_bundle",
    "looks_like_bundle_path",
    "read_bundle",
    "resolve_bundle_path",
    "save_torch_bundle",
]
