"""The standalone bundle layer works where MLflow cannot be imported (a torch-only inference environment)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["mlflow"] = None  # any "import mlflow" (or submodule) now raises ImportError

    import numpy as np
    import torch
    from mlflow_ptycho_flavor import load_torch_bundle
    from mlflow_ptycho_flavor.bundle.params import cfg

    folder = sys.argv[1]
    network, params = load_torch_bundle(folder + "/wts.h5.zip", device="cpu")
    data = np.load(folder + "/io.npz")
    with torch.no_grad():
        out = network(torch.from_numpy(data["x"][:1]), torch.from_numpy(data["input_scale_factor"][:1]))
    try:
        import mlflow  # noqa: F401
        mlflow_importable = True
    except ImportError:
        mlflow_importable = False
    loaded = sorted(m for m in sys.modules if m == "mlflow" or m.startswith("mlflow."))
    print(json.dumps({
        "max_abs_err": float(np.abs(out.numpy() - data["output"][:1]).max()),
        "mlflow_importable": mlflow_importable,
        "mlflow_modules": [m for m in loaded if sys.modules[m] is not None],
        "cfg_N": cfg["N"],
        "cfg_gridsize": cfg["gridsize"],
    }))
    """
)


def test_standalone_load_without_mlflow(upstream_dir, tmp_path):
    script = tmp_path / "no_mlflow.py"
    script.write_text(SCRIPT)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.pop("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", None)
    result = subprocess.run(
        [sys.executable, str(script), str(upstream_dir / "n64_g1_bn_bcbam_trainscale")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["max_abs_err"] <= 5e-5
    assert report["mlflow_importable"] is False
    assert report["mlflow_modules"] == []
    assert (report["cfg_N"], report["cfg_gridsize"]) == (64, 1)
