"""Shared helpers of the FNO-family tests (``import fno_helpers``, like ``serving_tools``): the upstream fixtures
under tests/data/upstream_fno, their byte conventions, and seeded perturbed networks."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import torch

from mlflow_ptycho_flavor.network import FnoNetworkConfig, PtychoFnoNetwork

FIXTURE_DIR = Path(__file__).resolve().parent / "data" / "upstream_fno"
FIXTURES = ["n64_g1_ffno_default", "n64_g1_fno_ampphase"]
# Acceptance bound of the fixtures' README: upstream's own equivalent evaluations (1 vs 2 threads, mkldnn off,
# channels_last, float64) moved these outputs by <= 2e-6, because FFT and conv kernels sum in different orders on
# other CPUs and thread counts; the smallest meaningful change (reverting any single tensor) is >= 4.9e-3.
TOLERANCE = 5e-5
# docs/bundle-format.md §8.6.4: keys at the default sizes, (real_imag or amp_phase_logits, amp_phase); the counts
# do not depend on N, gridsize or fno_modes.
KEY_TABLE = {"fno_vanilla": (40, 44), "fno": (52, 56), "ffno": (166, 170)}
DISTINCT_TABLE = {"fno_vanilla": (22, 24), "fno": (28, 30), "ffno": (45, 47)}


def expected_keys(architecture: str, output_mode: str) -> int:
    return KEY_TABLE[architecture][output_mode == "amp_phase"]


def expected_distinct(architecture: str, output_mode: str) -> int:
    return DISTINCT_TABLE[architecture][output_mode == "amp_phase"]


def read_fixture(name: str) -> dict:
    """A fixture's raw state_dict and metadata (trusted files: plain ``torch.load(weights_only=True)``), io, meta."""
    folder = FIXTURE_DIR / name
    with zipfile.ZipFile(folder / "wts.h5.zip") as archive:
        state_dict = torch.load(io.BytesIO(archive.read("diffraction_to_obj/model.pth")), weights_only=True)
        metadata = torch.load(io.BytesIO(archive.read("torch_scaling_metadata.pt")), weights_only=True)
    data = np.load(folder / "io.npz")
    return {
        "bundle": folder / "wts.h5.zip",
        "state_dict": state_dict,
        "metadata": metadata,
        "io": {k: data[k] for k in data.files},
        "meta": json.loads((folder / "meta.json").read_text()),
    }


def le_bytes(tensor: torch.Tensor) -> bytes:
    """C-order little-endian bytes as meta.json hashes them (complex64: interleaved float32 real, imag)."""
    array = tensor.detach().cpu().contiguous().numpy()
    return array.astype(array.dtype.newbyteorder("<")).tobytes()


def distinct_storages(state_dict) -> int:
    return len({t.untyped_storage().data_ptr() for t in state_dict.values()})


def make_perturbed_fno_network(seed: int = 0, **config) -> PtychoFnoNetwork:
    """A network whose every distinct tensor holds seeded non-trivial values that keep the output O(1).

    Conv weights keep their default init plus noise; spectral weights get ~1/width so the spectral path carries
    as much as the local one; the ffno gate and InstanceNorm affine parameters move away from 0.1 / 1 / 0. The
    same seed and config give bit-identical weights.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = PtychoFnoNetwork(FnoNetworkConfig(**config))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, tensor in network.named_parameters():  # distinct tensors only: aliases stay aliases
            if tensor.is_complex():
                noise = torch.randn(tensor.shape, generator=gen, dtype=torch.complex64)
                tensor.copy_(noise * (0.7 / tensor.shape[0]))
            elif name.endswith("shared_gate"):
                tensor.fill_(0.7)
            elif ".norm." in name:
                tensor.add_(0.3 * torch.randn(tensor.shape, generator=gen))
            else:
                noise = torch.randn(tensor.shape, generator=gen)
                std = float(tensor.std()) if tensor.numel() > 1 else 0.0
                tensor.add_((0.2 * std if std > 0 else 0.2) * noise)
    return network.eval()


def amplitudes(batch: int, channels: int, n: int = 64, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 2, (batch, channels, n, n)).astype(np.float32)
