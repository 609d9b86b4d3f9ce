"""The end-to-end demo behind ``ptycho-flavor demo``: data -> training -> MLflow -> reload -> stitched object.

Every step uses the real parts a user would: the simulator writes upstream's NPZ schema, the trainer writes a
``wts.h5.zip`` through ``save_torch_bundle``, ``mlflow.ptycho_torch.log_model`` logs and registers it in the
embedded (sqlite) tracking store, the model comes back through ``mlflow.pyfunc`` *and* through the standalone
zip (which must agree bit for bit), and the patches are stitched into the full object and compared with the
ground truth in a PNG.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["run_demo"]

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


def run_demo(
    out_dir: str | os.PathLike = "demo_output",
    *,
    quick: bool = False,
    steps: int | None = None,
    seed: int = 0,
    tracking_uri: str | None = None,
    registered_model_name: str = "ptycho-demo",
) -> dict[str, Any]:
    """Run the demo and return a summary (paths, model URIs, error figures, timings).

    Args:
        out_dir: folder for the dataset, the bundle, the PNG and (by default) the tracking store.
        quick: train for a few seconds only (tests, smoke runs).
        steps: training steps (overrides the preset).
        seed: seed of simulation and training.
        tracking_uri: MLflow tracking URI (default: ``MLFLOW_TRACKING_URI``, else ``sqlite:///<out_dir>/mlflow.db``).
        registered_model_name: registry name; the new version gets the alias ``champion``.
    """
    import mlflow

    import mlflow_ptycho_flavor  # noqa: F401  (mlflow.ptycho_torch)

    from mlflow_ptycho_flavor.bundle import load_torch_bundle
    from mlflow_ptycho_flavor.sim.dataset import normalization_factor, save_npz, train_test_split
    from mlflow_ptycho_flavor.sim.metrics import align_global_phase, reconstruction_error
    from mlflow_ptycho_flavor.sim.simulate import simulate_dataset
    from mlflow_ptycho_flavor.model.inference import PtychoTorchModel
    from mlflow_ptycho_flavor.sim.plotting import save_reconstruction_figure
    from mlflow_ptycho_flavor.model.stitching import crop_to_object, stitch_patches
    from mlflow_ptycho_flavor.sim.train import TrainConfig, save_trained_bundle, train_model

    timings: dict[str, float] = {}
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    _stage("simulating a ptychography scan")
    t = time.perf_counter()
    dataset = simulate_dataset(N=64, seed=seed)
    save_npz(dataset, out / "scan.npz")
    train_set, test_set = train_test_split(dataset, 0.2, seed=seed)
    timings["simulate"] = time.perf_counter() - t

    uri = _tracking(out, tracking_uri)
    config = TrainConfig.quick(seed=seed) if quick else TrainConfig(seed=seed)
    if steps is not None:
        config = dataclasses.replace(config, steps=steps)
    with mlflow.start_run(run_name="ptycho-demo") as run:
        _stage(f"training {config.steps} steps (physics-informed, Poisson loss)")
        t = time.perf_counter()
        result = train_model(train_set, config, test_dataset=test_set)
        timings["train"] = time.perf_counter() - t

        t = time.perf_counter()
        bundle = save_trained_bundle(result, out / "wts.h5.zip")
        _stage(f"logging {bundle.name} with mlflow.ptycho_torch.log_model and registering it")
        info = mlflow.ptycho_torch.log_model(
            str(bundle), name="model", registered_model_name=registered_model_name
        )
        client = mlflow.MlflowClient()
        client.set_registered_model_alias(registered_model_name, "champion", info.registered_model_version)
        timings["log+register"] = time.perf_counter() - t

        _stage("loading back through mlflow.pyfunc and through the standalone zip")
        t = time.perf_counter()
        alias_uri = f"models:/{registered_model_name}@champion"
        pyfunc_model = mlflow.pyfunc.load_model(alias_uri)
        downloaded = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(out / "downloaded")))
        standalone, _params = load_torch_bundle(downloaded / "wts.h5.zip", device="cpu")
        timings["reload"] = time.perf_counter() - t

        _stage("reconstructing every scan position and stitching the object")
        t = time.perf_counter()
        factor = normalization_factor(dataset.diff3d)
        diffraction = dataset.diff3d[:, None]
        patches = pyfunc_model.predict({"diffraction": diffraction, "scale": np.full(len(diffraction), factor)})
        # The zip taken out of MLflow, loaded without MLflow, batched the same way: identical numbers expected.
        direct = PtychoTorchModel(network=standalone, params=_params).predict(diffraction, factor)
        identical = bool(np.array_equal(patches, direct))
        stitched = stitch_patches(patches[:, 0], dataset.offsets, centre="integer")
        recon, covered = crop_to_object(stitched, dataset.objectGuess.shape)
        inner = _interior(covered, margin=dataset.N // 4)
        object_error = reconstruction_error(recon, dataset.objectGuess, window=inner, per_pattern=False)
        timings["reconstruct+stitch"] = time.perf_counter() - t

        png = save_reconstruction_figure(
            out / "reconstruction.png",
            np.where(inner, align_global_phase(recon, dataset.objectGuess, window=inner), 0),
            truth=dataset.objectGuess,
            mask=inner,
            loss_history=result.loss_history,
            title="mlflow-ptycho-flavor demo: simulated scan, PtychoPINN reconstruction",
            notes=(f"held-out patch error {result.error_before:.3f} -> {result.error_after:.3f}; "
                   f"stitched object error {object_error:.3f} (relative L2, global phase removed)"),
        )
        mlflow.log_artifact(str(png))
        mlflow.log_metric("stitched_object_error", object_error)
    timings["total"] = time.perf_counter() - started
    return {
        "bundle": str(bundle),
        "figure": str(png),
        "tracking uri": uri,
        "run": run.info.run_id,
        "model uri": info.model_uri,
        "registered": f"models:/{registered_model_name}/{info.registered_model_version} (alias champion)",
        "pyfunc == standalone zip": identical,
        "held-out patch error (untrained -> trained)": f"{result.error_before:.3f} -> {result.error_after:.3f}",
        "stitched object error": f"{object_error:.3f}",
        "timings (s)": ", ".join(f"{k} {v:.1f}" for k, v in timings.items()),
        "next": f"ptycho-flavor serve '{alias_uri}'   (with MLFLOW_TRACKING_URI={uri})",
    }
