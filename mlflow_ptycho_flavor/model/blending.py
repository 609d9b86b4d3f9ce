"""Seam-free stitching of gridsize-1 patches: probe-weighted blending and per-patch phase alignment.

Two things make a plain shift-and-sum (docs/bundle-format.md §6.2) of independently reconstructed patches show the
patch grid:

1. **Uniform weights.** Every pixel of a patch counts the same, including the rim, where the probe hardly
   illuminates the object and a single pattern says little about it. Weighting each patch pixel by the probe
   intensity ``|P|**2`` (docs/bundle-format.md §6.3, upstream's barycentric reassembly with probe weighting) lets
   well-illuminated pixels dominate and makes each patch fade out towards its edge, so the hand-over from one patch
   to the next is smooth. :func:`probe_weights` builds that weight window for
   ``stitch_patches(..., weighting=probe_weights(probe))``; the stitched value is
   ``sum_i w_i patch_i / sum_i w_i``, i.e. every covered pixel is a convex combination of the patches over it
   (the normalised weights sum to one: a partition of unity).
2. **Free phase offsets.** A far-field intensity is unchanged when the exit wave is multiplied by a constant
   ``e^{i phi}``, so one diffraction pattern never determines the constant phase of its own patch: each patch of a
   gridsize-1 network carries its own arbitrary offset. Averaged as they are, patches with different offsets give
   steps at every patch edge and wash out the object's large-scale phase. The overlaps determine the *relative*
   offsets (the object is the same where two patches overlap): :func:`align_patch_phases` finds the offsets that
   make all overlaps agree best (angular synchronisation of the overlap graph), leaving only the one global phase
   that no far-field measurement can fix. It uses the predicted patches and their positions only, never a ground
   truth.
"""

from __future__ import annotations

import heapq
from typing import Any

import numpy as np

from mlflow_ptycho_flavor.errors import PredictionInputError
from mlflow_ptycho_flavor.model.stitching import Weighting, check_count, check_patch_inputs

__all__ = ["probe_weights", "align_patch_phases", "DEFAULT_WEIGHT_FLOOR", "DEFAULT_MAX_OVERLAP_PAIRS"]

#: Relative probe intensity below which :func:`probe_weights` gives a pixel weight 0: pixels lit at under ~3 % of
#: the peak amplitude carry almost no signal, and cutting them keeps every covered pixel's summed weight >= this
#: floor, so the ``1e-9`` regulariser of the stitching denominator changes a value by at most ``1e-6`` relative.
DEFAULT_WEIGHT_FLOOR = 1e-3
#: Upper bound on overlapping patch pairs :func:`align_patch_phases` examines (time and memory stay bounded; a
#: raster scan has about ``(2 * crop / step)**2 / 2`` pairs per patch, ~12 for the demo's scan).
DEFAULT_MAX_OVERLAP_PAIRS = 2_000_000
#: Overlap correlations below this fraction of the largest one are ignored (numerically empty overlaps).
_MIN_RELATIVE_OVERLAP = 1e-12


def probe_weights(probe: Any, *, floor: float = DEFAULT_WEIGHT_FLOOR) -> np.ndarray:
    """Per-pixel blending weights ``|P|**2 / max |P|**2`` (summed over probe modes), zero below ``floor``.

    Args:
        probe: complex or real ``(N, N)`` probe, or ``(K, N, N)`` probe modes (their intensities add up).
        floor: relative intensity in ``[0, 1)`` below which the weight is set to 0.

    Returns:
        float64 ``(N, N)`` weights in ``[0, 1]``, peak 1, for ``stitch_patches(..., weighting=...)`` and
        :func:`align_patch_phases`.

    Raises:
        PredictionInputError: the probe is not ``(N, N)`` / ``(K, N, N)``, not numeric, not finite, or zero.
    """
    try:
        arr = np.asarray(probe)
    except (TypeError, ValueError) as exc:  # pragma: no cover - numpy turns nearly anything into an array
        raise PredictionInputError(f"probe: could not be read as an array ({exc}); pass the (N, N) complex probe.") from exc
    numeric = np.issubdtype(arr.dtype, np.complexfloating) or np.issubdtype(arr.dtype, np.floating)
    if not numeric or arr.ndim not in (2, 3) or arr.shape[-1] != arr.shape[-2] or arr.size == 0:
        raise PredictionInputError(
            f"probe: shape {arr.shape} and dtype {arr.dtype} are not a complex (N, N) probe or (K, N, N) probe modes; "
            "pass e.g. dataset.probeGuess."
        )
    if not np.all(np.isfinite(arr)):
        raise PredictionInputError("probe: holds NaN or inf; pass a finite probe.")
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not (0.0 <= floor < 1.0):
        raise PredictionInputError(f"floor: {floor!r} is not a number in [0, 1); pass e.g. 1e-3.")
    intensity = np.abs(arr.astype(np.complex128)) ** 2
    if intensity.ndim == 3:
        intensity = intensity.sum(axis=0)
    peak = float(intensity.max())
    if not peak > 0:
        raise PredictionInputError("probe: is zero everywhere; probe weights need an illumination.")
    weights = intensity / peak
    weights[weights < floor] = 0.0
    return weights


