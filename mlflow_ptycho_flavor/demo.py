"""The end-to-end demo behind ``ptycho-flavor demo``: data -> model -> MLflow -> reload -> stitched object.

Every step uses the real parts a user would: the simulator writes upstream's NPZ schema; the model is a
``wts.h5.zip`` - by default the small bundle shipped with the package, trained offline by the package's own
physics-informed trainer (``scripts/train_demo_bundle.py``, recipe in :mod:`mlflow_ptycho_flavor.sim.demo_model`) on
a different object, or with ``from_scratch=True`` one trained here and now; ``mlflow.ptycho_torch.log_model`` logs
and registers it in the embedded (sqlite) tracking store; the model comes back through ``mlflow.pyfunc`` *and*
through the standalone zip (which must agree bit for bit); the patches are aligned in phase, blended with probe
weights and stitched into the full object (:mod:`mlflow_ptycho_flavor.model.blending`), and compared with the ground
truth in a PNG.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["run_demo", "reconstruct_scan", "ScanReconstruction"]

DEMO_EXPERIMENT = "ptycho-demo"


def _interior(mask: np.ndarray, margin: int) -> np.ndarray:
    """Shrink a covered-region mask by ``margin`` pixels (the scan's edge is covered by one patch only)."""
    inner = mask.copy()
    for _ in range(margin):
        shrunk = inner.copy()
        shrunk[1:, :] &= inner[:-1, :]
        shrunk[:-1, :] &= inner[1:, :]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        inner = shrunk
    return inner


@dataclasses.dataclass(frozen=True)
class ScanReconstruction:
    """A stitched scan compared with its ground truth (what the demo reports and draws).

    Attributes:
        obj: complex64 object in the ground truth's frame, global phase matched to it, 0 outside ``region``.
        region: bool mask of the evaluated pixels: the covered area shrunk by ``N // 4`` (the scan's rim is seen by
            one patch edge only).
        error: relative L2 error of ``obj`` over ``region``, one global phase removed.
        phase_correlation: correlation of reconstructed and true phase over ``region``.
        patch_error: per-pattern error of the patches over the probe's illuminated window (each patch's own phase
            removed), i.e. before stitching.
    """

    obj: np.ndarray
    region: np.ndarray
    error: float
    phase_correlation: float
    patch_error: float | None


def reconstruct_scan(patches: np.ndarray, dataset: Any) -> ScanReconstruction:
    """Phase-align, probe-weight and stitch gridsize-1 ``patches`` of ``dataset`` and score them against its truth.

    Args:
        patches: complex ``(M, N, N)`` network outputs, one per scan position of ``dataset``.
        dataset: a :class:`~mlflow_ptycho_flavor.sim.dataset.PtychoDataset` with ``objectGuess`` (and, for the
            patch error, ``ground_truth_patches``).
    """
    from mlflow_ptycho_flavor.model.blending import align_patch_phases, probe_weights
    from mlflow_ptycho_flavor.model.stitching import crop_to_object, stitch_patches
    from mlflow_ptycho_flavor.sim.metrics import (
        align_global_phase,
        illuminated_window,
        phase_correlation,
        reconstruction_error,
    )

    weights = probe_weights(dataset.probeGuess)
    aligned, _phases = align_patch_phases(patches, dataset.offsets, weighting=weights)
    stitched = stitch_patches(aligned, dataset.offsets, centre="integer", weighting=weights)
    recon, covered = crop_to_object(stitched, dataset.objectGuess.shape)
    region = _interior(covered, margin=dataset.N // 4)
    truth = dataset.objectGuess
    patch_error = None
    if dataset.ground_truth_patches is not None:
        patch_error = reconstruction_error(
            patches, dataset.ground_truth_patches, window=illuminated_window(dataset.probeGuess)
        )
    return ScanReconstruction(
        obj=np.where(region, align_global_phase(recon, truth, window=region), 0).astype(np.complex64),
        region=region,
        error=reconstruction_error(recon, truth, window=region, per_pattern=False),
        phase_correlation=phase_correlation(recon, truth, window=region),
        patch_error=patch_error,
    )


def _tracking(out_dir: Path, tracking_uri: str | None) -> str:
    import mlflow

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(out_dir / 'mlflow.db').resolve()}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(DEMO_EXPERIMENT)
    if experiment is None:
        experiment_id = client.create_experiment(
            DEMO_EXPERIMENT, artifact_location=(out_dir / "mlartifacts").resolve().as_uri()
        )
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return uri


def _stage(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def _inference_threads() -> tuple[int, str]:
    """Torch CPU threads for the demo's forward passes, and why.

    All cores on an idle machine; one thread when other processes already keep the cores busy (1-minute load
    average above ``cores - 1``): oversubscribed OpenMP threads then run several times slower than one thread.
    """
    import torch

    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - platforms without a load average
        return torch.get_num_threads(), "default"
    if cores > 1 and load > cores - 1:
        return 1, f"load average {load:.1f} on {cores} cores"
    return torch.get_num_threads(), f"load average {load:.1f} on {cores} cores"


def _copy_shipped_bundle(target: Path) -> Path:
    from mlflow_ptycho_flavor._io import atomic_write
    from mlflow_ptycho_flavor.sim.demo_model import shipped_bundle_path

    source = shipped_bundle_path()
    with source.open("rb") as handle:
        return atomic_write(target, lambda out: shutil.copyfileobj(handle, out))


def run_demo(
    out_dir: str | os.PathLike = "demo_output",
    *,
    quick: bool = False,
    from_scratch: bool = False,
    steps: int | None = None,
    seed: int = 0,
    tracking_uri: str | None = None,
    registered_model_name: str = "ptycho-demo",
) -> dict[str, Any]:
    """Run the demo and return a summary (paths, model URIs, error figures, timings).

    Args:
        out_dir: folder for the dataset, the bundle, the PNG and (by default) the tracking store.
        quick: smoke run: a smaller scan (8 x 8 positions) and, when training, a few seconds of it.
        from_scratch: train a new network on the scan here (the full path) instead of starting from the shipped
            bundle. Within a minute on two cores it reconstructs far worse than the shipped one.
        steps: training steps (implies ``from_scratch``; overrides the preset).
        seed: seed of the simulated scan (and of training); the shipped bundle's training object has its own seed.
        tracking_uri: MLflow tracking URI (default: ``MLFLOW_TRACKING_URI``, else ``sqlite:///<out_dir>/mlflow.db``).
        registered_model_name: registry name; the new version gets the alias ``champion``.
    """
    import mlflow
    import torch

    import mlflow_ptycho_flavor  # noqa: F401  (mlflow.ptycho_torch)

    from mlflow_ptycho_flavor.model.inference import PtychoTorchModel
    from mlflow_ptycho_flavor.sim.dataset import normalization_factor, save_npz, train_test_split
    from mlflow_ptycho_flavor.sim.demo_model import QUICK_SCAN, shipped_bundle_record, simulate_demo_scan
    from mlflow_ptycho_flavor.sim.plotting import save_reconstruction_figure
    from mlflow_ptycho_flavor.sim.train import TrainConfig, save_trained_bundle, train_model

    from_scratch = from_scratch or steps is not None
    timings: dict[str, float] = {}
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    _stage(f"simulating a fresh ptychography scan (seed {seed})")
    t = time.perf_counter()
    dataset = simulate_demo_scan(seed=seed, n_scan=QUICK_SCAN if quick else None)
    save_npz(dataset, out / "scan.npz")
    timings["simulate"] = time.perf_counter() - t

    uri = _tracking(out, tracking_uri)
    threads, why = _inference_threads()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with mlflow.start_run(run_name="ptycho-demo") as run:
            result = None
            if from_scratch:
                train_set, test_set = train_test_split(dataset, 0.2, seed=seed)
                config = TrainConfig.quick(seed=seed) if quick else TrainConfig(seed=seed)
                if steps is not None:
                    config = dataclasses.replace(config, steps=steps)
                _stage(f"training {config.steps} steps here (physics-informed, Poisson loss)")
                t = time.perf_counter()
                result = train_model(train_set, config, test_dataset=test_set)
                timings["train"] = time.perf_counter() - t
                bundle = save_trained_bundle(result, out / "wts.h5.zip")
                model_line = (f"trained here: {config.steps} steps x {config.batch_size} on {train_set.n_patterns} "
                              f"patterns of this scan, {timings['train']:.0f} s")
                loss_steps, loss_values = None, result.loss_history
            else:
                record = shipped_bundle_record()
                bundle = _copy_shipped_bundle(out / "wts.h5.zip")
                model_line = (f"shipped bundle, trained offline by scripts/train_demo_bundle.py "
                              f"({record['summary']}); --from-scratch trains one here")
                loss_steps, loss_values = record["loss_curve"]["steps"], record["loss_curve"]["loss"]
                mlflow.log_params({"model_source": "shipped demo bundle", **record["recipe_params"]})
            _stage(f"model: {model_line}")

            t = time.perf_counter()
            _stage(f"logging {bundle.name} with mlflow.ptycho_torch.log_model and registering it")
            info = mlflow.ptycho_torch.log_model(str(bundle), name="model", registered_model_name=registered_model_name)
            client = mlflow.MlflowClient()
            client.set_registered_model_alias(registered_model_name, "champion", info.registered_model_version)
            timings["log+register"] = time.perf_counter() - t

            _stage("loading back through mlflow.pyfunc and through the standalone zip")
            t = time.perf_counter()
            alias_uri = f"models:/{registered_model_name}@champion"
            pyfunc_model = mlflow.pyfunc.load_model(alias_uri)
            downloaded = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(out / "downloaded")))
            standalone = PtychoTorchModel.from_bundle(downloaded / "wts.h5.zip", device="cpu")  # no MLflow
            timings["reload"] = time.perf_counter() - t

            _stage(f"reconstructing {dataset.n_patterns} scan positions ({threads} torch thread(s): {why}), "
                   "aligning patch phases, stitching with probe weights")
            t = time.perf_counter()
            factor = normalization_factor(dataset.diff3d)
            diffraction = dataset.diff3d[:, None]
            patches = pyfunc_model.predict({"diffraction": diffraction, "scale": np.full(len(diffraction), factor)})
            # The zip taken out of MLflow, loaded without MLflow, batched the same way: identical numbers expected.
            direct = standalone.predict(diffraction, factor)
            identical = bool(np.array_equal(patches, direct))
            scored = reconstruct_scan(patches[:, 0], dataset)
            timings["reconstruct+stitch"] = time.perf_counter() - t

            t = time.perf_counter()
            figures = (f"patch error {scored.patch_error:.3f}; stitched object error {scored.error:.3f} "
                       f"(relative L2, global phase removed); phase correlation {scored.phase_correlation:.3f}")
            png = save_reconstruction_figure(
                out / "reconstruction.png",
                scored.obj,
                truth=dataset.objectGuess,
                mask=scored.region,
                loss_history=loss_values,
                loss_steps=loss_steps,
                title=("mlflow-ptycho-flavor demo: a fresh simulated scan reconstructed by "
                       + ("a network trained here" if from_scratch else "the shipped PtychoPINN bundle")),
                notes=figures,
            )
            mlflow.log_artifact(str(png))
            mlflow.log_metrics({
                "stitched_object_error": scored.error,
                "phase_correlation": scored.phase_correlation,
                "patch_error": float(scored.patch_error),
            })
            timings["figure"] = time.perf_counter() - t
    finally:
        torch.set_num_threads(previous_threads)
    timings["total"] = time.perf_counter() - started
    summary: dict[str, Any] = {
        "model": model_line,
        "bundle": str(bundle),
        "figure": str(png),
        "tracking uri": uri,
        "run": run.info.run_id,
        "model uri": info.model_uri,
        "registered": f"models:/{registered_model_name}/{info.registered_model_version} (alias champion)",
        "pyfunc == standalone zip": identical,
    }
    if result is not None and result.error_before is not None:
        summary["held-out patch error (untrained -> trained)"] = f"{result.error_before:.3f} -> {result.error_after:.3f}"
    summary.update({
        "patch error (this scan)": f"{scored.patch_error:.3f}",
        "stitched object error": f"{scored.error:.3f}",
        "phase correlation": f"{scored.phase_correlation:.3f}",
        "timings (s)": ", ".join(f"{k} {v:.1f}" for k, v in timings.items()),
        "next": f"ptycho-flavor serve '{alias_uri}'   (with MLFLOW_TRACKING_URI={uri})",
    })
    return summary
