"""Tests of position-based stitching (docs/bundle-format.md §6.2): exact reassembly, sub-pixel placement sign, coverage, gridsize."""

from __future__ import annotations

import numpy as np
import pytest

from mlflow_ptycho_flavor.errors import PredictionInputError
from mlflow_ptycho_flavor.model.stitching import (
    StitchResult,
    crop_to_object,
    stitch_patches,
    stitch_patches_from_coords,
)

N = 64


def _smooth_random_object(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Random smooth complex object: low-pass filtered complex noise (amplitude ~1, varying phase)."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=shape) + 1j * rng.normal(size=shape)
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.fftfreq(shape[1])[None, :]
    smooth = np.fft.ifft2(np.fft.fft2(noise) * np.exp(-(fx**2 + fy**2) / (2 * 0.03**2)))
    smooth /= np.abs(smooth).max()
    return (1.0 + 0.3 * smooth.real) * np.exp(1j * np.pi * smooth.imag).astype(np.complex128)


def _extract(obj: np.ndarray, positions: np.ndarray, n: int = N) -> np.ndarray:
    """Ground-truth patches at integer positions: patch[i, j] = obj[y + i - n//2, x + j - n//2]."""
    out = np.empty((len(positions), n, n), dtype=np.complex64)
    for k, (x, y) in enumerate(positions.astype(int)):
        out[k] = obj[y - n // 2 : y - n // 2 + n, x - n // 2 : x - n // 2 + n]
    return out


def _raster(start: int, stop: int, step: int) -> np.ndarray:
    """(x, y) integer raster positions, x fastest."""
    g = np.arange(start, stop, step)
    yy, xx = np.meshgrid(g, g, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=1).astype(np.float64)


# Analytic band-limited object: sum of a few low-frequency plane waves (wavelengths >= ~50 px).
_WAVES = [(0.9, 0.11, 0.04, 0.3), (0.5, -0.05, 0.09, 1.1), (0.35, 0.07, -0.08, 2.0), (0.25, 0.02, 0.12, -0.7)]


def _analytic(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    val = np.full(np.broadcast(x, y).shape, 1.5 + 0.2j, dtype=np.complex128)
    for a, kx, ky, ph in _WAVES:
        val += a * np.exp(1j * (kx * x + ky * y + ph))
    return val


def _analytic_patches(positions: np.ndarray, n: int = N) -> np.ndarray:
    """Exact patches of the analytic object at (possibly fractional) positions."""
    j = np.arange(n) - n // 2
    out = np.empty((len(positions), n, n), dtype=np.complex64)
    for k, (x, y) in enumerate(positions):
        out[k] = _analytic((x + j)[None, :], (y + j)[:, None])
    return out


# ------------------------------------------------------------------------------------------------------------------


def test_integer_raster_reproduces_object_exactly() -> None:
    obj = _smooth_random_object((200, 200), seed=1)
    pos = _raster(40, 161, 15)  # 9x9 raster, mean (100, 100) is integral
    res = stitch_patches(_extract(obj, pos), pos)
    assert isinstance(res, StitchResult)
    assert res.obj.dtype == np.complex64 and res.coverage.dtype == np.float32 and res.mask.dtype == bool
    assert res.crop_size == N // 2
    assert res.origin == (100.0 - res.pad - N // 4, 100.0 - res.pad - N // 4)
    vals, mask = crop_to_object(res, obj.shape)
    # Covered region = union of the 32x32 crops around the centres: [40-16, 160+16) on both axes.
    expected_mask = np.zeros(obj.shape, dtype=bool)
    expected_mask[24:176, 24:176] = True
    np.testing.assert_array_equal(mask, expected_mask)
    err = np.abs(vals[mask] - obj[mask]).max()
    assert err < 1e-5, err
    assert np.all(vals[~mask] == 0)
    # Each patch centre lands on canvas pixel (y - y0, x - x0) and carries the object value there.
    x0, y0 = res.origin
    for x, y in pos[[0, 40, 80]]:
        assert abs(res.obj[int(y - y0), int(x - x0)] - obj[int(y), int(x)]) < 1e-5


def test_integer_positions_with_fractional_mean_are_exact_with_integer_centre() -> None:
    obj = _smooth_random_object((160, 170), seed=2)
    rng = np.random.default_rng(3)
    pos = np.stack([rng.integers(40, 131, 37), rng.integers(40, 121, 37)], axis=1).astype(np.float64)
    assert np.any(pos.mean(axis=0) % 1 != 0)
    patches = _extract(obj, pos)
    res = stitch_patches(patches, pos, centre="integer")
    assert float(res.origin[0]).is_integer() and float(res.origin[1]).is_integer()
    vals, mask = crop_to_object(res, obj.shape)
    assert mask.sum() > 60 * 60
    assert np.abs(vals[mask] - obj[mask]).max() < 1e-5
    # Default centre='mean' (docs/bundle-format.md §6.2) interpolates by frac(mean): the canvas is on a shifted grid but is still
    # bilinear-accurate for a smooth object, and origin carries the fractional offset.
    res_mean = stitch_patches(patches, pos)
    assert res_mean.origin[0] % 1 == pytest.approx(pos[:, 0].mean() % 1)
    assert np.abs(res_mean.obj).max() > 0.5


def test_subpixel_positions_placed_with_plus_sign() -> None:
    rng = np.random.default_rng(4)
    pos = _raster(20, 141, 12) + rng.uniform(-2.5, 2.5, size=(121, 2))
    patches = _analytic_patches(pos)
    res = stitch_patches(patches, pos)
    x0, y0 = res.origin
    rows = np.arange(res.obj.shape[0])[:, None]
    cols = np.arange(res.obj.shape[1])[None, :]
    truth = _analytic(x0 + cols, y0 + rows)
    # Interior: inside the hull of the patch centres (fully covered by full-weight crops).
    lo = pos.min(axis=0) + 3
    hi = pos.max(axis=0) - 3
    interior = (x0 + cols >= lo[0]) & (x0 + cols <= hi[0]) & (y0 + rows >= lo[1]) & (y0 + rows <= hi[1])
    assert interior.sum() > 100 * 100 and np.all(res.mask[interior])
    scale = np.abs(truth[interior]).max()
    rel = np.abs(res.obj[interior] - truth[interior]).max() / scale
    assert rel < 1e-2, rel
    # Mirrored placement (content at -(position - mean)) must be clearly wrong: same canvas geometry, bad values.
    mirrored = 2 * pos.mean(axis=0) - pos
    wrong = stitch_patches(patches, mirrored)
    assert wrong.origin == pytest.approx(res.origin) and wrong.obj.shape == res.obj.shape
    rel_wrong = np.abs(wrong.obj[interior] - truth[interior]).max() / scale
    assert rel_wrong > 20 * rel and rel_wrong > 0.1, (rel, rel_wrong)
    # crop_to_object resamples a fractional-origin canvas onto the object grid, still bilinear-accurate.
    vals, mask = crop_to_object(res, (170, 170))
    yy, xx = np.mgrid[0:170, 0:170]
    inner = mask & (xx >= lo[0]) & (xx <= hi[0]) & (yy >= lo[1]) & (yy <= hi[1])
    assert inner.sum() > 100 * 100
    assert np.abs(vals[inner] - _analytic(xx, yy)[inner]).max() / scale < 2e-2


def test_coverage_two_patches_by_hand() -> None:
    n, crop = 8, 4
    patches = np.stack([np.full((n, n), 2 + 1j), np.full((n, n), 4 - 1j)]).astype(np.complex64)
    pos = np.array([[0.0, 0.0], [2.0, 0.0]])  # mean (1, 0): offsets -1 and +1 along x
    res = stitch_patches(patches, pos, crop_size=crop)
    assert res.pad == 2 and res.obj.shape == (8, 8)  # ceil(1) = 1 -> even 2; canvas 4 + 2*2
    assert res.origin == (1.0 - 2 - 2, 0.0 - 2 - 2)
    expected_cov = np.zeros((8, 8), dtype=np.float32)
    expected_cov[2:6, 1:3] = 1  # patch A only (crop at cols 2..5 shifted by -1)
    expected_cov[2:6, 3:5] = 2  # overlap
    expected_cov[2:6, 5:7] = 1  # patch B only (shifted by +1)
    np.testing.assert_array_equal(res.coverage, expected_cov)
    np.testing.assert_array_equal(res.mask, expected_cov > 0)
    expected_obj = np.zeros((8, 8), dtype=np.complex64)
    expected_obj[2:6, 1:3] = 2 + 1j
    expected_obj[2:6, 3:5] = 3 + 0j
    expected_obj[2:6, 5:7] = 4 - 1j
    np.testing.assert_allclose(res.obj, expected_obj, atol=1e-6)
    # Patch B's centre (x=2, y=0) is canvas (row, col) = (0 - y0, 2 - x0) = (4, 5), where only B lies; A's centre
    # (4, 3) is crop pixel (2, 2) of A, in the overlap.
    assert res.obj[4, 5] == pytest.approx(4 - 1j, abs=1e-6)
    assert res.obj[4, 3] == pytest.approx(3 + 0j, abs=1e-6)
    # crop_to_object into a small object frame: only covered pixels are masked in.
    vals, mask = crop_to_object(res, (3, 5), fill=np.nan)
    # object (R, C) = canvas (R + 4, C + 3); canvas rows 2..5 / cols 1..6 covered -> object rows 0..1, cols 0..3.
    expected_mask = np.zeros((3, 5), dtype=bool)
    expected_mask[0:2, 0:4] = True
    np.testing.assert_array_equal(mask, expected_mask)
    np.testing.assert_allclose(vals[0, :4], [3, 3, 4 - 1j, 4 - 1j], atol=1e-6)  # canvas cols 3..6
    assert np.all(np.isnan(vals[~mask]))


def test_half_pixel_shift_spreads_coverage_and_conserves_mass() -> None:
    patches = np.ones((2, 8, 8), dtype=np.float32)
    res = stitch_patches(patches, np.array([[0.0, 0.0], [3.0, 0.0]]), crop_size=4)  # offsets -1.5, +1.5
    assert res.pad == 2
    assert res.coverage.sum() == pytest.approx(2 * 16)
    row = res.coverage[3]
    # A covers cols [0.5, 4.5), B covers [3.5, 7.5): half-pixel rims, overlap at cols 3 and 4.
    np.testing.assert_allclose(row, [0.5, 1, 1, 1.5, 1.5, 1, 1, 0.5], atol=1e-6)
    np.testing.assert_array_equal(res.coverage[[0, 1, 6, 7]], 0)
    # Real input -> complex64 output; uniform ones stay exactly one where covered.
    assert res.obj.dtype == np.complex64
    np.testing.assert_allclose(res.obj[res.mask], 1.0, atol=1e-6)
    assert not res.mask[0].any() and not res.mask[7].any()


def test_gridsize_channels_with_per_channel_positions() -> None:
    obj = _smooth_random_object((180, 180), seed=5)
    centres = _raster(50, 131, 20)
    neigh = np.array([[-3, -2], [4, -1], [-2, 5], [3, 3]], dtype=np.float64)
    pos4 = centres[:, None, :] + neigh[None, :, :]  # (M, 4, 2)
    patches4 = _extract(obj, pos4.reshape(-1, 2)).reshape(len(centres), 4, N, N)
    res = stitch_patches(patches4, pos4, centre="integer")
    vals, mask = crop_to_object(res, obj.shape)
    assert mask.sum() > 100 * 100
    assert np.abs(vals[mask] - obj[mask]).max() < 1e-5
    # Upstream offsets layout (M, C, 1, 2) is accepted and gives the same result.
    res_b = stitch_patches(patches4, pos4[:, :, None, :], centre="integer")
    np.testing.assert_array_equal(res_b.obj, res.obj)
    # Equivalent to flattening the channels by hand.
    res_flat = stitch_patches(patches4.reshape(-1, N, N), pos4.reshape(-1, 2), centre="integer")
    np.testing.assert_array_equal(res_flat.obj, res.obj)


def test_gridsize_channels_with_group_positions_are_averaged() -> None:
    rng = np.random.default_rng(6)
    patches4 = (rng.normal(size=(9, 4, N, N)) + 1j * rng.normal(size=(9, 4, N, N))).astype(np.complex64)
    pos = _raster(0, 41, 20)  # (9, 2)
    res = stitch_patches(patches4, pos)
    ref = stitch_patches(patches4.mean(axis=1), pos)
    np.testing.assert_allclose(res.obj, ref.obj, atol=1e-6)
    np.testing.assert_array_equal(res.coverage, ref.coverage)
    first = stitch_patches(patches4[:, 0], pos)
    assert np.abs(res.obj - first.obj).max() > 0.1  # not just the first channel
    # One group, identical channels -> a single patch's centre crop, unchanged.
    same = np.repeat(patches4[:1, :1], 4, axis=1)
    single = stitch_patches(same, np.array([[7.0, 9.0]]))
    np.testing.assert_allclose(single.obj, patches4[0, 0, 16:48, 16:48], atol=1e-6)
    assert single.origin == (7.0 - 16, 9.0 - 16)


def test_weighting_central_and_array() -> None:
    rng = np.random.default_rng(7)
    patches = (rng.normal(size=(2, 16, 16)) + 1j * rng.normal(size=(2, 16, 16))).astype(np.complex64)
    pos = np.array([[0.0, 0.0], [6.0, 0.0]])
    full_central = stitch_patches(patches, pos, crop_size=16, weighting="central")
    # The central weight is zero outside rows/cols [4, 12) of each patch, so the covered rows are 8 wide.
    assert np.count_nonzero(full_central.mask.any(axis=1)) == 8
    # With the default crop (N//2 = the central window) 'central' equals 'uniform'.
    np.testing.assert_array_equal(
        stitch_patches(patches, pos, weighting="central").obj, stitch_patches(patches, pos).obj
    )
    # An array weight scales both numerator and coverage: a constant weight changes nothing but the coverage.
    w3 = stitch_patches(patches, pos, weighting=np.full((16, 16), 3.0))
    uni = stitch_patches(patches, pos)
    np.testing.assert_allclose(w3.obj, uni.obj, atol=1e-6)
    np.testing.assert_allclose(w3.coverage, 3 * uni.coverage)


def test_chunking_does_not_change_result_and_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(8)
    patches = (rng.normal(size=(50, 16, 16)) + 1j * rng.normal(size=(50, 16, 16))).astype(np.complex64)
    pos = rng.uniform(0, 60, size=(50, 2))
    a = stitch_patches(patches, pos, chunk_size=1)
    b = stitch_patches(patches, pos, chunk_size=1000, progress=True)
    np.testing.assert_allclose(a.obj, b.obj, atol=1e-6)
    np.testing.assert_array_equal(a.coverage, b.coverage)
    assert "stitching patches" in capsys.readouterr().err


def test_many_patches_auto_progress(capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(9)
    patches = np.ones((2500, 8, 8), dtype=np.complex64)
    pos = rng.uniform(0, 200, size=(2500, 2))
    res = stitch_patches(patches, pos)
    assert "2500" in capsys.readouterr().err
    np.testing.assert_allclose(res.obj[res.coverage > 0.5], 1.0, atol=1e-5)
    assert res.coverage.sum() == pytest.approx(2500 * 16, rel=1e-6)


def test_from_coords_matches_positions() -> None:
    rng = np.random.default_rng(10)
    patches = rng.normal(size=(5, 16, 16)).astype(np.float64)
    x = rng.uniform(0, 20, 5)
    y = rng.uniform(0, 20, 5)
    a = stitch_patches_from_coords(patches, x, y)
    b = stitch_patches(patches, np.stack([x, y], axis=1))
    np.testing.assert_array_equal(a.obj, b.obj)
    # x is the column: swapping x and y transposes the canvas.
    t = stitch_patches_from_coords(patches.transpose(0, 2, 1), y, x)
    np.testing.assert_allclose(t.obj, a.obj.T, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# bad inputs

_GOOD = np.zeros((3, 8, 8), dtype=np.complex64)
_POS = np.zeros((3, 2))


@pytest.mark.parametrize(
    ("patches", "positions", "kwargs", "match"),
    [
        (np.zeros((3, 8, 8), dtype=np.int32), _POS, {}, r"patches: dtype int32"),
        (np.zeros((3, 8, 8), dtype=bool), _POS, {}, r"patches: dtype bool"),
        (np.zeros((8, 8), dtype=np.complex64), _POS, {}, r"patches: shape \(8, 8\) has rank 2"),
        (np.zeros((1, 2, 3, 8, 8), dtype=np.float32), _POS, {}, r"rank 5"),
        (np.zeros((3, 8, 6), dtype=np.complex64), _POS, {}, r"non-square patches \(8×6\)"),
        (np.zeros((0, 8, 8), dtype=np.complex64), np.zeros((0, 2)), {}, r"patches: shape \(0, 8, 8\) is empty"),
        (np.full((3, 8, 8), np.nan, dtype=np.complex64), _POS, {}, r"patches: 192 non-finite"),
        (_GOOD, np.zeros((4, 2)), {}, r"positions: shape \(4, 2\) does not match .*expected \(3, 2\)"),
        (_GOOD, np.zeros((3, 3)), {}, r"positions: shape \(3, 3\)"),
        (np.zeros((3, 4, 8, 8), dtype=np.complex64), np.zeros((3, 2, 2)), {}, r"expected \(3, 2\) .* or \(3, 4, 2\)"),
        (_GOOD, np.array([[0, 0], [np.nan, 1], [2, 2]]), {}, r"positions: 1 position\(s\) hold NaN or inf"),
        (_GOOD, np.array([[0, 0], [np.inf, 1], [2, -np.inf]]), {}, r"positions: 2 position\(s\)"),
        (_GOOD, [["a", "b"]] * 3, {}, r"positions: could not be read"),
        (_GOOD, _POS, {"crop_size": 0}, r"crop_size: 0 is outside \[1, N=8\]"),
        (_GOOD, _POS, {"crop_size": 9}, r"crop_size: 9 is outside \[1, N=8\]"),
        (_GOOD, _POS, {"crop_size": 2.5}, r"crop_size: 2.5 is not an integer"),
        (_GOOD, _POS, {"weighting": "probe"}, r"weighting: 'probe' is not a known"),
        (_GOOD, _POS, {"weighting": np.ones((4, 4))}, r"weighting: array of shape \(4, 4\)"),
        (_GOOD, _POS, {"weighting": -np.ones((8, 8))}, r"weighting: .*negative or non-finite"),
        (_GOOD, _POS, {"centre": "median"}, r"centre: 'median' is not known"),
        (_GOOD, _POS, {"centre": (1.0, np.nan)}, r"centre: .* is not a finite \(x, y\) pair"),
        (_GOOD, _POS, {"chunk_size": 0}, r"chunk_size: 0 is not a positive integer"),
    ],
)
def test_bad_inputs_raise(patches: np.ndarray, positions: object, kwargs: dict, match: str) -> None:
    with pytest.raises(PredictionInputError, match=match):
        stitch_patches(patches, positions, **kwargs)


def test_bad_inputs_are_value_errors() -> None:
    with pytest.raises(ValueError, match=r"crop_size: 100 is outside"):
        stitch_patches(_GOOD, _POS, crop_size=100)


def test_bad_coords_and_object_shape() -> None:
    with pytest.raises(PredictionInputError, match=r"xcoords/ycoords: shapes \(3,\) and \(2,\) differ"):
        stitch_patches_from_coords(_GOOD, np.zeros(3), np.zeros(2))
    with pytest.raises(PredictionInputError, match=r"xcoords/ycoords: could not be read"):
        stitch_patches_from_coords(_GOOD, ["a"] * 3, np.zeros(3))
    res = stitch_patches(_GOOD, _POS)
    with pytest.raises(PredictionInputError, match=r"object_shape: \(5,\) is not a pair"):
        crop_to_object(res, (5,))
    with pytest.raises(PredictionInputError, match=r"object_shape: \(0, 4\) is not a pair"):
        crop_to_object(res, (0, 4))
