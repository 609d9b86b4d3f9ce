"""mlflow-ptycho-flavor: PtychoPINN PyTorch models as first-class MLflow models (flavor ``ptycho_torch``)."""

from .bundle import BundleLimits, load_torch_bundle, read_bundle, save_torch_bundle
from .errors import *  # noqa: F401,F403
from .network import NetworkConfig, PtychoPINNNetwork

__version__ = "0.1.0"
FLAVOR_NAME = "ptycho_torch"
