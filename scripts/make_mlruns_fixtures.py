#!/usr/bin/env python
"""Write ``mlruns_fixtures/``: a small, relocatable MLflow tracking store holding one registered ptycho_torch model.

What it writes into ``--out`` (default ``mlruns_fixtures/`` next to ``scripts/``):

* ``mlflow.db``: a sqlite tracking + registry store (MLflow's schema of the installed version) with one experiment,
  one run, one logged model (``name="model"``) registered as ``ptycho-fixture`` version 1 with alias ``champion``;
* ``artifacts/``: that store's artifact root (the logged model directory with its ``wts.h5.zip``);
* ``expected_io.npz``: ``x`` float32 (B, 1, N, N) amplitudes, ``scale`` float32 (B,), ``output`` complex64
  (B, 1, N, N) = the model's prediction for ``{"diffraction": x, "scale": scale}``, computed here;
* ``store.json``: the ids and names above, and the placeholder that stands for the store's location;
* ``README.md``.

Relocation: sqlite stores artifact locations as absolute ``file://`` URIs. The store is built in a temporary folder,
then every occurrence of that folder's URI in the database (and in the logged ``MLmodel``) is replaced by the
placeholder ``file:///__MLRUNS_FIXTURES_ROOT__``, so the committed files hold no machine-specific path. A reader
copies the folder somewhere, replaces the placeholder by the copy's URI (``Path(copy).as_uri()``) in every text
column, and points MLflow at the copy's ``mlflow.db`` (``tests/test_mlruns_fixtures.py`` does exactly that).

The network is the test suite's seeded, perturbed network (``tests/conftest.py``), N=64, gridsize 1,
n_filters_scale=1, with every float weight rounded to a bfloat16-representable float32 value: the low 16 mantissa bits
become zero, so the deflated bundle is ~1.1 MB instead of ~2.2 MB. The weights stay float32 and non-trivial.

Usage (from the repository root)::

    python scripts/make_mlruns_fixtures.py            # rewrites mlruns_fixtures/
    python scripts/make_mlruns_fixtures.py --out DIR  # anywhere else
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shutil
import sqlite3
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "mlruns_fixtures"
ROOT_PLACEHOLDER = "file:///__MLRUNS_FIXTURES_ROOT__"
SEED = 20260715
INPUT_SEED = 7
BATCH = 3
NETWORK = {"N": 64, "n_filters_scale": 1, "C_model": 1}
EXPERIMENT = "ptycho-fixtures"
REGISTERED_NAME = "ptycho-fixture"
ALIAS = "champion"
ARTIFACT_NAME = "model"
MANAGED = ("mlflow.db", "artifacts", "expected_io.npz", "store.json", "README.md")
MAX_TOTAL_BYTES = 3 * 1024 * 1024
MAX_BUNDLE_BYTES = 2 * 1000 * 1000


def _load_test_helpers():
    """``make_perturbed_network`` from tests/conftest.py (one definition of "perturbed" for tests and fixtures)."""
    spec = importlib.util.spec_from_file_location("_ptycho_tests_conftest", REPO_ROOT / "tests" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses defined there look their module up
    spec.loader.exec_module(module)
    return module


def make_network():
    import torch

    network = _load_test_helpers().make_perturbed_network(seed=SEED, **NETWORK)
    with torch.no_grad():
        for tensor in network.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(torch.bfloat16).to(tensor.dtype))
    return network.eval()


def make_inputs():
    import numpy as np

    rng = np.random.default_rng(INPUT_SEED)
    x = (2.0 * rng.random((BATCH, 1, NETWORK["N"], NETWORK["N"]))).astype(np.float32)
    scale = (0.5 + 1.5 * rng.random(BATCH)).astype(np.float32)
    return x, scale


def text_columns(con: sqlite3.Connection):
    """``(table, column)`` for every column of every table that can hold text (robust to schema changes)."""
    tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    for table in tables:
        for _, column, decl, *_ in con.execute(f'PRAGMA table_info("{table}")'):
            decl = (decl or "").upper()
            if not decl or any(t in decl for t in ("CHAR", "TEXT", "CLOB", "STRING")):
                yield table, column


def replace_in_db(db: Path, old: str, new: str) -> dict[str, int]:
    """Replace ``old`` by ``new`` in every text value of the sqlite file; returns rows changed per table.column."""
    changed: dict[str, int] = {}
    con = sqlite3.connect(db)
    try:
        with con:
            for table, column in list(text_columns(con)):
                cur = con.execute(
                    f'UPDATE "{table}" SET "{column}" = REPLACE("{column}", ?, ?) '
                    f'WHERE typeof("{column}") = \'text\' AND instr("{column}", ?) > 0',
                    (old, new, old),
                )
                if cur.rowcount:
                    changed[f"{table}.{column}"] = cur.rowcount
        con.execute("VACUUM")  # drop the old strings from free pages too
    finally:
        con.close()
    return changed


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(out: Path) -> dict:
    import mlflow
    import numpy as np
    import torch
    from mlflow import MlflowClient
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    import mlflow_ptycho_flavor  # noqa: F401  (registers mlflow.ptycho_torch)

    work = Path(tempfile.mkdtemp(prefix="mlruns-fixtures-")).resolve()
    try:
        db, artifacts = work / "mlflow.db", work / "artifacts"
        uri = f"sqlite:///{db}"
        # Create the schema with the artifact root inside `work`, so even the Default experiment's location does.
        SqlAlchemyStore(uri, artifacts.as_uri()).engine.dispose()
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        experiment_id = mlflow.create_experiment(EXPERIMENT, artifact_location=artifacts.as_uri())
        mlflow.set_experiment(experiment_id=experiment_id)

        network = make_network()
        x, scale = make_inputs()
        with mlflow.start_run(run_name="fixture") as run:
            mlflow.log_params({"seed": SEED, **NETWORK})
            mlflow.set_tag("purpose", "mlflow_ptycho_flavor test fixture (scripts/make_mlruns_fixtures.py)")
            info = mlflow.ptycho_torch.log_model(network, name=ARTIFACT_NAME, registered_model_name=REGISTERED_NAME)
        client = MlflowClient()
        client.set_registered_model_alias(REGISTERED_NAME, ALIAS, "1")

        loaded = mlflow.pyfunc.load_model(f"models:/{REGISTERED_NAME}@{ALIAS}", model_config={"device": "cpu"})
        output = loaded.predict({"diffraction": x, "scale": scale}, params={"output_format": "complex"})
        with torch.inference_mode():
            direct = network(torch.from_numpy(x), torch.from_numpy(scale.reshape(-1, 1, 1, 1))).numpy()
        if not np.array_equal(output, direct):
            raise SystemExit("the logged model does not reproduce the in-memory network bit for bit")
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)

        # --- make the store location-independent --------------------------------------------------------------
        # A consistent snapshot through sqlite's backup API, so MLflow's still-open engine cannot interfere.
        final_db = work / "final.db"
        source, target = sqlite3.connect(db), sqlite3.connect(final_db)
        try:
            source.backup(target)
        finally:
            source.close()
            target.close()
        work_uri = work.as_uri()
        changed = replace_in_db(final_db, work_uri, ROOT_PLACEHOLDER)
        for path in artifacts.rglob("*"):
            if path.is_file() and path.suffix != ".zip" and work_uri.encode() in path.read_bytes():
                path.write_text(path.read_text().replace(work_uri, ROOT_PLACEHOLDER))
        for path in [final_db, *artifacts.rglob("*")]:
            if path.is_file() and (str(work).encode() in path.read_bytes()):
                raise SystemExit(f"{path} still holds the build folder {work}")

        bundles = list(artifacts.rglob("wts.h5.zip"))
        if len(bundles) != 1 or bundles[0].stat().st_size > MAX_BUNDLE_BYTES:
            raise SystemExit(f"expected one bundle under {MAX_BUNDLE_BYTES} bytes, got {[b.stat().st_size for b in bundles]}")

        # --- write the output folder ------------------------------------------------------------------------------
        out.mkdir(parents=True, exist_ok=True)
        for name in MANAGED:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        shutil.copyfile(final_db, out / "mlflow.db")
        shutil.copytree(artifacts, out / "artifacts")
        np.savez_compressed(out / "expected_io.npz", x=x, scale=scale, output=output)
        bundle_rel = bundles[0].relative_to(work).as_posix()
        store = {
            "root_placeholder": ROOT_PLACEHOLDER,
            "tracking_db": "mlflow.db",
            "artifact_root": "artifacts",
            "experiment_name": EXPERIMENT,
            "experiment_id": experiment_id,
            "run_id": run.info.run_id,
            "model_id": info.model_id,
            "artifact_name": ARTIFACT_NAME,
            "registered_model": REGISTERED_NAME,
            "version": 1,
            "alias": ALIAS,
            "bundle": bundle_rel,
            "bundle_sha256": _sha256(out / bundle_rel),
            "rewritten_columns": changed,
            "seed": SEED,
            "input_seed": INPUT_SEED,
            "network": NETWORK,
            "weights": "perturbed (tests/conftest.py), rounded to bfloat16-representable float32",
            "created_with": {
                "mlflow": mlflow.__version__,
                "torch": str(torch.__version__),
                "numpy": np.__version__,
                "mlflow_ptycho_flavor": mlflow_ptycho_flavor.__version__,
            },
        }
        (out / "store.json").write_text(json.dumps(store, indent=2, sort_keys=True) + "\n")
        (out / "README.md").write_text(README.format(**store, mlflow_version=mlflow.__version__))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    if total > MAX_TOTAL_BYTES:
        raise SystemExit(f"{out} is {total} bytes, over the {MAX_TOTAL_BYTES} budget")
    return store


README = """\
# mlruns_fixtures: a stored MLflow tracking store with a registered `ptycho_torch` model

