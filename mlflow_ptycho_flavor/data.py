"""Ptychography datasets: the upstream NPZ schema, a seeded simulator and training normalization.

PtychoPINN exchanges data as ``.npz`` files holding diffraction *amplitudes* (``diff3d`` = sqrt(counts),
float32, DATA-001), the scan positions in object pixels (``xcoords``/``ycoords``; index 0 of an offset is
x = column, index 1 is y = row, spec §6), the complex probe and optionally the complex object. This module
reads and writes that schema with strict validation (a bad file fails here with a message naming the key and
the fix, not deep inside a training loop), simulates small self-consistent datasets without any download so
tests and examples need no external data, and computes upstream's per-dataset input normalization (spec §4.3).

It depends on numpy only: no MLflow, no torch.

Forward model used by :func:`simulate_dataset` and :func:`predict_amplitudes` (a trainer's physics loss
must use the same one)::

    far_field  = fftshift(fft2(probe * patch), axes=(-2, -1)) / N      # zero frequency at pixel (N//2, N//2)
    amplitude  = photon_scale * |far_field|                            # noise-free, float64
    counts     = Poisson(amplitude**2)            (or amplitude**2 when poisson=False)
    diff3d     = float32(sqrt(counts))

``patch`` is the N x N object crop whose pixel ``(N//2, N//2)`` sits at the scan position, and ``probe`` is
``probeGuess`` (centred at the same pixel). ``photon_scale`` is chosen so that the mean over patterns of the
expected total counts ``sum(amplitude**2)`` equals ``nphotons``. Because only the modulus is kept, applying
``ifftshift`` to ``probe * patch`` before the FFT would not change the result.
"""

from __future__ import annotations

import math
import os
import uuid
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .errors import DatasetError

__all__ = [
    "PtychoDataset",
    "load_npz",
    "save_npz",
    "simulate_dataset",
    "predict_amplitudes",
    "normalization_factor",
    "train_test_split",
    "REQUIRED_KEYS",
]

#: NPZ keys :func:`load_npz` cannot do without.
REQUIRED_KEYS: tuple[str, ...] = ("diff3d", "xcoords", "ycoords", "probeGuess")

#: NPZ key of the ground-truth patches: upstream's data contract calls them ``Y`` (complex64, (M, N, N)).
_GT_KEY = "Y"
#: Newer upstream files name the amplitudes ``diffraction``; read as a fallback when ``diff3d`` is absent.
_DIFF_ALIAS = "diffraction"
#: Predictions are computed in chunks of this many patterns to bound the complex128 temporaries.
_CHUNK = 1024


# --------------------------------------------------------------------------------------------------------------
# Validation helpers (shared by the dataclass and the NPZ reader, so both give the same messages)
# --------------------------------------------------------------------------------------------------------------


def _numeric(arr: Any, label: str) -> np.ndarray:
    """Return ``arr`` as an ndarray, refusing object/string/bool arrays that cannot hold numbers."""
    a = np.asarray(arr)
    if a.dtype == object:
        raise DatasetError(f"{label} is an object array; store it as a plain numeric array.")
    if not (np.issubdtype(a.dtype, np.number)):
        raise DatasetError(f"{label} has non-numeric dtype {a.dtype}; store it as a numeric array.")
    return a


def _check_finite(a: np.ndarray, label: str) -> None:
    """Raise if ``a`` holds NaN or inf, saying how many and where the first one is."""
    bad = ~np.isfinite(a)
    if bad.any():
        first = np.unravel_index(int(np.argmax(bad)), a.shape)
        raise DatasetError(
            f"{label} holds {int(bad.sum())} non-finite value(s) (NaN/inf), first at index {tuple(map(int, first))}; "
            "drop or repair those entries before use."
        )


