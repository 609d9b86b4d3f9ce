"""The forward physics, once in numpy (simulation, checks) and once in torch (training): object patches -> amplitudes.

The model (used by :mod:`.simulate` through :func:`predict_amplitudes` and by the trainer through
:class:`ForwardModel`, so data and loss agree exactly)::

    far_field  = fftshift(fft2(probe * patch), axes=(-2, -1)) / N      # zero frequency at pixel (N//2, N//2)
    amplitude  = photon_scale * |far_field|                            # noise-free, float64
    counts     = Poisson(amplitude**2)            (or amplitude**2 when poisson=False)
    diff3d     = float32(sqrt(counts))

``patch`` is the N x N object crop whose pixel ``(N//2, N//2)`` sits at the scan position, and ``probe`` is
``probeGuess`` (centred at the same pixel). ``photon_scale`` is chosen so that the mean over patterns of the
expected total counts ``sum(amplitude**2)`` equals ``nphotons``. Because only the modulus is kept, applying
``ifftshift`` to ``probe * patch`` before the FFT would not change the result.

Scale conventions (docs/bundle-format.md §2.4, §4.3, §8.4)
-----------------------------------------
With ``diff3d`` the measured amplitudes (sqrt counts) of the training set and ``probe`` its ``probeGuess``:

* ``f = normalization_factor(diff3d) = sqrt((N/2)**2 / mean_patterns sum_pixels diff3d**2)`` (upstream's
  RawData normalization). **Network input:** the raw amplitudes with ``input_scale_factor = f``, i.e.
  ``network(diff3d, f)``, so the convolutions see the normalized amplitudes ``X = f * diff3d`` exactly as
  upstream's training does. **At inference pass the raw amplitudes and scale = the same formula over the data
  being reconstructed** - ``PtychoTorchModel.predict(diff, normalize="dataset")``, or
  ``network(x, normalization_factor(diff))`` - which is upstream's inference-CLI convention (docs/bundle-format.md §4.3). The
  network is built with ``intensity_scale_trainable=False``, so the factor is always honoured (docs/bundle-format.md §8.4).
* ``nphotons``: :attr:`TrainConfig.nphotons`, or by default the measured mean total counts per training
  pattern ``mean_patterns sum_pixels diff3d**2`` (the dataset's own photon budget).
* ``intensity_scale = sqrt(nphotons / mean_patterns sum_pixels X**2)`` (docs/bundle-format.md §2.4; ``= sqrt(nphotons)/(N/2)``
  since ``X`` has mean energy ``(N/2)**2``). It is recorded in the bundle's ``params.dill`` and
  ``TrainResult.intensity_scale``.
* ``photon_scale``: the amplitude factor of the simulator's forward model (above). Taken
  from ``dataset.photon_scale`` when present (simulated data or an NPZ with that key), which makes the forward
  model exact and the trained network converge to the *true* object. Otherwise it is estimated as
  ``sqrt(mean counts / sum |probe|**2)``, i.e. assuming an object of unit modulus on average under the probe;
  the overall modulus of the object is not measurable from diffraction data with a given probe scale, so in that
  case the reconstruction is the true object times an unknown real constant.

Forward model and loss (``ForwardModel``), per pattern, with ``O`` the network's complex ``(N, N)`` output::

    P_n    = f * photon_scale * probe                                # probe in normalized-amplitude units
    A_pred = intensity_scale * |fftshift(fft2(P_n * O)) / N|          # predicted amplitudes
    A_meas = intensity_scale * X = intensity_scale * f * diff3d      # measured amplitudes, same units
    poisson: mean(A_pred**2 - K * log(A_pred**2) + K * log(K) - K),  K = A_meas**2   (Poisson NLL on counts,
             offset so that a perfect fit of noise-free data scores 0)
    mae:     mean(|A_pred - A_meas|)

So ``intensity_scale`` enters exactly as in upstream's physics loss: both predicted and measured amplitudes are
put on the count scale of ``nphotons`` photons per pattern (with the default ``nphotons``,
``intensity_scale * f == 1`` and ``K`` are the measured counts themselves). For the true object patch,
``A_pred = intensity_scale * f * data.predict_amplitudes(dataset, patch)``, i.e. the forward model reproduces the
simulator's noise-free data on the loss's scale (tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from mlflow_ptycho_flavor.errors import InvalidArgumentError
from mlflow_ptycho_flavor.sim.dataset import PtychoDataset, normalization_factor

__all__ = ["PhysicsScaling", "ForwardModel", "compute_scaling", "far_field_amplitudes", "predict_amplitudes"]

#: Predictions are computed in chunks of this many patterns to bound the complex128 temporaries.
_CHUNK = 1024


def predict_amplitudes(
    dataset_or_probe: PtychoDataset | np.ndarray,
    patches: np.ndarray,
    photon_scale: float | None = None,
) -> np.ndarray:
    """Noise-free far-field amplitudes of complex object patches: the simulator's exact forward model.

    Computes ``photon_scale * |fftshift(fft2(probe * patch), axes=(-2, -1)) / N|`` in complex128 (the shift
    acts on the two pattern axes only). For a dataset from :func:`simulate_dataset` with ``poisson=False``,
    ``predict_amplitudes(ds, ds.ground_truth_patches)`` equals ``ds.diff3d`` up to the float32 rounding of
    ``diff3d``.

    Args:
        dataset_or_probe: A dataset (its ``probeGuess`` and, unless overridden, its ``photon_scale`` are used)
            or an (N, N) complex probe.
        patches: (..., N, N) complex object patches, pixel (N//2, N//2) at the scan position.
        photon_scale: Amplitude scale. Default: the dataset's ``photon_scale``, or 1.0 for a bare probe.

    Returns:
        (..., N, N) float64 amplitudes.

    Raises:
        ValueError: Shapes disagree, or a dataset without ``photon_scale`` is given and none is passed.
    """
    if isinstance(dataset_or_probe, PtychoDataset):
        probe = dataset_or_probe.probeGuess
        if photon_scale is None:
            if dataset_or_probe.photon_scale is None:
                raise InvalidArgumentError("The dataset has no `photon_scale` (not simulated here); pass `photon_scale=`.")
            photon_scale = dataset_or_probe.photon_scale
    else:
        probe = np.asarray(dataset_or_probe)
        if photon_scale is None:
            photon_scale = 1.0
    if probe.ndim != 2 or probe.shape[0] != probe.shape[1]:
        raise InvalidArgumentError(f"`probe` must be a square (N, N) array, got shape {probe.shape}.")
    n = probe.shape[0]
    patches = np.asarray(patches)
    if patches.ndim < 2 or patches.shape[-2:] != (n, n):
        raise InvalidArgumentError(f"`patches` must have shape (..., {n}, {n}) to match the probe, got {patches.shape}.")
    probe128 = probe.astype(np.complex128)
    flat = patches.reshape(-1, n, n)
    out = np.empty(flat.shape, dtype=np.float64)
    for start in range(0, flat.shape[0], _CHUNK):
        field = flat[start:start + _CHUNK].astype(np.complex128) * probe128
        far = np.fft.fftshift(np.fft.fft2(field, axes=(-2, -1)), axes=(-2, -1))
        out[start:start + _CHUNK] = np.abs(far) * (float(photon_scale) / n)
    return out.reshape(patches.shape)


@dataclass(frozen=True)
class PhysicsScaling:
    """The constants of the forward model (module docstring) for one training set."""

    normalization_factor: float
    nphotons: float
    intensity_scale: float
    photon_scale: float
    photon_scale_source: Literal["dataset", "estimated"]

    @property
    def probe_factor(self) -> float:
        """``f * photon_scale``: multiplies ``probeGuess`` into normalized-amplitude units."""
        return self.normalization_factor * self.photon_scale

    @property
    def target_factor(self) -> float:
        """``intensity_scale * f``: multiplies the raw amplitudes into the loss's amplitude units."""
        return self.intensity_scale * self.normalization_factor


def _mean_counts(diff3d: np.ndarray) -> float:
    a = np.asarray(diff3d, dtype=np.float64)
    return float(np.mean(np.sum(a * a, axis=(-2, -1))))


def compute_scaling(dataset: PtychoDataset, nphotons: float | None = None) -> PhysicsScaling:
    """The forward model's constants for ``dataset`` (see the module docstring for the formulas).

    Raises:
        ValueError: the dataset holds no counts, or its probe is zero.
    """
    diff = dataset.diff3d
    measured = _mean_counts(diff)
    if not measured > 0:
        raise InvalidArgumentError("The training diffraction patterns are all zero; there is nothing to train on.")
    f = normalization_factor(diff)
    nph = measured if nphotons is None else float(nphotons)
    x_energy = measured * f * f  # mean sum X**2 with X = f * diff3d; (N/2)**2 up to rounding
    intensity_scale = math.sqrt(nph / x_energy)
    if dataset.photon_scale is not None:
        photon_scale, source = float(dataset.photon_scale), "dataset"
    else:
        probe_energy = float(np.sum(np.abs(dataset.probeGuess.astype(np.complex128)) ** 2))
        if not probe_energy > 0:
            raise InvalidArgumentError("`probeGuess` is zero everywhere; the forward model needs the illumination.")
        photon_scale, source = math.sqrt(measured / probe_energy), "estimated"
    return PhysicsScaling(
        normalization_factor=float(f),
        nphotons=float(nph),
        intensity_scale=float(intensity_scale),
        photon_scale=photon_scale,
        photon_scale_source=source,
    )


def far_field_amplitudes(
    patches: torch.Tensor, probe: torch.Tensor, scale: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """Differentiable torch twin of :func:`predict_amplitudes`: ``scale * |fftshift(fft2(probe*O))/N|``.

    Args:
        patches: complex ``(..., N, N)`` object patches.
        probe: complex ``(N, N)`` illumination (broadcast over the leading axes).
        scale: amplitude factor (the simulator's ``photon_scale`` to reproduce its data).

    Returns:
        real ``(..., N, N)`` amplitudes in the precision of the inputs (complex64 -> float32).
    """
    return _far_field(patches, probe, scale).abs()


def _far_field(patches: torch.Tensor, probe: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    n = probe.shape[-1]
    if patches.shape[-2:] != probe.shape[-2:] or probe.shape[-2] != n:
        raise InvalidArgumentError(
            f"`patches` {tuple(patches.shape)} and `probe` {tuple(probe.shape)} must share the trailing (N, N) shape"
        )
    far = torch.fft.fftshift(torch.fft.fft2(patches * probe), dim=(-2, -1))
    return far * (scale / n)


class ForwardModel:
    """The training physics: complex object patches -> amplitudes on the loss's scale (module docstring).

    Args:
        probe: the dataset's ``(N, N)`` complex ``probeGuess``.
        scaling: from :func:`compute_scaling`.
        device: where the probe lives.
    """

    def __init__(self, probe: np.ndarray, scaling: PhysicsScaling, device: torch.device | str = "cpu") -> None:
        self.scaling = scaling
        probe_n = np.asarray(probe).astype(np.complex128) * scaling.probe_factor
        self.probe = torch.from_numpy(probe_n.astype(np.complex64)).to(device)
        self.intensity_scale = float(scaling.intensity_scale)

    def far_field(self, objects: torch.Tensor) -> torch.Tensor:
        """Complex ``intensity_scale * fftshift(fft2(P_n * O)) / N`` for ``(B, N, N)`` or ``(B, 1, N, N)``."""
        if objects.dim() == 4:
            if objects.shape[1] != 1:
                raise InvalidArgumentError(f"gridsize 1 only: expected (B, 1, N, N) objects, got {tuple(objects.shape)}")
            objects = objects[:, 0]
        return _far_field(objects, self.probe, self.intensity_scale)

    def amplitudes(self, objects: torch.Tensor) -> torch.Tensor:
        """Predicted amplitudes ``A_pred``, real ``(B, N, N)``."""
        return self.far_field(objects).abs()

    def target_amplitudes(self, diff3d: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Measured raw amplitudes -> ``A_meas = intensity_scale * f * diff3d`` (float32 tensor)."""
        if isinstance(diff3d, torch.Tensor):
            return (diff3d.to(torch.float64) * self.scaling.target_factor).to(torch.float32)
        return torch.from_numpy((np.asarray(diff3d, dtype=np.float64) * self.scaling.target_factor).astype(np.float32))
