"""A compact physics-informed (PINN) trainer for this package's PtychoPINN network, gridsize 1.

Trains :class:`~mlflow_ptycho_flavor.network.PtychoPINNNetwork` from diffraction amplitudes alone: the network
predicts a complex object patch per pattern, a differentiable far-field forward model (the same one as
:mod:`mlflow_ptycho_flavor.data`'s simulator) turns it into predicted amplitudes with the dataset's probe, and
the loss compares them with the measured ones. Ground-truth patches, when the dataset has them, are used only
to report reconstruction errors, never for training. The trained network saves as an upstream-compatible
``wts.h5.zip`` (:func:`save_trained_bundle`).

Only gridsize 1 (one pattern per sample, ``C = 1``) is implemented: it is what the single-pattern inference
path needs, and grouping neighbours for gridsize 2 adds position-dependent physics that this compact trainer does
not attempt. What it can add, optionally (``TrainConfig.overlap_weight > 0``), is ptychography's own constraint
in gridsize-1 form: two overlapping scan positions see the same object, so the two predicted patches must agree
where both are illuminated, up to the constant phase no single pattern determines. Each batch is then half
seeded "anchor" patterns and half one overlapping neighbour of each (scan distance at most ``N/3`` in x and y),
and the loss adds ``overlap_weight`` times the mean overlap mismatch

    sum w (|a|**2 + |b|**2) - 2 |sum w a conj(b)|,  divided by sum w,  w = w_a w_b,  w_p = |probe|**2 / max

over the common pixels of the two patches ``a`` and ``b`` (integer scan offsets). It is zero exactly when
``a = e^{i phi} b`` there: the relative constant phase is removed analytically, everything else must match. Like
the Poisson term it needs no ground truth; it teaches the network to reconstruct each patch in a way that stitches.

Scale conventions and the forward model and loss are documented in :mod:`mlflow_ptycho_flavor.sim.physics`.

Initialisation (:func:`init_for_training`, ``TrainConfig.init="lsuv"``): PyTorch's default init, which upstream
uses, makes a fresh network's output independent of its input (the signal shrinks several-fold per block), and
a physics-trained network then sits for hundreds of steps on a uniform object. The trainer therefore rescales
each convolution once, on a batch of training patterns, to unit output std (LSUV), with small stds for the
heads so the untrained network starts near a uniform object with random texture (amplitude 0.5 +- ~0.07,
phase +- ~0.3 rad). ``init="default"`` keeps PyTorch's init.

Errors are reported with :func:`mlflow_ptycho_flavor.sim.metrics.reconstruction_error` over
:func:`~mlflow_ptycho_flavor.sim.metrics.illuminated_window` of the held-out patterns.

MLflow is optional: :func:`train_model` imports it lazily and logs only into an already active run.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from mlflow_ptycho_flavor.errors import InvalidArgumentError
from mlflow_ptycho_flavor.bundle import save_torch_bundle
from mlflow_ptycho_flavor.model.inference import run_in_batches
from mlflow_ptycho_flavor.network import SUPPORTED_PATCH_SIZES, NetworkConfig, PtychoPINNNetwork, resolve_device
from mlflow_ptycho_flavor.sim.dataset import PtychoDataset, normalization_factor
from mlflow_ptycho_flavor.sim.metrics import illuminated_window, reconstruction_error
from mlflow_ptycho_flavor.sim.physics import ForwardModel, PhysicsScaling, compute_scaling

__all__ = [
    "TrainConfig",
    "TrainResult",
    "learning_rate_at",
    "predict_patches",
    "init_for_training",
    "train_model",
    "save_trained_bundle",
]

LOSSES = ("poisson", "mae")
INITS = ("lsuv", "default")
LR_SCHEDULES = ("constant", "cosine")
#: Patterns of the one forward pass :func:`init_for_training` rescales the layers on.
_INIT_PATTERNS = 64


# ----------------------------------------------------------------------------------------------------------------
# Configuration and result
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of :func:`train_model`; every field is logged as an MLflow param.

    Defaults follow upstream where it has one (batch 16, Adam at 1e-3, Poisson loss, sigmoid amplitude,
    ``probe.big``) except the network width (``n_filters_scale=1`` instead of 2, for CPU speed) and the
    initialisation (``init="lsuv"``). The default 200 steps reach a useful reconstruction of the simulator's
    default scan (``ptycho-flavor demo --from-scratch`` trains with them).

    Attributes:
        N: Pattern size; must match the dataset (64, 128 or 256).
        n_filters_scale: Width multiplier ``s`` of the network (upstream default 2; 1 has ~4x fewer weights).
        steps: Optimizer steps (one batch each).
        batch_size: Patterns per step.
        learning_rate: Adam learning rate (the peak rate of the ``"cosine"`` schedule).
        lr_schedule: ``"constant"`` (default) or ``"cosine"``: the rate falls from ``learning_rate`` to
            ``final_learning_rate`` along half a cosine over the steps (long runs converge further with it).
        final_learning_rate: the rate at the last step of the ``"cosine"`` schedule (ignored by ``"constant"``).
        loss: ``"poisson"`` (NLL of the counts, upstream's default) or ``"mae"`` (on amplitudes).
        seed: Seeds the network initialisation and the batch order; same seed, same data, same device ->
            the same loss history.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:0"``, ...
        probe_big: Network's border path on (upstream default True).
        amp_activation: Amplitude head activation, ``"sigmoid"`` (upstream default) or ``"swish"``.
        nphotons: Photon budget per pattern for ``intensity_scale``; ``None`` = the measured mean total counts.
        overlap_weight: weight of the overlap-consistency term of the module docstring (0, the default, trains on
            the per-pattern physics alone, as upstream's gridsize 1); needs an even ``batch_size`` >= 2 and a scan
            whose positions overlap.
        init: ``"lsuv"`` (data-dependent rescaling, see the module docstring) or ``"default"`` (PyTorch's init,
            as upstream; trains much more slowly).
        num_threads: torch CPU threads during training (restored afterwards); ``None`` keeps the current
            setting. On a busy machine 1 thread can be several times faster than oversubscribed OpenMP threads.
        log_every: Log the loss to MLflow every this many steps (and at the last step).
        eval_batch_size: Patterns per forward pass when computing reconstruction errors.
        progress: Show a tqdm progress bar with the step and the loss.
    """

    N: int = 64
    n_filters_scale: int = 1
    steps: int = 200
    batch_size: int = 16
    learning_rate: float = 1e-3
    lr_schedule: Literal["constant", "cosine"] = "constant"
    final_learning_rate: float = 1e-5
    loss: Literal["poisson", "mae"] = "poisson"
    overlap_weight: float = 0.0
    seed: int = 0
    device: str = "auto"
    probe_big: bool = True
    amp_activation: str = "sigmoid"
    nphotons: float | None = None
    init: Literal["lsuv", "default"] = "lsuv"
    num_threads: int | None = None
    log_every: int = 10
    eval_batch_size: int = 64
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("N", "n_filters_scale", "steps", "batch_size", "log_every", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise InvalidArgumentError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        if self.N not in SUPPORTED_PATCH_SIZES:
            raise InvalidArgumentError(f"TrainConfig.N={self.N} is not supported; the network takes N = 64, 128 or 256")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise InvalidArgumentError(f"TrainConfig.seed must be a non-negative integer, got {self.seed!r}")
        for name in ("learning_rate", "final_learning_rate"):
            lr = getattr(self, name)
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
                raise InvalidArgumentError(f"TrainConfig.{name} must be a finite number > 0, got {lr!r}")
        ow = self.overlap_weight
        if isinstance(ow, bool) or not isinstance(ow, (int, float)) or not (math.isfinite(ow) and ow >= 0):
            raise InvalidArgumentError(f"TrainConfig.overlap_weight must be a finite number >= 0, got {ow!r}")
        if ow > 0 and self.batch_size % 2:
            raise InvalidArgumentError(
                f"TrainConfig.overlap_weight > 0 pairs each anchor pattern with a neighbour, so batch_size must be "
                f"even; got {self.batch_size}"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise InvalidArgumentError(f"TrainConfig.lr_schedule={self.lr_schedule!r} is not one of {LR_SCHEDULES}")
        if self.loss not in LOSSES:
            raise InvalidArgumentError(f"TrainConfig.loss={self.loss!r} is not one of {LOSSES}")
        if self.init not in INITS:
            raise InvalidArgumentError(f"TrainConfig.init={self.init!r} is not one of {INITS}")
        if self.num_threads is not None and (
            isinstance(self.num_threads, bool) or not isinstance(self.num_threads, (int, np.integer)) or self.num_threads < 1
        ):
            raise InvalidArgumentError(f"TrainConfig.num_threads must be None or a positive integer, got {self.num_threads!r}")
        if self.nphotons is not None:
            nph = self.nphotons
            if isinstance(nph, bool) or not isinstance(nph, (int, float)) or not (math.isfinite(nph) and nph > 0):
                raise InvalidArgumentError(f"TrainConfig.nphotons must be None or a finite number > 0, got {nph!r}")

    @classmethod
    def quick(cls, **overrides: Any) -> "TrainConfig":
        """A smoke-test configuration that runs in seconds (8 steps of 8); barely trains."""
        return cls(**{"steps": 8, "batch_size": 8, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    """What :func:`train_model` returns.

    Attributes:
        network: The trained network, in eval mode, on the training device.
        config: The configuration used.
        loss_history: Training loss after each step (``len == config.steps``).
        intensity_scale: ``sqrt(nphotons / mean sum X**2)`` (docs/bundle-format.md §2.4), recorded in the bundle.
        normalization_factor: ``f`` of the training set (docs/bundle-format.md §4.3). At inference pass the raw amplitudes with
            scale = the same formula over *their* data (``normalize="dataset"``), see the module docstring.
        nphotons: Photon budget per pattern used for ``intensity_scale``.
        photon_scale: Amplitude factor of the forward model, and whether it came from the dataset or was
            estimated (``photon_scale_source``).
        error_before: :func:`reconstruction_error` of the untrained network on the test set (None without a
            test set with ground truth).
        error_after: The same for the trained network.
        timings: Seconds spent: ``setup``, ``eval_before``, ``train``, ``eval_after``, ``total``; and
            ``steps_per_second``.
        n_train: Training patterns; ``n_test``: test patterns (0 without a test set).
        device: Where the network was trained.
        bundle_path: Set by :func:`save_trained_bundle`.
    """

    network: PtychoPINNNetwork
    config: TrainConfig
    loss_history: list[float]
    intensity_scale: float
    normalization_factor: float
    nphotons: float
    photon_scale: float
    photon_scale_source: str
    error_before: float | None
    error_after: float | None
    timings: dict[str, float]
    n_train: int
    n_test: int
    device: str
    bundle_path: Path | None = None

    @property
    def final_loss(self) -> float:
        return self.loss_history[-1]

    @property
    def epochs(self) -> int:
        """Passes over the training set, rounded up (recorded as ``nepochs`` in the bundle)."""
        return max(1, math.ceil(self.config.steps * self.config.batch_size / max(1, self.n_train)))

    def summary(self) -> str:
        parts = [
            f"{self.config.steps} steps x {self.config.batch_size} ({self.config.loss}) on {self.device}",
            f"{self.timings.get('train', float('nan')):.1f} s",
            f"loss {self.loss_history[0]:.4g} -> {self.final_loss:.4g}",
        ]
        if self.error_before is not None and self.error_after is not None:
            parts.append(f"test error {self.error_before:.3f} -> {self.error_after:.3f}")
        return ", ".join(parts)


# ----------------------------------------------------------------------------------------------------------------
# Physics
# ----------------------------------------------------------------------------------------------------------------
#: Output std of the heads' final convolutions after :func:`init_for_training` (pre-activation): small, so
#: the untrained network starts near a uniform object (amplitude ~0.5 +- 0.07, phase ~0 +- 0.3 rad).
_HEAD_INIT_STD = {
    "decoder_amp.amp.conv1": 0.3,
    "decoder_amp.amp.conv2": 0.3,
    "decoder_phase.phase.conv1": 0.1,
    "decoder_phase.phase.conv2": 0.1,
}


def init_for_training(network: PtychoPINNNetwork, inputs: torch.Tensor, factor: float | torch.Tensor) -> None:
    """Data-dependent initialisation (LSUV-style) of a fresh network, in place, before training.

    PyTorch's default init (what upstream uses) shrinks the signal several-fold per conv + ReLU + attention
    block, so a fresh network's output does not depend on its input at all (output std across patterns
    ~1e-8): training then spends hundreds of steps on a constant object before any structure appears. Here
    every ``Conv2d`` that has a bias gets a zero bias and its weights divided by its output std on
    ``inputs`` (one forward pass, layer by layer in execution order), so each layer outputs unit std; the
    heads' final convolutions get the small stds of ``_HEAD_INIT_STD`` instead. Weight directions stay the
    seeded defaults, so the result is deterministic. Only the starting point changes: the architecture, the
    state_dict and the bundle are those of an ordinary network.
    """
    hooks = []

    def make_hook(target: float):
        def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            std = float(output.std())
            if not (std > 0 and math.isfinite(std)):
                return output
            module.weight.mul_(target / std)
            return output * (target / std)

        return hook

    for name, module in network.named_modules():
        # The SpatialGate's bias-free 7x7 conv is left as is: it feeds a sigmoid gate, not the signal path.
        if isinstance(module, torch.nn.Conv2d) and module.bias is not None:
            target = next((v for k, v in _HEAD_INIT_STD.items() if name.endswith(k)), 1.0)
            with torch.no_grad():
                module.bias.zero_()
            hooks.append(module.register_forward_hook(make_hook(target)))
    try:
        with torch.no_grad():
            network(inputs, factor)
    finally:
        for handle in hooks:
            handle.remove()


def _poisson_offset(counts: torch.Tensor) -> torch.Tensor:
    """``K log K - K`` (0 where K = 0): makes the Poisson NLL 0 at a perfect fit of noise-free data."""
    safe = counts.clamp_min(1e-30)
    return torch.where(counts > 0, counts * torch.log(safe) - counts, torch.zeros_like(counts))


_POISSON_EPS = 1e-6


def _loss(kind: str, far: torch.Tensor, target: torch.Tensor, counts: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    if kind == "poisson":
        rate = far.real.square() + far.imag.square()
        return (rate - counts * torch.log(rate + _POISSON_EPS) + offset).mean()
    return (far.abs() - target).abs().mean()


#: Largest scan offset (fraction of N, in x and in y) between an anchor pattern and its overlap partner.
_OVERLAP_MAX_SHIFT = 1.0 / 3.0


def _overlap_partners(dataset: PtychoDataset) -> list[np.ndarray]:
    """For each pattern, the patterns whose rounded scan offset from it is at most ``N/3`` in x and y."""
    rounded = np.rint(dataset.offsets).astype(np.int64)
    limit = max(1, int(dataset.N * _OVERLAP_MAX_SHIFT))
    order = np.argsort(rounded[:, 0], kind="stable")
    xs = rounded[order, 0]
    partners = []
    for index in range(len(rounded)):
        lo, hi = np.searchsorted(xs, [rounded[index, 0] - limit, rounded[index, 0] + limit + 1])
        near = order[lo:hi]
        near = near[(np.abs(rounded[near, 1] - rounded[index, 1]) <= limit) & (near != index)]
        partners.append(np.sort(near))
    return partners


def _overlap_loss(first: torch.Tensor, second: torch.Tensor, shifts: np.ndarray, weight: torch.Tensor) -> torch.Tensor:
    """Mean weighted mismatch of pattern pairs on their common pixels, relative constant phase removed (docstring).

    ``first``/``second``: complex ``(P, N, N)`` predicted patches; ``shifts``: ``(P, 2)`` integer ``(dx, dy)`` scan
    offsets of ``second`` relative to ``first``; ``weight``: real ``(N, N)`` illumination weights.
    """
    n = first.shape[-1]
    terms = []
    for k, (dx, dy) in enumerate(shifts.tolist()):
        r0, r1 = max(0, dy), min(n, n + dy)
        c0, c1 = max(0, dx), min(n, n + dx)
        a = first[k, r0:r1, c0:c1]
        b = second[k, r0 - dy:r1 - dy, c0 - dx:c1 - dx]
        w = weight[r0:r1, c0:c1] * weight[r0 - dy:r1 - dy, c0 - dx:c1 - dx]
        energy = torch.sum(w * (a.real.square() + a.imag.square() + b.real.square() + b.imag.square()))
        terms.append((energy - 2 * torch.sum(w * a * torch.conj(b)).abs()) / w.sum().clamp_min(1e-12))
    return torch.stack(terms).mean()


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------
def predict_patches(
    network: PtychoPINNNetwork,
    amplitudes: PtychoDataset | np.ndarray,
    scale: float | None = None,
    *,
    batch_size: int = 64,
) -> np.ndarray:
    """Run ``network`` on raw amplitudes with the documented scale convention; complex64 ``(M, N, N)`` out.

    Args:
        network: a gridsize-1 network (left in its current train/eval mode).
        amplitudes: a dataset or raw ``(M, N, N)`` amplitudes.
        scale: the input factor; default ``data.normalization_factor`` of ``amplitudes`` (docs/bundle-format.md §4.3).
        batch_size: patterns per forward pass.
    """
    diff = amplitudes.diff3d if isinstance(amplitudes, PtychoDataset) else np.asarray(amplitudes, dtype=np.float32)
    if diff.ndim != 3:
        raise InvalidArgumentError(f"`amplitudes` must be (M, N, N), got shape {diff.shape}")
    factor = normalization_factor(diff) if scale is None else float(scale)
    x = np.ascontiguousarray(diff[:, None], dtype=np.float32)
    factors = np.full((x.shape[0], 1, 1, 1), factor, dtype=np.float32)
    return run_in_batches(network, x, factors, batch_size=batch_size)[:, 0]


def _test_error(network: PtychoPINNNetwork, test: PtychoDataset | None, batch_size: int) -> float | None:
    if test is None or test.ground_truth_patches is None:
        return None
    was_training = network.training
    network.eval()
    try:
        pred = predict_patches(network, test, batch_size=batch_size)
    finally:
        network.train(was_training)
    return reconstruction_error(pred, test.ground_truth_patches, window=illuminated_window(test.probeGuess))


# ----------------------------------------------------------------------------------------------------------------
# MLflow (optional)
# ----------------------------------------------------------------------------------------------------------------
def _mlflow_for_logging(mode: bool | None) -> Any:
    """The mlflow module when logging should happen, else None (MLflow is optional)."""
    if mode is False:
        return None
    if mode is not None and mode is not True:
        raise InvalidArgumentError(f"`mlflow_logging` must be None (log into an active run), True or False, got {mode!r}")
    if mode is None and "mlflow" not in sys.modules:
        # A run can only be active if this process imported MLflow (its run stack is in-process), so skip
        # the import - a few seconds - when nobody did.
        return None
    try:
        import mlflow  # noqa: PLC0415 - optional dependency, imported lazily
    except ImportError as exc:
        if mode is True:
            raise InvalidArgumentError("mlflow_logging=True but MLflow is not installed; pip install mlflow") from exc
        return None
    if mlflow.active_run() is None:
        if mode is True:
            raise InvalidArgumentError(
                "mlflow_logging=True but no MLflow run is active; wrap the call in `with mlflow.start_run():`"
            )
        return None
    return mlflow


def _log_params(mlflow: Any, config: TrainConfig, scaling: PhysicsScaling, n_train: int, n_test: int) -> None:
    params = {k: ("None" if v is None else v) for k, v in config.to_dict().items()}
    params.update(
        intensity_scale=scaling.intensity_scale,
        normalization_factor=scaling.normalization_factor,
        nphotons_used=scaling.nphotons,
        photon_scale=scaling.photon_scale,
        photon_scale_source=scaling.photon_scale_source,
        n_train_patterns=n_train,
        n_test_patterns=n_test,
        gridsize=1,
    )
    mlflow.log_params(params)


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------
def _batch_schedule(n_patterns: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """``(steps, batch_size)`` indices: consecutive chunks of seeded permutations (one per epoch)."""
    rng = np.random.default_rng(seed)
    needed = steps * batch_size
    epochs = math.ceil(needed / n_patterns)
    stream = np.concatenate([rng.permutation(n_patterns) for _ in range(epochs)])
    return stream[:needed].reshape(steps, batch_size)


def learning_rate_at(config: TrainConfig, step: int) -> float:
    """The Adam learning rate of ``step`` (0-based) under ``config.lr_schedule``."""
    if config.lr_schedule == "constant" or config.steps == 1:
        return float(config.learning_rate)
    progress = step / (config.steps - 1)
    low, high = float(config.final_learning_rate), float(config.learning_rate)
    return low + 0.5 * (high - low) * (1.0 + math.cos(math.pi * progress))


def _check_dataset(dataset: Any, name: str, n: int) -> PtychoDataset:
    if not isinstance(dataset, PtychoDataset):
        raise TypeError(f"`{name}` must be a PtychoDataset (see sim.dataset.load_npz / sim.simulate.simulate_dataset), got {type(dataset).__name__}")
    if dataset.N != n:
        raise InvalidArgumentError(f"`{name}` has N={dataset.N} patterns but TrainConfig.N={n}; set TrainConfig(N={dataset.N})")
    return dataset


def train_model(
    dataset: PtychoDataset,
    config: TrainConfig = TrainConfig(),
    *,
    test_dataset: PtychoDataset | None = None,
    mlflow_logging: bool | None = None,
) -> TrainResult:
    """Train a gridsize-1 PtychoPINN network on ``dataset`` with the physics loss of the module docstring.

    Args:
        dataset: training patterns (only ``diff3d`` and ``probeGuess`` are used, plus ``photon_scale`` when set).
        config: hyper-parameters.
        test_dataset: held-out patterns with ``ground_truth_patches``; the reconstruction error on them is
            reported before and after training (None without one).
        mlflow_logging: ``None`` (default) logs params and metrics into the active MLflow run when MLflow is
            installed and a run is active, and does nothing otherwise (no run is started, no ``mlruns`` folder
            is created); ``True`` requires an active run; ``False`` never logs.

    Returns:
        A :class:`TrainResult` with the trained network in eval mode.

    Raises:
        TypeError: ``dataset`` is not a :class:`PtychoDataset`.
        ValueError: config/dataset mismatch (e.g. N), empty counts, or ``mlflow_logging=True`` without a run.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"`config` must be a TrainConfig, got {type(config).__name__}")
    t_start = time.perf_counter()
    _check_dataset(dataset, "dataset", config.N)
    if test_dataset is not None:
        _check_dataset(test_dataset, "test_dataset", config.N)
    mlflow = _mlflow_for_logging(mlflow_logging)
    device = resolve_device(config.device)
    with _torch_threads(config.num_threads):
        return _train(dataset, config, test_dataset, mlflow, device, t_start)


@contextmanager
def _torch_threads(count: int | None) -> Iterator[None]:
    """Run with ``count`` torch CPU threads, then restore the previous setting (None: leave it alone)."""
    if count is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(int(count))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _train(
    dataset: PtychoDataset,
    config: TrainConfig,
    test_dataset: PtychoDataset | None,
    mlflow: Any,
    device: torch.device,
    t_start: float,
) -> TrainResult:
    scaling = compute_scaling(dataset, config.nphotons)
    n_train = dataset.n_patterns
    n_test = 0 if test_dataset is None else test_dataset.n_patterns

    physics = ForwardModel(dataset.probeGuess, scaling, device)
    inputs = torch.from_numpy(np.ascontiguousarray(dataset.diff3d[:, None])).to(device)
    target = physics.target_amplitudes(dataset.diff3d).to(device)
    counts = target.square()
    offset = _poisson_offset(counts)
    factor = torch.tensor(scaling.normalization_factor, dtype=torch.float32, device=device)
    pairing = config.overlap_weight > 0
    anchors_per_step = config.batch_size // 2 if pairing else config.batch_size
    schedule = torch.from_numpy(_batch_schedule(n_train, anchors_per_step, config.steps, config.seed))
    if pairing:
        partners = _overlap_partners(dataset)
        if not any(len(p) for p in partners):
            raise InvalidArgumentError(
                "TrainConfig.overlap_weight > 0 needs overlapping scan positions (neighbours within N/3 pixels), but "
                "no two positions of the training set are that close; set overlap_weight=0"
            )
        partner_rng = np.random.default_rng(int(config.seed) + 1)
        rounded = np.rint(dataset.offsets).astype(np.int64)
        intensity = np.abs(dataset.probeGuess.astype(np.complex128)) ** 2
        overlap_weights = torch.from_numpy((intensity / intensity.max()).astype(np.float32)).to(device)

    net_config = NetworkConfig(
        N=config.N,
        C_model=1,
        n_filters_scale=int(config.n_filters_scale),
        object_big=True,
        probe_big=bool(config.probe_big),
        amp_activation=config.amp_activation,
        mode="Unsupervised",
        intensity_scale_trainable=False,
        intensity_scale=scaling.intensity_scale,
    )
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
        torch.manual_seed(int(config.seed))
        network = PtychoPINNNetwork(net_config)
    network.to(device)
    if config.init == "lsuv":
        sample = np.sort(np.random.default_rng(config.seed).permutation(n_train)[:_INIT_PATTERNS])
        init_for_training(network, inputs[torch.from_numpy(sample).to(device)], factor)
    timings: dict[str, float] = {"setup": time.perf_counter() - t_start}

    if mlflow is not None:
        _log_params(mlflow, config, scaling, n_train, n_test)

    t0 = time.perf_counter()
    error_before = _test_error(network, test_dataset, config.eval_batch_size)
    timings["eval_before"] = time.perf_counter() - t0

    optimizer = torch.optim.Adam(network.parameters(), lr=float(config.learning_rate))
    network.train()
    losses: list[float] = []
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    with tqdm(total=config.steps, desc="train", unit="step", disable=not config.progress, leave=True) as bar:
        for step in range(config.steps):
            anchors = schedule[step].numpy()
            if pairing:
                # A pattern without neighbours is its own partner (zero shift, zero mismatch).
                mates = np.array([partner_rng.choice(partners[i]) if len(partners[i]) else i for i in anchors])
                idx = torch.from_numpy(np.concatenate([anchors, mates])).to(device)
            else:
                idx = torch.from_numpy(anchors).to(device)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate_at(config, step)
            objects = network(inputs[idx], factor)
            far = physics.far_field(objects)
            loss = _loss(config.loss, far, target[idx], counts[idx], offset[idx])
            if pairing:
                half = len(anchors)
                loss = loss + config.overlap_weight * _overlap_loss(
                    objects[:half, 0], objects[half:, 0], rounded[mates] - rounded[anchors], overlap_weights
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"training loss became {value} at step {step}; lower TrainConfig.learning_rate "
                    f"(now {config.learning_rate})"
                )
            losses.append(value)
            bar.set_postfix(loss=f"{value:.4g}", refresh=False)
            bar.update(1)
            if mlflow is not None and (step % config.log_every == 0 or step == config.steps - 1):
                mlflow.log_metric("train_loss", value, step=step)
    timings["train"] = time.perf_counter() - t0
    network.eval()

    t0 = time.perf_counter()
    error_after = _test_error(network, test_dataset, config.eval_batch_size)
    timings["eval_after"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    timings["steps_per_second"] = config.steps / timings["train"] if timings["train"] > 0 else float("inf")

    if mlflow is not None:
        metrics = {"train_seconds": timings["train"], "steps_per_second": timings["steps_per_second"]}
        if error_before is not None:
            metrics["error_before"] = error_before
        if error_after is not None:
            metrics["error_after"] = error_after
        mlflow.log_metrics(metrics, step=config.steps)

    return TrainResult(
        network=network,
        config=config,
        loss_history=losses,
        intensity_scale=scaling.intensity_scale,
        normalization_factor=scaling.normalization_factor,
        nphotons=scaling.nphotons,
        photon_scale=scaling.photon_scale,
        photon_scale_source=scaling.photon_scale_source,
        error_before=error_before,
        error_after=error_after,
        timings=timings,
        n_train=n_train,
        n_test=n_test,
        device=str(device),
    )


# ----------------------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------------------
def bundle_params(result: TrainResult, output_prefix: str | None = None) -> dict[str, Any]:
    """The legacy ``params.cfg`` values :func:`save_trained_bundle` records (upstream key names)."""
    cfg = result.config
    poisson = cfg.loss == "poisson"
    params: dict[str, Any] = {
        "N": int(cfg.N),
        "gridsize": 1,
        "n_filters_scale": int(cfg.n_filters_scale),
        "model_type": "pinn",
        "architecture": "cnn",
        "amp_activation": cfg.amp_activation,
        "object.big": True,
        "probe.big": bool(cfg.probe_big),
        "intensity_scale.trainable": False,
        "nphotons": float(result.nphotons),
        "nepochs": int(result.epochs),
        "batch_size": int(cfg.batch_size),
        "learning_rate": float(cfg.learning_rate),
        "n_groups": int(result.n_train),
        "subsample_seed": int(cfg.seed),
        "torch_loss_mode": cfg.loss,
        "nll_weight": 1.0 if poisson else 0.0,
        "mae_weight": 0.0 if poisson else 1.0,
        "optimizer": "adam",
        "backend": "pytorch",
        "probe.trainable": False,
    }
    if output_prefix is not None:
        params["output_prefix"] = output_prefix
    return params


def save_trained_bundle(result: TrainResult, path: str | Path) -> Path:
    """Write ``result.network`` as a ``wts.h5.zip`` with a full params snapshot and its ``intensity_scale``.

    Args:
        result: from :func:`train_model`.
        path: ``out/wts.h5.zip``, ``out/wts.h5`` or a directory (see :func:`bundle.save_torch_bundle`).

    Returns:
        The archive written (also stored in ``result.bundle_path``). Load it with
        ``load_torch_bundle(path)`` and predict with ``network(raw_amplitudes, normalization_factor(raw))``.
    """
    if not isinstance(result, TrainResult):
        raise TypeError(f"`result` must be a TrainResult from train_model, got {type(result).__name__}")
    target = Path(path)
    prefix = str(target if target.suffix == "" and not target.name.endswith(".h5") else target.parent)
    written = save_torch_bundle(
        result.network, target, bundle_params(result, prefix), intensity_scale=float(result.intensity_scale)
    )
    result.bundle_path = written
    return written
