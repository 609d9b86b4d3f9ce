"""Probe-weighted blending and per-patch phase alignment (mlflow_ptycho_flavor.model.blending), and the phase
correlation metric: seam-free stitching of gridsize-1 patches whose constant phases are each undetermined."""

from __future__ import annotations

import numpy as np
import pytest

from mlflow_ptycho_flavor.errors import InvalidArgumentError, PredictionInputError
from mlflow_ptycho_flavor.model.blending import DEFAULT_WEIGHT_FLOOR, align_patch_phases, probe_weights
from mlflow_ptycho_flavor.model.stitching import crop_to_object, stitch_patches
from mlflow_ptycho_flavor.sim.metrics import phase_correlation, reconstruction_error
from mlflow_ptycho_flavor.sim.simulate import simulate_dataset

N = 32


def _disc_probe(n: int = N) -> np.ndarray:
    """A soft disc of radius n/4 with a quadratic phase, like the simulator's aperture."""
    yy, xx = np.mgrid[0:n, 0:n] - n // 2
    r = np.hypot(yy, xx)
    return (0.5 * (1 - np.tanh((r - n / 4) / 1.5)) * np.exp(1j * 2.0 * (r / (n / 2)) ** 2)).astype(np.complex64)


def _raster(rows: int, cols: int, step: float, jitter: float = 0.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.arange(rows) * step, np.arange(cols) * step, indexing="ij")
    pos = np.stack([xx.ravel(), yy.ravel()], axis=1) + 40.0
    return pos + rng.uniform(-jitter, jitter, size=pos.shape)


