"""Input data in ptychodus's conventions: photon counts, a modes axis on the probe, bad pixels, x/y order.

ptychodus (the beamline application) hands PtychoPINN its data as an NPZ with upstream's key names but not
upstream's conventions, which :func:`~.dataset.load_npz` refuses or would misread:

==================  ==========================================  ============================================
                    upstream's schema (``load_npz``)             ptychodus's export (this module)
==================  ==========================================  ============================================
``diff3d``          float32 amplitudes ``sqrt(counts)``          detector **counts** (integer dtype), bad pixels
                                                                 already zeroed; or amplitudes
``probeGuess``      ``(N, N)`` complex                           ``(modes, N, N)`` complex (torch path)
``bad_pixels``      -                                            optional ``(N, N)`` (or ``(M, N, N)``) mask,
                                                                 True = bad
positions           ``xcoords`` = x = column, ``ycoords`` = row  the same keys in object-frame pixels; other
                                                                 tools store ``[y, x]`` pairs
input normalization ``sqrt((N/2)**2 / mean sum amp**2)``          ptychodus's torch path: ``sqrt(N**2 / ...)``,
                    (RawData path, what bundles are trained on)  twice as large (docs/bundle-format.md §4.3)
==================  ==========================================  ============================================

:func:`load_ptychodus_npz` reads such a file into the package's :class:`~.dataset.PtychoDataset` (float32 amplitudes,
x/y positions, one probe mode) plus the facts a prediction needs (:class:`PtychodusData`: the normalization
factor of the chosen convention, the bad-pixel mask, all probe modes). Every choice is an explicit option:

* **Counts -> amplitudes**: ``amplitude = sqrt(counts)`` elementwise, computed in float64 and rounded to float32
  (exactly the correctly rounded float32 square root), no offset, no Anscombe transform - the DATA-001 contract
  ``diff3d = sqrt(counts)`` (:func:`counts_to_amplitudes`). Integer ``diff3d`` is taken as counts; float
  ``diff3d`` as amplitudes unless ``input_kind="counts"`` says otherwise.
* **Probe modes**: ``dataset.probeGuess`` is the dominant mode (largest total power ``sum |P_k|**2``, mode 0 for
  ptychodus's power-ordered modes); all modes are kept in :attr:`PtychodusData.probe_modes`. The network itself
  ignores the probe (docs/bundle-format.md §4.1): it matters only for probe-weighted stitching, where the
  dominant mode is the usual stand-in for an incoherent mixture.
* **Bad pixels** (``bad_pixels=``): ``"mask"`` (default) sets them to zero, which is what ptychodus itself does
  to the training data it exports (so a model trained on ptychodus exports saw zeros there) and what counts as
  "no photons" in the normalization; ``"inpaint"`` replaces each by the mean of its valid 8-neighbours (repeated
  inward for clusters), for models trained on complete patterns where a zero in a bright region is an artefact
  they never saw; ``"ignore"`` keeps the stored values. Masked pixels are excluded from the value checks, so
  sentinel values there (-1, NaN, saturation) do not make the file invalid.
* **Positions** (``positions=``): ``"xy"`` (default, ptychodus's NPZ export and upstream's schema) reads
  ``xcoords`` as x = column and ``ycoords`` as y = row; ``"yx"`` says the file holds the pair the other way round
  (``xcoords`` is the row). A file with a single ``(M, 2)`` ``positions`` array instead is read in the stated
  column order.
* **Normalization** (``normalization=``): ``"upstream"`` gives ``f = sqrt((N/2)**2 / mean_patterns sum amp**2)``,
  the factor models trained by upstream's bundle-writing workflows expect; ``"ptychodus"`` gives
  ``sqrt(N**2 / ...)`` = ``2 f``, what ptychodus's torch path computes (upstream's memory-mapped dataset,
  ``data_scaling='Parseval'``), to reproduce ptychodus's own results. Both are computed after bad-pixel handling.

Nothing here imports MLflow.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mlflow_ptycho_flavor.errors import DatasetError, PredictionInputError
from mlflow_ptycho_flavor.model.inference import counts_to_amplitudes as model_counts_to_amplitudes
from mlflow_ptycho_flavor.sim.dataset import PtychoDataset, normalization_factor, read_npz_member

__all__ = [
    "PtychodusData",
    "counts_to_amplitudes",
    "normalization_scale",
    "apply_bad_pixels",
    "load_ptychodus_npz",
    "looks_like_ptychodus_npz",
    "POSITION_ORDERS",
    "BAD_PIXEL_METHODS",
    "NORMALIZATIONS",
]

PositionOrder = Literal["xy", "yx"]
BadPixelMethod = Literal["mask", "inpaint", "ignore"]
Normalization = Literal["upstream", "ptychodus"]
InputKind = Literal["counts", "amplitude"]

POSITION_ORDERS: tuple[str, ...] = ("xy", "yx")
BAD_PIXEL_METHODS: tuple[str, ...] = ("mask", "inpaint", "ignore")
NORMALIZATIONS: tuple[str, ...] = ("upstream", "ptychodus")
_INPUT_KINDS: tuple[str, ...] = ("counts", "amplitude")
#: Patterns inpainted per chunk, bounding the float64 temporaries.
_CHUNK = 1024


@dataclass(frozen=True, eq=False)
class PtychodusData:
    """A ptychodus-format NPZ read into the package's conventions.

    Attributes:
        dataset: the patterns as float32 amplitudes (bad pixels handled), x/y positions, the dominant probe mode,
            and ``objectGuess`` / ``scan_index`` when the file has them.
        scale: the input normalization factor of the chosen convention (pass it as ``scale=`` to ``predict``).
        normalization: ``"upstream"`` or ``"ptychodus"``, the convention ``scale`` follows.
        input_kind: what ``diff3d`` held in the file, ``"counts"`` or ``"amplitude"``.
        bad_pixels: the file's mask (True = bad), ``(N, N)`` or ``(M, N, N)``, or None when it has none.
        bad_pixel_method: how the mask was applied (``"mask"``, ``"inpaint"`` or ``"ignore"``).
        probe_modes: every probe mode of the file, complex64 ``(modes, N, N)``.
        probe_mode_index: the mode ``dataset.probeGuess`` is (the one with the largest power).
    """

    dataset: PtychoDataset
    scale: float
    normalization: str
    input_kind: str
    bad_pixels: np.ndarray | None
    bad_pixel_method: str
    probe_modes: np.ndarray
    probe_mode_index: int


def _check_option(value: Any, allowed: tuple[str, ...], name: str) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise DatasetError(f"`{name}`={value!r} is not one of {allowed}.")
    return value


def counts_to_amplitudes(counts: Any) -> np.ndarray:
    """Convert photon counts to the diffraction amplitudes the network takes: ``sqrt(counts)`` as float32.

    The package's one conversion, :func:`mlflow_ptycho_flavor.model.inference.counts_to_amplitudes` (float64
    square root of the exact counts, rounded once to float32; no offset or variance stabilisation, as upstream's
    data contract DATA-001 defines ``diff3d = sqrt(counts)``), with its refusals reported as dataset errors.

    Args:
        counts: any shape, integer dtype, or floating with integral values (e.g. counts saved as float32).

    Returns:
        float32 amplitudes of the same shape.

    Raises:
        DatasetError: the values are complex, boolean or non-numeric, non-finite, negative, or not whole numbers.
    """
    try:
        return model_counts_to_amplitudes(counts, input_kind="counts", name="counts")
    except PredictionInputError as exc:
        raise DatasetError(str(exc)) from exc


def normalization_scale(amplitudes: np.ndarray, convention: Normalization = "upstream") -> float:
    """The input factor ``f`` the network's input ``f * amplitude`` is scaled by, in either convention.

    ``"upstream"``: ``sqrt((N/2)**2 / mean_patterns sum_pixels amp**2)`` (what bundles from upstream's workflows
    are trained with; the same as :func:`~.dataset.normalization_factor`). ``"ptychodus"``: ``sqrt(N**2 / ...)``,
    twice that, as ptychodus's torch path computes it. 1.0 when every amplitude is zero. Accumulated in float64.

    Raises:
        DatasetError: not an ``(M, N, N)`` real array, or an unknown convention.
    """
    _check_option(convention, NORMALIZATIONS, "normalization")
    a = np.asarray(amplitudes)
    if a.ndim != 3 or a.shape[1] != a.shape[2] or a.shape[0] == 0 or a.dtype.kind not in "fiu":
        raise DatasetError(f"amplitudes must be a real (M, N, N) stack with M >= 1, got {a.shape} {a.dtype}.")
    factor = normalization_factor(a)
    # N**2 = 4 (N/2)**2: the ptychodus factor is exactly twice the upstream one (scaling by 4 and 2 is exact).
    if convention == "upstream" or not np.any(a):
        return factor  # all-zero input: 1.0 in both conventions
    return 2.0 * factor


def _neighbour_mean(values: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum over the 8 neighbours of valid values, and their count, for every pixel of ``(M, N, N)`` stacks."""
    padded_v = np.pad(np.where(valid, values, 0.0), ((0, 0), (1, 1), (1, 1)))
    padded_c = np.pad(valid.astype(np.float64), ((0, 0), (1, 1), (1, 1)))
    n = values.shape[1]
    total = np.zeros(values.shape, dtype=np.float64)
    count = np.zeros(values.shape, dtype=np.float64)
    for dr in (0, 1, 2):
        for dc in (0, 1, 2):
            if dr == 1 and dc == 1:
                continue
            total += padded_v[:, dr: dr + n, dc: dc + n]
            count += padded_c[:, dr: dr + n, dc: dc + n]
    return total, count


