"""Tests of ``mlflow_ptycho_flavor.sim.dataset``: NPZ schema I/O, the simulator's forward model, normalization."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from mlflow_ptycho_flavor.sim.dataset import (
    PtychoDataset,
    load_npz,
    normalization_factor,
    save_npz,
    train_test_split,
)
from mlflow_ptycho_flavor.sim.physics import predict_amplitudes
from mlflow_ptycho_flavor.sim.simulate import simulate_dataset
from mlflow_ptycho_flavor.errors import DatasetError

SMALL = dict(N=32, n_scan=(5, 6), nphotons=1e5)


@pytest.fixture(scope="module")
def small_ds() -> PtychoDataset:
    return simulate_dataset(**SMALL, seed=3)


def _array_fields(ds: PtychoDataset) -> dict[str, np.ndarray]:
    return {
        "diff3d": ds.diff3d, "xcoords": ds.xcoords, "ycoords": ds.ycoords, "probeGuess": ds.probeGuess,
        "objectGuess": ds.objectGuess, "scan_index": ds.scan_index,
        "ground_truth_patches": ds.ground_truth_patches,
    }


# ------------------------------------------------------------------------------------------------ round trip


def test_roundtrip_is_exact_and_keeps_documented_dtypes(small_ds: PtychoDataset, tmp_path: Path) -> None:
    path = tmp_path / "scan.npz"
    save_npz(small_ds, path)
    back = load_npz(path)
    for name, arr in _array_fields(small_ds).items():
        got = getattr(back, name)
        assert got.dtype == arr.dtype, name
        np.testing.assert_array_equal(got, arr, err_msg=name)
    assert back.photon_scale == small_ds.photon_scale
    assert back.diff3d.dtype == np.float32
    assert back.xcoords.dtype == back.ycoords.dtype == np.float64
    assert back.probeGuess.dtype == back.objectGuess.dtype == back.ground_truth_patches.dtype == np.complex64
    assert back.scan_index.dtype == np.int64
    # Upstream schema: the plain keys are there, ground truth under `Y`, positions duplicated as *_start.
    with np.load(path, allow_pickle=False) as npz:
        assert {"diff3d", "xcoords", "ycoords", "probeGuess", "objectGuess", "scan_index", "Y",
                "xcoords_start", "ycoords_start"} <= set(npz.files)
    assert [p.name for p in tmp_path.iterdir()] == ["scan.npz"]


def test_load_accepts_float64_amplitudes_and_optional_keys_absent(small_ds: PtychoDataset, tmp_path: Path) -> None:
    path = tmp_path / "minimal.npz"
    np.savez(path, diff3d=small_ds.diff3d.astype(np.float64), xcoords=small_ds.xcoords,
             ycoords=small_ds.ycoords, probeGuess=small_ds.probeGuess)
    ds = load_npz(path)
    assert ds.diff3d.dtype == np.float32
    np.testing.assert_array_equal(ds.diff3d, small_ds.diff3d)
    assert ds.objectGuess is None and ds.ground_truth_patches is None and ds.photon_scale is None
    np.testing.assert_array_equal(ds.scan_index, np.zeros(small_ds.n_patterns, dtype=np.int64))
    assert (ds.N, ds.n_patterns) == (32, 30)


def test_load_reads_newer_diffraction_key(small_ds: PtychoDataset, tmp_path: Path) -> None:
    path = tmp_path / "new_schema.npz"
    np.savez(path, diffraction=small_ds.diff3d, xcoords=small_ds.xcoords, ycoords=small_ds.ycoords,
             probeGuess=small_ds.probeGuess, Y=small_ds.ground_truth_patches)
    ds = load_npz(path)
    np.testing.assert_array_equal(ds.diff3d, small_ds.diff3d)
    np.testing.assert_array_equal(ds.ground_truth_patches, small_ds.ground_truth_patches)


# ------------------------------------------------------------------------------------------------ simulator


def test_simulator_is_reproducible_per_seed() -> None:
    a = simulate_dataset(**SMALL, seed=7)
    b = simulate_dataset(**SMALL, seed=7)
    c = simulate_dataset(**SMALL, seed=8)
    for name, arr in _array_fields(a).items():
        np.testing.assert_array_equal(getattr(b, name), arr, err_msg=name)
    assert a.photon_scale == b.photon_scale
    assert not np.array_equal(a.diff3d, c.diff3d)
    assert not np.array_equal(a.objectGuess, c.objectGuess)
    assert not np.array_equal(a.xcoords, c.xcoords)


def test_default_simulation_is_small_and_fast() -> None:
    import time

    t0 = time.perf_counter()
    ds = simulate_dataset()
    elapsed = time.perf_counter() - t0
    assert ds.N == 64 and 100 <= ds.n_patterns <= 1000
    assert elapsed < 2.0  # well under a second on a laptop; generous for loaded CI machines


def test_forward_model_matches_noise_free_diff3d() -> None:
    ds = simulate_dataset(**SMALL, poisson=False, seed=1)
    pred = predict_amplitudes(ds, ds.ground_truth_patches)
    assert pred.dtype == np.float64 and pred.shape == ds.diff3d.shape
    np.testing.assert_allclose(ds.diff3d, pred, rtol=1e-6, atol=1e-6 * float(pred.max()))
    # The documented formula written out independently (fftshift on the pattern axes only, 1/N norm).
    n = ds.N
    far = np.fft.fftshift(np.fft.fft2(ds.probeGuess.astype(np.complex128) * ds.ground_truth_patches,
                                      axes=(-2, -1)), axes=(-2, -1)) / n
    np.testing.assert_allclose(ds.diff3d, ds.photon_scale * np.abs(far), rtol=1e-5,
                               atol=1e-6 * float(pred.max()))
    # Zero frequency at the centre pixel: the brightest pixel of a smooth exit wave's spectrum.
    mean_pattern = ds.diff3d.mean(axis=0)
    assert np.unravel_index(np.argmax(mean_pattern), mean_pattern.shape) == (n // 2, n // 2)
    # A bare probe with an explicit scale gives the same thing.
    np.testing.assert_allclose(predict_amplitudes(ds.probeGuess, ds.ground_truth_patches[:3], ds.photon_scale),
                               pred[:3], rtol=1e-12)
    counts = ds.diff3d.astype(np.float64) ** 2
    np.testing.assert_allclose(counts.sum(axis=(1, 2)).mean(), SMALL["nphotons"], rtol=1e-4)


@pytest.mark.parametrize("probe", ["aperture", "gaussian"])
def test_poisson_counts_have_the_requested_mean(probe: str) -> None:
    ds = simulate_dataset(**SMALL, probe=probe, seed=2)
    counts = ds.diff3d.astype(np.float64) ** 2
    assert counts.sum(axis=(1, 2)).mean() == pytest.approx(SMALL["nphotons"], rel=0.03)
    # Poisson draws are integers (up to the float32 rounding of sqrt), unlike the noise-free amplitudes.
    assert np.abs(counts - np.rint(counts)).max() < 0.05
    noise_free = predict_amplitudes(ds, ds.ground_truth_patches)
    assert not np.allclose(ds.diff3d, noise_free, rtol=1e-3)


def test_probe_kinds_differ_and_are_centred() -> None:
    a = simulate_dataset(**SMALL, probe="aperture", poisson=False)
    g = simulate_dataset(**SMALL, probe="gaussian", poisson=False)
    assert not np.allclose(a.probeGuess, g.probeGuess)
    for ds in (a, g):
        amp = np.abs(ds.probeGuess)
        assert amp.max() == pytest.approx(1.0, rel=1e-6)
        assert amp[16, 16] == pytest.approx(1.0, rel=1e-3)
        assert amp[0, 0] < 1e-3  # corners dark: the probe fits inside the patch
        assert np.ptp(np.angle(ds.probeGuess[amp > 0.5])) > 0.1  # quadratic phase present
    with pytest.raises(ValueError, match="`probe` must be 'aperture' or 'gaussian'"):
        simulate_dataset(**SMALL, probe="square")  # type: ignore[arg-type]


def test_scan_overlaps_and_every_crop_lies_inside_the_object(small_ds: PtychoDataset) -> None:
    ds, n = small_ds, small_ds.N
    pos = ds.offsets
    assert pos.shape == (ds.n_patterns, 2)
    np.testing.assert_array_equal(pos[:, 0], ds.xcoords)
    # Nearest-neighbour distance well below N: neighbouring patterns overlap.
    d = np.hypot(*(pos[:, None, :] - pos[None, :, :]).transpose(2, 0, 1))
    np.fill_diagonal(d, np.inf)
    assert d.min(axis=1).max() < n / 2
    # Jittered: positions are not on the integer grid (exact floats are stored).
    assert np.abs(ds.xcoords - np.rint(ds.xcoords)).max() > 0.05
    h, w = ds.objectGuess.shape
    for k in range(ds.n_patterns):
        top = int(np.rint(ds.ycoords[k])) - n // 2
        left = int(np.rint(ds.xcoords[k])) - n // 2
        assert 0 <= top and top + n <= h and 0 <= left and left + n <= w
        np.testing.assert_array_equal(ds.ground_truth_patches[k], ds.objectGuess[top:top + n, left:left + n])


def test_object_ranges(small_ds: PtychoDataset) -> None:
    amp, phase = np.abs(small_ds.objectGuess), np.angle(small_ds.objectGuess)
    assert amp.min() >= 0.3 - 1e-5 and amp.max() <= 1.0 + 1e-5
    assert phase.min() >= -1.0 - 1e-5 and phase.max() <= 1.0 + 1e-5
    assert amp.std() > 0.05 and phase.std() > 0.1


def test_simulator_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="`object_size`.*too small"):
        simulate_dataset(**SMALL, object_size=40)
    with pytest.raises(ValueError, match="`step` must be in"):
        simulate_dataset(**SMALL, step=32)
    with pytest.raises(ValueError, match="`n_scan`"):
        simulate_dataset(N=32, n_scan=0)
    ds = simulate_dataset(N=32, n_scan=7, object_size=(120, 130))
    assert ds.n_patterns == 7 and ds.objectGuess.shape == (120, 130)


# ------------------------------------------------------------------------------------------------ normalization


def test_normalization_factor_gives_upstream_energy(small_ds: PtychoDataset) -> None:
    f = normalization_factor(small_ds.diff3d)
    assert isinstance(f, float)
    scaled = f * small_ds.diff3d.astype(np.float64)
    energy = (scaled**2).sum(axis=(1, 2)).mean()
    assert energy == pytest.approx((small_ds.N / 2) ** 2, rel=1e-9)
    assert normalization_factor(np.zeros((3, 8, 8), np.float32)) == 1.0
    # Not the memory-mapped loader's sqrt(N^2/...) convention, which is twice as large.
    e = float((small_ds.diff3d.astype(np.float64) ** 2).sum(axis=(1, 2)).mean())
    assert f == pytest.approx(np.sqrt(small_ds.N**2 / e) / 2, rel=1e-12)
    with pytest.raises(DatasetError, match="non-finite"):
        normalization_factor(np.full((2, 4, 4), np.nan, np.float32))


# ------------------------------------------------------------------------------------------------ split


def test_train_test_split_is_deterministic_and_partitions(small_ds: PtychoDataset) -> None:
    tr, te = train_test_split(small_ds, 0.2, seed=5)
    assert (tr.n_patterns, te.n_patterns) == (24, 6)
    both = np.concatenate([tr.xcoords, te.xcoords])
    assert sorted(both.tolist()) == sorted(small_ds.xcoords.tolist())
    idx_te = [int(np.flatnonzero(small_ds.xcoords == x)[0]) for x in te.xcoords]
    np.testing.assert_array_equal(te.diff3d, small_ds.diff3d[idx_te])
    np.testing.assert_array_equal(te.ground_truth_patches, small_ds.ground_truth_patches[idx_te])
    assert idx_te == sorted(idx_te)
    tr2, te2 = train_test_split(small_ds, 0.2, seed=5)
    np.testing.assert_array_equal(te2.xcoords, te.xcoords)
    _, te3 = train_test_split(small_ds, 0.2, seed=6)
    assert not np.array_equal(te3.xcoords, te.xcoords)
    assert te.photon_scale == small_ds.photon_scale
    with pytest.raises(ValueError, match="`test_fraction` must be in"):
        train_test_split(small_ds, 1.0, seed=0)
    with pytest.raises(ValueError, match="leaves a part empty"):
        train_test_split(small_ds, 0.001, seed=0)


# ------------------------------------------------------------------------------------------------ bad NPZ files


def _valid_arrays(m: int = 4, n: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "diff3d": rng.uniform(0, 3, (m, n, n)).astype(np.float32),
        "xcoords": np.linspace(10, 20, m),
        "ycoords": np.linspace(5, 15, m),
        "probeGuess": np.ones((n, n), np.complex64),
    }


def _drop(key: str):
    return lambda a: {k: v for k, v in a.items() if k != key}


def _set(key: str, fn):
    return lambda a: {**a, key: fn(a[key])}


def _nan_at(v: np.ndarray) -> np.ndarray:
    v = v.copy()
    v.flat[1] = np.nan
    return v


def _inf_at(v: np.ndarray) -> np.ndarray:
    v = v.copy()
    v.flat[0] = np.inf
    return v


BAD_CASES = {
    "missing diff3d": (_drop("diff3d"), r"`diff3d`.*sqrt\(counts\)"),
    "missing xcoords": (_drop("xcoords"), r"lacks required key.*`xcoords`"),
    "missing ycoords": (_drop("ycoords"), r"lacks required key.*`ycoords`"),
    "missing probeGuess": (_drop("probeGuess"), r"lacks required key.*`probeGuess`"),
    "diff3d rank 2": (_set("diff3d", lambda v: v[0]), r"`diff3d` must have shape \(M, N, N\).*diff3d\[None\]"),
    "diff3d rank 4": (_set("diff3d", lambda v: v[..., None]), r"`diff3d` must have shape \(M, N, N\)"),
    "diff3d not square": (_set("diff3d", lambda v: v[:, :, :-1]), r"`diff3d` patterns must be square"),
    "xcoords too short": (_set("xcoords", lambda v: v[:-1]), r"`xcoords` must have shape \(M,\) = \(4,\)"),
    "ycoords 2-D": (_set("ycoords", lambda v: v[:, None]), r"`ycoords` must have shape \(M,\)"),
    "diff3d complex": (_set("diff3d", lambda v: v.astype(np.complex64)), r"`diff3d` is complex"),
    "diff3d integer counts": (_set("diff3d", lambda v: np.rint(v**2).astype(np.int32)),
                              r"`diff3d` has integer dtype.*np\.sqrt\(counts\)"),
    "diff3d bool": (_set("diff3d", lambda v: v > 1), r"`diff3d` has non-numeric dtype bool"),
    "diff3d NaN": (_set("diff3d", _nan_at), r"`diff3d` holds 1 non-finite"),
    "diff3d overflows float32": (_set("diff3d", lambda v: v.astype(np.float64) * 1e300),
                                 r"`diff3d` holds amplitudes up to .*beyond float32 range"),
    "xcoords inf": (_set("xcoords", _inf_at), r"`xcoords` holds 1 non-finite"),
    "ycoords NaN": (_set("ycoords", _nan_at), r"`ycoords` holds 1 non-finite"),
    "xcoords complex": (_set("xcoords", lambda v: v.astype(np.complex128)), r"`xcoords` is complex"),
    "diff3d negative": (_set("diff3d", lambda v: v - 1.0), r"`diff3d` holds negative amplitudes.*np\.clip"),
    "no patterns": (lambda a: {**a, "diff3d": a["diff3d"][:0], "xcoords": a["xcoords"][:0],
                               "ycoords": a["ycoords"][:0]}, r"`diff3d` holds no patterns \(M == 0"),
    "probe wrong size": (_set("probeGuess", lambda v: np.ones((6, 6), np.complex64)),
                         r"`probeGuess` must have shape \(8, 8\)"),
    "probe NaN": (_set("probeGuess", lambda v: _nan_at(v)), r"`probeGuess` holds 1 non-finite"),
    "scan_index float": (lambda a: {**a, "scan_index": np.zeros(4)}, r"`scan_index` must have an integer dtype"),
    "Y wrong shape": (lambda a: {**a, "Y": np.ones((4, 8, 8, 1), np.complex64)},
                      r"`ground_truth_patches` \(NPZ key `Y`\) must have shape \(4, 8, 8\)"),
    "objectGuess 3-D": (lambda a: {**a, "objectGuess": np.ones((2, 20, 20), np.complex64)},
                        r"`objectGuess` must have shape 2-D"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_npz_raises_dataset_error_naming_the_key(case: str, tmp_path: Path) -> None:
    mutate, pattern = BAD_CASES[case]
    path = tmp_path / "bad.npz"
    np.savez(path, **mutate(_valid_arrays()))
    with pytest.raises(DatasetError, match=pattern):
        load_npz(path)


def test_valid_arrays_fixture_loads(tmp_path: Path) -> None:
    # Guards the parametrized cases above: they fail because of their one mutation, not the base arrays.
    path = tmp_path / "ok.npz"
    np.savez(path, **_valid_arrays())
    assert load_npz(path).n_patterns == 4


def test_missing_file_and_non_npz_files(tmp_path: Path) -> None:
    assert issubclass(DatasetError, ValueError)
    with pytest.raises(DatasetError, match=r"does not exist"):
        load_npz(tmp_path / "nope.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"this is not a zip archive at all" * 10)
    with pytest.raises(DatasetError, match=r"not a readable NPZ archive"):
        load_npz(junk)
    npy = tmp_path / "single.npy"
    np.save(npy, np.zeros((2, 4, 4), np.float32))
    with pytest.raises(DatasetError, match=r"single \.npy array, not an NPZ"):
        load_npz(npy)
    truncated = tmp_path / "truncated.npz"
    np.savez(truncated, **_valid_arrays())
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(DatasetError, match=r"not a readable NPZ|corrupt"):
        load_npz(truncated)
    with pytest.raises(DatasetError, match=r"not a readable NPZ"):
        load_npz(tmp_path)  # a directory


class _Tripwire:
    """Unpickling this object creates ``marker``: proof that a loader ran pickle code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("key", ["xcoords", "diff3d"])
