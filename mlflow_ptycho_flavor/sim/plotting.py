"""PNG figures a person would rather look at than read: reconstructions beside ground truth, loss curves.

Matplotlib is imported lazily with the non-interactive ``Agg`` backend, so headless servers and CI work.
Files are written atomically, with ordinary permissions (:mod:`mlflow_ptycho_flavor._io`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mlflow_ptycho_flavor._io import atomic_write
from mlflow_ptycho_flavor.errors import InvalidArgumentError

__all__ = ["save_reconstruction_figure"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _masked(values: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    if mask is None:
        return values
    return np.ma.masked_where(~mask, values)


def save_reconstruction_figure(
    path: str | os.PathLike,
    reconstruction: np.ndarray,
    *,
    truth: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    loss_history: Sequence[float] | None = None,
    loss_steps: Sequence[int] | None = None,
    title: str | None = None,
    notes: str | None = None,
) -> Path:
    """Write a PNG: amplitude and phase of the reconstruction (and of the ground truth), plus the loss curve.

    Args:
        path: the PNG to write.
        reconstruction: complex 2-D object (stitched) in the same frame as ``truth``.
        truth: complex 2-D ground-truth object, or None.
        mask: bool 2-D region the reconstruction covers (outside is blanked).
        loss_history: training loss per step (or at ``loss_steps``), or None.
        loss_steps: the 1-based steps of the values in ``loss_history`` when it is sampled (None: every step).
        title: figure title.
        notes: a line of text (error figures) under the title.

    Returns:
        The path written.
    """
    if loss_history is not None:
        steps = np.arange(1, len(loss_history) + 1) if loss_steps is None else np.asarray(loss_steps)
        if steps.shape != (len(loss_history),):
            raise InvalidArgumentError(
                f"loss_steps has {steps.size} entries for {len(loss_history)} loss values; pass one step per value"
            )
    plt = _pyplot()
    rows = [("reconstruction", reconstruction)]
    if truth is not None:
        rows.insert(0, ("ground truth", truth))
    columns = 3 if loss_history is not None else 2
    figure, axes = plt.subplots(len(rows), columns, figsize=(4.2 * columns, 3.8 * len(rows)), squeeze=False)
    amplitude_limits = None
    phase_limits = (-np.pi, np.pi)
    if truth is not None:
        covered = truth[mask] if mask is not None else truth.ravel()
        amplitude_limits = (float(np.abs(covered).min()), float(np.abs(covered).max()))
        bound = float(np.abs(np.angle(covered)).max())
        phase_limits = (-bound, bound) if bound > 0 else phase_limits
    for row, (label, image) in enumerate(rows):
        amp_axis, phase_axis = axes[row][0], axes[row][1]
        shown = _masked(np.abs(image), mask)
        im = amp_axis.imshow(shown, cmap="gray", vmin=amplitude_limits[0] if amplitude_limits else None,
                             vmax=amplitude_limits[1] if amplitude_limits else None)
        amp_axis.set_title(f"{label}: amplitude")
        figure.colorbar(im, ax=amp_axis, fraction=0.046, pad=0.04)
        im = phase_axis.imshow(_masked(np.angle(image), mask), cmap="RdBu_r", vmin=phase_limits[0],
                               vmax=phase_limits[1])
        phase_axis.set_title(f"{label}: phase (rad)")
        figure.colorbar(im, ax=phase_axis, fraction=0.046, pad=0.04)
        for axis in (amp_axis, phase_axis):
            axis.set_xticks([])
            axis.set_yticks([])
    if loss_history is not None:
        loss_axis = axes[0][2]
        values = np.asarray(loss_history, dtype=float)
        loss_axis.plot(steps, values, lw=1.2)
        finite = values[np.isfinite(values)]
        if finite.size and finite.min() > 0 and finite.max() > 20 * finite.min():
            loss_axis.set_yscale("log")  # a long run's loss spans decades
        loss_axis.set_xlabel("step")
        loss_axis.set_ylabel("training loss")
        loss_axis.set_title("training loss")
        loss_axis.grid(alpha=0.3)
        for extra in axes[1:, 2] if len(rows) > 1 else []:
            extra.axis("off")
    if title:
        figure.suptitle(title + (f"\n{notes}" if notes else ""), fontsize=11)
    figure.tight_layout()
    try:
        target = atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=110))
    finally:
        plt.close(figure)
    return target
