"""The models every section measures: one seeded network per gridsize, saved by us and by ``mlflow.pytorch``.

* ours: ``mlflow_ptycho_flavor.save_model`` (an MLflow model folder holding ``wts.h5.zip``);
* the floor's input: ``torch.save(network.state_dict())``;
* ``mlflow.pytorch`` in ``pt2`` (``torch.export``, its default) and ``pickle`` format, of a wrapper whose
  ``forward(x)`` returns ``torch.view_as_real(network(x, None))`` (what ``mlflow.pytorch`` needs to serve it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mlflow_ptycho_flavor import NetworkConfig, PtychoPINNNetwork
from mlflow_ptycho_flavor.network import use_channels_last

__all__ = ["PICKLE_ENV", "build_network", "RealImagWrapper", "ModelSet", "make_models", "inputs", "eager_copy",
           "floor_load", "load_pyfunc"]

#: MLflow refuses to unpickle an ``mlflow.pytorch`` pickle-format model unless this is "true".
PICKLE_ENV = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"


def build_network(N: int = 64, gridsize: int = 1, n_filters_scale: int = 2, seed: int = 0) -> PtychoPINNNetwork:
    """The benchmark network: seeded default initialisation, eval mode, on the CPU (same seed -> same weights)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = PtychoPINNNetwork(NetworkConfig(N=N, C_model=gridsize * gridsize, n_filters_scale=n_filters_scale))
    return network.eval()


class RealImagWrapper(nn.Module):
    """``forward(x) = torch.view_as_real(network(x, None))``: float32 ``(B, C, N, N, 2)``, JSON-friendly.

    The same numbers as the flavor's complex64 output; ``None`` means a unit input factor, as the flavor's default.
    """

    def __init__(self, network: PtychoPINNNetwork) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.view_as_real(self.network(x, None))


@dataclass
class ModelSet:
    """One network and every saved form of it; the ``mlflow.pytorch`` folders are None when not made."""

    N: int
    gridsize: int
    filters: int
    network: PtychoPINNNetwork
    ours_dir: Path
    state_path: Path
    pt2_dir: Path | None = None
    pickle_dir: Path | None = None

    @property
    def channels(self) -> int:
        return self.gridsize * self.gridsize

    @property
    def bundle(self) -> Path:
        return self.ours_dir / "wts.h5.zip"

    @property
    def has_references(self) -> bool:
        return self.pt2_dir is not None and self.pickle_dir is not None


def make_models(work: Path, N: int, gridsize: int, filters: int, *, references: bool = True) -> ModelSet:
    """Save the seeded network (seed = gridsize) under ``work`` in our format, as a state_dict and, with
    ``references``, in both ``mlflow.pytorch`` formats."""
    import mlflow
    import mlflow.pytorch
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    import mlflow_ptycho_flavor

    network = build_network(N, gridsize, filters, seed=gridsize)
    tag = f"n{N}_g{gridsize}"
    models = ModelSet(N, gridsize, filters, network, work / f"ours_{tag}", work / f"state_dict_{tag}.pt")
    mlflow_ptycho_flavor.save_model(network, models.ours_dir)
    torch.save(network.state_dict(), models.state_path)
    if not references:
        return models
    C = models.channels
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, C, N, N))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, C, N, N, 2))]),
    )
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]
    models.pt2_dir = work / f"pytorch_pt2_{tag}"
    mlflow.pytorch.save_model(RealImagWrapper(network).eval(), models.pt2_dir, serialization_format="pt2",
                              input_example=inputs(2, C, N), signature=signature, pip_requirements=requirements)
    models.pickle_dir = work / f"pytorch_pickle_{tag}"
    mlflow.pytorch.save_model(RealImagWrapper(network).eval(), models.pickle_dir, serialization_format="pickle",
                              signature=signature, pip_requirements=requirements)
    return models


def inputs(batch: int, channels: int, N: int, seed: int = 0) -> np.ndarray:
    """Seeded float32 amplitudes ``(batch, channels, N, N)`` in [0, 2)."""
    return np.random.default_rng(seed).uniform(0, 2, (batch, channels, N, N)).astype(np.float32)


def eager_copy(network: nn.Module) -> nn.Module:
    """A copy of ``network`` in torch's default contiguous layout, activations included: the eager forward a user
    of the bare module gets. The model's own module runs NHWC activations on the CPU (its ``channels_last`` flag),
    which ``.to(memory_format=torch.contiguous_format)`` alone would keep."""
    import copy

    return use_channels_last(copy.deepcopy(network), enabled=False)


def floor_load(state_path: Path, N: int, channels: int, filters: int, device: str) -> PtychoPINNNetwork:
    """The floor of any load: ``torch.load`` of the bare state_dict, construct the module, strict load, eval."""
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    network = PtychoPINNNetwork(NetworkConfig(N=N, C_model=channels, n_filters_scale=filters))
    network.load_state_dict(state, strict=True)
    return network.to(device).eval()


def load_pyfunc(path: Path, device: str) -> Any:
    """``mlflow.pyfunc.load_model`` of a local model folder on ``device``."""
    import mlflow.pyfunc

    return mlflow.pyfunc.load_model(str(path), model_config={"device": device})