def _neighbour_pairs(rounded: np.ndarray, crop: int, max_pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs ``i < j`` whose ``crop x crop`` windows overlap (positions bucketed into crop-sized cells)."""
    cells: dict[tuple[int, int], list[int]] = {}
    keys = np.floor_divide(rounded, crop)
    for index, (cx, cy) in enumerate(keys.tolist()):
        cells.setdefault((cx, cy), []).append(index)
    first: list[np.ndarray] = []
    second: list[np.ndarray] = []
    count = 0
    for index, (cx, cy) in enumerate(keys.tolist()):
        candidates = [j for dx in (-1, 0, 1) for dy in (-1, 0, 1) for j in cells.get((cx + dx, cy + dy), ()) if j > index]
        if not candidates:
            continue
        cand = np.asarray(candidates, dtype=np.int64)
        delta = np.abs(rounded[cand] - rounded[index])
        cand = cand[(delta[:, 0] < crop) & (delta[:, 1] < crop)]
        count += cand.size
        if count > max_pairs:
            raise PredictionInputError(
                f"positions: more than max_pairs={max_pairs:,} overlapping patch pairs (the scan is very dense or "
                "many positions coincide); align a smaller region, use a smaller crop_size, or raise max_pairs."
            )
        first.append(np.full(cand.size, index, dtype=np.int64))
        second.append(cand)
    if not first:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    return np.concatenate(first), np.concatenate(second)


def _overlap_correlations(
    windows: np.ndarray, weight: np.ndarray, rounded: np.ndarray, first: np.ndarray, second: np.ndarray
) -> np.ndarray:
    """``c_ij = sum w_i w_j p_i conj(p_j)`` over the overlap of windows ``i`` and ``j`` (integer offsets)."""
    crop = windows.shape[-1]
    out = np.empty(first.size, dtype=np.complex128)
    for k, (i, j) in enumerate(zip(first.tolist(), second.tolist())):
        dx, dy = (rounded[j] - rounded[i]).tolist()
        # Object pixel (row, col) is window-i pixel (row - y_i, col - x_i) and window-j pixel (that - (dy, dx)).
        r0, r1 = max(0, dy), min(crop, crop + dy)
        c0, c1 = max(0, dx), min(crop, crop + dx)
        a = windows[i, r0:r1, c0:c1] * weight[r0:r1, c0:c1]
        b = windows[j, r0 - dy:r1 - dy, c0 - dx:c1 - dx] * weight[r0 - dy:r1 - dy, c0 - dx:c1 - dx]
        out[k] = np.vdot(b, a)  # sum a * conj(b)
    return out


def _spanning_tree_phases(m: int, first: np.ndarray, second: np.ndarray, corr: np.ndarray) -> np.ndarray:
    """Unit phasors from propagating pairwise phases along a maximum spanning tree of every connected component.

    ``c_ij ~ |c_ij| e^{i (a_j - a_i)}`` when patch ``k`` carries the offset ``e^{-i a_k}``, so the correction
    ``u_k = e^{i a_k}`` obeys ``u_j = u_i c_ij / |c_ij|``. Strongest overlaps first keeps noise from weak ones out.
    """
    neighbours: list[list[tuple[int, complex]]] = [[] for _ in range(m)]
    for i, j, c in zip(first.tolist(), second.tolist(), corr.tolist()):
        unit = c / abs(c)
        neighbours[i].append((j, unit))
        neighbours[j].append((i, unit.conjugate()))
    strength = np.zeros(m)
    np.add.at(strength, first, np.abs(corr))
    np.add.at(strength, second, np.abs(corr))
    phasors = np.ones(m, dtype=np.complex128)
    seen = np.zeros(m, dtype=bool)
    magnitude = {}
    for i, j, c in zip(first.tolist(), second.tolist(), np.abs(corr).tolist()):
        magnitude[(i, j)] = magnitude[(j, i)] = c
    for root in np.argsort(-strength, kind="stable").tolist():
        if seen[root]:
            continue
        seen[root] = True
        heap = [(-magnitude[(root, j)], root, j, unit) for j, unit in neighbours[root]]
        heapq.heapify(heap)
        while heap:
            _, i, j, unit = heapq.heappop(heap)
            if seen[j]:
                continue
            seen[j] = True
            phasors[j] = phasors[i] * unit
            for k, unit_k in neighbours[j]:
                if not seen[k]:
                    heapq.heappush(heap, (-magnitude[(j, k)], j, k, unit_k))
    return phasors


def _complex_single_channel(patches: np.ndarray) -> None:
    if patches.ndim != 3 or not np.issubdtype(patches.dtype, np.complexfloating):
        raise PredictionInputError(
            f"patches: shape {patches.shape} and dtype {patches.dtype}; phase alignment takes complex (M, N, N) "
            "gridsize-1 patches (drop the channel axis: patches[:, 0])."
        )


def align_patch_phases(
    patches: Any,
    positions: Any,
    *,
    weighting: Weighting = "uniform",
    crop_size: int | None = None,
    iterations: int = 200,
    max_pairs: int = DEFAULT_MAX_OVERLAP_PAIRS,
) -> tuple[np.ndarray, np.ndarray]:
    """Remove each patch's free constant phase so that overlapping patches agree (module docstring, item 2).

    For every pair of overlapping central windows the weighted overlap correlation ``c_ij`` is computed (offsets
    rounded to whole pixels: only one phase per patch is estimated); the corrections ``u_k = e^{i a_k}`` maximise
    ``sum_ij Re(u_i c_ij conj(u_j))``, the agreement of all overlaps (angular synchronisation). They start from
    the phases propagated along a maximum spanning tree of the overlap graph and are refined by projected power
    iterations ``u <- phase(C u)``. The one remaining global phase is chosen so that the corrections average to
    zero phase (the patches keep their mean phase).

    Args:
        patches: complex ``(M, N, N)`` gridsize-1 patches (network output with the channel axis removed).
        positions: ``(M, 2)`` patch-centre pixel coordinates, column 0 = x, column 1 = y (as for
            :func:`~mlflow_ptycho_flavor.model.stitching.stitch_patches`).
        weighting: per-pixel weights of the overlap sums, as for ``stitch_patches`` (e.g. :func:`probe_weights`).
        crop_size: side of the central window compared, default ``N // 2`` (as for ``stitch_patches``).
        iterations: projected power iterations after the spanning-tree start (0 keeps the tree's phases).
        max_pairs: refuse scans with more overlapping pairs than this (bounded time and memory).

    Returns:
        ``(aligned, phases)``: complex64 ``(M, N, N)`` patches times ``e^{i phases}``, and the float64 ``(M,)``
        corrections in radians. Patches without any overlap keep correction 0.

    Raises:
        PredictionInputError: bad patches, positions, weighting or crop (the messages of ``stitch_patches``), an
            ``iterations`` that is not a non-negative integer, or more than ``max_pairs`` overlapping pairs.
    """
    inputs = check_patch_inputs(patches, positions, crop_size, weighting, require=_complex_single_channel)
    arr, pos, n, crop, weight_full = inputs.patches, inputs.positions, inputs.N, inputs.crop, inputs.weight
    iterations = check_count("iterations", iterations, minimum=0, example="200")
    max_pairs = check_count("max_pairs", max_pairs, minimum=1, example="2_000_000")

    m = arr.shape[0]
    start = n // 2 - crop // 2
    windows = arr[:, start:start + crop, start:start + crop].astype(np.complex128)
    weight = weight_full[start:start + crop, start:start + crop]
    rounded = np.rint(pos).astype(np.int64)
    first, second = _neighbour_pairs(rounded, crop, int(max_pairs))
    corr = _overlap_correlations(windows, weight, rounded, first, second)
    if corr.size:
        keep = np.abs(corr) > _MIN_RELATIVE_OVERLAP * float(np.abs(corr).max())
        first, second, corr = first[keep], second[keep], corr[keep]
    if corr.size == 0:
        return arr.astype(np.complex64), np.zeros(m)

    phasors = _spanning_tree_phases(m, first, second, corr)
    linked = np.zeros(m, dtype=bool)
    linked[first] = linked[second] = True
    for _ in range(int(iterations)):
        pulled = np.zeros(m, dtype=np.complex128)
        np.add.at(pulled, second, corr * phasors[first])
        np.add.at(pulled, first, np.conj(corr) * phasors[second])
        size = np.abs(pulled)
        updated = np.where(size > 0, pulled / np.where(size > 0, size, 1.0), phasors)
        change = float(np.max(np.abs(updated - phasors)))
        phasors = updated
        if change < 1e-12:
            break
    phasors[~linked] = 1.0
    mean = complex(phasors[linked].sum())
    if abs(mean) > 0:
        phasors[linked] *= abs(mean) / mean
    phases = np.angle(phasors)
    phases[~linked] = 0.0
    aligned = (arr.astype(np.complex128) * np.exp(1j * phases)[:, None, None]).astype(np.complex64)
    return aligned, phases

