"""Compatibility checks between a bundle's weights and the network its configuration describes.

Upstream's architecture eras (docs/bundle-format.md §3.6) are recognised and refused by name; the weights are
checked against the configured network built on the ``meta`` device (keys, shapes, dtypes, and the bytes the
member really holds) before anything real is allocated (§5); strict-load failures are reported as one
:class:`~mlflow_ptycho_flavor.errors.StateDictMismatchError` listing the first differences.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from mlflow_ptycho_flavor.errors import (
    ArchitectureEraError,
    BundleError,
    ConfigMismatchError,
    CorruptBundleError,
    StateDictMismatchError,
    short_repr,
)
from mlflow_ptycho_flavor.network import NetworkConfig, PtychoPINNNetwork

__all__ = [
    "config_errors",
    "check_fits",
    "check_input_scale",
    "check_state_dict_values",
    "detect_era",
    "expected_layout",
    "stored_bytes",
    "strict_load",
]


@contextlib.contextmanager
def config_errors(source: str) -> Iterator[None]:
    """Turn the errors plain-data validation and network construction raise on bad values into typed errors."""
    try:
        yield
    except BundleError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError, ZeroDivisionError, RuntimeError,
            MemoryError, RecursionError) as exc:
        raise ConfigMismatchError(
            f"{source}: invalid configuration value ({type(exc).__name__}: {str(exc)[:300]})"
        ) from exc


def tensor_bytes(tensor: Any) -> int:
    return tensor.numel() * tensor.element_size() if isinstance(tensor, torch.Tensor) else 0


def stored_bytes(state_dict: Mapping[str, Any]) -> int:
    """Bytes of distinct storages behind the tensors (an expanded view counts once, at its real size)."""
    seen: dict[int, int] = {}
    for tensor in state_dict.values():
        if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(seen.values())


def check_state_dict_values(state_dict: Any, member: str) -> None:
    if not isinstance(state_dict, Mapping) or not all(isinstance(k, str) for k in state_dict):
        raise CorruptBundleError(f"{member} must hold a state_dict (a dict of tensors)")
    if "_sentinel" in state_dict:
        raise CorruptBundleError(f"{member} is a weightless sentinel; the bundle has no trained network")
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            continue  # reported with the key/shape diff (StateDictMismatchError)
        if value.layout != torch.strided or value.device.type != "cpu" or value.is_quantized:
            raise CorruptBundleError(
                f"{member}: {short_repr(key)} is a {value.layout} tensor on {value.device.type}; weights are dense CPU "
                "tensors"
            )


def detect_era(state_dict: Mapping[str, torch.Tensor], cfg: NetworkConfig) -> None:
    """Refuse state_dicts of upstream eras E0-E2 (docs/bundle-format.md §3.6), whose forward cannot be reproduced."""
    keys = set(state_dict)
    merge = sorted(k for k in keys if ".merge_blocks." in k)
    if merge:
        raise ArchitectureEraError(
            f"this state_dict is from upstream's E1 era (UNet skip merges, 2026-04-21..2026-07-09): keys such as "
            f"{merge[:2]} exist only there and its heads are real/imag with a different forward; this loader "
            "builds the current (E3) network only. Re-export the model with current PtychoPINN"
        )
    if cfg.mode == "Unsupervised" and "model.forward_model.alpha" in keys and (
        "model.forward_model.rect_scaler.s1" not in keys
    ):
        raise ArchitectureEraError(
            "this state_dict is from upstream's E0 era (no model.forward_model.rect_scaler.s1/s2, legacy heads): "
            "its forward differs from the current (E3) network; re-export the model with current PtychoPINN"
        )
    if cfg.use_legacy_decoder_channel_override or cfg.use_shared_decoder:
        return
    key = "model.autoencoder.decoder_amp.amp.conv1.weight"
    weight = state_dict.get(key)
    if isinstance(weight, torch.Tensor) and weight.dim() == 4:
        width = 32 * cfg.n_filters_scale
        legacy_in = width - max(1, int(math.floor(width * 0.125)))
        current = (cfg.channels, width - cfg.channels)
        # Legacy heads take 32s - floor(4s) input channels and give one amplitude channel; at n_filters_scale=1
        # and gridsize 2 the input count coincides with the current head's, so compare the output count too.
        if weight.shape[0] == 1 and weight.shape[1] == legacy_in and tuple(weight.shape[:2]) != current:
            raise ArchitectureEraError(
                f"{key} has shape {tuple(weight.shape)}: the legacy head of upstream's E0-E2 eras (border path "
                f"of {width - legacy_in} channels, unmasked border), whose forward differs from the current (E3) "
                f"network expecting (out, in) channels {current}; re-export the model with current PtychoPINN"
            )


def state_dict_problems(expected: Mapping[str, torch.Tensor], state_dict: Mapping[str, Any]) -> list[str]:
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)})")
    if unexpected:
        problems.append(
            f"unexpected keys {[k[:160] for k in unexpected[:5]]}{' ...' if len(unexpected) > 5 else ''} "
            f"({len(unexpected)})"
        )
    for key, ref in expected.items():
        got = state_dict.get(key)
        if got is None:
            continue
        if not isinstance(got, torch.Tensor):
            problems.append(f"{key} is a {type(got).__name__}, not a tensor")
        elif tuple(got.shape) != tuple(ref.shape):
            problems.append(f"{key} has shape {tuple(got.shape)}, the configuration needs {tuple(ref.shape)}")
        elif got.dtype != ref.dtype:
            problems.append(f"{key} has dtype {got.dtype}, expected {ref.dtype}")
    return problems


def raise_mismatch(problems: list[str]) -> None:
    raise StateDictMismatchError(
        "diffraction_to_obj/model.pth does not fit the network its configuration describes ("
        + "; ".join(problems[:6])
        + "). The weights and the params/metadata come from different models; nothing was loaded"
    )


@functools.lru_cache(maxsize=32)
def expected_layout(config: NetworkConfig) -> "OrderedDict[str, torch.Tensor]":
    """The state_dict layout (meta tensors: keys, shapes, dtypes) of a configuration, built once per process."""
    with torch.device("meta"):
        return PtychoPINNNetwork(config).state_dict()


def check_fits(config: NetworkConfig, state_dict: Mapping[str, Any], stored_bytes: int) -> None:
    """Check the weights against the configured network built on the ``meta`` device (allocates nothing).

    A hostile configuration (``n_filters_scale=10**6``, ``gridsize=300``) would otherwise allocate without bound
    before the strict load could object, and stride-0 "expanded" tensors could match any shape from a few bytes:
    the network's parameter bytes must also fit in the bytes the member actually holds.
    """
    with config_errors("the bundle's network configuration"):
        expected = expected_layout(dataclasses.replace(config, intensity_scale_trainable=False))
    problems = state_dict_problems(expected, state_dict)
    if problems:
        raise_mismatch(problems)
    needed = sum(tensor_bytes(t) for t in expected.values())
    if needed > stored_bytes:
        raise StateDictMismatchError(
            f"the configured network needs {needed} bytes of weights but diffraction_to_obj/model.pth holds only "
            f"{stored_bytes}: its tensors are expanded views, not stored weights; refused"
        )


def strict_load(network: PtychoPINNNetwork, state_dict: Mapping[str, Any]) -> None:
    problems = state_dict_problems(network.state_dict(), state_dict)
    if problems:
        raise_mismatch(problems)
    with config_errors("diffraction_to_obj/model.pth"):
        network.load_state_dict(state_dict, strict=True)


def check_input_scale(config: NetworkConfig, source: str) -> None:
    if config.intensity_scale_trainable:
        scale = config.intensity_scale
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ConfigMismatchError(
                f"{source}: intensity_scale={scale!r} with a trainable (fixed) input scale would multiply every "
                "input by NaN, 0 or infinity; it must be a finite number > 0"
            )
