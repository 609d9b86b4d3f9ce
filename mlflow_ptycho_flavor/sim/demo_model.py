"""The demo's shipped model: the one recipe that trains it (``scripts/train_demo_bundle.py``) and that the demo's scan
must match, and where the committed bundle and its record live.

A PtychoPINN network reconstructs from diffraction alone, so it is tied to the illumination it was trained with: the
probe (shape, size, curvature), the pattern size and, through the input normalisation, roughly the photon budget.
:data:`DEMO_SIMULATION` holds those settings once; the training script simulates its scan with them and the demo
simulates its fresh scan with them, so the two cannot drift apart. The *object* differs: the bundle is trained on
one large object (:data:`TRAINING_SCAN`, its own seed), and the demo reconstructs other objects it never saw.

The committed files (``mlflow_ptycho_flavor/sim/demo_bundle/``):

* ``wts.h5.zip`` - the bundle, written by :func:`~mlflow_ptycho_flavor.sim.train.save_trained_bundle`;
* ``record.json`` - what the script did and measured: the recipe, the training time, the loss curve (sampled),
  and the figures of the demo's default scan (patch and stitched errors, phase correlation).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlflow_ptycho_flavor.errors import InvalidArgumentError
from mlflow_ptycho_flavor.sim.dataset import PtychoDataset
from mlflow_ptycho_flavor.sim.simulate import simulate_dataset
from mlflow_ptycho_flavor.sim.train import TrainConfig

__all__ = [
    "DEMO_SIMULATION",
    "TRAINING_SCAN",
    "QUICK_SCAN",
    "BUNDLE_DIR",
    "demo_train_config",
    "simulate_demo_scan",
    "simulate_training_scan",
    "shipped_bundle_path",
    "shipped_bundle_record",
]

#: Simulator settings shared by the shipped bundle's training scan and every demo scan (the physics the network
#: learnt): N = 64, the default soft-edged aperture probe and its curvature, 1e6 photons per pattern.
DEMO_SIMULATION: dict[str, Any] = {"N": 64, "probe": "aperture", "probe_curvature": 4.0, "nphotons": 1e6}
#: The training scan: one large object, a 64 x 64 raster (4096 patterns) at the simulator's default step (N/4) and
#: jitter. (Trained on a 32 x 32 raster, the network's patch error was 0.08 on its own object and 0.12 on fresh ones:
#: more object to learn from narrows that gap.)
TRAINING_SCAN: dict[str, Any] = {"n_scan": (64, 64), "seed": 101}
#: The smaller raster of ``ptycho-flavor demo --quick`` (the default demo scan is the simulator's 16 x 16).
QUICK_SCAN = (8, 8)
#: Where the committed bundle and its record are.
BUNDLE_DIR = Path(__file__).resolve().parent / "demo_bundle"


def demo_train_config(**overrides: Any) -> TrainConfig:
    """The :class:`TrainConfig` of ``scripts/train_demo_bundle.py`` (``overrides`` replace fields, e.g. ``steps``)."""
    recipe: dict[str, Any] = {
        "N": DEMO_SIMULATION["N"],
        "n_filters_scale": 1,
        "steps": 6000,
        "batch_size": 16,
        "learning_rate": 1e-3,
        "lr_schedule": "cosine",
        "final_learning_rate": 1e-5,
        "overlap_weight": 100.0,
        "seed": 0,
        "device": "cpu",
        "num_threads": 1,
        "log_every": 50,
    }
    recipe.update(overrides)
    return TrainConfig(**recipe)


def simulate_demo_scan(seed: int = 0, n_scan: int | tuple[int, int] | None = None) -> PtychoDataset:
    """A fresh scan for the demo: the shipped bundle's physics (:data:`DEMO_SIMULATION`), a new object per seed."""
    if seed == TRAINING_SCAN["seed"]:
        raise InvalidArgumentError(
            f"seed {seed} simulates the object the shipped demo bundle was trained on; pick another seed so the "
            "demo reconstructs an object the network never saw."
        )
    return simulate_dataset(**DEMO_SIMULATION, n_scan=n_scan, seed=seed)


def simulate_training_scan() -> PtychoDataset:
    """The scan ``scripts/train_demo_bundle.py`` trains the shipped bundle on."""
    return simulate_dataset(**DEMO_SIMULATION, **TRAINING_SCAN)


def shipped_bundle_path() -> Path:
    """The committed ``wts.h5.zip`` the demo starts from.

    Raises:
        InvalidArgumentError: the file is missing (an install without package data); ``--from-scratch`` trains one.
    """
    path = BUNDLE_DIR / "wts.h5.zip"
    if not path.is_file():
        raise InvalidArgumentError(
            f"the shipped demo bundle {path} is missing (installed without package data?); reinstall the package, "
            "run scripts/train_demo_bundle.py, or run the demo with --from-scratch."
        )
    return path


def shipped_bundle_record() -> dict[str, Any]:
    """The record ``scripts/train_demo_bundle.py`` wrote next to the bundle (recipe, timings, loss curve, figures).

    Raises:
        InvalidArgumentError: the record is missing or not a JSON object.
    """
    path = BUNDLE_DIR / "record.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidArgumentError(
            f"the shipped demo bundle's record {path} is missing or unreadable ({type(exc).__name__}); rerun "
            "scripts/train_demo_bundle.py."
        ) from exc
    if not isinstance(record, dict):
        raise InvalidArgumentError(f"{path} does not hold a JSON object; rerun scripts/train_demo_bundle.py.")
    return record
