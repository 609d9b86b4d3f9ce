"""Inference on a loaded bundle: input validation, scaling, batching, output encodings (no MLflow).

:class:`PtychoTorchModel` is the native object both :func:`mlflow_ptycho_flavor.load_model` and the pyfunc
wrapper hold: the network on its device, the params snapshot, the manifest and metadata, and a ``predict``
that turns diffraction amplitudes (or raw counts) into complex object patches.

Input conventions (docs/bundle-format.md §4):
    * ``diffraction``: float ``(B, N, N)`` (single-channel models) or ``(B, C, N, N)``, amplitudes = sqrt(counts).
      ``input_kind="counts"`` takes photon counts as ptychodus stores them (integers, or floats holding whole
      numbers) and ``input_kind="intensity"`` any non-negative intensities (e.g. scaled or background-subtracted
      counts); both are square-rooted here by :func:`counts_to_amplitudes`, the package's one conversion. Integer
      arrays are refused as amplitudes: they usually mean counts passed without ``input_kind="counts"``.
    * ``scale``: the per-sample input factor of upstream's ``forward_predict`` - a scalar, ``(B,)``, ``(B, 1)`` or
      ``(B, 1, 1, 1)``; default 1 (inputs already normalized). ``normalize="dataset"`` computes upstream's
      normalization factor ``sqrt((N/2)^2 / mean sum amp^2)`` over the whole input instead, so the result does not
      depend on how the input is split into batches.
    * An empty batch returns an empty ``(0, C, N, N)`` result.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mlflow_ptycho_flavor.bundle import read_and_build
from mlflow_ptycho_flavor.network import resolve_device
from mlflow_ptycho_flavor.errors import PredictionInputError, short_repr

__all__ = [
    "PtychoTorchModel",
    "OUTPUT_FORMATS",
    "INPUT_KINDS",
    "NORMALIZE_MODES",
    "DEFAULT_BATCH_SIZE",
    "default_batch_size",
    "prepare_diffraction",
    "counts_to_amplitudes",
    "prepare_scale",
    "dataset_normalization_factor",
    "encode_output",
    "run_in_batches",
]

OUTPUT_FORMATS = ("complex", "real_imag", "amp_phase")
INPUT_KINDS = ("amplitude", "intensity", "counts")
NORMALIZE_MODES = ("none", "dataset")
#: Patterns per forward pass when the caller gives none: small chunks are faster on CPU (cache-resident
#: activations; benchmarks/RESULTS.md has the measurement), large ones on a GPU.
DEFAULT_BATCH_SIZE = 256
DEFAULT_CPU_BATCH_SIZE = 16
#: Values square-rooted per chunk by :func:`counts_to_amplitudes`, bounding its float64 temporaries (~128 MiB).
_COUNTS_CHUNK = 1024 * 128 * 128


def default_batch_size(device: torch.device) -> int:
    """The default chunk size for ``device``: 16 on CPU, 256 on accelerators."""
    return DEFAULT_CPU_BATCH_SIZE if device.type == "cpu" else DEFAULT_BATCH_SIZE


def _not_numeric(name: str, value: Any) -> PredictionInputError:
    return PredictionInputError(
        f"`{name}` is a {type(value).__name__}, not an array of numbers; pass a numpy array, a dense torch tensor "
        "or nested lists of numbers"
    )


def _as_array(value: Any, name: str) -> np.ndarray:
    """``value`` as a numpy array, or a :class:`PredictionInputError` naming ``name`` and what is wrong with it.

    Refused: ``None`` (and arrays holding ``None``/JSON ``null``), sparse and meta-device torch tensors (no values
    to read), and objects that are not arrays of numbers (dicts, sets, arbitrary objects). Ragged nested lists are
    reported as ragged. Dtype checks are the caller's.
    """
    if value is None:
        raise PredictionInputError(f"`{name}` is None (null); pass an array of numbers")
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided:
            raise PredictionInputError(
                f"`{name}` is a sparse torch tensor (layout {value.layout}); pass a dense one (tensor.to_dense())"
            )
        if value.is_meta:
            raise PredictionInputError(
                f"`{name}` is a torch tensor on the meta device, which holds no values; pass a tensor with data"
            )
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:  # numpy has no bfloat16
            value = value.float()
        value = value.numpy()
    if isinstance(value, (Mapping, set, frozenset)):
        raise _not_numeric(name, value)
    if isinstance(value, np.ndarray):
        array = value
    else:
        try:
            array = np.asarray(value)
        except (ValueError, TypeError, OverflowError) as exc:
            raise PredictionInputError(f"`{name}` could not be read as an array: {str(exc)[:200]}") from exc
    if array.dtype != object:
        return array
    if array.ndim == 0:
        item = array.item()
        if item is None:
            raise PredictionInputError(f"`{name}` holds None (null); pass an array of numbers")
        raise _not_numeric(name, item)
    if any(item is None for item in array.flat):
        raise PredictionInputError(f"`{name}` holds None (null) values; every element must be a number")
    if array is value:  # an object ndarray given as such: the caller's dtype check names it
        return array
    try:
        array = np.stack([np.asarray(v) for v in value])
    except (ValueError, TypeError) as exc:
        raise PredictionInputError(
            f"`{name}` is ragged (rows of different lengths); every pattern must be N x N"
        ) from exc
    return array


def counts_to_amplitudes(counts: Any, *, input_kind: str = "counts", name: str = "counts") -> np.ndarray:
    """Square-root photon counts (or intensities) into the diffraction amplitudes the network takes, as float32.

    The package's one conversion from measured intensities to amplitudes (``prepare_diffraction`` and
    :func:`mlflow_ptycho_flavor.sim.ptychodus.counts_to_amplitudes` both use it): ``amplitude = sqrt(counts)``
    elementwise, no offset and no variance stabilisation, as upstream's data contract (DATA-001) defines
    ``diff3d = sqrt(counts)``. The square root is taken in float64 from the exact input values and rounded once to
    float32: the correctly rounded float32 square root (what ``np.sqrt`` of exact float32 counts gives), also for
    integer counts above 2**24 that float32 cannot hold exactly. Processed in chunks, so the float64 temporaries
    stay bounded whatever the input size.

    Args:
        counts: any shape; integer dtype, or floating (non-finite values are refused).
        input_kind: ``"counts"`` (photon counts: whole numbers >= 0) or ``"intensity"`` (any real values >= 0).
        name: how messages call the input (``"diffraction"``, ``"counts"``, ...).

    Returns:
        float32 amplitudes of the same shape (a new, contiguous array).

    Raises:
        PredictionInputError: complex, boolean or non-numeric values, NaN/inf, negative values, or (for
            ``"counts"``) values that are not whole numbers; the message names the fix.
    """
    if input_kind not in ("counts", "intensity"):
        raise PredictionInputError(f"`input_kind`={short_repr(input_kind)} is not 'counts' or 'intensity'")
    array = np.asarray(counts)
    if array.dtype == bool or array.dtype.kind not in "iuf":
        hint = ("pass |field|**2 for a complex far field" if array.dtype.kind == "c"
                else "store photon counts as integers")
        raise PredictionInputError(
            f"`{name}` has dtype {array.dtype}; counts must be real numbers (integer photon counts): {hint}"
        )
    flat = array.reshape(-1)
    out = np.empty(flat.shape, dtype=np.float32)
    for start in range(0, flat.size, _COUNTS_CHUNK):
        chunk = flat[start: start + _COUNTS_CHUNK]
        if chunk.dtype.kind == "f":
            finite = np.isfinite(chunk)
            if not finite.all():
                raise PredictionInputError(
                    f"`{name}` holds {int(np.count_nonzero(~finite))}+ non-finite value(s) (NaN or infinite), the "
                    f"first at flat index {start + int(np.argmin(finite))}; repair them or mark them as bad pixels"
                )
            if input_kind == "counts":
                fractional = chunk != np.floor(chunk)
                if fractional.any():
                    example = float(chunk[fractional][0])
                    raise PredictionInputError(
                        f"`{name}` holds non-integer values (e.g. {example!r}) with input_kind='counts': photon "
                        "counts are whole numbers. Pass amplitudes as amplitudes (input_kind='amplitude'); round "
                        "and clip scaled or background-subtracted counts (np.clip(np.rint(c), 0, None)) first"
                    )
        values = chunk.astype(np.float64)
        if values.size and float(values.min()) < 0:
            raise PredictionInputError(
                f"`{name}` holds negative counts with input_kind={input_kind!r}; counts must be >= 0 (min "
                f"{float(values.min())!r}): clip background-subtracted data (np.clip(c, 0, None)), mark those "
                "pixels as bad, or pass amplitudes with input_kind='amplitude'"
            )
        out[start: start + _COUNTS_CHUNK] = np.sqrt(values)
    return out.reshape(array.shape)


def _refuse_non_finite(array: np.ndarray) -> None:
    if array.size and array.dtype.kind in "fc" and not np.isfinite(array).all():
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise PredictionInputError(f"`diffraction` holds {bad} NaN or infinite value(s); clean the data first")


def prepare_diffraction(
    diffraction: Any,
    *,
    N: int,
    channels: int,
    input_kind: str = "amplitude",
) -> np.ndarray:
    """Validate diffraction input and return contiguous float32 amplitudes ``(B, C, N, N)``.

    ``input_kind``: ``"amplitude"`` (float amplitudes, used as they are), ``"counts"`` (photon counts, integer or
    whole-valued floats, as ptychodus stores them) or ``"intensity"`` (non-negative intensities); the last two
    are square-rooted by :func:`counts_to_amplitudes`.

    Raises:
        PredictionInputError: wrong rank, N or channel count, wrong dtype, non-finite values, negative or
            (``"counts"``) fractional counts.
    """
    if input_kind not in INPUT_KINDS:
        raise PredictionInputError(f"`input_kind`={short_repr(input_kind)} is not one of {INPUT_KINDS}")
    array = _as_array(diffraction, "diffraction")
    accepted = "f" if input_kind == "amplitude" else "fiu"
    if array.dtype.kind not in accepted or array.dtype == bool:
        if array.dtype.kind == "c":
            hint = "complex input: pass amplitudes |psi| (float), not the complex field"
        elif array.dtype.kind == "b":
            hint = "a boolean array is a mask, not diffraction data"
        elif input_kind == "amplitude" and array.dtype.kind in "iu":
            hint = ("integer data are usually photon counts: pass them with input_kind='counts' (square-rooted "
                    "here), or cast amplitudes to float32")
        else:
            hint = f"pass {input_kind} as integers or floats" if input_kind != "amplitude" else "cast to float32"
        raise PredictionInputError(f"`diffraction` has dtype {array.dtype}; expected floating point ({hint})")
    if array.ndim == 2 and array.shape[-1] in (N * N, channels * N * N) and array.shape[-1] != N:
        # Flattened rows, as tabular inputs (DataFrames, Spark) carry them.
        per_row = array.shape[-1] // (N * N)
        array = array.reshape(array.shape[0], per_row, N, N)
    elif array.ndim == 3:
        if channels != 1 and array.shape[0] != 0:
            raise PredictionInputError(
                f"`diffraction` has shape {array.shape} (B, N, N) but this model takes C={channels} channels "
                f"(gridsize {int(math.isqrt(channels))}); pass (B, {channels}, {N}, {N}) groups of neighbouring "
                "patterns (see mlflow_ptycho_flavor.grouping.group_patterns)"
            )
        # An empty (0, N, N) batch holds no patterns to group: it is the empty (0, C, N, N) input.
        array = array.reshape(array.shape[0], 1 if array.shape[0] else channels, *array.shape[1:])
    if array.ndim != 4:
        raise PredictionInputError(
            f"`diffraction` must have rank 3 (B, N, N) or 4 (B, C, N, N), got shape {array.shape}"
        )
    if array.shape[2:] != (N, N):
        raise PredictionInputError(
            f"`diffraction` patterns are {array.shape[2]}x{array.shape[3]} but this model was trained on "
            f"N={N}: crop or resample the patterns to {N}x{N}"
        )
    if array.shape[1] != channels:
        raise PredictionInputError(
            f"`diffraction` has {array.shape[1]} channel(s) but this model takes C={channels} (gridsize "
            f"{int(math.isqrt(channels))}); shape must be (B, {channels}, {N}, {N})"
        )
    if input_kind == "amplitude":
        array = np.ascontiguousarray(array, dtype=np.float32)
    else:
        _refuse_non_finite(array)
        array = counts_to_amplitudes(array, input_kind=input_kind, name="diffraction")
    _refuse_non_finite(array)  # also values beyond float32's range
    return array


def _holds_bool(value: Any, budget: int = 1_000_000) -> bool:
    """True when nested lists/tuples hold a Python or numpy boolean (``[True, 1.0]`` would become floats)."""
    stack = [value]
    while stack and budget > 0:
        item = stack.pop()
        budget -= 1
        if isinstance(item, (bool, np.bool_)):
            return True
        if isinstance(item, (list, tuple)):
            stack.extend(item)
    return False


def prepare_scale(scale: Any, batch: int) -> np.ndarray:
    """Validate the per-sample factor and return float32 ``(B, 1, 1, 1)``.

    One rule for every input form (scalar, array, tensor, list, DataFrame column, JSON): each factor is a finite
    real number > 0 and never a boolean. The factor multiplies the amplitudes, so zero or negative factors (and
    ``true``/``false``) describe no meaningful input; ``None`` means "not given" (factor 1).

    Raises:
        PredictionInputError: naming ``scale`` and the rule it breaks.
    """
    if scale is None:
        return np.ones((batch, 1, 1, 1), dtype=np.float32)
    if not isinstance(scale, (np.ndarray, torch.Tensor)) and _holds_bool(scale):
        raise PredictionInputError(
            "`scale` holds a boolean (a boolean is not an input factor); pass a real number > 0 per sample"
        )
    array = _as_array(scale, "scale")
    if array.dtype.kind == "b":
        raise PredictionInputError(
            "`scale` has dtype bool (a boolean is not an input factor); pass a real number > 0 per sample"
        )
    if array.dtype.kind not in "fiu":
        raise PredictionInputError(
            f"`scale` has dtype {array.dtype}; expected a real number per sample (finite, > 0)"
        )
    if array.size == 1:
        array = np.full((batch, 1, 1, 1), float(array.reshape(())), dtype=np.float32)
    elif array.size == batch and array.shape[0] == batch:
        array = array.reshape(batch, 1, 1, 1).astype(np.float32)
    else:
        raise PredictionInputError(
            f"`scale` has shape {array.shape}; expected a scalar or one value per sample (B={batch}): "
            f"(B,), (B, 1) or (B, 1, 1, 1)"
        )
    if not np.isfinite(array).all():
        raise PredictionInputError("`scale` holds NaN or infinite values (or values beyond float32's range)")
    if array.size and float(array.min()) <= 0:
        bad = int(np.count_nonzero(array <= 0))
        raise PredictionInputError(
            f"`scale` must be > 0 for every sample: {bad} value(s) are <= 0 (smallest {float(array.min()):.6g}); "
            "the factor multiplies the amplitudes, so zero or negative factors are refused"
        )
    return array


def dataset_normalization_factor(amplitudes: np.ndarray) -> float:
    """Upstream's normalization (docs/bundle-format.md §4.3): ``sqrt((N/2)^2 / mean_patterns sum_pixels amp^2)``, 1 if all zero."""
    if amplitudes.size == 0:
        return 1.0
    N = amplitudes.shape[-1]
    energy = np.square(amplitudes.astype(np.float64)).reshape(-1, N * N).sum(axis=1).mean()
    if not energy > 0:
        return 1.0
    return float(math.sqrt((N / 2) ** 2 / energy))