def _validate_diff3d(arr: Any, label: str) -> np.ndarray:
    """Check ``diff3d`` is a finite, non-negative, real (M, N, N) amplitude stack; return it as float32."""
    a = np.asarray(arr)
    if np.iscomplexobj(a):
        raise DatasetError(
            f"{label} is complex ({a.dtype}); it must hold real diffraction amplitudes sqrt(counts). "
            "If it holds a complex far field, store np.abs(field).astype(np.float32)."
        )
    a = _numeric(a, label)
    if np.issubdtype(a.dtype, np.integer):
        raise DatasetError(
            f"{label} has integer dtype {a.dtype}: it looks like photon counts, but the schema stores amplitudes. "
            "Convert with diff3d = np.sqrt(counts).astype(np.float32)."
        )
    if not np.issubdtype(a.dtype, np.floating):
        raise DatasetError(f"{label} must have a real floating dtype (float32), got {a.dtype}.")
    if a.ndim != 3:
        raise DatasetError(
            f"{label} must have shape (M, N, N) (a stack of M patterns), got shape {a.shape}"
            + ("; add the pattern axis with diff3d[None]." if a.ndim == 2 else ".")
        )
    if a.shape[1] != a.shape[2]:
        raise DatasetError(f"{label} patterns must be square (M, N, N), got shape {a.shape}.")
    if a.shape[0] == 0:
        raise DatasetError(f"{label} holds no patterns (M == 0, shape {a.shape}); the dataset is empty.")
    if a.shape[1] == 0:
        raise DatasetError(f"{label} has empty patterns (N == 0, shape {a.shape}).")
    _check_finite(a, label)
    f32max = float(np.finfo(np.float32).max)
    if a.dtype.itemsize > 4 and float(np.abs(a).max()) > f32max:
        raise DatasetError(
            f"{label} holds amplitudes up to {float(np.abs(a).max())!r}, beyond float32 range ({f32max!r}); "
            "check the units: amplitudes are sqrt(photon counts)."
        )
    a = a.astype(np.float32, copy=False)  # float64 accepted: the schema stores float32
    if (a < 0).any():
        raise DatasetError(
            f"{label} holds negative amplitudes (min {float(a.min())!r}); amplitudes are sqrt(counts) >= 0. "
            "Clip background-subtracted data first: np.clip(diff3d, 0, None)."
        )
    return a


def _validate_coords(arr: Any, label: str, m: int) -> np.ndarray:
    """Check a coordinate vector has shape (M,) and finite real values; return it as float64."""
    a = np.asarray(arr)
    if np.iscomplexobj(a):
        raise DatasetError(f"{label} is complex ({a.dtype}); scan positions must be real pixel coordinates.")
    a = _numeric(a, label)
    if a.shape != (m,):
        raise DatasetError(
            f"{label} must have shape (M,) = ({m},) to match `diff3d`, got shape {a.shape}; "
            "store one position per diffraction pattern."
        )
    a = a.astype(np.float64, copy=False)
    _check_finite(a, label)
    return a


def _validate_complex_image(arr: Any, label: str, shape: tuple[int, ...] | None, ndim: int) -> np.ndarray:
    """Check a real or complex array of ``ndim`` dims (and ``shape`` if given) is finite; return complex64."""
    a = _numeric(arr, label)
    if a.ndim != ndim or (shape is not None and a.shape != shape):
        want = str(shape) if shape is not None else f"{ndim}-D"
        raise DatasetError(f"{label} must have shape {want}, got shape {a.shape}.")
    a = a.astype(np.complex64, copy=False)
    _check_finite(a, label)
    return a


def _validate_scan_index(arr: Any, label: str, m: int) -> np.ndarray:
    """Check ``scan_index`` is an integer vector of length M; return it as int64."""
    a = _numeric(arr, label)
    if not np.issubdtype(a.dtype, np.integer):
        raise DatasetError(f"{label} must have an integer dtype (int64), got {a.dtype}.")
    if a.shape != (m,):
        raise DatasetError(f"{label} must have shape (M,) = ({m},) to match `diff3d`, got shape {a.shape}.")
    return a.astype(np.int64, copy=False)


def _validate_photon_scale(value: Any, label: str) -> float:
    """Check the photon scale is one finite positive real number; return it as a Python float."""
    a = _numeric(value, label)
    if a.size != 1 or np.iscomplexobj(a):
        raise DatasetError(f"{label} must be a single real number, got shape {a.shape} dtype {a.dtype}.")
    v = float(a.reshape(()))
    if not math.isfinite(v) or v <= 0:
        raise DatasetError(f"{label} must be finite and > 0, got {v!r}.")
    return v