def apply_bad_pixels(amplitudes: np.ndarray, mask: np.ndarray, method: BadPixelMethod = "mask") -> np.ndarray:
    """Apply a bad-pixel mask (True = bad) to ``(M, N, N)`` amplitudes; returns a new float32 array.

    ``"mask"`` zeroes bad pixels; ``"inpaint"`` fills each with the mean of its valid 8-neighbours, pass after pass
    from the edge of a cluster inwards (at most N passes); ``"ignore"`` returns the values unchanged.

    Raises:
        DatasetError: the mask does not broadcast to the stack, or inpainting finds a pattern with no valid pixel.
    """
    _check_option(method, BAD_PIXEL_METHODS, "bad_pixels")
    values = np.array(amplitudes, dtype=np.float32)
    if method == "ignore":
        return values
    bad = np.broadcast_to(mask, values.shape)
    if method == "mask":
        values[bad] = 0.0
        return values
    result = values.copy()
    for start in range(0, values.shape[0], _CHUNK):
        block = values[start: start + _CHUNK].astype(np.float64)
        valid = ~bad[start: start + _CHUNK].copy()
        if not valid.reshape(valid.shape[0], -1).any(axis=1).all():
            raise DatasetError("a pattern has every pixel marked bad; it cannot be inpainted - drop that pattern.")
        for _ in range(values.shape[1]):
            missing = ~valid
            if not missing.any():
                break
            total, count = _neighbour_mean(block, valid)
            fill = missing & (count > 0)
            block[fill] = total[fill] / count[fill]
            valid = valid | fill
        result[start: start + _CHUNK] = block.astype(np.float32)
    return result


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        handle = open(path, "rb")
    except FileNotFoundError as exc:
        raise DatasetError(f"NPZ dataset {str(path)[:200]!r} does not exist; check the path.") from exc
    except OSError as exc:
        raise DatasetError(f"{str(path)[:200]!r} cannot be opened ({type(exc).__name__}: {exc}).") from exc
    with handle:
        try:
            archive = np.load(handle, allow_pickle=False)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise DatasetError(
                f"{str(path)[:200]!r} is not a readable NPZ archive ({type(exc).__name__}: {str(exc)[:200]})."
            ) from exc
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise DatasetError(f"{str(path)[:200]!r} is a single .npy array, not an NPZ archive with named keys.")
        arrays: dict[str, np.ndarray] = {}
        with archive:
            for key in archive.files:
                arrays[key] = read_npz_member(archive, key, str(path))
    return arrays