def encode_output(result: np.ndarray, output_format: str) -> Any:
    """Re-encode complex64 results losslessly: ``complex`` as is, or a dict of two float32 arrays."""
    if output_format == "complex":
        return result
    if output_format == "real_imag":
        return {"real": np.ascontiguousarray(result.real), "imag": np.ascontiguousarray(result.imag)}
    if output_format == "amp_phase":
        return {"amplitude": np.abs(result), "phase": np.angle(result).astype(np.float32)}
    raise PredictionInputError(f"`output_format`={short_repr(output_format)} is not one of {OUTPUT_FORMATS}")


def run_in_batches(
    network: torch.nn.Module,
    amplitudes: np.ndarray,
    factors: np.ndarray,
    *,
    batch_size: int,
    progress: bool = False,
) -> np.ndarray:
    """``network(x, f)`` over float32 ``(B, C, N, N)`` inputs and ``(B, 1, 1, 1)`` factors, ``batch_size`` at a time.

    The one batched inference loop of the package (the native model, the pyfunc wrapper and the trainer's
    evaluation all use it): no autograd, inputs moved to the network's device per batch, complex64 numpy out.
    """
    total = amplitudes.shape[0]
    out = np.empty(amplitudes.shape, dtype=np.complex64)
    if total == 0:
        return out
    device = next(network.parameters()).device
    starts: Any = range(0, total, batch_size)
    if progress and total > batch_size:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="predict", unit="batch", total=math.ceil(total / batch_size))
    with torch.inference_mode():
        for start in starts:
            stop = min(start + batch_size, total)
            x = torch.from_numpy(amplitudes[start:stop]).to(device, non_blocking=True)
            f = torch.from_numpy(factors[start:stop]).to(device, non_blocking=True)
            result = network(x, f)
            out[start:stop] = result.cpu().numpy() if result.device.type != "cpu" else result.numpy()
    return out