# --------------------------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PtychoDataset:
    """One ptychography scan in upstream's NPZ layout, validated and with normalized dtypes.

    Construction validates every array (shape, dtype, finiteness) and casts to the documented dtypes, so any
    instance can be fed to a trainer without further checks. Arrays that already have the right dtype are
    kept, not copied: do not modify them in place if another dataset shares them (e.g. after
    :func:`train_test_split`, which shares ``probeGuess`` and ``objectGuess``).

    Attributes:
        diff3d: (M, N, N) float32 diffraction amplitudes, sqrt(photon counts), zero frequency at (N//2, N//2).
        xcoords: (M,) float64 scan x positions (columns) in object pixels: where the patch centre, pixel
            (N//2, N//2) of the patch, sits in ``objectGuess``.
        ycoords: (M,) float64 scan y positions (rows), same convention.
        probeGuess: (N, N) complex64 illumination.
        objectGuess: (H, W) complex64 object, or None when unknown (experimental data).
        scan_index: (M,) int64 scan number of each pattern; all zeros when not given.
        ground_truth_patches: (M, N, N) complex64 object crops under each position (NPZ key ``Y``), or None.
        photon_scale: the factor of the simulator's forward model (module docstring), or None for data that
            was not simulated here.
    """

    diff3d: np.ndarray
    xcoords: np.ndarray
    ycoords: np.ndarray
    probeGuess: np.ndarray
    objectGuess: np.ndarray | None = None
    scan_index: np.ndarray | None = None
    ground_truth_patches: np.ndarray | None = None
    photon_scale: float | None = None

    def __post_init__(self) -> None:
        diff = _validate_diff3d(self.diff3d, "`diff3d`")
        m, n = diff.shape[0], diff.shape[1]
        fields: dict[str, Any] = {
            "diff3d": diff,
            "xcoords": _validate_coords(self.xcoords, "`xcoords`", m),
            "ycoords": _validate_coords(self.ycoords, "`ycoords`", m),
            "probeGuess": _validate_complex_image(self.probeGuess, "`probeGuess`", (n, n), 2),
            "objectGuess": (
                None if self.objectGuess is None
                else _validate_complex_image(self.objectGuess, "`objectGuess`", None, 2)
            ),
            "scan_index": (
                np.zeros(m, dtype=np.int64) if self.scan_index is None
                else _validate_scan_index(self.scan_index, "`scan_index`", m)
            ),
            "ground_truth_patches": (
                None if self.ground_truth_patches is None
                else _validate_complex_image(
                    self.ground_truth_patches, f"`ground_truth_patches` (NPZ key `{_GT_KEY}`)", (m, n, n), 3
                )
            ),
            "photon_scale": (
                None if self.photon_scale is None else _validate_photon_scale(self.photon_scale, "`photon_scale`")
            ),
        }
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    @property
    def N(self) -> int:
        """Side length of the (square) diffraction patterns and of the probe."""
        return int(self.diff3d.shape[1])

    @property
    def n_patterns(self) -> int:
        """Number of diffraction patterns M."""
        return int(self.diff3d.shape[0])

    @property
    def offsets(self) -> np.ndarray:
        """(M, 2) float64 positions with index 0 = x = column and index 1 = y = row (spec §6 convention)."""
        return np.stack([self.xcoords, self.ycoords], axis=1)

    def subset(self, indices: Sequence[int] | np.ndarray) -> PtychoDataset:
        """Return the patterns at ``indices`` (in that order) as a new dataset sharing probe and object."""
        idx = np.asarray(indices, dtype=np.int64)
        return PtychoDataset(
            diff3d=self.diff3d[idx],
            xcoords=self.xcoords[idx],
            ycoords=self.ycoords[idx],
            probeGuess=self.probeGuess,
            objectGuess=self.objectGuess,
            scan_index=self.scan_index[idx],
            ground_truth_patches=None if self.ground_truth_patches is None else self.ground_truth_patches[idx],
            photon_scale=self.photon_scale,
        )

    def __repr__(self) -> str:
        obj = None if self.objectGuess is None else self.objectGuess.shape
        return (
            f"PtychoDataset(n_patterns={self.n_patterns}, N={self.N}, objectGuess={obj}, "
            f"ground_truth_patches={self.ground_truth_patches is not None}, photon_scale={self.photon_scale})"
        )


# --------------------------------------------------------------------------------------------------------------
# NPZ I/O
# --------------------------------------------------------------------------------------------------------------


