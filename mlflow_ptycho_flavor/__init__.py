"""mlflow-ptycho-flavor: PtychoPINN PyTorch models as first-class MLflow models (flavor ``ptycho_torch``).

Two layers:

* standalone (no MLflow needed): :func:`save_torch_bundle` / :func:`load_torch_bundle` read and write upstream's
  ``wts.h5.zip`` layout, with the clean-room networks :class:`PtychoPINNNetwork` (CNN) and
  :class:`PtychoFnoNetwork` (``fno_vanilla``, ``fno``, ``ffno``); :func:`convert_any` turns Lightning checkpoints
  and TensorFlow archives into such bundles, and :func:`identify_artifact` says what any file or folder is;
* the MLflow flavor: :func:`save_model`, :func:`log_model`, :func:`load_model` and the pyfunc loader. MLflow is
  imported only when one of these is first used, and ``mlflow.ptycho_torch`` appears as soon as both this
  package and MLflow are imported, in either order.

Example:
    >>> import mlflow, mlflow_ptycho_flavor  # doctest: +SKIP
    >>> info = mlflow.ptycho_torch.log_model(network, name="model")  # doctest: +SKIP
    >>> obj = mlflow.pyfunc.load_model(info.model_uri).predict(amplitudes)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

#: The flavor's name in MLmodel files and the ``mlflow.<name>`` alias (defined before any submodule is imported).
FLAVOR_NAME = "ptycho_torch"

from mlflow_ptycho_flavor import _mlflow_hook  # noqa: E402
from mlflow_ptycho_flavor.bundle import BundleLimits, load_torch_bundle, read_bundle, save_torch_bundle
from mlflow_ptycho_flavor.bundle.identify import ArtifactKind, identify_artifact
from mlflow_ptycho_flavor.convert import convert_any
from mlflow_ptycho_flavor.errors import (
    ArchitectureEraError,
    BundleError,
    CheckpointError,
    ConfigMismatchError,
    CorruptBundleError,
    DatasetError,
    NotABundleError,
    PredictionInputError,
    PtychoFlavorError,
    StateDictMismatchError,
    TensorFlowBundleError,
    TensorFlowConversionError,
    UnconvertibleInputError,
    UnsafeBundleError,
    UnsupportedBundleError,
)
from mlflow_ptycho_flavor.model.inference import PtychoTorchModel
from mlflow_ptycho_flavor.network import FnoNetworkConfig, NetworkConfig, PtychoFnoNetwork, PtychoPINNNetwork
from mlflow_ptycho_flavor.bundle.params import restore_params

__version__ = "0.1.0"

__all__ = [
    "FLAVOR_NAME",
    "save_model",
    "log_model",
    "load_model",
    "get_default_pip_requirements",
    "get_default_conda_env",
    "spark_predict",
    "save_torch_bundle",
    "load_torch_bundle",
    "read_bundle",
    "restore_params",
    "convert_any",
    "identify_artifact",
    "ArtifactKind",
    "BundleLimits",
    "NetworkConfig",
    "PtychoPINNNetwork",
    "FnoNetworkConfig",
    "PtychoFnoNetwork",
    "PtychoTorchModel",
    "PtychoFlavorError",
    "BundleError",
    "NotABundleError",
    "CorruptBundleError",
    "UnsafeBundleError",
    "UnsupportedBundleError",
    "TensorFlowBundleError",
    "TensorFlowConversionError",
    "CheckpointError",
    "UnconvertibleInputError",
    "ArchitectureEraError",
    "ConfigMismatchError",
    "StateDictMismatchError",
    "PredictionInputError",
    "DatasetError",
]

_FLAVOR_ATTRIBUTES = {
    "save_model",
    "log_model",
    "load_model",
    "get_default_pip_requirements",
    "get_default_conda_env",
    "infer_signature",
}


def __getattr__(name: str) -> Any:
    """Import the MLflow side lazily, so the standalone loader never pays for (or needs) MLflow."""
    if name in _FLAVOR_ATTRIBUTES:
        from mlflow_ptycho_flavor import flavor

        return getattr(flavor, name)
    if name == "spark_predict":
        from mlflow_ptycho_flavor.flavor.spark import spark_predict

        return spark_predict
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _load_pyfunc(path: str, model_config: dict | None = None):
    """pyfunc loader entry point (``loader_module: mlflow_ptycho_flavor`` in MLmodel)."""
    from mlflow_ptycho_flavor.flavor import _load_pyfunc as load

    return load(path, model_config)


_mlflow_hook.install()