def _patches_of(obj: np.ndarray, positions: np.ndarray, n: int = N) -> np.ndarray:
    """patch[i, j] = obj[round(y) + i - n//2, round(x) + j - n//2] (the simulator's convention)."""
    out = np.empty((len(positions), n, n), dtype=np.complex64)
    for k, (x, y) in enumerate(np.rint(positions).astype(int)):
        out[k] = obj[y - n // 2:y - n // 2 + n, x - n // 2:x - n // 2 + n]
    return out


def _smooth_object(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.fftfreq(shape[1])[None, :]
    smooth = lambda: np.real(np.fft.ifft2(np.fft.fft2(rng.normal(size=shape)) * np.exp(-(fx**2 + fy**2) / (2 * 0.02**2))))
    amp, phase = smooth(), smooth()
    return ((0.7 + 0.2 * amp / np.abs(amp).max()) * np.exp(0.8j * phase / np.abs(phase).max())).astype(np.complex64)


# ------------------------------------------------------------------------------------------------------------------
# probe weights and blending


def test_probe_weights_are_normalised_intensity_with_a_floor() -> None:
    probe = _disc_probe()
    weights = probe_weights(probe)
    intensity = np.abs(probe.astype(np.complex128)) ** 2
    lit = intensity >= DEFAULT_WEIGHT_FLOOR * intensity.max()
    assert weights.max() == 1.0 and weights.dtype == np.float64
    np.testing.assert_allclose(weights[lit], intensity[lit] / intensity.max(), rtol=1e-12)
    assert np.all(weights[~lit] == 0) and (~lit).any()
    # Probe modes add up in intensity; the result is scale-free.
    modes = np.stack([probe, 0.5j * probe])
    np.testing.assert_allclose(probe_weights(modes), weights, rtol=1e-12)
    # (1e3 * a complex64 probe is rounded to float32 again: ~1e-7 relative.)
    np.testing.assert_allclose(probe_weights(1e3 * probe), weights, rtol=1e-6)


@pytest.mark.parametrize("jitter", [0.0, 1.7])
def test_uniform_object_from_shifted_patches_has_no_seams(jitter: float) -> None:
    # A constant object cut into patches and stitched back with probe weights must come back constant: any seam
    # (a weight that does not sum to one, a misplaced patch) would show as a deviation.
    value = 0.8 * np.exp(0.3j)
    positions = _raster(6, 6, step=7.0, jitter=jitter)
    patches = np.full((len(positions), N, N), value, dtype=np.complex64)
    result = stitch_patches(patches, positions, weighting=probe_weights(_disc_probe()), centre="integer")
    covered = result.coverage >= DEFAULT_WEIGHT_FLOOR
    assert covered.sum() > 0.5 * result.mask.sum()
    # Wherever the summed weight reaches the floor, the 1e-9 regulariser changes values by <= 1e-6 relative.
    assert np.max(np.abs(result.obj[covered] - value)) < 2e-6
    # The normalised weights w_i / sum_j w_j form a partition of unity: stitching ones gives exactly one (up to the
    # same regulariser) on every covered pixel, and nothing outside.
    ones = stitch_patches(np.ones_like(patches), positions, weighting=probe_weights(_disc_probe()), centre="integer")
    np.testing.assert_allclose(ones.obj.real[covered], 1.0, atol=2e-6)
    assert np.all(ones.obj[~ones.mask] == 0)


def test_probe_weighting_hides_bad_patch_rims() -> None:
    # Patches that are right where the probe shines and wrong at their rim (as single-pattern reconstructions are):
    # probe weighting keeps the stitched object close to the truth, uniform weighting shows the rim errors.
    obj = _smooth_object((200, 200))
    positions = _raster(10, 10, step=8.0, jitter=1.0, seed=3)
    truth = _patches_of(obj, positions)
    weights = probe_weights(_disc_probe())
    rng = np.random.default_rng(4)
    rim_noise = (rng.normal(size=truth.shape) + 1j * rng.normal(size=truth.shape)) * 0.3 * (1 - np.sqrt(weights))
    noisy = (truth + rim_noise).astype(np.complex64)
    inside = np.zeros(obj.shape, dtype=bool)
    inside[40:112, 40:112] = True  # the span of the scan centres: every pixel seen by many patch centres
    errors = {}
    for name, weighting in (("uniform", "uniform"), ("probe", weights)):
        stitched = stitch_patches(noisy, positions, crop_size=N, weighting=weighting, centre="integer")
        recon, mask = crop_to_object(stitched, obj.shape)
        assert mask[inside].all()
        errors[name] = reconstruction_error(recon, obj, window=inside, per_pattern=False)
    assert errors["probe"] < 0.5 * errors["uniform"], errors


# ------------------------------------------------------------------------------------------------------------------
# phase alignment


def test_align_patch_phases_removes_random_offsets() -> None:
    obj = _smooth_object((220, 220), seed=1)
    positions = _raster(12, 12, step=8.0, jitter=1.5, seed=1)
    truth = _patches_of(obj, positions)
    offsets = np.random.default_rng(2).uniform(-np.pi, np.pi, len(truth))
    scrambled = (truth * np.exp(1j * offsets)[:, None, None]).astype(np.complex64)
    weights = probe_weights(_disc_probe())

    def stitched_error(patches: np.ndarray) -> float:
        # The crops sit at the rounded positions, so stitching there is exact (no sub-pixel interpolation error).
        result = stitch_patches(patches, np.rint(positions), weighting=weights, centre="integer")
        recon, mask = crop_to_object(result, obj.shape)
        return reconstruction_error(recon, obj, window=mask, per_pattern=False)

    aligned, phases = align_patch_phases(scrambled, positions, weighting=weights)
    assert stitched_error(scrambled) > 0.5
    assert stitched_error(aligned) < 1e-3
    # Corrections undo the offsets up to one global phase, and average to zero phase.
    residual = np.angle(np.exp(1j * (phases + offsets)) * np.exp(-1j * np.angle(np.mean(np.exp(1j * (phases + offsets))))))
    assert np.max(np.abs(residual)) < 1e-3
    assert abs(np.angle(np.mean(np.exp(1j * phases)))) < 1e-9
    np.testing.assert_allclose(np.abs(aligned), np.abs(scrambled), rtol=1e-6)


def test_align_patch_phases_on_simulated_scan_and_without_overlap() -> None:
    data = simulate_dataset(N=64, n_scan=(6, 6), seed=3)
    offsets = np.random.default_rng(5).uniform(-3, 3, data.n_patterns)
    scrambled = (data.ground_truth_patches * np.exp(1j * offsets)[:, None, None]).astype(np.complex64)
    aligned, _ = align_patch_phases(scrambled, data.offsets, weighting=probe_weights(data.probeGuess))
    common = np.exp(1j * np.angle(np.sum(aligned * np.conj(data.ground_truth_patches))))
    np.testing.assert_allclose(aligned, data.ground_truth_patches * common, atol=1e-4)
    # Two patches far apart share no pixel: nothing to align, nothing changed.
    lone, phases = align_patch_phases(scrambled[:2], np.array([[0.0, 0.0], [500.0, 0.0]]))
    np.testing.assert_array_equal(lone, scrambled[:2])
    np.testing.assert_array_equal(phases, 0.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"iterations": -1}, r"iterations: -1 is not a non-negative integer"),
        ({"max_pairs": 3}, r"more than max_pairs=3 overlapping patch pairs"),
        ({"crop_size": 99}, r"crop_size: 99 is outside"),
    ],
)
def test_align_patch_phases_refuses_bad_arguments(kwargs: dict, match: str) -> None:
    patches = np.ones((9, 16, 16), dtype=np.complex64)
    with pytest.raises(PredictionInputError, match=match):
        align_patch_phases(patches, _raster(3, 3, step=3.0), **kwargs)


