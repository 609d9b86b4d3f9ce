"""Shared pieces of the hostile-bundle corpora (tests/test_hostile_bundles.py and tests/test_hostile_bundles_2.py):
member names, a base bundle that loads, its decoded members, and pickle builders for crafted payloads.

The fixtures are module-scoped; a test module imports them by name to use them.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from mlflow_ptycho_flavor import load_torch_bundle, save_torch_bundle

MANIFEST = "manifest.dill"


WEIGHTS = "diffraction_to_obj/model.pth"


PARAMS = "diffraction_to_obj/params.dill"


AE_PARAMS = "autoencoder/params.dill"


METADATA = "torch_scaling_metadata.pt"


MB = 1024 * 1024


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from conftest import make_perturbed_network

    network = make_perturbed_network(seed=3, N=64, n_filters_scale=1)
    path = save_torch_bundle(network, tmp_path_factory.mktemp("base") / "wts.h5.zip")
    load_torch_bundle(path, device="cpu")  # the corpus starts from a bundle that loads (and warms up imports)
    return path


@pytest.fixture(scope="module")
def members(base) -> dict:
    with zipfile.ZipFile(base) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


@pytest.fixture(scope="module")
def params(members) -> dict:
    return pickle.loads(members[PARAMS])  # our own file: trusted


@pytest.fixture(scope="module")
def metadata(members) -> dict:
    return torch.load(io.BytesIO(members[METADATA]), weights_only=True)


@pytest.fixture(scope="module")
def state_dict(members) -> OrderedDict:
    return torch.load(io.BytesIO(members[WEIGHTS]), weights_only=True)


def torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


class Reduce:
    """Unpickling calls ``func(*args)``."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def numpy_array_state(shape, dtype, raw):
    from numpy._core.multiarray import _reconstruct

    class _Array:
        def __reduce__(self):
            return (_reconstruct, (np.ndarray, (0,), b"b"), (1, shape, dtype, False, raw))

    return _Array()


BOMB = 50 * MB
