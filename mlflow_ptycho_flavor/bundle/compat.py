"""Compatibility checks between a bundle's weights and the network its configuration describes.

Upstream's architecture eras (docs/bundle-format.md §3.6) and variants (§8.6.6) are recognised and refused by
name; the weights are checked against the configured network built on the ``meta`` device (keys, shapes, dtypes,
alias agreement, and the bytes the member really holds) before anything real is allocated (§5), and must be finite;
strict-load failures are reported as one :class:`~mlflow_ptycho_flavor.errors.StateDictMismatchError` listing the
first differences. The meta layout also says how many bytes ``model.pth`` can genuinely hold
(:attr:`Layout.genuine_file_bytes`), which the reader uses instead of the compression-ratio cap; layouts are cached
only for configurations whose weights passed the fit check.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from mlflow_ptycho_flavor.errors import (
    ArchitectureEraError,
    BundleError,
    ConfigMismatchError,
    CorruptBundleError,
    NonFiniteWeightsError,
    StateDictMismatchError,
    UnsafeBundleError,
    UnsupportedBundleError,
    short_message,
    short_repr,
)
from mlflow_ptycho_flavor.network import AnyNetworkConfig, FnoNetworkConfig, build_network, weightless_construction
from mlflow_ptycho_flavor.network.fno import check_aliases_agree

__all__ = [
    "config_errors",
    "check_fits",
    "check_input_scale",
    "check_state_dict_values",
    "check_finite_weights",
    "detect_era",
    "expected_layout",
    "expected_weight_bytes",
    "genuine_file_bytes",
    "network_layout",
    "Layout",
    "LAYOUT_CACHE_SIZE",
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
            f"{source}: invalid configuration value ({type(exc).__name__}: {short_message(exc)})"
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
    """Refuse anything but a dict of dense CPU tensors, and Python attributes a pickle set on the dict or its
    tensors (torch's unpickler lets ``BUILD`` fill an ``OrderedDict``'s ``__dict__`` and a parameter's state): an
    attribute named ``items`` or ``is_floating_point`` would make the checks below see what the pickle chose.
    ``_metadata``, the module versions ``state_dict()`` records, is the one attribute a genuine state_dict has."""
    if not isinstance(state_dict, Mapping) or not all(isinstance(k, str) for k in state_dict):
        raise CorruptBundleError(f"{member} must hold a state_dict (a dict of tensors)")
    attributes = [name for name in getattr(state_dict, "__dict__", {}) if name != "_metadata"]
    attributes += [
        f"{key}.{name}" for key, value in dict.items(state_dict) if isinstance(value, torch.Tensor)
        for name in getattr(value, "__dict__", {})
    ]
    if attributes:
        raise UnsafeBundleError(
            f"{member} sets the Python attributes {short_repr(attributes[:5])} on its state_dict or tensors, which "
            "a saved state_dict never has (they could hide its contents from checks); refused"
        )
    if "_sentinel" in state_dict:
        raise CorruptBundleError(f"{member} is a weightless sentinel; the bundle has no trained network")
    for key, value in dict.items(state_dict):
        if not isinstance(value, torch.Tensor):
            continue  # reported with the key/shape diff (StateDictMismatchError)
        if value.layout != torch.strided or value.device.type != "cpu" or value.is_quantized:
            raise CorruptBundleError(
                f"{member}: {short_repr(key)} is a {value.layout} tensor on {value.device.type}; weights are dense CPU "
                "tensors"
            )


def detect_era(state_dict: Mapping[str, torch.Tensor], cfg: AnyNetworkConfig) -> None:
    """Refuse weights this loader recognises but cannot run faithfully, naming what they are.

    CNN: the state_dicts of upstream eras E0-E2 (docs/bundle-format.md §3.6). FNO family: the spectral layer of
    the ``neuraloperator`` package (§8.6.6). Either: a state_dict of the other family than the configuration.
    """
    if isinstance(cfg, FnoNetworkConfig):
        _detect_fno_variant(state_dict, cfg)
        return
    generator = next((k for k in state_dict if k.startswith("model.generator.")), None)
    if generator is not None:
        raise StateDictMismatchError(
            f"diffraction_to_obj/model.pth holds neural-operator generator weights ({short_repr(generator)}) but "
            "the bundle's configuration describes the CNN (architecture='cnn'); the params/metadata and the "
            "weights come from different models. Re-save the bundle with its real architecture"
        )
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


def _detect_fno_variant(state_dict: Mapping[str, Any], cfg: FnoNetworkConfig) -> None:
    foreign = next(
        (k for k in state_dict if ".spectral." in k and not k.endswith(".spectral.weights")), None
    )
    if foreign is not None:
        raise UnsupportedBundleError(
            f"{short_repr(foreign)}: this {cfg.architecture} was trained where the external 'neuraloperator' "
            "package's spectral layer was importable, whose keys and numerics differ from the built-in layer "
            "(docs/bundle-format.md §8.6.6); only the built-in spectral layer (keys '*.spectral.weights') is "
            "supported. Retrain or re-export without neuraloperator installed"
        )
    if any(k.startswith("model.autoencoder.encoder.") for k in state_dict):
        raise StateDictMismatchError(
            f"diffraction_to_obj/model.pth holds CNN encoder weights but the bundle's configuration describes "
            f"architecture={cfg.architecture!r}; the params/metadata and the weights come from different models"
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


#: Most layouts kept in memory (one per distinct configuration whose weights passed :func:`check_fits`).
LAYOUT_CACHE_SIZE = 8


@dataclasses.dataclass(frozen=True)
class Layout:
    """The state_dict a configuration describes, built on the ``meta`` device (no memory allocated).

    Attributes:
        tensors: meta tensors by key (shapes, dtypes), as ``state_dict()`` returns them.
        weight_bytes: bytes of the distinct weight tensors (an alias key of the FNO family, §8.6.5, counts once).
    """

    tensors: "OrderedDict[str, torch.Tensor]"
    weight_bytes: int

    @property
    def genuine_file_bytes(self) -> int:
        """Most bytes a genuine ``model.pth`` of this layout holds (:func:`genuine_file_bytes`)."""
        return genuine_file_bytes(self.weight_bytes, len(self.tensors))


_layout_cache: "OrderedDict[AnyNetworkConfig, Layout]" = OrderedDict()
_layout_lock = threading.Lock()


def genuine_file_bytes(weight_bytes: int, tensor_count: int) -> int:
    """Most bytes a genuine torch file of ``tensor_count`` tensors holding ``weight_bytes`` bytes has: the weights
    plus torch's zip framing (data.pkl, one header and up to 64 bytes of alignment per record; generous)."""
    return weight_bytes + 64 * 1024 + 1024 * tensor_count


def _layout_key(config: AnyNetworkConfig) -> AnyNetworkConfig:
    # The input scale changes no tensor: every scale shares one layout.
    return dataclasses.replace(config, intensity_scale_trainable=False)


def network_layout(config: AnyNetworkConfig) -> Layout:
    """The :class:`Layout` of a configuration.

    Served from a small cache (:data:`LAYOUT_CACHE_SIZE`) that holds only configurations whose weights passed
    :func:`check_fits`: a refused bundle's configuration, however odd, leaves nothing behind. Otherwise built on
    the ``meta`` device.

    Raises:
        ConfigMismatchError: the configuration cannot be built.
    """
    key = _layout_key(config)
    with _layout_lock:
        cached = _layout_cache.get(key)
        if cached is not None:
            _layout_cache.move_to_end(key)
            return cached
    with config_errors("the bundle's network configuration"), weightless_construction():
        tensors = build_network(key).state_dict(keep_vars=True)
    distinct = {id(t): t for t in tensors.values()}.values()
    return Layout(
        OrderedDict((k, v.detach()) for k, v in tensors.items()), sum(tensor_bytes(t) for t in distinct)
    )


def _remember_layout(config: AnyNetworkConfig, layout: Layout) -> None:
    key = _layout_key(config)
    with _layout_lock:
        _layout_cache[key] = layout
        _layout_cache.move_to_end(key)
        while len(_layout_cache) > LAYOUT_CACHE_SIZE:
            _layout_cache.popitem(last=False)


def expected_layout(config: AnyNetworkConfig) -> "OrderedDict[str, torch.Tensor]":
    """The state_dict layout (meta tensors: keys, shapes, dtypes) of a configuration (:func:`network_layout`)."""
    return network_layout(config).tensors


def expected_weight_bytes(config: AnyNetworkConfig) -> int:
    """Bytes of the configuration's distinct weight tensors: an alias key (FNO family, §8.6.5) counts once."""
    return network_layout(config).weight_bytes


def check_fits(
    config: AnyNetworkConfig, state_dict: Mapping[str, Any], stored_bytes: int, layout: Layout | None = None
) -> None:
    """Check the weights against the configured network built on the ``meta`` device (allocates nothing).

    A hostile configuration (``n_filters_scale=10**6``, ``gridsize=300``) would otherwise allocate without bound
    before the strict load could object, and stride-0 "expanded" tensors could match any shape from a few bytes:
    the network's distinct weight bytes must also fit in the bytes the member actually holds. For the FNO family
    the alias keys of one tensor must hold equal values (§8.6.5). ``layout``: :func:`network_layout` of ``config``
    when the caller already has it. Only a configuration that passes is cached.
    """
    layout = network_layout(config) if layout is None else layout
    problems = state_dict_problems(layout.tensors, state_dict)
    if problems:
        raise_mismatch(problems)
    if layout.weight_bytes > stored_bytes:
        raise StateDictMismatchError(
            f"the configured network needs {layout.weight_bytes} bytes of weights but diffraction_to_obj/model.pth "
            f"holds only {stored_bytes}: its tensors are expanded views, not stored weights; refused"
        )
    if isinstance(config, FnoNetworkConfig):
        check_aliases_agree(config, state_dict)
    _remember_layout(config, layout)


def _nonfinite_count(key: str, flat: torch.Tensor) -> str:
    """``"<key> holds <n> NaN or infinite value(s) ..."``, counted in chunks; empty when a sum overflowed from
    finite values only."""
    bad = sum(int((~torch.isfinite(chunk)).sum()) for chunk in flat.split(1 << 22))
    if not bad:
        return ""
    return f"{short_repr(key)} holds {bad} NaN or infinite value(s) of {flat.numel()} (dtype {flat.dtype})"


def check_finite_weights(state_dict: Mapping[str, Any], member: str) -> None:
    """Refuse NaN or infinite weights, real or complex.

    Such a network predicts NaN/inf for every input; refusing names the keys instead of failing later in serving.
    A tensor whose sum is finite holds no NaN or infinity (either would make the sum non-finite), so genuine
    weights cost one reduction each; only a non-finite sum (NaN/inf present, or finite values overflowing) is
    counted exactly, in chunks, so the temporary masks stay small whatever the tensor size. Run after
    :func:`check_fits` when loading, so only the expected keys, shapes and dtypes reach the scan (the work is what
    the network's own weights cost).

    Raises:
        NonFiniteWeightsError: naming the first offending keys and how many values each holds.
    """
    sums: dict[torch.dtype, list[tuple[str, torch.Tensor, torch.Tensor]]] = {}
    for key, tensor in dict.items(state_dict):
        if not isinstance(tensor, torch.Tensor) or not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        total = tensor.detach().sum()
        sums.setdefault(total.dtype, []).append((key, tensor, total))
    offenders = []
    for group in sums.values():
        # one finiteness test per dtype for all the sums; the per-tensor count only where one is not finite
        if bool(torch.isfinite(torch.stack([total for _, _, total in group])).all()):
            continue
        for key, tensor, total in group:
            if not bool(torch.isfinite(total)):
                offenders.append(_nonfinite_count(key, tensor.detach().reshape(-1)))
    offenders = [text for text in offenders if text]
    if offenders:
        raise NonFiniteWeightsError(
            f"{member}: {'; '.join(offenders[:5])}{'; ...' if len(offenders) > 5 else ''}. A network with such weights "
            "predicts NaN for every input: re-export the model from a healthy checkpoint, or pass "
            "allow_nonfinite=True to save or load it anyway (forensics)"
        )


def strict_load(network: torch.nn.Module, state_dict: Mapping[str, Any]) -> None:
    problems = state_dict_problems(network.state_dict(), state_dict)
    if problems:
        raise_mismatch(problems)
    with config_errors("diffraction_to_obj/model.pth"):
        network.load_state_dict(state_dict, strict=True)


def check_input_scale(config: AnyNetworkConfig, source: str) -> None:
    """Refuse a trainable (fixed) input scale the network cannot apply: not a finite number > 0, or one whose
    ``exp(float32(ln scale))`` - what the network multiplies every input by (docs/bundle-format.md §8.4) -
    overflows to infinity or underflows to 0 in float32 (e.g. 1e300, 1e-300)."""
    if not config.intensity_scale_trainable:
        return
    scale = config.intensity_scale
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ConfigMismatchError(
            f"{source}: intensity_scale={short_repr(scale)} with a trainable (fixed) input scale would multiply "
            "every input by NaN, 0 or infinity; it must be a finite number > 0"
        )
    applied = float(torch.exp(torch.tensor(math.log(scale), dtype=torch.float32)))
    if not (math.isfinite(applied) and applied >= float(torch.finfo(torch.float32).tiny)):
        raise ConfigMismatchError(
            f"{source}: intensity_scale={short_repr(scale)} with a trainable (fixed) input scale becomes "
            f"{applied} in float32 (the network multiplies every input by exp(float32(ln scale))); it must lie "
            "within float32's normal range, about 1.2e-38 to 3.4e38"
        )
