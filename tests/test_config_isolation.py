"""CONFIG-001 mutates a process-wide config; loaded models must not depend on it (GitHub issue 7, part 4).

Two models of different shape - N=64/gridsize 1 and N=128/gridsize 2 (n_filters_scale=1) - are loaded in one
process, each through ``load_torch_bundle`` and through ``mlflow_ptycho_flavor.flavor.load_model`` on the bare bundle
path. Every later restore rewrites the global ``params.cfg`` (the second load leaves N=128, gridsize=2 there), yet:

* 40 mixed calls from 8 threads give each model exactly its own single-threaded reference output (``array_equal``);
* after ``params.cfg`` is mutated arbitrarily (or emptied), predictions are bit-identical again.

The references are computed right after each model's own load, while the global still held that model's values.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from mlflow_ptycho_flavor import load_torch_bundle, save_torch_bundle
from mlflow_ptycho_flavor.bundle import params as params_module

SPECS = {"a": dict(N=64, C_model=1, n_filters_scale=1), "b": dict(N=128, C_model=4, n_filters_scale=1)}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    from conftest import make_perturbed_network

    folder = tmp_path_factory.mktemp("isolation")
    return {name: save_torch_bundle(make_perturbed_network(seed=11 + i, **spec), folder / name / "wts.h5.zip")
            for i, (name, spec) in enumerate(SPECS.items())}


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(2024)
    return {name: rng.random((2, spec["C_model"], spec["N"], spec["N"]), dtype=np.float32) * 2.0
            for name, spec in SPECS.items()}


def _network_predict(network, x: np.ndarray, scale: float) -> np.ndarray:
    with torch.inference_mode():
        return network(torch.from_numpy(x), torch.full((x.shape[0], 1, 1, 1), scale)).numpy()


COMBOS = [(name, kind, scale) for name in ("a", "b") for kind in ("network", "native") for scale in (1.0, 0.5)]


def _call(models, inputs, task):
    name, kind, scale = task
    model = models[name][kind]
    return _network_predict(model, inputs[name], scale) if kind == "network" else model.predict(inputs[name], scale)


@pytest.fixture(scope="module")
def loaded(bundles, inputs):
    """Both models loaded both ways, in order a then b, with references taken right after each load."""
    from mlflow_ptycho_flavor.flavor import load_model

    params_module.reset_cfg()
    models, references, configs = {}, {}, {}
    for name in ("a", "b"):
        network, _ = load_torch_bundle(bundles[name], device="cpu")
        native = load_model(str(bundles[name]), device="cpu", channels_last=False)  # the bare network's layout
        configs[name] = dict(params_module.cfg)
        assert params_module.cfg["N"] == SPECS[name]["N"]  # CONFIG-001 did rewrite the global
        models[name] = {"network": network, "native": native}
        for task in COMBOS:
            if task[0] == name:
                references[task] = _call(models, inputs, task)
    return models, references, configs


def _tasks(count: int = 40):
    return [COMBOS[(3 * k) % len(COMBOS)] for k in range(count)]  # mixed order, every combination used


def test_references_differ_between_models_and_scales(loaded):
    """Guard: the comparison below is meaningful (outputs depend on the model and the scale)."""
    _, references, configs = loaded
    assert references[("a", "network", 1.0)].shape == (2, 1, 64, 64)
    assert references[("b", "network", 1.0)].shape == (2, 4, 128, 128)
    for name in ("a", "b"):
        assert not np.array_equal(references[(name, "network", 1.0)], references[(name, "network", 0.5)])
        # native predict (validation, batching) and the bare network agree bit for bit
        assert np.array_equal(references[(name, "native", 1.0)], references[(name, "network", 1.0)])
    assert configs["a"]["gridsize"] == 1 and configs["b"]["gridsize"] == 2


def test_concurrent_predictions_match_single_threaded_references(loaded, inputs):
    models, references, _ = loaded
    tasks = _tasks(40)
    assert set(tasks) == set(COMBOS)
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda task: _call(models, inputs, task), tasks))
    for task, result in zip(tasks, results):
        assert np.array_equal(result, references[task]), f"{task} differs from its reference"


MUTATIONS = {
    "arbitrary": {"N": 256, "gridsize": 7, "n_filters_scale": 99, "object.big": False, "probe.big": False,
                  "intensity_scale": 1e-9, "intensity_scale.trainable": True, "amp_activation": "relu", "C": 49},
    "a-values": {"N": 64, "gridsize": 1},  # model a's values while model b predicts, and vice versa
    "b-values": {"N": 128, "gridsize": 2},
    "cleared": None,
    "garbage": {"N": "sixty-four", "gridsize": None, "_version": object()},
}


def test_predictions_ignore_later_changes_to_the_global_config(loaded, inputs):
    models, references, _ = loaded

    def mutate_then_call(k_task):
        k, task = k_task
        params_module.cfg["N"] = (64, 128, 256)[k % 3]  # and the global keeps changing underneath
        params_module.cfg["gridsize"] = 1 + k % 4
        return _call(models, inputs, task)

    for label, mutation in MUTATIONS.items():
        params_module.cfg.clear()
        if mutation is not None:
            params_module.cfg.update(mutation)
        for task in (COMBOS[0], COMBOS[5]):  # sequential, with the mutated global untouched
            assert np.array_equal(_call(models, inputs, task), references[task]), (label, task)
        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(mutate_then_call, enumerate(COMBOS)))
        for task, result in zip(COMBOS, results):
            assert np.array_equal(result, references[task]), (label, task)


def test_reloading_one_model_does_not_disturb_the_other(loaded, bundles, inputs):
    """A third load (CONFIG-001 again, for model a) leaves model b's predictions untouched."""
    models, references, _ = loaded
    network, _ = load_torch_bundle(bundles["a"], device="cpu")
    assert params_module.cfg["N"] == 64 and params_module.cfg["gridsize"] == 1
    assert np.array_equal(_call(models, inputs, ("b", "native", 1.0)), references[("b", "native", 1.0)])
    assert np.array_equal(_network_predict(network, inputs["a"], 0.5), references[("a", "network", 0.5)])
