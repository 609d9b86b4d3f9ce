"""The CPU default predict path (NHWC, docs/bundle-format.md §6; benchmarks/RESULTS.md §1) against the contiguous
eager network, on every fixture bundle: upstream's CNN variants, the FNO family, a checkpoint conversion, the
converted TensorFlow archives and the shipped demo bundle. Same process, so the contiguous path is the eager
network bit for bit, and the default is within 1e-5 of it."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mlflow_ptycho_flavor.convert import convert_any
from mlflow_ptycho_flavor.model.inference import PtychoTorchModel

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# the fixture list and inputs are the benchmark's (benchmarks/RESULTS.md §1 reports the same comparison)
from benchmarks.sections.predict import fixture_bundles, fixture_inputs  # noqa: E402

DATA = Path(__file__).parent / "data"
TORCH_BUNDLES = [path for name, path in fixture_bundles(DATA) if not name.startswith("tensorflow/")]
TENSORFLOW_ARCHIVES = [path for name, path in fixture_bundles(DATA) if name.startswith("tensorflow/")]
TOLERANCE = 1e-5
#: The one fixture outside 1e-5 of the output's scale (benchmarks/RESULTS.md §1, fixture table): tf_n64_g2_s1
#: (|obj| up to 8.8), where NHWC lands 1.6e-5 of the scale (1.4e-4) from NCHW. Against a float64 evaluation of the
#: same weights, NCHW errs by 5e-6 of the scale and NHWC by 1.4e-5: the NHWC kernels accumulate less accurately
#: there, still at float32's level (torch's own contiguous kernels with oneDNN off land 1.3e-5 from eager too).
#: It is held to 2e-4 absolute, 50x below the smallest effect of any one wrong TensorFlow weight tensor (1e-2:
#: tests/test_tf_convert.py).
FLOAT32_FLOOR = {"tf_n64_g2_s1": 2e-4}


def _compare(bundle: Path, source: Path) -> float:
    default = PtychoTorchModel.from_bundle(bundle, device="cpu")
    contiguous = PtychoTorchModel.from_bundle(bundle, device="cpu", channels_last=False)
    assert default.network.channels_last and not contiguous.network.channels_last  # NHWC activations, stored weights
    x = fixture_inputs(default, source)[0]
    scale = np.ones(x.shape[0], np.float32)
    eager_factors = torch.from_numpy(scale.reshape(-1, 1, 1, 1))
    with torch.inference_mode():
        eager = contiguous.network(torch.from_numpy(x), eager_factors).numpy()
    np.testing.assert_array_equal(contiguous.predict(x, scale), eager)
    got = default.predict(x, scale)
    assert got.dtype == np.complex64 and got.shape == eager.shape
    difference = float(np.abs(got - eager).max())
    floor = FLOAT32_FLOOR.get(source.parent.name)
    assert difference <= (floor if floor else TOLERANCE * max(1.0, float(np.abs(eager).max()))), difference
    return difference


@pytest.mark.parametrize("bundle", TORCH_BUNDLES, ids=lambda p: "/".join(p.parts[-3:-1]))
def test_default_layout_matches_eager_on_torch_fixtures(bundle):
    _compare(bundle, bundle)


@pytest.mark.parametrize("archive", TENSORFLOW_ARCHIVES, ids=lambda p: p.parent.name)
def test_default_layout_matches_eager_on_converted_tensorflow_fixtures(archive, tmp_path):
    converted = tmp_path / "wts.h5.zip"
    convert_any(archive, converted)
    _compare(converted, archive)


def test_every_fixture_family_is_covered():
    families = {p.relative_to(DATA).parts[0] for p in TORCH_BUNDLES if DATA in p.parents}
    assert families == {"upstream", "upstream_fno", "checkpoints"}
    assert len(TENSORFLOW_ARCHIVES) == 3
