"""A seeded simulator of small, self-consistent ptychography datasets (no download: tests and the demo need no data).

A procedural complex object (smooth amplitude and phase with a few shapes), a disc or Gaussian probe with a weak
quadratic phase, a jittered raster scan, and far-field amplitudes from :func:`.physics.predict_amplitudes`, with
optional Poisson noise at a chosen photon budget.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from mlflow_ptycho_flavor.errors import InvalidArgumentError
from mlflow_ptycho_flavor.sim.dataset import PtychoDataset
from mlflow_ptycho_flavor.sim.physics import predict_amplitudes

__all__ = ["simulate_dataset", "MAX_SIMULATION_N", "MAX_SIMULATION_ELEMENTS"]

#: Largest pattern side :func:`simulate_dataset` accepts.
MAX_SIMULATION_N = 1024
#: Largest number of elements of any simulated array (patterns x N x N, or the object): checked before anything is
#: allocated, so an absurd request fails at once instead of asking for terabytes.
MAX_SIMULATION_ELEMENTS = 2**27


def _gaussian_filtered_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """White noise low-passed by a Gaussian of std ``sigma`` pixels (FFT filtering), unit std.

    The noise is generated on a canvas rounded up to a multiple of 16 (fast FFT sizes; a prime side would be
    several times slower) and cropped, so the result is not periodic across the edges.
    """
    ph, pw = (-(-shape[0] // 16) * 16, -(-shape[1] // 16) * 16)
    fy = np.fft.fftfreq(ph)[:, None]
    fx = np.fft.rfftfreq(pw)[None, :]
    transfer = np.exp(-2.0 * (math.pi * sigma) ** 2 * (fx**2 + fy**2))
    field = np.fft.irfft2(np.fft.rfft2(rng.standard_normal((ph, pw))) * transfer, s=(ph, pw))
    field = field[: shape[0], : shape[1]]
    field = field - field.mean()
    std = field.std()
    return field / std if std > 0 else field


def _shapes_layer(rng: np.random.Generator, shape: tuple[int, int], count: int, max_size: float) -> np.ndarray:
    """Sum of ``count`` soft-edged discs and rectangles of random size, place and signed height."""
    h, w = shape
    layer = np.zeros(shape)
    edge = 1.0  # pixels: soft edges keep the spectrum free of hard-edge ringing
    for _ in range(count):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        size = rng.uniform(3.0, max(4.0, max_size))
        height = rng.uniform(-1.0, 1.0)
        is_disc = rng.random() < 0.5
        rx = size if is_disc else rng.uniform(0.4, 1.6) * size
        # Evaluate only on the bounding box plus 8 edge widths: beyond it tanh is 1 to double precision.
        y0, y1 = max(0, int(cy - size - 8 * edge)), min(h, int(cy + size + 8 * edge) + 1)
        x0, x1 = max(0, int(cx - rx - 8 * edge)), min(w, int(cx + rx + 8 * edge) + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        yy = np.arange(y0, y1, dtype=np.float64)[:, None] - cy
        xx = np.arange(x0, x1, dtype=np.float64)[None, :] - cx
        if is_disc:
            dist = np.hypot(yy, xx) - size
        else:
            dist = np.maximum(np.abs(yy) - size, np.abs(xx) - rx)
        layer[y0:y1, x0:x1] += height * 0.5 * (1.0 - np.tanh(dist / edge))
    return layer


def _rescale(field: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Affinely map ``field`` onto [lo, hi] (constant fields map to the midpoint)."""
    fmin, fmax = float(field.min()), float(field.max())
    if fmax <= fmin:
        return np.full_like(field, 0.5 * (lo + hi))
    return lo + (hi - lo) * (field - fmin) / (fmax - fmin)


def _procedural_object(rng: np.random.Generator, shape: tuple[int, int], n: int) -> np.ndarray:
    """Complex test object: amplitude in [0.3, 1], phase in [-1, 1] rad, structure at several scales."""
    scales = (1.5, 4.0, 12.0, 30.0)   # pixels: fine texture up to features larger than the probe
    weights = (0.3, 0.5, 0.6, 0.6)
    n_shapes = max(4, int(shape[0] * shape[1] / (n * n) * 3))
    amp = sum(w * _gaussian_filtered_noise(rng, shape, s) for w, s in zip(weights, scales))
    phase = sum(w * _gaussian_filtered_noise(rng, shape, s) for w, s in zip(weights, scales))
    shapes = _shapes_layer(rng, shape, n_shapes, n / 3.0)
    amp = amp + 2.0 * shapes                      # shared shapes make amplitude and phase correlated,
    phase = phase - 2.0 * shapes + 1.0 * _shapes_layer(rng, shape, n_shapes, n / 4.0)  # as in real samples
    obj = _rescale(amp, 0.3, 1.0) * np.exp(1j * _rescale(phase, -1.0, 1.0))
    return obj.astype(np.complex64)


