"""Shared fixtures of the bundle/network tests.

* every test starts from upstream's legacy ``DEFAULT_CFG`` (CONFIG-001 state is process-global) and a fixed seed;
* ``upstream_dir``: the bundles written by upstream PtychoPINN (``tests/data/upstream``);
* ``perturbed_network(**config)``: a network whose every parameter and batch-norm buffer holds non-trivial seeded
  random values, so that every key the forward uses changes the output (a freshly initialised network has
  all-ones/zeros BN statistics, unit ``forward_model`` scalars and near-input-independent outputs);
* ``rewrite_bundle``: copy a zip archive while replacing, adding or removing members (for corruption tests);
* the files holding ``slow`` tests are collected first, so that on the two xdist workers (``setup.cfg``) their long
  runs overlap the many short tests instead of ending the suite alone.
"""

from __future__ import annotations

import hashlib
import math
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from mlflow_ptycho_flavor.bundle import params as params_module
from mlflow_ptycho_flavor.network import NetworkConfig, PtychoPINNNetwork

UPSTREAM_DIR = Path(__file__).resolve().parent / "data" / "upstream"


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    """Files with a ``slow`` test first (stable: each file keeps its order; ``--dist loadfile`` hands out files in
    collection order)."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: item.path not in slow_files)


@pytest.fixture(autouse=True)
def _fresh_global_config():
    """Reset the legacy global config before (and after) every test and seed torch."""
    params_module.reset_cfg()
    torch.manual_seed(0)
    yield
    params_module.reset_cfg()


@pytest.fixture(scope="session")
def upstream_dir() -> Path:
    """Folder holding one sub-folder per upstream-written bundle (``wts.h5.zip``, ``io.npz``, ``meta.json``)."""
    return UPSTREAM_DIR


def _perturb_(network: PtychoPINNNetwork, seed: int) -> None:
    """Overwrite every state_dict entry with seeded, forward-relevant values (in place, state_dict order)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in network.state_dict().items():
            if tensor.numel() == 0:  # N=256, s=1: zero-width CBAM gate
                continue
            if not tensor.is_floating_point():  # num_batches_tracked: unused at eval, but must round-trip
                tensor.fill_(int(torch.randint(1, 10_000, (), generator=gen)))
                continue
            noise = torch.randn(tensor.shape, generator=gen, dtype=tensor.dtype)
            if key.endswith("running_var"):
                tensor.mul_(torch.exp(0.3 * noise))  # stays positive
            elif tensor.dim() >= 3:  # conv weights: He variance so the deep ReLU stack keeps the input's imprint
                tensor.mul_(math.sqrt(6.0))
                tensor.add_(0.2 * tensor.std() * noise)
            elif key.endswith("ChannelGate.mlp.1.weight"):  # non-negative: hidden ReLU units never dead
                tensor.copy_((tensor + 0.2 * tensor.std() * noise).abs())
            elif tensor.numel() > 1 and float(tensor.std()) > 0:
                tensor.add_((0.2 if tensor.dim() == 2 else 0.5) * tensor.std() * noise)
            else:  # constants and scalars: BN weight/bias/running_mean, forward_model.*
                tensor.add_(0.2 * noise)


