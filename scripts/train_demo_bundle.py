#!/usr/bin/env python
"""Train the small bundle ``ptycho-flavor demo`` starts from, with the package's own trainer; seeded, CPU only.

Training a PtychoPINN network well takes more than the demo's one-minute budget on two cores, so the demo ships a
bundle trained here offline. Everything is the package's own code, physics only (no ground truth in the loss):

1. simulate the training scan: :func:`~mlflow_ptycho_flavor.sim.demo_model.simulate_training_scan` - one object
   (its own seed), 32 x 32 positions, the demo's probe and photon budget (``DEMO_SIMULATION``);
2. train with :func:`~mlflow_ptycho_flavor.sim.train.train_model` and
   :func:`~mlflow_ptycho_flavor.sim.demo_model.demo_train_config` (N=64, n_filters_scale=1, Poisson loss, cosine
   learning-rate schedule, one CPU thread, seed 0);
3. score it on the demo's scans - fresh objects the network never saw (seeds 0, the demo's default, and 1, 2) - with
   the demo's own reconstruction (:func:`mlflow_ptycho_flavor.demo.reconstruct_scan`: phase alignment, probe-weighted
   stitching);
4. write, into ``--out`` (default ``mlflow_ptycho_flavor/sim/demo_bundle/``): ``wts.h5.zip`` and ``record.json``
   (recipe, timings, sampled loss curve, the figures of step 3, the bundle's sha256); and into ``--reference``
   (default ``tests/data/demo_bundle/``): ``reference.npz`` with two patterns of the demo's default scan, their
   input factor and this process's prediction for them, which ``tests/test_demo_bundle.py`` reproduces within a
   stated tolerance.

Usage (from the repository root; ~1 h on one busy core)::

    .venv/bin/python scripts/train_demo_bundle.py
    .venv/bin/python scripts/train_demo_bundle.py --steps 200 --out /tmp/try --reference /tmp/try   # a quick look
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mlflow_ptycho_flavor._io import atomic_write, atomic_write_bytes  # noqa: E402
from mlflow_ptycho_flavor.demo import reconstruct_scan  # noqa: E402
from mlflow_ptycho_flavor.sim.dataset import normalization_factor  # noqa: E402
from mlflow_ptycho_flavor.sim.demo_model import (  # noqa: E402
    BUNDLE_DIR,
    DEMO_SIMULATION,
    TRAINING_SCAN,
    demo_train_config,
    simulate_demo_scan,
    simulate_training_scan,
)
from mlflow_ptycho_flavor.sim.train import predict_patches, save_trained_bundle, train_model  # noqa: E402

#: Seeds of the scans the bundle is scored on (0 is the demo's default scan).
SCORE_SEEDS = (0, 1, 2)
#: Patterns of the demo's default scan recorded in reference.npz.
REFERENCE_PATTERNS = 2
#: Every how many steps the loss curve in record.json keeps a value (mean of the steps since the previous one).
LOSS_SAMPLE = 10


def _sampled_loss(losses: list[float]) -> dict[str, list]:
    values = np.asarray(losses, dtype=np.float64)
    ends = list(range(LOSS_SAMPLE, len(values) + 1, LOSS_SAMPLE)) or [len(values)]
    return {
        "steps": ends,
        "loss": [round(float(values[max(0, end - LOSS_SAMPLE):end].mean()), 5) for end in ends],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    parser.add_argument("--out", type=Path, default=BUNDLE_DIR, help="where wts.h5.zip and record.json go")
    parser.add_argument("--reference", type=Path, default=REPO / "tests" / "data" / "demo_bundle",
                        help="where reference.npz goes")
    args = parser.parse_args(argv)

    config = demo_train_config(**({} if args.steps is None else {"steps": args.steps}))
    train_scan = simulate_training_scan()
    print(f"training on {train_scan.n_patterns} patterns of a {train_scan.objectGuess.shape} object "
          f"({TRAINING_SCAN}), {config.steps} steps", flush=True)
    started = time.perf_counter()
    result = train_model(train_scan, config, mlflow_logging=False)
    train_seconds = time.perf_counter() - started
    print(result.summary(), flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    bundle = save_trained_bundle(result, args.out / "wts.h5.zip")

    scores = {}
    with torch.no_grad():
        for seed in SCORE_SEEDS:
            scan = simulate_demo_scan(seed=seed)
            patches = predict_patches(result.network, scan)
            scored = reconstruct_scan(patches, scan)
            scores[str(seed)] = {
                "patch_error": round(float(scored.patch_error), 4),
                "stitched_object_error": round(scored.error, 4),
                "phase_correlation": round(scored.phase_correlation, 4),
            }
            print(f"scan seed {seed}: {scores[str(seed)]}", flush=True)

        demo_scan = simulate_demo_scan(seed=0)
        diffraction = np.ascontiguousarray(demo_scan.diff3d[:REFERENCE_PATTERNS], dtype=np.float32)
        factor = np.float32(normalization_factor(demo_scan.diff3d))
        output = predict_patches(result.network, diffraction, float(factor))

    def write_reference(handle) -> None:
        np.savez(handle, diffraction=diffraction, factor=factor, output=output.astype(np.complex64))

    reference = atomic_write(args.reference / "reference.npz", write_reference)

    recipe_params = {
        "recipe_" + key: (str(value) if isinstance(value, (tuple, list, type(None))) else value)
        for key, value in {**DEMO_SIMULATION, **{f"train_{k}": v for k, v in TRAINING_SCAN.items()},
                           **{k: v for k, v in config.to_dict().items() if k not in ("progress",)}}.items()
    }
    demo_score = scores["0"]
    record = {
        "what": "the bundle ptycho-flavor demo starts from, written by scripts/train_demo_bundle.py",
        "summary": (f"{config.steps} steps x {config.batch_size} on {train_scan.n_patterns} patterns of another "
                    f"object, {train_seconds / 60:.0f} min on 1 CPU thread"),
        "simulation": DEMO_SIMULATION,
        "training_scan": {k: list(v) if isinstance(v, tuple) else v for k, v in TRAINING_SCAN.items()},
        "train_config": config.to_dict(),
        "recipe_params": recipe_params,
        "train_seconds": round(train_seconds, 1),
        "final_loss": round(result.final_loss, 5),
        "loss_curve": _sampled_loss(result.loss_history),
        "scores_on_fresh_scans": scores,
        "demo_scan_figures": demo_score,
        "bundle_sha256": hashlib.sha256(bundle.read_bytes()).hexdigest(),
        "bundle_bytes": bundle.stat().st_size,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()},
    }
    atomic_write_bytes(args.out / "record.json", (json.dumps(record, indent=1) + "\n").encode("utf-8"))
    print(f"wrote {bundle} ({bundle.stat().st_size:,} bytes), {args.out / 'record.json'}, {reference}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
