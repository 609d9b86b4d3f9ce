"""Interrupted saves never leave a partial ``wts.h5.zip`` (GitHub issue 7, part 3).

``save_torch_bundle`` writes a hidden temp file in the target folder and renames it into place, so at every
instant the target is either the previous bundle, intact, or absent (first save) - never a partial archive:

(a) an exception injected at every ``ZipFile.writestr`` call, at ``os.fsync`` and at ``os.replace``: old bundle
    intact (same sha256) or no file, and the temp file removed;
(b) a child process killed with SIGKILL in the middle of the write and just before the rename: the target still
    loads with its old hash (or is absent). A stale hidden ``.wts.h5.zip.<random>.tmp`` may remain after SIGKILL -
    nothing can clean up after an uncatchable kill. It is never named ``wts.h5.zip``, is never read by the loader,
    and can be deleted at any time;
(c) ``mlflow_ptycho_flavor.flavor.save_model``: an existing non-empty directory is refused with
    ``RESOURCE_ALREADY_EXISTS`` and left untouched; a failure half-way leaves neither the target nor the staging
    directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

from mlflow_ptycho_flavor import load_torch_bundle, read_bundle, save_torch_bundle
from mlflow_ptycho_flavor.errors import BundleError

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
N_MEMBERS = 6  # manifest, 2 x (model.pth, params.dill), torch_scaling_metadata.pt
STALE_TEMP = re.compile(r"^\.wts\.h5\.zip\.[^/]+\.tmp$")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def networks():
    from conftest import make_perturbed_network

    return make_perturbed_network(seed=1, N=64, n_filters_scale=1), make_perturbed_network(seed=2, N=64,
                                                                                           n_filters_scale=1)


class _Boom(RuntimeError):
    pass


def _raise_on_call(monkeypatch, owner, name, k, exc=_Boom):
    original = getattr(owner, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == k:
            raise exc(f"injected failure in {name} call {k}")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


# ------------------------------------------------------------------------------------------------------------
# (a) exceptions injected mid-write
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("existing", [True, False], ids=["old-bundle", "first-save"])
@pytest.mark.parametrize("k", range(1, N_MEMBERS + 1))
def test_exception_at_kth_member(networks, tmp_path, monkeypatch, existing, k):
    old_net, new_net = networks
    target = tmp_path / "wts.h5.zip"
    if existing:
        save_torch_bundle(old_net, target)
        old_hash = _sha(target)
    calls = _raise_on_call(monkeypatch, zipfile.ZipFile, "writestr", k)
    with pytest.raises(_Boom, match=rf"injected failure in writestr call {k}"):
        save_torch_bundle(new_net, target)
    assert calls["n"] == k
    if existing:
        assert _listing(tmp_path) == ["wts.h5.zip"]  # no temp file left behind
        assert _sha(target) == old_hash
        monkeypatch.undo()
        assert read_bundle(target).hashes_verified
    else:
        assert _listing(tmp_path) == []


@pytest.mark.parametrize("where", ["fsync", "replace", "keyboard-interrupt"])
def test_exception_at_fsync_or_rename(networks, tmp_path, monkeypatch, where):
    old_net, new_net = networks
    target = tmp_path / "wts.h5.zip"
    save_torch_bundle(old_net, target)
    old_hash = _sha(target)
    if where == "fsync":
        _raise_on_call(monkeypatch, os, "fsync", 1)
        expected = _Boom
    elif where == "replace":
        _raise_on_call(monkeypatch, os, "replace", 1, exc=OSError)
        expected = OSError
    else:  # BaseException half-way through the members: cleaned up as well
        _raise_on_call(monkeypatch, zipfile.ZipFile, "writestr", 3, exc=KeyboardInterrupt)
        expected = KeyboardInterrupt
    with pytest.raises(expected, match=r"injected failure in (fsync|replace|writestr) call"):
        save_torch_bundle(new_net, target)
    monkeypatch.undo()
    assert _listing(tmp_path) == ["wts.h5.zip"]
    assert _sha(target) == old_hash


def test_successful_overwrite_replaces_atomically(networks, tmp_path):
    """Control: without injected failures the new bundle replaces the old one and no temp file remains."""
    old_net, new_net = networks
    target = tmp_path / "wts.h5.zip"
    save_torch_bundle(old_net, target)
    old_hash = _sha(target)
    save_torch_bundle(new_net, target)
    assert _sha(target) != old_hash and _listing(tmp_path) == ["wts.h5.zip"]
    network, _ = load_torch_bundle(target, device="cpu")
    for key, value in new_net.state_dict().items():
        assert (network.state_dict()[key] == value).all()


# ------------------------------------------------------------------------------------------------------------
# (b) SIGKILL during the save
# ------------------------------------------------------------------------------------------------------------
_CHILD = textwrap.dedent(
    """
    import json, os, sys, time, zipfile
    from pathlib import Path
    import torch
    torch.set_num_threads(1)  # no thread pool: safe to fork below
    from mlflow_ptycho_flavor import save_torch_bundle
    from mlflow_ptycho_flavor.network import NetworkConfig, PtychoPINNNetwork

    network = PtychoPINNNetwork(NetworkConfig(N=64, n_filters_scale=1)).eval()
    original_writestr, original_replace = zipfile.ZipFile.writestr, os.replace

    def run(target, ready, mode, k):
        def stall():
            Path(ready).write_text(str(os.getpid()))
            time.sleep(300)

        calls = [0]

        def writestr(self, *args, **kwargs):
            calls[0] += 1
            result = original_writestr(self, *args, **kwargs)
            if mode == "writestr" and calls[0] == k:
                self.fp.flush()  # the partial archive really is on disk when the kill comes
                stall()
            return result

        def replace(src, dst):
            if mode == "replace":
                stall()
            return original_replace(src, dst)

        zipfile.ZipFile.writestr, os.replace = writestr, replace
        save_torch_bundle(network, target)

    pids = []
    for scenario in json.loads(sys.argv[1]):  # one forked process per scenario: the imports are paid once
        pid = os.fork()
        if pid == 0:
            try:
                run(*scenario)
            finally:
                os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL") or not hasattr(os, "fork"), reason="needs SIGKILL and fork")