def test_align_patch_phases_and_probe_weights_refuse_bad_inputs() -> None:
    with pytest.raises(PredictionInputError, match=r"phase alignment takes complex \(M, N, N\)"):
        align_patch_phases(np.ones((2, 1, 8, 8), dtype=np.complex64), np.zeros((2, 2)))
    with pytest.raises(PredictionInputError, match=r"phase alignment takes complex"):
        align_patch_phases(np.ones((2, 8, 8), dtype=np.float32), np.zeros((2, 2)))
    with pytest.raises(PredictionInputError, match=r"positions: shape \(3, 2\) does not match"):
        align_patch_phases(np.ones((2, 8, 8), dtype=np.complex64), np.zeros((3, 2)))
    with pytest.raises(PredictionInputError, match=r"probe: is zero everywhere"):
        probe_weights(np.zeros((8, 8), dtype=np.complex64))
    with pytest.raises(PredictionInputError, match=r"probe: shape \(8, 9\)"):
        probe_weights(np.ones((8, 9)))
    with pytest.raises(PredictionInputError, match=r"probe: holds NaN"):
        probe_weights(np.full((8, 8), np.nan))
    with pytest.raises(PredictionInputError, match=r"floor: 1.5 is not a number in \[0, 1\)"):
        probe_weights(np.ones((8, 8)), floor=1.5)


# ------------------------------------------------------------------------------------------------------------------
# phase correlation


def test_phase_correlation_scores_recovered_washed_out_and_unrelated_phase() -> None:
    obj = _smooth_object((96, 96), seed=7)
    amplitude, phase = np.abs(obj), np.angle(obj)
    window = np.zeros(obj.shape, dtype=bool)
    window[10:-10, 10:-10] = True
    # Same phase map under a global phase offset: perfect.
    assert phase_correlation(obj * np.exp(2.1j), obj, window=window) == pytest.approx(1.0, abs=1e-9)
    # A phase map shrunk to a third still correlates perfectly (correlation ignores scale) ...
    shrunk = amplitude * np.exp(1j * phase / 3)
    assert phase_correlation(shrunk, obj, window=window) == pytest.approx(1.0, abs=1e-6)
    # ... a mirrored phase map (the twin image's sign) anti-correlates, and an unrelated one scores ~0.
    assert phase_correlation(amplitude * np.exp(-1j * phase), obj, window=window) == pytest.approx(-1.0, abs=1e-6)
    unrelated = amplitude * np.exp(1j * np.angle(_smooth_object((96, 96), seed=8)))
    assert abs(phase_correlation(unrelated, obj, window=window)) < 0.3
    with pytest.raises(InvalidArgumentError, match="phase is constant over the window"):
        phase_correlation(amplitude.astype(np.complex64), obj, window=window)
    with pytest.raises(InvalidArgumentError, match=r"one \(H, W\) image"):
        phase_correlation(obj[None], obj[None])