def _npy_header(archive: zipfile.ZipFile, key: str) -> tuple[tuple[int, ...], np.dtype] | None:
    """Shape and dtype of the member ``key`` of an NPZ, from its ``.npy`` header alone (no data read)."""
    name = f"{key}.npy"
    if name not in archive.namelist():
        return None
    with archive.open(name) as member:
        version = np.lib.format.read_magic(member)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(member)
    return tuple(shape), np.dtype(dtype)


def looks_like_ptychodus_npz(path: str | os.PathLike[str]) -> bool:
    """True when an NPZ is in ptychodus's conventions rather than upstream's schema.

    Any one sign is enough: a ``bad_pixels`` key, an integer ``diff3d`` (or ``diffraction``: photon counts), or a
    3-D ``probeGuess`` (a modes axis). Decided from the zip directory and the ``.npy`` headers only, so the cost
    does not grow with the data. A file that cannot be read that way gives False: :func:`~.dataset.load_npz`
    then reports what is wrong with it.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            if "bad_pixels.npy" in archive.namelist():
                return True
            for key in ("diff3d", "diffraction"):
                header = _npy_header(archive, key)
                if header is not None:
                    if header[1].kind in "iu":
                        return True
                    break
            probe = _npy_header(archive, "probeGuess")
            return probe is not None and len(probe[0]) == 3
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError):
        return False


def _bad_pixel_mask(raw: Any, shape: tuple[int, ...]) -> np.ndarray:
    mask = np.asarray(raw)
    if mask.dtype != bool:
        if mask.dtype.kind not in "iu" or (mask.size and not np.isin(mask, (0, 1)).all()):
            raise DatasetError(
                f"`bad_pixels` must be a boolean mask (True = bad) or 0/1 integers, got dtype {mask.dtype}."
            )
        mask = mask.astype(bool)
    if mask.shape not in (shape[1:], shape):
        raise DatasetError(
            f"`bad_pixels` has shape {mask.shape}; expected the detector frame {shape[1:]} or one mask per pattern "
            f"{shape}."
        )
    return mask


def _probe_modes(raw: Any, n: int) -> tuple[np.ndarray, int]:
    probe = np.asarray(raw)
    if probe.dtype.kind not in "fiuc" or probe.dtype == bool:
        raise DatasetError(f"`probeGuess` must be a complex array, got dtype {probe.dtype}.")
    if probe.ndim == 2:
        probe = probe[None]
    if probe.ndim != 3 or probe.shape[1:] != (n, n) or probe.shape[0] == 0:
        raise DatasetError(
            f"`probeGuess` must be (N, N) or (modes, N, N) with N = {n} (the pattern size), got {probe.shape}."
        )
    modes = probe.astype(np.complex64)
    if not np.isfinite(modes).all():
        raise DatasetError("`probeGuess` holds NaN or inf values.")
    power = np.sum(np.abs(modes.astype(np.complex128)) ** 2, axis=(1, 2))
    return modes, int(np.argmax(power))


def _positions(arrays: dict[str, np.ndarray], order: str, m: int) -> tuple[np.ndarray, np.ndarray]:
    if "xcoords" in arrays and "ycoords" in arrays:
        first, second = arrays["xcoords"], arrays["ycoords"]
    elif "positions" in arrays:
        pairs = np.asarray(arrays["positions"])
        if pairs.ndim != 2 or pairs.shape != (m, 2):
            raise DatasetError(f"`positions` must have shape (M, 2) = ({m}, 2), got {pairs.shape}.")
        first, second = pairs[:, 0], pairs[:, 1]
    else:
        raise DatasetError(
            "the file has no scan positions: expected `xcoords` and `ycoords` (object-frame pixels) or an (M, 2) "
            f"`positions` array; present: {sorted(arrays)[:20]}."
        )
    return (first, second) if order == "xy" else (second, first)


def load_ptychodus_npz(
    path: str | os.PathLike[str],
    *,
    positions: PositionOrder = "xy",
    bad_pixels: BadPixelMethod = "mask",
    normalization: Normalization = "upstream",
    input_kind: InputKind | None = None,
) -> PtychodusData:
    """Read an NPZ in ptychodus's conventions (counts, probe modes, bad pixels) into the package's conventions.

    Keys read: ``diff3d`` (or ``diffraction``), ``probeGuess``, ``xcoords``/``ycoords`` (or an ``(M, 2)``
    ``positions`` array), and when present ``bad_pixels``, ``objectGuess``, ``scan_index``. Other keys (e.g.
    ``xcoords_start``) are ignored. Opened with ``allow_pickle=False``.

    Args:
        path: the ``.npz`` file.
        positions: ``"xy"`` (``xcoords`` is the column) or ``"yx"`` (the file's pair is [row, column]).
        bad_pixels: ``"mask"`` (zero them), ``"inpaint"`` (mean of valid neighbours) or ``"ignore"``.
        normalization: ``"upstream"`` (``(N/2)**2`` energy) or ``"ptychodus"`` (``N**2``); see the module docstring.
        input_kind: ``"counts"`` or ``"amplitude"``; default: integer ``diff3d`` is counts, floating is amplitudes.

    Returns:
        :class:`PtychodusData` (its ``dataset`` is a validated :class:`~.dataset.PtychoDataset`).

    Raises:
        DatasetError: a missing key, a bad shape/dtype/value, or an unknown option; the message names the fix.
    """
    _check_option(positions, POSITION_ORDERS, "positions")
    _check_option(bad_pixels, BAD_PIXEL_METHODS, "bad_pixels")
    _check_option(normalization, NORMALIZATIONS, "normalization")
    if input_kind is not None:
        _check_option(input_kind, _INPUT_KINDS, "input_kind")
    arrays = _read_npz(Path(path))
    diff_key = "diff3d" if "diff3d" in arrays else "diffraction"
    if diff_key not in arrays or "probeGuess" not in arrays:
        missing = [k for k in ("diff3d", "probeGuess") if k not in arrays and not (k == "diff3d" and diff_key in arrays)]
        raise DatasetError(f"{str(path)[:200]!r} lacks {missing}; present: {sorted(arrays)[:20]}.")
    raw = np.asarray(arrays[diff_key])
    if raw.ndim != 3 or raw.shape[1] != raw.shape[2] or raw.shape[0] == 0:
        raise DatasetError(f"`{diff_key}` must be a non-empty (M, N, N) stack of square patterns, got {raw.shape}.")
    if raw.dtype == bool or raw.dtype.kind not in "iuf":
        raise DatasetError(f"`{diff_key}` must hold real counts or amplitudes, got dtype {raw.dtype}.")
    kind = input_kind or ("counts" if raw.dtype.kind in "iu" else "amplitude")
    if kind == "amplitude" and raw.dtype.kind in "iu":
        raise DatasetError(
            f"`{diff_key}` has integer dtype {raw.dtype} but input_kind='amplitude'; integer data are counts - "
            "pass input_kind='counts' (or leave it unset)."
        )
    mask = _bad_pixel_mask(arrays["bad_pixels"], raw.shape) if "bad_pixels" in arrays else None
    values = raw
    if mask is not None and bad_pixels != "ignore":
        values = raw.copy()
        values[np.broadcast_to(mask, raw.shape)] = 0  # sentinel values under the mask are never validated
    amplitudes = counts_to_amplitudes(values) if kind == "counts" else values
    if mask is not None:
        amplitudes = apply_bad_pixels(amplitudes, mask, bad_pixels)
    modes, dominant = _probe_modes(arrays["probeGuess"], raw.shape[1])
    x, y = _positions(arrays, positions, raw.shape[0])
    dataset = PtychoDataset(
        diff3d=amplitudes,
        xcoords=x,
        ycoords=y,
        probeGuess=modes[dominant],
        objectGuess=arrays.get("objectGuess"),
        scan_index=arrays.get("scan_index"),
    )
    return PtychodusData(
        dataset=dataset,
        scale=normalization_scale(dataset.diff3d, normalization),
        normalization=normalization,
        input_kind=kind,
        bad_pixels=mask,
        bad_pixel_method=bad_pixels,
        probe_modes=modes,
        probe_mode_index=dominant,
    )