def _make_probe(n: int, kind: str, curvature: float) -> np.ndarray:
    """(N, N) complex64 probe centred at pixel (N//2, N//2), peak amplitude 1, quadratic phase.

    ``aperture``: disc of radius N/4 with a tanh edge 1.5 px wide; ``gaussian``: std N/8 (so both light up
    about the central N/2 x N/2 window that upstream's network reconstructs best). The phase is
    ``curvature * (r / (N/2))**2`` rad, a defocus-like curvature that spreads the far field.
    """
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
    r = np.hypot(yy - n // 2, xx - n // 2)
    if kind == "aperture":
        amp = 0.5 * (1.0 - np.tanh((r - n / 4.0) / 1.5))
    elif kind == "gaussian":
        amp = np.exp(-(r**2) / (2.0 * (n / 8.0) ** 2))
    else:
        raise InvalidArgumentError(f"`probe` must be 'aperture' or 'gaussian', got {kind!r}.")
    amp /= amp.max()
    return (amp * np.exp(1j * curvature * (r / (n / 2.0)) ** 2)).astype(np.complex64)


def _grid_shape(n_scan: int | tuple[int, int] | None) -> tuple[tuple[int, int], int]:
    """Resolve ``n_scan`` into (rows, cols) of the raster and the number of positions kept."""
    if n_scan is None:
        return (16, 16), 256
    if isinstance(n_scan, (int, np.integer)) and not isinstance(n_scan, bool):
        count = int(n_scan)
        if count < 1:
            raise InvalidArgumentError(f"`n_scan` must be >= 1, got {count}.")
        cols = math.ceil(math.sqrt(count))
        return (math.ceil(count / cols), cols), count
    try:
        rows, cols = (int(v) for v in n_scan)  # type: ignore[union-attr]
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"`n_scan` must be an int or a (rows, cols) pair, got {n_scan!r}.") from exc
    if rows < 1 or cols < 1:
        raise InvalidArgumentError(f"`n_scan` grid must be at least (1, 1), got {(rows, cols)}.")
    return (rows, cols), rows * cols


