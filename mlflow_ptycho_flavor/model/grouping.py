"""Grouping scan patterns into gridsize² channels, driven by the global ``params.cfg`` like upstream's data path.

Upstream's legacy data pipeline reads ``N`` and ``gridsize`` (and ``neighbor_count``) from the process-wide
``params.cfg`` rather than from the model (docs/bundle-format.md §2.5). This module keeps that contract on purpose - it is the
part of a pipeline that CONFIG-001 exists for: after ``load_torch_bundle`` (or :func:`restore_params`) the
global holds the bundle's values and grouping produces exactly the ``(B, C, N, N)`` input the network takes;
with the restore skipped the stale defaults (``N=128``, ``gridsize=2``) give a clear shape error instead of a
silently wrong reconstruction.

For gridsize > 1 each scan position seeds one group: the position itself followed by its ``gridsize² - 1``
nearest neighbours (ties broken by index), in order of distance - the "group order" of docs/bundle-format.md §4.3.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlflow_ptycho_flavor.bundle import params as params_module
from mlflow_ptycho_flavor.errors import ConfigMismatchError, DatasetError

__all__ = ["GroupedPatterns", "group_patterns"]


@dataclass(frozen=True)
class GroupedPatterns:
    """Network-ready groups.

    Attributes:
        diffraction: float32 ``(B, C, N, N)`` amplitudes.
        positions: float64 ``(B, C, 2)`` pixel ``(x, y)`` of every channel (for stitching).
        indices: int64 ``(B, C)`` pattern indices into the input.
    """

    diffraction: np.ndarray
    positions: np.ndarray
    indices: np.ndarray

    @property
    def gridsize(self) -> int:
        return int(round(np.sqrt(self.diffraction.shape[1])))


def group_patterns(
    diff3d: Any,
    xcoords: Any,
    ycoords: Any,
    *,
    config: Mapping[str, Any] | None = None,
) -> GroupedPatterns:
    """Group ``(M, N, N)`` patterns into ``(M, gridsize², N, N)`` using ``params.cfg`` (or ``config``).

    Args:
        diff3d: ``(M, N, N)`` amplitudes.
        xcoords, ycoords: ``(M,)`` scan positions in pixels.
        config: the legacy config to read ``N``/``gridsize``/``neighbor_count`` from; default: the global
            :data:`mlflow_ptycho_flavor.params.cfg`, which CONFIG-001 fills from the bundle.

    Raises:
        ConfigMismatchError: the data does not match the config's ``N``, or there are fewer patterns than a
            group needs (a sign the config was not restored from the bundle).
    """
    cfg = params_module.cfg if config is None else config
    N = int(cfg["N"])
    gridsize = int(cfg["gridsize"])
    channels = gridsize * gridsize
    patterns = np.asarray(diff3d)
    if patterns.ndim != 3:
        raise DatasetError(f"`diff3d` must be (M, N, N), got shape {patterns.shape}")
    if patterns.shape[1:] != (N, N):
        raise ConfigMismatchError(
            f"the patterns are {patterns.shape[1]}x{patterns.shape[2]} but params.cfg['N'] = {N}: the global "
            "config does not describe this model. Restore the bundle's params first (CONFIG-001: "
            "load_torch_bundle(...) or mlflow_ptycho_flavor.restore_params(params))"
        )
    x = np.asarray(xcoords, dtype=np.float64).reshape(-1)
    y = np.asarray(ycoords, dtype=np.float64).reshape(-1)
    count = patterns.shape[0]
    if x.shape[0] != count or y.shape[0] != count:
        raise DatasetError(f"xcoords/ycoords have {x.shape[0]}/{y.shape[0]} entries for {count} patterns")
    if channels > count:
        raise ConfigMismatchError(
            f"params.cfg['gridsize'] = {gridsize} needs groups of {channels} patterns but the data has {count}; "
            "restore the bundle's params first (CONFIG-001)"
        )
    points = np.stack([x, y], axis=1)
    if channels == 1:
        indices = np.arange(count, dtype=np.int64)[:, None]
    else:
        distances = np.linalg.norm(points[:, None, :] - points[None, :, :], axis=-1)
        order = np.argsort(distances, axis=1, kind="stable")
        # argsort puts the pattern itself first (distance 0) unless positions coincide; force it first.
        indices = np.empty((count, channels), dtype=np.int64)
        for seed in range(count):
            neighbours = order[seed][order[seed] != seed][: channels - 1]
            indices[seed, 0] = seed
            indices[seed, 1:] = neighbours
    grouped = np.ascontiguousarray(patterns[indices], dtype=np.float32)
    return GroupedPatterns(diffraction=grouped, positions=points[indices], indices=indices)