def load_npz(path: str | os.PathLike[str]) -> PtychoDataset:
    """Read a dataset in upstream's NPZ schema, refusing pickles and validating every array.

    Keys read: ``diff3d`` (or, if absent, the newer name ``diffraction``), ``xcoords``, ``ycoords``,
    ``probeGuess`` (required); ``objectGuess``, ``scan_index``, ``Y`` (ground-truth patches) and
    ``photon_scale`` (optional). Other keys (e.g. ``xcoords_start``) are ignored. The file is opened with
    ``allow_pickle=False``, so an object array is refused without being unpickled: a crafted file cannot
    run code.

    Args:
        path: The ``.npz`` file.

    Returns:
        The validated dataset; ``diff3d`` is cast to float32 (float64 input is accepted).

    Raises:
        DatasetError: The file is missing or not an NPZ archive, a required key is missing, or an array has
            the wrong rank, shape, dtype or values (NaN/inf, negative amplitudes, zero patterns, a pickled
            object array). The message names the key and the fix.
    """
    p = Path(path)
    try:
        # Opened here (not by np.load) so the handle is closed even when numpy fails half-way.
        fh = open(p, "rb")
    except FileNotFoundError as exc:
        raise DatasetError(f"NPZ dataset {str(p)!r} does not exist; check the path.") from exc
    except OSError as exc:
        raise DatasetError(
            f"{str(p)!r} is not a readable NPZ archive ({type(exc).__name__}: {exc}); give the path of an .npz file."
        ) from exc
    with fh:
        try:
            loaded = np.load(fh, allow_pickle=False)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise DatasetError(
                f"{str(p)!r} is not a readable NPZ archive ({type(exc).__name__}: {exc}); "
                "write datasets with numpy.savez or save_npz."
            ) from exc
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DatasetError(
                f"{str(p)!r} is a single .npy array, not an NPZ archive with named keys; "
                "save it with np.savez(path, diff3d=..., xcoords=..., ycoords=..., probeGuess=...)."
            )
        with loaded as npz:
            arrays = _read_members(npz, str(p))
    return PtychoDataset(**arrays)