@dataclass
class PtychoTorchModel:
    """A loaded ``ptycho_torch`` model: the network on its device plus everything its bundle carried.

    Attributes:
        network: the ``diffraction_to_obj`` network (eval mode): a ``PtychoPINNNetwork`` (CNN) or a
            ``PtychoFnoNetwork`` (FNO family); both map ``(B, C, N, N)`` amplitudes to complex64 patches.
        params: the params snapshot (``params.dill``), restored into the global config at load (CONFIG-001).
        manifest: the decoded ``manifest.dill``.
        metadata: the decoded ``torch_scaling_metadata.pt``, or None.
        bundle_path: where the bundle was read from.
    """

    network: torch.nn.Module
    params: dict[str, Any]
    manifest: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] | None = None
    bundle_path: str | None = None

    @classmethod
    def from_bundle(
        cls, path: Any, device: str | torch.device | None = None, *, channels_last: bool | None = None
    ) -> "PtychoTorchModel":
        """Load a ``wts.h5.zip`` (or its base path, or a folder holding one) into a model on ``device``.

        Follows CONFIG-001: the params snapshot is restored into the global config before the network is built.
        Needs no MLflow.

        Args:
            path: the bundle.
            device: ``None``/``"auto"``, ``"cpu"``, ``"cuda:0"``, ...
            channels_last: NHWC memory format for the activations (on the CPU the weights keep their stored
                layout: :meth:`~mlflow_ptycho_flavor.bundle.BundleContents.build_network`). ``None`` (default): on
                the CPU, where it is
                1.4x faster for the CNN and the FFNO at N=64 (torch's convolutions, the copies of its
                nearest-neighbour upsampling, its pooling and its max reductions are all slower on contiguous data
                there: benchmarks/RESULTS.md §1) and no slower for the FNO, and off on a GPU. Outputs agree with the
                contiguous layout to float rounding (1e-7 to 1.6e-5 of the output's scale on the fixture bundles),
                not bit for bit; every load of one bundle on one device takes the same layout, so the pyfunc model
                and the native one agree bit for bit.

        Raises:
            BundleError: the bundle cannot be read (a subclass naming the cause).
            ValueError: ``device`` is not valid or not available.
        """
        if channels_last is None:
            channels_last = resolve_device(device).type == "cpu"
        contents, network = read_and_build(path, device=device, channels_last=channels_last)  # CONFIG-001 included
        return cls(
            network=network,
            params=dict(contents.params),
            manifest=dict(contents.manifest),
            metadata=contents.metadata,
            bundle_path=str(contents.path),
        )

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @property
    def N(self) -> int:
        return self.network.config.N

    @property
    def channels(self) -> int:
        return self.network.config.channels

    @property
    def gridsize(self) -> int:
        return int(self.params.get("gridsize", self.network.config.gridsize))

    @property
    def intensity_scale(self) -> float | None:
        value = self.params.get("intensity_scale")
        return None if value is None else float(value)

    def prepare(
        self,
        diffraction: Any,
        scale: Any = None,
        *,
        input_kind: str = "amplitude",
        normalize: str = "none",
    ) -> tuple[np.ndarray, np.ndarray]:
        """Validate and scale inputs: float32 amplitudes ``(B, C, N, N)`` and factors ``(B, 1, 1, 1)``."""
        amplitudes = prepare_diffraction(diffraction, N=self.N, channels=self.channels, input_kind=input_kind)
        if normalize not in NORMALIZE_MODES:
            raise PredictionInputError(f"`normalize`={short_repr(normalize)} is not one of {NORMALIZE_MODES}")
        if normalize == "dataset":
            if scale is not None:
                raise PredictionInputError("give either `scale` or normalize='dataset', not both")
            scale = dataset_normalization_factor(amplitudes)
        return amplitudes, prepare_scale(scale, amplitudes.shape[0])

    def predict_prepared(
        self, amplitudes: np.ndarray, factors: np.ndarray, *, batch_size: int | None = None, progress: bool = False
    ) -> np.ndarray:
        """Run the network over validated inputs in batches of at most ``batch_size``; complex64 numpy out.

        ``batch_size=None`` picks :func:`default_batch_size` for the model's device.
        """
        if batch_size is None:
            batch_size = default_batch_size(self.device)
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise PredictionInputError(f"`batch_size` must be a positive integer, got {short_repr(batch_size)}")
        return run_in_batches(self.network, amplitudes, factors, batch_size=int(batch_size), progress=progress)

    def predict(
        self,
        diffraction: Any,
        scale: Any = None,
        *,
        batch_size: int | None = None,
        input_kind: str = "amplitude",
        normalize: str = "none",
        output_format: str = "complex",
        progress: bool = False,
    ) -> Any:
        """Reconstruct complex object patches from diffraction patterns.

        Args:
            diffraction: ``(B, N, N)`` or ``(B, C, N, N)`` float amplitudes (or photon counts with
                ``input_kind="counts"``, intensities with ``input_kind="intensity"``); numpy, torch or nested lists.
            scale: per-sample input factor (scalar, ``(B,)``, ``(B, 1, 1, 1)``); default 1.
            batch_size: most patterns sent to the device at once (default: 16 on CPU, 256 on a GPU).
            input_kind: ``"amplitude"``, ``"counts"`` (whole photon counts) or ``"intensity"`` (any intensities >= 0);
                counts and intensities are square-rooted by :func:`counts_to_amplitudes`.
            normalize: ``"none"`` or ``"dataset"`` (upstream's normalization factor over the whole input).
            output_format: ``"complex"`` (complex64 ``(B, C, N, N)``), ``"real_imag"`` or ``"amp_phase"``
                (dicts of two float32 arrays).
            progress: show a progress bar over batches.

        Raises:
            PredictionInputError: for any bad input, naming the argument and the fix.
        """
        if output_format not in OUTPUT_FORMATS:
            raise PredictionInputError(f"`output_format`={short_repr(output_format)} is not one of {OUTPUT_FORMATS}")
        amplitudes, factors = self.prepare(diffraction, scale, input_kind=input_kind, normalize=normalize)
        result = self.predict_prepared(amplitudes, factors, batch_size=batch_size, progress=progress)
        return encode_output(result, output_format)
