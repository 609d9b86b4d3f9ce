"""Mapping a traced TF graph and its ``params.dill`` onto the PyTorch :class:`~mlflow_ptycho_flavor.network.NetworkConfig`.

The TF network implies torch settings ``params.dill`` does not hold (docs/bundle-format.md §9.7); the snapshot is
cross-checked with the graph so an archive assembled from different models is refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from mlflow_ptycho_flavor.convert.tensorflow.archive import MODEL_H5_MEMBER, PARAMS_MEMBER, _refuse
from mlflow_ptycho_flavor.convert.tensorflow.graph import _GraphPlan
from mlflow_ptycho_flavor.errors import ConfigMismatchError, short_repr

def _torch_settings(plan: _GraphPlan, object_big: bool) -> dict[str, Any]:
    """The NetworkConfig fields the TF network implies (docs/bundle-format.md §9.7)."""
    settings: dict[str, Any] = {
        "N": plan.N,
        "C_model": plan.channels,
        "n_filters_scale": plan.n_filters_scale,
        "object_big": object_big,
        "probe_big": plan.probe_big,
        "amp_activation": "sigmoid" if plan.amp_activation_tf == "sigmoid" else "silu",
        "mode": "Unsupervised",
        "architecture": "cnn",
        "cnn_output_mode": "amp_phase",
        "use_shared_decoder": False,
        "batch_norm": False,
        "cbam_encoder": False,
        "cbam_bottleneck": False,
        "intensity_scale_trainable": False,
    }
    width = 32 * plan.n_filters_scale
    if plan.border_channels != plan.out_channels:
        # TF sends the last c trunk channels to the border path; the torch default sends out_channels. The legacy
        # override routes floor(32 s * f) channels: f = (c + 0.5) / (32 s) gives exactly c
        # (docs/bundle-format.md §8.5.7).
        if not 1 <= plan.border_channels <= width // 2 - 1:
            raise _refuse(f"the heads route {plan.border_channels} of {width} channels to the border path; the PyTorch "
                          f"head can route 1..{width // 2 - 1} besides its default")
        settings.update(
            use_legacy_decoder_channel_override=True,
            decoder_last_c_outer_fraction=(plan.border_channels + 0.5) / width,
            decoder_last_amp_channels=plan.out_channels,
        )
    return settings


def _check_params_agree(params: Mapping[str, Any], plan: _GraphPlan) -> bool:
    """Cross-check the snapshot with the graph; returns the object.big the torch network should carry."""
    if params.get("model_type", "pinn") != "pinn":
        raise _refuse(f"params.dill model_type={short_repr(params.get('model_type'))}: only PINN ('pinn') archives are "
                      "mapped (a supervised TF graph was not verified)")
    if params.get("pad_object", True) is not True:
        raise _refuse("params.dill has pad_object=False, whose last stage has no PyTorch counterpart")
    gridsize = math.isqrt(plan.channels)
    object_big = params.get("object.big", True)
    checks = [
        ("N", params.get("N"), plan.N),
        ("gridsize", params.get("gridsize"), gridsize),
        ("n_filters_scale", params.get("n_filters_scale", plan.n_filters_scale), plan.n_filters_scale),
        ("probe.big", params.get("probe.big", plan.probe_big), plan.probe_big),
        ("amp_activation", params.get("amp_activation", plan.amp_activation_tf), plan.amp_activation_tf),
    ]
    for key, stored, graph in checks:
        if stored != graph:
            raise ConfigMismatchError(
                f"{PARAMS_MEMBER}[{key!r}]={short_repr(stored)} disagrees with the network in model.keras "
                f"({key}={graph!r}); the archive's parts come from different models, so it is not converted"
            )
    if not isinstance(object_big, bool):
        raise ConfigMismatchError(f"{PARAMS_MEMBER}['object.big'] must be bool, got {short_repr(object_big)}")
    if not object_big and gridsize > 1:
        raise _refuse(f"object.big=False at gridsize {gridsize} has no exact PyTorch counterpart")
    return object_big


def _intensity_scale(params: Mapping[str, Any], attribute: float) -> float:
    stored = params.get("intensity_scale")
    if stored is None:
        raise ConfigMismatchError(f"{PARAMS_MEMBER} lacks intensity_scale (upstream's saver always writes it)")
    value = float(stored)
    if not (math.isfinite(value) and value > 0 and math.isfinite(attribute)):
        raise ConfigMismatchError(f"intensity_scale={short_repr(stored)} must be a finite number > 0")
    if value != attribute:
        raise ConfigMismatchError(
            f"{PARAMS_MEMBER} intensity_scale={value!r} disagrees with {MODEL_H5_MEMBER}@intensity_scale="
            f"{attribute!r}; upstream writes the same value to both"
        )
    return value
