"""Data in ptychodus's conventions: integer counts, a (modes, N, N) probe, bad pixels, [x, y] / [y, x] positions and
the two normalization conventions, read into the package's amplitude dataset.

The ptychodus-format file is built the way ptychodus's NPZ export writes one (counts in ``diff3d``, the probe with
its modes axis, ``xcoords``/``ycoords`` in object-frame pixels, ``xcoords_start``...), plus a ``bad_pixels`` mask
whose pixels hold detector sentinel values; the "equivalent amplitude input" is the same scan in upstream's
schema (``sqrt(counts)`` with the bad pixels zeroed), read by :func:`load_npz`.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from mlflow_ptycho_flavor.errors import DatasetError
from mlflow_ptycho_flavor.model.inference import PtychoTorchModel
from mlflow_ptycho_flavor.model.stitching import stitch_patches
from mlflow_ptycho_flavor.network import NetworkConfig, PtychoPINNNetwork
from mlflow_ptycho_flavor.sim.dataset import load_npz, normalization_factor, save_npz
from mlflow_ptycho_flavor.sim.ptychodus import (
    apply_bad_pixels,
    counts_to_amplitudes,
    load_ptychodus_npz,
    normalization_scale,
)
from mlflow_ptycho_flavor.sim.simulate import simulate_dataset

N = 64
BAD = [(N // 2, N // 2 + 1), (5, 7), (40, 12)]  # one next to the bright centre, two in the wings


@pytest.fixture(scope="module")
def scan():
    """A simulated scan, its integer counts, and a detector mask of three bad pixels."""
    dataset = simulate_dataset(N=N, n_scan=(4, 4), nphotons=1e6, seed=3)
    counts = np.rint(dataset.diff3d.astype(np.float64) ** 2).astype(np.int32)
    mask = np.zeros((N, N), dtype=bool)
    for row, col in BAD:
        mask[row, col] = True
    return dataset, counts, mask


def _write_ptychodus(path, dataset, counts, mask, *, probe=None, swap=False, sentinel=-1):
    stored = counts.copy()
    stored[:, mask] = sentinel  # what a detector leaves in dead pixels; ptychodus marks them in bad_pixels
    x, y = (dataset.ycoords, dataset.xcoords) if swap else (dataset.xcoords, dataset.ycoords)
    np.savez(
        path,
        xcoords=x, ycoords=y, xcoords_start=x, ycoords_start=y,
        diff3d=stored,
        probeGuess=dataset.probeGuess[None] if probe is None else probe,
        objectGuess=dataset.objectGuess,
        scan_index=np.zeros(len(counts), dtype=int),
        bad_pixels=mask,
    )
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory, scan):
    dataset, counts, mask = scan
    folder = tmp_path_factory.mktemp("ptychodus")
    ptychodus_file = _write_ptychodus(folder / "train_data.npz", dataset, counts, mask)
    zeroed = counts.astype(np.float64)
    zeroed[:, mask] = 0
    amplitude = dataclasses.replace(dataset, diff3d=np.sqrt(zeroed).astype(np.float32))  # upstream's schema
    amplitude_file = folder / "amplitudes.npz"
    save_npz(amplitude, amplitude_file)
    return ptychodus_file, amplitude_file


def _stitched(dataset, scale):
    torch.manual_seed(0)
    network = PtychoPINNNetwork(NetworkConfig(N=N, C_model=1, n_filters_scale=1)).eval()
    model = PtychoTorchModel(network=network, params={"N": N, "gridsize": 1})
    patches = model.predict(dataset.diff3d, scale, batch_size=8)
    return patches, stitch_patches(patches, dataset.offsets).obj


def test_counts_file_gives_the_same_dataset_and_object_as_the_amplitude_input(files):
    ptychodus_file, amplitude_file = files
    loaded = load_ptychodus_npz(ptychodus_file)
    reference = load_npz(amplitude_file)
    assert loaded.input_kind == "counts" and loaded.bad_pixel_method == "mask"
    for name in ("diff3d", "xcoords", "ycoords", "probeGuess", "objectGuess", "scan_index"):
        np.testing.assert_array_equal(getattr(loaded.dataset, name), getattr(reference, name), err_msg=name)
    assert loaded.dataset.diff3d.dtype == np.float32
    assert loaded.scale == normalization_factor(reference.diff3d)
    patches, obj = _stitched(loaded.dataset, loaded.scale)
    ref_patches, ref_obj = _stitched(reference, normalization_factor(reference.diff3d))
    # The inputs above are equal bit for bit; the two forward passes are compared to float32 rounding, because two
    # runs of the same network on equal inputs held in different buffers have differed by ~2e-6 on this CPU
    # (alignment-dependent vector kernels).
    np.testing.assert_allclose(patches, ref_patches, rtol=0, atol=1e-5)
    np.testing.assert_allclose(obj, ref_obj, rtol=0, atol=1e-5)
    assert np.abs(obj).max() > 0


def test_counts_to_amplitudes_is_sqrt_of_counts():
    counts = np.array([[0, 1, 2, 4, 9, 1000, 2**24 + 1]], dtype=np.int64)
    amplitudes = counts_to_amplitudes(counts)
    assert amplitudes.dtype == np.float32 and amplitudes.shape == counts.shape
    np.testing.assert_array_equal(amplitudes, np.sqrt(counts.astype(np.float64)).astype(np.float32))
    assert amplitudes[0, 4] == 3.0
    np.testing.assert_array_equal(counts_to_amplitudes(counts[:, :6].astype(np.float32)), amplitudes[:, :6])
    np.testing.assert_array_equal(counts_to_amplitudes(np.uint16(9)), np.float32(3.0))


@pytest.mark.parametrize(
    "counts, message",
    [
        (np.array([3, -1]), "negative"),
        (np.array([3.0, 2.5]), "non-integer"),
        (np.array([3.0, np.nan]), "non-finite"),
        (np.array([3.0, np.inf]), "non-finite"),
        (np.array([1 + 1j]), "complex"),
        (np.array([True, False]), "real numbers"),
        (np.array(["3"]), "real numbers"),
    ],
)
def test_counts_validation(counts, message):
    with pytest.raises(DatasetError, match=message):
        counts_to_amplitudes(counts)


def test_sentinels_under_the_mask_are_not_validated_but_ignore_keeps_them(files, tmp_path, scan):
    ptychodus_file, _ = files
    with pytest.raises(DatasetError, match="negative"):
        load_ptychodus_npz(ptychodus_file, bad_pixels="ignore")
    dataset, counts, mask = scan
    zero_sentinel = _write_ptychodus(tmp_path / "zeroed.npz", dataset, counts, mask, sentinel=0)
    kept = load_ptychodus_npz(zero_sentinel, bad_pixels="ignore")
    masked = load_ptychodus_npz(zero_sentinel, bad_pixels="mask")
    np.testing.assert_array_equal(kept.dataset.diff3d, masked.dataset.diff3d)  # ptychodus had zeroed them already


def test_inpainting_fills_bad_pixels_from_their_neighbours(files, scan):
    ptychodus_file, _ = files
    _, counts, mask = scan
    loaded = load_ptychodus_npz(ptychodus_file, bad_pixels="inpaint")
    amplitudes = np.sqrt(counts.astype(np.float64))
    for row, col in BAD:  # isolated pixels: the mean of the 8 neighbours, all valid
        window = amplitudes[:, row - 1: row + 2, col - 1: col + 2].reshape(len(counts), 9)
        expected = (window.sum(axis=1) - window[:, 4]) / 8.0
        np.testing.assert_allclose(loaded.dataset.diff3d[:, row, col], expected, rtol=1e-6)
    good = ~mask
    np.testing.assert_array_equal(loaded.dataset.diff3d[:, good], amplitudes[:, good].astype(np.float32))
    assert loaded.bad_pixels is not None and loaded.bad_pixels.sum() == len(BAD)


def test_inpainting_a_cluster_and_a_fully_bad_pattern():
    values = np.arange(2 * 8 * 8, dtype=np.float32).reshape(2, 8, 8)
    cluster = np.zeros((2, 8, 8), dtype=bool)
    cluster[:, 2:6, 2:6] = True  # 4x4: the inner 2x2 has no valid neighbour in the first pass
    filled = apply_bad_pixels(values, cluster, "inpaint")
    assert np.isfinite(filled).all() and not np.array_equal(filled[:, 3:5, 3:5], values[:, 3:5, 3:5])
    np.testing.assert_array_equal(filled[~cluster], values[~cluster])
    # a linear ramp is reproduced exactly by neighbour means
    ramp = np.broadcast_to(np.arange(8, dtype=np.float32)[None, None, :], (1, 8, 8)).copy()
    spot = np.zeros((1, 8, 8), dtype=bool)
    spot[0, 4, 4] = True
    assert apply_bad_pixels(ramp, spot, "inpaint")[0, 4, 4] == 4.0
    with pytest.raises(DatasetError, match="every pixel"):
        apply_bad_pixels(values[:1], np.ones((8, 8), dtype=bool), "inpaint")


def test_positions_order_is_explicit(files, tmp_path, scan):
    ptychodus_file, _ = files
    dataset, counts, mask = scan
    swapped = _write_ptychodus(tmp_path / "yx.npz", dataset, counts, mask, swap=True)
    as_xy = load_ptychodus_npz(ptychodus_file, positions="xy").dataset
    as_yx = load_ptychodus_npz(swapped, positions="yx").dataset
    np.testing.assert_array_equal(as_yx.offsets, as_xy.offsets)
    np.testing.assert_array_equal(as_xy.xcoords, dataset.xcoords)
    assert not np.array_equal(load_ptychodus_npz(swapped, positions="xy").dataset.offsets, as_xy.offsets)
    pairs = tmp_path / "pairs.npz"
    np.savez(pairs, diff3d=counts, probeGuess=dataset.probeGuess,
             positions=np.stack([dataset.ycoords, dataset.xcoords], axis=1))
    np.testing.assert_array_equal(load_ptychodus_npz(pairs, positions="yx").dataset.offsets, as_xy.offsets)


def test_normalization_conventions(files):
    ptychodus_file, _ = files
    upstream = load_ptychodus_npz(ptychodus_file, normalization="upstream")
    ptychodus = load_ptychodus_npz(ptychodus_file, normalization="ptychodus")
    amplitudes = upstream.dataset.diff3d.astype(np.float64)
    energy = np.mean(np.sum(amplitudes**2, axis=(1, 2)))
    assert upstream.scale == pytest.approx(math.sqrt((N / 2) ** 2 / energy), rel=1e-12)
    assert ptychodus.scale == pytest.approx(math.sqrt(N**2 / energy), rel=1e-12)
    assert ptychodus.scale == 2.0 * upstream.scale
    assert normalization_scale(np.zeros((2, 8, 8)), "ptychodus") == 1.0


def test_probe_modes(tmp_path, scan):
    dataset, counts, mask = scan
    probe = np.stack([0.5 * dataset.probeGuess, dataset.probeGuess, 0.1 * dataset.probeGuess])
    path = _write_ptychodus(tmp_path / "modes.npz", dataset, counts, mask, probe=probe)
    loaded = load_ptychodus_npz(path)
    assert loaded.probe_mode_index == 1 and loaded.probe_modes.shape == (3, N, N)
    np.testing.assert_array_equal(loaded.dataset.probeGuess, dataset.probeGuess)
    wrong = _write_ptychodus(tmp_path / "wrong.npz", dataset, counts, mask, probe=probe[:, :32, :32])
    with pytest.raises(DatasetError, match=r"probeGuess.*\(modes, N, N\)"):
        load_ptychodus_npz(wrong)


def test_input_kind_and_options(tmp_path, scan):
    dataset, counts, mask = scan
    float_counts = tmp_path / "float_counts.npz"
    np.savez(float_counts, diff3d=counts.astype(np.float32), probeGuess=dataset.probeGuess[None],
             xcoords=dataset.xcoords, ycoords=dataset.ycoords)
    as_counts = load_ptychodus_npz(float_counts, input_kind="counts")
    np.testing.assert_array_equal(as_counts.dataset.diff3d, counts_to_amplitudes(counts))
    as_amplitudes = load_ptychodus_npz(float_counts)  # float data default to amplitudes
    assert as_amplitudes.input_kind == "amplitude"
    np.testing.assert_array_equal(as_amplitudes.dataset.diff3d, counts.astype(np.float32))
    integer = _write_ptychodus(tmp_path / "int.npz", dataset, counts, mask)
    with pytest.raises(DatasetError, match="input_kind='counts'"):
        load_ptychodus_npz(integer, input_kind="amplitude")
    for option, value in (("positions", "rc"), ("bad_pixels", "median"), ("normalization", "N2"),
                          ("input_kind", "intensity")):
        with pytest.raises(DatasetError, match=option):
            load_ptychodus_npz(integer, **{option: value})


def test_bad_pixel_mask_shapes(tmp_path, scan):
    dataset, counts, mask = scan
    per_pattern = np.broadcast_to(mask, counts.shape).copy()
    path = tmp_path / "per_pattern.npz"
    np.savez(path, diff3d=counts, probeGuess=dataset.probeGuess, xcoords=dataset.xcoords, ycoords=dataset.ycoords,
             bad_pixels=per_pattern.astype(np.uint8))
    loaded = load_ptychodus_npz(path)
    assert loaded.bad_pixels.shape == counts.shape and (loaded.dataset.diff3d[:, mask] == 0).all()
    np.savez(path, diff3d=counts, probeGuess=dataset.probeGuess, xcoords=dataset.xcoords, ycoords=dataset.ycoords,
             bad_pixels=mask[:32])
    with pytest.raises(DatasetError, match="bad_pixels"):
        load_ptychodus_npz(path)
    np.savez(path, diff3d=counts, probeGuess=dataset.probeGuess, xcoords=dataset.xcoords, ycoords=dataset.ycoords,
             bad_pixels=mask.astype(np.float32) * 0.5)
    with pytest.raises(DatasetError, match="boolean mask"):
        load_ptychodus_npz(path)


def test_unreadable_and_incomplete_files(tmp_path, scan):
    dataset, counts, _ = scan
    with pytest.raises(DatasetError, match="does not exist"):
        load_ptychodus_npz(tmp_path / "missing.npz")
    path = tmp_path / "no_positions.npz"
    np.savez(path, diff3d=counts, probeGuess=dataset.probeGuess)
    with pytest.raises(DatasetError, match="no scan positions"):
        load_ptychodus_npz(path)
    np.savez(path, diff3d=counts, xcoords=dataset.xcoords, ycoords=dataset.ycoords)
    with pytest.raises(DatasetError, match="probeGuess"):
        load_ptychodus_npz(path)
    np.savez(path, diff3d=np.array([object()], dtype=object), probeGuess=dataset.probeGuess)
    with pytest.raises(DatasetError, match="pickled"):
        load_ptychodus_npz(path)