def _read_members(npz: np.lib.npyio.NpzFile, where: str) -> dict[str, Any]:
    """Read the schema's keys from an open archive into constructor arguments of :class:`PtychoDataset`."""
    keys = set(npz.files)

    def read(key: str) -> np.ndarray:
        try:
            return npz[key]
        except ValueError as exc:
            if "allow_pickle" in str(exc):
                raise DatasetError(
                    f"`{key}` in {where!r} is a pickled object array; it was refused without unpickling "
                    "(loading pickles can run arbitrary code). Re-save it as a plain numeric array."
                ) from exc
            raise DatasetError(f"`{key}` in {where!r} cannot be read ({exc}); the file is corrupt.") from exc
        except (OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
            raise DatasetError(
                f"`{key}` in {where!r} cannot be read ({type(exc).__name__}: {exc}); the file is corrupt."
            ) from exc

    diff_key = "diff3d" if "diff3d" in keys or _DIFF_ALIAS not in keys else _DIFF_ALIAS
    missing = [k for k in (diff_key, *REQUIRED_KEYS[1:]) if k not in keys]
    if missing:
        hints = {
            "diff3d": "(M, N, N) float32 amplitudes sqrt(counts)",
            "xcoords": "(M,) scan x positions (columns) in pixels",
            "ycoords": "(M,) scan y positions (rows) in pixels",
            "probeGuess": "(N, N) complex64 probe",
        }
        raise DatasetError(
            f"{where!r} lacks required key(s) {', '.join(f'`{k}`' for k in missing)}; present: "
            f"{sorted(keys)}. Add " + "; ".join(f"`{k}` = {hints[k]}" for k in missing) + "."
        )
    # Read the arrays one by one so a pickled member is reported under its own key.
    arrays: dict[str, Any] = {
        "diff3d": read(diff_key),
        "xcoords": read("xcoords"),
        "ycoords": read("ycoords"),
        "probeGuess": read("probeGuess"),
    }
    optional = {"objectGuess": "objectGuess", "scan_index": "scan_index",
                _GT_KEY: "ground_truth_patches", "photon_scale": "photon_scale"}
    for key, field in optional.items():
        if key in keys:
            arrays[field] = read(key)
    return arrays


def save_npz(dataset: PtychoDataset, path: str | os.PathLike[str]) -> None:
    """Write ``dataset`` in upstream's NPZ schema, atomically.

    Keys written: ``xcoords``, ``ycoords``, ``xcoords_start``, ``ycoords_start`` (copies of the positions,
    which older upstream readers still require), ``diff3d``, ``probeGuess``, ``scan_index``, and when present
    ``objectGuess``, ``Y`` (ground-truth patches) and ``photon_scale`` (0-d float64). The archive is written
    uncompressed to a temporary file in the target directory, flushed to disk, then moved over ``path`` with
    ``os.replace``; on any failure the temporary file is removed and an existing ``path`` is left untouched,
    so a reader never sees a partial file.

    Args:
        dataset: The dataset to write.
        path: Target file; written as given (no ``.npz`` suffix is appended).

    Raises:
        TypeError: ``dataset`` is not a :class:`PtychoDataset`.
        OSError: The directory is missing or not writable, or the disk is full.
    """
    if not isinstance(dataset, PtychoDataset):
        raise TypeError(f"`dataset` must be a PtychoDataset, got {type(dataset).__name__}.")
    target = Path(path)
    arrays: dict[str, np.ndarray] = {
        "xcoords": dataset.xcoords,
        "ycoords": dataset.ycoords,
        "xcoords_start": dataset.xcoords,
        "ycoords_start": dataset.ycoords,
        "diff3d": dataset.diff3d,
        "probeGuess": dataset.probeGuess,
        "scan_index": dataset.scan_index,
    }
    if dataset.objectGuess is not None:
        arrays["objectGuess"] = dataset.objectGuess
    if dataset.ground_truth_patches is not None:
        arrays[_GT_KEY] = dataset.ground_truth_patches
    if dataset.photon_scale is not None:
        arrays["photon_scale"] = np.asarray(dataset.photon_scale, dtype=np.float64)

    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    # os.open with 0o666 lets the umask decide the final permissions, as for an ordinary file.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# --------------------------------------------------------------------------------------------------------------
# Physics: forward model and simulator
# --------------------------------------------------------------------------------------------------------------


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
                raise ValueError("The dataset has no `photon_scale` (not simulated here); pass `photon_scale=`.")
            photon_scale = dataset_or_probe.photon_scale
    else:
        probe = np.asarray(dataset_or_probe)
        if photon_scale is None:
            photon_scale = 1.0
    if probe.ndim != 2 or probe.shape[0] != probe.shape[1]:
        raise ValueError(f"`probe` must be a square (N, N) array, got shape {probe.shape}.")
    n = probe.shape[0]
    patches = np.asarray(patches)
    if patches.ndim < 2 or patches.shape[-2:] != (n, n):
        raise ValueError(f"`patches` must have shape (..., {n}, {n}) to match the probe, got {patches.shape}.")
    probe128 = probe.astype(np.complex128)
    flat = patches.reshape(-1, n, n)
    out = np.empty(flat.shape, dtype=np.float64)
    for start in range(0, flat.shape[0], _CHUNK):
        field = flat[start:start + _CHUNK].astype(np.complex128) * probe128
        far = np.fft.fftshift(np.fft.fft2(field, axes=(-2, -1)), axes=(-2, -1))
        out[start:start + _CHUNK] = np.abs(far) * (float(photon_scale) / n)
    return out.reshape(patches.shape)


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
        raise ValueError(f"`probe` must be 'aperture' or 'gaussian', got {kind!r}.")
    amp /= amp.max()
    return (amp * np.exp(1j * curvature * (r / (n / 2.0)) ** 2)).astype(np.complex64)


def _grid_shape(n_scan: int | tuple[int, int] | None) -> tuple[tuple[int, int], int]:
    """Resolve ``n_scan`` into (rows, cols) of the raster and the number of positions kept."""
    if n_scan is None:
        return (16, 16), 256
    if isinstance(n_scan, (int, np.integer)) and not isinstance(n_scan, bool):
        count = int(n_scan)
        if count < 1:
            raise ValueError(f"`n_scan` must be >= 1, got {count}.")
        cols = math.ceil(math.sqrt(count))
        return (math.ceil(count / cols), cols), count
    try:
        rows, cols = (int(v) for v in n_scan)  # type: ignore[union-attr]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"`n_scan` must be an int or a (rows, cols) pair, got {n_scan!r}.") from exc
    if rows < 1 or cols < 1:
        raise ValueError(f"`n_scan` grid must be at least (1, 1), got {(rows, cols)}.")
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
        N: Pattern, probe and patch size in pixels (>= 8).
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
        ValueError: An argument is out of range or ``object_size`` is too small for the scan.
    """
    if int(N) != N or N < 8:
        raise ValueError(f"`N` must be an integer >= 8, got {N!r}.")
    n = int(N)
    (rows, cols), count = _grid_shape(n_scan)
    step_f = float(n // 4) if step is None else float(step)
    if not (0 < step_f < n):
        raise ValueError(f"`step` must be in (0, N={n}) so that neighbouring patterns overlap, got {step_f!r}.")
    jitter_f = step_f / 8.0 if jitter is None else float(jitter)
    if not (jitter_f >= 0 and math.isfinite(jitter_f)):
        raise ValueError(f"`jitter` must be finite and >= 0, got {jitter_f!r}.")
    if not (nphotons > 0 and math.isfinite(nphotons)):
        raise ValueError(f"`nphotons` must be finite and > 0, got {nphotons!r}.")
    if probe not in ("aperture", "gaussian"):
        raise ValueError(f"`probe` must be 'aperture' or 'gaussian', got {probe!r}.")

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
            raise ValueError(
                f"`object_size` {(h, w)} is too small for a {rows}x{cols} scan with step {step_f} and jitter "
                f"{jitter_f} at N={n}; use at least {(need_h, need_w)} or leave it None."
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
        raise ValueError("The simulated exit waves carry no energy; check `probe` and `N`.")  # pragma: no cover
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


# --------------------------------------------------------------------------------------------------------------
# Normalization and splitting
# --------------------------------------------------------------------------------------------------------------


def normalization_factor(diff3d: np.ndarray) -> float:
    """Upstream's training input scale ``f = sqrt((N/2)**2 / mean_patterns(sum_pixels amp**2))`` (spec §4.3).

    The network sees ``f * amp``, whose mean per-pattern energy is then ``(N/2)**2`` whatever the photon
    budget; this is ``ptycho/raw_data.py::normalize_data`` (RawData path, used by every bundle-writing
    workflow), not the twice-as-large ``sqrt(N**2 / ...)`` of upstream's memory-mapped loader. Accumulated in
    float64.

    Args:
        diff3d: (M, N, N) amplitudes (a single (N, N) pattern is treated as M = 1).

    Returns:
        The factor as a Python float; 1.0 when every amplitude is zero.

    Raises:
        DatasetError: The array is not (M, N, N)/(N, N) with square patterns, or holds NaN/inf.
    """
    a = np.asarray(diff3d)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or a.shape[1] != a.shape[2] or a.shape[0] == 0:
        raise DatasetError(f"`diff3d` must have shape (M, N, N) with M >= 1, got {np.shape(diff3d)}.")
    if np.iscomplexobj(a):
        raise DatasetError(f"`diff3d` must be real amplitudes, got dtype {a.dtype}.")
    a64 = a.astype(np.float64)
    _check_finite(a64, "`diff3d`")
    mean_energy = float(np.mean(np.sum(a64**2, axis=(1, 2))))
    if mean_energy == 0.0:
        return 1.0
    return math.sqrt((a.shape[1] / 2.0) ** 2 / mean_energy)


def train_test_split(
    dataset: PtychoDataset, test_fraction: float = 0.2, seed: int = 0
) -> tuple[PtychoDataset, PtychoDataset]:
    """Split a dataset by pattern into train and test parts, deterministically for a seed.

    ``round(test_fraction * M)`` patterns, drawn by ``numpy.random.default_rng(seed).permutation``, go to the
    test part; each part keeps the original pattern order. Both parts share ``probeGuess``, ``objectGuess``
    and ``photon_scale``. Note that a random split of one scan leaves test positions overlapping training
    ones, which is what upstream's single-file workflows do too.

    Args:
        dataset: The dataset to split (M >= 2).
        test_fraction: Fraction of patterns for the test part, in (0, 1).
        seed: Seed of the permutation.

    Returns:
        ``(train, test)``, each with at least one pattern.

    Raises:
        ValueError: ``test_fraction`` is outside (0, 1) or would leave a part empty.
    """
    if not (0.0 < float(test_fraction) < 1.0):
        raise ValueError(f"`test_fraction` must be in (0, 1), got {test_fraction!r}.")
    m = dataset.n_patterns
    n_test = int(round(float(test_fraction) * m))
    if n_test < 1 or n_test > m - 1:
        raise ValueError(
            f"`test_fraction`={test_fraction!r} of {m} patterns leaves a part empty ({n_test} test patterns); "
            "use more patterns or another fraction."
        )
    perm = np.random.default_rng(seed).permutation(m)
    test_idx = np.sort(perm[:n_test])
    train_idx = np.sort(perm[n_test:])
    return dataset.subset(train_idx), dataset.subset(test_idx)