def make_perturbed_network(seed: int = 0, **config) -> PtychoPINNNetwork:
    """Same ``seed`` and config -> bit-identical weights (the default init is seeded too, without touching the
    global RNG); configs with the same state_dict layout get the same weights for the same seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = PtychoPINNNetwork(NetworkConfig(**config))
    _perturb_(network, seed)
    return network.eval()


@pytest.fixture(scope="session")
def perturbed_network():
    """Factory ``perturbed_network(seed=0, **NetworkConfig fields) -> PtychoPINNNetwork`` (eval mode)."""
    return make_perturbed_network


def _rewrite_bundle(src, dst, *, replace=None, remove=(), manifest=None, hashes="keep",
                    compression=zipfile.ZIP_STORED):
    """Copy the zip ``src`` to ``dst`` with members replaced/added (``replace``) or dropped (``remove``).

    ``manifest``: the new ``manifest.dill`` as raw bytes or as an object to pickle (default: the old one; a
    ``manifest.dill`` given in ``replace`` is written as is). ``hashes``: what to do with
    the manifest's ``sha256`` table: ``"keep"`` it as is, ``"drop"`` it, or ``"recompute"`` it for the new members.
    Members are stored uncompressed unless ``compression`` says otherwise. Returns ``Path(dst)``.
    """
    replace = dict(replace or {})
    with zipfile.ZipFile(src) as zin:
        members = {name: zin.read(name) for name in zin.namelist()}
    for name in remove:
        members.pop(name)
    members.update(replace)
    decoded = None
    if isinstance(manifest, (bytes, bytearray)):
        members["manifest.dill"] = bytes(manifest)
    elif isinstance(manifest, dict):
        decoded = dict(manifest)
    elif manifest is not None:  # deliberately malformed manifests (a list, a string, ...)
        members["manifest.dill"] = pickle.dumps(manifest, protocol=4)
    elif "manifest.dill" in members and "manifest.dill" not in replace:
        decoded = pickle.loads(members["manifest.dill"])  # our own test archives: trusted
    if isinstance(decoded, dict):
        if hashes == "drop":
            decoded.pop("sha256", None)
        elif hashes == "recompute" and "sha256" in decoded:
            decoded["sha256"] = {
                n: hashlib.sha256(d).hexdigest() for n, d in members.items() if n != "manifest.dill"
            }
        members["manifest.dill"] = pickle.dumps(decoded, protocol=4)
    dst = Path(dst)
    with zipfile.ZipFile(dst, "w", compression=compression) as zout:
        for name, data in members.items():
            zout.writestr(name, data)
    return dst


@pytest.fixture(scope="session")
def rewrite_bundle():
    """Factory ``rewrite_bundle(src, dst, *, replace=None, remove=(), manifest=None, hashes='keep') -> Path``."""
    return _rewrite_bundle


# ----------------------------------------------------------------------------------------------------------------
# MLflow tracking/registry isolation (appended by the flavor-tests engineer)
# ----------------------------------------------------------------------------------------------------------------
# Every test of a module that uses MLflow gets its own sqlite tracking + registry store under ``tmp_path`` and an
# experiment whose artifact location is ``tmp_path/artifacts``: with a sqlite tracking URI, MLflow's default
# artifact root is ``./mlruns`` relative to the working directory, which would write into the repository. Modules
# that never touch MLflow (bundle, network, data tests) pay nothing and never import it.

from dataclasses import dataclass as _dataclass
from types import ModuleType as _ModuleType

REPO_ROOT = Path(__file__).resolve().parent.parent


@_dataclass(frozen=True)
class MlflowTestStore:
    """What the autouse fixture set up: request ``mlflow_store`` in a test to read it."""

    root: Path
    tracking_uri: str
    artifact_root: Path
    experiment_id: str


def _module_uses_mlflow(module) -> bool:
    """True when a test module's globals hold MLflow itself or anything defined in the ``mlflow`` package."""
    for value in vars(module).values():
        name = value.__name__ if isinstance(value, _ModuleType) else getattr(value, "__module__", None)
        if isinstance(name, str) and (name == "mlflow" or name.startswith("mlflow.")):
            return True
    return False


@pytest.fixture(scope="session")
def _mlflow_template_db(tmp_path_factory) -> Path:
    """An empty, fully migrated sqlite store, created once: copying it is ~20x faster than migrating per test."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    root = tmp_path_factory.mktemp("mlflow-template")
    db = root / "mlflow.db"
    store = SqlAlchemyStore(f"sqlite:///{db}", (root / "default-artifacts").as_uri())
    store.engine.dispose()
    return db


def _mlruns_candidates() -> set[Path]:
    return {Path.cwd() / "mlruns", REPO_ROOT / "mlruns", REPO_ROOT / "mlartifacts", REPO_ROOT / "mlflow.db"}


@pytest.fixture(autouse=True)
def mlflow_store(request, tmp_path, monkeypatch):
    """Point MLflow at ``sqlite:///<tmp_path>/mlflow.db`` with artifacts in ``tmp_path/artifacts`` (no chdir).

    Only for test modules that use MLflow (see :func:`_module_uses_mlflow`); yields a :class:`MlflowTestStore`
    (or None for other modules). Afterwards: ends any active run, restores the previous URIs/experiment, and
    fails the test if a ``./mlruns`` (or ``mlflow.db`` in the repository) appeared.
    """
    if request.module is None or not _module_uses_mlflow(request.module):
        yield None
        return
    import shutil

    import mlflow
    import mlflow.tracking.fluent as fluent

    before = {p for p in _mlruns_candidates() if p.exists()}
    template = request.getfixturevalue("_mlflow_template_db")
    db = tmp_path / "mlflow.db"
    shutil.copyfile(template, db)
    uri = f"sqlite:///{db}"
    artifact_root = tmp_path / "artifacts"
    # Environment first, so monkeypatch restores it (set_tracking_uri & co. also export these variables).
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(fluent, "_active_experiment_id", None)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment_id = mlflow.create_experiment("tests", artifact_location=artifact_root.as_uri())
    mlflow.set_experiment(experiment_id=experiment_id)
    try:
        yield MlflowTestStore(tmp_path, uri, artifact_root, experiment_id)
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri(None)  # back to "unset"; monkeypatch then restores the environment
        mlflow.set_registry_uri(None)
    created = {p for p in _mlruns_candidates() if p.exists()} - before
    assert not created, f"MLflow wrote outside tmp_path: {sorted(map(str, created))}"
