"""A stored MLflow store keeps loading: ``mlruns_fixtures/`` (written by ``scripts/make_mlruns_fixtures.py``).

The committed store holds no absolute path: every artifact location in its sqlite database starts with a placeholder
(``store.json``). Each test works on a copy in ``tmp_path`` whose placeholder is replaced by the copy's own URI, then
loads ``models:/ptycho-fixture/1``, ``models:/ptycho-fixture@champion`` and ``runs:/<run_id>/model`` through
``mlflow.pyfunc`` and ``mlflow.ptycho_torch``, offline, and compares with ``expected_io.npz``. The repository's
``mlruns_fixtures/`` is never written (checked by hashes and mtimes around the whole module).

Schema migrations: the copies are first upgraded exactly as a user upgrades a store after installing a newer MLflow,
``python -m mlflow db upgrade sqlite:///<copy>/mlflow.db`` (a no-op when the installed MLflow wrote the store). One
test downgrades a copy by one migration, to stand in for a store written by the MLflow release before the installed
one, and shows that the upgrade is needed and sufficient.

Tolerance: ``expected_io.npz`` was computed on another machine (and may be recomputed by other CPU kernels), so
outputs are compared with ``RECORDED_ATOL`` (see below), never bit for bit.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from mlflow_ptycho_flavor import PtychoTorchModel, load_torch_bundle

from conftest import REPO_ROOT

FIXTURES = REPO_ROOT / "mlruns_fixtures"
STORE = json.loads((FIXTURES / "store.json").read_text())
PLACEHOLDER = STORE["root_placeholder"]
# Where MLflow 3.17 keeps absolute artifact locations; all four must have been rewritten.
LOCATION_COLUMNS = {
    "experiments.artifact_location",
    "runs.artifact_uri",
    "logged_models.artifact_location",
    "model_versions.storage_location",
}
#: Absolute tolerance against the recorded outputs (|output| <= 0.52 here). Float32 convolution kernels of other CPU
#: models or torch builds change the summation order: the observed cross-machine difference is ~2e-7 and upstream's
#: fixtures reproduce to ~5e-6 (tests/test_upstream_fixtures.py uses the same bound). 5e-5 is ~1e-4 of the output
#: scale, so any real regression (a wrong scale factor, a wrong weight, a different architecture: >= 1e-2) fails.
RECORDED_ATOL = 5e-5
URIS = {
    "version": f"models:/{STORE['registered_model']}/{STORE['version']}",
    "alias": f"models:/{STORE['registered_model']}@{STORE['alias']}",
    "run": f"runs:/{STORE['run_id']}/{STORE['artifact_name']}",
}


def _fixture_script():
    """``scripts/make_mlruns_fixtures.py``, which owns the sqlite placeholder rewrite (imported by path)."""
    spec = importlib.util.spec_from_file_location("make_mlruns_fixtures", REPO_ROOT / "scripts" / "make_mlruns_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def relocate_store(source: Path, destination: Path) -> tuple[str, dict[str, int]]:
    """Copy the store to ``destination`` and point its artifact locations there; returns (tracking URI, changes).

    Only the copy's database is modified (``placeholder`` -> ``destination.as_uri()`` in every text value).
    """
    shutil.copytree(source, destination)
    new_root = destination.resolve().as_uri()
    changed = _fixture_script().replace_in_db(destination / STORE["tracking_db"], PLACEHOLDER, new_root)
    return f"sqlite:///{destination / STORE['tracking_db']}", changed


def _snapshot(folder: Path) -> dict[str, tuple[str, int, int]]:
    return {
        p.relative_to(folder).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns, p.stat().st_size)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module", autouse=True)
def repo_fixtures_untouched():
    """The repository copy is read only: same files, bytes and mtimes after every test of this module."""
    before = _snapshot(FIXTURES)
    yield before
    assert _snapshot(FIXTURES) == before, "a test wrote into mlruns_fixtures/"


def _schema_revision(db: Path) -> str:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute("SELECT version_num FROM alembic_version").fetchone()[0]
    finally:
        con.close()


def _installed_head_revision() -> str:
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()


def mlflow_db_upgrade(db: Path) -> None:
    """What a user runs after upgrading MLflow: ``mlflow db upgrade sqlite:///<db>`` (here via the interpreter)."""
    done = subprocess.run([sys.executable, "-m", "mlflow", "db", "upgrade", f"sqlite:///{db}"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _schema_revision(db) == _installed_head_revision()


@pytest.fixture(scope="module")
def upgraded_store(tmp_path_factory) -> Path:
    """A copy of the committed store migrated to the installed MLflow's schema (once per module)."""
    copy = tmp_path_factory.mktemp("mlruns-upgraded") / "store"
    shutil.copytree(FIXTURES, copy)
    mlflow_db_upgrade(copy / STORE["tracking_db"])
    return copy


@pytest.fixture
def relocated(tmp_path, upgraded_store):
    """The upgraded store copied to ``tmp_path/store`` and relocated; MLflow points at the copy for this test."""
    uri, changed = relocate_store(upgraded_store, tmp_path / "store")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return tmp_path / "store", changed  # the conftest fixture restores the URIs afterwards


@pytest.fixture(scope="module")
def expected_io():
    with np.load(FIXTURES / "expected_io.npz") as data:
        return {k: data[k] for k in data.files}


def test_committed_store_is_small_relocatable_and_complete():
    files = {p.relative_to(FIXTURES).as_posix(): p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file()}
    assert {"mlflow.db", "expected_io.npz", "store.json", "README.md", STORE["bundle"]} <= set(files)
    assert sum(files.values()) < 3 * 1024 * 1024
    assert files[STORE["bundle"]] < 2_000_000
    assert hashlib.sha256((FIXTURES / STORE["bundle"]).read_bytes()).hexdigest() == STORE["bundle_sha256"]
    assert set(STORE["rewritten_columns"]) == LOCATION_COLUMNS
    con = sqlite3.connect(f"file:{FIXTURES / 'mlflow.db'}?mode=ro", uri=True)  # read only
    try:
        for qualified in LOCATION_COLUMNS:
            table, column = qualified.split(".")
            values = [v for (v,) in con.execute(f'SELECT "{column}" FROM "{table}"') if v is not None]
            assert values and all(v.startswith(PLACEHOLDER) for v in values), (qualified, values)
    finally:
        con.close()
    # no machine-specific path anywhere in the committed files (only the placeholder)
    for name in files:
        data = (FIXTURES / name).read_bytes()
        assert b"file:///tmp" not in data and b"file:///work" not in data and b"file:///home" not in data, name


def test_relocation_rewrites_every_artifact_location(relocated):
    root, changed = relocated
    assert changed == STORE["rewritten_columns"]
    client = MlflowClient()
    root_uri = root.resolve().as_uri()
    assert client.get_experiment_by_name(STORE["experiment_name"]).artifact_location.startswith(root_uri)
    assert client.get_run(STORE["run_id"]).info.artifact_uri.startswith(root_uri)
    assert client.get_logged_model(STORE["model_id"]).artifact_location.startswith(root_uri)
    assert client.get_model_version_download_uri(STORE["registered_model"], "1").startswith(root_uri)
    assert int(client.get_model_version_by_alias(STORE["registered_model"], STORE["alias"]).version) == 1


@pytest.mark.parametrize("uri_kind", list(URIS))
def test_stored_model_loads_through_pyfunc_and_reproduces_expected_output(uri_kind, relocated, expected_io):
    model = mlflow.pyfunc.load_model(URIS[uri_kind], model_config={"device": "cpu"})
    assert model.metadata.run_id == STORE["run_id"]
    out = model.predict({"diffraction": expected_io["x"], "scale": expected_io["scale"]})
    assert out.dtype == np.complex64
    np.testing.assert_allclose(out, expected_io["output"], rtol=0, atol=RECORDED_ATOL)


@pytest.mark.parametrize("uri_kind", list(URIS))
def test_stored_model_loads_through_ptycho_torch_and_reproduces_expected_output(uri_kind, relocated, expected_io):
    native = mlflow.ptycho_torch.load_model(URIS[uri_kind], device="cpu")
    assert isinstance(native, PtychoTorchModel)
    assert (native.N, native.gridsize, native.network.config.n_filters_scale) == (64, 1, 1)
    got = native.predict(expected_io["x"], expected_io["scale"])
    np.testing.assert_allclose(got, expected_io["output"], rtol=0, atol=RECORDED_ATOL)
    # within one run the two loaders agree bit for bit
    pyfunc_out = mlflow.pyfunc.load_model(URIS[uri_kind], model_config={"device": "cpu"}).predict(
        {"diffraction": expected_io["x"], "scale": expected_io["scale"]}
    )
    np.testing.assert_array_equal(pyfunc_out, got)


def test_stored_bundle_loads_standalone(expected_io, tmp_path):
    """The bundle file inside the stored artifacts needs no MLflow at all (read in place, never written)."""
    import torch

    network, params = load_torch_bundle(FIXTURES / STORE["bundle"], device="cpu")
    assert params["N"] == 64 and params["gridsize"] == 1
    factors = torch.from_numpy(expected_io["scale"].reshape(-1, 1, 1, 1))
    with torch.inference_mode():
        out = network(torch.from_numpy(expected_io["x"]), factors).numpy()
    np.testing.assert_allclose(out, expected_io["output"], rtol=0, atol=RECORDED_ATOL)


def test_recorded_outputs_are_not_trivially_within_tolerance(expected_io):
    """The tolerance can fail: a 1% change of the input factor moves the outputs 20x beyond it."""
    import torch

    network, _ = load_torch_bundle(FIXTURES / STORE["bundle"], device="cpu")
    factors = torch.from_numpy(1.01 * expected_io["scale"].reshape(-1, 1, 1, 1))
    with torch.inference_mode():
        out = network(torch.from_numpy(expected_io["x"]), factors).numpy()
    assert np.abs(out - expected_io["output"]).max() > 10 * RECORDED_ATOL  # measured: 1.05e-3


def test_store_from_an_older_mlflow_is_upgraded_the_way_a_user_would(tmp_path, expected_io):
    """A copy one migration behind the installed MLflow, upgraded with ``mlflow db upgrade``, loads and predicts.

    (Opening an old store without the upgrade is refused by MLflow with "run 'mlflow db upgrade'" when a migration
    changed columns; when a whole table is missing MLflow migrates on open instead. The upgrade is what the
    store's README tells users to run either way.)
    """
    from alembic import command
    from mlflow.store.db.utils import _get_alembic_config

    copy = tmp_path / "old"
    shutil.copytree(FIXTURES, copy)
    db = copy / STORE["tracking_db"]
    if _schema_revision(db) != _installed_head_revision():  # installed MLflow is newer than the writer
        mlflow_db_upgrade(db)
    command.downgrade(_get_alembic_config(f"sqlite:///{db}"), "-1")  # as written by the previous MLflow release
    assert _schema_revision(db) != _installed_head_revision()
    uri, _ = relocate_store(copy, tmp_path / "store")
    mlflow_db_upgrade(tmp_path / "store" / STORE["tracking_db"])
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    model = mlflow.pyfunc.load_model(URIS["alias"], model_config={"device": "cpu"})
    assert model.metadata.run_id == STORE["run_id"]
    out = model.predict({"diffraction": expected_io["x"], "scale": expected_io["scale"]})
    np.testing.assert_allclose(out, expected_io["output"], rtol=0, atol=RECORDED_ATOL)


def test_repository_store_was_not_written(repo_fixtures_untouched):
    """Runs last in this module: the checks above left ``mlruns_fixtures/`` as committed."""
    assert _snapshot(FIXTURES) == repo_fixtures_untouched
