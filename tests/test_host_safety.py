"""The package never breaks the process that imports it (issue 12 §2).

* ptychodus-like environment: ``mlflow-skinny`` without pandas. Importing this package and MLflow, in either
  order, must leave ``import mlflow`` working; ``mlflow.ptycho_torch`` then explains why the flavor is unavailable
  instead of failing MLflow's own import, and the standalone bundle loader keeps working.
* ``ptycho-flavor predict|inspect wts.h5.zip`` where MLflow is not installed at all: the command line builds the
  model from the bundle through the model layer and never imports MLflow.

Each scenario runs in a fresh interpreter (``sys.executable``) whose first meta-path finder refuses the blocked
packages with ``ImportError``, exactly as an environment without them would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mlflow_ptycho_flavor import save_torch_bundle
from mlflow_ptycho_flavor.sim.dataset import save_npz
from mlflow_ptycho_flavor.sim.simulate import simulate_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]

BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys

    class _Blocked(importlib.abc.MetaPathFinder):
        def __init__(self, names):
            self.names = tuple(names)

        def find_spec(self, fullname, path=None, target=None):
            if any(fullname == n or fullname.startswith(n + ".") for n in self.names):
                raise ImportError(f"No module named {fullname!r} (blocked by the test)", name=fullname)
            return None

    sys.meta_path.insert(0, _Blocked(BLOCKED))
    """
)


def _run_python(body: str, blocked: list[str], tmp_path: Path, *args: str) -> dict:
    script = tmp_path / "scenario.py"
    script.write_text(f"BLOCKED = {blocked!r}\n" + BLOCKER + textwrap.dedent(body))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        env.pop(var, None)
    done = subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture()
def bundle(tmp_path, perturbed_network):
    return save_torch_bundle(perturbed_network(seed=3, N=64, n_filters_scale=1), tmp_path / "wts.h5")


SKINNY = """
import json, sys, warnings
warnings.simplefilter("ignore")
report = {}
if sys.argv[1] == "package-first":
    import mlflow_ptycho_flavor
    import mlflow
else:
    import mlflow
    import mlflow_ptycho_flavor
report["mlflow_imported"] = mlflow.__name__ == "mlflow" and hasattr(mlflow, "__version__")
report["pandas_loaded"] = "pandas" in sys.modules
import mlflow.tracking  # MLflow itself stays usable
report["alias_present"] = hasattr(mlflow, "ptycho_torch")
try:
    mlflow.ptycho_torch.log_model
    report["access"] = "worked"
except Exception as exc:
    report["access"] = type(exc).__name__
    report["message"] = str(exc)
    report["is_attribute_error"] = isinstance(exc, AttributeError)
    report["is_package_error"] = isinstance(exc, mlflow_ptycho_flavor.PtychoFlavorError)
network, params = mlflow_ptycho_flavor.load_torch_bundle(sys.argv[2], device="cpu")
report["standalone_N"] = params["N"]
print(json.dumps(report))
"""


@pytest.mark.parametrize("order", ["package-first", "mlflow-first"])
def test_mlflow_skinny_without_pandas_keeps_working(order, bundle, tmp_path):
    report = _run_python(SKINNY, ["pandas"], tmp_path, order, str(bundle))
    assert report["mlflow_imported"] is True
    assert report["pandas_loaded"] is False
    assert report["standalone_N"] == 64
    # the alias degrades with a message that names the package, the cause and the fix
    assert report["access"] != "worked"
    assert report["is_attribute_error"] and report["is_package_error"], report
    message = report["message"]
    assert "mlflow.ptycho_torch" in message and "pandas" in message, message
    assert "pip install" in message, message


def test_alias_appears_when_the_flavor_can_load(tmp_path, bundle):
    body = """
    import json, sys
    import mlflow_ptycho_flavor, mlflow
    import mlflow_ptycho_flavor.flavor as flavor
    print(json.dumps({"alias": mlflow.ptycho_torch is flavor, "module": sys.modules["mlflow.ptycho_torch"] is flavor}))
    """
    assert _run_python(body, [], tmp_path) == {"alias": True, "module": True}


CLI_WITHOUT_MLFLOW = """
import json, sys
from mlflow_ptycho_flavor.cli import main
bundle, scan, out = sys.argv[1:4]
codes = [main(["predict", bundle, scan, "-o", out, "--patches-only"]), main(["inspect", bundle, "--json"])]
print()
print(json.dumps({"codes": codes,
                  "mlflow_modules": sorted(m for m in sys.modules if m == "mlflow" or m.startswith("mlflow."))}))
"""


def test_cli_predict_and_inspect_a_bundle_without_mlflow(bundle, tmp_path):
    scan, out = tmp_path / "scan.npz", tmp_path / "out.npz"
    save_npz(simulate_dataset(N=64, n_scan=(3, 3), seed=1), scan)
    report = _run_python(CLI_WITHOUT_MLFLOW, ["mlflow"], tmp_path, str(bundle), str(scan), str(out))
    assert report == {"codes": [0, 0], "mlflow_modules": []}
    with np.load(out) as result:
        assert result["patches"].shape == (9, 1, 64, 64)
        assert np.isfinite(result["patches"]).all()