Proof that a model stored by an earlier run of this flavor keeps loading: `tests/test_mlruns_fixtures.py` copies this
folder to a temporary directory, relocates it and loads the model through every URI form, offline, comparing the
prediction with `expected_io.npz` bit for bit. Nothing in this folder is ever written by the tests.

| file | content |
|---|---|
| `mlflow.db` | sqlite tracking + registry store (MLflow {mlflow_version} schema): experiment `{experiment_name}`, run `{run_id}`, logged model `{model_id}` (`name="{artifact_name}"`), registered as `{registered_model}` version {version} with alias `{alias}` |
| `artifacts/` | the store's artifact root; the bundle is `{bundle}` |
| `expected_io.npz` | `x` float32 (B, 1, 64, 64) amplitudes, `scale` float32 (B,), `output` complex64 = the prediction for `{{"diffraction": x, "scale": scale}}` computed when the store was made |
| `store.json` | the ids above, the root placeholder, versions used |

The network: N=64, gridsize 1, n_filters_scale=1, the test suite's seeded perturbation (`tests/conftest.py`,
seed {seed}) with weights rounded to bfloat16-representable float32 values (halves the bundle size).

## Relocating

sqlite stores artifact locations as absolute `file://` URIs (`experiments.artifact_location`, `runs.artifact_uri`,
`logged_models.artifact_location`, `model_versions.storage_location`). Here every one of them starts with the
placeholder `{root_placeholder}` instead of a real path (so does the informational `artifact_path` of the
logged `MLmodel`, which loading does not use). To use the store: copy this folder, replace the
placeholder by `Path(copy).as_uri()` in every text column of the copy's `mlflow.db`, then set the tracking and
registry URIs to `sqlite:///<copy>/mlflow.db` and load `models:/{registered_model}/{version}`,
`models:/{registered_model}@{alias}` or `runs:/{run_id}/{artifact_name}`.
After an MLflow upgrade that changes the schema, run `mlflow db upgrade sqlite:///<copy>/mlflow.db` on the copy
(or regenerate).

## Regenerating

From the repository root, with the package and its test dependencies installed:

    python scripts/make_mlruns_fixtures.py

(`--out DIR` writes elsewhere.) Run ids change on every regeneration; the network, inputs and outputs do not (fixed
seeds, same torch build).
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder to write (default: %(default)s)")
    args = parser.parse_args(argv)
    store = build(args.out.resolve())
    print(json.dumps({k: store[k] for k in ("run_id", "model_id", "registered_model", "alias", "bundle")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
