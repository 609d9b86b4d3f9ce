"""Position-based stitching: reassemble predicted object patches into one full object image.

A PtychoPINN network predicts one small complex object patch per diffraction pattern (or per group of
``C = gridsize**2`` patterns). The full object is recovered by placing every patch at its scan position and
averaging where patches overlap. This module implements that step from the clean-room specification
(``docs/bundle-format.md`` §6.2, the reference for this project; §7 item 4), with plain numpy in and out:

1. crop each ``N×N`` patch to its central ``crop×crop`` window (rows/cols ``N//2 - crop//2`` onwards);
2. subtract a reference point (by default the mean position) from every position: ``d = position - centre``;
3. ``pad = ceil(max |d|)`` over both axes, rounded up to an even number; the canvas is ``S×S`` with
   ``S = crop + 2·pad``;
4. zero-pad each crop symmetrically to ``S×S`` and translate its content by **+d** with bilinear interpolation and
   zero fill (the same operation as ``grid_sample(align_corners=True, padding_mode="zeros")``; real and imaginary
   parts interpolated separately), then sum;
5. do the same with the per-patch weights (all ones for ``weighting="uniform"``) to get the coverage count;
6. ``obj = sum / (coverage + 1e-9)``; ``mask = coverage > 1e-6``.

Coordinate convention (docs/bundle-format.md §6): positions are pixel coordinates with index 0 = ``x`` = column and index 1 =
``y`` = row. A patch "centred" at ``(x, y)`` is taken to hold ``patch[i, j] = object[y + i - N//2, x + j - N//2]``,
i.e. its pixel ``(N//2, N//2)`` sits on the position. After stitching that pixel lands on canvas pixel
``(row, col) = (y - y0, x - x0)`` where ``(x0, y0) = StitchResult.origin``; more generally canvas pixel
``(r, c)`` shows the object at position-frame coordinate ``(x0 + c, y0 + r)``.

Integer offsets ``d`` are placed by a pure copy (no interpolation error); fractional offsets are split into an
integer copy plus a two-tap linear blend per axis, which is exactly bilinear translation. Patches are processed in
bounded chunks so memory stays ``O(canvas + chunk)`` for any number of patches.

The canvas is sized by the positions, so its size is bounded before anything is allocated: at most
``max_canvas_pixels`` pixels (default :data:`DEFAULT_MAX_CANVAS_PIXELS` = 8192 x 8192; the working arrays take
about 37 bytes per pixel, ~2.5 GB at the limit). Two positions a million pixels apart would otherwise ask for a
canvas of terabytes. :func:`canvas_side` does the same check for callers that want to refuse before predicting.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

import numpy as np

from mlflow_ptycho_flavor.errors import PredictionInputError

__all__ = [
    "StitchResult",
    "PatchInputs",
    "check_patch_inputs",
    "check_count",
    "stitch_patches",
    "stitch_patches_from_coords",
    "crop_to_object",
    "canvas_side",
    "DEFAULT_PROGRESS_THRESHOLD",
    "DEFAULT_MAX_CANVAS_PIXELS",
]

#: Above this many (placed) patches a tqdm progress bar is shown when ``progress`` is left at ``None``.
DEFAULT_PROGRESS_THRESHOLD = 2000

#: Denominator regulariser of docs/bundle-format.md §6.2: ``obj = sum / (coverage + _EPS)``.
_EPS = 1e-9
#: Coverage above which a canvas pixel counts as covered (docs/bundle-format.md §6.1/§6.2 mask rule).
_MASK_THRESHOLD = 1e-6
#: Fractional offsets closer than this (in pixels) to an integer are snapped to it, so integer positions that
#: went through float arithmetic (e.g. ``x - mean``) are still placed by an exact copy.
_SNAP_TOL = 1e-6
#: Upper bound on elements of the per-chunk working arrays (keeps memory bounded for large crops).
_CHUNK_ELEMENT_BUDGET = 4_000_000
#: Largest canvas (pixels, S * S) :func:`stitch_patches` builds unless told otherwise: 8192 x 8192. The working
#: arrays (complex128 sum, float64 coverage, complex64/float32/bool results) take ~37 bytes per pixel.
DEFAULT_MAX_CANVAS_PIXELS = 8192 * 8192

Weighting = Union[Literal["uniform", "central"], np.ndarray]
Centre = Union[Literal["mean", "integer"], Sequence[float]]


@dataclass(frozen=True)
class StitchResult:
    """The stitched object canvas and how it maps back to the position frame.

    Attributes:
        obj: complex64 ``(S, S)`` stitched object; ``0`` where nothing was placed.
        coverage: float32 ``(S, S)`` summed (translated) patch weights: the number of patches covering each pixel
            for ``weighting="uniform"`` and integer offsets, fractional at the rim of sub-pixel placements.
        mask: bool ``(S, S)``, ``coverage > 1e-6`` — the pixels that hold stitched data.
        origin: ``(x0, y0)``, the position-frame coordinate of canvas pixel ``(row 0, col 0)``. Canvas pixel
            ``(r, c)`` shows the object at ``(x0 + c, y0 + r)``; a patch centred at ``(x, y)`` has its centre pixel
            ``(N//2, N//2)`` at canvas ``(row, col) = (y - y0, x - x0)``. Not necessarily integer: with the default
            ``centre="mean"`` the canvas grid is offset from the input pixel grid by the fractional part of the
            mean position.
        crop_size: the side of the central window kept from each patch.
        pad: the padding on each side of the crop (even); ``S = crop_size + 2 * pad``.
        centre: ``(xc, yc)``, the reference point subtracted from every position.
    """

    obj: np.ndarray
    coverage: np.ndarray
    mask: np.ndarray
    origin: tuple[float, float]
    crop_size: int
    pad: int
    centre: tuple[float, float]

    @property
    def shape(self) -> tuple[int, int]:
        """Shape ``(S, S)`` of the canvas."""
        return tuple(self.obj.shape)  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PatchInputs:
    """Validated inputs of the patch reassemblers (:func:`stitch_patches`, ``align_patch_phases``).

    Attributes:
        patches: ``(M, N, N)`` or ``(M, C, N, N)``, complex or real floating, finite.
        positions: float64 ``(M, 2)`` or ``(M, C, 2)`` centres, finite.
        N: the patch side.
        crop: the central window kept of each patch (default ``N // 2``).
        weight: float64 ``(N, N)`` per-patch weight, before cropping.
    """

    patches: np.ndarray
    positions: np.ndarray
    N: int
    crop: int
    weight: np.ndarray


def check_patch_inputs(
    patches: Any, positions: Any, crop_size: int | None, weighting: Weighting, *, require: Any = None
) -> PatchInputs:
    """Validate what every patch reassembler takes, in one order (patches, ``require``, positions, crop, weighting).

    Args:
        patches, positions, crop_size, weighting: as :func:`stitch_patches` takes them.
        require: an extra check of the patches array (it raises :class:`PredictionInputError`), run before the
            positions are read against the patches' shape.

    Raises:
        PredictionInputError: the first bad input, naming it and the fix.
    """
    arr = _as_patches(patches)
    if require is not None:
        require(arr)
    pos = _as_positions(positions, arr.shape)
    n = arr.shape[-1]
    return PatchInputs(arr, pos, n, _check_crop(crop_size, n), _weight_window(weighting, n))


def check_count(name: str, value: Any, *, minimum: int, example: str) -> int:
    """``value`` as an int of at least ``minimum`` (a bool is not a count), else a :class:`PredictionInputError`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        kind = "positive" if minimum == 1 else "non-negative" if minimum == 0 else f">= {minimum}"
        raise PredictionInputError(f"{name}: {value!r} is not a {kind} integer; pass e.g. {example}.")
    return int(value)


def _as_patches(patches: Any) -> np.ndarray:
    """Return ``patches`` as an ndarray after checking dtype, rank, squareness, emptiness and finiteness."""
    arr = np.asarray(patches)
    kind_ok = np.issubdtype(arr.dtype, np.complexfloating) or np.issubdtype(arr.dtype, np.floating)
    if arr.dtype == object or not kind_ok:
        raise PredictionInputError(
            f"patches: dtype {arr.dtype} is not supported; pass complex (complex64/complex128) or real floating "
            f"(float32/float64) object patches, e.g. patches.astype(np.complex64)."
        )
    if arr.ndim not in (3, 4):
        raise PredictionInputError(
            f"patches: shape {arr.shape} has rank {arr.ndim}; expected (M, N, N) or (M, C, N, N) — add a leading "
            f"batch axis (patches[None]) for a single patch."
        )
    if arr.shape[-1] != arr.shape[-2]:
        raise PredictionInputError(
            f"patches: shape {arr.shape} has non-square patches ({arr.shape[-2]}×{arr.shape[-1]}); the last two "
            f"axes must be N×N (pass the network's N×N output patches)."
        )
    if arr.size == 0:
        raise PredictionInputError(
            f"patches: shape {arr.shape} is empty; pass at least one non-empty N×N patch to stitch."
        )
    if not np.all(np.isfinite(arr)):
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise PredictionInputError(
            f"patches: {bad} non-finite value(s) (NaN/inf) among shape {arr.shape}; stitching would spread them "
            f"over the canvas — fix or drop those patches first."
        )
    return arr


def _as_positions(positions: Any, patches_shape: tuple[int, ...]) -> np.ndarray:
    """Return positions as float64 ``(M, 2)`` or ``(M, C, 2)`` after checking shape and finiteness."""
    try:
        pos = np.asarray(positions, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise PredictionInputError(
            f"positions: could not be read as a float array ({exc}); pass a numeric (M, 2) array of (x, y) pixel "
            f"coordinates."
        ) from exc
    m = patches_shape[0]
    if len(patches_shape) == 4:
        c = patches_shape[1]
        if pos.ndim == 4 and pos.shape[2] == 1:  # upstream offsets layout (B, C, 1, 2)
            pos = pos[:, :, 0, :]
        ok = pos.shape in ((m, 2), (m, c, 2))
        expected = f"({m}, 2) (one position per group; channels averaged) or ({m}, {c}, 2) (one per channel)"
    else:
        ok = pos.shape == (m, 2)
        expected = f"({m}, 2)"
    if not ok:
        raise PredictionInputError(
            f"positions: shape {pos.shape} does not match patches of shape {tuple(patches_shape)}; expected "
            f"{expected} with column 0 = x (column) and column 1 = y (row) in pixels."
        )
    if not np.all(np.isfinite(pos)):
        bad = int(np.count_nonzero(~np.isfinite(pos).all(axis=-1)))
        raise PredictionInputError(
            f"positions: {bad} position(s) hold NaN or inf; every position must be a finite (x, y) pixel "
            f"coordinate — drop those patches or fix their coordinates."
        )
    return pos


def _check_crop(crop_size: Any, n: int) -> int:
    """Resolve and validate ``crop_size`` (default ``N // 2``) for patches of side ``n``."""
    if crop_size is None:
        return max(1, n // 2)
    if isinstance(crop_size, bool) or not isinstance(crop_size, (int, np.integer)):
        raise PredictionInputError(
            f"crop_size: {crop_size!r} is not an integer; pass an int in [1, N={n}] or None for the default N//2."
        )
    crop = int(crop_size)
    if not 1 <= crop <= n:
        raise PredictionInputError(
            f"crop_size: {crop} is outside [1, N={n}]; pass an int in that range or None for the default N//2={n // 2}."
        )
    return crop


def _weight_window(weighting: Any, n: int) -> np.ndarray:
    """Return the float64 ``(n, n)`` per-patch weight for ``weighting`` (before cropping)."""
    if isinstance(weighting, str):
        if weighting == "uniform":
            return np.ones((n, n), dtype=np.float64)
        if weighting == "central":
            w = np.zeros((n, n), dtype=np.float64)
            lo = n // 4
            hi = lo + max(1, n // 2)
            w[lo:hi, lo:hi] = 1.0
            return w
        raise PredictionInputError(
            f"weighting: {weighting!r} is not a known weighting; use 'uniform', 'central' or a non-negative real "
            f"({n}, {n}) array (e.g. |probe|**2)."
        )
    w = np.asarray(weighting)
    if w.shape != (n, n) or not (np.issubdtype(w.dtype, np.floating) or np.issubdtype(w.dtype, np.integer)):
        raise PredictionInputError(
            f"weighting: array of shape {w.shape} and dtype {w.dtype} does not fit patches of side N={n}; pass a "
            f"real ({n}, {n}) array, or 'uniform'/'central'."
        )
    w = w.astype(np.float64)
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise PredictionInputError(
            "weighting: the weight array holds negative or non-finite values; weights must be finite and >= 0 "
            "(e.g. np.abs(probe)**2)."
        )
    return w


def _resolve_centre(centre: Any, flat_pos: np.ndarray) -> tuple[float, float]:
    """Return the reference point ``(xc, yc)`` subtracted from every position."""
    if isinstance(centre, str):
        mean = flat_pos.mean(axis=0)
        if centre == "mean":
            return float(mean[0]), float(mean[1])
        if centre == "integer":
            return float(np.round(mean[0])), float(np.round(mean[1]))
        raise PredictionInputError(
            f"centre: {centre!r} is not known; use 'mean' (docs/bundle-format.md §6.2), 'integer' (mean rounded to whole pixels) "
            f"or an explicit (x, y) pair."
        )
    try:
        c = np.asarray(centre, dtype=np.float64)
    except (TypeError, ValueError):
        c = np.empty(0)
    if c.shape != (2,) or not np.all(np.isfinite(c)):
        raise PredictionInputError(
            f"centre: {centre!r} is not a finite (x, y) pair; use 'mean', 'integer' or e.g. (12.0, 30.5)."
        )
    return float(c[0]), float(c[1])


def _flat_positions(pos: np.ndarray, patches_ndim: int) -> np.ndarray:
    """One ``(x, y)`` per placed patch: per-channel positions are flattened, group positions kept."""
    return pos.reshape(-1, 2) if patches_ndim == 4 and pos.ndim == 3 else pos


def _canvas_geometry(flat_pos: np.ndarray, crop: int, centre: Any) -> tuple[float, float, np.ndarray, int, int]:
    """``(xc, yc, offsets, pad, S)`` of spec §6.2 steps 2-3 (no allocation beyond the offsets)."""
    xc, yc = _resolve_centre(centre, flat_pos)
    d = flat_pos - np.array([xc, yc])
    max_abs = float(np.max(np.abs(d))) if d.size else 0.0
    pad = int(math.ceil(max_abs - _SNAP_TOL)) if max_abs > _SNAP_TOL else 0
    pad += pad % 2
    return xc, yc, d, pad, crop + 2 * pad


def _check_limit(max_canvas_pixels: Any) -> int | None:
    if max_canvas_pixels is None:
        return None
    if isinstance(max_canvas_pixels, bool) or not isinstance(max_canvas_pixels, (int, np.integer)) \
            or max_canvas_pixels < 1:
        raise PredictionInputError(
            f"max_canvas_pixels: {max_canvas_pixels!r} is not a positive integer; pass e.g. 4096 * 4096, or None "
            "for no limit."
        )
    return int(max_canvas_pixels)


def _refuse_large_canvas(size: int, limit: int | None, flat_pos: np.ndarray) -> None:
    if limit is None or size * size <= limit:
        return
    span_x = float(np.ptp(flat_pos[:, 0]))
    span_y = float(np.ptp(flat_pos[:, 1]))
    raise PredictionInputError(
        f"positions: the stitched canvas would be {size}x{size} = {size * size:,} pixels, above the limit "
        f"max_canvas_pixels={limit:,} (the positions span {span_x:.6g} x {span_y:.6g} px). Positions are pixel "
        "coordinates of one scan: check their units, stitch a smaller region, or raise max_canvas_pixels."
    )


def canvas_side(
    patches_shape: Sequence[int],
    positions: Any,
    *,
    crop_size: int | None = None,
    centre: Centre = "mean",
    max_canvas_pixels: int | None = DEFAULT_MAX_CANVAS_PIXELS,
) -> int:
    """The side ``S`` of the canvas :func:`stitch_patches` would build, checked against ``max_canvas_pixels``.

    Cheap (no canvas is allocated), so a server can refuse a request before it runs the network.

    Args:
        patches_shape: ``(M, N, N)`` or ``(M, C, N, N)``, the shape of the patches to stitch.
        positions, crop_size, centre: as for :func:`stitch_patches`.
        max_canvas_pixels: the largest ``S * S`` accepted, or None for no limit.

    Raises:
        PredictionInputError: the positions do not fit the patches, or the canvas exceeds the limit (the message
            names ``max_canvas_pixels``, the size asked for and the positions' span).
    """
    shape = tuple(int(v) for v in patches_shape)
    if len(shape) not in (3, 4) or shape[-1] != shape[-2] or min(shape) < 1:
        raise PredictionInputError(f"patches: shape {shape} is not (M, N, N) or (M, C, N, N) with M, N >= 1.")
    limit = _check_limit(max_canvas_pixels)
    pos = _as_positions(positions, shape)
    crop = _check_crop(crop_size, shape[-1])
    flat_pos = _flat_positions(pos, len(shape))
    *_, size = _canvas_geometry(flat_pos, crop, centre)
    _refuse_large_canvas(size, limit, flat_pos)
    return size


# ----------------------------------------------------------------------------------------------------------------
# core
# ----------------------------------------------------------------------------------------------------------------


def _split_offsets(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split offsets into integer floor and fraction in ``[0, 1)``, snapping near-integers to exact integers."""
    near = np.round(d)
    d = np.where(np.abs(d - near) < _SNAP_TOL, near, d)
    n = np.floor(d)
    return n.astype(np.int64), d - n


def _bilinear_expand(block: np.ndarray, fx: np.ndarray, fy: np.ndarray) -> np.ndarray:
    """Translate each ``(c, c)`` image of ``block`` by a sub-pixel ``(fx, fy)`` in ``[0, 1)`` onto ``(c+1, c+1)``.

    Output pixel ``k`` along an axis is ``(1 - f) * in[k] + f * in[k - 1]`` (content moved by ``+f``, zero outside),
    i.e. bilinear translation. For ``f == 0`` this is an exact copy into ``[:c]`` (the extra row/column stays 0).
    """
    b, c, _ = block.shape
    fy3 = fy[:, None, None]
    fx3 = fx[:, None, None]
    ey = np.zeros((b, c + 1, c), dtype=block.dtype)
    ey[:, :c, :] = (1.0 - fy3) * block
    ey[:, 1:, :] += fy3 * block
    ex = np.zeros((b, c + 1, c + 1), dtype=block.dtype)
    ex[:, :, :c] = (1.0 - fx3) * ey
    ex[:, :, 1:] += fx3 * ey
    return ex


def _make_progress(total: int, progress: bool | None) -> Any:
    """Return a tqdm bar (or None) for ``total`` patches according to ``progress``."""
    show = progress if progress is not None else total > DEFAULT_PROGRESS_THRESHOLD
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="stitching patches", unit="patch")


def stitch_patches(
    patches: Any,
    positions: Any,
    *,
    crop_size: int | None = None,
    weighting: Weighting = "uniform",
    centre: Centre = "mean",
    chunk_size: int = 256,
    progress: bool | None = None,
    max_canvas_pixels: int | None = DEFAULT_MAX_CANVAS_PIXELS,
) -> StitchResult:
    """Reassemble complex object patches into the full object by position (docs/bundle-format.md §6.2).

    Each patch is cropped to its central ``crop_size × crop_size`` window, placed at **+(position − centre)** on a
    square canvas with sub-pixel bilinear translation, summed, and divided by the identically placed weights
    (coverage count) ``+ 1e-9``. Overlaps are therefore averaged; pixels no patch reaches are 0 with ``mask`` False.

    Args:
        patches: ``(M, N, N)`` or ``(M, C, N, N)`` complex or real floating patches (network output, channels
            first). Real input is treated as complex with zero imaginary part.
        positions: pixel coordinates of the patch centres (patch pixel ``(N//2, N//2)``), column 0 = x = column,
            column 1 = y = row. Shape ``(M, 2)``; for ``(M, C, N, N)`` patches also ``(M, C, 2)`` (each channel
            placed at its own position) or upstream's ``(M, C, 1, 2)``. With ``(M, 2)`` positions and ``C > 1``
            the ``C`` channels of a group are averaged into one patch placed at the group position (docs/bundle-format.md §6.2).
        crop_size: side of the central window kept from each patch, in ``[1, N]``. Default ``N // 2``: the
            network's centre half is where the object is constrained by the probe, and the border of a
            PtychoPINN patch is unreliable (docs/bundle-format.md §3.4 border path; upstream's stitching also keeps a small centre).
        weighting: ``"uniform"`` (weight 1 everywhere: docs/bundle-format.md §6.2), ``"central"`` (weight 1 on the patch's central
            ``N//2 × N//2`` window, rows/cols ``[N//4, N//4 + N//2)``, else 0, like upstream's training merge §6.1;
            identical to uniform when ``crop_size <= N//2``), or a real non-negative ``(N, N)`` array such as
            ``|probe|**2`` (cropped like the patches).
        centre: reference point subtracted from the positions: ``"mean"`` (docs/bundle-format.md §6.2, default), ``"integer"``
            (the mean rounded to whole pixels, so integer positions are placed by exact copies and the canvas grid
            coincides with the input pixel grid) or an explicit ``(x, y)``.
        chunk_size: patches prepared per vectorised step (reduced automatically for large crops); only affects
            memory and speed, never the result.
        progress: show a tqdm progress bar; ``None`` (default) shows one when more than
            ``DEFAULT_PROGRESS_THRESHOLD`` patches are placed.
        max_canvas_pixels: the largest canvas (``S * S`` pixels) built, checked before anything is allocated;
            default :data:`DEFAULT_MAX_CANVAS_PIXELS` (8192 x 8192, ~2.5 GB of working memory); None for no limit.

    Returns:
        A :class:`StitchResult` with the complex64 canvas, float32 coverage, bool mask and the ``origin`` that maps
        canvas pixels to the position frame.

    Raises:
        PredictionInputError: bad dtype/rank/shape, empty input, non-finite patches or positions, ``crop_size``
            outside ``[1, N]``, unknown ``weighting``/``centre``, ``chunk_size < 1``, or a canvas above
            ``max_canvas_pixels``.
    """
    limit = _check_limit(max_canvas_pixels)
    inputs = check_patch_inputs(patches, positions, crop_size, weighting)
    arr, pos, n, crop, weight_full = inputs.patches, inputs.positions, inputs.N, inputs.crop, inputs.weight
    check_count("chunk_size", chunk_size, minimum=1, example="256")

    # One patch per position; the canvas is checked before anything else is allocated.
    flat_pos = _flat_positions(pos, arr.ndim)
    xc, yc, d, pad, size = _canvas_geometry(flat_pos, crop, centre)
    _refuse_large_canvas(size, limit, flat_pos)
    if arr.ndim == 4:
        if pos.ndim == 3:
            flat = arr.reshape(-1, n, n)
        else:
            flat = arr.mean(axis=1) if arr.shape[1] > 1 else arr[:, 0]
    else:
        flat = arr

    start = n // 2 - crop // 2
    w_crop = weight_full[start:start + crop, start:start + crop]
    ints, fracs = _split_offsets(d)
    # Canvas row/col where the crop's first pixel lands after the integer part of the shift.
    col0 = pad + ints[:, 0]
    row0 = pad + ints[:, 1]

    # One extra row/column absorbs the (zero) spill of exact integer placements at the far edge.
    num = np.zeros((size + 1, size + 1), dtype=np.complex128)
    cov = np.zeros((size + 1, size + 1), dtype=np.float64)

    total = flat.shape[0]
    step = int(max(1, min(int(chunk_size), _CHUNK_ELEMENT_BUDGET // ((crop + 1) ** 2))))
    bar = _make_progress(total, progress)
    try:
        for lo in range(0, total, step):
            hi = min(total, lo + step)
            block = flat[lo:hi, start:start + crop, start:start + crop].astype(np.complex128)
            fx = fracs[lo:hi, 0]
            fy = fracs[lo:hi, 1]
            wblock = np.broadcast_to(w_crop, (hi - lo, crop, crop))
            placed = _bilinear_expand(block * wblock, fx, fy)
            placed_w = _bilinear_expand(np.ascontiguousarray(wblock), fx, fy)
            for k in range(hi - lo):
                r, c = row0[lo + k], col0[lo + k]
                num[r:r + crop + 1, c:c + crop + 1] += placed[k]
                cov[r:r + crop + 1, c:c + crop + 1] += placed_w[k]
            if bar is not None:
                bar.update(hi - lo)
    finally:
        if bar is not None:
            bar.close()

    num = num[:size, :size]
    cov = cov[:size, :size]
    obj = (num / (cov + _EPS)).astype(np.complex64)
    origin = (xc - pad - crop // 2, yc - pad - crop // 2)
    return StitchResult(
        obj=obj,
        coverage=cov.astype(np.float32),
        mask=cov > _MASK_THRESHOLD,
        origin=(float(origin[0]), float(origin[1])),
        crop_size=crop,
        pad=pad,
        centre=(xc, yc),
    )


def stitch_patches_from_coords(
    patches: Any,
    xcoords: Any,
    ycoords: Any,
    **kwargs: Any,
) -> StitchResult:
    """Stitch with separate ``xcoords``/``ycoords`` arrays (the NPZ dataset layout) instead of ``(M, 2)`` positions.

    Args:
        patches: as for :func:`stitch_patches`.
        xcoords: x (column) pixel coordinates of the patch centres, shape ``(M,)`` or ``(M, C)``.
        ycoords: y (row) pixel coordinates, same shape as ``xcoords``.
        **kwargs: forwarded to :func:`stitch_patches` (``crop_size``, ``weighting``, ``centre``, ...).

    Returns:
        The :class:`StitchResult` of ``stitch_patches(patches, stack([xcoords, ycoords], -1), **kwargs)``.

    Raises:
        PredictionInputError: ``xcoords`` and ``ycoords`` differ in shape or are not numeric, plus everything
            :func:`stitch_patches` raises.
    """
    try:
        x = np.asarray(xcoords, dtype=np.float64)
        y = np.asarray(ycoords, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise PredictionInputError(
            f"xcoords/ycoords: could not be read as float arrays ({exc}); pass numeric (M,) arrays of pixel "
            f"coordinates."
        ) from exc
    if x.shape != y.shape:
        raise PredictionInputError(
            f"xcoords/ycoords: shapes {x.shape} and {y.shape} differ; pass one x and one y per patch (same shape)."
        )
    return stitch_patches(patches, np.stack([x, y], axis=-1), **kwargs)


def _bilinear_sample(img: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Sample ``img`` at fractional ``(rows, cols)`` (broadcast) bilinearly, zero outside the image."""
    h, w = img.shape
    r0 = np.floor(rows).astype(np.int64)
    c0 = np.floor(cols).astype(np.int64)
    fr = rows - r0
    fc = cols - c0
    out = np.zeros(np.broadcast(rows, cols).shape, dtype=np.result_type(img.dtype, np.float64))
    for dr, wr in ((0, 1.0 - fr), (1, fr)):
        for dc, wc in ((0, 1.0 - fc), (1, fc)):
            rr = r0 + dr
            cc = c0 + dc
            ok = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
            vals = img[np.clip(rr, 0, h - 1), np.clip(cc, 0, w - 1)]
            out = out + np.where(ok, wr * wc * vals, 0)
    return out


def crop_to_object(
    result: StitchResult,
    object_shape: Iterable[int],
    *,
    fill: complex = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Place a stitched canvas into an array of the object's shape, for comparison with a ground-truth object.

    Assumes the positions given to :func:`stitch_patches` were object-frame pixel coordinates (x = column,
    y = row) of the patch centres, so object pixel ``(R, C)`` corresponds to canvas pixel ``(R - y0, C - x0)``.
    When ``origin`` is integral (e.g. ``centre="integer"`` with integer positions) this is an exact copy; otherwise
    the canvas is resampled bilinearly at the object's pixel grid (adds interpolation error; prefer
    ``centre="integer"`` when comparing to ground truth).

    Args:
        result: the output of :func:`stitch_patches`.
        object_shape: ``(H, W)`` of the object array the positions refer to.
        fill: value for object pixels not covered by the stitch.

    Returns:
        ``(values, mask)``: complex64 ``(H, W)`` stitched values (``fill`` where uncovered) and a bool ``(H, W)``
        mask of the pixels covered by the stitch (for resampling: all contributing canvas pixels covered).

    Raises:
        PredictionInputError: ``object_shape`` is not two positive integers.
    """
    try:
        shape = tuple(int(s) for s in object_shape)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != 2 or min(shape) < 1:
        raise PredictionInputError(
            f"object_shape: {object_shape!r} is not a pair of positive ints; pass the ground-truth object's "
            f"(H, W), e.g. obj.shape."
        )
    h, w = shape
    x0, y0 = result.origin
    values = np.full((h, w), fill, dtype=np.complex64)
    mask = np.zeros((h, w), dtype=bool)
    sh, sw = result.obj.shape
    ix0, iy0 = round(x0), round(y0)
    if abs(x0 - ix0) < _SNAP_TOL and abs(y0 - iy0) < _SNAP_TOL:
        # object pixel (R, C) = canvas (R - iy0, C - ix0)
        r_lo, r_hi = max(0, iy0), min(h, iy0 + sh)
        c_lo, c_hi = max(0, ix0), min(w, ix0 + sw)
        if r_lo < r_hi and c_lo < c_hi:
            src = (slice(r_lo - iy0, r_hi - iy0), slice(c_lo - ix0, c_hi - ix0))
            m = result.mask[src]
            mask[r_lo:r_hi, c_lo:c_hi] = m
            values[r_lo:r_hi, c_lo:c_hi] = np.where(m, result.obj[src], fill)
        return values, mask
    rows = np.arange(h, dtype=np.float64)[:, None] - y0
    cols = np.arange(w, dtype=np.float64)[None, :] - x0
    covered = _bilinear_sample(result.mask.astype(np.float64), rows, cols) >= 1.0 - 1e-9
    sampled = _bilinear_sample(result.obj.astype(np.complex128), rows, cols)
    mask[:] = covered
    values[:] = np.where(covered, sampled, fill).astype(np.complex64)
    return values, mask