def simulate_dataset(
    *,
    N: int = 64,
    object_size: int | tuple[int, int] | None = None,
    n_scan: int | tuple[int, int] | None = None,
    step: float | None = None,
    jitter: float | None = None,
    nphotons: float = 1e6,
    poisson: bool = True,
    probe: Literal["aperture", "gaussian"] = "aperture",
    probe_curvature: float = 4.0,
    seed: int = 0,
) -> PtychoDataset:
    """Simulate a small, reproducible ptychography scan of a procedural object (no download).

    Steps, all driven by one ``numpy.random.default_rng(seed)``:

    1. Scan positions: a raster with spacing ``step`` (overlapping, since ``step < N``) plus independent
       uniform jitter in ``[-jitter, jitter]`` on x and y, centred in the object. The exact float positions
       are stored in ``xcoords``/``ycoords``.
    2. Object (``objectGuess``, complex64): amplitude in [0.3, 1] and phase in [-1, 1] rad, made of
       Gaussian-filtered noise at 1.5, 4, 12 and 30 px plus soft discs and rectangles. The canvas is large
       enough that every crop lies inside it.
    3. Probe (``probeGuess``): see ``probe`` below; centred at pixel (N//2, N//2).
    4. Ground truth (``ground_truth_patches``): for each position, the N x N object crop whose pixel
       (N//2, N//2) is the object pixel at the *rounded* position, i.e. rows
       ``round(y) - N//2 .. round(y) - N//2 + N - 1`` (same for columns with x). Rounding keeps the crop an
       exact copy of the object (no interpolation); the sub-pixel remainder (< 0.5 px) is the only mismatch
       between the stored position and the crop, far below what a stitcher resolves.
    5. Diffraction: the forward model of the module docstring; ``photon_scale`` (stored on the dataset) makes
       the mean expected total counts per pattern equal ``nphotons``; Poisson noise on the counts if
       ``poisson``; ``diff3d = float32(sqrt(counts))``.

    Args:
        N: Pattern, probe and patch size in pixels (>= 8, at most :data:`MAX_SIMULATION_N`).
        object_size: Object canvas as ``S`` (square) or ``(H, W)``. Default: the smallest canvas that holds
            every crop with a 2 px margin. A given size must be at least that large.
        n_scan: Number of positions (raster ``ceil(sqrt(n))`` columns wide, filled row by row), or the raster
            shape ``(rows, cols)``. Default ``(16, 16)``, i.e. 256 patterns.
        step: Raster spacing in pixels; default ``N // 4``. Must be in (0, N) so that neighbours overlap.
        jitter: Maximum jitter in pixels; default ``step / 8``. Must be >= 0.
        nphotons: Mean expected total counts per pattern (> 0).
        poisson: Draw Poisson counts (True) or keep the expected counts (False).
        probe: ``"aperture"`` (disc of radius N/4, soft edge) or ``"gaussian"`` (std N/8).
        probe_curvature: Probe phase at radius N/2 in rad (quadratic in the radius).
        seed: Seed of the random generator; the same arguments and seed give identical arrays.

    Returns:
        A :class:`PtychoDataset` with ``objectGuess``, ``ground_truth_patches`` and ``photon_scale`` set and
        ``scan_index`` all zeros. Positions are in raster order (row by row).

    Raises:
        InvalidArgumentError: An argument is out of range, ``object_size`` is too small for the scan, or an array
            would hold more than :data:`MAX_SIMULATION_ELEMENTS` elements (checked before anything is allocated).
    """
    if int(N) != N or N < 8:
        raise InvalidArgumentError(f"`N` must be an integer >= 8, got {N!r}.")
    if N > MAX_SIMULATION_N:
        raise InvalidArgumentError(
            f"`N`={int(N)} is above the simulator's limit of {MAX_SIMULATION_N} pixels per pattern (it is for small "
            "demo and test scans; PtychoPINN models use N = 64, 128 or 256)."
        )
    n = int(N)
    (rows, cols), count = _grid_shape(n_scan)
    step_f = float(n // 4) if step is None else float(step)
    if not (0 < step_f < n):
        raise InvalidArgumentError(f"`step` must be in (0, N={n}) so that neighbouring patterns overlap, got {step_f!r}.")
    jitter_f = step_f / 8.0 if jitter is None else float(jitter)
    if not (jitter_f >= 0 and math.isfinite(jitter_f)):
        raise InvalidArgumentError(f"`jitter` must be finite and >= 0, got {jitter_f!r}.")
    if not (nphotons > 0 and math.isfinite(nphotons)):
        raise InvalidArgumentError(f"`nphotons` must be finite and > 0, got {nphotons!r}.")
    if probe not in ("aperture", "gaussian"):
        raise InvalidArgumentError(f"`probe` must be 'aperture' or 'gaussian', got {probe!r}.")

    rng = np.random.default_rng(seed)
    # Extent of crop pixels around the raster, relative to the first raster point: rounding moves a
    # centre by <= 0.5 px, a crop spans [c - N//2, c - N//2 + N).
    margin = 2
    need_h = math.ceil((rows - 1) * step_f + 2 * jitter_f + 1) + n + 2 * margin
    need_w = math.ceil((cols - 1) * step_f + 2 * jitter_f + 1) + n + 2 * margin
    if object_size is None:
        h, w = need_h, need_w
    else:
        h, w = (object_size, object_size) if np.isscalar(object_size) else tuple(object_size)  # type: ignore[misc]
        h, w = int(h), int(w)
        if h < need_h or w < need_w:
            raise InvalidArgumentError(
                f"`object_size` {(h, w)} is too small for a {rows}x{cols} scan with step {step_f} and jitter "
                f"{jitter_f} at N={n}; use at least {(need_h, need_w)} or leave it None."
            )
    if count * n * n > MAX_SIMULATION_ELEMENTS or h * w > MAX_SIMULATION_ELEMENTS:
        raise InvalidArgumentError(
            f"the simulation would hold {count} patterns of {n}x{n} on a {h}x{w} object, above the simulator's "
            f"limit of {MAX_SIMULATION_ELEMENTS:,} elements per array (~{MAX_SIMULATION_ELEMENTS * 16 / 2**30:.0f} "
            "GiB of complex128 work arrays); use a smaller N or fewer positions (n_scan)."
        )

    # Positions: raster centred on the canvas centre, then jitter; keep the first `count` in raster order.
    gy, gx = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    ys = (gy.ravel() - (rows - 1) / 2.0) * step_f + (h - 1) / 2.0
    xs = (gx.ravel() - (cols - 1) / 2.0) * step_f + (w - 1) / 2.0
    ys, xs = ys[:count], xs[:count]
    ys = ys + rng.uniform(-jitter_f, jitter_f, size=count)
    xs = xs + rng.uniform(-jitter_f, jitter_f, size=count)

    obj = _procedural_object(rng, (h, w), n)
    prb = _make_probe(n, probe, probe_curvature)

    # Crops at the rounded positions; the canvas size above guarantees they are inside.
    top = np.rint(ys).astype(np.int64) - n // 2
    left = np.rint(xs).astype(np.int64) - n // 2
    if top.min() < 0 or left.min() < 0 or (top + n).max() > h or (left + n).max() > w:
        raise AssertionError("internal error: a crop falls outside the simulated object")  # pragma: no cover
    rr = top[:, None, None] + np.arange(n)[None, :, None]
    cc = left[:, None, None] + np.arange(n)[None, None, :]
    patches = obj[rr, cc]

    unit = predict_amplitudes(prb, patches, 1.0)
    mean_energy = float(np.mean(np.sum(unit**2, axis=(1, 2))))
    if mean_energy <= 0:
        raise InvalidArgumentError("The simulated exit waves carry no energy; check `probe` and `N`.")  # pragma: no cover
    photon_scale = math.sqrt(float(nphotons) / mean_energy)
    expected = (unit * photon_scale) ** 2
    counts = rng.poisson(expected).astype(np.float64) if poisson else expected
    diff3d = np.sqrt(counts).astype(np.float32)

    return PtychoDataset(
        diff3d=diff3d,
        xcoords=xs.astype(np.float64),
        ycoords=ys.astype(np.float64),
        probeGuess=prb,
        objectGuess=obj,
        scan_index=np.zeros(count, dtype=np.int64),
        ground_truth_patches=patches,
        photon_scale=photon_scale,
    )