def test_pickled_object_array_is_refused_without_unpickling(key: str, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled.txt"
    arrays = _valid_arrays()
    arrays[key] = np.array([_Tripwire(marker)] * 4, dtype=object)
    path = tmp_path / "evil.npz"
    np.savez(path, **arrays)  # numpy pickles object arrays on save
    assert not marker.exists()
    with pytest.raises(DatasetError, match=rf"`{key}`.*pickled object array.*refused without unpickling"):
        load_npz(path)
    assert not marker.exists()


def test_direct_construction_validates_too() -> None:
    a = _valid_arrays()
    with pytest.raises(DatasetError, match=r"`xcoords` must have shape \(M,\) = \(4,\)"):
        PtychoDataset(diff3d=a["diff3d"], xcoords=a["xcoords"][:3], ycoords=a["ycoords"], probeGuess=a["probeGuess"])
    with pytest.raises(DatasetError, match=r"`photon_scale` must be finite and > 0"):
        PtychoDataset(**a, photon_scale=-1.0)


# ------------------------------------------------------------------------------------------------ atomic save


def _failing_savez(after_bytes: int = 100):
    """A stand-in for ``np.savez`` that writes part of an archive, then fails like a full disk."""

    def fake(file, *args, **kwargs):
        file.write(b"PK\x03\x04" + b"\0" * after_bytes)  # a partial archive reaches the temp file
        file.flush()
        raise OSError("disk full (simulated)")

    return fake


def test_save_npz_failure_leaves_no_file(small_ds: PtychoDataset, tmp_path: Path, monkeypatch) -> None:
    fake = _failing_savez()
    monkeypatch.setattr(np, "savez", fake)
    target = tmp_path / "out.npz"
    with pytest.raises(OSError, match="disk full"):
        save_npz(small_ds, target)
    assert list(tmp_path.iterdir()) == []


def test_save_npz_failure_keeps_existing_file(small_ds: PtychoDataset, tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "out.npz"
    save_npz(small_ds, target)
    before = target.read_bytes()
    other = simulate_dataset(**SMALL, seed=99)
    fake = _failing_savez(after_bytes=5000)
    monkeypatch.setattr(np, "savez", fake)
    with pytest.raises(OSError, match="disk full"):
        save_npz(other, target)
    assert [p.name for p in tmp_path.iterdir()] == ["out.npz"]
    assert target.read_bytes() == before
    monkeypatch.undo()
    np.testing.assert_array_equal(load_npz(target).diff3d, small_ds.diff3d)


def test_save_npz_overwrites_and_uses_normal_permissions(small_ds: PtychoDataset, tmp_path: Path) -> None:
    target = tmp_path / "out.npz"
    save_npz(simulate_dataset(**SMALL, seed=11), target)
    save_npz(small_ds, target)
    np.testing.assert_array_equal(load_npz(target).diff3d, small_ds.diff3d)
    if os.name == "posix":
        umask = os.umask(0)
        os.umask(umask)
        assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(TypeError, match="`dataset` must be a PtychoDataset"):
        save_npz({"diff3d": small_ds.diff3d}, target)  # type: ignore[arg-type]
