"""Ptychography datasets: the upstream NPZ schema (strict load, atomic save), normalization and splitting.

PtychoPINN exchanges data as ``.npz`` files holding diffraction *amplitudes* (``diff3d`` = sqrt(counts),
float32, DATA-001), the scan positions in object pixels (``xcoords``/``ycoords``; index 0 of an offset is
x = column, index 1 is y = row, docs/bundle-format.md §6), the complex probe and optionally the complex object. This module
reads and writes that schema with strict validation (a bad file fails here with a message naming the key and
the fix, not deep inside a training loop), and computes upstream's per-dataset input normalization (docs/bundle-format.md §4.3).

It depends on numpy only: no MLflow, no torch.
"""


from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlflow_ptycho_flavor._io import atomic_write
from mlflow_ptycho_flavor.errors import DatasetError
from mlflow_ptycho_flavor.model.inference import dataset_normalization_factor

__all__ = [
    "PtychoDataset",
    "load_npz",
    "save_npz",
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
        """(M, 2) float64 positions with index 0 = x = column and index 1 = y = row (docs/bundle-format.md §6 convention)."""
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


def read_npz_member(npz: np.lib.npyio.NpzFile, key: str, where: str) -> np.ndarray:
    """One member of an open NPZ, read safely: its declared size checked first (:func:`_check_declared_size`),
    pickled object arrays refused without unpickling, and every read failure a :class:`DatasetError` that quotes
    at most a few hundred characters of the key and the path."""
    name, place = key[:80], where[:200]
    _check_declared_size(npz, key, where)
    try:
        return npz[key]
    except MemoryError as exc:
        raise DatasetError(f"`{name}` in {place!r} does not fit in memory; use a smaller dataset.") from exc
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise DatasetError(
                f"`{name}` in {place!r} is a pickled object array; it was refused without unpickling "
                "(loading pickles can run arbitrary code). Re-save it as a plain numeric array."
            ) from exc
        raise DatasetError(f"`{name}` in {place!r} cannot be read ({str(exc)[:200]}); the file is corrupt.") from exc
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise DatasetError(
            f"`{name}` in {place!r} cannot be read ({type(exc).__name__}: {str(exc)[:200]}); the file is corrupt."
        ) from exc


def _read_members(npz: np.lib.npyio.NpzFile, where: str) -> dict[str, Any]:
    """Read the schema's keys from an open archive into constructor arguments of :class:`PtychoDataset`."""
    keys = set(npz.files)

    def read(key: str) -> np.ndarray:
        return read_npz_member(npz, key, where)

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


#: deflate expands at most ~1032x; a member declaring more than this many bytes per compressed byte is a lie.
_DEFLATE_MAX_RATIO = 1032


def _size_text(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes:,} bytes"


def _check_declared_size(npz: np.lib.npyio.NpzFile, key: str, where: str) -> None:
    """Refuse a member whose ``.npy`` header claims more data than the member can hold, before numpy allocates it.

    numpy allocates the array the header describes and then reads into it, so a 40 KB file whose header claims
    ``(9830400, 64, 64)`` float32 would first ask for 150 GiB. The claim is checked against the member's
    uncompressed size, and that size against what its compressed bytes can expand to, so the memory a read may
    take is bounded by the file's real size.
    """
    archive = npz.zip
    names = set(archive.namelist())
    member = f"{key}.npy" if f"{key}.npy" in names else key
    try:
        info = archive.getinfo(member)
        if info.compress_type == zipfile.ZIP_STORED:
            real_limit = info.compress_size
        elif info.compress_type == zipfile.ZIP_DEFLATED:
            real_limit = info.compress_size * _DEFLATE_MAX_RATIO + 1024
        else:
            raise DatasetError(
                f"`{key}` in {where!r} uses zip compression method {info.compress_type}; numpy writes stored or "
                "deflated members (np.savez / np.savez_compressed)."
            )
        if info.file_size > real_limit:
            raise DatasetError(
                f"`{key}` in {where!r} declares {_size_text(info.file_size)} uncompressed but its "
                f"{_size_text(info.compress_size)} of data cannot hold that; the file is corrupt or crafted."
            )
        with archive.open(member) as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
            header_bytes = handle.tell()
    except DatasetError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise DatasetError(f"`{key}` in {where!r} has no readable .npy header ({type(exc).__name__}: {exc}).") from exc
    claimed = math.prod(int(n) for n in shape) * dtype.itemsize
    held = info.file_size - header_bytes
    if dtype.hasobject:
        return  # object arrays are refused by numpy's allow_pickle=False without being allocated
    if claimed > held:
        raise DatasetError(
            f"`{key}` in {where!r}: its header claims shape {tuple(shape)} {dtype} = {_size_text(claimed)}, but the "
            f"member holds {_size_text(max(held, 0))}; the file is corrupt or crafted (refused before allocating)."
        )


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

    atomic_write(target, lambda handle: np.savez(handle, **arrays))


# --------------------------------------------------------------------------------------------------------------
# Normalization and splitting
# --------------------------------------------------------------------------------------------------------------


def normalization_factor(diff3d: np.ndarray) -> float:
    """Upstream's training input scale ``f = sqrt((N/2)**2 / mean_patterns(sum_pixels amp**2))`` (docs/bundle-format.md §4.3).

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
    _check_finite(a.astype(np.float64), "`diff3d`")
    return dataset_normalization_factor(a)


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
