"""Reconstruction metrics: relative L2 error after removing the global phase, phase correlation, the illuminated window.

Far-field intensities never determine a constant phase of the object, so every comparison with a ground truth
first multiplies the reconstruction by the phase ``e^{i phi}`` that best matches it (least squares over the
window): per pattern for patches, once for a stitched object.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from mlflow_ptycho_flavor.errors import InvalidArgumentError

__all__ = [
    "ILLUMINATION_THRESHOLD",
    "align_global_phase",
    "illuminated_window",
    "phase_correlation",
    "reconstruction_error",
]

#: Probe amplitude (fraction of its peak) below which a pixel counts as not illuminated.
ILLUMINATION_THRESHOLD = 0.1


def _as_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _window_mask(shape: tuple[int, int], window: str | np.ndarray) -> np.ndarray:
    rows, cols = shape
    if isinstance(window, str):
        if window == "center":
            mask = np.zeros(shape, dtype=bool)
            mask[rows // 4 : rows - rows // 4, cols // 4 : cols - cols // 4] = True
            return mask
        if window == "full":
            return np.ones(shape, dtype=bool)
        raise InvalidArgumentError(f"`window`={window!r} must be 'center', 'full' or a boolean {shape} mask")
    mask = np.asarray(window)
    if mask.dtype != bool or mask.shape != tuple(shape):
        raise InvalidArgumentError(f"`window` mask must be a boolean {tuple(shape)} array, got {mask.dtype} {mask.shape}")
    if not mask.any():
        raise InvalidArgumentError("`window` mask selects no pixel")
    return mask


def illuminated_window(probe: Any, threshold: float = ILLUMINATION_THRESHOLD) -> np.ndarray:
    """Boolean ``(N, N)`` mask: the central ``N/2 x N/2`` square where ``|probe| >= threshold * max|probe|``.

    A single diffraction pattern carries no information about the object where no light falls, so errors of
    gridsize-1 reconstructions are reported over this window.
    """
    amp = np.abs(_as_numpy(probe))
    if amp.ndim != 2 or amp.shape[0] != amp.shape[1]:
        raise InvalidArgumentError(f"`probe` must be a square (N, N) array, got shape {amp.shape}")
    peak = float(amp.max())
    if not peak > 0:
        raise InvalidArgumentError("`probe` is zero everywhere; nothing is illuminated")
    mask = _window_mask(amp.shape, "center") & (amp >= threshold * peak)
    if not mask.any():
        raise InvalidArgumentError(f"no pixel of the central window has probe amplitude >= {threshold} x its peak")
    return mask


def align_global_phase(
    pred: Any, truth: Any, *, window: str | np.ndarray = "full", per_pattern: bool = False
) -> np.ndarray:
    """``pred`` times the phase ``e^{-i phi}``, ``phi = angle(sum(pred * conj(truth)))`` over the window.

    That phase minimises ``||pred e^{-i phi} - truth||`` (least squares). Arrays are ``(..., H, W)``; with
    ``per_pattern`` every leading index gets its own phase, else one phase serves the whole stack.
    """
    p = _as_numpy(pred)
    t = _as_numpy(truth)
    if p.shape != t.shape:
        raise InvalidArgumentError(f"`pred` shape {p.shape} does not match `truth` shape {t.shape}")
    if p.ndim < 2:
        raise InvalidArgumentError(f"`pred` must be (..., H, W) images, got shape {p.shape}")
    mask = _window_mask(p.shape[-2:], window)
    flat_p = p.astype(np.complex128).reshape(-1, *p.shape[-2:])
    flat_t = t.astype(np.complex128).reshape(-1, *t.shape[-2:])
    overlap = np.sum(flat_p[:, mask] * np.conj(flat_t[:, mask]), axis=1)
    if not per_pattern:
        overlap = np.full_like(overlap, overlap.sum())
    phase = np.exp(-1j * np.angle(overlap))
    return (flat_p * phase[:, None, None]).reshape(p.shape)


def reconstruction_error(
    pred: Any, truth: Any, *, window: str | np.ndarray = "center", per_pattern: bool = True
) -> float:
    """Relative L2 error of complex images after removing the global phase offset (:func:`align_global_phase`).

    The error is ``sqrt(sum |aligned - truth|**2 / sum |truth|**2)`` pooled over all images and window pixels.

    Args:
        pred: complex ``(..., H, W)`` reconstructions (numpy or torch; a channel axis of 1 is fine).
        truth: complex ground truth of the same shape.
        window: ``"center"`` (default: the central half in each direction, the region a gridsize-1 network
            reconstructs well: the heads' main path covers exactly that window, docs/bundle-format.md §3.4),
            ``"full"``, or a boolean ``(H, W)`` mask.
        per_pattern: one phase per pattern (default; each pattern's phase is independently undetermined) or a
            single phase for the whole stack (a stitched object).

    Raises:
        ValueError: shapes differ, the window is invalid, or the truth is zero in the window.
    """
    aligned = align_global_phase(pred, truth, window=window, per_pattern=per_pattern)
    t = _as_numpy(truth).astype(np.complex128)
    mask = _window_mask(t.shape[-2:], window)
    a = aligned.reshape(-1, *t.shape[-2:])[:, mask]
    t = t.reshape(-1, *t.shape[-2:])[:, mask]
    denom = float(np.sum(np.abs(t) ** 2))
    if not denom > 0:
        raise InvalidArgumentError("`truth` is zero inside the window; the relative error is undefined")
    return float(math.sqrt(float(np.sum(np.abs(a - t) ** 2)) / denom))


#: Phase spread (rad) below which a phase map counts as constant (rounding of a rotated constant is ~1e-16 rad).
_CONSTANT_PHASE_STD = 1e-9


def phase_correlation(pred: Any, truth: Any, *, window: str | np.ndarray = "full") -> float:
    """Pearson correlation of the reconstructed and the true phase over the window, global phase removed.

    The reconstruction is first multiplied by the global phase that best matches the truth
    (:func:`align_global_phase`, one phase for the whole image), then ``corrcoef(angle(aligned), angle(truth))`` is
    taken over the window's pixels. 1 means the phase map is recovered up to scale and offset, 0 that it is not
    there at all (a flat or unrelated phase). It complements :func:`reconstruction_error`, which a good amplitude
    can keep low while the phase is washed out. Phases are compared as ``angle`` values in ``(-pi, pi]``, which suits
    weak phase objects (the simulator's phase spans ``[-1, 1]`` rad); strongly wrapping phases need unwrapping first.

    Args:
        pred: complex ``(H, W)`` reconstruction (numpy or torch), in the frame of ``truth``.
        truth: complex ``(H, W)`` ground truth.
        window: ``"full"`` (default), ``"center"`` or a boolean ``(H, W)`` mask of the pixels compared.

    Raises:
        InvalidArgumentError: shapes differ or are not 2-D, the window is invalid, or either phase is constant over
            the window (the correlation is undefined).
    """
    p = _as_numpy(pred)
    if p.ndim != 2:
        raise InvalidArgumentError(f"`pred` must be one (H, W) image, got shape {p.shape}")
    aligned = align_global_phase(p, truth, window=window)
    mask = _window_mask(p.shape, window)
    recon_phase = np.angle(aligned[mask])
    true_phase = np.angle(_as_numpy(truth).astype(np.complex128)[mask])
    recon_spread, true_spread = float(np.std(recon_phase)), float(np.std(true_phase))
    if not (recon_spread > _CONSTANT_PHASE_STD and true_spread > _CONSTANT_PHASE_STD):
        raise InvalidArgumentError(
            "the phase is constant over the window (reconstruction std "
            f"{recon_spread:.3g}, truth std {true_spread:.3g} rad); the correlation is undefined"
        )
    centred_r = recon_phase - recon_phase.mean()
    centred_t = true_phase - true_phase.mean()
    return float(np.sum(centred_r * centred_t) / (math.sqrt(float(np.sum(centred_r**2) * np.sum(centred_t**2)))))