def test_sigkill_during_save(networks, tmp_path):
    """Processes killed mid-member and just before the rename, with and without a previous bundle."""
    old_net, _ = networks
    scenarios = {
        "mid-members-old": ("writestr", 3, True),
        "before-rename-old": ("replace", 0, True),
        "mid-members-first": ("writestr", 2, False),
    }
    cases, args = {}, []
    for name, (mode, k, existing) in scenarios.items():
        folder = tmp_path / name
        folder.mkdir()
        target = folder / "wts.h5.zip"
        old_hash = None
        if existing:
            save_torch_bundle(old_net, target)
            old_hash = _sha(target)
        ready = tmp_path / f"{name}.ready"
        cases[name] = (ready, target, old_hash)
        args.append((str(target), str(ready), mode, k))
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    child = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(args)], env=env, cwd=str(tmp_path),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        for name, (ready, _, _) in cases.items():
            while not ready.exists() or not ready.read_text():
                if child.poll() is not None:
                    pytest.fail(f"{name}: the child exited early: {child.stdout.read().decode()[-2000:]}")
                if time.monotonic() > deadline:
                    pytest.fail(f"{name}: the save never reached its stall point")
                time.sleep(0.05)
        for ready, _, _ in cases.values():
            os.kill(int(ready.read_text()), signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            for ready, _, _ in cases.values():
                if ready.exists() and ready.read_text():
                    try:
                        os.kill(int(ready.read_text()), signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            child.kill()
            child.wait()
        child.stdout.close()

    for name, (_, target, old_hash) in cases.items():
        names = _listing(target.parent)
        stale = [n for n in names if n != "wts.h5.zip"]
        # What SIGKILL can leave: the hidden temp file, never under the bundle's name.
        assert all(STALE_TEMP.match(n) for n in stale), f"{name}: unexpected files {stale}"
        assert len(stale) == 1, f"{name}: the save was killed mid-write, so its temp file must still be there"
        if old_hash is None:
            assert "wts.h5.zip" not in names, f"{name}: a partial bundle appeared under the target name"
        else:
            assert _sha(target) == old_hash, f"{name}: the old bundle changed"
            network, _ = load_torch_bundle(target, device="cpu")
            assert network.config.N == 64
        temp = target.parent / stale[0]
        if name.startswith("mid-members"):  # a partial archive: the loader refuses it with a typed error
            # killed after the stored weights were written, the file ends in the torch file's own directory
            with pytest.raises(BundleError, match=r"is not a zip archive|is cut short or damaged"):
                read_bundle(temp)
        else:  # killed just before the rename: the temp file is complete (and would load)
            assert read_bundle(temp).network_config.N == 64
        temp.unlink()  # documented: stale .wts.h5.zip.*.tmp files can be deleted at any time
        save_torch_bundle(old_net, target)  # and the next save just works
        assert _listing(target.parent) == ["wts.h5.zip"]


# ------------------------------------------------------------------------------------------------------------
# (c) the MLflow flavor's save_model
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def flavor():
    pytest.importorskip("mlflow")
    from mlflow_ptycho_flavor import flavor as flavor_module

    return flavor_module


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def test_save_model_refuses_existing_non_empty_directory(flavor, networks, tmp_path):
    from mlflow.exceptions import MlflowException

    target = tmp_path / "model"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    save_torch_bundle(networks[0], target / "wts.h5.zip")
    before = _tree(tmp_path)
    with pytest.raises(MlflowException, match=r"already exists and is not empty; choose a new directory") as info:
        flavor.save_model(networks[1], target)
    assert info.value.error_code == "RESOURCE_ALREADY_EXISTS"
    assert _tree(tmp_path) == before  # nothing lost, nothing added (no staging directory either)




@pytest.mark.parametrize(
    "where, target_exists",
    [
        ("environment-files", False), ("bundle-write", False), ("final-rename", False),
        ("environment-files", True), ("bundle-write", True),
        ("final-rename", True),
    ],
    ids=["new-dir-env", "new-dir-bundle", "new-dir-rename", "empty-dir-env", "empty-dir-bundle", "empty-dir-rename"],
)
def test_save_model_failure_midway_leaves_nothing(flavor, networks, tmp_path, monkeypatch, where, target_exists):
    from mlflow_ptycho_flavor.flavor import env as _mlflow_env

    target = tmp_path / "model"
    if target_exists:
        target.mkdir()
    before = _listing(tmp_path)
    if where == "environment-files":
        _raise_on_call(monkeypatch, _mlflow_env, "write_environment_files", 1)
    elif where == "bundle-write":
        _raise_on_call(monkeypatch, flavor, "save_torch_bundle", 1)
    else:
        _raise_on_call(monkeypatch, os, "rename", 1)
    with pytest.raises(_Boom, match=r"injected failure in (write_environment_files|save_torch_bundle|rename)"):
        flavor.save_model(networks[0], target)
    monkeypatch.undo()
    assert _listing(tmp_path) == before, "a staging directory or a partial model directory was left behind"
    if target_exists:
        assert list(target.iterdir()) == []
    # and a retry succeeds
    flavor.save_model(networks[0], target)
    assert (target / "wts.h5.zip").is_file() and (target / "MLmodel").is_file()
    assert _listing(tmp_path) == ["model"]
